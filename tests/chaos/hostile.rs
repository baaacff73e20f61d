//! Hostile but valid input: many runtimes in one namespace beside a few in another, names at the
//! length limit, unicode and very large annotations, a flow ConfigMap near the 1 MiB object limit.
//! The operator (watching every namespace) must not crash, and the small namespace must not wait
//! for the crowd.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;
use tokio::time::Instant;

use crate::timeline::Timeline;
use crate::{fleet, harness, operator, probe, registry::LocalRegistry};

async fn create(api: &Api<PromptFlowRuntime>, object: serde_json::Value) -> kube::Result<PromptFlowRuntime> {
    let runtime: PromptFlowRuntime = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &runtime).await
}

/// The odd ones, created beside the crowd; returns how many runtimes they add.
async fn odd_ones(client: &Client, namespace: &str) -> usize {
    let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
    let longest = format!("long-{}", "n".repeat(47));
    assert_eq!(longest.len(), 52, "the CRD's limit on runtime names");
    create(&api, json!({"metadata": {"name": longest}, "spec": {}}))
        .await
        .unwrap();
    create(
        &api,
        json!({"metadata": {"name": "unicode", "annotations": {
            "example.com/note": "日本語のメモ 🚀 — ünïcödé, \u{202e}reversed",
            "example.com/emoji": "🧪🧪🧪",
        }}, "spec": {}}),
    )
    .await
    .unwrap();
    // The API server caps all annotations of an object at 256 KiB: just under is valid, 1 MiB is
    // refused by the API server itself (never reaching the operator).
    let big = "x".repeat(250 * 1024);
    create(
        &api,
        json!({"metadata": {"name": "big-annotation", "annotations": {"example.com/big": big}}, "spec": {}}),
    )
    .await
    .unwrap();
    let huge = "x".repeat(1024 * 1024);
    let refused = create(
        &api,
        json!({"metadata": {"name": "huge-annotation", "annotations": {"example.com/huge": huge}}, "spec": {}}),
    )
    .await;
    assert!(refused.is_err(), "the API server accepted a 1 MiB annotation");
    // A flow whose ConfigMap is close to the 1 MiB object limit.
    let dag = format!(
        "# {}\ninputs: {{}}\noutputs: {{}}\nnodes: []\n",
        "y".repeat(1000 * 1000)
    );
    let flow: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "huge-flow"}, "data": {"flow.dag.yaml": dag}})).unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &flow)
        .await
        .unwrap();
    create(
        &api,
        json!({"metadata": {"name": "huge-flow"}, "spec": {"flow": {"configMapName": "huge-flow"}}}),
    )
    .await
    .unwrap();
    4
}

pub async fn run(crowd: usize) {
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let registry = LocalRegistry::read();
    let catalog = fleet::tiny_catalog("pf-hostile");
    fleet::ensure_nodes(&client, crowd + 10).await;
    // The crowd's namespace sorts first: in a first-come-first-served queue its backlog would
    // come before anything of the quiet one.
    let crowded = fleet::namespace(&client, "pf-hostile-a-crowd").await;
    let quiet = fleet::namespace(&client, "pf-hostile-b-quiet").await;
    let spec = json!({});
    fleet::create_runtimes(&client, &crowded, crowd, &spec, 16).await;
    let crowd = crowd + odd_ones(&client, &crowded).await;

    let op = operator(None, &catalog, &registry);
    let pid = op.pid().expect("the operator runs");
    let start = Instant::now();
    let mut crowd_running = Timeline::watch(
        Api::<PromptFlowRuntime>::namespaced(client.clone(), &crowded),
        start,
        fleet::runtime_running,
    );
    let patience = Duration::from_secs(180) + Duration::from_millis(100) * crowd as u32;
    // While the crowd converges, three runtimes are created in the quiet namespace.
    let converging = (crowd / 10).max(1);
    crowd_running
        .wait_for(converging, patience)
        .await
        .unwrap_or_else(|done| panic!("crowd: {done} of {crowd} Running:\n{}", op.log_text()));
    let created = Instant::now();
    let crowd_at_creation = crowd_running.count();
    let mut quiet_running = Timeline::watch(
        Api::<PromptFlowRuntime>::namespaced(client.clone(), &quiet),
        created,
        fleet::runtime_running,
    );
    // Where the quiet runtimes' time goes: the operator's first status and pod, kube-scheduler's
    // binding, the node's Ready.
    let quiet_pods: Api<Pod> = Api::namespaced(client.clone(), &quiet);
    let mut stages = [
        (
            "first status",
            Timeline::watch(
                Api::<PromptFlowRuntime>::namespaced(client.clone(), &quiet),
                created,
                |r| r.status.is_some(),
            ),
        ),
        ("pod created", Timeline::watch(quiet_pods.clone(), created, |_| true)),
        (
            "pod scheduled",
            Timeline::watch(quiet_pods.clone(), created, |p| {
                p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
            }),
        ),
        ("pod Ready", Timeline::watch(quiet_pods, created, fleet::pod_ready)),
    ];
    fleet::create_runtimes(&client, &quiet, 3, &spec, 3).await;
    let quiet_took = quiet_running
        .wait_for(3, patience)
        .await
        .unwrap_or_else(|done| panic!("quiet namespace: {done} of 3 Running:\n{}", op.log_text()));
    let mut stage_times = Vec::new();
    for (stage, timeline) in &mut stages {
        let took = timeline.wait_for(3, Duration::from_secs(1)).await;
        stage_times.push(match took {
            Ok(took) => format!("{stage} {:.1}s", took.as_secs_f64()),
            Err(done) => format!("{stage} {done} of 3"),
        });
    }
    drop(stages);
    let crowd_at_quiet = crowd_running.count();
    let crowd_took = crowd_running
        .wait_for(crowd, patience)
        .await
        .unwrap_or_else(|done| panic!("crowd: {done} of {crowd} Running:\n{}", op.log_text()));
    let address = op.admin_address().await;
    assert_eq!(
        harness::http_get(&address, "/healthz").await,
        "ok",
        "the operator is not healthy"
    );
    let log = op.log_text();
    assert!(!log.contains("panicked"), "the operator panicked:\n{log}");
    let peak = probe::memory_mib(pid, "VmHWM:");
    println!(
        "hostile: {crowd} runtimes in one namespace (incl. a 52-character name, unicode and 250 KiB annotations, a 1 MB flow) all Running after {:.1}s; \
         3 created in another namespace while {crowd_at_creation} of the crowd were Running were all Running {:.1}s after their creation (target 5s; {crowd_at_quiet} of the crowd Running by then); operator peak RSS {peak:.1} MiB; the quiet runtimes' stages (all 3): {}",
        crowd_took.as_secs_f64(),
        quiet_took.as_secs_f64(),
        stage_times.join(", ")
    );
    // Fair turns: the quiet namespace waits for one turn of the crowd, not for its backlog.
    assert!(
        quiet_took <= Duration::from_secs(5),
        "the quiet namespace's runtimes took {quiet_took:?} from creation to Running behind a converging crowd (target 5s)"
    );
    drop((crowd_running, quiet_running, op));
    fleet::delete_namespace(&client, &crowded).await;
    fleet::delete_namespace(&client, &quiet).await;
}
