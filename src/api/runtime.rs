//! `PromptFlowRuntime`: the compute that runs prompt flows, serverless or on a ComputeInstance.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resources::ResourceOverrides;
use super::validation::{self, DNS1123_SUBDOMAIN, GO_DURATION, IMAGE_REPOSITORY, IMAGE_VERSION, INSTANCE_TYPE};

/// A prompt flow runtime: a pod started from the prompt flow runtime image, either serverless
/// (sized from the instance-type catalog) or as a container on a ComputeInstance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "promptflow.dev",
    version = "v1alpha1",
    kind = "PromptFlowRuntime",
    plural = "promptflowruntimes",
    shortname = "pfrt",
    category = "promptflow",
    namespaced,
    status = "PromptFlowRuntimeStatus",
    derive = "PartialEq",
    doc = "A prompt flow runtime: the compute that runs prompt flows, started from the prompt flow runtime image, kept up to date and stopped when idle.",
    printcolumn(name = "Compute", type_ = "string", json_path = ".status.compute", description = "Serverless, or the ComputeInstance the runtime runs on"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase", description = "Not available or Running"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version", description = "The runtime image version running"),
    printcolumn(name = "Latest", type_ = "string", json_path = ".status.latestVersion", description = "The newest version in the registry"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason", priority = 1, description = "Why the runtime is in its status"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", priority = 1, description = "The in-cluster URL clients send requests to"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52")
        .message("metadata.name must be a DNS-1123 label of at most 52 characters (lowercase letters, digits and '-'): it names the runtime's pod"),
)]
#[serde(rename_all = "camelCase")]
pub struct PromptFlowRuntimeSpec {
    /// Where the runtime runs: exactly one of `serverless` or `instance`. Defaults to serverless.
    #[serde(default = "Compute::default_serverless")]
    pub compute: Compute,

    /// The runtime image. Defaults to the prompt flow runtime image, newest version at first start.
    #[serde(default)]
    pub image: ImageSpec,

    /// Whether newer runtime versions are applied automatically (`Automatic`) or only when the
    /// `promptflow.dev/update` annotation asks for it (`Manual`, the default).
    #[serde(default)]
    pub update_policy: UpdatePolicy,

    /// The flow whose environment (`flow.dag.yaml`: image, python requirements) customises the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowSpec>,

    /// The identity the runtime pulls its image with. Absent means the namespace's `default`
    /// service account, which stands for the user identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,

    /// When and how an idle runtime is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleSpec>,
}

/// Where the runtime runs. Exactly one of `serverless` or `instance` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.serverless) != has(self.instance)")
    .message("spec.compute must set exactly one of serverless or instance"))]
#[serde(rename_all = "camelCase")]
pub struct Compute {
    /// Run the runtime as its own pod, sized from the instance-type catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serverless: Option<ServerlessCompute>,

    /// Run the runtime as a container on a ComputeInstance in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceCompute>,
}

impl Compute {
    /// The default placement: serverless, with the instance type chosen from quota.
    pub fn default_serverless() -> Self {
        Self {
            serverless: Some(ServerlessCompute::default()),
            instance: None,
        }
    }
}

/// A serverless runtime: its own pod, sized from the instance-type catalog.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerlessCompute {
    /// An instance type from the operator's catalog (e.g. `Standard_E4ds_v4`). Absent: the first
    /// catalog type that fits the namespace's ResourceQuota headroom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = validation::matches(INSTANCE_TYPE, "spec.compute.serverless.instanceType must be an instance type name such as Standard_E4ds_v4"))]
    pub instance_type: Option<String>,

    /// Overrides the instance type's cpu and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceOverrides>,
}

/// A runtime on a ComputeInstance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCompute {
    /// The name of a ComputeInstance in the runtime's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = validation::matches(DNS1123_SUBDOMAIN, "spec.compute.instance.name must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"))]
    pub name: String,

    /// Attaching a runtime restarts the instance; it proceeds only when this is true.
    #[serde(default)]
    pub acknowledge_restart: bool,
}

/// The runtime image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// The image repository, without tag or digest.
    #[serde(default = "ImageSpec::default_repository")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = validation::matches(IMAGE_REPOSITORY, "spec.image.repository must be a lowercase image repository without tag or digest, e.g. mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable"))]
    pub repository: String,

    /// A tag such as `20240222.v4`, or a digest `sha256:…`. Absent: the newest available version
    /// at first start, then pinned in `status.version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 135))]
    #[x_kube(validation = validation::matches(IMAGE_VERSION, "spec.image.version must be a tag (e.g. 20240222.v4) or a digest (sha256: and 64 hex digits)"))]
    pub version: Option<String>,
}

impl ImageSpec {
    fn default_repository() -> String {
        super::DEFAULT_RUNTIME_REPOSITORY.to_owned()
    }
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            repository: Self::default_repository(),
            version: None,
        }
    }
}

/// How newer runtime versions are applied.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdatePolicy {
    /// Report newer versions; update only when `promptflow.dev/update` asks.
    #[default]
    Manual,
    /// Update to the newest version as soon as it is found.
    Automatic,
}

/// The flow that customises the runtime.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowSpec {
    /// A ConfigMap holding the flow folder (`flow.dag.yaml`, `requirements.txt`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = validation::matches(DNS1123_SUBDOMAIN, "spec.flow.configMapName must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"))]
    pub config_map_name: Option<String>,
}

/// The identity the runtime pulls its image with.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// A service account in the runtime's namespace; its imagePullSecrets are used. Absent: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = validation::matches(DNS1123_SUBDOMAIN, "spec.identity.serviceAccountName must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"))]
    pub service_account_name: Option<String>,
}

/// Idle shutdown.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdleSpec {
    /// How long without activity before the idle action, as a Go duration (`30m`, `1h`, `1h30m`)
    /// between 1m and 720h; `0` never stops. Absent: 1h for serverless runtimes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = validation::matches(GO_DURATION, "spec.idle.timeout must be a Go duration such as 30m, 1h or 1h30m, or 0 for never"),
        validation = validation::duration_between("1m", "720h", true, "spec.idle.timeout must be 0 (never) or between 1m and 720h"),
    )]
    pub timeout: Option<String>,

    /// What happens after the idle timeout: `Stop` (the default) deletes the compute and keeps
    /// the runtime object; `Delete` deletes the runtime object too.
    #[serde(default)]
    pub action: IdleAction,
}

/// What happens to an idle runtime.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdleAction {
    /// Delete the runtime's compute and keep the object; `promptflow.dev/start` starts it again.
    #[default]
    Stop,
    /// Delete the runtime object.
    Delete,
}

/// The phase a user reads in `kubectl get pfrt`: exactly `Not available` or `Running`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimePhase {
    /// The runtime does not serve requests; `reason` and `message` say why.
    #[default]
    #[serde(rename = "Not available")]
    NotAvailable,
    /// The runtime pod is Ready and serves requests.
    Running,
}

impl RuntimePhase {
    /// The phase as users read it in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimePhase::NotAvailable => "Not available",
            RuntimePhase::Running => "Running",
        }
    }
}

/// The last value of each action annotation the operator handled.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HandledActions {
    /// The last handled value of `promptflow.dev/check-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_version: Option<String>,
    /// The last handled value of `promptflow.dev/update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// The last handled value of `promptflow.dev/start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// The last handled value of `promptflow.dev/restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// The last handled value of `promptflow.dev/stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
}

/// The observed state of a runtime.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PromptFlowRuntimeStatus {
    /// `Not available` or `Running`.
    #[serde(default)]
    pub phase: RuntimePhase,
    /// A CamelCase machine-readable reason for the phase (e.g. `PodReady`, `QuotaExceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence for humans: what is happening, or what to fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Serverless`, or the name of the ComputeInstance the runtime runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
    /// The instance type the runtime was sized from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The image running, as `<repository>:<version>` with `@sha256:…` when the digest is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The runtime version running (or being started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The newest version found in the registry at the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<String>,
    /// The in-cluster URL of the runtime's Service (`http://NAME.NAMESPACE.svc:8081`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The last activity the operator knows of: what the activity proxy reported when the
    /// operator last looked (at the runtime's idle warning time), or a start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,
    /// The last value of each action annotation the operator handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_actions: Option<HandledActions>,
    /// Conditions: `Ready`, `IdentityResolved`, `SpecApplied`, `TemplateCurrent`,
    /// `UpdateAvailable`, `Idle`, and kstatus' `Reconciling` and `Stalled` (present only when true).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_takes_the_documented_defaults() {
        let spec: PromptFlowRuntimeSpec = serde_norway::from_str("{}").unwrap();
        assert_eq!(spec.compute, Compute::default_serverless());
        assert_eq!(spec.image.repository, crate::api::DEFAULT_RUNTIME_REPOSITORY);
        assert_eq!(spec.image.version, None);
        assert_eq!(spec.update_policy, UpdatePolicy::Manual);
        assert_eq!(spec.identity, None);

        let idle: IdleSpec = serde_norway::from_str("timeout: 30m").unwrap();
        assert_eq!(idle.action, IdleAction::Stop);
        let instance: InstanceCompute = serde_norway::from_str("name: alice-ci").unwrap();
        assert!(!instance.acknowledge_restart);
    }

    #[test]
    fn full_spec_round_trips() {
        let yaml = r#"
compute:
  instance: {name: alice-ci, acknowledgeRestart: true}
image: {repository: registry.example/runtime, version: "20240222.v4"}
updatePolicy: Automatic
flow: {configMapName: chat-flow}
identity: {serviceAccountName: pf-puller}
idle: {timeout: 1h, action: Delete}
"#;
        let spec: PromptFlowRuntimeSpec = serde_norway::from_str(yaml).unwrap();
        assert_eq!(spec.compute.instance.as_ref().unwrap().name, "alice-ci");
        assert_eq!(spec.update_policy, UpdatePolicy::Automatic);
        assert_eq!(spec.idle.as_ref().unwrap().action, IdleAction::Delete);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["identity"]["serviceAccountName"], "pf-puller");
        assert_eq!(serde_json::from_value::<PromptFlowRuntimeSpec>(json).unwrap(), spec);
    }

    #[test]
    fn status_phase_uses_the_user_facing_words() {
        let status = PromptFlowRuntimeStatus::default();
        assert_eq!(serde_json::to_value(&status).unwrap()["phase"], "Not available");
        for phase in [RuntimePhase::NotAvailable, RuntimePhase::Running] {
            assert_eq!(
                serde_json::to_value(phase).unwrap(),
                phase.as_str(),
                "as_str is the wire form"
            );
        }
        let running = PromptFlowRuntimeStatus {
            phase: RuntimePhase::Running,
            ..Default::default()
        };
        assert_eq!(serde_json::to_value(&running).unwrap()["phase"], "Running");
        let parsed: PromptFlowRuntimeStatus = serde_json::from_str(r#"{"phase":"Not available"}"#).unwrap();
        assert_eq!(parsed.phase, RuntimePhase::NotAvailable);
        // Empty optional fields stay out of the patch, so a status apply never clears another's field.
        assert_eq!(serde_json::to_string(&status).unwrap(), r#"{"phase":"Not available"}"#);
    }
}
