//! What the caches keep of each object: only the fields the controllers read. Pods and Services
//! are deserialized from the watch straight into lean types holding just those fields (the full
//! objects are never built); other objects are trimmed before they enter a store.
//!
//! Read by the controllers, and therefore kept:
//! - every object: name, namespace, uid, resourceVersion, labels, annotations (without
//!   `last-applied-configuration`), owner references, finalizers, deletionTimestamp, generation;
//! - pods: only the `promptflow.dev/` labels and annotations, the creation time, of the owner
//!   references only the controller's uid (who made the pod); each container's name and
//!   resources (a resize gives its quota usage back), whether it has pod-level resources, the phase and its message, pod IP, the
//!   `Ready` and `PodScheduled` conditions (type, status, reason, message) and container
//!   statuses
//!   (name, ready, restart count, state and last state without times or ids);
//! - Services: cluster IP, selector and ports (name, port, target port) — what `matches` compares;
//! - service accounts: image pull secrets; quotas and runtimes: everything but managed fields.

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Deserialize;

/// A lean type is the API resource of the full type it stands for (same group, kind, path), so
/// `Api`, watches and stores treat it as that resource.
macro_rules! lean_resource {
    ($lean:ty, $full:ty) => {
        impl k8s_openapi::Resource for $lean {
            const API_VERSION: &'static str = <$full>::API_VERSION;
            const GROUP: &'static str = <$full>::GROUP;
            const KIND: &'static str = <$full>::KIND;
            const VERSION: &'static str = <$full>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$full>::URL_PATH_SEGMENT;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $lean {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// Drops what no cached object needs: managed fields and the last-applied annotation.
pub fn trim<K: Resource>(object: &mut K) {
    trim_meta(object.meta_mut());
}

fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    meta.creation_timestamp = None;
    meta.generate_name = None;
}

/// Trims a pod further: of its labels and annotations only the operator's own
/// (`promptflow.dev/…`: runtime and instance labels, the spec and inputs hashes, the instance type,
/// the runtimes an instance pod carries), of its owner references only the controller's uid
/// (whether the operator made it for that runtime or instance), and of its conditions only
/// `Ready` and `PodScheduled`.
pub fn trim_pod(pod: &mut LeanPod) {
    let created = pod.metadata.creation_timestamp.take();
    trim_meta(&mut pod.metadata);
    pod.metadata.creation_timestamp = created;
    let ours = |key: &String| key.starts_with("promptflow.dev/");
    for map in [&mut pod.metadata.labels, &mut pod.metadata.annotations] {
        if let Some(entries) = map.as_mut() {
            entries.retain(|key, _| ours(key));
        }
    }
    pod.metadata.owner_references = pod
        .metadata
        .owner_references
        .take()
        .unwrap_or_default()
        .into_iter()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| {
            vec![OwnerReference {
                uid: owner.uid,
                controller: Some(true),
                ..Default::default()
            }]
        });
    if let Some(status) = pod.status.as_mut() {
        status
            .conditions
            .retain(|c| c.type_ == "Ready" || c.type_ == "PodScheduled");
    }
}

/// A pod as the controllers read it, deserialized straight from the API server's JSON: a
/// k8s-openapi `Pod` is 2.4 KiB before any field is set and each of its containers 2.1 KiB more,
/// so trimming one after deserializing still left about 12 KiB per cached pod.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: LeanPodSpec,
    #[serde(default)]
    status: Option<Box<LeanPodStatus>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanPodSpec {
    #[serde(default)]
    containers: Vec<LeanContainer>,
    /// Whether the pod has pod-level resources (kept as presence only: the instance controller
    /// asks whether the API server kept them).
    #[serde(default)]
    resources: Option<serde::de::IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanContainer {
    name: String,
    #[serde(default)]
    resources: Option<ResourceRequirements>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodStatus {
    phase: Option<String>,
    message: Option<String>,
    reason: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    conditions: Vec<LeanCondition>,
    #[serde(default)]
    container_statuses: Vec<LeanContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<LeanContainerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
    reason: Option<String>,
    message: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainerStatus {
    name: String,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    restart_count: i32,
    state: Option<LeanState>,
    last_state: Option<LeanState>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanState {
    running: Option<serde::de::IgnoredAny>,
    waiting: Option<LeanWaiting>,
    terminated: Option<LeanTerminated>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanWaiting {
    reason: Option<String>,
    message: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanTerminated {
    exit_code: i32,
    reason: Option<String>,
    message: Option<String>,
}

lean_resource!(LeanPod, Pod);

impl LeanPod {
    /// The pod as a k8s-openapi `Pod` holding what was kept, for the code that reads pods (built
    /// per read: a reconcile reads one pod).
    pub fn to_pod(&self) -> Pod {
        let container_statuses = |all: &[LeanContainerStatus]| {
            all.iter()
                .map(|c| ContainerStatus {
                    name: c.name.clone(),
                    ready: c.ready,
                    restart_count: c.restart_count,
                    state: c.state.as_ref().map(LeanState::to_state),
                    last_state: c.last_state.as_ref().map(LeanState::to_state),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
        };
        Pod {
            metadata: self.metadata.clone(),
            spec: Some(PodSpec {
                containers: self
                    .spec
                    .containers
                    .iter()
                    .map(|c| Container {
                        name: c.name.clone(),
                        resources: c.resources.clone(),
                        ..Default::default()
                    })
                    .collect(),
                resources: self.spec.resources.map(|_| ResourceRequirements::default()),
                ..Default::default()
            }),
            status: self.status.as_ref().map(|status| PodStatus {
                phase: status.phase.clone(),
                message: status.message.clone(),
                reason: status.reason.clone(),
                pod_ip: status.pod_ip.clone(),
                conditions: Some(
                    status
                        .conditions
                        .iter()
                        .map(|c| PodCondition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                            reason: c.reason.clone(),
                            message: c.message.clone(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                container_statuses: Some(container_statuses(&status.container_statuses)),
                init_container_statuses: Some(container_statuses(&status.init_container_statuses)),
                ..Default::default()
            }),
        }
    }
}

impl LeanState {
    fn to_state(&self) -> ContainerState {
        ContainerState {
            running: self.running.map(|_| ContainerStateRunning::default()),
            waiting: self.waiting.as_ref().map(|w| ContainerStateWaiting {
                reason: w.reason.clone(),
                message: w.message.clone(),
            }),
            terminated: self.terminated.as_ref().map(|t| ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: t.reason.clone(),
                message: t.message.clone(),
                ..Default::default()
            }),
        }
    }
}

/// A Service as the controllers read it (what `service::matches` compares), deserialized
/// straight from JSON: a k8s-openapi `Service` is 824 bytes before any field is set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: LeanServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    publish_not_ready_addresses: Option<bool>,
    selector: Option<std::collections::BTreeMap<String, String>>,
    ports: Option<Vec<LeanServicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanServicePort {
    name: Option<String>,
    port: i32,
    target_port: Option<IntOrString>,
}

lean_resource!(LeanService, Service);

impl LeanService {
    /// The Service as a k8s-openapi `Service` holding what was kept.
    pub fn to_service(&self) -> Service {
        Service {
            metadata: self.metadata.clone(),
            spec: Some(ServiceSpec {
                cluster_ip: self.spec.cluster_ip.clone(),
                publish_not_ready_addresses: self.spec.publish_not_ready_addresses,
                selector: self.spec.selector.clone(),
                ports: self.spec.ports.as_ref().map(|ports| {
                    ports
                        .iter()
                        .map(|p| ServicePort {
                            name: p.name.clone(),
                            port: p.port,
                            target_port: p.target_port.clone(),
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// A service account as the controllers read it: its image pull secrets.
pub fn trim_account(account: &mut ServiceAccount) {
    trim_meta(&mut account.metadata);
    account.secrets = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::runtime::pod_state::{self, PodState};
    use kube::ResourceExt;

    fn live_pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rt-pod", "namespace": "a", "uid": "u1", "resourceVersion": "7",
                "labels": {"promptflow.dev/runtime": "rt", "app.kubernetes.io/name": "promptflow-runtime"},
                "annotations": {"promptflow.dev/spec-hash": "h", "example.com/note": "x"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u9"},
                    {"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime", "name": "rt", "uid": "u0", "controller": true}],
                "managedFields": [{"manager": "x"}], "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n", "containers": [
                {"name": "runtime", "image": "img", "env": [{"name": "A", "value": "b"}],
                 "resources": {"requests": {"cpu": "1"}}},
                {"name": "proxy", "image": "img2"}],
                "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_lean_pod_reads_the_same_and_keeps_what_the_controllers_use() {
        let statuses = [
            serde_json::json!({"phase": "Running", "podIP": "10.0.0.1", "hostIP": "1.1.1.1", "startTime": "2026-01-01T00:00:00Z",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "runtime", "ready": true, "restartCount": 0, "image": "img", "imageID": "x",
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}),
            serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/3 nodes are available"}]}),
            serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "runtime", "ready": false, "restartCount": 4,
                "image": "img", "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "containerID": "c",
                    "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}}]}),
            serde_json::json!({"phase": "Failed", "message": "evicted", "reason": "Evicted"}),
        ];
        for status in statuses {
            let full = live_pod(status);
            let json = serde_json::to_value(&full).unwrap();
            let mut lean: LeanPod = serde_json::from_value(json).unwrap();
            trim_pod(&mut lean);
            let lean = lean.to_pod();
            assert_eq!(pod_state::classify(&lean), pod_state::classify(&full));
            assert!(
                !matches!(pod_state::classify(&lean), PodState::Starting)
                    || full.status.as_ref().unwrap().pod_ip.is_none()
            );
            assert_eq!(lean.labels().len(), 1);
            assert_eq!(lean.labels()["promptflow.dev/runtime"], "rt");
            assert_eq!(lean.annotations().len(), 1);
            assert_eq!(lean.annotations()["promptflow.dev/spec-hash"], "h");
            assert_eq!(lean.metadata.uid, full.metadata.uid);
            assert!(lean.metadata.managed_fields.is_none());
            let owners = lean.metadata.owner_references.as_ref().unwrap();
            assert_eq!(
                (owners.len(), owners[0].uid.as_str()),
                (1, "u0"),
                "only the controller's uid"
            );
            assert_eq!(lean.metadata.creation_timestamp, full.metadata.creation_timestamp);
            let spec = lean.spec.as_ref().unwrap();
            assert_eq!(spec.containers.len(), 2);
            assert_eq!(
                spec.containers[0].resources,
                full.spec.as_ref().unwrap().containers[0].resources
            );
            assert!(spec.volumes.is_none() && spec.containers[0].env.is_none() && spec.node_name.is_none());
            let json = serde_json::to_string(&lean).unwrap().len();
            assert!(json < serde_json::to_string(&full).unwrap().len());
        }
    }

    #[test]
    fn a_lean_service_still_matches_what_the_operator_wants() {
        let full: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rt", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"a": "b"}, "ipFamilies": ["IPv4"],
                "sessionAffinity": "None", "type": "ClusterIP",
                "ports": [{"name": "http", "port": 8080, "targetPort": 8081, "protocol": "TCP"}]},
            "status": {"loadBalancer": {}},
        }))
        .unwrap();
        let lean: LeanService = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        let lean = lean.to_service();
        assert!(crate::build::service::matches(&lean, &full));
        assert!(crate::build::service::matches(&full, &lean));
        assert!(lean.status.is_none() && lean.spec.as_ref().unwrap().ip_families.is_none());
    }
}
