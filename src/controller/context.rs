//! What the controllers share: the client, the caches, the indexes, the memory of the
//! operator's own writes, and the operator's settings.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota, ServiceAccount};
use kube::Client;
use kube::runtime::reflector::{ObjectRef, Store};

use super::cache::Cache;
use super::index::DependencyIndex;
use super::instance::InstanceMemory;
use super::lean::{CachedPod, CachedRuntime, CachedService};
use super::recorder::Recorder;
use super::runtime::{Backoff, OwnWrites};
use crate::api::{ComputeInstance, PromptFlowRuntime};
use crate::build::instance::ResourceLayout;
use crate::build::pod::PodTemplate;
use crate::catalog::Catalog;
use crate::idle::IdleSettings;
use crate::idle::probe::ActivityProbe;
use crate::metrics::Metrics;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "promptflow-operator";

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The instance-type catalog.
    pub catalog: Catalog,
    /// The operator's side of the runtime pod template.
    pub template: PodTemplate,
    /// Publishes events.
    pub recorder: Recorder,
    /// Owned pods (only what the controllers read; `pod()` gives one as a `Pod`), each boxed: a
    /// hash table keeps room for more entries than it holds, and a slot is a pointer, not a pod.
    pub pods: Arc<Cache<Box<CachedPod>>>,
    /// Owned Services (who made them, their version and shape; `service()` gives one).
    pub services: Arc<Cache<CachedService>>,
    /// Asks activity proxies.
    pub probe: ActivityProbe,
    /// Idle-stop settings.
    pub idle: IdleSettings,
    /// When this operator process started: unknown activity counts from here.
    pub started: k8s_openapi::jiff::Timestamp,
    /// Service accounts.
    pub accounts: Store<ServiceAccount>,
    /// Resource quotas.
    pub quotas: Store<ResourceQuota>,
    /// Which runtimes read which objects.
    pub index: DependencyIndex<PromptFlowRuntime>,
    /// Counters and timings.
    pub metrics: Arc<Metrics>,
    /// Turns true once the pod, service-account and quota caches hold a full list.
    pub caches_ready: tokio::sync::watch::Receiver<bool>,
    /// What this operator last wrote, for reconciles that run before the caches saw the write.
    pub own_writes: OwnWrites,
    /// Backoff of runtimes whose reconcile failed.
    pub failures: Backoff,
    /// Backoff of runtimes blocked by a pull secret (secrets are not watched).
    pub pull_secret_waits: Backoff,
    /// Backoff of runtimes whose pod the API server refused for quota while the operator's view
    /// of the quotas let it through.
    pub quota_refusals: Backoff,
    /// What service accounts' pull secrets came to when last read (no contents).
    pub logins: super::runtime::observe::RememberedLogins,
    /// Runtimes (what a reconcile reads; `runtime()` gives one).
    pub runtimes: Arc<Cache<CachedRuntime>>,
    /// Compute instances.
    pub instances: Store<ComputeInstance>,
    /// Which instances read which objects (their runtimes' flows and accounts included).
    pub instance_index: DependencyIndex<ComputeInstance>,
    /// Compute-instance settings.
    pub instance_settings: InstanceSettings,
    /// What the instance controller remembers between reconciles.
    pub instance_memory: InstanceMemory,
    /// Wakes compute instances (a runtime or a pod of theirs changed).
    pub wake_instances: UnboundedSender<ObjectRef<ComputeInstance>>,
    /// Wakes runtimes (their instance changed).
    pub wake_runtimes: UnboundedSender<ObjectRef<PromptFlowRuntime>>,
    /// Registry answers about versions, shared by every runtime.
    pub versions: Arc<crate::registry::VersionCache>,
    /// The runtime NetworkPolicy's peers, when the operator keeps one per namespace.
    pub network: Option<super::network::NetworkSettings>,
    /// The namespaces whose NetworkPolicy this process has made sure of.
    pub network_ensured: super::network::Ensured,
    /// How many runtime pods wait for kube-scheduler, and the runtimes parked until fewer do.
    pub launch: super::launch::LaunchWindow,
}

/// Operator settings for compute instances.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSettings {
    /// The image of an instance pod's primary container.
    pub image: String,
    /// Attach and detach changes seen within this time of the first one restart the instance
    /// once, together.
    pub batch: Duration,
    /// The shortest idle shutdown time; shorter `idleTimeBeforeShutdown` values are raised to it.
    pub min_idle: Duration,
    /// How instance pods hold their size: pod-level resources until the API server is seen to
    /// drop them (then shares, for the rest of the process).
    pub layout: LayoutChoice,
}

/// The resource layout of new instance pods, shared by every reconcile: as the flag says, or
/// (auto on a server that should have pod-level resources) pod-level until one dry run has shown
/// whether the API server keeps them.
#[derive(Clone, Debug)]
pub struct LayoutChoice(Arc<std::sync::atomic::AtomicU8>);

const UNVERIFIED: u8 = 0;
const POD_LEVEL: u8 = 1;
const SHARES: u8 = 2;

impl LayoutChoice {
    /// A choice of `layout`; `verify`: pod-level only once the API server is seen to keep it.
    pub fn new(layout: ResourceLayout, verify: bool) -> Self {
        let state = match layout {
            ResourceLayout::Pod if verify => UNVERIFIED,
            ResourceLayout::Pod => POD_LEVEL,
            ResourceLayout::Containers => SHARES,
        };
        Self(Arc::new(std::sync::atomic::AtomicU8::new(state)))
    }

    /// The layout new pods get.
    pub fn get(&self) -> ResourceLayout {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            SHARES => ResourceLayout::Containers,
            _ => ResourceLayout::Pod,
        }
    }

    /// Whether the API server has yet to show that it keeps pod-level resources.
    pub fn unverified(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == UNVERIFIED
    }

    /// Records what the API server showed; true when this call settled it.
    pub fn settle(&self, layout: ResourceLayout) -> bool {
        let to = if layout == ResourceLayout::Pod {
            POD_LEVEL
        } else {
            SHARES
        };
        self.0
            .compare_exchange(
                UNVERIFIED,
                to,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    }
}

impl PartialEq for LayoutChoice {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Default for InstanceSettings {
    fn default() -> Self {
        Self {
            image: crate::build::instance::DEFAULT_INSTANCE_IMAGE.to_owned(),
            batch: Duration::from_secs(5),
            min_idle: Duration::from_secs(15 * 60),
            layout: LayoutChoice::new(ResourceLayout::Pod, false),
        }
    }
}

impl Context {
    /// The cached pod `name` of `namespace`, as a `Pod` holding the fields the cache keeps.
    pub fn pod(&self, name: &str, namespace: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(namespace, name, |cached| Arc::new(cached.to_pod(name, namespace)))
    }

    /// The cached pod `name` of `namespace` when the operator made it for `owner` (its controller
    /// owner reference): the only pod of that name the controllers look at, write or delete. A
    /// pod someone else made under that name is none of theirs (creating ours then meets it).
    pub fn own_pod<K: kube::Resource>(&self, name: &str, namespace: &str, owner: &K) -> Option<Arc<Pod>> {
        self.pod(name, namespace)
            .filter(|pod| crate::build::controlled_by(&pod.metadata, owner.meta().uid.as_deref()))
    }

    /// The cached Service `name` of `namespace`: who it is and a digest of its shape.
    pub fn service(&self, name: &str, namespace: &str) -> Option<CachedService> {
        self.services.get(namespace, name, Clone::clone)
    }

    /// Waits until the caches hold a full list: decisions need complete caches (a service
    /// account missing from a half-filled cache is not missing). One task waits on the stores and
    /// signals every reconcile at once.
    pub async fn caches_filled(&self) -> crate::error::Result<()> {
        self.caches_ready
            .clone()
            .wait_for(|ready| *ready)
            .await
            .map(|_| ())
            .map_err(|_| crate::error::Error::StoreClosed)
    }

    /// Wakes the runtimes that depend on `dependency` (their instance changed).
    pub fn wake_runtimes_of(&self, dependency: &super::index::Dependency) {
        for runtime in self.index.dependents(dependency) {
            let _ = self.wake_runtimes.unbounded_send(runtime);
        }
    }

    /// Wakes every runtime of `namespace`.
    pub fn wake_namespace(&self, namespace: &str) {
        for name in self.runtimes.in_namespace(namespace, |name, _| Some(name.to_owned())) {
            let _ = self
                .wake_runtimes
                .unbounded_send(ObjectRef::new(&name).within(namespace));
        }
    }

    /// Whether the runtime `key` with `uid` is in the cache (not one made again under its name).
    pub fn runtime_is(&self, key: &ObjectRef<PromptFlowRuntime>, uid: Option<&str>) -> bool {
        let namespace = key.namespace.as_deref().unwrap_or_default();
        self.runtimes
            .get(namespace, &key.name, |cached| cached.uid() == uid)
            .unwrap_or(false)
    }

    /// The uid of the cached runtime `name` of `namespace`.
    pub fn runtime_uid(&self, name: &str, namespace: &str) -> Option<String> {
        self.runtimes
            .get(namespace, name, |cached| cached.uid().map(str::to_owned))
            .flatten()
    }

    /// The cached runtime `name` of `namespace`, read in full; one that does not parse is left
    /// out (its own reconcile reports it).
    pub fn runtime(&self, name: &str, namespace: &str) -> Option<PromptFlowRuntime> {
        self.runtimes
            .get(namespace, name, |cached| cached.full(name, namespace).ok())
            .flatten()
    }

    /// Wakes a compute instance.
    pub fn wake_instance(&self, instance: ObjectRef<ComputeInstance>) {
        let _ = self.wake_instances.unbounded_send(instance);
    }
}
