//! The write budget: every API write the operator makes for a runtime from creation to Running,
//! events included, counted per runtime, and a reconcile that changes nothing writes nothing.
//! Measured for 50 runtimes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, with_namespace};

const RUNTIMES: usize = 50;
/// Service and pod create, status `Not available`, status `Running`, event `Running`.
const BUDGET_PER_RUNTIME: u64 = 5;

fn names() -> Vec<String> {
    (0..RUNTIMES).map(|i| format!("rt-{i:04}")).collect()
}

/// The runtime an API write path is about: its status, or its pod.
fn runtime_of(path: &str) -> Option<String> {
    let mut parts = path.trim_end_matches("/status").rsplit('/');
    let name = parts.next()?;
    match parts.next()? {
        "promptflowruntimes" => Some(name.to_owned()),
        "pods" => name.strip_suffix("-runtime").map(str::to_owned),
        "services" => Some(name.to_owned()),
        _ => None,
    }
}

/// Writes per runtime: the operator's logged writes of pods and statuses, plus the events the
/// API server holds for the runtime (each a create, and a patch per repetition).
async fn writes_per_runtime(operator: &OperatorProcess, events: &kube::Api<Event>) -> BTreeMap<String, u64> {
    let mut writes: BTreeMap<String, u64> = names().into_iter().map(|n| (n, 0)).collect();
    // Pods and Services are created with a POST, whose path names no object: counted together,
    // they must be exactly one of each per runtime, and are then given to each.
    let mut creates = 0;
    for line in operator.log_text().lines().filter(|l| l.contains("api write")) {
        let path = line
            .split("path=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next());
        if path.is_some_and(|p| p.ends_with("/pods") || p.ends_with("/services")) {
            creates += 1;
        } else if let Some(runtime) = path.and_then(runtime_of)
            && let Some(count) = writes.get_mut(&runtime)
        {
            *count += 1;
        }
    }
    assert_eq!(creates, 2 * writes.len(), "one pod and one Service created per runtime");
    for count in writes.values_mut() {
        *count += 2;
    }
    for event in events.list(&ListParams::default()).await.unwrap() {
        // Only events about runtimes: the Services' own events come from other controllers.
        let Some(name) = event
            .regarding
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("PromptFlowRuntime"))
            .and_then(|r| r.name.clone())
        else {
            continue;
        };
        let repeats = event.series.as_ref().map_or(0, |s| s.count.max(1) as u64 - 1);
        if let Some(count) = writes.get_mut(&name) {
            *count += 1 + repeats;
        }
    }
    writes
}

#[tokio::test]
async fn fifty_runtimes_reach_running_within_the_write_budget() {
    with_namespace("pf-budget", |ns| async move {
        let operator = OperatorProcess::start_logging(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name],
            "info,kube=warn,promptflow_operator::api=debug",
        );
        let api = ns.api::<PromptFlowRuntime>();
        let events = ns.api::<Event>();
        operator.wait_ready().await;

        let started = Instant::now();
        harness::create_runtimes(&api, "rt", RUNTIMES).await;
        harness::wait_all_running(&api, RUNTIMES, Duration::from_secs(120)).await;
        let elapsed = started.elapsed();
        // Each runtime's Running status write wakes it once more: wait for that reconcile (a
        // second reconcile line in phase Running) so its writes, if any, are counted.
        operator.wait_reconciled(0, &names(), "phase=Running", 2, Duration::from_secs(30)).await;
        let writes = writes_per_runtime(&operator, &events).await;
        let total: u64 = writes.values().sum();
        let (worst, most) = writes.iter().max_by_key(|(_, n)| **n).map(|(k, n)| (k.clone(), *n)).unwrap();
        println!(
            "write budget: {RUNTIMES} runtimes Running in {:.1}s, {total} writes including events ({:.2} per runtime, at most {most} for {worst})",
            elapsed.as_secs_f64(),
            total as f64 / RUNTIMES as f64
        );
        if most > BUDGET_PER_RUNTIME {
            let log = operator.log_text();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&format!("/{worst}")) || l.contains(&format!("name={worst} ")))
                .collect();
            let reasons: Vec<_> = events
                .list(&ListParams::default())
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(worst.as_str()))
                .map(|e| (e.reason, e.series.map(|s| s.count)))
                .collect();
            panic!("{worst} took {most} writes (budget {BUDGET_PER_RUNTIME}): {writes:?}\n{}\nevents: {reasons:?}", lines.join("\n"));
        }
        assert_eq!(total, operator.writes_including_events().await, "every write is accounted to a runtime");
        let warnings: Vec<_> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning") && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("PromptFlowRuntime"))
            .collect();
        assert!(warnings.is_empty(), "minimal runtimes on a public image deserve no Warning: {warnings:?}");

        // A reconcile that changes nothing writes nothing: touch every runtime with an annotation
        // the operator does not act on, and wait until each was reconciled after the touch.
        let before_noop = operator.writes_including_events().await;
        let mark = operator.log_text().len();
        for name in names() {
            let patch = json!({"metadata": {"annotations": {"e2e.promptflow.dev/touched": "yes"}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        }
        operator.wait_reconciled(mark, &names(), "phase=Running", 1, Duration::from_secs(30)).await;
        let noop_writes = operator.writes_including_events().await - before_noop;
        assert_eq!(noop_writes, 0, "no-op reconciles wrote {noop_writes} times");
    })
    .await;
}

#[test]
fn write_paths_name_their_runtime() {
    assert_eq!(
        runtime_of("/apis/promptflow.dev/v1alpha1/namespaces/a/promptflowruntimes/rt-0001/status").as_deref(),
        Some("rt-0001")
    );
    assert_eq!(
        runtime_of("/api/v1/namespaces/a/pods/rt-0001-runtime").as_deref(),
        Some("rt-0001")
    );
    assert_eq!(runtime_of("/apis/events.k8s.io/v1/namespaces/a/events"), None);
}

/// A settled runtime reads no pull secrets: the reconciles after it runs (its own status, its
/// pod's, annotations nobody acts on) read none; a changed service account is read again, and a
/// pull secret deleted meanwhile is then reported while the pod keeps serving.
#[tokio::test]
async fn a_settled_runtime_reads_no_pull_secrets() {
    with_namespace("pf-settled", |ns| async move {
        const N: usize = 3;
        let registry = crate::registry::LocalRegistry::read();
        let operator = crate::versions::operator(&ns, &registry);
        registry.identity(&ns, &registry.password).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        registry.push(&repository, "20240101.v1").await;
        let names: Vec<String> = (0..N).map(|i| format!("rt-{i}")).collect();
        for name in &names {
            crate::runtime::create_runtime(&ns, name, crate::versions::spec(&repository)).await;
        }
        let api = ns.api::<PromptFlowRuntime>();
        harness::wait_all_running(&api, N, Duration::from_secs(90)).await;
        operator
            .wait_reconciled(0, &names, "phase=Running", 2, Duration::from_secs(30))
            .await;
        let settled = operator.requests("read", "secrets").await;
        assert!(
            settled >= N as u64,
            "each runtime read its pull secret to make its pod: {settled}"
        );

        for round in 0..3 {
            let mark = operator.log_text().len();
            for name in &names {
                let patch = json!({"metadata": {"annotations": {"e2e.promptflow.dev/touched": round.to_string()}}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .unwrap();
            }
            operator
                .wait_reconciled(mark, &names, "phase=Running", 1, Duration::from_secs(30))
                .await;
        }
        let after_touches = operator.requests("read", "secrets").await;
        assert_eq!(
            after_touches, settled,
            "settled runtimes read pull secrets on no-op reconciles"
        );

        // The pull secret goes, and the account changes: each runtime reads again, says so, and
        // keeps its serving pod.
        ns.api::<k8s_openapi::api::core::v1::Secret>()
            .delete("regcred", &Default::default())
            .await
            .unwrap();
        ns.api::<k8s_openapi::api::core::v1::ServiceAccount>()
            .patch(
                "puller",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"e2e.promptflow.dev/changed": "yes"}}})),
            )
            .await
            .unwrap();
        for name in &names {
            let runtime =
                crate::runtime::wait_condition(&ns, name, "IdentityResolved", "False", "PullSecretNotFound").await;
            assert_eq!(
                runtime.status.unwrap().phase,
                promptflow_operator::api::RuntimePhase::Running,
                "{name}: the pod from before keeps serving"
            );
        }
        assert!(
            operator.requests("read", "secrets").await >= settled + N as u64,
            "a changed account is read again"
        );
    })
    .await;
}
