//! `ComputeInstance`: a long-lived, user-owned machine that runtimes attach to as containers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Rule;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resources::ResourceOverrides;
use super::validation::{self, DNS1123_SUBDOMAIN, GO_DURATION, INSTANCE_TYPE, TIME_ZONE};

/// A compute instance: a machine of a catalog size that runtimes run on as containers, started and
/// stopped on schedules and after idleness.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "promptflow.dev",
    version = "v1alpha1",
    kind = "ComputeInstance",
    plural = "computeinstances",
    shortname = "pfci",
    category = "promptflow",
    namespaced,
    status = "ComputeInstanceStatus",
    derive = "PartialEq",
    doc = "A compute instance that prompt flow runtimes run on as containers; it restarts to take a new runtime.",
    printcolumn(name = "Instance Type", type_ = "string", json_path = ".spec.instanceType", description = "The catalog size of the instance"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state", description = "Creating, Starting, Running, Restarting, Stopping, Stopped or Failed"),
    printcolumn(name = "Runtimes", type_ = "string", json_path = ".status.runtimes", description = "The PromptFlowRuntimes attached to the instance"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52")
        .message("metadata.name must be a DNS-1123 label of at most 52 characters (lowercase letters, digits and '-'): it names the instance's pod"),
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeInstanceSpec {
    /// An instance type from the operator's catalog (e.g. `Standard_DS3_v2`).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = validation::matches(INSTANCE_TYPE, "spec.instanceType must be an instance type name such as Standard_DS3_v2"))]
    pub instance_type: String,

    /// Overrides the instance type's cpu and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceOverrides>,

    /// The desired state: `Running` (the default) or `Stopped`.
    #[serde(default)]
    pub state: DesiredState,

    /// The service account the instance runs as; its imagePullSecrets pull runtime images.
    #[serde(default = "default_service_account")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = validation::matches(DNS1123_SUBDOMAIN, "spec.serviceAccountName must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"))]
    pub service_account_name: String,

    /// Stop the instance after this long without activity on any of its runtimes, as a Go
    /// duration up to 72h (three days). The operator's minimum (15m unless its
    /// `--instance-min-idle` flag says otherwise, for tests) applies to shorter values. Absent:
    /// never stopped for idleness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = validation::matches(GO_DURATION, "spec.idleTimeBeforeShutdown must be a Go duration such as 15m, 60m or 72h"),
        validation = validation::duration_between("1s", "72h", false, "spec.idleTimeBeforeShutdown must be between 1s and 72h (3 days)"),
    )]
    pub idle_time_before_shutdown: Option<String>,

    /// Start and stop schedules; at most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub schedules: Vec<Schedule>,

    /// The instance's disk: a PersistentVolumeClaim `<instance>-home`, mounted at
    /// `/home/promptflow` in the instance container and every runtime container, kept across
    /// stop, start, restart and runtime attach and detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<InstanceStorage>,
}

/// Where an instance's disk is mounted in the instance container and every runtime container.
pub const HOME_MOUNT: &str = "/home/promptflow";

/// The instance's disk.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)")
        .message("spec.storage.storageClassName cannot change: the claim is bound to a volume of its class"),
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStorage {
    /// The disk's size, a positive quantity such as `32Gi`. A claim can only grow, and only
    /// where its storage class allows expansion; a size it cannot take is reported in the
    /// `StorageReady` condition (the disk stays as it is).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))")
        .message("spec.storage.size must be a positive quantity such as 32Gi"))]
    pub size: String,
    /// The claim's storage class. Absent: the cluster's default class (or, without one, a
    /// PersistentVolume without a class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = validation::matches(DNS1123_SUBDOMAIN, "spec.storage.storageClassName must be a DNS-1123 subdomain"))]
    pub storage_class_name: Option<String>,
    /// `Delete` (the default): the claim is owned by the instance and goes with it. `Retain`:
    /// the claim stays when the instance is deleted, and an instance made again under the same
    /// name takes it back.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

/// What happens to an instance's disk when the instance is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReclaimPolicy {
    /// The claim is deleted with the instance.
    #[default]
    Delete,
    /// The claim stays.
    Retain,
}

/// The disk's state, as the instance's status shows it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// The PersistentVolumeClaim.
    pub claim_name: String,
    /// The claim's phase: `Pending`, `Bound` or `Lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The capacity of the bound volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
}

fn default_service_account() -> String {
    super::DEFAULT_SERVICE_ACCOUNT.to_owned()
}

/// The state a user asks for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DesiredState {
    /// The instance runs.
    #[default]
    Running,
    /// The instance is stopped; its runtimes are not available.
    Stopped,
}

/// A recurring start or stop.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// `Start` or `Stop`.
    pub action: ScheduleAction,
    /// A five-field cron expression: minute hour day-of-month month day-of-week (`0 19 * * 1-5`).
    #[schemars(length(min = 9, max = 100))]
    #[x_kube(validation = cron_rule())]
    pub cron: String,
    /// The IANA time zone the cron expression is read in (`Europe/Berlin`). Default `UTC`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = validation::matches(TIME_ZONE, "spec.schedules[].timeZone must be an IANA time zone name such as UTC or Europe/Berlin"))]
    pub time_zone: String,
}

fn cron_rule() -> Rule {
    validation::matches(
        &validation::cron_pattern(),
        "spec.schedules[].cron must be a five-field cron expression (minute hour day-of-month month day-of-week) with values in range, e.g. \"0 19 * * 1-5\"",
    )
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// What a schedule does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleAction {
    /// Start the instance.
    Start,
    /// Stop the instance.
    Stop,
}

/// The state the instance is in.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InstanceState {
    /// The instance is being created.
    #[default]
    Creating,
    /// The instance is starting.
    Starting,
    /// The instance runs.
    Running,
    /// The instance restarts to take a new runtime.
    Restarting,
    /// The instance is stopping.
    Stopping,
    /// The instance is stopped.
    Stopped,
    /// The instance failed; `conditions` say why.
    Failed,
}

/// The next action a schedule will take.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledAction {
    /// `Start` or `Stop`.
    pub action: ScheduleAction,
    /// When it happens.
    pub time: Time,
}

/// The observed state of a compute instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComputeInstanceStatus {
    /// The instance's state.
    #[serde(default)]
    pub state: InstanceState,
    /// The PromptFlowRuntimes attached to the instance, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<String>,
    /// The next scheduled start or stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_action: Option<ScheduledAction>,
    /// A CamelCase machine-readable reason for the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence for humans: what is happening, or what to fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The latest activity known on any of the instance's runtimes (or its start): the idle clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,
    /// The values of the action annotations (`promptflow.dev/start`, `promptflow.dev/stop`)
    /// already handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_actions: Option<super::HandledActions>,
    /// How the instance pod holds the instance's size: `Pod` (pod-level resources: the
    /// containers share the size) or `Containers` (equal shares per container, where the API
    /// server has no pod-level resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_layout: Option<String>,
    /// The instance's disk, when `spec.storage` asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
    /// Conditions: `Ready`, `Idle`, `Accepted`, and kstatus' `Reconciling` and `Stalled` (present
    /// only when true).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_takes_the_documented_defaults() {
        let spec: ComputeInstanceSpec = serde_norway::from_str("instanceType: Standard_DS3_v2").unwrap();
        assert_eq!(spec.state, DesiredState::Running);
        assert_eq!(spec.service_account_name, "default");
        assert!(spec.schedules.is_empty());
        let schedule: Schedule = serde_norway::from_str("{action: Stop, cron: '0 19 * * 1-5'}").unwrap();
        assert_eq!(schedule.time_zone, "UTC");
    }

    #[test]
    fn spec_and_status_round_trip() {
        let yaml = r#"
instanceType: Standard_DS3_v2
state: Stopped
serviceAccountName: ci-runner
idleTimeBeforeShutdown: 60m
schedules:
- {action: Start, cron: "0 8 * * 1-5", timeZone: Europe/Berlin}
"#;
        let spec: ComputeInstanceSpec = serde_norway::from_str(yaml).unwrap();
        assert_eq!(spec.schedules[0].action, ScheduleAction::Start);
        let back: ComputeInstanceSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);

        let status: ComputeInstanceStatus = serde_json::from_str(
            r#"{"state":"Restarting","runtimes":["chat"],"nextScheduledAction":{"action":"Stop","time":"2026-11-27T19:00:00Z"}}"#,
        )
        .unwrap();
        assert_eq!(status.state, InstanceState::Restarting);
        assert_eq!(status.runtimes, ["chat"]);
        assert_eq!(
            serde_json::to_value(&status).unwrap()["nextScheduledAction"]["time"],
            "2026-11-27T19:00:00Z"
        );
    }
}
