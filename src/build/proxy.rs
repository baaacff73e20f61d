//! The activity-proxy sidecar of a runtime pod: the operator binary's `activity-proxy`
//! subcommand (same image), in front of the runtime container. Client traffic arrives on
//! [`PROXY_PORT`] through the runtime's Service; the controller asks [`ACTIVITY_PORT`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{Placement, PodTemplate};

/// The activity proxy's port: client traffic, through the runtime's Service.
pub const PROXY_PORT: i32 = 8081;
/// The name of the activity proxy's port (the Service targets it by name).
pub const PROXY_PORT_NAME: &str = "proxy";
/// The activity proxy's report port (`GET /activity`).
pub const ACTIVITY_PORT: i32 = 8082;
/// The activity proxy's container name.
pub const PROXY_CONTAINER: &str = "activity-proxy";
/// The user id the activity proxy runs as.
const PROXY_USER: i64 = 65532;

/// What the activity proxy asks for: little, with limits on both cpu and memory so quotas that
/// track limits admit the pod.
pub fn proxy_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("10m".into())),
            ("memory".to_owned(), Quantity("16Mi".into())),
            ("ephemeral-storage".to_owned(), Quantity("16Mi".into())),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".into())),
            ("memory".to_owned(), Quantity("64Mi".into())),
            ("ephemeral-storage".to_owned(), Quantity("64Mi".into())),
        ])),
        ..Default::default()
    }
}

/// The activity proxy sidecar: the operator binary's `activity-proxy` subcommand with the
/// operator's proxy limits, always under the restricted profile with its own RuntimeDefault
/// seccomp profile (it needs nothing else, whatever the runtime container is allowed), a few MiB
/// of memory.
pub fn proxy_container(template: &PodTemplate, placement: &Placement) -> Container {
    let named = placement.suffix.is_none();
    let port = |name: &str, number: i32| ContainerPort {
        name: named.then(|| name.to_owned()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let activity_port = if named {
        IntOrString::String("activity".into())
    } else {
        IntOrString::Int(placement.activity_port)
    };
    Container {
        name: placement.name(PROXY_CONTAINER, "px"),
        image: Some(template.proxy_image.clone()),
        args: Some(
            [
                "activity-proxy".into(),
                format!("--listen=0.0.0.0:{}", placement.proxy_port),
                format!("--upstream=127.0.0.1:{}", placement.runtime_port),
                format!("--activity-listen=0.0.0.0:{}", placement.activity_port),
            ]
            .into_iter()
            .chain(template.proxy_limits.args())
            .collect(),
        ),
        ports: Some(vec![
            port(PROXY_PORT_NAME, placement.proxy_port),
            port("activity", placement.activity_port),
        ]),
        // A connect, not a request: whoever fills the activity port's few places must not make
        // the pod unready (and so flap the runtime's Running time).
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: activity_port,
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        resources: Some(proxy_resources()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_USER),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
