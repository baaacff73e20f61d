//! Forwarding one client request to the runtime container and its answer back, streamed both ways
//! without buffering (prompt flow streams chat answers as chunked or server-sent events). Each
//! request that is not a health check counts as in flight until its answer has passed; whether
//! it was use is decided by who answered it ([`Outcome`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tracing::debug;

use super::activity::{Activity, Outcome};
use super::limits::ProxyLimits;
use super::server::ProxyBody;

/// Headers that belong to one connection, not to the request or response (RFC 9110 7.6.1), and
/// the framing, which hyper writes anew for each side.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The forwarding half: one upstream client shared by every connection.
pub struct Forwarder {
    /// The client to the runtime container.
    pub client: Client<HttpConnector, Incoming>,
    /// The runtime container, `host:port`.
    pub upstream: String,
    /// The record the activity port reports.
    pub activity: Arc<Activity>,
    /// Timeouts and which paths are health checks.
    pub limits: Arc<ProxyLimits>,
}

impl Forwarder {
    /// Forwards `request` from `peer`, answering for the runtime when it cannot.
    pub async fn forward(&self, mut request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let health_check = self.limits.is_health_check(request.method(), request.uri().path());
        let mut in_flight = (!health_check).then(|| self.activity.begin());
        if request.method() == http::Method::CONNECT {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "the proxy does not tunnel".into());
        }
        if let Some(coding) = unsupported_transfer_coding(request.headers()) {
            return plain(
                StatusCode::NOT_IMPLEMENTED,
                format!("transfer coding {coding:?} is not supported; only chunked is"),
            );
        }
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = match format!("http://{}{path}", self.upstream).parse() {
            Ok(uri) if path.starts_with('/') => uri,
            _ => return plain(StatusCode::BAD_REQUEST, "request target is not a path".into()),
        };
        *request.uri_mut() = uri;
        strip_hop_by_hop(request.headers_mut());
        set_forwarded(request.headers_mut(), peer);
        // From here the runtime has the request: a caller that leaves before the answer (this
        // future dropped) still used it. Failures below say otherwise.
        if let Some(in_flight) = in_flight.as_mut() {
            in_flight.set_outcome(Outcome::Delivered);
        }
        let answer = tokio::time::timeout(self.limits.upstream_timeout, self.client.request(request)).await;
        if let (false, Some(in_flight)) = (matches!(answer, Ok(Ok(_))), in_flight.as_mut()) {
            in_flight.set_outcome(Outcome::NotAnswered);
        }
        match answer {
            Ok(Ok(response)) => {
                if let Some(in_flight) = in_flight.as_mut() {
                    in_flight.set_outcome(Outcome::Answered(response.status()));
                }
                let (mut parts, body) = response.into_parts();
                // Chunked framing wins over a length given beside it (RFC 9112 6.3).
                if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                strip_hop_by_hop(&mut parts.headers);
                // The request stays in flight until the last chunk has passed (or the caller
                // left): a long streamed answer keeps the runtime in use while it streams.
                let body = body
                    .map_frame(move |frame| {
                        let _until_the_end = &in_flight;
                        frame
                    })
                    .boxed();
                Response::from_parts(parts, body)
            }
            Ok(Err(err)) => {
                debug!(error = %err, upstream = %self.upstream, "upstream unreachable");
                plain(
                    StatusCode::BAD_GATEWAY,
                    "the prompt flow runtime is not answering yet".into(),
                )
            }
            Err(_) => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the prompt flow runtime did not answer within {}",
                    crate::idle::format_duration(self.limits.upstream_timeout)
                ),
            ),
        }
    }
}

/// A transfer coding other than `chunked` (which hyper has already decoded); hyper refuses
/// requests whose last coding is not chunked, so this finds `gzip, chunked` and the like.
fn unsupported_transfer_coding(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("?").split(','))
        .map(|coding| coding.trim().to_ascii_lowercase())
        .find(|coding| coding != "chunked")
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

/// Tells the runtime who called: the caller's address appended to `X-Forwarded-For`, and the
/// scheme it used (the proxy serves plain HTTP).
fn set_forwarded(headers: &mut http::HeaderMap, peer: SocketAddr) {
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let chain = earlier
        .into_iter()
        .chain(std::iter::once(&*peer.ip().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
}

/// An answer the proxy gives itself.
pub fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_appended_to_the_forwarded_chain() {
        let mut headers = http::HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded(&mut headers, "127.0.0.9:5000".parse().unwrap());
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.9");
        assert_eq!(
            headers[&X_FORWARDED_PROTO], "http",
            "the proxy's own scheme, not the caller's claim"
        );
    }

    #[test]
    fn only_chunked_framing_passes() {
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static(value));
            unsupported_transfer_coding(&headers)
        };
        assert_eq!(with("chunked"), None);
        assert_eq!(with(" Chunked "), None);
        assert_eq!(with("gzip, chunked").as_deref(), Some("gzip"));
        let mut headers = http::HeaderMap::new();
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }
}
