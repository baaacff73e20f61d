//! The operator's own caches of its runtimes, pods and Services, filled from their watches. A
//! kube-runtime `Store` keeps each object under a key of four strings (name, namespace, uid and
//! resourceVersion) and the object itself with a k8s-openapi `ObjectMeta` (about 350 bytes
//! before any field is set); these keep, per namespace (one shared copy of its name), each
//! object's name once and a compact value made from the watched object, so ten thousand
//! runtimes, their pods and Services cost a few hundred bytes each.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use kube::ResourceExt;
use kube::runtime::watcher;

/// Objects by namespace and name, as `T` keeps them.
pub struct Cache<T> {
    state: RwLock<State<T>>,
    ready: tokio::sync::watch::Sender<Readiness>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Listing,
    Ready,
    /// Its watch ended (the operator is stopping): waiting for it is over.
    Closed,
}

/// The cache went away before it was filled.
#[derive(Debug)]
pub struct Closed;

/// What a cache's watch applies its events through; dropped with the watch, it closes the cache,
/// so nothing waits for a list that will never come.
pub struct Writer<T> {
    cache: Arc<Cache<T>>,
    /// Whether two values kept under one name are the same object.
    same: fn(&T, &T) -> bool,
}

impl<T> Writer<T> {
    /// Applies one watch event, keeping of each object what `keep` makes of it. At the end of a
    /// (re)list, gives back the objects the list no longer holds (namespace, name and what was
    /// kept): deleted while the watch was away, they had no event of their own; so is one the
    /// list holds another object under its name instead of (deleted and made again meanwhile).
    pub fn apply<W: kube::Resource>(
        &self,
        event: &watcher::Event<W>,
        keep: impl Fn(&W) -> T,
    ) -> Vec<(Arc<str>, Box<str>, T)> {
        self.cache.apply(event, keep, self.same)
    }
}

impl<T> Drop for Writer<T> {
    fn drop(&mut self) {
        self.cache.ready.send_if_modified(|state| {
            let open = *state != Readiness::Closed;
            *state = Readiness::Closed;
            open
        });
    }
}

/// Per namespace, its objects by name.
type Objects<T> = HashMap<Arc<str>, HashMap<Box<str>, T>>;

struct State<T> {
    live: Objects<T>,
    /// A relist in progress: the objects listed so far, which replace `live` when it is done.
    relist: Option<Objects<T>>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            state: RwLock::new(State {
                live: HashMap::new(),
                relist: None,
            }),
            ready: tokio::sync::watch::channel(Readiness::Listing).0,
        }
    }
}

impl<T> Cache<T> {
    /// An empty cache, not ready until its watch has listed once.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The writer its watch applies events through (one per cache).
    pub fn writer(self: &Arc<Self>) -> Writer<T> {
        self.writer_by(|_, _| true)
    }

    /// The writer its watch applies events through, for objects that `same` tells apart under
    /// one name (by uid).
    pub fn writer_by(self: &Arc<Self>, same: fn(&T, &T) -> bool) -> Writer<T> {
        Writer {
            cache: self.clone(),
            same,
        }
    }

    fn apply<W: kube::Resource>(
        &self,
        event: &watcher::Event<W>,
        keep: impl Fn(&W) -> T,
        same: fn(&T, &T) -> bool,
    ) -> Vec<(Arc<str>, Box<str>, T)> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let mut gone = vec![];
        match event {
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                let relist = state.relist.get_or_insert_with(HashMap::new);
                insert(relist, object, keep(object));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = state.relist.take() {
                    let before = std::mem::replace(&mut state.live, listed);
                    for (namespace, objects) in before {
                        let now = state.live.get(&namespace);
                        for (name, object) in objects {
                            let kept = now.and_then(|now| now.get(&name));
                            if kept.is_none_or(|kept| !same(&object, kept)) {
                                gone.push((namespace.clone(), name, object));
                            }
                        }
                    }
                }
                drop(state);
                self.ready.send_if_modified(|state| {
                    let listing = *state == Readiness::Listing;
                    if listing {
                        *state = Readiness::Ready;
                    }
                    listing
                });
            }
            watcher::Event::Apply(object) => insert(&mut state.live, object, keep(object)),
            watcher::Event::Delete(object) => {
                let namespace = object.namespace().unwrap_or_default();
                if let Some(objects) = state.live.get_mut(namespace.as_str()) {
                    objects.remove(object.name_any().as_str());
                    if objects.is_empty() {
                        state.live.remove(namespace.as_str());
                    }
                }
            }
        }
        gone
    }

    /// What `read` makes of the object `name` of `namespace`, if cached.
    pub fn get<R>(&self, namespace: &str, name: &str, read: impl FnOnce(&T) -> R) -> Option<R> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.live.get(namespace)?.get(name).map(read)
    }

    /// What `read` makes of each object of `namespace` it returns something for, with its name.
    pub fn in_namespace<R>(&self, namespace: &str, read: impl Fn(&str, &T) -> Option<R>) -> Vec<R> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state
            .live
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|(name, object)| read(name, object))
            .collect()
    }

    /// Calls `visit` with what is kept of each cached object.
    pub fn for_each(&self, mut visit: impl FnMut(&T)) {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.live.values().flat_map(HashMap::values).for_each(&mut visit);
    }

    /// Whether any object of `namespace` is cached.
    pub fn any_in(&self, namespace: &str) -> bool {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.live.get(namespace).is_some_and(|objects| !objects.is_empty())
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.live.values().map(HashMap::len).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the watch has listed once; `Err` if it ended first.
    pub async fn wait_until_ready(&self) -> Result<(), Closed> {
        let mut ready = self.ready.subscribe();
        match ready.wait_for(|state| *state != Readiness::Listing).await.map(|s| *s) {
            Ok(Readiness::Ready) => Ok(()),
            _ => Err(Closed),
        }
    }
}

fn insert<T, W: kube::Resource>(objects: &mut Objects<T>, object: &W, value: T) {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    match objects.get_mut(namespace.as_str()) {
        Some(named) => {
            named.insert(name.into(), value);
        }
        None => {
            objects.insert(
                super::lean::status::text(&namespace),
                HashMap::from([(name.into_boxed_str(), value)]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn object(namespace: &str, name: &str, value: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "data": {"v": value},
        }))
        .unwrap()
    }

    fn value(object: &ConfigMap) -> String {
        object.data.as_ref().unwrap()["v"].clone()
    }

    #[tokio::test]
    async fn a_cache_follows_its_watch_and_a_relist_replaces_it_whole() {
        let cache = Cache::<String>::new();
        let writer = cache.writer();
        assert!(
            cache.wait_until_ready().now_or_never().is_none(),
            "not ready before a list"
        );
        writer.apply(&watcher::Event::Init, value);
        writer.apply(&watcher::Event::InitApply(object("a", "one", "1")), value);
        writer.apply(&watcher::Event::InitApply(object("b", "one", "2")), value);
        assert_eq!(
            cache.get("a", "one", Clone::clone),
            None,
            "a list takes effect when done"
        );
        writer.apply(&watcher::Event::<ConfigMap>::InitDone, value);
        assert!(cache.wait_until_ready().now_or_never().is_some());
        assert_eq!(cache.get("a", "one", Clone::clone).as_deref(), Some("1"));
        assert_eq!(cache.get("b", "one", Clone::clone).as_deref(), Some("2"));
        writer.apply(&watcher::Event::Apply(object("a", "two", "3")), value);
        writer.apply(&watcher::Event::Apply(object("a", "one", "4")), value);
        let mut seen = cache.in_namespace("a", |name, v| Some(format!("{name}={v}")));
        seen.sort();
        assert_eq!(seen, ["one=4", "two=3"]);
        writer.apply(&watcher::Event::Delete(object("b", "one", "2")), value);
        assert_eq!(cache.get("b", "one", Clone::clone), None);
        assert_eq!(cache.len(), 2);
        // A relist: what it does not list is gone (and given back), what it lists is as listed.
        writer.apply(&watcher::Event::Init, value);
        writer.apply(&watcher::Event::InitApply(object("a", "two", "5")), value);
        assert_eq!(cache.len(), 2, "the old view stays until the relist is done");
        let gone = writer.apply(&watcher::Event::<ConfigMap>::InitDone, value);
        assert_eq!(
            gone.iter()
                .map(|(ns, name, v)| format!("{ns}/{name}={v}"))
                .collect::<Vec<_>>(),
            ["a/one=4"]
        );
        assert_eq!(cache.get("a", "one", Clone::clone), None);
        assert_eq!(cache.get("a", "two", Clone::clone).as_deref(), Some("5"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_relist_gives_back_an_object_made_again_under_its_name_meanwhile() {
        let cache = Cache::<String>::new();
        // Values stand for uids here.
        let writer = cache.writer_by(|old, new| old == new);
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("a", "chat", "uid-1")),
            watcher::Event::InitApply(object("a", "kept", "uid-2")),
            watcher::Event::InitDone,
        ] {
            writer.apply(&event, value);
        }
        writer.apply(&watcher::Event::Init, value);
        writer.apply(&watcher::Event::InitApply(object("a", "chat", "uid-3")), value);
        writer.apply(&watcher::Event::InitApply(object("a", "kept", "uid-2")), value);
        let gone = writer.apply(&watcher::Event::<ConfigMap>::InitDone, value);
        assert_eq!(
            gone.iter()
                .map(|(_, name, v)| format!("{name}={v}"))
                .collect::<Vec<_>>(),
            ["chat=uid-1"],
            "the one deleted and made again, not the one kept"
        );
        assert_eq!(cache.get("a", "chat", Clone::clone).as_deref(), Some("uid-3"));
    }

    #[tokio::test]
    async fn a_cache_whose_watch_ends_before_its_list_stops_being_waited_for() {
        let cache = Cache::<String>::new();
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.wait_until_ready().await.is_ok() }
        });
        tokio::task::yield_now().await;
        drop(cache.writer());
        assert!(!waiting.await.unwrap(), "closed, not ready");
        assert!(cache.wait_until_ready().await.is_err());
    }

    use futures::FutureExt;
}
