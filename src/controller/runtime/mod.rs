//! The PromptFlowRuntime reconciler, as a visible pipeline that runs one way, one room per step,
//! inside the runtime's frame ([`apply::frame`]: its Service, or its hold on an instance):
//! [`observe`] (read what the runtime points to) → [`plan`] (pure: resolve, pin, and decide its
//! containers: a pod of its own, sized and built, or its part of a compute instance) → [`apply`]
//! (the Service, and create, replace or keep the pod; or the finalizer and the Service at the
//! instance slot) → [`report`] (compose the status, patch only on difference, one event per
//! transition). Stopping, idle and versions are steps of their own ([`lifecycle`], [`idle`],
//! [`versions`]); [`on_instance`] says how a runtime reads from its instance's pod; a new
//! runtime's first status may wait for its pod ([`first_status`]).

pub(crate) mod apply;
mod backoff;
mod first_status;
mod idle;
mod lifecycle;
pub(crate) mod observe;
mod on_instance;
mod own_writes;
pub(crate) mod plan;
pub(crate) mod pod_state;
pub(crate) mod report;
mod size;
pub mod status;
pub(crate) mod versions;

use std::sync::Arc;
use std::time::Duration;

use crate::controller::runner::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

pub use self::backoff::Backoff;
use self::lifecycle::Lifecycle;
pub use self::own_writes::OwnWrites;
use self::report::{Notice, Report};
use self::status::{ConditionState, Verdict};
use super::index::Dependency;
use super::launch::{Launch, STALL_AFTER};
use super::lean::Named;
use crate::api::conditions::{self, reasons};
use crate::api::{HandledActions, PromptFlowRuntime, RuntimePhase};
use crate::error::{Error, Result};

pub use super::context::{Context, MANAGER};

/// Reconciles one runtime from its full state. Whatever goes wrong, a runtime the operator has
/// seen gets a status with a reason: an error before the first status is written becomes
/// `Not available` / `ReconcileFailed` with the error, and is retried with backoff.
pub async fn reconcile(runtime: Arc<PromptFlowRuntime>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let key = ObjectRef::from_obj(&*runtime);
    // A place in the launch window this reconcile did not use goes on, however it ends.
    let _window = LaunchDone {
        ctx: &ctx,
        key: Named::of(&key),
        began: tokio::time::Instant::now(),
    };
    let result = reconcile_runtime(&runtime, &ctx).await;
    // Deleted while this reconcile ran (its writes then fail with 404): what it recorded after
    // the deletion was forgotten is forgotten again, and nothing is retried. One made again
    // under its name meanwhile is another runtime: its own event reconciles it afresh.
    if !ctx.runtime_is(&key, runtime.metadata.uid.as_deref()) {
        forget(&ctx, &key.name, key.namespace.as_deref().unwrap_or_default());
        return Ok(Action::await_change());
    }
    match result {
        Ok(action) => {
            ctx.failures.reset(&key);
            Ok(action)
        }
        Err(err) => {
            // A first status held back counts as reported while the wait lasts (the runtime is
            // starting; the error is retried with backoff); past it, a failure that keeps every
            // reconcile from writing is said.
            let held_for = ctx.own_writes.held_for(&runtime);
            let unreported = held_for.is_none_or(|held| held >= first_status::FIRST_STATUS_WAIT)
                && runtime
                    .status
                    .as_ref()
                    .is_none_or(|s| s.reason.as_deref() == Some(reasons::RECONCILE_FAILED));
            if unreported && !matches!(err, Error::StoreClosed) {
                let verdict = Verdict::not_available(
                    reasons::RECONCILE_FAILED,
                    format!("the operator could not reconcile this runtime and retries with backoff: {err}"),
                );
                let report = Report {
                    verdict: &verdict,
                    conditions: &[],
                    compute: compute_name(&runtime),
                    facts: None,
                    handled: &HandledActions::default(),
                    url: None,
                    drop_url: false,
                    last_activity: None,
                    latest: None,
                    notice: None,
                };
                if let Err(write) = report::write_status(&runtime, &ctx, &report).await {
                    warn!(name = %runtime.name_any(), error = %write, "could not report the failure in the status");
                }
            }
            Err(err)
        }
    }
}

/// Whether the runtime's next pod is a launch (it has no status yet, is at rest or waits for a
/// launch) rather than the return of one it had.
fn launches(runtime: &PromptFlowRuntime) -> bool {
    runtime.status.as_ref().is_none_or(|status| {
        status.reason.as_deref().is_none_or(|reason| {
            reasons::AT_REST.contains(&reason)
                || [reasons::STOPPED_BY_SPEC, reasons::LAUNCH_QUEUED, reasons::PENDING].contains(&reason)
        })
    })
}

/// Ends a reconcile's use of the launch window when dropped (a panic included).
struct LaunchDone<'a> {
    ctx: &'a Context,
    key: Named,
    began: tokio::time::Instant,
}

impl Drop for LaunchDone<'_> {
    fn drop(&mut self) {
        self.ctx.launch.done(&self.key, self.began);
    }
}

/// `Serverless`, or the ComputeInstance the runtime asks for.
fn compute_name(runtime: &PromptFlowRuntime) -> &str {
    runtime
        .spec
        .compute
        .instance
        .as_ref()
        .map_or("Serverless", |instance| instance.name.as_str())
}

async fn reconcile_runtime(runtime: &PromptFlowRuntime, ctx: &Context) -> Result<Action> {
    // Decisions need complete caches (a service account missing from a half-filled cache is not
    // missing). One task waits on the stores; reconciles wait on its signal, which wakes them all.
    ctx.caches_filled().await?;
    // Decide from the status this operator last wrote when the cache has not caught up with it
    // (a runtime just stopped must not read as running and be started again).
    let own_view;
    let baseline = ctx.own_writes.status_baseline(runtime);
    // No status written yet (a first one may be held back: decide from it).
    let unwritten = baseline.is_none();
    let baseline = baseline.or_else(|| ctx.own_writes.held_status(runtime));
    let runtime = match baseline {
        Some(baseline) if runtime.status.as_ref() != Some(&baseline) => {
            own_view = PromptFlowRuntime {
                status: Some(baseline),
                ..runtime.clone()
            };
            &own_view
        }
        _ => runtime,
    };
    let key = ObjectRef::from_obj(runtime);
    if runtime.meta().deletion_timestamp.is_some() {
        // The garbage collector deletes the pod through its owner reference; a runtime on a
        // compute instance waits for the instance to let go of its container.
        if !on_instance::release(ctx, runtime).await? {
            // Woken when an instance pod changes (also right after an operator restart).
            ctx.index
                .record(key.clone(), on_instance::instances_holding(ctx, runtime));
        }
        return Ok(Action::await_change());
    }
    let namespace = runtime.namespace().ok_or(Error::NotNamespaced)?;
    let name = runtime.name_any();
    match crate::controller::network::ensure(ctx, &namespace).await {
        Ok(()) => {}
        Err(conflict @ crate::controller::network::NetworkError::Conflict(_)) => {
            return conflict_status(runtime, ctx, reasons::NETWORK_POLICY_CONFLICT, conflict.to_string()).await;
        }
        Err(e) => return Err(e.into()),
    }
    // A launch (a new runtime, or a start after a stop) waits for its place in the launch window
    // while kube-scheduler has enough of the operator's pods to place ([`launch`](super::launch));
    // a runtime that had a pod (lost, replaced, restarted) gets its next at once. Parked, a runtime
    // the operator has not reported on yet writes nothing (it is woken when its place comes); a
    // stopped one starting says it waits, and every parked one says so once the scheduler has
    // stalled.
    if runtime.spec.compute.instance.is_none()
        && launches(runtime)
        && matches!(lifecycle::decide(runtime), Lifecycle::Run { .. })
        && apply::pod::launching(ctx, &name, &namespace)
        && let Launch::Parked { stalled } = ctx.launch.acquire(&Named::new(&namespace, &name))
    {
        let message = if stalled {
            format!(
                "kube-scheduler has placed none of the operator's waiting pods for over {}s: is it running? This runtime's pod is created once it places them (at most {} of the operator's pods wait for it at once, shared over the namespaces)",
                STALL_AFTER.as_secs(),
                ctx.launch.limit()
            )
        } else {
            format!(
                "waiting for a place to create its pod: at most {} of the operator's pods wait for kube-scheduler at once, shared over the namespaces with runtimes waiting, and they are taken; it goes as they are placed",
                ctx.launch.limit()
            )
        };
        if stalled || runtime.status.is_some() {
            not_available_status(runtime, ctx, reasons::LAUNCH_QUEUED, message, false).await?;
        }
        return Ok(Action::await_change());
    }
    // The frame: what the runtime has whatever its state (a serverless runtime's Service is the
    // way in, running or stopped).
    let url = match apply::frame(ctx, runtime).await? {
        Ok(url) => url,
        Err((reason, message)) => return conflict_status(runtime, ctx, reason, message).await,
    };
    // A runtime on a compute instance lives and stops with the instance; a serverless one by its
    // annotations and status.
    let serverless = runtime.spec.compute.instance.is_none();
    let start = match lifecycle::decide(runtime) {
        _ if !serverless => None,
        Lifecycle::Run { start } => start,
        stopped => return stay_stopped(runtime, ctx, stopped, url.as_deref()).await,
    };

    // Observe: a settled runtime remembers its pull secrets instead of reading them.
    let mut observed = observe::observe(runtime, ctx, &namespace, true, |deps| {
        ctx.index.record(key.clone(), deps)
    })
    .await?;
    // Plan: what the containers are made of (pinned to a version), then where they run. When the
    // remembered logins will not do (a version check is due, or the pod is to be made again),
    // the secrets are read and the plan made again from them.
    let (plan, versions, awaiting_registry) = loop {
        let (identity, mut resolved) = plan::resolve(runtime, &observed, &ctx.template.requirements);
        let versions = match &mut resolved {
            Ok(resolved) => {
                ctx.index.add(&key, Dependency::Repository(resolved.repository.clone()));
                match versions::step(runtime, ctx, resolved).await {
                    Some(outcome) => Some(outcome),
                    None => {
                        observed.read_pull_secrets(ctx, &namespace).await?;
                        continue;
                    }
                }
            }
            Err(_) => None,
        };
        let awaiting_registry = versions.as_ref().is_some_and(|v| v.waiting);
        if awaiting_registry && serverless {
            // First start: the registry is being asked for the version to pin; its answer wakes
            // this runtime (the requeue is a safety net).
            return Ok(Action::requeue(REGISTRY_WAIT));
        }
        let plan = plan::finish(
            runtime,
            &observed,
            &ctx.catalog,
            &ctx.template,
            identity,
            resolved,
            awaiting_registry,
        );
        if observed.remembered() && !keeps_pod(&plan, &observed) {
            observed.read_pull_secrets(ctx, &namespace).await?;
            continue;
        }
        remember_logins(ctx, &namespace, &observed, &plan);
        break (plan, versions, awaiting_registry);
    };
    // Apply.
    let applied = apply::apply(ctx, runtime, &plan, &observed, url).await?;
    if let Some(notice) = &applied.notice {
        report::publish(ctx, runtime, notice).await;
    }
    let mut conditions = vec![plan.identity.clone()];
    conditions.extend(applied.conditions);
    let (mut verdict, mut next, mut last_activity) = (applied.verdict, applied.requeue, None);
    // Idle: a running runtime's own pod is asked for its activity.
    let mut idle_look = None;
    if let (RuntimePhase::Running, Some(live)) = (verdict.phase, observed.pod.as_deref()) {
        let idle = idle::idle_step(runtime, ctx, live).await?;
        if idle.deleted {
            return Ok(Action::await_change());
        }
        if let Some(notice) = &idle.notice {
            report::publish(ctx, runtime, notice).await;
        }
        conditions.extend(idle.condition);
        last_activity = idle.last_activity;
        if let Some(stopped) = idle.stopped {
            verdict = stopped;
            next = None;
        } else if let Some(requeue) = idle.requeue {
            next = Some(requeue);
            idle_look = Some(requeue);
        }
    }
    let mut handled = HandledActions {
        restart: applied.handled_restart,
        start,
        ..Default::default()
    };
    let (mut latest, mut version_notice) = (None, None);
    if let Some(mut versions) = versions {
        if applied.kept_older {
            versions.not_applied();
        }
        let (newest, notice, check_again) = versions.record(&mut conditions, &mut handled);
        (latest, version_notice) = (newest, notice);
        let check_again = if awaiting_registry { REGISTRY_WAIT } else { check_again };
        // The sooner of the idle look and the next version check; a shorter look the apply
        // asked for (a pod just created, a server error, a name taken) stays.
        next = Some(match (next, idle_look) {
            (Some(apply_look), None) => apply_look.min(check_again),
            _ => idle_look.map_or(check_again, |look| look.min(check_again)),
        });
    }
    // Report.
    let report = Report {
        verdict: &verdict,
        conditions: &conditions,
        compute: compute_name(runtime),
        facts: applied
            .running
            .as_ref()
            .or(plan.facts().filter(|_| !applied.kept_older)),
        handled: &handled,
        url: applied.url.as_deref(),
        // A runtime without a Service of its own (a serverless one's create refused, or gone;
        // someone else's in its place) has no URL.
        drop_url: (serverless && applied.url.is_none()) || verdict.reason == reasons::SERVICE_CONFLICT,
        last_activity: last_activity.as_ref(),
        latest: latest.as_deref(),
        notice: version_notice.as_ref(),
    };
    // A new runtime's first status waits a moment while the pod this operator made for it
    // starts: written when the pod is Ready, it says Running at once (one status write per start
    // instead of two). Held meanwhile, it is what the next reconciles decide from.
    let ours = ctx.own_writes.is_held(runtime) || observed.pod.is_none();
    if serverless
        && ours
        && let Some(wait) = first_status::first_status_wait(
            unwritten,
            &verdict,
            &handled,
            version_notice.is_some(),
            first_status::pod_age(ctx, runtime, observed.pod.as_deref()),
        )
    {
        report::hold_first_status(runtime, ctx, &report);
        tracing::debug!(%name, %namespace, wait_ms = wait.as_millis(), "first status held while the pod starts");
        return Ok(Action::requeue(wait));
    }
    report::write_status(runtime, ctx, &report).await?;
    info!(%name, %namespace, compute = compute_name(runtime), phase = ?verdict.phase, reason = %verdict.reason, "reconciled");
    // Secrets are not watched: a runtime waiting for a pull secret to appear or be fixed looks
    // again with backoff (and at once when its service account changes).
    let waits_for_secret = plan
        .problem()
        .is_some_and(|p| [reasons::PULL_SECRET_NOT_FOUND, reasons::PULL_SECRET_INVALID].contains(&p.reason));
    if waits_for_secret {
        return Ok(Action::requeue(ctx.pull_secret_waits.next(&key)));
    }
    ctx.pull_secret_waits.reset(&key);
    Ok(next.map_or_else(Action::await_change, Action::requeue))
}

/// Whether a serverless runtime's plan keeps the pod it has (what remembered logins allow).
fn keeps_pod(plan: &plan::Plan, observed: &observe::Observed) -> bool {
    match (&plan.work, observed.pod.as_deref()) {
        (plan::Work::Pod(desired), Some(live)) => (**desired)
            .as_ref()
            .is_ok_and(|desired| apply::pod::keeps(&desired.pod, live)),
        _ => false,
    }
}

/// Remembers what the account's pull secrets, as read, came to when they resolved.
fn remember_logins(ctx: &Context, namespace: &str, observed: &observe::Observed, plan: &plan::Plan) {
    let (observe::PullSecrets::Read(secrets), Some(account)) = (&observed.pull, observed.account.as_deref()) else {
        return;
    };
    if plan.identity.status != "True" {
        return;
    }
    let read = plan::pull_secrets(&crate::identity::pull_secret_names(account), secrets);
    ctx.logins
        .remember(namespace, account, crate::identity::Logins::of(&read), |ns, name| {
            ctx.accounts
                .get(&ObjectRef::new(name).within(ns))
                .and_then(|a| a.metadata.resource_version.clone())
        });
}

/// How soon a runtime whose first version answer is awaited looks again (its answer wakes it
/// sooner).
const REGISTRY_WAIT: Duration = Duration::from_secs(15);

/// A stopped runtime (idle, or by `promptflow.dev/stop`): no pod, the object and its Service
/// kept, the status saying how to start it again.
async fn stay_stopped(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    lifecycle: Lifecycle,
    url: Option<&str>,
) -> Result<Action> {
    let namespace = runtime.namespace().unwrap_or_default();
    if let Some(live) = ctx.own_pod(&crate::build::pod::pod_name(&runtime.name_any()), &namespace, runtime) {
        apply::delete_pod(ctx, &live, runtime.uid().as_deref()).await?;
    }
    let status = runtime.status.clone().unwrap_or_default();
    let mut conditions = status::carried(&status.conditions);
    let (verdict, handled) = match lifecycle {
        Lifecycle::StopNow { value } => {
            let message = format!(
                "stopped by the {} annotation; set a new value of {} (or change the spec) to start it again",
                crate::api::annotations::STOP,
                crate::api::annotations::START
            );
            conditions.retain(|c| c.type_ != conditions::IDLE);
            conditions.push(ConditionState::new(
                conditions::IDLE,
                true,
                reasons::STOPPED_BY_USER,
                message.clone(),
            ));
            report::publish(ctx, runtime, &Notice::normal(reasons::STOPPED_BY_USER, message.clone())).await;
            let handled = HandledActions {
                stop: Some(value),
                ..Default::default()
            };
            (Verdict::not_available(reasons::STOPPED_BY_USER, message), handled)
        }
        _ => (
            Verdict::not_available(
                status.reason.as_deref().unwrap_or(reasons::STOPPED_IDLE),
                status.message.clone().unwrap_or_default(),
            ),
            HandledActions::default(),
        ),
    };
    let report = Report {
        verdict: &verdict,
        conditions: &conditions,
        compute: "Serverless",
        facts: None,
        handled: &handled,
        url,
        // Its Service gone and refused when made again: no URL (as a running one).
        drop_url: url.is_none(),
        last_activity: None,
        latest: None,
        notice: None,
    };
    report::write_status(runtime, ctx, &report).await?;
    Ok(Action::await_change())
}

/// A runtime whose Service (or its namespace's NetworkPolicy) name is taken by an object the
/// operator did not create for it: nothing is created or deleted; the status (and, on the
/// transition, a Warning event) names the object. Someone else's objects are not watched, so it
/// looks again every
/// [`apply::CONFLICT_RECHECK`].
async fn conflict_status(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    reason: &'static str,
    message: String,
) -> Result<Action> {
    // The runtime has no Service of its own: no URL names the one in its place.
    let drop_url = reason != reasons::NETWORK_POLICY_CONFLICT;
    not_available_status(runtime, ctx, reason, message, drop_url).await?;
    Ok(Action::requeue(apply::conflict_recheck(reason)))
}

/// Writes `Not available` with `reason` and `message`, keeping the other conditions (and the URL
/// unless `drop_url`).
async fn not_available_status(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    reason: &'static str,
    message: String,
    drop_url: bool,
) -> Result<()> {
    let status = runtime.status.clone().unwrap_or_default();
    let conditions = status::carried(&status.conditions);
    let verdict = Verdict::not_available(reason, message);
    let report = Report {
        verdict: &verdict,
        conditions: &conditions,
        compute: compute_name(runtime),
        facts: None,
        handled: &HandledActions::default(),
        url: None,
        drop_url,
        last_activity: None,
        latest: None,
        notice: None,
    };
    report::write_status(runtime, ctx, &report).await
}

/// Drops what is kept for runtimes that no longer exist (after a watch re-list, which reports no
/// deletions for what went away while the watch was down).
pub fn forget_missing(ctx: &Context, exists: impl Fn(&ObjectRef<PromptFlowRuntime>) -> bool) {
    ctx.index.retain(&exists);
    ctx.own_writes.retain(&exists);
    ctx.failures.retain(&exists);
    ctx.pull_secret_waits.retain(&exists);
    ctx.quota_refusals.retain(&exists);
    ctx.launch
        .retain(|namespace, name| exists(&ObjectRef::new(name).within(namespace)));
}

/// Drops everything kept for the runtime `name` of `namespace`, which was deleted.
pub fn forget(ctx: &Context, name: &str, namespace: &str) {
    let key = ObjectRef::<PromptFlowRuntime>::new(name).within(namespace);
    let pod = apply::pod_ref(name, namespace);
    ctx.index.forget(&key);
    ctx.own_writes.forget(&key, &pod);
    ctx.failures.reset(&key);
    ctx.pull_secret_waits.reset(&key);
    ctx.quota_refusals.reset(&key);
    ctx.launch.forget(&Named::new(namespace, name));
}

/// Transient errors requeue with exponential backoff per runtime (5s doubling to 5m): the
/// runtime `key` whose uid was `uid` when it was read.
pub fn error_policy(key: &ObjectRef<PromptFlowRuntime>, uid: Option<&str>, error: &Error, ctx: &Context) -> Action {
    ctx.metrics.reconcile_failed(error);
    // Deleted meanwhile (the store drops it before the deletion is forgotten): no backoff entry
    // is kept for it, or nothing would ever take it out again. One made again under its name
    // does not inherit its backoff.
    if !ctx.runtime_is(key, uid) {
        if ctx
            .runtime_uid(&key.name, key.namespace.as_deref().unwrap_or_default())
            .is_none()
        {
            ctx.failures.reset(key);
        }
        return Action::await_change();
    }
    let delay = ctx.failures.next(key);
    warn!(name = %key.name, namespace = ?key.namespace, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
