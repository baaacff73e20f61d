//! The queue in front of the runtime reconciles. Every watch event, mapper, wake and due
//! deadline that names a runtime lands here: a runtime named again while it waits keeps its place
//! (one entry per runtime), and the [`runner`](super::runner) takes the next one only when few
//! reconciles are waiting for a turn ([`FairGate`](super::fair::FairGate)), round robin over
//! namespaces (oldest first within each) like the turns themselves. So a backlog or a relist of
//! 10,000 runtimes waits here as 10,000 names, not as 10,000 spawned reconciles, and a quiet
//! namespace's runtime is taken after one of each busy namespace's, not after their backlogs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use kube::runtime::reflector::ObjectRef;

use super::lean::{LeanRuntime, Named};

/// The queue; see the module documentation.
pub struct FairQueue {
    /// Round robin over namespaces; false: first come, first served.
    fair: bool,
    state: Mutex<State>,
    pushed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Per namespace (one bucket for all when not fair), its runtimes in arrival order.
    buckets: HashMap<Arc<str>, VecDeque<Named>>,
    /// The buckets with runtimes waiting, in the order their next turns come.
    order: VecDeque<Arc<str>>,
    /// Every runtime in a bucket.
    queued: HashSet<Named>,
    closed: bool,
}

impl FairQueue {
    /// An empty queue, round robin over namespaces when `fair`.
    pub fn new(fair: bool) -> Arc<Self> {
        Arc::new(Self {
            fair,
            state: Mutex::new(State::default()),
            pushed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `runtime` unless it is queued already (it keeps its place).
    pub fn push(&self, runtime: &ObjectRef<LeanRuntime>) {
        self.push_key(Named::of(runtime));
    }

    /// [`FairQueue::push`] by key.
    pub fn push_key(&self, key: Named) {
        {
            let mut state = self.lock();
            if state.closed || state.queued.contains(&key) {
                return;
            }
            let bucket = if self.fair { key.0.clone() } else { Arc::from("") };
            let queue = state.buckets.entry(bucket.clone()).or_default();
            let first = queue.is_empty();
            queue.push_back(key.clone());
            if first {
                state.order.push_back(bucket);
            }
            state.queued.insert(key);
        }
        self.pushed.notify_one();
    }

    /// Queues `key` first in its namespace's line (a runtime given a place to launch: its
    /// namespace's backlog must not come first); one queued already moves there.
    pub fn push_front_key(&self, key: Named) {
        {
            let mut state = self.lock();
            if state.closed {
                return;
            }
            let queued = state.queued.contains(&key);
            let bucket = if self.fair { key.0.clone() } else { Arc::from("") };
            let queue = state.buckets.entry(bucket.clone()).or_default();
            let first = queue.is_empty();
            if queued && let Some(at) = queue.iter().position(|waiting| *waiting == key) {
                queue.remove(at);
            }
            queue.push_front(key.clone());
            if first {
                state.order.push_back(bucket);
            }
            state.queued.insert(key);
        }
        self.pushed.notify_one();
    }

    /// The next runtime, once there is one; `None` once closed.
    pub async fn next(&self) -> Option<Named> {
        loop {
            let pushed = self.pushed.notified();
            if let Some(next) = self.try_next() {
                return next;
            }
            pushed.await;
        }
    }

    /// `Some(None)`: closed; `None`: nothing waits.
    fn try_next(&self) -> Option<Option<Named>> {
        let mut state = self.lock();
        if state.closed {
            return Some(None);
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
        Some(Some(key))
    }

    /// The next runtime if one waits (tests).
    #[cfg(test)]
    pub fn try_take(&self) -> Option<Named> {
        self.try_next().flatten()
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
        self.pushed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn key(namespace: &str, name: &str) -> ObjectRef<LeanRuntime> {
        ObjectRef::new(name).within(namespace)
    }

    /// What waits now, in the order it is taken.
    fn drain(queue: &FairQueue) -> Vec<String> {
        std::iter::from_fn(|| queue.next().now_or_never().flatten())
            .map(|Named(namespace, name)| format!("{namespace}/{name}"))
            .collect()
    }

    #[test]
    fn runtimes_are_taken_round_robin_over_namespaces_once_each() {
        let queue = FairQueue::new(true);
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
        assert_eq!(queue.waiting(), 7, "c1 named twice waits once, in its first place");
        assert_eq!(
            drain(&queue),
            [
                "crowd/c1", "quiet/q1", "other/o1", "crowd/c2", "quiet/q2", "crowd/c3", "crowd/c4"
            ]
        );
        // Taken, then named again: it waits again.
        queue.push(&key("crowd", "c1"));
        assert_eq!(drain(&queue), ["crowd/c1"]);
        assert_eq!(queue.waiting(), 0);
    }

    #[test]
    fn without_fairness_runtimes_go_first_come_first_served() {
        let queue = FairQueue::new(false);
        for (namespace, name) in [("crowd", "c1"), ("crowd", "c2"), ("quiet", "q1"), ("crowd", "c3")] {
            queue.push(&key(namespace, name));
        }
        assert_eq!(drain(&queue), ["crowd/c1", "crowd/c2", "quiet/q1", "crowd/c3"]);
    }

    #[tokio::test]
    async fn a_push_wakes_the_taker_and_closing_ends_it() {
        let queue = FairQueue::new(true);
        let taker = tokio::spawn({
            let queue = queue.clone();
            async move { (queue.next().await, queue.next().await) }
        });
        tokio::task::yield_now().await;
        queue.push(&key("b", "b1"));
        tokio::task::yield_now().await;
        queue.close();
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(5), taker)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(first.map(|k| k.1.to_string()), Some("b1".to_owned()));
        assert_eq!(second, None, "closed");
        queue.push(&key("b", "b2"));
        assert_eq!(queue.waiting(), 0, "a closed queue takes nothing");
    }
}
