//! Prometheus metrics: reconciles, their failures and durations, and the operator's own API
//! requests split into reads and writes (the write budget is measured with these).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

/// Labels of the API request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `read` (GET, LIST, WATCH) or `write` (POST, PUT, PATCH, DELETE).
    pub kind: &'static str,
    /// The resource path segment, e.g. `pods`, `promptflowruntimes`, `events`.
    pub resource: String,
}

/// Labels of the reconcile failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error's metric label.
    pub error: &'static str,
}

/// Labels of the registry request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    kind: &'static str,
}

/// Labels of the idle cull counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CullLabels {
    /// `stop` or `delete`.
    pub action: &'static str,
}

/// Labels of the runtimes gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `Running` or `Not available`; `Stopped` for runtimes stopped idle or by the user.
    pub phase: &'static str,
}

/// Labels of the memory gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// The in-memory map, e.g. `dependency_index`.
    pub map: &'static str,
}

/// Counts runtimes by phase from the controller's cache, when /metrics is read.
pub type PhaseCounter = Box<dyn Fn() -> Vec<(&'static str, i64)> + Send + Sync>;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    requests: Family<RequestLabels, Counter>,
    writes: AtomicU64,
    culls: Family<CullLabels, Counter>,
    idle_warnings: Counter,
    activity_query_failures: Counter,
    registry_requests: Family<RegistryLabels, Counter>,
    runtimes: Family<PhaseLabels, Gauge>,
    phase_counter: std::sync::OnceLock<PhaseCounter>,
    maps: Family<MapLabels, Gauge>,
    map_counter: std::sync::OnceLock<PhaseCounter>,
    waiting: Gauge,
    waiting_counter: std::sync::OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("promptflow_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        registry.register(
            "kube_requests",
            "Kubernetes API requests the operator sent",
            requests.clone(),
        );
        let culls = Family::<CullLabels, Counter>::default();
        let idle_warnings = Counter::default();
        let activity_query_failures = Counter::default();
        registry.register(
            "idle_culls",
            "Runtimes stopped or deleted for idleness, by action",
            culls.clone(),
        );
        registry.register("idle_warnings", "IdleSoon warnings given", idle_warnings.clone());
        let runtimes = Family::<PhaseLabels, Gauge>::default();
        registry.register("runtimes", "Runtimes by phase", runtimes.clone());
        registry.register(
            "activity_query_failures",
            "Activity proxies that could not be asked at a deadline",
            activity_query_failures.clone(),
        );
        let registry_requests = Family::<RegistryLabels, Counter>::default();
        // Series with a known set of labels start at zero, so dashboards and alerts (rates,
        // increases) see them before the first event rather than a missing series.
        for action in ["stop", "delete"] {
            let _ = culls.get_or_create(&CullLabels { action });
        }
        for kind in ["tags", "manifest"] {
            let _ = registry_requests.get_or_create(&RegistryLabels { kind });
        }
        for error in ["kube", "unreadable"] {
            let _ = failures.get_or_create(&ErrorLabels { error });
        }
        registry.register(
            "registry_requests",
            "Requests sent to image registries for version checks, by kind (tags, manifest)",
            registry_requests.clone(),
        );
        let maps = Family::<MapLabels, Gauge>::default();
        registry.register(
            "memory_entries",
            "Entries in the operator's own in-memory maps (besides the watch caches), by map; they follow the live objects",
            maps.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "reconciles_waiting",
            "Runtime reconciles waiting for a turn (turns go round robin over namespaces)",
            waiting.clone(),
        );
        Self {
            waiting,
            waiting_counter: std::sync::OnceLock::new(),
            maps,
            map_counter: std::sync::OnceLock::new(),
            registry_requests,
            registry,
            reconciles,
            failures,
            duration,
            requests,
            writes: AtomicU64::new(0),
            culls,
            idle_warnings,
            activity_query_failures,
            runtimes,
            phase_counter: std::sync::OnceLock::new(),
        }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the timer drops.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    /// Counts one API request by method and path.
    pub fn api_request(&self, method: &http::Method, path: &str) {
        let write = !matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
        if write {
            self.writes.fetch_add(1, Ordering::Relaxed);
            // One line per write at debug, for auditing writes per object (paths name objects,
            // never their content).
            tracing::debug!(target: "promptflow_operator::api", %method, path = %path, "api write");
        }
        let labels = RequestLabels {
            kind: if write { "write" } else { "read" },
            resource: resource_of(path),
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// A runtime was stopped (`stop`) or deleted (`delete`) for idleness.
    pub fn culled(&self, action: &'static str) {
        self.culls.get_or_create(&CullLabels { action }).inc();
    }

    /// An IdleSoon warning was given.
    pub fn idle_warning(&self) {
        self.idle_warnings.inc();
    }

    /// A registry request for a version check was sent.
    pub fn registry_request(&self, kind: &'static str) {
        self.registry_requests.get_or_create(&RegistryLabels { kind }).inc();
    }

    /// An activity proxy could not be asked.
    pub fn activity_query_failed(&self) {
        self.activity_query_failures.inc();
    }

    /// All writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Sets where runtimes are counted by phase (the controller's runtime cache).
    pub fn count_phases_with(&self, counter: PhaseCounter) {
        let _ = self.phase_counter.set(counter);
    }

    /// Sets where the in-memory maps are counted.
    pub fn count_entries_with(&self, counter: PhaseCounter) {
        let _ = self.map_counter.set(counter);
    }

    /// Sets where the reconciles waiting for a turn are counted.
    pub fn watch_waiting_turns(&self, counter: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.waiting_counter.set(Box::new(counter));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        if let Some(count) = self.waiting_counter.get() {
            self.waiting.set(i64::try_from(count()).unwrap_or(i64::MAX));
        }
        if let Some(count) = self.map_counter.get() {
            for (map, n) in count() {
                self.maps.get_or_create(&MapLabels { map }).set(n);
            }
        }
        if let Some(count) = self.phase_counter.get() {
            for phase in ["Running", "Not available", "Stopped"] {
                self.runtimes.get_or_create(&PhaseLabels { phase }).set(0);
            }
            for (phase, n) in count() {
                self.runtimes.get_or_create(&PhaseLabels { phase }).set(n);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The resource segment of an API path: `/api/v1/namespaces/a/pods/x/status` → `pods`.
fn resource_of(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('?')
        .next()
        .unwrap_or_default()
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    // Skip the group/version prefix: /api/v1/... or /apis/<group>/<version>/...
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    rest.first().map_or_else(|| "other".to_owned(), |r| (*r).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_read_from_paths() {
        assert_eq!(resource_of("/api/v1/namespaces/a/pods/x"), "pods");
        assert_eq!(
            resource_of("/apis/promptflow.dev/v1alpha1/namespaces/a/promptflowruntimes/x/status"),
            "promptflowruntimes"
        );
        assert_eq!(resource_of("/apis/events.k8s.io/v1/namespaces/a/events"), "events");
        assert_eq!(resource_of("/api/v1/serviceaccounts?watch=true"), "serviceaccounts");
        assert_eq!(resource_of("/api/v1/namespaces"), "namespaces");
        assert_eq!(resource_of("/version"), "other");
    }

    #[test]
    fn writes_are_counted_apart_from_reads() {
        let metrics = Metrics::default();
        metrics.api_request(&http::Method::GET, "/api/v1/namespaces/a/pods");
        metrics.api_request(&http::Method::PATCH, "/api/v1/namespaces/a/pods/x");
        metrics.api_request(&http::Method::POST, "/apis/events.k8s.io/v1/namespaces/a/events");
        assert_eq!(metrics.writes(), 2);
        let text = metrics.encode();
        assert!(
            text.contains(r#"promptflow_operator_kube_requests_total{kind="write",resource="pods"} 1"#),
            "{text}"
        );
    }
}
