//! `kubectl promptflow`: the plugin binary run through the real kubectl (plugin discovery on
//! PATH) against live runtimes and instances reconciled by the operator process: every button
//! makes its change, waits for the result and says what happened; failures exit 1 with the
//! reason a user needs.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use promptflow_operator::api::{ComputeInstance, InstanceState, PromptFlowRuntime, RuntimePhase};
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::registry::LocalRegistry;
use crate::runtime::{create, create_runtime, wait_status};

/// What one `kubectl promptflow …` run printed, and whether it succeeded.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// PATH with the plugin binary's directory first.
fn plugin_path() -> String {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-promptflow"));
    format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `kubectl promptflow ARGS` on a terminal (a pseudo-terminal from `script`); returns all
/// it wrote there.
async fn plugin_on_terminal(args: &str) -> String {
    let output = tokio::process::Command::new("script")
        .args(["-qec", &format!("kubectl promptflow {args}"), "/dev/null"])
        .env("KUBECONFIG", harness::kubeconfig())
        .env("PATH", plugin_path())
        .output()
        .await
        .expect("script runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `kubectl promptflow ARGS` with the plugin binary first on PATH.
async fn plugin(args: &[&str]) -> Run {
    let path = plugin_path();
    let output = tokio::process::Command::new("kubectl")
        .arg("promptflow")
        .args(args)
        .env("KUBECONFIG", harness::kubeconfig())
        .env("PATH", path)
        .output()
        .await
        .expect("kubectl runs");
    let run = Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!("$ kubectl promptflow {}\n{}{}", args.join(" "), run.stdout, run.stderr);
    run
}

fn phase(rt: &PromptFlowRuntime) -> (RuntimePhase, String) {
    let status = rt.status.clone().unwrap_or_default();
    (status.phase, status.reason.unwrap_or_default())
}

async fn runtime_pod_uid(ns: &TestNamespace, name: &str) -> Option<String> {
    ns.api::<Pod>()
        .get_opt(&format!("{name}-runtime"))
        .await
        .unwrap()
        .and_then(|p| p.uid())
}

#[tokio::test]
async fn the_buttons_act_on_a_live_runtime_and_say_what_happened() {
    with_namespace("pf-plugin", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--registry-ca-file", &registry.ca_file],
        );
        registry.identity(&ns, &registry.password).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        registry.push(&repository, "20240101.v1").await;
        let spec = json!({"image": {"repository": repository}, "identity": {"serviceAccountName": "puller"}});
        create_runtime(&ns, "chat", spec).await;
        let n = ns.name.as_str();
        wait_status(&ns, "chat", "Running", None).await;

        // status: one readable table, and the objects as JSON.
        let status = plugin(&["status", "-n", n]).await;
        assert!(status.ok);
        let row = status.stdout.lines().find(|l| l.starts_with("chat ")).expect("a row for chat");
        let cells: Vec<&str> = row.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(&cells[..6], ["chat", "Running", "PodReady", "Serverless", "20240101.v1", "20240101.v1"], "{row}");
        assert!(cells[6].starts_with("in "), "an idle deadline: {row}");
        let all = plugin(&["status", "-A"]).await;
        assert!(all.stdout.lines().any(|l| l.starts_with(&format!("{n} ")) && l.contains(" chat ")));
        let listed: serde_json::Value = serde_json::from_str(&plugin(&["status", "-n", n, "-o", "json"]).await.stdout).unwrap();
        assert_eq!(listed["items"][0]["metadata"]["name"], "chat");

        // check-version finds the newer tag; update moves to it.
        registry.push(&repository, "20240501.v2").await;
        let check = plugin(&["check-version", "chat", "-n", n]).await;
        assert!(check.ok);
        assert!(check.stdout.contains("20240501.v2"), "names the newer version");
        assert!(check.stderr.contains("set promptflow.dev/check-version="), "says what it changed");
        let update = plugin(&["update", "pfrt/chat", "-n", n]).await;
        assert!(update.ok);
        assert!(update.stdout.contains("updated from 20240101.v1 to 20240501.v2"));
        let again = plugin(&["update", "chat", "-n", n]).await;
        assert!(again.ok && again.stdout.contains("already at the newest version, 20240501.v2"));

        // stop, start and restart.
        let pod_before_stop = runtime_pod_uid(&ns, "chat").await.expect("a pod");
        let stop = plugin(&["stop", "chat", "-n", n]).await;
        assert!(stop.ok && stop.stdout.contains("stopped"));
        let rt = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap();
        assert_eq!(phase(&rt), (RuntimePhase::NotAvailable, "StoppedByUser".into()));
        harness::wait_deleted(&ns.api::<Pod>(), "chat-runtime", &pod_before_stop, Duration::from_secs(30)).await;
        let start = plugin(&["start", "chat", "-n", n, "-o", "yaml"]).await;
        assert!(start.ok);
        let started: PromptFlowRuntime = serde_norway::from_str(&start.stdout).unwrap();
        assert_eq!(phase(&started).0, RuntimePhase::Running, "-o yaml prints the object at its result");
        let before = runtime_pod_uid(&ns, "chat").await.expect("a pod");
        let restart = plugin(&["restart", "chat", "-n", n]).await;
        assert!(restart.ok && restart.stdout.contains("restarted"));
        let after = runtime_pod_uid(&ns, "chat").await.expect("a pod");
        assert_ne!(before, after, "a new pod");
        assert!(restart.stderr.lines().any(|l| l.starts_with("… ")), "plain progress lines off a terminal");
        // On a terminal: a spinner redrawn in place (cursor control), then the result.
        let shown = plugin_on_terminal(&format!("restart chat -n {n}")).await;
        assert!(shown.contains("\u{1b}[") && shown.contains("restarted"), "{shown:?}");

        // describe: status, conditions and events on one screen.
        let describe = plugin(&["describe", "chat", "-n", n]).await;
        assert!(describe.ok);
        for needle in ["Phase:", "Running (PodReady)", "Version:", "20240501.v2", "Conditions:", "UpdateAvailable", "Events:", "Updating", "StoppedByUser"] {
            assert!(describe.stdout.contains(needle), "describe shows {needle}");
        }

        // Failures exit 1 and say what to fix.
        let broken = json!({"identity": {"serviceAccountName": "nobody"}});
        create_runtime(&ns, "broken", broken).await;
        let start = plugin(&["start", "broken", "-n", n, "--timeout", "30s"]).await;
        assert!(!start.ok);
        assert!(start.stderr.contains("ServiceAccountNotFound") && start.stderr.contains("nobody"));
        let pinned = json!({"image": {"repository": repository, "version": "20240101.v1"}, "identity": {"serviceAccountName": "puller"}});
        create_runtime(&ns, "pinned", pinned).await;
        let update = plugin(&["update", "pinned", "-n", n]).await;
        assert!(!update.ok && update.stderr.contains("spec.image.version"));
        let annotations = ns.api::<PromptFlowRuntime>().get("pinned").await.unwrap().annotations().clone();
        assert!(!annotations.contains_key("promptflow.dev/update"), "a refused button changes nothing");
        let missing = plugin(&["stop", "nothere", "-n", n]).await;
        assert!(!missing.ok && missing.stderr.contains("runtime nothere not found"));
        let context = plugin(&["status", "--context", "nope"]).await;
        assert!(!context.ok && context.stderr.contains("nope"));
        let kind = plugin(&["stop", "pod/chat", "-n", n]).await;
        assert!(!kind.ok && kind.stderr.contains("pfrt/NAME"));
        // A stopped runtime cannot be restarted or updated: it says how to start it instead.
        let stop = plugin(&["stop", "chat", "-n", n, "--no-wait"]).await;
        assert!(stop.ok && stop.stdout.is_empty(), "--no-wait returns after the change");
        wait_status(&ns, "chat", "Not available", Some("StoppedByUser")).await;
        let restart = plugin(&["restart", "chat", "-n", n]).await;
        assert!(!restart.ok && restart.stderr.contains("kubectl promptflow start chat"));
    })
    .await;
}

#[tokio::test]
async fn the_buttons_start_and_stop_a_compute_instance_and_refuse_its_runtimes_lifecycle() {
    with_namespace("pf-plugin-ci", |ns| async move {
        let _operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--instance-restart-batch-seconds=1"],
        );
        let n = ns.name.as_str();
        let instance = json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
            "metadata": {"name": "gpu"}, "spec": {"instanceType": "Standard_DS3_v2"}
        });
        create(&ns.api::<ComputeInstance>(), instance).await;
        let on_instance = json!({"compute": {"instance": {"name": "gpu", "acknowledgeRestart": true}}});
        create_runtime(&ns, "chat", on_instance).await;
        harness::wait_for(
            &ns.api::<ComputeInstance>(),
            "gpu",
            |ci: Option<&ComputeInstance>| {
                ci.and_then(|c| c.status.as_ref())
                    .is_some_and(|s| s.state == InstanceState::Running && s.runtimes == ["chat"])
            },
            Duration::from_secs(60),
        )
        .await;

        let status = plugin(&["status", "-n", n]).await;
        let row = status
            .stdout
            .lines()
            .find(|l| l.starts_with("gpu "))
            .expect("a row for gpu");
        assert!(
            row.contains("Running") && row.contains("Standard_DS3_v2") && row.contains("chat"),
            "{row}"
        );

        let stop = plugin(&["stop", "pfci/gpu", "-n", n]).await;
        assert!(stop.ok && stop.stdout.contains("compute instance gpu: stopped"));
        let start = plugin(&["start", "computeinstance/gpu", "-n", n]).await;
        assert!(start.ok && start.stdout.contains("running with runtimes [chat]"));

        let refused = plugin(&["stop", "chat", "-n", n]).await;
        assert!(!refused.ok && refused.stderr.contains("kubectl promptflow stop pfci/gpu"));
        let restart = plugin(&["restart", "pfci/gpu", "-n", n]).await;
        assert!(!restart.ok && restart.stderr.contains("start and stop only"));
        let describe = plugin(&["describe", "pfci/gpu", "-n", n]).await;
        assert!(describe.ok && describe.stdout.contains("State:") && describe.stdout.contains("StoppedByUser"));
    })
    .await;
}
