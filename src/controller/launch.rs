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

use super::lean::{LeanPod, Named, status};
use super::queue::FairQueue;
use crate::build::pod::{POD_SUFFIX, RUNTIME_LABEL};

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

/// A reserved place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grant {
    /// Handed to a parked runtime at this moment; its next reconcile claims it.
    Handed(Instant),
    /// Claimed by a reconcile in progress.
    Claimed,
    /// Its pod was created; the place turns into the pod's once the pod is seen.
    Created,
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
    /// Pods waiting for the scheduler, all namespaces.
    waiting: usize,
    /// Places reserved, all namespaces.
    granted: usize,
    /// Parked runtimes, all namespaces.
    parked: usize,
    /// Namespaces with runtimes parked.
    contending: usize,
    /// When the scheduler last took one of the waiting pods (or the first began to wait).
    progress: Option<Instant>,
    /// The stall the parked runtimes were last woken for (its `progress`).
    announced: Option<Instant>,
}

#[derive(Default)]
struct Space {
    /// The operator's pods waiting for the scheduler, by name.
    waiting: HashSet<Arc<str>>,
    /// Places reserved for runtimes, by runtime name.
    granted: HashMap<Arc<str>, Grant>,
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
    /// Whether `namespace`, holding `held` places, may take one more: a namespace holding none
    /// always may; others while the window has room and they hold less than their share of it
    /// (the window split over the namespaces with runtimes parked), or no other namespace has
    /// runtimes parked.
    fn room(&self, limit: usize, namespace: &str, held: usize) -> bool {
        if held == 0 {
            return true;
        }
        if self.waiting + self.granted >= limit {
            return false;
        }
        let parked_here = self
            .spaces
            .get(namespace)
            .is_some_and(|space| !space.parked_names.is_empty());
        let others = self.contending - usize::from(parked_here);
        others == 0 || held < (limit / (others + 1)).max(1)
    }

    /// Runs `change` on `namespace`'s space, keeping the totals, and drops the space once empty.
    fn with_space<R>(&mut self, namespace: &Arc<str>, change: impl FnOnce(&mut Space) -> R) -> R {
        let space = self.spaces.entry(namespace.clone()).or_default();
        let before = (
            !space.parked_names.is_empty(),
            space.waiting.len(),
            space.granted.len(),
            space.parked_names.len(),
        );
        let result = change(space);
        let after = (
            !space.parked_names.is_empty(),
            space.waiting.len(),
            space.granted.len(),
            space.parked_names.len(),
        );
        if space.is_empty() {
            self.spaces.remove(namespace);
        }
        // Each total holds its namespaces' counts, so none of these goes below zero.
        self.contending = self.contending + usize::from(after.0) - usize::from(before.0);
        self.waiting = self.waiting + after.1 - before.1;
        self.granted = self.granted + after.2 - before.2;
        self.parked = self.parked + after.3 - before.3;
        if before.1 == 0 && after.1 > 0 && self.waiting == after.1 {
            // The first pod to wait after none did: the scheduler's time starts now.
            self.progress = Some(Instant::now());
        }
        result
    }

    /// Hands places to the parked runtimes of `namespace` while it has room; returns them.
    fn pump(&mut self, limit: usize, namespace: &Arc<str>) -> Vec<Named> {
        let mut handed = vec![];
        while let Some(space) = self.spaces.get(namespace) {
            if space.parked_names.is_empty() || !self.room(limit, namespace, space.held()) {
                break;
            }
            let now = Instant::now();
            let next = self.with_space(namespace, |space| {
                while let Some(name) = space.line.pop_front() {
                    if space.parked_names.remove(&name) {
                        space.granted.insert(name.clone(), Grant::Handed(now));
                        return Some(name);
                    }
                }
                None
            });
            match next {
                Some(name) => handed.push(Named(namespace.clone(), name)),
                None => break,
            }
        }
        if let Some(space) = self.spaces.get_mut(namespace)
            && space.line.is_empty()
        {
            space.line = VecDeque::new();
        }
        handed
    }

    /// [`State::pump`] for `first`, then for every other namespace with runtimes parked (a place
    /// freed in one namespace may be another's: shares grow as namespaces stop waiting).
    fn pump_all(&mut self, limit: usize, first: &Arc<str>) -> Vec<Named> {
        let mut handed = self.pump(limit, first);
        if self.parked > 0 {
            let others: Vec<Arc<str>> = self
                .spaces
                .iter()
                .filter(|(namespace, space)| *namespace != first && !space.parked_names.is_empty())
                .map(|(namespace, _)| namespace.clone())
                .collect();
            for namespace in others {
                handed.extend(self.pump(limit, &namespace));
            }
        }
        handed
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
        let held = state.spaces.get(namespace).map_or(0, Space::held);
        let room = state.room(self.limit, namespace, held);
        let go = state.with_space(namespace, |space| {
            if let Some(grant) = space.granted.get_mut(name) {
                *grant = Grant::Claimed;
                return true;
            }
            if room {
                space.parked_names.remove(name);
                space.granted.insert(name.clone(), Grant::Claimed);
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
            && let Some(grant) = space.granted.get_mut(name)
        {
            *grant = Grant::Created;
        }
    }

    /// Whether a place is being held for `key` until its next reconcile (which then runs first
    /// in its namespace's line).
    pub fn handed(&self, key: &Named) -> bool {
        let Named(namespace, name) = key;
        self.lock()
            .spaces
            .get(namespace)
            .and_then(|space| space.granted.get(name))
            .is_some_and(|grant| matches!(grant, Grant::Handed(_)))
    }

    /// The reconcile of `key` that began at `began` ended: a place it claimed and did not use, or
    /// one handed to it before it began and left unclaimed (it no longer launches), goes on. One
    /// handed while it ran waits for its next reconcile.
    pub fn done(&self, key: &Named, began: Instant) {
        let Named(namespace, name) = key;
        let mut state = self.lock();
        let unused = state
            .spaces
            .get(namespace)
            .and_then(|space| space.granted.get(name))
            .is_some_and(|grant| match grant {
                Grant::Claimed => true,
                Grant::Handed(at) => *at < began,
                Grant::Created => false,
            });
        if unused {
            state.with_space(namespace, |space| space.granted.remove(name));
            let handed = state.pump_all(self.limit, namespace);
            drop(state);
            self.wake(handed);
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
        let handed = state.pump_all(self.limit, namespace);
        drop(state);
        self.wake(handed);
    }

    /// Keeps only the parked and granted runtimes `exists` says are there.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut state = self.lock();
        let namespaces: Vec<Arc<str>> = state.spaces.keys().cloned().collect();
        let mut handed = vec![];
        for namespace in &namespaces {
            state.with_space(namespace, |space| {
                space.parked_names.retain(|name| exists(namespace, name));
                space.granted.retain(|name, _| exists(namespace, name));
            });
        }
        for namespace in &namespaces {
            handed.extend(state.pump(self.limit, namespace));
        }
        drop(state);
        self.wake(handed);
    }

    /// Follows the operator's pod watch: which of its runtime pods wait for the scheduler.
    /// `ours(namespace, runtime, controller uid)`: whether a pod labelled for `runtime` is
    /// controlled by that runtime (anyone may label a pod like the operator's; only the
    /// operator's own count).
    pub fn observe(&self, event: &watcher::Event<LeanPod>, ours: impl Fn(&str, &str, Option<&str>) -> bool) {
        if self.limit == 0 {
            return;
        }
        let mut state = self.lock();
        let mut handed = vec![];
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                // A runtime's own pod: named for it and controlled by it.
                let runtime = pod
                    .label(RUNTIME_LABEL)
                    .filter(|runtime| name.strip_suffix(POD_SUFFIX) == Some(*runtime));
                let space = state.spaces.get(namespace);
                let granted = runtime.is_some_and(|r| space.is_some_and(|s| s.granted.contains_key(r)));
                let was_waiting = space.is_some_and(|s| s.waiting.contains(name));
                let candidate = pod.awaits_scheduler();
                // Most events (a running pod's status) concern no place: nothing to do.
                if granted || was_waiting || (candidate && runtime.is_some()) {
                    let runtime = runtime.filter(|runtime| ours(namespace, runtime, controller_uid(pod)));
                    let waits = candidate && runtime.is_some();
                    let placed = pod.tried_by_scheduler();
                    let going = pod.metadata.deletion_timestamp.is_some();
                    let (left, freed) = state.with_space(&status::text(namespace), |space| {
                        let held = space.held();
                        // Its runtime's place turns into the pod's.
                        if let Some(runtime) = runtime
                            && !going
                        {
                            space.granted.remove(runtime);
                        }
                        let left = if waits {
                            space.waiting.insert(Arc::from(name));
                            false
                        } else {
                            space.waiting.remove(name)
                        };
                        (left, space.held() < held)
                    });
                    if left && placed {
                        state.progress = Some(Instant::now());
                    }
                    if freed {
                        handed = state.pump_all(self.limit, &status::text(namespace));
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                let namespace = status::text(&pod.namespace().unwrap_or_default());
                let name = pod.name_any();
                if state
                    .spaces
                    .get(&namespace)
                    .is_some_and(|space| space.waiting.contains(name.as_str()))
                {
                    state.with_space(&namespace, |space| space.waiting.remove(name.as_str()));
                    handed = state.pump_all(self.limit, &namespace);
                }
            }
            watcher::Event::Init => {
                // The relist brings back every pod that still waits.
                let namespaces: Vec<Arc<str>> = state.spaces.keys().cloned().collect();
                for namespace in namespaces {
                    state.with_space(&namespace, |space| space.waiting.clear());
                }
            }
            watcher::Event::InitDone => {
                // A created pod the relist did not bring went while the watch was away.
                let namespaces: Vec<Arc<str>> = state.spaces.keys().cloned().collect();
                for namespace in &namespaces {
                    state.with_space(namespace, |space| {
                        space.granted.retain(|_, grant| *grant != Grant::Created)
                    });
                }
                for namespace in &namespaces {
                    handed.extend(state.pump(self.limit, namespace));
                }
            }
        }
        drop(state);
        self.wake(handed);
        // The scheduler's time may have started or moved on.
        self.changed.notify_one();
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

/// The uid of `pod`'s controller owner.
fn controller_uid(pod: &LeanPod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str())
}

#[cfg(test)]
mod tests;
