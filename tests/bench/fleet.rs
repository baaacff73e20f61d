//! The objects a bench run needs: fake nodes for N pods, namespaces, runtimes and bare pods
//! created in parallel by the bench's own client, and clean-up between phases.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

/// Pods per fake node, as managed clusters allow (AKS and EKS cap a node at 250).
pub const PODS_PER_NODE: usize = 250;
/// The label that marks the bench's own nodes.
const NODE_LABEL: &str = "promptflow.dev/bench-node";

/// Creates (or keeps) enough fake nodes for `pods` pods beside the cluster's own; the bench's
/// pods run on these alone ([`tiny_catalog`]'s node selector). Each node has its own pod CIDR, as
/// a real cluster's nodes do, off loopback: kwok hands out pod IPs from it, and the controller
/// manager's endpoint controllers write the runtimes' EndpointSlices as they would in production
/// (an EndpointSlice refuses a loopback address; the cluster's own nodes hand out loopback IPs so
/// the e2e tests can serve a real flow on a pod's IP, and there every write for a Service
/// selecting a Running pod is refused and retried for as long as the Service exists).
pub async fn ensure_nodes(client: &Client, pods: usize) -> usize {
    let nodes: Api<Node> = Api::all(client.clone());
    let wanted = pods.div_ceil(PODS_PER_NODE - 10);
    for i in 0..wanted {
        let name = format!("pf-bench-node-{i}");
        let pod_cidr = format!("10.{}.{}.0/24", 20 + i / 256, i % 256);
        let capacity =
            json!({"cpu": "128", "memory": "512Gi", "pods": PODS_PER_NODE.to_string(), "ephemeral-storage": "16Ti"});
        let kept = nodes.get_opt(&name).await.unwrap();
        if kept
            .as_ref()
            .is_some_and(|node| node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) != Some(&pod_cidr))
        {
            // A node of an older bench, its pod CIDR elsewhere (the field is immutable).
            nodes.delete(&name, &DeleteParams::default()).await.unwrap();
            while nodes.get_opt(&name).await.unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else if kept.is_some() {
            // A node of an earlier run: its capacity as this run's.
            let status = json!({"status": {"allocatable": capacity, "capacity": capacity}});
            let params = kube::api::PatchParams::default();
            nodes
                .patch_status(&name, &params, &kube::api::Patch::Merge(status))
                .await
                .unwrap();
            continue;
        }
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"type": "kwok", NODE_LABEL: "true", "kubernetes.io/os": "linux",
                           "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name},
            },
            "spec": {"podCIDR": pod_cidr},
            "status": {
                "allocatable": capacity,
                "capacity": capacity,
            },
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let list = nodes.list(&ListParams::default().labels(NODE_LABEL)).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|node| {
                node.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready >= wanted {
            return wanted;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ready} of {wanted} bench nodes Ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A fresh namespace `<prefix>-<random>`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    name
}

/// Deletes the namespace and waits until it is gone. Pods go first without a grace period (the
/// fake kubelet would otherwise confirm each deletion) and the runtimes with them.
pub async fn delete_namespace(client: &Client, name: &str) {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    let _ = Api::<PromptFlowRuntime>::namespaced(client.clone(), name)
        .delete_collection(&DeleteParams::background(), &ListParams::default())
        .await;
    let _ = Api::<Service>::namespaced(client.clone(), name)
        .delete_collection(&DeleteParams::background(), &ListParams::default())
        .await;
    let _ = Api::<Pod>::namespaced(client.clone(), name)
        .delete_collection(&now, &ListParams::default())
        .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(name, &DeleteParams::background()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while namespaces.get_opt(name).await.ok().flatten().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "namespace {name} still there after 10 minutes"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Writes the one-entry catalog every bench and chaos runtime is sized from (small enough that
/// the fake nodes hold thousands, on the bench's own nodes); returns its path.
pub fn tiny_catalog(prefix: &str) -> String {
    let path = std::env::temp_dir().join(format!("{prefix}-catalog-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "instanceTypes:\n- {{name: Bench_Tiny, cpu: 10m, memory: 32Mi, nodeSelector: {{{NODE_LABEL}: 'true'}}}}\n"
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// The spec of every bench runtime: the tiny size, the local registry's runtime repository and the
/// pull identity that logs in there.
pub fn runtime_spec(repository: &str) -> serde_json::Value {
    json!({
        "compute": {"serverless": {"instanceType": "Bench_Tiny"}},
        "image": {"repository": repository},
        "identity": {"serviceAccountName": "puller"},
    })
}

/// The name of the `i`-th object of a phase.
pub fn name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// Creates `count` runtimes `rt-00000`… with `spec`, `concurrency` requests at a time.
pub async fn create_runtimes(
    client: &Client,
    namespace: &str,
    count: usize,
    spec: &serde_json::Value,
    concurrency: usize,
) {
    let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let runtime: PromptFlowRuntime = serde_json::from_value(json!({
                "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
                "metadata": {"name": name("rt", i)}, "spec": spec,
            }))
            .unwrap();
            async move { api.create(&PostParams::default(), &runtime).await.map(|_| ()) }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await
        .expect("create runtimes");
}

/// Annotates runtimes `rt-00000`… (an annotation the operator does not read), `concurrency` at a
/// time.
pub async fn touch_runtimes(client: &Client, namespace: &str, count: usize, concurrency: usize) {
    let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": {"bench.promptflow.dev/touched": "1"}}});
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let patch = patch.clone();
            async move {
                api.patch(&name("rt", i), &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await
        .expect("touch runtimes");
}

/// Creates `count` bare pods from `template` (a runtime pod as the operator made it, stripped of
/// what ties it to its runtime), `concurrency` requests at a time.
pub async fn create_pods(client: &Client, namespace: &str, count: usize, template: &Pod, concurrency: usize) {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let mut pod = template.clone();
            pod.metadata.name = Some(name("floor", i));
            async move { api.create(&PostParams::default(), &pod).await.map(|_| ()) }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await
        .expect("create pods");
}

/// A runtime pod turned into a bare pod: same spec, annotations and size, no owner, no runtime
/// label (the operator would not see it anyway: it only watches its own namespace).
pub fn bare_pod(runtime_pod: &Pod) -> Pod {
    let mut pod = runtime_pod.clone();
    let spec = pod.spec.as_mut().expect("a pod spec");
    spec.node_name = None;
    pod.status = None;
    pod.metadata = kube::api::ObjectMeta {
        annotations: pod.metadata.annotations.take(),
        labels: Some([("promptflow.dev/bench".to_owned(), "floor".to_owned())].into()),
        ..Default::default()
    };
    pod
}

/// Whether a pod is Ready, as a runtime's pod must be for the runtime to be Running.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a runtime is Running.
pub fn runtime_running(runtime: &PromptFlowRuntime) -> bool {
    runtime
        .status
        .as_ref()
        .is_some_and(|s| s.phase == promptflow_operator::api::RuntimePhase::Running)
}
