//! The PromptFlowRuntime reconciler, as a visible pipeline:
//! observe (read what the runtime points to) → plan (pure: validate and build the pod) →
//! apply (create, replace or keep the pod) → status (compare, patch only on difference).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::index::{Dependency, DependencyIndex};
use super::status::{self, PodState, StatusInputs, Verdict};
use super::written::Written;
use crate::api::conditions::reasons;
use crate::api::{DEFAULT_SERVICE_ACCOUNT, PromptFlowRuntime, PromptFlowRuntimeStatus, RuntimePhase};
use crate::build::pod::{self, INSTANCE_TYPE_ANNOTATION, PodSecurity, RuntimePodInputs};
use crate::catalog::{Catalog, InstanceType};
use crate::error::{Error, Result};
use crate::flow::{self, FlowEnvironment, FlowProblem};
use crate::identity::{self, IdentityProblem, PullIdentity};
use crate::metrics::Metrics;
use crate::quota;

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
    pub written: Written,
    /// Consecutive failures per runtime, for backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<PromptFlowRuntime>, u32>>,
}

/// What the reconcile read about the runtime's surroundings.
struct Observed {
    account_name: String,
    account: Option<Arc<ServiceAccount>>,
    secrets: BTreeMap<String, Option<Secret>>,
    flow: Option<(String, Option<ConfigMap>)>,
    pod: Option<Arc<Pod>>,
    quotas: Vec<ResourceQuota>,
}

/// The outcome of planning: the pod to run, or why there is none.
enum Plan {
    Run {
        pod: Box<Pod>,
        image: String,
        version: String,
        size: String,
    },
    Blocked {
        verdict: Verdict,
    },
}

/// Reconciles one runtime from its full state.
pub async fn reconcile(runtime: Arc<PromptFlowRuntime>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let key = ObjectRef::from_obj(&*runtime);
    let action = reconcile_runtime(runtime, &ctx).await?;
    ctx.failures.lock().expect("failures lock").remove(&key);
    Ok(action)
}

async fn reconcile_runtime(runtime: Arc<PromptFlowRuntime>, ctx: &Arc<Context>) -> Result<Action> {
    let ctx = ctx.as_ref();
    // Decisions need complete caches (a service account missing from a half-filled cache is not
    // missing). One task waits on the stores; reconciles wait on its signal, which wakes them all.
    ctx.caches_ready
        .clone()
        .wait_for(|ready| *ready)
        .await
        .map_err(|_| Error::StoreClosed)?;
    let key = ObjectRef::from_obj(&*runtime);
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
        let identity = (
            false,
            reasons::PENDING,
            "not resolved: the runtime has no compute to run on",
        );
        write_status(&runtime, ctx, &verdict, identity, &instance.name, None, false).await?;
        ctx.index.record(key, vec![]);
        return Ok(Action::await_change());
    }

    let observed = observe(&runtime, ctx, &namespace, &key).await?;
    let flow = observed
        .flow
        .as_ref()
        .map(|(cm, found)| (cm.as_str(), flow::read(cm, found.as_ref())));
    let flow_environment = flow.as_ref().and_then(|(_, read)| read.as_ref().ok());
    let (image, version) = runtime_image(&runtime, flow_environment);
    let registry = identity::registry_host(&image);
    let identity = identity::resolve(
        &observed.account_name,
        observed.account.as_deref(),
        &observed.secrets,
        &registry,
    );
    let plan = plan(&runtime, &observed, ctx, &identity, flow.as_ref(), image, version);

    let identity_condition = match &identity {
        Ok(resolved) => (true, reasons::IDENTITY_RESOLVED, identity_message(resolved, &registry)),
        Err(problem) => (false, problem.reason(), problem.to_string()),
    };
    let (verdict, facts, action) = match plan {
        Plan::Blocked { verdict } => (verdict, None, Action::await_change()),
        Plan::Run {
            pod,
            image,
            version,
            size,
        } => {
            let (verdict, action) = apply_pod(&runtime, ctx, *pod, observed.pod.as_deref(), &image).await?;
            (verdict, Some((image, version, size)), action)
        }
    };
    let identity_view = (
        identity_condition.0,
        identity_condition.1,
        identity_condition.2.as_str(),
    );
    let facts_view = facts.as_ref().map(|(i, v, s)| (i.as_str(), v.as_str(), s.as_str()));
    let anonymous = identity
        .as_ref()
        .is_ok_and(|resolved| !resolved.has_registry_credentials);
    write_status(
        &runtime,
        ctx,
        &verdict,
        identity_view,
        "Serverless",
        facts_view,
        anonymous,
    )
    .await?;
    info!(%name, %namespace, phase = ?verdict.phase, reason = %verdict.reason, "reconciled");
    Ok(action)
}

/// Reads the service account (cache), its pull secrets and the flow ConfigMap (API), the pod and
/// the namespace's quotas (cache). What it is about to read is recorded in the dependency index
/// *before* it reads, so a change landing in between still wakes the runtime.
async fn observe(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    namespace: &str,
    key: &ObjectRef<PromptFlowRuntime>,
) -> Result<Observed> {
    let account_name = runtime
        .spec
        .identity
        .as_ref()
        .and_then(|i| i.service_account_name.clone())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    let flow_name = runtime.spec.flow.as_ref().and_then(|f| f.config_map_name.clone());
    let pod = ctx
        .pods
        .get(&ObjectRef::new(&pod::pod_name(&runtime.name_any())).within(namespace));

    let mut dependencies = vec![Dependency::ServiceAccount(namespace.to_owned(), account_name.clone())];
    if let Some(cm) = &flow_name {
        dependencies.push(Dependency::ConfigMap(namespace.to_owned(), cm.clone()));
    }
    // Sizing a new pod (none yet, or a resize) reads quota headroom, or waits for it.
    let resizing = named_size(runtime).is_some_and(|named| pod.as_deref().and_then(live_size) != Some(named));
    let sizing = pod.is_none() || resizing;
    if sizing {
        dependencies.push(Dependency::Quotas(namespace.to_owned()));
    }
    ctx.index.record(key.clone(), dependencies.clone());

    let account = ctx.accounts.get(&ObjectRef::new(&account_name).within(namespace));
    let secret_names = account.as_deref().map(identity::pull_secret_names).unwrap_or_default();
    if !secret_names.is_empty() {
        dependencies.extend(
            secret_names
                .iter()
                .map(|s| Dependency::Secret(namespace.to_owned(), s.clone())),
        );
        ctx.index.record(key.clone(), dependencies);
    }
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut secrets = BTreeMap::new();
    for secret in secret_names {
        let found = secrets_api.get_opt(&secret).await?;
        secrets.insert(secret, found);
    }
    let flow = match flow_name {
        Some(cm) => {
            let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&cm)
                .await?;
            Some((cm, found))
        }
        None => None,
    };
    // Quotas matter only when a pod is sized; a runtime that keeps its pod never reads them.
    let quotas = if sizing {
        ctx.quotas
            .state_filter(|q| q.namespace().as_deref() == Some(namespace))
            .iter()
            .map(|q| (**q).clone())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Observed {
        account_name,
        account,
        secrets,
        flow,
        pod,
        quotas,
    })
}

/// The image the runtime runs and its version: the flow's `environment.image` when it names one,
/// else `spec.image` (`latest` until version checks land; a digest is pulled by digest).
fn runtime_image(runtime: &PromptFlowRuntime, flow: Option<&FlowEnvironment>) -> (String, String) {
    let spec_image = &runtime.spec.image;
    let version = spec_image.version.clone().unwrap_or_else(|| "latest".to_owned());
    match flow.and_then(|f| f.image.clone()) {
        Some(flow_image) => {
            let tag = flow_image
                .parse::<oci_client::Reference>()
                .ok()
                .and_then(|r| r.tag().map(str::to_owned));
            (flow_image, tag.unwrap_or(version))
        }
        None if version.starts_with("sha256:") => (format!("{}@{version}", spec_image.repository), version),
        None => (format!("{}:{version}", spec_image.repository), version),
    }
}

/// Validates what was observed and builds the pod. Pure.
fn plan(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    ctx: &Context,
    identity: &Result<PullIdentity, IdentityProblem>,
    flow: Option<&(&str, Result<FlowEnvironment, FlowProblem>)>,
    image: String,
    version: String,
) -> Plan {
    let blocked = |reason: &str, message: String| Plan::Blocked {
        verdict: Verdict::not_available(reason, message),
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(problem) => return blocked(problem.reason(), problem.to_string()),
    };
    let flow = match flow {
        None => None,
        Some((cm, Ok(environment))) => Some((*cm, environment)),
        Some((_, Err(problem))) => return blocked(problem.reason(), problem.to_string()),
    };
    let size = match choose_size(runtime, observed, &ctx.catalog) {
        Ok(size) => size,
        Err((reason, message)) => return blocked(reason, message),
    };
    let pod = pod::runtime_pod(&RuntimePodInputs {
        runtime,
        image: &image,
        size,
        identity,
        flow,
        security: &ctx.security,
    });
    Plan::Run {
        pod: Box::new(pod),
        image,
        version,
        size: size.name.clone(),
    }
}

/// The instance type: the one named; else the one the live pod was sized from; else the first
/// catalog size that fits the namespace's quota headroom.
fn choose_size<'a>(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    catalog: &'a Catalog,
) -> Result<&'a InstanceType, (&'static str, String)> {
    let named = named_size(runtime);
    // The size chosen at first start is kept: the live pod's, else the one the status recorded
    // (between deleting a pod and creating its replacement, quota usage still counts the old one).
    let live = observed
        .pod
        .as_deref()
        .and_then(live_size)
        .or_else(|| runtime.status.as_ref()?.instance_type.as_deref());
    if let Some(named) = named {
        let size = catalog.get(named).ok_or_else(|| {
            (
                reasons::UNKNOWN_INSTANCE_TYPE,
                format!(
                    "instance type {named} is not in the catalog; set spec.compute.serverless.instanceType to one of: {}",
                    catalog.names()
                ),
            )
        })?;
        // A live pod already counts in the quota's usage; a resize gives its usage back.
        if live != Some(named) {
            let released = observed
                .pod
                .as_deref()
                .and_then(|p| p.spec.as_ref()?.containers.first()?.resources.clone());
            let wanted = pod::merged_resources(size, runtime);
            if let Some(short) = quota::shortfall(&wanted, released.as_ref(), &observed.quotas) {
                return Err((
                    reasons::QUOTA_EXCEEDED,
                    format!("instance type {named} does not fit: {short}"),
                ));
            }
        }
        return Ok(size);
    }
    if let Some(size) = live.and_then(|name| catalog.get(name)) {
        return Ok(size);
    }
    quota::first_fitting(catalog, &observed.quotas, |size| pod::merged_resources(size, runtime)).map_err(|shortfalls| {
        let detail = shortfalls.first().map(|(name, short)| format!(" (the smallest, {name}: {short})")).unwrap_or_default();
        (
            reasons::QUOTA_EXCEEDED,
            format!("no instance type of the catalog fits the namespace's ResourceQuota{detail}; raise the quota or free capacity"),
        )
    })
}

/// The instance type the runtime names, if any.
fn named_size(runtime: &PromptFlowRuntime) -> Option<&str> {
    runtime.spec.compute.serverless.as_ref()?.instance_type.as_deref()
}

/// The instance type a live pod was sized from.
fn live_size(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(INSTANCE_TYPE_ANNOTATION)
        .map(String::as_str)
}

/// Creates, replaces or keeps the pod; returns the verdict on it.
async fn apply_pod(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    desired: Pod,
    live: Option<&Pod>,
    image: &str,
) -> Result<(Verdict, Action)> {
    let pod_name = desired.name_any();
    let namespace = desired.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod_ref = ObjectRef::new(&pod_name).within(&namespace);
    let starting = status::pod_verdict(&pod_name, image, &PodState::Starting);
    // Created moments ago and not in the cache yet: trust it for a while, then look again (a pod
    // deleted before the cache ever showed it must not leave the runtime waiting forever).
    if let Some(trust) = ctx.written.pod_pending(&pod_ref, live.is_some()) {
        return Ok((starting, Action::requeue(trust)));
    }
    let Some(live) = live else {
        return match pods
            .patch(&pod_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired))
            .await
        {
            Ok(_) => {
                ctx.written.created_pod(pod_ref);
                info!(pod = %pod_name, %namespace, "created runtime pod");
                let note = format!("created pod {pod_name} with image {image}");
                publish(ctx, runtime, EventType::Normal, "PodCreated", &note).await;
                Ok((starting, Action::await_change()))
            }
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("exceeded quota") => Ok((
                Verdict::not_available(reasons::QUOTA_EXCEEDED, status.message),
                Action::await_change(),
            )),
            Err(kube::Error::Api(status))
                if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) =>
            {
                let message = format!("the API server rejected pod {pod_name}: {}", status.message);
                Ok((
                    Verdict::not_available(reasons::POD_REJECTED, message),
                    Action::await_change(),
                ))
            }
            Err(err) => Err(err.into()),
        };
    };
    let state = status::classify(live);
    let uid = live.metadata.uid.clone();
    // Already deleted by us, and the cache has not shown the deletion yet: do not delete again.
    if state == PodState::Terminating || ctx.written.already_deleted(&pod_ref, uid.as_deref()) {
        return Ok((
            status::pod_verdict(&pod_name, image, &PodState::Terminating),
            Action::await_change(),
        ));
    }
    let outdated = pod::live_spec_hash(live) != pod::live_spec_hash(&desired);
    if !outdated && !matches!(state, PodState::Ended { .. }) {
        return Ok((status::pod_verdict(&pod_name, image, &state), Action::await_change()));
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pods.delete(&pod_name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    if let Some(uid) = uid {
        ctx.written.deleted_pod(pod_ref, uid);
    }
    if let PodState::Ended { message } = &state {
        let note = format!("pod {pod_name} ended ({message}); recreating it");
        publish(ctx, runtime, EventType::Warning, reasons::POD_FAILED, &note).await;
        return Ok((status::pod_verdict(&pod_name, image, &state), Action::await_change()));
    }
    info!(pod = %pod_name, %namespace, "replacing runtime pod: its spec changed");
    let note = format!("replacing pod {pod_name} to apply the changed spec");
    publish(ctx, runtime, EventType::Normal, "PodReplaced", &note).await;
    Ok((
        Verdict::not_available(reasons::POD_CREATING, note),
        Action::await_change(),
    ))
}

fn identity_message(identity: &PullIdentity, host: &str) -> String {
    let secrets = if identity.pull_secrets.is_empty() {
        "no imagePullSecrets".to_owned()
    } else {
        format!("imagePullSecrets {}", identity.pull_secrets.join(", "))
    };
    if identity.has_registry_credentials {
        format!(
            "service account {} with {secrets}, holding credentials for {host}",
            identity.service_account
        )
    } else {
        format!(
            "service account {} with {secrets}; none holds credentials for {host}, so the image is pulled anonymously",
            identity.service_account
        )
    }
}

/// Composes the status, publishes events for transitions, and patches only on difference.
async fn write_status(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    verdict: &Verdict,
    identity: (bool, &str, &str),
    compute: &str,
    facts: Option<(&str, &str, &str)>,
    anonymous_pull: bool,
) -> Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let baseline = ctx.written.status_baseline(runtime);
    let previous = baseline.as_ref();
    let new = status::compose(&StatusInputs {
        previous,
        verdict,
        identity,
        compute,
        instance_type: facts.map(|f| f.2),
        image: facts.map(|f| f.0),
        version: facts.map(|f| f.1),
        generation: runtime.metadata.generation,
        now: &now,
    });
    if previous == Some(&new) {
        return Ok(());
    }
    tracing::debug!(
        name = %runtime.name_any(),
        resource_version = ?runtime.metadata.resource_version,
        from = ?previous.and_then(|p| p.reason.as_deref()),
        to = ?new.reason,
        "status changed"
    );
    let patch = serde_json::json!({
        "apiVersion": PromptFlowRuntime::api_version(&()),
        "kind": PromptFlowRuntime::kind(&()),
        "status": new,
    });
    let api: Api<PromptFlowRuntime> = Api::namespaced(ctx.client.clone(), &runtime.namespace().unwrap_or_default());
    let updated = api
        .patch_status(
            &runtime.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    // Events after the write: a failed write retries, and must not repeat its events.
    announce_transition(runtime, ctx, previous, &new, anonymous_pull).await;
    ctx.written
        .wrote_status(runtime, updated.metadata.resource_version, new);
    Ok(())
}

/// One event per transition of phase or reason, never per reconcile.
async fn announce_transition(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    previous: Option<&PromptFlowRuntimeStatus>,
    new: &PromptFlowRuntimeStatus,
    anonymous_pull: bool,
) {
    let identity_message = |status: Option<&PromptFlowRuntimeStatus>| {
        status?
            .conditions
            .iter()
            .find(|c| c.type_ == crate::api::conditions::IDENTITY_RESOLVED)
            .map(|c| c.message.clone())
    };
    let identity_now = identity_message(Some(new));
    if anonymous_pull && identity_message(previous) != identity_now {
        let note = identity_now.unwrap_or_default();
        publish(ctx, runtime, EventType::Warning, "NoRegistryCredentials", &note).await;
    }
    let was_running = previous.is_some_and(|p| p.phase == RuntimePhase::Running);
    // The kubelet alternates ErrImagePull and ImagePullBackOff while it retries: one problem.
    fn problem(reason: Option<&str>) -> Option<&str> {
        match reason {
            Some(reasons::ERR_IMAGE_PULL | reasons::IMAGE_PULL_BACK_OFF) => Some(reasons::ERR_IMAGE_PULL),
            other => other,
        }
    }
    let same_reason = problem(previous.and_then(|p| p.reason.as_deref())) == problem(new.reason.as_deref());
    let message = new.message.clone().unwrap_or_default();
    let reason = new.reason.clone().unwrap_or_default();
    if new.phase == RuntimePhase::Running && !was_running {
        publish(ctx, runtime, EventType::Normal, "Running", &message).await;
    } else if !same_reason && reasons::PROBLEMS.contains(&reason.as_str()) {
        publish(ctx, runtime, EventType::Warning, &reason, &message).await;
    }
}

/// Publishes an event; a failure is logged, never fails the reconcile.
async fn publish(ctx: &Context, runtime: &PromptFlowRuntime, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &runtime.object_ref(&())).await {
        warn!(name = %runtime.name_any(), error = %err, "could not publish event");
    }
}

/// Drops what is kept for runtimes that no longer exist (after a watch re-list, which reports no
/// deletions for what went away while the watch was down).
pub fn forget_missing(ctx: &Context, exists: impl Fn(&ObjectRef<PromptFlowRuntime>) -> bool) {
    ctx.index.retain(&exists);
    ctx.written.retain(&exists);
    ctx.failures.lock().expect("failures lock").retain(|key, _| exists(key));
}

/// Drops everything kept for a runtime that was deleted.
pub fn forget(ctx: &Context, runtime: &PromptFlowRuntime) {
    let key = ObjectRef::from_obj(runtime);
    let pod = ObjectRef::new(&pod::pod_name(&runtime.name_any())).within(&runtime.namespace().unwrap_or_default());
    ctx.index.forget(&key);
    ctx.written.forget(&key, &pod);
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
