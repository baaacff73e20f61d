//! Serverless runtimes from YAML to Running, against the real cluster with the operator binary
//! as a process: identity, flow environment, quota, image-pull failures, changes, deletion.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use kube::{Api, ResourceExt};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};

const WAIT: Duration = Duration::from_secs(60);

/// Creates a runtime `name` with `spec` in the test namespace.
pub async fn create_runtime(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> PromptFlowRuntime {
    let runtime = json!({
        "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
        "metadata": {"name": name}, "spec": spec
    });
    create(&ns.api::<PromptFlowRuntime>(), runtime).await
}

pub async fn create<K>(api: &Api<K>, object: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

/// Waits until the runtime shows `phase` (and `reason`, when given).
pub async fn wait_status(
    ns: &TestNamespace,
    name: &str,
    phase: &'static str,
    reason: Option<&'static str>,
) -> PromptFlowRuntime {
    let api = ns.api::<PromptFlowRuntime>();
    harness::wait_for(
        &api,
        name,
        move |rt: Option<&PromptFlowRuntime>| {
            let status = rt.and_then(|rt| serde_json::to_value(rt.status.as_ref()?).ok());
            status.is_some_and(|s| s["phase"] == phase && reason.is_none_or(|r| s["reason"] == r))
        },
        WAIT,
    )
    .await
}

/// Waits until the runtime has condition `type_` with `status` and `reason`.
pub async fn wait_condition(
    ns: &TestNamespace,
    name: &str,
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
) -> PromptFlowRuntime {
    harness::wait_for(
        &ns.api::<PromptFlowRuntime>(),
        name,
        move |rt: Option<&PromptFlowRuntime>| {
            rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            })
        },
        WAIT,
    )
    .await
}

pub async fn runtime_pods(ns: &TestNamespace, runtime: &str) -> Vec<Pod> {
    let selector = format!("promptflow.dev/runtime={runtime}");
    ns.api::<Pod>()
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
}

/// The events recorded for one runtime, as (type, reason, note), once per occurrence (a repeated
/// event is one object with a series). (Its Service has the same name; the cluster's controllers
/// report about that one, e.g. endpoint slices refusing loopback pod IPs.)
pub async fn events_for(ns: &TestNamespace, name: &str) -> Vec<(String, String, String)> {
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.name.as_deref() == Some(name) && r.kind.as_deref() == Some("PromptFlowRuntime"))
        })
        .flat_map(|e| {
            // A repeated event is one object with a series: each occurrence counts.
            let occurrences = e.series.as_ref().map_or(1, |series| series.count.max(1)) as usize;
            let event = (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            );
            std::iter::repeat_n(event, occurrences)
        })
        .collect()
}

#[tokio::test]
async fn samples_reach_running_and_describe_shows_events() {
    with_namespace("pf-rt-samples", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        for sample in [
            "runtime-minimal.yaml",
            "runtime-serverless-flow.yaml",
            "compute-instance.yaml",
        ] {
            for object in harness::read_manifests(&harness::repo_root().join("config/samples").join(sample)) {
                harness::apply(&ns.client, &ns.name, &object, false)
                    .await
                    .expect("apply sample");
            }
        }
        let chat = wait_status(&ns, "chat", "Running", Some("PodReady")).await;
        let status = chat.status.unwrap();
        assert_eq!(status.compute.as_deref(), Some("Serverless"));
        assert_eq!(
            status.instance_type.as_deref(),
            Some("Standard_D2s_v3"),
            "first catalog size without quota"
        );
        assert_eq!(status.observed_generation, chat.metadata.generation);
        wait_status(&ns, "chat-flow", "Running", Some("PodReady")).await;
        // The compute-instance sample: the runtime runs on the instance once it restarted to take it.
        let alice = wait_status(&ns, "alice-chat", "Running", Some("PodReady")).await;
        assert_eq!(alice.status.unwrap().compute.as_deref(), Some("alice-ci"));

        let (ok, describe) = harness::kubectl(&["describe", "pfrt", "chat", "-n", &ns.name]).await;
        assert!(ok, "{describe}");
        // One event for the start, naming the pod and the image it runs.
        assert!(
            describe.contains("Running")
                && describe.contains("pod chat-runtime is Ready")
                && describe.contains("promptflow-runtime-stable:"),
            "{describe}"
        );
        assert!(!describe.contains("PodCreated"), "{describe}");
        // And where clients reach it: the Service URL, not the runtime container's own port
        // (which skips the activity proxy).
        let url = status.url.clone().unwrap();
        assert!(describe.contains(&format!("reach it at {url}")), "{describe}");
        assert!(!describe.contains(":8080"), "{describe}");
        let pod = &runtime_pods(&ns, "chat-flow").await[0];
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("pf-puller"));
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some("mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable:20240222.v4")
        );
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["promptflow.dev/instance-type"],
            "Standard_E4ds_v4"
        );
        let (ok, table) = harness::kubectl(&["get", "pfrt", "-n", &ns.name]).await;
        assert!(
            ok && table.contains("Serverless") && table.contains("Running"),
            "{table}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_missing_service_account_blocks_until_it_appears() {
    with_namespace("pf-rt-identity", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "late", json!({"identity": {"serviceAccountName": "pf-late"}})).await;
        let blocked = wait_status(&ns, "late", "Not available", Some("ServiceAccountNotFound")).await;
        let message = blocked.status.as_ref().unwrap().message.clone().unwrap();
        assert!(message.contains("pf-late"), "{message}");
        assert!(runtime_pods(&ns, "late").await.is_empty(), "no pod without an identity");
        let identity = blocked
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "IdentityResolved")
            .unwrap();
        assert_eq!(
            (identity.status.as_str(), identity.reason.as_str()),
            ("False", "ServiceAccountNotFound")
        );

        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "pf-late"}})).await;
        let running = wait_status(&ns, "late", "Running", None).await;
        assert_eq!(
            running.metadata.generation,
            Some(1),
            "recovered with no change to the runtime"
        );
        let pods = runtime_pods(&ns, "late").await;
        assert_eq!(
            pods[0].spec.as_ref().unwrap().service_account_name.as_deref(),
            Some("pf-late")
        );
        let warnings: Vec<_> = events_for(&ns, "late")
            .await
            .into_iter()
            .filter(|e| e.1 == "ServiceAccountNotFound")
            .collect();
        assert_eq!(warnings.len(), 1, "one event per transition: {warnings:?}");
    })
    .await;
}

#[tokio::test]
async fn a_pull_secret_of_the_wrong_type_is_invalid_and_never_leaks() {
    with_namespace("pf-rt-secret", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let secrets = ns.api::<Secret>();
        create(&secrets, json!({"metadata": {"name": "regcred"}, "type": "Opaque", "stringData": {"token": "hunter2-do-not-log"}})).await;
        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "puller"}, "imagePullSecrets": [{"name": "regcred"}]})).await;
        create_runtime(&ns, "chat", json!({"identity": {"serviceAccountName": "puller"}})).await;
        let invalid = wait_status(&ns, "chat", "Not available", Some("PullSecretInvalid")).await;
        let status_text = serde_json::to_string(&invalid.status).unwrap();
        assert!(status_text.contains("regcred") && status_text.contains("type Opaque"), "{status_text}");

        // Secrets are not watched: the blocked runtime looks again with backoff and sees the change.
        secrets.delete("regcred", &DeleteParams::default()).await.unwrap();
        wait_status(&ns, "chat", "Not available", Some("PullSecretNotFound")).await;
        let auth = r#"{"auths":{"mcr.microsoft.com":{"auth":"dXNlcjpodW50ZXIyLWRvLW5vdC1sb2c="}}}"#;
        create(&secrets, json!({"metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": auth}})).await;
        // A change of the service account wakes it at once (no waiting for the backoff).
        let touch = json!({"metadata": {"annotations": {"e2e.promptflow.dev/secret-fixed": "yes"}}});
        ns.api::<ServiceAccount>().patch("puller", &PatchParams::default(), &Patch::Merge(touch)).await.unwrap();
        let running = wait_status(&ns, "chat", "Running", None).await;
        let pod = &runtime_pods(&ns, "chat").await[0];
        assert_eq!(pod.spec.as_ref().unwrap().image_pull_secrets.as_ref().unwrap()[0].name, "regcred");

        let everything = format!("{}{:?}", serde_json::to_string(&running).unwrap(), events_for(&ns, "chat").await);
        assert!(!everything.contains("hunter2") && !everything.contains("dXNlcjpodW50ZXIy"), "secret content leaked");
    })
    .await;
}

#[tokio::test]
async fn the_flow_environment_sets_image_and_requirements_and_edits_roll_the_pod_once() {
    with_namespace("pf-rt-flow", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let config_maps = ns.api::<ConfigMap>();
        let dag = "environment:\n  image: registry.example/team/flow-runtime:7\n  python_requirements_txt: requirements.txt\n";
        create(&config_maps, json!({"metadata": {"name": "flow"}, "data": {"flow.dag.yaml": dag, "requirements.txt": "requests\n"}})).await;
        create_runtime(&ns, "chat", json!({"flow": {"configMapName": "flow"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let pod = runtime_pods(&ns, "chat").await.remove(0);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].image.as_deref(), Some("registry.example/team/flow-runtime:7"));
        let init = &spec.init_containers.as_ref().expect("an init container installs the requirements")[0];
        assert!(init.command.as_ref().unwrap().contains(&"/flow/requirements.txt".to_owned()), "{:?}", init.command);
        assert!(init.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/flow"));
        let flow_volume = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == "flow").unwrap();
        assert_eq!(flow_volume.config_map.as_ref().unwrap().name, "flow");

        let first_uid = pod.uid().unwrap();
        let mark = operator.log_text().len();
        config_maps
            .patch("flow", &PatchParams::default(), &Patch::Merge(json!({"data": {"requirements.txt": "requests\nnumpy\n"}})))
            .await
            .unwrap();
        let pods = ns.api::<Pod>();
        harness::wait_deleted(&pods, "chat-runtime", &first_uid, WAIT).await;
        wait_status(&ns, "chat", "Running", None).await;
        let replacement = harness::wait_for(&pods, "chat-runtime", conditions::is_pod_running(), WAIT).await;
        // The reconcile that wrote Running and the one its write woke both saw the new pod: had
        // either replaced it again, it would have done so before logging.
        operator.wait_reconciled(mark, &["chat".to_owned()], "phase=Running", 2, WAIT).await;
        let now = runtime_pods(&ns, "chat").await;
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].uid(), replacement.uid(), "the pod was replaced exactly once");
        let replaced = events_for(&ns, "chat").await.into_iter().filter(|e| e.1 == "PodReplaced").count();
        assert_eq!(replaced, 1, "{}", operator.log_text());

        // A broken flow says what is wrong, while the pod from the last good flow keeps serving.
        config_maps.patch("flow", &PatchParams::default(), &Patch::Merge(json!({"data": {"flow.dag.yaml": "environment: [unclosed"}}))).await.unwrap();
        let invalid = wait_condition(&ns, "chat", "SpecApplied", "False", "FlowInvalid").await;
        let status = invalid.status.unwrap();
        assert_eq!(status.phase, promptflow_operator::api::RuntimePhase::Running, "the serving pod keeps the runtime Running");
        let applied = status.conditions.iter().find(|c| c.type_ == "SpecApplied").unwrap();
        assert!(applied.message.contains("does not parse"), "{}", applied.message);
        assert_eq!(runtime_pods(&ns, "chat").await[0].uid(), replacement.uid(), "the serving pod is kept");
        let warnings = events_for(&ns, "chat").await.into_iter().filter(|e| e.0 == "Warning" && e.1 == "FlowInvalid").count();
        assert_eq!(warnings, 1);
    })
    .await;
}

/// Makes quota `team-quota` of `cpu` requested CPUs (and ample memory) and waits until the quota
/// controller has reported it (admission enforces a quota once its status is set).
pub async fn team_quota(ns: &TestNamespace, cpu: &str) -> Api<ResourceQuota> {
    let quotas = ns.api::<ResourceQuota>();
    create(
        &quotas,
        json!({"metadata": {"name": "team-quota"}, "spec": {"hard": {"requests.cpu": cpu, "requests.memory": "64Gi"}}}),
    )
    .await;
    harness::wait_for(
        &quotas,
        "team-quota",
        |q: Option<&ResourceQuota>| q.and_then(|q| q.status.as_ref()?.hard.as_ref()).is_some(),
        WAIT,
    )
    .await;
    quotas
}

#[tokio::test]
async fn quota_too_small_then_raised() {
    with_namespace("pf-rt-quota", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let quotas = team_quota(&ns, "1").await;
        create_runtime(&ns, "chat", json!({})).await;
        let blocked = wait_status(&ns, "chat", "Not available", Some("QuotaExceeded")).await;
        let message = blocked.status.unwrap().message.unwrap();
        assert!(
            message.contains("team-quota") && message.contains("requests.cpu"),
            "{message}"
        );

        quotas
            .patch(
                "team-quota",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"hard": {"requests.cpu": "8"}}})),
            )
            .await
            .unwrap();
        let running = wait_status(&ns, "chat", "Running", None).await;
        assert_eq!(
            running.status.unwrap().instance_type.as_deref(),
            Some("Standard_D2s_v3")
        );

        // Growing within the quota: the runtime's own pod gives its share back when replaced.
        // 4 CPUs for the new size and 10m for its activity proxy.
        quotas
            .patch(
                "team-quota",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"hard": {"requests.cpu": "4010m"}}})),
            )
            .await
            .unwrap();
        let grow = json!({"spec": {"compute": {"serverless": {"instanceType": "Standard_D4s_v3"}}}});
        ns.api::<PromptFlowRuntime>()
            .patch("chat", &PatchParams::default(), &Patch::Merge(grow))
            .await
            .unwrap();
        harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "chat",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                    s.phase == promptflow_operator::api::RuntimePhase::Running
                        && s.instance_type.as_deref() == Some("Standard_D4s_v3")
                })
            },
            WAIT,
        )
        .await;

        // A named size that is not in the catalog lists the valid ones.
        create_runtime(
            &ns,
            "big",
            json!({"compute": {"serverless": {"instanceType": "Standard_NC24"}}}),
        )
        .await;
        let unknown = wait_status(&ns, "big", "Not available", Some("UnknownInstanceType")).await;
        assert!(unknown.status.unwrap().message.unwrap().contains("Standard_E4ds_v4"));
    })
    .await;
}

#[tokio::test]
async fn image_pull_failures_surface_on_the_runtime() {
    with_namespace("pf-rt-pull", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let spec = json!({"image": {"repository": "registry.invalid/simulate/errimagepull", "version": "1"}});
        create_runtime(&ns, "chat", spec).await;
        let failed = wait_status(&ns, "chat", "Not available", Some("ErrImagePull")).await;
        let status = failed.status.unwrap();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ErrImagePull")
        );
        assert!(
            status
                .message
                .unwrap()
                .contains("registry.invalid/simulate/errimagepull:1")
        );
        let warnings = events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.0 == "Warning" && e.1 == "ErrImagePull")
            .count();
        assert_eq!(warnings, 1);
    })
    .await;
}

#[tokio::test]
async fn a_version_change_replaces_the_pod_once_and_deletion_removes_it() {
    with_namespace("pf-rt-version", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let api = ns.api::<PromptFlowRuntime>();
        create_runtime(&ns, "chat", json!({"image": {"version": "20240101.v1"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let first = runtime_pods(&ns, "chat").await.remove(0);
        let mark = operator.log_text().len();

        api.patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": {"version": "20240222.v4"}}})),
        )
        .await
        .unwrap();
        let pods = ns.api::<Pod>();
        harness::wait_deleted(&pods, "chat-runtime", &first.uid().unwrap(), WAIT).await;
        harness::wait_for(
            &api,
            "chat",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                    s.phase == promptflow_operator::api::RuntimePhase::Running
                        && s.version.as_deref() == Some("20240222.v4")
                })
            },
            WAIT,
        )
        .await;
        operator
            .wait_reconciled(mark, &["chat".to_owned()], "phase=Running", 2, WAIT)
            .await;
        let now = runtime_pods(&ns, "chat").await;
        assert_eq!(now.len(), 1);
        assert!(
            now[0].spec.as_ref().unwrap().containers[0]
                .image
                .as_deref()
                .unwrap()
                .ends_with(":20240222.v4")
        );
        let replaced = events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.1 == "PodReplaced")
            .count();
        assert_eq!(replaced, 1, "{}", operator.log_text());

        let uid = now[0].uid().unwrap();
        api.delete("chat", &DeleteParams::background()).await.unwrap();
        harness::wait_deleted(&pods, "chat-runtime", &uid, WAIT).await;
    })
    .await;
}

#[tokio::test]
async fn a_killed_operator_resumes_with_exactly_one_pod_per_runtime() {
    with_namespace("pf-rt-crash", |ns| async move {
        // One reconcile at a time, so pods appear one by one and the kill lands mid-way.
        let mut operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--concurrency", "1"],
        );
        for i in 0..20 {
            create_runtime(&ns, &format!("rt-{i:02}"), json!({})).await;
        }
        // Kill it mid-way: some pods exist, others not yet.
        let pods = ns.api::<Pod>();
        let deadline = tokio::time::Instant::now() + WAIT;
        while pods.list(&ListParams::default()).await.unwrap().items.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no pod was created:\n{}",
                operator.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        operator.kill9().await;
        let before = pods.list(&ListParams::default()).await.unwrap().items.len();
        assert!(
            (1..20).contains(&before),
            "the kill must land mid-creation: {before} of 20 pods existed"
        );

        let _restarted = OperatorProcess::for_namespace(&ns.name);
        for i in 0..20 {
            wait_status(&ns, &format!("rt-{i:02}"), "Running", None).await;
        }
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(all.len(), 20, "exactly one pod per runtime");
        for i in 0..20 {
            assert_eq!(runtime_pods(&ns, &format!("rt-{i:02}")).await.len(), 1);
        }
        println!("crash test: {before} of 20 pods existed when the operator was killed");
    })
    .await;
}

#[tokio::test]
async fn a_failed_or_vanished_pod_is_recreated() {
    with_namespace("pf-rt-recreate", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "chat", json!({})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let pods = ns.api::<Pod>();

        // The pod fails, as a kubelet would report it: the operator replaces it.
        let first = pods.get("chat-runtime").await.unwrap();
        let failed =
            json!({"status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}});
        pods.patch_status("chat-runtime", &PatchParams::default(), &Patch::Merge(failed))
            .await
            .unwrap();
        harness::wait_deleted(&pods, "chat-runtime", &first.uid().unwrap(), WAIT).await;
        let second = harness::wait_for(&pods, "chat-runtime", conditions::is_pod_running(), WAIT).await;
        let warnings: Vec<_> = events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.1 == "PodFailed")
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].2.contains("The node was low on memory"), "{warnings:?}");

        // The pod disappears: it is created again.
        pods.delete("chat-runtime", &DeleteParams::default()).await.unwrap();
        harness::wait_deleted(&pods, "chat-runtime", &second.uid().unwrap(), WAIT).await;
        let third = harness::wait_for(&pods, "chat-runtime", conditions::is_pod_running(), WAIT).await;
        assert_ne!(third.uid(), second.uid());
        wait_status(&ns, "chat", "Running", Some("PodReady")).await;
    })
    .await;
}

/// A runtime deleted and applied again at once (`kubectl replace --force`, a GitOps re-create)
/// finds its predecessor's Service and pod still there until the garbage collector removes them:
/// it waits for them quietly (`PredecessorCleanup`), never reports them as someone else's
/// (`ServiceConflict` / `PodConflict`, a Warning and `Stalled`, which fail a GitOps health check).
#[tokio::test]
async fn a_runtime_made_again_at_once_waits_for_its_predecessors_objects_without_a_conflict() {
    with_namespace("pf-rt-again", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let runtimes = ns.api::<PromptFlowRuntime>();
        let mut seen = std::collections::BTreeSet::new();
        let mut old = create_runtime(&ns, "again", json!({})).await;
        wait_status(&ns, "again", "Running", None).await;
        for round in 0..3 {
            runtimes.delete("again", &DeleteParams::background()).await.unwrap();
            harness::wait_deleted(&runtimes, "again", old.metadata.uid.as_deref().unwrap(), WAIT).await;
            let new = create_runtime(&ns, "again", json!({})).await;
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let now = runtimes.get("again").await.unwrap();
                assert_eq!(
                    now.metadata.uid, new.metadata.uid,
                    "round {round}: replaced by the test only"
                );
                let status = now.status.unwrap_or_default();
                seen.extend(status.reason.clone());
                if status.phase == promptflow_operator::api::RuntimePhase::Running {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: not Running: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let pods = runtime_pods(&ns, "again").await;
            assert!(
                pods.len() == 1
                    && pods[0]
                        .owner_references()
                        .iter()
                        .any(|o| Some(&o.uid) == new.metadata.uid.as_ref()),
                "round {round}: the new runtime runs its own pod: {pods:?}"
            );
            old = new;
        }
        let warnings: Vec<_> = events_for(&ns, "again")
            .await
            .into_iter()
            .filter(|(type_, _, _)| type_ == "Warning")
            .collect();
        eprintln!("made again at once: reasons seen {seen:?}");
        assert!(
            warnings.is_empty(),
            "an earlier runtime's objects reported as a problem: {warnings:?}"
        );
        assert!(
            !seen.contains("ServiceConflict") && !seen.contains("PodConflict"),
            "reported as someone else's: {seen:?}"
        );
    })
    .await;
}

/// A Service forged to look like an earlier runtime's (the operator's label, a controller reference
/// to a PromptFlowRuntime of the name, but of an API version the garbage collector cannot resolve,
/// so it would never go) is reported as the conflict it is, not waited for quietly.
#[tokio::test]
async fn a_service_forged_as_a_predecessors_is_a_conflict() {
    with_namespace("pf-rt-forged", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let forged = json!({
            "metadata": {"name": "chat", "labels": {"promptflow.dev/runtime": "chat"},
                         "ownerReferences": [{"apiVersion": "promptflow.dev/v0", "kind": "PromptFlowRuntime",
                                              "name": "chat", "uid": "00000000-0000-0000-0000-000000000001",
                                              "controller": true}]},
            "spec": {"ports": [{"port": 80}]}
        });
        create(&ns.api::<k8s_openapi::api::core::v1::Service>(), forged).await;
        create_runtime(&ns, "chat", json!({})).await;
        wait_status(&ns, "chat", "Not available", Some("ServiceConflict")).await;
        let service = ns
            .api::<k8s_openapi::api::core::v1::Service>()
            .get("chat")
            .await
            .unwrap();
        assert_eq!(
            service.metadata.owner_references.unwrap()[0].api_version,
            "promptflow.dev/v0",
            "left untouched"
        );
    })
    .await;
}
