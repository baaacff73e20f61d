//! Which runtimes (or compute instances) depend on which objects: recorded by each reconcile
//! from what it read, so an event on a ServiceAccount, ConfigMap, ResourceQuota or
//! ComputeInstance wakes exactly the objects that read it — a map lookup, never an API list.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;

use super::lean::Named;

/// An object a runtime's reconcile read (or waits for).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Dependency {
    /// A service account, by namespace and name.
    ServiceAccount(String, String),
    /// A ConfigMap, by namespace and name.
    ConfigMap(String, String),
    /// The ResourceQuotas of a namespace (a runtime waiting for quota headroom).
    Quotas(String),
    /// A ComputeInstance (and its pod), by namespace and name.
    Instance(String, String),
    /// An image repository whose versions the runtime checks.
    Repository(String),
}

/// Each object's key is one shared copy of its namespace and name (no `ObjectRef`) in both maps,
/// and each dependency one shared copy too: 10,000 runtimes held three copies of their key and
/// two of each dependency before.
struct Maps<K> {
    dependents: HashMap<Arc<Dependency>, HashSet<Arc<Named>>>,
    dependencies: HashMap<Arc<Named>, Box<[Arc<Dependency>]>>,
    kind: std::marker::PhantomData<K>,
}

/// The dependency index of one kind of object, shared by its reconciler (writer) and the watch
/// mappers (readers).
pub struct DependencyIndex<K: Resource<DynamicType = ()>> {
    maps: Mutex<Maps<K>>,
}

impl<K: Resource<DynamicType = ()>> Default for DependencyIndex<K> {
    fn default() -> Self {
        Self {
            maps: Mutex::new(Maps {
                dependents: HashMap::new(),
                dependencies: HashMap::new(),
                kind: std::marker::PhantomData,
            }),
        }
    }
}

impl<K: Resource<DynamicType = ()>> DependencyIndex<K> {
    /// Replaces what `runtime` depends on.
    pub fn record(&self, runtime: ObjectRef<K>, dependencies: Vec<Dependency>) {
        let mut maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let runtime = Named::of(&runtime);
        Self::unlink(&mut maps, &runtime);
        let runtime = Arc::new(runtime);
        let mut shared = Vec::with_capacity(dependencies.len());
        for dependency in dependencies {
            let dependency = Self::link(&mut maps, dependency, &runtime);
            if !shared.contains(&dependency) {
                shared.push(dependency);
            }
        }
        maps.dependencies.insert(runtime, shared.into());
    }

    /// Adds `runtime` to the dependents of `dependency`, and gives the index's copy of it.
    fn link(maps: &mut Maps<K>, dependency: Dependency, runtime: &Arc<Named>) -> Arc<Dependency> {
        if let Some(shared) = maps.dependents.get_key_value(&dependency).map(|(key, _)| key.clone()) {
            if let Some(set) = maps.dependents.get_mut(&dependency) {
                set.insert(runtime.clone());
            }
            return shared;
        }
        let dependency = Arc::new(dependency);
        maps.dependents
            .insert(dependency.clone(), HashSet::from([runtime.clone()]));
        dependency
    }

    /// Adds one dependency to what `object` depends on.
    pub fn add(&self, object: &ObjectRef<K>, dependency: Dependency) {
        let mut maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let object = Named::of(object);
        let (key, list) = match maps.dependencies.remove_entry(&object) {
            Some((key, list)) if list.iter().any(|d| **d == dependency) => {
                maps.dependencies.insert(key, list);
                return;
            }
            Some((key, list)) => (key, list.into_vec()),
            None => (Arc::new(object), vec![]),
        };
        let mut list = list;
        list.push(Self::link(&mut maps, dependency, &key));
        maps.dependencies.insert(key, list.into());
    }

    /// Forgets a runtime that no longer exists.
    pub fn forget(&self, runtime: &ObjectRef<K>) {
        let mut maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::unlink(&mut maps, &Named::of(runtime));
    }

    /// The runtimes that depend on `dependency`.
    pub fn dependents(&self, dependency: &Dependency) -> Vec<ObjectRef<K>> {
        let maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        maps.dependents
            .get(dependency)
            .map(|set| set.iter().map(|key| key.to_ref()).collect())
            .unwrap_or_default()
    }

    /// The dependencies recorded for which `which` holds.
    pub fn dependencies(&self, which: impl Fn(&Dependency) -> bool) -> Vec<Dependency> {
        let maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        maps.dependents
            .keys()
            .filter(|dependency| which(dependency))
            .map(|dependency| (**dependency).clone())
            .collect()
    }

    /// Keeps only the runtimes for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&ObjectRef<K>) -> bool) {
        let mut maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: Vec<Arc<Named>> = maps
            .dependencies
            .keys()
            .filter(|key| !keep(&key.to_ref()))
            .cloned()
            .collect();
        for runtime in gone {
            Self::unlink(&mut maps, &runtime);
        }
    }

    /// How many runtimes are indexed (for tests and metrics).
    pub fn len(&self) -> usize {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dependencies
            .len()
    }

    /// Whether no runtime is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn unlink(maps: &mut Maps<K>, runtime: &Named) {
        for dependency in maps.dependencies.remove(runtime).unwrap_or_default() {
            if let Some(set) = maps.dependents.get_mut(&*dependency) {
                set.remove(runtime);
                if set.is_empty() {
                    maps.dependents.remove(&*dependency);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PromptFlowRuntime;

    fn runtime(name: &str) -> ObjectRef<PromptFlowRuntime> {
        ObjectRef::new(name).within("team-a")
    }

    fn account(name: &str) -> Dependency {
        Dependency::ServiceAccount("team-a".into(), name.into())
    }

    #[test]
    fn dependents_follow_the_latest_record() {
        let index = DependencyIndex::<PromptFlowRuntime>::default();
        index.record(
            runtime("a"),
            vec![account("puller"), Dependency::Quotas("team-a".into())],
        );
        index.record(runtime("b"), vec![account("puller")]);
        let mut found = index.dependents(&account("puller"));
        found.sort_by_key(|r| r.name.clone());
        assert_eq!(found, [runtime("a"), runtime("b")]);

        index.record(runtime("a"), vec![account("other")]);
        assert_eq!(index.dependents(&account("puller")), [runtime("b")]);
        assert!(index.dependents(&Dependency::Quotas("team-a".into())).is_empty());
        assert_eq!(index.dependents(&account("other")), [runtime("a")]);
    }

    #[test]
    fn forgotten_runtimes_leave_no_entries() {
        let index = DependencyIndex::<PromptFlowRuntime>::default();
        index.record(runtime("a"), vec![account("puller")]);
        index.forget(&runtime("a"));
        assert!(index.dependents(&account("puller")).is_empty());
        assert!(index.is_empty());

        index.record(runtime("b"), vec![account("puller")]);
        index.record(runtime("c"), vec![account("puller")]);
        index.retain(|key| key.name == "c");
        assert_eq!(index.dependents(&account("puller")), [runtime("c")]);
    }
}
