//! One runtime's containers, wherever they run: the runtime container with its probes, flow
//! volume and requirements installer, and its activity proxy, named and numbered by a
//! [`Placement`] (its own serverless pod, or a slot in a compute instance's pod).

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction,
    HTTPGetAction, Probe, ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{PodSecurity, PodTemplate, RUNTIME_PORT};
use super::proxy::{ACTIVITY_PORT, PROXY_PORT, proxy_container};
use crate::flow::FlowEnvironment;

const FLOW_MOUNT: &str = "/flow";
/// The flow's requirements are installed here as Python's user base (`PYTHONUSERBASE`, `pip
/// install --user`): Python puts the user site-packages on `sys.path` by itself, so the image's
/// own `PYTHONPATH` stays as it is.
pub(crate) const PACKAGES_MOUNT: &str = "/opt/promptflow/packages";

/// Where one runtime's containers sit in their pod: their names and ports. A serverless runtime
/// has its pod to itself (fixed names, named ports); on a compute instance several runtimes share
/// one pod and network, so each gets its own container names and ports (numbers only: port names
/// must be unique in a pod).
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The runtime's name in container and volume names on an instance; `None` when serverless.
    pub suffix: Option<String>,
    /// The port the runtime listens on.
    pub runtime_port: i32,
    /// The activity proxy's port, which the runtime's Service targets.
    pub proxy_port: i32,
    /// The port the proxy reports activity on.
    pub activity_port: i32,
}

/// The first port of the runtime slots on a compute instance; slot `i` uses the ten ports from
/// `INSTANCE_PORT_BASE + 10 * i` (runtime, proxy, activity).
pub const INSTANCE_PORT_BASE: i32 = 8100;

impl Placement {
    /// A serverless runtime's pod.
    pub fn serverless() -> Self {
        Self {
            suffix: None,
            runtime_port: RUNTIME_PORT,
            proxy_port: PROXY_PORT,
            activity_port: ACTIVITY_PORT,
        }
    }

    /// Slot `slot` of a compute instance's pod, for the runtime `runtime_name`.
    pub fn on_instance(runtime_name: &str, slot: usize) -> Self {
        let base = INSTANCE_PORT_BASE + 10 * i32::try_from(slot).unwrap_or(i32::MAX / 20);
        Self {
            suffix: Some(runtime_name.to_owned()),
            runtime_port: base,
            proxy_port: base + 1,
            activity_port: base + 2,
        }
    }

    /// A container or volume name: the serverless `name`, or `short-<runtime>` on an instance.
    pub fn name(&self, name: &str, short: &str) -> String {
        match &self.suffix {
            None => name.to_owned(),
            Some(runtime) => format!("{short}-{runtime}"),
        }
    }

    /// The name of the runtime's own container.
    pub fn runtime_container(&self) -> String {
        self.name("runtime", "rt")
    }

    fn port(&self, name: &str, number: i32) -> (Option<String>, IntOrString) {
        match self.suffix {
            None => (Some(name.to_owned()), IntOrString::String(name.to_owned())),
            Some(_) => (None, IntOrString::Int(number)),
        }
    }
}

/// What one runtime adds to a pod: its container and proxy, the init container that installs its
/// requirements, and the volumes they mount.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeParts {
    /// The runtime's container, then its activity proxy.
    pub containers: Vec<Container>,
    /// The requirements installer, when the flow has requirements.
    pub init_containers: Vec<Container>,
    /// The flow and package volumes.
    pub volumes: Vec<Volume>,
}

/// Everything one runtime's containers are built from.
pub struct PartsInputs<'a> {
    /// The runtime's name.
    pub runtime_name: &'a str,
    /// The image reference to run.
    pub image: &'a str,
    /// The runtime container's requests and limits.
    pub resources: ResourceRequirements,
    /// The flow ConfigMap's name and environment, when the runtime has a flow.
    pub flow: Option<(&'a str, &'a FlowEnvironment)>,
    /// The operator's side of the template.
    pub template: &'a PodTemplate,
    /// Names and ports.
    pub placement: &'a Placement,
    /// Install the flow's requirements in a container of its own that runs beside the others
    /// (a runtime on an instance with pod-level resources: one runtime's failing install must
    /// not keep its neighbours from starting), instead of an init container before them.
    pub parallel_install: bool,
}

/// The file a parallel installer writes when the install succeeded; its readiness probe looks
/// for it.
pub const INSTALLED_MARKER: &str = ".installed";
/// The directory of the packages volume a parallel installer installs into (`pip --target`) and
/// the runtime finds them in (`PYTHONPATH`).
pub const PARALLEL_SITE: &str = "site";

/// Builds one runtime's containers, init container and volumes.
pub fn runtime_parts(inputs: &PartsInputs<'_>) -> RuntimeParts {
    let placement = inputs.placement;
    let flow_volume = placement.name("flow", "flow");
    let packages_volume = placement.name("packages", "pkg");
    let mut parts = RuntimeParts::default();
    let mut mounts = vec![];
    let mut env = vec![EnvVar {
        name: "PROMPTFLOW_RUNTIME_NAME".into(),
        value: Some(inputs.runtime_name.to_owned()),
        ..Default::default()
    }];
    if placement.suffix.is_some() {
        // Runtimes sharing an instance share its network: each listens on its own port.
        env.push(EnvVar {
            name: "PORT".into(),
            value: Some(placement.runtime_port.to_string()),
            ..Default::default()
        });
    }
    if let Some((config_map, flow)) = inputs.flow {
        parts.volumes.push(Volume {
            name: flow_volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let flow_mount = VolumeMount {
            name: flow_volume.clone(),
            mount_path: FLOW_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        };
        mounts.push(flow_mount.clone());
        env.push(EnvVar {
            name: "PROMPTFLOW_FLOW_DIR".into(),
            value: Some(FLOW_MOUNT.into()),
            ..Default::default()
        });
        if let Some(requirements) = &flow.requirements_file {
            let policy = &inputs.template.requirements;
            parts.volumes.push(Volume {
                name: packages_volume.clone(),
                // Installed packages count against the pod's ephemeral storage; the limit keeps
                // one flow's requirements from filling the node's disk.
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: policy.packages_size_limit.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let packages = VolumeMount {
                name: packages_volume.clone(),
                mount_path: PACKAGES_MOUNT.into(),
                ..Default::default()
            };
            let user_base = EnvVar {
                name: "PYTHONUSERBASE".into(),
                value: Some(PACKAGES_MOUNT.into()),
                ..Default::default()
            };
            let site = format!("{PACKAGES_MOUNT}/{PARALLEL_SITE}");
            if inputs.parallel_install {
                // The runtime starts beside its installer: Python puts a directory on its path
                // only if it exists when the interpreter starts, so the runtime mounts the
                // packages' directory itself (the kubelet makes it before any container starts)
                // and finds what the installer puts there as it arrives.
                mounts.push(VolumeMount {
                    name: packages_volume,
                    mount_path: site.clone(),
                    sub_path: Some(PARALLEL_SITE.into()),
                    read_only: Some(true),
                    ..Default::default()
                });
                env.push(EnvVar {
                    name: "PYTHONPATH".into(),
                    value: Some(site.clone()),
                    ..Default::default()
                });
            } else {
                mounts.push(packages.clone());
                env.push(user_base.clone());
            }
            let mut install = vec![
                "python".to_owned(),
                "-m".into(),
                "pip".into(),
                "install".into(),
                "--no-cache-dir".into(),
            ];
            if inputs.parallel_install {
                install.extend(["--upgrade".to_owned(), "--target".into(), site]);
            } else {
                install.push("--user".into());
            }
            install.extend(["-r".to_owned(), format!("{FLOW_MOUNT}/{requirements}")]);
            let mut installer = Container {
                name: placement.name("install-requirements", "req"),
                image: Some(inputs.image.to_owned()),
                command: Some(install.clone()),
                volume_mounts: Some(vec![flow_mount, packages]),
                env: Some(pip_environment(user_base, policy)),
                resources: Some(inputs.resources.clone()),
                security_context: container_security(&inputs.template.security),
                ..Default::default()
            };
            if inputs.parallel_install {
                // Installs, marks success, then idles; a failed install exits and the kubelet
                // tries again with backoff, for this runtime alone. Ready once installed.
                let marker = format!("{PACKAGES_MOUNT}/{INSTALLED_MARKER}");
                // A marker of an earlier run is no proof; SIGTERM ends it at once (a shell as
                // the container's first process ignores signals it does not trap).
                installer.command = Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "trap 'exit 0' TERM; rm -f \"$MARKER\"; \"$@\" || exit $?; touch \"$MARKER\"; sleep infinity & wait $!".into(),
                    "install".into(),
                ]);
                installer.command.as_mut().expect("set").extend(install);
                installer.env.get_or_insert_with(Vec::new).push(EnvVar {
                    name: "MARKER".into(),
                    value: Some(marker.clone()),
                    ..Default::default()
                });
                // pip's last lines become the termination message a failed install reports.
                installer.termination_message_policy = Some("FallbackToLogsOnError".into());
                // It shares the pod's cpu and memory; of ephemeral storage it asks little (pip's
                // temporary files) and may use up to the runtime's share.
                let share = inputs
                    .resources
                    .limits
                    .as_ref()
                    .and_then(|l| l.get("ephemeral-storage"))
                    .cloned();
                installer.resources = Some(ResourceRequirements {
                    requests: share.as_ref().map(|_| {
                        std::collections::BTreeMap::from([(
                            "ephemeral-storage".to_owned(),
                            k8s_openapi::apimachinery::pkg::api::resource::Quantity("64Mi".into()),
                        )])
                    }),
                    limits: share.map(|q| std::collections::BTreeMap::from([("ephemeral-storage".to_owned(), q)])),
                    ..Default::default()
                });
                installer.readiness_probe = Some(Probe {
                    exec: Some(ExecAction {
                        command: Some(vec!["test".into(), "-f".into(), marker]),
                    }),
                    period_seconds: Some(5),
                    ..Default::default()
                });
                parts.containers.push(installer);
            } else {
                parts.init_containers.push(installer);
            }
        }
    }

    let (port_name, probe_port) = placement.port("http", placement.runtime_port);
    let probe = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: probe_port.clone(),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    parts.containers.push(Container {
        name: placement.runtime_container(),
        image: Some(inputs.image.to_owned()),
        ports: Some(vec![ContainerPort {
            name: port_name,
            container_port: placement.runtime_port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Liveness and readiness start once the startup probe has seen `/health` answer once.
        startup_probe: Some(probe(10, (inputs.template.startup_seconds / 10).max(1))),
        readiness_probe: Some(probe(5, 3)),
        liveness_probe: Some(probe(10, 6)),
        resources: Some(inputs.resources.clone()),
        env: Some(env),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        security_context: container_security(&inputs.template.security),
        ..Default::default()
    });
    parts.containers.push(proxy_container(inputs.template, placement));
    parts
}

/// The requirements installer's environment: the user base, then the administrator's pip
/// settings (pip reads `PIP_<OPTION>`; several values are separated by spaces).
fn pip_environment(user_base: EnvVar, policy: &crate::flow::RequirementsPolicy) -> Vec<EnvVar> {
    let mut env = vec![user_base];
    let mut set = |name: &str, values: Vec<String>| {
        if !values.is_empty() {
            env.push(EnvVar {
                name: name.into(),
                value: Some(values.join(" ")),
                ..Default::default()
            });
        }
    };
    set("PIP_INDEX_URL", policy.index_url.iter().cloned().collect());
    set("PIP_EXTRA_INDEX_URL", policy.extra_index_urls.clone());
    set("PIP_TRUSTED_HOST", policy.trusted_hosts.clone());
    env
}

/// The restricted profile's container settings (no privilege escalation, no capabilities).
pub fn container_security(security: &PodSecurity) -> Option<SecurityContext> {
    security.restricted.then(|| SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    })
}
