//! The launch window: how many of the operator's runtime pods wait for kube-scheduler at once.
//!
//! kube-scheduler keeps one queue for the whole cluster, ordered by priority and then by age, and
//! binds at its client's rate (50 a second by default). A namespace that starts thousands of
//! runtimes at once would put thousands of pods ahead of every other namespace's next pod: the
//! operator's fair turns ([`fair`](super::fair)) would end at the scheduler's door. So a runtime's
//! pod is created only while fewer than `limit` of the operator's runtime pods wait for the
//! scheduler, shared out over the namespaces with pods waiting (each at least one), and a runtime
//! whose namespace has used its share parks here, writing nothing, until one of that namespace's
//! pods is placed or goes. It then gets a reserved place (a grant) and goes to the front of its
//! namespace's line in the [`FairQueue`]. A pod waits for the scheduler from its creation until
//! the scheduler has tried it (its `PodScheduled` condition is set, True or False) or it goes.
//!
//! When the scheduler has placed none of the waiting pods for [`STALL_AFTER`] (stopped, or
//! refused by the API server), the parked runtimes are woken once to say so in their status.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lean::{LeanPod, Named};
use super::queue::FairQueue;
use crate::build::pod::RUNTIME_LABEL;

/// How long the scheduler may place none of the waiting pods before the parked runtimes say so.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// May a runtime create its pod now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Yes: a place is reserved for it until its reconcile ends (or its pod is seen).
    Go,
    /// Not yet: it is woken when its turn comes. `stalled`: the scheduler has placed none of the
    /// waiting pods for [`STALL_AFTER`].
    Parked { stalled: bool },
}

/// The window; see the module documentation.
pub struct LaunchWindow {
    /// Pods that may wait for the scheduler at once; 0: no window.
    limit: usize,
    queue: Arc<FairQueue>,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Per namespace with pods waiting, grants or parked runtimes.
    spaces: HashMap<Arc<str>, Space>,
    /// Namespaces with pods waiting or grants out.
    busy: usize,
    /// Pods waiting for the scheduler, all namespaces.
    waiting: usize,
    /// Parked runtimes, all namespaces.
    parked: usize,
    /// When the scheduler last took a waiting pod (or the first one began to wait).
    progress: Option<Instant>,
    /// The stall the parked runtimes were last woken for (its `progress`).
    announced: Option<Instant>,
    /// During a relist: the waiting pods it brought.
    relisting: Option<HashSet<Named>>,
}

#[derive(Default)]
struct Space {
    /// Pods waiting for the scheduler, by name.
    waiting: HashSet<Arc<str>>,
    /// Runtimes with a place reserved, by name; true once their pod is created (the grant then
    /// lasts until the pod is seen).
    granted: HashMap<Arc<str>, bool>,
    /// Parked runtimes, oldest first (entries no longer in `parked_names` are skipped).
    line: VecDeque<Arc<str>>,
    parked_names: HashSet<Arc<str>>,
}

impl Space {
    fn held(&self) -> usize {
        self.waiting.len() + self.granted.len()
    }

    fn is_empty(&self) -> bool {
        self.held() == 0 && self.parked_names.is_empty()
    }
}

impl State {
    /// A namespace's share of the window.
    fn share(&self, limit: usize, namespace: &str) -> usize {
        let holding = self.spaces.get(namespace).is_some_and(|space| space.held() > 0);
        let busy = self.busy + usize::from(!holding);
        (limit / busy.max(1)).max(1)
    }

    /// Runs `change` on `namespace`'s space, keeping the totals, and drops the space once empty.
    fn with_space<R>(&mut self, namespace: &Arc<str>, change: impl FnOnce(&mut Space) -> R) -> R {
        let space = self.spaces.entry(namespace.clone()).or_default();
        let (held, waiting, parked) = (space.held() > 0, space.waiting.len(), space.parked_names.len());
        let result = change(space);
        let (held_now, waiting_now, parked_now) = (space.held() > 0, space.waiting.len(), space.parked_names.len());
        if space.is_empty() {
            self.spaces.remove(namespace);
        }
        self.busy = self.busy + usize::from(held_now) - usize::from(held);
        self.waiting = self.waiting + waiting_now - waiting;
        self.parked = self.parked + parked_now - parked;
        if waiting == 0 && waiting_now > 0 && self.waiting == waiting_now {
            // The first pod to wait after none did: the scheduler's time starts now.
            self.progress = Some(Instant::now());
        }
        result
    }

    /// Grants places to the parked runtimes of `namespace` while its share allows; returns them.
    fn pump(&mut self, limit: usize, namespace: &Arc<str>) -> Vec<Named> {
        let share = self.share(limit, namespace);
        self.with_space(namespace, |space| {
            let mut granted = vec![];
            while space.held() < share
                && let Some(name) = space.line.pop_front()
            {
                if space.parked_names.remove(&name) {
                    space.granted.insert(name.clone(), false);
                    granted.push(Named(namespace.clone(), name));
                }
            }
            if space.line.is_empty() {
                space.line = VecDeque::new();
            }
            granted
        })
    }

    fn stalled(&self, now: Instant) -> bool {
        self.waiting > 0 && self.progress.is_some_and(|at| now.duration_since(at) >= STALL_AFTER)
    }
}

impl LaunchWindow {
    /// A window of `limit` pods (0: none) whose parked runtimes are woken through `queue`.
    pub fn new(limit: usize, queue: Arc<FairQueue>) -> Self {
        Self {
            limit,
            queue,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The window's size (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the runtime `key`, about to create its pod, may do so now; parks it if not.
    pub fn acquire(&self, key: &Named) -> Launch {
        if self.limit == 0 {
            return Launch::Go;
        }
        let Named(namespace, name) = key;
        let mut state = self.lock();
        let share = state.share(self.limit, namespace);
        let go = state.with_space(namespace, |space| {
            if space.granted.contains_key(name) {
                return true;
            }
            if space.held() < share {
                space.parked_names.remove(name);
                space.granted.insert(name.clone(), false);
                return true;
            }
            if space.parked_names.insert(name.clone()) {
                space.line.push_back(name.clone());
            }
            false
        });
        if go {
            return Launch::Go;
        }
        let stalled = state.stalled(Instant::now());
        drop(state);
        self.changed.notify_one();
        Launch::Parked { stalled }
    }

    /// The runtime `key` created its pod: its place is kept until the pod is seen.
    pub fn launched(&self, key: &Named) {
        let Named(namespace, name) = key;
        let mut state = self.lock();
        if let Some(space) = state.spaces.get_mut(namespace)
            && let Some(created) = space.granted.get_mut(name)
        {
            *created = true;
        }
    }

    /// The reconcile of `key` ended: a place it did not use goes to the next parked runtime.
    pub fn done(&self, key: &Named) {
        let Named(namespace, name) = key;
        let mut state = self.lock();
        let unused = state
            .spaces
            .get(namespace)
            .is_some_and(|space| space.granted.get(name) == Some(&false));
        if unused {
            state.with_space(namespace, |space| space.granted.remove(name));
            let woken = state.pump(self.limit, namespace);
            drop(state);
            self.wake(woken);
        }
    }

    /// The runtime `key` is gone: it neither waits nor holds a place.
    pub fn forget(&self, key: &Named) {
        let Named(namespace, name) = key;
        let mut state = self.lock();
        if !state.spaces.contains_key(namespace) {
            return;
        }
        state.with_space(namespace, |space| {
            space.parked_names.remove(name);
            space.granted.remove(name);
        });
        let woken = state.pump(self.limit, namespace);
        drop(state);
        self.wake(woken);
    }

    /// Keeps only the parked and granted runtimes `exists` says are there.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut state = self.lock();
        let namespaces: Vec<Arc<str>> = state.spaces.keys().cloned().collect();
        let mut woken = vec![];
        for namespace in namespaces {
            state.with_space(&namespace, |space| {
                space.parked_names.retain(|name| exists(&namespace, name));
                space.granted.retain(|name, _| exists(&namespace, name));
            });
            woken.extend(state.pump(self.limit, &namespace));
        }
        drop(state);
        self.wake(woken);
    }

    /// Follows the operator's pod watch: which runtime pods wait for the scheduler.
    pub fn observe(&self, event: &watcher::Event<LeanPod>) {
        if self.limit == 0 {
            return;
        }
        let mut state = self.lock();
        let mut woken = vec![];
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                if let Some(key) = pod_key(pod) {
                    let waits = pod.awaits_scheduler();
                    if waits && let Some(relisted) = &mut state.relisting {
                        relisted.insert(key.clone());
                    }
                    woken = self.seen(&mut state, pod, &key, waits);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(key) = pod_key(pod) {
                    woken = self.seen(&mut state, pod, &key, false);
                }
            }
            watcher::Event::Init => state.relisting = Some(HashSet::new()),
            watcher::Event::InitDone => {
                let relisted = state.relisting.take().unwrap_or_default();
                let missing: Vec<Named> = state
                    .spaces
                    .iter()
                    .flat_map(|(namespace, space)| {
                        space.waiting.iter().map(|pod| Named(namespace.clone(), pod.clone()))
                    })
                    .filter(|key| !relisted.contains(key))
                    .collect();
                for Named(namespace, pod) in missing {
                    state.with_space(&namespace, |space| space.waiting.remove(&pod));
                    state.progress = Some(Instant::now());
                    woken.extend(state.pump(self.limit, &namespace));
                }
            }
        }
        drop(state);
        self.wake(woken);
        // The scheduler's time may have started or moved on.
        self.changed.notify_one();
    }

    /// The pod `key` of a runtime was seen waiting for the scheduler or not (placed, tried, gone).
    fn seen(&self, state: &mut State, pod: &LeanPod, key: &Named, waits: bool) -> Vec<Named> {
        let Named(namespace, pod_name) = key;
        let runtime = pod.label(RUNTIME_LABEL).unwrap_or_default();
        let left = state.with_space(namespace, |space| {
            // Its runtime's place turns into the pod's.
            space.granted.remove(runtime);
            if waits {
                space.waiting.insert(pod_name.clone());
                false
            } else {
                space.waiting.remove(pod_name)
            }
        });
        if left {
            state.progress = Some(Instant::now());
            state.announced = None;
        }
        state.pump(self.limit, namespace)
    }

    fn wake(&self, runtimes: Vec<Named>) {
        if runtimes.is_empty() {
            return;
        }
        for key in runtimes {
            self.queue.push_front_key(key);
        }
        self.changed.notify_one();
    }

    /// Pods waiting for the scheduler and runtimes parked, all namespaces.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.waiting, state.parked)
    }

    /// Wakes the parked runtimes once per stall of the scheduler (for as long as it is polled),
    /// so they say in their status why they wait.
    pub async fn announce_stalls(&self) {
        loop {
            let changed = self.changed.notified();
            let next = {
                let mut state = self.lock();
                let now = Instant::now();
                match state.progress {
                    Some(at) if state.parked > 0 && state.waiting > 0 && state.announced != Some(at) => {
                        if state.stalled(now) {
                            state.announced = Some(at);
                            let parked: Vec<Named> = state
                                .spaces
                                .iter()
                                .flat_map(|(namespace, space)| {
                                    space
                                        .parked_names
                                        .iter()
                                        .map(|name| Named(namespace.clone(), name.clone()))
                                })
                                .collect();
                            drop(state);
                            for key in parked {
                                self.queue.push_key(key);
                            }
                            None
                        } else {
                            Some(at + STALL_AFTER)
                        }
                    }
                    _ => None,
                }
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A runtime pod's key; `None` for the pods of compute instances.
fn pod_key(pod: &LeanPod) -> Option<Named> {
    pod.label(RUNTIME_LABEL)?;
    Some(Named::new(&pod.namespace().unwrap_or_default(), &pod.name_any()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(limit: usize) -> (LaunchWindow, Arc<FairQueue>) {
        let queue = FairQueue::new(true);
        (LaunchWindow::new(limit, queue.clone()), queue)
    }

    fn runtime(namespace: &str, name: &str) -> Named {
        Named::new(namespace, name)
    }

    fn pod(namespace: &str, runtime: &str, scheduled: Option<&str>) -> LeanPod {
        let mut pod = serde_json::json!({
            "metadata": {"name": format!("{runtime}-runtime"), "namespace": namespace,
                         "labels": {RUNTIME_LABEL: runtime}},
            "status": {"phase": "Pending"},
        });
        if let Some(status) = scheduled {
            pod["status"]["conditions"] = serde_json::json!([{"type": "PodScheduled", "status": status}]);
        }
        serde_json::from_value(pod).unwrap()
    }

    /// Creates the pod of `name` as the reconcile would: acquire, launch, the watch's event, done.
    fn launch(window: &LaunchWindow, namespace: &str, name: &str) -> Launch {
        let key = runtime(namespace, name);
        let launch = window.acquire(&key);
        if launch == Launch::Go {
            window.launched(&key);
            window.observe(&watcher::Event::Apply(pod(namespace, name, None)));
        }
        window.done(&key);
        launch
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
        window.observe(&watcher::Event::Apply(pod("crowd", "a", Some("True"))));
        assert_eq!(drain(&queue), ["c"]);
        assert_eq!(launch(&window, "crowd", "c"), Launch::Go);
        // An unschedulable pod was tried: it no longer holds a place.
        window.observe(&watcher::Event::Apply(pod("crowd", "b", Some("False"))));
        assert_eq!(drain(&queue), ["d"]);
        assert_eq!(window.counts(), (1, 0));
    }

    #[test]
    fn a_quiet_namespace_goes_at_once_beside_a_full_one_and_the_window_is_shared() {
        let (window, queue) = window(4);
        for name in ["a", "b", "c", "d"] {
            assert_eq!(launch(&window, "crowd", name), Launch::Go);
        }
        assert_eq!(launch(&window, "crowd", "e"), Launch::Parked { stalled: false });
        // The quiet namespace holds nothing: it goes (its share is half the window).
        assert_eq!(launch(&window, "quiet", "q1"), Launch::Go);
        assert_eq!(launch(&window, "quiet", "q2"), Launch::Go);
        assert_eq!(launch(&window, "quiet", "q3"), Launch::Parked { stalled: false });
        // The crowd now holds 4 of its share of 2: two must be placed before e goes.
        window.observe(&watcher::Event::Apply(pod("crowd", "a", Some("True"))));
        window.observe(&watcher::Event::Apply(pod("crowd", "b", Some("True"))));
        assert!(drain(&queue).is_empty());
        window.observe(&watcher::Event::Apply(pod("crowd", "c", Some("True"))));
        assert_eq!(drain(&queue), ["e"]);
    }

    #[test]
    fn an_unused_place_goes_on_and_a_deleted_runtime_lets_go_of_its_own() {
        let (window, queue) = window(1);
        assert_eq!(launch(&window, "ns", "a"), Launch::Go);
        assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
        assert_eq!(launch(&window, "ns", "c"), Launch::Parked { stalled: false });
        window.observe(&watcher::Event::Delete(pod("ns", "a", None)));
        assert_eq!(drain(&queue), ["b"]);
        // b's reconcile ends without creating a pod (it waits for something else): c goes.
        window.done(&runtime("ns", "b"));
        assert_eq!(drain(&queue), ["c"]);
        // c is deleted before its turn: its place is free again.
        window.forget(&runtime("ns", "c"));
        assert_eq!(window.counts(), (0, 0));
        assert_eq!(launch(&window, "ns", "d"), Launch::Go);
    }

    #[test]
    fn a_pod_seen_before_its_create_returned_leaves_no_place_behind() {
        let (window, _queue) = window(1);
        let key = runtime("ns", "a");
        assert_eq!(window.acquire(&key), Launch::Go);
        // The watch shows the pod created and placed before the create call returns.
        window.observe(&watcher::Event::Apply(pod("ns", "a", None)));
        window.observe(&watcher::Event::Apply(pod("ns", "a", Some("True"))));
        window.launched(&key);
        window.done(&key);
        assert_eq!(window.counts(), (0, 0));
        assert_eq!(launch(&window, "ns", "b"), Launch::Go);
    }

    #[test]
    fn a_relist_forgets_pods_that_went_while_the_watch_was_away() {
        let (window, queue) = window(1);
        assert_eq!(launch(&window, "ns", "a"), Launch::Go);
        assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
        window.observe(&watcher::Event::Init);
        window.observe(&watcher::Event::InitDone);
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
        let a = runtime("ns", "a");
        assert_eq!(window.acquire(&a), Launch::Go);
        window.launched(&a);
        window.done(&a);
        assert_eq!(launch(&window, "ns", "b"), Launch::Parked { stalled: false });
        tokio::task::yield_now().await;
        window.observe(&watcher::Event::Apply(pod("ns", "a", None)));
        tokio::time::sleep(STALL_AFTER - Duration::from_secs(1)).await;
        assert!(drain(&queue).is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drain(&queue), ["b"]);
        assert_eq!(window.acquire(&runtime("ns", "b")), Launch::Parked { stalled: true });
        tokio::time::sleep(STALL_AFTER * 3).await;
        assert!(drain(&queue).is_empty(), "woken once per stall");
        announcing.abort();
    }

    #[test]
    fn no_window_lets_every_pod_go() {
        let (window, _queue) = window(0);
        for name in ["a", "b", "c"] {
            assert_eq!(launch(&window, "ns", name), Launch::Go);
        }
    }
}
