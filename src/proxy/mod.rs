//! The activity proxy: `promptflow-operator activity-proxy`, a sidecar in every runtime pod.
//! Client traffic (the runtime's Service targets it) passes through to the runtime container on
//! the same pod, streamed both ways without buffering (prompt flow streams chat answers as
//! chunked or server-sent events), and every request and streamed chunk is recorded as activity.
//! A second port serves `GET /activity`, which the controller reads at a runtime's idle deadline.
//! Requests never cause a Kubernetes API call.

pub mod activity;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, info, warn};

pub use self::activity::{Activity, ActivityReport};

/// Where the proxy listens and forwards.
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
}

/// Headers that belong to one connection, not to the request or response (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The forwarding half: one upstream client shared by every connection.
struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    upstream: String,
    activity: Arc<Activity>,
}

impl Forwarder {
    async fn forward(&self, mut request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        self.activity.request();
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let uri: Uri = match format!("http://{}{path}", self.upstream).parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "request target is not a path")),
        };
        *request.uri_mut() = uri;
        strip_hop_by_hop(request.headers_mut());
        match self.client.request(request).await {
            Ok(response) => {
                let activity = self.activity.clone();
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // Each chunk passes as it arrives and counts as activity: a long streamed answer
                // keeps the runtime alive while it streams.
                let body = body
                    .map_frame(move |frame| {
                        activity.touch();
                        frame
                    })
                    .boxed();
                Ok(Response::from_parts(parts, body))
            }
            Err(err) => {
                debug!(error = %err, upstream = %self.upstream, "upstream unreachable");
                Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    "the prompt flow runtime is not answering yet",
                ))
            }
        }
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// The bound proxy: its addresses, and the future that serves until `shutdown`.
pub struct BoundProxy<F> {
    /// Where client traffic is accepted.
    pub listen: SocketAddr,
    /// Where `/activity` is served.
    pub activity: SocketAddr,
    /// Serves both ports.
    pub serve: F,
}

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
    let forwarder = Arc::new(Forwarder {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream: settings.upstream.clone(),
        activity: activity.clone(),
    });
    let reports = Router::new()
        .route(
            "/activity",
            get(move || {
                let activity = activity.clone();
                async move { axum::Json(activity.report()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let upstream = settings.upstream.clone();
    let serve = async move {
        info!(%listen, activity = %activity_address, %upstream, "activity proxy listening");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut reports_stop = stop_rx.clone();
        let reports_server = axum::serve(activity_listener, reports)
            .with_graceful_shutdown(async move {
                let _ = reports_stop.wait_for(|stop| *stop).await;
            })
            .into_future();
        let accept = accept_loop(proxy_listener, forwarder, stop_rx);
        let (reports, accepted) = tokio::join!(reports_server, accept);
        reports.and(accepted)
    };
    Ok(BoundProxy {
        listen,
        activity: activity_address,
        serve,
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    forwarder: Arc<Forwarder>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let forwarder = forwarder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let forwarder = forwarder.clone();
                async move { forwarder.forward(request).await }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests;
