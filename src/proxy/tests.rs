//! The proxy against a real upstream on loopback: forwarding, streaming without buffering,
//! concurrency, the activity record, and an upstream that is down.

use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::*;

/// An upstream with `/health`, `/score` (echoes the body) and `/stream` (chunks fed by `chunks`).
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
        .route("/health", get(|| async { r#"{"status":"Healthy"}"# }))
        .route("/score", post(|body: Bytes| async move { body }))
        .route("/stream", get(stream));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

async fn proxy_to(upstream: &str) -> (SocketAddr, SocketAddr) {
    let settings = ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_owned(),
        activity_listen: "127.0.0.1:0".parse().unwrap(),
    };
    let bound = bind(settings, std::future::pending()).await.unwrap();
    let (listen, activity) = (bound.listen, bound.activity);
    tokio::spawn(bound.serve);
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

async fn activity(address: SocketAddr) -> ActivityReport {
    let (_, body) = call("GET", format!("http://{address}/activity"), "").await;
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn requests_pass_through_and_count_as_activity() {
    let (_tx, rx) = mpsc::channel(1);
    let upstream = upstream(rx).await;
    let (proxy, reports) = proxy_to(&upstream.to_string()).await;
    assert_eq!(activity(reports).await, ActivityReport::default());

    let (status, body) = call("POST", format!("http://{proxy}/score?x=1"), r#"{"question":"hi"}"#).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"question":"hi"}"#));
    let first = activity(reports).await;
    assert_eq!(first.requests, 1);
    assert!(first.last_activity_time.is_some());
    let (status, _) = call("GET", format!("http://{proxy}/health"), "").await;
    assert_eq!(status, StatusCode::OK);
    let second = activity(reports).await;
    assert_eq!(second.requests, 2);
    assert!(second.last_activity_time >= first.last_activity_time, "monotonic");
}

#[tokio::test]
async fn a_streamed_response_arrives_chunk_by_chunk() {
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
    let before = activity(reports).await.last_activity_time;
    tokio::time::sleep(Duration::from_millis(5)).await;
    tx.send("data: second\n\n").await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: second\n\n");
    assert!(
        activity(reports).await.last_activity_time > before,
        "a streamed chunk is activity"
    );
    drop(tx);
    assert!(
        body.frame().await.is_none(),
        "the stream ends when the upstream ends it"
    );
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
async fn an_upstream_that_is_down_gets_502_and_the_proxy_keeps_serving() {
    // A port that was free a moment ago: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (proxy, reports) = proxy_to(&closed.to_string()).await;
    for _ in 0..3 {
        let (status, body) = call("GET", format!("http://{proxy}/health"), "").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("not answering"), "{body}");
    }
    assert_eq!(
        activity(reports).await.requests,
        3,
        "a request is activity even when the runtime is down"
    );
}
