//! The controllers and their wiring: watches, caches, the dependency index, and the client
//! whose requests are counted.

pub mod cache;
pub mod context;
pub mod fair;
pub mod index;
pub mod instance;
pub mod launch;
pub mod lean;
pub mod network;
pub mod queue;
pub mod recorder;
pub mod runner;
pub mod runtime;
pub mod status_patch;
mod triggers;
pub mod watch_health;

use std::sync::Arc;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ResourceQuota, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use self::context::{Context, InstanceSettings};
use self::index::{Dependency, DependencyIndex};
use self::triggers::{Dependents, Keys, instance_dependency, relisted, relisting, runtime_events, service_owner};
use self::watch_health::WatchHealth;
use crate::api::ComputeInstance;
use crate::build::pod::{OWNED_POD_SELECTOR, PodTemplate};
use crate::build::service::OWNED_SERVICE_SELECTOR;
use crate::catalog::Catalog;
use crate::metrics::Metrics;

/// Operator settings for the controllers.
pub struct Settings {
    /// The instance-type catalog.
    pub catalog: Catalog,
    /// The operator's side of the runtime pod template.
    pub template: PodTemplate,
    /// How many runtimes reconcile at once.
    pub concurrency: u16,
    /// Turns round robin over namespaces ([`queue`], [`fair`]); false: first come, first
    /// served.
    pub namespace_fairness: bool,
    /// How many of the operator's runtime pods may wait for kube-scheduler at once, shared over
    /// the namespaces ([`launch`]); 0: no limit.
    pub launch_window: usize,
    /// Watch only this namespace; `None`: every namespace.
    pub namespace: Option<String>,
    /// Idle-stop settings.
    pub idle: crate::idle::IdleSettings,
    /// Compute-instance settings.
    pub instances: InstanceSettings,
    /// How the registry is reached.
    pub registry: crate::registry::RegistrySettings,
    /// How often versions are checked.
    pub version_interval: std::time::Duration,
    /// Versions never pinned or offered.
    pub denied_versions: Vec<String>,
    /// Keep a runtime NetworkPolicy in every namespace with runtimes, letting these peers reach
    /// the activity ports.
    pub network: Option<network::NetworkSettings>,
}

/// An API for every namespace, or for the one the operator is limited to.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A client whose every request is counted in `metrics` (reads and writes, by resource).
pub fn counting_client(config: kube::Config, metrics: Arc<Metrics>) -> kube::Result<Client> {
    let layer = tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
        metrics.api_request(request.method(), request.uri().path());
        request
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// How a failing watch retries: quickly at first, at most every few seconds, so the operator sees
/// the cluster again within seconds of an API server coming back (kube's default backoff grows
/// to 30 s plus jitter and keeps that delay for two minutes after the errors stop). A watch that
/// the API server ends with 410 Expired starts over with a fresh list after one such delay.
fn watch_backoff() -> impl kube::runtime::utils::Backoff {
    kube::runtime::utils::ResetTimerBackoff::new(
        watcher::ExponentialBackoff::from(
            backon::ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(250))
                .with_max_delay(std::time::Duration::from_secs(3))
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
        ),
        std::time::Duration::from_secs(30),
    )
}

/// Records every item of the watch `name` in `health` (delivering, or failing since when), logs
/// its errors and keeps them out of the controller. Each watch retries on its own backoff; an
/// error that reached the controller would pause *every* watch behind the controller's trigger
/// backoff (kube's default: up to 30 s plus jitter, kept for two minutes), which is what left the
/// operator deaf for minutes after an API server restart.
fn tracked<K>(
    health: &Arc<WatchHealth>,
    name: &'static str,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) -> std::future::Ready<bool> + Send + 'static {
    let health = health.clone();
    move |item| {
        health.observe(name, item.is_ok());
        if let Err(err) = item {
            warn!(watch = name, error = %err, "watch failed; retrying");
        }
        std::future::ready(item.is_ok())
    }
}

/// Runs the PromptFlowRuntime and ComputeInstance controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    health: Arc<WatchHealth>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = settings.namespace.as_deref();
    let pods = cache::Cache::new();
    let services = cache::Cache::new();
    let (pod_writer, service_writer) = (pods.writer(), services.writer());
    let (accounts, account_writer) = reflector::store();
    let (quotas, quota_writer) = reflector::store();
    let runtimes_cache = cache::Cache::new();
    let runtime_writer = runtimes_cache.writer_by(|old: &lean::CachedRuntime, new| old.uid() == new.uid());
    let (instance_store, instance_writer) = reflector::store::<ComputeInstance>();
    let (wake_instances, instance_wakes) = futures::channel::mpsc::unbounded();
    let (wake_runtimes, runtime_wakes) = futures::channel::mpsc::unbounded();
    let shutdown = shutdown.shared();

    let pod_stream = watcher(
        scoped::<lean::LeanPod>(&client, scope),
        watcher::Config::default().labels(OWNED_POD_SELECTOR),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "pods"));
    let service_stream = watcher(
        scoped::<lean::LeanService>(&client, scope),
        watcher::Config::default().labels(OWNED_SERVICE_SELECTOR),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "services"));
    let account_stream = watcher(scoped::<ServiceAccount>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "service accounts"))
        .modify(lean::trim_account)
        .reflect(account_writer);
    let quota_stream = watcher(scoped::<ResourceQuota>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "resource quotas"))
        .modify(lean::trim_quota)
        .reflect(quota_writer);
    // ConfigMaps only wake runtimes; their content is read when a runtime reconciles. Secrets are
    // not watched at all (RBAC grants `get` on them, nothing more): a runtime blocked by a pull
    // secret is checked again with backoff and whenever its service account changes.
    let config_map_stream = watcher(
        scoped::<PartialObjectMeta<ConfigMap>>(&client, scope),
        watcher::Config::default(),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "config maps"));

    // Store::wait_until_ready wakes only its latest waiter, so exactly one task waits on the
    // stores and broadcasts readiness to every reconcile.
    // /readyz turns ready with them.
    let (ready_tx, caches_ready) = tokio::sync::watch::channel(false);
    // The runtime cache is waited on by the runner and the instance store by its controller
    // (kube's store wakes only its latest waiter), so their first full list is signalled from
    // their streams instead.
    let (runtimes_listed, mut runtimes_listed_rx) = tokio::sync::watch::channel(false);
    let (instances_listed, mut instances_listed_rx) = tokio::sync::watch::channel(false);
    let waiting = (pods.clone(), services.clone(), accounts.clone(), quotas.clone());
    tokio::spawn(async move {
        let (pods, services, accounts, quotas) = waiting;
        if pods.wait_until_ready().await.is_ok()
            && services.wait_until_ready().await.is_ok()
            && accounts.wait_until_ready().await.is_ok()
            && quotas.wait_until_ready().await.is_ok()
            && runtimes_listed_rx.wait_for(|listed| *listed).await.is_ok()
            && instances_listed_rx.wait_for(|listed| *listed).await.is_ok()
        {
            info!("caches filled");
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = ready_tx.send(true);
        }
    });
    let (answered_tx, mut answered) = futures::channel::mpsc::unbounded::<String>();
    let counting = metrics.clone();
    let versions = Arc::new(crate::registry::VersionCache::new(
        crate::registry::Registry::new(&settings.registry),
        settings.version_interval,
        settings.denied_versions,
        Arc::new(move |kind| counting.registry_request(kind)),
        Arc::new(move |repository: &str| {
            let _ = answered_tx.unbounded_send(repository.to_owned());
        }),
    ));
    // The runtimes to reconcile; the launch window puts parked runtimes back at the front.
    let queue = queue::FairQueue::new(settings.namespace_fairness);
    let context = Arc::new(Context {
        client: client.clone(),
        catalog: settings.catalog,
        template: settings.template,
        recorder: recorder::Recorder::new(client.clone(), runtime::MANAGER, std::env::var("POD_NAME").ok()),
        pods,
        services,
        probe: Default::default(),
        idle: settings.idle,
        started: k8s_openapi::jiff::Timestamp::now(),
        accounts,
        quotas,
        index: DependencyIndex::default(),
        metrics,
        caches_ready,
        own_writes: Default::default(),
        failures: Default::default(),
        pull_secret_waits: Default::default(),
        quota_refusals: Default::default(),
        logins: Default::default(),
        runtimes: runtimes_cache.clone(),
        instances: instance_store.clone(),
        instance_index: DependencyIndex::default(),
        instance_settings: settings.instances,
        instance_memory: Default::default(),
        wake_instances,
        wake_runtimes,
        versions,
        network: settings.network,
        network_ensured: Default::default(),
        launch: launch::LaunchWindow::new(settings.launch_window, queue.clone()),
    });
    // A first or changed registry answer wakes the runtimes of that repository.
    let waking = context.clone();
    tokio::spawn(async move {
        while let Some(repository) = answered.next().await {
            waking.wake_runtimes_of(&Dependency::Repository(repository));
        }
    });
    // The operator's own maps, counted when /metrics is read (the churn test reads them).
    let weak = Arc::downgrade(&context);
    context.metrics.count_entries_with(Box::new(move || {
        let Some(ctx) = weak.upgrade() else {
            return vec![];
        };
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        vec![
            ("dependency_index", count(ctx.index.len())),
            ("instance_index", count(ctx.instance_index.len())),
            ("own_writes", count(ctx.own_writes.len())),
            ("instance_memory", count(ctx.instance_memory.len())),
            ("failure_backoff", count(ctx.failures.len())),
            ("pull_secret_waits", count(ctx.pull_secret_waits.len())),
            ("quota_refusals", count(ctx.quota_refusals.len())),
            ("version_answers", count(ctx.versions.answers_kept())),
            ("version_presses", count(ctx.versions.presses_in_progress())),
            ("network_policies", count(ctx.network_ensured.len())),
            ("launch_waiting_pods", count(ctx.launch.counts().0)),
            ("launch_parked", count(ctx.launch.counts().1)),
        ]
    }));
    // The reconciler records into the context's index; the mappers read the same one.
    let dependents = Dependents(context.clone());

    let counted = runtimes_cache.clone();
    context.metrics.count_phases_with(Box::new(move || {
        let mut counts = std::collections::BTreeMap::<&'static str, i64>::new();
        counted.for_each(|runtime| *counts.entry(runtime.phase()).or_default() += 1);
        counts.into_iter().collect()
    }));
    let timers = Arc::new(runner::Timers::default());
    // The runtime watch fills the runtime cache and drops a deleted runtime's entries in the
    // index, the write memory and the deadlines: reconciles never see deletions without a
    // finalizer.
    let of_runtime = runtime_events(
        context.clone(),
        runtime_writer,
        timers.clone(),
        runtimes_listed,
        scope.map(str::to_owned),
    );
    let runtime_stream = watcher(scoped::<lean::LeanRuntime>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "runtimes"));
    // An instance wakes the runtimes on it (a relist once through, and then also the runtimes on
    // an instance it no longer holds).
    let instance_context = context.clone();
    let mut instance_wakes_runtimes = relisted(
        dependents.clone(),
        |instance: &ComputeInstance| Some(instance_dependency(instance)),
        |dependency| matches!(dependency, Dependency::Instance(..)),
    );
    let instance_stream = watcher(scoped::<ComputeInstance>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "compute instances"))
        .modify(lean::trim_user)
        .reflect(instance_writer)
        .inspect_ok({
            let store = instance_store.clone();
            move |event| {
                match event {
                    watcher::Event::Delete(instance) => instance::forget(&instance_context, instance),
                    watcher::Event::InitDone => {
                        instances_listed.send_replace(true);
                        instance::forget_missing(&instance_context, |key| store.get(key).is_some());
                    }
                    _ => {}
                }
                for key in instance_wakes_runtimes(Ok(event.clone())) {
                    let namespace = key.namespace.as_deref().unwrap_or_default();
                    let _ = instance_context
                        .wake_runtimes
                        .unbounded_send(ObjectRef::new(&key.name).within(namespace));
                }
            }
        })
        .applied_objects();
    // Every watch event, mapper, wake and due deadline that names a runtime goes to the fair
    // queue; the runner takes runtimes from it while few wait for a turn, and each reconcile
    // waits at the gate for its turn (at most `concurrency` run, round robin over namespaces):
    // see [`queue`], [`runner`] and [`fair`]. Without fairness both are first come, first served.
    let turns = fair::FairGate::with_fairness(usize::from(settings.concurrency), settings.namespace_fairness);
    tokio::spawn({
        let (turns, queue, shutdown) = (turns.clone(), queue.clone(), shutdown.clone());
        async move {
            shutdown.await;
            queue.close();
            turns.close();
        }
    });
    context.metrics.watch_waiting_turns({
        let (turns, queue) = (turns.clone(), queue.clone());
        move || turns.waiting() + queue.waiting()
    });
    let of_pod = relisting(
        pod_writer,
        |pod| Box::new(lean::CachedPod::of(pod)),
        {
            let dependents = dependents.clone();
            move |pod: &lean::LeanPod| dependents.of_pod(&pod.namespace().unwrap_or_default(), |key| pod.label(key))
        },
        {
            let dependents = dependents.clone();
            move |namespace: &str, _: &str, pod: &_| dependents.of_pod(namespace, |key| pod.label(key))
        },
    );
    // A runtime's Service has the runtime's name.
    let of_service = relisting(
        service_writer,
        lean::CachedService::of,
        service_owner,
        |namespace: &str, name: &str, _: &lean::CachedService| vec![ObjectRef::new(name).within(namespace)],
    );
    let triggers: Vec<futures::stream::BoxStream<'static, Keys>> = vec![
        runtime_stream.map(of_runtime).boxed(),
        pod_stream
            .map({
                let ctx = context.clone();
                let mut of_pod = of_pod;
                move |item| {
                    if let Ok(event) = &item {
                        ctx.launch.observe(event, |namespace, runtime, controller| {
                            controller.is_some() && ctx.runtime_uid(runtime, namespace).as_deref() == controller
                        });
                    }
                    of_pod(item)
                }
            })
            .boxed(),
        service_stream.map(of_service).boxed(),
        runtime_wakes.map(|key| vec![lean::runtime_key(&key)]).boxed(),
        account_stream
            .map(relisted(
                dependents.clone(),
                |account: &ServiceAccount| Some(Dependency::ServiceAccount(account.namespace()?, account.name_any())),
                |dependency| matches!(dependency, Dependency::ServiceAccount(..)),
            ))
            .boxed(),
        config_map_stream
            .map(relisted(
                dependents.clone(),
                |map: &PartialObjectMeta<ConfigMap>| Some(Dependency::ConfigMap(map.namespace()?, map.name_any())),
                |dependency| matches!(dependency, Dependency::ConfigMap(..)),
            ))
            .boxed(),
        quota_stream
            .map(relisted(
                dependents.clone(),
                |quota: &ResourceQuota| quota.namespace().map(Dependency::Quotas),
                |dependency| matches!(dependency, Dependency::Quotas(..)),
            ))
            .boxed(),
    ];
    // The watches (and so the caches) are driven here, and deadlines come due onto the queue;
    // both are polled with the controllers below, so a panic in them ends the process (and its
    // pod restarts) instead of leaving the operator on frozen caches.
    let watching = {
        let (queue, shutdown) = (queue.clone(), shutdown.clone());
        let mut triggers = futures::stream::select_all(triggers).take_until(shutdown);
        async move {
            while let Some(keys) = triggers.next().await {
                for key in &keys {
                    queue.push(key);
                }
            }
        }
    };
    let deadlines = {
        let (timers, queue, shutdown, ctx) = (timers.clone(), queue.clone(), shutdown.clone(), context.clone());
        async move {
            tokio::select! {
                () = timers.fire(&queue) => {}
                () = ctx.launch.announce_stalls() => {}
                () = shutdown => {}
            }
        }
    };
    let instance_controller = Controller::for_stream(instance_stream, instance_store)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .trigger_backoff(watch_backoff())
        .reconcile_on(instance_wakes)
        .graceful_shutdown_on(shutdown);
    info!(
        concurrency = settings.concurrency,
        namespace = scope.unwrap_or("(all)"),
        "PromptFlowRuntime controller running"
    );
    let reconciling = context.clone();
    let first = {
        let ctx = context.clone();
        move |key: &lean::Named| ctx.launch.handed(key)
    };
    let runtimes = runner::run(queue, turns, timers, runtimes_cache, first, move |key, cached| {
        let ctx = reconciling.clone();
        let key = key.to_ref::<crate::api::PromptFlowRuntime>();
        let uid = cached.uid().map(str::to_owned);
        // Built once it has its turn, so a waiting reconcile stays small.
        let full = cached.full(&key.name, key.namespace.as_deref().unwrap_or_default());
        async move {
            let result = match full {
                Ok(full) => unpanicking(runtime::reconcile(Arc::new(full), ctx.clone())).await,
                Err(err) => Err(err),
            };
            match result {
                Ok(action) => action,
                Err(err) => runtime::error_policy(&key, uid.as_deref(), &err, &ctx),
            }
        }
    });
    let instances = instance_controller
        .run(
            |instance, ctx| unpanicking(instance::reconcile(instance, ctx)),
            instance::error_policy,
            context,
        )
        .for_each(|result| async move { log_failure(result.err()) });
    futures::join!(runtimes, instances, watching, deadlines);
    info!("controllers stopped");
}

/// A reconcile whose panic becomes an error of its object, retried with backoff like any other:
/// one object's unforeseen input never takes the process (and every namespace) down.
async fn unpanicking<T>(
    reconcile: impl std::future::Future<Output = crate::error::Result<T>>,
) -> crate::error::Result<T> {
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(crate::error::Error::Panicked(message))
        }
    }
}

fn log_failure(err: Option<controller::Error<crate::error::Error, watcher::Error>>) {
    match err {
        None | Some(controller::Error::ObjectNotFound(_)) => {}
        Some(other) => warn!(error = %other, "controller"),
    }
}
