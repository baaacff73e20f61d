//! Lifecycle: whether a runtime should run, stay stopped, or stop now, from its annotations and
//! status alone (the spec is never touched, so GitOps tools see no drift). Pure.

use kube::ResourceExt;

use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, annotations};

/// What the runtime's lifecycle asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Lifecycle {
    /// Run the pod. `start` is a new `promptflow.dev/start` value to record as handled.
    Run {
        /// The start value handled by this reconcile.
        start: Option<String>,
    },
    /// Stay stopped (idle or by the user): no pod, status as it is.
    Stopped,
    /// Stop now: a new `promptflow.dev/stop` value.
    StopNow {
        /// The stop value handled by this reconcile.
        value: String,
    },
}

/// Decides from the runtime's annotations and status. A new `stop` value stops it; a stopped
/// runtime starts again on a new `start` value or a spec change (a new generation).
pub fn decide(runtime: &PromptFlowRuntime) -> Lifecycle {
    let status = runtime.status.as_ref();
    let handled = status.and_then(|s| s.handled_actions.clone()).unwrap_or_default();
    let fresh = |annotation: &str, handled: Option<&String>| {
        runtime
            .annotations()
            .get(annotation)
            .filter(|value| Some(*value) != handled)
            .cloned()
    };
    if let Some(value) = fresh(annotations::STOP, handled.stop.as_ref()) {
        return Lifecycle::StopNow { value };
    }
    let start = fresh(annotations::START, handled.start.as_ref());
    let stopped = status
        .and_then(|s| s.reason.as_deref())
        .is_some_and(|reason| [reasons::STOPPED_IDLE, reasons::STOPPED_BY_USER].contains(&reason));
    let spec_changed = status.and_then(|s| s.observed_generation) != runtime.metadata.generation;
    if stopped && start.is_none() && !spec_changed {
        return Lifecycle::Stopped;
    }
    Lifecycle::Run { start }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HandledActions, PromptFlowRuntimeStatus};

    fn runtime(
        annotations: serde_json::Value,
        reason: Option<&str>,
        handled: HandledActions,
        generation: i64,
    ) -> PromptFlowRuntime {
        let mut runtime: PromptFlowRuntime = serde_json::from_value(serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "chat", "namespace": "a", "annotations": annotations, "generation": generation},
            "spec": {}
        }))
        .unwrap();
        runtime.status = Some(PromptFlowRuntimeStatus {
            reason: reason.map(str::to_owned),
            observed_generation: Some(1),
            handled_actions: Some(handled),
            ..Default::default()
        });
        runtime
    }

    #[test]
    fn a_new_stop_value_stops_and_a_handled_one_does_not() {
        let stop = runtime(
            serde_json::json!({"promptflow.dev/stop": "s1"}),
            Some("PodReady"),
            HandledActions::default(),
            1,
        );
        assert_eq!(decide(&stop), Lifecycle::StopNow { value: "s1".into() });
        let handled = HandledActions {
            stop: Some("s1".into()),
            ..Default::default()
        };
        let stopped = runtime(
            serde_json::json!({"promptflow.dev/stop": "s1"}),
            Some("StoppedByUser"),
            handled.clone(),
            1,
        );
        assert_eq!(decide(&stopped), Lifecycle::Stopped);
        let idle = runtime(serde_json::json!({}), Some("StoppedIdle"), HandledActions::default(), 1);
        assert_eq!(decide(&idle), Lifecycle::Stopped);
    }

    #[test]
    fn a_stopped_runtime_starts_on_a_new_start_value_or_a_spec_change() {
        let start = runtime(
            serde_json::json!({"promptflow.dev/start": "go"}),
            Some("StoppedIdle"),
            HandledActions::default(),
            1,
        );
        assert_eq!(
            decide(&start),
            Lifecycle::Run {
                start: Some("go".into())
            }
        );
        let edited = runtime(
            serde_json::json!({}),
            Some("StoppedByUser"),
            HandledActions::default(),
            2,
        );
        assert_eq!(decide(&edited), Lifecycle::Run { start: None });
        let running = runtime(serde_json::json!({}), Some("PodReady"), HandledActions::default(), 1);
        assert_eq!(decide(&running), Lifecycle::Run { start: None });
    }
}
