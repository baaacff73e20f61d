//! The runtime NetworkPolicy (opt-in, `--runtime-network-policy`): one per namespace that holds
//! runtimes, named [`POLICY_NAME`]. Clients may reach the activity proxies, only the operator's
//! pods may reach the activity ports, and nothing from outside a pod reaches a runtime's own port,
//! so no request skips the proxy and its activity count. The operator creates the policy when a
//! namespace's first runtime reconciles and deletes it when the namespace's last runtime goes; an
//! object of that name it did not make is reported and never touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::context::Context;
use crate::build::parts::Placement;
use crate::build::pod::MANAGED_BY;

/// The policy's name in every namespace.
pub const POLICY_NAME: &str = "promptflow-runtimes";
/// The policy's labels: the operator's, and its own name (a selector for the startup sweep).
const POLICY_SELECTOR: &str =
    "app.kubernetes.io/managed-by=promptflow-operator,app.kubernetes.io/name=promptflow-runtime-network";
/// The namespace label whose pods may reach runtimes of other namespaces.
pub const CLIENTS_LABEL: &str = "promptflow.dev/runtime-clients";
/// How many runtimes of one compute instance the policy gives ports to.
pub const INSTANCE_SLOTS: usize = 32;

/// Who the operator's pods are, for the activity ports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkSettings {
    /// The operator's namespace.
    pub operator_namespace: String,
    /// The operator pods' labels.
    pub operator_labels: BTreeMap<String, String>,
}

/// The namespaces whose policy this process has made sure of.
#[derive(Debug, Default)]
pub struct Ensured(Mutex<BTreeSet<String>>);

impl Ensured {
    fn contains(&self, namespace: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(namespace)
    }

    fn insert(&self, namespace: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(namespace.to_owned());
    }

    fn remove(&self, namespace: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(namespace);
    }

    /// How many namespaces are remembered.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policy for `namespace`: ingress to the operator's runtime and instance pods only on the
/// proxy ports (from anywhere) and the activity ports (from the operator's pods).
pub fn policy(namespace: &str, settings: &NetworkSettings) -> NetworkPolicy {
    let mut placements = vec![Placement::serverless()];
    placements.extend((0..INSTANCE_SLOTS).map(|slot| Placement::on_instance("slot", slot)));
    let ports = |port: fn(&Placement) -> i32| {
        placements
            .iter()
            .map(|placement| NetworkPolicyPort {
                port: Some(IntOrString::Int(port(placement))),
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                settings.operator_namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(settings.operator_labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(POLICY_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
                (
                    "app.kubernetes.io/name".to_owned(),
                    "promptflow-runtime-network".to_owned(),
                ),
            ])),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    LabelSelectorRequirement {
                        key: "app.kubernetes.io/managed-by".into(),
                        operator: "In".into(),
                        values: Some(vec![MANAGED_BY.into()]),
                    },
                    LabelSelectorRequirement {
                        key: "app.kubernetes.io/name".into(),
                        operator: "In".into(),
                        values: Some(vec!["promptflow-runtime".into(), "promptflow-compute-instance".into()]),
                    },
                ]),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    // Clients: pods of the namespace itself, and of namespaces labelled
                    // `promptflow.dev/runtime-clients: "true"` (NetworkPolicies only add: anyone
                    // allowed by another policy still is).
                    from: Some(vec![
                        NetworkPolicyPeer {
                            pod_selector: Some(LabelSelector::default()),
                            ..Default::default()
                        },
                        NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector {
                                match_labels: Some(BTreeMap::from([(CLIENTS_LABEL.to_owned(), "true".to_owned())])),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ports: Some(ports(|p| p.proxy_port)),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![operator]),
                    ports: Some(ports(|p| p.activity_port)),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// Whether a live object is the operator's policy.
fn is_ours(live: &NetworkPolicy) -> bool {
    live.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY)
        && live.labels().get("app.kubernetes.io/name").map(String::as_str) == Some("promptflow-runtime-network")
}

/// Why the policy cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A NetworkPolicy of the name exists and is not the operator's.
    #[error(
        "NetworkPolicy {0}/{POLICY_NAME} exists and was not made by the operator; rename or delete it so the operator can restrict runtime pods"
    )]
    Conflict(String),
    /// The API refused a read or write.
    #[error("NetworkPolicy {0}/{POLICY_NAME}: {1}")]
    Api(String, kube::Error),
}

/// Makes sure `namespace` has the policy (no request once this process has seen it there).
pub async fn ensure(ctx: &Context, namespace: &str) -> Result<(), NetworkError> {
    let Some(settings) = &ctx.network else {
        return Ok(());
    };
    if ctx.network_ensured.contains(namespace) {
        return Ok(());
    }
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let desired = policy(namespace, settings);
    let api_error = |e| NetworkError::Api(namespace.to_owned(), e);
    match api.create(&PostParams::default(), &desired).await {
        Ok(_) => info!(namespace, "runtime NetworkPolicy created"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let mut live = api.get(POLICY_NAME).await.map_err(api_error)?;
            if !is_ours(&live) {
                return Err(NetworkError::Conflict(namespace.to_owned()));
            }
            let empty = live
                .spec
                .as_ref()
                .is_none_or(|spec| spec.ingress.as_ref().is_none_or(Vec::is_empty));
            if empty {
                // Emptied (or never filled): the operator's rules again.
                live.spec = desired.spec;
                api.replace(POLICY_NAME, &PostParams::default(), &live)
                    .await
                    .map_err(api_error)?;
                info!(namespace, "runtime NetworkPolicy filled in");
            }
            // Otherwise it stays as it is: an administrator may have tightened it.
        }
        Err(e) => return Err(api_error(e)),
    }
    ctx.network_ensured.insert(namespace);
    Ok(())
}

/// Deletes the operator's policy of `namespace` when no runtime is left there.
pub async fn release_if_empty(ctx: &Context, namespace: &str) {
    if ctx.network.is_none() || has_runtimes(ctx, namespace) {
        return;
    }
    ctx.network_ensured.remove(namespace);
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let live = match api.get_opt(POLICY_NAME).await {
        Ok(Some(live)) if is_ours(&live) => live,
        Ok(_) => return,
        Err(e) => {
            warn!(namespace, error = %e, "cannot read the runtime NetworkPolicy to delete it");
            return;
        }
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: live.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(POLICY_NAME, &params).await {
        Ok(_) => info!(namespace, "runtime NetworkPolicy deleted: no runtime is left"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => warn!(namespace, error = %e, "cannot delete the runtime NetworkPolicy"),
    }
    // A runtime that came meanwhile may have found the policy still there: it looks again.
    ctx.network_ensured.remove(namespace);
    // A runtime created meanwhile gets it back.
    if has_runtimes(ctx, namespace) {
        ctx.wake_namespace(namespace);
    }
}

fn has_runtimes(ctx: &Context, namespace: &str) -> bool {
    ctx.runtimes.any_in(namespace)
}

/// After the runtimes are listed: deletes the operator's policies of namespaces without runtimes
/// (their last runtime went while no operator ran).
pub async fn sweep(ctx: &Context, namespace: Option<&str>) {
    if ctx.network.is_none() {
        return;
    }
    let api: Api<NetworkPolicy> = match namespace {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    let listed = match api.list_metadata(&ListParams::default().labels(POLICY_SELECTOR)).await {
        Ok(listed) => listed,
        Err(e) => {
            warn!(error = %e, "cannot list runtime NetworkPolicies");
            return;
        }
    };
    for policy in listed.items {
        if let Some(namespace) = policy.namespace() {
            release_if_empty(ctx, &namespace).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_opens_proxy_ports_to_all_and_activity_ports_to_the_operator_only() {
        let settings = NetworkSettings {
            operator_namespace: "pf-system".into(),
            operator_labels: BTreeMap::from([("app.kubernetes.io/name".into(), "promptflow-operator".into())]),
        };
        let policy = policy("team-a", &settings);
        let spec = policy.spec.unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
        let rules = spec.ingress.unwrap();
        let numbers = |rule: &NetworkPolicyIngressRule| -> Vec<i32> {
            rule.ports
                .iter()
                .flatten()
                .map(|p| match p.port {
                    Some(IntOrString::Int(n)) => n,
                    _ => panic!("numbered ports"),
                })
                .collect()
        };
        let (proxies, activity) = (numbers(&rules[0]), numbers(&rules[1]));
        let clients = rules[0].from.as_ref().unwrap();
        assert_eq!(
            clients[0].pod_selector,
            Some(LabelSelector::default()),
            "the namespace's own pods"
        );
        assert!(clients[0].namespace_selector.is_none());
        assert_eq!(
            clients[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[CLIENTS_LABEL],
            "true"
        );
        assert_eq!(&proxies[..3], &[8081, 8101, 8111]);
        assert_eq!(&activity[..3], &[8082, 8102, 8112]);
        assert_eq!(proxies.len(), INSTANCE_SLOTS + 1);
        // No runtime port is reachable: neither 8080 nor any slot's own port.
        for port in [8080, 8100, 8110, 8100 + 10 * (INSTANCE_SLOTS as i32 - 1)] {
            assert!(!proxies.contains(&port) && !activity.contains(&port), "{port}");
        }
        let from = rules[1].from.as_ref().unwrap();
        assert_eq!(from.len(), 1, "one peer: the operator's pods in its namespace");
        let peer = &from[0];
        assert_eq!(
            peer.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
            "pf-system"
        );
        assert_eq!(
            peer.pod_selector.as_ref().unwrap().match_labels,
            Some(settings.operator_labels)
        );
        let selected = spec.pod_selector.unwrap().match_expressions.unwrap();
        assert_eq!(selected[0].values.as_deref(), Some(&[MANAGED_BY.to_owned()][..]));
    }
}
