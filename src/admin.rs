//! The admin server: `/metrics` (Prometheus), `/healthz` (the process runs) and `/readyz` (the
//! controllers run).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::info;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once the controllers run.
    pub ready: Arc<AtomicBool>,
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
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    Ok((bound, async move { axum::serve(listener, app).await }))
}

async fn metrics(State(state): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.encode())
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "controllers starting")
    }
}
