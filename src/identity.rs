//! Pull identity: the service account a runtime pulls with, and its imagePullSecrets.
//! Pure resolution from objects the caller read; secret contents never leave this module.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use serde::Deserialize;

use crate::api::conditions::reasons;

/// The secret type that carries registry credentials.
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";

/// A resolved identity: what the runtime pod pulls with.
#[derive(Clone, Debug, PartialEq)]
pub struct PullIdentity {
    /// The service account the pod runs as.
    pub service_account: String,
    /// The imagePullSecrets set explicitly on the pod.
    pub pull_secrets: Vec<String>,
    /// Whether one of the secrets holds credentials for the image's registry host.
    pub has_registry_credentials: bool,
}

/// Why the identity does not resolve; each says which object to fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum IdentityProblem {
    /// The service account does not exist.
    #[error(
        "service account {0} does not exist in the runtime's namespace; create it or set spec.identity.serviceAccountName"
    )]
    ServiceAccountNotFound(String),
    /// A pull secret the account names does not exist.
    #[error(
        "service account {account} names imagePullSecret {secret}, which does not exist; create the secret or remove it from the account"
    )]
    PullSecretNotFound {
        /// The service account.
        account: String,
        /// The missing secret.
        secret: String,
    },
    /// A pull secret is of the wrong type or does not parse.
    #[error("imagePullSecret {secret} of service account {account} is unusable: {why}")]
    PullSecretInvalid {
        /// The service account.
        account: String,
        /// The secret.
        secret: String,
        /// What is wrong (never its contents).
        why: String,
    },
}

impl IdentityProblem {
    /// The condition reason for this problem.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ServiceAccountNotFound(_) => reasons::SERVICE_ACCOUNT_NOT_FOUND,
            Self::PullSecretNotFound { .. } => reasons::PULL_SECRET_NOT_FOUND,
            Self::PullSecretInvalid { .. } => reasons::PULL_SECRET_INVALID,
        }
    }
}

/// Resolves the identity of `account_name`: the account must exist, and every imagePullSecret it
/// names must exist, be of type `kubernetes.io/dockerconfigjson` (or the legacy
/// `kubernetes.io/dockercfg` that the kubelet also reads) and parse.
pub fn resolve(
    account_name: &str,
    account: Option<&ServiceAccount>,
    secrets: &BTreeMap<String, Option<Secret>>,
    registry_host: &str,
) -> Result<PullIdentity, IdentityProblem> {
    let account = account.ok_or_else(|| IdentityProblem::ServiceAccountNotFound(account_name.to_owned()))?;
    let mut identity = PullIdentity {
        service_account: account_name.to_owned(),
        pull_secrets: Vec::new(),
        has_registry_credentials: false,
    };
    for name in pull_secret_names(account) {
        let secret = secrets
            .get(&name)
            .cloned()
            .flatten()
            .ok_or_else(|| IdentityProblem::PullSecretNotFound {
                account: account_name.to_owned(),
                secret: name.clone(),
            })?;
        let hosts = registry_hosts(&secret).map_err(|why| IdentityProblem::PullSecretInvalid {
            account: account_name.to_owned(),
            secret: name.clone(),
            why,
        })?;
        identity.has_registry_credentials |= hosts.iter().any(|host| host == registry_host);
        identity.pull_secrets.push(name);
    }
    Ok(identity)
}

/// The imagePullSecrets an account names, in order.
pub fn pull_secret_names(account: &ServiceAccount) -> Vec<String> {
    account
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The legacy pull secret type (`.dockercfg`: the `auths` map alone); the kubelet reads it and
/// OpenShift gives every service account one.
pub const DOCKER_CFG: &str = "kubernetes.io/dockercfg";

#[derive(Deserialize)]
struct DockerConfig {
    auths: BTreeMap<String, serde_json::Value>,
}

/// The registry entries of a pull secret in either format: `.dockerconfigjson`'s `auths` map,
/// or the legacy `.dockercfg`, which is that map itself. Errors say what is wrong in words,
/// never quoting the secret's data.
fn auths(secret: &Secret) -> Result<BTreeMap<String, serde_json::Value>, String> {
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    let key = match kind {
        DOCKER_CONFIG_JSON => ".dockerconfigjson",
        DOCKER_CFG => ".dockercfg",
        _ => {
            return Err(format!(
                "it has type {kind}, expected {DOCKER_CONFIG_JSON} or {DOCKER_CFG}"
            ));
        }
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("it has no {key} key"))?;
    if kind == DOCKER_CFG {
        return serde_json::from_slice(&data.0)
            .map_err(|_| "its .dockercfg is not a JSON object of registries".to_owned());
    }
    let config: DockerConfig = serde_json::from_slice(&data.0)
        .map_err(|_| "its .dockerconfigjson is not a JSON object with an \"auths\" map".to_owned())?;
    Ok(config.auths)
}

/// The registry hosts a pull secret has credentials for.
fn registry_hosts(secret: &Secret) -> Result<Vec<String>, String> {
    Ok(auths(secret)?.keys().map(|key| normalize_host(key)).collect())
}

/// A registry login from a dockerconfigjson secret. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credential {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The login for `registry_host` from the first of `secrets` (in the account's order) that holds
/// one, in either secret format: the `auth` field (base64 of `user:password`) or `username` and
/// `password`.
pub fn credential(secrets: &[Option<&Secret>], registry_host: &str) -> Option<Credential> {
    secrets.iter().flatten().find_map(|secret| {
        let auths = auths(secret).ok()?;
        let (_, entry) = auths.iter().find(|(key, _)| normalize_host(key) == registry_host)?;
        entry_credential(&AuthEntry::deserialize(entry).ok()?)
    })
}

fn entry_credential(entry: &AuthEntry) -> Option<Credential> {
    use base64::Engine as _;
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Some(Credential {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.as_deref()?.trim())
        .ok()?;
    let (username, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credential {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// A stable, one-way name for a login (the version cache's key; never the secret itself).
pub fn login_key(credential: Option<&Credential>) -> String {
    use sha2::Digest as _;
    credential.map_or_else(String::new, |c| {
        let digest = sha2::Sha256::digest(format!("{}\0{}", c.username, c.password));
        crate::flow::hex(&digest[..8])
    })
}

/// What an account's pull secrets came to, without their contents: for each registry host they
/// name, the key of the login they hold for it ([`login_key`]; empty when the entry holds none).
/// Remembered per service account, so a settled runtime is kept without reading its secrets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logins {
    hosts: Vec<(String, String)>,
}

impl Logins {
    /// The logins of `secrets` (the account's pull secrets in its order, as resolved).
    pub fn of(secrets: &[Option<&Secret>]) -> Self {
        let mut hosts: Vec<String> = secrets
            .iter()
            .flatten()
            .filter_map(|secret| registry_hosts(secret).ok())
            .flatten()
            .collect();
        hosts.sort();
        hosts.dedup();
        let hosts = hosts
            .into_iter()
            .map(|host| {
                let key = login_key(credential(secrets, &host).as_ref());
                (host, key)
            })
            .collect();
        Self { hosts }
    }

    /// Whether a secret names `host`, and the key of its login for it.
    pub fn for_host(&self, host: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|(named, _)| named == host)
            .map(|(_, key)| key.as_str())
    }
}

/// `https://host:port/v1/` and `host:port` name the same registry.
fn normalize_host(key: &str) -> String {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

/// The registry host of an image reference, as container runtimes read it (`docker.io` when
/// the reference names none).
pub fn registry_host(image: &str) -> String {
    crate::image_ref::parse(image).map_or_else(|| "docker.io".to_owned(), |r| r.registry().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn account(secrets: &[&str]) -> ServiceAccount {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pf-puller"},
            "imagePullSecrets": secrets.iter().map(|s| serde_json::json!({"name": s})).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    fn secret(kind: &str, payload: &str) -> Secret {
        let key = if kind == DOCKER_CFG {
            ".dockercfg"
        } else {
            ".dockerconfigjson"
        };
        Secret {
            type_: Some(kind.to_owned()),
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(payload.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn a_legacy_dockercfg_secret_resolves_and_gives_its_credential() {
        let legacy = secret(
            DOCKER_CFG,
            r#"{"https://127.0.0.1:5000/v2/":{"auth":"c2VjcmV0OnRva2Vu"}}"#,
        );
        let secrets = BTreeMap::from([("legacy".to_owned(), Some(legacy.clone()))]);
        let identity = resolve("pf-puller", Some(&account(&["legacy"])), &secrets, "127.0.0.1:5000").unwrap();
        assert!(identity.has_registry_credentials);
        let found = credential(&[Some(&legacy)], "127.0.0.1:5000").unwrap();
        assert_eq!((found.username.as_str(), found.password.as_str()), ("secret", "token"));
        let garbage = BTreeMap::from([("legacy".to_owned(), Some(secret(DOCKER_CFG, "hunter2")))]);
        let err = resolve("pf-puller", Some(&account(&["legacy"])), &garbage, "x").unwrap_err();
        assert_eq!(err.reason(), "PullSecretInvalid");
        assert!(!err.to_string().contains("hunter2"));
    }

    const AUTH: &str = r#"{"auths":{"https://127.0.0.1:5000/v2/":{"auth":"c2VjcmV0OnRva2Vu"}}}"#;

    #[test]
    fn logins_remember_which_hosts_hold_a_login_and_a_key_of_it_never_the_secret() {
        let first = secret(DOCKER_CONFIG_JSON, AUTH);
        let second = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"b3RoZXI6cGFzcw=="},"ghcr.io":{}}}"#,
        );
        let logins = Logins::of(&[Some(&first), Some(&second)]);
        // The first secret in the account's order gives the login, as `credential` does.
        let expected = login_key(credential(&[Some(&first)], "127.0.0.1:5000").as_ref());
        assert_eq!(logins.for_host("127.0.0.1:5000"), Some(expected.as_str()));
        assert_eq!(expected.len(), 16);
        // Named without a login: credentials for the host, but none to ask the registry with.
        assert_eq!(logins.for_host("ghcr.io"), Some(""));
        assert_eq!(logins.for_host("docker.io"), None);
        let printed = format!("{logins:?}");
        assert!(!printed.contains("c2VjcmV0") && !printed.contains("token"), "{printed}");
        // Another password is another key.
        let rotated = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"c2VjcmV0OnJvdGF0ZWQ="}}}"#,
        );
        assert_ne!(Logins::of(&[Some(&rotated)]), Logins::of(&[Some(&first)]));
    }

    #[test]
    fn account_with_a_valid_secret_resolves_with_credentials_for_its_registry() {
        let secrets = BTreeMap::from([("regcred".to_owned(), Some(secret(DOCKER_CONFIG_JSON, AUTH)))]);
        let identity = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "127.0.0.1:5000").unwrap();
        assert_eq!(identity.pull_secrets, ["regcred"]);
        assert!(identity.has_registry_credentials);
        let other = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "mcr.microsoft.com").unwrap();
        assert!(!other.has_registry_credentials);
    }

    #[test]
    fn missing_account_and_secret_name_the_object() {
        let err = resolve("pf-puller", None, &BTreeMap::new(), "x").unwrap_err();
        assert_eq!(err.reason(), "ServiceAccountNotFound");
        assert!(err.to_string().contains("service account pf-puller"));
        let secrets = BTreeMap::from([("regcred".to_owned(), None)]);
        let err = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "x").unwrap_err();
        assert_eq!(err.reason(), "PullSecretNotFound");
        assert!(err.to_string().contains("regcred"));
    }

    #[test]
    fn wrong_type_or_garbage_is_invalid_and_never_quotes_the_data() {
        let secrets = BTreeMap::from([("regcred".to_owned(), Some(secret("Opaque", AUTH)))]);
        let err = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "x").unwrap_err();
        assert_eq!(err.reason(), "PullSecretInvalid");
        assert!(err.to_string().contains("type Opaque"));
        let secrets = BTreeMap::from([(
            "regcred".to_owned(),
            Some(secret(DOCKER_CONFIG_JSON, "hunter2-not-json")),
        )]);
        let err = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "x").unwrap_err();
        assert_eq!(err.reason(), "PullSecretInvalid");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn registry_hosts_follow_the_reference_rules() {
        assert_eq!(
            registry_host("mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable"),
            "mcr.microsoft.com"
        );
        assert_eq!(registry_host("127.0.0.1:5000/runtime"), "127.0.0.1:5000");
        assert_eq!(registry_host("localhost/runtime"), "localhost");
        assert_eq!(registry_host("library/python:3"), "docker.io");
        assert_eq!(registry_host("python"), "docker.io");
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
    }

    #[test]
    fn credentials_come_from_the_entry_for_the_registry_host_in_either_form() {
        // "c2VjcmV0OnRva2Vu" is base64 of "secret:token".
        let by_auth = secret(DOCKER_CONFIG_JSON, AUTH);
        let found = credential(&[Some(&by_auth)], "127.0.0.1:5000").unwrap();
        assert_eq!((found.username.as_str(), found.password.as_str()), ("secret", "token"));
        assert_eq!(format!("{found:?}"), "Credential(..)", "never printed");
        assert!(credential(&[Some(&by_auth)], "mcr.microsoft.com").is_none());
        let by_fields = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"r.example":{"username":"u","password":"p"}}}"#,
        );
        let found = credential(&[None, Some(&by_auth), Some(&by_fields)], "r.example").unwrap();
        assert_eq!((found.username.as_str(), found.password.as_str()), ("u", "p"));
        let broken = secret(DOCKER_CONFIG_JSON, r#"{"auths":{"r.example":{"auth":"not base64!"}}}"#);
        assert!(credential(&[Some(&broken)], "r.example").is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_secret_payload_parses_without_panicking(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let text = String::from_utf8_lossy(&payload).into_owned();
            let garbage = secret(DOCKER_CONFIG_JSON, &text);
            let _ = credential(&[Some(&garbage)], "r.example");
            let secrets = BTreeMap::from([("regcred".to_owned(), Some(garbage))]);
            let _ = resolve("pf-puller", Some(&account(&["regcred"])), &secrets, "r.example");
        }

        #[test]
        fn any_user_and_password_round_trip_through_auth(user in "[^:]{0,20}", password in "\\PC{0,30}") {
            use base64::Engine as _;
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let payload = serde_json::json!({"auths": {"r.example": {"auth": auth}}}).to_string();
            let found = credential(&[Some(&secret(DOCKER_CONFIG_JSON, &payload))], "r.example").unwrap();
            proptest::prop_assert_eq!(found.username, user);
            proptest::prop_assert_eq!(found.password, password);
        }
    }
}
