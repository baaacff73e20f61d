//! `make bench`: the operator's speed and memory at scale, against the real local cluster, with
//! targets that fail the run when missed. Not part of `make test` (it builds in release mode).
//!
//! Scenario: one operator, RUNTIMES serverless runtimes created at once in one namespace, sized
//! from a tiny catalog entry so the fake nodes hold them all. Measured: time until every runtime
//! is Running, API writes per runtime, reconciles, a full no-op resync's writes, the operator's
//! peak resident memory and CPU time.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use harness::{OperatorProcess, with_namespace};

const RUNTIMES: usize = 300;
/// Targets: creation to all Running, writes per runtime, peak memory of the operator.
const TARGET_ALL_RUNNING: Duration = Duration::from_secs(30);
const TARGET_WRITES_PER_RUNTIME: f64 = 6.0;
const TARGET_PEAK_RSS_MIB: f64 = 100.0;

fn proc_status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn runtimes_at_scale() {
    with_namespace("pf-bench", |ns| async move {
        let catalog = std::env::temp_dir().join(format!("pf-bench-catalog-{}.yaml", ns.name));
        std::fs::write(&catalog, "instanceTypes:\n- {name: Bench_Tiny, cpu: 10m, memory: 32Mi}\n").unwrap();
        let catalog_arg = catalog.to_string_lossy().into_owned();
        let operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--catalog", &catalog_arg, "--log-format", "json"],
        );
        let pid = operator.pid().expect("operator runs");
        operator.admin_address().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_rss = proc_status_kib(pid, "VmRSS:").unwrap_or_default() / 1024.0;
        let writes_before = operator.writes_including_events().await;

        let api = ns.api::<PromptFlowRuntime>();
        let started = Instant::now();
        harness::create_runtimes(&api, "rt", RUNTIMES).await;
        let created = started.elapsed();
        harness::wait_all_running(&api, RUNTIMES, Duration::from_secs(180)).await;
        let all_running = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = operator.writes_including_events().await - writes_before;
        let metrics = operator.metrics().await;
        let reconciles = metric(&metrics, "promptflow_operator_reconciles_total");
        let duration_sum = metric(&metrics, "promptflow_operator_reconcile_duration_seconds_sum");

        // A no-op pass over every runtime.
        let before_noop = operator.writes_including_events().await;
        let noop_started = Instant::now();
        for i in 0..RUNTIMES {
            let patch = json!({"metadata": {"annotations": {"bench.promptflow.dev/touched": "1"}}});
            api.patch(&format!("rt-{i:04}"), &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let noop_writes = operator.writes_including_events().await - before_noop;
        let noop_elapsed = noop_started.elapsed();

        let peak_rss = proc_status_kib(pid, "VmHWM:").unwrap_or_default() / 1024.0;
        let cpu = cpu_seconds(pid).unwrap_or_default();
        let per_runtime = writes as f64 / RUNTIMES as f64;
        println!("bench: {RUNTIMES} runtimes created by the client in {:.1}s", created.as_secs_f64());
        println!("bench: all Running after {:.1}s ({:.0} runtimes/s)", all_running.as_secs_f64(), RUNTIMES as f64 / all_running.as_secs_f64());
        println!("bench: {writes} writes, {per_runtime:.2} per runtime (events included); {reconciles:.0} reconciles, mean {:.1} ms", duration_sum * 1000.0 / reconciles.max(1.0));
        println!("bench: no-op pass over {RUNTIMES} runtimes: {noop_writes} writes in {:.1}s", noop_elapsed.as_secs_f64());
        println!("bench: operator memory {idle_rss:.1} MiB idle, {peak_rss:.1} MiB peak; {cpu:.1} s CPU in total");
        std::fs::remove_file(&catalog).ok();

        assert!(all_running <= TARGET_ALL_RUNNING, "all Running took {all_running:?}, target {TARGET_ALL_RUNNING:?}");
        assert!(per_runtime <= TARGET_WRITES_PER_RUNTIME, "{per_runtime:.2} writes per runtime, target {TARGET_WRITES_PER_RUNTIME}");
        assert_eq!(noop_writes, 0, "a no-op pass wrote");
        assert!(peak_rss <= TARGET_PEAK_RSS_MIB, "peak RSS {peak_rss:.1} MiB, target {TARGET_PEAK_RSS_MIB} MiB");
    })
    .await;
}
