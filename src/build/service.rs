//! The runtime's Service: the way in for clients. Named after the runtime, owned by it, headless,
//! selecting its pod, port 8081 onto the activity proxy, so every request counts as activity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::instance::INSTANCE_LABEL;
use super::pod::{PROXY_PORT, PROXY_PORT_NAME, RUNTIME_LABEL, labels};
use crate::api::PromptFlowRuntime;

/// The label selector of the Services the operator owns.
pub const OWNED_SERVICE_SELECTOR: &str =
    "app.kubernetes.io/managed-by=promptflow-operator,app.kubernetes.io/name=promptflow-runtime";

/// What a runtime's Service selects: its own pod, or the compute instance pod it runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target<'a> {
    /// The serverless runtime's own pod, on the proxy's named port.
    Serverless,
    /// The pod of compute instance `instance`, on the runtime's proxy port there.
    Instance {
        /// The instance's name.
        instance: &'a str,
        /// The runtime's proxy port in the instance pod.
        port: i32,
    },
}

impl Target<'_> {
    /// The port clients connect to (a headless Service does not translate ports).
    pub fn port(&self) -> i32 {
        match self {
            Target::Serverless => PROXY_PORT,
            Target::Instance { port, .. } => *port,
        }
    }
}

/// The Service of a runtime.
pub fn runtime_service(runtime: &PromptFlowRuntime, target: Target<'_>) -> Service {
    let name = runtime.name_any();
    let (selector, target_port) = match target {
        Target::Serverless => (
            BTreeMap::from([
                (RUNTIME_LABEL.to_owned(), name.clone()),
                ("app.kubernetes.io/component".to_owned(), "runtime".to_owned()),
            ]),
            IntOrString::String(PROXY_PORT_NAME.into()),
        ),
        Target::Instance { instance, port } => (
            BTreeMap::from([(INSTANCE_LABEL.to_owned(), instance.to_owned())]),
            IntOrString::Int(port),
        ),
    };
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: runtime.namespace(),
            labels: Some(labels(&name)),
            owner_references: runtime.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            // Set, so that the operator owns it: a Service switched to `ExternalName` by someone
            // else is switched back (DNS would send the runtime's clients elsewhere).
            type_: Some("ClusterIP".into()),
            // Empty, and so owned by the operator too: another manager's external name or IPs
            // (left beside the operator's fields by a server-side apply, and refused with them by
            // the chart's admission policy) are cleared by the repair.
            external_name: Some(String::new()),
            external_ips: Some(Vec::new()),
            // Headless: DNS answers the pod IP, so no cluster IP is allocated and kube-proxy
            // programs nothing per runtime (thousands of runtimes would exhaust a service range).
            cluster_ip: Some("None".into()),
            // On a compute instance the pod is Ready only when every runtime is: each runtime's
            // address follows its own containers (its proxy answers 502 while its runtime is
            // down), so one broken runtime does not take its neighbours' DNS away.
            publish_not_ready_addresses: Some(matches!(target, Target::Instance { .. })),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: target.port(),
                target_port: Some(target_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The in-cluster URL clients use.
pub fn url(runtime: &PromptFlowRuntime, target: Target<'_>) -> String {
    format!(
        "http://{}.{}.svc:{}",
        runtime.name_any(),
        runtime.namespace().unwrap_or_default(),
        target.port()
    )
}

/// The labels the operator puts on a runtime's Service ([`labels`]); others' labels are theirs.
pub const OWN_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    RUNTIME_LABEL,
];

/// The name of the operator's port on a runtime's Service; others' ports are theirs.
pub const PORT_NAME: &str = "http";

/// Whether a live Service is as the operator wants it is whether their shapes are equal: a
/// one-way digest of what the operator writes in a Service and owns: its own labels, type,
/// cluster IP, `publishNotReadyAddresses`, whether it has an external name or IPs (it owns
/// them, empty), selector and its port (name, port, target port). Not
/// what the API server fills in (node ports, defaults), nor what others add beside the
/// operator's (labels, ports), which a server-side apply leaves in place: comparing those would
/// write the Service again at every look. The Service cache keeps this instead of the fields
/// (stable within one process, which is all it is compared in).
pub fn shape(service: &Service) -> u64 {
    let spec = service.spec.as_ref();
    shape_of(
        service.metadata.labels.as_ref(),
        spec.and_then(|s| s.type_.as_deref()),
        spec.and_then(|s| s.cluster_ip.as_deref()),
        spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or_default(),
        spec.is_some_and(|s| {
            s.external_name.as_deref().is_some_and(|n| !n.is_empty())
                || s.external_ips.as_ref().is_some_and(|ips| !ips.is_empty())
        }),
        spec.and_then(|s| s.selector.as_ref()),
        spec.and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.target_port.as_ref())),
    )
}

/// [`shape`] from the fields themselves (the lean Service cache reads them straight from JSON).
/// A missing type is `ClusterIP`, the API server's default; `external`: an external name or IPs.
pub fn shape_of<'a>(
    labels: Option<&BTreeMap<String, String>>,
    type_: Option<&str>,
    cluster_ip: Option<&str>,
    publish_not_ready_addresses: bool,
    external: bool,
    selector: Option<&BTreeMap<String, String>>,
    ports: impl Iterator<Item = (Option<&'a str>, i32, Option<&'a IntOrString>)>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    for key in OWN_LABELS {
        labels.and_then(|labels| labels.get(key)).hash(&mut hasher);
    }
    type_.unwrap_or("ClusterIP").hash(&mut hasher);
    cluster_ip.hash(&mut hasher);
    publish_not_ready_addresses.hash(&mut hasher);
    external.hash(&mut hasher);
    selector.hash(&mut hasher);
    for (name, port, target) in ports.filter(|(name, _, _)| *name == Some(PORT_NAME)) {
        (name, port).hash(&mut hasher);
        match target {
            None => 0u8.hash(&mut hasher),
            Some(IntOrString::Int(number)) => (1u8, number).hash(&mut hasher),
            Some(IntOrString::String(name)) => (2u8, name).hash(&mut hasher),
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_labels_are_the_labels_the_operator_writes() {
        let written: Vec<String> = labels("chat").into_keys().collect();
        let mut own: Vec<String> = OWN_LABELS.iter().map(|k| (*k).to_owned()).collect();
        own.sort();
        assert_eq!(written, own);
    }

    #[test]
    fn the_service_selects_the_runtime_pod_on_the_proxy_port() {
        let mut runtime = PromptFlowRuntime::new("chat", Default::default());
        runtime.metadata.namespace = Some("team-a".into());
        runtime.metadata.uid = Some("uid-1".into());
        let service = runtime_service(&runtime, Target::Serverless);
        assert_eq!(service.metadata.name.as_deref(), Some("chat"));
        assert_eq!(service.metadata.owner_references.as_ref().unwrap()[0].name, "chat");
        let spec = service.spec.as_ref().unwrap();
        assert_eq!(spec.selector.as_ref().unwrap()[RUNTIME_LABEL], "chat");
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (8081, Some(IntOrString::String("proxy".into())))
        );
        assert_eq!(url(&runtime, Target::Serverless), "http://chat.team-a.svc:8081");
        let on_instance = runtime_service(
            &runtime,
            Target::Instance {
                instance: "ci",
                port: 8111,
            },
        );
        let spec = on_instance.spec.as_ref().unwrap();
        assert_eq!(spec.selector.as_ref().unwrap()[INSTANCE_LABEL], "ci");
        assert_eq!(
            spec.ports.as_ref().unwrap()[0].target_port,
            Some(IntOrString::Int(8111))
        );
        let mut live = service.clone();
        live.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        live.spec.as_mut().unwrap().session_affinity = Some("None".into());
        assert_eq!(
            shape(&live),
            shape(&service),
            "fields the API server fills in do not count"
        );
        assert_eq!(
            service.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("None"),
            "headless"
        );
        live.spec.as_mut().unwrap().selector = None;
        assert_ne!(shape(&live), shape(&service));
    }
}
