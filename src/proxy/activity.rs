//! What the activity proxy knows: how many requests passed and when the runtime was last used.
//! Updated on every request and every streamed chunk; never goes backwards.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The proxy's activity record.
#[derive(Default)]
pub struct Activity {
    requests: AtomicU64,
    last: Mutex<Option<Timestamp>>,
}

/// `GET /activity`: what the controller reads at a runtime's idle deadline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityReport {
    /// The last time a request arrived or a response chunk passed (RFC 3339); absent before the
    /// first request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Timestamp>,
    /// Requests forwarded since the proxy started.
    pub requests: u64,
}

impl Activity {
    /// A request arrived.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Something passed (a request, or a chunk of a streamed response).
    pub fn touch(&self) {
        let now = Timestamp::now();
        let mut last = self.last.lock().expect("activity lock");
        // Monotonic: a clock step backwards never moves the record back.
        if last.is_none_or(|seen| now > seen) {
            *last = Some(now);
        }
    }

    /// The record now.
    pub fn report(&self) -> ActivityReport {
        ActivityReport {
            last_activity_time: *self.last.lock().expect("activity lock"),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_and_time_never_goes_back() {
        let activity = Activity::default();
        assert_eq!(activity.report(), ActivityReport::default());
        activity.request();
        let first = activity.report();
        activity.touch();
        activity.request();
        let second = activity.report();
        assert_eq!(second.requests, 2);
        assert!(second.last_activity_time >= first.last_activity_time);
        let json = serde_json::to_value(&second).unwrap();
        assert!(json["lastActivityTime"].as_str().unwrap().ends_with('Z'), "{json}");
        assert_eq!(json["requests"], 2);
    }
}
