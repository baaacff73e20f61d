//! Report: the one place a runtime's status is written and its events are published. The status
//! is composed, compared with the last one, and patched only on difference; one event per
//! transition of phase or reason, never one per reconcile.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use super::plan::{IdentityCondition, PodFacts};
use super::status::{self, StatusInputs, Verdict};
use super::{Context, MANAGER};
use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, PromptFlowRuntimeStatus, RuntimePhase};
use crate::error::Result;

/// An event to tell the user.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub note: String,
}

impl Notice {
    /// A Normal event.
    pub fn normal(reason: &str, note: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason: reason.to_owned(),
            note,
        }
    }

    /// A Warning event.
    pub fn warning(reason: &str, note: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note,
        }
    }
}

/// Everything the status is written from.
pub struct Report<'a> {
    /// The verdict: phase, reason, message.
    pub verdict: &'a Verdict,
    /// The `IdentityResolved` condition.
    pub identity: &'a IdentityCondition,
    /// `Serverless` or the instance's name.
    pub compute: &'a str,
    /// Image, version and size, once a pod was planned.
    pub facts: Option<&'a PodFacts>,
    /// The pull is anonymous (no credentials for the image's registry).
    pub anonymous_pull: bool,
}

/// Composes the status, patches it only on difference, and announces transitions.
pub async fn write_status(runtime: &PromptFlowRuntime, ctx: &Context, report: &Report<'_>) -> Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let baseline = ctx.own_writes.status_baseline(runtime);
    let previous = baseline.as_ref();
    let new = status::compose(&StatusInputs {
        previous,
        verdict: report.verdict,
        identity: report.identity,
        compute: report.compute,
        facts: report.facts,
        generation: runtime.metadata.generation,
        now: &now,
    });
    if previous == Some(&new) {
        return Ok(());
    }
    tracing::debug!(
        name = %runtime.name_any(),
        resource_version = ?runtime.metadata.resource_version,
        from = ?previous.and_then(|p| p.reason.as_deref()),
        to = ?new.reason,
        "status changed"
    );
    let patch = serde_json::json!({
        "apiVersion": PromptFlowRuntime::api_version(&()),
        "kind": PromptFlowRuntime::kind(&()),
        "status": new,
    });
    let api: Api<PromptFlowRuntime> = Api::namespaced(ctx.client.clone(), &runtime.namespace().unwrap_or_default());
    let updated = api
        .patch_status(
            &runtime.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    // Events after the write: a failed write retries, and must not repeat its events.
    for notice in transitions(previous, &new, report.anonymous_pull) {
        publish(ctx, runtime, &notice).await;
    }
    ctx.own_writes
        .wrote_status(runtime, updated.metadata.resource_version, new);
    Ok(())
}

/// The events a status change deserves: `Running` when it starts serving, a Warning when it
/// moves into a reason that asks the user to act.
fn transitions(
    previous: Option<&PromptFlowRuntimeStatus>,
    new: &PromptFlowRuntimeStatus,
    anonymous_pull: bool,
) -> Vec<Notice> {
    let mut notices = vec![];
    let identity_message = |status: Option<&PromptFlowRuntimeStatus>| {
        status?
            .conditions
            .iter()
            .find(|c| c.type_ == crate::api::conditions::IDENTITY_RESOLVED)
            .map(|c| c.message.clone())
    };
    let identity_now = identity_message(Some(new));
    if anonymous_pull && identity_message(previous) != identity_now {
        notices.push(Notice::warning(
            "NoRegistryCredentials",
            identity_now.unwrap_or_default(),
        ));
    }
    let was_running = previous.is_some_and(|p| p.phase == RuntimePhase::Running);
    // The kubelet alternates ErrImagePull and ImagePullBackOff while it retries: one problem.
    fn problem(reason: Option<&str>) -> Option<&str> {
        match reason {
            Some(reasons::ERR_IMAGE_PULL | reasons::IMAGE_PULL_BACK_OFF) => Some(reasons::ERR_IMAGE_PULL),
            other => other,
        }
    }
    let same_reason = problem(previous.and_then(|p| p.reason.as_deref())) == problem(new.reason.as_deref());
    let message = new.message.clone().unwrap_or_default();
    let reason = new.reason.clone().unwrap_or_default();
    if new.phase == RuntimePhase::Running && !was_running {
        notices.push(Notice::normal("Running", message));
    } else if !same_reason && reasons::PROBLEMS.contains(&reason.as_str()) {
        notices.push(Notice::warning(&reason, message));
    }
    notices
}

/// Publishes an event; a failure is logged, never fails the reconcile.
pub async fn publish(ctx: &Context, runtime: &PromptFlowRuntime, notice: &Notice) {
    let event = Event {
        type_: notice.type_,
        reason: notice.reason.clone(),
        note: Some(notice.note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &runtime.object_ref(&())).await {
        warn!(name = %runtime.name_any(), error = %err, "could not publish event");
    }
}
