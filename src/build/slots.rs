//! Slots of a compute instance pod: which runtime sits where (its ports follow from its slot),
//! read from the pod's annotations and kept for as long as a runtime stays attached. Pure.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::instance::{RUNTIME_UIDS_ANNOTATION, RUNTIMES_ANNOTATION};
use super::pod::Placement;
use crate::api::PromptFlowRuntime;

/// The slot of each runtime in `names`: the one it has in the live pod (`live`, by slot), else
/// the one its published URL names (`published`), when free; the others take the lowest free
/// slots in the order given. So a runtime keeps its ports, and its URL, for as long as it stays
/// attached, and a port a client cached never reaches another runtime while its owner is there.
pub fn assign_slots(names: &[String], live: &[Option<&str>], published: impl Fn(&str) -> Option<usize>) -> Vec<usize> {
    let mut slots: Vec<Option<usize>> = names
        .iter()
        .map(|name| live.iter().position(|held| *held == Some(name.as_str())))
        .collect();
    // A URL names a slot only within what this pod could have (a status edited by hand must not
    // make a pod of millions of slots).
    let possible = names.len() + live.len();
    for (index, name) in names.iter().enumerate() {
        if slots[index].is_none()
            && let Some(slot) = published(name).filter(|slot| *slot < possible)
            && !slots.contains(&Some(slot))
        {
            slots[index] = Some(slot);
        }
    }
    let taken: Vec<usize> = slots.iter().flatten().copied().collect();
    let mut free = (0..).filter(move |slot| !taken.contains(slot));
    slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| free.next().unwrap_or_default()))
        .collect()
}

/// The slot a runtime's published URL names, when it is an instance slot's proxy port.
pub fn slot_of_url(url: &str) -> Option<usize> {
    let port: i32 = url.rsplit_once(':')?.1.parse().ok()?;
    let offset = port.checked_sub(super::parts::INSTANCE_PORT_BASE + 1)?;
    (offset >= 0 && offset % 10 == 0)
        .then(|| usize::try_from(offset / 10).ok())
        .flatten()
}

/// The runtimes a live instance pod carries, in slot order.
pub fn attached(pod: &Pod) -> Vec<&str> {
    attached_to(&pod.metadata)
}

/// The runtimes an instance pod's metadata says it carries, in slot order.
pub fn attached_to(metadata: &ObjectMeta) -> Vec<&str> {
    slots_of(metadata).into_iter().flatten().collect()
}

/// The runtime in each slot of an instance pod (`None`: a free slot).
pub fn slots_of(metadata: &ObjectMeta) -> Vec<Option<&str>> {
    slots_in(
        metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RUNTIMES_ANNOTATION))
            .map(String::as_str),
    )
}

/// The runtime in each slot, from the value of the pod's runtimes annotation.
pub fn slots_in(list: Option<&str>) -> Vec<Option<&str>> {
    list.filter(|list| !list.is_empty())
        .map(|list| list.split(',').map(|name| (!name.is_empty()).then_some(name)).collect())
        .unwrap_or_default()
}

/// The uid of the runtime in each slot, as the pod was made (`None`: a free slot, or a pod made
/// before uids were recorded).
fn uids_of(metadata: &ObjectMeta) -> Vec<Option<&str>> {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RUNTIME_UIDS_ANNOTATION))
        .map(|list| list.split(',').map(|uid| (!uid.is_empty()).then_some(uid)).collect())
        .unwrap_or_default()
}

/// Where `runtime` sits in a live instance pod, when the pod carries it: its name in a slot
/// made for it, not for an earlier runtime of the same name (deleted while the instance could
/// not restart, then made again).
pub fn placement_in(pod: &Pod, runtime: &PromptFlowRuntime) -> Option<Placement> {
    let name = runtime.name_any();
    let slot = slots_of(&pod.metadata)
        .iter()
        .position(|carried| *carried == Some(name.as_str()))?;
    let made_for = uids_of(&pod.metadata).get(slot).copied().flatten();
    if made_for.is_some_and(|uid| Some(uid) != runtime.metadata.uid.as_deref()) {
        return None;
    }
    Some(Placement::on_instance(&name, slot))
}

/// The runtimes a live pod carries under their name that are not the runtimes of that name
/// now (`current` gives a name's uid): the pod must be remade to carry the new ones.
pub fn recreated(pod: &Pod, current: impl Fn(&str) -> Option<String>) -> Vec<&str> {
    let uids = uids_of(&pod.metadata);
    slots_of(&pod.metadata)
        .into_iter()
        .enumerate()
        .filter_map(|(slot, name)| {
            let (name, made_for) = (name?, uids.get(slot).copied().flatten()?);
            current(name).is_some_and(|uid| uid != made_for).then_some(name)
        })
        .collect()
}
