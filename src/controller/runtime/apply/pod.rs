//! The runtime's own pod (and an instance's pod, which the instance controller applies the same
//! way): create the planned pod, replace a live one when the user's inputs changed, it ended or a
//! restart was asked for, or keep it. An operator-side template change alone keeps a running pod
//! (people work in it) and is reported instead. A serving pod is replaced only by one the API
//! server would take (a dry-run create first). Returns the verdict on the pod and the event worth
//! telling the user; never publishes itself.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::info;

use super::super::plan::{DesiredPod, Problem};
use super::super::pod_state::{self, PodState};
use super::super::report::Notice;
use super::super::status::Verdict;
use super::super::{Context, MANAGER};
use super::{CONFLICT_RECHECK, PREDECESSOR_RECHECK, delete_pod, predecessor_message, predecessor_stuck};
use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, annotations};
use crate::build::pod::runtime_name;
use crate::build::{controlled_by, left_by_predecessor, pod};
use crate::error::Result;

/// How long a pod the API server refused with a server error waits before it is tried again.
const SERVER_ERROR_RETRY: Duration = Duration::from_secs(60);

/// What applying the pod came to.
pub struct PodOutcome {
    /// The verdict on the pod.
    pub verdict: Verdict,
    /// An event for what was done, if anything.
    pub notice: Option<Notice>,
    /// Whether the pod follows the operator's current template (`None`: no pod yet).
    pub template_current: Option<bool>,
    /// The `promptflow.dev/restart` value this apply handled.
    pub handled_restart: Option<String>,
    /// How soon to look again; `None`: at the next change.
    pub requeue: Option<Duration>,
    /// The replacement the API server would refuse (a dry-run create), with why: the live pod
    /// keeps serving and `SpecApplied` says so.
    pub refused: Option<String>,
}

impl PodOutcome {
    fn quiet(verdict: Verdict) -> Self {
        Self {
            verdict,
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
            ..Self::quiet(verdict)
        }
    }
}

/// The runtime whose pod is `pod_name` of `namespace`.
fn runtime_ref(pod_name: &str, namespace: &str) -> ObjectRef<crate::api::PromptFlowRuntime> {
    ObjectRef::new(crate::build::pod::runtime_name(pod_name)).within(namespace)
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
        (Some(state), Some(live)) => PodOutcome::quiet(pod_state::pod_verdict(&live.name_any(), "", &state)),
        _ => PodOutcome::quiet(Verdict::not_available(problem.reason, problem.message.clone())),
    }
}

/// Whether applying `desired` keeps `live` as it is, restarts aside: the user's inputs are the
/// same and the pod has not ended or begun to go.
pub fn keeps(desired: &Pod, live: &Pod) -> bool {
    let state = pod_state::classify(live);
    pod::live_inputs_hash(live).is_some_and(|hash| Some(hash) == pod::live_inputs_hash(desired))
        && !matches!(state, PodState::Ended { .. } | PodState::Terminating)
}

/// Whether the runtime `runtime_name` is about to create its pod: none is cached, and none was
/// created moments ago.
pub fn launching(ctx: &Context, runtime_name: &str, namespace: &str) -> bool {
    let pod_name = pod::pod_name(runtime_name);
    ctx.pods.get(namespace, &pod_name, |_| ()).is_none()
        && ctx
            .own_writes
            .pod_pending(&ObjectRef::new(&pod_name).within(namespace), false)
            .is_none()
}

/// Creates, replaces or keeps the pod. `restart` is a new `promptflow.dev/restart` value;
/// `patience_over`: the runtime waited long enough for a predecessor's pod
/// ([`predecessor_overdue`](super::predecessor_overdue)), which now counts as a conflict.
pub async fn apply_pod(
    ctx: &Context,
    desired: &DesiredPod,
    live: Option<&Pod>,
    restart: Option<&str>,
    patience_over: bool,
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
    let runtime_name = runtime_name(&pod_name);
    // Someone else's pod, or an earlier runtime's of this name on its way out.
    let not_ours = |found: &Pod| {
        let predecessor = left_by_predecessor(&found.metadata, runtime_name, owner_uid.as_deref());
        if predecessor && !patience_over {
            PodOutcome::later(
                Verdict::not_available(reasons::PREDECESSOR_CLEANUP, predecessor_message("Pod", &pod_name)),
                PREDECESSOR_RECHECK,
            )
        } else {
            let mut message = pod_conflict(&desired.pod, &pod_name);
            if predecessor {
                message.push_str(&predecessor_stuck("pod"));
            }
            PodOutcome::later(Verdict::not_available(reasons::POD_CONFLICT, message), CONFLICT_RECHECK)
        }
    };
    if live.is_some_and(|live| !controlled_by(&live.metadata, owner_uid.as_deref())) {
        // The cache keeps no owner's kind or name: read it to tell whose it is.
        return Ok(match pods.get_opt(&pod_name).await? {
            Some(found) if !controlled_by(&found.metadata, owner_uid.as_deref()) => not_ours(&found),
            // Ours after all, or gone meanwhile (the cache is behind): its next event wakes the
            // runtime.
            _ => PodOutcome::later(starting, PREDECESSOR_RECHECK),
        });
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
                Some(found) => return Ok(not_ours(&found)),
                // Gone again (being deleted): look again shortly.
                None => return Ok(PodOutcome::later(starting, Duration::from_secs(2))),
            },
            other => other,
        };
        return match created {
            Ok(_) => {
                ctx.quota_refusals.reset(&runtime_ref(&pod_name, &namespace));
                ctx.own_writes.created_pod(pod_ref);
                ctx.launch
                    .launched(&crate::controller::lean::Named::new(&namespace, runtime_name));
                info!(pod = %pod_name, %namespace, "created runtime pod");
                Ok(PodOutcome {
                    verdict: starting,
                    // No event of its own: the status says the pod is starting, and the
                    // `Running` event names the pod and its image (one write less per start).
                    notice: None,
                    template_current: Some(true),
                    // A restart asked for before there was a pod is done by creating it.
                    handled_restart: restart.map(str::to_owned),
                    refused: None,
                    requeue: None,
                })
            }
            // The operator's view of the quotas let the pod through and the API server's did not:
            // one of them lags (a replaced pod's share comes back when the quota controller has
            // counted its deletion, and that update may have arrived before this runtime read
            // the quotas), so look again shortly as well as at the next quota change; backing off
            // (5 s doubling to 5 min) while they keep disagreeing (a LimitRange or webhook adds
            // what the operator does not count).
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("exceeded quota") => {
                Ok(PodOutcome::later(
                    Verdict::not_available(reasons::QUOTA_EXCEEDED, status.message),
                    ctx.quota_refusals.next(&runtime_ref(&pod_name, &namespace)),
                ))
            }
            // Refused for what the pod is (validation, admission): retrying the same pod cannot
            // succeed, so wait for a change of the runtime or of what it reads.
            Err(kube::Error::Api(status))
                if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) =>
            {
                let message = format!("the API server rejected pod {pod_name}: {}", status.message);
                Ok(PodOutcome::quiet(Verdict::not_available(
                    reasons::POD_REJECTED,
                    message,
                )))
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
        return Ok(PodOutcome::quiet(pod_state::pod_verdict(
            &pod_name,
            image,
            &PodState::Terminating,
        )));
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
            ..PodOutcome::quiet(pod_state::pod_verdict(&pod_name, image, &state))
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

/// What a runtime or instance says when a pod of its pod's name is not its own.
fn pod_conflict(desired: &Pod, pod_name: &str) -> String {
    let kind = desired.owner_references().first().map_or("object", |o| o.kind.as_str());
    format!(
        "pod {pod_name} exists and was not created by the operator for this {kind}; it is left untouched: delete or rename it, or give the {kind} another name (looked at again every {}s)",
        CONFLICT_RECHECK.as_secs()
    )
}
