//! Pure builders of the Kubernetes objects the operator owns. Builders never call the API.

pub mod instance;
pub mod layout;
pub mod parts;
pub mod pod;
pub mod proxy;
pub mod service;
pub mod slots;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Whether an object was made by the operator for the owner whose uid is `owner_uid`: its
/// controller owner reference names that uid. Labels prove nothing (anyone who may create a pod
/// can copy them), and a name can be taken by someone else first.
pub fn controlled_by(object: &ObjectMeta, owner_uid: Option<&str>) -> bool {
    let Some(owner_uid) = owner_uid else {
        return false;
    };
    object
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == owner_uid)
}

/// Whether an object was made for an earlier runtime of the name `name`: it carries the
/// operator's runtime label for that name and its controller is a PromptFlowRuntime of that name
/// (of the API version the operator writes) whose uid is not `uid`. A name holds one runtime at a
/// time, so that runtime is deleted, and the garbage collector removes what it owned. (A forged
/// reference of another version would never be collected; one of this version to a uid that does
/// not exist is, within seconds.)
pub fn left_by_predecessor(object: &ObjectMeta, name: &str, uid: Option<&str>) -> bool {
    use kube::Resource;
    let api_version = crate::api::PromptFlowRuntime::api_version(&());
    let labelled = object
        .labels
        .as_ref()
        .and_then(|labels| labels.get(pod::RUNTIME_LABEL))
        .is_some_and(|runtime| runtime == name);
    labelled
        && object.owner_references.iter().flatten().any(|owner| {
            owner.controller == Some(true)
                && owner.kind == "PromptFlowRuntime"
                && owner.api_version == api_version
                && owner.name == name
                && Some(owner.uid.as_str()) != uid
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    #[test]
    fn only_a_runtime_of_the_same_name_and_another_uid_is_a_predecessor() {
        let owned = |kind: &str, name: &str, uid: &str| ObjectMeta {
            labels: Some([(pod::RUNTIME_LABEL.to_owned(), "chat".to_owned())].into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "promptflow.dev/v1alpha1".into(),
                kind: kind.into(),
                name: name.into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(left_by_predecessor(
            &owned("PromptFlowRuntime", "chat", "old"),
            "chat",
            Some("new")
        ));
        assert!(
            !left_by_predecessor(&owned("PromptFlowRuntime", "chat", "new"), "chat", Some("new")),
            "its own"
        );
        assert!(!left_by_predecessor(
            &owned("PromptFlowRuntime", "other", "old"),
            "chat",
            Some("new")
        ));
        assert!(!left_by_predecessor(
            &owned("ComputeInstance", "chat", "old"),
            "chat",
            Some("new")
        ));
        assert!(
            !left_by_predecessor(&ObjectMeta::default(), "chat", Some("new")),
            "no owner"
        );
        let mut forged = owned("PromptFlowRuntime", "chat", "old");
        forged.owner_references.as_mut().unwrap()[0].api_version = "promptflow.dev/v0".into();
        assert!(
            !left_by_predecessor(&forged, "chat", Some("new")),
            "a version never collected"
        );
        let mut unlabelled = owned("PromptFlowRuntime", "chat", "old");
        unlabelled.labels = None;
        assert!(
            !left_by_predecessor(&unlabelled, "chat", Some("new")),
            "not the operator's"
        );
    }

    #[test]
    fn only_the_controller_reference_with_the_owners_uid_proves_who_made_an_object() {
        let owned = |uid: &str, controller: Option<bool>| ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                uid: uid.into(),
                controller,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(controlled_by(&owned("u1", Some(true)), Some("u1")));
        assert!(!controlled_by(&owned("u1", None), Some("u1")), "not the controller");
        assert!(!controlled_by(&owned("u2", Some(true)), Some("u1")), "another owner");
        assert!(
            !controlled_by(&ObjectMeta::default(), Some("u1")),
            "no owner: someone else's"
        );
        assert!(!controlled_by(&owned("u1", Some(true)), None));
    }
}
