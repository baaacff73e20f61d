//! Leader election through a Lease, so several replicas can run and exactly one reconciles.
//! The process exits when it loses the lease: a former leader must never keep writing.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::error::{Error, Result};

/// Where the lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    pub duration_seconds: u64,
}

/// Leadership held: resolves `lost` when the lease is gone; dropping it releases the lease.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: Client, settings: &LeaseSettings) -> Result<Leadership> {
    let grace = (settings.duration_seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_parameters(LeaseParams::new(&settings.identity, settings.duration_seconds, grace))
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (mut state, task) = manager.watch().await;
    info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "waiting for leadership");
    while !*state.borrow_and_update() {
        state
            .changed()
            .await
            .map_err(|_| Error::Lease("the lease task stopped".into()))?;
    }
    info!(lease = %settings.name, identity = %settings.identity, "became leader");
    Ok(Leadership { state, task })
}

impl Leadership {
    /// Resolves when leadership is lost (or the lease task dies).
    pub async fn lost(&mut self) {
        while *self.state.borrow_and_update() {
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after the lease expires.
    pub async fn release(self) {
        drop(self.state);
        let _ = self.task.await;
        info!("lease released");
    }
}
