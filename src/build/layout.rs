//! How a compute instance's size is laid over its pod: pod-level resources that its containers
//! share (Kubernetes 1.34+), or equal shares per main container where the API server has none.
//! Either way the pod claims the size once, never per runtime. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// How an instance's size is laid over its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceLayout {
    /// Pod-level resources hold the size's cpu and memory; containers share them. Ephemeral
    /// storage (which pod-level resources do not cover) is split into equal shares.
    Pod,
    /// Each main container (the instance's and each runtime's) holds an equal share of the size.
    Containers,
}

impl ResourceLayout {
    /// The name the pod annotation and the status carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Containers => "Containers",
        }
    }
}

/// Resources pod-level resources cover.
fn pod_level(resource: &str) -> bool {
    matches!(resource, "cpu" | "memory") || resource.starts_with("hugepages-")
}

/// One of `parts` equal shares of `quantity`, rounded down (cpu to millicores, the rest to
/// whole Mi, or bytes below that); `None` when it does not parse.
fn share_of(resource: &str, quantity: &Quantity, parts: usize) -> Option<Quantity> {
    // The decimal arithmetic under the parse panics on quantities beyond its range.
    let parsed = std::panic::catch_unwind(|| kube_quantity::ParsedQuantity::try_from(quantity).ok())
        .ok()
        .flatten()?;
    let value = parsed.to_bytes_f64().filter(|v| v.is_finite() && *v >= 0.0)?;
    let parts = parts.max(1) as f64;
    if resource == "cpu" {
        let millis = (value * 1000.0 / parts).floor().max(1.0);
        return Some(Quantity(format!("{millis}m")));
    }
    let units = (value / parts).floor().max(1.0);
    const MI: f64 = 1024.0 * 1024.0;
    Some(Quantity(if units >= MI {
        format!("{}Mi", (units / MI).floor())
    } else {
        format!("{units}")
    }))
}

/// The part of `resources` for `keep`, each quantity divided into `parts` shares.
fn shares(resources: &ResourceRequirements, parts: usize, keep: impl Fn(&str) -> bool) -> ResourceRequirements {
    let split = |list: &Option<BTreeMap<String, Quantity>>| {
        let out: BTreeMap<String, Quantity> = list
            .iter()
            .flatten()
            .filter(|(resource, _)| keep(resource))
            .map(|(resource, quantity)| {
                let share = if parts > 1 {
                    share_of(resource, quantity, parts).unwrap_or_else(|| quantity.clone())
                } else {
                    quantity.clone()
                };
                (resource.clone(), share)
            })
            .collect();
        (!out.is_empty()).then_some(out)
    };
    ResourceRequirements {
        requests: split(&resources.requests),
        limits: split(&resources.limits),
        ..Default::default()
    }
}

/// The instance container's, each runtime container's and the pod's resources for an instance
/// of `size` (`resources`) carrying `runtimes` runtimes. Resources neither pod-level resources
/// nor shares can hold (extended resources such as GPUs) stay whole with the instance container.
pub(super) fn laid_out(
    resources: &ResourceRequirements,
    runtimes: usize,
    layout: ResourceLayout,
) -> (ResourceRequirements, ResourceRequirements, Option<ResourceRequirements>) {
    let parts = runtimes + 1;
    let shared = |resource: &str| pod_level(resource) || resource == "ephemeral-storage";
    let (kept, pod) = match layout {
        ResourceLayout::Pod => {
            let pod = shares(resources, 1, pod_level);
            (shares(resources, parts, |r| r == "ephemeral-storage"), Some(pod))
        }
        ResourceLayout::Containers => (shares(resources, parts, shared), None),
    };
    let extended = shares(resources, 1, |r| !shared(r));
    let mut instance = kept.clone();
    for (target, source) in [
        (&mut instance.requests, extended.requests),
        (&mut instance.limits, extended.limits),
    ] {
        if let Some(source) = source {
            target.get_or_insert_with(BTreeMap::new).extend(source);
        }
    }
    (instance, kept, pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_down_and_never_reach_zero() {
        assert_eq!(share_of("cpu", &Quantity("1".into()), 3).unwrap().0, "333m");
        assert_eq!(share_of("cpu", &Quantity("1m".into()), 3).unwrap().0, "1m");
        assert_eq!(share_of("memory", &Quantity("1Gi".into()), 2).unwrap().0, "512Mi");
        assert_eq!(share_of("memory", &Quantity("1000".into()), 3).unwrap().0, "333");
        assert!(share_of("memory", &Quantity("lots".into()), 3).is_none());
    }
}
