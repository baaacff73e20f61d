//! Idle stop from real activity: a real prompt flow server (`pf flow serve`) and the real activity
//! proxy play the runtime pod's containers on its kwok pod IP; requests are real `POST /score`
//! calls through the proxy. Timeouts are the shortest the API allows (1m), warnings 10 % before.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use promptflow_operator::api::{PromptFlowRuntime, RuntimePhase};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::processes::PodProcesses;
use crate::runtime::{create, create_runtime, wait_status};

pub const DAG: &str = "inputs:\n  question:\n    type: string\noutputs:\n  answer:\n    type: string\n    reference: ${echo.output}\nnodes:\n- name: echo\n  type: python\n  source:\n    type: code\n    path: echo.py\n  inputs:\n    question: ${inputs.question}\n";
pub const NODE: &str = "from promptflow.core import tool\n\n\n@tool\ndef echo(question: str) -> str:\n    return f\"you asked: {question}\"\n";
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub async fn pod_ip(ns: &TestNamespace, runtime: &str) -> String {
    let pod = harness::wait_for(
        &ns.api::<Pod>(),
        &format!("{runtime}-runtime"),
        |pod: Option<&Pod>| pod.and_then(|p| p.status.as_ref()?.pod_ip.as_ref()).is_some(),
        Duration::from_secs(60),
    )
    .await;
    pod.status.unwrap().pod_ip.unwrap()
}

pub fn phase(runtime: &PromptFlowRuntime) -> Option<(RuntimePhase, String)> {
    let status = runtime.status.as_ref()?;
    Some((status.phase, status.reason.clone().unwrap_or_default()))
}

pub async fn reasons_of(events: &Api<Event>, name: &str) -> Vec<String> {
    let mut list: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter().filter_map(|e| e.reason).collect()
}

/// The flow folder a runtime pod would mount, written from its ConfigMap to a temporary folder.
pub async fn flow_folder(ns: &TestNamespace, config_map: &str) -> std::path::PathBuf {
    let folder = std::env::temp_dir().join(format!("pf-flow-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&folder).unwrap();
    let files = ns
        .api::<ConfigMap>()
        .get(config_map)
        .await
        .unwrap()
        .data
        .unwrap_or_default();
    for (file, content) in files {
        std::fs::write(folder.join(file), content).unwrap();
    }
    folder
}

/// Status writes the operator made for `runtime` so far (from its write log).
fn status_writes(operator: &OperatorProcess, runtime: &str) -> usize {
    let path = format!("/promptflowruntimes/{runtime}/status");
    operator
        .log_text()
        .lines()
        .filter(|l| l.contains("api write") && l.ends_with(&path))
        .count()
}

#[tokio::test]
async fn requests_through_the_proxy_keep_a_real_flow_alive_and_silence_stops_it() {
    with_namespace("pf-idle-flow", |ns| async move {
        let operator = OperatorProcess::start_logging(
            &harness::kubeconfig(),
            &["--watch-namespace", &ns.name],
            "info,kube=warn,promptflow_operator::api=debug",
        );
        let data = json!({"flow.dag.yaml": DAG, "echo.py": NODE});
        create(
            &ns.api::<ConfigMap>(),
            json!({"metadata": {"name": "chat-flow"}, "data": data}),
        )
        .await;
        create_runtime(
            &ns,
            "chat",
            json!({"flow": {"configMapName": "chat-flow"}, "idle": {"timeout": "1m"}}),
        )
        .await;
        let running = wait_status(&ns, "chat", "Running", None).await;
        assert_eq!(
            running.status.as_ref().unwrap().url.as_deref(),
            Some(&*format!("http://chat.{}.svc:8081", ns.name))
        );
        let service = ns.api::<Service>().get("chat").await.unwrap();
        let service_spec = service.spec.unwrap();
        assert_eq!(
            service_spec.cluster_ip.as_deref(),
            Some("None"),
            "headless: DNS answers the pod IP"
        );
        assert_eq!(service_spec.ports.unwrap()[0].port, 8081);

        // The pod's containers, for real: the flow from the runtime's ConfigMap, served by
        // promptflow, behind the activity proxy.
        let ip = pod_ip(&ns, "chat").await;
        let flow_dir = flow_folder(&ns, "chat-flow").await;
        let mut processes = PodProcesses::proxy(&ip).await.with_flow(&ip, &flow_dir).await;
        let pod_uid = ns.api::<Pod>().get("chat-runtime").await.unwrap().uid();

        // Two timeouts of traffic: a request every 10 s through the proxy.
        let writes_before = status_writes(&operator, "chat");
        let busy_until = Instant::now() + 2 * TIMEOUT;
        let mut answered = 0;
        let mut last_request = Instant::now();
        while Instant::now() < busy_until {
            last_request = Instant::now();
            let (code, body) =
                harness::http_post_json(&format!("{ip}:8081"), "/score", r#"{"question":"still there?"}"#).await;
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("you asked: still there?"), "{body}");
            answered += 1;
            let runtime = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap();
            assert_eq!(
                phase(&runtime).map(|p| p.0),
                Some(RuntimePhase::Running),
                "stopped while in use"
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let active_writes = status_writes(&operator, "chat") - writes_before;
        println!(
            "idle: {answered} real requests over {}s kept the runtime Running with {active_writes} status writes",
            2 * TIMEOUT.as_secs()
        );
        assert!(
            active_writes <= 3,
            "{active_writes} status writes while in use; at most one per look (every ~54 s)"
        );
        assert_eq!(
            ns.api::<Pod>().get("chat-runtime").await.unwrap().uid(),
            pod_uid,
            "the pod was never replaced"
        );

        // Silence: a warning first, then the stop, about a timeout after the last request.
        let stopped = harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "chat",
            |rt: Option<&PromptFlowRuntime>| rt.and_then(phase).is_some_and(|(_, reason)| reason == "StoppedIdle"),
            TIMEOUT + Duration::from_secs(30),
        )
        .await;
        // Gone with the pod: kwok hands its IP to the next pod.
        processes.stop().await;
        let after = last_request.elapsed();
        println!(
            "idle: stopped {:.1}s after the last request (timeout 60s)",
            after.as_secs_f64()
        );
        assert!(after >= TIMEOUT - Duration::from_secs(1), "stopped early: {after:?}");
        let reasons = reasons_of(&ns.api::<Event>(), "chat").await;
        let soon = reasons
            .iter()
            .position(|r| r == "IdleSoon")
            .expect("an IdleSoon warning");
        let stop = reasons
            .iter()
            .position(|r| r == "StoppedIdle")
            .expect("a StoppedIdle event");
        assert!(soon < stop, "{reasons:?}");
        assert_eq!(stopped.status.as_ref().unwrap().phase, RuntimePhase::NotAvailable);
        harness::wait_deleted(
            &ns.api::<Pod>(),
            "chat-runtime",
            &pod_uid.unwrap(),
            Duration::from_secs(30),
        )
        .await;
        assert!(
            ns.api::<Service>().get_opt("chat").await.unwrap().is_some(),
            "the Service stays"
        );
        assert!(
            ns.api::<PromptFlowRuntime>()
                .get("chat")
                .await
                .unwrap()
                .spec
                .idle
                .is_some(),
            "the spec is untouched"
        );
        std::fs::remove_dir_all(&flow_dir).ok();

        // Start: a new value of promptflow.dev/start brings it back.
        let start = json!({"metadata": {"annotations": {"promptflow.dev/start": "1"}}});
        ns.api::<PromptFlowRuntime>()
            .patch("chat", &PatchParams::default(), &Patch::Merge(start))
            .await
            .unwrap();
        let restarted = wait_status(&ns, "chat", "Running", Some("PodReady")).await;
        assert_eq!(
            restarted.status.unwrap().handled_actions.unwrap().start.as_deref(),
            Some("1")
        );
    })
    .await;
}

/// Twenty runtimes with deadlines a second and a half apart, plus the cases around them.
#[tokio::test]
async fn staggered_deadlines_are_met_and_the_edges_hold() {
    with_namespace("pf-idle-many", |ns| async move {
        let operator = OperatorProcess::for_namespace(&ns.name);
        let runtimes = ns.api::<PromptFlowRuntime>();
        let lag_names: Vec<String> = (0..20).map(|i| format!("lag-{i:02}")).collect();
        let mut seen_running: BTreeMap<String, Instant> = BTreeMap::new();
        // Every pod gets its proxy as a kubelet would start it, and loses it with the pod (an
        // idle stop hands its IP on at once); "no-proxy"'s never starts.
        let _kubelet = crate::processes::Kubelet::start_except(&ns, BTreeMap::new(), &["no-proxy"]);
        for name in &lag_names {
            let created = Instant::now();
            create_runtime(&ns, name, json!({"idle": {"timeout": "1m"}})).await;
            wait_status(&ns, name, "Running", None).await;
            seen_running.insert(name.clone(), Instant::now());
            tokio::time::sleep(Duration::from_millis(1500).saturating_sub(created.elapsed())).await;
        }
        create_runtime(&ns, "forever", json!({"idle": {"timeout": "0"}})).await;
        let deleted_uid = create_runtime(&ns, "deleted", json!({"idle": {"timeout": "1m", "action": "Delete"}})).await.uid().unwrap();
        create_runtime(&ns, "no-proxy", json!({"idle": {"timeout": "1m"}})).await;
        create_runtime(&ns, "postponed", json!({"idle": {"timeout": "1m"}})).await;
        create_runtime(&ns, "manual", json!({"idle": {"timeout": "1m"}})).await;
        let started_postponed = Instant::now();

        // The user stops a runtime and starts it again.
        runtimes.patch("manual", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"promptflow.dev/stop": "a"}}}))).await.unwrap();
        wait_status(&ns, "manual", "Not available", Some("StoppedByUser")).await;
        runtimes.patch("manual", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"promptflow.dev/start": "a"}}}))).await.unwrap();
        wait_status(&ns, "manual", "Running", Some("PodReady")).await;

        // Watch every lag runtime until it stops; note when it was first seen Running.
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut stopped_at: BTreeMap<String, Instant> = BTreeMap::new();
        let mut postponed_once = false;
        while stopped_at.len() < lag_names.len() {
            assert!(Instant::now() < deadline, "only {} of 20 stopped", stopped_at.len());
            for runtime in runtimes.list(&ListParams::default()).await.unwrap() {
                let name = runtime.name_any();
                match phase(&runtime) {
                    Some((_, reason)) if reason == "StoppedIdle" && name.starts_with("lag-") => {
                        stopped_at.entry(name).or_insert_with(Instant::now);
                    }
                    _ => {}
                }
            }
            // Half a timeout in, a pipeline says "postponed" was used.
            if !postponed_once && started_postponed.elapsed() > Duration::from_secs(30) {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let patch = json!({"metadata": {"annotations": {"promptflow.dev/last-activity": now}}});
                runtimes.patch("postponed", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
                postponed_once = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut lags: Vec<f64> = lag_names
            .iter()
            .map(|name| (stopped_at[name] - seen_running[name]).as_secs_f64() - TIMEOUT.as_secs_f64())
            .collect();
        lags.sort_by(f64::total_cmp);
        let (p50, p99) = (lags[lags.len() / 2], lags[lags.len() - 1]);
        println!("idle cull lag over 20 staggered deadlines: p50 {p50:.2}s, p99 {p99:.2}s (from first seen Running + 60s to seen StoppedIdle)");
        assert!(lags[0] > -1.5, "a runtime stopped before its deadline: {lags:?}");
        assert!(p99 <= 2.0, "p99 cull lag {p99:.2}s exceeds 2s: {lags:?}");

        // The edges, now that every deadline of the same age has passed.
        let forever = runtimes.get("forever").await.unwrap();
        assert_eq!(phase(&forever).map(|p| p.0), Some(RuntimePhase::Running), "timeout 0 never stops");
        let no_proxy = harness::wait_for(
            &runtimes,
            "no-proxy",
            |rt: Option<&PromptFlowRuntime>| {
                rt.and_then(|rt| rt.status.as_ref())
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Idle" && c.reason == "ActivityUnknown"))
            },
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(phase(&no_proxy).map(|p| p.0), Some(RuntimePhase::Running), "an unreachable proxy is not idleness");
        assert_eq!(phase(&runtimes.get("postponed").await.unwrap()).map(|p| p.0), Some(RuntimePhase::Running), "the annotation postponed it");
        harness::wait_deleted(&runtimes, "deleted", &deleted_uid, Duration::from_secs(30)).await;
        let postponed = harness::wait_for(
            &runtimes,
            "postponed",
            |rt: Option<&PromptFlowRuntime>| rt.and_then(phase).is_some_and(|(_, r)| r == "StoppedIdle"),
            Duration::from_secs(60),
        )
        .await;
        assert!(postponed.status.is_some());

        // The metrics tell the same story.
        let metrics = operator.metrics().await;
        let value = |line_start: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(line_start))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{line_start} not in:\n{metrics}"))
        };
        assert!(value("promptflow_operator_idle_culls_total{action=\"stop\"}") >= 21.0);
        assert!(value("promptflow_operator_idle_culls_total{action=\"delete\"}") >= 1.0);
        assert!(value("promptflow_operator_idle_warnings_total") >= 21.0);
        assert!(value("promptflow_operator_activity_query_failures_total") >= 1.0);
        assert!(value("promptflow_operator_runtimes{phase=\"Stopped\"}") >= 20.0, "the cache may not show the last stop yet");
        assert!(value("promptflow_operator_runtimes{phase=\"Running\"}") >= 2.0);
    })
    .await;
}

#[tokio::test]
async fn an_operator_restart_before_the_deadline_does_not_stop_early() {
    with_namespace("pf-idle-restart", |ns| async move {
        let mut operator = OperatorProcess::for_namespace(&ns.name);
        create_runtime(&ns, "chat", json!({"idle": {"timeout": "1m"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let running_at = Instant::now();
        let mut proxy = PodProcesses::proxy(&pod_ip(&ns, "chat").await).await;
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(operator.stop(Duration::from_secs(10)).await);
        let _restarted = OperatorProcess::for_namespace(&ns.name);
        let restarted_at = Instant::now();
        let stopped = harness::wait_for(
            &ns.api::<PromptFlowRuntime>(),
            "chat",
            |rt: Option<&PromptFlowRuntime>| rt.and_then(phase).is_some_and(|(_, r)| r == "StoppedIdle"),
            Duration::from_secs(120),
        )
        .await;
        proxy.stop().await;
        let since_restart = restarted_at.elapsed();
        println!(
            "idle: stopped {:.1}s after an operator restart ({:.1}s after Running)",
            since_restart.as_secs_f64(),
            running_at.elapsed().as_secs_f64()
        );
        assert!(
            since_restart >= TIMEOUT - Duration::from_secs(1),
            "unknown activity must count as the restart: {since_restart:?}"
        );
        assert!(stopped.status.is_some());
    })
    .await;
}

const STREAMING_NODE: &str = "import time\n\nfrom promptflow.core import tool\n\n\n@tool\ndef echo(question: str):\n    def stream():\n        for word in [\"one\", \"two\", \"three\"]:\n            yield word + \" \"\n            time.sleep(1)\n\n    return stream()\n";

#[tokio::test]
async fn a_streamed_answer_passes_through_the_proxy_as_it_is_produced() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    with_namespace("pf-idle-stream", |ns| async move {
        let _operator = OperatorProcess::for_namespace(&ns.name);
        let data = json!({"flow.dag.yaml": DAG, "echo.py": STREAMING_NODE});
        create(&ns.api::<ConfigMap>(), json!({"metadata": {"name": "stream-flow"}, "data": data})).await;
        create_runtime(&ns, "chat", json!({"flow": {"configMapName": "stream-flow"}})).await;
        wait_status(&ns, "chat", "Running", None).await;
        let ip = pod_ip(&ns, "chat").await;
        let flow_dir = flow_folder(&ns, "stream-flow").await;
        let mut processes = PodProcesses::proxy(&ip).await.with_flow(&ip, &flow_dir).await;

        // A chat client asking for server-sent events, through the proxy.
        let body = r#"{"question":"count"}"#;
        let mut stream = tokio::net::TcpStream::connect(format!("{ip}:8081")).await.unwrap();
        let request = format!(
            "POST /score HTTP/1.1\r\nHost: {ip}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut lines = BufReader::new(stream).lines();
        let mut events = vec![];
        while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
            if line.starts_with("data:") {
                events.push((started.elapsed(), line));
            }
        }
        processes.stop().await;
        std::fs::remove_dir_all(&flow_dir).ok();
        println!("idle: streamed events through the proxy at {:?}", events.iter().map(|(t, _)| t.as_secs_f64()).collect::<Vec<_>>());
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[0].1.contains("one") && events[2].1.contains("three"), "{events:?}");
        // The flow sleeps a second between words: unbuffered, the first arrives ~2 s before the last.
        assert!(
            events[2].0 - events[0].0 >= Duration::from_millis(1500),
            "the answer was buffered: {events:?}"
        );
    })
    .await;
}
