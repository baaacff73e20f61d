//! A tenant's large labels and annotations on the objects the operator watches cost the operator
//! no memory: its caches keep only what its controllers read.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ResourceQuota, ServiceAccount};
use kube::api::{Api, PostParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{OperatorProcess, with_namespace};
use crate::instance::create_instance;
use crate::runtime::{create, wait_status};

/// Creates `count` objects of `api` from `object(i)`, eight at a time.
async fn create_many<K>(api: &Api<K>, count: usize, object: impl Fn(usize) -> serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    use futures::StreamExt;
    futures::stream::iter((0..count).map(|i| {
        let object: K = serde_json::from_value(object(i)).unwrap();
        async move { api.create(&PostParams::default(), &object).await.unwrap() }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
}

#[tokio::test]
async fn a_tenants_large_labels_and_annotations_cost_the_operator_no_memory() {
    with_namespace("pf-bigmeta", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        operator.wait_ready().await;
        let pid = operator.pid().unwrap();
        let (rss_before, _) = crate::proxy::usage(pid);
        // 64 KiB of text in an annotation and 32 labels of 63 characters on every object.
        let junk = "x".repeat(64 * 1024);
        let labels: serde_json::Map<String, serde_json::Value> = (0..32)
            .map(|i| (format!("example.com/l{i}"), json!("y".repeat(63))))
            .collect();
        let metadata =
            |name: String| json!({"name": name, "labels": labels, "annotations": {"example.com/notes": junk}});

        // 300 service accounts, 50 quotas, 100 runtimes (stopped: no pods) and 20 stopped compute
        // instances: about 30 MiB of metadata the operator has no use for.
        create_many(
            &ns.api::<ServiceAccount>(),
            300,
            |i| json!({"metadata": metadata(format!("sa-{i}"))}),
        )
        .await;
        create_many(
            &ns.api::<ResourceQuota>(),
            50,
            |i| json!({"metadata": metadata(format!("q-{i}")), "spec": {"hard": {"count/configmaps": "1000"}}}),
        )
        .await;
        create_many(&ns.api::<PromptFlowRuntime>(), 100, |i| {
            let mut meta = metadata(format!("rt-{i}"));
            meta["annotations"]["promptflow.dev/stop"] = json!("1");
            json!({"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime", "metadata": meta, "spec": {}})
        })
        .await;
        for i in 0..20 {
            create_instance(&ns, &format!("ci-{i}"), json!({"state": "Stopped"})).await;
            let patch = json!({"metadata": metadata(format!("ci-{i}"))});
            crate::instance::merge(
                &ns.api::<promptflow_operator::api::ComputeInstance>(),
                &format!("ci-{i}"),
                patch,
            )
            .await;
        }
        // Seen: the last account made resolves a runtime's identity (a watch delivers in order),
        // and the last runtime made is reported.
        create(
            &ns.api::<PromptFlowRuntime>(),
            json!({"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
                   "metadata": {"name": "probe"}, "spec": {"identity": {"serviceAccountName": "sa-299"}}}),
        )
        .await;
        wait_status(&ns, "probe", "Running", None).await;
        wait_status(&ns, "rt-99", "Not available", Some("StoppedByUser")).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss_after, _) = crate::proxy::usage(pid);
        let grown = rss_after.saturating_sub(rss_before) / 1024;
        eprintln!("large metadata: operator RSS {rss_before} KiB before, {rss_after} KiB after ({grown} MiB more)");
        assert!(
            grown < 12,
            "the operator grew by {grown} MiB holding metadata it does not read; log:\n{}",
            operator.log_text()
        );
    })
    .await;
}
