//! GitOps health, checked with the real libraries against live objects: kstatus
//! (sigs.k8s.io/cli-utils, what `kubectl wait`-style tools and Flux's default health checks use),
//! the shipped Argo CD Lua health checks run by gopher-lua (Argo CD's Lua runtime), and the
//! shipped Flux `healthCheckExprs` run by Flux's own CEL status reader — all in `tools/health`
//! (`pf-health`), built by `hack/build-health.sh`.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use promptflow_operator::api::{ComputeInstance, InstanceState, PromptFlowRuntime};
use serde::Serialize;
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::instance::wait_state;
use crate::runtime::{create, create_runtime, wait_status};

/// `hack/build-health.sh`: builds pf-health once (cached by content) and prints its path.
async fn pf_health() -> String {
    let script = harness::repo_root().join("hack/build-health.sh");
    let output = tokio::process::Command::new(script)
        .output()
        .await
        .expect("build-health.sh runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// What the three checkers say of `object`: (kstatus, Argo CD, Flux) statuses.
async fn verdicts(tool: &str, object: &impl Serialize, kind: &str) -> (String, String, String) {
    let root = harness::repo_root();
    let argocd = root.join(format!("config/gitops/argocd/{}.lua", kind.to_lowercase()));
    let flux = root.join("config/gitops/flux/health-check-exprs.yaml");
    let input = serde_json::to_vec(object).unwrap();
    let mut statuses = vec![];
    for args in [
        vec!["kstatus".to_owned()],
        vec!["argocd".to_owned(), argocd.display().to_string()],
        vec!["flux".to_owned(), flux.display().to_string()],
    ] {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(tool)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).await.unwrap();
        let output = child.wait_with_output().await.unwrap();
        assert!(
            output.status.success(),
            "pf-health {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        statuses.push(answer["status"].as_str().unwrap().to_owned());
    }
    (statuses[0].clone(), statuses[1].clone(), statuses[2].clone())
}

fn expect(kstatus: &str, argocd: &str, flux: &str) -> (String, String, String) {
    (kstatus.into(), argocd.into(), flux.into())
}

async fn runtime(ns: &TestNamespace, name: &str) -> PromptFlowRuntime {
    ns.api::<PromptFlowRuntime>().get(name).await.unwrap()
}

#[tokio::test]
async fn kstatus_argo_cd_and_flux_agree_with_the_phase_of_live_runtimes_and_instances() {
    with_namespace("pf-gitops", |ns| async move {
        let tool = pf_health().await;
        let mut operator = OperatorProcess::for_namespace(&ns.name);
        const RT: &str = "PromptFlowRuntime";
        const CI: &str = "ComputeInstance";
        let pinned = |repository: &str| json!({"image": {"repository": repository, "version": "1"}});

        // Running; starting (a runtime whose set-up never finishes); blocked; stopped by the user.
        create_runtime(&ns, "chat", pinned("registry.invalid/simulate/ready")).await;
        let fresh = create_runtime(&ns, "starting", pinned("registry.invalid/simulate/slowstart")).await;
        // As created, before any status (a new runtime's first status waits up to 5 s for its pod).
        assert_eq!(verdicts(&tool, &fresh, RT).await, expect("Current", "Progressing", "Unknown"));
        create_runtime(&ns, "blocked", json!({"identity": {"serviceAccountName": "nobody"}})).await;
        create_runtime(&ns, "resting", pinned("registry.invalid/simulate/ready")).await;
        let chat = wait_status(&ns, "chat", "Running", None).await;
        assert_eq!(verdicts(&tool, &chat, RT).await, expect("Current", "Healthy", "Current"));
        let starting = wait_status(&ns, "starting", "Not available", Some("PodStarting")).await;
        assert_eq!(verdicts(&tool, &starting, RT).await, expect("InProgress", "Progressing", "InProgress"));
        let blocked = wait_status(&ns, "blocked", "Not available", Some("ServiceAccountNotFound")).await;
        assert_eq!(verdicts(&tool, &blocked, RT).await, expect("Failed", "Degraded", "Failed"));
        wait_status(&ns, "resting", "Running", None).await;
        let stop = json!({"metadata": {"annotations": {"promptflow.dev/stop": "now"}}});
        ns.api::<PromptFlowRuntime>().patch("resting", &PatchParams::default(), &Patch::Merge(stop)).await.unwrap();
        let resting = wait_status(&ns, "resting", "Not available", Some("StoppedByUser")).await;
        // kstatus reads Ready=False as InProgress whatever the reason; Argo CD and Flux get our
        // checks, which know a stop is a state of rest (README, GitOps).
        assert_eq!(verdicts(&tool, &resting, RT).await, expect("InProgress", "Suspended", "Current"));

        // Compute instances: Running, Stopped by its spec, Failed for an unknown instance type.
        let instance = |name: &str, spec: serde_json::Value| {
            json!({"apiVersion": "promptflow.dev/v1alpha1", "kind": CI, "metadata": {"name": name}, "spec": spec})
        };
        create(&ns.api::<ComputeInstance>(), instance("gpu", json!({"instanceType": "Standard_DS3_v2"}))).await;
        create(&ns.api::<ComputeInstance>(), instance("off", json!({"instanceType": "Standard_DS3_v2", "state": "Stopped"}))).await;
        create(&ns.api::<ComputeInstance>(), instance("odd", json!({"instanceType": "Standard_Nope_v9"}))).await;
        let gpu = wait_state(&ns, "gpu", InstanceState::Running, None).await;
        assert_eq!(verdicts(&tool, &gpu, CI).await, expect("Current", "Healthy", "Current"));
        let off = wait_state(&ns, "off", InstanceState::Stopped, None).await;
        assert_eq!(verdicts(&tool, &off, CI).await, expect("InProgress", "Suspended", "Current"));
        let odd = wait_state(&ns, "odd", InstanceState::Failed, None).await;
        assert_eq!(verdicts(&tool, &odd, CI).await, expect("Failed", "Degraded", "Failed"));

        // A spec change the operator has not observed yet is in progress for all three, and
        // Current again once it has.
        operator.stop(Duration::from_secs(10)).await;
        let change = json!({"spec": {"idle": {"timeout": "2h"}}});
        let changed = ns.api::<PromptFlowRuntime>().patch("chat", &PatchParams::default(), &Patch::Merge(change)).await.unwrap();
        assert_eq!(verdicts(&tool, &changed, RT).await, expect("InProgress", "Progressing", "InProgress"));
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let observed = harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "chat",
            |rt: Option<&PromptFlowRuntime>| {
                rt.is_some_and(|rt| rt.status.as_ref().and_then(|s| s.observed_generation) == rt.metadata.generation)
            },
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(verdicts(&tool, &observed, RT).await, expect("Current", "Healthy", "Current"));
        assert_eq!(runtime(&ns, "chat").await.metadata.uid, chat.metadata.uid);
    })
    .await;
}

#[test]
fn the_readme_shows_the_argo_cd_checks_that_are_tested() {
    let root = harness::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for kind in ["promptflowruntime", "computeinstance"] {
        let lua = std::fs::read_to_string(root.join(format!("config/gitops/argocd/{kind}.lua"))).unwrap();
        let indented: String = lua
            .lines()
            .map(|line| {
                if line.is_empty() {
                    "\n".to_owned()
                } else {
                    format!("        {line}\n")
                }
            })
            .collect();
        assert!(
            readme.contains(&indented),
            "README's argocd-cm snippet differs from {kind}.lua"
        );
    }
}
