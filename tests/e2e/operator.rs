//! The operator binary as a process: it checks its CRDs on start and says clearly what is wrong.

use std::time::Duration;

use crate::harness::{self, OperatorProcess};

#[tokio::test]
async fn operator_finds_installed_crds() {
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let mut operator = OperatorProcess::start(&harness::kubeconfig(), &["--check"]);
    let code = operator.wait_exit(Duration::from_secs(30)).await;
    let log = operator.log_text();
    assert!(log.contains("CRD installed and Established"), "{log}");
    assert!(
        log.contains("promptflowruntimes.promptflow.dev") && log.contains("computeinstances.promptflow.dev"),
        "{log}"
    );
    assert_eq!(code, 0, "{log}");
}

#[tokio::test]
async fn operator_exits_non_zero_with_a_helpful_message_when_the_cluster_is_unreachable() {
    let dir = std::env::temp_dir().join(format!("pf-unreachable-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: not-a-secret}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();
    let mut operator = OperatorProcess::start(&kubeconfig, &["--check"]);
    let code = operator.wait_exit(Duration::from_secs(60)).await;
    let log = operator.log_text();
    std::fs::remove_dir_all(&dir).ok();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("cannot reach the Kubernetes API"), "{log}");
    assert!(!log.contains("not-a-secret"), "the token leaked into the log:\n{log}");
}

/// `make run` runs `hack/run.sh`: with an unreachable $KUBECONFIG it falls back to the local
/// cluster (already up here, so cluster-up is a no-op), installs the CRDs and runs the operator.
#[tokio::test]
async fn make_run_falls_back_to_the_local_cluster_when_kubeconfig_is_unreachable() {
    let local = harness::repo_root().join(".cluster/kubeconfig");
    if harness::kubeconfig() != local {
        eprintln!("skipped: the suite runs against a cluster other than the local one");
        return;
    }
    let output = tokio::process::Command::new(harness::repo_root().join("hack/run.sh"))
        .arg("--check")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("OPERATOR_BIN", env!("CARGO_BIN_EXE_promptflow-operator"))
        .output()
        .await
        .expect("run hack/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("does not answer; starting the local cluster"), "{text}");
    assert!(text.contains("CRDs installed"), "{text}");
    assert!(text.contains("both CRDs are installed and Established"), "{text}");
}

#[tokio::test]
async fn operator_serves_health_and_metrics_and_stops_on_sigterm() {
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let mut operator = OperatorProcess::start(&harness::kubeconfig(), &["--watch-namespace", "default"]);
    let address = operator.admin_address().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while harness::http_get(&address, "/readyz").await != "ok" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(harness::http_get(&address, "/healthz").await, "ok");
    let metrics = operator.metrics().await;
    assert!(metrics.contains("promptflow_operator_kube_requests_total"), "{metrics}");
    assert!(
        operator.stop(Duration::from_secs(10)).await,
        "no graceful exit on SIGTERM:\n{}",
        operator.log_text()
    );
    assert!(
        operator.log_text().contains("promptflow-operator stopped"),
        "{}",
        operator.log_text()
    );
}
