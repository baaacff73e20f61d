//! Two replicas with leader election: exactly one reconciles; when it dies, the other takes over.

use std::time::Duration;

use crate::harness::{self, OperatorProcess, with_namespace};
use promptflow_operator::api::PromptFlowRuntime;

const LEASE_SECONDS: &str = "3";

fn elected(operator: &OperatorProcess) -> bool {
    operator.log_text().contains("became leader")
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    with_namespace("pf-leader", |ns| async move {
        let args = [
            "--watch-namespace",
            &ns.name,
            "--leader-elect",
            "true",
            "--lease-namespace",
            &ns.name,
            "--lease-seconds",
            LEASE_SECONDS,
        ];
        let mut first = OperatorProcess::start(&harness::kubeconfig(), &args);
        let mut second = OperatorProcess::start(&harness::kubeconfig(), &args);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !elected(&first) && !elected(&second) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader:\n{}\n{}",
                first.log_text(),
                second.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let a lease term pass: still exactly one leader.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            elected(&first) ^ elected(&second),
            "both or neither lead:\n{}\n{}",
            first.log_text(),
            second.log_text()
        );
        let (leader, standby) = if elected(&first) {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        assert!(
            !standby.log_text().contains("controller running"),
            "the standby reconciles:\n{}",
            standby.log_text()
        );
        // A standby is ready (a rolling update waits for that before stopping the leader).
        assert_eq!(harness::http_get(&standby.admin_address().await, "/readyz").await, "ok");

        let runtimes = ns.api::<PromptFlowRuntime>();
        harness::create_runtimes(&runtimes, "before", 1).await;
        harness::wait_all_running(&runtimes, 1, Duration::from_secs(30)).await;

        leader.kill9().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !elected(standby) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby never took over:\n{}",
                standby.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        harness::create_runtimes(&runtimes, "after", 1).await;
        harness::wait_all_running(&runtimes, 2, Duration::from_secs(30)).await;

        // A graceful stop hands the lease back.
        assert!(standby.stop(Duration::from_secs(10)).await, "{}", standby.log_text());
        assert!(standby.log_text().contains("lease released"), "{}", standby.log_text());
    })
    .await;
}
