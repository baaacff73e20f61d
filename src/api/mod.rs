//! The `promptflow.dev/v1alpha1` API: the two custom resources, and the names (annotations,
//! condition types, reasons) that users and tools see. These names are a contract: add, never rename.

mod compute_instance;
pub mod conditions;
mod resources;
mod runtime;
pub mod validation;

pub use compute_instance::{
    ComputeInstance, ComputeInstanceSpec, ComputeInstanceStatus, DesiredState, HOME_MOUNT, InstanceState,
    InstanceStorage, ReclaimPolicy, Schedule, ScheduleAction, ScheduledAction, StorageStatus,
};
pub use resources::ResourceOverrides;
pub use runtime::{
    Compute, FlowSpec, HandledActions, IdentitySpec, IdleAction, IdleSpec, ImageSpec, InstanceCompute,
    PromptFlowRuntime, PromptFlowRuntimeSpec, PromptFlowRuntimeStatus, RuntimePhase, ServerlessCompute, UpdatePolicy,
};

/// The API group of both custom resources.
pub const GROUP: &str = "promptflow.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get` category that lists both kinds.
pub const CATEGORY: &str = "promptflow";

/// The image runtimes start from unless `spec.image.repository` says otherwise.
pub const DEFAULT_RUNTIME_REPOSITORY: &str = "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable";
/// The service account that stands for "the user identity" when none is named.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// User actions, as the portal's buttons: each *new value* of the annotation triggers the action
/// once, and the operator records the value it handled in `status.handledActions`.
pub mod annotations {
    /// "Check version": look the registry up now for a newer runtime version.
    pub const CHECK_VERSION: &str = "promptflow.dev/check-version";
    /// "Update": move the runtime to the newest available version.
    pub const UPDATE: &str = "promptflow.dev/update";
    /// "Start": start a runtime that was stopped (idle, or by `promptflow.dev/stop`).
    pub const START: &str = "promptflow.dev/start";
    /// "Stop": stop a runtime now (delete its pod, keep the object and its Service).
    pub const STOP: &str = "promptflow.dev/stop";
    /// "Restart": replace the runtime's pod once, for example to apply an operator-side change
    /// (`TemplateCurrent=False`) now rather than at the next start, update or spec change.
    pub const RESTART: &str = "promptflow.dev/restart";
    /// An RFC 3339 time at which a client last used the runtime; resets the idle clock.
    pub const LAST_ACTIVITY: &str = "promptflow.dev/last-activity";
}

/// The finalizer on runtimes that run on a ComputeInstance: removed once the instance no longer
/// carries the runtime's container (or is gone, stopped or being deleted).
pub const DETACH_FINALIZER: &str = "promptflow.dev/detach";
