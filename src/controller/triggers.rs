//! What names a runtime: the mapping from each watched object to the runtimes (and compute
//! instances) it concerns, for the fair queue.

use std::collections::HashSet;
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::cache;
use super::context::Context;
use super::index::Dependency;
use super::lean::{self, CachedRuntime, LeanRuntime};
use super::runner::Timers;
use super::{network, runtime};
use crate::api::ComputeInstance;
use crate::build::instance::INSTANCE_LABEL;
use crate::build::pod::RUNTIME_LABEL;

/// The runtimes a watch event names, to reconcile.
pub(super) type Keys = Vec<ObjectRef<LeanRuntime>>;

/// Maps a cached watch's items to the runtimes they concern, keeping the cache: a change at once;
/// what a (re)list brings once it is through (the cache shows the new list only then, so a
/// runtime woken earlier would read the old one); and at that moment also what the list no
/// longer holds (deleted while the watch was away, with no event of its own).
pub(super) fn relisting<W, T>(
    writer: cache::Writer<T>,
    keep: fn(&W) -> T,
    of: impl Fn(&W) -> Keys,
    of_gone: impl Fn(&str, &str, &T) -> Keys,
) -> impl FnMut(Result<watcher::Event<W>, watcher::Error>) -> Keys
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

/// Applies the runtime watch to the runtime cache and maps it to the runtimes to reconcile: a
/// change at once; what a (re)list brings once it is through (the cache shows the new list only
/// then, so a runtime, or an instance, woken earlier would read the old one). Each wakes the
/// compute instances it concerns, as the cache has it then. A deletion — its own event, or a
/// runtime the list no longer holds (deleted while the watch was away) — forgets what was kept
/// for the runtime and wakes its instances; `listed` turns true with the first list.
pub(super) fn runtime_events(
    ctx: Arc<Context>,
    writer: cache::Writer<CachedRuntime>,
    timers: Arc<Timers>,
    listed: tokio::sync::watch::Sender<bool>,
    scope: Option<String>,
) -> impl FnMut(Result<watcher::Event<LeanRuntime>, watcher::Error>) -> Keys {
    let mut relisted: Keys = vec![];
    move |item| {
        let Ok(event) = item else {
            return vec![];
        };
        let gone = writer.apply(&event, CachedRuntime::of);
        match event {
            watcher::Event::Apply(runtime) => {
                wake_instances_of(&ctx, &runtime.namespace().unwrap_or_default(), runtime.cached());
                vec![ObjectRef::from_obj(&runtime)]
            }
            watcher::Event::Delete(runtime) => {
                let namespace = runtime.namespace().unwrap_or_default();
                deleted(&ctx, &timers, &namespace, &runtime.name_any(), runtime.cached());
                if ctx.network.is_some() {
                    let releasing = ctx.clone();
                    tokio::spawn(async move { network::release_if_empty(&releasing, &namespace).await });
                }
                vec![]
            }
            watcher::Event::Init => {
                relisted.clear();
                vec![]
            }
            watcher::Event::InitApply(runtime) => {
                relisted.push(ObjectRef::from_obj(&runtime));
                vec![]
            }
            watcher::Event::InitDone => {
                listed.send_replace(true);
                // Their namespaces' NetworkPolicies are released by the sweep below.
                for (namespace, name, runtime) in &gone {
                    deleted(&ctx, &timers, namespace, name, runtime);
                }
                let keys = std::mem::take(&mut relisted);
                for key in &keys {
                    let namespace = key.namespace.as_deref().unwrap_or_default();
                    let instances = ctx.runtimes.get(namespace, &key.name, |runtime| {
                        runtime.instances().map(str::to_owned).collect::<Vec<_>>()
                    });
                    for instance in instances.into_iter().flatten() {
                        ctx.wake_instance(ObjectRef::new(&instance).within(namespace));
                    }
                }
                let cached = |namespace: &str, name: &str| ctx.runtimes.get(namespace, name, |_| ()).is_some();
                runtime::forget_missing(&ctx, |key| {
                    cached(key.namespace.as_deref().unwrap_or_default(), &key.name)
                });
                timers.retain(cached);
                if ctx.network.is_some() {
                    let (sweeping, namespace) = (ctx.clone(), scope.clone());
                    tokio::spawn(async move { network::sweep(&sweeping, namespace.as_deref()).await });
                }
                keys
            }
        }
    }
}

/// What follows the deletion of the runtime `name` of `namespace`: what was kept for it goes,
/// and its instances are woken.
fn deleted(ctx: &Context, timers: &Timers, namespace: &str, name: &str, runtime: &CachedRuntime) {
    wake_instances_of(ctx, namespace, runtime);
    runtime::forget(ctx, name, namespace);
    timers.forget(namespace, name);
}

/// Maps the watch of one kind of object runtimes (and instances) read to the runtimes that read
/// it, by the [`Dependency`] `dependency` makes of each object (`kind` tells that kind's
/// dependencies): a change at once; after a (re)list, once it is through (the store shows the
/// new list only then), every runtime that read an object of that kind, so those of objects the
/// list no longer holds (deleted while the watch was away, with no event of their own) too. Only
/// what something read has readers: nothing is kept per listed object.
pub(super) fn relisted<K>(
    dependents: Dependents,
    dependency: impl Fn(&K) -> Option<Dependency>,
    kind: fn(&Dependency) -> bool,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> Keys {
    let recording = dependents.clone();
    relisted_by(
        move |dependency| dependents.lookup(dependency),
        move || recording.recorded(kind),
        dependency,
    )
}

/// [`relisted`], with `lookup` naming the runtimes of a dependency and `recorded` giving the
/// dependencies of the watched kind that something read.
fn relisted_by<K>(
    lookup: impl Fn(&Dependency) -> Keys,
    recorded: impl Fn() -> HashSet<Dependency>,
    dependency: impl Fn(&K) -> Option<Dependency>,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> Keys {
    move |item| match item {
        Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
            dependency(&object).map(|d| lookup(&d)).unwrap_or_default()
        }
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) | Err(_) => vec![],
        Ok(watcher::Event::InitDone) => recorded().iter().flat_map(&lookup).collect(),
    }
}

/// The runtimes a Service of the operator belongs to (its owners of that kind).
pub(super) fn service_owner(service: &lean::LeanService) -> Keys {
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

/// Wakes the instances a runtime of `namespace` concerns: the one it asks for, and the one its
/// status last named (a runtime moving away must be detached there).
fn wake_instances_of(ctx: &Context, namespace: &str, runtime: &CachedRuntime) {
    for name in runtime.instances() {
        ctx.wake_instance(ObjectRef::new(name).within(namespace));
    }
}

/// Looks up, for a watched object, the runtimes whose last reconcile read it (the context's
/// dependency index, shared with the watch mappers).
#[derive(Clone)]
pub(super) struct Dependents(pub(super) Arc<Context>);

impl Dependents {
    /// The runtimes that read `dependency`; the compute instances that read it are woken too.
    pub(super) fn lookup(&self, dependency: &Dependency) -> Keys {
        for instance in self.0.instance_index.dependents(dependency) {
            self.0.wake_instance(instance);
        }
        self.lookup_runtimes(dependency)
    }

    /// The dependencies runtimes or instances recorded for which `kind` holds.
    fn recorded(&self, kind: fn(&Dependency) -> bool) -> HashSet<Dependency> {
        let mut recorded: HashSet<Dependency> = self.0.index.dependencies(kind).into_iter().collect();
        recorded.extend(self.0.instance_index.dependencies(kind));
        recorded
    }

    /// The runtimes that read `dependency`, as the cache's keys.
    fn lookup_runtimes(&self, dependency: &Dependency) -> Keys {
        self.0
            .index
            .dependents(dependency)
            .iter()
            .map(lean::runtime_key)
            .collect()
    }

    /// A runtime's own pod wakes it; an instance pod wakes its instance and the runtimes on it.
    pub(super) fn of_pod<'a>(&self, namespace: &str, label: impl Fn(&str) -> Option<&'a str>) -> Keys {
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

    fn names(keys: Keys) -> Vec<String> {
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

    #[test]
    fn a_relist_of_what_runtimes_read_wakes_them_once_through_and_for_what_it_no_longer_holds() {
        let readers = |dependency: &Dependency| match dependency {
            Dependency::ConfigMap(_, name) => vec![ObjectRef::new(&format!("reads-{name}")).within("a")],
            _ => vec![],
        };
        let recorded = || {
            HashSet::from([
                Dependency::ConfigMap("a".into(), "one".into()),
                Dependency::ConfigMap("a".into(), "gone".into()),
            ])
        };
        let mut keys = relisted_by(readers, recorded, |object: &ConfigMap| {
            Some(Dependency::ConfigMap("a".into(), object.name_any()))
        });
        let mut event = |event| {
            let mut names = names(keys(Ok(event)));
            names.sort();
            names
        };
        assert_eq!(
            event(watcher::Event::Apply(config_map("one"))),
            ["reads-one"],
            "a change at once"
        );
        assert!(event(watcher::Event::Init).is_empty());
        assert!(
            event(watcher::Event::InitApply(config_map("one"))).is_empty(),
            "not before the list is through"
        );
        assert_eq!(
            event(watcher::Event::InitDone),
            ["reads-gone", "reads-one"],
            "what it brought, and what was read but is gone"
        );
    }
}
