//! The runtime cache's type: the uid, the metadata and spec as compact JSON, the status shared.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use serde::{Deserialize, Serialize};

use super::{status, trim_user_meta};
use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, PromptFlowRuntimeSpec};

/// A runtime as its watch delivers it: the identity the watch needs (name, namespace, uid,
/// resourceVersion) and what the cache keeps ([`CachedRuntime`]). It lives only while its watch
/// event is handled. The spec is checked to parse when the watch delivers it, as it was before.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "PromptFlowRuntime")]
pub struct LeanRuntime {
    pub metadata: ObjectMeta,
    cached: CachedRuntime,
}

/// A runtime as the runtime cache keeps it (its name and namespace are the cache's keys): its
/// uid, its metadata (trimmed) and spec as one compact JSON text, read back per reconcile
/// ([`CachedRuntime::full`]), and its status with the texts it shares with other runtimes'
/// shared ([`status::LeanStatus`]). A kube `Store` kept each runtime under a key of four strings
/// and with a k8s-openapi `ObjectMeta` (about 350 bytes before any field is set); a typed
/// `PromptFlowRuntime` was about 1 KiB more, and a `Running` one's six conditions took 45
/// allocations more.
#[derive(Clone, Debug)]
pub struct CachedRuntime {
    uid: Option<Box<str>>,
    /// `{"metadata": …, "spec": …}`, the metadata without name, namespace and uid.
    body: Box<str>,
    /// The compute instance the spec asks for, if any.
    instance: Option<Box<str>>,
    status: Option<Box<status::LeanStatus>>,
}

#[derive(Serialize)]
struct BodyRef<'a> {
    metadata: &'a ObjectMeta,
    spec: &'a PromptFlowRuntimeSpec,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: PromptFlowRuntimeSpec,
}

impl TryFrom<PromptFlowRuntime> for LeanRuntime {
    type Error = serde_json::Error;

    fn try_from(mut runtime: PromptFlowRuntime) -> Result<Self, Self::Error> {
        trim_user_meta(&mut runtime.metadata);
        let identity = ObjectMeta {
            name: runtime.metadata.name.take(),
            namespace: runtime.metadata.namespace.take(),
            uid: runtime.metadata.uid.take(),
            resource_version: runtime.metadata.resource_version.clone(),
            ..Default::default()
        };
        let body = serde_json::to_string(&BodyRef {
            metadata: &runtime.metadata,
            spec: &runtime.spec,
        })?;
        Ok(Self {
            cached: CachedRuntime {
                uid: identity.uid.as_deref().map(Into::into),
                body: body.into(),
                instance: runtime.spec.compute.instance.map(|i| i.name.into()),
                status: runtime.status.as_ref().map(|s| Box::new(s.into())),
            },
            metadata: identity,
        })
    }
}

impl LeanRuntime {
    /// What the cache keeps of it.
    pub fn cached(&self) -> &CachedRuntime {
        &self.cached
    }
}

impl CachedRuntime {
    /// What the cache keeps of `runtime`.
    pub fn of(runtime: &LeanRuntime) -> Self {
        runtime.cached.clone()
    }

    /// The runtime `name` of `namespace` as a `PromptFlowRuntime` (built per read).
    pub fn full(&self, name: &str, namespace: &str) -> crate::error::Result<PromptFlowRuntime> {
        let body: Body = serde_json::from_str(&self.body).map_err(|e| crate::error::Error::Unreadable {
            kind: "PromptFlowRuntime",
            name: format!("{namespace}/{name}"),
            why: format!("{:?} at column {}", e.classify(), e.column()),
        })?;
        let mut metadata = body.metadata;
        metadata.name = Some(name.to_owned());
        metadata.namespace = Some(namespace.to_owned());
        metadata.uid = self.uid.as_deref().map(str::to_owned);
        Ok(PromptFlowRuntime {
            metadata,
            spec: body.spec,
            status: self.status.as_deref().map(status::LeanStatus::full),
        })
    }

    /// Its uid.
    pub fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lean_runtime_reads_back_as_the_runtime_it_was() {
        let json = serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "chat", "namespace": "a", "uid": "u1", "resourceVersion": "9", "generation": 2,
                         "finalizers": ["promptflow.dev/instance"], "annotations": {"promptflow.dev/update": "1",
                         "kubectl.kubernetes.io/last-applied-configuration": "{}", "example.com/notes": "a tenant's text"},
                         "labels": {"team": "a"},
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
        assert_eq!(
            (lean.metadata.name.as_deref(), lean.metadata.resource_version.as_deref()),
            (Some("chat"), Some("9")),
            "what the watch needs"
        );
        let lean = CachedRuntime::of(&lean);
        assert_eq!(lean.uid(), Some("u1"));
        let full = lean.full("chat", "a").unwrap();
        assert_eq!(
            (
                full.metadata.name.as_deref(),
                full.metadata.namespace.as_deref(),
                full.metadata.uid.as_deref()
            ),
            (Some("chat"), Some("a"), Some("u1"))
        );
        assert_eq!(full.metadata.resource_version.as_deref(), Some("9"));
        assert_eq!(full.spec, typed.spec);
        assert_eq!(full.status, typed.status);
        assert_eq!(
            full.metadata.annotations.unwrap().keys().collect::<Vec<_>>(),
            ["promptflow.dev/update"],
            "only the annotations the controllers read"
        );
        assert_eq!(full.metadata.labels, None);
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
        let stopped = stopped.cached();
        assert_eq!(stopped.phase(), "Stopped");
        assert_eq!(stopped.instances().count(), 0, "Serverless is not an instance");
        let fresh: LeanRuntime = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "f", "namespace": "a"}, "spec": {"image": {"repository": "r/x"}}
        }))
        .unwrap();
        let fresh = fresh.cached();
        assert_eq!(
            (fresh.phase(), fresh.full("f", "a").unwrap().status),
            ("Not available", None)
        );
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
