//! The proxy against a real upstream on loopback: forwarding, streaming without buffering,
//! what counts as activity, requests in flight, the limits and the drain.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::*;

/// An upstream with `/health`, `/score` (echoes the body), `/slow` (answers after 1.5 s),
/// `/headers` (echoes the forwarding headers), `/stream` (chunks fed by `chunks`); anything
/// else is 404.
async fn upstream(chunks: mpsc::Receiver<&'static str>) -> SocketAddr {
    let chunks = std::sync::Arc::new(std::sync::Mutex::new(Some(chunks)));
    let stream = move || {
        let receiver = chunks.lock().unwrap().take().expect("one streaming request");
        async move {
            let stream = futures::stream::unfold(receiver, |mut receiver| async move {
                let chunk = receiver.recv().await?;
                Some((Ok::<_, Infallible>(Bytes::from_static(chunk.as_bytes())), receiver))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    };
    let app = Router::new()
        .route(
            "/health",
            get(|| async { r#"{"status":"Healthy"}"# }).post(|| async { "posted" }),
        )
        .route("/score", post(|body: Bytes| async move { body }))
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "done"
            }),
        )
        .route(
            "/headers",
            get(|headers: http::HeaderMap| async move {
                let value = |name: &str| headers.get(name).map_or("-", |v| v.to_str().unwrap()).to_owned();
                format!(
                    "{}|{}|{}",
                    value("x-forwarded-for"),
                    value("x-forwarded-proto"),
                    value("transfer-encoding")
                )
            }),
        )
        .route("/stream", get(stream));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

async fn proxy_with(upstream: &str, limits: ProxyLimits) -> (SocketAddr, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let settings = ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_owned(),
        activity_listen: "127.0.0.1:0".parse().unwrap(),
        limits,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bound = bind(settings, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let (listen, activity) = (bound.listen, bound.activity);
    tokio::spawn(bound.serve);
    (listen, activity, stop)
}

async fn proxy_to(upstream: &str) -> (SocketAddr, SocketAddr) {
    let (listen, activity, stop) = proxy_with(upstream, ProxyLimits::default()).await;
    std::mem::forget(stop);
    (listen, activity)
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(method: &str, url: String, body: &'static str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The proxy's report, without its clock (which every report has).
async fn activity(address: SocketAddr) -> ActivityReport {
    let (_, body) = call("GET", format!("http://{address}/activity"), "").await;
    let report: ActivityReport = serde_json::from_str(&body).unwrap();
    assert!(report.now.is_some(), "{body}");
    ActivityReport { now: None, ..report }
}

/// Writes `raw` on a new connection and reads until the proxy closes it.
async fn raw_exchange(address: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether the proxy closed `stream` (reads reach end of file or a reset) within `within`;
/// what it still had to say is read and dropped.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut rest = vec![];
    tokio::time::timeout(within, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn requests_pass_through_and_what_the_runtime_answered_counts_as_use() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    assert_eq!(activity(reports).await, ActivityReport::default());

    let (status, body) = call("POST", format!("http://{proxy}/score?x=1"), r#"{"question":"hi"}"#).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"question":"hi"}"#));
    let first = activity(reports).await;
    assert_eq!((first.requests, first.in_flight), (1, 0));
    assert!(first.last_activity_time.is_some());

    // Health checks, wrong paths and wrong methods pass but are not use.
    for (method, path) in [
        ("GET", "/health"),
        ("HEAD", "/health"),
        ("GET", "/nope"),
        ("GET", "/score"),
    ] {
        let (status, _) = call(method, format!("http://{proxy}{path}"), "").await;
        assert_ne!(status, StatusCode::BAD_GATEWAY, "{method} {path} reached the runtime");
    }
    assert_eq!(activity(reports).await, first, "probes and 4xx noise are not use");
    let (status, body) = call("POST", format!("http://{proxy}/health"), "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "posted"));
    assert_eq!(
        activity(reports).await.requests,
        2,
        "only GET and HEAD are health checks"
    );
}

#[tokio::test]
async fn a_request_is_in_flight_until_answered_and_counts_from_its_end() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    let slow = tokio::spawn(call("POST", format!("http://{proxy}/slow"), ""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = activity(reports).await;
    assert_eq!((during.in_flight, during.requests), (1, 0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = activity(reports).await;
    assert!(
        later.last_activity_time > during.last_activity_time,
        "time spent serving is activity"
    );
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "done".into()));
    let after = activity(reports).await;
    assert_eq!((after.in_flight, after.requests), (0, 1));
    assert!(
        after.last_activity_time > later.last_activity_time,
        "recorded at its end"
    );
}

#[tokio::test]
async fn a_streamed_response_arrives_chunk_by_chunk_and_is_in_flight_while_it_streams() {
    let (tx, rx) = mpsc::channel(4);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    let request = Request::get(format!("http://{proxy}/stream"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    tx.send("data: first\n\n").await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client().request(request))
        .await
        .expect("the head arrives while the stream is open")
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first chunk arrives before the upstream sends the rest: nothing is buffered")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: first\n\n");
    assert_eq!(activity(reports).await.in_flight, 1, "streaming");
    tx.send("data: second\n\n").await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: second\n\n");
    drop(tx);
    assert!(
        body.frame().await.is_none(),
        "the stream ends when the upstream ends it"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = activity(reports).await;
    assert_eq!((after.in_flight, after.requests), (0, 1));
}

#[tokio::test]
async fn many_requests_at_once_are_all_forwarded_and_counted() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    let calls = (0..32).map(|_| call("POST", format!("http://{proxy}/score"), "x"));
    let results = futures::future::join_all(calls).await;
    assert!(
        results
            .iter()
            .all(|(status, body)| *status == StatusCode::OK && body == "x")
    );
    assert_eq!(activity(reports).await.requests, 32);
}

#[tokio::test]
async fn an_upstream_that_is_down_gets_502_which_is_not_use() {
    // A port that was free a moment ago: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (proxy, reports) = proxy_to(&closed.to_string()).await;
    for _ in 0..3 {
        let (status, body) = call("POST", format!("http://{proxy}/score"), "").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("not answering"), "{body}");
    }
    assert_eq!(
        activity(reports).await,
        ActivityReport::default(),
        "a client retrying into a runtime that is down does not keep it alive"
    );
}

#[tokio::test]
async fn a_runtime_slower_than_the_upstream_timeout_gets_504() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let limits = ProxyLimits {
        upstream_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (proxy, reports, _stop) = proxy_with(&upstream.to_string(), limits).await;
    let (status, body) = call("POST", format!("http://{proxy}/slow"), "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(activity(reports).await.requests, 0);
}

#[tokio::test]
async fn the_runtime_learns_the_caller_and_gets_one_framing() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, _) = proxy_to(&upstream.to_string()).await;
    let request = Request::get(format!("http://{proxy}/headers"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "203.0.113.7, 127.0.0.1|http|-");
    let answer = raw_exchange(
        proxy,
        b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    let answer = raw_exchange(
        proxy,
        b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"), "{answer}");
}

#[tokio::test]
async fn slow_heads_idle_connections_and_large_heads_are_cut_and_the_proxy_keeps_serving() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let limits = ProxyLimits {
        header_timeout: Duration::from_millis(400),
        keep_alive_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let (proxy, _, _stop) = proxy_with(&upstream.to_string(), limits).await;
    let mut slow = TcpStream::connect(proxy).await.unwrap();
    slow.write_all(b"POST /score HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut silent = TcpStream::connect(proxy).await.unwrap();
    let mut idle = TcpStream::connect(proxy).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let (status, _) = call("POST", format!("http://{proxy}/score"), "x").await;
    assert_eq!(status, StatusCode::OK, "served meanwhile");
    assert!(
        closed_within(&mut slow, Duration::from_secs(2)).await,
        "an unfinished head is cut"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(2)).await,
        "a silent connection is cut"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(2)).await,
        "an idle keep-alive is closed"
    );
    let huge = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let answer = raw_exchange(proxy, huge.as_bytes()).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_a_freed_place_is_reused() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let limits = ProxyLimits {
        max_connections: 3,
        ..Default::default()
    };
    let (proxy, _, _stop) = proxy_with(&upstream.to_string(), limits).await;
    let mut held = vec![];
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        held.push(stream);
    }
    let answer = raw_exchange(proxy, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = call("GET", format!("http://{proxy}/health"), "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn on_shutdown_a_request_in_flight_finishes_and_new_connections_are_refused() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let limits = ProxyLimits {
        drain_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (proxy, _, stop) = proxy_with(&upstream.to_string(), limits).await;
    let slow = tokio::spawn(call("POST", format!("http://{proxy}/slow"), ""));
    let mut half_head = TcpStream::connect(proxy).await.unwrap();
    half_head
        .write_all(b"POST /score HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped_at = tokio::time::Instant::now();
    stop.send(()).unwrap();
    assert!(
        closed_within(&mut half_head, Duration::from_secs(1)).await,
        "a head still coming does not hold the drain"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(proxy).await.is_err(), "the listener is closed");
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "done".into()), "drained, not cut");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "the drain ended with the last answer"
    );
}

#[tokio::test]
async fn a_caller_that_leaves_before_the_answer_still_used_the_runtime() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        call("POST", format!("http://{proxy}/slow"), ""),
    )
    .await;
    assert!(gave_up.is_err(), "the caller's own timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = activity(reports).await;
    assert_eq!((after.in_flight, after.requests), (0, 1), "the runtime had the request");
    let answer = raw_exchange(
        proxy,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}
