//! Leader election through a Lease, so several replicas can run and exactly one reconciles.
//! The process exits when it loses the lease: a former leader must never keep writing.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

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
    leases: Api<Lease>,
    settings: LeaseSettings,
}

/// This replica's identity: the pod name in a cluster, else the host name with the process id and
/// a time suffix (containers all run as PID 1, so the pid alone is not unique).
pub fn identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME") {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nanos:08x}", std::process::id())
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: Client, settings: &LeaseSettings) -> Result<Leadership> {
    let grace = (settings.duration_seconds / 3).max(1);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
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
    Ok(Leadership {
        state,
        task,
        leases,
        settings: settings.clone(),
    })
}

impl Leadership {
    /// Resolves when leadership is lost: the lease manager says so, its task dies, or — since
    /// the manager keeps retrying failed renewals without saying so — the Lease itself shows
    /// another holder or a renewal older than its duration, or cannot be read for that long.
    pub async fn lost(&mut self) {
        let duration = Duration::from_secs(self.settings.duration_seconds);
        let mut check = tokio::time::interval((duration / 3).max(Duration::from_secs(1)));
        let mut confirmed = Instant::now();
        loop {
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() || !*self.state.borrow_and_update() {
                        return;
                    }
                }
                _ = check.tick() => match self.leases.get_opt(&self.settings.name).await {
                    Ok(Some(lease)) if holds(&lease, &self.settings.identity, duration) => confirmed = Instant::now(),
                    Ok(_) => {
                        warn!(lease = %self.settings.name, "the lease has another holder or expired");
                        return;
                    }
                    Err(err) if confirmed.elapsed() >= duration => {
                        warn!(lease = %self.settings.name, error = %err, "the lease could not be confirmed for its whole duration");
                        return;
                    }
                    Err(_) => {}
                },
            }
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after the lease expires.
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(_) => info!("lease released"),
            Err(_) => warn!("releasing the lease timed out; it expires by itself"),
        }
    }
}

/// Whether `lease` is held by `identity` and was renewed within `duration`.
fn holds(lease: &Lease, identity: &str, duration: Duration) -> bool {
    let Some(spec) = lease.spec.as_ref() else { return false };
    if spec.holder_identity.as_deref() != Some(identity) {
        return false;
    }
    let Some(renewed) = spec.renew_time.as_ref() else {
        return false;
    };
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
    age.unsigned_abs() <= duration
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed_seconds_ago: i64) -> Lease {
        let renewed =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(renewed_seconds_ago);
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_held_by_its_holder_while_fresh() {
        let duration = Duration::from_secs(15);
        assert!(holds(&lease("me", 3), "me", duration));
        assert!(!holds(&lease("other", 3), "me", duration));
        assert!(!holds(&lease("me", 60), "me", duration), "expired");
        assert!(!holds(&Lease::default(), "me", duration));
    }
}
