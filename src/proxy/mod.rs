//! The activity proxy: `promptflow-operator activity-proxy`, a sidecar in every runtime pod.
//! Client traffic (the runtime's Service targets it) passes through to the runtime container on
//! the same pod ([`forward`]); what was use is recorded ([`activity`]); a second port serves
//! `GET /activity`, which the controller reads at a runtime's idle deadline. Both ports serve
//! under limits ([`server`], [`limits`]): anyone who can reach the pod can open connections.
//! Requests never cause a Kubernetes API call.

pub mod activity;
mod forward;
pub mod limits;
mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tracing::info;

pub use self::activity::{Activity, ActivityReport};
use self::forward::{Forwarder, plain};
pub use self::limits::ProxyLimits;
use self::server::{ProxyBody, ServerLimits};

/// Where the proxy listens and forwards, and its limits.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxySettings {
    /// Where client traffic arrives (the Service's target port).
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// The runtime container, `host:port`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub upstream: String,
    /// Where `GET /activity` (and `GET /healthz`) are served.
    #[arg(long, default_value = "0.0.0.0:8082")]
    pub activity_listen: SocketAddr,
    /// Timeouts and limits.
    #[command(flatten)]
    pub limits: ProxyLimits,
}

/// The bound proxy: its addresses, and the future that serves until `shutdown`, then drains.
pub struct BoundProxy<F> {
    /// Where client traffic is accepted.
    pub listen: SocketAddr,
    /// Where `/activity` is served.
    pub activity: SocketAddr,
    /// Serves both ports.
    pub serve: F,
}

/// A request whose bytes stopped moving is cut this long after the upstream timeout, so a
/// runtime that is merely slow gets its 504 first.
const STALL_MARGIN: Duration = Duration::from_secs(5);

/// The read buffer bound of each connection to the runtime.
const UPSTREAM_BUFFER_BYTES: usize = 64 * 1024;
/// Idle connections to the runtime kept for reuse.
const UPSTREAM_IDLE_CONNECTIONS: usize = 64;

/// Binds both ports.
pub async fn bind(
    settings: ProxySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<BoundProxy<impl Future<Output = std::io::Result<()>>>> {
    let proxy_listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let activity_listener = tokio::net::TcpListener::bind(settings.activity_listen).await?;
    let listen = proxy_listener.local_addr()?;
    let activity_address = activity_listener.local_addr()?;
    let activity = Arc::new(Activity::default());
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    let limits = Arc::new(settings.limits);
    let traffic_limits = ServerLimits {
        header_timeout: limits.header_timeout,
        keep_alive_timeout: limits.keep_alive_timeout,
        stall_timeout: limits.upstream_timeout + STALL_MARGIN,
        max_connections: limits.max_connections,
        max_header_bytes: limits.max_header_bytes,
        drain_timeout: limits.drain_timeout,
        one_request_per_connection: false,
    };
    // Only the operator asks here, one short GET at a time.
    let report_limits = ServerLimits {
        stall_timeout: limits.header_timeout,
        max_connections: limits::ACTIVITY_MAX_CONNECTIONS,
        max_header_bytes: 8192,
        drain_timeout: Duration::ZERO,
        one_request_per_connection: true,
        ..traffic_limits.clone()
    };
    let forwarder = Arc::new(Forwarder {
        // A caller that stops reading holds at most this much of the runtime's answer in the
        // proxy (hyper's default is about 400 KiB per connection), and few idle connections
        // to the runtime are kept.
        client: Client::builder(TokioExecutor::new())
            .http1_max_buf_size(UPSTREAM_BUFFER_BYTES)
            .pool_max_idle_per_host(UPSTREAM_IDLE_CONNECTIONS)
            .build(connector),
        upstream: settings.upstream.clone(),
        activity: activity.clone(),
        limits: limits.clone(),
    });
    let upstream = settings.upstream;
    let serve = async move {
        info!(%listen, activity = %activity_address, %upstream, limits = ?limits, "activity proxy listening");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let traffic = server::serve(
            "proxy",
            proxy_listener,
            traffic_limits,
            move |request, peer| {
                let forwarder = forwarder.clone();
                async move { forwarder.forward(request, peer).await }
            },
            stop_rx.clone(),
        );
        let reports = server::serve(
            "activity",
            activity_listener,
            report_limits,
            move |request, _| {
                let answer = report(&activity, &request);
                async move { answer }
            },
            stop_rx,
        );
        tokio::join!(traffic, reports);
        Ok(())
    };
    Ok(BoundProxy {
        listen,
        activity: activity_address,
        serve,
    })
}

/// The activity port: `GET /activity` (the record as JSON) and `GET /healthz` (the readiness
/// probe).
fn report(activity: &Activity, request: &Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET".into());
    }
    match request.uri().path() {
        "/activity" => {
            let json = serde_json::to_vec(&activity.report()).expect("a report serializes");
            let mut response = Response::new(Full::new(Bytes::from(json)).map_err(|never| match never {}).boxed());
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            response
        }
        "/healthz" => plain(StatusCode::OK, "ok".into()),
        _ => plain(StatusCode::NOT_FOUND, "not found".into()),
    }
}

#[cfg(test)]
mod tests;
