//! Test fixtures shared by the unit tests.

use crate::api::PromptFlowRuntime;

/// A runtime `chat` in namespace `a` (uid `uid-1`, generation 1) with `spec` and `annotations`.
pub fn runtime(spec: serde_json::Value, annotations: serde_json::Value) -> PromptFlowRuntime {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
        "metadata": {"name": "chat", "namespace": "a", "uid": "uid-1", "generation": 1, "annotations": annotations},
        "spec": spec
    }))
    .expect("a valid runtime")
}
