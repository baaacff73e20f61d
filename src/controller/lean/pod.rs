//! The pod cache's type: what a cached pod keeps ([`super`] says which fields).

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use serde::Deserialize;

use super::status;

/// A pod as its watch delivers it, deserialized straight from the API server's JSON into the
/// fields the controllers read: a k8s-openapi `Pod` is 2.4 KiB before any field is set and each
/// of its containers 2.1 KiB more. It lives only while its watch event is handled; the cache
/// keeps a [`CachedPod`] made from it.
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

impl LeanPod {
    /// Its label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// Whether kube-scheduler has yet to try the pod: not going, not started, not placed on a
    /// node by its creator, for the default scheduler, and no
    /// `PodScheduled` condition (the scheduler sets it True when it binds the pod and False when
    /// no node fits; an unschedulable pod waits in the scheduler's side queue, not ahead of
    /// others).
    pub fn awaits_scheduler(&self) -> bool {
        self.metadata.deletion_timestamp.is_none()
            && self.spec.node_name.is_none()
            && self
                .spec
                .scheduler_name
                .as_deref()
                .is_none_or(|scheduler| scheduler == "default-scheduler")
            && !self.tried_by_scheduler()
            && self
                .status
                .as_deref()
                .is_none_or(|status| status.phase.as_deref().is_none_or(|phase| phase == "Pending"))
    }

    /// Whether kube-scheduler has tried the pod (its `PodScheduled` condition is set).
    pub fn tried_by_scheduler(&self) -> bool {
        self.status
            .as_deref()
            .is_some_and(|status| status.conditions.iter().any(|c| &*c.type_ == "PodScheduled"))
    }
}

/// The labels a cached pod keeps: the ones the operator puts on its pods and reads back.
const KEPT_LABELS: &[&str] = &[crate::build::pod::RUNTIME_LABEL, crate::build::instance::INSTANCE_LABEL];

/// The annotations a cached pod keeps, likewise. Anything else under `promptflow.dev/` is not the
/// operator's: whoever labels a pod of theirs like the operator's cannot make the cache hold more.
const KEPT_ANNOTATIONS: &[&str] = &[
    crate::build::pod::SPEC_HASH_ANNOTATION,
    crate::build::pod::INPUTS_HASH_ANNOTATION,
    crate::build::pod::INSTANCE_TYPE_ANNOTATION,
    crate::build::instance::RUNTIMES_ANNOTATION,
    crate::build::instance::RUNTIME_UIDS_ANNOTATION,
    crate::build::instance::LAYOUT_ANNOTATION,
];

/// A pod as the pod cache keeps it (its name and namespace are the cache's keys): of its
/// metadata the uid, resourceVersion, creation and deletion times, of its owner references only
/// the controller's uid (whether the operator made it for that runtime or instance), of its
/// labels and annotations only the operator's own ([`KEPT_LABELS`], [`KEPT_ANNOTATIONS`]: runtime
/// and instance labels, the spec and inputs hashes, the instance type, the runtimes an instance
/// pod carries, its resource layout);
/// of its conditions only `Ready` and `PodScheduled`, and its containers' images only on instance
/// pods. Read with [`CachedPod::label`], [`CachedPod::annotation`] or [`CachedPod::to_pod`].
#[derive(Clone, Debug)]
pub struct CachedPod {
    uid: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    created: Option<Time>,
    deleting: Option<Time>,
    /// The uid of its controller owner reference.
    owner: Option<Box<str>>,
    /// The operator's own labels then its own annotations, `labels` of them labels: two maps
    /// took about 1.1 KiB of every cached pod for four short entries.
    own: Box<[(Arc<str>, Box<str>)]>,
    labels: usize,
    spec: LeanPodSpec,
    status: Option<Box<LeanPodStatus>>,
}

impl CachedPod {
    /// What the cache keeps of `pod`.
    pub fn of(pod: &LeanPod) -> Self {
        let meta = &pod.metadata;
        let ours = |map: Option<&BTreeMap<String, String>>, kept: &[&str]| {
            map.into_iter()
                .flatten()
                .filter(|(key, _)| kept.contains(&key.as_str()))
                .map(|(key, value)| (status::text(key), value.as_str().into()))
                .collect::<Vec<_>>()
        };
        let mut own = ours(meta.labels.as_ref(), KEPT_LABELS);
        let labels = own.len();
        own.extend(ours(meta.annotations.as_ref(), KEPT_ANNOTATIONS));
        let instance_pod = own[..labels]
            .iter()
            .any(|(key, _)| &**key == crate::build::instance::INSTANCE_LABEL);
        let mut spec = pod.spec.clone();
        if !instance_pod {
            for container in &mut spec.containers {
                container.image = None;
            }
        }
        let status = pod.status.as_ref().map(|status| {
            let mut status = status.clone();
            status
                .conditions
                .retain(|c| &*c.type_ == "Ready" || &*c.type_ == "PodScheduled");
            // The clone has room for all of them: a pod has five or more.
            status.conditions.shrink_to_fit();
            status
        });
        Self {
            uid: meta.uid.as_deref().map(Into::into),
            resource_version: meta.resource_version.as_deref().map(Into::into),
            created: meta.creation_timestamp.clone(),
            deleting: meta.deletion_timestamp.clone(),
            owner: super::controller_uid(meta),
            own: own.into(),
            labels,
            spec,
            status,
        }
    }

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

    /// Whether its controller owner reference names `owner_uid`.
    pub fn controlled_by(&self, owner_uid: Option<&str>) -> bool {
        super::controlled_by(self.owner.as_deref(), owner_uid)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanPodSpec {
    #[serde(default)]
    containers: Vec<LeanContainer>,
    /// Whether the pod has pod-level resources (kept as presence only: the instance controller
    /// asks whether the API server kept them).
    #[serde(default)]
    resources: Option<serde::de::IgnoredAny>,
    /// Whether a node was set (kept as presence only).
    #[serde(default, rename = "nodeName")]
    node_name: Option<serde::de::IgnoredAny>,
    /// The scheduler the pod asks for (one shared copy per name).
    #[serde(default, rename = "schedulerName", deserialize_with = "interned_opt")]
    scheduler_name: Option<Arc<str>>,
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

impl CachedPod {
    /// The pod as a k8s-openapi `Pod` holding what was kept, for the code that reads pods (built
    /// per read: a reconcile reads one pod).
    pub fn to_pod(&self, name: &str, namespace: &str) -> Pod {
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
        let metadata = ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: self.uid.as_deref().map(str::to_owned),
            resource_version: self.resource_version.as_deref().map(str::to_owned),
            creation_timestamp: self.created.clone(),
            deletion_timestamp: self.deleting.clone(),
            owner_references: self.owner.as_deref().map(|uid| {
                vec![OwnerReference {
                    uid: uid.to_owned(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            labels: map(&self.own[..self.labels]),
            annotations: map(&self.own[self.labels..]),
            ..Default::default()
        };
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
                "annotations": {"promptflow.dev/spec-hash": "h", "example.com/note": "x",
                    "promptflow.dev/padding": "x".repeat(4096)},
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
            let watched: LeanPod = serde_json::from_value(json).unwrap();
            assert_eq!(watched.label("app.kubernetes.io/name"), Some("promptflow-runtime"));
            let lean = CachedPod::of(&watched);
            assert!(lean.controlled_by(Some("u0")) && !lean.controlled_by(Some("u9")));
            assert_eq!(
                (
                    lean.label("promptflow.dev/runtime"),
                    lean.annotation("promptflow.dev/runtime")
                ),
                (Some("rt"), None)
            );
            assert_eq!(lean.annotation("promptflow.dev/spec-hash"), Some("h"));
            assert_eq!(
                lean.annotation("promptflow.dev/padding"),
                None,
                "not a key the operator reads"
            );
            let lean = lean.to_pod("rt-pod", "a");
            assert_eq!((lean.name_any(), lean.namespace()), (full.name_any(), full.namespace()));
            assert_eq!(lean.metadata.resource_version, full.metadata.resource_version);
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
            CachedPod::of(&a).to_pod("p", "a").spec.unwrap().containers[0]
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
