//! The status write of a runtime or compute instance, bound to the object it was composed for.
//!
//! A status is composed from what the cache holds of an object; by the time it is written, that
//! object may have been deleted and another made under its name (a slow reconcile, a cache behind
//! after a relist). A server-side apply names the object by name only, and the API server drops
//! a `metadata.uid` given with a status apply (the status subresource takes only the status), so
//! the old object's status — a stop, a pinned image, handled actions — would land on the new one.
//! A JSON patch is applied to the stored object as a whole: its first operation tests the uid,
//! and the status is set only if it is still the object's.

use kube::api::Patch;
use serde::Serialize;

/// A patch that sets the whole status to `status` if the object's uid is `uid`.
pub fn for_uid<S: Serialize>(uid: Option<&str>, status: &S) -> Patch<()> {
    let mut operations = vec![];
    if let Some(uid) = uid {
        operations.push(serde_json::json!({"op": "test", "path": "/metadata/uid", "value": uid}));
    }
    // `add` sets a member whether or not it exists.
    operations.push(serde_json::json!({"op": "add", "path": "/status", "value": status}));
    Patch::Json(serde_json::from_value(serde_json::Value::Array(operations)).expect("test and add operations"))
}

/// Writes `status` as the status of `object` (by name, bound to its uid) as `manager`. `None`:
/// the object under that name is another one now (deleted and made again since it was read);
/// nothing was written, and the new one is reconciled on its own.
pub async fn write<K, S>(client: &kube::Client, object: &K, status: &S, manager: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: Serialize,
{
    let meta = object.meta();
    let api: kube::Api<K> = kube::Api::namespaced(client.clone(), meta.namespace.as_deref().unwrap_or_default());
    let params = kube::api::PatchParams {
        field_manager: Some(manager.to_owned()),
        ..Default::default()
    };
    let patch = for_uid(meta.uid.as_deref(), status);
    let name = meta.name.as_deref().unwrap_or_default();
    match api.patch_status(name, &params, &patch).await {
        Ok(updated) => Ok(Some(updated)),
        // A failed test is a bare 422 ("the server rejected our request…", no details): look
        // whether the object under the name is still this one.
        Err(err) if refused(&err) => match api.get_opt(name).await? {
            Some(now) if now.meta().uid == meta.uid => Err(err),
            _ => Ok(None),
        },
        Err(err) => Err(err),
    }
}

/// Whether `err` is the API server refusing a patch as unprocessable (422): a failed `test`
/// among others (its message does not say which).
fn refused(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 422)
}

/// The order of two resourceVersions of the same kind of object, when both are in the comparable
/// form Kubernetes 1.35 guarantees (KEP-5504: a positive decimal integer without leading zeros,
/// larger is newer); `None` when either is not, and only equality may be trusted.
pub fn version_order(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let comparable = |v: &str| !v.is_empty() && !v.starts_with('0') && v.bytes().all(|b| b.is_ascii_digit());
    (comparable(a) && comparable(b)).then(|| a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering::{Equal, Greater, Less};

    use super::*;

    #[test]
    fn the_status_is_set_only_on_the_object_it_was_composed_for() {
        let Patch::Json(patch) = for_uid(Some("u1"), &serde_json::json!({"phase": "Running"})) else {
            panic!("a JSON patch");
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            serde_json::json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "add", "path": "/status", "value": {"phase": "Running"}}
            ])
        );
    }

    #[test]
    fn only_an_unprocessable_patch_is_looked_into() {
        let refusal = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure(
                    "the server rejected our request due to an error in our request",
                    "Invalid",
                )
                .with_code(code)
                .boxed(),
            )
        };
        assert!(refused(&refusal(422)));
        assert!(!refused(&refusal(409)));
    }

    #[test]
    fn resource_versions_compare_as_integers_only_in_their_comparable_form() {
        assert_eq!(version_order("9", "10"), Some(Less));
        assert_eq!(version_order("123456789012345678901", "99"), Some(Greater));
        assert_eq!(version_order("42", "42"), Some(Equal));
        assert_eq!(version_order("042", "42"), None, "a leading zero");
        assert_eq!(version_order("0", "1"), None, "zero is never a live version");
        assert_eq!(version_order("", "1"), None);
        assert_eq!(version_order("a1", "1"), None);
    }
}
