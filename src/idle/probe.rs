//! Asking a runtime pod's activity proxy what it saw: one HTTP GET to the pod IP's activity port,
//! with a short timeout. Only at a runtime's warning time or deadline, never on a timer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::build::pod::ACTIVITY_PORT;
use crate::proxy::ActivityReport;

/// How long a look may take.
const TIMEOUT: Duration = Duration::from_secs(2);

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
        let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| format!("{uri} did not finish within {}s", TIMEOUT.as_secs()))?
            .map_err(|e| format!("{uri}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|_| format!("{uri} did not answer an activity report"))
    }
}
