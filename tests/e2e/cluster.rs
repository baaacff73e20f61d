//! The local cluster behaves like a real one: scheduling onto kwok nodes, pod IPs on loopback,
//! default service accounts, and owner-reference garbage collection.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::conditions;
use kube::{Resource, ResourceExt};

use crate::harness::{self, with_namespace};

#[tokio::test]
async fn pods_run_on_kwok_nodes_and_are_garbage_collected_with_their_owner() {
    with_namespace("pf-cluster", |ns| async move {
        // The service-account controller gives every namespace its `default` account.
        let accounts = ns.api::<ServiceAccount>();
        harness::wait_for(
            &accounts,
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
            Duration::from_secs(30),
        )
        .await;

        let owners = ns.api::<ConfigMap>();
        let owner = owners
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}})).unwrap(),
            )
            .await
            .unwrap();
        let pods = ns.api::<Pod>();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "plain", "ownerReferences": [owner.controller_owner_ref(&()).unwrap()]},
            "spec": {"containers": [{"name": "main", "image": "registry.invalid/plain:1"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();

        let running = harness::wait_for(&pods, "plain", conditions::is_pod_running(), Duration::from_secs(60)).await;
        let node = running
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(node.starts_with("kwok-node-"), "scheduled onto {node:?}");
        let ip = running
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        assert!(
            ip.starts_with("127.") && ip != "127.0.0.1",
            "pod IP {ip:?} is not a loopback address a test can bind to (kwok hands them out from 127.0.1.0 upwards)"
        );
        assert_eq!(running.spec.unwrap().service_account_name.as_deref(), Some("default"));

        let uid = running.metadata.uid.clone().unwrap();
        owners
            .delete(&owner.name_any(), &DeleteParams::background())
            .await
            .unwrap();
        harness::wait_deleted(&pods, "plain", &uid, Duration::from_secs(60)).await;
    })
    .await;
}
