//! The e2e harness: a client for the test cluster, a namespace per test with diagnostics on
//! failure, waiting with timeouts, applying YAML files, and the operator binary as a process.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Api, Client, Resource, ResourceExt};
use promptflow_operator::api::{ComputeInstance, PromptFlowRuntime};
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use tokio::process::{Child, Command};

/// The field manager the tests apply with.
pub const MANAGER: &str = "pf-e2e";

/// The repository root (where `config/` and `tests/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The kubeconfig of the test cluster: `$KUBECONFIG`, else the local cluster's.
pub fn kubeconfig() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cluster/kubeconfig"))
}

/// A client for the test cluster.
pub async fn client() -> Client {
    let options = kube::config::KubeConfigOptions::default();
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()).expect("read the test cluster's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

/// Installs the generated CRDs (server-side apply; idempotent) and waits until they are Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in promptflow_operator::crd::all() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .expect("apply CRD");
        wait_for(&crds, &name, conditions::is_crd_established(), Duration::from_secs(30)).await;
    }
}

/// Waits until `condition` holds for the named object, or panics after `timeout`.
pub async fn wait_for<K>(api: &Api<K>, name: &str, condition: impl Condition<K>, timeout: Duration) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name} was deleted while waiting"),
        Ok(Err(err)) => panic!("watching {name} failed: {err}"),
        Err(_) => {
            // What it looked like at the end says why (its status, conditions, annotations).
            let last = api.get_opt(name).await.ok().flatten();
            panic!("timed out after {timeout:?} waiting for {name}; last seen: {last:#?}")
        }
    }
}

/// Waits until the named object no longer exists, or panics after `timeout`.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let gone = conditions::is_deleted(uid);
    tokio::time::timeout(timeout, await_condition(api.clone(), name, gone))
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {name} to be deleted"))
        .expect("watch");
}

/// A namespace of one test's own.
pub struct TestNamespace {
    /// The client the test uses.
    pub client: Client,
    /// The namespace's name.
    pub name: String,
}

impl TestNamespace {
    /// A namespaced API for the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

/// Runs `test` in a fresh namespace. On failure, dumps the namespace's objects and events; the
/// namespace is deleted afterwards unless `PF_E2E_KEEP=1`.
pub async fn with_namespace<F, Fut>(prefix: &str, test: F)
where
    F: FnOnce(TestNamespace) -> Fut,
    Fut: Future<Output = ()>,
{
    let client = client().await;
    install_crds(&client).await;
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"promptflow.dev/e2e": "true"}}
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create test namespace");

    let outcome = std::panic::AssertUnwindSafe(test(TestNamespace {
        client: client.clone(),
        name: name.clone(),
    }))
    .catch_unwind()
    .await;
    if outcome.is_err() {
        dump_namespace(&client, &name).await;
    }
    if std::env::var("PF_E2E_KEEP").as_deref() != Ok("1") {
        let _ = namespaces.delete(&name, &DeleteParams::background()).await;
        release_finalizers(&client, &name).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The test's operator has stopped by now, so nothing removes the `promptflow.dev/detach`
/// finalizer of runtimes on compute instances: remove it as a user who uninstalled the operator
/// would (README, Troubleshooting), or the namespace stays Terminating and its leftovers load the
/// cluster for every later test.
async fn release_finalizers(client: &Client, namespace: &str) {
    let runtimes: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = runtimes.list(&ListParams::default()).await else {
        return;
    };
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    for runtime in list.items.iter().filter(|r| !r.finalizers().is_empty()) {
        let _ = runtimes
            .patch(&runtime.name_any(), &PatchParams::default(), &Patch::Merge(&release))
            .await;
    }
}

/// Prints the namespace's runtimes, instances, pods and events, for a failed test's output.
async fn dump_namespace(client: &Client, namespace: &str) {
    eprintln!("==== diagnostics for namespace {namespace} ====");
    dump::<PromptFlowRuntime>(client, namespace).await;
    dump::<ComputeInstance>(client, namespace).await;
    dump::<Pod>(client, namespace).await;
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    if let Ok(list) = events.list(&ListParams::default()).await {
        for event in list {
            eprintln!(
                "event {} {}: {} {}",
                event.involved_object.name.unwrap_or_default(),
                event.type_.unwrap_or_default(),
                event.reason.unwrap_or_default(),
                event.message.unwrap_or_default()
            );
        }
    }
}

async fn dump<K>(client: &Client, namespace: &str)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    if let Ok(list) = api.list(&ListParams::default()).await {
        for mut object in list {
            object.meta_mut().managed_fields = None;
            eprintln!("---\n{}", serde_norway::to_string(&object).unwrap_or_default());
        }
    }
}

/// Creates `count` serverless runtimes `<prefix>-0000`… with an empty spec.
pub async fn create_runtimes(api: &Api<PromptFlowRuntime>, prefix: &str, count: usize) {
    for i in 0..count {
        let runtime: PromptFlowRuntime = serde_json::from_value(serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": format!("{prefix}-{i:04}")}, "spec": {}
        }))
        .unwrap();
        api.create(&PostParams::default(), &runtime).await.unwrap();
    }
}

/// Waits until `count` runtimes of the namespace are Running; panics after `timeout`.
pub async fn wait_all_running(api: &Api<PromptFlowRuntime>, count: usize, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let running = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|rt| {
                rt.status
                    .as_ref()
                    .is_some_and(|s| s.phase == promptflow_operator::api::RuntimePhase::Running)
            })
            .count();
        if running == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{running} of {count} runtimes Running after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses a multi-document YAML file into objects.
pub fn read_manifests(path: &Path) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .filter_map(|document| {
            let value = serde_json::Value::deserialize(document).expect("valid YAML");
            (!value.is_null()).then(|| serde_json::from_value(value).expect("a Kubernetes object"))
        })
        .collect()
}
/// Server-side applies `object` into `namespace` (dry run when `dry_run`), with strict field
/// validation as `kubectl apply` uses. Returns the API server's error, if any.
pub async fn apply(client: &Client, namespace: &str, object: &DynamicObject, dry_run: bool) -> Result<(), kube::Error> {
    let types = object.types.as_ref().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("valid apiVersion");
    let (resource, _) = pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let mut params = PatchParams::apply(MANAGER).validation_strict().force();
    if dry_run {
        params = params.dry_run();
    }
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
        .map(|_| ())
}

/// Retries kubectl until it succeeds or `timeout` passes (discovery and OpenAPI lag a new CRD
/// by a moment); returns the last outcome.
pub async fn kubectl_eventually(timeout: Duration, args: &[&str]) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let outcome = kubectl(args).await;
        if outcome.0 || tokio::time::Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs kubectl against the test cluster; returns (success, stdout + stderr).
pub async fn kubectl(args: &[&str]) -> (bool, String) {
    let output = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .await
        .expect("kubectl runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The operator binary, run as a separate process with its log in a file.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator against `kubeconfig` with extra arguments; its admin server listens on
    /// a free loopback port.
    pub fn start(kubeconfig: &Path, args: &[&str]) -> Self {
        let filter = std::env::var("PF_E2E_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into());
        Self::start_logging(kubeconfig, args, &filter)
    }

    /// Starts the operator with `RUST_LOG` set to `filter`.
    pub fn start_logging(kubeconfig: &Path, args: &[&str], filter: &str) -> Self {
        let log = std::env::temp_dir().join(format!("pf-operator-{:08x}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).expect("operator log file");
        let child = Command::new(env!("CARGO_BIN_EXE_promptflow-operator"))
            .args(["--admin-address", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start the operator binary");
        Self { child, log }
    }

    /// Starts the operator limited to one test namespace, so parallel tests do not share runtimes.
    pub fn for_namespace(namespace: &str) -> Self {
        Self::start(&kubeconfig(), &["--watch-namespace", namespace])
    }

    /// Waits for the process to exit by itself; returns its exit code, or panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> i32 {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait").code().unwrap_or(-1),
            Err(_) => panic!("operator did not exit within {timeout:?}; log:\n{}", self.log_text()),
        }
    }

    /// Stops the operator: SIGTERM, then SIGKILL after `grace`. Returns whether it exited in time.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return true;
            }
        }
        let _ = self.child.kill().await;
        false
    }

    /// The process id, while it runs (the bench reads its memory and CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the operator with SIGKILL, as a crash would.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The admin server's address, read from the operator's log.
    pub async fn admin_address(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("admin server listening")) {
                // Text logs say `address=…`; JSON logs `"address":"…"`.
                let address = line
                    .split("address=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .or_else(|| {
                        line.split("\"address\":\"")
                            .nth(1)
                            .and_then(|rest| rest.split('"').next())
                    });
                return address.expect("address in the admin log line").to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator did not start its admin server:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator's Prometheus metrics.
    pub async fn metrics(&self) -> String {
        http_get(&self.admin_address().await, "/metrics").await
    }

    /// Waits until `/readyz` answers ok (the caches are filled).
    pub async fn wait_ready(&self) {
        let address = self.admin_address().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while http_get(&address, "/readyz").await != "ok" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every runtime in `names` has at least `times` "reconciled" log lines that
    /// contain `needle`, counting from byte `from` of the log: a reconcile is logged after its
    /// writes, so its writes are done when its line is there.
    pub async fn wait_reconciled(&self, from: usize, names: &[String], needle: &str, times: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let log = self.log_text();
            let tail = log.get(from..).unwrap_or_default();
            let behind: Vec<&String> = names
                .iter()
                .filter(|name| {
                    let marker = format!("reconciled name={name} ");
                    tail.lines()
                        .filter(|l| l.contains(&marker) && l.contains(needle))
                        .count()
                        < times
                })
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} runtimes (first {}) not reconciled {times}x with {needle:?} after {timeout:?}",
                behind.len(),
                behind[0]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator's API requests so far of `kind` (`read` or `write`) on `resource` (`secrets`,
    /// `services`, …).
    pub async fn requests(&self, kind: &str, resource: &str) -> u64 {
        let series = format!("promptflow_operator_kube_requests_total{{kind=\"{kind}\",resource=\"{resource}\"}} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    /// The operator's API writes so far, events included.
    pub async fn writes_including_events(&self) -> u64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("promptflow_operator_kube_requests_total{kind=\"write\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The exit code, when the process has exited by itself.
    pub fn try_exit_code(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.code().unwrap_or(-1))
    }

    /// Everything the operator logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A plain HTTP/1.0 GET on loopback; returns the body.
pub async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the admin server");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("==== operator log tail ====");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        if std::env::var("PF_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!("operator log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The local cluster's state directory (`make cluster-up` writes it; `PF_CLUSTER_DIR` moves it).
/// `KEY=value` lines of a file the cluster scripts wrote under `.cluster/` (quotes trimmed).
pub fn cluster_env(file: &str) -> std::collections::BTreeMap<String, String> {
    let path = cluster_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing (make cluster-up writes registry.env, make image image.env)",
            path.display()
        )
    });
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

pub fn cluster_dir() -> PathBuf {
    std::env::var_os("PF_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cluster"))
}

/// A control-plane component of the local cluster killed and started again, as a crash and a
/// supervisor's restart would do it.
pub struct Restarted {
    /// When the API server answered `/readyz` again.
    pub ready_at: tokio::time::Instant,
}

/// Kills `component` (a name of `.cluster/pids/`, e.g. `kube-apiserver` or `etcd`) with SIGKILL,
/// leaves it down for `down`, starts it again with its original command line in a session of its
/// own, records the new PID in its PID file (so `make cluster-down` still stops it) and waits
/// until it is healthy. Returns `None` when the suite does not run against the local cluster.
pub async fn restart_component(component: &str, down: Duration) -> Option<Restarted> {
    let pid_file = cluster_dir().join("pids").join(format!("{component}.pid"));
    let old: u32 = std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{old}/cmdline")).expect("the component runs");
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{old}/cwd")).expect("the component's working directory");
    let status = Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -9 {component} ({old})");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie (a component an earlier test restarted is this process's child).
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    while alive(old) {
        assert!(tokio::time::Instant::now() < deadline, "{component} did not die");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(down).await;

    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(cluster_dir().join("logs").join(format!("{component}.log")))
        .expect("the component's log");
    // std's Command: the restarted component must outlive this test process.
    #[allow(clippy::zombie_processes)]
    let child = std::process::Command::new("setsid")
        .args(&argv)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the component again");
    let pid = child.id();
    std::fs::write(&pid_file, format!("{pid}\n")).expect("record the new PID");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if kubectl(&["get", "--raw", "/readyz"]).await.0 {
            return Some(Restarted {
                ready_at: tokio::time::Instant::now(),
            });
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API server did not become ready after restarting {component}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plain HTTP/1.0 POST of a JSON body on loopback; returns the status line's code and the body.
pub async fn http_post_json(address: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (code, body)
}
