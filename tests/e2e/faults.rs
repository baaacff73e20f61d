//! Faults of the control plane under a running operator: kube-apiserver and etcd are killed with
//! SIGKILL and started again with their original command lines. These tests disturb every other
//! test, so `make e2e` runs them on their own, one at a time, after the rest of the suite.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::PostParams;
use promptflow_operator::api::{PromptFlowRuntime, RuntimePhase};

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};

/// How long after the API server is ready again the operator must have acted on a new runtime
/// (its pod created and its status written).
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// How much later than a bare pod created at the same moment the runtime may reach Running. The
/// bare pod measures the cluster's own recovery: the scheduler and kwok (the fake kubelet) come
/// back on their own client-go backoffs, which the operator cannot shorten.
const BEHIND_THE_CLUSTER: Duration = Duration::from_secs(5);

/// Creates `object`, retrying while the client reconnects after a restart.
async fn create_after_restart<K>(api: &kube::Api<K>, object: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return,
            Err(kube::Error::Api(status)) if status.code == 409 => return,
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot create: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// When the runtime, its pod and the bare pod reached their milestones, from `since`.
#[derive(Debug, Default)]
struct Milestones {
    runtime_pod_created: Option<Duration>,
    runtime_running: Option<Duration>,
    bare_pod_running: Option<Duration>,
}

/// Follows the runtime `after` and the bare pod `bare` until both are Running.
async fn follow(ns: &TestNamespace, since: tokio::time::Instant, operator: &OperatorProcess) -> Milestones {
    let runtimes = ns.api::<PromptFlowRuntime>();
    let pods = ns.api::<Pod>();
    let deadline = since + Duration::from_secs(120);
    let mut seen = Milestones::default();
    let running = |pod: &Pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    while seen.runtime_running.is_none() || seen.bare_pod_running.is_none() {
        if seen.runtime_pod_created.is_none() && pods.get_opt("after-runtime").await.ok().flatten().is_some() {
            seen.runtime_pod_created = Some(since.elapsed());
        }
        if seen.runtime_running.is_none()
            && let Ok(runtime) = runtimes.get("after").await
            && runtime
                .status
                .as_ref()
                .is_some_and(|s| s.phase == RuntimePhase::Running)
        {
            seen.runtime_running = Some(since.elapsed());
        }
        if seen.bare_pod_running.is_none() && pods.get_opt("bare").await.ok().flatten().is_some_and(|p| running(&p)) {
            seen.bare_pod_running = Some(since.elapsed());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not Running 120 s after the restart ({seen:?}); operator log:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

async fn survives_a_restart_of(component: &'static str, prefix: &'static str) {
    with_namespace(prefix, |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let api = ns.api::<PromptFlowRuntime>();
        harness::create_runtimes(&api, "before", 5).await;
        harness::wait_all_running(&api, 5, Duration::from_secs(60)).await;

        let Some(restarted) = harness::restart_component(component, Duration::from_secs(15)).await else {
            eprintln!("skipped: the suite does not run against the local cluster");
            return;
        };
        create_after_restart(&api, serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "after"}, "spec": {}
        }))
        .await;
        create_after_restart(&ns.api::<Pod>(), serde_json::json!({
            "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "main", "image": "registry.invalid/bare:1"}]}
        }))
        .await;
        let seen = follow(&ns, restarted.ready_at, &operator).await;
        println!("{component} restart, from the API server ready again: {seen:?}");
        let created = seen.runtime_pod_created.expect("the pod was created");
        assert!(
            created <= RECOVERY_BOUND,
            "the operator created the runtime's pod only {created:?} after the API server was ready (bound {RECOVERY_BOUND:?}); operator log:\n{}",
            operator.log_text()
        );
        let (runtime, bare) = (seen.runtime_running.unwrap(), seen.bare_pod_running.unwrap());
        assert!(
            runtime <= RECOVERY_BOUND.max(bare + BEHIND_THE_CLUSTER),
            "the runtime was Running at {runtime:?}, the bare pod at {bare:?}; operator log:\n{}",
            operator.log_text()
        );
        // Nothing is lost or doubled, and every runtime's status follows its pod. (The pods made
        // before the fault may stay not Ready: a kwok node whose lease lapsed during the outage
        // is marked NotReady, its pods with it, and kwok does not always make them Ready again;
        // the operator cannot change that, and must report it.)
        statuses_follow_pods(&ns, 6).await;
    })
    .await;
}

#[tokio::test]
async fn after_an_api_server_restart_a_new_runtime_is_acted_on_within_15s() {
    survives_a_restart_of("kube-apiserver", "pf-fault-apiserver").await;
}

#[tokio::test]
async fn after_an_etcd_restart_a_new_runtime_is_acted_on_within_15s() {
    survives_a_restart_of("etcd", "pf-fault-etcd").await;
}

/// While the API server is gone the operator reports it: not ready after the readiness bound,
/// not live after the liveness bound; both recover once its watches deliver again.
#[tokio::test]
async fn health_endpoints_turn_false_while_watches_fail_and_recover() {
    with_namespace("pf-fault-health", |ns| async move {
        let operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &[
                "--watch-namespace",
                &ns.name,
                "--unready-after-watch-failure",
                "3",
                "--unhealthy-after-watch-failure",
                "8",
            ],
        );
        let address = operator.admin_address().await;
        wait_body(&address, "/readyz", "ok", Duration::from_secs(30)).await;

        let pid_file = harness::cluster_dir().join("pids/kube-apiserver.pid");
        if !pid_file.exists() {
            eprintln!("skipped: the suite does not run against the local cluster");
            return;
        }
        // Down for 20 s: both bounds pass while it is gone; the probes are read meanwhile.
        let watcher = {
            let address = address.clone();
            tokio::spawn(async move {
                let mut seen = (false, false);
                let until = tokio::time::Instant::now() + Duration::from_secs(19);
                while tokio::time::Instant::now() < until {
                    seen.0 |= harness::http_get(&address, "/readyz").await != "ok";
                    seen.1 |= harness::http_get(&address, "/healthz").await != "ok";
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                seen
            })
        };
        harness::restart_component("kube-apiserver", Duration::from_secs(20))
            .await
            .expect("restart");
        let (unready, unhealthy) = watcher.await.unwrap();
        assert!(
            unready,
            "/readyz stayed ok while every watch failed:\n{}",
            operator.log_text()
        );
        assert!(
            unhealthy,
            "/healthz stayed ok past the liveness bound:\n{}",
            operator.log_text()
        );
        wait_body(&address, "/readyz", "ok", Duration::from_secs(30)).await;
        wait_body(&address, "/healthz", "ok", Duration::from_secs(30)).await;
    })
    .await;
}

async fn wait_body(address: &str, path: &str, body: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = harness::http_get(address, path).await;
        if got == body {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} answered {got:?}, not {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 30 s) until the namespace has `count` runtimes, each with exactly one pod, and
/// each `Running` exactly when its pod is Ready.
async fn statuses_follow_pods(ns: &harness::TestNamespace, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runtimes = ns
            .api::<PromptFlowRuntime>()
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        let pods = ns.api::<Pod>().list(&Default::default()).await.unwrap().items;
        let mut mismatches = vec![];
        for runtime in &runtimes {
            let name = runtime.metadata.name.clone().unwrap_or_default();
            let own: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.labels().get("promptflow.dev/runtime") == Some(&name))
                .collect();
            let ready = own.len() == 1 && pod_ready(own[0]);
            let phase_running = runtime
                .status
                .as_ref()
                .is_some_and(|s| s.phase == RuntimePhase::Running);
            if own.len() != 1 || ready != phase_running {
                mismatches.push(format!(
                    "{name}: {} pods, ready {ready}, Running {phase_running}",
                    own.len()
                ));
            }
        }
        if runtimes.len() == count && mismatches.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} runtimes (want {count}); mismatches: {mismatches:?}",
            runtimes.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A TCP forwarder to the API server that can cut every connection and refuse new ones, so the
/// operator's watches are away while the test changes the cluster behind its back.
struct Cuttable {
    address: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn to(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, watching) = tokio::sync::watch::channel(false);
        let accepting = tokio::spawn(async move {
            loop {
                let mut inbound = match listener.accept().await {
                    Ok((inbound, _)) => inbound,
                    Err(err) => {
                        eprintln!("the test's API server forwarder stopped: {err}");
                        return;
                    }
                };
                if *watching.borrow() {
                    continue; // refused: dropped at once
                }
                let mut watching = watching.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watching.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self {
            address,
            cut,
            accepting,
        }
    }

    /// Closes every connection and refuses new ones (`true`), or lets them through again.
    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.set_cut(true);
        self.accepting.abort();
    }
}

/// The test cluster's kubeconfig, and its API server's address (host:port).
fn cluster_kubeconfig() -> (kube::config::Kubeconfig, String) {
    let config = kube::config::Kubeconfig::read_from(harness::kubeconfig()).unwrap();
    let server = config.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("a server");
    let upstream = server.trim_start_matches("https://").trim_end_matches('/').to_owned();
    (config, upstream)
}

/// A kubeconfig file readable only by this user (it holds the admin's key), removed when dropped.
struct KubeconfigFile(std::path::PathBuf);

impl KubeconfigFile {
    /// `config` with its server reached through `proxy`.
    fn through(mut config: kube::config::Kubeconfig, proxy: &Cuttable) -> Self {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        config.clusters[0].cluster.as_mut().expect("a cluster").server = Some(format!("https://{}", proxy.address));
        let path = std::env::temp_dir().join(format!("pf-relist-{:08x}.kubeconfig", rand::random::<u32>()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        // JSON is YAML: kube reads it as a kubeconfig.
        file.write_all(&serde_json::to_vec(&config).unwrap()).unwrap();
        Self(path)
    }
}

impl Drop for KubeconfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until the runtime `name` is Running, reading it again and again (the API server may
/// still be warming its caches after a restart; a failed read is tried again).
async fn running_after_restart(
    runtimes: &kube::Api<PromptFlowRuntime>,
    name: &str,
    timeout: Duration,
) -> PromptFlowRuntime {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(runtime)) = runtimes.get_opt(name).await
            && runtime
                .status
                .as_ref()
                .is_some_and(|s| s.phase == RuntimePhase::Running)
        {
            return runtime;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not Running {timeout:?} after the watches were back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator's count of runtimes in its dependency index.
async fn indexed(operator: &OperatorProcess) -> i64 {
    let metrics = operator.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("promptflow_operator_memory_entries{map=\"dependency_index\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dependency_index gauge in\n{metrics}"))
}

/// Changes made while the operator's watches were away, found by a fresh list when the API server
/// no longer holds the versions the watches would resume from (410 Expired): a service account a
/// runtime waited for appeared (the runtime starts), a runtime was deleted (the operator forgets
/// it), and one was deleted and made again under its name (the new one gets its own pod).
#[tokio::test]
async fn changes_made_while_the_watches_were_away_are_found_by_the_relist() {
    with_namespace("pf-fault-relist", |ns| async move {
        if !harness::cluster_dir().join("pids/kube-apiserver.pid").exists() {
            eprintln!("skipped: the suite does not run against the local cluster");
            return;
        }
        let (config, upstream) = cluster_kubeconfig();
        let proxy = Cuttable::to(upstream).await;
        let kubeconfig = KubeconfigFile::through(config, &proxy);
        let operator = OperatorProcess::start(&kubeconfig.0, &["--watch-namespace", &ns.name]);
        let runtimes = ns.api::<PromptFlowRuntime>();
        let create = |name: &'static str, spec: serde_json::Value| {
            let runtimes = runtimes.clone();
            async move {
                let runtime: PromptFlowRuntime = serde_json::from_value(serde_json::json!({
                    "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
                    "metadata": {"name": name}, "spec": spec
                }))
                .unwrap();
                runtimes.create(&PostParams::default(), &runtime).await.unwrap()
            }
        };
        create("waits", serde_json::json!({"identity": {"serviceAccountName": "later"}})).await;
        create("gone", serde_json::json!({})).await;
        let again_before = create("again", serde_json::json!({})).await;
        let is = |phase: RuntimePhase, reason: Option<&'static str>| {
            move |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref())
                    .is_some_and(|s| s.phase == phase && reason.is_none_or(|r| s.reason.as_deref() == Some(r)))
            }
        };
        let wait = Duration::from_secs(60);
        harness::wait_for(&runtimes, "waits", is(RuntimePhase::NotAvailable, Some("ServiceAccountNotFound")), wait).await;
        harness::wait_for(&runtimes, "gone", is(RuntimePhase::Running, None), wait).await;
        harness::wait_for(&runtimes, "again", is(RuntimePhase::Running, None), wait).await;
        let before = indexed(&operator).await;
        assert_eq!(before, 3, "every runtime records what it read");

        // The watches go away; the cluster changes; the API server restarts, so the versions the
        // watches would resume from are gone from its watch cache.
        proxy.set_cut(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let accounts = ns.api::<k8s_openapi::api::core::v1::ServiceAccount>();
        accounts
            .create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "later"}})).unwrap())
            .await
            .unwrap();
        runtimes.delete("gone", &Default::default()).await.unwrap();
        runtimes.delete("again", &Default::default()).await.unwrap();
        harness::wait_deleted(&runtimes, "again", again_before.metadata.uid.as_deref().unwrap(), wait).await;
        // The old runtime's pod and Service are collected (by the garbage collector) before the
        // new one exists, so the new one is not held up by them.
        let old_uid = again_before.metadata.uid.clone().unwrap();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let owned_by_old = |meta: &kube::api::ObjectMeta| meta.owner_references.iter().flatten().any(|o| o.uid == old_uid);
            let pods = ns.api::<Pod>().list(&Default::default()).await.unwrap().items;
            let services = ns.api::<k8s_openapi::api::core::v1::Service>().list(&Default::default()).await.unwrap().items;
            if !pods.iter().any(|p| owned_by_old(&p.metadata)) && !services.iter().any(|s| owned_by_old(&s.metadata)) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the deleted runtime's pod and Service stayed");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let again_after = create("again", serde_json::json!({})).await;
        harness::restart_component("kube-apiserver", Duration::from_secs(2))
            .await
            .expect("restart");
        let found_at = tokio::time::Instant::now();
        let log_before = operator.log_text().len();
        proxy.set_cut(false);

        // The scheduler and kwok reconnect on their own backoffs (up to about 30 s).
        let waits = running_after_restart(&runtimes, "waits", Duration::from_secs(120)).await;
        let again = running_after_restart(&runtimes, "again", Duration::from_secs(120)).await;
        let took = found_at.elapsed();
        assert_eq!(again.metadata.uid, again_after.metadata.uid);
        let pods = ns.api::<Pod>().list(&Default::default()).await.unwrap().items;
        let owned_by_new = pods.iter().any(|pod| {
            pod.labels().get("promptflow.dev/runtime").map(String::as_str) == Some("again")
                && pod.owner_references().iter().any(|o| Some(&o.uid) == again_after.metadata.uid.as_ref())
        });
        assert!(owned_by_new, "the runtime made again has no pod of its own: {pods:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while indexed(&operator).await != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator still records the deleted runtime: {} indexed; log:\n{}",
                indexed(&operator).await,
                operator.log_text()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The watches were refused as too old and listed again: what the test saw came from
        // relists, not from resumed watches. (The relists of runtimes and of service accounts
        // race, and the runtime relist alone queues every runtime: that `waits` starts does not
        // show which one woke it; the unit tests of `triggers` do.)
        let log = operator.log_text();
        let after = &log[log_before.min(log.len())..];
        for watch in ["runtimes", "service accounts"] {
            assert!(
                after.lines().any(|l| l.contains("watch failed; retrying")
                    && l.contains(&format!("\"{watch}\""))
                    && l.contains("too old resource version")),
                "the {watch} watch was not refused as too old: the relist was not exercised; log since the reconnect:\n{after}"
            );
        }
        println!(
            "relist: {} and the runtime made again Running {:.1}s after the watches could reach the API server again",
            waits.metadata.name.as_deref().unwrap_or_default(),
            took.as_secs_f64()
        );
    })
    .await;
}

/// kube-scheduler stopped: the operator creates no more pods than its launch window lets wait for
/// the scheduler (a pod labelled like the operator's that never gets placed counts for nothing),
/// a running runtime that loses its pod meanwhile gets its next at once (a return, not a launch),
/// every waiting one says why once the scheduler has placed nothing for 30 s, and all start once
/// it is back.
#[tokio::test]
async fn a_stopped_scheduler_holds_launches_at_the_window_and_the_waiting_runtimes_say_why() {
    with_namespace("pf-fault-scheduler", |ns| async move {
        let operator = OperatorProcess::start(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name, "--launch-window", "2"],
        );
        let api = ns.api::<PromptFlowRuntime>();
        let pods = ns.api::<Pod>();
        harness::create_runtimes(&api, "first", 1).await;
        harness::wait_all_running(&api, 1, Duration::from_secs(60)).await;
        // A tenant's pod with the operator's labels, for a scheduler that does not exist.
        let forged: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "forged-runtime", "labels": {
                "app.kubernetes.io/managed-by": "promptflow-operator",
                "app.kubernetes.io/name": "promptflow-runtime",
                "promptflow.dev/runtime": "forged"}},
            "spec": {"schedulerName": "nobody", "containers": [{"name": "main", "image": "registry.invalid/x:1"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &forged).await.unwrap();
        let down = Duration::from_secs(50);
        let restart = tokio::spawn(harness::restart_component("kube-scheduler", down));
        // restart_component kills the scheduler first (or finds no local cluster and returns).
        tokio::time::sleep(Duration::from_secs(2)).await;
        if restart.is_finished() {
            eprintln!("skipped: the suite does not run against the local cluster");
            return;
        }
        let created = tokio::time::Instant::now();
        harness::create_runtimes(&api, "rt", 5).await;
        let queued = |runtime: &PromptFlowRuntime, says: &str| {
            runtime.status.as_ref().is_some_and(|s| {
                s.reason.as_deref() == Some("LaunchQueued") && s.message.as_deref().is_some_and(|m| m.contains(says))
            })
        };
        // Looked at while the scheduler is away; asserted once it is back (a failed assertion
        // must not leave the cluster without a scheduler).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let lost = pods
            .delete("first-0000-runtime", &kube::api::DeleteParams::default().grace_period(0))
            .await
            .is_ok();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let first_back = pods.get_opt("first-0000-runtime").await.unwrap().is_some();
        let deadline = created + Duration::from_secs(45);
        let (stalled, said) = loop {
            let runtimes = api.list(&Default::default()).await.unwrap().items;
            let stalled: Vec<String> = runtimes
                .iter()
                .filter(|r| queued(r, "kube-scheduler has placed none"))
                .map(|r| r.name_any())
                .collect();
            if stalled.len() >= 3 || tokio::time::Instant::now() >= deadline {
                break (stalled, created.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let made: Vec<String> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|p| p.name_any())
            .filter(|name| name.starts_with("rt-"))
            .collect();
        let restarted = restart.await.unwrap().expect("kube-scheduler restarted");
        assert!(lost, "first-0000's pod could not be deleted");
        assert!(
            first_back,
            "a running runtime that lost its pod while the window was full has no new pod 3 s later"
        );
        assert_eq!(
            stalled.len(),
            3,
            "runtimes saying the scheduler placed nothing {said:?} after their creation (the 3 beyond the window): {stalled:?}; operator log:\n{}",
            operator.log_text()
        );
        assert_eq!(made.len(), 2, "pods created while the scheduler was away: {made:?}");
        harness::wait_all_running(&api, 6, Duration::from_secs(120)).await;
        println!(
            "scheduler stopped: 2 pods for it (the window; a forged waiting pod not counted), a running runtime that lost its pod got its next at once, the 3 waiting said the scheduler placed nothing {:.1}s after their creation; all 6 Running {:.1}s after the scheduler was back",
            said.as_secs_f64(),
            restarted.ready_at.elapsed().as_secs_f64()
        );
    })
    .await;
}
