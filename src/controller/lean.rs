//! What the caches keep of each object: only the fields the controllers read. Pods and Services
//! are deserialized from the watch straight into lean types holding just those fields (the full
//! objects are never built); other objects are trimmed before they enter a store.
//!
//! Read by the controllers, and therefore kept:
//! - every object: name, namespace, uid, resourceVersion, labels, annotations (without
//!   `last-applied-configuration`), owner references, finalizers, deletionTimestamp, generation;
//! - pods: only the `promptflow.dev/` labels and annotations (outside the metadata, as one short
//!   list), the creation time, the containers' images on instance pods only, of the owner
//!   references only the controller's uid (who made the pod); each container's name and
//!   resources (a resize gives its quota usage back), whether it has pod-level resources, the phase and its message, pod IP, the
//!   `Ready` and `PodScheduled` conditions (type, status, reason, message) and container
//!   statuses
//!   (name, ready, restart count, state and last state without times or ids);
//! - Services: name, namespace, uid, resourceVersion, the controller's owner reference, and a
//!   digest of labels, cluster IP, selector and ports — what `matches` compares;
//! - runtimes: their spec as compact JSON, read back per reconcile, and their status with the
//!   strings and condition texts it has in common with other runtimes shared ([`status`]);
//! - service accounts: image pull secrets; quotas: everything but managed fields.

pub mod status;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;

use crate::api::PromptFlowRuntime;
use crate::api::conditions::reasons;

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

/// A Service as the controllers read it: who it is and who made it, and a digest of what
/// the operator compares ([`service::shape`](crate::build::service::shape)) instead of the
/// fields. Read straight from JSON (a k8s-openapi `Service` is 824 bytes before any field is
/// set; the fields themselves took about 2 KiB per Service in the cache).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "RawService")]
pub struct LeanService {
    /// Name, namespace, uid, resourceVersion, deletion timestamp and the controller's owner
    /// reference (the runtime's watch maps a Service to its owner by it).
    pub metadata: ObjectMeta,
    /// The digest of its own labels, type, cluster IP, `publishNotReadyAddresses`, selector
    /// and its port.
    pub shape: u64,
}

/// The fields a [`LeanService`] is made from, as they come from the API server.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: LeanServiceSpec,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanServiceSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    publish_not_ready_addresses: Option<bool>,
    external_name: Option<String>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
    selector: Option<std::collections::BTreeMap<String, String>>,
    ports: Option<Vec<LeanServicePort>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanServicePort {
    name: Option<String>,
    port: i32,
    target_port: Option<IntOrString>,
}

impl From<RawService> for LeanService {
    fn from(raw: RawService) -> Self {
        let spec = raw.spec;
        let shape = crate::build::service::shape_of(
            raw.metadata.labels.as_ref(),
            spec.type_.as_deref(),
            spec.cluster_ip.as_deref(),
            spec.publish_not_ready_addresses.unwrap_or_default(),
            spec.external_name.is_some_and(|n| !n.is_empty()) || spec.external_ips.is_some_and(|ips| !ips.is_empty()),
            spec.selector.as_ref(),
            spec.ports
                .iter()
                .flatten()
                .map(|p| (p.name.as_deref(), p.port, p.target_port.as_ref())),
        );
        let meta = raw.metadata;
        Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                deletion_timestamp: meta.deletion_timestamp,
                owner_references: meta
                    .owner_references
                    .and_then(|owners| owners.into_iter().find(|o| o.controller == Some(true)))
                    .map(|owner| vec![owner]),
                ..Default::default()
            },
            shape,
        }
    }
}

lean_resource!(LeanService, Service);

/// A runtime as the cache keeps it: its trimmed metadata, its spec as compact JSON and its
/// status with the texts it shares with other runtimes' shared ([`status::LeanStatus`]), read
/// back ([`LeanRuntime::full`]) when a reconcile or an instance reads the runtime. A typed
/// `PromptFlowRuntime` was about 1 KiB before any field was set, and a `Running` one's six
/// conditions took 45 allocations more: 3.6 KiB per cached runtime in all. The spec is checked to
/// parse when the watch delivers it, as it was before.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "PromptFlowRuntime")]
pub struct LeanRuntime {
    pub metadata: ObjectMeta,
    spec: Box<str>,
    /// The compute instance the spec asks for, if any.
    instance: Option<Box<str>>,
    status: Option<Box<status::LeanStatus>>,
}

impl TryFrom<PromptFlowRuntime> for LeanRuntime {
    type Error = serde_json::Error;

    fn try_from(mut runtime: PromptFlowRuntime) -> Result<Self, Self::Error> {
        trim_meta(&mut runtime.metadata);
        Ok(Self {
            spec: serde_json::to_string(&runtime.spec)?.into(),
            instance: runtime.spec.compute.instance.map(|i| i.name.into()),
            status: runtime.status.as_ref().map(|s| Box::new(s.into())),
            metadata: runtime.metadata,
        })
    }
}

impl LeanRuntime {
    /// The runtime as a `PromptFlowRuntime` (built per read).
    pub fn full(&self) -> crate::error::Result<PromptFlowRuntime> {
        let spec = serde_json::from_str(&self.spec).map_err(|e| crate::error::Error::Unreadable {
            kind: "PromptFlowRuntime",
            name: format!(
                "{}/{}",
                self.metadata.namespace.as_deref().unwrap_or_default(),
                self.metadata.name.as_deref().unwrap_or_default()
            ),
            why: format!("{:?} at column {}", e.classify(), e.column()),
        })?;
        Ok(PromptFlowRuntime {
            metadata: self.metadata.clone(),
            spec,
            status: self.status.as_deref().map(status::LeanStatus::full),
        })
    }

    /// The compute instances the runtime concerns: the one its spec asks for, then the one its
    /// status last named when that is another.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        let asked = self.instance.as_deref();
        let last = self
            .status
            .as_ref()
            .and_then(|s| s.compute())
            .filter(|c| *c != "Serverless" && Some(*c) != asked);
        asked.into_iter().chain(last)
    }

    /// `status.phase` for the metrics: `Running`, `Not available`, or `Stopped` (idle or by
    /// the user).
    pub fn phase(&self) -> &'static str {
        let status = self.status.as_deref();
        let stopped = status
            .and_then(|s| s.reason())
            .is_some_and(|r| [reasons::STOPPED_IDLE, reasons::STOPPED_BY_USER].contains(&r));
        match status.map(|s| s.phase()) {
            _ if stopped => "Stopped",
            phase => phase.unwrap_or_default().as_str(),
        }
    }
}

impl k8s_openapi::Resource for LeanRuntime {
    const API_VERSION: &'static str = "promptflow.dev/v1alpha1";
    const GROUP: &'static str = "promptflow.dev";
    const KIND: &'static str = "PromptFlowRuntime";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "promptflowruntimes";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for LeanRuntime {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The cache's key of a runtime, from the key the reconciler uses.
pub fn runtime_key(key: &ObjectRef<PromptFlowRuntime>) -> ObjectRef<LeanRuntime> {
    let lean = ObjectRef::new(&key.name);
    match key.namespace.as_deref() {
        Some(namespace) => lean.within(namespace),
        None => lean,
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

    #[test]
    fn a_lean_service_still_matches_what_the_operator_wants() {
        let full: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rt", "namespace": "a", "uid": "u1", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}],
                "ownerReferences": [{"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime", "name": "rt", "uid": "r1", "controller": true}]},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"a": "b"}, "ipFamilies": ["IPv4"],
                "sessionAffinity": "None", "type": "ClusterIP",
                "ports": [{"name": "http", "port": 8080, "targetPort": 8081, "protocol": "TCP", "nodePort": 31000}]},
            "status": {"loadBalancer": {}},
        }))
        .unwrap();
        let lean: LeanService = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        let mut written = full.clone();
        written.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = None;
        assert_eq!(
            lean.shape,
            crate::build::service::shape(&written),
            "what the server fills in is not compared"
        );
        assert_eq!(
            lean.metadata.owner_references.as_ref().unwrap()[0].kind,
            "PromptFlowRuntime"
        );
        assert!(lean.metadata.labels.is_none() && lean.metadata.managed_fields.is_none());
        // Others' labels and ports beside the operator's are theirs, not a difference.
        for addition in [
            serde_json::json!({"metadata": {"labels": {"team": "a"}}}),
            serde_json::json!({"spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 8081},
                {"name": "metrics", "port": 9100}]}}),
        ] {
            let mut added = serde_json::to_value(&full).unwrap();
            json_patch_merge(&mut added, &addition);
            let lean: LeanService = serde_json::from_value(added).unwrap();
            assert_eq!(lean.shape, crate::build::service::shape(&written), "{addition}");
        }
        for change in [
            serde_json::json!({"metadata": {"labels": {"app.kubernetes.io/instance": "other"}}}),
            serde_json::json!({"spec": {"type": "ExternalName"}}),
            serde_json::json!({"spec": {"externalIPs": ["192.0.2.7"]}}),
            serde_json::json!({"spec": {"selector": {"a": "c"}}}),
            serde_json::json!({"spec": {"publishNotReadyAddresses": true}}),
            serde_json::json!({"spec": {"ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}}),
        ] {
            let mut changed = serde_json::to_value(&full).unwrap();
            json_patch_merge(&mut changed, &change);
            let lean: LeanService = serde_json::from_value(changed).unwrap();
            assert_ne!(lean.shape, crate::build::service::shape(&written), "{change}");
        }
    }

    fn json_patch_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
                for (key, value) in patch {
                    json_patch_merge(target.entry(key.clone()).or_insert(serde_json::Value::Null), value);
                }
            }
            (target, patch) => *target = patch.clone(),
        }
    }

    #[test]
    fn a_lean_runtime_reads_back_as_the_runtime_it_was() {
        let json = serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "chat", "namespace": "a", "uid": "u1", "resourceVersion": "9", "generation": 2,
                         "finalizers": ["promptflow.dev/instance"], "annotations": {"promptflow.dev/update": "1",
                         "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}], "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"compute": {"instance": {"name": "ci-1", "acknowledgeRestart": true}},
                     "image": {"repository": "registry.example/promptflow/promptflow-runtime-stable", "version": "20240222.v4"},
                     "idle": {"timeout": "1h"}},
            "status": {"phase": "Running", "reason": "PodReady", "compute": "ci-0", "version": "20240222.v4",
                       "conditions": [{"type": "Ready", "status": "True", "reason": "PodReady", "message": "pod ci-0 is Ready",
                                       "lastTransitionTime": "2026-01-01T00:00:01Z", "observedGeneration": 2}]}
        });
        let typed: PromptFlowRuntime = serde_json::from_value(json.clone()).unwrap();
        let lean: LeanRuntime = serde_json::from_value(json).unwrap();
        let full = lean.full().unwrap();
        assert_eq!(full.spec, typed.spec);
        assert_eq!(full.status, typed.status);
        assert_eq!(
            full.metadata.annotations.unwrap().keys().collect::<Vec<_>>(),
            ["promptflow.dev/update"]
        );
        assert_eq!(full.metadata.managed_fields, None);
        assert_eq!(full.metadata.generation, Some(2));
        assert_eq!(full.metadata.finalizers, typed.metadata.finalizers);
        assert_eq!(lean.instances().collect::<Vec<_>>(), ["ci-1", "ci-0"]);
        assert_eq!(lean.phase(), "Running");

        let stopped: LeanRuntime = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "a"}, "spec": {"image": {"repository": "r/x"}},
            "status": {"phase": "Not available", "reason": "StoppedIdle", "compute": "Serverless"}
        }))
        .unwrap();
        assert_eq!(stopped.phase(), "Stopped");
        assert_eq!(stopped.instances().count(), 0, "Serverless is not an instance");
        let fresh: LeanRuntime = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "f", "namespace": "a"}, "spec": {"image": {"repository": "r/x"}}
        }))
        .unwrap();
        assert_eq!((fresh.phase(), fresh.full().unwrap().status), ("Not available", None));
    }

    #[test]
    fn a_runtime_that_does_not_parse_is_refused_by_the_cache_as_before() {
        let bad =
            serde_json::json!({"metadata": {"name": "b", "namespace": "a"}, "spec": {"image": {"repository": 7}}});
        assert!(serde_json::from_value::<PromptFlowRuntime>(bad.clone()).is_err());
        assert!(serde_json::from_value::<LeanRuntime>(bad).is_err());
    }

    #[test]
    fn a_lean_runtime_is_the_runtime_resource() {
        use kube::Resource as _;
        assert_eq!(LeanRuntime::kind(&()), PromptFlowRuntime::kind(&()));
        assert_eq!(LeanRuntime::group(&()), PromptFlowRuntime::group(&()));
        assert_eq!(LeanRuntime::version(&()), PromptFlowRuntime::version(&()));
        assert_eq!(LeanRuntime::api_version(&()), PromptFlowRuntime::api_version(&()));
        assert_eq!(LeanRuntime::plural(&()), PromptFlowRuntime::plural(&()));
        let key = ObjectRef::<PromptFlowRuntime>::new("chat").within("a");
        assert_eq!(runtime_key(&key), ObjectRef::<LeanRuntime>::new("chat").within("a"));
    }
}
