//! The pod cache's type: what a cached pod keeps ([`super`] says which fields).

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use serde::Deserialize;

use super::{status, trim_meta};

/// Trims a pod further: of its labels and annotations only the operator's own
/// (`promptflow.dev/…`: runtime and instance labels, the spec and inputs hashes, the instance type,
/// the runtimes an instance pod carries), of its owner references only the controller's uid
/// (whether the operator made it for that runtime or instance), of its conditions only
/// `Ready` and `PodScheduled`, and its containers' images only on instance pods.
pub fn trim_pod(pod: &mut LeanPod) {
    let created = pod.metadata.creation_timestamp.take();
    trim_meta(&mut pod.metadata);
    pod.metadata.creation_timestamp = created;
    let (labels, annotations) = (pod.metadata.labels.take(), pod.metadata.annotations.take());
    if labels.is_some() || annotations.is_some() {
        let ours = |map: Option<BTreeMap<String, String>>| {
            map.into_iter()
                .flatten()
                .filter(|(key, _)| key.starts_with("promptflow.dev/"))
                .map(|(key, value)| (status::text(&key), value.into_boxed_str()))
                .collect::<Vec<_>>()
        };
        let mut own = ours(labels);
        pod.labels = own.len();
        own.extend(ours(annotations));
        pod.own = own.into();
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
            .retain(|c| &*c.type_ == "Ready" || &*c.type_ == "PodScheduled");
    }
    if pod.label(crate::build::instance::INSTANCE_LABEL).is_none() {
        for container in &mut pod.spec.containers {
            container.image = None;
        }
    }
}

/// A pod as the controllers read it, deserialized straight from the API server's JSON: a
/// k8s-openapi `Pod` is 2.4 KiB before any field is set and each of its containers 2.1 KiB more,
/// so trimming one after deserializing still left about 12 KiB per cached pod. Once trimmed, its
/// metadata holds no labels or annotations (`ResourceExt::labels()` is empty): read them with
/// [`LeanPod::label`], [`LeanPod::annotation`] or from [`LeanPod::to_pod`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanPod {
    /// Without labels and annotations once trimmed: the operator's own are in `own`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The operator's own labels then its own annotations (`promptflow.dev/…`), `labels` of them
    /// labels: two maps took about 1.1 KiB of every cached pod for four short entries.
    #[serde(skip)]
    own: Box<[(Arc<str>, Box<str>)]>,
    #[serde(skip)]
    labels: usize,
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
    #[serde(deserialize_with = "interned")]
    name: Arc<str>,
    /// Kept for instance pods only (which image each runtime's container runs).
    #[serde(default)]
    image: Option<Box<str>>,
    #[serde(default, deserialize_with = "shared_resources")]
    resources: Option<Arc<ResourceRequirements>>,
}

/// A container's resources, one copy per distinct value: the pods of one size carry the same
/// requests and limits, which took about 1.5 KiB of every cached pod.
fn shared_resources<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Arc<ResourceRequirements>>, D::Error> {
    Ok(Option::<ResourceRequirements>::deserialize(deserializer)?.map(shared))
}

/// The one shared copy of `value`, made when none is alive. The table holds only weak
/// references, and drops dead ones each time it doubles.
fn shared(value: ResourceRequirements) -> Arc<ResourceRequirements> {
    static SHARED: LazyLock<Mutex<HashMap<String, Weak<ResourceRequirements>>>> = LazyLock::new(Default::default);
    // The maps inside are ordered, so equal values have one spelling.
    let Ok(key) = serde_json::to_string(&value) else {
        return Arc::new(value);
    };
    let mut table = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(alive) = table.get(&key).and_then(Weak::upgrade) {
        return alive;
    }
    if table.len() >= 64 && table.len().is_power_of_two() {
        table.retain(|_, copy| copy.strong_count() > 0);
    }
    let copy = Arc::new(value);
    table.insert(key, Arc::downgrade(&copy));
    copy
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodStatus {
    #[serde(default, deserialize_with = "interned_opt")]
    phase: Option<Arc<str>>,
    #[serde(default, deserialize_with = "interned_opt")]
    message: Option<Arc<str>>,
    #[serde(default, deserialize_with = "interned_opt")]
    reason: Option<Arc<str>>,
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
    #[serde(rename = "type", deserialize_with = "interned")]
    type_: Arc<str>,
    #[serde(deserialize_with = "interned")]
    status: Arc<str>,
    #[serde(default, deserialize_with = "interned_opt")]
    reason: Option<Arc<str>>,
    #[serde(default, deserialize_with = "interned_opt")]
    message: Option<Arc<str>>,
}

/// A string as its shared copy: pods repeat their containers' names, phases, condition types
/// and reasons, and the operator's label and annotation keys.
fn interned<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
    Ok(status::text(&String::deserialize(deserializer)?))
}

fn interned_opt<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Arc<str>>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.map(|value| status::text(&value)))
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainerStatus {
    #[serde(deserialize_with = "interned")]
    name: Arc<str>,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    restart_count: i32,
    state: Option<LeanState>,
    /// Boxed, as the states' rare parts are: most containers have none.
    last_state: Option<Box<LeanState>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanState {
    running: Option<serde::de::IgnoredAny>,
    waiting: Option<Box<LeanWaiting>>,
    terminated: Option<Box<LeanTerminated>>,
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
    /// The operator's own label `key` (`promptflow.dev/…`).
    pub fn label(&self, key: &str) -> Option<&str> {
        self.own[..self.labels]
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// The operator's own annotation `key` (`promptflow.dev/…`).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.own[self.labels..]
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// The pod as a k8s-openapi `Pod` holding what was kept, for the code that reads pods (built
    /// per read: a reconcile reads one pod).
    pub fn to_pod(&self) -> Pod {
        let container_statuses = |all: &[LeanContainerStatus]| {
            all.iter()
                .map(|c| ContainerStatus {
                    name: c.name.to_string(),
                    ready: c.ready,
                    restart_count: c.restart_count,
                    state: c.state.as_ref().map(LeanState::to_state),
                    last_state: c.last_state.as_deref().map(LeanState::to_state),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
        };
        let map = |entries: &[(Arc<str>, Box<str>)]| {
            (!entries.is_empty()).then(|| {
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        let mut metadata = self.metadata.clone();
        if !self.own.is_empty() {
            metadata.labels = map(&self.own[..self.labels]);
            metadata.annotations = map(&self.own[self.labels..]);
        }
        Pod {
            metadata,
            spec: Some(PodSpec {
                containers: self
                    .spec
                    .containers
                    .iter()
                    .map(|c| Container {
                        name: c.name.to_string(),
                        image: c.image.as_deref().map(str::to_owned),
                        resources: c.resources.as_deref().cloned(),
                        ..Default::default()
                    })
                    .collect(),
                resources: self.spec.resources.map(|_| ResourceRequirements::default()),
                ..Default::default()
            }),
            status: self.status.as_ref().map(|status| PodStatus {
                phase: status.phase.as_deref().map(str::to_owned),
                message: status.message.as_deref().map(str::to_owned),
                reason: status.reason.as_deref().map(str::to_owned),
                pod_ip: status.pod_ip.clone(),
                conditions: Some(
                    status
                        .conditions
                        .iter()
                        .map(|c| PodCondition {
                            type_: c.type_.to_string(),
                            status: c.status.to_string(),
                            reason: c.reason.as_deref().map(str::to_owned),
                            message: c.message.as_deref().map(str::to_owned),
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
            assert_eq!(lean.metadata.labels, None, "kept outside the metadata");
            assert_eq!(
                (
                    lean.label("promptflow.dev/runtime"),
                    lean.annotation("promptflow.dev/runtime")
                ),
                (Some("rt"), None)
            );
            assert_eq!(lean.annotation("promptflow.dev/spec-hash"), Some("h"));
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
    fn pods_of_one_size_share_one_copy_of_their_resources() {
        let pod = |cpu: &str| -> LeanPod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "a"},
                "spec": {"containers": [{"name": "runtime", "resources": {"limits": {"cpu": cpu, "memory": "1Gi"}, "requests": {"memory": "1Gi", "cpu": cpu}}}]}
            }))
            .unwrap()
        };
        let (a, b, c) = (pod("1"), pod("1"), pod("2"));
        let resources = |p: &LeanPod| p.spec.containers[0].resources.clone().unwrap();
        assert!(Arc::ptr_eq(&resources(&a), &resources(&b)));
        assert!(!Arc::ptr_eq(&resources(&a), &resources(&c)));
        assert!(
            Arc::ptr_eq(&a.spec.containers[0].name, &c.spec.containers[0].name),
            "names are shared too"
        );
        assert_eq!(
            a.to_pod().spec.unwrap().containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()["cpu"]
                .0,
            "1"
        );
    }
}
