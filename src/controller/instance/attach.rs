//! Attach: which runtimes the instance pod carries, each resolved (image, pull identity, flow)
//! by the same code as a serverless runtime's pod. Runtimes are read from the runtime cache: the
//! ones on this instance that acknowledged the restart and are not being deleted. A runtime whose
//! identity or flow cannot be resolved is left out; it says why in its own status.

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use std::sync::Arc;

use crate::api::{ComputeInstance, PromptFlowRuntime};
use crate::build::instance::{AttachedRuntime, assign_slots, slot_of_url, slots_of};
use crate::controller::context::Context;
use crate::controller::index::Dependency;
use crate::controller::runtime::{observe, plan, versions};
use crate::error::Result;

/// Whether `runtime` asks to run on the instance `name` in `namespace` and may be attached.
pub fn wants(runtime: &PromptFlowRuntime, namespace: &str, name: &str) -> bool {
    runtime.namespace().as_deref() == Some(namespace)
        && runtime.metadata.deletion_timestamp.is_none()
        && runtime
            .spec
            .compute
            .instance
            .as_ref()
            .is_some_and(|i| i.name == name && i.acknowledge_restart)
}

/// The runtimes to attach, sorted by name (the order new ones take free slots in), read and resolved. `dependencies`
/// collects what was read, for the instance's dependency index.
pub async fn runtimes(instance: &ComputeInstance, ctx: &Context, dependencies: &mut Vec<Dependency>) -> Result<Attach> {
    let namespace = instance.namespace().unwrap_or_default();
    let name = instance.name_any();
    // Only the runtimes of this namespace that name this instance are read in full.
    let mut wanted: Vec<Arc<PromptFlowRuntime>> = ctx
        .runtimes
        .in_namespace(&namespace, |runtime, cached| {
            if cached.instances().any(|i| i == name) {
                cached.full(runtime, &namespace).ok()
            } else {
                None
            }
        })
        .into_iter()
        .filter(|rt| wants(rt, &namespace, &name))
        .map(Arc::new)
        .collect();
    wanted.sort_by_key(|rt| rt.name_any());
    let key = ObjectRef::from_obj(instance);
    let mut resolved = Vec::with_capacity(wanted.len());
    let mut unresolved = vec![];
    for runtime in wanted {
        let observed = observe::observe(&runtime, ctx, &namespace, false, |read| {
            dependencies.extend(read.into_iter().filter(|d| !matches!(d, Dependency::Instance(..))));
            ctx.instance_index.record(key.clone(), dependencies.clone());
        })
        .await?;
        let (_, outcome) = plan::resolve(&runtime, &observed, &ctx.template.requirements);
        if outcome.is_err() {
            unresolved.push(runtime.name_any());
        }
        if let Ok(mut found) = outcome {
            // The version the runtime's own reconcile pinned; a runtime not pinned yet waits.
            versions::apply_pin(&runtime, &mut found);
            if runtime.spec.image.version.is_some()
                || found.from_flow
                || versions::pinned(&runtime, &found.repository).is_some()
            {
                resolved.push((runtime, found));
            }
        }
    }
    Ok(Attach { resolved, unresolved })
}

/// The runtimes to attach, and those that want to be attached but cannot be resolved now (a
/// flow, service account or pull secret gone): they say why in their own status.
pub struct Attach {
    /// Resolved, sorted by name.
    pub resolved: Vec<(Arc<PromptFlowRuntime>, plan::Resolved)>,
    /// Names of the unresolved ones.
    pub unresolved: Vec<String>,
}

/// The resolved runtimes as the pod builder takes them, each in its slot: the one it has in the
/// live pod, else the one its published URL names, else the lowest free one.
pub fn as_attached<'a>(
    resolved: &'a [(Arc<PromptFlowRuntime>, plan::Resolved)],
    live: Option<&k8s_openapi::api::core::v1::Pod>,
) -> Vec<AttachedRuntime<'a>> {
    let names: Vec<String> = resolved.iter().map(|(runtime, _)| runtime.name_any()).collect();
    let held = live.map(|pod| slots_of(&pod.metadata)).unwrap_or_default();
    let published = |name: &str| {
        resolved
            .iter()
            .find(|(runtime, _)| runtime.name_any() == name)
            .and_then(|(runtime, _)| runtime.status.as_ref()?.url.as_deref().and_then(slot_of_url))
    };
    let slots = assign_slots(&names, &held, published);
    resolved
        .iter()
        .zip(slots)
        .map(|((runtime, found), slot)| AttachedRuntime {
            runtime,
            image: found.image.clone(),
            identity: found.identity.clone(),
            flow: found.flow.clone(),
            slot,
        })
        .collect()
}
