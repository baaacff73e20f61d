//! A runtime on a compute instance has no pod of its own: the instance controller carries its
//! containers in the instance's pod (only with `acknowledgeRestart`, since attaching restarts the
//! instance). Here: how the runtime reads from that pod (its verdict), and the detach finalizer
//! that keeps a deleted runtime until the instance has let go of its container. The reconcile's
//! stages call these; nothing here calls back into them.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::info;

use super::plan::InstanceWork;
use super::status::{ConditionState, Verdict};
use super::{Context, pod_state};
use crate::api::conditions::{self, reasons};
use crate::api::{
    ComputeInstance, DETACH_FINALIZER, DesiredState, InstanceState, PromptFlowRuntime, RuntimePhase, annotations,
};
use crate::build::instance::{self as instance_pod, placement_in};
use crate::controller::index::Dependency;
use crate::error::Result;

/// Adds the detach finalizer when the runtime does not carry it yet.
pub async fn hold(ctx: &Context, runtime: &PromptFlowRuntime) -> Result<()> {
    if runtime.finalizers().iter().any(|f| f == DETACH_FINALIZER) {
        return Ok(());
    }
    let mut finalizers = runtime.finalizers().to_vec();
    finalizers.push(DETACH_FINALIZER.to_owned());
    set_finalizers(ctx, runtime, finalizers).await
}

/// The verdict on a runtime planned onto an instance: what keeps it from the instance, or how
/// its containers in the instance's pod stand. `placed`: the pod carries it in a slot.
pub fn verdict(
    ctx: &Context,
    runtime: &PromptFlowRuntime,
    work: &InstanceWork,
    instance: Option<&ComputeInstance>,
    live: Option<&Pod>,
    placed: bool,
) -> Verdict {
    match (&work.containers, instance) {
        _ if !work.acknowledged => Verdict::not_available(
            reasons::RESTART_NOT_ACKNOWLEDGED,
            format!(
                "attaching this runtime restarts compute instance {}; set spec.compute.instance.acknowledgeRestart to true to proceed",
                work.name
            ),
        ),
        // Still carried by the instance's pod (which keeps it as it is): it serves as before,
        // and SpecApplied says what to fix.
        (Err(_), Some(instance)) if placed => instance_verdict(instance, live, runtime, ctx),
        (Err(problem), _) => Verdict::not_available(problem.reason, problem.message.clone()),
        (_, None) => Verdict::not_available(
            reasons::COMPUTE_INSTANCE_NOT_FOUND,
            format!(
                "compute instance {} does not exist in namespace {}; create it or change spec.compute.instance.name",
                work.name,
                runtime.namespace().unwrap_or_default()
            ),
        ),
        (_, Some(instance)) => instance_verdict(instance, live, runtime, ctx),
    }
}

/// The runtime action annotations do not act on a runtime on a compute instance yet: its
/// lifecycle is the instance's. Said in the `Idle` condition instead of silently ignored.
pub fn actions_not_supported(runtime: &PromptFlowRuntime, instance: &str) -> Option<ConditionState> {
    let asked: Vec<&str> = [annotations::STOP, annotations::START, annotations::RESTART]
        .into_iter()
        .filter(|a| runtime.annotations().contains_key(*a))
        .collect();
    (!asked.is_empty()).then(|| {
        ConditionState::unknown(
            conditions::IDLE,
            reasons::NOT_SUPPORTED_YET,
            format!(
                "{} on a runtime that runs on a compute instance is not supported yet: stop or start compute instance {instance} instead",
                asked.join(", ")
            ),
        )
    })
}

/// The runtime's verdict from its instance and the instance's pod.
fn instance_verdict(
    instance: &ComputeInstance,
    live: Option<&Pod>,
    runtime: &PromptFlowRuntime,
    ctx: &Context,
) -> Verdict {
    let instance_name = instance.name_any();
    let status = instance.status.clone().unwrap_or_default();
    if instance.metadata.deletion_timestamp.is_some() {
        return Verdict::not_available(
            reasons::COMPUTE_INSTANCE_NOT_FOUND,
            format!("compute instance {instance_name} is being deleted"),
        );
    }
    if instance.spec.state == DesiredState::Stopped
        || matches!(status.state, InstanceState::Stopped | InstanceState::Stopping)
    {
        return Verdict::not_available(
            reasons::COMPUTE_INSTANCE_STOPPED,
            format!(
                "compute instance {instance_name} is {:?} ({}); the runtime runs when it starts",
                status.state,
                status.reason.unwrap_or_default()
            ),
        );
    }
    if status.state == InstanceState::Failed {
        return Verdict::not_available(
            reasons::COMPUTE_INSTANCE_FAILED,
            format!(
                "compute instance {instance_name} failed ({}: {}); the runtime runs once it is fixed",
                status.reason.unwrap_or_default(),
                status.message.unwrap_or_default()
            ),
        );
    }
    let Some(pod) = live.filter(|pod| pod.metadata.deletion_timestamp.is_none()) else {
        return Verdict::not_available(
            reasons::WAITING_FOR_INSTANCE_RESTART,
            format!("waiting for compute instance {instance_name} to start with this runtime"),
        );
    };
    let Some(placement) = placement_in(pod, runtime) else {
        return Verdict::not_available(
            reasons::WAITING_FOR_INSTANCE_RESTART,
            format!(
                "waiting for compute instance {instance_name} to restart and take this runtime (restarts wait up to {}s to take several runtimes at once)",
                ctx.instance_settings.batch.as_secs()
            ),
        );
    };
    let container = placement.runtime_container();
    let pod_name = pod.name_any();
    let status = pod.status.as_ref();
    let found = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == container));
    // The runtime's requirements installer (its own container beside the others, or an init
    // container before all of them): a failed install is this runtime's problem alone.
    let installer_name = placement.name("install-requirements", "req");
    let installer = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        })
        .find(|c| c.name == installer_name);
    if let Some(installer) = installer {
        if let Some(problem) = pod_state::container_problem(installer) {
            // An init container holds every container of the pod (the layout without pod-level
            // resources); a container of its own holds only this runtime.
            let beside = status
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|all| all.iter().any(|c| c.name == installer_name));
            let reach = if beside {
                "the instance's other runtimes are not affected"
            } else {
                "it installs before every container of the instance pod, so the instance's other runtimes wait too"
            };
            return Verdict {
                phase: RuntimePhase::NotAvailable,
                reason: problem.reason.clone(),
                message: format!(
                    "the flow's requirements cannot be installed: container {installer_name} of pod {pod_name}: {}: {}; fix the requirements file (kubectl logs {pod_name} -c {installer_name} --previous); {reach}",
                    problem.reason, problem.message
                ),
                problem: true,
            };
        }
        let installed = installer.ready
            || installer
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0);
        if !installed {
            return Verdict::not_available(
                reasons::POD_STARTING,
                format!("installing the flow's requirements (container {installer_name} of pod {pod_name})"),
            );
        }
    }
    match found {
        Some(state) if state.ready => Verdict {
            phase: RuntimePhase::Running,
            reason: reasons::POD_READY.to_owned(),
            message: format!("container {container} of pod {pod_name} is ready"),
            problem: false,
        },
        Some(state) => {
            let waiting = state.state.as_ref().and_then(|s| s.waiting.as_ref());
            match waiting
                .and_then(|w| w.reason.clone())
                .filter(|r| r != "ContainerCreating")
            {
                Some(reason) => Verdict::not_available(
                    &reason,
                    format!(
                        "container {container} of pod {pod_name}: {}",
                        waiting
                            .and_then(|w| w.message.clone())
                            .unwrap_or_else(|| reason.clone())
                    ),
                ),
                None => Verdict::not_available(
                    reasons::POD_STARTING,
                    format!("waiting for container {container} of pod {pod_name} to be ready"),
                ),
            }
        }
        None => Verdict::not_available(
            reasons::POD_STARTING,
            format!("waiting for container {container} of pod {pod_name} to start"),
        ),
    }
}

/// Whether no compute instance holds the runtime any more: no instance pod in its namespace
/// carries its container (an instance that is gone, stopped or being deleted carries nothing).
/// Every instance pod is looked at, not only the one the status names: a runtime that moved
/// away must wait for the instance it left.
pub fn detached(ctx: &Context, runtime: &PromptFlowRuntime) -> bool {
    let namespace = runtime.namespace().unwrap_or_default();
    let name = runtime.name_any();
    // Only the instance's own pod (its controller owner reference) holds the runtime: a pod
    // someone made with the instance's labels and annotation holds nothing.
    let holding = ctx.pods.in_namespace(&namespace, |pod_name, pod| {
        if pod.label(instance_pod::INSTANCE_LABEL).is_none() || !carries(pod, &name) {
            return None;
        }
        let instance = instance_pod::instance_name(pod_name);
        let free = ctx
            .instances
            .get(&ObjectRef::<ComputeInstance>::new(instance).within(&namespace))
            .is_none_or(|i| {
                i.metadata.deletion_timestamp.is_some()
                    || !pod.controlled_by(i.metadata.uid.as_deref())
                    || cannot_restart(&i)
            });
        (!free).then_some(())
    });
    holding.is_empty()
}

/// Whether an instance cannot make a pod now (its own service account or pull secret is gone or
/// invalid, it holds its pod for a runtime that cannot be resolved, or its new pod would be
/// refused): it cannot take a runtime off, so a runtime being deleted does not wait for it; its
/// container stays in the pod, unreachable (its Service goes), until the instance next restarts.
fn cannot_restart(instance: &ComputeInstance) -> bool {
    instance
        .status
        .as_ref()
        .and_then(|s| s.reason.as_deref())
        .is_some_and(|reason| {
            [
                reasons::SERVICE_ACCOUNT_NOT_FOUND,
                reasons::PULL_SECRET_NOT_FOUND,
                reasons::PULL_SECRET_INVALID,
                // Held for another runtime, or its new pod refused: no restart takes anyone off.
                reasons::RUNTIME_UNRESOLVED,
                reasons::POD_REJECTED,
            ]
            .contains(&reason)
        })
}

/// The instances a runtime waits on: the one it asks for and the one its status last named.
pub fn instances_watched(runtime: &PromptFlowRuntime) -> Vec<Dependency> {
    instances_watched_with(runtime, &[])
}

/// [`instances_watched`], and every instance whose pod carries the runtime now: a runtime that
/// moved on and was deleted waits for the one it left, which its spec and status no longer name.
pub fn instances_holding(ctx: &Context, runtime: &PromptFlowRuntime) -> Vec<Dependency> {
    let namespace = runtime.namespace().unwrap_or_default();
    let name = runtime.name_any();
    let carrying: Vec<String> = ctx.pods.in_namespace(&namespace, |pod_name, pod| {
        (pod.label(instance_pod::INSTANCE_LABEL).is_some() && carries(pod, &name))
            .then(|| instance_pod::instance_name(pod_name).to_owned())
    });
    instances_watched_with(runtime, &carrying)
}

fn instances_watched_with(runtime: &PromptFlowRuntime, carrying: &[String]) -> Vec<Dependency> {
    let namespace = runtime.namespace().unwrap_or_default();
    let last = runtime
        .status
        .as_ref()
        .and_then(|s| s.compute.clone())
        .filter(|c| c != "Serverless");
    let asked = runtime.spec.compute.instance.as_ref().map(|i| i.name.clone());
    let mut watched = vec![];
    for instance in [asked, last].into_iter().flatten().chain(carrying.iter().cloned()) {
        let dependency = Dependency::Instance(namespace.clone(), instance);
        if !watched.contains(&dependency) {
            watched.push(dependency);
        }
    }
    watched
}

/// Whether a cached instance pod carries the runtime `name` in one of its slots.
fn carries(pod: &crate::controller::lean::CachedPod, name: &str) -> bool {
    instance_pod::slots_in(pod.annotation(instance_pod::RUNTIMES_ANNOTATION))
        .into_iter()
        .flatten()
        .any(|slot| slot == name)
}

/// Removes the detach finalizer once the instance let go (a deleted runtime, or one that moved
/// to serverless). Returns whether the runtime may go on (no finalizer is left to wait for).
pub async fn release(ctx: &Context, runtime: &PromptFlowRuntime) -> Result<bool> {
    if !runtime.finalizers().iter().any(|f| f == DETACH_FINALIZER) {
        return Ok(true);
    }
    if !detached(ctx, runtime) {
        return Ok(false);
    }
    let finalizers = runtime
        .finalizers()
        .iter()
        .filter(|f| *f != DETACH_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(ctx, runtime, finalizers).await?;
    info!(name = %runtime.name_any(), namespace = ?runtime.namespace(), "detached from its compute instance");
    Ok(true)
}

/// Writes the finalizer list, guarded by the resource version (a conflict retries).
async fn set_finalizers(ctx: &Context, runtime: &PromptFlowRuntime, finalizers: Vec<String>) -> Result<()> {
    let api: Api<PromptFlowRuntime> = Api::namespaced(ctx.client.clone(), &runtime.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": runtime.resource_version()},
    });
    match api
        .patch(&runtime.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing holds it.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}
