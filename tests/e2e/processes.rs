//! Processes that play a runtime pod's containers on a kwok node (which runs none): the
//! operator binary's activity proxy, and a real prompt flow server behind it; and a stand-in for
//! the kubelet that starts them for every runtime pod of a namespace, fresh for each new pod.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::harness::{TestNamespace, http_get, repo_root};

/// Plays the kubelet for the serverless runtime pods of one namespace: every pod that gets an IP
/// has its containers started as processes on that IP — a fresh activity proxy, and `pf flow
/// serve` of the runtime's flow folder when one is given — and when the pod is deleted or
/// replaced its processes stop before another pod's start (kwok hands IPs on). Looks every
/// 200 ms.
pub struct Kubelet {
    task: JoinHandle<()>,
}

impl Kubelet {
    /// Starts playing for `ns`; `flows` maps runtime names to the flow folders their pods serve.
    pub fn start(ns: &TestNamespace, flows: BTreeMap<String, PathBuf>) -> Self {
        Self::start_except(ns, flows, &[])
    }

    /// As [`Kubelet::start`], but the pods of the runtimes in `silent` get no processes (as if
    /// their proxy container could not start).
    pub fn start_except(ns: &TestNamespace, flows: BTreeMap<String, PathBuf>, silent: &[&str]) -> Self {
        let silent: Vec<String> = silent.iter().map(|s| (*s).to_owned()).collect();
        let pods: Api<Pod> = ns.api();
        let task = tokio::spawn(async move {
            // Per pod uid: what stops its processes.
            let mut running: HashMap<String, (oneshot::Sender<()>, JoinHandle<()>)> = HashMap::new();
            let selector = ListParams::default().labels("promptflow.dev/runtime");
            loop {
                let listed = pods.list(&selector).await.map(|l| l.items).unwrap_or_default();
                let live: HashMap<String, &Pod> = listed
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| Some((p.uid()?, p)))
                    .collect();
                let gone: Vec<String> = running.keys().filter(|uid| !live.contains_key(*uid)).cloned().collect();
                for uid in gone {
                    let (stop, task) = running.remove(&uid).expect("listed");
                    let _ = stop.send(());
                    let _ = task.await;
                }
                for (uid, pod) in live {
                    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                    let (Some(ip), false) = (ip, running.contains_key(&uid)) else {
                        continue;
                    };
                    if silent.contains(&pod.labels()["promptflow.dev/runtime"]) {
                        continue;
                    }
                    let flow = flows.get(&pod.labels()["promptflow.dev/runtime"]).cloned();
                    let (stop, stopped) = oneshot::channel::<()>();
                    let task = tokio::spawn(async move {
                        let mut processes = PodProcesses::proxy(&ip).await;
                        if let Some(flow) = flow {
                            processes = processes.with_flow(&ip, &flow).await;
                        }
                        let _ = stopped.await;
                        processes.stop().await;
                    });
                    running.insert(uid, (stop, task));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { task }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Aborting drops every pod's task, and with it its processes (killed on drop).
        self.task.abort();
    }
}

/// What plays a runtime pod's containers on a kwok node: a real activity proxy (the operator
/// binary's subcommand) on the pod IP, and optionally a real prompt flow server behind it.
pub struct PodProcesses {
    children: Vec<Child>,
}

impl PodProcesses {
    /// Starts the activity proxy on `ip` (8081 traffic, 8082 activity) in front of `ip:8080`.
    pub async fn proxy(ip: &str) -> Self {
        Self::proxy_on(ip, 8080).await
    }

    /// Starts the activity proxy of the runtime listening on `ip:runtime_port`: traffic on the
    /// next port, activity on the one after (a compute instance slot's ports, or a serverless
    /// pod's 8080–8082).
    pub async fn proxy_on(ip: &str, runtime_port: u16) -> Self {
        let (listen, activity) = (
            format!("{ip}:{}", runtime_port + 1),
            format!("{ip}:{}", runtime_port + 2),
        );
        wait_free(&[listen.clone(), activity.clone()]).await;
        let child = Command::new(env!("CARGO_BIN_EXE_promptflow-operator"))
            .args([
                "activity-proxy",
                &format!("--listen={listen}"),
                &format!("--upstream={ip}:{runtime_port}"),
                &format!("--activity-listen={activity}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the activity proxy");
        let mut processes = Self { children: vec![child] };
        wait_answers(&activity, "/healthz", Duration::from_secs(10)).await;
        processes.assert_running(ip);
        processes
    }

    /// Also serves the flow in `flow_dir` with `pf flow serve` on `ip:8080`.
    pub async fn with_flow(mut self, ip: &str, flow_dir: &Path) -> Self {
        wait_free(&[format!("{ip}:8080")]).await;
        let venv = promptflow_venv();
        let child = Command::new(venv.join("bin/pf"))
            .args(["flow", "serve", "--source"])
            .arg(flow_dir)
            .args(["--host", ip, "--port", "8080", "--skip-open-browser"])
            .env("PF_HOME", venv.join("pf-home"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pf flow serve");
        self.children.push(child);
        wait_answers(&format!("{ip}:8080"), "/health", Duration::from_secs(60)).await;
        self.assert_running(ip);
        self
    }

    /// Panics when a process exited: it could not bind the pod IP, because a process of another
    /// pod that had the IP before (kwok reuses them) still holds it — what answered was not ours.
    fn assert_running(&mut self, ip: &str) {
        for child in &mut self.children {
            assert!(
                matches!(child.try_wait(), Ok(None)),
                "a process for pod IP {ip} exited at once: another pod's process still holds that IP"
            );
        }
    }

    /// Stops everything (as a node losing the pod would).
    pub async fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

/// Waits until nothing listens on `addresses`: a process another stand-in started for a pod
/// that had this IP before (kwok hands IPs on at once) may hold them for a moment after that pod
/// is gone; starting ours meanwhile would fail to bind while the old one answers for it.
async fn wait_free(addresses: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for address in addresses {
        while let Err(err) = std::net::TcpListener::bind(address.as_str()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{address} stayed taken by another process for 20s: {err}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn wait_answers(address: &str, path: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(address).await.is_ok() && !http_get(address, path).await.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{address}{path} did not answer within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cached promptflow-devkit virtual environment (`hack/promptflow-venv.sh` makes it).
pub fn promptflow_venv() -> PathBuf {
    if let Some(venv) = std::env::var_os("PF_PROMPTFLOW_VENV") {
        return PathBuf::from(venv);
    }
    let output = std::process::Command::new(repo_root().join("hack/promptflow-venv.sh"))
        .output()
        .expect("run hack/promptflow-venv.sh");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}
