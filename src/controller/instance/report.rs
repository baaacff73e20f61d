//! Report: the instance's status, written only when it differs from what is there (or what this
//! operator last wrote, when the cache has not caught up), and one event per state transition.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::ObjectRef;

use crate::api::conditions::{self, reasons};
use crate::api::{
    ComputeInstance, ComputeInstanceStatus, HandledActions, InstanceState, ScheduledAction, StorageStatus,
};
use crate::build::instance::ResourceLayout;
use crate::controller::context::{Context, MANAGER};
use crate::controller::runtime::pod_state::{self, PodState};
use crate::controller::runtime::report::{Notice, publish};
use crate::controller::runtime::status::{ConditionState, condition, progress, set_condition};
use crate::error::Result;

/// What a reconcile reports about an instance.
pub struct InstanceReport {
    /// The state.
    pub state: InstanceState,
    /// Why, CamelCase.
    pub reason: String,
    /// For humans.
    pub message: String,
    /// The runtimes the live pod carries.
    pub runtimes: Vec<String>,
    /// The next scheduled action.
    pub next: Option<ScheduledAction>,
    /// Conditions besides `Ready`.
    pub conditions: Vec<ConditionState>,
    /// The idle clock, when it moved.
    pub last_activity: Option<Time>,
    /// Action values handled now.
    pub handled: HandledActions,
    /// How the pod (the live one, or the one being made) holds the instance's size.
    pub layout: Option<ResourceLayout>,
    /// The instance's disk.
    pub storage: Option<StorageStatus>,
}

impl InstanceReport {
    /// The report of a running instance whose pod is kept as it is (nothing is made or
    /// restarted): its state follows the live pod, and `reason` and `message` say what holds it.
    pub fn holding(self, previous: InstanceState, live: Option<&Pod>, reason: String, message: String) -> Self {
        let ready = live.map(|pod| matches!(pod_state::classify(pod), PodState::Ready { .. }));
        Self {
            state: crate::instance::running_state(Some(previous), ready),
            reason,
            message,
            ..self
        }
    }
}

/// The status over `previous` at `generation`; transitions at `now`.
pub fn compose(
    previous: Option<&ComputeInstanceStatus>,
    report: &InstanceReport,
    generation: Option<i64>,
    now: &Time,
) -> ComputeInstanceStatus {
    let previous = previous.cloned().unwrap_or_default();
    let ready = ConditionState::new(
        conditions::READY,
        report.state == InstanceState::Running,
        &report.reason,
        report.message.clone(),
    );
    let progress = progress(
        report.state == InstanceState::Running,
        report.state == InstanceState::Stopped,
        report.state == InstanceState::Failed
            || (report.state != InstanceState::Running && reasons::PROBLEMS.contains(&report.reason.as_str())),
        &report.reason,
        &report.message,
    );
    let mut all = vec![];
    for state in std::iter::once(&ready).chain(&report.conditions).chain(&progress) {
        set_condition(&mut all, &previous.conditions, condition(state, generation, now));
    }
    all.sort_by(|a, b| a.type_.cmp(&b.type_));
    let handled = &report.handled;
    let old = previous.handled_actions.clone().unwrap_or_default();
    let handled_actions = HandledActions {
        start: handled.start.clone().or(old.start),
        stop: handled.stop.clone().or(old.stop),
        ..old
    };
    ComputeInstanceStatus {
        state: report.state,
        runtimes: report.runtimes.clone(),
        next_scheduled_action: report.next.clone(),
        reason: Some(report.reason.clone()),
        message: Some(report.message.clone()),
        observed_generation: generation,
        last_activity_time: report.last_activity.clone().or(previous.last_activity_time),
        handled_actions: (handled_actions != HandledActions::default()).then_some(handled_actions),
        resource_layout: report.layout.map(|layout| layout.as_str().to_owned()),
        storage: report.storage.clone(),
        conditions: all,
    }
}

/// Writes the status when it changed, and publishes the state transition.
pub async fn write(instance: &ComputeInstance, ctx: &Context, report: &InstanceReport) -> Result<()> {
    let now = Time(jiff::Timestamp::now());
    let previous = instance.status.as_ref();
    let new = compose(previous, report, instance.metadata.generation, &now);
    if previous == Some(&new) {
        return Ok(());
    }
    let Some(updated) = crate::controller::status_patch::write(&ctx.client, instance, &new, MANAGER).await? else {
        // Deleted and made again under its name since this reconcile read it: the new one is
        // reconciled on its own.
        return Ok(());
    };
    // One event per state transition, and one per new problem while the state holds.
    let problem = new.state == InstanceState::Failed || reasons::PROBLEMS.contains(&report.reason.as_str());
    let moved = previous.is_none_or(|p| p.state != new.state || (problem && p.reason != new.reason));
    if moved {
        let notice = if problem {
            Notice::warning(&report.reason, report.message.clone())
        } else {
            Notice::normal(&report.reason, report.message.clone())
        };
        publish(ctx, instance, &notice).await;
    }
    ctx.instance_memory.wrote_status(
        ObjectRef::from_obj(instance),
        instance.metadata.resource_version.clone(),
        updated.metadata.resource_version,
        new,
    );
    Ok(())
}
