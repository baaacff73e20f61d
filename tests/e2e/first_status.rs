//! A new runtime's first status: `Running` in one write when its pod is Ready within 5 s, else
//! `PodStarting` at 5 s; while it is held, what the start decided (size, image) holds.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::runtime::{create_runtime, events_for, runtime_pods, team_quota, wait_status};

const WAIT: Duration = Duration::from_secs(60);

/// Every status each runtime of the namespace showed, in order, as (reason, the `Ready`
/// condition's transition time), recorded by a watch whose first list is through before this
/// returns (so nothing the runtimes made afterwards show is missed).
type StatusesSeen = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<(String, String)>>>>;

async fn statuses_seen(ns: &TestNamespace) -> (StatusesSeen, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::Event;
    let seen: StatusesSeen = Default::default();
    let api = ns.api::<PromptFlowRuntime>();
    let record = seen.clone();
    let (listed, ready) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut listed = Some(listed);
        let mut events = std::pin::pin!(kube::runtime::watcher(api, Default::default()).default_backoff());
        while let Some(event) = events.next().await {
            // A watch error (a relist) is retried with backoff; the events go on.
            let Ok(event) = event else { continue };
            let runtime = match event {
                Event::InitDone => {
                    listed.take().map(|listed| listed.send(()));
                    continue;
                }
                Event::Apply(runtime) | Event::InitApply(runtime) => runtime,
                _ => continue,
            };
            let Some(status) = runtime.status.as_ref() else {
                continue;
            };
            let ready = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| serde_json::to_string(&c.last_transition_time).unwrap());
            let seen = (status.reason.clone().unwrap_or_default(), ready.unwrap_or_default());
            let mut record = record.lock().unwrap();
            let statuses = record.entry(runtime.name_any()).or_default();
            if statuses.last() != Some(&seen) {
                statuses.push(seen);
            }
        }
    });
    ready.await.expect("the runtimes listed");
    (seen, watch)
}

/// The first status `statuses_seen` saw for `name` (its watch may lag behind a get).
async fn first_status_of(seen: &StatusesSeen, name: &str) -> (String, String) {
    for _ in 0..100 {
        if let Some(first) = seen.lock().unwrap().get(name).and_then(|all| all.first().cloned()) {
            return first;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no status of {name} seen by the watch");
}

#[tokio::test]
async fn a_new_runtimes_first_status_says_running_or_waits_seconds_for_its_pod() {
    with_namespace("pf-rt-first", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let (seen, watch) = statuses_seen(&ns).await;
        let pinned = |repository: &str| json!({"image": {"repository": repository, "version": "1"}});
        create_runtime(&ns, "quick", pinned("registry.invalid/simulate/ready")).await;
        create_runtime(&ns, "slow", pinned("registry.invalid/simulate/slowstart")).await;
        wait_status(&ns, "quick", "Running", None).await;
        let slow = wait_status(&ns, "slow", "Not available", Some("PodStarting")).await;
        // The slow one says its pod is starting once the wait is over: not at once, not late.
        let pod = ns.api::<Pod>().get("slow-runtime").await.unwrap();
        let created = pod.metadata.creation_timestamp.unwrap().0;
        let status = slow.status.unwrap();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        let after = ready.last_transition_time.0.duration_since(created).as_secs_f64();
        // Timestamps are whole seconds: the wait is 5 s.
        assert!(
            (4.0..=20.0).contains(&after),
            "PodStarting {after}s after the pod was made\n{}",
            operator.log_text()
        );
        // The quick one's first status is Running; or, when its pod took longer than the wait
        // (a loaded cluster), PodStarting written no sooner than the wait allows.
        let first = first_status_of(&seen, "quick").await;
        if first.0 != "PodReady" {
            assert_eq!(first.0, "PodStarting");
            let pod = ns.api::<Pod>().get("quick-runtime").await.unwrap();
            let created = pod.metadata.creation_timestamp.unwrap().0;
            let written: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time = serde_json::from_str(&first.1).unwrap();
            let after = written.0.duration_since(created).as_secs_f64();
            assert!(after >= 4.0, "PodStarting {after}s after the pod was made");
        }
        let first_slow = first_status_of(&seen, "slow").await;
        assert_eq!(first_slow.0, "PodStarting");
        watch.abort();
    })
    .await;
}

#[tokio::test]
async fn a_runtime_stopped_while_its_first_status_waits_keeps_what_its_start_decided() {
    with_namespace("pf-rt-first-stop", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        // A pod that never turns Ready: the runtime's first status is held for 5 s.
        let pinned = json!({"image": {"repository": "registry.invalid/simulate/slowstart", "version": "1"}});
        create_runtime(&ns, "chat", pinned).await;
        let pods = ns.api::<Pod>();
        harness::wait_for(&pods, "chat-runtime", |pod: Option<&Pod>| pod.is_some(), WAIT).await;
        let api = ns.api::<PromptFlowRuntime>();
        assert!(
            api.get("chat").await.unwrap().status.is_none(),
            "the first status is held while the pod starts"
        );
        let stop = json!({"metadata": {"annotations": {"promptflow.dev/stop": "now"}}});
        api.patch("chat", &PatchParams::default(), &Patch::Merge(stop))
            .await
            .unwrap();
        let stopped = wait_status(&ns, "chat", "Not available", Some("StoppedByUser")).await;
        // The size chosen at its start (and the image) stay recorded for the next start.
        let status = stopped.status.unwrap();
        assert_eq!(
            status.instance_type.as_deref(),
            Some("Standard_D2s_v3"),
            "{}",
            operator.log_text()
        );
        assert!(
            status.image.as_deref().is_some_and(|image| image.contains("slowstart")),
            "{:?}",
            status.image
        );
    })
    .await;
}

#[tokio::test]
async fn a_new_runtime_whose_quota_fits_one_pod_never_reads_as_over_quota() {
    with_namespace("pf-rt-quota-one", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        // Room for one Standard_D2s_v3 pod (2 CPUs and 10m for the proxy), not two: once the pod
        // counts in the quota's usage, sizing the runtime again would find no size that fits.
        team_quota(&ns, "3").await;
        let (seen, watch) = statuses_seen(&ns).await;
        // A pod that never turns Ready: its runtime's first status waits out the 5 s while the
        // quota's usage (counting the new pod) wakes it.
        let pinned = json!({"image": {"repository": "registry.invalid/simulate/slowstart", "version": "1"}});
        create_runtime(&ns, "chat", pinned).await;
        let starting = wait_status(&ns, "chat", "Not available", Some("PodStarting")).await;
        assert_eq!(
            starting.status.unwrap().instance_type.as_deref(),
            Some("Standard_D2s_v3")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        watch.abort();
        let seen = seen.lock().unwrap().get("chat").cloned().unwrap_or_default();
        assert!(
            !seen.is_empty() && seen.iter().all(|(reason, _)| reason == "PodStarting"),
            "{seen:?}\n{}",
            operator.log_text()
        );
        assert!(events_for(&ns, "chat").await.iter().all(|e| e.1 != "QuotaExceeded"));
        assert_eq!(runtime_pods(&ns, "chat").await.len(), 1);
    })
    .await;
}
