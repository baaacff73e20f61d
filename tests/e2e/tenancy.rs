//! A shared namespace as tenants use it: objects that already carry a runtime's names are never
//! taken over, repointed or deleted through the operator — a user's Service, a pod made to look
//! like the operator's (its labels copied), a pod without them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::DeleteParams;
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::runtime::{create, create_runtime, events_for, wait_status};

async fn squatter_pod(ns: &TestNamespace, name: &str, labels: serde_json::Value) -> Pod {
    create(
        &ns.api::<Pod>(),
        json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        }),
    )
    .await
}

fn owners(meta: &kube::api::ObjectMeta) -> usize {
    meta.owner_references.as_ref().map_or(0, Vec::len)
}

#[tokio::test]
async fn names_taken_by_other_objects_are_reported_never_taken_over() {
    with_namespace("pf-tenancy", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        // A user's headless Service for a database, and two pods squatting runtime pod names:
        // one with the operator's labels copied, one without.
        let db = create(
            &ns.api::<Service>(),
            json!({"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "selector": {"app": "my-db"},
                "ports": [{"name": "pg", "port": 5432}]}}),
        )
        .await;
        let mimic = squatter_pod(
            &ns,
            "mimic-runtime",
            json!({"promptflow.dev/runtime": "mimic", "app.kubernetes.io/name": "promptflow-runtime",
                "app.kubernetes.io/managed-by": "promptflow-operator"}),
        )
        .await;
        let bare = squatter_pod(&ns, "bare-runtime", json!({"app": "mine"})).await;
        for name in ["db", "mimic", "bare"] {
            create_runtime(&ns, name, json!({})).await;
        }
        let conflicted = wait_status(&ns, "db", "Not available", Some("ServiceConflict")).await;
        let message = conflicted.status.unwrap().message.unwrap_or_default();
        assert!(message.contains("Service db"), "{message}");
        for name in ["mimic", "bare"] {
            let runtime = wait_status(&ns, name, "Not available", Some("PodConflict")).await;
            let message = runtime.status.unwrap().message.unwrap_or_default();
            assert!(message.contains(&format!("pod {name}-runtime")), "{message}");
        }
        let warnings = events_for(&ns, "db").await;
        assert!(
            warnings.iter().any(|(kind, reason, note)| kind == "Warning"
                && reason == "ServiceConflict"
                && note.contains("Service db")),
            "{warnings:?}"
        );

        // Untouched: the Service keeps its selector, port and (no) owner; the pods their uids.
        let service = ns.api::<Service>().get("db").await.unwrap();
        assert_eq!((service.uid(), owners(&service.metadata)), (db.uid(), 0));
        let spec = service.spec.unwrap();
        assert_eq!(spec.selector.unwrap()["app"], "my-db");
        assert_eq!(spec.ports.unwrap().iter().map(|p| p.port).collect::<Vec<_>>(), [5432]);
        for pod in [&mimic, &bare] {
            let live = ns.api::<Pod>().get(&pod.name_any()).await.unwrap();
            assert_eq!(
                (live.uid(), owners(&live.metadata)),
                (pod.uid(), 0),
                "{}",
                pod.name_any()
            );
        }

        // Deleting the runtime deletes nothing of the user's.
        let runtimes = ns.api::<PromptFlowRuntime>();
        let db_runtime = runtimes.get("db").await.unwrap();
        runtimes.delete("db", &DeleteParams::default()).await.unwrap();
        harness::wait_deleted(&runtimes, "db", &db_runtime.uid().unwrap(), Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            ns.api::<Service>().get("db").await.unwrap().uid(),
            db.uid(),
            "the user's Service stays"
        );

        // Once the squatter goes, the runtime takes its name (it looks again every 60 s).
        ns.api::<Pod>()
            .delete("bare-runtime", &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        harness::wait_deleted(
            &ns.api::<Pod>(),
            "bare-runtime",
            &bare.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
        let running = harness::wait_for(
            &runtimes,
            "bare",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref())
                    .is_some_and(|s| s.reason.as_deref() == Some("PodReady"))
            },
            Duration::from_secs(90),
        )
        .await;
        assert!(running.status.is_some());
        let own = ns.api::<Pod>().get("bare-runtime").await.unwrap();
        assert_eq!(owners(&own.metadata), 1, "its own pod now");
    })
    .await;
}

#[tokio::test]
async fn a_legacy_dockercfg_pull_secret_pulls_and_checks_versions() {
    with_namespace("pf-tenancy-cfg", |ns| async move {
        let registry = crate::registry::LocalRegistry::read();
        let _operator = crate::versions::operator(&ns, &registry);
        registry
            .identity_of_type(&ns, &registry.password, "kubernetes.io/dockercfg")
            .await;
        let repository = format!("{}/legacy/{}", registry.host, ns.name);
        registry.push(&repository, "20240501.v1").await;
        create_runtime(&ns, "chat", crate::versions::spec(&repository)).await;
        let running = wait_status(&ns, "chat", "Running", None).await;
        let status = running.status.unwrap();
        assert_eq!(
            status.version.as_deref(),
            Some("20240501.v1"),
            "pinned through the legacy secret's login"
        );
        let identity = status
            .conditions
            .iter()
            .find(|c| c.type_ == "IdentityResolved")
            .unwrap();
        assert_eq!(identity.status, "True", "{identity:?}");
        let pod = ns.api::<Pod>().get("chat-runtime").await.unwrap();
        let secrets: Vec<String> = pod
            .spec
            .unwrap()
            .image_pull_secrets
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(secrets, ["regcred"]);
    })
    .await;
}

#[tokio::test]
async fn a_pod_squatting_a_compute_instances_name_is_reported_never_taken_over() {
    use promptflow_operator::api::InstanceState;
    with_namespace("pf-tenancy-ci", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let squat = squatter_pod(
            &ns,
            "ci-instance",
            json!({"promptflow.dev/compute-instance": "ci", "app.kubernetes.io/managed-by": "promptflow-operator",
                "app.kubernetes.io/name": "promptflow-compute-instance"}),
        )
        .await;
        crate::instance::create_instance(&ns, "ci", json!({})).await;
        let failed = crate::instance::wait_state(&ns, "ci", InstanceState::Failed, Some("PodConflict")).await;
        let message = failed.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("pod ci-instance") && message.contains("ComputeInstance"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let live = ns.api::<Pod>().get("ci-instance").await.unwrap();
        assert_eq!((live.uid(), owners(&live.metadata)), (squat.uid(), 0), "left untouched");
        assert!(live.metadata.deletion_timestamp.is_none(), "not deleted");
    })
    .await;
}

#[tokio::test]
async fn quotas_scoped_to_other_pods_do_not_hold_runtimes_back() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    with_namespace("pf-tenancy-quota", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        // The Kubernetes docs' examples: no pod with cross-namespace affinity, no pod of
        // priority class "high"; runtime pods are neither.
        for (name, expression) in [
            (
                "no-cross-ns-affinity",
                json!({"scopeName": "CrossNamespacePodAffinity", "operator": "Exists"}),
            ),
            (
                "no-high-priority",
                json!({"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}),
            ),
        ] {
            create(
                &ns.api::<ResourceQuota>(),
                json!({"metadata": {"name": name}, "spec": {"hard": {"pods": "0"},
                    "scopeSelector": {"matchExpressions": [expression]}}}),
            )
            .await;
        }
        harness::wait_for(
            &ns.api::<ResourceQuota>(),
            "no-high-priority",
            |q: Option<&ResourceQuota>| q.and_then(|q| q.status.as_ref()?.hard.as_ref()).is_some(),
            Duration::from_secs(30),
        )
        .await;
        create_runtime(&ns, "chat", json!({})).await;
        let running = wait_status(&ns, "chat", "Running", None).await;
        assert_eq!(running.status.unwrap().reason.as_deref(), Some("PodReady"));
    })
    .await;
}
