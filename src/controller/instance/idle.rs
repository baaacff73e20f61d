//! Idle shutdown of a running compute instance: it stops when none of its runtimes has had
//! activity for `idleTimeBeforeShutdown`. Activity is what each runtime's activity proxy reports,
//! the runtimes' `promptflow.dev/last-activity` annotations, the instance becoming Running,
//! the start of its current pod, and this operator's start (nothing earlier is known after a
//! restart). The proxies are asked only at the deadline; a proxy with requests in flight is
//! activity now. Azure's rule holds: lowering the setting below the time already idle resets
//! the idle clock to zero instead of stopping the instance at once.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, reasons};
use crate::api::{ComputeInstance, InstanceState, PromptFlowRuntime};
use crate::build::instance::placement_in;
use crate::controller::context::Context;
use crate::controller::runtime::status::ConditionState;
use crate::idle;

/// How soon an unanswered activity query is tried again; the instance keeps running meanwhile.
const UNKNOWN_RETRY: Duration = Duration::from_secs(30);

/// What the idle look came to.
#[derive(Default)]
pub struct IdleLook {
    /// The `Idle` condition.
    pub condition: Option<ConditionState>,
    /// The deadline passed without activity: stop.
    pub due: bool,
    /// When to look again.
    pub requeue: Option<Duration>,
    /// The idle clock to record in `status.lastActivityTime`.
    pub last_activity: Option<Time>,
}

/// The idle timeout that applies, and whether the operator's minimum raised it.
pub fn timeout(instance: &ComputeInstance, minimum: Duration) -> Option<(Duration, bool)> {
    let asked = idle::parse_duration(instance.spec.idle_time_before_shutdown.as_deref()?)?;
    Some((asked.max(minimum), asked < minimum))
}

/// Looks at a Running instance whose pod is `live`, carrying `runtimes`.
pub async fn look(
    instance: &ComputeInstance,
    ctx: &Context,
    live: &Pod,
    runtimes: &[&PromptFlowRuntime],
    now: Timestamp,
) -> IdleLook {
    let Some((timeout, raised)) = timeout(instance, ctx.instance_settings.min_idle) else {
        return IdleLook::default();
    };
    let status = instance.status.clone().unwrap_or_default();
    let stored = |time: &Time| idle::add(time.0, Duration::from_secs(1));
    let running_since = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY && c.status == "True")
        .map(|c| stored(&c.last_transition_time));
    let annotated = runtimes.iter().filter_map(|rt| idle::annotated_activity(rt));
    // The pod's own start counts (a restart to take a runtime is a fresh start), and so does the
    // instance turning Running now, before its status says so.
    let pod_started = idle::pod_created(live).map(|t| idle::add(t, Duration::from_secs(1)));
    let running_since = running_since.or(Some(now));
    let mut last = [
        Some(ctx.started),
        running_since,
        pod_started,
        status.last_activity_time.as_ref().map(stored),
    ]
    .into_iter()
    .flatten()
    .chain(annotated)
    .max()
    .unwrap_or(ctx.started);
    // Azure's rule: a spec change that leaves the instance already past its (new) deadline resets
    // the idle clock instead of stopping it at once.
    let spec_changed = status.observed_generation != instance.metadata.generation;
    let mut recorded = None;
    if spec_changed && status.state == InstanceState::Running && idle::add(last, timeout) <= now {
        last = now;
        recorded = Some(Time(now));
    }
    let mut unknown = None;
    if idle::add(last, timeout) <= now {
        // The one moment the proxies are asked.
        let ip = live.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        for runtime in runtimes {
            let Some(placement) = placement_in(live, runtime) else {
                continue;
            };
            match ctx.probe.read_port(&ip, placement.activity_port).await {
                Ok(report) => {
                    if let Some(seen) = report.last_activity_time.filter(|seen| *seen > last) {
                        last = seen;
                        recorded = Some(Time(seen));
                    }
                }
                Err(why) => {
                    ctx.metrics.activity_query_failed();
                    unknown = Some(why);
                }
            }
        }
    }
    let shown = idle::format_duration(timeout);
    let deadline = idle::add(last, timeout);
    if let Some(why) = unknown.filter(|_| deadline <= now) {
        return IdleLook {
            condition: Some(ConditionState::unknown(
                conditions::IDLE,
                reasons::ACTIVITY_UNKNOWN,
                format!(
                    "cannot ask a runtime's activity proxy ({why}); the instance is not stopped while activity is unknown, asking again every {}s",
                    UNKNOWN_RETRY.as_secs()
                ),
            )),
            requeue: Some(UNKNOWN_RETRY),
            last_activity: recorded,
            ..Default::default()
        };
    }
    let (reason, message) = if raised {
        (
            reasons::IDLE_TIME_RAISED,
            format!(
                "spec.idleTimeBeforeShutdown is below the operator's minimum; {shown} applies: the instance stops at {deadline} unless a runtime is used"
            ),
        )
    } else {
        (
            reasons::IDLE_WATCHED,
            format!("the instance stops at {deadline} unless a runtime is used (spec.idleTimeBeforeShutdown {shown})"),
        )
    };
    IdleLook {
        condition: Some(ConditionState::new(conditions::IDLE, false, reason, message)),
        due: deadline <= now,
        requeue: Some(idle::until(now, deadline)),
        last_activity: recorded,
    }
}
