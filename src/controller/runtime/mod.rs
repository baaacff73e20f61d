//! The PromptFlowRuntime reconciler, as a visible pipeline, one room per step:
//! [`observe`] (read what the runtime points to) → [`plan`] (pure: validate, size and build the
//! pod) → [`apply`] (create, replace or keep the pod) → [`report`] (compose the status, patch only
//! on difference, one event per transition).

mod apply;
mod observe;
mod own_writes;
mod plan;
mod report;
mod size;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceQuota, ServiceAccount};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

pub use self::own_writes::OwnWrites;
use self::plan::IdentityCondition;
use self::report::Report;
use self::status::Verdict;
use super::index::DependencyIndex;
use crate::api::PromptFlowRuntime;
use crate::api::conditions::reasons;
use crate::build::pod::PodSecurity;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "promptflow-operator";

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The instance-type catalog.
    pub catalog: Catalog,
    /// How runtime pods are secured.
    pub security: PodSecurity,
    /// Publishes events.
    pub recorder: Recorder,
    /// Owned pods.
    pub pods: Store<Pod>,
    /// Service accounts.
    pub accounts: Store<ServiceAccount>,
    /// Resource quotas.
    pub quotas: Store<ResourceQuota>,
    /// Which runtimes read which objects.
    pub index: DependencyIndex,
    /// Counters and timings.
    pub metrics: Arc<Metrics>,
    /// Turns true once the pod, service-account and quota caches hold a full list.
    pub caches_ready: tokio::sync::watch::Receiver<bool>,
    /// What this operator last wrote, for reconciles that run before the caches saw the write.
    pub own_writes: OwnWrites,
    /// Consecutive failures per runtime, for backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<PromptFlowRuntime>, u32>>,
}

/// Reconciles one runtime from its full state.
pub async fn reconcile(runtime: Arc<PromptFlowRuntime>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let key = ObjectRef::from_obj(&*runtime);
    let action = reconcile_runtime(&runtime, &ctx).await?;
    ctx.failures.lock().expect("failures lock").remove(&key);
    Ok(action)
}

async fn reconcile_runtime(runtime: &PromptFlowRuntime, ctx: &Context) -> Result<Action> {
    // Decisions need complete caches (a service account missing from a half-filled cache is not
    // missing). One task waits on the stores; reconciles wait on its signal, which wakes them all.
    ctx.caches_ready
        .clone()
        .wait_for(|ready| *ready)
        .await
        .map_err(|_| Error::StoreClosed)?;
    let key = ObjectRef::from_obj(runtime);
    if runtime.meta().deletion_timestamp.is_some() {
        // The garbage collector deletes the pod through its owner reference.
        return Ok(Action::await_change());
    }
    let namespace = runtime.namespace().ok_or(Error::NotNamespaced)?;
    let name = runtime.name_any();

    if let Some(instance) = &runtime.spec.compute.instance {
        let verdict = Verdict::not_available(
            reasons::COMPUTE_INSTANCE_UNSUPPORTED,
            format!(
                "runtimes on ComputeInstance {} are not supported by this operator version yet; use spec.compute.serverless",
                instance.name
            ),
        );
        let identity = IdentityCondition {
            resolved: false,
            reason: reasons::PENDING,
            message: "not resolved: the runtime has no compute to run on".to_owned(),
        };
        let report = Report {
            verdict: &verdict,
            identity: &identity,
            compute: &instance.name,
            facts: None,
            anonymous_pull: false,
        };
        report::write_status(runtime, ctx, &report).await?;
        ctx.index.record(key, vec![]);
        return Ok(Action::await_change());
    }

    let observed = observe::observe(runtime, ctx, &namespace, &key).await?;
    let plan = plan::plan(runtime, &observed, &ctx.catalog, &ctx.security);
    let (verdict, action, facts) = match &plan.pod {
        Err(problem) => (
            Verdict::not_available(problem.reason, problem.message.clone()),
            Action::await_change(),
            None,
        ),
        Ok(desired) => {
            let outcome = apply::apply_pod(ctx, desired, observed.pod.as_deref()).await?;
            if let Some(notice) = &outcome.notice {
                report::publish(ctx, runtime, notice).await;
            }
            (outcome.verdict, outcome.action, Some(&desired.facts))
        }
    };
    let report = Report {
        verdict: &verdict,
        identity: &plan.identity,
        compute: "Serverless",
        facts,
        anonymous_pull: plan.anonymous_pull,
    };
    report::write_status(runtime, ctx, &report).await?;
    info!(%name, %namespace, phase = ?verdict.phase, reason = %verdict.reason, "reconciled");
    Ok(action)
}

/// Drops what is kept for runtimes that no longer exist (after a watch re-list, which reports no
/// deletions for what went away while the watch was down).
pub fn forget_missing(ctx: &Context, exists: impl Fn(&ObjectRef<PromptFlowRuntime>) -> bool) {
    ctx.index.retain(&exists);
    ctx.own_writes.retain(&exists);
    ctx.failures.lock().expect("failures lock").retain(|key, _| exists(key));
}

/// Drops everything kept for a runtime that was deleted.
pub fn forget(ctx: &Context, runtime: &PromptFlowRuntime) {
    let key = ObjectRef::from_obj(runtime);
    let pod = apply::pod_ref(&runtime.name_any(), &runtime.namespace().unwrap_or_default());
    ctx.index.forget(&key);
    ctx.own_writes.forget(&key, &pod);
    ctx.failures.lock().expect("failures lock").remove(&key);
}

/// Transient errors requeue with exponential backoff per runtime (5s doubling to 5m).
pub fn error_policy(runtime: Arc<PromptFlowRuntime>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    let key = ObjectRef::from_obj(&*runtime);
    let mut failures = ctx.failures.lock().expect("failures lock");
    let count = failures.entry(key).or_insert(0);
    *count = count.saturating_add(1);
    let delay = Duration::from_secs(5)
        .saturating_mul(1 << (*count - 1).min(6))
        .min(Duration::from_secs(300));
    warn!(name = %runtime.name_any(), namespace = ?runtime.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
