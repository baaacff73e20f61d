//! Idle stop users can trust, with every container of every runtime pod played as a kubelet
//! would start it (a fresh activity proxy on each new pod's IP, and a real `pf flow serve` where
//! traffic matters): a started runtime gets a full timeout, a request still running is never
//! cut, health checks and retries into a runtime that is down do not keep it alive, and what
//! answers on the activity port is not believed beyond reason.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use promptflow_operator::api::{PromptFlowRuntime, RuntimePhase};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::idle::{DAG, TIMEOUT, flow_folder, phase, pod_ip};
use crate::processes::Kubelet;
use crate::runtime::{create, create_runtime, wait_status};

/// Waits until `name` is stopped for idleness; returns when it was seen so.
async fn wait_stopped_idle(ns: &TestNamespace, name: &str, within: Duration) -> Instant {
    harness::wait_for(
        &ns.api::<PromptFlowRuntime>(),
        name,
        |rt: Option<&PromptFlowRuntime>| rt.and_then(phase).is_some_and(|(_, reason)| reason == "StoppedIdle"),
        within,
    )
    .await;
    Instant::now()
}

async fn annotate(ns: &TestNamespace, name: &str, key: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    ns.api::<PromptFlowRuntime>()
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Asserts `names` stay Running until `until`, looking every second.
async fn stay_running(ns: &TestNamespace, names: &[&str], until: Instant) {
    while Instant::now() < until {
        for name in names {
            let runtime = ns.api::<PromptFlowRuntime>().get(name).await.unwrap();
            assert_eq!(
                phase(&runtime).map(|p| p.0),
                Some(RuntimePhase::Running),
                "{name} stopped before a full timeout: {:?}",
                runtime.status
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_runtime_started_after_a_stop_gets_a_full_timeout() {
    with_namespace("pf-idle-start", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let _kubelet = Kubelet::start(&ns, BTreeMap::new());
        for name in ["idled", "paused"] {
            create_runtime(&ns, name, json!({"idle": {"timeout": "1m"}})).await;
        }
        for name in ["idled", "paused"] {
            wait_status(&ns, name, "Running", None).await;
        }
        annotate(&ns, "paused", "promptflow.dev/stop", "1").await;
        wait_status(&ns, "paused", "Not available", Some("StoppedByUser")).await;
        wait_stopped_idle(&ns, "idled", TIMEOUT + Duration::from_secs(60)).await;

        for name in ["idled", "paused"] {
            annotate(&ns, name, "promptflow.dev/start", "1").await;
        }
        let started = Instant::now();
        for name in ["idled", "paused"] {
            wait_status(&ns, name, "Running", Some("PodReady")).await;
        }
        // The new pods' proxies answer (no requests yet): the start itself is the activity.
        for name in ["idled", "paused"] {
            let ip = pod_ip(&ns, name).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while request(&format!("{ip}:8082"), "GET", "/healthz")
                .await
                .is_none_or(|(code, _)| code != 200)
            {
                assert!(Instant::now() < deadline, "{name}'s fresh proxy does not answer");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        stay_running(&ns, &["idled", "paused"], started + TIMEOUT - Duration::from_secs(2)).await;
        for name in ["idled", "paused"] {
            let stopped = wait_stopped_idle(&ns, name, Duration::from_secs(45)).await;
            println!(
                "idle: {name} started again and stopped {:.1}s later (timeout 60s)",
                (stopped - started).as_secs_f64()
            );
        }
    })
    .await;
}

const SLOW_NODE: &str = "import time\n\nfrom promptflow.core import tool\n\n\n@tool\ndef echo(question: str) -> str:\n    time.sleep(80)\n    return f\"slept on: {question}\"\n";

#[tokio::test]
async fn a_request_running_past_the_deadline_completes_and_the_timeout_counts_from_its_end() {
    with_namespace("pf-idle-long", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let data = json!({"flow.dag.yaml": DAG, "echo.py": SLOW_NODE});
        create(
            &ns.api::<ConfigMap>(),
            json!({"metadata": {"name": "slow-flow"}, "data": data}),
        )
        .await;
        let flow_dir = flow_folder(&ns, "slow-flow").await;
        let _kubelet = Kubelet::start(&ns, BTreeMap::from([("slow".to_owned(), flow_dir.clone())]));
        create_runtime(
            &ns,
            "slow",
            json!({"flow": {"configMapName": "slow-flow"}, "idle": {"timeout": "1m"}}),
        )
        .await;
        wait_status(&ns, "slow", "Running", None).await;
        let running = Instant::now();
        let ip = pod_ip(&ns, "slow").await;
        // The flow server takes 10–15 s to come up behind the proxy.
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(&format!("{ip}:8081"), "GET", "/health")
            .await
            .is_none_or(|(code, _)| code != 200)
        {
            assert!(Instant::now() < deadline, "the flow never answered /health");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sent = Instant::now();
        let (code, body) = harness::http_post_json(&format!("{ip}:8081"), "/score", r#"{"question":"long"}"#).await;
        let ended = Instant::now();
        println!(
            "idle: an 80 s request sent {:.1}s after Running ended {:.1}s after Running (timeout 60s) with {code}",
            (sent - running).as_secs_f64(),
            (ended - running).as_secs_f64()
        );
        assert_eq!(code, 200, "the request was cut: {body}");
        assert!(body.contains("slept on: long"), "{body}");
        assert!(ended - running > TIMEOUT, "the request did run past the first deadline");
        let stopped = wait_stopped_idle(&ns, "slow", TIMEOUT + Duration::from_secs(30)).await;
        let after = stopped - ended;
        println!("idle: stopped {:.1}s after the request ended", after.as_secs_f64());
        assert!(
            after >= TIMEOUT - Duration::from_secs(1),
            "stopped {after:?} after the request ended"
        );
        std::fs::remove_dir_all(&flow_dir).ok();
    })
    .await;
}

#[tokio::test]
async fn health_checks_and_retries_into_a_runtime_that_is_down_do_not_keep_it_alive() {
    with_namespace("pf-idle-probes", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let data = json!({"flow.dag.yaml": DAG, "echo.py": crate::idle::NODE});
        create(
            &ns.api::<ConfigMap>(),
            json!({"metadata": {"name": "flow"}, "data": data}),
        )
        .await;
        let flow_dir = flow_folder(&ns, "flow").await;
        // "probed" serves its flow; "down" has a proxy but its runtime container never answers.
        let _kubelet = Kubelet::start(&ns, BTreeMap::from([("probed".to_owned(), flow_dir.clone())]));
        create_runtime(
            &ns,
            "probed",
            json!({"flow": {"configMapName": "flow"}, "idle": {"timeout": "1m"}}),
        )
        .await;
        create_runtime(&ns, "down", json!({"idle": {"timeout": "1m"}})).await;
        wait_status(&ns, "probed", "Running", None).await;
        wait_status(&ns, "down", "Running", None).await;
        let running = Instant::now();
        let (probed, down) = (pod_ip(&ns, "probed").await, pod_ip(&ns, "down").await);
        let traffic = tokio::spawn(async move {
            let (mut healthy, mut bad_gateway) = (0, 0);
            loop {
                if let Some((200, _)) = request(&format!("{probed}:8081"), "GET", "/health").await {
                    healthy += 1;
                }
                if let Some((502, _)) = request(&format!("{down}:8081"), "POST", "/score").await {
                    bad_gateway += 1;
                }
                println!("idle: monitor saw {healthy} healthy answers, the retrying client {bad_gateway} 502s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        for name in ["probed", "down"] {
            let stopped = wait_stopped_idle(&ns, name, TIMEOUT + Duration::from_secs(45)).await;
            let after = stopped - running;
            println!(
                "idle: {name} stopped {:.1}s after Running despite traffic every 5 s",
                after.as_secs_f64()
            );
            assert!(
                after >= TIMEOUT - Duration::from_secs(2),
                "{name} stopped early: {after:?}"
            );
        }
        traffic.abort();
        std::fs::remove_dir_all(&flow_dir).ok();
    })
    .await;
}

/// One HTTP/1.0 request without a body; `None` when nothing answers.
async fn request(address: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, answer.split_once("\r\n\r\n")?.1.to_owned()))
}

/// Serves `GET /activity` on `ip:8082` with `body` (sent as fast as the reader takes it), as a
/// runtime image that took the activity port might.
async fn hostile_activity_port(ip: &str, body: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:8082")).await.unwrap();
    tokio::spawn(async move {
        let body = std::sync::Arc::new(body);
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = stream.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            });
        }
    })
}

#[tokio::test]
async fn a_huge_or_future_activity_answer_neither_hurts_the_operator_nor_moves_the_deadline() {
    with_namespace("pf-idle-hostile", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "huge", json!({"idle": {"timeout": "1m"}})).await;
        create_runtime(&ns, "future", json!({"idle": {"timeout": "1m"}})).await;
        wait_status(&ns, "huge", "Running", None).await;
        wait_status(&ns, "future", "Running", None).await;
        let mut ten_mib = b"{\"requests\": 1, \"pad\": \"".to_vec();
        ten_mib.extend(std::iter::repeat_n(b'x', 10 << 20));
        ten_mib.extend(b"\"}");
        let huge = hostile_activity_port(&pod_ip(&ns, "huge").await, ten_mib).await;
        let future = hostile_activity_port(
            &pod_ip(&ns, "future").await,
            br#"{"lastActivityTime": "2100-01-01T00:00:00Z", "requests": 1}"#.to_vec(),
        )
        .await;
        let rss_before = crate::proxy::usage(operator.pid().unwrap()).0;

        // At the warning time (54 s) each answer is read once.
        let unknown = harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "huge",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()).is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Idle" && c.reason == "ActivityUnknown")
                })
            },
            TIMEOUT + Duration::from_secs(30),
        )
        .await;
        let message = unknown
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Idle")
            .unwrap()
            .message;
        assert!(message.contains("more than 4096 bytes"), "{message}");
        let future_runtime = harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "future",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref()?.last_activity_time.as_ref())
                    .is_some()
            },
            TIMEOUT + Duration::from_secs(30),
        )
        .await;
        let recorded = future_runtime.status.unwrap().last_activity_time.unwrap().0;
        println!("idle: a report of 2100 was recorded as {recorded}");
        assert!(recorded <= Timestamp::now(), "a future time was believed: {recorded}");
        let rss_after = crate::proxy::usage(operator.pid().unwrap()).0;
        println!("idle: operator RSS {rss_before} KiB before the hostile answers, {rss_after} KiB after");
        assert!(
            rss_after < rss_before + 4096,
            "a 10 MiB answer was read: {rss_before} → {rss_after} KiB"
        );
        for name in ["huge", "future"] {
            let runtime = ns.api::<PromptFlowRuntime>().get(name).await.unwrap();
            assert_eq!(phase(&runtime).map(|p| p.0), Some(RuntimePhase::Running), "{name}");
        }
        huge.abort();
        future.abort();
    })
    .await;
}
