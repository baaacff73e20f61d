//! The write budget: from creation to Running at most 3 API writes per runtime (events counted
//! apart), and none for a reconcile that changes nothing. Measured for 50 runtimes.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, with_namespace};

const RUNTIMES: usize = 50;

#[tokio::test]
async fn fifty_runtimes_reach_running_within_the_write_budget() {
    with_namespace("pf-budget", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let api = ns.api::<PromptFlowRuntime>();
        // Let the operator settle (caches filled) so only the runtimes' writes are counted.
        operator.admin_address().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes_before = operator.writes_excluding_events().await;

        let started = Instant::now();
        harness::create_runtimes(&api, "rt", RUNTIMES).await;
        harness::wait_all_running(&api, RUNTIMES, Duration::from_secs(120)).await;
        let elapsed = started.elapsed();
        // Quiet period: reconciles triggered by the last status writes must write nothing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = operator.writes_excluding_events().await - writes_before;
        let per_runtime = writes as f64 / RUNTIMES as f64;
        println!(
            "write budget: {RUNTIMES} runtimes Running in {:.1}s, {writes} writes ({per_runtime:.2} per runtime)",
            elapsed.as_secs_f64()
        );
        assert!(
            per_runtime <= 3.0,
            "{per_runtime} writes per runtime exceed the budget of 3"
        );

        // A reconcile that changes nothing writes nothing: touch every runtime with an annotation
        // the operator does not act on.
        let before_noop = operator.writes_excluding_events().await;
        for i in 0..RUNTIMES {
            let patch = json!({"metadata": {"annotations": {"e2e.promptflow.dev/touched": "yes"}}});
            api.patch(&format!("rt-{i:04}"), &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let noop_writes = operator.writes_excluding_events().await - before_noop;
        assert_eq!(noop_writes, 0, "no-op reconciles wrote {noop_writes} times");
    })
    .await;
}
