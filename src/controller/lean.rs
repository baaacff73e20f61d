//! What the caches keep of each object: only the fields the controllers read. Pods and Services
//! are deserialized from the watch straight into lean types holding just those fields (the full
//! objects are never built), and the operator's own caches ([`super::cache`]) keep a compact
//! value made from each; other objects are trimmed before they enter a store.
//!
//! Read by the controllers, and therefore kept:
//! - every object: name, namespace, uid, resourceVersion, labels, annotations (without
//!   `last-applied-configuration`), owner references, finalizers, deletionTimestamp, generation;
//! - pods: uid, resourceVersion, creation and deletion times, of the owner references only the
//!   controller's uid (who made the pod), only the `promptflow.dev/` labels and annotations (as
//!   one short list), the containers' images on instance pods only; each container's name and
//!   resources (a resize gives its quota usage back), whether it has pod-level resources, the
//!   phase and its message, pod IP, the `Ready` and `PodScheduled` conditions (type, status,
//!   reason, message) and container statuses (name, ready, restart count, state and last state
//!   without times or ids);
//! - Services: uid, resourceVersion, the controller owner's uid, and a digest of labels, cluster
//!   IP, selector and ports — what `matches` compares;
//! - runtimes: their uid, their metadata and spec as one compact JSON text, read back per
//!   reconcile, and their status with the strings and condition texts it has in common with
//!   other runtimes shared ([`status`]);
//! - service accounts: image pull secrets; quotas: everything but managed fields.

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

mod pod;
mod runtime;
mod service;
pub mod status;

use std::sync::Arc;

use k8s_openapi::api::core::v1::ServiceAccount;

use crate::api::annotations;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use kube::Resource;

pub use self::pod::{CachedPod, LeanPod};
pub use self::runtime::{CachedRuntime, LeanRuntime, runtime_key};
pub use self::service::{CachedService, LeanService};

/// The uid of an object's controller owner reference: who made it, all the caches keep of its
/// owners.
fn controller_uid(meta: &ObjectMeta) -> Option<Box<str>> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str().into())
}

/// Whether the controller owner uid kept, `kept`, is `owner_uid`.
fn controlled_by(kept: Option<&str>, owner_uid: Option<&str>) -> bool {
    owner_uid.is_some_and(|uid| kept == Some(uid))
}

/// An object's namespace (its one shared copy) and name: the key of a runtime in the queue, the
/// timers and the runner, and of any object in the dependency index and the memory of own writes
/// (an `ObjectRef` is four strings in 96 bytes). Clones share both strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Named(pub Arc<str>, pub Arc<str>);

impl Named {
    /// The key of `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(status::text(namespace), Arc::from(name))
    }

    /// The key of `key`'s object.
    pub fn of<K: Resource>(key: &kube::runtime::reflector::ObjectRef<K>) -> Self {
        Self::new(key.namespace.as_deref().unwrap_or_default(), &key.name)
    }

    /// The object `name` of this key's namespace, as an `ObjectRef`.
    pub fn sibling<K: Resource<DynamicType = ()>>(&self, name: &str) -> kube::runtime::reflector::ObjectRef<K> {
        kube::runtime::reflector::ObjectRef::new(name).within(&self.0)
    }

    /// This key's object, as an `ObjectRef`.
    pub fn to_ref<K: Resource<DynamicType = ()>>(&self) -> kube::runtime::reflector::ObjectRef<K> {
        self.sibling(&self.1)
    }
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

/// The annotations the controllers read on runtimes and compute instances: the actions and the
/// recorded activity. The caches keep no other label or annotation of objects users write, so
/// however large a tenant makes them, they cost the operator nothing.
const READ_ANNOTATIONS: &[&str] = &[
    annotations::CHECK_VERSION,
    annotations::UPDATE,
    annotations::START,
    annotations::STOP,
    annotations::RESTART,
    annotations::LAST_ACTIVITY,
];

/// Drops from `meta` what no controller reads of an object users write: every label, every
/// annotation but [`READ_ANNOTATIONS`], managed fields.
fn trim_user_meta(meta: &mut ObjectMeta) {
    trim_meta(meta);
    meta.labels = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| READ_ANNOTATIONS.contains(&key.as_str()));
    }
    if meta.annotations.as_ref().is_some_and(|a| a.is_empty()) {
        meta.annotations = None;
    }
}

/// A compute instance as the controllers read it: its spec, status and action annotations.
pub fn trim_user<K: Resource>(object: &mut K) {
    trim_user_meta(object.meta_mut());
}

/// A service account as the controllers read it: its image pull secrets (no labels, no
/// annotations).
pub fn trim_account(account: &mut ServiceAccount) {
    trim_user_meta(&mut account.metadata);
    account.metadata.annotations = None;
    account.secrets = None;
}

/// A resource quota as the controllers read it: its spec and status (no labels, no annotations).
pub fn trim_quota(quota: &mut k8s_openapi::api::core::v1::ResourceQuota) {
    trim_user_meta(&mut quota.metadata);
    quota.metadata.annotations = None;
}
