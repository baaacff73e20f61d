//! The queue in front of the runtime controller. Every watch event, mapper and wake that names a
//! runtime lands here first, not in kube-runtime's scheduler: a runtime named again while it
//! waits keeps its place (one entry per runtime), and the controller is handed the next one only
//! when few reconciles are waiting for a turn ([`FairGate`]), round robin over namespaces (oldest
//! first within each) like the turns themselves. So a backlog or a relist of 10,000 runtimes
//! waits here as 10,000 names, not as 10,000 spawned reconciles parked in kube-runtime's tables
//! (which never shrink), and a quiet namespace's runtime is handed on after one of each busy
//! namespace's, not after their backlogs.
//!
//! Timed requeues and retries stay with kube-runtime's scheduler (their times spread them); they
//! wait at the gate like any other reconcile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;

use super::fair::FairGate;
use super::lean::LeanRuntime;

/// A runtime's name, within its namespace (both shared, not copied per use).
type Key = (Arc<str>, Arc<str>);

/// How long a runtime handed to the controller counts against the bound without its reconcile
/// starting. The controller starts each one or reports it not found; this only keeps a miscount
/// from shrinking the bound for good.
const HANDED_FOR_AT_MOST: Duration = Duration::from_secs(30);

/// The queue; see the module documentation.
pub struct FairQueue {
    gate: Arc<FairGate>,
    /// Round robin over namespaces; false: first come, first served.
    fair: bool,
    /// Reconciles handed on or at the gate (waiting or running) above which nothing more is
    /// handed on.
    bound: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per namespace (one bucket for all when not fair), its runtimes in arrival order.
    buckets: HashMap<Arc<str>, VecDeque<Key>>,
    /// The buckets with runtimes waiting, in the order their next turns come.
    order: VecDeque<Arc<str>>,
    /// Every runtime in a bucket.
    queued: HashSet<Key>,
    /// Handed to the controller, reconcile not started yet.
    handed: HashMap<Key, Instant>,
    closed: bool,
}

impl FairQueue {
    /// A queue handing runtimes on while fewer than twice the gate's limit are handed on or at
    /// the gate.
    pub fn new(gate: Arc<FairGate>, fair: bool) -> Arc<Self> {
        let bound = gate.limit().saturating_mul(2);
        Arc::new(Self {
            gate,
            fair,
            bound,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `runtime` unless it is queued already (it keeps its place) or handed on and not
    /// started (that reconcile reads the runtime as it is when it starts).
    pub fn push(&self, runtime: &ObjectRef<LeanRuntime>) {
        let namespace = super::lean::status::text(runtime.namespace.as_deref().unwrap_or_default());
        let key: Key = (namespace.clone(), Arc::from(runtime.name.as_str()));
        {
            let mut state = self.lock();
            if state.closed || state.queued.contains(&key) || state.handed.contains_key(&key) {
                return;
            }
            let bucket = if self.fair { namespace } else { Arc::from("") };
            let queue = state.buckets.entry(bucket.clone()).or_default();
            let first = queue.is_empty();
            queue.push_back(key.clone());
            if first {
                state.order.push_back(bucket);
            }
            state.queued.insert(key);
        }
        self.gate.freed().notify_one();
    }

    /// The next runtime to hand to the controller, once there is room; `None` once closed.
    pub async fn next(&self) -> Option<ObjectRef<LeanRuntime>> {
        loop {
            let notified = self.gate.freed().notified();
            if let Some(next) = self.try_next() {
                return next;
            }
            notified.await;
        }
    }

    /// `Some(None)`: closed; `None`: nothing to hand on now.
    fn try_next(&self) -> Option<Option<ObjectRef<LeanRuntime>>> {
        let mut state = self.lock();
        if state.closed {
            return Some(None);
        }
        if state.order.is_empty() {
            return None;
        }
        if state.handed.len() + self.gate.occupied() >= self.bound {
            let now = Instant::now();
            state
                .handed
                .retain(|_, at| now.duration_since(*at) < HANDED_FOR_AT_MOST);
            if state.handed.len() + self.gate.occupied() >= self.bound {
                return None;
            }
        }
        let bucket = state.order.pop_front()?;
        let queue = state.buckets.get_mut(&bucket)?;
        let key = queue.pop_front()?;
        if queue.is_empty() {
            state.buckets.remove(&bucket);
        } else {
            state.order.push_back(bucket);
        }
        state.queued.remove(&key);
        let runtime = ObjectRef::new(&key.1).within(&key.0);
        state.handed.insert(key, Instant::now());
        Some(Some(runtime))
    }

    /// The controller started the reconcile of a runtime handed on (or found it gone): it no
    /// longer counts against the bound.
    pub fn started(&self, namespace: Option<&str>, name: &str) {
        let key: Key = (Arc::from(namespace.unwrap_or_default()), Arc::from(name));
        if self.lock().handed.remove(&key).is_some() {
            self.gate.freed().notify_one();
        }
    }

    /// Runtimes waiting here.
    pub fn waiting(&self) -> usize {
        self.lock().queued.len()
    }

    /// Ends the queue: nothing more is handed on.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.buckets.clear();
        state.order.clear();
        state.queued.clear();
        drop(state);
        self.gate.freed().notify_one();
    }

    /// The runtimes handed on, as a stream for the controller.
    pub fn stream(self: Arc<Self>) -> impl futures::Stream<Item = ObjectRef<LeanRuntime>> + Send + 'static {
        futures::stream::unfold(
            self,
            |queue| async move { queue.next().await.map(|next| (next, queue)) },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn key(namespace: &str, name: &str) -> ObjectRef<LeanRuntime> {
        ObjectRef::new(name).within(namespace)
    }

    fn names(handed: &[ObjectRef<LeanRuntime>]) -> Vec<String> {
        handed.iter().map(|r| r.name.clone()).collect()
    }

    /// Hands on what there is room for, now.
    fn drain(queue: &FairQueue) -> Vec<ObjectRef<LeanRuntime>> {
        std::iter::from_fn(|| queue.next().now_or_never().flatten()).collect()
    }

    #[test]
    fn runtimes_are_handed_on_round_robin_over_namespaces_once_each() {
        // Room for four at a time (twice a limit of two).
        let queue = FairQueue::new(FairGate::new(2), true);
        for (namespace, name) in [
            ("crowd", "c1"),
            ("crowd", "c2"),
            ("crowd", "c3"),
            ("crowd", "c1"),
            ("quiet", "q1"),
            ("other", "o1"),
            ("quiet", "q2"),
            ("crowd", "c4"),
        ] {
            queue.push(&key(namespace, name));
        }
        assert_eq!(queue.waiting(), 7, "c1 named twice waits once");
        let first = drain(&queue);
        assert_eq!(names(&first), ["c1", "q1", "o1", "c2"]);
        // Named again while handed on and not started: nothing more to do.
        queue.push(&key("crowd", "c1"));
        assert_eq!(queue.waiting(), 3);
        assert!(drain(&queue).is_empty(), "no room until a reconcile starts");
        for runtime in &first[..2] {
            queue.started(runtime.namespace.as_deref(), &runtime.name);
        }
        assert_eq!(names(&drain(&queue)), ["q2", "c3"]);
        // Started, then named again: it queues again.
        queue.push(&key("crowd", "c1"));
        for runtime in &first[2..] {
            queue.started(runtime.namespace.as_deref(), &runtime.name);
        }
        assert_eq!(names(&drain(&queue)), ["c4", "c1"]);
        assert_eq!(queue.waiting(), 0);
    }

    #[test]
    fn without_fairness_runtimes_go_first_come_first_served() {
        let queue = FairQueue::new(FairGate::new(8), false);
        for (namespace, name) in [("crowd", "c1"), ("crowd", "c2"), ("quiet", "q1"), ("crowd", "c3")] {
            queue.push(&key(namespace, name));
        }
        let handed = drain(&queue);
        assert_eq!(names(&handed), ["c1", "c2", "q1", "c3"]);
        assert_eq!(handed[2].namespace.as_deref(), Some("quiet"));
    }

    #[tokio::test]
    async fn reconciles_waiting_at_the_gate_hold_the_queue_back_and_a_free_turn_wakes_it() {
        let gate = FairGate::new(1);
        let queue = FairQueue::new(gate.clone(), true);
        let held = gate.enter("a").await.expect("a free turn");
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter("a").await.is_some() }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            gate.occupied(),
            2,
            "one running, one waiting: the bound of two is reached"
        );
        queue.push(&key("b", "b1"));
        let mut next = Box::pin(queue.clone().stream());
        assert!(futures::StreamExt::next(&mut next).now_or_never().is_none());
        drop(held);
        assert!(waiting.await.unwrap());
        let handed = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut next))
            .await
            .expect("woken when the turns ended");
        assert_eq!(handed.map(|r| r.name), Some("b1".to_owned()));
        queue.close();
        assert_eq!(
            futures::StreamExt::next(&mut next).await,
            None,
            "closed: the stream ends"
        );
    }

    #[test]
    fn a_runtime_handed_on_and_never_started_stops_counting_after_a_while() {
        let queue = FairQueue::new(FairGate::new(1), true);
        queue.push(&key("a", "a1"));
        queue.push(&key("a", "a2"));
        queue.push(&key("a", "a3"));
        assert_eq!(names(&drain(&queue)), ["a1", "a2"]);
        // As if handed on long ago.
        for at in queue.lock().handed.values_mut() {
            *at = at
                .checked_sub(HANDED_FOR_AT_MOST)
                .expect("the clock runs longer than that");
        }
        assert_eq!(names(&drain(&queue)), ["a3"]);
    }
}
