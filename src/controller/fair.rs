//! Fair turns across namespaces. kube-runtime's scheduler runs ready objects first come, first
//! served, so a namespace that creates thousands of runtimes at once (or a relist that brings
//! them all back) would keep every other namespace waiting until its backlog is through. The
//! runtimes to reconcile therefore wait in the [`FairQueue`](super::queue::FairQueue), and each
//! reconcile the [`runner`](super::runner) starts waits here for a turn: at most
//! `limit` run together, and when one ends the next turn goes to the next namespace in a round
//! robin over the namespaces with runtimes waiting, oldest first within each. A quiet namespace's
//! runtime thus waits for at most one turn of each busy namespace, not for their backlogs. A
//! waiting reconcile holds no more than its runtime's name and a channel; it reads the runtime
//! once it has its turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// The turns: how many run, and who waits in which namespace.
pub struct FairGate {
    limit: usize,
    /// Round robin over namespaces; false: one line for all, first come, first served.
    fair: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    /// Turns held, per namespace.
    holding: HashMap<String, usize>,
    closed: bool,
    /// Per namespace, its waiting reconciles, oldest first.
    waiting: HashMap<String, VecDeque<oneshot::Sender<()>>>,
    /// The namespaces with reconciles waiting, in the order their next turns come.
    order: VecDeque<String>,
}

/// A turn: while held, its reconcile runs; dropping it gives the turn on.
pub struct Turn {
    gate: Arc<FairGate>,
    namespace: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.gate.pass_on(Some(&self.namespace));
    }
}

/// A reconcile waiting for its turn. Dropped while waiting (the controller shutting down), a
/// turn handed to it meanwhile is passed on, never lost.
struct Waiting {
    gate: Arc<FairGate>,
    namespace: String,
    receiver: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            receiver.close();
            if receiver.try_recv().is_ok() {
                self.gate.pass_on(Some(&self.namespace));
            }
        }
    }
}

impl FairGate {
    /// A gate letting `limit` reconciles (at least one) run at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_fairness(limit, true)
    }

    /// A gate letting `limit` reconciles run at once, round robin over namespaces when `fair`,
    /// else first come, first served.
    pub fn with_fairness(limit: usize, fair: bool) -> Arc<Self> {
        Arc::new(Self {
            fair,
            limit: limit.max(1),
            state: Mutex::new(State::default()),
        })
    }

    /// Waits for a turn for a reconcile in `namespace`; `None` once the gate is closed (the
    /// controller is shutting down: the reconcile is not run).
    pub async fn enter(self: &Arc<Self>, namespace: &str) -> Option<Turn> {
        let namespace = if self.fair { namespace } else { "" };
        let receiver = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.closed {
                return None;
            }
            if state.running < self.limit && state.order.is_empty() {
                state.running += 1;
                *state.holding.entry(namespace.to_owned()).or_default() += 1;
                return Some(Turn {
                    gate: self.clone(),
                    namespace: namespace.to_owned(),
                });
            }
            let (sender, receiver) = oneshot::channel();
            let queue = state.waiting.entry(namespace.to_owned()).or_default();
            let first = queue.is_empty();
            queue.push_back(sender);
            if first {
                state.order.push_back(namespace.to_owned());
            }
            receiver
        };
        let mut waiting = Waiting {
            gate: self.clone(),
            namespace: namespace.to_owned(),
            receiver: Some(receiver),
        };
        let handed = waiting.receiver.as_mut().expect("set above").await;
        waiting.receiver = None;
        handed.ok().map(|()| Turn {
            gate: self.clone(),
            namespace: namespace.to_owned(),
        })
    }

    /// Ends a turn of `from`: the next namespace in order that holds fewer than half the turns
    /// gets it (so one namespace whose reconciles are slow cannot gather them all while others
    /// wait), else the next in order; or there is one fewer running.
    fn pass_on(&self, from: Option<&str>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(from) = from
            && let Some(held) = state.holding.get_mut(from)
        {
            *held -= 1;
            if *held == 0 {
                state.holding.remove(from);
            }
        }
        let cap = (self.limit / 2).max(1);
        while let Some(at) = (0..state.order.len())
            .find(|&i| state.holding.get(&state.order[i]).copied().unwrap_or(0) < cap)
            .or((!state.order.is_empty()).then_some(0))
        {
            let namespace = state.order.remove(at).expect("in range");
            let Some(queue) = state.waiting.get_mut(&namespace) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                state.waiting.remove(&namespace);
            } else {
                state.order.push_back(namespace.clone());
            }
            // A waiter that went away meanwhile gives its place to the next.
            if let Some(next) = next
                && next.send(()).is_ok()
            {
                *state.holding.entry(namespace).or_default() += 1;
                return;
            }
        }
        state.running = state.running.saturating_sub(1);
    }

    /// Closes the gate: every waiting reconcile and every later one gets no turn.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.closed = true;
        state.waiting.clear();
        state.order.clear();
    }

    /// How many reconciles run at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Reconciles waiting for a turn.
    pub fn waiting(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.waiting.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// Turns are handed round robin over namespaces, oldest first within each.
    #[tokio::test]
    async fn turns_go_round_robin_over_namespaces() {
        let gate = FairGate::new(1);
        let first = gate.enter("crowd").await.expect("a free turn at once");
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = vec![];
        for (namespace, name) in [
            ("crowd", "c2"),
            ("crowd", "c3"),
            ("crowd", "c4"),
            ("quiet", "q1"),
            ("other", "o1"),
            ("quiet", "q2"),
        ] {
            let (gate, done) = (gate.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = gate.enter(namespace).await.expect("a turn");
                done.send(name).unwrap();
            }));
            // Each is queued before the next arrives.
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.waiting(), 6);
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        let mut seen = vec![];
        while let Ok(name) = order.try_recv() {
            seen.push(name);
        }
        // The crowd's backlog does not hold the quiet namespace back: one turn each, in turn.
        assert_eq!(seen, ["c2", "q1", "o1", "c3", "q2", "c4"]);
        assert_eq!(gate.waiting(), 0);
        // All turns given back: the next comes at once.
        assert!(gate.enter("any").now_or_never().flatten().is_some());
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_waiter_that_then_goes_away_is_passed_on() {
        let gate = FairGate::new(1);
        let held = gate.enter("a").await.unwrap();
        let mut leaving = Box::pin(gate.enter("b"));
        assert!(leaving.as_mut().now_or_never().is_none(), "it waits");
        // The turn is handed to b, which goes away before it takes it.
        drop(held);
        drop(leaving);
        assert!(gate.enter("c").now_or_never().flatten().is_some(), "the turn came back");
    }

    #[tokio::test]
    async fn without_fairness_turns_go_first_come_first_served() {
        let gate = FairGate::with_fairness(1, false);
        let first = gate.enter("crowd").await.unwrap();
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = vec![];
        for (namespace, name) in [("crowd", "c2"), ("crowd", "c3"), ("quiet", "q1")] {
            let (gate, done) = (gate.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = gate.enter(namespace).await.expect("a turn");
                done.send(name).unwrap();
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        let seen: Vec<_> = std::iter::from_fn(|| order.try_recv().ok()).collect();
        assert_eq!(seen, ["c2", "c3", "q1"]);
    }

    #[tokio::test]
    async fn a_namespace_holding_half_the_turns_lets_the_others_go_first() {
        let gate = FairGate::new(4);
        let mut slow = vec![];
        for _ in 0..4 {
            slow.push(gate.enter("slow").await.unwrap());
        }
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = vec![];
        for (namespace, name) in [("slow", "s5"), ("slow", "s6"), ("quick", "q1"), ("quick", "q2")] {
            let (gate, done) = (gate.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let turn = gate.enter(namespace).await.expect("a turn");
                done.send(name).unwrap();
                // The slow ones keep theirs; the quick ones end at once.
                if namespace == "slow" {
                    std::mem::forget(turn);
                }
            }));
            tokio::task::yield_now().await;
        }
        // Two of the slow namespace's four turns end: with half the turns still held, the
        // quick namespace goes first although the slow one's waiters came earlier.
        drop(slow.pop());
        drop(slow.pop());
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let mut seen = vec![];
        while let Ok(name) = order.try_recv() {
            seen.push(name);
        }
        assert_eq!(&seen[..2], ["q1", "q2"], "{seen:?}");
        drop(tasks);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_loses_no_turn_and_closing_frees_everyone() {
        let gate = FairGate::new(1);
        let first = gate.enter("a").await.unwrap();
        let mut gone = Box::pin(gate.enter("b"));
        assert!(gone.as_mut().now_or_never().is_none(), "it waits");
        let later = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter("c").await.is_some() }
        });
        tokio::task::yield_now().await;
        drop(gone);
        drop(first);
        assert!(later.await.unwrap(), "the turn went on past the waiter that left");

        let held = gate.enter("a").await.unwrap();
        let blocked = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter("b").await.is_some() }
        });
        tokio::task::yield_now().await;
        gate.close();
        assert!(!blocked.await.unwrap(), "a closed gate gives no turn");
        drop(held);
        assert!(gate.enter("a").await.is_none());
    }
}
