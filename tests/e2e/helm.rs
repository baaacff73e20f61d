//! The chart installed for real: `helm install` with the image `make image` pushed (the
//! Deployment's pods roll out on kwok nodes), the operator run as a process with a token of the
//! chart's service account until a runtime is Running, `helm upgrade` with changed values (flags,
//! NetworkPolicy, Grafana dashboard) and `helm uninstall`, which leaves the CRDs and the runtimes.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::chart::service_account_kubeconfig;
use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::image::built_image;
use crate::registry::LocalRegistry;
use crate::runtime::{create_runtime, wait_status};

/// Runs `helm ARGS` against the local cluster; returns stdout, panicking with stderr on failure.
async fn helm(args: &[&str]) -> String {
    let output = tokio::process::Command::new("helm")
        .args(args)
        .env("KUBECONFIG", harness::kubeconfig())
        .output()
        .await
        .expect("helm runs");
    assert!(
        output.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn args(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap_or_default()
}

/// The Deployment's pods: all Running on fake nodes, with the image asked for.
async fn rolled_out(ns: &TestNamespace, release: &str, image: &str) {
    let pods: Api<Pod> = ns.api();
    let selector = format!("app.kubernetes.io/instance={release}");
    let list = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .unwrap();
    assert!(!list.items.is_empty(), "the Deployment has pods");
    for pod in list.items {
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers[0].image.as_deref(), Some(image));
        assert!(spec.node_name.is_some_and(|n| !n.is_empty()), "scheduled");
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    }
}

/// Uninstalls the release when a test ends without having done so (a failure midway), so no
/// cluster-scoped object of the chart outlives the test's namespace.
struct Installed {
    release: String,
    namespace: String,
    uninstalled: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = std::process::Command::new("helm")
                .args(["uninstall", &self.release, "-n", &self.namespace])
                .env("KUBECONFIG", harness::kubeconfig())
                .status();
        }
    }
}

/// Every metric the Grafana dashboard queries is one the operator exports.
fn assert_dashboard_matches_metrics(dashboard: &str, metrics: &str) {
    let names = regex::Regex::new(r"promptflow_operator_[a-z_]+").unwrap();
    let queried: std::collections::BTreeSet<&str> = names.find_iter(dashboard).map(|m| m.as_str()).collect();
    assert!(
        queried.len() >= 5,
        "the dashboard queries the operator's metrics: {queried:?}"
    );
    for name in queried {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which the operator does not export"
        );
    }
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_chart_leaving_crds_and_runtimes() {
    with_namespace("pf-helm", |ns| async move {
        let (reference, _digest) = built_image();
        let (repository, tag) = reference.rsplit_once(':').unwrap();
        let registry = LocalRegistry::read();
        registry.identity(&ns, &registry.password).await;
        let release = format!("pf{:06x}", rand::random::<u32>() & 0xffffff);
        let chart = harness::repo_root()
            .join("charts/promptflow-operator")
            .display()
            .to_string();
        let n = ns.name.as_str();
        let sets = [
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "imagePullSecrets[0].name=regcred".into(),
            format!("watchNamespace={n}"),
            "replicas=2".into(),
        ];
        let mut install = vec!["install", &release, &chart, "-n", n, "--wait", "--timeout", "90s"];
        for set in &sets {
            install.extend(["--set", set]);
        }
        helm(&install).await;
        let mut installed = Installed {
            release: release.clone(),
            namespace: n.to_owned(),
            uninstalled: false,
        };

        // What the API server now holds, created by Helm.
        let fullname = format!("{release}-promptflow-operator");
        let deployment = ns.api::<Deployment>().get(&fullname).await.unwrap();
        assert!(args(&deployment).contains(&format!("--watch-namespace={n}")));
        assert_eq!(deployment.status.as_ref().and_then(|s| s.available_replicas), Some(2));
        rolled_out(&ns, &release, &reference).await;
        let pdb = ns.api::<PodDisruptionBudget>().get(&fullname).await.unwrap();
        assert_eq!(
            pdb.spec.unwrap().min_available,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        ns.api::<ServiceAccount>().get(&fullname).await.unwrap();
        let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(harness::client().await);
        let selector = format!("app.kubernetes.io/instance={release}");
        let listed = kube::api::ListParams::default().labels(&selector);
        assert!(
            !roles.list(&listed).await.unwrap().items.is_empty(),
            "the CRD-reading ClusterRole"
        );

        // The operator as the chart's service account (its pod on a kwok node runs nothing).
        let dir = std::env::temp_dir().join(format!("{release}-helm"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = service_account_kubeconfig(n, &fullname, &dir).await;
        let catalog = ns.api::<ConfigMap>().get(&format!("{fullname}-catalog")).await.unwrap();
        let catalog_file = dir.join("instance-types.yaml");
        std::fs::write(&catalog_file, &catalog.data.unwrap()["instance-types.yaml"]).unwrap();
        let catalog_arg = catalog_file.display().to_string();
        let mut operator = OperatorProcess::start(
            &kubeconfig,
            &[
                "--watch-namespace",
                n,
                "--catalog",
                &catalog_arg,
                "--registry-ca-file",
                &registry.ca_file,
                "--leader-elect",
                "true",
                "--lease-namespace",
                n,
                "--lease-name",
                &fullname,
            ],
        );
        let spec = json!({"image": {"repository": registry.repository}, "identity": {"serviceAccountName": "puller"}});
        create_runtime(&ns, "chat", spec).await;
        let running = wait_status(&ns, "chat", "Running", None).await;
        let metrics = operator.metrics().await;

        // The Prometheus Operator's ServiceMonitor CRD, generated from its Go types, so the
        // chart's ServiceMonitor meets the real schema.
        let crd = tokio::process::Command::new(harness::repo_root().join("hack/servicemonitor-crd.sh"))
            .output()
            .await
            .unwrap();
        assert!(crd.status.success(), "{}", String::from_utf8_lossy(&crd.stderr));
        let crd = String::from_utf8(crd.stdout).unwrap();
        let (ok, out) = harness::kubectl(&["apply", "--server-side", "-f", crd.trim()]).await;
        assert!(ok, "{out}");
        let established = "--for=condition=Established";
        let (ok, out) = harness::kubectl(&["wait", established, "crd/servicemonitors.monitoring.coreos.com"]).await;
        assert!(ok, "{out}");

        // Upgrade: a changed flag, the NetworkPolicy, the dashboard and the ServiceMonitor, validated
        // by the API server.
        let mut upgrade = vec![
            "upgrade",
            &release,
            &chart,
            "-n",
            n,
            "--reuse-values",
            "--wait",
            "--timeout",
            "90s",
        ];
        upgrade.extend([
            "--set",
            "concurrency=4",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.apiServer[0].cidr=127.0.0.1/32",
            "--set",
            "grafana.dashboard.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ]);
        helm(&upgrade).await;
        let upgraded = ns.api::<Deployment>().get(&fullname).await.unwrap();
        assert!(args(&upgraded).contains(&"--concurrency=4".to_owned()));
        assert!(upgraded.metadata.generation > deployment.metadata.generation);
        let status: serde_json::Value =
            serde_json::from_str(&helm(&["status", &release, "-n", n, "-o", "json"]).await).unwrap();
        assert_eq!(status["version"], 2);
        let policy = ns.api::<NetworkPolicy>().get(&fullname).await.unwrap();
        let policy = policy.spec.unwrap();
        assert_eq!(policy.policy_types.unwrap(), ["Ingress", "Egress"]);
        let dashboard = ns
            .api::<ConfigMap>()
            .get(&format!("{fullname}-dashboard"))
            .await
            .unwrap();
        assert_eq!(dashboard.metadata.labels.unwrap()["grafana_dashboard"], "1");
        let json = &dashboard.data.unwrap()["promptflow-operator.json"];
        serde_json::from_str::<serde_json::Value>(json).expect("the dashboard is JSON");
        assert_dashboard_matches_metrics(json, &metrics);

        // The ServiceMonitor selects the metrics Service by its labels, on its port's name.
        let monitors: Api<kube::api::DynamicObject> = Api::namespaced_with(
            harness::client().await,
            n,
            &kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
                "servicemonitors",
            ),
        );
        let monitor = monitors.get(&fullname).await.unwrap();
        let service = ns
            .api::<k8s_openapi::api::core::v1::Service>()
            .get(&format!("{fullname}-metrics"))
            .await
            .unwrap();
        let labels = service.metadata.labels.unwrap();
        let selector = monitor.data["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .clone();
        assert!(
            selector
                .iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()),
            "{selector:?}"
        );
        let port = &service.spec.unwrap().ports.unwrap()[0];
        assert_eq!(
            monitor.data["spec"]["endpoints"][0]["port"].as_str(),
            port.name.as_deref()
        );

        // Uninstall: the release goes; the CRDs, the runtime and its pod stay.
        operator.stop(Duration::from_secs(10)).await;
        helm(&["uninstall", &release, "-n", n, "--wait", "--timeout", "60s"]).await;
        installed.uninstalled = true;
        let left = roles.list(&listed).await.unwrap();
        assert!(left.items.is_empty(), "cluster-scoped RBAC of the release is gone");
        assert!(ns.api::<Deployment>().get_opt(&fullname).await.unwrap().is_none());
        assert!(ns.api::<ServiceAccount>().get_opt(&fullname).await.unwrap().is_none());
        let crds: Api<CustomResourceDefinition> = Api::all(harness::client().await);
        crds.get("promptflowruntimes.promptflow.dev").await.unwrap();
        crds.get("computeinstances.promptflow.dev").await.unwrap();
        let kept = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap();
        assert_eq!(kept.metadata.uid, running.metadata.uid);
        assert!(ns.api::<Pod>().get_opt("chat-runtime").await.unwrap().is_some());
        std::fs::remove_dir_all(&dir).ok();
    })
    .await;
}
