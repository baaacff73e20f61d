//! Per-runtime exponential backoff: 5 s doubling to 5 min, for runtimes that retry an error or
//! wait for something that is not watched (pull secrets).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use crate::api::PromptFlowRuntime;

const FIRST: Duration = Duration::from_secs(5);
const LONGEST: Duration = Duration::from_secs(300);

/// Consecutive attempts per runtime.
#[derive(Default)]
pub struct Backoff {
    attempts: Mutex<HashMap<ObjectRef<PromptFlowRuntime>, u32>>,
}

impl Backoff {
    /// Runtimes with failed attempts counted.
    pub fn len(&self) -> usize {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts one more attempt for `key` and returns how long to wait before the next.
    pub fn next(&self, key: &ObjectRef<PromptFlowRuntime>) -> Duration {
        let mut attempts = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = attempts.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        FIRST.saturating_mul(1 << (*count - 1).min(6)).min(LONGEST)
    }

    /// Starts over for `key`.
    pub fn reset(&self, key: &ObjectRef<PromptFlowRuntime>) {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Keeps only the runtimes for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&ObjectRef<PromptFlowRuntime>) -> bool) {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|key, _| keep(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_five_minutes_and_starts_over() {
        let backoff = Backoff::default();
        let key = ObjectRef::new("chat").within("a");
        let delays: Vec<u64> = (0..9).map(|_| backoff.next(&key).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        backoff.reset(&key);
        assert_eq!(backoff.next(&key).as_secs(), 5);
        backoff.retain(|_| false);
        assert_eq!(backoff.next(&key).as_secs(), 5, "forgotten");
    }
}
