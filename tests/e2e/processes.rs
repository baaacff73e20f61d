//! Processes that play a runtime pod's containers on a kwok node (which runs none): the
//! operator binary's activity proxy, and a real prompt flow server behind it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::harness::{http_get, repo_root};

/// What plays a runtime pod's containers on a kwok node: a real activity proxy (the operator
/// binary's subcommand) on the pod IP, and optionally a real prompt flow server behind it.
pub struct PodProcesses {
    children: Vec<Child>,
}

impl PodProcesses {
    /// Starts the activity proxy on `ip` (8081 traffic, 8082 activity) in front of `ip:8080`.
    pub async fn proxy(ip: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_promptflow-operator"))
            .args([
                "activity-proxy",
                &format!("--listen={ip}:8081"),
                &format!("--upstream={ip}:8080"),
                &format!("--activity-listen={ip}:8082"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the activity proxy");
        let mut processes = Self { children: vec![child] };
        wait_answers(&format!("{ip}:8082"), "/healthz", Duration::from_secs(10)).await;
        processes.assert_running(ip);
        processes
    }

    /// Also serves the flow in `flow_dir` with `pf flow serve` on `ip:8080`.
    pub async fn with_flow(mut self, ip: &str, flow_dir: &Path) -> Self {
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
