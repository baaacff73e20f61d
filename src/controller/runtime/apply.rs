//! Apply: create the planned pod, replace a live one whose spec changed or that ended, or keep it.
//! Returns the verdict on the pod and the event worth telling the user; never publishes itself.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::info;

use super::plan::DesiredPod;
use super::report::Notice;
use super::status::{self, PodState, Verdict};
use super::{Context, MANAGER};
use crate::api::conditions::reasons;
use crate::build::pod;
use crate::error::Result;

/// What applying the pod came to.
pub struct PodOutcome {
    /// The verdict on the pod.
    pub verdict: Verdict,
    /// When to look again.
    pub action: Action,
    /// An event for what was done, if anything.
    pub notice: Option<Notice>,
}

impl PodOutcome {
    fn quiet(verdict: Verdict, action: Action) -> Self {
        Self {
            verdict,
            action,
            notice: None,
        }
    }
}

/// Creates, replaces or keeps the pod.
pub async fn apply_pod(ctx: &Context, desired: &DesiredPod, live: Option<&Pod>) -> Result<PodOutcome> {
    let image = desired.facts.image.as_str();
    let pod_name = desired.pod.name_any();
    let namespace = desired.pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod_ref = ObjectRef::new(&pod_name).within(&namespace);
    let starting = status::pod_verdict(&pod_name, image, &PodState::Starting);
    // Created moments ago and not in the cache yet: trust it for a while, then look again (a pod
    // deleted before the cache ever showed it must not leave the runtime waiting forever).
    if let Some(trust) = ctx.own_writes.pod_pending(&pod_ref, live.is_some()) {
        return Ok(PodOutcome::quiet(starting, Action::requeue(trust)));
    }
    let Some(live) = live else {
        return match pods
            .patch(
                &pod_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired.pod),
            )
            .await
        {
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
                })
            }
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("exceeded quota") => {
                Ok(PodOutcome::quiet(
                    Verdict::not_available(reasons::QUOTA_EXCEEDED, status.message),
                    Action::await_change(),
                ))
            }
            Err(kube::Error::Api(status))
                if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) =>
            {
                let message = format!("the API server rejected pod {pod_name}: {}", status.message);
                Ok(PodOutcome::quiet(
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
    if state == PodState::Terminating || ctx.own_writes.already_deleted(&pod_ref, uid.as_deref()) {
        return Ok(PodOutcome::quiet(
            status::pod_verdict(&pod_name, image, &PodState::Terminating),
            Action::await_change(),
        ));
    }
    let outdated = pod::live_spec_hash(live) != pod::live_spec_hash(&desired.pod);
    if !outdated && !matches!(state, PodState::Ended { .. }) {
        return Ok(PodOutcome::quiet(
            status::pod_verdict(&pod_name, image, &state),
            Action::await_change(),
        ));
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
        ctx.own_writes.deleted_pod(pod_ref, uid);
    }
    if let PodState::Ended { message } = &state {
        return Ok(PodOutcome {
            verdict: status::pod_verdict(&pod_name, image, &state),
            action: Action::await_change(),
            notice: Some(Notice::warning(
                reasons::POD_FAILED,
                format!("pod {pod_name} ended ({message}); recreating it"),
            )),
        });
    }
    info!(pod = %pod_name, %namespace, "replacing runtime pod: its spec changed");
    let note = format!("replacing pod {pod_name} to apply the changed spec");
    Ok(PodOutcome {
        verdict: Verdict::not_available(reasons::POD_CREATING, note.clone()),
        action: Action::await_change(),
        notice: Some(Notice::normal("PodReplaced", note)),
    })
}

/// The pod of a runtime, by the runtime's name.
pub fn pod_ref(runtime_name: &str, namespace: &str) -> ObjectRef<Pod> {
    ObjectRef::new(&pod::pod_name(runtime_name)).within(namespace)
}
