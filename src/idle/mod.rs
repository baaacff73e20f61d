//! Idle stop: when a runtime's deadline is, from what activity is known, and what is due at a
//! given moment. Pure; the controller asks the activity proxy ([`probe`]) only at a deadline.
//!
//! Deadline = last known activity + `spec.idle.timeout`. Known activity is the latest of: the
//! runtime becoming Running, the start of its current pod (a pod made by start, update, restart,
//! a spec change or the operator's own replacement is a fresh start, whatever the status still
//! says about the pod before it), `status.lastActivityTime` (what the proxy reported at an
//! earlier look), the `promptflow.dev/last-activity` annotation, and the moment this operator
//! process started (after a restart nothing is known, so it counts as "now": never cull early).
//! A warning is due a lead time before the deadline.

pub mod probe;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::api::conditions;
use crate::api::{IdleAction, PromptFlowRuntime, annotations};

/// The idle timeout of a serverless runtime without `spec.idle.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Operator settings for idle stop.
#[derive(Clone, Debug, PartialEq)]
pub struct IdleSettings {
    /// The warning comes this share of the timeout before the deadline (percent) …
    pub warning_percent: u32,
    /// … but at most this long before it.
    pub warning_max: Duration,
}

impl Default for IdleSettings {
    fn default() -> Self {
        Self {
            warning_percent: 10,
            warning_max: Duration::from_secs(600),
        }
    }
}

/// A runtime's idle policy.
#[derive(Clone, Debug, PartialEq)]
pub struct IdlePolicy {
    /// How long without activity.
    pub timeout: Duration,
    /// How long before the deadline the warning comes.
    pub lead: Duration,
    /// Stop (delete the pod) or delete the runtime.
    pub action: IdleAction,
}

/// The runtime's idle policy; `None` when it never stops (`timeout: "0"`), runs on a compute
/// instance (the instance's idle shutdown covers it), or the timeout does not parse.
pub fn policy(runtime: &PromptFlowRuntime, settings: &IdleSettings) -> Option<IdlePolicy> {
    runtime.spec.compute.serverless.as_ref()?;
    let idle = runtime.spec.idle.clone().unwrap_or_default();
    let timeout = match idle.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(text) => parse_duration(text)?,
    };
    if timeout.is_zero() {
        return None;
    }
    let lead = (timeout * settings.warning_percent / 100).min(settings.warning_max);
    Some(IdlePolicy {
        timeout,
        lead,
        action: idle.action,
    })
}

/// A Go duration (`30m`, `1h30m`, `1.5h`), as the CRD validates it.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let nanos = go_parse_duration::parse_duration(text).ok()?;
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

/// When `pod` was created: a new pod is a fresh start. (Not its latest Ready transition: a
/// readiness flap is no use of the runtime.)
pub fn pod_created(pod: &Pod) -> Option<Timestamp> {
    pod.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// The latest activity known without asking the proxy, for a runtime whose current pod was
/// created at `pod_created`, judged at `now` as Running. A runtime whose status does not say
/// Ready yet is turning Running at this moment (the status is written after this judgement):
/// that is now.
pub fn last_known_activity(
    runtime: &PromptFlowRuntime,
    operator_started: Timestamp,
    pod_created: Option<Timestamp>,
    now: Timestamp,
) -> Timestamp {
    let status = runtime.status.as_ref();
    // Times in the status have whole-second precision: the moment itself lies within the
    // following second, so round up (never stop early).
    let stored = |time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| add(time.0, Duration::from_secs(1));
    let running_since = status
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == conditions::READY && c.status == "True")
        })
        .map_or(now, |c| stored(&c.last_transition_time));
    let reported = status.and_then(|s| s.last_activity_time.as_ref()).map(stored);
    let annotated = annotated_activity(runtime);
    let pod_created = pod_created.map(|t| add(t, Duration::from_secs(1)));
    [
        Some(operator_started),
        Some(running_since),
        pod_created,
        reported,
        annotated,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(operator_started)
}

/// The `promptflow.dev/last-activity` annotation, when it is an RFC 3339 time; a time in the
/// future counts as now (it cannot keep a runtime forever).
pub fn annotated_activity(runtime: &PromptFlowRuntime) -> Option<Timestamp> {
    let time: Timestamp = runtime.annotations().get(annotations::LAST_ACTIVITY)?.parse().ok()?;
    Some(time.min(Timestamp::now()))
}

/// What is due for a runtime at `now`.
#[derive(Clone, Debug, PartialEq)]
pub enum IdleDue {
    /// Nothing until `look_at`, when the proxy is asked (the warning time).
    Nothing {
        /// When to look next.
        look_at: Timestamp,
        /// The deadline, if no activity comes.
        deadline: Timestamp,
    },
    /// The warning time has passed: the runtime stops at `deadline` unless it is used.
    Warning {
        /// When it stops.
        deadline: Timestamp,
    },
    /// The deadline has passed.
    Stop,
}

/// Judges a runtime whose last known activity is `last`.
pub fn due(policy: &IdlePolicy, last: Timestamp, now: Timestamp) -> IdleDue {
    let deadline = add(last, policy.timeout);
    let look_at = add(last, policy.timeout.saturating_sub(policy.lead));
    if now >= deadline {
        IdleDue::Stop
    } else if now >= look_at {
        IdleDue::Warning { deadline }
    } else {
        IdleDue::Nothing { look_at, deadline }
    }
}

/// `time` plus `duration`, saturating.
pub fn add(time: Timestamp, duration: Duration) -> Timestamp {
    let signed = SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX);
    time.checked_add(signed).unwrap_or(Timestamp::MAX)
}

/// How long from `now` until `then` (zero when past).
pub fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// `1h30m`, `45m`, `90s`: the way the spec writes durations.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let (hours, minutes, rest) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    if rest > 0 || text.is_empty() {
        text.push_str(&format!("{rest}s"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::runtime;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn policies_follow_the_spec_and_the_settings() {
        let settings = IdleSettings::default();
        let default = policy(&runtime(serde_json::json!({}), serde_json::json!({})), &settings).unwrap();
        assert_eq!((default.timeout.as_secs(), default.lead.as_secs()), (3600, 360));
        let long = policy(
            &runtime(serde_json::json!({"idle": {"timeout": "10h"}}), serde_json::json!({})),
            &settings,
        )
        .unwrap();
        assert_eq!(long.lead.as_secs(), 600, "the lead is capped");
        let fractional = policy(
            &runtime(
                serde_json::json!({"idle": {"timeout": "1.5h", "action": "Delete"}}),
                serde_json::json!({}),
            ),
            &settings,
        )
        .unwrap();
        assert_eq!(
            (fractional.timeout.as_secs(), fractional.action),
            (5400, IdleAction::Delete)
        );
        assert_eq!(
            policy(
                &runtime(serde_json::json!({"idle": {"timeout": "0"}}), serde_json::json!({})),
                &settings
            ),
            None
        );
        let on_instance = runtime(
            serde_json::json!({"compute": {"instance": {"name": "ci"}}}),
            serde_json::json!({}),
        );
        assert_eq!(policy(&on_instance, &settings), None);
    }

    #[test]
    fn the_latest_source_of_activity_wins_and_a_restart_counts_as_now() {
        use crate::api::PromptFlowRuntimeStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let (started, now) = (at(1_000), at(9_000));
        let running_since = |second| Condition {
            type_: conditions::READY.into(),
            status: "True".into(),
            last_transition_time: Time(at(second)),
            reason: "PodReady".into(),
            message: String::new(),
            observed_generation: None,
        };
        let mut rt = runtime(
            serde_json::json!({}),
            serde_json::json!({"promptflow.dev/last-activity": "1970-01-01T00:33:20Z"}),
        );
        rt.status = Some(PromptFlowRuntimeStatus {
            conditions: vec![running_since(10)],
            ..Default::default()
        });
        assert_eq!(
            last_known_activity(&rt, started, None, now),
            at(2_000),
            "the annotation"
        );
        rt.metadata.annotations = None;
        assert_eq!(
            last_known_activity(&rt, started, None, now),
            started,
            "nothing known: the operator's start"
        );
        rt.status = Some(PromptFlowRuntimeStatus {
            conditions: vec![running_since(10)],
            last_activity_time: Some(Time(at(3_000))),
            ..Default::default()
        });
        assert_eq!(
            last_known_activity(&rt, started, None, now),
            at(3_001),
            "rounded up to the next second"
        );
        assert_eq!(
            last_known_activity(&rt, started, Some(at(5_000)), now),
            at(5_001),
            "a pod made after the last report: its start is activity"
        );
        rt.status.as_mut().unwrap().conditions.clear();
        assert_eq!(
            last_known_activity(&rt, started, None, now),
            now,
            "the status does not say Running yet: it turns Running now (a start after a stop)"
        );
        let bad = runtime(
            serde_json::json!({}),
            serde_json::json!({"promptflow.dev/last-activity": "yesterday"}),
        );
        assert_eq!(annotated_activity(&bad), None);
        let future = runtime(
            serde_json::json!({}),
            serde_json::json!({"promptflow.dev/last-activity": "2100-01-01T00:00:00Z"}),
        );
        assert!(
            annotated_activity(&future).unwrap() <= Timestamp::now(),
            "never later than now"
        );
    }

    #[test]
    fn nothing_then_a_warning_then_the_stop() {
        let policy = IdlePolicy {
            timeout: Duration::from_secs(600),
            lead: Duration::from_secs(60),
            action: IdleAction::Stop,
        };
        let last = at(10_000);
        assert_eq!(
            due(&policy, last, at(10_100)),
            IdleDue::Nothing {
                look_at: at(10_540),
                deadline: at(10_600)
            }
        );
        assert_eq!(
            due(&policy, last, at(10_540)),
            IdleDue::Warning { deadline: at(10_600) }
        );
        assert_eq!(due(&policy, last, at(10_600)), IdleDue::Stop);
        assert_eq!(until(at(10), at(25)).as_secs(), 15);
        assert_eq!(until(at(25), at(10)), Duration::ZERO);
    }
    #[test]
    fn durations_read_like_the_spec() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
