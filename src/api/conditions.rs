//! Condition types and reasons, as named constants: tools and runbooks match on these strings.

/// The runtime serves requests (`status.phase: Running`).
pub const READY: &str = "Ready";
/// The pull identity (service account and its imagePullSecrets) resolved.
pub const IDENTITY_RESOLVED: &str = "IdentityResolved";
/// The runtime's pod is built from its current spec; `False` names what keeps a change from
/// being applied while the pod from the earlier spec keeps serving.
pub const SPEC_APPLIED: &str = "SpecApplied";
/// The runtime's pod follows the operator's current pod template; `False` after an operator
/// upgrade, flag or catalog change, applied at the next start, update, spec change or restart.
pub const TEMPLATE_CURRENT: &str = "TemplateCurrent";
/// A newer runtime version than the one running exists in the registry.
pub const UPDATE_AVAILABLE: &str = "UpdateAvailable";
/// The runtime saw no activity for its idle timeout.
pub const IDLE: &str = "Idle";
/// A ComputeInstance accepted its spec: `False` names the schedule whose cron or time zone
/// cannot be used (the others still apply).
pub const ACCEPTED: &str = "Accepted";
/// A ComputeInstance's disk (`spec.storage`): its PersistentVolumeClaim is Bound at the size asked.
pub const STORAGE_READY: &str = "StorageReady";

/// kstatus' "abnormal-true" condition: present (`True`) while the operator works towards the
/// spec (starting, restarting, updating); absent once it is reached or cannot be reached.
/// GitOps tools (Flux, kstatus, Argo CD with this project's health check) read it as InProgress.
pub const RECONCILING: &str = "Reconciling";
/// kstatus' "abnormal-true" condition: present (`True`) while the spec cannot be reached until
/// someone acts (the reason and message say what to fix). GitOps tools read it as Failed.
pub const STALLED: &str = "Stalled";

/// Reasons for `status.reason` and condition reasons (CamelCase, stable).
pub mod reasons {
    /// Nothing has been reconciled yet.
    pub const PENDING: &str = "Pending";
    /// The runtime's launch waits for its place in the operator's launch window (the operator's
    /// pods waiting for kube-scheduler fill it); said by a stopped runtime starting again, and by
    /// every waiting one once the scheduler has placed none of the operator's pods for a while
    /// (is it running?).
    pub const LAUNCH_QUEUED: &str = "LaunchQueued";
    /// The runtime pod is being created.
    pub const POD_CREATING: &str = "PodCreating";
    /// The runtime pod exists but is not Ready yet.
    pub const POD_STARTING: &str = "PodStarting";
    /// The runtime pod is Ready.
    pub const POD_READY: &str = "PodReady";
    /// The scheduler finds no node with room for the runtime pod.
    pub const POD_UNSCHEDULABLE: &str = "PodUnschedulable";
    /// The runtime pod failed and is being recreated.
    pub const POD_FAILED: &str = "PodFailed";
    /// The named service account does not exist.
    pub const SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
    /// An imagePullSecret of the service account does not exist.
    pub const PULL_SECRET_NOT_FOUND: &str = "PullSecretNotFound";
    /// An imagePullSecret is not a parsable `kubernetes.io/dockerconfigjson` (or legacy
    /// `kubernetes.io/dockercfg`) secret.
    pub const PULL_SECRET_INVALID: &str = "PullSecretInvalid";
    /// The identity resolved.
    pub const IDENTITY_RESOLVED: &str = "IdentityResolved";
    /// No instance type of the catalog fits the namespace's ResourceQuota headroom.
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// `spec.compute.serverless.instanceType` is not in the catalog.
    pub const UNKNOWN_INSTANCE_TYPE: &str = "UnknownInstanceType";
    /// The flow ConfigMap or a file it names is missing.
    pub const FLOW_NOT_FOUND: &str = "FlowNotFound";
    /// `flow.dag.yaml` does not parse or names something invalid.
    pub const FLOW_INVALID: &str = "FlowInvalid";
    /// The kubelet could not pull the image.
    pub const ERR_IMAGE_PULL: &str = "ErrImagePull";
    /// The kubelet backs off pulling the image.
    pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
    /// The image reference is invalid.
    pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";
    /// The attached ComputeInstance does not exist.
    pub const COMPUTE_INSTANCE_NOT_FOUND: &str = "ComputeInstanceNotFound";
    /// Attaching would restart the instance and `acknowledgeRestart` is not true.
    pub const RESTART_NOT_ACKNOWLEDGED: &str = "RestartNotAcknowledged";
    /// The runtime was stopped after its idle timeout.
    pub const STOPPED_IDLE: &str = "StoppedIdle";
    /// The running version is the newest available.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// A newer version is available.
    pub const NEWER_VERSION: &str = "NewerVersionAvailable";
    /// The registry could not be reached or refused the credentials.
    pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";
    /// The API server refused the runtime pod (admission, validation).
    pub const POD_REJECTED: &str = "PodRejected";
    /// Runtimes on ComputeInstances are not supported by this operator version.
    pub const COMPUTE_INSTANCE_UNSUPPORTED: &str = "ComputeInstanceUnsupported";
    /// The runtime pod is being deleted.
    pub const POD_TERMINATING: &str = "PodTerminating";
    /// A container keeps exiting and the kubelet backs off restarting it.
    pub const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
    /// A container was killed for exceeding its memory limit.
    pub const OOM_KILLED: &str = "OOMKilled";
    /// The pod is built from the runtime's current spec.
    pub const SPEC_APPLIED: &str = "SpecApplied";
    /// The pod follows the operator's current pod template.
    pub const TEMPLATE_CURRENT: &str = "TemplateCurrent";
    /// The operator's pod template changed since the pod was made (upgrade, flags, catalog).
    pub const OPERATOR_TEMPLATE_CHANGED: &str = "OperatorTemplateChanged";
    /// A field or action the runtime asks for is not built in this operator version yet.
    pub const NOT_SUPPORTED_YET: &str = "NotSupportedYet";
    /// The reconcile failed before it could decide anything (the message quotes the error).
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    /// The runtime was stopped by `promptflow.dev/stop`.
    pub const STOPPED_BY_USER: &str = "StoppedByUser";
    /// The runtime is used (or was recently): its idle deadline is ahead.
    pub const ACTIVE: &str = "Active";
    /// The runtime stops soon unless it is used.
    pub const IDLE_SOON: &str = "IdleSoon";
    /// The activity proxy could not be asked; the runtime is not stopped while this lasts.
    pub const ACTIVITY_UNKNOWN: &str = "ActivityUnknown";
    /// Idle stop does not apply (`timeout: "0"`).
    pub const NEVER_IDLE: &str = "NeverIdle";

    /// The registry refused the credentials of the runtime's pull identity.
    pub const UNAUTHORIZED: &str = "Unauthorized";
    /// The image's repository or tag does not exist in the registry.
    pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
    /// The registry's answer did not parse.
    pub const REGISTRY_INVALID: &str = "RegistryInvalid";
    /// The image's tags do not follow the `YYYYMMDD.vN` scheme, so no newer version is known.
    pub const NOT_VERSIONED: &str = "NotVersioned";
    /// The runtime is being moved to a newer version.
    pub const UPDATING: &str = "Updating";
    /// The runtime's instance has not restarted yet to take the runtime's container.
    pub const WAITING_FOR_INSTANCE_RESTART: &str = "WaitingForInstanceRestart";
    /// The instance is stopped because its `spec.state` is `Stopped`.
    pub const STOPPED_BY_SPEC: &str = "StoppedBySpec";
    /// The runtime's ComputeInstance is stopped or stopping.
    pub const COMPUTE_INSTANCE_STOPPED: &str = "ComputeInstanceStopped";
    /// The compute instance the runtime runs on failed (its own reason says why).
    pub const COMPUTE_INSTANCE_FAILED: &str = "ComputeInstanceFailed";
    /// The instance restarts because runtimes were attached, detached or changed.
    pub const RUNTIMES_CHANGED: &str = "RuntimesChanged";
    /// A schedule stopped the instance.
    pub const SCHEDULED_STOP: &str = "ScheduledStop";
    /// A schedule started the instance.
    pub const SCHEDULED_START: &str = "ScheduledStart";
    /// No runtime on the instance had activity for `idleTimeBeforeShutdown`.
    pub const IDLE_SHUTDOWN: &str = "IdleShutdown";
    /// A schedule's cron expression or time zone cannot be used.
    pub const INVALID_SCHEDULE: &str = "InvalidSchedule";
    /// The spec is accepted.
    pub const ACCEPTED: &str = "Accepted";
    /// The instance runs and is watched for idleness.
    pub const IDLE_WATCHED: &str = "IdleWatched";
    /// `idleTimeBeforeShutdown` is below the operator's minimum, which applies instead.
    pub const IDLE_TIME_RAISED: &str = "IdleTimeRaised";
    /// The instance starts (`spec.state` back to Running, or `promptflow.dev/start`).
    pub const STARTING: &str = "Starting";
    /// The instance is being stopped.
    pub const STOPPING: &str = "Stopping";

    /// A Service of the runtime's name exists that the operator did not create for this runtime
    /// (another owner, or none): it is left untouched and the runtime waits.
    pub const SERVICE_CONFLICT: &str = "ServiceConflict";
    /// The pod or Service of an earlier runtime of this name (deleted, another uid) is still
    /// there: the garbage collector removes it, then this runtime gets its own. No user action.
    pub const PREDECESSOR_CLEANUP: &str = "PredecessorCleanup";
    /// A pod of the runtime pod's name exists that the operator did not create for this runtime:
    /// it is left untouched (never adopted, read, replaced or deleted) and the runtime waits.
    pub const POD_CONFLICT: &str = "PodConflict";
    /// With `--runtime-network-policy`, a NetworkPolicy of the operator's name in the namespace
    /// was not made by the operator: it is left untouched and the runtime waits.
    pub const NETWORK_POLICY_CONFLICT: &str = "NetworkPolicyConflict";
    /// A compute instance keeps its pod as it is: a runtime it carries cannot be resolved now,
    /// and a restart would take that runtime off.
    pub const RUNTIME_UNRESOLVED: &str = "RuntimeUnresolved";
    /// The instance's disk claim is Bound.
    pub const CLAIM_BOUND: &str = "ClaimBound";
    /// The instance's disk claim waits for a volume (none matches, no provisioner made one, or
    /// its class binds when the pod is scheduled).
    pub const CLAIM_PENDING: &str = "ClaimPending";
    /// The instance's disk claim lost its volume.
    pub const CLAIM_LOST: &str = "ClaimLost";
    /// A PersistentVolumeClaim of the disk's name exists that the operator did not make for
    /// this instance: it is left untouched.
    pub const STORAGE_CONFLICT: &str = "StorageConflict";
    /// The disk claim cannot take `spec.storage.size`: the API server refused to grow it (its
    /// class does not allow expansion), or the size asks it to shrink.
    pub const STORAGE_RESIZE_REFUSED: &str = "StorageResizeRefused";
    /// The disk claim's storage class is not the one `spec.storage.storageClassName` asks.
    pub const STORAGE_MISMATCH: &str = "StorageMismatch";
    /// The API server refused to create the disk claim (a storage quota, a LimitRange).
    pub const CLAIM_REJECTED: &str = "ClaimRejected";

    /// Reasons of a runtime that is not available on purpose: it is at rest, neither
    /// `Reconciling` nor `Stalled` (Argo CD: Suspended).
    pub const AT_REST: [&str; 3] = [STOPPED_IDLE, STOPPED_BY_USER, COMPUTE_INSTANCE_STOPPED];

    /// Reasons that stop a runtime until someone acts although they are no Warning of their own
    /// (the kubelet's events already are): `Stalled` besides [`PROBLEMS`].
    pub const FAILING: [&str; 2] = [CRASH_LOOP_BACK_OFF, OOM_KILLED];

    /// Problems the operator or the cluster may still get past by themselves (a retry, a node the
    /// autoscaler adds, a pull that succeeds on the next try): `Reconciling`, not `Stalled`, so a
    /// GitOps tool waits instead of failing at the first blip.
    pub const TRANSIENT: [&str; 4] = [POD_UNSCHEDULABLE, ERR_IMAGE_PULL, RECONCILE_FAILED, CLAIM_PENDING];

    /// Reasons that ask the user to act: a transition into one of them is a Warning event.
    pub const PROBLEMS: [&str; 24] = [
        CLAIM_PENDING,
        CLAIM_REJECTED,
        CLAIM_LOST,
        STORAGE_CONFLICT,
        SERVICE_CONFLICT,
        NETWORK_POLICY_CONFLICT,
        POD_CONFLICT,
        POD_UNSCHEDULABLE,
        SERVICE_ACCOUNT_NOT_FOUND,
        PULL_SECRET_NOT_FOUND,
        PULL_SECRET_INVALID,
        QUOTA_EXCEEDED,
        UNKNOWN_INSTANCE_TYPE,
        FLOW_NOT_FOUND,
        FLOW_INVALID,
        ERR_IMAGE_PULL,
        IMAGE_PULL_BACK_OFF,
        INVALID_IMAGE_NAME,
        COMPUTE_INSTANCE_NOT_FOUND,
        RESTART_NOT_ACKNOWLEDGED,
        POD_REJECTED,
        COMPUTE_INSTANCE_UNSUPPORTED,
        RECONCILE_FAILED,
        COMPUTE_INSTANCE_FAILED,
    ];
}
