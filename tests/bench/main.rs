//! `make bench`: the operator's speed and memory at scale against the real local cluster, beside
//! a floor measured on the same cluster. Not part of `make test`, which runs it at N=50 as a smoke
//! test (`PF_BENCH_N=50`).
//!
//! For each N (`PF_BENCH_N`, default `1000,10000`), on fake nodes of 250 pods each:
//! 1. **backlog**: N runtimes created with the operator stopped, then the operator started; timed
//!    from its start until every runtime is Running; then a steady window with nothing to do
//!    (`PF_BENCH_STEADY_SECONDS`, default 60) counts its requests and writes, then every runtime
//!    is touched (an annotation nobody reads) and the writes of that no-op pass are counted;
//! 2. **floor**: N bare pods equal to the operator's runtime pods, created by the bench's own
//!    client with the operator's concurrency, timed until all are Ready: the API server, scheduler
//!    and kwok alone;
//! 3. **live**: the operator running, N runtimes created, timed from the first create.
//!
//! Every runtime pins its version from the local registry, so registry requests are real.
//! Output: `<target>/bench/report.json`, `<target>/bench/running.png` and a summary line per N.
//! A second test measures the activity proxy ([`proxy`]): `<target>/bench/proxy.json`.
//! The run fails when runtimes do not converge, or the steady window or the no-op pass sees a
//! write; the speed
//! and memory targets are reported as met or missed.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../e2e/registry.rs"]
#[allow(dead_code)]
mod registry;

mod fleet;
mod heap;
mod probe;
mod proxy;
mod report;
#[allow(dead_code)]
mod timeline;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use promptflow_operator::api::PromptFlowRuntime;
use tokio::time::Instant;

use harness::OperatorProcess;
use registry::LocalRegistry;
use report::{Convergence, OperatorRun, Report, SizeResult};
use timeline::Timeline;

/// The operator's default `--concurrency`; the bench's client creates objects as many at a time.
const CONCURRENCY: usize = 16;
/// The version every bench runtime pins.
const TAG: &str = "20240501.v1";

struct Plan {
    sizes: Vec<usize>,
    steady: Duration,
    /// `PF_BENCH_PHASES=backlog`: only the backlog phase (for heap profiles).
    backlog_only: bool,
}

impl Plan {
    fn from_env() -> Self {
        let sizes = std::env::var("PF_BENCH_N")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .map(|n| n.trim().parse().expect("PF_BENCH_N: comma-separated counts"))
            .collect();
        let steady = std::env::var("PF_BENCH_STEADY_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let backlog_only = std::env::var("PF_BENCH_PHASES").as_deref() == Ok("backlog");
        Self {
            sizes,
            steady: Duration::from_secs(steady),
            backlog_only,
        }
    }
}

/// What every phase shares.
struct Bench {
    client: Client,
    registry: LocalRegistry,
    repository: String,
    catalog: String,
    steady: Duration,
}

/// How long N objects may take to converge before the bench gives up.
fn patience(n: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(80) * n as u32
}

impl Bench {
    async fn identity(&self, namespace: &str) {
        let ns = harness::TestNamespace {
            client: self.client.clone(),
            name: namespace.to_owned(),
        };
        self.registry.identity(&ns, &self.registry.password).await;
    }

    fn operator(&self, namespace: &str) -> OperatorProcess {
        OperatorProcess::start(
            &harness::kubeconfig(),
            &[
                "--watch-namespace",
                namespace,
                "--catalog",
                &self.catalog,
                "--registry-ca-file",
                &self.registry.ca_file,
            ],
        )
    }

    /// Runs the operator for `n` runtimes, created before it starts (`live` false) or while it
    /// runs; returns the measurements and one of its runtime pods.
    async fn operator_run(&self, n: usize, live: bool) -> (OperatorRun, Pod) {
        let namespace = fleet::namespace(&self.client, if live { "pf-bench-live" } else { "pf-bench-backlog" }).await;
        self.identity(&namespace).await;
        let spec = fleet::runtime_spec(&self.repository);
        if !live {
            fleet::create_runtimes(&self.client, &namespace, n, &spec, CONCURRENCY).await;
        }
        let cluster_writes_before = probe::cluster_writes(&self.client).await;
        let mut operator = self.operator(&namespace);
        let pid = operator.pid().expect("the operator runs");
        let mut rss_at_start = 0.0;
        if live {
            operator.wait_ready().await;
            rss_at_start = probe::memory_mib(pid, "VmRSS:");
        }
        let start = Instant::now();
        let api: Api<PromptFlowRuntime> = Api::namespaced(self.client.clone(), &namespace);
        let mut timeline = Timeline::watch(api, start, fleet::runtime_running);
        if live {
            fleet::create_runtimes(&self.client, &namespace, n, &spec, CONCURRENCY).await;
        }
        let converged = match timeline.wait_for(n, patience(n)).await {
            Ok(took) => took,
            Err(done) => panic!(
                "{done} of {n} runtimes Running after {:?}; operator log tail:\n{}",
                patience(n),
                tail(&operator)
            ),
        };
        if !live {
            rss_at_start = probe::memory_mib(pid, "VmRSS:");
        }
        // Let the last status writes and events land, then count a window with nothing to do.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut cluster_writes = probe::cluster_writes(&self.client).await - cluster_writes_before;
        if live {
            cluster_writes -= n as f64; // the bench's own creates
        }
        let metrics = operator.metrics().await;
        let (reads, writes) = probe::requests(&metrics);
        let events = probe::metric(
            &metrics,
            "promptflow_operator_kube_requests_total",
            r#"resource="events""#,
        );
        if writes > report::TARGET_WRITES_PER_RUNTIME * n as f64 {
            probe::explain_extra_writes(&self.client, &namespace).await;
        }
        tokio::time::sleep(self.steady).await;
        let after = operator.metrics().await;
        let (reads_after, writes_after) = probe::requests(&after);
        let per_minute = 60.0 / self.steady.as_secs_f64();
        let mut run = OperatorRun {
            converged: Convergence {
                seconds: converged.as_secs_f64(),
                points: timeline.points(400),
                cluster_writes_per_object: cluster_writes / n as f64,
            },
            ratio_to_floor: 0.0,
            writes_per_runtime: writes / n as f64,
            reads_per_runtime: reads / n as f64,
            event_writes_per_runtime: events / n as f64,
            steady_writes_per_minute: (writes_after - writes) * per_minute,
            steady_reads_per_minute: (reads_after - reads) * per_minute,
            rss_at_start_mib: rss_at_start,
            rss_peak_mib: probe::memory_mib(pid, "VmHWM:"),
            rss_steady_mib: probe::memory_mib(pid, "VmRSS:"),
            cpu_seconds: probe::cpu_seconds(pid),
            reconciles: probe::metric(&after, "promptflow_operator_reconciles_total", ""),
            registry_requests: probe::metric(&after, "promptflow_operator_registry_requests_total", ""),
            noop_writes: 0.0,
        };
        // A no-op pass: every runtime touched (an annotation nobody reads), each reconciled again.
        let noop_before = probe::requests(&operator.metrics().await).1;
        fleet::touch_runtimes(&self.client, &namespace, n, CONCURRENCY).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        run.noop_writes = probe::requests(&operator.metrics().await).1 - noop_before;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods
            .list(&ListParams::default().limit(1))
            .await
            .unwrap()
            .items
            .pop()
            .expect("a runtime pod");
        // A heap-profiling build writes its profile while it exits.
        let grace = if heap_profile().is_some() { 300 } else { 10 };
        operator.stop(Duration::from_secs(grace)).await;
        if let Some(path) = heap_profile() {
            println!(
                "bench N={n}: heap at its peak ({}), by allocation site:",
                path.display()
            );
            for (site, bytes, blocks) in heap::at_peak(&path, 14) {
                println!("  {:>8.2} MiB {:>8} blocks  {site}", bytes as f64 / 1048576.0, blocks);
            }
        }
        drop(timeline);
        fleet::delete_namespace(&self.client, &namespace).await;
        (run, pod)
    }

    /// N bare runtime pods, created by the bench itself, until all are Ready.
    async fn floor(&self, n: usize, template: &Pod) -> Convergence {
        let namespace = fleet::namespace(&self.client, "pf-bench-floor").await;
        self.identity(&namespace).await;
        let cluster_writes_before = probe::cluster_writes(&self.client).await;
        let start = Instant::now();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let mut timeline = Timeline::watch(api, start, fleet::pod_ready);
        fleet::create_pods(&self.client, &namespace, n, &fleet::bare_pod(template), CONCURRENCY).await;
        let seconds = match timeline.wait_for(n, patience(n)).await {
            Ok(took) => took.as_secs_f64(),
            Err(done) => panic!("floor: {done} of {n} pods Ready after {:?}", patience(n)),
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cluster_writes = probe::cluster_writes(&self.client).await - cluster_writes_before;
        let convergence = Convergence {
            seconds,
            points: timeline.points(400),
            cluster_writes_per_object: cluster_writes / n as f64,
        };
        drop(timeline);
        fleet::delete_namespace(&self.client, &namespace).await;
        convergence
    }
}

/// Where a heap-profiling operator build writes its profile (`PF_HEAP_PROFILE`).
fn heap_profile() -> Option<std::path::PathBuf> {
    std::env::var_os("PF_HEAP_PROFILE").map(std::path::PathBuf::from)
}

fn tail(operator: &OperatorProcess) -> String {
    let log = operator.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test]
async fn runtimes_at_scale() {
    let plan = Plan::from_env();
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let registry = LocalRegistry::read();
    let repository = format!("{}/bench/runtime", registry.host);
    registry.push(&repository, TAG).await;
    let catalog = fleet::tiny_catalog("pf-bench");
    let bench = Bench {
        client: client.clone(),
        registry,
        repository,
        catalog: catalog.clone(),
        steady: plan.steady,
    };
    let largest = plan.sizes.iter().copied().max().unwrap_or_default();
    let nodes = fleet::ensure_nodes(&client, largest).await;

    let mut sizes = vec![];
    for &n in &plan.sizes {
        let (mut backlog, template) = bench.operator_run(n, false).await;
        if plan.backlog_only {
            println!("{}", report::backlog_summary(n, &backlog));
            continue;
        }
        let floor = bench.floor(n, &template).await;
        let (mut live, _) = bench.operator_run(n, true).await;
        backlog.ratio_to_floor = backlog.converged.seconds / floor.seconds;
        live.ratio_to_floor = live.converged.seconds / floor.seconds;
        let kib_per_runtime = (live.rss_steady_mib - live.rss_at_start_mib) * 1024.0 / n as f64;
        let size = SizeResult {
            runtimes: n,
            nodes,
            floor,
            backlog,
            live,
            kib_per_runtime,
        };
        println!("{}", report::summary(&size));
        for target in report::verdicts(&size) {
            println!("bench N={n}: target {}", target.line);
        }
        sizes.push(size);
    }
    let report = Report {
        machine: machine(),
        concurrency: CONCURRENCY,
        steady_window_seconds: plan.steady.as_secs(),
        sizes,
    };
    if plan.backlog_only {
        return;
    }
    let (json, png) = report::write(&report);
    println!("bench: report {} and chart {}", json.display(), png.display());
    std::fs::remove_file(&catalog).ok();
    for size in &report.sizes {
        for target in report::verdicts(size).into_iter().filter(|t| t.asserted) {
            assert!(target.met, "N={}: {}", size.runtimes, target.line);
        }
    }
}

/// The activity proxy's cost per request, and its behaviour under 1,000 slow-header
/// connections; the report goes beside the runtimes' (`<target>/bench/proxy.json`).
#[tokio::test]
async fn the_activity_proxy_adds_little_and_holds_under_slow_heads() {
    let report = proxy::measure("127.0.251.1").await;
    println!("bench proxy ({}):\n{}", machine(), report.table());
    for (met, verdict) in report.verdicts() {
        println!("bench proxy: target {verdict}: {}", if met { "met" } else { "MISSED" });
    }
    let path = report::directory(&[]).with_file_name("proxy.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!("bench proxy: report {}", path.display());
}

/// CPUs and memory of the machine, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or_default()
        / 1024.0
        / 1024.0;
    format!("{cpus} CPUs, {memory:.0} GiB")
}
