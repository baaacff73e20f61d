//! Compute instances against the real cluster with the operator binary as a process: the instance
//! pod, runtimes attached as containers with one restart per batch of changes, stop and start by
//! hand, by schedule and after idleness, detaching on delete, and moving a serverless runtime over.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use promptflow_operator::api::{
    ComputeInstance, ComputeInstanceStatus, InstanceState, PromptFlowRuntime, RuntimePhase, ScheduleAction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::time::{Instant, sleep};

use crate::events::{assert_event_times, events_about, times, wait_event, wait_reason};
use crate::harness::{self, OperatorProcess, TestNamespace, with_namespace};
use crate::runtime::{create, create_runtime};

const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
/// `--instance-restart-batch-seconds` for these tests.
const BATCH: Duration = Duration::from_secs(3);
/// The pod of the instance `ci`.
const POD: &str = "ci-instance";
const INSTANCE: &str = "ComputeInstance";
const RUNTIME: &str = "PromptFlowRuntime";

/// The operator for the test's namespace, batching restarts over 3 s and allowing idle times
/// down to a second.
pub(crate) fn operator(ns: &TestNamespace) -> OperatorProcess {
    OperatorProcess::start(
        &harness::kubeconfig(),
        &[
            "--watch-namespace",
            &ns.name,
            "--instance-restart-batch-seconds=3",
            "--instance-min-idle=1s",
        ],
    )
}

/// Creates an instance `name` of type Standard_DS3_v2, with the fields of `spec` added.
pub async fn create_instance(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> ComputeInstance {
    let mut full = json!({"instanceType": "Standard_DS3_v2"});
    full.as_object_mut()
        .unwrap()
        .extend(spec.as_object().cloned().unwrap_or_default());
    let instance = json!({
        "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
        "metadata": {"name": name}, "spec": full
    });
    create(&ns.api::<ComputeInstance>(), instance).await
}

/// Creates a runtime `name` on the instance `instance`.
pub(crate) async fn create_on_instance(
    ns: &TestNamespace,
    name: &str,
    instance: &str,
    acknowledge: bool,
) -> PromptFlowRuntime {
    let compute = json!({"instance": {"name": instance, "acknowledgeRestart": acknowledge}});
    create_runtime(ns, name, json!({"compute": compute})).await
}

/// A JSON merge patch.
pub(crate) async fn merge<K>(api: &Api<K>, name: &str, patch: serde_json::Value)
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|err| panic!("patch {name}: {err}"));
}

/// The object's status as JSON, for failure messages.
fn status_of<K: Serialize>(object: Option<&K>) -> String {
    object.map_or_else(
        || "(the object is gone)".to_owned(),
        |object| {
            serde_json::to_value(object)
                .map(|v| v["status"].to_string())
                .unwrap_or_default()
        },
    )
}

/// Polls the named object until `check` holds; panics with its last status after `timeout`.
async fn wait_until<K>(api: &Api<K>, name: &str, what: &str, timeout: Duration, check: impl Fn(&K) -> bool) -> K
where
    K: Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        let current = api
            .get_opt(name)
            .await
            .unwrap_or_else(|err| panic!("get {name}: {err}"));
        if let Some(object) = current.as_ref().filter(|&object| check(object)) {
            return object.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name} is not {what} after {timeout:?}; status: {}",
            status_of(current.as_ref())
        );
        sleep(POLL).await;
    }
}

/// Waits until the instance's status satisfies `check`.
async fn wait_instance(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&ComputeInstanceStatus) -> bool,
) -> ComputeInstance {
    let api = ns.api::<ComputeInstance>();
    wait_until(&api, name, what, timeout, |ci: &ComputeInstance| {
        ci.status.as_ref().is_some_and(&check)
    })
    .await
}

/// Waits until the instance is in `state` (with `reason`, when given).
pub async fn wait_state(ns: &TestNamespace, name: &str, state: InstanceState, reason: Option<&str>) -> ComputeInstance {
    let what = format!("{state:?} {}", reason.unwrap_or_default());
    wait_instance(ns, name, &what, WAIT, |s| {
        s.state == state && reason.is_none_or(|r| s.reason.as_deref() == Some(r))
    })
    .await
}

/// Waits until the instance is Stopped with `reason`.
pub(crate) async fn wait_stopped(ns: &TestNamespace, name: &str, reason: &str, timeout: Duration) -> ComputeInstance {
    wait_instance(ns, name, &format!("Stopped {reason}"), timeout, |s| {
        s.state == InstanceState::Stopped && s.reason.as_deref() == Some(reason)
    })
    .await
}

/// Waits until the instance runs with exactly `runtimes` attached.
pub(crate) async fn wait_running_with(ns: &TestNamespace, name: &str, runtimes: &[&str]) -> ComputeInstance {
    let what = format!("Running with runtimes {runtimes:?}");
    wait_instance(ns, name, &what, WAIT, |s| {
        s.state == InstanceState::Running && s.runtimes == runtimes
    })
    .await
}

/// Waits until the runtime shows `phase` (and `reason`, when given).
pub(crate) async fn wait_runtime(
    ns: &TestNamespace,
    name: &str,
    phase: RuntimePhase,
    reason: Option<&str>,
) -> PromptFlowRuntime {
    let what = format!("{phase:?} {}", reason.unwrap_or_default());
    let api = ns.api::<PromptFlowRuntime>();
    wait_until(&api, name, &what, WAIT, |rt: &PromptFlowRuntime| {
        rt.status
            .as_ref()
            .is_some_and(|s| s.phase == phase && reason.is_none_or(|r| s.reason.as_deref() == Some(r)))
    })
    .await
}

fn container_names(pod: &Pod) -> Vec<&str> {
    pod.spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .map(|c| c.name.as_str())
        .collect()
}

/// Every uid a pod of one name had while watched: each restart of the instance is a new uid.
struct PodUids {
    seen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodUids {
    /// Watches pod `name`; returns once the watch has listed it.
    async fn watch(ns: &TestNamespace, name: &str) -> Self {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let listed = Arc::new(AtomicBool::new(false));
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let events = watcher(ns.api::<Pod>(), config).default_backoff();
        let task = tokio::spawn({
            let (seen, listed) = (seen.clone(), listed.clone());
            async move {
                let mut events = std::pin::pin!(events);
                while let Some(event) = events.next().await {
                    match event {
                        Ok(
                            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) | watcher::Event::Delete(pod),
                        ) => {
                            seen.lock().unwrap().extend(pod.uid());
                        }
                        Ok(watcher::Event::InitDone) => listed.store(true, Ordering::SeqCst),
                        _ => {}
                    }
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        while !listed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the watch of pod {name} never listed");
            sleep(Duration::from_millis(50)).await;
        }
        Self { seen, task }
    }

    fn uids(&self) -> BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for PodUids {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unix_now() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_secs()).unwrap()
}

/// The next whole UTC minute at least 15 s away, in Unix seconds.
fn next_minute() -> i64 {
    let now = unix_now();
    let minute = (now / 60 + 1) * 60;
    if minute - now < 15 { minute + 60 } else { minute }
}

/// The time from now until the Unix second `at`.
fn until(at: i64) -> Duration {
    Duration::from_secs(u64::try_from(at - unix_now()).unwrap_or(0))
}

/// Replaces the instance's schedules with one daily `action` at the UTC minute `at`, and waits
/// until the instance announces it.
async fn schedule_once(ns: &TestNamespace, name: &str, action: ScheduleAction, at: i64) {
    let cron = format!("{} {} * * *", at / 60 % 60, at / 3600 % 24);
    let schedules = json!([{"action": action, "cron": cron, "timeZone": "UTC"}]);
    merge(
        &ns.api::<ComputeInstance>(),
        name,
        json!({"spec": {"schedules": schedules}}),
    )
    .await;
    let what = format!("announcing {action:?} at {at} ({cron})");
    wait_instance(ns, name, &what, until(at), |s| {
        s.next_scheduled_action
            .as_ref()
            .is_some_and(|next| next.action == action && next.time.0.as_second() == at)
    })
    .await;
}

#[tokio::test]
async fn instance_runs_and_takes_an_acknowledged_runtime_with_one_restart() {
    with_namespace("pf-ci-attach", |ns| async move {
        let _operator = operator(&ns);
        let instance = create_instance(&ns, "ci", json!({})).await;
        let running = wait_state(&ns, "ci", InstanceState::Running, None).await;
        let status = running.status.unwrap();
        assert!(status.runtimes.is_empty(), "no runtime is attached yet: {status:?}");
        let pods = ns.api::<Pod>();
        let pod = pods.get(POD).await.unwrap();
        let owner = pod.owner_references().iter().find(|o| o.controller == Some(true));
        assert!(
            owner.is_some_and(|o| o.kind == INSTANCE && o.name == "ci" && instance.uid().as_deref() == Some(&*o.uid)),
            "the instance controls its pod: {:?}",
            pod.owner_references()
        );
        let first_uid = pod.uid().unwrap();
        let uids = PodUids::watch(&ns, POD).await;

        // Not acknowledged: the runtime says what to set, and the instance keeps running as it is.
        create_on_instance(&ns, "chat", "ci", false).await;
        wait_runtime(&ns, "chat", RuntimePhase::NotAvailable, Some("RestartNotAcknowledged")).await;
        wait_event(&ns, RUNTIME, "chat", "a Warning naming acknowledgeRestart", |e| {
            e.type_.as_deref() == Some("Warning")
                && e.note
                    .as_deref()
                    .is_some_and(|note| note.contains("spec.compute.instance.acknowledgeRestart"))
        })
        .await;
        sleep(BATCH + Duration::from_secs(1)).await;
        assert_eq!(
            uids.uids(),
            BTreeSet::from([first_uid.clone()]),
            "the instance restarted for an unacknowledged runtime"
        );

        // Acknowledged: one restart takes it.
        let acknowledge = json!({"spec": {"compute": {"instance": {"acknowledgeRestart": true}}}});
        merge(&ns.api::<PromptFlowRuntime>(), "chat", acknowledge).await;
        let chat = wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
        // Longer than a batch: a second restart would have begun by now.
        sleep(BATCH + Duration::from_secs(1)).await;
        let pod = pods.get(POD).await.unwrap();
        let new_uid = pod.uid().unwrap();
        assert_ne!(new_uid, first_uid, "the instance pod was not replaced to take chat");
        let containers = container_names(&pod);
        assert!(
            ["rt-chat", "px-chat"].iter().all(|c| containers.contains(c)),
            "{containers:?}"
        );
        assert_eq!(
            pod.annotations().get("promptflow.dev/runtimes").map(String::as_str),
            Some("chat"),
            "{:?}",
            pod.annotations()
        );
        assert_eq!(
            uids.uids(),
            BTreeSet::from([first_uid, new_uid]),
            "the instance pod was replaced exactly once"
        );
        assert_event_times(&ns, INSTANCE, "ci", "RuntimesChanged", 1).await;

        let status = chat.status.unwrap();
        assert_eq!(status.compute.as_deref(), Some("ci"), "{status:?}");
        assert_eq!(
            status.url.as_deref(),
            Some(&*format!("http://chat.{}.svc:8101", ns.name)),
            "the first slot's proxy port: {status:?}"
        );
        let service = ns.api::<Service>().get("chat").await.unwrap().spec.unwrap();
        let selector = service.selector.clone().unwrap_or_default();
        assert_eq!(
            selector.get("promptflow.dev/compute-instance").map(String::as_str),
            Some("ci"),
            "{service:?}"
        );
        assert_eq!(service.cluster_ip.as_deref(), Some("None"), "headless: {service:?}");
        assert_eq!(service.ports.as_ref().unwrap()[0].port, 8101, "{service:?}");
    })
    .await;
}

#[tokio::test]
async fn two_runtimes_attached_together_cause_one_restart() {
    with_namespace("pf-ci-batch", |ns| async move {
        let _operator = operator(&ns);
        create_instance(&ns, "ci", json!({})).await;
        wait_state(&ns, "ci", InstanceState::Running, None).await;
        let first_uid = ns.api::<Pod>().get(POD).await.unwrap().uid().unwrap();
        let uids = PodUids::watch(&ns, POD).await;

        create_on_instance(&ns, "a", "ci", true).await;
        create_on_instance(&ns, "b", "ci", true).await;
        let a = wait_runtime(&ns, "a", RuntimePhase::Running, None).await;
        let b = wait_runtime(&ns, "b", RuntimePhase::Running, None).await;
        wait_running_with(&ns, "ci", &["a", "b"]).await;
        sleep(BATCH + Duration::from_secs(1)).await;

        let pod = ns.api::<Pod>().get(POD).await.unwrap();
        let containers = container_names(&pod);
        let all = ["rt-a", "px-a", "rt-b", "px-b"];
        assert!(all.iter().all(|c| containers.contains(c)), "{containers:?}");
        assert_eq!(
            uids.uids(),
            BTreeSet::from([first_uid, pod.uid().unwrap()]),
            "one restart for both runtimes"
        );
        assert_event_times(&ns, INSTANCE, "ci", "RuntimesChanged", 1).await;
        // Slots in name order: a proxies on 8101, b on 8111.
        let url = |rt: &PromptFlowRuntime| rt.status.as_ref().and_then(|s| s.url.clone()).unwrap_or_default();
        assert!(url(&a).ends_with(":8101"), "{:?}", a.status);
        assert!(url(&b).ends_with(":8111"), "{:?}", b.status);
    })
    .await;
}

#[tokio::test]
async fn stop_and_start_the_instance() {
    with_namespace("pf-ci-stop", |ns| async move {
        let _operator = operator(&ns);
        let instances = ns.api::<ComputeInstance>();
        create_instance(&ns, "ci", json!({})).await;
        create_on_instance(&ns, "chat", "ci", true).await;
        wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        let pod_uid = ns.api::<Pod>().get(POD).await.unwrap().uid().unwrap();

        merge(&instances, "ci", json!({"spec": {"state": "Stopped"}})).await;
        wait_state(&ns, "ci", InstanceState::Stopped, Some("StoppedBySpec")).await;
        harness::wait_deleted(&ns.api::<Pod>(), POD, &pod_uid, WAIT).await;
        wait_runtime(&ns, "chat", RuntimePhase::NotAvailable, Some("ComputeInstanceStopped")).await;

        merge(&instances, "ci", json!({"spec": {"state": "Running"}})).await;
        wait_state(&ns, "ci", InstanceState::Running, None).await;
        wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        wait_running_with(&ns, "ci", &["chat"]).await;
    })
    .await;
}

#[tokio::test]
async fn runtime_on_a_missing_instance_recovers() {
    with_namespace("pf-ci-missing", |ns| async move {
        let _operator = operator(&ns);
        create_on_instance(&ns, "chat", "later", true).await;
        wait_runtime(&ns, "chat", RuntimePhase::NotAvailable, Some("ComputeInstanceNotFound")).await;
        create_instance(&ns, "later", json!({})).await;
        wait_runtime(&ns, "chat", RuntimePhase::Running, None).await;
        wait_running_with(&ns, "later", &["chat"]).await;
    })
    .await;
}

#[tokio::test]
async fn deleting_a_runtime_detaches_it_and_deleting_everything_leaves_no_finalizers() {
    with_namespace("pf-ci-detach", |ns| async move {
        let _operator = operator(&ns);
        let instances = ns.api::<ComputeInstance>();
        let runtimes = ns.api::<PromptFlowRuntime>();
        create_instance(&ns, "ci", json!({})).await;
        create_on_instance(&ns, "a", "ci", true).await;
        create_on_instance(&ns, "b", "ci", true).await;
        wait_runtime(&ns, "a", RuntimePhase::Running, None).await;
        wait_runtime(&ns, "b", RuntimePhase::Running, None).await;
        wait_running_with(&ns, "ci", &["a", "b"]).await;
        let a = runtimes.get("a").await.unwrap();
        assert!(
            a.finalizers().iter().any(|f| f == "promptflow.dev/detach"),
            "{:?}",
            a.finalizers()
        );
        let restarts = times(&events_about(&ns, INSTANCE, "ci").await, "RuntimesChanged");

        // Deleting a runtime detaches it first, with one restart.
        runtimes.delete("a", &DeleteParams::default()).await.unwrap();
        harness::wait_deleted(&runtimes, "a", &a.uid().unwrap(), WAIT).await;
        wait_running_with(&ns, "ci", &["b"]).await;
        let pod = ns.api::<Pod>().get(POD).await.unwrap();
        let containers = container_names(&pod);
        assert!(
            !containers.contains(&"rt-a") && containers.contains(&"rt-b"),
            "{containers:?}"
        );
        assert_event_times(&ns, INSTANCE, "ci", "RuntimesChanged", restarts + 1).await;

        // Deleting the instance and its last runtime at once leaves nothing stuck.
        let instance_uid = instances.get("ci").await.unwrap().uid().unwrap();
        let b_uid = runtimes.get("b").await.unwrap().uid().unwrap();
        instances.delete("ci", &DeleteParams::default()).await.unwrap();
        runtimes.delete("b", &DeleteParams::default()).await.unwrap();
        let gone = Duration::from_secs(30);
        tokio::join!(
            harness::wait_deleted(&instances, "ci", &instance_uid, gone),
            harness::wait_deleted(&runtimes, "b", &b_uid, gone),
        );
    })
    .await;
}

#[tokio::test]
async fn switching_a_serverless_runtime_to_an_instance_removes_its_pod() {
    with_namespace("pf-ci-switch", |ns| async move {
        let _operator = operator(&ns);
        let pods = ns.api::<Pod>();
        let runtimes = ns.api::<PromptFlowRuntime>();
        create_runtime(&ns, "sw", json!({})).await;
        wait_runtime(&ns, "sw", RuntimePhase::Running, None).await;
        let serverless_uid = pods.get("sw-runtime").await.unwrap().uid().unwrap();
        create_instance(&ns, "ci", json!({})).await;
        wait_state(&ns, "ci", InstanceState::Running, None).await;

        let compute = json!({"serverless": null, "instance": {"name": "ci", "acknowledgeRestart": true}});
        merge(&runtimes, "sw", json!({"spec": {"compute": compute}})).await;
        harness::wait_deleted(&pods, "sw-runtime", &serverless_uid, WAIT).await;
        wait_until(&runtimes, "sw", "Running on ci", WAIT, |rt: &PromptFlowRuntime| {
            rt.status
                .as_ref()
                .is_some_and(|s| s.phase == RuntimePhase::Running && s.compute.as_deref() == Some("ci"))
        })
        .await;
        wait_running_with(&ns, "ci", &["sw"]).await;
    })
    .await;
}

#[tokio::test]
async fn a_schedule_stops_and_starts_the_instance() {
    with_namespace("pf-ci-schedule", |ns| async move {
        let _operator = operator(&ns);
        create_instance(&ns, "ci", json!({})).await;
        // A zone of the right form that no time zone database knows.
        let mars = json!({"schedules": [{"action": "Stop", "cron": "0 19 * * *", "timeZone": "Mars/Olympus"}]});
        create_instance(&ns, "mars", mars).await;
        wait_state(&ns, "ci", InstanceState::Running, None).await;
        let invalid = wait_instance(&ns, "mars", "with Accepted=False", WAIT, |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "False")
        })
        .await;
        let status = invalid.status.unwrap();
        let condition = status.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert!(condition.message.contains("spec.schedules[0]"), "{condition:?}");
        wait_state(&ns, "mars", InstanceState::Running, None).await;

        let stop_at = next_minute();
        schedule_once(&ns, "ci", ScheduleAction::Stop, stop_at).await;
        wait_stopped(&ns, "ci", "ScheduledStop", until(stop_at + 45)).await;
        assert!(unix_now() >= stop_at - 1, "stopped before {stop_at}, at {}", unix_now());
        wait_reason(&ns, INSTANCE, "ci", "ScheduledStop").await;

        let start_at = next_minute();
        schedule_once(&ns, "ci", ScheduleAction::Start, start_at).await;
        wait_instance(&ns, "ci", "started by its schedule", until(start_at + 45), |s| {
            s.state == InstanceState::Running
        })
        .await;
        assert!(
            unix_now() >= start_at - 1,
            "started before {start_at}, at {}",
            unix_now()
        );
        wait_reason(&ns, INSTANCE, "ci", "ScheduledStart").await;

        let mars = ns.api::<ComputeInstance>().get("mars").await.unwrap();
        assert_eq!(
            mars.status.as_ref().map(|s| s.state),
            Some(InstanceState::Running),
            "an unusable schedule stops nothing: {}",
            status_of(Some(&mars))
        );
    })
    .await;
}

#[tokio::test]
async fn idle_shutdown_and_the_clock_reset_rule() {
    with_namespace("pf-ci-idle", |ns| async move {
        let _operator = operator(&ns);
        let instances = ns.api::<ComputeInstance>();
        let created = Instant::now();
        create_instance(&ns, "idle", json!({"idleTimeBeforeShutdown": "8s"})).await;
        wait_state(&ns, "idle", InstanceState::Running, None).await;
        wait_stopped(&ns, "idle", "IdleShutdown", Duration::from_secs(40)).await;
        let after = created.elapsed();
        assert!(
            after >= Duration::from_secs(7),
            "stopped {after:?} after creation, before its 8s idle time"
        );
        wait_reason(&ns, INSTANCE, "idle", "IdleShutdown").await;

        // Lowering the idle time below the time already idle restarts the clock: no stop at once.
        create_instance(&ns, "reset", json!({"idleTimeBeforeShutdown": "1h"})).await;
        wait_state(&ns, "reset", InstanceState::Running, None).await;
        sleep(Duration::from_secs(6)).await;
        merge(&instances, "reset", json!({"spec": {"idleTimeBeforeShutdown": "4s"}})).await;
        let patched = Instant::now();
        while patched.elapsed() < Duration::from_secs(2) {
            let reset = instances.get("reset").await.unwrap();
            assert_eq!(
                reset.status.as_ref().map(|s| s.state),
                Some(InstanceState::Running),
                "stopped {:?} after its idle time was lowered: {}",
                patched.elapsed(),
                status_of(Some(&reset))
            );
            sleep(POLL).await;
        }
        wait_stopped(&ns, "reset", "IdleShutdown", Duration::from_secs(30)).await;
    })
    .await;
}
