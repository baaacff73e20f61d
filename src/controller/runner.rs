//! The runtime controller's loop, in place of kube-runtime's `Controller`: runtimes come from
//! the [`FairQueue`] (watch events, mappers, wakes and due deadlines alike), each reconcile waits
//! at the [`FairGate`] for its turn, one runtime never reconciles twice at once (named again
//! while it runs, it runs again after), and the deadline a reconcile asks for replaces the one
//! before it. kube-runtime's scheduler keeps every requeued object twice (a map and a delay
//! queue, each with a four-string key) and spawns every due one at once, so 10,000 runtimes
//! created together would all wake together at their next version check and wait in its tables;
//! here a due runtime is a name pushed onto the fair queue.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use super::cache::Cache;
use super::fair::FairGate;
use super::lean::Named;
use super::queue::FairQueue;

/// What a reconcile asks for next: to be looked at again after a while, or only on a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Look again after `duration` (or sooner, on a change).
    pub fn requeue(duration: Duration) -> Self {
        Self {
            requeue_after: Some(duration),
        }
    }

    /// Look again only on a change.
    pub fn await_change() -> Self {
        Self { requeue_after: None }
    }

    /// When to look again, unless something changes first.
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// When each runtime is to be looked at again: the deadline its last reconcile asked for.
#[derive(Default)]
pub struct Timers {
    state: Mutex<TimerState>,
    changed: Notify,
}

#[derive(Default)]
struct TimerState {
    due: HashMap<Named, Instant>,
    order: BTreeSet<(Instant, Named)>,
}

impl Timers {
    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (or with `None` clears) the deadline of `key`, replacing the one before.
    pub fn set(&self, key: Named, at: Option<Instant>) {
        let mut state = self.lock();
        if let Some(before) = state.due.remove(&key) {
            state.order.remove(&(before, key.clone()));
        }
        if let Some(at) = at {
            state.order.insert((at, key.clone()));
            state.due.insert(key, at);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Clears the deadline of the runtime `name` of `namespace`.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.set(Named::new(namespace, name), None);
    }

    /// Keeps only the deadlines of the runtimes `exists` says are there.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut state = self.lock();
        state.due.retain(|Named(namespace, name), _| exists(namespace, name));
        let TimerState { due, order } = &mut *state;
        order.retain(|(_, key)| due.contains_key(key));
    }

    /// Takes the runtimes whose deadline has come by `now`.
    fn take_due(&self, now: Instant) -> Vec<Named> {
        let mut state = self.lock();
        let mut due = vec![];
        while let Some((at, _)) = state.order.first()
            && *at <= now
        {
            let (_, key) = state.order.pop_first().expect("just seen");
            state.due.remove(&key);
            due.push(key);
        }
        due
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().order.first().map(|(at, _)| *at)
    }

    /// Runtimes with a deadline.
    pub fn len(&self) -> usize {
        self.lock().due.len()
    }

    /// Whether no runtime has a deadline.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes each runtime onto `queue` when its deadline comes (for as long as it is polled).
    pub async fn fire(&self, queue: &FairQueue) {
        loop {
            let changed = self.changed.notified();
            for key in self.take_due(Instant::now()) {
                queue.push_key(key);
            }
            match self.next_due() {
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

/// Runs reconciles for the runtimes the queue hands on until it closes, then waits for the
/// running ones; starts once the cache has its first list. When its turn comes, `reconcile` is
/// given the runtime's key and cached value (under the cache's read lock: it takes what it needs
/// and returns the reconcile to run); a runtime gone by then is not reconciled (its deletion woke
/// what must follow). A runtime named again while it ran runs again after its namespace's line,
/// or first in it when `first` says so (a place to launch is held for it).
pub async fn run<T, F, Fut>(
    queue: Arc<FairQueue>,
    gate: Arc<FairGate>,
    timers: Arc<Timers>,
    store: Arc<Cache<T>>,
    first: impl Fn(&Named) -> bool + Send + Sync + 'static,
    reconcile: F,
) where
    T: Send + Sync + 'static,
    F: Fn(&Named, &T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Action> + Send + 'static,
{
    // At most twice as many reconciles as run at once are waiting at the gate or running; the
    // rest wait in the queue as names.
    let bound = gate.limit().saturating_mul(2);
    let reconcile = Arc::new(reconcile);
    let first: Arc<dyn Fn(&Named) -> bool + Send + Sync> = Arc::new(first);
    // Nothing is looked up before the first list is through (a runtime not listed yet is not
    // missing).
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let running: Arc<Mutex<HashMap<Named, Running>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = queue.next(), if tasks.len() < bound => {
                let Some(key) = next else { break };
                {
                    let mut running = running.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(state) = running.get_mut(&key) {
                        // Not read yet: the reconcile to come reads it as it is now.
                        state.again |= state.read;
                        continue;
                    }
                    running.insert(key.clone(), Running::default());
                }
                let (gate, timers, store, reconcile) = (gate.clone(), timers.clone(), store.clone(), reconcile.clone());
                let finish = Finish {
                    key: key.clone(),
                    running: running.clone(),
                    queue: queue.clone(),
                    timers: timers.clone(),
                    first: first.clone(),
                };
                tasks.spawn(async move {
                    let next = match gate.enter(&key.0).await {
                        // Shutting down: not run now; the next process looks at it.
                        None => None,
                        Some(_turn) => {
                            finish.read();
                            match store.get(&key.0, &key.1, |object| reconcile(&key, object)) {
                                Some(reconciling) => reconciling.await.requeue_after(),
                                None => None,
                            }
                        }
                    };
                    timers.set(key, next.and_then(|after| Instant::now().checked_add(after)));
                    drop(finish);
                });
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(err) = done {
                    warn!(error = %err, "a reconcile task ended abnormally");
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// A runtime's reconcile in progress.
#[derive(Default)]
struct Running {
    /// It has read the runtime from the store.
    read: bool,
    /// Named again after that read: it runs again when done.
    again: bool,
}

/// Ends a runtime's reconcile however its task ends: it no longer counts as running, runs again
/// if it was named again meanwhile, and after a panic is looked at again in a while (the
/// deadline it had may be gone).
struct Finish {
    key: Named,
    running: Arc<Mutex<HashMap<Named, Running>>>,
    queue: Arc<FairQueue>,
    timers: Arc<Timers>,
    first: Arc<dyn Fn(&Named) -> bool + Send + Sync>,
}

/// How long after a reconcile task panicked its runtime is looked at again.
const AFTER_A_PANIC: Duration = Duration::from_secs(30);

impl Finish {
    fn read(&self) {
        if let Some(state) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.key)
        {
            state.read = true;
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let state = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        if std::thread::panicking() {
            self.timers
                .set(self.key.clone(), Instant::now().checked_add(AFTER_A_PANIC));
        } else if state.is_some_and(|s| s.again) {
            if (self.first)(&self.key) {
                self.queue.push_front_key(self.key.clone());
            } else {
                self.queue.push_key(self.key.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::lean::LeanRuntime;
    use kube::runtime::reflector::ObjectRef;

    fn key(namespace: &str, name: &str) -> Named {
        Named::new(namespace, name)
    }

    #[test]
    fn a_deadline_replaces_the_one_before_and_comes_due_in_order() {
        let timers = Timers::default();
        let now = Instant::now();
        timers.set(key("a", "late"), Some(now + Duration::from_secs(30)));
        timers.set(key("a", "early"), Some(now + Duration::from_secs(60)));
        timers.set(key("a", "early"), Some(now + Duration::from_secs(10)));
        timers.set(key("b", "gone"), Some(now + Duration::from_secs(5)));
        timers.set(key("b", "gone"), None);
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next_due(), Some(now + Duration::from_secs(10)));
        assert!(timers.take_due(now).is_empty());
        assert_eq!(
            timers.take_due(now + Duration::from_secs(40)),
            [key("a", "early"), key("a", "late")]
        );
        assert!(timers.is_empty());
        timers.set(key("a", "x"), Some(now));
        timers.set(key("a", "y"), Some(now));
        timers.retain(|_, name| name == "y");
        assert_eq!(timers.take_due(now), [key("a", "y")]);
    }

    /// A cache holding one runtime, listed (and its writer, which keeps it), and its key.
    fn one_runtime() -> (Arc<Cache<()>>, super::super::cache::Writer<()>, ObjectRef<LeanRuntime>) {
        let cache = Cache::new();
        let writer = cache.writer();
        let runtime: crate::api::PromptFlowRuntime = serde_json::from_value(serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "rt", "namespace": "a", "uid": "u"},
            "spec": {},
        }))
        .unwrap();
        let lean = LeanRuntime::try_from(runtime).unwrap();
        use kube::runtime::watcher::Event;
        for event in [Event::Init, Event::InitApply(lean.clone()), Event::InitDone] {
            writer.apply(&event, |_| ());
        }
        (cache, writer, ObjectRef::from_obj(&lean))
    }

    /// A gate of `limit` turns, a fair queue, and deadlines firing onto it.
    fn parts(limit: usize) -> (Arc<FairGate>, Arc<FairQueue>, Arc<Timers>, tokio::task::JoinHandle<()>) {
        let (gate, queue, timers) = (FairGate::new(limit), FairQueue::new(true), Arc::new(Timers::default()));
        let firing = tokio::spawn({
            let (timers, queue) = (timers.clone(), queue.clone());
            async move { timers.fire(&queue).await }
        });
        (gate, queue, timers, firing)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn named_while_waiting_for_its_turn_it_runs_once_and_a_panic_leaves_a_deadline() {
        let (store, _writer, key) = one_runtime();
        let (gate, queue, timers, firing) = parts(1);
        let held = gate.enter("other").await.expect("the only turn");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = tokio::spawn(run(queue.clone(), gate.clone(), timers.clone(), store, |_| false, {
            let runs = runs.clone();
            move |_, _| {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        panic!("unforeseen");
                    }
                    Action::await_change()
                }
            }
        }));
        queue.push(&key);
        settle().await;
        // Named again while it waits for its turn, before it read the runtime.
        queue.push(&key);
        settle().await;
        drop(held);
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "one run for both");
        assert_eq!(timers.len(), 1, "after the panic it has a deadline");
        tokio::time::sleep(AFTER_A_PANIC + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2, "looked at again");
        assert!(timers.is_empty());
        queue.close();
        running.await.unwrap();
        firing.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn due_runtimes_go_to_the_queue_and_run_one_at_a_time() {
        let (store, _writer, key) = one_runtime();
        let (gate, queue, timers, firing) = parts(2);
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(0usize);
        let running = tokio::spawn(run(queue.clone(), gate, timers.clone(), store, |_| false, {
            let runs = runs.clone();
            move |_, _| {
                let (runs, mut released) = (runs.clone(), released.clone());
                async move {
                    let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let _ = released.wait_for(|r| *r >= n).await;
                    Action::requeue(Duration::from_secs(60))
                }
            }
        }));
        queue.push(&key);
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Named twice while it runs: it runs once more, after.
        queue.push(&key);
        settle().await;
        queue.push(&key);
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "never twice at once");
        release.send_replace(1);
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        release.send_replace(2);
        settle().await;
        assert_eq!(timers.len(), 1, "its deadline is set");
        // The deadline comes: it runs again.
        tokio::time::sleep(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        release.send_replace(3);
        settle().await;
        queue.close();
        running.await.unwrap();
        firing.abort();
    }
}
