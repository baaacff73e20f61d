//! Apply: make the cluster match the plan, then judge what is there. First, before anything is
//! read, the runtime's [`frame`]: a serverless runtime's Service; a runtime on a compute instance's
//! detach finalizer, and no pod of its own. Then the plan: a runtime with a pod of its own gets
//! its pod ([`pod`]); a runtime on an instance has its Service pointed at its slot in the
//! instance's pod (the instance controller makes that pod). Returns the verdict, the conditions apply decides
//! (`SpecApplied`, `TemplateCurrent`), the URL and the event worth telling the user; never writes
//! the status or publishes an event itself.

pub(crate) mod pod;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::warn;

pub use self::pod::{PROBE_PREFIX, apply_pod};
use super::observe::{InstanceSeen, Observed};
use super::plan::{DesiredPod, InstanceWork, Plan, PodFacts, Problem, Work};
use super::report::Notice;
use super::status::{self, ConditionState, Verdict};
use super::{Context, MANAGER, on_instance};
use crate::api::conditions::{self, reasons};
use crate::api::{PromptFlowRuntime, annotations};
use crate::build::instance::placement_in;
use crate::build::service::{self, Target};
use crate::build::{controlled_by, left_by_predecessor, pod as pod_builder};
use crate::error::Result;

/// What applying the plan came to.
pub struct Applied {
    /// The verdict on the runtime's containers.
    pub verdict: Verdict,
    /// `SpecApplied`, and `TemplateCurrent` or the `Idle` note of a runtime on an instance.
    pub conditions: Vec<ConditionState>,
    /// `status.url`, once the Service is in place.
    pub url: Option<String>,
    /// An event for what was done, if anything.
    pub notice: Option<Notice>,
    /// The `promptflow.dev/restart` value handled.
    pub handled_restart: Option<String>,
    /// How soon to look again; `None`: at the next change.
    pub requeue: Option<Duration>,
    /// The pod from an earlier spec keeps serving because its replacement was refused: the
    /// status keeps naming what that pod runs, not what was planned.
    pub kept_older: bool,
    /// On a compute instance: what the instance's pod runs for the runtime when that is not what
    /// was planned (its restart waits for its batch, or cannot be made): the status names it.
    pub running: Option<PodFacts>,
}

/// What a runtime has whatever its state, made before anything is read for it: a serverless
/// runtime, running or stopped, its Service (the URL: `None` while the Service cannot be
/// written) and the detach finalizer of an instance it left released once that instance let go;
/// a runtime on an instance, the detach finalizer and no pod of its own. `Err`: the Service's
/// name is someone else's (nothing was made; the message says so).
pub async fn frame(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
) -> Result<std::result::Result<Option<String>, (&'static str, String)>> {
    if runtime.spec.compute.instance.is_none() {
        return serverless_frame(ctx, runtime).await;
    }
    on_instance::hold(ctx, runtime).await?;
    let namespace = runtime.namespace().unwrap_or_default();
    // Moved here from serverless: its own pod goes.
    if let Some(own) = ctx.own_pod(&pod_ref(&runtime.name_any(), &namespace).name, &namespace, runtime) {
        delete_pod(ctx, &own, runtime.uid().as_deref()).await?;
    }
    Ok(Ok(None))
}

/// Applies `plan` inside the runtime's [`frame`] (`url`: the one the frame made), the one way
/// for both kinds of compute.
pub async fn apply(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    plan: &Plan,
    observed: &Observed,
    url: Option<String>,
) -> Result<Applied> {
    match &plan.work {
        Work::Pod(desired) => own_pod(ctx, runtime, desired, observed.pod.as_deref(), url).await,
        Work::Instance(work) => on_instance(ctx, runtime, work, observed.instance.as_ref()).await,
    }
}

async fn serverless_frame(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
) -> Result<std::result::Result<Option<String>, (&'static str, String)>> {
    on_instance::release(ctx, runtime).await?;
    let target = Target::Serverless;
    Ok(match apply_service(ctx, runtime, target).await? {
        ServiceOutcome::InPlace | ServiceOutcome::NotWritten { exists: true } => {
            Ok(Some(service::url(runtime, target)))
        }
        ServiceOutcome::NotWritten { exists: false } => Ok(None),
        ServiceOutcome::Conflict(reason, message) => Err((reason, message)),
    })
}

/// A runtime with a pod of its own: its Service, then its pod.
async fn own_pod(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    desired: &std::result::Result<DesiredPod, Problem>,
    live: Option<&Pod>,
    url: Option<String>,
) -> Result<Applied> {
    let (outcome, spec_applied) = match desired {
        Err(problem) => (
            pod::blocked(problem, live),
            ConditionState::new(conditions::SPEC_APPLIED, false, problem.reason, problem.message.clone()),
        ),
        Ok(desired) => {
            let outcome = apply_pod(
                ctx,
                desired,
                live,
                pod::restart_requested(runtime),
                predecessor_overdue(runtime),
            )
            .await?;
            let spec_applied = match &outcome.refused {
                // The status write sends the Warning when SpecApplied turns False.
                Some(why) => ConditionState::new(conditions::SPEC_APPLIED, false, reasons::POD_REJECTED, why.clone()),
                None => ConditionState::new(
                    conditions::SPEC_APPLIED,
                    true,
                    reasons::SPEC_APPLIED,
                    "the pod is built from the runtime's current spec",
                ),
            };
            (outcome, spec_applied)
        }
    };
    let kept_older = outcome.refused.is_some();
    let mut conditions = vec![spec_applied];
    match outcome.template_current {
        Some(current) => conditions.push(template_condition(current)),
        // Not judged this time (no pod was planned): what was last known stays.
        None => conditions.extend(
            status::carried(runtime.status.as_ref().map_or(&[], |s| s.conditions.as_slice()))
                .into_iter()
                .filter(|c| c.type_ == conditions::TEMPLATE_CURRENT),
        ),
    }
    Ok(Applied {
        verdict: outcome.verdict,
        conditions,
        url,
        notice: outcome.notice,
        handled_restart: outcome.handled_restart,
        requeue: outcome.requeue,
        kept_older,
        running: None,
    })
}

/// A runtime on a compute instance (its frame holds it with the detach finalizer, without a pod
/// of its own): its Service pointed at its slot once the instance's pod carries it.
async fn on_instance(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    work: &InstanceWork,
    seen: Option<&InstanceSeen>,
) -> Result<Applied> {
    let instance = seen.and_then(|seen| seen.object.as_deref());
    let live = seen.and_then(|seen| seen.pod.as_deref());
    let placement = live.and_then(|pod| placement_in(pod, runtime));
    let mut verdict = on_instance::verdict(ctx, runtime, work, instance, live, placement.is_some());
    let mut requeue = None;
    let url = match &placement {
        Some(placement) => {
            let target = Target::Instance {
                instance: &work.name,
                port: placement.proxy_port,
            };
            match apply_service(ctx, runtime, target).await? {
                ServiceOutcome::InPlace => Some(service::url(runtime, target)),
                ServiceOutcome::NotWritten { .. } => None,
                ServiceOutcome::Conflict(reason, message) => {
                    // The runtime's container stays on the instance; its name does not reach it.
                    verdict = Verdict::not_available(reason, message);
                    requeue = Some(conflict_recheck(reason));
                    None
                }
            }
        }
        None => None,
    };
    let spec_applied = match &work.containers {
        Ok(_) => ConditionState::new(
            conditions::SPEC_APPLIED,
            true,
            reasons::SPEC_APPLIED,
            "the runtime's containers are built from its current spec",
        ),
        Err(problem) => ConditionState::new(conditions::SPEC_APPLIED, false, problem.reason, problem.message.clone()),
    };
    // The instance's pod still runs another image for this runtime (its restart waits for its
    // batch, or cannot be made): the status names what runs. Not for a runtime whose status pin
    // is what the instance restarts with (a pressed update, a newer version).
    let carried = placement.as_ref().and_then(|placement| {
        let container = placement.runtime_container();
        live?
            .spec
            .as_ref()?
            .containers
            .iter()
            .find(|c| c.name == container)?
            .image
            .clone()
    });
    let planned = work.containers.as_ref().ok().and_then(Option::as_ref);
    let waits = match (carried, planned) {
        (Some(carried), Some(planned)) if another_version(&carried, &planned.image) => Some((carried, planned)),
        _ => None,
    };
    // A runtime whose status pin is what the instance restarts with keeps naming the pin; the
    // condition says the instance has yet to take it.
    let running = waits
        .as_ref()
        .filter(|_| !work.pinned_by_status)
        .map(|(carried, planned)| PodFacts {
            version: version_of(carried),
            image: carried.clone(),
            size: planned.size.clone(),
        });
    let spec_applied = match &waits {
        Some((carried, planned)) => ConditionState::new(
            conditions::SPEC_APPLIED,
            false,
            reasons::WAITING_FOR_INSTANCE_RESTART,
            format!(
                "compute instance {} still runs {} for this runtime; it takes {} when it restarts (its status says what it waits for)",
                work.name, carried, planned.image
            ),
        ),
        None => spec_applied,
    };
    let mut conditions = vec![spec_applied];
    conditions.extend(on_instance::actions_not_supported(runtime, &work.name));
    Ok(Applied {
        verdict,
        conditions,
        url,
        notice: None,
        handled_restart: None,
        requeue,
        kept_older: false,
        running,
    })
}

/// Whether a pod runs another version of the planned image: the same registry and repository
/// with another tag, or (both pinned by digest) another digest. A reference an admission webhook
/// rewrote (a mirror registry, a digest added or put in place of the tag) is not another version:
/// no restart of the instance would undo it.
fn another_version(running: &str, planned: &str) -> bool {
    match (crate::image_ref::parse(running), crate::image_ref::parse(planned)) {
        (Some(running), Some(planned))
            if running.registry() == planned.registry() && running.repository() == planned.repository() =>
        {
            let tags = matches!((running.tag(), planned.tag()), (Some(a), Some(b)) if a != b);
            let digests = matches!((running.digest(), planned.digest()), (Some(a), Some(b)) if a != b);
            tags || digests
        }
        _ => false,
    }
}

/// The version an image reference names: its tag, else its digest, else `latest`.
fn version_of(image: &str) -> String {
    crate::image_ref::parse(image)
        .and_then(|r| r.tag().or(r.digest()).map(str::to_owned))
        .unwrap_or_else(|| "latest".to_owned())
}

/// `TemplateCurrent`: whether the pod follows the operator's current template.
fn template_condition(current: bool) -> ConditionState {
    if current {
        ConditionState::new(
            conditions::TEMPLATE_CURRENT,
            true,
            reasons::TEMPLATE_CURRENT,
            "the pod follows the operator's current template",
        )
    } else {
        ConditionState::new(
            conditions::TEMPLATE_CURRENT,
            false,
            reasons::OPERATOR_TEMPLATE_CHANGED,
            format!(
                "the operator's pod template changed since this pod was made (operator upgrade, flags or catalog); the pod keeps running and takes the new template at its next start, update or spec change, or now when you set a new value of the {} annotation",
                annotations::RESTART
            ),
        )
    }
}

/// How often a runtime or instance whose pod or Service name is taken by someone else's object
/// looks again (such objects are not watched).
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(60);

/// How often a runtime waiting for an earlier runtime's objects to go looks again (their deletion
/// wakes it sooner: they carry the operator's labels, so they are watched).
pub const PREDECESSOR_RECHECK: Duration = Duration::from_secs(15);

/// How long a runtime waits quietly for an earlier runtime's objects before it reports them as a
/// conflict (a finalizer, an unreachable node or a garbage collector that does not run keeps them).
pub const PREDECESSOR_PATIENCE: Duration = Duration::from_secs(120);

/// When a runtime held up by `reason` (a conflict) looks again.
pub fn conflict_recheck(reason: &str) -> Duration {
    if reason == reasons::PREDECESSOR_CLEANUP {
        PREDECESSOR_RECHECK
    } else {
        CONFLICT_RECHECK
    }
}

/// Whether the runtime has waited for an earlier runtime's objects for longer than
/// [`PREDECESSOR_PATIENCE`] (not Ready since, with that reason).
pub fn predecessor_overdue(runtime: &PromptFlowRuntime) -> bool {
    let Some(status) = runtime.status.as_ref() else {
        return false;
    };
    let patience = k8s_openapi::jiff::SignedDuration::try_from(PREDECESSOR_PATIENCE).unwrap_or_default();
    status.reason.as_deref() == Some(reasons::PREDECESSOR_CLEANUP)
        && status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .is_some_and(|ready| {
                k8s_openapi::jiff::Timestamp::now().duration_since(ready.last_transition_time.0) > patience
            })
}

/// What a runtime waits for while the `kind` `name` of an earlier runtime of its name is there.
pub fn predecessor_message(kind: &str, name: &str) -> String {
    format!(
        "{kind} {name} belongs to an earlier runtime of this name, now deleted, and is on its way out (the garbage collector removes what a deleted runtime owned); this runtime gets its own once it is gone"
    )
}

/// The end of a conflict's message when the object is an earlier runtime's that did not go.
pub fn predecessor_stuck(kind: &str) -> String {
    format!(
        "; the {kind} belongs to an earlier runtime of this name and has not gone in {}s (a finalizer, an unreachable node, or no garbage collector keeps it): delete it, with --force if it hangs",
        PREDECESSOR_PATIENCE.as_secs()
    )
}

/// Deletes the live pod (this exact one, by uid) when the operator made it for `owner_uid` (its
/// controller owner reference), unless this operator already did and the cache has not caught
/// up. Returns whether a delete was sent; someone else's pod is never deleted.
pub async fn delete_pod(ctx: &Context, live: &Pod, owner_uid: Option<&str>) -> Result<bool> {
    let pod_name = live.name_any();
    let namespace = live.namespace().unwrap_or_default();
    if !controlled_by(&live.metadata, owner_uid) {
        warn!(pod = %pod_name, %namespace, "not deleting a pod the operator did not create for this object");
        return Ok(false);
    }
    let pod_ref = ObjectRef::new(&pod_name).within(&namespace);
    let uid = live.metadata.uid.clone();
    if live.metadata.deletion_timestamp.is_some() || ctx.own_writes.already_deleted(&pod_ref, uid.as_deref()) {
        return Ok(false);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    match pods.delete(&pod_name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    if let Some(uid) = uid {
        ctx.own_writes.deleted_pod(pod_ref, uid);
    }
    Ok(true)
}

/// Where the runtime's Service stands after [`apply_service`].
pub enum ServiceOutcome {
    /// In place as wanted.
    InPlace,
    /// Could not be written (an admission policy, the API server); tried again at the next change.
    /// `exists`: a Service of the runtime's stands there (as it was).
    NotWritten { exists: bool },
    /// A Service of that name is not this runtime's: left untouched; the reason and message say
    /// whose (someone else's: `ServiceConflict`; an earlier runtime's of this name, on its way
    /// out: `PredecessorCleanup`).
    Conflict(&'static str, String),
}

/// Creates or corrects the runtime's Service; writes nothing when the live one matches. A Service
/// of that name that the operator did not create for this runtime (its controller owner
/// reference) is never written to: creating is a create, not an apply, so one made by someone
/// else meanwhile is refused too. A Service that cannot be written for other reasons never keeps
/// the runtime from running: the failure is logged and the runtime has no `status.url` until it
/// succeeds.
pub async fn apply_service(ctx: &Context, runtime: &PromptFlowRuntime, target: Target<'_>) -> Result<ServiceOutcome> {
    let desired = service::runtime_service(runtime, target);
    let name = runtime.name_any();
    let namespace = runtime.namespace().unwrap_or_default();
    let uid = runtime.uid();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let conflict = |found: Option<&Service>| {
        let predecessor = found.is_some_and(|found| left_by_predecessor(&found.metadata, &name, uid.as_deref()));
        if predecessor && !predecessor_overdue(runtime) {
            return ServiceOutcome::Conflict(reasons::PREDECESSOR_CLEANUP, predecessor_message("Service", &name));
        }
        let mut message = format!(
            "Service {name} exists and was not created by the operator for this runtime; it is left untouched: delete or rename it, or give the runtime another name (looked at again every {}s)",
            CONFLICT_RECHECK.as_secs()
        );
        if predecessor {
            message.push_str(&predecessor_stuck("Service"));
        }
        ServiceOutcome::Conflict(reasons::SERVICE_CONFLICT, message)
    };
    let service_ref = ObjectRef::new(&name).within(&namespace);
    let live = ctx.service(&name, &namespace);
    if live.as_ref().is_some_and(|live| !live.controlled_by(uid.as_deref())) {
        // The cache keeps no owner's kind or name: read it to tell whose it is.
        return Ok(match services.get_opt(&name).await? {
            Some(found) if controlled_by(&found.metadata, uid.as_deref()) => {
                ServiceOutcome::NotWritten { exists: true }
            }
            Some(found) => conflict(Some(&found)),
            // Gone meanwhile: its deletion wakes the runtime.
            None => ServiceOutcome::NotWritten { exists: false },
        });
    }
    let as_wanted = live.as_ref().is_some_and(|live| live.shape == service::shape(&desired));
    let cached_version = live
        .as_ref()
        .and_then(|live| live.resource_version.as_deref().map(str::to_owned));
    // Asked even when the cache shows it as wanted, which ends the entry.
    let pending = ctx
        .own_writes
        .service_pending(&service_ref, cached_version.as_deref(), as_wanted);
    if as_wanted || pending {
        return Ok(ServiceOutcome::InPlace);
    }
    // The apply names the uid of the Service it corrects: should the cache be behind a Service
    // replaced by someone else's, the API server refuses the write instead of taking it over.
    let mut known_uid = live.as_ref().and_then(|live| live.uid.as_deref().map(str::to_owned));
    if live.is_none() {
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match services.create(&params, &desired).await {
            Ok(created) => {
                ctx.own_writes
                    .applied_service(service_ref, None, created.metadata.resource_version);
                return Ok(ServiceOutcome::InPlace);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => match services.get_opt(&name).await? {
                // Ours after all (the cache is behind): corrected below.
                Some(found) if controlled_by(&found.metadata, uid.as_deref()) => known_uid = found.metadata.uid,
                found => return Ok(conflict(found.as_ref())),
            },
            Err(kube::Error::Api(status)) => {
                warn!(%name, %namespace, error = %status.message, "cannot create the runtime's Service");
                return Ok(ServiceOutcome::NotWritten { exists: false });
            }
            Err(err) => return Err(err.into()),
        }
    }
    let mut desired = desired;
    desired.metadata.uid = known_uid;
    match services
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired))
        .await
    {
        Ok(written) => {
            ctx.own_writes
                .applied_service(service_ref, cached_version, written.metadata.resource_version);
            Ok(ServiceOutcome::InPlace)
        }
        // Refused (an admission policy, a full range): say so and go on; the next change of the
        // runtime or its Service tries again.
        Err(kube::Error::Api(status)) => {
            warn!(%name, %namespace, error = %status.message, "cannot apply the runtime's Service");
            Ok(ServiceOutcome::NotWritten { exists: true })
        }
        Err(err) => Err(err.into()),
    }
}

/// The pod of a runtime, by the runtime's name.
pub fn pod_ref(runtime_name: &str, namespace: &str) -> ObjectRef<Pod> {
    ObjectRef::new(&pod_builder::pod_name(runtime_name)).within(namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_another_tag_or_digest_of_the_planned_repository_is_another_version() {
        let planned = "r.example/pf/rt:20240222.v4";
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let other = "sha256:1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(!another_version(planned, planned));
        assert!(another_version("r.example/pf/rt:20240301.v1", planned));
        assert!(another_version(
            &format!("r.example/pf/rt:20240222.v4@{other}"),
            &format!("{planned}@{digest}")
        ));
        // What webhooks do to references is not another version.
        assert!(
            !another_version(&format!("{planned}@{digest}"), planned),
            "a digest added"
        );
        assert!(
            !another_version(&format!("r.example/pf/rt@{digest}"), "r.example/pf/rt"),
            "the tag replaced"
        );
        assert!(
            !another_version("mirror.example/pf/rt:20240301.v1", planned),
            "a mirror"
        );
        assert_eq!(version_of(planned), "20240222.v4");
        assert_eq!(version_of(&format!("r.example/pf/rt@{digest}")), digest);
        assert_eq!(version_of("r.example/pf/rt"), "latest");
    }
}
