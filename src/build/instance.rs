//! The compute instance pod: one per running ComputeInstance, deterministic name, owned by the
//! instance. Its primary container holds the machine's size; every attached runtime adds its
//! containers (runtime and activity proxy, as serverless runtimes have) on ports of its own slot.
//! A pod's containers cannot change, which is why attaching or detaching restarts the instance.
//!
//! The instance's size belongs to the pod, not to each container: with pod-level resources
//! ([`ResourceLayout::Pod`], Kubernetes 1.34+) the pod holds the size's cpu and memory and its
//! containers share them, as processes share a VM; where the API server lacks that field
//! ([`ResourceLayout::Containers`]) the size is split into equal shares, one per main container.
//! Either way the pod claims the size once (plus each runtime's small proxy), never per runtime.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PersistentVolumeClaimVolumeSource, Pod, PodSpec, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

pub use super::layout::ResourceLayout;
use super::layout::laid_out;
use super::pod::{
    INPUTS_HASH_ANNOTATION, INSTANCE_TYPE_ANNOTATION, MANAGED_BY, PartsInputs, Placement, PodTemplate,
    SPEC_HASH_ANNOTATION, container_security, digest, inputs_digest, pod_spec_base, runtime_parts, spec_hash,
    with_overrides,
};
pub use super::slots::{assign_slots, attached, attached_to, placement_in, recreated, slot_of_url, slots_in, slots_of};
use crate::api::{ComputeInstance, PromptFlowRuntime};
use crate::catalog::InstanceType;
use crate::flow::FlowEnvironment;
use crate::identity::PullIdentity;

/// Label: the compute instance a pod belongs to (and the selector of its runtimes' Services).
pub const INSTANCE_LABEL: &str = "promptflow.dev/compute-instance";
/// Annotation: the attached runtimes by slot (comma-separated; a free slot is empty: `zeta,,beta`).
pub const RUNTIMES_ANNOTATION: &str = "promptflow.dev/runtimes";
/// The primary container's name.
pub const INSTANCE_CONTAINER: &str = "instance";
/// Annotation: the uid of the runtime in each slot, as [`RUNTIMES_ANNOTATION`] lists them.
pub const RUNTIME_UIDS_ANNOTATION: &str = "promptflow.dev/runtime-uids";
/// Annotation: how the pod's size is laid out (`Pod` or `Containers`).
pub const LAYOUT_ANNOTATION: &str = "promptflow.dev/resource-layout";
/// The image of the primary container unless the operator is told otherwise.
pub const DEFAULT_INSTANCE_IMAGE: &str = "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable:latest";

/// The instance pod's name for an instance.
pub fn pod_name(instance_name: &str) -> String {
    format!("{instance_name}{POD_SUFFIX}")
}

/// The instance a pod of [`pod_name`] belongs to.
pub fn instance_name(pod_name: &str) -> &str {
    pod_name.strip_suffix(POD_SUFFIX).unwrap_or(pod_name)
}

const POD_SUFFIX: &str = "-instance";

/// The labels of an instance's pod.
pub fn labels(instance_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "promptflow-compute-instance".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), instance_name.to_owned()),
        ("app.kubernetes.io/component".to_owned(), "compute-instance".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
        (INSTANCE_LABEL.to_owned(), instance_name.to_owned()),
    ])
}

/// One runtime to run on the instance, resolved as a serverless runtime's pod would be.
pub struct AttachedRuntime<'a> {
    /// The runtime.
    pub runtime: &'a PromptFlowRuntime,
    /// The image reference to run.
    pub image: String,
    /// The runtime's own pull identity (its pull secrets join the pod's).
    pub identity: PullIdentity,
    /// The flow ConfigMap's name and environment.
    pub flow: Option<(String, FlowEnvironment)>,
    /// Its slot: ports and container names follow from it (see [`assign_slots`]).
    pub slot: usize,
}

/// The layout a pod was built with, from its annotation.
pub fn layout_of(pod: &Pod) -> Option<ResourceLayout> {
    match pod.annotations().get(LAYOUT_ANNOTATION).map(String::as_str) {
        Some("Pod") => Some(ResourceLayout::Pod),
        Some("Containers") => Some(ResourceLayout::Containers),
        _ => None,
    }
}

/// Everything the instance pod is built from.
pub struct InstancePodInputs<'a> {
    /// The instance.
    pub instance: &'a ComputeInstance,
    /// Its size.
    pub size: &'a InstanceType,
    /// Its pull identity (`spec.serviceAccountName`).
    pub identity: &'a PullIdentity,
    /// The primary container's image.
    pub image: &'a str,
    /// The runtimes to run, sorted by name: the order gives the slots.
    pub runtimes: &'a [AttachedRuntime<'a>],
    /// The operator's side of the template.
    pub template: &'a PodTemplate,
    /// How the size is laid over the pod.
    pub layout: ResourceLayout,
    /// The instance's disk (`spec.storage`): its PersistentVolumeClaim's name.
    pub home_claim: Option<&'a str>,
}

/// The instance's disk's claim name for an instance.
pub fn home_claim_name(instance_name: &str) -> String {
    format!("{instance_name}-home")
}

/// The pod volume of the instance's disk.
const HOME_VOLUME: &str = "home";

/// Mounts the instance's disk into `container` at [`crate::api::HOME_MOUNT`].
fn mount_home(container: &mut Container) {
    container.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
        name: HOME_VOLUME.into(),
        mount_path: crate::api::HOME_MOUNT.into(),
        ..Default::default()
    });
}

/// Builds the instance pod, hashes included.
pub fn instance_pod(inputs: &InstancePodInputs<'_>) -> Pod {
    let instance = inputs.instance;
    let name = instance.name_any();
    let resources = with_overrides(inputs.size.resources(), instance.spec.resources.as_ref());
    let (instance_resources, runtime_resources, pod_resources) =
        laid_out(&resources, inputs.runtimes.len(), inputs.layout);
    let mut containers = vec![Container {
        name: INSTANCE_CONTAINER.into(),
        image: Some(inputs.image.to_owned()),
        command: Some(vec!["sleep".into(), "infinity".into()]),
        resources: Some(instance_resources),
        security_context: container_security(&inputs.template.security),
        ..Default::default()
    }];
    let mut init_containers = vec![];
    let mut volumes = vec![];
    let mut pull_secrets = inputs.identity.pull_secrets.clone();
    let mut runtime_digests = vec![];
    for (position, attached) in inputs.runtimes.iter().enumerate() {
        let slot = attached.slot;
        let runtime_name = attached.runtime.name_any();
        let flow = attached.flow.as_ref().map(|(cm, env)| (cm.as_str(), env));
        let parts = runtime_parts(&PartsInputs {
            runtime_name: &runtime_name,
            image: &attached.image,
            resources: runtime_resources.clone(),
            flow,
            template: inputs.template,
            placement: &Placement::on_instance(&runtime_name, slot),
            parallel_install: inputs.layout == ResourceLayout::Pod,
        });
        containers.extend(parts.containers);
        init_containers.extend(parts.init_containers);
        volumes.extend(parts.volumes);
        for secret in &attached.identity.pull_secrets {
            if !pull_secrets.contains(secret) {
                pull_secrets.push(secret.clone());
            }
        }
        let flow_hash = flow.map(|(_, env)| env.content_hash.as_str());
        runtime_digests.push(serde_json::json!({
            "name": runtime_name,
            // Only a slot that is not the runtime's place in name order (as before slots were
            // kept): pods made before keep their hash, so an operator upgrade restarts nothing.
            "slot": (slot != position).then_some(slot),
            "inputs": inputs_digest(attached.runtime, &attached.image, &attached.identity, flow_hash, &inputs.size.name),
            "flowContent": flow_hash,
        }));
    }
    let identity = PullIdentity {
        pull_secrets,
        ..inputs.identity.clone()
    };
    if let Some(claim) = inputs.home_claim {
        // The instance container and every runtime container (not the proxies) see the disk.
        for container in containers.iter_mut().filter(|c| !c.name.starts_with("px-")) {
            mount_home(container);
        }
        volumes.push(Volume {
            name: HOME_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut spec = PodSpec {
        containers,
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        volumes: (!volumes.is_empty()).then_some(volumes),
        node_selector: (!inputs.size.node_selector.is_empty()).then(|| inputs.size.node_selector.clone()),
        resources: pod_resources,
        ..pod_spec_base(&identity, inputs.template)
    };
    if let (Some(_), Some(security)) = (inputs.home_claim, spec.security_context.as_mut()) {
        // The disk belongs to the user the containers run as.
        security.fs_group = security.run_as_user;
    }
    let slots = inputs.runtimes.iter().map(|a| a.slot + 1).max().unwrap_or(0);
    let (mut attached, mut uids) = (vec![String::new(); slots], vec![String::new(); slots]);
    for runtime in inputs.runtimes {
        attached[runtime.slot] = runtime.runtime.name_any();
        uids[runtime.slot] = runtime.runtime.uid().unwrap_or_default();
    }
    let mut decided = serde_json::json!({
        "instanceType": inputs.size.name,
        "resources": instance.spec.resources,
        "serviceAccount": identity.service_account,
        "pullSecrets": identity.pull_secrets,
        "image": inputs.image,
        "runtimes": runtime_digests,
    });
    if let Some(claim) = inputs.home_claim {
        decided["home"] = serde_json::json!(claim);
    }
    if inputs.layout == ResourceLayout::Containers {
        // Pods made before layouts (and pod-level pods) keep their hash: an upgrade restarts no
        // instance; a pod-level pod on a cluster found to drop the field is remade in shares.
        decided["layout"] = serde_json::json!(inputs.layout.as_str());
    }
    let runtime_hashes = decided["runtimes"].to_string();
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name)),
            namespace: instance.namespace(),
            labels: Some(labels(&name)),
            annotations: Some(BTreeMap::from([
                (SPEC_HASH_ANNOTATION.to_owned(), spec_hash(&spec, Some(&runtime_hashes))),
                (
                    INPUTS_HASH_ANNOTATION.to_owned(),
                    digest(decided.to_string().as_bytes()),
                ),
                (INSTANCE_TYPE_ANNOTATION.to_owned(), inputs.size.name.clone()),
                (RUNTIMES_ANNOTATION.to_owned(), attached.join(",")),
                (LAYOUT_ANNOTATION.to_owned(), inputs.layout.as_str().to_owned()),
                (RUNTIME_UIDS_ANNOTATION.to_owned(), uids.join(",")),
            ])),
            owner_references: instance.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn instance() -> ComputeInstance {
        let mut instance: ComputeInstance = serde_norway::from_str(
            "apiVersion: promptflow.dev/v1alpha1\nkind: ComputeInstance\nmetadata: {name: ci, namespace: team-a, uid: u1}\nspec: {instanceType: Standard_DS3_v2}\n",
        )
        .unwrap();
        instance.metadata.uid = Some("u1".into());
        instance
    }

    fn runtime(name: &str) -> PromptFlowRuntime {
        let mut runtime = crate::fixtures::runtime(
            serde_json::json!({"compute": {"instance": {"name": "ci", "acknowledgeRestart": true}}}),
            serde_json::json!({}),
        );
        runtime.metadata.name = Some(name.into());
        runtime
    }

    fn identity(secrets: &[&str]) -> PullIdentity {
        PullIdentity {
            service_account: "default".into(),
            pull_secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
            has_registry_credentials: !secrets.is_empty(),
        }
    }

    /// A runtime in `slot`, without a flow.
    fn at_slot<'a>(runtime: &'a PromptFlowRuntime, image: &str, secrets: &[&str], slot: usize) -> AttachedRuntime<'a> {
        AttachedRuntime {
            runtime,
            image: image.into(),
            identity: identity(secrets),
            flow: None,
            slot,
        }
    }

    fn build(runtimes: &[AttachedRuntime<'_>]) -> Pod {
        build_in(runtimes, ResourceLayout::Pod)
    }

    fn build_in(runtimes: &[AttachedRuntime<'_>], layout: ResourceLayout) -> Pod {
        let catalog = Catalog::builtin();
        let instance = instance();
        instance_pod(&InstancePodInputs {
            instance: &instance,
            size: catalog.get("Standard_DS3_v2").unwrap(),
            identity: &identity(&["shared"]),
            image: DEFAULT_INSTANCE_IMAGE,
            runtimes,
            template: &PodTemplate::default(),
            layout,
            home_claim: None,
        })
    }

    #[test]
    fn each_runtime_gets_its_containers_on_its_own_ports() {
        let (a, b) = (runtime("a"), runtime("b"));
        let runtimes = [
            at_slot(&a, "r.example/rt:1", &["shared", "team"], 0),
            at_slot(&b, "r.example/rt:2", &[], 1),
        ];
        let pod = build(&runtimes);
        assert_eq!(pod.metadata.name.as_deref(), Some("ci-instance"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].kind,
            "ComputeInstance"
        );
        let spec = pod.spec.as_ref().unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["instance", "rt-a", "px-a", "rt-b", "px-b"]);
        let ports: Vec<i32> = spec.containers[1..]
            .iter()
            .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
            .collect();
        assert_eq!(ports, [8100, 8101, 8102, 8110, 8111, 8112], "no port is used twice");
        assert!(
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .all(|p| p.name.is_none()),
            "port names would collide between runtimes"
        );
        let secrets: Vec<_> = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(secrets, ["shared", "team"]);
        assert_eq!(attached(&pod), ["a", "b"]);
        assert_eq!(placement_in(&pod, &b).unwrap().proxy_port, 8111);
        assert!(placement_in(&pod, &runtime("c")).is_none());
        let env = spec.containers[3].env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "PORT" && e.value.as_deref() == Some("8110"))
        );
    }

    #[test]
    fn runtimes_keep_their_slots_and_new_ones_take_the_lowest_free() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let none = |_: &str| None;
        // zeta alone, then alpha joins: zeta keeps slot 0, alpha takes slot 1.
        assert_eq!(assign_slots(&names(&["zeta"]), &[], none), [0]);
        assert_eq!(assign_slots(&names(&["alpha", "zeta"]), &[Some("zeta")], none), [1, 0]);
        // beta leaves the middle: gamma keeps slot 2; a newcomer fills slot 1.
        let live = [Some("zeta"), Some("beta"), Some("gamma")];
        assert_eq!(assign_slots(&names(&["gamma", "zeta"]), &live, none), [2, 0]);
        assert_eq!(
            assign_slots(&names(&["delta", "gamma", "zeta"]), &live[..], none),
            [1, 2, 0]
        );
        let gap = [Some("zeta"), None, Some("gamma")];
        assert_eq!(assign_slots(&names(&["delta", "gamma", "zeta"]), &gap, none), [1, 2, 0]);
        assert_eq!(
            assign_slots(&names(&["beta", "delta", "gamma", "zeta"]), &live[..], none),
            [1, 3, 2, 0]
        );
        // No pod (a stopped instance): the slot each URL names, when it is free.
        let published = |name: &str| match name {
            "zeta" => Some(0),
            "omega" => Some(0),
            "gamma" => Some(2),
            _ => None,
        };
        assert_eq!(
            assign_slots(&names(&["alpha", "gamma", "zeta"]), &[], published),
            [1, 2, 0]
        );
        assert_eq!(
            assign_slots(&names(&["omega", "zeta"]), &[Some("zeta")], published),
            [1, 0]
        );
        // A URL edited to a slot this pod could never have is not taken.
        let edited = |_: &str| Some(214_748_364);
        assert_eq!(assign_slots(&names(&["a", "b"]), &[], edited), [0, 1]);
        assert_eq!(slot_of_url("http://zeta.v1.svc:8101"), Some(0));
        assert_eq!(slot_of_url("http://zeta.v1.svc:8121"), Some(2));
        for url in [
            "http://zeta.v1.svc:8081",
            "http://zeta.v1.svc:8102",
            "http://x",
            "http://x:99",
        ] {
            assert_eq!(slot_of_url(url), None, "{url}");
        }
    }

    #[test]
    fn a_free_slot_is_kept_free_in_the_pod() {
        let (a, c) = (runtime("a"), runtime("c"));
        let runtimes = [
            at_slot(&a, "r.example/rt:1", &[], 0),
            at_slot(&c, "r.example/rt:1", &[], 2),
        ];
        let pod = build(&runtimes);
        assert_eq!(pod.metadata.annotations.as_ref().unwrap()[RUNTIMES_ANNOTATION], "a,,c");
        assert_eq!(attached(&pod), ["a", "c"]);
        assert_eq!(placement_in(&pod, &c).unwrap().proxy_port, 8121);
    }

    #[test]
    fn attaching_a_runtime_changes_the_inputs_hash() {
        let a = runtime("a");
        let empty = build(&[]);
        let with_a = build(&[at_slot(&a, "r.example/rt:1", &[], 0)]);
        assert_ne!(
            super::super::pod::live_inputs_hash(&empty),
            super::super::pod::live_inputs_hash(&with_a)
        );
        assert!(attached(&empty).is_empty());
        assert_eq!(build(&[]).metadata.annotations, empty.metadata.annotations, "stable");
    }

    /// A container's quantity of `resource` in its limits, when it has one.
    fn limit(container: &Container, resource: &str) -> Option<String> {
        let limits = container.resources.as_ref()?.limits.as_ref()?;
        limits.get(resource).map(|q| q.0.clone())
    }

    #[test]
    fn the_pod_holds_the_size_once_and_its_containers_share_it() {
        let (a, b) = (runtime("a"), runtime("b"));
        let runtimes = [
            at_slot(&a, "r.example/rt:1", &[], 0),
            at_slot(&b, "r.example/rt:1", &[], 1),
        ];
        // Standard_DS3_v2: 4 cpu, 14Gi memory, 28Gi ephemeral storage.
        let pod = build(&runtimes);
        assert_eq!(layout_of(&pod), Some(ResourceLayout::Pod));
        let spec = pod.spec.as_ref().unwrap();
        let whole = spec.resources.as_ref().expect("pod-level resources");
        for list in [&whole.requests, &whole.limits] {
            let list = list.as_ref().unwrap();
            assert_eq!((list["cpu"].0.as_str(), list["memory"].0.as_str()), ("4", "14Gi"));
            assert!(
                !list.contains_key("ephemeral-storage"),
                "pod-level resources do not hold it"
            );
        }
        for container in spec.containers.iter().filter(|c| !c.name.starts_with("px-")) {
            assert_eq!(limit(container, "cpu"), None, "{} shares the pod's cpu", container.name);
            assert_eq!(limit(container, "memory"), None, "{}", container.name);
            // 28Gi in three shares, rounded down to whole Mi.
            assert_eq!(limit(container, "ephemeral-storage").as_deref(), Some("9557Mi"));
        }

        // Without pod-level resources: three equal shares, the pod claims the size once.
        let shared = build_in(&runtimes, ResourceLayout::Containers);
        let spec = shared.spec.as_ref().unwrap();
        assert!(spec.resources.is_none());
        let main: Vec<_> = spec.containers.iter().filter(|c| !c.name.starts_with("px-")).collect();
        assert_eq!(main.len(), 3);
        for container in main {
            assert_eq!(limit(container, "cpu").as_deref(), Some("1333m"), "{}", container.name);
            assert_eq!(limit(container, "memory").as_deref(), Some("4778Mi"));
            let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
            assert_eq!(requests["cpu"].0, "1333m");
        }
        assert_ne!(
            super::super::pod::live_inputs_hash(&pod),
            super::super::pod::live_inputs_hash(&shared),
            "a pod found without its pod-level resources is remade in shares"
        );
        // Alone, the instance container holds the whole size.
        let alone = build_in(&[], ResourceLayout::Containers);
        assert_eq!(
            limit(&alone.spec.as_ref().unwrap().containers[0], "cpu").as_deref(),
            Some("4")
        );
    }

    #[test]
    fn with_pod_level_resources_each_runtime_installs_beside_the_others() {
        let a = runtime("a");
        let flow = FlowEnvironment {
            image: None,
            requirements_file: Some("requirements.txt".into()),
            content_hash: "h".into(),
        };
        let with_flow = || AttachedRuntime {
            flow: Some(("flow-a".into(), flow.clone())),
            ..at_slot(&a, "r.example/rt:1", &[], 0)
        };
        let pod = build_in(&[with_flow()], ResourceLayout::Pod);
        let spec = pod.spec.as_ref().unwrap();
        assert!(
            spec.init_containers.is_none(),
            "no init container holds the others back"
        );
        let installer = spec
            .containers
            .iter()
            .find(|c| c.name == "req-a")
            .expect("installer container");
        let command = installer.command.as_ref().unwrap();
        assert_eq!(&command[..2], ["sh", "-c"]);
        assert!(
            command
                .iter()
                .any(|arg| arg == "requirements.txt" || arg.ends_with("/requirements.txt"))
        );
        assert!(
            command.iter().any(|arg| arg == "/opt/promptflow/packages/site"),
            "{command:?}"
        );
        // The runtime sees the packages' directory from its start, and on its path.
        let runtime_container = spec.containers.iter().find(|c| c.name == "rt-a").unwrap();
        let mount = runtime_container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/opt/promptflow/packages/site")
            .expect("the packages' directory is mounted");
        assert_eq!(mount.sub_path.as_deref(), Some("site"));
        let env = runtime_container.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "PYTHONPATH" && e.value.as_deref() == Some("/opt/promptflow/packages/site"))
        );
        let probe = installer.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
        assert_eq!(
            probe.command.as_ref().unwrap().last().map(String::as_str),
            Some("/opt/promptflow/packages/.installed")
        );
        let limits = installer.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(
            limits.keys().collect::<Vec<_>>(),
            ["ephemeral-storage"],
            "it shares cpu and memory"
        );

        // In shares, an install still runs first, as an init container.
        let shared = build_in(&[with_flow()], ResourceLayout::Containers);
        let init = shared.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        assert_eq!(init[0].name, "req-a");
        assert!(init[0].readiness_probe.is_none());
    }
}
