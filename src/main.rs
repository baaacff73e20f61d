//! The `promptflow-operator` process: connects, checks its CRDs, serves the admin endpoints and
//! runs the controllers until SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;

use clap::Parser;
use clap::builder::TypedValueParser;
use promptflow_operator::admin::{self, AdminState};
use promptflow_operator::build::instance::ResourceLayout;
use promptflow_operator::build::pod::{PodSecurity, PodTemplate};
use promptflow_operator::catalog::Catalog;
use promptflow_operator::controller::context::{InstanceSettings, LayoutChoice};
use promptflow_operator::controller::watch_health::WatchHealth;
use promptflow_operator::controller::{self, Settings};
use promptflow_operator::error::Error;
use promptflow_operator::idle::IdleSettings;
use promptflow_operator::leader::{self, LeaseSettings};
use promptflow_operator::metrics::Metrics;
use promptflow_operator::registry::RegistrySettings;
use promptflow_operator::{preflight, proxy, telemetry};
use tracing::{error, info};

/// The `--instance-resources` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum InstanceResources {
    Auto,
    Pod,
    Containers,
}

/// The layout instance pods start with: pod-level resources are beta and on by default from
/// Kubernetes 1.34.
fn instance_layout(
    choice: InstanceResources,
    version: &k8s_openapi::apimachinery::pkg::version::Info,
) -> ResourceLayout {
    let minor: u32 = version
        .minor
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    let major: u32 = version.major.parse().unwrap_or(0);
    match choice {
        InstanceResources::Pod => ResourceLayout::Pod,
        InstanceResources::Containers => ResourceLayout::Containers,
        InstanceResources::Auto if major > 1 || (major == 1 && minor >= 34) => ResourceLayout::Pod,
        InstanceResources::Auto => ResourceLayout::Containers,
    }
}

/// Kubernetes operator for prompt flow runtimes. The cluster comes from the standard kubeconfig
/// resolution: $KUBECONFIG, ~/.kube/config, or the in-cluster service account.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Run a helper instead of the operator.
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format.
    #[arg(long, env = "PF_LOG_FORMAT", value_enum, default_value_t)]
    log_format: telemetry::LogFormat,
    /// The instance-type catalog (YAML). Absent: the built-in catalog.
    #[arg(long, env = "PF_CATALOG")]
    catalog: Option<PathBuf>,
    /// Where the admin server (/metrics, /healthz, /readyz) listens; port 0 picks a free one.
    #[arg(long, env = "PF_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    admin_address: SocketAddr,
    /// How many runtimes reconcile at once.
    #[arg(long, env = "PF_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Give turns to reconcile round robin over namespaces (a namespace's backlog never holds
    /// another's runtimes back); false: first come, first served.
    #[arg(long, env = "PF_NAMESPACE_FAIRNESS", default_value_t = true, action = clap::ArgAction::Set)]
    namespace_fairness: bool,
    /// How many of the operator's runtime pods may wait for kube-scheduler at once, shared over
    /// the namespaces with pods waiting (kube-scheduler serves all namespaces from one queue by
    /// age, so a namespace starting thousands of runtimes would hold every other one back); 0: no
    /// limit.
    #[arg(long, env = "PF_LAUNCH_WINDOW", default_value_t = 100)]
    launch_window: usize,
    /// Run runtime pods under the restricted Pod Security profile (turn off for images that
    /// need root).
    #[arg(long, env = "PF_RESTRICTED_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    restricted_pods: bool,
    /// The user id runtime containers run as under the restricted profile.
    #[arg(long, env = "PF_RUNTIME_USER", default_value_t = 1000)]
    runtime_user: i64,
    /// Seconds a runtime may take to answer `/health` for the first time (environment set-up and
    /// requirement installs) before the kubelet restarts it; rounded down to tens of seconds.
    #[arg(long, env = "PF_RUNTIME_STARTUP_SECONDS", default_value_t = promptflow_operator::build::pod::DEFAULT_STARTUP_SECONDS, value_parser = clap::value_parser!(i32).range(10..=86400))]
    runtime_startup_seconds: i32,
    /// The image of the activity-proxy sidecar in runtime pods: the operator's own image (the
    /// chart sets it). Absent: `promptflow-operator:<this version>`.
    #[arg(long, env = "PF_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Paths (comma-separated) whose GET and HEAD requests through a runtime's activity proxy are
    /// health checks: forwarded, never counted as activity.
    #[arg(long, env = "PF_PROXY_HEALTH_PATHS", value_delimiter = ',', default_value = proxy::limits::DEFAULT_HEALTH_PATHS)]
    proxy_health_paths: Vec<String>,
    /// The activity proxy closes a connection whose request head is not complete this long after
    /// it opened or after the head's first byte (Go duration).
    #[arg(long, env = "PF_PROXY_HEADER_TIMEOUT", default_value = proxy::limits::DEFAULT_HEADER_TIMEOUT, value_parser = proxy::limits::parse_duration)]
    proxy_header_timeout: Duration,
    /// The activity proxy closes a connection that has had no request in progress this long.
    #[arg(long, env = "PF_PROXY_KEEP_ALIVE_TIMEOUT", default_value = proxy::limits::DEFAULT_KEEP_ALIVE_TIMEOUT, value_parser = proxy::limits::parse_duration)]
    proxy_keep_alive_timeout: Duration,
    /// The runtime must start answering a request within this long (504 after it); flows may run
    /// for minutes (Go duration).
    #[arg(long, env = "PF_PROXY_UPSTREAM_TIMEOUT", default_value = proxy::limits::DEFAULT_UPSTREAM_TIMEOUT, value_parser = proxy::limits::parse_duration)]
    proxy_upstream_timeout: Duration,
    /// Open client connections per activity proxy at most; more are answered 503.
    #[arg(long, env = "PF_PROXY_MAX_CONNECTIONS", default_value_t = proxy::limits::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    proxy_max_connections: usize,
    /// The largest request head an activity proxy accepts, in bytes (431 above it).
    #[arg(long, env = "PF_PROXY_MAX_HEADER_BYTES", default_value_t = proxy::limits::DEFAULT_MAX_HEADER_BYTES, value_parser = clap::value_parser!(u32).range(8192..).map(|n| n as usize))]
    proxy_max_header_bytes: usize,
    /// How long an activity proxy lets requests in flight finish when its pod stops; runtime pods
    /// get this plus 5 s as terminationGracePeriodSeconds (Go duration).
    #[arg(long, env = "PF_PROXY_DRAIN_TIMEOUT", default_value = proxy::limits::DEFAULT_DRAIN_TIMEOUT, value_parser = proxy::limits::parse_duration)]
    proxy_drain_timeout: Duration,
    /// How long before an idle runtime's deadline the IdleSoon warning comes, in percent of its
    /// idle timeout …
    #[arg(long, env = "PF_IDLE_WARNING_PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=50))]
    idle_warning_percent: u32,
    /// … and at most this many seconds before it.
    #[arg(long, env = "PF_IDLE_WARNING_MAX_SECONDS", default_value_t = 600)]
    idle_warning_max_seconds: u64,
    /// The image of a compute instance pod's primary container.
    #[arg(long, env = "PF_INSTANCE_IMAGE", default_value = promptflow_operator::build::instance::DEFAULT_INSTANCE_IMAGE)]
    instance_image: String,
    /// Attach and detach changes on a compute instance seen within this many seconds of the first
    /// one restart it once, together.
    #[arg(long, env = "PF_INSTANCE_RESTART_BATCH_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=600))]
    instance_restart_batch_seconds: u64,
    /// The shortest idle shutdown time of a compute instance (Go duration); shorter
    /// `idleTimeBeforeShutdown` values are raised to it. Lower it only for tests.
    #[arg(long, env = "PF_INSTANCE_MIN_IDLE", default_value = "15m", value_parser = parse_go_duration)]
    instance_min_idle: Duration,
    /// How a compute instance pod holds its size: `pod` (pod-level resources, Kubernetes 1.34+),
    /// `containers` (equal shares per container), or `auto` (pod-level from 1.34, falling back
    /// to shares when the API server drops them).
    #[arg(long, env = "PF_INSTANCE_RESOURCES", value_enum, default_value_t = InstanceResources::Auto)]
    instance_resources: InstanceResources,
    /// A PEM bundle of CAs trusted for registries besides the system's (repeatable).
    #[arg(long, env = "PF_REGISTRY_CA_FILE", value_delimiter = ',')]
    registry_ca_file: Vec<std::path::PathBuf>,
    /// A registry host (`host:port`) reached over plain HTTP (repeatable; none by default).
    #[arg(long, env = "PF_INSECURE_REGISTRY", value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// The package index every flow requirements install uses (`PIP_INDEX_URL`); absent: the
    /// image's pip configuration (PyPI unless the image says otherwise). It is visible in pod
    /// specs: no credentials in it.
    #[arg(long, env = "PF_PIP_INDEX_URL")]
    pip_index_url: Option<String>,
    /// More package indexes for every requirements install (`PIP_EXTRA_INDEX_URL`; repeatable).
    #[arg(long, env = "PF_PIP_EXTRA_INDEX_URL", value_delimiter = ',')]
    pip_extra_index_url: Vec<String>,
    /// Hosts pip trusts without TLS for every requirements install (`PIP_TRUSTED_HOST`; repeatable).
    #[arg(long, env = "PF_PIP_TRUSTED_HOST", value_delimiter = ',')]
    pip_trusted_host: Vec<String>,
    /// Let requirement files choose their own package sources: index and source options
    /// (`--index-url`, `--extra-index-url`, `--find-links`, `--trusted-host`, `--no-index`, `-e`),
    /// direct URLs and VCS links. Off: such a file makes the runtime `FlowInvalid`, naming the line.
    #[arg(long, env = "PF_ALLOW_REQUIREMENT_SOURCES", default_value_t = false, action = clap::ArgAction::Set)]
    allow_requirement_sources: bool,
    /// The size limit of the volume a flow's requirements are installed into (a quantity).
    #[arg(long, env = "PF_PACKAGES_SIZE_LIMIT", default_value = promptflow_operator::flow::DEFAULT_PACKAGES_SIZE_LIMIT, value_parser = parse_quantity)]
    packages_size_limit: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    /// Keep a NetworkPolicy `promptflow-runtimes` in every namespace that holds runtimes: clients
    /// reach the activity proxies, only the operator's pods (`--operator-pod-labels` in the
    /// operator's namespace) reach the activity ports, nothing from outside a pod reaches a
    /// runtime's own port. Needs a network plugin that enforces NetworkPolicy.
    #[arg(long, env = "PF_RUNTIME_NETWORK_POLICY", default_value_t = false, action = clap::ArgAction::Set)]
    runtime_network_policy: bool,
    /// The operator pods' labels (`key=value`, comma-separated), which the runtime NetworkPolicy
    /// lets reach the activity ports.
    #[arg(long, env = "PF_OPERATOR_POD_LABELS", value_delimiter = ',', value_parser = parse_label)]
    operator_pod_labels: Vec<(String, String)>,
    /// Versions never pinned or offered (comma-separated): upstream marked them "do not use".
    #[arg(
        long,
        env = "PF_DENIED_VERSIONS",
        value_delimiter = ',',
        default_value = "20241214.v1"
    )]
    denied_versions: Vec<String>,
    /// How often a runtime's registry is asked for newer versions (Go duration; jittered ±10%).
    #[arg(long, env = "PF_VERSION_CHECK_INTERVAL", default_value = "1h", value_parser = parse_go_duration)]
    version_check_interval: Duration,
    /// Watch only this namespace (a namespaced install); absent: every namespace.
    #[arg(long, env = "PF_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Elect a leader through a Lease before reconciling (run several replicas safely).
    #[arg(long, env = "PF_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's namespace (in a cluster: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a lease stays valid without renewal; a standby takes over after this.
    #[arg(long, env = "PF_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_seconds: u64,
    /// The Lease's name: one per installation.
    #[arg(long, env = "PF_LEASE_NAME", default_value = "promptflow-operator")]
    lease_name: String,
    /// Seconds a watch may keep failing before `/readyz` reports the operator not ready.
    #[arg(long, env = "PF_UNREADY_AFTER_WATCH_FAILURE", default_value_t = 30)]
    unready_after_watch_failure: u64,
    /// Seconds a watch may keep failing before `/healthz` fails, so the kubelet restarts the
    /// operator.
    #[arg(long, env = "PF_UNHEALTHY_AFTER_WATCH_FAILURE", default_value_t = 300)]
    unhealthy_after_watch_failure: u64,
    /// Check the cluster and the CRDs, then exit.
    #[arg(long)]
    check: bool,
}

/// Helpers that ship in the same binary (and so the same image) as the operator.
#[derive(clap::Subcommand)]
enum Command {
    /// The activity proxy: the sidecar in every runtime pod that forwards client traffic to the
    /// runtime and records when it was last used (`GET /activity`).
    ActivityProxy(proxy::ProxySettings),
}

#[cfg(feature = "heap-profile")]
#[global_allocator]
static HEAP: dhat::Alloc = dhat::Alloc;

/// jemalloc rather than glibc's malloc: with glibc the resident size was about twice the live
/// heap (freed memory between long-lived cache entries stays resident; README, Performance).
#[cfg(not(feature = "heap-profile"))]
#[global_allocator]
static HEAP: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Written when main returns (a clean shutdown), not on SIGKILL.
    #[cfg(feature = "heap-profile")]
    let _profiler = dhat::Profiler::builder()
        .file_name(std::env::var("PF_HEAP_PROFILE").unwrap_or_else(|_| "dhat-heap.json".into()))
        .build();
    let args = Args::parse();
    telemetry::init(args.log_format);
    if let Some(Command::ActivityProxy(settings)) = args.command {
        // One thread: the sidecar is given a tenth of a core, and a single-threaded runtime
        // does its work with less synchronisation and memory than a pool would.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        return match runtime.and_then(|runtime| runtime.block_on(run_proxy(settings))) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                error!(error = %err, "activity proxy cannot run");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(operate(args)),
        Err(err) => {
            error!(error = %err, "cannot start the async runtime");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the operator until it is told to stop.
async fn operate(args: Args) -> std::process::ExitCode {
    // One TLS crypto provider for every client in the process (Kubernetes API, registries).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, kind = err.metric_label(), "promptflow-operator cannot run");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let catalog = Catalog::load(args.catalog.as_deref())?;
    info!(instance_types = %catalog.names(), "instance-type catalog loaded");
    let metrics = Arc::new(Metrics::default());
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Connect(kube::Error::InferConfig(e)))?;
    let client = controller::counting_client(config, metrics.clone()).map_err(Error::Connect)?;
    let version = client.apiserver_version().await.map_err(Error::Connect)?;
    let layout = instance_layout(args.instance_resources, &version);
    info!(server = %version.git_version, instance_resources = layout.as_str(), "connected to the Kubernetes API");
    preflight::check_crds(&client).await?;
    info!("both CRDs are installed and Established");
    if args.check {
        return Ok(());
    }

    let ready = Arc::new(AtomicBool::new(false));
    let watches = Arc::new(WatchHealth::default());
    let (_, serve) = admin::bind(
        args.admin_address,
        AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            watches: watches.clone(),
            unready_after: Duration::from_secs(args.unready_after_watch_failure),
            unhealthy_after: Duration::from_secs(args.unhealthy_after_watch_failure),
        },
    )
    .await?;
    let admin_task = tokio::spawn(serve);
    let settings = Settings {
        catalog,
        template: PodTemplate {
            security: PodSecurity {
                restricted: args.restricted_pods,
                run_as_user: args.runtime_user,
            },
            startup_seconds: args.runtime_startup_seconds,
            proxy_image: args
                .proxy_image
                .unwrap_or_else(promptflow_operator::build::pod::default_proxy_image),
            proxy_limits: proxy::ProxyLimits {
                health_paths: args.proxy_health_paths,
                header_timeout: args.proxy_header_timeout,
                keep_alive_timeout: args.proxy_keep_alive_timeout,
                upstream_timeout: args.proxy_upstream_timeout,
                max_connections: args.proxy_max_connections,
                max_header_bytes: args.proxy_max_header_bytes,
                drain_timeout: args.proxy_drain_timeout,
            },
            requirements: promptflow_operator::flow::RequirementsPolicy {
                index_url: args.pip_index_url,
                extra_index_urls: args.pip_extra_index_url,
                trusted_hosts: args.pip_trusted_host,
                allow_sources: args.allow_requirement_sources,
                packages_size_limit: Some(args.packages_size_limit),
            },
        },
        idle: IdleSettings {
            warning_percent: args.idle_warning_percent,
            warning_max: Duration::from_secs(args.idle_warning_max_seconds),
        },
        concurrency: args.concurrency,
        namespace_fairness: args.namespace_fairness,
        launch_window: args.launch_window,
        namespace: args.watch_namespace,
        registry: RegistrySettings {
            ca_bundles: read_ca_files(&args.registry_ca_file)?,
            insecure_hosts: args.insecure_registry,
            ..Default::default()
        },
        version_interval: args.version_check_interval,
        denied_versions: args.denied_versions,
        instances: InstanceSettings {
            image: args.instance_image,
            batch: Duration::from_secs(args.instance_restart_batch_seconds),
            min_idle: args.instance_min_idle,
            layout: LayoutChoice::new(layout, args.instance_resources == InstanceResources::Auto),
        },
        network: args
            .runtime_network_policy
            .then(|| promptflow_operator::controller::network::NetworkSettings {
                operator_namespace: args.lease_namespace.clone(),
                operator_labels: args.operator_pod_labels.into_iter().collect(),
            }),
    };
    // One shutdown signal for every phase, so a SIGTERM is never lost between them.
    let shutdown = shutdown_signal().shared();
    let leadership = if args.leader_elect {
        let lease = LeaseSettings {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity: leader::identity(),
            duration_seconds: args.lease_seconds,
        };
        // A standby is ready: it is healthy and takes over when the leader goes (a rolling
        // update waits for this before stopping the old leader).
        ready.store(true, Ordering::Relaxed);
        let held = tokio::select! {
            held = leader::acquire(client.clone(), &lease) => held?,
            _ = shutdown.clone() => return Ok(()),
        };
        ready.store(false, Ordering::Relaxed);
        Some(held)
    } else {
        None
    };
    match leadership {
        None => controller::run(client, settings, metrics, ready, watches, shutdown).await,
        Some(mut leadership) => {
            tokio::select! {
                _ = controller::run(client, settings, metrics, ready, watches, shutdown) => leadership.release().await,
                _ = leadership.lost() => {
                    admin_task.abort();
                    return Err(Error::Lease("leadership lost; exiting so that only the new leader reconciles".into()));
                }
            }
        }
    }
    admin_task.abort();
    info!("promptflow-operator stopped");
    Ok(())
}

/// Serves the activity proxy until SIGTERM or SIGINT.
async fn run_proxy(settings: proxy::ProxySettings) -> std::io::Result<()> {
    let bound = proxy::bind(settings, shutdown_signal()).await?;
    bound.serve.await
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

/// A Go duration flag (`15m`, `90s`).
fn parse_go_duration(text: &str) -> Result<Duration, String> {
    promptflow_operator::idle::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a Go duration such as 15m or 90s"))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not a label key=value")),
    }
}

fn parse_quantity(text: &str) -> Result<k8s_openapi::apimachinery::pkg::api::resource::Quantity, String> {
    let quantity = k8s_openapi::apimachinery::pkg::api::resource::Quantity(text.to_owned());
    match kube_quantity::ParsedQuantity::try_from(&quantity) {
        Ok(parsed) if parsed > kube_quantity::ParsedQuantity::default() => Ok(quantity),
        _ => Err(format!("{text:?} is not a positive quantity such as 4Gi")),
    }
}

/// Reads the registry CA bundles; a missing or unreadable file stops the operator at start.
fn read_ca_files(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, Error> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|e| Error::Unreadable {
                kind: "registry CA file",
                name: path.display().to_string(),
                why: e.to_string(),
            })
        })
        .collect()
}
