//! The activity proxy binary under hostile traffic, as a process on loopback in front of a real
//! upstream: a flood of slow request heads, an exhausted file table, and SIGTERM with a request
//! in flight.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::harness::{http_get, http_post_json};

/// A loopback address of this test's own (kwok pods use 127.0.1.x).
fn own_ip() -> String {
    format!(
        "127.0.{}.{}",
        200 + rand::random::<u8>() % 50,
        1 + rand::random::<u8>() % 250
    )
}

/// An upstream answering `/health`, `/score` (echo) and `/slow` (after 2 s).
async fn upstream(ip: &str) -> String {
    let app = Router::new()
        .route("/health", get(|| async { r#"{"status":"Healthy"}"# }))
        .route("/score", post(|body: String| async move { body }))
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "finished"
            }),
        );
    let listener = tokio::net::TcpListener::bind(format!("{ip}:8080")).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("{ip}:8080")
}

struct Proxy {
    child: Child,
    log: PathBuf,
    traffic: String,
    activity: String,
}

impl Proxy {
    /// Starts the binary's activity proxy on `ip` (8081, 8082) with `extra` flags, under a shell
    /// that first sets the open-file limit to `nofile`.
    async fn start(ip: &str, upstream: &str, nofile: u32, extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("pf-proxy-{:08x}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let command = format!(
            "ulimit -n {nofile} && exec \"$0\" activity-proxy --listen={ip}:8081 --activity-listen={ip}:8082 --upstream={upstream} {}",
            extra.join(" ")
        );
        let child = Command::new("bash")
            .args(["-c", &command, env!("CARGO_BIN_EXE_promptflow-operator")])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let proxy = Self {
            child,
            log,
            traffic: format!("{ip}:8081"),
            activity: format!("{ip}:8082"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get_opt(&proxy.activity, "/healthz").await.as_deref() != Some("ok") {
            assert!(
                Instant::now() < deadline,
                "the proxy did not start:\n{}",
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn http_get_opt(address: &str, path: &str) -> Option<String> {
    TcpStream::connect(address).await.ok()?;
    Some(http_get(address, path).await)
}

/// A process's resident memory (KiB) and CPU time so far (clock ticks).
pub fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

#[tokio::test]
async fn a_thousand_slow_heads_are_held_without_harm_and_closed_after_the_header_timeout() {
    let ip = own_ip();
    let upstream = upstream(&ip).await;
    let proxy = Proxy::start(&ip, &upstream, 8192, &["--header-timeout=5s"]).await;
    let opened = Instant::now();
    let mut slow = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut stream = TcpStream::connect(&proxy.traffic).await.unwrap();
        stream
            .write_all(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // A byte now and then from each: the head keeps coming, but never completes.
    for stream in &mut slow {
        let _ = stream.write_all(b"a").await;
    }
    let (rss, _) = usage(proxy.pid());
    let mut latencies = vec![];
    for _ in 0..100 {
        let sent = Instant::now();
        let (code, body) = http_post_json(&proxy.traffic, "/score", r#"{"q":1}"#).await;
        latencies.push(sent.elapsed());
        assert_eq!((code, body.as_str()), (200, r#"{"q":1}"#));
    }
    latencies.sort();
    println!(
        "proxy: with 1,000 slow heads open, RSS {rss} KiB; 100 requests p50 {:?} p99 {:?}",
        latencies[50], latencies[99]
    );
    // The sidecar's memory limit is 64 MiB (the bench holds the release build to 32).
    assert!(rss < 64 * 1024, "RSS {rss} KiB with 1,000 slow heads");
    // Every slow head is closed once the header timeout has passed.
    let mut closed = 0;
    for stream in &mut slow {
        let mut rest = vec![];
        let left = (opened + Duration::from_secs(9)).saturating_duration_since(Instant::now());
        if tokio::time::timeout(left.max(Duration::from_millis(10)), stream.read_to_end(&mut rest))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    println!("proxy: {closed} of 1,000 slow heads closed within 9 s (header timeout 5 s)");
    assert_eq!(closed, 1000);
    assert!(opened.elapsed() >= Duration::from_secs(5), "closed before the timeout");
    let (code, _) = http_post_json(&proxy.traffic, "/score", "{}").await;
    assert_eq!(code, 200, "still serving");
}

#[tokio::test]
async fn an_exhausted_file_table_backs_off_logs_little_and_recovers() {
    let ip = own_ip();
    let upstream = upstream(&ip).await;
    let proxy = Proxy::start(&ip, &upstream, 48, &[]).await;
    let (_, ticks_before) = usage(proxy.pid());
    let mut held = vec![];
    for _ in 0..80 {
        if let Ok(stream) = TcpStream::connect(&proxy.traffic).await {
            held.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, ticks_after) = usage(proxy.pid());
    let log = proxy.log_text();
    let warnings = log.lines().filter(|l| l.contains("accept failed")).count();
    let cpu = (ticks_after - ticks_before) as f64 / 100.0;
    println!(
        "proxy: out of file descriptors for 3 s with {} connections waiting: {warnings} log lines, {cpu:.2} s of CPU",
        held.len()
    );
    assert!(warnings >= 1, "the condition is logged:\n{log}");
    assert!(warnings <= 2, "{warnings} accept warnings in 3 s");
    assert!(cpu < 0.3, "{cpu:.2} s of CPU spinning on accept");
    drop(held);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, _) = http_post_json(&proxy.traffic, "/score", "{}").await;
    assert_eq!(code, 200, "serving again once descriptors are free");
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish() {
    let ip = own_ip();
    let upstream = upstream(&ip).await;
    let mut proxy = Proxy::start(&ip, &upstream, 1024, &["--drain-timeout=10s"]).await;
    let traffic = proxy.traffic.clone();
    let request = tokio::spawn(async move { http_post_json(&traffic, "/slow", "{}").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(&proxy.traffic).await.is_err(),
        "no new connections while draining"
    );
    assert_eq!(request.await.unwrap(), (200, "finished".to_owned()), "drained, not cut");
    let exit = tokio::time::timeout(Duration::from_secs(5), proxy.child.wait()).await;
    assert!(
        exit.is_ok_and(|status| status.unwrap().success()),
        "{}",
        proxy.log_text()
    );
}
