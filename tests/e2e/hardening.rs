//! What a user meets when things go wrong around a serverless runtime: pods the API server
//! refuses, containers that crash, changes that cannot be applied while the runtime serves,
//! operator upgrades, features not built yet — each with the reason and message a user reads.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::wait::conditions;
use promptflow_operator::api::{PromptFlowRuntime, RuntimePhase};
use serde_json::json;

use crate::harness::{self, OperatorProcess, with_namespace};
use crate::runtime::{create, create_runtime, events_for, runtime_pods, wait_condition, wait_status};

const WAIT: Duration = Duration::from_secs(60);

fn simulated(image: &str) -> serde_json::Value {
    json!({"image": {"repository": format!("registry.invalid/simulate/{image}"), "version": "1"}})
}

#[tokio::test]
async fn a_pod_the_api_server_refuses_is_pod_rejected_at_once() {
    with_namespace("pf-hard-rejected", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        // Valid quantities, but requests above the size's limits: only pod validation knows.
        let spec = json!({"compute": {"serverless": {"resources": {"requests": {"cpu": "64"}}}}});
        create_runtime(&ns, "greedy", spec).await;
        let rejected = wait_status(&ns, "greedy", "Not available", Some("PodRejected")).await;
        let message = rejected.status.unwrap().message.unwrap();
        assert!(
            message.contains("greedy-runtime") && message.contains("cpu"),
            "{message}"
        );
        assert!(runtime_pods(&ns, "greedy").await.is_empty());
        // The refusal is not retried: one pod write was attempted, whatever else happens.
        let warnings = events_for(&ns, "greedy")
            .await
            .into_iter()
            .filter(|e| e.1 == "PodRejected")
            .count();
        assert_eq!(warnings, 1, "{}", operator.log_text());

        // Fixing the spec recovers it.
        ns.api::<PromptFlowRuntime>()
            .patch(
                "greedy",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"compute": {"serverless": {"resources": null}}}})),
            )
            .await
            .unwrap();
        wait_status(&ns, "greedy", "Running", None).await;
    })
    .await;
}

#[tokio::test]
async fn crashing_containers_show_the_kubelets_reason_and_last_exit() {
    with_namespace("pf-hard-crash", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "crash", simulated("crashloop")).await;
        create_runtime(&ns, "oom", simulated("oomkilled")).await;
        create_runtime(&ns, "config", simulated("configerror")).await;

        let crash = wait_status(&ns, "crash", "Not available", Some("CrashLoopBackOff")).await;
        let message = crash.status.unwrap().message.unwrap();
        assert!(
            message.contains("exit code 1")
                && message.contains("ModuleNotFoundError")
                && message.contains("--previous"),
            "{message}"
        );
        let oom = wait_status(&ns, "oom", "Not available", Some("OOMKilled")).await;
        let message = oom.status.unwrap().message.unwrap();
        assert!(
            message.contains("exit code 137") && message.contains("limits.memory"),
            "{message}"
        );
        let config = wait_status(&ns, "config", "Not available", Some("CreateContainerConfigError")).await;
        assert!(config.status.unwrap().message.unwrap().contains("chat-api-key"));
        for name in ["crash", "oom", "config"] {
            let warnings: Vec<_> = events_for(&ns, name)
                .await
                .into_iter()
                .filter(|e| e.0 == "Warning")
                .collect();
            assert_eq!(warnings.len(), 1, "one Warning per problem for {name}: {warnings:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_pod_being_deleted_reads_as_such_and_is_replaced_when_gone() {
    with_namespace("pf-hard-terminating", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "chat", json!({})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let pods = ns.api::<Pod>();
        // A finalizer holds the pod in Terminating, as a slow kubelet or a stuck volume would.
        let hold = json!({"metadata": {"finalizers": ["e2e.promptflow.dev/hold"]}});
        pods.patch("chat-runtime", &PatchParams::default(), &Patch::Merge(hold))
            .await
            .unwrap();
        let first = pods.get("chat-runtime").await.unwrap();
        pods.delete("chat-runtime", &DeleteParams::default()).await.unwrap();
        let terminating = wait_status(&ns, "chat", "Not available", Some("PodTerminating")).await;
        assert!(terminating.status.unwrap().message.unwrap().contains("being deleted"));
        pods.patch(
            "chat-runtime",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
        harness::wait_deleted(&pods, "chat-runtime", &first.uid().unwrap(), WAIT).await;
        wait_status(&ns, "chat", "Running", Some("PodReady")).await;
    })
    .await;
}

#[tokio::test]
async fn a_serving_runtime_stays_running_when_its_service_account_goes() {
    with_namespace("pf-hard-serving", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "puller"}})).await;
        create_runtime(&ns, "chat", json!({"identity": {"serviceAccountName": "puller"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let pod = runtime_pods(&ns, "chat").await.remove(0);

        ns.api::<ServiceAccount>()
            .delete("puller", &DeleteParams::default())
            .await
            .unwrap();
        let blocked = wait_condition(&ns, "chat", "SpecApplied", "False", "ServiceAccountNotFound").await;
        let status = blocked.status.unwrap();
        assert_eq!(status.phase, RuntimePhase::Running);
        assert_eq!(status.reason.as_deref(), Some("PodReady"));
        let identity = status
            .conditions
            .iter()
            .find(|c| c.type_ == "IdentityResolved")
            .unwrap();
        assert_eq!(
            (identity.status.as_str(), identity.reason.as_str()),
            ("False", "ServiceAccountNotFound")
        );
        assert_eq!(
            runtime_pods(&ns, "chat").await[0].uid(),
            pod.uid(),
            "the serving pod is kept"
        );
        // The event follows the status write: wait for it, then make sure it is the only one.
        let mut warnings = vec![];
        for _ in 0..40 {
            warnings = events_for(&ns, "chat")
                .await
                .into_iter()
                .filter(|e| e.0 == "Warning")
                .collect();
            if !warnings.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again: Vec<_> = events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.0 == "Warning")
            .collect();
        assert_eq!((warnings.len(), again.len()), (1, 1), "{again:?}");
        assert!(
            warnings[0].2.contains("keeps serving") && warnings[0].2.contains("puller"),
            "{warnings:?}"
        );

        // The account comes back: the condition clears, with the same pod.
        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "puller"}})).await;
        wait_condition(&ns, "chat", "SpecApplied", "True", "SpecApplied").await;
        assert_eq!(runtime_pods(&ns, "chat").await[0].uid(), pod.uid());
    })
    .await;
}

#[tokio::test]
async fn an_operator_side_change_keeps_running_pods_until_a_restart_is_asked_for() {
    with_namespace("pf-hard-template", |ns| async move {
        let mut operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--runtime-startup-seconds", "600"],
        );
        create_runtime(&ns, "chat", json!({})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let first = runtime_pods(&ns, "chat").await.remove(0);
        let startup = first.spec.as_ref().unwrap().containers[0]
            .startup_probe
            .clone()
            .expect("a startup probe");
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            600
        );
        wait_condition(&ns, "chat", "TemplateCurrent", "True", "TemplateCurrent").await;
        assert!(operator.stop(Duration::from_secs(10)).await);

        // The operator comes back with a different template (a flag), as after an upgrade.
        let _upgraded = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--runtime-startup-seconds", "900"],
        );
        let changed = wait_condition(&ns, "chat", "TemplateCurrent", "False", "OperatorTemplateChanged").await;
        assert_eq!(changed.status.as_ref().unwrap().phase, RuntimePhase::Running);
        assert_eq!(
            runtime_pods(&ns, "chat").await[0].uid(),
            first.uid(),
            "no restart for an operator-side change"
        );

        // The user asks for it: the pod is replaced once and takes the new template.
        let api = ns.api::<PromptFlowRuntime>();
        api.patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"promptflow.dev/restart": "1"}}})),
        )
        .await
        .unwrap();
        let pods = ns.api::<Pod>();
        harness::wait_deleted(&pods, "chat-runtime", &first.uid().unwrap(), WAIT).await;
        let restarted = wait_condition(&ns, "chat", "TemplateCurrent", "True", "TemplateCurrent").await;
        let status = restarted.status.unwrap();
        assert_eq!(status.handled_actions.unwrap().restart.as_deref(), Some("1"));
        let second = harness::wait_for(&pods, "chat-runtime", conditions::is_pod_running(), WAIT).await;
        let startup = second.spec.as_ref().unwrap().containers[0]
            .startup_probe
            .clone()
            .unwrap();
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            900
        );
        wait_status(&ns, "chat", "Running", None).await;
        let restarts = events_for(&ns, "chat")
            .await
            .into_iter()
            .filter(|e| e.1 == "PodRestarted")
            .count();
        assert_eq!(restarts, 1);
        assert_eq!(
            runtime_pods(&ns, "chat").await[0].uid(),
            second.uid(),
            "replaced exactly once"
        );
    })
    .await;
}

#[tokio::test]
async fn requirements_keep_the_images_pythonpath() {
    with_namespace("pf-hard-pythonpath", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let dag = "environment:\n  python_requirements_txt: requirements.txt\n";
        create(
            &ns.api::<k8s_openapi::api::core::v1::ConfigMap>(),
            json!({"metadata": {"name": "flow"}, "data": {"flow.dag.yaml": dag, "requirements.txt": "requests\n"}}),
        )
        .await;
        create_runtime(&ns, "chat", json!({"flow": {"configMapName": "flow"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let pod = runtime_pods(&ns, "chat").await.remove(0);
        let env = pod.spec.as_ref().unwrap().containers[0].env.clone().unwrap_or_default();
        assert!(
            env.iter().all(|e| e.name != "PYTHONPATH"),
            "the runtime's PYTHONPATH is the image's: {env:?}"
        );
        let user_base = env
            .iter()
            .find(|e| e.name == "PYTHONUSERBASE")
            .and_then(|e| e.value.clone())
            .expect("PYTHONUSERBASE");

        // What Python does with that environment: the image's PYTHONPATH entry and the user
        // site-packages the init container installs into are both on sys.path.
        let root = std::env::temp_dir().join(format!("pf-userbase-{:08x}", rand::random::<u32>()));
        let base = root.join(user_base.trim_start_matches('/'));
        let site = std::process::Command::new("python3")
            .args(["-c", "import site; print(site.getusersitepackages())"])
            .env("PYTHONUSERBASE", &base)
            .output()
            .unwrap();
        let site = String::from_utf8(site.stdout).unwrap().trim().to_owned();
        std::fs::create_dir_all(&site).unwrap();
        let path = std::process::Command::new("python3")
            .args(["-c", "import sys; print('\\n'.join(sys.path))"])
            .env("PYTHONUSERBASE", &base)
            .env("PYTHONPATH", "/image/lib")
            .env_remove("PYTHONNOUSERSITE")
            .output()
            .unwrap();
        let path = String::from_utf8(path.stdout).unwrap();
        std::fs::remove_dir_all(&root).ok();
        assert!(path.lines().any(|l| l == "/image/lib"), "{path}");
        assert!(path.lines().any(|l| l == site), "{path}");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_registry_is_reported_and_the_runtime_runs_unpinned() {
    with_namespace("pf-hard-noreg", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        // The default repository's registry is out of reach from this machine.
        create_runtime(&ns, "chat", json!({})).await;
        let chat = wait_condition(&ns, "chat", "UpdateAvailable", "Unknown", "RegistryUnavailable").await;
        let status = chat.status.unwrap();
        let message = &status
            .conditions
            .iter()
            .find(|c| c.type_ == "UpdateAvailable")
            .unwrap()
            .message;
        assert!(message.contains("keeps running latest"), "{message}");
        let chat = wait_status(&ns, "chat", "Running", None).await;
        assert_eq!(chat.status.unwrap().version.as_deref(), Some("latest"));
    })
    .await;
}

#[tokio::test]
async fn no_secret_reaches_the_log_even_at_trace_level() {
    with_namespace("pf-hard-secret-log", |ns| async move {
        use base64::Engine as _;
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let operator = OperatorProcess::start_logging(&harness::kubeconfig(), &["--watch-namespace", &ns.name], "trace");
        let marker = format!("pf-marker-{:08x}", rand::random::<u32>());
        let config = json!({"auths": {"mcr.microsoft.com": {"username": marker, "password": marker, "auth": b64(&format!("{marker}:{marker}"))}}}).to_string();
        let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
        create(&secrets, json!({"metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": config}})).await;
        create(&secrets, json!({"metadata": {"name": "opaque"}, "type": "Opaque", "stringData": {"token": marker}})).await;
        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "good"}, "imagePullSecrets": [{"name": "regcred"}]})).await;
        create(&ns.api::<ServiceAccount>(), json!({"metadata": {"name": "bad"}, "imagePullSecrets": [{"name": "opaque"}]})).await;
        create_runtime(&ns, "good", json!({"identity": {"serviceAccountName": "good"}})).await;
        create_runtime(&ns, "bad", json!({"identity": {"serviceAccountName": "bad"}})).await;
        wait_status(&ns, "good", "Running", None).await;
        wait_status(&ns, "bad", "Not available", Some("PullSecretInvalid")).await;

        let log = operator.log_text();
        assert!(log.contains("TRACE") && log.contains("/secrets/regcred"), "the log is at trace level and saw the secret reads");
        for needle in [marker.clone(), b64(&marker), b64(&format!("{marker}:{marker}")), b64(&config)] {
            assert!(!log.contains(&needle), "secret material {needle:?} reached the operator's log");
        }
    })
    .await;
}

#[tokio::test]
async fn a_long_message_in_japanese_still_reaches_the_events() {
    with_namespace("pf-hard-notes", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        // 400 characters, 1,200 bytes: under the old 1,000-character cut, over the API's 1 KiB.
        let image = "画像".repeat(200);
        let dag = format!("environment:\n  image: \"{image}\"\ninputs: {{}}\noutputs: {{}}\nnodes: []\n");
        crate::runtime::create(
            &ns.api::<k8s_openapi::api::core::v1::ConfigMap>(),
            serde_json::json!({"metadata": {"name": "flow"}, "data": {"flow.dag.yaml": dag}}),
        )
        .await;
        create_runtime(&ns, "chat", serde_json::json!({"flow": {"configMapName": "flow"}})).await;
        wait_status(&ns, "chat", "Not available", Some("FlowInvalid")).await;
        crate::events::wait_reason(&ns, "PromptFlowRuntime", "chat", "FlowInvalid").await;
        let events = crate::events::events_about(&ns, "PromptFlowRuntime", "chat").await;
        let note = events
            .iter()
            .find(|e| e.reason.as_deref() == Some("FlowInvalid"))
            .and_then(|e| e.note.clone())
            .unwrap();
        println!("events: a {}-byte FlowInvalid note reached the API", note.len());
        assert!(
            note.len() <= 1024 && note.ends_with('…') && note.contains("画像"),
            "{note}"
        );
    })
    .await;
}
