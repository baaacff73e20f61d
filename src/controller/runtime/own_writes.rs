//! The operator's memory of its own last writes, so a reconcile that runs on a cache older than
//! those writes does not repeat them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::ObjectRef;

use crate::api::{PromptFlowRuntime, PromptFlowRuntimeStatus};
use crate::controller::lean::Named;
use crate::controller::lean::status::LeanStatus;

/// The operator's own recent writes. A reconcile can run on a cached runtime or pod that predates
/// this operator's last write (the watch has not delivered it yet); judging that stale copy would
/// repeat the write. Entries end as soon as the caches catch up.
#[derive(Default)]
pub struct OwnWrites {
    statuses: Mutex<HashMap<Named, OwnStatusWrite>>,
    /// First statuses held back while a new runtime's pod starts (not written yet): what the
    /// runtime's next reconciles decide from (its pin, its size, its state), as from a write.
    /// With when it was first held.
    held: Mutex<HashMap<Named, (Instant, Box<LeanStatus>)>>,
    /// Pods created and not yet seen in the cache, with when.
    pods: Mutex<HashMap<Named, Instant>>,
    /// Pods deleted (by uid) that the cache may still show without a deletion timestamp.
    deleted: Mutex<HashMap<Named, String>>,
    /// Services applied and not yet seen in the cache, with when, and the resourceVersion the
    /// cache showed before the write (`None`: there was no Service).
    services: Mutex<HashMap<Named, AppliedService>>,
}

/// A Service the operator applied: when, the resourceVersion the cache showed before (`None`:
/// there was none) and the one the write produced.
struct AppliedService {
    at: Instant,
    before: Option<String>,
    written: Option<String>,
}

/// The last status written for a runtime: `latest` is what the write produced; `stale` the
/// versions known older (the ones written over and the ones earlier writes produced), for an API
/// server whose versions cannot be ordered.
struct OwnStatusWrite {
    stale: Vec<Box<str>>,
    latest: Box<str>,
    /// Lean, its texts shared ([`LeanStatus`]): a typed status with its conditions took about
    /// 1.7 KiB and 30 allocations for each runtime written while its cache lags behind.
    status: Box<LeanStatus>,
}

impl OwnStatusWrite {
    /// Whether a cache showing `cached` has not seen this write. Comparable versions are ordered:
    /// a version older than ours may be another writer's we never saw (their write landed between
    /// our read and our write), and judging it would write an older status back. Otherwise only
    /// the versions known to be older count.
    fn behind(&self, cached: &str) -> bool {
        match crate::controller::status_patch::version_order(cached, &self.latest) {
            Some(order) => order.is_lt(),
            None => self.stale.iter().any(|v| **v == *cached),
        }
    }
}

/// Gives back a map's table once most of it is empty: tables keep their largest size, and a
/// burst of thousands of runtimes would otherwise hold that memory for good.
fn shrink_when_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// How long a created pod is trusted to exist before the cache shows it.
const CREATED_POD_GRACE: Duration = Duration::from_secs(30);

impl OwnWrites {
    /// The status to compare against: ours when the cached runtime predates our last write.
    pub fn status_baseline(&self, runtime: &PromptFlowRuntime) -> Option<PromptFlowRuntimeStatus> {
        let key = Named::of(&ObjectRef::from_obj(runtime));
        let mut statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cached_version = runtime.metadata.resource_version.clone().unwrap_or_default();
        match statuses.get(&key) {
            Some(written) if written.behind(&cached_version) => Some(written.status.full()),
            Some(_) => {
                // The cache caught up with our write, or moved past it: it is the truth again.
                statuses.remove(&key);
                shrink_when_sparse(&mut statuses);
                runtime.status.clone()
            }
            None => runtime.status.clone(),
        }
    }

    pub fn wrote_status(&self, runtime: &PromptFlowRuntime, produced: Option<String>, status: PromptFlowRuntimeStatus) {
        // Written: nothing is held back any more.
        let key = Named::of(&ObjectRef::from_obj(runtime));
        {
            let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if held.remove(&key).is_some() {
                shrink_when_sparse(&mut held);
            }
        }
        let (Some(over), Some(produced)) = (runtime.metadata.resource_version.clone(), produced) else {
            return;
        };
        let status = Box::new(LeanStatus::from(&status));
        let mut statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = statuses.entry(key).or_insert_with(|| OwnStatusWrite {
            stale: Vec::new(),
            latest: "".into(),
            status: status.clone(),
        });
        let mut stale = |version: Box<str>| {
            if !entry.stale.contains(&version) {
                entry.stale.push(version);
            }
        };
        stale(over.into());
        if !entry.latest.is_empty() {
            stale(std::mem::take(&mut entry.latest));
        }
        entry.latest = produced.into();
        entry.status = status;
    }

    /// Holds back a new runtime's first status: decided, not written (see `FIRST_STATUS_WAIT`).
    pub fn hold_status(&self, runtime: &PromptFlowRuntime, status: &PromptFlowRuntimeStatus) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(Named::of(&ObjectRef::from_obj(runtime)))
            .and_modify(|(_, held)| **held = LeanStatus::from(status))
            .or_insert_with(|| (Instant::now(), Box::new(LeanStatus::from(status))));
    }

    /// The first status held back for a runtime, if any.
    pub fn held_status(&self, runtime: &PromptFlowRuntime) -> Option<PromptFlowRuntimeStatus> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&Named::of(&ObjectRef::from_obj(runtime)))
            .map(|(_, held)| held.full())
    }

    /// Whether a runtime's first status is held back, not written.
    pub fn is_held(&self, runtime: &PromptFlowRuntime) -> bool {
        self.held_for(runtime).is_some()
    }

    /// How long a runtime's first status has been held back, if it is.
    pub fn held_for(&self, runtime: &PromptFlowRuntime) -> Option<Duration> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&Named::of(&ObjectRef::from_obj(runtime)))
            .map(|(since, _)| since.elapsed())
    }

    /// When a pod missing from the cache was created by us moments ago: how long to keep trusting
    /// that it exists. A pod the cache shows ends the entry.
    pub fn pod_pending(&self, pod: &ObjectRef<Pod>, cached: bool) -> Option<Duration> {
        let pod = &Named::of(pod);
        let mut pods = self.pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached {
            if pods.remove(pod).is_some() {
                shrink_when_sparse(&mut pods);
            }
            return None;
        }
        let remaining = CREATED_POD_GRACE.checked_sub(pods.get(pod)?.elapsed());
        if remaining.is_none() {
            pods.remove(pod);
        }
        remaining
    }

    /// How long ago the operator created a pod the cache does not show yet (`None`: none
    /// recorded).
    pub fn created_since(&self, pod: &ObjectRef<Pod>) -> Option<Duration> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&Named::of(pod))
            .map(Instant::elapsed)
    }

    pub fn created_pod(&self, pod: ObjectRef<Pod>) {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(Named::of(&pod), Instant::now());
    }

    /// Whether a Service the cache does not show, or shows as it was before, was applied by us
    /// moments ago, so applying it again would repeat the write (`cached`: the resourceVersion
    /// the cache shows). A Service the cache shows as wanted ends the entry; so does one changed
    /// since by someone else (their edit right after our write is corrected, not trusted away).
    /// One the cache shows as our write made it, yet not as wanted (changed while it was written,
    /// by a mutating admission webhook, say), is not written again before the grace is over:
    /// the operator never fights another writer faster than once per grace.
    pub fn service_pending(&self, service: &ObjectRef<Service>, cached: Option<&str>, cached_as_wanted: bool) -> bool {
        let service = &Named::of(service);
        let mut services = self.services.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(applied) = services.get(service) else {
            return false;
        };
        let ours = applied.before.as_deref() == cached
            || applied
                .written
                .as_deref()
                .is_some_and(|written| Some(written) == cached);
        let behind = !cached_as_wanted && applied.at.elapsed() < CREATED_POD_GRACE && ours;
        if !behind {
            services.remove(service);
            shrink_when_sparse(&mut services);
        }
        behind
    }

    /// Records a Service applied over the one the cache showed at `before`, which the write
    /// turned into `written`.
    pub fn applied_service(&self, service: ObjectRef<Service>, before: Option<String>, written: Option<String>) {
        self.services.lock().expect("own writes lock").insert(
            Named::of(&service),
            AppliedService {
                at: Instant::now(),
                before,
                written,
            },
        );
    }

    /// Whether the cached pod with `uid` is one we already deleted (the cache lags behind).
    pub fn already_deleted(&self, pod: &ObjectRef<Pod>, uid: Option<&str>) -> bool {
        let pod = &Named::of(pod);
        let mut deleted = self.deleted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (deleted.get(pod), uid) {
            (Some(gone), Some(uid)) if gone == uid => true,
            (Some(_), _) => {
                deleted.remove(pod);
                false
            }
            (None, _) => false,
        }
    }

    pub fn deleted_pod(&self, pod: ObjectRef<Pod>, uid: String) {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(Named::of(&pod), uid);
    }

    /// Keeps only the runtimes for which `keep` holds (pods follow their runtime's name).
    pub fn retain(&self, keep: impl Fn(&ObjectRef<PromptFlowRuntime>) -> bool) {
        self.statuses
            .lock()
            .expect("own writes lock")
            .retain(|key, _| keep(&key.to_ref()));
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|key, _| keep(&key.to_ref()));
        let runtime_of = |pod: &Named| pod.sibling(crate::build::pod::runtime_name(&pod.1));
        // Instance pods are not a runtime's: the instance controller forgets them.
        let runtime_pod = |pod: &Named| pod.1.ends_with(crate::build::pod::POD_SUFFIX);
        self.pods
            .lock()
            .expect("own writes lock")
            .retain(|pod, _| !runtime_pod(pod) || keep(&runtime_of(pod)));
        self.deleted
            .lock()
            .expect("own writes lock")
            .retain(|pod, _| !runtime_pod(pod) || keep(&runtime_of(pod)));
        self.services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|service, _| keep(&service.to_ref()));
    }

    /// Entries kept, all maps together.
    pub fn len(&self) -> usize {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
            + self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
            + self
                .pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
            + self
                .deleted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
            + self
                .services
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what is kept for a pod whose owner was deleted.
    pub fn forget_pod(&self, pod: &ObjectRef<Pod>) {
        let pod = &Named::of(pod);
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(pod);
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(pod);
    }

    /// Drops what is kept for a deleted runtime.
    pub fn forget(&self, runtime: &ObjectRef<PromptFlowRuntime>, pod: &ObjectRef<Pod>) {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&Named::of(runtime));
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&Named::of(runtime));
        self.forget_pod(pod);
        // The runtime's Service has its name.
        self.services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&Named::of(runtime));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(resource_version: &str, reason: Option<&str>) -> PromptFlowRuntime {
        let mut runtime = PromptFlowRuntime::new("chat", Default::default());
        runtime.metadata.namespace = Some("a".into());
        runtime.metadata.resource_version = Some(resource_version.into());
        runtime.status = reason.map(|r| PromptFlowRuntimeStatus {
            reason: Some(r.into()),
            ..Default::default()
        });
        runtime
    }

    fn status(reason: &str) -> PromptFlowRuntimeStatus {
        PromptFlowRuntimeStatus {
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_cache_older_than_our_writes_is_judged_by_what_we_wrote() {
        let written = OwnWrites::default();
        written.wrote_status(&runtime("10", None), Some("11".into()), status("PodStarting"));
        // A second write over the same stale copy, then the cache delivers the first write.
        written.wrote_status(&runtime("10", None), Some("12".into()), status("PodReady"));
        let baseline = written.status_baseline(&runtime("11", Some("PodStarting")));
        assert_eq!(baseline.unwrap().reason.as_deref(), Some("PodReady"));
        // Once the cache shows our latest write, the cache is the truth again.
        let baseline = written.status_baseline(&runtime("12", Some("PodReady")));
        assert_eq!(baseline.unwrap().reason.as_deref(), Some("PodReady"));
        let baseline = written.status_baseline(&runtime("10", None));
        assert_eq!(baseline, None, "the entry ended when the cache caught up");
    }

    #[test]
    fn a_cache_showing_another_write_made_before_ours_is_still_behind() {
        let written = OwnWrites::default();
        // Our write over the cached 10 lands at 12: someone else's write made 11 in between.
        written.wrote_status(&runtime("10", None), Some("12".into()), status("RestartHandled"));
        // The cache delivers 11 (their write, without ours): a version we never saw, yet older.
        let baseline = written.status_baseline(&runtime("11", Some("PodStarting")));
        assert_eq!(baseline.unwrap().reason.as_deref(), Some("RestartHandled"));
        // A write over 11 lands at 13; the cache at 12 is still behind it.
        written.wrote_status(&runtime("11", None), Some("13".into()), status("PodReady"));
        let baseline = written.status_baseline(&runtime("12", Some("RestartHandled")));
        assert_eq!(baseline.unwrap().reason.as_deref(), Some("PodReady"));
        // Past our latest write (someone wrote after it): the cache is the truth.
        let baseline = written.status_baseline(&runtime("14", Some("PodReady")));
        assert_eq!(baseline.unwrap().reason.as_deref(), Some("PodReady"));
        assert!(written.is_empty(), "the entry ended when the cache moved past it");
    }

    #[test]
    fn a_held_first_status_is_decided_from_until_a_status_is_written() {
        let writes = OwnWrites::default();
        let fresh = runtime("10", None);
        writes.hold_status(&fresh, &status("PodStarting"));
        assert!(writes.is_held(&fresh));
        let since = writes.held_for(&fresh).unwrap();
        writes.hold_status(&fresh, &status("PodStarting"));
        assert!(
            writes.held_for(&fresh).unwrap() >= since,
            "held again: still since the first hold"
        );
        assert_eq!(
            writes.held_status(&fresh).unwrap().reason.as_deref(),
            Some("PodStarting")
        );
        writes.wrote_status(&fresh, Some("11".into()), status("PodReady"));
        assert!(!writes.is_held(&fresh), "written: nothing held");
        writes.hold_status(&fresh, &status("PodStarting"));
        writes.forget(
            &ObjectRef::from_obj(&fresh),
            &ObjectRef::new("chat-runtime").within("a"),
        );
        assert!(writes.is_empty(), "a deleted runtime keeps nothing");
    }

    #[test]
    fn a_created_pod_counts_until_the_cache_shows_it() {
        let written = OwnWrites::default();
        let pod = ObjectRef::new("chat-runtime").within("a");
        assert_eq!(written.pod_pending(&pod, false), None);
        written.created_pod(pod.clone());
        assert!(
            written
                .pod_pending(&pod, false)
                .is_some_and(|left| left <= CREATED_POD_GRACE)
        );
        assert_eq!(written.pod_pending(&pod, true), None, "seen in the cache");
        assert_eq!(written.pod_pending(&pod, false), None, "the entry ended");
    }

    #[test]
    fn a_deleted_pod_is_not_deleted_again_while_the_cache_lags() {
        let written = OwnWrites::default();
        let pod = ObjectRef::new("chat-runtime").within("a");
        written.deleted_pod(pod.clone(), "uid-1".into());
        assert!(written.already_deleted(&pod, Some("uid-1")));
        assert!(!written.already_deleted(&pod, Some("uid-2")), "a new pod");
        assert!(
            !written.already_deleted(&pod, Some("uid-1")),
            "the entry ended with the new pod"
        );
    }

    #[test]
    fn an_applied_service_is_trusted_only_while_the_cache_shows_it_as_before() {
        let writes = OwnWrites::default();
        let service = ObjectRef::<Service>::new("rt").within("a");
        writes.applied_service(service.clone(), Some("5".into()), Some("6".into()));
        assert!(
            writes.service_pending(&service, Some("5"), false),
            "the cache is behind"
        );
        assert!(
            writes.service_pending(&service, Some("6"), false),
            "our write, changed as it was made: not fought"
        );
        assert!(
            !writes.service_pending(&service, Some("7"), false),
            "changed since: corrected"
        );
        assert!(!writes.service_pending(&service, Some("5"), false), "the entry ended");
        writes.applied_service(service.clone(), None, None);
        assert!(writes.service_pending(&service, None, false));
        assert!(!writes.service_pending(&service, Some("8"), true), "seen as wanted");
        assert!(writes.is_empty());
    }
}
