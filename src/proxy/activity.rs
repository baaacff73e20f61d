//! What the activity proxy knows: which requests are being served now, how many were used, and
//! when the runtime was last used. A request counts from the moment it arrives until its answer
//! has passed completely (time spent serving is activity); once it ends it is recorded as use
//! only when the runtime itself answered it with something other than a client error (see
//! [`Outcome`]). The record never goes backwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The proxy's activity record.
#[derive(Default)]
pub struct Activity {
    requests: AtomicU64,
    in_flight: AtomicU64,
    last: Mutex<Option<Timestamp>>,
}

/// `GET /activity`: what the controller reads at a runtime's idle deadline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityReport {
    /// The last time the runtime was used (RFC 3339): the end of the last request that counted,
    /// or the time of the report while requests are being served; absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Timestamp>,
    /// Requests that counted as use since the proxy started.
    pub requests: u64,
    /// Requests being served now (health checks excepted): the runtime is never stopped while
    /// this is above zero.
    #[serde(default)]
    pub in_flight: u64,
    /// The proxy's clock when it answered, so the reader can correct for a node clock that is
    /// off from its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<Timestamp>,
}

/// How a request ended, which decides whether it was use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The runtime answered: use, unless the answer was a client error (4xx: wrong paths,
    /// scanners, malformed calls).
    Answered(http::StatusCode),
    /// The request reached the runtime, and the caller went away before its answer: use (the
    /// runtime did the work; callers behind short timeouts in front of long flows are users).
    Delivered,
    /// The proxy answered itself (runtime unreachable or too slow, request refused) or the
    /// caller went away before an answer: not use.
    NotAnswered,
}

impl Outcome {
    fn is_use(self) -> bool {
        match self {
            Outcome::Answered(status) => !status.is_client_error(),
            Outcome::Delivered => true,
            Outcome::NotAnswered => false,
        }
    }
}

/// One request being served. While it lives the runtime counts as in use; when it is dropped
/// (its answer passed completely, or the caller went away) its [`Outcome`] is recorded.
pub struct InFlight {
    activity: Arc<Activity>,
    outcome: Outcome,
}

impl InFlight {
    /// How the request ended (the default is [`Outcome::NotAnswered`]).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.outcome.is_use() {
            self.activity.requests.fetch_add(1, Ordering::Relaxed);
            self.activity.touch();
        }
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// A request that may be use arrived: it counts as in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            activity: self.clone(),
            outcome: Outcome::NotAnswered,
        }
    }

    fn touch(&self) {
        let now = Timestamp::now();
        let mut last = self.last.lock().expect("activity lock");
        // Monotonic: a clock step backwards never moves the record back.
        if last.is_none_or(|seen| now > seen) {
            *last = Some(now);
        }
    }

    /// The record now. While requests are in flight the runtime is in use at this very moment.
    pub fn report(&self) -> ActivityReport {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let last = *self.last.lock().expect("activity lock");
        let now = Timestamp::now();
        let last_activity_time = if in_flight > 0 {
            Some(last.map_or(now, |seen| seen.max(now)))
        } else {
            last
        };
        ActivityReport {
            last_activity_time,
            requests: self.requests.load(Ordering::Relaxed),
            in_flight,
            now: Some(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[test]
    fn a_request_is_activity_while_served_and_use_only_when_the_runtime_answered_it() {
        let activity = Arc::new(Activity::default());
        assert_eq!(
            ActivityReport {
                now: None,
                ..activity.report()
            },
            ActivityReport::default()
        );

        let mut served = activity.begin();
        let during = activity.report();
        assert_eq!((during.in_flight, during.requests), (1, 0));
        assert!(during.last_activity_time.is_some(), "in flight is activity now");
        served.set_outcome(Outcome::Answered(StatusCode::OK));
        drop(served);
        let after = activity.report();
        assert_eq!((after.in_flight, after.requests), (0, 1));
        assert!(after.last_activity_time >= during.last_activity_time, "never goes back");

        for outcome in [
            Outcome::NotAnswered,
            Outcome::Answered(StatusCode::NOT_FOUND),
            Outcome::Answered(StatusCode::UNAUTHORIZED),
        ] {
            let mut noise = activity.begin();
            noise.set_outcome(outcome);
            drop(noise);
        }
        let noise = activity.report();
        assert!(noise.now.is_some(), "the proxy's clock");
        assert_eq!(
            (noise.requests, noise.last_activity_time),
            (1, after.last_activity_time),
            "4xx answers and the proxy's own answers are not use"
        );

        let mut left_early = activity.begin();
        left_early.set_outcome(Outcome::Delivered);
        drop(left_early);
        assert_eq!(
            activity.report().requests,
            2,
            "the caller left; the runtime still worked"
        );

        let mut failed_flow = activity.begin();
        failed_flow.set_outcome(Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR));
        drop(failed_flow);
        assert_eq!(activity.report().requests, 3, "a flow that ran and failed was used");

        let json = serde_json::to_value(activity.report()).unwrap();
        assert!(json["lastActivityTime"].as_str().unwrap().ends_with('Z'), "{json}");
        assert_eq!(
            (json["requests"].as_u64(), json["inFlight"].as_u64()),
            (Some(3), Some(0))
        );
        let old: ActivityReport = serde_json::from_str(r#"{"requests": 3}"#).unwrap();
        assert_eq!(old.in_flight, 0, "a proxy of an earlier version reports no inFlight");
    }
}
