//! The instance's disk: one PersistentVolumeClaim `<instance>-home` per instance with
//! `spec.storage`, created when absent, owned by the instance under `reclaimPolicy: Delete` (the
//! garbage collector deletes it with the instance) and by nobody under `Retain` (an instance made
//! again under the name takes it back). A claim of that name the operator did not make for this
//! instance is left untouched and reported. The claim outlives the pod: stop, start, restart and
//! attach or detach only remake the pod that mounts it. Read with one GET per reconcile of an
//! instance that has a disk; a Pending claim is looked at again every [`PENDING_RECHECK`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use tracing::info;

use crate::api::conditions::{self, reasons};
use crate::api::{ComputeInstance, InstanceStorage, ReclaimPolicy, StorageStatus};
use crate::build::instance::{INSTANCE_LABEL, home_claim_name};
use crate::build::pod::MANAGED_BY;
use crate::controller::context::{Context, MANAGER};
use crate::controller::runtime::status::ConditionState;
use crate::error::Result;

/// Annotation on a disk claim: the uid of the instance it was made for. Only that instance
/// owns it under `Delete`; a claim retained from an earlier instance of the name is used by a
/// new one, never made to go with it.
pub const MADE_FOR_ANNOTATION: &str = "promptflow.dev/instance-uid";

/// How soon a Pending claim is looked at again.
pub const PENDING_RECHECK: Duration = Duration::from_secs(10);

/// What the disk step came to.
pub struct Disk {
    /// The claim to mount; `None` when the pod must not mount it (someone else's claim).
    pub claim: Option<String>,
    /// `status.storage`.
    pub status: StorageStatus,
    /// The `StorageReady` condition.
    pub condition: ConditionState,
    /// When the claim is not Bound: the instance's reason and message while its pod is not Ready.
    pub waiting: Option<(String, String)>,
    /// When to look again.
    pub requeue: Option<Duration>,
}

/// The claim the operator makes for `instance`.
fn desired_claim(instance: &ComputeInstance, storage: &InstanceStorage) -> PersistentVolumeClaim {
    let name = instance.name_any();
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(home_claim_name(&name)),
            namespace: instance.namespace(),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "compute-instance-home".to_owned(),
                ),
                (INSTANCE_LABEL.to_owned(), name),
            ])),
            annotations: Some(BTreeMap::from([(
                MADE_FOR_ANNOTATION.to_owned(),
                instance.uid().unwrap_or_default(),
            )])),
            owner_references: owner(instance, storage.reclaim_policy).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(storage.size.clone()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The instance as the claim's controller, under `Delete`.
fn owner(instance: &ComputeInstance, policy: ReclaimPolicy) -> Option<OwnerReference> {
    (policy == ReclaimPolicy::Delete)
        .then(|| instance.controller_owner_ref(&()))
        .flatten()
}

/// Whether `claim` is this instance's disk: made by the operator for an instance of this name,
/// and owned by this instance or (retained from an earlier one, or kept under `Retain`) by
/// nobody. A claim owned by anything else is not ours to mount.
fn is_ours(claim: &PersistentVolumeClaim, instance: &ComputeInstance) -> bool {
    let owners = claim.owner_references();
    made_by_us(claim, instance) && (owners.is_empty() || owners.iter().all(|o| Some(&o.uid) == instance.uid().as_ref()))
}

fn made_by_us(claim: &PersistentVolumeClaim, instance: &ComputeInstance) -> bool {
    let labels = claim.labels();
    labels.get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY)
        && labels.get(INSTANCE_LABEL) == Some(&instance.name_any())
}

/// Whether `claim` was made for this very instance (not retained from an earlier one).
fn made_for(claim: &PersistentVolumeClaim, instance: &ComputeInstance) -> bool {
    claim.annotations().get(MADE_FOR_ANNOTATION) == instance.uid().as_ref()
}

/// A claim the operator made for an earlier instance of this name that still owns it: the
/// garbage collector deletes it with that instance.
fn of_an_earlier_instance(claim: &PersistentVolumeClaim, instance: &ComputeInstance) -> bool {
    made_by_us(claim, instance)
        && claim.owner_references().iter().any(|o| {
            o.kind == "ComputeInstance" && o.name == instance.name_any() && Some(&o.uid) != instance.uid().as_ref()
        })
}

/// The disk held back: no pod mounts a claim that is not the instance's.
fn held(name: &str, reason: &str, message: String) -> Disk {
    Disk {
        claim: None,
        status: StorageStatus {
            claim_name: name.to_owned(),
            ..Default::default()
        },
        condition: ConditionState::new(conditions::STORAGE_READY, false, reason, message.clone()),
        waiting: Some((reason.to_owned(), message)),
        requeue: Some(PENDING_RECHECK),
    }
}

/// Makes sure the instance's disk exists as `spec.storage` asks, and reports it.
pub async fn ensure(ctx: &Context, instance: &ComputeInstance, storage: &InstanceStorage) -> Result<Disk> {
    let namespace = instance.namespace().unwrap_or_default();
    let name = home_claim_name(&instance.name_any());
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let claim = match api.get_opt(&name).await? {
        Some(found) => found,
        None => {
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            match api.create(&params, &desired_claim(instance, storage)).await {
                Ok(created) => {
                    info!(claim = %name, %namespace, "created compute instance disk claim");
                    created
                }
                // Made by someone else meanwhile: nothing mounts it before it is judged.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    return Ok(held(
                        &name,
                        reasons::CLAIM_PENDING,
                        format!("claim {name} was made by someone else meanwhile; looking at it again"),
                    ));
                }
                // A storage quota, a LimitRange for claims, an admission policy.
                Err(kube::Error::Api(status)) if (400..500).contains(&status.code) && status.code != 429 => {
                    return Ok(held(
                        &name,
                        reasons::CLAIM_REJECTED,
                        format!(
                            "the API server refused to create claim {name}: {}; fix spec.storage (or what refuses it) — the instance waits without a pod",
                            status.message
                        ),
                    ));
                }
                Err(err) => return Err(err.into()),
            }
        }
    };
    if of_an_earlier_instance(&claim, instance) {
        return Ok(held(
            &name,
            reasons::CLAIM_PENDING,
            format!(
                "claim {name} still belongs to an earlier instance of this name and goes with it; a new one is made once it is gone"
            ),
        ));
    }
    if !is_ours(&claim, instance) {
        return Ok(held(
            &name,
            reasons::STORAGE_CONFLICT,
            format!(
                "PersistentVolumeClaim {name} exists and was not made by the operator for this instance; it is left untouched and the instance waits without a pod: rename or delete that claim"
            ),
        ));
    }
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(pending(
            &name,
            format!("claim {name} is being deleted; a new one is made once it is gone"),
        ));
    }
    let claim = keep_owner(&api, claim, instance, storage.reclaim_policy).await?;
    let resize = grow(&api, &claim, storage).await?;
    Ok(report(&name, &claim, storage, resize))
}

/// A claim being made or replaced: Pending.
fn pending(name: &str, message: String) -> Disk {
    Disk {
        claim: Some(name.to_owned()),
        status: StorageStatus {
            claim_name: name.to_owned(),
            phase: Some("Pending".into()),
            capacity: None,
        },
        condition: ConditionState::new(
            conditions::STORAGE_READY,
            false,
            reasons::CLAIM_PENDING,
            message.clone(),
        ),
        waiting: Some((reasons::CLAIM_PENDING.to_owned(), message)),
        requeue: Some(PENDING_RECHECK),
    }
}

/// Adds or removes the instance's owner reference as the reclaim policy asks (only its own; a
/// retained claim of an earlier instance of this name is adopted under `Delete`).
async fn keep_owner(
    api: &Api<PersistentVolumeClaim>,
    claim: PersistentVolumeClaim,
    instance: &ComputeInstance,
    policy: ReclaimPolicy,
) -> Result<PersistentVolumeClaim> {
    // A claim retained from an earlier instance of the name is used, never made to go with
    // this one.
    let wanted = owner(instance, policy).filter(|_| made_for(&claim, instance));
    let has = !claim.owner_references().is_empty();
    if has == wanted.is_some() {
        return Ok(claim);
    }
    // A merge patch with the resource version: a claim changed meanwhile is looked at again.
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": claim.resource_version(),
            "ownerReferences": wanted.map(|o| vec![o]).unwrap_or_default(),
        }
    });
    Ok(api
        .patch(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// Asks for a larger claim when `spec.storage.size` grew; the API server's refusal (a class
/// without expansion) is returned, not raised.
async fn grow(
    api: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    storage: &InstanceStorage,
) -> Result<Option<String>> {
    let asked = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    let bytes = |q: &Quantity| {
        kube_quantity::ParsedQuantity::try_from(q)
            .ok()
            .and_then(|p| p.to_bytes_f64())
    };
    let wanted = Quantity(storage.size.clone());
    let (larger, smaller) = match (asked.and_then(bytes), bytes(&wanted)) {
        (Some(now), Some(then)) => (then > now, then < now),
        _ => (false, false),
    };
    if smaller {
        return Ok(Some(format!(
            "a claim cannot shrink: it keeps {}; set spec.storage.size to that or more",
            asked.map(|q| q.0.as_str()).unwrap_or_default()
        )));
    }
    if !larger {
        return Ok(None);
    }
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": storage.size}}}});
    match api
        .patch(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if (400..500).contains(&status.code) && status.code != 409 => {
            Ok(Some(status.message))
        }
        Err(err) => Err(err.into()),
    }
}

/// The disk's status and condition from the claim.
fn report(name: &str, claim: &PersistentVolumeClaim, storage: &InstanceStorage, resize: Option<String>) -> Disk {
    let status = claim.status.as_ref();
    let phase = status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into());
    let capacity = status
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone());
    let disk_status = StorageStatus {
        claim_name: name.to_owned(),
        phase: Some(phase.clone()),
        capacity: capacity.clone(),
    };
    let has_class = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone());
    let class_differs = storage
        .storage_class_name
        .as_ref()
        .is_some_and(|asked| has_class.as_ref() != Some(asked));
    let (condition, waiting, requeue) = match phase.as_str() {
        "Bound" if class_differs => (
            ConditionState::new(
                conditions::STORAGE_READY,
                false,
                reasons::STORAGE_MISMATCH,
                format!(
                    "claim {name} is Bound with storage class {} but spec.storage.storageClassName asks {}; a claim's class cannot change: set it back, or delete the claim (and its data) to have a new one made",
                    has_class.as_deref().unwrap_or("(none)"),
                    storage.storage_class_name.as_deref().unwrap_or_default()
                ),
            ),
            None,
            None,
        ),
        "Bound" => {
            let condition = match resize {
                Some(why) => ConditionState::new(
                    conditions::STORAGE_READY,
                    false,
                    reasons::STORAGE_RESIZE_REFUSED,
                    format!(
                        "claim {name} is Bound ({}) but cannot take spec.storage.size {}: {why}",
                        capacity.as_deref().unwrap_or("unknown size"),
                        storage.size
                    ),
                ),
                None => ConditionState::new(
                    conditions::STORAGE_READY,
                    true,
                    reasons::CLAIM_BOUND,
                    format!(
                        "claim {name} is Bound ({}), mounted at {}",
                        capacity.as_deref().unwrap_or("unknown size"),
                        crate::api::HOME_MOUNT
                    ),
                ),
            };
            (condition, None, None)
        }
        "Lost" => {
            let message = format!(
                "claim {name} lost its PersistentVolume: the disk's data is gone unless the volume comes back; delete the claim to start with an empty disk"
            );
            (
                ConditionState::new(conditions::STORAGE_READY, false, reasons::CLAIM_LOST, message.clone()),
                Some((reasons::CLAIM_LOST.to_owned(), message)),
                Some(PENDING_RECHECK),
            )
        }
        _ => {
            let class = storage.storage_class_name.as_deref().map_or_else(
                || "the default storage class".to_owned(),
                |c| format!("storage class {c}"),
            );
            let message = format!(
                "claim {name} is Pending: no PersistentVolume of {class} with {} (ReadWriteOnce) is free and no provisioner made one (a class that binds on first use binds once the instance pod is scheduled); create a matching PersistentVolume or set spec.storage.storageClassName to a class with a provisioner",
                storage.size
            );
            (
                ConditionState::new(
                    conditions::STORAGE_READY,
                    false,
                    reasons::CLAIM_PENDING,
                    message.clone(),
                ),
                Some((reasons::CLAIM_PENDING.to_owned(), message)),
                Some(PENDING_RECHECK),
            )
        }
    };
    Disk {
        claim: Some(name.to_owned()),
        status: disk_status,
        condition,
        waiting,
        requeue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(policy: &str) -> ComputeInstance {
        let mut instance: ComputeInstance = serde_norway::from_str(&format!(
            "apiVersion: promptflow.dev/v1alpha1\nkind: ComputeInstance\nmetadata: {{name: ci, namespace: team}}\nspec: {{instanceType: Standard_DS3_v2, storage: {{size: 10Gi, reclaimPolicy: {policy}}}}}\n"
        ))
        .unwrap();
        instance.metadata.uid = Some("u1".into());
        instance
    }

    #[test]
    fn the_claim_is_owned_only_under_delete_and_others_claims_are_not_ours() {
        let deleting = instance("Delete");
        let storage = deleting.spec.storage.clone().unwrap();
        let claim = desired_claim(&deleting, &storage);
        assert_eq!(claim.name_any(), "ci-home");
        assert_eq!(claim.owner_references()[0].uid, "u1");
        assert!(is_ours(&claim, &deleting));
        let retained = instance("Retain");
        let kept = desired_claim(&retained, &retained.spec.storage.clone().unwrap());
        assert!(kept.owner_references().is_empty());
        assert!(is_ours(&kept, &retained), "a retained claim is taken back");

        // A claim someone made under the name, or one owned by another object, is not ours.
        let mut foreign = claim.clone();
        foreign.metadata.labels = None;
        assert!(!is_ours(&foreign, &deleting));
        let mut other_owner = claim.clone();
        other_owner.metadata.owner_references.as_mut().unwrap()[0].uid = "u2".into();
        assert!(!is_ours(&other_owner, &deleting));
        // That owner being an earlier instance of the name: its claim goes with it; wait.
        assert!(of_an_earlier_instance(&other_owner, &deleting));
        assert!(!of_an_earlier_instance(&claim, &deleting));

        // Made for this instance, or retained from an earlier one (never to be owned again).
        assert!(made_for(&claim, &deleting));
        let mut later = deleting.clone();
        later.metadata.uid = Some("u3".into());
        assert!(!made_for(&claim, &later));
    }

    #[test]
    fn a_pending_claim_says_what_it_waits_for_and_a_bound_one_where_it_is_mounted() {
        let instance = instance("Delete");
        let storage = instance.spec.storage.clone().unwrap();
        let mut claim = desired_claim(&instance, &storage);
        let pending = report("ci-home", &claim, &storage, None);
        assert_eq!(pending.condition.reason, reasons::CLAIM_PENDING);
        assert!(
            pending
                .condition
                .message
                .contains("no PersistentVolume of the default storage class with 10Gi")
        );
        assert_eq!(pending.requeue, Some(PENDING_RECHECK));
        claim.status = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            capacity: Some(BTreeMap::from([("storage".to_owned(), Quantity("20Gi".into()))])),
            ..Default::default()
        });
        let bound = report("ci-home", &claim, &storage, None);
        assert_eq!(bound.condition.reason, reasons::CLAIM_BOUND);
        assert!(bound.waiting.is_none() && bound.requeue.is_none());
        assert_eq!(bound.status.capacity.as_deref(), Some("20Gi"));
        let refused = report(
            "ci-home",
            &claim,
            &storage,
            Some("only dynamically provisioned pvc can be resized".into()),
        );
        assert_eq!(refused.condition.reason, reasons::STORAGE_RESIZE_REFUSED);
        assert!(refused.waiting.is_none(), "a refused resize keeps the instance running");
    }
}
