//! The idle step of a Running serverless runtime: requeue at its next look, ask the activity
//! proxy only then, warn before the deadline, and stop (or delete) it at the deadline. The
//! decisions are [`crate::idle`]'s; this step does the one HTTP GET and the writes they call for.
//! `live` is the pod the operator made for this runtime (the context hands out no other), so
//! only it is asked or stopped; a runtime whose proxy reports requests in flight is in use now.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use tracing::info;

use super::Context;
use super::apply;
use super::report::Notice;
use super::status::{ConditionState, Verdict};
use crate::api::conditions::{self, reasons};
use crate::api::{IdleAction, PromptFlowRuntime, annotations};
use crate::error::Result;
use crate::idle::{self, IdleDue, IdlePolicy};

/// How soon an unanswered activity query is tried again; the runtime is never stopped meanwhile.
const UNKNOWN_RETRY: Duration = Duration::from_secs(30);

/// What the idle step came to.
#[derive(Default)]
pub struct IdleOutcome {
    /// The `Idle` condition.
    pub condition: Option<ConditionState>,
    /// When to look again.
    pub requeue: Option<Duration>,
    /// Newer activity the proxy reported, to record in the status.
    pub last_activity: Option<Time>,
    /// The runtime was stopped: its new verdict.
    pub stopped: Option<Verdict>,
    /// The runtime object was deleted: nothing more to write.
    pub deleted: bool,
    /// An event to publish.
    pub notice: Option<Notice>,
}

/// Runs the idle step for a runtime whose pod `live` is Ready.
pub async fn idle_step(runtime: &PromptFlowRuntime, ctx: &Context, live: &Pod) -> Result<IdleOutcome> {
    let Some(policy) = idle::policy(runtime, &ctx.idle) else {
        return Ok(IdleOutcome {
            condition: Some(ConditionState::new(
                conditions::IDLE,
                false,
                reasons::NEVER_IDLE,
                "spec.idle.timeout is 0: the runtime is never stopped for idleness",
            )),
            ..Default::default()
        });
    };
    let now = Timestamp::now();
    let mut last = idle::last_known_activity(runtime, ctx.started, idle::pod_created(live), now);
    let mut due = idle::due(&policy, last, now);
    let mut recorded = None;
    if !matches!(due, IdleDue::Nothing { .. }) {
        // The one moment the proxy is asked: the warning time, or the deadline.
        let ip = live.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        match ctx.probe.read(&ip).await {
            Ok(report) => {
                if let Some(seen) = report.last_activity_time.filter(|seen| *seen > last) {
                    last = seen;
                    recorded = Some(Time(seen));
                    due = idle::due(&policy, last, now);
                }
            }
            Err(why) => {
                ctx.metrics.activity_query_failed();
                return Ok(IdleOutcome {
                    condition: Some(ConditionState::unknown(
                        conditions::IDLE,
                        reasons::ACTIVITY_UNKNOWN,
                        format!(
                            "cannot ask the activity proxy ({why}); the runtime is not stopped while its activity is unknown, asking again every {}s",
                            UNKNOWN_RETRY.as_secs()
                        ),
                    )),
                    requeue: Some(UNKNOWN_RETRY),
                    ..Default::default()
                });
            }
        }
    }
    let timeout = idle::format_duration(policy.timeout);
    match due {
        IdleDue::Nothing { look_at, .. } => Ok(IdleOutcome {
            condition: Some(ConditionState::new(
                conditions::IDLE,
                false,
                reasons::ACTIVE,
                format!("it stops after {timeout} without requests (spec.idle.timeout)"),
            )),
            requeue: Some(idle::until(now, look_at)),
            last_activity: recorded,
            ..Default::default()
        }),
        IdleDue::Warning { deadline } => {
            let message = format!(
                "no activity for a while: it stops at {deadline} unless it is used; send a request or set the {} annotation to keep it",
                annotations::LAST_ACTIVITY
            );
            let already_warned = runtime
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::IDLE))
                .is_some_and(|c| c.reason == reasons::IDLE_SOON);
            if !already_warned {
                ctx.metrics.idle_warning();
            }
            Ok(IdleOutcome {
                notice: (!already_warned).then(|| Notice::warning(reasons::IDLE_SOON, message.clone())),
                condition: Some(ConditionState::new(conditions::IDLE, true, reasons::IDLE_SOON, message)),
                requeue: Some(idle::until(now, deadline)),
                last_activity: recorded,
                ..Default::default()
            })
        }
        IdleDue::Stop => cull(runtime, ctx, live, &policy, &timeout).await,
    }
}

/// Stops the runtime (deletes its pod, keeps the object and its Service) or deletes it.
async fn cull(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    live: &Pod,
    policy: &IdlePolicy,
    timeout: &str,
) -> Result<IdleOutcome> {
    let name = runtime.name_any();
    let namespace = runtime.namespace().unwrap_or_default();
    match policy.action {
        IdleAction::Stop => {
            apply::delete_pod(ctx, live, runtime.uid().as_deref()).await?;
            ctx.metrics.culled("stop");
            info!(%name, %namespace, %timeout, "stopped idle runtime");
            let message = format!(
                "stopped after {timeout} without activity; set a new value of the {} annotation (or change the spec) to start it again",
                annotations::START
            );
            Ok(IdleOutcome {
                condition: Some(ConditionState::new(
                    conditions::IDLE,
                    true,
                    reasons::STOPPED_IDLE,
                    message.clone(),
                )),
                stopped: Some(Verdict::not_available(reasons::STOPPED_IDLE, message.clone())),
                notice: Some(Notice::normal(reasons::STOPPED_IDLE, message)),
                ..Default::default()
            })
        }
        IdleAction::Delete => {
            let note = format!("deleting the runtime after {timeout} without activity (spec.idle.action Delete)");
            super::report::publish(ctx, runtime, &Notice::normal(reasons::STOPPED_IDLE, note)).await;
            let api: Api<PromptFlowRuntime> = Api::namespaced(ctx.client.clone(), &namespace);
            // Only this runtime: one recreated under its name meanwhile is not idle.
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: runtime.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(err) => return Err(err.into()),
            }
            ctx.metrics.culled("delete");
            info!(%name, %namespace, %timeout, "deleted idle runtime");
            Ok(IdleOutcome {
                deleted: true,
                ..Default::default()
            })
        }
    }
}
