//! Size: which catalog instance type a runtime's pod gets. Pure.

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};

use super::plan::Problem;
use crate::api::PromptFlowRuntime;
use crate::api::conditions::reasons;
use crate::build::pod::{self, INSTANCE_TYPE_ANNOTATION};
use crate::catalog::{Catalog, InstanceType};
use crate::quota;

/// Whether a pod is being sized now (none yet, or a resize to a newly named size): only then are
/// the namespace's quotas read, or waited for.
pub fn needs_sizing(runtime: &PromptFlowRuntime, live: Option<&Pod>) -> bool {
    match live {
        None => true,
        Some(live) => named_size(runtime).is_some_and(|named| live_size(live) != Some(named)),
    }
}

/// The instance type: the one named; else the one the live pod was sized from; else the first
/// catalog size that fits the namespace's quota headroom.
pub fn choose<'a>(
    runtime: &PromptFlowRuntime,
    live: Option<&Pod>,
    quotas: &[ResourceQuota],
    catalog: &'a Catalog,
) -> Result<&'a InstanceType, Problem> {
    let named = named_size(runtime);
    // The size chosen at first start is kept: the live pod's, else the one the status recorded
    // (between deleting a pod and creating its replacement, quota usage still counts the old one).
    let chosen_before = live.and_then(live_size).or_else(|| {
        // Only a size chosen for a serverless pod: a runtime that comes off a compute
        // instance is sized by quota, not by the instance it ran on.
        let status = runtime.status.as_ref()?;
        (status.compute.as_deref() == Some("Serverless"))
            .then_some(status.instance_type.as_deref())
            .flatten()
    });
    if let Some(named) = named {
        let size = catalog.get(named).ok_or_else(|| Problem {
            reason: reasons::UNKNOWN_INSTANCE_TYPE,
            message: format!(
                "instance type {named} is not in the catalog; set spec.compute.serverless.instanceType to one of: {}",
                catalog.names()
            ),
        })?;
        // A live pod already counts in the quota's usage; a resize gives its usage back.
        if chosen_before != Some(named) {
            let released: Option<Vec<_>> = live.and_then(|p| {
                Some(
                    p.spec
                        .as_ref()?
                        .containers
                        .iter()
                        .filter_map(|c| c.resources.clone())
                        .collect(),
                )
            });
            let wanted = pod::pod_resources(size, runtime);
            if let Some(short) = quota::shortfall(&wanted, released.as_deref(), quotas) {
                return Err(Problem {
                    reason: reasons::QUOTA_EXCEEDED,
                    message: format!("instance type {named} does not fit: {short}"),
                });
            }
        }
        return Ok(size);
    }
    if let Some(size) = chosen_before.and_then(|name| catalog.get(name)) {
        return Ok(size);
    }
    quota::first_fitting(catalog, quotas, |size| pod::pod_resources(size, runtime)).map_err(|shortfalls| {
        let detail = shortfalls
            .first()
            .map(|(name, short)| format!(" (the smallest, {name}: {short})"))
            .unwrap_or_default();
        Problem {
            reason: reasons::QUOTA_EXCEEDED,
            message: format!(
                "no instance type of the catalog fits the namespace's ResourceQuota{detail}; raise the quota or free capacity"
            ),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(spec: serde_json::Value) -> PromptFlowRuntime {
        crate::fixtures::runtime(spec, serde_json::json!({}))
    }

    fn quota(hard_cpu: &str, used_cpu: &str) -> ResourceQuota {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "team", "namespace": "a"},
            "status": {"hard": {"requests.cpu": hard_cpu}, "used": {"requests.cpu": used_cpu}}
        }))
        .unwrap()
    }

    fn sized_pod(size: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-runtime", "annotations": {INSTANCE_TYPE_ANNOTATION: size}}
        }))
        .unwrap()
    }

    #[test]
    fn without_a_name_the_first_fitting_size_wins_and_is_kept() {
        let catalog = Catalog::builtin();
        let rt = runtime(serde_json::json!({}));
        let first = choose(&rt, None, &[], &catalog).unwrap();
        assert_eq!(first.name, catalog.instance_types[0].name);
        // A live pod keeps its size whatever the quota says now.
        let kept = choose(&rt, Some(&sized_pod("Standard_E4ds_v4")), &[quota("1", "1")], &catalog).unwrap();
        assert_eq!(kept.name, "Standard_E4ds_v4");
        assert!(!needs_sizing(&rt, Some(&sized_pod("Standard_E4ds_v4"))));
        assert!(needs_sizing(&rt, None));
    }

    #[test]
    fn a_runtime_off_a_compute_instance_is_sized_by_quota_not_by_the_instance() {
        let catalog = Catalog::builtin();
        let with_status = |compute: &str| {
            let mut rt = runtime(serde_json::json!({}));
            rt.status = Some(
                serde_json::from_value(serde_json::json!({"phase": "Not available", "compute": compute,
                    "instanceType": "Standard_E4ds_v4"}))
                .unwrap(),
            );
            rt
        };
        let moved = with_status("team-ci");
        assert_eq!(
            choose(&moved, None, &[], &catalog).unwrap().name,
            catalog.instance_types[0].name
        );
        let serverless = with_status("Serverless");
        assert_eq!(
            choose(&serverless, None, &[], &catalog).unwrap().name,
            "Standard_E4ds_v4"
        );
    }

    #[test]
    fn unknown_names_and_full_quotas_are_problems_that_say_what_to_do() {
        let catalog = Catalog::builtin();
        let unknown = runtime(serde_json::json!({"compute": {"serverless": {"instanceType": "Standard_NC24"}}}));
        let problem = choose(&unknown, None, &[], &catalog).unwrap_err();
        assert_eq!(problem.reason, reasons::UNKNOWN_INSTANCE_TYPE);
        assert!(problem.message.contains(&catalog.names()));
        let problem = choose(&runtime(serde_json::json!({})), None, &[quota("1", "0")], &catalog).unwrap_err();
        assert_eq!(problem.reason, reasons::QUOTA_EXCEEDED);
        assert!(problem.message.contains("ResourceQuota team"), "{}", problem.message);
    }
}
