//! What the instance controller remembers between reconciles: its own status writes (for
//! reconciles that run before the cache shows them) and when a pending restart was first seen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;

use crate::api::{ComputeInstance, ComputeInstanceStatus};

/// What the instance controller remembers between reconciles: its own status writes (for
/// reconciles that run before the cache shows them) and when a pending restart was first seen.
#[derive(Default)]
pub struct InstanceMemory {
    statuses: Mutex<HashMap<ObjectRef<ComputeInstance>, OwnStatus>>,
    pending: Mutex<HashMap<ObjectRef<ComputeInstance>, Instant>>,
}

struct OwnStatus {
    /// The resource version the write replaced: a cache still showing it has not seen the write.
    over: Option<String>,
    /// The resource version the write produced: a cache showing an older one has not seen it.
    produced: Option<String>,
    status: ComputeInstanceStatus,
}

impl InstanceMemory {
    /// Entries kept, both maps together.
    pub fn len(&self) -> usize {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn wrote_status(
        &self,
        key: ObjectRef<ComputeInstance>,
        over: Option<String>,
        produced: Option<String>,
        status: ComputeInstanceStatus,
    ) {
        self.statuses
            .lock()
            .expect("instance memory lock")
            .insert(key, OwnStatus { over, produced, status });
    }

    /// The status to decide from: ours, when the cache has not seen our write: it shows a version
    /// older than the one the write produced (another writer's, landed between our read and our
    /// write, included), or, where versions cannot be ordered, the one we wrote over.
    pub(super) fn baseline(&self, instance: &ComputeInstance) -> Option<ComputeInstanceStatus> {
        let statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let own = statuses.get(&ObjectRef::from_obj(instance))?;
        let cached = instance.metadata.resource_version.as_deref()?;
        let ordered = own
            .produced
            .as_deref()
            .and_then(|produced| crate::controller::status_patch::version_order(cached, produced));
        let behind = match ordered {
            Some(order) => order.is_lt(),
            None => own.over.as_deref() == Some(cached),
        };
        behind.then(|| own.status.clone())
    }

    /// How long a restart first seen now (or earlier) still waits for more changes to join it.
    pub(super) fn batch_wait(&self, key: &ObjectRef<ComputeInstance>, window: Duration) -> Option<Duration> {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = *pending.entry(key.clone()).or_insert_with(Instant::now);
        window.checked_sub(first.elapsed()).filter(|left| !left.is_zero())
    }

    pub(super) fn settled(&self, key: &ObjectRef<ComputeInstance>) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Drops what is kept for a deleted instance.
    pub fn forget(&self, key: &ObjectRef<ComputeInstance>) {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        self.settled(key);
    }

    /// Keeps only what belongs to instances that still exist.
    pub(super) fn retain(&self, exists: &impl Fn(&ObjectRef<ComputeInstance>) -> bool) {
        self.statuses
            .lock()
            .expect("instance memory lock")
            .retain(|key, _| exists(key));
        self.pending
            .lock()
            .expect("instance memory lock")
            .retain(|key, _| exists(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_showing_another_write_made_before_ours_is_still_behind() {
        let memory = InstanceMemory::default();
        let key = ObjectRef::<ComputeInstance>::new("ci").within("team");
        let at = |version: &str| {
            let mut instance = ComputeInstance::new("ci", Default::default());
            instance.metadata.namespace = Some("team".into());
            instance.metadata.resource_version = Some(version.into());
            instance
        };
        let ours = ComputeInstanceStatus {
            reason: Some("Restarted".into()),
            ..Default::default()
        };
        // Our write over the cached 10 lands at 12: someone else's write made 11 in between.
        memory.wrote_status(key, Some("10".into()), Some("12".into()), ours.clone());
        assert_eq!(memory.baseline(&at("10")), Some(ours.clone()));
        assert_eq!(memory.baseline(&at("11")), Some(ours), "their write, older than ours");
        assert_eq!(memory.baseline(&at("12")), None, "the cache shows our write");
        assert_eq!(memory.baseline(&at("13")), None);
    }

    #[test]
    fn a_relist_forgets_instances_that_went_away_while_the_watch_was_down() {
        let memory = InstanceMemory::default();
        let keys: Vec<ObjectRef<ComputeInstance>> = (0..100)
            .map(|i| ObjectRef::new(&format!("ci-{i}")).within("team"))
            .collect();
        for key in &keys {
            memory.wrote_status(key.clone(), Some("1".into()), None, ComputeInstanceStatus::default());
            memory.batch_wait(key, Duration::from_secs(5));
        }
        memory.retain(&|key: &ObjectRef<ComputeInstance>| key.name == "ci-7");
        assert_eq!(memory.statuses.lock().unwrap().len(), 1);
        assert_eq!(memory.pending.lock().unwrap().len(), 1);
    }
}
