//! What a runtime asks for that this operator version does not do yet, said in its status
//! instead of silently ignored. Each entry goes when its feature lands. Pure.

use kube::ResourceExt;

use super::status::ConditionState;
use crate::api::conditions::{self, reasons};
use crate::api::{PromptFlowRuntime, UpdatePolicy, annotations};

/// Conditions (status `Unknown`, reason `NotSupportedYet`) for every feature the runtime asks for
/// that is not built yet.
pub fn not_supported_yet(runtime: &PromptFlowRuntime) -> Vec<ConditionState> {
    let spec = &runtime.spec;
    let mut states = vec![];
    let asked_for_versions = [
        (
            spec.image.version.is_none(),
            "no spec.image.version (the newest version pinned at first start)",
        ),
        (
            spec.update_policy == UpdatePolicy::Automatic,
            "spec.updatePolicy Automatic",
        ),
        (
            runtime.annotations().contains_key(annotations::CHECK_VERSION),
            "the promptflow.dev/check-version annotation",
        ),
        (
            runtime.annotations().contains_key(annotations::UPDATE),
            "the promptflow.dev/update annotation",
        ),
    ];
    let asked: Vec<&str> = asked_for_versions
        .iter()
        .filter(|(asked, _)| *asked)
        .map(|(_, what)| *what)
        .collect();
    if !asked.is_empty() {
        states.push(ConditionState::unknown(
            conditions::UPDATE_AVAILABLE,
            reasons::NOT_SUPPORTED_YET,
            format!(
                "registry version checks and updates are not built yet, so {} has no effect; the runtime runs {}",
                asked.join(", "),
                spec.image
                    .version
                    .as_deref()
                    .map_or("the latest tag".to_owned(), |v| format!("version {v}"))
            ),
        ));
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::runtime;

    #[test]
    fn a_pinned_runtime_asks_for_nothing_unbuilt() {
        let pinned = runtime(
            serde_json::json!({"image": {"version": "20240222.v4"}}),
            serde_json::json!({}),
        );
        assert!(not_supported_yet(&pinned).is_empty());
    }

    #[test]
    fn version_requests_are_named_and_idle_is_built() {
        let rt = runtime(
            serde_json::json!({"idle": {"timeout": "30m"}, "updatePolicy": "Automatic"}),
            serde_json::json!({"promptflow.dev/update": "1"}),
        );
        let states = not_supported_yet(&rt);
        assert_eq!(states.len(), 1);
        assert!(
            states
                .iter()
                .all(|s| s.status == "Unknown" && s.reason == "NotSupportedYet")
        );
        let versions = &states[0].message;
        assert!(
            versions.contains("Automatic")
                && versions.contains("promptflow.dev/update")
                && versions.contains("latest tag"),
            "{versions}"
        );
    }
}
