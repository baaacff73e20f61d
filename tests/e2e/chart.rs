//! The Helm chart: its RBAC is all the operator needs (least privilege, proven by running the
//! operator as the chart's service account under the chart's admission policies, which deny that
//! account everything the operator does not make), and its catalog ConfigMap is what the operator
//! reads.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::conditions;
use promptflow_operator::api::{PromptFlowRuntime, RuntimePhase};
use serde_json::json;

use crate::harness::{self, OperatorProcess, kubectl, with_namespace};

/// Renders the chart for `namespace` with `--set` values.
async fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let chart = harness::repo_root().join("charts/promptflow-operator");
    let chart = chart.to_string_lossy().into_owned();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = tokio::process::Command::new("helm")
        .args(&args)
        .output()
        .await
        .expect("helm runs");
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The documents of `kinds` from a rendered chart, as one YAML stream.
fn documents_of(rendered: &str, kinds: &[&str]) -> String {
    rendered
        .split("\n---")
        .filter(|doc| kinds.iter().any(|kind| doc.contains(&format!("\nkind: {kind}\n"))))
        .map(|doc| format!("---{}\n", doc.trim_start_matches("---")))
        .collect()
}

async fn kubectl_stdin(args: &[&str], input: &str) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", harness::kubeconfig())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A kubeconfig in `dir` that authenticates as service account `account` of `namespace` (a token
/// from the TokenRequest API), and nothing else.
pub async fn service_account_kubeconfig(namespace: &str, account: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let (ok, token) = kubectl(&["create", "token", account, "-n", namespace, "--duration=1h"]).await;
    assert!(ok, "{token}");
    let admin = kube::config::Kubeconfig::read_from(harness::kubeconfig()).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster.server, "certificate-authority-data": cluster.certificate_authority_data}}],
        "users": [{"name": "operator", "user": {"token": token.trim()}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}]
    });
    let file = dir.join("kubeconfig");
    std::fs::write(&file, serde_json::to_string(&kubeconfig).unwrap()).unwrap();
    file
}

#[tokio::test]
async fn the_operator_runs_with_nothing_but_the_charts_rbac() {
    with_namespace("pf-chart", |ns| async move {
        let release = format!("pf{:06x}", rand::random::<u32>() & 0xffffff);
        let rendered = render(&release, &ns.name, &[&format!("watchNamespace={}", ns.name), "admissionPolicy.enabled=true", "runtimePods.networkPolicy.enabled=true"]).await;
        let rbac = documents_of(&rendered, &["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]);
        kubectl_stdin(&["apply", "-f", "-"], &rbac).await;
        // The admission policies the chart installs bind the operator's own service account.
        let policies = documents_of(&rendered, &["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]);
        assert_eq!(policies.matches("\nkind: ValidatingAdmissionPolicy\n").count(), 5, "{policies}");
        kubectl_stdin(&["apply", "-f", "-"], &policies).await;
        let account = format!("{release}-promptflow-operator");

        // The catalog the chart mounts is the catalog the operator reads.
        let catalog = documents_of(&rendered, &["ConfigMap"]);
        let config_map: ConfigMap = serde_norway::from_str(catalog.trim_start_matches("---")).unwrap();
        let dir = std::env::temp_dir().join(format!("{release}-catalog"));
        std::fs::create_dir_all(&dir).unwrap();
        let catalog_file = dir.join("instance-types.yaml");
        std::fs::write(&catalog_file, &config_map.data.unwrap()["instance-types.yaml"]).unwrap();

        let kubeconfig_file = service_account_kubeconfig(&ns.name, &account, &dir).await;

        let catalog_arg = catalog_file.to_string_lossy().into_owned();
        let operator = OperatorProcess::start(
            &kubeconfig_file,
            &[
                "--watch-namespace",
                &ns.name,
                "--catalog",
                &catalog_arg,
                "--leader-elect",
                "true",
                "--lease-namespace",
                &ns.name,
                "--runtime-network-policy=true",
                &format!("--operator-pod-labels=app.kubernetes.io/name=promptflow-operator,app.kubernetes.io/instance={release}"),
            ],
        );

        // Everything the operator touches: a pull secret through a service account, a flow.
        let auth = r#"{"auths":{"mcr.microsoft.com":{"auth":"dXNlcjpwYXNz"}}}"#;
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": auth}})).unwrap();
        ns.api::<Secret>().create(&PostParams::default(), &secret).await.unwrap();
        let puller: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "puller"}, "imagePullSecrets": [{"name": "regcred"}]})).unwrap();
        ns.api::<ServiceAccount>().create(&PostParams::default(), &puller).await.unwrap();
        let flow: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "flow"}, "data": {"flow.dag.yaml": "environment:\n  python_requirements_txt: requirements.txt\n", "requirements.txt": "requests\n"}})).unwrap();
        ns.api::<ConfigMap>().create(&PostParams::default(), &flow).await.unwrap();
        let runtime: PromptFlowRuntime = serde_json::from_value(json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime", "metadata": {"name": "chat"},
            "spec": {"identity": {"serviceAccountName": "puller"}, "flow": {"configMapName": "flow"}}
        }))
        .unwrap();
        let runtimes = ns.api::<PromptFlowRuntime>();
        runtimes.create(&PostParams::default(), &runtime).await.unwrap();
        let running = harness::wait_for(
            &runtimes,
            "chat",
            |rt: Option<&PromptFlowRuntime>| rt.and_then(|r| r.status.as_ref()).is_some_and(|s| s.phase == RuntimePhase::Running),
            Duration::from_secs(60),
        )
        .await;
        // The runtime NetworkPolicy, made under the chart's RBAC and admission policy.
        let network_policy = ns
            .api::<k8s_openapi::api::networking::v1::NetworkPolicy>()
            .get("promptflow-runtimes")
            .await
            .expect("the operator made its NetworkPolicy");
        // A change replaces the pod: delete is within the role too.
        let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
        let first = pods.get("chat-runtime").await.unwrap();
        let patch = json!({"spec": {"image": {"version": "20240222.v4"}}});
        runtimes.patch("chat", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch)).await.unwrap();
        harness::wait_deleted(&pods, "chat-runtime", &first.metadata.uid.unwrap(), Duration::from_secs(30)).await;
        harness::wait_for(&pods, "chat-runtime", conditions::is_pod_running(), Duration::from_secs(30)).await;
        // Someone switches the runtime's Service to ExternalName, with external IPs: repaired
        // under the chart's policy, their externalName and IPs cleared.
        let services = ns.api::<k8s_openapi::api::core::v1::Service>();
        let away = json!({"spec": {"type": "ExternalName", "externalName": "elsewhere.example.com", "externalIPs": ["192.0.2.7"]}});
        services.patch("chat", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(away)).await.unwrap();
        harness::wait_for(
            &services,
            "chat",
            |svc: Option<&k8s_openapi::api::core::v1::Service>| {
                svc.and_then(|s| s.spec.as_ref()).is_some_and(|spec| {
                    spec.type_.as_deref() == Some("ClusterIP")
                        && spec.cluster_ip.as_deref() == Some("None")
                        && spec.external_name.is_none()
                        && spec.external_ips.is_none()
                })
            },
            Duration::from_secs(30),
        )
        .await;
        runtimes.delete("chat", &DeleteParams::background()).await.unwrap();
        harness::wait_deleted(&runtimes, "chat", &running.metadata.uid.clone().unwrap(), Duration::from_secs(30)).await;
        // The namespace's last runtime took it along.
        let policies = ns.api::<k8s_openapi::api::networking::v1::NetworkPolicy>();
        harness::wait_deleted(&policies, "promptflow-runtimes", &network_policy.metadata.uid.unwrap(), Duration::from_secs(30)).await;
        // A compute instance's pod is made under the same rules.
        crate::instance::create_instance(&ns, "ci", json!({})).await;
        crate::instance::wait_state(&ns, "ci", promptflow_operator::api::InstanceState::Running, None).await;
        let log = operator.log_text();
        assert!(!log.to_lowercase().contains("forbidden"), "the chart's RBAC was not enough:\n{log}");

        // Least privilege: nothing beyond the namespace, no writes to what it only reads.
        let subject = format!("system:serviceaccount:{}:{account}", ns.name);
        for (verb, resource, scope) in [
            ("delete", "secrets", ns.name.as_str()),
            ("list", "secrets", ns.name.as_str()),
            ("watch", "secrets", ns.name.as_str()),
            ("create", "secrets", ns.name.as_str()),
            ("patch", "serviceaccounts", ns.name.as_str()),
            ("update", "promptflowruntimes.promptflow.dev", ns.name.as_str()),
            ("get", "secrets", "default"),
            ("list", "pods", "kube-system"),
        ] {
            let (_, answer) = kubectl(&["auth", "can-i", verb, resource, "-n", scope, "--as", &subject]).await;
            assert_eq!(answer.trim(), "no", "{subject} can {verb} {resource} in {scope}");
        }
        // Under the policies, the account's own token creates only what the operator makes.
        let as_operator = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&kubeconfig_file).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        let owner = json!([{"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime", "name": "chat",
            "uid": running.metadata.uid.clone().unwrap(), "controller": true}]);
        let labels = json!({"app.kubernetes.io/managed-by": "promptflow-operator"});
        let restricted = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
        let pod = |metadata: serde_json::Value, security: serde_json::Value| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "c", "image": "busybox", "securityContext": security}]}})
        };
        let as_operator_client = as_operator.clone();
        let pods_as_operator: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(as_operator.clone(), &ns.name);
        let services_as_operator: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::namespaced(as_operator, &ns.name);
        let mut privileged = restricted.clone();
        privileged["privileged"] = json!(true);
        privileged["allowPrivilegeEscalation"] = json!(true);
        let unlabelled = pod(json!({"name": "unlabelled", "ownerReferences": owner}), restricted.clone());
        let root = pod(json!({"name": "root", "labels": labels, "ownerReferences": owner}), restricted.clone());
        let mut root = root;
        root["spec"]["securityContext"] = json!({"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}});
        let mut host = pod(json!({"name": "host", "labels": labels, "ownerReferences": owner}), restricted.clone());
        host["spec"]["hostNetwork"] = json!(true);
        host["spec"]["volumes"] = json!([{"name": "root", "hostPath": {"path": "/"}}]);
        let mut token = pod(json!({"name": "token", "labels": labels, "ownerReferences": owner}), restricted.clone());
        token["spec"]["automountServiceAccountToken"] = json!(true);
        token["spec"]["serviceAccountName"] = json!("default");
        let mut two_owners = owner.clone();
        two_owners.as_array_mut().unwrap().push(json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "kube-root-ca.crt", "uid": "0"}));
        let two_owners = pod(json!({"name": "two-owners", "labels": labels, "ownerReferences": two_owners}), restricted.clone());
        let mut capable = restricted.clone();
        capable["capabilities"]["add"] = json!(["SYS_ADMIN"]);
        let capable = pod(json!({"name": "capable", "labels": labels, "ownerReferences": owner}), capable);
        let dry = PostParams { dry_run: true, ..Default::default() };
        for (object, expected) in [
            (token, "without a service account token"),
            (two_owners, "their only owner"),
            (capable, "Pod Security"),
            (pod(json!({"name": "privileged", "labels": labels, "ownerReferences": owner}), privileged), "may not create privileged containers"),
            (unlabelled, "labelled app.kubernetes.io/managed-by=promptflow-operator"),
            (root, "run as non-root"),
            (host, "host's network"),
        ] {
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            let denied = pods_as_operator.create(&dry, &serde_json::from_value(object).unwrap()).await;
            let message = format!("{denied:?}");
            assert!(
                matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("ValidatingAdmissionPolicy") && e.message.contains(expected)),
                "pod {name}: {message}"
            );
        }
        let service = |metadata: serde_json::Value| {
            serde_json::from_value::<k8s_openapi::api::core::v1::Service>(json!({"metadata": metadata,
                "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}})).unwrap()
        };
        let denied = services_as_operator.create(&dry, &service(json!({"name": "db", "labels": labels}))).await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("whose controller is a PromptFlowRuntime or ComputeInstance")),
            "a Service without an owner: {denied:?}"
        );
        let mut exposed = service(json!({"name": "db", "labels": labels, "ownerReferences": owner}));
        exposed.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
        exposed.spec.as_mut().unwrap().cluster_ip = None;
        let denied = services_as_operator.create(&dry, &exposed).await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("headless ClusterIP")),
            "a LoadBalancer: {denied:?}"
        );
        // Someone else's pod cannot be made the operator's by an update, nor deleted.
        let theirs = crate::runtime::create(
            &ns.api::<k8s_openapi::api::core::v1::Pod>(),
            json!({"metadata": {"name": "theirs"}, "spec": {"containers": [{"name": "app", "image": "busybox"}]}}),
        )
        .await;
        let hijack = json!({"metadata": {"labels": labels, "ownerReferences": owner}});
        let denied = pods_as_operator
            .patch("theirs", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(hijack))
            .await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("already were the operator's")),
            "{denied:?}"
        );
        let denied = pods_as_operator.delete("theirs", &kube::api::DeleteParams::default()).await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("may only delete what the operator made")),
            "{denied:?}"
        );
        assert_eq!(ns.api::<k8s_openapi::api::core::v1::Pod>().get("theirs").await.unwrap().metadata.uid, theirs.metadata.uid);
        // The runtime NetworkPolicy the operator made under the policy; no other is allowed.
        let network_policies: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
            kube::Api::namespaced(as_operator_client.clone(), &ns.name);
        let open_all = serde_json::from_value(json!({"metadata": {"name": "allow-everything", "labels": labels},
            "spec": {"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingress"]}}))
        .unwrap();
        let denied = network_policies.create(&dry, &open_all).await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("may only create or update the NetworkPolicy promptflow-runtimes")),
            "{denied:?}"
        );
        // A user's claim cannot be given an owner (the garbage collector would delete it with
        // an object that does not exist); the operator's own disk claim is admitted.
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        let claim_spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}});
        crate::runtime::create(
            &ns.api::<PersistentVolumeClaim>(),
            json!({"metadata": {"name": "data"}, "spec": claim_spec}),
        )
        .await;
        let claims: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(as_operator_client.clone(), &ns.name);
        let orphaning = json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
            "name": "gone", "uid": "00000000-0000-0000-0000-000000000000"}]}});
        let denied = claims
            .patch("data", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(orphaning))
            .await;
        assert!(
            matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("PersistentVolumeClaim")),
            "{denied:?}"
        );
        let disk = json!({"metadata": {"name": "ci-home", "labels": {"app.kubernetes.io/managed-by": "promptflow-operator",
            "promptflow.dev/compute-instance": "ci"}}, "spec": claim_spec});
        claims
            .create(&dry, &serde_json::from_value(disk).unwrap())
            .await
            .expect("the operator's disk claim is admitted");
        // What the operator makes passes the same checks.
        let allowed = pod(json!({"name": "allowed", "labels": labels, "ownerReferences": owner}), restricted);
        pods_as_operator.create(&dry, &serde_json::from_value(allowed).unwrap()).await.expect("a restricted pod of the operator's is admitted");
        services_as_operator
            .create(&dry, &service(json!({"name": "db", "labels": labels, "ownerReferences": owner})))
            .await
            .expect("a Service of the operator's is admitted");
        let cluster_scoped = ["ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];
        kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], &documents_of(&rendered, &cluster_scoped)).await;
        std::fs::remove_dir_all(&dir).ok();
    })
    .await;
}

#[tokio::test]
async fn the_chart_renders_a_cluster_wide_install_with_a_hardened_deployment() {
    let rendered = render("pf", "pf-system", &[]).await;
    assert!(rendered.contains("kind: ClusterRole\n"), "{rendered}");
    // The only namespaced Role is the leader-election one, in the release namespace.
    assert_eq!(rendered.matches("\nkind: Role\n").count(), 1, "{rendered}");
    assert!(rendered.contains("resources: [leases]"), "{rendered}");
    for expected in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "--catalog=/etc/promptflow-operator/instance-types.yaml",
        "path: /readyz",
        "Standard_E4ds_v4",
    ] {
        assert!(rendered.contains(expected), "the rendered chart lacks {expected:?}");
    }
    assert!(
        rendered.contains("--lease-name=pf-promptflow-operator"),
        "one Lease per installation"
    );
    assert!(rendered.contains("type: RollingUpdate"), "{rendered}");
    let chart = harness::repo_root().join("charts/promptflow-operator");
    let refused = tokio::process::Command::new("helm")
        .args([
            "template",
            "pf",
            &chart.to_string_lossy(),
            "--set",
            "replicas=2",
            "--set",
            "leaderElection.enabled=false",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        !refused.status.success(),
        "two replicas without leader election must not render"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs leaderElection.enabled"));
    let custom = render(
        "pf",
        "pf-system",
        &[
            "catalog.instanceTypes[0].name=Tiny",
            "catalog.instanceTypes[0].cpu=1",
            "catalog.instanceTypes[0].memory=1Gi",
        ],
    )
    .await;
    assert!(
        custom.contains("name: Tiny") && !custom.contains("Standard_E4ds_v4"),
        "a catalog value replaces the shipped one"
    );
}

#[tokio::test]
async fn every_operator_flag_has_a_chart_value_that_reaches_the_deployment() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_promptflow-operator"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .filter_map(|rest| rest.split([' ', ',', '=']).next())
        .filter(|flag| !["help", "version", "check"].contains(flag))
        .collect();
    assert!(flags.len() >= 20, "{flags:?}");
    // The optional ones set, so that every flag is rendered.
    let rendered = render(
        "pf",
        "pf-system",
        &[
            "watchNamespace=team-a",
            "versions.caBundle=PEM",
            "versions.insecureRegistries[0]=registry.local:5000",
            "flowRequirements.indexUrl=https://pypi.internal/simple",
            "flowRequirements.extraIndexUrls[0]=https://more.internal/simple",
            "flowRequirements.trustedHosts[0]=pypi.internal",
        ],
    )
    .await;
    let deployment = documents_of(&rendered, &["Deployment"]);
    for flag in flags {
        // The Lease's namespace is the pod's own, through the environment.
        let shown = if flag == "lease-namespace" {
            deployment.contains("name: POD_NAMESPACE")
        } else {
            deployment.contains(&format!("--{flag}="))
        };
        assert!(shown, "--{flag} has no value in the chart's Deployment");
    }
}
