//! A new runtime's first status waits a moment for its pod: a pod Ready within
//! [`FIRST_STATUS_WAIT`] of its creation makes the first status `Running`, in one write instead
//! of `PodStarting` then `Running`. Meanwhile the status is held in memory
//! ([`OwnWrites::hold_status`](super::OwnWrites::hold_status)) and decided from as from a write.

use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::Verdict;
use crate::api::conditions::reasons;
use crate::api::{HandledActions, PromptFlowRuntime, RuntimePhase};

/// How long a new runtime's first status may still wait for its starting pod.
pub const FIRST_STATUS_WAIT: Duration = Duration::from_secs(5);

/// How long to wait before writing the first status of a runtime whose pod is starting: while
/// no status was written for the runtime (`unwritten`), its pod was made by the operator less than
/// [`FIRST_STATUS_WAIT`] ago (`pod_age`), and the status would record nothing but the start (no
/// handled action, no version event). `None`: write now.
pub(super) fn first_status_wait(
    unwritten: bool,
    verdict: &Verdict,
    handled: &HandledActions,
    version_notice: bool,
    pod_age: Option<Duration>,
) -> Option<Duration> {
    let only_starting = unwritten
        && verdict.phase == RuntimePhase::NotAvailable
        && verdict.reason == reasons::POD_STARTING
        && *handled == HandledActions::default()
        && !version_notice;
    if !only_starting {
        return None;
    }
    FIRST_STATUS_WAIT.checked_sub(pod_age?).filter(|left| !left.is_zero())
}

/// How long ago the runtime's pod was made: the cached pod's creation, or, for one this operator
/// made moments ago and the cache does not show yet, its own record. `None`: not known (no pod,
/// or this clock behind the API server's).
pub(super) fn pod_age(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    live: Option<&k8s_openapi::api::core::v1::Pod>,
) -> Option<Duration> {
    match live {
        Some(pod) => {
            let created = pod.metadata.creation_timestamp.as_ref()?.0;
            Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(created)).ok()
        }
        None => {
            let pod = ObjectRef::new(&crate::build::pod::pod_name(&runtime.name_any())).within(&runtime.namespace()?);
            ctx.own_writes.created_since(&pod)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_runtimes_first_status_waits_only_while_its_pod_starts_and_nothing_else_is_to_record() {
        let starting = Verdict::not_available(reasons::POD_STARTING, "waiting");
        let none = HandledActions::default();
        let age = |s| Some(Duration::from_secs(s));
        assert_eq!(
            first_status_wait(true, &starting, &none, false, age(1)),
            Some(FIRST_STATUS_WAIT - Duration::from_secs(1))
        );
        assert_eq!(
            first_status_wait(true, &starting, &none, false, age(5)),
            None,
            "waited enough"
        );
        assert_eq!(
            first_status_wait(true, &starting, &none, false, None),
            None,
            "no pod of ours"
        );
        assert_eq!(
            first_status_wait(false, &starting, &none, false, age(0)),
            None,
            "a status was written"
        );
        let restart = HandledActions {
            restart: Some("1".into()),
            ..Default::default()
        };
        assert_eq!(
            first_status_wait(true, &starting, &restart, false, age(0)),
            None,
            "an action to record"
        );
        assert_eq!(
            first_status_wait(true, &starting, &none, true, age(0)),
            None,
            "a version event"
        );
        let blocked = Verdict::not_available(reasons::QUOTA_EXCEEDED, "no room");
        assert_eq!(
            first_status_wait(true, &blocked, &none, false, age(0)),
            None,
            "a problem"
        );
    }
}
