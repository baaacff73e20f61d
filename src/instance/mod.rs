//! Compute instances, the pure part: whether an instance should run, from its spec, its
//! schedules, the action annotations and what its status recorded; and its state name. The
//! controller (`controller::instance`) does the reads and writes these decisions call for.

pub mod schedule;

use jiff::Timestamp;
use kube::ResourceExt;

use crate::api::conditions::reasons;
use crate::api::{ComputeInstance, DesiredState, InstanceState, ScheduleAction, annotations};

/// Whether the instance runs, and why.
#[derive(Clone, Debug, PartialEq)]
pub enum Run {
    /// Run the pod. `reason` is the cause when this starts a stopped instance.
    Yes {
        /// `ScheduledStart` or `Starting` when something started it just now.
        reason: Option<&'static str>,
        /// A new `promptflow.dev/start` value handled.
        start: Option<String>,
    },
    /// Stop (or stay stopped).
    No {
        /// `StoppedBySpec`, `StoppedByUser`, `ScheduledStop` or `IdleShutdown`.
        reason: String,
        /// For humans.
        message: String,
        /// A new `promptflow.dev/stop` value handled.
        stop: Option<String>,
    },
}

/// What decides a run, besides the instance itself.
pub struct RunInputs {
    /// The latest schedule trigger that fell due since the one the status announced.
    pub fired: Option<(ScheduleAction, Timestamp)>,
    /// The idle deadline passed with no activity.
    pub idle_due: bool,
}

/// Decides whether `instance` runs. `spec.state: Stopped` always stops it; otherwise a new
/// `promptflow.dev/stop` value, a Stop schedule or idleness stops it, and it stays stopped
/// (the spec is never written) until a Start schedule or a new `promptflow.dev/start` value.
pub fn decide(instance: &ComputeInstance, inputs: &RunInputs) -> Run {
    let status = instance.status.clone().unwrap_or_default();
    let handled = status.handled_actions.clone().unwrap_or_default();
    let fresh = |annotation: &str, handled: Option<&String>| {
        instance
            .annotations()
            .get(annotation)
            .filter(|value| Some(*value) != handled)
            .cloned()
    };
    let stop = |reason: &str, message: String, stop: Option<String>| Run::No {
        reason: reason.to_owned(),
        message,
        stop,
    };
    if instance.spec.state == DesiredState::Stopped {
        // A stop asked for meanwhile is done already: recorded as handled, so it does not stop
        // the instance again right after the next start.
        return stop(
            reasons::STOPPED_BY_SPEC,
            "spec.state is Stopped; set it to Running to start the instance".to_owned(),
            fresh(annotations::STOP, handled.stop.as_ref()),
        );
    }
    if let Some(value) = fresh(annotations::STOP, handled.stop.as_ref()) {
        return stop(
            reasons::STOPPED_BY_USER,
            format!(
                "stopped by the {} annotation; set a new value of {} to start it",
                annotations::STOP,
                annotations::START
            ),
            Some(value),
        );
    }
    match inputs.fired {
        Some((ScheduleAction::Stop, at)) => {
            return stop(
                reasons::SCHEDULED_STOP,
                format!("stopped by its schedule at {at}"),
                None,
            );
        }
        Some((ScheduleAction::Start, _)) => {
            return Run::Yes {
                reason: Some(reasons::SCHEDULED_START),
                start: None,
            };
        }
        None => {}
    }
    if let Some(value) = fresh(annotations::START, handled.start.as_ref()) {
        return Run::Yes {
            reason: Some(reasons::STARTING),
            start: Some(value),
        };
    }
    if inputs.idle_due {
        return stop(
            reasons::IDLE_SHUTDOWN,
            format!(
                "stopped after {} without activity on its runtimes; set a new value of {} to start it",
                instance
                    .spec
                    .idle_time_before_shutdown
                    .as_deref()
                    .unwrap_or("the idle time"),
                annotations::START
            ),
            None,
        );
    }
    // A stop by `spec.state` (StoppedBySpec) ends when the spec says Running again; the others
    // stay until a start.
    let down = matches!(status.state, InstanceState::Stopped | InstanceState::Stopping);
    let sticky = [
        reasons::SCHEDULED_STOP,
        reasons::IDLE_SHUTDOWN,
        reasons::STOPPED_BY_USER,
    ];
    match status.reason.as_deref() {
        Some(reason) if down && sticky.contains(&reason) => {
            stop(reason, status.message.clone().unwrap_or_default(), None)
        }
        _ => Run::Yes {
            reason: down.then_some(reasons::STARTING),
            start: None,
        },
    }
}

/// The state of an instance that runs, from its previous state and its pod: `None` when there is
/// no pod (yet, or any more), `Some(ready)` otherwise.
pub fn running_state(previous: Option<InstanceState>, pod_ready: Option<bool>) -> InstanceState {
    use InstanceState::*;
    match (pod_ready, previous) {
        (Some(true), _) => Running,
        (_, None | Some(Creating | Failed)) => Creating,
        (_, Some(Stopped | Stopping | Starting)) => Starting,
        (None, Some(Running | Restarting)) => Restarting,
        (Some(false), Some(Restarting)) => Restarting,
        (Some(false), Some(Running)) => Starting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ComputeInstanceStatus, HandledActions};

    fn instance(state: &str, annotations: serde_json::Value, status: Option<ComputeInstanceStatus>) -> ComputeInstance {
        let mut instance: ComputeInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
            "metadata": {"name": "ci", "namespace": "a", "annotations": annotations},
            "spec": {"instanceType": "Standard_DS3_v2", "state": state}
        }))
        .unwrap();
        instance.status = status;
        instance
    }

    fn stopped(reason: &str, handled_stop: Option<&str>) -> Option<ComputeInstanceStatus> {
        Some(ComputeInstanceStatus {
            state: InstanceState::Stopped,
            reason: Some(reason.into()),
            handled_actions: Some(HandledActions {
                stop: handled_stop.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    const QUIET: RunInputs = RunInputs {
        fired: None,
        idle_due: false,
    };

    fn runs(run: &Run) -> bool {
        matches!(run, Run::Yes { .. })
    }

    #[test]
    fn spec_state_stops_and_starts() {
        let off = instance("Stopped", serde_json::json!({}), None);
        assert!(!runs(&decide(&off, &QUIET)));
        let back = instance(
            "Running",
            serde_json::json!({}),
            stopped(reasons::STOPPED_BY_SPEC, None),
        );
        assert_eq!(
            decide(&back, &QUIET),
            Run::Yes {
                reason: Some(reasons::STARTING),
                start: None
            }
        );
    }

    #[test]
    fn schedule_and_idle_stops_stay_until_a_start() {
        let at: Timestamp = "2026-11-30T19:00:00Z".parse().unwrap();
        let running = instance("Running", serde_json::json!({}), None);
        let fired = RunInputs {
            fired: Some((ScheduleAction::Stop, at)),
            idle_due: false,
        };
        assert!(matches!(decide(&running, &fired), Run::No { reason, .. } if reason == reasons::SCHEDULED_STOP));
        let idle = RunInputs {
            fired: None,
            idle_due: true,
        };
        assert!(matches!(decide(&running, &idle), Run::No { reason, .. } if reason == reasons::IDLE_SHUTDOWN));

        for reason in [reasons::SCHEDULED_STOP, reasons::IDLE_SHUTDOWN] {
            let down = instance("Running", serde_json::json!({}), stopped(reason, None));
            assert!(!runs(&decide(&down, &QUIET)), "{reason} stays stopped");
            let start = RunInputs {
                fired: Some((ScheduleAction::Start, at)),
                idle_due: false,
            };
            assert!(runs(&decide(&down, &start)));
            let button = instance(
                "Running",
                serde_json::json!({"promptflow.dev/start": "1"}),
                stopped(reason, None),
            );
            assert_eq!(
                decide(&button, &QUIET),
                Run::Yes {
                    reason: Some(reasons::STARTING),
                    start: Some("1".into())
                }
            );
        }
    }

    #[test]
    fn a_stop_asked_for_while_stopped_by_spec_is_handled_then() {
        let off = instance("Stopped", serde_json::json!({"promptflow.dev/stop": "b"}), None);
        assert!(matches!(decide(&off, &QUIET), Run::No { stop: Some(v), .. } if v == "b"));
        let back = instance(
            "Running",
            serde_json::json!({"promptflow.dev/stop": "b"}),
            stopped(reasons::STOPPED_BY_SPEC, Some("b")),
        );
        assert!(runs(&decide(&back, &QUIET)), "the old stop fired after the start");
    }

    #[test]
    fn the_stop_annotation_stops_once_and_stays() {
        let asked = instance("Running", serde_json::json!({"promptflow.dev/stop": "a"}), None);
        assert!(matches!(decide(&asked, &QUIET), Run::No { stop: Some(v), .. } if v == "a"));
        let handled = instance(
            "Running",
            serde_json::json!({"promptflow.dev/stop": "a"}),
            stopped(reasons::STOPPED_BY_USER, Some("a")),
        );
        assert!(matches!(decide(&handled, &QUIET), Run::No { stop: None, .. }));
    }

    #[test]
    fn a_spec_stop_ends_when_the_spec_says_running_even_after_an_earlier_stop_annotation() {
        let annotations = serde_json::json!({"promptflow.dev/stop": "a", "promptflow.dev/start": "b"});
        let spec_stopped = instance(
            "Stopped",
            annotations.clone(),
            stopped(reasons::STOPPED_BY_USER, Some("a")),
        );
        assert!(matches!(decide(&spec_stopped, &QUIET), Run::No { reason, .. } if reason == reasons::STOPPED_BY_SPEC));
        let mut handled = stopped(reasons::STOPPED_BY_SPEC, Some("a"));
        handled.as_mut().unwrap().handled_actions.as_mut().unwrap().start = Some("b".into());
        let back = instance("Running", annotations, handled);
        assert!(runs(&decide(&back, &QUIET)));
    }

    #[test]
    fn states_follow_the_pod() {
        use InstanceState::*;
        assert_eq!(running_state(None, None), Creating);
        assert_eq!(running_state(Some(Creating), Some(false)), Creating);
        assert_eq!(running_state(Some(Creating), Some(true)), Running);
        assert_eq!(running_state(Some(Running), None), Restarting);
        assert_eq!(running_state(Some(Restarting), Some(false)), Restarting);
        assert_eq!(running_state(Some(Stopped), None), Starting);
        assert_eq!(running_state(Some(Starting), Some(true)), Running);
    }
}
