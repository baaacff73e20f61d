//! What the activity proxy costs a request, measured with a real load generator (Debian's `wrk`)
//! against a small JSON upstream on loopback: latency at p50/p99 with 1 and 32 connections and
//! throughput with 32, direct and through the proxy binary side by side in one run; then the
//! same through the proxy while 1,000 slow-header connections are held open, and the proxy's
//! peak memory. Each run lasts `PF_BENCH_PROXY_SECONDS` (default 10).

use std::convert::Infallible;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::probe;

/// One `wrk` run's figures.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Load {
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests_per_second: f64,
}

/// The whole comparison.
#[derive(Debug, serde::Serialize)]
pub struct ProxyReport {
    pub direct_1: Load,
    pub proxy_1: Load,
    pub direct_32: Load,
    pub proxy_32: Load,
    pub proxy_32_with_slow_heads: Load,
    pub proxy_peak_rss_mib: f64,
}

impl ProxyReport {
    /// The targets, each as "met" or "missed" with its figure.
    pub fn verdicts(&self) -> Vec<(bool, String)> {
        let added_p50 = self.proxy_1.p50_us - self.direct_1.p50_us;
        let ratio = self.proxy_32.requests_per_second / self.direct_32.requests_per_second;
        let loaded = self.proxy_32_with_slow_heads.p99_us / self.proxy_32.p99_us;
        vec![
            (
                added_p50 <= 100.0,
                format!("added p50 at 1 connection {added_p50:.0} µs (≤ 100)"),
            ),
            (
                ratio >= 0.5,
                format!("throughput at 32 connections {:.0}% of direct (≥ 50%)", ratio * 100.0),
            ),
            (
                loaded <= 2.0,
                format!("p99 with 1,000 slow heads {loaded:.2}× the quiet run (≤ 2×)"),
            ),
            (
                self.proxy_peak_rss_mib <= 32.0,
                format!("proxy peak RSS {:.1} MiB (≤ 32)", self.proxy_peak_rss_mib),
            ),
        ]
    }

    /// The side-by-side table.
    pub fn table(&self) -> String {
        let row = |name: &str, load: &Load| {
            format!(
                "  {name:<34} p50 {:>7.0} µs  p99 {:>7.0} µs  {:>8.0} req/s\n",
                load.p50_us, load.p99_us, load.requests_per_second
            )
        };
        [
            row("direct, 1 connection", &self.direct_1),
            row("proxy, 1 connection", &self.proxy_1),
            row("direct, 32 connections", &self.direct_32),
            row("proxy, 32 connections", &self.proxy_32),
            row("proxy, 32 + 1,000 slow heads", &self.proxy_32_with_slow_heads),
        ]
        .concat()
    }
}

/// A small JSON answer to every request, on its own two-thread runtime.
fn upstream(address: &str) {
    let listener = std::net::TcpListener::bind(address).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(br#"{"answer":"ok"}"#))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

async fn wrk(url: &str, connections: usize, seconds: u64) -> Load {
    let threads = connections.min(2).to_string();
    let output = Command::new("wrk")
        .args(["--latency", "-t", &threads, "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), url])
        .output()
        .await
        .expect("wrk runs (make deps installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && !text.contains("Non-2xx"), "wrk:\n{text}");
    let micros = |label: &str| {
        let value = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label} in:\n{text}"))
            .trim();
        let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(value.len()));
        let number: f64 = number.parse().unwrap_or_else(|_| panic!("{value} in:\n{text}"));
        match unit {
            "us" => number,
            "ms" => number * 1e3,
            "s" => number * 1e6,
            _ => panic!("unit {unit} in:\n{text}"),
        }
    };
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in:\n{text}"));
    Load {
        p50_us: micros("50%"),
        p99_us: micros("99%"),
        requests_per_second: rate,
    }
}

fn start_proxy(ip: &str, upstream: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_promptflow-operator"))
        .args([
            "activity-proxy",
            &format!("--listen={ip}:8081"),
            &format!("--activity-listen={ip}:8082"),
            &format!("--upstream={upstream}"),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the activity proxy")
}

/// Runs the comparison on loopback address `ip`.
pub async fn measure(ip: &str) -> ProxyReport {
    let seconds = std::env::var("PF_BENCH_PROXY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let upstream_address = format!("{ip}:8080");
    upstream(&upstream_address);
    let proxy = start_proxy(ip, &upstream_address);
    let pid = proxy.id().expect("the proxy runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(format!("{ip}:8081")).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (direct, through) = (
        format!("http://{upstream_address}/score"),
        format!("http://{ip}:8081/score"),
    );
    let direct_1 = wrk(&direct, 1, seconds).await;
    let proxy_1 = wrk(&through, 1, seconds).await;
    let direct_32 = wrk(&direct, 32, seconds).await;
    let proxy_32 = wrk(&through, 32, seconds).await;
    // 1,000 connections that send a head a byte at a time and never finish it.
    let mut slow = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut stream = tokio::net::TcpStream::connect(format!("{ip}:8081")).await.unwrap();
        stream
            .write_all(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        loop {
            for stream in &mut slow {
                let _ = stream.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let proxy_32_with_slow_heads = wrk(&through, 32, seconds.min(8)).await;
    trickle.abort();
    ProxyReport {
        direct_1,
        proxy_1,
        direct_32,
        proxy_32,
        proxy_32_with_slow_heads,
        proxy_peak_rss_mib: probe::memory_mib(pid, "VmHWM:"),
    }
}
