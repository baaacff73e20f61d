//! The launch window's unit tests.

use super::*;

fn window(limit: usize) -> (LaunchWindow, Arc<FairQueue>) {
    let queue = FairQueue::new(true);
    (LaunchWindow::new(limit, queue.clone()), queue)
}

fn runtime(namespace: &str, name: &str) -> Named {
    Named::new(namespace, name)
}

/// The pod of runtime `runtime` (controlled by uid `uid-<runtime>`), `scheduled` its
/// PodScheduled condition's status if any.
fn pod(namespace: &str, runtime: &str, scheduled: Option<&str>) -> LeanPod {
    let mut pod = serde_json::json!({
        "metadata": {"name": format!("{runtime}-runtime"), "namespace": namespace,
                     "labels": {RUNTIME_LABEL: runtime},
                     "ownerReferences": [{"apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
                                          "name": runtime, "uid": format!("uid-{runtime}"), "controller": true}]},
        "status": {"phase": "Pending"},
    });
    if let Some(status) = scheduled {
        pod["status"]["conditions"] = serde_json::json!([{"type": "PodScheduled", "status": status}]);
    }
    serde_json::from_value(pod).unwrap()
}

/// Every runtime `x` exists with uid `uid-x`.
fn ours(_: &str, runtime: &str, uid: Option<&str>) -> bool {
    uid == Some(format!("uid-{runtime}").as_str())
}

fn apply(window: &LaunchWindow, pod: LeanPod) {
    window.observe(&watcher::Event::Apply(pod), ours);
}

/// Creates the pod of `name` as the reconcile would: acquire, launch, the watch's event, done.
fn launch(window: &LaunchWindow, namespace: &str, name: &str) -> Launch {
    let key = runtime(namespace, name);
    let began = Instant::now();
    let launch = window.acquire(&key);
    if launch == Launch::Go {
        window.launched(&key);
        apply(window, pod(namespace, name, None));
    }
    window.done(&key, began);
    launch
}

/// Creates the pod of `name` whose event the watch has not brought yet: acquire, launch, done.
fn create_unseen(window: &LaunchWindow, namespace: &str, name: &str) {
    let key = runtime(namespace, name);
    let began = Instant::now();
    assert_eq!(window.acquire(&key), Launch::Go);
    window.launched(&key);
    window.done(&key, began);
}

fn drain(queue: &FairQueue) -> Vec<String> {
    std::iter::from_fn(|| queue.try_take())
        .map(|Named(_, name)| name.to_string())
        .collect()
}

#[test]
fn a_namespace_waits_once_its_pods_fill_the_window_and_goes_on_as_they_are_placed() {
    let (window, queue) = window(2);
    assert_eq!(launch(&window, "crowd", "a"), Launch::Go);
    assert_eq!(launch(&window, "crowd", "b"), Launch::Go);
    assert_eq!(launch(&window, "crowd", "c"), Launch::Parked { stalled: false });
    assert_eq!(launch(&window, "crowd", "d"), Launch::Parked { stalled: false });
    assert_eq!(window.counts(), (2, 2));
    // The scheduler places a: c (parked first) gets its place, at the front of the queue.
    apply(&window, pod("crowd", "a", Some("True")));
    assert_eq!(drain(&queue), ["c"]);
    assert!(window.handed(&runtime("crowd", "c")));
    assert_eq!(launch(&window, "crowd", "c"), Launch::Go);
    // An unschedulable pod was tried: it no longer holds a place.
    apply(&window, pod("crowd", "b", Some("False")));
    assert_eq!(drain(&queue), ["d"]);
    assert_eq!(window.counts(), (1, 0));
}

#[test]
fn a_quiet_namespace_goes_at_once_beside_a_full_one_and_the_window_bounds_the_whole() {
    let (window, queue) = window(4);
    for name in ["a", "b", "c", "d"] {
        assert_eq!(launch(&window, "crowd", name), Launch::Go);
    }
    assert_eq!(launch(&window, "crowd", "e"), Launch::Parked { stalled: false });
    // The quiet namespace holds nothing: it goes, though the window is full.
    assert_eq!(launch(&window, "quiet", "q1"), Launch::Go);
    assert_eq!(launch(&window, "quiet", "q2"), Launch::Parked { stalled: false });
    // A third namespace likewise; the window stays bounded by one pod per namespace.
    assert_eq!(launch(&window, "third", "t1"), Launch::Go);
    assert_eq!(launch(&window, "third", "t2"), Launch::Parked { stalled: false });
    assert_eq!(window.counts(), (6, 3));
    // The window is over: nothing goes until it has room, then each namespace with runtimes
    // parked gets its share of it (here 4 / 3 = 1 place), a namespace holding none always one.
    apply(&window, pod("crowd", "a", Some("True")));
    apply(&window, pod("crowd", "b", Some("True")));
    apply(&window, pod("crowd", "c", Some("True")));
    assert!(drain(&queue).is_empty());
    apply(&window, pod("quiet", "q1", Some("True")));
    // q2 goes (quiet holds none); then two namespaces have runtimes parked, each with a share
    // of 2 and holding 1, and the window has one place left: one of them gets it.
    let woken = drain(&queue);
    assert_eq!(woken.len(), 2, "{woken:?}");
    assert_eq!(woken[0], "q2");
    assert!(["e", "t2"].contains(&woken[1].as_str()), "{woken:?}");
    // The other goes with the next place freed.
    apply(&window, pod("quiet", "q2", None));
    apply(&window, pod("quiet", "q2", Some("True")));
    let next = drain(&queue);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_ne!(next[0], woken[1]);
}

#[test]
fn an_unused_place_goes_on_and_a_deleted_runtime_lets_go_of_its_own() {
    let (window, queue) = window(1);
    assert_eq!(launch(&window, "ns", "a"), Launch::Go);
    assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
    assert_eq!(launch(&window, "ns", "c"), Launch::Parked { stalled: false });
    window.observe(&watcher::Event::Delete(pod("ns", "a", None)), ours);
    assert_eq!(drain(&queue), ["b"]);
    // b's next reconcile ends without creating a pod (it waits for something else): c goes.
    window.done(&runtime("ns", "b"), Instant::now());
    assert_eq!(drain(&queue), ["c"]);
    // c is deleted before its turn: its place is free again.
    window.forget(&runtime("ns", "c"));
    assert_eq!(window.counts(), (0, 0));
    assert_eq!(launch(&window, "ns", "d"), Launch::Go);
}

#[test]
fn a_place_handed_while_the_runtime_parked_waits_for_its_next_reconcile() {
    let (window, queue) = window(1);
    assert_eq!(launch(&window, "ns", "a"), Launch::Go);
    let b = runtime("ns", "b");
    let began = Instant::now();
    assert_eq!(window.acquire(&b), Launch::Parked { stalled: false });
    // a is placed before b's reconcile (which parked) has ended.
    apply(&window, pod("ns", "a", Some("True")));
    assert_eq!(drain(&queue), ["b"]);
    window.done(&b, began);
    assert!(window.handed(&b), "the place stays b's");
    assert_eq!(window.acquire(&b), Launch::Go);
}

#[test]
fn a_pod_seen_before_its_create_returned_leaves_no_place_behind() {
    let (window, _queue) = window(1);
    let key = runtime("ns", "a");
    let began = Instant::now();
    assert_eq!(window.acquire(&key), Launch::Go);
    // The watch shows the pod created and placed before the create call returns.
    apply(&window, pod("ns", "a", None));
    apply(&window, pod("ns", "a", Some("True")));
    window.launched(&key);
    window.done(&key, began);
    assert_eq!(window.counts(), (0, 0));
    assert_eq!(launch(&window, "ns", "b"), Launch::Go);
}

#[test]
fn pods_the_operator_did_not_make_count_for_nothing_and_a_label_taken_off_leaves_no_ghost() {
    let (window, queue) = window(1);
    // Labelled like the operator's, controlled by no runtime of that name.
    let mut forged = pod("ns", "x", None);
    forged.metadata.owner_references = None;
    apply(&window, forged);
    assert_eq!(window.counts(), (0, 0));
    assert_eq!(launch(&window, "ns", "a"), Launch::Go);
    assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
    // a's label is taken off while it waits: it no longer counts.
    let mut unlabelled = pod("ns", "a", None);
    unlabelled.metadata.labels = None;
    apply(&window, unlabelled);
    assert_eq!(drain(&queue), ["b"]);
}

#[test]
fn a_relist_forgets_pods_and_created_places_that_went_while_the_watch_was_away() {
    let (window, queue) = window(1);
    create_unseen(&window, "ns", "a");
    assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
    window.observe(&watcher::Event::Init, ours);
    window.observe(&watcher::Event::InitDone, ours);
    assert_eq!(drain(&queue), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_scheduler_wakes_the_parked_runtimes_once_to_say_so() {
    let (window, queue) = window(1);
    let window = Arc::new(window);
    // Already watching when the runtimes come (the pod is seen after b parked).
    let announcing = tokio::spawn({
        let window = window.clone();
        async move { window.announce_stalls().await }
    });
    tokio::task::yield_now().await;
    create_unseen(&window, "ns", "a");
    assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
    tokio::task::yield_now().await;
    apply(&window, pod("ns", "a", None));
    assert_eq!(launch(&window, "other", "z"), Launch::Go);
    // A waiting pod deleted is no progress of the scheduler.
    tokio::time::sleep(STALL_AFTER / 2).await;
    window.observe(&watcher::Event::Delete(pod("other", "z", None)), ours);
    tokio::time::sleep(STALL_AFTER / 2 - Duration::from_secs(1)).await;
    assert!(drain(&queue).is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(drain(&queue), ["b"]);
    assert_eq!(window.acquire(&runtime("ns", "b")), Launch::Parked { stalled: true });
    tokio::time::sleep(STALL_AFTER * 3).await;
    assert!(drain(&queue).is_empty(), "woken once per stall");
    announcing.abort();
}

#[test]
fn a_pod_for_another_scheduler_or_put_on_a_node_by_its_maker_does_not_wait_for_the_scheduler() {
    let (window, _queue) = window(1);
    for (field, value) in [("schedulerName", "nobody"), ("nodeName", "anywhere")] {
        let mut json = serde_json::to_value(pod("ns", "a", None).metadata).unwrap();
        json = serde_json::json!({"metadata": json, "spec": {field: value}, "status": {"phase": "Pending"}});
        let pod: LeanPod = serde_json::from_value(json).unwrap();
        assert!(!pod.awaits_scheduler(), "{field}");
        apply(&window, pod);
        assert_eq!(window.counts(), (0, 0), "{field}");
    }
}

#[test]
fn no_window_lets_every_pod_go() {
    let (window, _queue) = window(0);
    for name in ["a", "b", "c"] {
        assert_eq!(launch(&window, "ns", name), Launch::Go);
    }
}
