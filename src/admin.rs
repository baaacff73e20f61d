//! The admin server: `/metrics` (Prometheus), `/healthz` (liveness: no watch has been failing for
//! longer than the liveness bound) and `/readyz` (the controllers run and no watch has been
//! failing for longer than the readiness bound).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::info;

use crate::controller::watch_health::WatchHealth;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once the controllers run.
    pub ready: Arc<AtomicBool>,
    /// Whether the watches deliver.
    pub watches: Arc<WatchHealth>,
    /// `/readyz` fails once a watch has been failing for longer than this.
    pub unready_after: Duration,
    /// `/healthz` fails once a watch has been failing for longer than this, so the kubelet
    /// restarts an operator that cannot recover by itself.
    pub unhealthy_after: Duration,
}

/// Binds the admin server; returns the bound address and the future that serves it.
pub async fn bind(
    address: SocketAddr,
    state: AdminState,
) -> Result<(SocketAddr, impl std::future::Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(address).await.map_err(Error::Admin)?;
    let bound = listener.local_addr().map_err(Error::Admin)?;
    info!(address = %bound, "admin server listening (/metrics, /healthz, /readyz)");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    Ok((bound, async move { axum::serve(listener, app).await }))
}

async fn metrics(State(state): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.encode())
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, String) {
    let watches = state.watches.report();
    if watches.within(state.unhealthy_after) {
        (StatusCode::OK, "ok".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, watches.describe())
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let watches = state.watches.report();
    if !state.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "controllers starting".to_owned())
    } else if !watches.within(state.unready_after) {
        (StatusCode::SERVICE_UNAVAILABLE, watches.describe())
    } else {
        (StatusCode::OK, "ok".to_owned())
    }
}
