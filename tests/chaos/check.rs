//! What must hold after the faults: read from fresh lists, not from a cache.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use promptflow_operator::api::PromptFlowRuntime;
use promptflow_operator::build::pod::RUNTIME_LABEL;

use crate::fleet;

/// Every runtime `rt-00000`…`rt-<n-1>` exists once and is Running, with exactly one pod and one
/// Service, both owned by it; no pod or Service belongs to nobody; nothing is left terminating.
pub async fn one_pod_and_service_each(client: &Client, namespace: &str, n: usize) {
    let runtimes: Vec<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let uids: BTreeMap<String, String> = runtimes
        .iter()
        .map(|r| (r.name_any(), r.uid().unwrap_or_default()))
        .collect();
    let expected: Vec<String> = (0..n).map(|i| fleet::name("rt", i)).collect();
    assert_eq!(
        uids.keys().cloned().collect::<Vec<_>>(),
        expected,
        "runtimes lost or added"
    );
    let not_running: Vec<_> = runtimes
        .iter()
        .filter(|r| !fleet::runtime_running(r))
        .map(|r| r.name_any())
        .collect();
    assert!(not_running.is_empty(), "not Running: {not_running:?}");
    assert!(runtimes.iter().all(|r| r.metadata.deletion_timestamp.is_none()));

    // Pods: a replaced pod may still be terminating for a moment; wait for that to end.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let pods = loop {
        let pods = pods_api.list(&ListParams::default()).await.unwrap().items;
        let terminating = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_some()).count();
        if terminating == 0 {
            break pods;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{terminating} pods still terminating after 90 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    owned_once(&pods, &uids, "pod");
    let services = Api::<Service>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    owned_once(&services, &uids, "Service");
    println!(
        "chaos: {} runtimes Running, {} pods and {} Services, one each, no orphans",
        runtimes.len(),
        pods.len(),
        services.len()
    );
}

/// Each object is owned by a runtime that exists (same uid), and each runtime owns exactly one.
fn owned_once<K: kube::Resource>(objects: &[K], runtimes: &BTreeMap<String, String>, kind: &str) {
    let mut per_runtime: BTreeMap<&str, usize> = BTreeMap::new();
    for object in objects {
        let name = object.meta().name.clone().unwrap_or_default();
        let owner = object
            .meta()
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "PromptFlowRuntime")
            .unwrap_or_else(|| panic!("{kind} {name} has no runtime owner (an orphan)"));
        assert_eq!(
            runtimes.get(&owner.name),
            Some(&owner.uid),
            "{kind} {name} is owned by a runtime that does not exist"
        );
        if let Some(label) = object.meta().labels.as_ref().and_then(|l| l.get(RUNTIME_LABEL)) {
            assert_eq!(label, &owner.name, "{kind} {name}: label and owner disagree");
        }
        *per_runtime
            .entry(runtimes.get_key_value(&owner.name).unwrap().0)
            .or_default() += 1;
    }
    let doubled: Vec<_> = per_runtime.iter().filter(|(_, count)| **count > 1).collect();
    assert!(doubled.is_empty(), "runtimes with more than one {kind}: {doubled:?}");
    assert_eq!(per_runtime.len(), runtimes.len(), "runtimes without a {kind}");
}

/// Deleting `count` runtimes removes them and their pods (no finalizer left hanging).
pub async fn deletes_do_not_hang(client: &Client, namespace: &str, count: usize) {
    let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
    let started = tokio::time::Instant::now();
    for i in 0..count {
        api.delete(&fleet::name("rt", i), &DeleteParams::background())
            .await
            .unwrap();
    }
    let deadline = started + Duration::from_secs(60);
    loop {
        let left = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|r| r.metadata.deletion_timestamp.is_some() || r.name_any() < fleet::name("rt", count))
            .count();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} deleted runtimes still there after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "chaos: {count} runtimes deleted and gone in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
