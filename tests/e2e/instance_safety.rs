//! A compute instance is shared: one runtime's change must never cost another its address. A
//! runtime keeps its slot (its ports, so its URL) for as long as it stays attached, through other
//! runtimes' attach and detach and the instance's stop and start; a new runtime takes the lowest
//! free slot; each runtime's Service publishes the pod whether or not every runtime is ready.
//! The instance's `status.runtimes` lists them by slot.

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::DeleteParams;
use promptflow_operator::api::{ComputeInstance, InstanceState, PromptFlowRuntime, RuntimePhase};
use serde_json::json;

use crate::harness::{TestNamespace, with_namespace};
use crate::instance::{
    create_instance, create_on_instance, merge, operator, wait_running_with, wait_runtime, wait_state,
};

fn url(runtime: &PromptFlowRuntime) -> String {
    runtime.status.as_ref().and_then(|s| s.url.clone()).unwrap_or_default()
}

/// The runtime `name`'s port in the live instance pod `ci-instance` (its runtime container's
/// `PORT`).
async fn runtime_port(ns: &TestNamespace, name: &str) -> String {
    let pod = ns.api::<Pod>().get("ci-instance").await.unwrap();
    let container = pod
        .spec
        .unwrap()
        .containers
        .into_iter()
        .find(|c| c.name == format!("rt-{name}"))
        .unwrap_or_else(|| panic!("no container rt-{name}"));
    let env = container.env.unwrap_or_default();
    env.into_iter()
        .find(|e| e.name == "PORT")
        .and_then(|e| e.value)
        .unwrap()
}

#[tokio::test]
async fn a_runtime_keeps_its_port_and_url_while_attached() {
    with_namespace("pf-ci-slots", |ns| async move {
        let _operator = operator(&ns);
        create_instance(&ns, "ci", json!({})).await;
        create_on_instance(&ns, "zeta", "ci", true).await;
        let zeta = wait_runtime(&ns, "zeta", RuntimePhase::Running, None).await;
        let zeta_url = url(&zeta);
        assert!(zeta_url.ends_with(":8101"), "{zeta_url}");

        // alpha comes first by name, but zeta's port stays zeta's: a client that cached zeta's
        // URL never reaches alpha's flow.
        create_on_instance(&ns, "alpha", "ci", true).await;
        wait_running_with(&ns, "ci", &["zeta", "alpha"]).await;
        let alpha = wait_runtime(&ns, "alpha", RuntimePhase::Running, None).await;
        let zeta = wait_runtime(&ns, "zeta", RuntimePhase::Running, None).await;
        assert_eq!(url(&zeta), zeta_url);
        assert!(url(&alpha).ends_with(":8111"), "{}", url(&alpha));
        assert_eq!(runtime_port(&ns, "zeta").await, "8100");
        assert_eq!(runtime_port(&ns, "alpha").await, "8110");
        let service = ns.api::<Service>().get("zeta").await.unwrap().spec.unwrap();
        assert_eq!(service.ports.unwrap()[0].port, 8101);
        assert_eq!(
            service.publish_not_ready_addresses,
            Some(true),
            "zeta's address must not depend on alpha being ready"
        );

        // Stopped and started: the same ports.
        let instances = ns.api::<ComputeInstance>();
        merge(&instances, "ci", json!({"spec": {"state": "Stopped"}})).await;
        wait_state(&ns, "ci", InstanceState::Stopped, None).await;
        merge(&instances, "ci", json!({"spec": {"state": "Running"}})).await;
        wait_running_with(&ns, "ci", &["zeta", "alpha"]).await;
        let zeta = wait_runtime(&ns, "zeta", RuntimePhase::Running, None).await;
        let alpha = wait_runtime(&ns, "alpha", RuntimePhase::Running, None).await;
        assert_eq!(url(&zeta), zeta_url);
        assert!(url(&alpha).ends_with(":8111"), "{}", url(&alpha));
        assert_eq!(runtime_port(&ns, "zeta").await, "8100");

        // zeta leaves: alpha keeps 8111; a newcomer takes the lowest free slot, zeta's.
        ns.api::<PromptFlowRuntime>()
            .delete("zeta", &DeleteParams::background())
            .await
            .unwrap();
        create_on_instance(&ns, "beta", "ci", true).await;
        wait_running_with(&ns, "ci", &["beta", "alpha"]).await;
        let alpha = wait_runtime(&ns, "alpha", RuntimePhase::Running, None).await;
        let beta = wait_runtime(&ns, "beta", RuntimePhase::Running, None).await;
        assert!(url(&alpha).ends_with(":8111"), "{}", url(&alpha));
        assert!(url(&beta).ends_with(":8101"), "{}", url(&beta));
        assert_eq!(runtime_port(&ns, "alpha").await, "8110");
    })
    .await;
}

#[tokio::test]
async fn a_replacement_the_api_server_would_refuse_leaves_the_serving_pod_alone() {
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    with_namespace("pf-replace-refused", |ns| async move {
        let _operator = crate::harness::OperatorProcess::for_namespace(&ns.name);
        crate::runtime::create_runtime(&ns, "chat", json!({})).await;
        crate::runtime::wait_status(&ns, "chat", "Running", None).await;
        let pods = ns.api::<Pod>();
        let serving = pods.get("chat-runtime").await.unwrap();

        // A new version and a limit below the size's 8Gi request: valid for the CRD, refused by
        // pod validation.
        let runtimes = ns.api::<PromptFlowRuntime>();
        let before = runtimes.get("chat").await.unwrap().status.unwrap();
        let lower = json!({"spec": {"image": {"version": "20991231.v1"},
            "compute": {"serverless": {"resources": {"limits": {"memory": "4Gi"}}}}}});
        runtimes
            .patch("chat", &PatchParams::default(), &Patch::Merge(lower))
            .await
            .unwrap();
        let refused = crate::runtime::wait_condition(&ns, "chat", "SpecApplied", "False", "PodRejected").await;
        let status = refused.status.unwrap();
        let condition = status.conditions.iter().find(|c| c.type_ == "SpecApplied").unwrap();
        assert!(
            condition.message.contains("keeps serving") && condition.message.contains("memory"),
            "{}",
            condition.message
        );
        assert_eq!(status.phase, RuntimePhase::Running, "the serving pod still serves");
        // The status names what runs, not the image that was refused.
        let image = serving.spec.as_ref().unwrap().containers[0].image.clone();
        assert_eq!(status.image, image, "status.image is the serving pod's");
        assert_eq!(status.version, before.version);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let still = pods.get("chat-runtime").await.unwrap();
        assert_eq!(
            still.uid(),
            serving.uid(),
            "the serving pod was deleted for a pod that cannot be made"
        );
        assert!(still.metadata.deletion_timestamp.is_none());
        let warnings = crate::runtime::events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.0 == "Warning" && e.1 == "PodRejected")
            .count();
        assert_eq!(warnings, 1);

        // Back to what the pod runs: nothing to replace, and the spec counts as applied again.
        let back = json!({"spec": {"image": {"version": null}, "compute": {"serverless": {"resources": null}}}});
        runtimes
            .patch("chat", &PatchParams::default(), &Patch::Merge(back))
            .await
            .unwrap();
        crate::runtime::wait_condition(&ns, "chat", "SpecApplied", "True", "SpecApplied").await;
        assert_eq!(pods.get("chat-runtime").await.unwrap().uid(), serving.uid());
    })
    .await;
}

#[tokio::test]
async fn an_instance_restart_the_api_server_would_refuse_keeps_its_pod_and_runtimes() {
    use kube::ResourceExt;
    with_namespace("pf-ci-refused", |ns| async move {
        let _operator = operator(&ns);
        create_instance(&ns, "ci", json!({})).await;
        create_on_instance(&ns, "chat", "ci", true).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
        let serving = ns.api::<Pod>().get("ci-instance").await.unwrap();

        // A memory limit below the size's 14Gi request: the restart's pod would be invalid.
        let instances = ns.api::<ComputeInstance>();
        merge(
            &instances,
            "ci",
            json!({"spec": {"resources": {"limits": {"memory": "4Gi"}}}}),
        )
        .await;
        let refused = wait_state(&ns, "ci", InstanceState::Running, Some("PodRejected")).await;
        let status = refused.status.unwrap();
        assert!(
            status.message.as_deref().unwrap_or_default().contains("memory"),
            "{status:?}"
        );
        assert_eq!(status.runtimes, ["chat"]);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let still = ns.api::<Pod>().get("ci-instance").await.unwrap();
        assert_eq!(
            still.uid(),
            serving.uid(),
            "the instance's pod went for one that cannot be made"
        );
        wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;

        // Fixed: no restart is needed any more.
        merge(&instances, "ci", json!({"spec": {"resources": null}})).await;
        wait_state(&ns, "ci", InstanceState::Running, Some("PodReady")).await;
        assert_eq!(ns.api::<Pod>().get("ci-instance").await.unwrap().uid(), serving.uid());
        merge(
            &instances,
            "ci",
            json!({"spec": {"resources": {"limits": {"memory": "4Gi"}}}}),
        )
        .await;

        // A new version asked while the restart cannot be made: the status keeps naming the
        // image the instance's pod runs for the runtime, not the one it cannot start.
        let carried = runtime_image(&ns, "chat").await;
        let runtimes = ns.api::<PromptFlowRuntime>();
        merge(
            &runtimes,
            "chat",
            json!({"spec": {"image": {"version": "20991231.v1"}}}),
        )
        .await;
        let seen = wait_observed(&ns, "chat", 2).await;
        wait_state(&ns, "ci", InstanceState::Running, Some("PodRejected")).await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let status = runtimes.get("chat").await.unwrap().status.unwrap();
        assert_eq!(status.image.as_deref(), Some(carried.as_str()), "{status:?}");
        let carried_tag = carried.rsplit_once(':').map(|(_, tag)| tag.to_owned());
        assert_eq!(status.version, carried_tag, "{status:?}");
        let spec_applied = status.conditions.iter().find(|c| c.type_ == "SpecApplied").unwrap();
        assert_eq!(
            (spec_applied.status.as_str(), spec_applied.reason.as_str()),
            ("False", "WaitingForInstanceRestart"),
            "{spec_applied:?}"
        );
        assert!(spec_applied.message.contains(":20991231.v1"), "{spec_applied:?}");
        assert_eq!(seen.status.unwrap().image.as_deref(), Some(carried.as_str()));
        assert_eq!(ns.api::<Pod>().get("ci-instance").await.unwrap().uid(), serving.uid());

        // Fixed: the instance restarts with the new version, and the status follows.
        merge(&instances, "ci", json!({"spec": {"resources": null}})).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let status = runtimes.get("chat").await.unwrap().status.unwrap_or_default();
            let pod = ns.api::<Pod>().get("ci-instance").await.ok();
            let running = pod.as_ref().is_some_and(|p| p.uid() != serving.uid());
            if running && status.phase == RuntimePhase::Running && status.version.as_deref() == Some("20991231.v1") {
                let image = runtime_image(&ns, "chat").await;
                assert!(image.ends_with(":20991231.v1"), "{image}");
                assert_eq!(status.image.as_deref(), Some(image.as_str()));
                let spec_applied = status.conditions.iter().find(|c| c.type_ == "SpecApplied").unwrap();
                assert_eq!(spec_applied.status, "True", "{spec_applied:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never restarted with the new version: {status:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    })
    .await;
}

/// The image of runtime `name`'s container in the live instance pod `ci-instance`.
async fn runtime_image(ns: &TestNamespace, name: &str) -> String {
    let pod = ns.api::<Pod>().get("ci-instance").await.unwrap();
    pod.spec
        .unwrap()
        .containers
        .into_iter()
        .find(|c| c.name == format!("rt-{name}"))
        .and_then(|c| c.image)
        .unwrap_or_else(|| panic!("no container rt-{name}"))
}

/// Waits until runtime `name`'s status describes generation `generation`.
async fn wait_observed(ns: &TestNamespace, name: &str, generation: i64) -> PromptFlowRuntime {
    let api = ns.api::<PromptFlowRuntime>();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let runtime = api.get(name).await.unwrap();
        if runtime.status.as_ref().and_then(|s| s.observed_generation) >= Some(generation) {
            return runtime;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "generation {generation} never observed: {runtime:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_runtime_whose_flow_goes_keeps_its_containers_and_its_neighbours_their_work() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    with_namespace("pf-ci-unresolved", |ns| async move {
        let _operator = operator(&ns);
        let flow = json!({"metadata": {"name": "flow-a"}, "data": {"flow.dag.yaml": "inputs: {}\n"}});
        crate::runtime::create(&ns.api::<ConfigMap>(), flow.clone()).await;
        create_instance(&ns, "ci", json!({})).await;
        let on_ci = json!({"instance": {"name": "ci", "acknowledgeRestart": true}});
        crate::runtime::create_runtime(&ns, "a", json!({"compute": on_ci, "flow": {"configMapName": "flow-a"}})).await;
        create_on_instance(&ns, "b", "ci", true).await;
        wait_running_with(&ns, "ci", &["a", "b"]).await;
        wait_runtime(&ns, "a", RuntimePhase::Running, None).await;
        let serving = ns.api::<Pod>().get("ci-instance").await.unwrap();

        // a's flow goes: a keeps serving from the containers it has, b keeps its work.
        ns.api::<ConfigMap>()
            .delete("flow-a", &DeleteParams::default())
            .await
            .unwrap();
        let held = wait_state(&ns, "ci", InstanceState::Running, Some("RuntimeUnresolved")).await;
        assert!(held.status.unwrap().message.unwrap_or_default().contains("runtime a"));
        let a = crate::runtime::wait_condition(&ns, "a", "SpecApplied", "False", "FlowNotFound").await;
        assert_eq!(a.status.unwrap().phase, RuntimePhase::Running);
        wait_runtime(&ns, "b", RuntimePhase::Running, None).await;
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        assert_eq!(
            ns.api::<Pod>().get("ci-instance").await.unwrap().uid(),
            serving.uid(),
            "the instance restarted for one runtime's missing flow"
        );

        // Back: nothing to restart for.
        crate::runtime::create(&ns.api::<ConfigMap>(), flow).await;
        wait_state(&ns, "ci", InstanceState::Running, Some("PodReady")).await;
        crate::runtime::wait_condition(&ns, "a", "SpecApplied", "True", "SpecApplied").await;
        assert_eq!(ns.api::<Pod>().get("ci-instance").await.unwrap().uid(), serving.uid());
    })
    .await;
}

#[tokio::test]
async fn a_runtime_moved_off_an_instance_is_sized_by_quota_and_a_stop_while_stopped_stays_handled() {
    use kube::api::{Patch, PatchParams};
    with_namespace("pf-ci-paths", |ns| async move {
        let _operator = operator(&ns);
        create_instance(&ns, "ci", json!({})).await;
        create_on_instance(&ns, "chat", "ci", true).await;
        let on_ci = wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        assert_eq!(on_ci.status.unwrap().instance_type.as_deref(), Some("Standard_DS3_v2"));

        // Serverless now: the first catalog size that fits, not the instance's.
        let runtimes = ns.api::<PromptFlowRuntime>();
        let serverless = json!({"spec": {"compute": {"instance": null, "serverless": {}}}});
        runtimes
            .patch("chat", &PatchParams::default(), &Patch::Merge(serverless))
            .await
            .unwrap();
        let moved = crate::harness::wait_for(
            &runtimes,
            "chat",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|r| r.status.as_ref())
                    .is_some_and(|s| s.phase == RuntimePhase::Running && s.compute.as_deref() == Some("Serverless"))
            },
            std::time::Duration::from_secs(60),
        )
        .await;
        assert_eq!(moved.status.unwrap().instance_type.as_deref(), Some("Standard_D2s_v3"));
        let pod = ns.api::<Pod>().get("chat-runtime").await.unwrap();
        assert_eq!(
            pod.metadata.annotations.unwrap()["promptflow.dev/instance-type"],
            "Standard_D2s_v3"
        );

        // A stop asked for while spec.state is Stopped is done by then: it does not stop the
        // instance again after the next start.
        let instances = ns.api::<ComputeInstance>();
        merge(&instances, "ci", json!({"spec": {"state": "Stopped"}})).await;
        wait_state(&ns, "ci", InstanceState::Stopped, Some("StoppedBySpec")).await;
        merge(
            &instances,
            "ci",
            json!({"metadata": {"annotations": {"promptflow.dev/stop": "1"}}}),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        merge(&instances, "ci", json!({"spec": {"state": "Running"}})).await;
        wait_state(&ns, "ci", InstanceState::Running, None).await;
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        let status = instances.get("ci").await.unwrap().status.unwrap();
        assert_eq!(status.state, InstanceState::Running, "{status:?}");
    })
    .await;
}

#[tokio::test]
async fn deleting_a_runtime_never_waits_on_an_instance_that_cannot_let_go_or_that_it_left() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::ResourceExt;
    with_namespace("pf-ci-stuck", |ns| async move {
        let _operator = operator(&ns);
        let runtimes = ns.api::<PromptFlowRuntime>();
        let deadline = std::time::Duration::from_secs(30);

        // Moved to another instance and deleted at once: it waits for the one it left.
        create_instance(&ns, "one", json!({})).await;
        create_instance(&ns, "two", json!({})).await;
        create_on_instance(&ns, "mover", "one", true).await;
        wait_running_with(&ns, "one", &["mover"]).await;
        let mover = wait_runtime(&ns, "mover", RuntimePhase::Running, None).await;
        merge(
            &runtimes,
            "mover",
            json!({"spec": {"compute": {"instance": {"name": "two"}}}}),
        )
        .await;
        runtimes.delete("mover", &DeleteParams::background()).await.unwrap();
        crate::harness::wait_deleted(&runtimes, "mover", &mover.uid().unwrap(), deadline).await;

        // An instance whose own service account is gone cannot restart: its runtime's deletion
        // does not wait for it.
        crate::runtime::create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "ci-account"}})).await;
        create_instance(&ns, "ci", json!({"serviceAccountName": "ci-account"})).await;
        create_on_instance(&ns, "chat", "ci", true).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
        let chat = wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        ns.api::<ServiceAccount>()
            .delete("ci-account", &DeleteParams::default())
            .await
            .unwrap();
        runtimes.delete("chat", &DeleteParams::background()).await.unwrap();
        wait_state(&ns, "ci", InstanceState::Running, Some("ServiceAccountNotFound")).await;
        crate::harness::wait_deleted(&runtimes, "chat", &chat.uid().unwrap(), deadline).await;

        // Made again under the same name meanwhile: the deleted one's containers are not it.
        let serving = ns.api::<Pod>().get("ci-instance").await.unwrap().uid();
        create_on_instance(&ns, "chat", "ci", true).await;
        let waiting = wait_runtime(
            &ns,
            "chat",
            RuntimePhase::NotAvailable,
            Some("WaitingForInstanceRestart"),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let still = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap();
        assert_eq!(
            still.status.as_ref().map(|s| s.phase),
            Some(RuntimePhase::NotAvailable),
            "the new chat took the deleted one's containers: {:?}",
            waiting.status
        );
        // The account back, the instance restarts to carry the new one.
        crate::runtime::create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "ci-account"}})).await;
        wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        let pod = ns.api::<Pod>().get("ci-instance").await.unwrap();
        assert_ne!(pod.uid(), serving, "the pod was remade");
        let new_uid = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap().uid().unwrap();
        assert_eq!(pod.annotations()["promptflow.dev/runtime-uids"], new_uid);
    })
    .await;
}

/// An instance of Standard_DS3_v2 (4 cpu, 14Gi) with two runtimes, in a namespace whose quota
/// holds one such machine and a little more: admitted only when the pod claims the size once.
/// Returns the running instance pod.
async fn two_runtimes_under_a_quota_for_one_machine(ns: &TestNamespace) -> Pod {
    use k8s_openapi::api::core::v1::ResourceQuota;
    use std::time::Duration;
    let hard = json!({"requests.cpu": "5", "limits.cpu": "5", "requests.memory": "16Gi", "limits.memory": "16Gi"});
    crate::runtime::create(
        &ns.api::<ResourceQuota>(),
        json!({"metadata": {"name": "one-machine"}, "spec": {"hard": hard}}),
    )
    .await;
    crate::harness::wait_for(
        &ns.api::<ResourceQuota>(),
        "one-machine",
        |q: Option<&ResourceQuota>| q.and_then(|q| q.status.as_ref()?.hard.as_ref()).is_some(),
        Duration::from_secs(30),
    )
    .await;
    create_instance(ns, "ci", json!({})).await;
    create_on_instance(ns, "chat", "ci", true).await;
    create_on_instance(ns, "eval", "ci", true).await;
    wait_running_with(ns, "ci", &["chat", "eval"]).await;
    for name in ["chat", "eval"] {
        wait_runtime(ns, name, RuntimePhase::Running, None).await;
    }
    ns.api::<Pod>().get("ci-instance").await.unwrap()
}

fn limit_of(container: &k8s_openapi::api::core::v1::Container, resource: &str) -> Option<String> {
    let limits = container.resources.as_ref()?.limits.as_ref()?;
    limits.get(resource).map(|q| q.0.clone())
}

#[tokio::test]
async fn an_instance_claims_its_size_once_with_pod_level_resources() {
    with_namespace("pf-ci-pod-size", |ns| async move {
        let _operator = operator(&ns);
        let pod = two_runtimes_under_a_quota_for_one_machine(&ns).await;
        let spec = pod.spec.unwrap();
        let whole = spec.resources.expect("the API server kept the pod-level resources");
        let limits = whole.limits.unwrap();
        assert_eq!((limits["cpu"].0.as_str(), limits["memory"].0.as_str()), ("4", "14Gi"));
        for container in spec.containers.iter().filter(|c| !c.name.starts_with("px-")) {
            assert_eq!(
                limit_of(container, "cpu"),
                None,
                "{} claims cpu of its own",
                container.name
            );
            assert_eq!(limit_of(container, "memory"), None, "{}", container.name);
        }
        let status = ns.api::<ComputeInstance>().get("ci").await.unwrap().status.unwrap();
        assert_eq!(status.resource_layout.as_deref(), Some("Pod"));
    })
    .await;
}

#[tokio::test]
async fn without_pod_level_resources_the_size_is_split_into_shares() {
    with_namespace("pf-ci-shares", |ns| async move {
        let _operator = crate::harness::OperatorProcess::start(
            &crate::harness::kubeconfig(),
            &[
                "--watch-namespace",
                &ns.name,
                "--instance-restart-batch-seconds=3",
                "--instance-resources=containers",
            ],
        );
        let pod = two_runtimes_under_a_quota_for_one_machine(&ns).await;
        let spec = pod.spec.unwrap();
        assert!(spec.resources.is_none());
        let main: Vec<_> = spec.containers.iter().filter(|c| !c.name.starts_with("px-")).collect();
        assert_eq!(main.len(), 3);
        for container in main {
            assert_eq!(
                limit_of(container, "cpu").as_deref(),
                Some("1333m"),
                "{}",
                container.name
            );
            assert_eq!(
                limit_of(container, "memory").as_deref(),
                Some("4778Mi"),
                "{}",
                container.name
            );
        }
        let status = ns.api::<ComputeInstance>().get("ci").await.unwrap().status.unwrap();
        assert_eq!(status.resource_layout.as_deref(), Some("Containers"));
    })
    .await;
}

/// A static PersistentVolume of `class` (the controller-manager's binder binds claims to it; no
/// provisioner is needed).
async fn static_volume(name: &str, class: &str, size: &str) {
    use k8s_openapi::api::core::v1::PersistentVolume;
    let api: kube::Api<PersistentVolume> = kube::Api::all(crate::harness::client().await);
    crate::runtime::create(
        &api,
        json!({"metadata": {"name": name}, "spec": {
            "capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": class,
            "hostPath": {"path": format!("/tmp/{name}")}}}),
    )
    .await;
}

async fn delete_volume(name: &str) {
    use k8s_openapi::api::core::v1::PersistentVolume;
    let api: kube::Api<PersistentVolume> = kube::Api::all(crate::harness::client().await);
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// The disk claim's uid and whether it is Bound.
async fn claim(ns: &TestNamespace, name: &str) -> Option<(String, bool, usize)> {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use kube::ResourceExt;
    let found = ns.api::<PersistentVolumeClaim>().get_opt(name).await.unwrap()?;
    let bound = found.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    Some((found.uid().unwrap(), bound, found.owner_references().len()))
}

/// Which containers of the live instance pod mount the disk claim `claim` at /home/promptflow.
async fn mounted_in(ns: &TestNamespace, claim: &str) -> Vec<String> {
    let spec = ns.api::<Pod>().get("ci-instance").await.unwrap().spec.unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == claim)
        })
        .map(|v| v.name.clone())
        .unwrap_or_else(|| panic!("the pod has no volume of claim {claim}"));
    spec.containers
        .iter()
        .filter(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume && m.mount_path == "/home/promptflow")
        })
        .map(|c| c.name.clone())
        .collect()
}

async fn wait_claim(
    ns: &TestNamespace,
    name: &str,
    check: impl Fn(Option<&(String, bool, usize)>) -> bool,
) -> Option<(String, bool, usize)> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let found = claim(ns, name).await;
        if check(found.as_ref()) {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "claim {name}: {found:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Creates the instance `keep` with a retained disk of `class` and waits until it runs.
async fn create_running_retained(ns: &TestNamespace, class: &str) {
    let storage = json!({"size": "1Gi", "storageClassName": class, "reclaimPolicy": "Retain"});
    create_instance(ns, "keep", json!({ "storage": storage })).await;
    wait_state(ns, "keep", InstanceState::Running, None).await;
}

#[tokio::test]
async fn the_instance_disk_outlives_stop_start_and_attach_and_follows_its_reclaim_policy() {
    with_namespace("pf-ci-disk", |ns| async move {
        let _operator = operator(&ns);
        let class = format!("disk-{}", ns.name);
        let (volume, kept_volume) = (format!("{}-a", ns.name), format!("{}-b", ns.name));
        static_volume(&volume, &class, "2Gi").await;
        static_volume(&kept_volume, &class, "2Gi").await;
        let instances = ns.api::<ComputeInstance>();

        create_instance(
            &ns,
            "ci",
            json!({"storage": {"size": "1Gi", "storageClassName": class}}),
        )
        .await;
        create_on_instance(&ns, "chat", "ci", true).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
        let (uid, bound, owners) = wait_claim(&ns, "ci-home", |c| c.is_some_and(|c| c.1)).await.unwrap();
        assert!(bound);
        assert_eq!(owners, 1, "under Delete the instance owns its claim");
        assert_eq!(mounted_in(&ns, "ci-home").await, ["instance", "rt-chat"]);
        let status = wait_state(&ns, "ci", InstanceState::Running, None)
            .await
            .status
            .unwrap();
        let disk = status.storage.expect("status.storage");
        assert_eq!(
            (disk.claim_name.as_str(), disk.phase.as_deref()),
            ("ci-home", Some("Bound"))
        );
        assert_eq!(disk.capacity.as_deref(), Some("2Gi"));
        let ready = status.conditions.iter().find(|c| c.type_ == "StorageReady").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "ClaimBound"));

        // Stop and start, then another runtime attaches: the same claim throughout.
        merge(&instances, "ci", json!({"spec": {"state": "Stopped"}})).await;
        wait_state(&ns, "ci", InstanceState::Stopped, None).await;
        assert_eq!(claim(&ns, "ci-home").await.map(|c| c.0), Some(uid.clone()));
        merge(&instances, "ci", json!({"spec": {"state": "Running"}})).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
        create_on_instance(&ns, "eval", "ci", true).await;
        wait_running_with(&ns, "ci", &["chat", "eval"]).await;
        assert_eq!(claim(&ns, "ci-home").await.map(|c| c.0), Some(uid.clone()));
        assert_eq!(mounted_in(&ns, "ci-home").await, ["instance", "rt-chat", "rt-eval"]);

        // A disk no volume can hold says why.
        create_instance(
            &ns,
            "lonely",
            json!({"storage": {"size": "1Gi", "storageClassName": format!("none-{}", ns.name)}}),
        )
        .await;
        let lonely = wait_state(&ns, "lonely", InstanceState::Creating, Some("ClaimPending")).await;
        let message = lonely.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("no PersistentVolume of storage class none-"),
            "{message}"
        );

        // Deleted under Delete: the claim goes with the instance.
        for name in ["chat", "eval"] {
            ns.api::<PromptFlowRuntime>()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        }
        instances.delete("ci", &DeleteParams::foreground()).await.unwrap();
        wait_claim(&ns, "ci-home", |c| c.is_none()).await;

        // Under Retain the claim stays without owner, and an instance made again takes it back.
        create_running_retained(&ns, &class).await;
        let (kept, _, owners) = wait_claim(&ns, "keep-home", |c| c.is_some_and(|c| c.1)).await.unwrap();
        assert_eq!(owners, 0);
        let first = instances.get("keep").await.unwrap().metadata.uid.unwrap();
        instances.delete("keep", &DeleteParams::default()).await.unwrap();
        crate::harness::wait_deleted(&instances, "keep", &first, std::time::Duration::from_secs(60)).await;
        assert_eq!(
            claim(&ns, "keep-home").await.map(|c| c.0),
            Some(kept.clone()),
            "a retained disk stays"
        );
        create_running_retained(&ns, &class).await;
        let status = instances.get("keep").await.unwrap().status.unwrap();
        assert_eq!(status.storage.and_then(|s| s.phase), Some("Bound".into()));
        assert_eq!(claim(&ns, "keep-home").await.map(|c| c.0), Some(kept));

        delete_volume(&volume).await;
        delete_volume(&kept_volume).await;
    })
    .await;
}

#[tokio::test]
async fn one_runtimes_failing_install_keeps_neither_its_neighbours_nor_the_idle_shutdown_from_working() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::time::Duration;
    with_namespace("pf-ci-install", |ns| async move {
        // The instance image selects the kwok stage that plays a kubelet whose runtime "bad"
        // cannot install its requirements (hack/kwok-stages/instance-installer.yaml).
        let operator = crate::harness::OperatorProcess::start(
            &crate::harness::kubeconfig(),
            &[
                "--watch-namespace",
                &ns.name,
                "--instance-restart-batch-seconds=3",
                "--instance-min-idle=1s",
                "--instance-image=registry.invalid/simulate/instance:1",
            ],
        );
        let flow = json!({"metadata": {"name": "needs-packages"}, "data": {
            "flow.dag.yaml": "environment:\n  python_requirements_txt: requirements.txt\n",
            "requirements.txt": "requests==2.32.3\n"}});
        crate::runtime::create(&ns.api::<ConfigMap>(), flow).await;
        create_instance(&ns, "ci", json!({"idleTimeBeforeShutdown": "10s"})).await;
        let on_ci = json!({"instance": {"name": "ci", "acknowledgeRestart": true}});
        let uses_flow = json!({"configMapName": "needs-packages"});
        crate::runtime::create_runtime(&ns, "good", json!({"compute": on_ci, "flow": uses_flow})).await;
        let failing = json!({"repository": "registry.invalid/simulate/pip-fails", "version": "1"});
        crate::runtime::create_runtime(
            &ns,
            "bad",
            json!({"compute": on_ci, "flow": uses_flow, "image": failing}),
        )
        .await;

        // good runs; bad says its install fails, naming its installer; the instance runs.
        wait_runtime(&ns, "good", RuntimePhase::Running, None).await;
        let bad = wait_runtime(&ns, "bad", RuntimePhase::NotAvailable, Some("CrashLoopBackOff")).await;
        let message = bad.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("requirements cannot be installed")
                && message.contains("req-bad")
                && message.contains("No matching distribution"),
            "{message}"
        );
        let running = wait_state(&ns, "ci", InstanceState::Running, Some("PodReady")).await;
        let mut carried = running.status.unwrap().runtimes;
        carried.sort();
        assert_eq!(carried, ["bad", "good"]);

        // Each runtime's proxy runs (the kubelet starts it whatever the installer does): asked
        // at the deadline, neither saw activity, so the instance stops for idleness.
        let pod = ns.api::<Pod>().get("ci-instance").await.unwrap();
        let slots = pod.metadata.annotations.as_ref().unwrap()["promptflow.dev/runtimes"].clone();
        let ip = pod.status.and_then(|s| s.pod_ip).expect("pod IP");
        let mut proxies = vec![];
        for (slot, name) in slots.split(',').enumerate() {
            assert!(["bad", "good"].contains(&name), "{slots}");
            // Slot i: the runtime on 8100 + 10 i, its proxy on the next two ports.
            proxies.push(crate::processes::PodProcesses::proxy_on(&ip, 8100 + 10 * slot as u16).await);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = ns
                .api::<ComputeInstance>()
                .get("ci")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if status.state == InstanceState::Stopped && status.reason.as_deref() == Some("IdleShutdown") {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let log = operator.log_text();
                let tail: Vec<_> = log.lines().rev().take(40).collect();
                panic!(
                    "ci did not stop for idleness: {status:?}\noperator log (last lines first):\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
}

/// The StorageReady condition of instance `name`: (status, reason, message).
async fn storage_ready(ns: &TestNamespace, name: &str) -> Option<(String, String, String)> {
    let instance = ns.api::<ComputeInstance>().get(name).await.unwrap();
    let condition = instance
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "StorageReady")?;
    Some((condition.status, condition.reason, condition.message))
}

async fn wait_storage_reason(ns: &TestNamespace, name: &str, reason: &str) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let found = storage_ready(ns, name).await;
        if let Some((_, found_reason, message)) = &found
            && found_reason == reason
        {
            return message.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} StorageReady: {found:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn the_instance_disk_follows_policy_changes_and_reports_what_it_cannot_take() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    with_namespace("pf-ci-disk-edges", |ns| async move {
        let _operator = operator(&ns);
        let class = format!("disk-{}", ns.name);
        let volumes = [format!("{}-a", ns.name), format!("{}-b", ns.name)];
        for volume in &volumes {
            static_volume(volume, &class, "2Gi").await;
        }
        crate::runtime::create(
            &ns.api::<ResourceQuota>(),
            json!({"metadata": {"name": "disks"}, "spec": {"hard": {"requests.storage": "3Gi"}}}),
        )
        .await;
        crate::harness::wait_for(
            &ns.api::<ResourceQuota>(),
            "disks",
            |q: Option<&ResourceQuota>| q.and_then(|q| q.status.as_ref()?.hard.as_ref()).is_some(),
            std::time::Duration::from_secs(30),
        )
        .await;
        let instances = ns.api::<ComputeInstance>();
        let disk =
            |policy: &str| json!({"storage": {"size": "1Gi", "storageClassName": class, "reclaimPolicy": policy}});

        // Retain set while stopped reaches the claim; deleting the instance then keeps it.
        create_instance(&ns, "flip", disk("Delete")).await;
        wait_state(&ns, "flip", InstanceState::Running, None).await;
        wait_claim(&ns, "flip-home", |c| c.is_some_and(|c| c.1 && c.2 == 1)).await;
        merge(&instances, "flip", json!({"spec": {"state": "Stopped"}})).await;
        wait_state(&ns, "flip", InstanceState::Stopped, None).await;
        merge(
            &instances,
            "flip",
            json!({"spec": {"storage": {"reclaimPolicy": "Retain"}}}),
        )
        .await;
        let (kept, _, _) = wait_claim(&ns, "flip-home", |c| c.is_some_and(|c| c.2 == 0))
            .await
            .unwrap();
        let uid = instances.get("flip").await.unwrap().metadata.uid.unwrap();
        instances.delete("flip", &DeleteParams::default()).await.unwrap();
        crate::harness::wait_deleted(&instances, "flip", &uid, std::time::Duration::from_secs(60)).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(claim(&ns, "flip-home").await.map(|c| c.0), Some(kept.clone()));

        // A retained disk taken back under Delete is used, never owned: it outlives the new one.
        create_instance(&ns, "flip", disk("Delete")).await;
        wait_state(&ns, "flip", InstanceState::Running, None).await;
        wait_storage_reason(&ns, "flip", "ClaimBound").await;
        let (again, _, owners) = claim(&ns, "flip-home").await.unwrap();
        assert_eq!((again.as_str(), owners), (kept.as_str(), 0));
        let uid = instances.get("flip").await.unwrap().metadata.uid.unwrap();
        instances.delete("flip", &DeleteParams::default()).await.unwrap();
        crate::harness::wait_deleted(&instances, "flip", &uid, std::time::Duration::from_secs(60)).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(claim(&ns, "flip-home").await.map(|c| c.0), Some(kept));

        // A size the claim cannot take is accepted, reported, and can be set back.
        create_instance(&ns, "sized", disk("Delete")).await;
        wait_state(&ns, "sized", InstanceState::Running, None).await;
        wait_storage_reason(&ns, "sized", "ClaimBound").await;
        merge(&instances, "sized", json!({"spec": {"storage": {"size": "512Mi"}}})).await;
        let message = wait_storage_reason(&ns, "sized", "StorageResizeRefused").await;
        assert!(message.contains("cannot shrink"), "{message}");
        assert_eq!(
            instances.get("sized").await.unwrap().status.unwrap().state,
            InstanceState::Running
        );
        merge(&instances, "sized", json!({"spec": {"storage": {"size": "1Gi"}}})).await;
        wait_storage_reason(&ns, "sized", "ClaimBound").await;

        // Storage removed and added back with another class: the claim keeps its class, and
        // says so.
        merge(&instances, "sized", json!({"spec": {"storage": null}})).await;
        let other = json!({"size": "1Gi", "storageClassName": format!("other-{}", ns.name)});
        merge(&instances, "sized", json!({"spec": {"storage": other}})).await;
        let message = wait_storage_reason(&ns, "sized", "StorageMismatch").await;
        assert!(message.contains(&class), "{message}");

        // A claim the quota refuses: the instance waits, saying why.
        create_instance(
            &ns,
            "big",
            json!({"storage": {"size": "5Gi", "storageClassName": class}}),
        )
        .await;
        let refused = wait_state(&ns, "big", InstanceState::Creating, Some("ClaimRejected")).await;
        let message = refused.status.unwrap().message.unwrap_or_default();
        assert!(message.contains("exceeded quota"), "{message}");
        assert!(ns.api::<Pod>().get_opt("big-instance").await.unwrap().is_none());

        for volume in &volumes {
            delete_volume(volume).await;
        }
    })
    .await;
}

/// What a runtime beside its installer sees, with a real Python interpreter: packages that
/// arrive in a `PYTHONPATH` directory after the interpreter started are found, provided the
/// directory existed when it started (the runtime mounts it, so the kubelet makes it first);
/// one made later is never looked at again.
#[tokio::test]
async fn packages_installed_after_the_runtime_started_are_found_when_their_directory_was_there() {
    let python = crate::processes::promptflow_venv().join("bin/python");
    let script = "import os, sys, time\n\
                  while not os.path.exists(os.path.join(sys.argv[1], 'ready')):\n    time.sleep(0.05)\n\
                  try:\n    import arrived\n    print('found', arrived.VALUE)\n\
                  except ImportError:\n    print('missing')\n";
    for made_first in [true, false] {
        let root = std::env::temp_dir().join(format!("pf-site-{:08x}", rand::random::<u32>()));
        let site = root.join("site");
        if made_first {
            std::fs::create_dir_all(&site).unwrap();
        } else {
            std::fs::create_dir_all(&root).unwrap();
        }
        let flag = if made_first { site.clone() } else { root.clone() };
        let child = tokio::process::Command::new(&python)
            .args(["-c", script])
            .arg(&flag)
            .env("PYTHONPATH", &site)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start python");
        // The interpreter is up and importing before the package arrives.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("arrived.py"), "VALUE = 42\n").unwrap();
        std::fs::write(flag.join("ready"), "").unwrap();
        let output = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("python ends")
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if made_first {
            assert_eq!(said, "found 42", "a package that arrives later is found");
        } else {
            assert_eq!(said, "missing", "a directory made after the start is not looked at");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
