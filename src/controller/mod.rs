//! The controllers and their wiring: watches, caches, the dependency index, and the client
//! whose requests are counted.

pub mod index;
pub mod runtime;
pub mod watch_health;

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Service, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use self::index::{Dependency, DependencyIndex};
use self::runtime::Context;
use self::watch_health::WatchHealth;
use crate::api::conditions::reasons;
use crate::api::{PromptFlowRuntime, RuntimePhase};
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
    /// Watch only this namespace; `None`: every namespace.
    pub namespace: Option<String>,
    /// Idle-stop settings.
    pub idle: crate::idle::IdleSettings,
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

/// Drops what the caches do not need.
fn trim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Runs the PromptFlowRuntime controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    health: Arc<WatchHealth>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = settings.namespace.as_deref();
    let (pods, pod_writer) = reflector::store();
    let (services, service_writer) = reflector::store();
    let (accounts, account_writer) = reflector::store();
    let (quotas, quota_writer) = reflector::store();

    let pod_stream = watcher(
        scoped::<Pod>(&client, scope),
        watcher::Config::default().labels(OWNED_POD_SELECTOR),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "pods"))
    .modify(trim)
    .reflect(pod_writer)
    .touched_objects();
    let service_stream = watcher(
        scoped::<Service>(&client, scope),
        watcher::Config::default().labels(OWNED_SERVICE_SELECTOR),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "services"))
    .modify(trim)
    .reflect(service_writer)
    .touched_objects();
    let account_stream = watcher(scoped::<ServiceAccount>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "service accounts"))
        .modify(trim)
        .reflect(account_writer)
        .touched_objects();
    let quota_stream = watcher(scoped::<ResourceQuota>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "resource quotas"))
        .modify(trim)
        .reflect(quota_writer)
        .touched_objects();
    // ConfigMaps only wake runtimes; their content is read when a runtime reconciles. Secrets are
    // not watched at all (RBAC grants `get` on them, nothing more): a runtime blocked by a pull
    // secret is checked again with backoff and whenever its service account changes.
    let config_map_stream = watcher(
        scoped::<PartialObjectMeta<ConfigMap>>(&client, scope),
        watcher::Config::default(),
    )
    .backoff(watch_backoff())
    .filter(tracked(&health, "config maps"))
    .touched_objects();

    // Store::wait_until_ready wakes only its latest waiter, so exactly one task waits on the
    // stores and broadcasts readiness to every reconcile.
    // /readyz turns ready with them.
    let (ready_tx, caches_ready) = tokio::sync::watch::channel(false);
    let waiting = (pods.clone(), services.clone(), accounts.clone(), quotas.clone());
    tokio::spawn(async move {
        let (pods, services, accounts, quotas) = waiting;
        if pods.wait_until_ready().await.is_ok()
            && services.wait_until_ready().await.is_ok()
            && accounts.wait_until_ready().await.is_ok()
            && quotas.wait_until_ready().await.is_ok()
        {
            info!("caches filled");
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = ready_tx.send(true);
        }
    });
    let reporter = Reporter {
        controller: runtime::MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let context = Arc::new(Context {
        client: client.clone(),
        catalog: settings.catalog,
        template: settings.template,
        recorder: Recorder::new(client.clone(), reporter),
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
    });
    // The reconciler records into the context's index; the mappers read the same one.
    let dependents = Dependents(context.clone());

    // The runtime watch is ours (not the controller's) so a deleted runtime's entries in the
    // index and the write memory are dropped: reconciles never see deletions without a finalizer.
    let (runtime_store, runtime_writer) = reflector::store::<PromptFlowRuntime>();
    let counted = runtime_store.clone();
    context.metrics.count_phases_with(Box::new(move || {
        let mut counts = std::collections::BTreeMap::<&'static str, i64>::new();
        for runtime in counted.state() {
            let status = runtime.status.as_ref();
            let stopped = status
                .and_then(|s| s.reason.as_deref())
                .is_some_and(|r| [reasons::STOPPED_IDLE, reasons::STOPPED_BY_USER].contains(&r));
            let phase = match status.map(|s| s.phase) {
                _ if stopped => "Stopped",
                Some(RuntimePhase::Running) => "Running",
                _ => "Not available",
            };
            *counts.entry(phase).or_default() += 1;
        }
        counts.into_iter().collect()
    }));
    let forgetting = context.clone();
    let runtime_stream = watcher(scoped::<PromptFlowRuntime>(&client, scope), watcher::Config::default())
        .backoff(watch_backoff())
        .filter(tracked(&health, "runtimes"))
        .modify(trim)
        .reflect(runtime_writer)
        .inspect_ok({
            let store = runtime_store.clone();
            move |event| match event {
                watcher::Event::Delete(runtime) => runtime::forget(&forgetting, runtime),
                watcher::Event::InitDone => runtime::forget_missing(&forgetting, |key| store.get(key).is_some()),
                _ => {}
            }
        })
        .applied_objects();
    let controller = Controller::for_stream(runtime_stream, runtime_store)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .trigger_backoff(watch_backoff())
        .owns_stream(pod_stream)
        .owns_stream(service_stream)
        .watches_stream(account_stream, dependents.of(Dependency::ServiceAccount))
        .watches_stream(
            config_map_stream,
            dependents.of::<PartialObjectMeta<ConfigMap>>(Dependency::ConfigMap),
        )
        .watches_stream(quota_stream, {
            let dependents = dependents.clone();
            move |quota: ResourceQuota| {
                quota
                    .namespace()
                    .map(|ns| dependents.0.index.dependents(&Dependency::Quotas(ns)))
                    .unwrap_or_default()
            }
        })
        .graceful_shutdown_on(shutdown);
    info!(
        concurrency = settings.concurrency,
        namespace = scope.unwrap_or("(all)"),
        "PromptFlowRuntime controller running"
    );
    controller
        .run(runtime::reconcile, runtime::error_policy, context)
        .for_each(|result| async move {
            if let Err(err) = result {
                match err {
                    controller::Error::ObjectNotFound(_) => {}
                    other => warn!(error = %other, "controller"),
                }
            }
        })
        .await;
    info!("PromptFlowRuntime controller stopped");
}

/// Looks up, for a watched object, the runtimes whose last reconcile read it (the context's
/// dependency index, shared with the watch mappers).
#[derive(Clone)]
struct Dependents(Arc<Context>);

impl Dependents {
    /// A watch mapper: an object of kind `K`, keyed by `dependency`, to the runtimes that read it.
    fn of<K: Resource>(
        &self,
        dependency: fn(String, String) -> Dependency,
    ) -> impl Fn(K) -> Vec<ObjectRef<PromptFlowRuntime>> + Send + Sync + 'static {
        let handle = self.clone();
        move |object: K| match object.meta().namespace.clone() {
            Some(namespace) => handle
                .0
                .index
                .dependents(&dependency(namespace, object.meta().name.clone().unwrap_or_default())),
            None => vec![],
        }
    }
}
