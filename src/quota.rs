//! ResourceQuota headroom: whether a pod of a given size still fits the namespace's quotas, as
//! the quota controller reports them (`status.used` against `status.hard`).

use std::fmt;

use k8s_openapi::api::core::v1::{ResourceQuota, ResourceRequirements};
use kube::ResourceExt;
use kube_quantity::ParsedQuantity;

use crate::catalog::{Catalog, InstanceType};

/// Quantities are held to at most 10^18 units (an exa of bytes or of cores) before any
/// arithmetic: the decimal arithmetic under the parsed quantities panics when it overflows, and a
/// user's `cpu: 1e26` must count as "more than any quota", not take the operator down.
const LARGEST: &str = "1e18";

/// `quantity` parsed and held to [`LARGEST`]; `None` when it does not parse (beyond the decimal
/// type's 28 digits, or not a quantity).
fn parsed(quantity: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> Option<ParsedQuantity> {
    let parsed = std::panic::catch_unwind(|| ParsedQuantity::try_from(quantity).ok())
        .ok()
        .flatten()?;
    if parsed.to_bytes_f64().is_some_and(|v| v.is_finite() && v.abs() <= 1e18) {
        Some(parsed)
    } else {
        ParsedQuantity::try_from(LARGEST).ok()
    }
}

/// What a pod asks: a quantity the API server accepted (the CRD's pattern) that does not parse
/// here is larger than any cluster, so [`LARGEST`].
fn bounded(quantity: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> ParsedQuantity {
    parsed(quantity)
        .or_else(|| ParsedQuantity::try_from(LARGEST).ok())
        .unwrap_or_default()
}

/// A quota that a pod of some size would exceed.
#[derive(Clone, Debug, PartialEq)]
pub struct Shortfall {
    /// The ResourceQuota's name.
    pub quota: String,
    /// The quota resource, e.g. `requests.cpu`.
    pub resource: String,
    /// What is used now.
    pub used: String,
    /// The hard limit.
    pub hard: String,
    /// What the pod would add.
    pub needed: String,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ResourceQuota {} has {} {} of {} used and the runtime needs {} more",
            self.quota, self.resource, self.used, self.hard, self.needed
        )
    }
}

/// The first quota a pod whose containers have `resources` would exceed, if any. `released` is
/// the containers of a pod it replaces: their usage is already counted and goes away.
pub fn shortfall(
    resources: &[ResourceRequirements],
    released: Option<&[ResourceRequirements]>,
    quotas: &[ResourceQuota],
) -> Option<Shortfall> {
    quotas
        .iter()
        .filter(|quota| applies_to_runtime_pods(quota))
        .find_map(|quota| {
            let status = quota.status.as_ref()?;
            let hard = status.hard.as_ref()?;
            let used = status.used.clone().unwrap_or_default();
            hard.iter().find_map(|(resource, hard_quantity)| {
                let mut needed = demand(resources, resource)?;
                if let Some(freed) = released.and_then(|r| demand(r, resource)) {
                    needed = if freed >= needed {
                        ParsedQuantity::default()
                    } else {
                        needed - freed
                    };
                }
                let hard_value = parsed(hard_quantity)?;
                let used_value = used.get(resource).and_then(parsed).unwrap_or_default();
                (used_value.clone() + needed.clone() > hard_value).then(|| Shortfall {
                    quota: quota.name_any(),
                    resource: resource.clone(),
                    used: used_value.to_string(),
                    hard: hard_quantity.0.clone(),
                    needed: needed.to_string(),
                })
            })
        })
}

/// The first catalog size that fits every quota, or the shortfall of each size. `resources_of`
/// gives a size's pod resources (the size, with the runtime's override on top).
pub fn first_fitting<'a>(
    catalog: &'a Catalog,
    quotas: &[ResourceQuota],
    resources_of: impl Fn(&InstanceType) -> Vec<ResourceRequirements>,
) -> Result<&'a InstanceType, Vec<(String, Shortfall)>> {
    let mut shortfalls = Vec::new();
    for size in &catalog.instance_types {
        match shortfall(&resources_of(size), None, quotas) {
            None => return Ok(size),
            Some(short) => shortfalls.push((size.name.clone(), short)),
        }
    }
    Err(shortfalls)
}

/// What a runtime pod (all its containers) adds to a quota resource; `None` for resources it
/// does not consume.
fn demand(containers: &[ResourceRequirements], resource: &str) -> Option<ParsedQuantity> {
    if matches!(resource, "pods" | "count/pods") {
        return ParsedQuantity::try_from("1").ok();
    }
    containers
        .iter()
        .map(|resources| container_demand(resources, resource))
        .reduce(|a, b| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        })
        .flatten()
}

fn container_demand(resources: &ResourceRequirements, resource: &str) -> Option<ParsedQuantity> {
    let from =
        |list: &Option<std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         key: &str| { list.as_ref().and_then(|l| l.get(key)).map(bounded).unwrap_or_default() };
    match resource {
        "cpu" | "requests.cpu" => Some(from(&resources.requests, "cpu")),
        "memory" | "requests.memory" => Some(from(&resources.requests, "memory")),
        "limits.cpu" => Some(from(&resources.limits, "cpu")),
        "limits.memory" => Some(from(&resources.limits, "memory")),
        "ephemeral-storage" | "requests.ephemeral-storage" => Some(from(&resources.requests, "ephemeral-storage")),
        "limits.ephemeral-storage" => Some(from(&resources.limits, "ephemeral-storage")),
        _ => None,
    }
}

/// Whether a quota counts runtime pods, judged as the quota admission plugin judges a pod: every
/// scope in `spec.scopes` and every expression of `spec.scopeSelector` must match. Runtime pods
/// have requests (NotBestEffort), no deadline (NotTerminating), no priority class (the plugin
/// matches the selector against a label set without the key: `NotIn` and `DoesNotExist` match,
/// `In` and `Exists` do not) and no pod affinity across namespaces; other scopes
/// (VolumeAttributesClass) do not cover pods.
fn applies_to_runtime_pods(quota: &ResourceQuota) -> bool {
    let Some(spec) = quota.spec.as_ref() else {
        return true;
    };
    let scope_matches = |scope: &str| matches!(scope, "NotBestEffort" | "NotTerminating");
    let scopes_match = spec.scopes.iter().flatten().all(|scope| scope_matches(scope));
    let expressions_match = spec
        .scope_selector
        .iter()
        .flat_map(|selector| selector.match_expressions.iter().flatten())
        .all(|expression| match expression.scope_name.as_str() {
            "PriorityClass" => matches!(expression.operator.as_str(), "NotIn" | "DoesNotExist"),
            scope => scope_matches(scope) && expression.operator == "Exists",
        });
    scopes_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(name: &str, hard: &[(&str, &str)], used: &[(&str, &str)]) -> ResourceQuota {
        let list = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"hard": list(hard)},
            "status": {"hard": list(hard), "used": list(used)}
        }))
        .unwrap()
    }

    #[test]
    fn scopes_and_scope_selectors_count_runtime_pods_as_the_admission_plugin_does() {
        let scoped = |spec: serde_json::Value| -> ResourceQuota {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}, "spec": spec})).unwrap()
        };
        let expression = |scope: &str, operator: &str, values: &[&str]| {
            let mut e = serde_json::json!({"scopeName": scope, "operator": operator});
            if !values.is_empty() {
                e["values"] = serde_json::json!(values);
            }
            scoped(serde_json::json!({"scopeSelector": {"matchExpressions": [e]}}))
        };
        assert!(applies_to_runtime_pods(&scoped(serde_json::json!({}))));
        assert!(applies_to_runtime_pods(&scoped(
            serde_json::json!({"scopes": ["NotBestEffort", "NotTerminating"]})
        )));
        assert!(!applies_to_runtime_pods(&scoped(
            serde_json::json!({"scopes": ["BestEffort"]})
        )));
        assert!(!applies_to_runtime_pods(&scoped(
            serde_json::json!({"scopes": ["Terminating"]})
        )));
        // The Kubernetes docs' examples.
        assert!(!applies_to_runtime_pods(&expression(
            "CrossNamespacePodAffinity",
            "Exists",
            &[]
        )));
        assert!(!applies_to_runtime_pods(&expression(
            "PriorityClass",
            "In",
            &["high", "medium"]
        )));
        assert!(!applies_to_runtime_pods(&expression("PriorityClass", "Exists", &[])));
        assert!(applies_to_runtime_pods(&expression(
            "PriorityClass",
            "DoesNotExist",
            &[]
        )));
        assert!(applies_to_runtime_pods(&expression(
            "PriorityClass",
            "NotIn",
            &["high"]
        )));
        assert!(!applies_to_runtime_pods(&expression("PriorityClass", "In", &["low"])));
        assert!(applies_to_runtime_pods(&expression("NotTerminating", "Exists", &[])));
        assert!(!applies_to_runtime_pods(&expression(
            "VolumeAttributesClass",
            "In",
            &["gold"]
        )));
    }

    #[test]
    fn quantities_beyond_any_cluster_do_not_fit_and_do_not_panic() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let catalog = Catalog::from_yaml("instanceTypes: [{name: small, cpu: '1', memory: 2Gi}]").unwrap();
        let quotas = [quota(
            "team",
            &[("requests.cpu", "1e30"), ("limits.memory", "64Gi")],
            &[("requests.cpu", "1n")],
        )];
        for huge in ["1e26", "99999999999999999999999999999", "1e300", "7E", "1e-30"] {
            let resources = |_: &InstanceType| {
                let mut containers = vec![
                    ResourceRequirements {
                        requests: Some([("cpu".to_owned(), Quantity(huge.into()))].into()),
                        limits: Some([("memory".to_owned(), Quantity(format!("{huge}Ei")))].into()),
                        ..Default::default()
                    },
                    crate::build::proxy::proxy_resources(),
                ];
                containers[1]
                    .requests
                    .as_mut()
                    .unwrap()
                    .insert("cpu".into(), Quantity("1n".into()));
                containers
            };
            let fitted = first_fitting(&catalog, &quotas, resources);
            if huge == "1e-30" {
                assert!(fitted.is_ok(), "{fitted:?}");
            } else {
                assert!(fitted.is_err(), "{huge} fitted");
            }
        }
    }

    #[test]
    fn no_quota_means_the_first_size_fits() {
        let catalog = Catalog::builtin();
        assert_eq!(
            first_fitting(&catalog, &[], |size| vec![size.resources()])
                .unwrap()
                .name,
            "Standard_D2s_v3"
        );
    }

    #[test]
    fn the_first_size_within_headroom_is_chosen() {
        let catalog = Catalog::from_yaml(
            "instanceTypes: [{name: big, cpu: '8', memory: 64Gi}, {name: small, cpu: '1', memory: 2Gi}]",
        )
        .unwrap();
        let quotas = [quota(
            "team",
            &[("requests.cpu", "4"), ("requests.memory", "16Gi")],
            &[("requests.cpu", "1")],
        )];
        assert_eq!(
            first_fitting(&catalog, &quotas, |size| vec![size.resources()])
                .unwrap()
                .name,
            "small"
        );
    }

    #[test]
    fn nothing_fits_names_the_quota_and_resource() {
        let catalog = Catalog::builtin();
        let quotas = [quota("team", &[("limits.memory", "4Gi")], &[("limits.memory", "1Gi")])];
        let shortfalls = first_fitting(&catalog, &quotas, |size| vec![size.resources()]).unwrap_err();
        assert_eq!(shortfalls.len(), catalog.instance_types.len());
        let message = shortfalls[0].1.to_string();
        assert!(message.contains("ResourceQuota team"), "{message}");
        assert!(message.contains("limits.memory"), "{message}");
    }

    #[test]
    fn pod_count_quotas_count_one_pod() {
        let quotas = [quota("pods", &[("pods", "2")], &[("pods", "2")])];
        assert!(shortfall(&[Catalog::builtin().instance_types[0].resources()], None, &quotas).is_some());
        let quotas = [quota("pods", &[("pods", "3")], &[("pods", "2")])];
        assert!(shortfall(&[Catalog::builtin().instance_types[0].resources()], None, &quotas).is_none());
    }

    #[test]
    fn a_replaced_pod_gives_back_what_it_uses() {
        let catalog = Catalog::builtin();
        let small = catalog.get("Standard_D2s_v3").unwrap().resources();
        let big = catalog.get("Standard_D4s_v3").unwrap().resources();
        // 2 of 4 CPUs used by the runtime's own small pod: growing to 4 fits once it is released.
        let quotas = [quota("team", &[("requests.cpu", "4")], &[("requests.cpu", "2")])];
        assert!(shortfall(std::slice::from_ref(&big), None, &quotas).is_some());
        assert!(shortfall(&[big], Some(&[small]), &quotas).is_none());
    }

    #[test]
    fn quotas_for_best_effort_pods_do_not_apply() {
        let mut scoped = quota("be", &[("pods", "0")], &[]);
        scoped.spec.as_mut().unwrap().scopes = Some(vec!["BestEffort".into()]);
        assert!(shortfall(&[Catalog::builtin().instance_types[0].resources()], None, &[scoped]).is_none());
    }
}
