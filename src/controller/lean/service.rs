//! The Service cache's type: who a Service is and a digest of what the operator compares.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use serde::Deserialize;

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

/// A Service as the Service cache keeps it (its name and namespace are the cache's keys): its
/// uid and resourceVersion, its controller owner's uid, and the digest of what the operator
/// compares.
#[derive(Clone, Debug)]
pub struct CachedService {
    pub uid: Option<Box<str>>,
    pub resource_version: Option<Box<str>>,
    owner: Option<Box<str>>,
    pub shape: u64,
}

impl CachedService {
    /// What the cache keeps of `service`.
    pub fn of(service: &LeanService) -> Self {
        let meta = &service.metadata;
        Self {
            uid: meta.uid.as_deref().map(Into::into),
            resource_version: meta.resource_version.as_deref().map(Into::into),
            owner: super::controller_uid(meta),
            shape: service.shape,
        }
    }

    /// Whether its controller owner reference names `owner_uid`.
    pub fn controlled_by(&self, owner_uid: Option<&str>) -> bool {
        super::controlled_by(self.owner.as_deref(), owner_uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cached = CachedService::of(&lean);
        assert_eq!((cached.uid.as_deref(), cached.shape), (Some("u1"), lean.shape));
        assert!(cached.controlled_by(Some("r1")) && !cached.controlled_by(Some("u1")) && !cached.controlled_by(None));
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
}
