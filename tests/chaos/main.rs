//! `make chaos`: real faults while N runtimes converge (`PF_CHAOS_N`, default 1000), then
//! hostile-but-valid objects. Not part of `make test`, which runs it at N=50 as a smoke test.
//!
//! Faults, in one run: the operator SIGKILLed at random moments (at least five times, restarted
//! each time), kube-apiserver and etcd killed and restarted once each, the registry down for a
//! minute (`PF_CHAOS_REGISTRY_DOWN_SECONDS`). Afterwards every runtime must be Running with
//! exactly one pod and one Service of its own, no orphan pods, no runtime lost or duplicated,
//! and deleting runtimes must not hang on a finalizer. The recovery time after each fault is
//! printed: from the fault until the next runtime turned Running (or, when all already were,
//! until the operator or API server was ready again).

#[path = "../bench/fleet.rs"]
#[allow(dead_code)]
mod fleet;
#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../bench/probe.rs"]
#[allow(dead_code)]
mod probe;
#[path = "../e2e/registry.rs"]
#[allow(dead_code)]
mod registry;
#[path = "../bench/timeline.rs"]
#[allow(dead_code)]
mod timeline;

mod check;
mod hostile;

use std::time::Duration;

use kube::Api;
use promptflow_operator::api::PromptFlowRuntime;
use rand::Rng;
use tokio::time::Instant;

use harness::OperatorProcess;
use registry::LocalRegistry;
use timeline::Timeline;

/// How many runtimes converge under faults.
fn size() -> usize {
    std::env::var("PF_CHAOS_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

/// How long the registry stays down.
fn registry_down() -> Duration {
    let seconds = std::env::var("PF_CHAOS_REGISTRY_DOWN_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// The operator, over `namespace` or every namespace.
fn operator(namespace: Option<&str>, catalog: &str, registry: &LocalRegistry) -> OperatorProcess {
    let mut args = vec!["--catalog", catalog, "--registry-ca-file", &registry.ca_file];
    if let Some(namespace) = namespace {
        args.extend(["--watch-namespace", namespace]);
    }
    OperatorProcess::start(&harness::kubeconfig(), &args)
}

/// One fault and how long the operator took to make progress again.
struct Recovery {
    fault: String,
    seconds: f64,
}

/// Seconds from `since` until a runtime beyond the `before` Running ones turned Running (at once
/// when all `n` already are).
async fn progress(timeline: &mut Timeline, before: usize, n: usize, since: Instant) -> f64 {
    let target = if before >= n { n } else { before + 1 };
    timeline
        .wait_for(target, Duration::from_secs(300))
        .await
        .unwrap_or_else(|done| panic!("no progress for 5 minutes after a fault ({done} of {n} Running)"));
    since.elapsed().as_secs_f64()
}

#[tokio::test]
async fn every_runtime_converges_through_operator_control_plane_and_registry_faults() {
    let n = size();
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let registry = LocalRegistry::read();
    let repository = format!("{}/chaos/runtime", registry.host);
    registry.push(&repository, "20240501.v1").await;
    let catalog = fleet::tiny_catalog("pf-chaos");
    fleet::ensure_nodes(&client, n).await;
    let namespace = fleet::namespace(&client, "pf-chaos").await;
    let ns = harness::TestNamespace {
        client: client.clone(),
        name: namespace.clone(),
    };
    registry.identity(&ns, &registry.password).await;

    let mut op = operator(Some(&namespace), &catalog, &registry);
    op.wait_ready().await;
    let start = Instant::now();
    let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), &namespace);
    let mut timeline = Timeline::watch(api.clone(), start, fleet::runtime_running);
    let spec = fleet::runtime_spec(&repository);
    let creating = {
        let client = client.clone();
        let namespace = namespace.clone();
        tokio::spawn(async move { fleet::create_runtimes(&client, &namespace, n, &spec, 16).await })
    };
    // The registry is down for a minute from the start: runtimes must start anyway.
    let outage = tokio::spawn(async move {
        let down = Instant::now();
        harness::restart_component("registry", registry_down()).await;
        down.elapsed().as_secs_f64()
    });

    let mut recoveries = vec![];
    for kill in 1..=5 {
        let wait = rand::rng().random_range(500..3000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let before = timeline.count();
        let at = Instant::now();
        op.kill9().await;
        op = operator(Some(&namespace), &catalog, &registry);
        op.wait_ready().await;
        recoveries.push(Recovery {
            fault: format!(
                "operator SIGKILL #{kill} at {:.1}s ({before} Running)",
                (at - start).as_secs_f64()
            ),
            seconds: progress(&mut timeline, before, n, at).await,
        });
    }
    creating.await.unwrap();
    for component in ["kube-apiserver", "etcd"] {
        let before = timeline.count();
        let at = Instant::now();
        harness::restart_component(component, Duration::from_secs(2)).await;
        recoveries.push(Recovery {
            fault: format!(
                "{component} SIGKILL at {:.1}s ({before} Running)",
                (at - start).as_secs_f64()
            ),
            seconds: progress(&mut timeline, before, n, at).await,
        });
    }
    let patience = Duration::from_secs(180) + Duration::from_millis(100) * n as u32;
    let converged = timeline
        .wait_for(n, patience)
        .await
        .unwrap_or_else(|done| panic!("{done} of {n} Running after {patience:?}:\n{}", op.log_text()));
    let outage = outage.await.unwrap();
    println!(
        "chaos N={n}: all Running {:.1}s after the first create",
        converged.as_secs_f64()
    );
    println!("chaos N={n}: registry down {outage:.1}s from the start");
    for recovery in &recoveries {
        println!(
            "chaos N={n}: {} → progress again after {:.1}s",
            recovery.fault, recovery.seconds
        );
    }

    check::one_pod_and_service_each(&client, &namespace, n).await;
    check::deletes_do_not_hang(&client, &namespace, n.min(50)).await;
    op.stop(Duration::from_secs(10)).await;
    drop(timeline);
    fleet::delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn hostile_but_valid_objects_neither_crash_the_operator_nor_starve_another_namespace() {
    hostile::run(size() * 5).await;
}
