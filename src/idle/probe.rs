//! Asking a runtime pod's activity proxy what it saw: one HTTP GET to the pod IP's activity port,
//! with a short timeout. Only at a runtime's warning time or deadline, never on a timer. What
//! answers there runs in a pod a tenant may shape, so the answer is bounded and believed only
//! as far as it can be: at most [`MAX_REPORT_BYTES`], and no time later than now.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::build::pod::ACTIVITY_PORT;
use crate::proxy::ActivityReport;

/// How long a look may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read; a report is well under 200 bytes.
pub const MAX_REPORT_BYTES: usize = 4096;

/// The client the controller asks proxies with.
#[derive(Clone)]
pub struct ActivityProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for ActivityProbe {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl ActivityProbe {
    /// The activity the proxy at `pod_ip` reports; an error says why it could not be read.
    pub async fn read(&self, pod_ip: &str) -> Result<ActivityReport, String> {
        self.read_port(pod_ip, ACTIVITY_PORT).await
    }

    /// The activity the proxy listening on `port` at `pod_ip` reports (runtimes on a compute
    /// instance each have their own).
    pub async fn read_port(&self, pod_ip: &str, port: i32) -> Result<ActivityReport, String> {
        let uri = format!("http://{pod_ip}:{port}/activity");
        let request = http::Request::get(&uri).body(Empty::new()).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("{uri} did not answer within {}s", TIMEOUT.as_secs()))?
            .map_err(|e| format!("{uri}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{uri} answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_REPORT_BYTES);
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .map_err(|_| format!("{uri} did not finish within {}s", TIMEOUT.as_secs()))?
            .map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => format!("{uri} answered more than {MAX_REPORT_BYTES} bytes"),
                None => format!("{uri}: {e}"),
            })?
            .to_bytes();
        let report: ActivityReport =
            serde_json::from_slice(&body).map_err(|_| format!("{uri} did not answer an activity report"))?;
        Ok(believable(report, Timestamp::now()))
    }
}

/// What can be believed of a report at `now`: its times moved by how far the proxy's clock is
/// from ours (a node whose clock is slow must not make activity look older), no activity later
/// than now, and requests in flight are activity now.
pub fn believable(mut report: ActivityReport, now: Timestamp) -> ActivityReport {
    let skew = report
        .now
        .map_or(SignedDuration::ZERO, |theirs| now.duration_since(theirs));
    let corrected = |seen: Timestamp| seen.checked_add(skew).unwrap_or(seen);
    report.last_activity_time = match (report.last_activity_time, report.in_flight > 0) {
        (_, true) => Some(now),
        (Some(seen), false) => Some(corrected(seen).min(now)),
        (None, false) => None,
    };
    report.now = Some(now);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_from_the_future_are_now_and_requests_in_flight_are_activity_now() {
        let now = Timestamp::from_second(1_000).unwrap();
        let future = ActivityReport {
            last_activity_time: Some(Timestamp::from_second(4_000_000_000).unwrap()),
            ..Default::default()
        };
        assert_eq!(believable(future, now).last_activity_time, Some(now));
        let past = Timestamp::from_second(10).unwrap();
        let busy = ActivityReport {
            last_activity_time: Some(past),
            in_flight: 2,
            ..Default::default()
        };
        assert_eq!(believable(busy, now).last_activity_time, Some(now));
        let quiet = ActivityReport {
            last_activity_time: Some(past),
            ..Default::default()
        };
        assert_eq!(believable(quiet, now).last_activity_time, Some(past));
        // A node clock 300 s slow: its "10" was our 310.
        let slow_clock = ActivityReport {
            last_activity_time: Some(past),
            now: Some(Timestamp::from_second(700).unwrap()),
            ..Default::default()
        };
        assert_eq!(
            believable(slow_clock, now).last_activity_time,
            Some(Timestamp::from_second(310).unwrap())
        );
    }
}
