//! The client against a real HTTP server on loopback that misbehaves on purpose: server errors,
//! refusals, garbage, a slow answer, a long paginated tag list, and a tag that vanished.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::Uri;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, head};

use super::*;
use crate::identity::Credential;

/// How the fake registry answers the tag list.
#[derive(Clone, Copy)]
enum Tags {
    /// `count` tags `20240101.v0`… served in pages as `n` and `last` ask.
    Paged(usize),
    Status(u16),
    Garbage,
    Slow,
}

#[derive(Clone)]
struct Fake {
    tags: Tags,
    pages: Arc<AtomicUsize>,
}

async fn tags(State(fake): State<Fake>, uri: Uri) -> Response {
    let query: std::collections::HashMap<&str, &str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    fake.pages.fetch_add(1, Ordering::Relaxed);
    match fake.tags {
        Tags::Paged(count) => {
            let all: Vec<String> = (0..count).map(|i| format!("20240101.v{i:05}")).collect();
            let n: usize = query.get("n").and_then(|n| n.parse().ok()).unwrap_or(count);
            let start = query
                .get("last")
                .map_or(0, |last| all.iter().position(|t| t == last).map_or(0, |p| p + 1));
            let page: Vec<&String> = all.iter().skip(start).take(n).collect();
            axum::Json(serde_json::json!({"name": "team/runtime", "tags": page})).into_response()
        }
        Tags::Status(code) => (StatusCode::from_u16(code).unwrap(), "{}").into_response(),
        Tags::Garbage => (StatusCode::OK, "<html>surprise</html>").into_response(),
        Tags::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::OK, "{}").into_response()
        }
    }
}

async fn manifest() -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Docker-Content-Digest",
        format!("sha256:{}", "a".repeat(64)).parse().unwrap(),
    );
    headers.insert(
        "Content-Type",
        "application/vnd.oci.image.manifest.v1+json".parse().unwrap(),
    );
    (StatusCode::OK, headers).into_response()
}

async fn serve(tags_answer: Tags) -> (String, Arc<AtomicUsize>) {
    let pages = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/v2/", get(|| async { "{}" }))
        .route("/v2/team/runtime/tags/list", get(tags))
        .route("/v2/team/runtime/manifests/20240101.v00001", head(manifest))
        .route(
            "/v2/team/runtime/manifests/{tag}",
            any(|| async { StatusCode::NOT_FOUND }),
        )
        .with_state(Fake {
            tags: tags_answer,
            pages: pages.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, pages)
}

fn session(host: &str) -> Session {
    Registry::new(&RegistrySettings {
        insecure_hosts: vec![host.to_owned()],
        call_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .session()
}

#[tokio::test]
async fn a_long_tag_list_is_read_page_by_page() {
    let (host, pages) = serve(Tags::Paged(2500)).await;
    let tags = session(&host)
        .tags(&format!("{host}/team/runtime"), None)
        .await
        .unwrap();
    assert_eq!(tags.len(), 2500);
    assert_eq!(pages.load(Ordering::Relaxed), 3, "pages of {PAGE}");
}

#[tokio::test]
async fn failures_are_sorted_into_what_the_user_can_act_on() {
    for (answer, reason) in [
        (Tags::Status(500), reasons::REGISTRY_UNAVAILABLE),
        (Tags::Status(503), reasons::REGISTRY_UNAVAILABLE),
        (Tags::Status(401), reasons::UNAUTHORIZED),
        (Tags::Status(403), reasons::UNAUTHORIZED),
        (Tags::Status(404), reasons::IMAGE_NOT_FOUND),
        (Tags::Garbage, reasons::REGISTRY_INVALID),
        (Tags::Slow, reasons::REGISTRY_UNAVAILABLE),
    ] {
        let (host, _) = serve(answer).await;
        let error = session(&host)
            .tags(&format!("{host}/team/runtime"), None)
            .await
            .unwrap_err();
        assert_eq!(error.reason(), reason, "{error}");
    }
}

#[tokio::test]
async fn a_vanished_tag_is_not_found_and_a_present_one_has_its_digest() {
    let (host, _) = serve(Tags::Paged(3)).await;
    let repository = format!("{host}/team/runtime");
    let digest = session(&host)
        .digest(&repository, "20240101.v00001", None)
        .await
        .unwrap();
    assert_eq!(digest, format!("sha256:{}", "a".repeat(64)));
    let gone = session(&host)
        .digest(&repository, "20240101.v00002", None)
        .await
        .unwrap_err();
    assert_eq!(gone.reason(), reasons::IMAGE_NOT_FOUND, "{gone}");
}

#[tokio::test]
async fn nothing_listening_is_unavailable() {
    let error = session("127.0.0.1:1")
        .tags("127.0.0.1:1/team/runtime", None)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), reasons::REGISTRY_UNAVAILABLE, "{error}");
}

#[tokio::test]
async fn the_cache_never_waits_and_asks_once_for_many_lookups() {
    let (host, pages) = serve(Tags::Paged(3)).await;
    let repository = format!("{host}/team/runtime");
    let registry = Registry::new(&RegistrySettings {
        insecure_hosts: vec![host.clone()],
        call_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    let answered = Arc::new(tokio::sync::Notify::new());
    let notify = answered.clone();
    let cache = crate::registry::VersionCache::new(
        registry,
        Duration::from_secs(3600),
        vec![],
        Arc::new(|_| {}),
        Arc::new(move |_| notify.notify_one()),
    );
    for _ in 0..100 {
        assert_eq!(cache.lookup(&repository, None), crate::registry::Lookup::Pending);
    }
    tokio::time::timeout(Duration::from_secs(5), answered.notified())
        .await
        .unwrap();
    // The fake's tags are not versions (leading zeros): known, and empty.
    for _ in 0..100 {
        assert_eq!(
            cache.lookup(&repository, None),
            crate::registry::Lookup::Known(Ok(None))
        );
    }
    assert_eq!(pages.load(Ordering::Relaxed), 1, "one tag listing for 200 lookups");

    // Buttons pressed on many repositories and credentials leave nothing behind.
    for i in 0..50 {
        let credential = Credential {
            username: format!("user-{i}"),
            password: "x".into(),
        };
        let _ = cache.ask_now(&format!("{host}/team/repo-{i}"), Some(&credential)).await;
    }
    let _ = cache.ask_now(&repository, None).await;
    assert!(cache.presses_in_progress() <= 1, "{}", cache.presses_in_progress());
}

/// A registry whose challenge names `realm`; counts the requests its realm server (another
/// loopback listener, whose address replaces `{token}` in `realm`) receives.
async fn challenging(realm: &str) -> (String, Arc<AtomicUsize>) {
    let token_hits = Arc::new(AtomicUsize::new(0));
    let hits = token_hits.clone();
    let token = Router::new().fallback(move || {
        hits.fetch_add(1, Ordering::Relaxed);
        async { axum::Json(serde_json::json!({"token": "t"})) }
    });
    let token_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_address = token_listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(token_listener, token).await });
    let challenge = format!(
        "Bearer realm=\"{}\",service=\"registry\"",
        realm.replace("{token}", &token_address)
    );
    let app = Router::new().fallback(move || {
        let challenge = challenge.clone();
        async move { (StatusCode::UNAUTHORIZED, [("WWW-Authenticate", challenge)], "{}").into_response() }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, token_hits)
}

#[tokio::test]
async fn credentials_never_go_to_a_token_realm_that_is_not_https() {
    let credential = Credential {
        username: "user".into(),
        password: "secret".into(),
    };
    // Plain http on another host than the registry (here: another port).
    let (host, token_hits) = challenging("http://{token}/token").await;
    let error = session(&host)
        .tags(&format!("{host}/team/runtime"), Some(&credential))
        .await
        .unwrap_err();
    assert_eq!(error.reason(), reasons::UNAUTHORIZED, "{error}");
    assert!(error.to_string().contains("credentials are not sent"), "{error}");
    assert_eq!(token_hits.load(Ordering::Relaxed), 0, "the realm was never asked");
    let error = session(&host)
        .digest(&format!("{host}/team/runtime"), "20240101.v00001", Some(&credential))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("credentials are not sent"), "{error}");
    assert_eq!(token_hits.load(Ordering::Relaxed), 0);

    // A second realm parameter (a client may take the last) is checked too.
    let (second, second_hits) = challenging("https://auth.example/token\",realm=\"http://{token}/token").await;
    let error = session(&second)
        .tags(&format!("{second}/team/runtime"), Some(&credential))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("credentials are not sent"), "{error}");
    assert_eq!(second_hits.load(Ordering::Relaxed), 0);

    // Anonymous checks send nothing to protect: the realm is asked as the registry says.
    let _ = session(&host).tags(&format!("{host}/team/runtime"), None).await;
    assert!(token_hits.load(Ordering::Relaxed) > 0, "an anonymous token is fetched");
}

#[test]
fn token_realms_credentials_may_go_to() {
    let insecure = ["registry.local:5000".to_owned()];
    assert!(realm_allowed("https://auth.example/token", "registry.example", &[]).is_ok());
    assert!(realm_allowed("http://registry.local:5000/token", "registry.local:5000", &insecure).is_ok());
    for (realm, registry) in [
        ("http://registry.example/token", "registry.example"),
        ("http://evil.example/token", "registry.local:5000"),
        ("http://registry.local:5001/token", "registry.local:5000"),
        ("file:///etc/passwd", "registry.example"),
        ("not a url", "registry.example"),
    ] {
        assert!(realm_allowed(realm, registry, &insecure).is_err(), "{realm}");
    }
}
