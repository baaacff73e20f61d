//! What makes a compute instance pod be remade, and how it is told: the changes a restart
//! carries (attach, detach, the size's layout), runtimes made again under a deleted one's name,
//! and the one check of whether the API server keeps pod-level resources.

use k8s_openapi::api::core::v1::Pod;
use tracing::{info, warn};

use crate::build::instance::{self as pod_builder, ResourceLayout};
use crate::controller::context::Context;
use crate::controller::runtime::apply;

/// The runtimes the live pod carries under their name that are not the runtimes of that name
/// now: one deleted while the instance could not restart left its containers under its name;
/// one made again under that name is not them, and the pod is remade to carry it.
pub(super) fn remade(ctx: &Context, live: Option<&Pod>, namespace: &str) -> Vec<String> {
    live.filter(|live| live.metadata.deletion_timestamp.is_none())
        .map(|live| pod_builder::recreated(live, |name| ctx.runtime_uid(name, namespace)))
        .unwrap_or_default()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Whether the API server keeps pod-level resources, asked once per process with a dry-run
/// create of an instance pod: a cluster without the feature drops the field, and instance pods
/// then hold their size in shares. Until one dry run is answered, pod-level is assumed.
pub(super) async fn check_layout(ctx: &Context, namespace: &str, pod: &Pod) {
    let pods: kube::Api<Pod> = kube::Api::namespaced(ctx.client.clone(), namespace);
    let mut probe = pod.clone();
    probe.metadata.name = None;
    probe.metadata.generate_name = Some(apply::PROBE_PREFIX.into());
    let params = kube::api::PostParams {
        dry_run: true,
        field_manager: Some(crate::controller::context::MANAGER.into()),
    };
    match pods.create(&params, &probe).await {
        Ok(made) if made.spec.as_ref().is_some_and(|spec| spec.resources.is_some()) => {
            ctx.instance_settings.layout.settle(ResourceLayout::Pod);
        }
        Ok(_) => {
            if ctx.instance_settings.layout.settle(ResourceLayout::Containers) {
                warn!(
                    "the API server drops pod-level resources (no PodLevelResources feature): compute instance pods hold their size in per-container shares"
                );
            }
        }
        Err(err) => {
            info!(%namespace, error = %err, "cannot check pod-level resources yet; asking again at the next instance")
        }
    }
}

/// "attach b; detach a": what a restart changes, for the event and the log.
pub(super) fn describe_changes(live: &Pod, desired: &Pod) -> String {
    let (before, after) = (pod_builder::attached(live), pod_builder::attached(desired));
    let attach: Vec<_> = after.iter().filter(|n| !before.contains(n)).copied().collect();
    let detach: Vec<_> = before.iter().filter(|n| !after.contains(n)).copied().collect();
    let mut parts = vec![];
    if !attach.is_empty() {
        parts.push(format!("attach {}", attach.join(", ")));
    }
    if !detach.is_empty() {
        parts.push(format!("detach {}", detach.join(", ")));
    }
    let (was, will) = (pod_builder::layout_of(live), pod_builder::layout_of(desired));
    match will {
        Some(ResourceLayout::Containers) if was == Some(ResourceLayout::Pod) => parts.push(
            "hold the size in per-container shares (the API server does not keep pod-level resources)".to_owned(),
        ),
        Some(ResourceLayout::Pod) if was == Some(ResourceLayout::Containers) => {
            parts.push("hold the size in pod-level resources".to_owned());
        }
        _ => {}
    }
    if parts.is_empty() {
        parts.push("update the runtimes' or the instance's containers".to_owned());
    }
    parts.join("; ")
}
