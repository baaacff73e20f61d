//! What names a runtime: the mapping from each watched object to the runtimes (and compute
//! instances) it concerns, for the fair queue.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::cache;
use super::context::Context;
use super::index::Dependency;
use super::lean;
use crate::api::ComputeInstance;
use crate::build::instance::INSTANCE_LABEL;
use crate::build::pod::RUNTIME_LABEL;

/// Maps a cached watch's items to the runtimes they concern, keeping the cache: a change at once;
/// what a (re)list brings once it is through (the cache shows the new list only then, so a
/// runtime woken earlier would read the old one); and at that moment also what the list no
/// longer holds (deleted while the watch was away, with no event of its own).
pub(super) fn relisting<W, T>(
    writer: cache::Writer<T>,
    keep: fn(&W) -> T,
    of: impl Fn(&W) -> Vec<ObjectRef<lean::LeanRuntime>>,
    of_gone: impl Fn(&str, &str, &T) -> Vec<ObjectRef<lean::LeanRuntime>>,
) -> impl FnMut(Result<watcher::Event<W>, watcher::Error>) -> Vec<ObjectRef<lean::LeanRuntime>>
where
    W: Resource,
{
    let mut listed = vec![];
    move |item| {
        let Ok(event) = item else {
            return vec![];
        };
        let gone = writer.apply(&event, keep);
        match &event {
            watcher::Event::Apply(object) | watcher::Event::Delete(object) => of(object),
            watcher::Event::Init => {
                listed.clear();
                vec![]
            }
            watcher::Event::InitApply(object) => {
                listed.extend(of(object));
                vec![]
            }
            watcher::Event::InitDone => {
                let mut keys = std::mem::take(&mut listed);
                for (namespace, name, object) in &gone {
                    keys.extend(of_gone(namespace, name, object));
                }
                keys
            }
        }
    }
}

/// The runtimes a Service of the operator belongs to (its owners of that kind).
pub(super) fn service_owner(service: &lean::LeanService) -> Vec<ObjectRef<lean::LeanRuntime>> {
    let namespace = service.namespace().unwrap_or_default();
    service
        .owner_references()
        .iter()
        .filter(|owner| {
            owner.kind == crate::api::PromptFlowRuntime::kind(&())
                && owner.api_version == crate::api::PromptFlowRuntime::api_version(&())
        })
        .map(|owner| ObjectRef::new(&owner.name).within(&namespace))
        .collect()
}

/// The dependency a compute instance is to the runtimes on it.
pub(super) fn instance_dependency(instance: &ComputeInstance) -> Dependency {
    Dependency::Instance(instance.namespace().unwrap_or_default(), instance.name_any())
}

/// Wakes the instances a runtime event concerns: the one it asks for, and the one its status
/// last named (a runtime moving away must be detached there).
pub(super) fn wake_instances_of(ctx: &Context, runtime: &lean::LeanRuntime) {
    let namespace = runtime.namespace().unwrap_or_default();
    for name in runtime.instances() {
        ctx.wake_instance(ObjectRef::new(name).within(&namespace));
    }
}

/// Looks up, for a watched object, the runtimes whose last reconcile read it (the context's
/// dependency index, shared with the watch mappers).
#[derive(Clone)]
pub(super) struct Dependents(pub(super) Arc<Context>);

impl Dependents {
    /// The runtimes that read `dependency`; the compute instances that read it are woken too.
    pub(super) fn lookup(&self, dependency: &Dependency) -> Vec<ObjectRef<lean::LeanRuntime>> {
        for instance in self.0.instance_index.dependents(dependency) {
            self.0.wake_instance(instance);
        }
        self.lookup_runtimes(dependency)
    }

    /// The runtimes that read `dependency`, as the cache's keys.
    fn lookup_runtimes(&self, dependency: &Dependency) -> Vec<ObjectRef<lean::LeanRuntime>> {
        self.0
            .index
            .dependents(dependency)
            .iter()
            .map(lean::runtime_key)
            .collect()
    }

    /// A watch mapper: an object of kind `K`, keyed by `dependency`, to the runtimes that read it.
    pub(super) fn of<K: Resource>(
        &self,
        dependency: fn(String, String) -> Dependency,
    ) -> impl Fn(K) -> Vec<ObjectRef<lean::LeanRuntime>> + Send + Sync + 'static {
        let handle = self.clone();
        move |object: K| match object.meta().namespace.clone() {
            Some(namespace) => handle.lookup(&dependency(namespace, object.meta().name.clone().unwrap_or_default())),
            None => vec![],
        }
    }

    /// A runtime's own pod wakes it; an instance pod wakes its instance and the runtimes on it.
    pub(super) fn of_pod<'a>(
        &self,
        namespace: &str,
        label: impl Fn(&str) -> Option<&'a str>,
    ) -> Vec<ObjectRef<lean::LeanRuntime>> {
        if let Some(instance) = label(INSTANCE_LABEL) {
            self.0.wake_instance(ObjectRef::new(instance).within(namespace));
            return self.lookup_runtimes(&Dependency::Instance(namespace.to_owned(), instance.to_owned()));
        }
        label(RUNTIME_LABEL)
            .map(|runtime| vec![ObjectRef::new(runtime).within(namespace)])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn config_map(name: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "a"}})).unwrap()
    }

    fn names(keys: Vec<ObjectRef<lean::LeanRuntime>>) -> Vec<String> {
        keys.into_iter().map(|key| key.name).collect()
    }

    #[test]
    fn a_relist_wakes_what_it_brings_once_through_and_what_it_no_longer_holds() {
        let cache = cache::Cache::<String>::new();
        let mut keys = relisting(
            cache.writer(),
            |object: &ConfigMap| object.name_any(),
            |object: &ConfigMap| vec![ObjectRef::new(&object.name_any()).within("a")],
            |namespace: &str, name: &str, _: &String| vec![ObjectRef::new(&format!("gone-{name}")).within(namespace)],
        );
        let mut event = |event| keys(Ok(event));
        assert!(event(watcher::Event::Init).is_empty());
        assert!(event(watcher::Event::InitApply(config_map("one"))).is_empty());
        assert!(
            event(watcher::Event::InitApply(config_map("two"))).is_empty(),
            "not before the list is through"
        );
        assert_eq!(names(event(watcher::Event::InitDone)), ["one", "two"]);
        assert_eq!(cache.get("a", "two", Clone::clone).as_deref(), Some("two"));
        assert_eq!(
            names(event(watcher::Event::Apply(config_map("three")))),
            ["three"],
            "a change at once"
        );
        assert_eq!(names(event(watcher::Event::Delete(config_map("three")))), ["three"]);
        // "one" was deleted while the watch was away: the relist does not bring it.
        event(watcher::Event::Init);
        event(watcher::Event::InitApply(config_map("two")));
        assert_eq!(names(event(watcher::Event::InitDone)), ["two", "gone-one"]);
        assert_eq!(cache.get("a", "one", Clone::clone), None);
    }
}
