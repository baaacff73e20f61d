//! Runtime versions against the local registry (TLS from the cluster CA, htpasswd): pinning by
//! digest at first start, check-version and update, credentials, an unreachable registry, and one
//! registry request per interval for many runtimes on one repository.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use promptflow_operator::api::PromptFlowRuntime;
use serde_json::json;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::registry::{LocalRegistry, base64_encode};
use crate::runtime::{create_runtime, events_for, runtime_pods, wait_condition, wait_status};

/// The operator for the namespace, trusting the cluster CA for the registry.
pub fn operator(ns: &TestNamespace, registry: &LocalRegistry) -> OperatorProcess {
    OperatorProcess::start(
        &harness::kubeconfig(),
        &["--watch-namespace", &ns.name, "--registry-ca-file", &registry.ca_file],
    )
}

/// Waits until runtime `name` is Running at `version`; returns it.
async fn running_at(ns: &TestNamespace, name: &str, version: &str) -> PromptFlowRuntime {
    harness::wait_for(
        &ns.api::<PromptFlowRuntime>(),
        name,
        |rt: Option<&PromptFlowRuntime>| {
            rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                s.version.as_deref() == Some(version) && s.phase == promptflow_operator::api::RuntimePhase::Running
            })
        },
        Duration::from_secs(60),
    )
    .await
}

pub fn spec(repository: &str) -> serde_json::Value {
    json!({"image": {"repository": repository}, "identity": {"serviceAccountName": "puller"}})
}

async fn annotate(ns: &TestNamespace, name: &str, key: &str, value: &str) {
    ns.api::<PromptFlowRuntime>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap();
}

fn count(events: &[(String, String, String)], reason: &str) -> usize {
    events.iter().filter(|(_, r, _)| r == reason).count()
}

#[tokio::test]
async fn pins_the_newest_allowed_version_by_digest_then_checks_and_updates_on_request() {
    with_namespace("pf-ver-pin", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = operator(&ns, &registry);
        registry.identity(&ns, &registry.password).await;
        // A repository of this test's own, so pushing a newer tag touches no other test.
        let repository = format!("{}/team/{}", registry.host, ns.name);
        for tag in ["20240101.v1", "20240501.v2", "20241214.v1", "latest"] {
            registry.push(&repository, tag).await;
        }
        let own = LocalRegistry {
            repository: repository.clone(),
            ..LocalRegistry::read()
        };
        create_runtime(&ns, "chat", spec(&repository)).await;
        let chat = wait_condition(&ns, "chat", "UpdateAvailable", "False", "UpToDate").await;
        let status = chat.status.unwrap();
        // The denied 20241214.v1 is newer but skipped.
        let digest = own.digest("20240501.v2").await;
        assert_eq!(status.version.as_deref(), Some("20240501.v2"));
        assert_eq!(status.latest_version.as_deref(), Some("20240501.v2"));
        let pinned = format!("{repository}:20240501.v2@{digest}");
        assert_eq!(status.image.as_deref(), Some(pinned.as_str()));
        wait_status(&ns, "chat", "Running", None).await;
        let pods = runtime_pods(&ns, "chat").await;
        assert_eq!(
            pods[0].spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some(pinned.as_str())
        );
        let first_pod = pods[0].uid().unwrap();

        // A newer version appears; the button checks at once.
        registry.push(&repository, "20240601.v1").await;
        annotate(&ns, "chat", "promptflow.dev/check-version", "1").await;
        let checked = wait_condition(&ns, "chat", "UpdateAvailable", "True", "NewerVersionAvailable").await;
        let status = checked.status.unwrap();
        assert_eq!(status.latest_version.as_deref(), Some("20240601.v1"));
        assert_eq!(
            status.version.as_deref(),
            Some("20240501.v2"),
            "no update without the button"
        );
        assert_eq!(
            status.handled_actions.as_ref().and_then(|h| h.check_version.as_deref()),
            Some("1")
        );
        assert_eq!(runtime_pods(&ns, "chat").await[0].uid().unwrap(), first_pod);

        // The update button moves it, with exactly one new pod on the new digest.
        annotate(&ns, "chat", "promptflow.dev/update", "1").await;
        let new_digest = own.digest("20240601.v1").await;
        let updated = format!("{repository}:20240601.v1@{new_digest}");
        running_at(&ns, "chat", "20240601.v1").await;
        let pods: Vec<Pod> = runtime_pods(&ns, "chat").await;
        assert_eq!(pods.len(), 1);
        assert_ne!(pods[0].uid().unwrap(), first_pod);
        assert_eq!(
            pods[0].spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some(updated.as_str())
        );
        let events = events_for(&ns, "chat").await;
        assert_eq!(count(&events, "NewerVersionAvailable"), 1, "{events:?}");
        assert_eq!(count(&events, "Updating"), 1, "{events:?}");
        assert_eq!(count(&events, "PodReplaced"), 1, "{events:?}");
    })
    .await;
}

#[tokio::test]
async fn wrong_credentials_and_an_unreachable_registry_never_keep_a_runtime_from_running() {
    with_namespace("pf-ver-fault", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = operator(&ns, &registry);
        registry.identity(&ns, "not-the-password").await;
        create_runtime(&ns, "locked", spec(&registry.repository)).await;
        let locked = wait_condition(&ns, "locked", "UpdateAvailable", "Unknown", "Unauthorized").await;
        let message = &locked
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "UpdateAvailable")
            .unwrap()
            .message;
        assert!(!message.contains("not-the-password"), "{message}");
        let locked = wait_status(&ns, "locked", "Running", None).await;
        assert_eq!(locked.status.unwrap().version.as_deref(), Some("latest"), "unpinned");

        // Nothing listens on port 1.
        create_runtime(
            &ns,
            "away",
            json!({"image": {"repository": "127.0.0.1:1/team/runtime"}}),
        )
        .await;
        wait_condition(&ns, "away", "UpdateAvailable", "Unknown", "RegistryUnavailable").await;
        wait_status(&ns, "away", "Running", None).await;

        // The right password: the next check (failures are retried after 30 s) pins nothing
        // (the runtime keeps its image) but reports the versions.
        let auth = base64_encode(&format!("{}:{}", registry.username, registry.password));
        let config = json!({"auths": {registry.host.clone(): {"auth": auth}}}).to_string();
        ns.api::<Secret>()
            .patch(
                "regcred",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {".dockerconfigjson": config}})),
            )
            .await
            .unwrap();
        harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "locked",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "UpdateAvailable" && c.reason == "NewerVersionAvailable")
                })
            },
            Duration::from_secs(90),
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn many_runtimes_on_one_repository_cost_one_registry_request_per_interval() {
    with_namespace("pf-ver-many", |ns| async move {
        const RUNTIMES: usize = 200;
        let registry = LocalRegistry::read();
        let operator = operator(&ns, &registry);
        registry.identity(&ns, &registry.password).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        for tag in ["20240101.v1", "20240501.v2"] {
            registry.push(&repository, tag).await;
        }
        let api = ns.api::<PromptFlowRuntime>();
        // Small requests, so 200 pods fit the kwok nodes beside the other tests.
        let mut small = spec(&repository);
        small["compute"] = json!({"serverless": {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}});
        for i in 0..RUNTIMES {
            create_runtime(&ns, &format!("rt-{i:03}"), small.clone()).await;
        }
        harness::wait_all_running(&api, RUNTIMES, Duration::from_secs(180)).await;
        let metrics = operator.metrics().await;
        let requests = |kind: &str| -> u64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("promptflow_operator_registry_requests_total") && l.contains(&format!("kind=\"{kind}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        // The registry's own access log: successful requests for this test's repository that
        // were not skopeo's pushes.
        let path = format!("/v2/team/{}/", ns.name);
        let log = std::fs::read_to_string(harness::cluster_dir().join("logs/registry.log")).unwrap_or_default();
        let served = |what: &str| {
            log.lines()
                .filter(|l| l.contains(&path) && l.contains(what) && !l.contains("skopeo") && l.contains("\" 200 "))
                .count()
        };
        let (listings, manifests) = (served("/tags/list"), served("/manifests/"));
        eprintln!(
            "{RUNTIMES} runtimes on one repository: the operator sent {} tag listings and {} manifest requests; the registry served {listings} and {manifests}",
            requests("tags"),
            requests("manifest")
        );
        assert_eq!((requests("tags"), requests("manifest")), (1, 1), "{metrics}");
        assert_eq!((listings, manifests), (1, 1), "the registry's access log");
        for runtime in api.list(&Default::default()).await.unwrap() {
            assert_eq!(runtime.status.unwrap().version.as_deref(), Some("20240501.v2"));
        }
    })
    .await;
}

#[tokio::test]
async fn an_automatic_runtime_moves_to_a_newer_version_by_itself() {
    with_namespace("pf-ver-auto", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = operator(&ns, &registry);
        registry.identity(&ns, &registry.password).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        registry.push(&repository, "20240101.v1").await;
        let mut auto = spec(&repository);
        auto["updatePolicy"] = json!("Automatic");
        create_runtime(&ns, "auto", auto).await;
        wait_condition(&ns, "auto", "UpdateAvailable", "False", "UpToDate").await;
        let first_pod = runtime_pods(&ns, "auto").await[0].uid().unwrap();

        registry.push(&repository, "20240102.v1").await;
        // The next check finds it (the button makes the check happen now instead of in an hour).
        annotate(&ns, "auto", "promptflow.dev/check-version", "1").await;
        let moved = running_at(&ns, "auto", "20240102.v1").await;
        let status = moved.status.unwrap();
        assert!(
            status
                .handled_actions
                .as_ref()
                .and_then(|h| h.update.as_deref())
                .is_none(),
            "no update button was pressed"
        );
        let pods = runtime_pods(&ns, "auto").await;
        assert_eq!(pods.len(), 1);
        assert_ne!(pods[0].uid().unwrap(), first_pod);
    })
    .await;
}

/// An update whose pod the API server refuses (here a LimitRange added after the first pod): the
/// pod from before keeps serving, the status names what it runs, and the update stays asked for,
/// done once what refused it is gone.
#[tokio::test]
async fn an_update_the_api_server_refuses_stays_asked_for_until_it_can_run() {
    use k8s_openapi::api::core::v1::LimitRange;
    with_namespace("pf-ver-refused", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = operator(&ns, &registry);
        registry.identity(&ns, &registry.password).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        registry.push(&repository, "20240101.v1").await;
        create_runtime(&ns, "chat", spec(&repository)).await;
        running_at(&ns, "chat", "20240101.v1").await;
        let serving = runtime_pods(&ns, "chat").await[0].clone();

        registry.push(&repository, "20240301.v1").await;
        let limits = json!({"metadata": {"name": "tiny"}, "spec": {"limits": [{"type": "Container", "max": {"memory": "1Mi"}}]}});
        crate::runtime::create(&ns.api::<LimitRange>(), limits).await;
        annotate(&ns, "chat", "promptflow.dev/update", "1").await;
        let refused = wait_condition(&ns, "chat", "SpecApplied", "False", "PodRejected").await;
        let status = refused.status.unwrap();
        assert_eq!(status.version.as_deref(), Some("20240101.v1"), "the status names what runs");
        assert_eq!(
            status.image,
            serving.spec.as_ref().unwrap().containers[0].image,
            "the status names what runs"
        );
        assert_ne!(
            status.handled_actions.as_ref().and_then(|h| h.update.as_deref()),
            Some("1"),
            "an update not done is not handled"
        );
        assert_eq!(count(&events_for(&ns, "chat").await, "Updating"), 0);

        // What refused it goes: the update is done (a refused pod is tried again every 60 s).
        ns.api::<LimitRange>().delete("tiny", &Default::default()).await.unwrap();
        harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "chat",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                    s.version.as_deref() == Some("20240301.v1")
                        && s.phase == promptflow_operator::api::RuntimePhase::Running
                        && s.handled_actions.as_ref().and_then(|h| h.update.as_deref()) == Some("1")
                })
            },
            Duration::from_secs(100),
        )
        .await;
    })
    .await;
}

/// A settled runtime remembers its account's pull secrets, but not for longer than a version
/// interval: a deleted secret is reported within it, even while another account with the same
/// login keeps the registry's answer fresh.
#[tokio::test]
async fn a_deleted_pull_secret_is_reported_within_a_version_interval() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    with_namespace("pf-ver-forget", |ns| async move {
        let registry = LocalRegistry::read();
        let _operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &[
                "--watch-namespace",
                &ns.name,
                "--registry-ca-file",
                &registry.ca_file,
                "--version-check-interval",
                "20s",
            ],
        );
        registry.identity(&ns, &registry.password).await;
        // A second account with a copy of the same login.
        let mut copy = ns.api::<Secret>().get("regcred").await.unwrap();
        copy.metadata = kube::api::ObjectMeta {
            name: Some("regcred2".into()),
            ..Default::default()
        };
        ns.api::<Secret>().create(&Default::default(), &copy).await.unwrap();
        let second = json!({"metadata": {"name": "puller2"}, "imagePullSecrets": [{"name": "regcred2"}]});
        crate::runtime::create(&ns.api::<ServiceAccount>(), second).await;
        let repository = format!("{}/team/{}", registry.host, ns.name);
        registry.push(&repository, "20240101.v1").await;
        create_runtime(&ns, "a", spec(&repository)).await;
        let mut other = spec(&repository);
        other["identity"]["serviceAccountName"] = json!("puller2");
        create_runtime(&ns, "b", other).await;
        running_at(&ns, "a", "20240101.v1").await;
        running_at(&ns, "b", "20240101.v1").await;

        ns.api::<Secret>().delete("regcred", &Default::default()).await.unwrap();
        let deleted = std::time::Instant::now();
        let pressing = async {
            for i in 0.. {
                annotate(&ns, "b", "promptflow.dev/check-version", &i.to_string()).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        };
        let reported = wait_condition(&ns, "a", "IdentityResolved", "False", "PullSecretNotFound");
        let runtime = tokio::select! {
            runtime = reported => runtime,
            () = pressing => unreachable!(),
        };
        println!(
            "a deleted pull secret reported after {:.1}s (interval 20s)",
            deleted.elapsed().as_secs_f64()
        );
        assert_eq!(
            runtime.status.unwrap().phase,
            promptflow_operator::api::RuntimePhase::Running,
            "the pod from before keeps serving"
        );
    })
    .await;
}
