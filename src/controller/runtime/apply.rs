//! Apply: create the planned pod, replace a live one when the user's inputs changed, it ended or
//! a restart was asked for, or keep it. An operator-side template change alone keeps a running
//! runtime's pod (people work in it) and is reported instead. Returns the verdict on the pod and
//! the event worth telling the user; never publishes itself.

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use std::time::Duration;

use super::plan::{DesiredPod, Problem};
use super::pod_state::{self, PodState};
use super::report::Notice;
use super::status::Verdict;
use super::{Context, MANAGER};
use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, annotations};
use crate::build::{controlled_by, pod, service};
use crate::error::Result;

/// How long a pod the API server refused with a server error waits before it is tried again.
const SERVER_ERROR_RETRY: Duration = Duration::from_secs(60);

/// What applying the pod came to.
pub struct PodOutcome {
    /// The verdict on the pod.
    pub verdict: Verdict,
    /// When to look again.
    pub action: Action,
    /// An event for what was done, if anything.
    pub notice: Option<Notice>,
    /// Whether the pod follows the operator's current template (`None`: no pod yet).
    pub template_current: Option<bool>,
    /// The `promptflow.dev/restart` value this apply handled.
    pub handled_restart: Option<String>,
    /// How soon to look again, when the action is a requeue (kube's `Action` does not say).
    pub requeue: Option<Duration>,
    /// The replacement the API server would refuse (a dry-run create), with why: the live pod
    /// keeps serving and `SpecApplied` says so.
    pub refused: Option<String>,
}

impl PodOutcome {
    fn quiet(verdict: Verdict, action: Action) -> Self {
        Self {
            verdict,
            action,
            notice: None,
            template_current: None,
            handled_restart: None,
            refused: None,
            requeue: None,
        }
    }

    /// A quiet outcome that looks again after `delay`.
    fn later(verdict: Verdict, delay: Duration) -> Self {
        Self {
            requeue: Some(delay),
            ..Self::quiet(verdict, Action::requeue(delay))
        }
    }
}

/// The generated name's prefix of a dry-run replacement.
pub const PROBE_PREFIX: &str = "pf-probe-";

/// `text` with every `<prefix><5 generated characters>` written as `name`.
fn without_generated_suffix(text: &str, prefix: &str, name: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        out.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let generated = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if generated == 5 {
            out.push_str(name);
            rest = &after[generated..];
        } else {
            out.push_str(prefix);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Whether the API server would create `pod` now, asked with a server-side dry run (validation,
/// LimitRange, Pod Security and admission webhooks all run; nothing is stored). The dry run is made
/// under a generated name, as the live pod still holds the real one. Quota is left out: the live
/// pod still counts against it, and it frees its share when it goes (the size was chosen with it
/// released). `Some(why)` when refused.
async fn refused_replacement(pods: &Api<Pod>, pod: &Pod) -> Result<Option<String>> {
    let mut probe = pod.clone();
    // A short fixed prefix: the API server cuts long ones, and the message must name the pod
    // the same way every time.
    probe.metadata.name = None;
    probe.metadata.generate_name = Some(PROBE_PREFIX.into());
    let params = PostParams {
        dry_run: true,
        field_manager: Some(MANAGER.into()),
    };
    match pods.create(&params, &probe).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("exceeded quota") => Ok(None),
        Err(kube::Error::Api(status)) if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) => {
            // The message names the generated name, new on every try: the real one instead, so
            // the status (and its event) stays the same while nothing changes.
            let name = pod.name_any();
            Ok(Some(without_generated_suffix(&status.message, PROBE_PREFIX, &name)))
        }
        Err(err) => Err(err.into()),
    }
}

/// The value of `promptflow.dev/restart` when it is one the operator has not handled yet.
pub fn restart_requested(runtime: &PromptFlowRuntime) -> Option<&str> {
    let asked = runtime.annotations().get(annotations::RESTART)?;
    let handled = runtime
        .status
        .as_ref()
        .and_then(|s| s.handled_actions.as_ref())
        .and_then(|h| h.restart.as_deref());
    (handled != Some(asked.as_str())).then_some(asked.as_str())
}

/// The outcome when the runtime's current spec cannot be turned into a pod. A pod from an
/// earlier spec that is Ready keeps serving, and the runtime stays `Running`, like a Deployment
/// whose rollout is stuck; without one the runtime is `Not available` for that problem.
pub fn blocked(problem: &Problem, live: Option<&Pod>) -> PodOutcome {
    let serving = live
        .map(pod_state::classify)
        .filter(|state| matches!(state, PodState::Ready { .. }));
    match (serving, live) {
        (Some(state), Some(live)) => PodOutcome::quiet(
            pod_state::pod_verdict(&live.name_any(), "", &state),
            Action::await_change(),
        ),
        _ => PodOutcome::quiet(
            Verdict::not_available(problem.reason, problem.message.clone()),
            Action::await_change(),
        ),
    }
}

/// Creates, replaces or keeps the pod. `restart` is a new `promptflow.dev/restart` value.
pub async fn apply_pod(
    ctx: &Context,
    desired: &DesiredPod,
    live: Option<&Pod>,
    restart: Option<&str>,
) -> Result<PodOutcome> {
    let image = desired.facts.image.as_str();
    let pod_name = desired.pod.name_any();
    let namespace = desired.pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod_ref = ObjectRef::new(&pod_name).within(&namespace);
    let starting = pod_state::pod_verdict(&pod_name, image, &PodState::Starting);
    // Created moments ago and not in the cache yet: trust it for a while, then look again (a pod
    // deleted before the cache ever showed it must not leave the runtime waiting forever).
    if let Some(trust) = ctx.own_writes.pod_pending(&pod_ref, live.is_some()) {
        return Ok(PodOutcome {
            template_current: Some(true),
            ..PodOutcome::later(starting, trust)
        });
    }
    let owner_uid = desired.pod.owner_references().first().map(|o| o.uid.clone());
    if let Some(live) = live.filter(|live| !controlled_by(&live.metadata, owner_uid.as_deref())) {
        return Ok(PodOutcome::later(
            Verdict::not_available(reasons::POD_CONFLICT, pod_conflict(&desired.pod, &live.name_any())),
            CONFLICT_RECHECK,
        ));
    }
    let Some(live) = live else {
        // Created, never applied: a pod of that name made by someone else meanwhile is refused
        // (409), not taken over.
        let created = pods
            .create(
                &PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                },
                &desired.pod,
            )
            .await;
        let created = match created {
            Err(kube::Error::Api(status)) if status.code == 409 => match pods.get_opt(&pod_name).await? {
                Some(found) if controlled_by(&found.metadata, owner_uid.as_deref()) => Ok(found),
                Some(_) => {
                    return Ok(PodOutcome::later(
                        Verdict::not_available(reasons::POD_CONFLICT, pod_conflict(&desired.pod, &pod_name)),
                        CONFLICT_RECHECK,
                    ));
                }
                // Gone again (being deleted): look again shortly.
                None => return Ok(PodOutcome::later(starting, Duration::from_secs(2))),
            },
            other => other,
        };
        return match created {
            Ok(_) => {
                ctx.own_writes.created_pod(pod_ref);
                info!(pod = %pod_name, %namespace, "created runtime pod");
                Ok(PodOutcome {
                    verdict: starting,
                    action: Action::await_change(),
                    notice: Some(Notice::normal(
                        "PodCreated",
                        format!("created pod {pod_name} with image {image}"),
                    )),
                    template_current: Some(true),
                    // A restart asked for before there was a pod is done by creating it.
                    handled_restart: restart.map(str::to_owned),
                    refused: None,
                    requeue: None,
                })
            }
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("exceeded quota") => {
                Ok(PodOutcome::quiet(
                    Verdict::not_available(reasons::QUOTA_EXCEEDED, status.message),
                    Action::await_change(),
                ))
            }
            // Refused for what the pod is (validation, admission): retrying the same pod cannot
            // succeed, so wait for a change of the runtime or of what it reads.
            Err(kube::Error::Api(status))
                if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) =>
            {
                let message = format!("the API server rejected pod {pod_name}: {}", status.message);
                Ok(PodOutcome::quiet(
                    Verdict::not_available(reasons::POD_REJECTED, message),
                    Action::await_change(),
                ))
            }
            // A server error may be the pod (some invalid values fail decoding with 500) or the
            // server: say so at once, and try again after a while rather than in a hot loop.
            Err(kube::Error::Api(status)) if status.code == 500 => {
                let message = format!(
                    "the API server failed to create pod {pod_name}: {}; retrying every {}s",
                    status.message,
                    SERVER_ERROR_RETRY.as_secs()
                );
                Ok(PodOutcome::later(
                    Verdict::not_available(reasons::POD_REJECTED, message),
                    SERVER_ERROR_RETRY,
                ))
            }
            Err(err) => Err(err.into()),
        };
    };
    let state = pod_state::classify(live);
    let uid = live.metadata.uid.clone();
    // Already deleted by us, and the cache has not shown the deletion yet: do not delete again.
    if state == PodState::Terminating || ctx.own_writes.already_deleted(&pod_ref, uid.as_deref()) {
        return Ok(PodOutcome::quiet(
            pod_state::pod_verdict(&pod_name, image, &PodState::Terminating),
            Action::await_change(),
        ));
    }
    let template_current = pod::live_spec_hash(live) == pod::live_spec_hash(&desired.pod);
    // Pods made before the inputs hash existed are judged by the template alone, kept like any
    // pod whose only change is the operator's.
    let inputs_changed =
        pod::live_inputs_hash(live).is_some_and(|hash| Some(hash) != pod::live_inputs_hash(&desired.pod));
    let ended = matches!(state, PodState::Ended { .. });
    if !inputs_changed && !ended && restart.is_none() {
        return Ok(PodOutcome {
            template_current: Some(template_current),
            ..PodOutcome::quiet(pod_state::pod_verdict(&pod_name, image, &state), Action::await_change())
        });
    }
    // A serving pod goes only for a replacement the API server will take.
    if !ended && let Some(why) = refused_replacement(&pods, &desired.pod).await? {
        let message = format!(
            "the API server would reject the new pod, so {pod_name} keeps serving as it is: {why}; fix the runtime's spec (or what rejects it)"
        );
        return Ok(PodOutcome {
            template_current: Some(template_current),
            refused: Some(message),
            // What refuses it (a LimitRange, a webhook, namespace labels) is not watched.
            ..PodOutcome::later(pod_state::pod_verdict(&pod_name, image, &state), CONFLICT_RECHECK)
        });
    }
    delete_pod(ctx, live, owner_uid.as_deref()).await?;
    let handled_restart = restart.map(str::to_owned);
    if let PodState::Ended { message } = &state {
        return Ok(PodOutcome {
            verdict: pod_state::pod_verdict(&pod_name, image, &state),
            action: Action::await_change(),
            notice: Some(Notice::warning(
                reasons::POD_FAILED,
                format!("pod {pod_name} ended ({message}); recreating it"),
            )),
            template_current: Some(template_current),
            handled_restart,
            refused: None,
            requeue: None,
        });
    }
    let (why, reason) = match restart {
        Some(value) if !inputs_changed => (format!("restart {value:?} was asked for"), "PodRestarted"),
        _ => ("the spec changed".to_owned(), "PodReplaced"),
    };
    info!(pod = %pod_name, %namespace, %why, "replacing runtime pod");
    let note = format!("replacing pod {pod_name}: {why}");
    Ok(PodOutcome {
        verdict: Verdict::not_available(reasons::POD_CREATING, note.clone()),
        action: Action::await_change(),
        notice: Some(Notice::normal(reason, note)),
        template_current: Some(template_current),
        handled_restart,
        refused: None,
        requeue: None,
    })
}

#[cfg(test)]
#[test]
fn generated_names_in_messages_become_the_real_one() {
    let message = "Pod \"chat-runtime-x7k2p\" is invalid: spec.containers[0]: chat-runtime-ab is not chat-runtime-";
    assert_eq!(
        without_generated_suffix(message, "chat-runtime-", "chat-runtime"),
        "Pod \"chat-runtime\" is invalid: spec.containers[0]: chat-runtime-ab is not chat-runtime-"
    );
}

/// How often a runtime or instance whose pod or Service name is taken by someone else's object
/// looks again (such objects are not watched).
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(60);

/// What a runtime or instance says when a pod of its pod's name is not its own.
fn pod_conflict(desired: &Pod, pod_name: &str) -> String {
    let kind = desired.owner_references().first().map_or("object", |o| o.kind.as_str());
    format!(
        "pod {pod_name} exists and was not created by the operator for this {kind}; it is left untouched: delete or rename it, or give the {kind} another name (looked at again every {}s)",
        CONFLICT_RECHECK.as_secs()
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
    NotWritten,
    /// A Service of that name belongs to someone else: left untouched; the message says so.
    Conflict(String),
}

/// Creates or corrects the runtime's Service; writes nothing when the live one matches. A Service
/// of that name that the operator did not create for this runtime (its controller owner
/// reference) is never written to: creating is a create, not an apply, so one made by someone
/// else meanwhile is refused too. A Service that cannot be written for other reasons never keeps
/// the runtime from running: the failure is logged and the runtime has no `status.url` until it
/// succeeds.
pub async fn apply_service(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    target: service::Target<'_>,
) -> Result<ServiceOutcome> {
    let desired = service::runtime_service(runtime, target);
    let name = runtime.name_any();
    let namespace = runtime.namespace().unwrap_or_default();
    let uid = runtime.uid();
    let conflict = || {
        ServiceOutcome::Conflict(format!(
            "Service {name} exists and was not created by the operator for this runtime; it is left untouched: delete or rename it, or give the runtime another name (looked at again every {}s)",
            CONFLICT_RECHECK.as_secs()
        ))
    };
    let service_ref = ObjectRef::new(&name).within(&namespace);
    let live = ctx.service(&name, &namespace);
    if live
        .as_deref()
        .is_some_and(|live| !controlled_by(&live.metadata, uid.as_deref()))
    {
        return Ok(conflict());
    }
    let as_wanted = live.as_deref().is_some_and(|live| service::matches(live, &desired));
    if as_wanted || ctx.own_writes.service_pending(&service_ref, as_wanted) {
        return Ok(ServiceOutcome::InPlace);
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    // The apply names the uid of the Service it corrects: should the cache be behind a Service
    // replaced by someone else's, the API server refuses the write instead of taking it over.
    let mut known_uid = live.as_deref().and_then(|live| live.metadata.uid.clone());
    if live.is_none() {
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match services.create(&params, &desired).await {
            Ok(_) => {
                ctx.own_writes.applied_service(service_ref);
                return Ok(ServiceOutcome::InPlace);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => match services.get_opt(&name).await? {
                // Ours after all (the cache is behind): corrected below.
                Some(found) if controlled_by(&found.metadata, uid.as_deref()) => known_uid = found.metadata.uid,
                _ => return Ok(conflict()),
            },
            Err(kube::Error::Api(status)) => {
                warn!(%name, %namespace, error = %status.message, "cannot create the runtime's Service");
                return Ok(ServiceOutcome::NotWritten);
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
        Ok(_) => {
            ctx.own_writes.applied_service(service_ref);
            Ok(ServiceOutcome::InPlace)
        }
        // Refused (an admission policy, a full range): say so and go on; the next change of the
        // runtime or its Service tries again.
        Err(kube::Error::Api(status)) => {
            warn!(%name, %namespace, error = %status.message, "cannot apply the runtime's Service");
            Ok(ServiceOutcome::NotWritten)
        }
        Err(err) => Err(err.into()),
    }
}

/// The pod of a runtime, by the runtime's name.
pub fn pod_ref(runtime_name: &str, namespace: &str) -> ObjectRef<Pod> {
    ObjectRef::new(&pod::pod_name(runtime_name)).within(namespace)
}
