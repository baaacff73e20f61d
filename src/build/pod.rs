//! The runtime pod: one per serverless runtime, deterministic name, owned by the runtime.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LocalObjectReference, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::{PromptFlowRuntime, ResourceOverrides};
use crate::catalog::InstanceType;
use crate::flow::{FlowEnvironment, hex};
use crate::identity::PullIdentity;
use crate::proxy::ProxyLimits;

pub use super::parts::{INSTANCE_PORT_BASE, PartsInputs, Placement, RuntimeParts, container_security, runtime_parts};
use super::proxy::proxy_resources;
pub use super::proxy::{ACTIVITY_PORT, PROXY_CONTAINER, PROXY_PORT, PROXY_PORT_NAME};

/// The label every object the operator manages carries (`app.kubernetes.io/managed-by`).
pub const MANAGED_BY: &str = "promptflow-operator";
/// Label: the runtime a pod belongs to.
pub const RUNTIME_LABEL: &str = "promptflow.dev/runtime";
/// Annotation: digest of the whole pod template, operator-side choices included (probes,
/// security, the size's resources): a change here alone does not restart a running runtime.
pub const SPEC_HASH_ANNOTATION: &str = "promptflow.dev/spec-hash";
/// Annotation: digest of what the user decides (the runtime's compute, image, flow and identity,
/// the resolved image, pull secrets, flow content and instance type): a change replaces the pod.
pub const INPUTS_HASH_ANNOTATION: &str = "promptflow.dev/inputs-hash";
/// Annotation: the instance type the pod was sized from.
pub const INSTANCE_TYPE_ANNOTATION: &str = "promptflow.dev/instance-type";
/// The label selector of the pods the operator owns.
pub const OWNED_POD_SELECTOR: &str = "app.kubernetes.io/managed-by=promptflow-operator,app.kubernetes.io/name in (promptflow-runtime,promptflow-compute-instance)";
/// The topology key of a runtime pod's own spread constraint (see [`spread`]): a sentinel no node
/// is meant to carry.
pub const SPREAD_TOPOLOGY_KEY: &str = "promptflow.dev/no-default-spreading";
/// The port the runtime serves on (`/health`, `/score`, `/submit`).
pub const RUNTIME_PORT: i32 = 8080;

/// The operator's side of the runtime pod template: operator configuration, the same for every
/// runtime. A change here does not restart running runtimes (see [`INPUTS_HASH_ANNOTATION`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PodTemplate {
    /// How runtime pods are secured.
    pub security: PodSecurity,
    /// How long the runtime may take to answer `/health` for the first time before the kubelet
    /// restarts it (environment set-up and requirement installs take minutes on real nodes).
    pub startup_seconds: i32,
    /// The image of the activity proxy sidecar: the operator's own image.
    pub proxy_image: String,
    /// The activity proxy's timeouts and limits (its drain also sets the pod's grace period).
    pub proxy_limits: ProxyLimits,
    /// The administrator's pip settings for flow requirements, and what requirement files may say.
    pub requirements: crate::flow::RequirementsPolicy,
}

/// The proxy image when none is configured: the operator image of this version.
pub fn default_proxy_image() -> String {
    format!("promptflow-operator:{}", env!("CARGO_PKG_VERSION"))
}

/// The default startup allowance: 30 minutes.
pub const DEFAULT_STARTUP_SECONDS: i32 = 1800;

impl Default for PodTemplate {
    fn default() -> Self {
        Self {
            security: PodSecurity::default(),
            startup_seconds: DEFAULT_STARTUP_SECONDS,
            proxy_image: default_proxy_image(),
            proxy_limits: ProxyLimits::default(),
            requirements: crate::flow::RequirementsPolicy::default(),
        }
    }
}

/// How runtime pods are secured; operator configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSecurity {
    /// Run under the restricted Pod Security profile (non-root, no privilege escalation,
    /// all capabilities dropped, RuntimeDefault seccomp). Off for images that need root.
    pub restricted: bool,
    /// The user id the containers run as under the restricted profile.
    pub run_as_user: i64,
}

impl Default for PodSecurity {
    fn default() -> Self {
        Self {
            restricted: true,
            run_as_user: 1000,
        }
    }
}

/// Everything the runtime pod is built from, resolved by the reconciler.
pub struct RuntimePodInputs<'a> {
    /// The runtime.
    pub runtime: &'a PromptFlowRuntime,
    /// The image reference to run.
    pub image: &'a str,
    /// The size.
    pub size: &'a InstanceType,
    /// The pull identity.
    pub identity: &'a PullIdentity,
    /// The flow ConfigMap's name and environment, when the runtime has a flow.
    pub flow: Option<(&'a str, &'a FlowEnvironment)>,
    /// The operator's side of the template.
    pub template: &'a PodTemplate,
}

/// The runtime pod's name for a runtime.
pub fn pod_name(runtime_name: &str) -> String {
    format!("{runtime_name}{POD_SUFFIX}")
}

/// The runtime a pod of [`pod_name`] belongs to.
pub fn runtime_name(pod_name: &str) -> &str {
    pod_name.strip_suffix(POD_SUFFIX).unwrap_or(pod_name)
}

/// The suffix of a runtime pod's name.
pub const POD_SUFFIX: &str = "-runtime";

/// Builds the runtime pod, its spec hash annotation included.
pub fn runtime_pod(inputs: &RuntimePodInputs<'_>) -> Pod {
    let runtime = inputs.runtime;
    let name = runtime.name_any();
    let parts = runtime_parts(&PartsInputs {
        runtime_name: &name,
        image: inputs.image,
        resources: merged_resources(inputs.size, runtime),
        flow: inputs.flow,
        template: inputs.template,
        placement: &Placement::serverless(),
        parallel_install: false,
    });
    let spec = PodSpec {
        containers: parts.containers,
        init_containers: (!parts.init_containers.is_empty()).then_some(parts.init_containers),
        volumes: (!parts.volumes.is_empty()).then_some(parts.volumes),
        node_selector: (!inputs.size.node_selector.is_empty()).then(|| inputs.size.node_selector.clone()),
        topology_spread_constraints: Some(vec![spread(&name)]),
        ..pod_spec_base(inputs.identity, inputs.template)
    };

    let flow_hash = inputs.flow.map(|(_, flow)| flow.content_hash.as_str());
    let hash = spec_hash(&spec, flow_hash);
    let decided = inputs_digest(runtime, inputs.image, inputs.identity, flow_hash, &inputs.size.name);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name)),
            namespace: runtime.namespace(),
            labels: Some(labels(&name)),
            annotations: Some(BTreeMap::from([
                (SPEC_HASH_ANNOTATION.to_owned(), hash),
                (INPUTS_HASH_ANNOTATION.to_owned(), decided),
                (INSTANCE_TYPE_ANNOTATION.to_owned(), inputs.size.name.clone()),
            ])),
            owner_references: runtime.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// A runtime pod's own topology spread constraint, which keeps kube-scheduler's default spreading
/// off it. The default spreads the pods each Service selects over nodes and zones; a runtime's
/// Service selects its one pod, so there is nothing to spread, yet finding that out costs the
/// scheduler every Service of the namespace and every pod of the cluster for each pod it places
/// (at 10,000 runtimes, most of its time). A pod with a constraint of its own gets none of the
/// defaults; this one (`ScheduleAnyway`, over the runtime's own pods, on a key no node carries)
/// leaves every node out of the count, so it never weighs in on where the pod goes and costs the
/// scheduler a label lookup per node.
pub fn spread(runtime_name: &str) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: SPREAD_TOPOLOGY_KEY.to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(RUNTIME_LABEL.to_owned(), runtime_name.to_owned())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What every operator pod shares: the identity, the restricted profile, no API token, and time
/// for the activity proxies to drain requests in flight.
pub fn pod_spec_base(identity: &PullIdentity, template: &PodTemplate) -> PodSpec {
    let security = &template.security;
    PodSpec {
        termination_grace_period_seconds: Some(template.proxy_limits.termination_grace_seconds()),
        service_account_name: Some(identity.service_account.clone()),
        image_pull_secrets: Some(
            identity
                .pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect(),
        ),
        // Runtimes serve flows; they never talk to the Kubernetes API.
        automount_service_account_token: Some(false),
        restart_policy: Some("Always".into()),
        security_context: security.restricted.then(|| PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(security.run_as_user),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The labels of a runtime's pod.
pub fn labels(runtime_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "promptflow-runtime".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), runtime_name.to_owned()),
        ("app.kubernetes.io/component".to_owned(), "runtime".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
        (RUNTIME_LABEL.to_owned(), runtime_name.to_owned()),
    ])
}

/// The size's requests and limits, with the runtime's `resources` override on top, key by key.
pub fn merged_resources(size: &InstanceType, runtime: &PromptFlowRuntime) -> ResourceRequirements {
    let custom = runtime
        .spec
        .compute
        .serverless
        .as_ref()
        .and_then(|s| s.resources.as_ref());
    with_overrides(size.resources(), custom)
}

/// `resources` with `custom` on top, resource by resource.
pub fn with_overrides(mut resources: ResourceRequirements, custom: Option<&ResourceOverrides>) -> ResourceRequirements {
    let Some(custom) = custom else {
        return resources;
    };
    for (target, source) in [
        (&mut resources.requests, &custom.requests),
        (&mut resources.limits, &custom.limits),
    ] {
        if let Some(source) = source {
            target.get_or_insert_with(BTreeMap::new).extend(source.clone());
        }
    }
    resources
}

/// The resources of every container of a runtime pod of `size` (the runtime's, then the
/// proxy's): what quotas count.
pub fn pod_resources(size: &InstanceType, runtime: &PromptFlowRuntime) -> Vec<ResourceRequirements> {
    vec![merged_resources(size, runtime), proxy_resources()]
}

/// A stable digest of the pod spec and the flow content: equal inputs give equal hashes across
/// operator restarts and versions of this crate's dependencies.
pub fn spec_hash(spec: &PodSpec, flow_hash: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(spec).expect("a PodSpec serializes"));
    if let Some(flow_hash) = flow_hash {
        hasher.update(flow_hash.as_bytes());
    }
    hex(&hasher.finalize()[..8])
}

/// A stable digest of what the user decides about a runtime's containers; the operator's template
/// is left out.
pub fn inputs_digest(
    runtime: &PromptFlowRuntime,
    image: &str,
    identity: &PullIdentity,
    flow_hash: Option<&str>,
    instance_type: &str,
) -> String {
    let spec = &runtime.spec;
    let decided = serde_json::json!({
        "compute": spec.compute,
        "image": spec.image,
        "flow": spec.flow,
        "identity": spec.identity,
        "resolvedImage": image,
        "serviceAccount": identity.service_account,
        "pullSecrets": identity.pull_secrets,
        "flowContent": flow_hash,
        "instanceType": instance_type,
    });
    digest(decided.to_string().as_bytes())
}

/// The first 16 hex digits of a SHA-256.
pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes)[..8])
}

/// The inputs hash a live pod was built with (absent on pods made before it existed).
pub fn live_inputs_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(INPUTS_HASH_ANNOTATION)
        .map(String::as_str)
}

/// The spec hash a live pod was built with.
pub fn live_spec_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::EnvVar;

    use super::super::parts::PACKAGES_MOUNT;
    use super::*;
    use crate::catalog::Catalog;

    fn runtime(yaml: &str) -> PromptFlowRuntime {
        let mut runtime: PromptFlowRuntime = serde_norway::from_str(yaml).unwrap();
        runtime.metadata.uid = Some("uid-1".into());
        runtime
    }

    const MINIMAL: &str = "apiVersion: promptflow.dev/v1alpha1\nkind: PromptFlowRuntime\nmetadata: {name: chat, namespace: team-a}\nspec: {}\n";

    fn identity() -> PullIdentity {
        PullIdentity {
            service_account: "default".into(),
            pull_secrets: vec!["regcred".into()],
            has_registry_credentials: true,
        }
    }

    fn build(runtime: &PromptFlowRuntime, flow: Option<(&str, &FlowEnvironment)>, security: &PodSecurity) -> Pod {
        let catalog = Catalog::builtin();
        runtime_pod(&RuntimePodInputs {
            runtime,
            image: "registry.example/runtime:20240222.v4",
            size: catalog.get("Standard_D2s_v3").unwrap(),
            identity: &identity(),
            flow,
            template: &PodTemplate {
                security: security.clone(),
                ..PodTemplate::default()
            },
        })
    }

    #[test]
    fn pod_has_name_owner_labels_probes_and_identity() {
        let rt = runtime(MINIMAL);
        let pod = build(&rt, None, &PodSecurity::default());
        assert_eq!(pod.metadata.name.as_deref(), Some("chat-runtime"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("PromptFlowRuntime", Some(true))
        );
        assert_eq!(pod.metadata.labels.as_ref().unwrap()[RUNTIME_LABEL], "chat");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("default"));
        assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        let container = &spec.containers[0];
        assert_eq!(container.ports.as_ref().unwrap()[0].container_port, 8080);
        let readiness = container.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/health"));
        let startup = container.startup_probe.as_ref().unwrap();
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            DEFAULT_STARTUP_SECONDS,
            "the startup probe allows the configured time"
        );
        assert_eq!(container.liveness_probe.as_ref().unwrap().initial_delay_seconds, None);
        let proxy = &spec.containers[1];
        assert_eq!(proxy.name, PROXY_CONTAINER);
        assert_eq!(proxy.args.as_ref().unwrap()[0], "activity-proxy");
        let ports: Vec<_> = proxy.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [8081, 8082]);
        let proxy_security = proxy.security_context.as_ref().unwrap();
        assert_eq!(
            (proxy_security.run_as_non_root, proxy_security.read_only_root_filesystem),
            (Some(true), Some(true))
        );
        assert_eq!(
            container.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0,
            "2"
        );
        assert!(spec.init_containers.is_none());
        // A spread of its own (on a key no node carries), so kube-scheduler's default spreading of
        // Service-selected pods is not applied.
        let spread = &spec.topology_spread_constraints.as_ref().unwrap()[..];
        assert_eq!(spread.len(), 1);
        assert_eq!(
            (spread[0].topology_key.as_str(), spread[0].when_unsatisfiable.as_str()),
            (SPREAD_TOPOLOGY_KEY, "ScheduleAnyway")
        );
        let selects = spread[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert!(
            selects
                .iter()
                .all(|(k, v)| pod.metadata.labels.as_ref().unwrap().get(k) == Some(v)),
            "the spread counts the runtime's own pod: {selects:?}"
        );
    }

    #[test]
    fn restricted_profile_is_applied_and_can_be_turned_off() {
        let rt = runtime(MINIMAL);
        let pod = build(&rt, None, &PodSecurity::default());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let container = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert_eq!(
            container.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        let open = build(
            &rt,
            None,
            &PodSecurity {
                restricted: false,
                run_as_user: 0,
            },
        )
        .spec
        .unwrap();
        assert!(open.security_context.is_none() && open.containers[0].security_context.is_none());
    }

    #[test]
    fn requirements_add_an_init_container_on_the_shared_volume() {
        let rt = runtime(MINIMAL);
        let flow = FlowEnvironment {
            image: None,
            requirements_file: Some("requirements.txt".into()),
            content_hash: "abc".into(),
        };
        let pod = build(&rt, Some(("chat-flow", &flow)), &PodSecurity::default());
        let spec = pod.spec.unwrap();
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert!(
            init.command
                .as_ref()
                .unwrap()
                .contains(&"/flow/requirements.txt".to_owned())
        );
        assert!(init.command.as_ref().unwrap().contains(&"--user".to_owned()));
        let user_base = |env: &Option<Vec<EnvVar>>| {
            env.iter()
                .flatten()
                .any(|e| e.name == "PYTHONUSERBASE" && e.value.as_deref() == Some(PACKAGES_MOUNT))
        };
        assert!(user_base(&init.env) && user_base(&spec.containers[0].env));
        let env = spec.containers[0].env.as_ref().unwrap();
        assert!(
            env.iter().all(|e| e.name != "PYTHONPATH"),
            "the image's own PYTHONPATH must stay: {env:?}"
        );
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0].config_map.as_ref().unwrap().name,
            "chat-flow"
        );
    }

    #[test]
    fn the_hash_is_stable_and_changes_with_inputs() {
        let rt = runtime(MINIMAL);
        let a = build(&rt, None, &PodSecurity::default());
        let b = build(&rt, None, &PodSecurity::default());
        assert_eq!(live_spec_hash(&a), live_spec_hash(&b));
        let flow1 = FlowEnvironment {
            content_hash: "1".into(),
            ..Default::default()
        };
        let flow2 = FlowEnvironment {
            content_hash: "2".into(),
            ..Default::default()
        };
        let c = build(&rt, Some(("f", &flow1)), &PodSecurity::default());
        let d = build(&rt, Some(("f", &flow2)), &PodSecurity::default());
        assert_ne!(live_spec_hash(&c), live_spec_hash(&d));
        assert_ne!(live_spec_hash(&a), live_spec_hash(&c));
        assert_ne!(live_inputs_hash(&c), live_inputs_hash(&d), "flow content is the user's");
    }

    #[test]
    fn operator_side_changes_move_the_spec_hash_but_not_the_inputs_hash() {
        let rt = runtime(MINIMAL);
        let a = build(&rt, None, &PodSecurity::default());
        let b = build(
            &rt,
            None,
            &PodSecurity {
                restricted: true,
                run_as_user: 2000,
            },
        );
        assert_ne!(live_spec_hash(&a), live_spec_hash(&b));
        assert_eq!(live_inputs_hash(&a), live_inputs_hash(&b));
        let other = runtime(
            "apiVersion: promptflow.dev/v1alpha1\nkind: PromptFlowRuntime\nmetadata: {name: chat, namespace: team-a}\nspec: {image: {version: '20240101.v1'}}\n",
        );
        assert_ne!(
            live_inputs_hash(&a),
            live_inputs_hash(&build(&other, None, &PodSecurity::default()))
        );
    }

    #[test]
    fn resources_override_merges_over_the_size() {
        let rt = runtime(
            "apiVersion: promptflow.dev/v1alpha1\nkind: PromptFlowRuntime\nmetadata: {name: chat, namespace: a}\nspec:\n  compute:\n    serverless:\n      resources: {limits: {memory: 4Gi}}\n",
        );
        let pod = build(&rt, None, &PodSecurity::default());
        let resources = pod.spec.unwrap().containers[0].resources.clone().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "4Gi");
        assert_eq!(resources.limits.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "8Gi");
    }
}
