//! Report: the one place a runtime's status is written and its events are published. The status
//! is composed, compared with the last one, and patched only on difference; one event per
//! transition of phase or reason, never one per reconcile.

use crate::controller::recorder::{Draft, EventType};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::status;
pub use super::status::Report;
use super::{Context, MANAGER};
use crate::api::conditions::{self, reasons};
use crate::api::{PromptFlowRuntime, PromptFlowRuntimeStatus, RuntimePhase};
use crate::controller::status_patch;
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

/// Composes the status, patches it only on difference, and announces transitions.
pub async fn write_status(runtime: &PromptFlowRuntime, ctx: &Context, report: &Report<'_>) -> Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    // A first status held back is not the runtime's yet: this write is its first (always made,
    // its events announced), composed over the held one so what that decided (the version pin,
    // the size) is kept even by a write that does not say it (a stop, a conflict).
    let held = ctx.own_writes.held_status(runtime);
    let baseline = if held.is_some() {
        None
    } else {
        ctx.own_writes.status_baseline(runtime)
    };
    let previous = baseline.as_ref();
    let new = status::compose(held.as_ref().or(previous), report, runtime.metadata.generation, &now);
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
    let Some(updated) = status_patch::write(&ctx.client, runtime, &new, MANAGER).await? else {
        // Deleted and made again under its name since this reconcile read it: nothing of the old
        // one is written onto the new one, which is reconciled on its own.
        tracing::debug!(name = %runtime.name_any(), "runtime replaced under its name; its status not written");
        return Ok(());
    };
    // Events after the write: a failed write retries, and must not repeat its events.
    for notice in transitions(previous, &new, report.verdict.problem) {
        publish(ctx, runtime, &notice).await;
    }
    if let Some(notice) = report.notice {
        publish(ctx, runtime, notice).await;
    }
    ctx.own_writes
        .wrote_status(runtime, updated.metadata.resource_version, new);
    Ok(())
}

/// Holds back a new runtime's first status (see `FIRST_STATUS_WAIT`): composed as it would be
/// written, kept for the next reconciles to decide from, not written, no event.
pub fn hold_first_status(runtime: &PromptFlowRuntime, ctx: &Context, report: &Report<'_>) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status::compose(None, report, runtime.metadata.generation, &now);
    ctx.own_writes.hold_status(runtime, &status);
}

/// The events a status change deserves: `Running` when the runtime starts serving; a Warning
/// when it moves into a reason that asks the user to act (`problem`); and, while it keeps
/// serving, a Warning when a change of its spec cannot be applied.
fn transitions(
    previous: Option<&PromptFlowRuntimeStatus>,
    new: &PromptFlowRuntimeStatus,
    problem: bool,
) -> Vec<Notice> {
    let mut notices = vec![];
    let was_running = previous.is_some_and(|p| p.phase == RuntimePhase::Running);
    let same_problem = same_problem(previous.and_then(|p| p.reason.as_deref()), new.reason.as_deref());
    let message = new.message.clone().unwrap_or_default();
    let reason = new.reason.clone().unwrap_or_default();
    if new.phase == RuntimePhase::Running && !was_running {
        // The one event of a start: what runs, and where clients reach it.
        let mut note = message.clone();
        if let Some(image) = &new.image {
            note.push_str(&format!("; image {image}"));
        }
        if let Some(url) = &new.url {
            note.push_str(&format!("; reach it at {url}"));
        }
        notices.push(Notice::normal("Running", note));
    } else if new.phase == RuntimePhase::NotAvailable && !same_problem && problem {
        notices.push(Notice::warning(&reason, message));
    }
    let not_applied = |status: Option<&PromptFlowRuntimeStatus>| {
        status?
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::SPEC_APPLIED && c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if new.phase == RuntimePhase::Running
        && let Some((reason, message)) = not_applied(Some(new))
        && not_applied(previous).map(|(r, _)| r) != Some(reason.clone())
    {
        notices.push(Notice::warning(
            &reason,
            format!("the runtime keeps serving: {message}"),
        ));
    }
    notices
}

/// The kubelet alternates between reasons while it retries one problem (ErrImagePull and
/// ImagePullBackOff; CrashLoopBackOff and the exit's reason): those are one problem, one event.
fn same_problem(before: Option<&str>, now: Option<&str>) -> bool {
    fn family(reason: Option<&str>) -> Option<&str> {
        match reason {
            Some(reasons::ERR_IMAGE_PULL | reasons::IMAGE_PULL_BACK_OFF) => Some(reasons::ERR_IMAGE_PULL),
            Some(reasons::CRASH_LOOP_BACK_OFF | reasons::OOM_KILLED | "Error") => Some(reasons::CRASH_LOOP_BACK_OFF),
            other => other,
        }
    }
    family(before) == family(now)
}

/// The API server refuses an event whose note exceeds 1 KiB (in bytes, not characters): longer
/// notes are cut at a character boundary, with an ellipsis.
pub const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to fit an event.
pub fn event_note(note: &str) -> std::borrow::Cow<'_, str> {
    if note.len() <= MAX_NOTE_BYTES {
        return note.into();
    }
    const ELLIPSIS: &str = "…";
    let mut end = MAX_NOTE_BYTES - ELLIPSIS.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &note[..end]).into()
}

/// Publishes an event about a runtime or an instance; a failure is logged, never fails the
/// reconcile.
pub async fn publish<K: Resource<DynamicType = ()>>(ctx: &Context, object: &K, notice: &Notice) {
    let draft = Draft {
        type_: notice.type_,
        reason: &notice.reason,
        action: "Reconcile",
        note: &event_note(&notice.note),
    };
    if let Err(err) = ctx.recorder.publish(&draft, &object.object_ref(&())).await {
        warn!(name = ?object.meta().name, error = %err, "could not publish event");
    }
}

#[cfg(test)]
mod note_tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_by_bytes_at_a_character_boundary() {
        let japanese = "フローの環境ファイルが読めません。".repeat(40);
        assert!(japanese.chars().count() < 1000 && japanese.len() > MAX_NOTE_BYTES);
        let cut = event_note(&japanese);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{} bytes", cut.len());
        assert!(cut.ends_with('…') && japanese.starts_with(cut.trim_end_matches('…')));
        assert_eq!(event_note("short"), "short");
        let exact = "a".repeat(MAX_NOTE_BYTES);
        assert_eq!(event_note(&exact), exact);
    }
}
