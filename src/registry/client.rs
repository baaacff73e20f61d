//! The registry client: lists a repository's tags (paginated with `n`/`last`) and resolves a
//! tag's manifest digest, through `oci-client` (token and basic auth challenges as registries
//! ask), with extra CA bundles, plain HTTP only for hosts named insecure, and a timeout on every
//! call. Errors are sorted into what a user can act on; none quotes a credential.

use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::api::conditions::reasons;
use crate::identity::Credential;

/// How many tags one page asks for.
const PAGE: usize = 1000;
/// At most this many pages (a runaway listing stops here).
const MAX_PAGES: usize = 100;
/// A listing keeps at most this many tags; longer tags than the OCI limit (128) are not tags.
const MAX_TAGS: usize = 20_000;
const MAX_TAG_LEN: usize = 128;
/// A whole listing (every page) takes at most this many call timeouts.
const LISTING_CALLS: u32 = 3;
/// The longest any one registry call may take, by default.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How the registry client connects.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// PEM bundles trusted besides the system's.
    pub ca_bundles: Vec<Vec<u8>>,
    /// Hosts (`host:port`) reached over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// The longest one registry call may take.
    pub call_timeout: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            ca_bundles: vec![],
            insecure_hosts: vec![],
            call_timeout: CALL_TIMEOUT,
        }
    }
}

/// Why the registry could not answer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// 401 or 403: the credentials are missing or wrong.
    #[error("the registry refused the credentials for {repository} ({detail})")]
    Unauthorized {
        /// The repository.
        repository: String,
        /// What the registry said, without credentials.
        detail: String,
    },
    /// Unreachable, timed out, or a server error.
    #[error("the registry for {repository} cannot be reached: {detail}")]
    Unavailable {
        /// The repository.
        repository: String,
        /// Why.
        detail: String,
    },
    /// The repository or tag does not exist.
    #[error("{what} does not exist in the registry")]
    NotFound {
        /// The repository or image.
        what: String,
    },
    /// The answer did not parse.
    #[error("the registry for {repository} answered something that is not a tag list or manifest: {detail}")]
    Invalid {
        /// The repository.
        repository: String,
        /// Why.
        detail: String,
    },
}

impl RegistryError {
    /// The `UpdateAvailable` reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => reasons::UNAUTHORIZED,
            Self::Unavailable { .. } => reasons::REGISTRY_UNAVAILABLE,
            Self::NotFound { .. } => reasons::IMAGE_NOT_FOUND,
            Self::Invalid { .. } => reasons::REGISTRY_INVALID,
        }
    }
}

/// How every registry client connects. Each check makes its own `oci-client` client: one
/// client remembers the first credentials it saw for a registry host (and its tokens), which
/// must never leak from one pull identity to another.
#[derive(Clone)]
pub struct Registry {
    settings: RegistrySettings,
}

impl Registry {
    /// Registry access with the given CA bundles and insecure hosts.
    pub fn new(settings: &RegistrySettings) -> Self {
        // reqwest's rustls needs a process-wide crypto provider; the operator's is ring (a no-op
        // when one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            settings: settings.clone(),
        }
    }

    /// A client for one check (one credential).
    pub fn session(&self) -> Session {
        let settings = &self.settings;
        let config = ClientConfig {
            protocol: if settings.insecure_hosts.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(settings.insecure_hosts.clone())
            },
            extra_root_certificates: settings
                .ca_bundles
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            read_timeout: Some(settings.call_timeout),
            connect_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        Session {
            client: Client::new(config),
            timeout: settings.call_timeout,
            settings: settings.clone(),
            realms_checked: Default::default(),
        }
    }
}

/// One check's client: the tag listing and the manifest request of one credential.
pub struct Session {
    client: Client,
    timeout: Duration,
    settings: RegistrySettings,
    /// The registry hosts whose token realm was found safe for credentials.
    realms_checked: std::sync::Mutex<Vec<String>>,
}

/// Whether credentials may go to a registry's token `realm`: an https URL, or plain http to the
/// registry host itself when that host is named insecure. Never an arbitrary URL a registry (or
/// someone posing as one) names.
pub fn realm_allowed(realm: &str, registry: &str, insecure_hosts: &[String]) -> Result<(), String> {
    let url = reqwest::Url::parse(realm).map_err(|_| format!("token realm {realm:?} is not a URL"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_owned(),
                (None, _) => String::new(),
            };
            if host == registry && insecure_hosts.iter().any(|h| h == registry) {
                Ok(())
            } else {
                Err(format!(
                    "token realm {realm:?} is plain http on another host than the registry; credentials are not sent"
                ))
            }
        }
        scheme => Err(format!(
            "token realm {realm:?} is not https ({scheme}); credentials are not sent"
        )),
    }
}

impl Session {
    /// Before credentials go anywhere: the registry's challenge (`GET /v2/`) must name a token
    /// realm [`realm_allowed`] accepts. Once per registry host and session.
    async fn check_realm(&self, repository: &str, reference: &Reference) -> Result<(), RegistryError> {
        let registry = reference.resolve_registry().to_owned();
        if self
            .realms_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&registry)
        {
            return Ok(());
        }
        let insecure = self.settings.insecure_hosts.contains(&registry);
        let url = format!("{}://{registry}/v2/", if insecure { "http" } else { "https" });
        let unavailable = |detail: String| RegistryError::Unavailable {
            repository: repository.to_owned(),
            detail,
        };
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.timeout);
        for pem in &self.settings.ca_bundles {
            for certificate in
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| unavailable(format!("CA bundle: {e}")))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build().map_err(|e| unavailable(format!("{e}")))?;
        let answer = client.get(&url).send().await.map_err(|e| {
            unavailable(if e.is_timeout() {
                format!("no answer within {:?}", self.timeout)
            } else {
                "cannot connect".to_owned()
            })
        })?;
        for challenge in answer.headers().get_all(reqwest::header::WWW_AUTHENTICATE) {
            let Ok(text) = challenge.to_str() else { continue };
            for parsed in http_auth::ChallengeParser::new(text).flatten() {
                if !parsed.scheme.eq_ignore_ascii_case("Bearer") {
                    continue;
                }
                // Every realm named, in every challenge: clients differ in which one they use.
                for (_, realm) in parsed.params.iter().filter(|(k, _)| k.eq_ignore_ascii_case("realm")) {
                    realm_allowed(&realm.to_unescaped(), &registry, &self.settings.insecure_hosts).map_err(
                        |detail| RegistryError::Unauthorized {
                            repository: repository.to_owned(),
                            detail,
                        },
                    )?;
                }
            }
        }
        self.realms_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(registry);
        Ok(())
    }

    /// Every tag of `repository` (no tag or digest in it), at most [`MAX_TAGS`] within
    /// [`LISTING_CALLS`] call timeouts.
    pub async fn tags(&self, repository: &str, credential: Option<&Credential>) -> Result<Vec<String>, RegistryError> {
        let deadline = self.timeout * LISTING_CALLS;
        match tokio::time::timeout(deadline, self.all_tags(repository, credential)).await {
            Ok(listed) => listed,
            Err(_) => Err(RegistryError::Unavailable {
                repository: repository.to_owned(),
                detail: format!("the tag listing took longer than {deadline:?}"),
            }),
        }
    }

    async fn all_tags(&self, repository: &str, credential: Option<&Credential>) -> Result<Vec<String>, RegistryError> {
        let reference = parse(repository, &format!("{repository}:latest"))?;
        if credential.is_some() {
            self.check_realm(repository, &reference).await?;
        }
        let auth = auth(credential);
        let mut tags: Vec<String> = Vec::new();
        for _ in 0..MAX_PAGES {
            let last = tags.last().cloned();
            let page = timed(
                self.timeout,
                repository,
                self.client.list_tags(&reference, &auth, Some(PAGE), last.as_deref()),
            )
            .await?;
            let count = page.tags.len();
            // A registry that ignores `last` would repeat itself: stop at the first repeat.
            let fresh: Vec<String> = page
                .tags
                .into_iter()
                .filter(|t| Some(t) > last.as_ref() && t.len() <= MAX_TAG_LEN)
                .collect();
            let done = count < PAGE || fresh.is_empty();
            tags.extend(fresh);
            if tags.len() >= MAX_TAGS {
                tags.truncate(MAX_TAGS);
                return Ok(tags);
            }
            if done {
                return Ok(tags);
            }
        }
        Ok(tags)
    }

    /// The manifest digest (`sha256:…`) of `repository:tag`.
    pub async fn digest(
        &self,
        repository: &str,
        tag: &str,
        credential: Option<&Credential>,
    ) -> Result<String, RegistryError> {
        let reference = parse(repository, &format!("{repository}:{tag}"))?;
        if credential.is_some() {
            self.check_realm(repository, &reference).await?;
        }
        let digest = timed(
            self.timeout,
            repository,
            self.client.fetch_manifest_digest(&reference, &auth(credential)),
        )
        .await?;
        // The digest goes into pod specs: only what a digest can be.
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(digest)
        } else {
            Err(RegistryError::Invalid {
                repository: repository.to_owned(),
                detail: "the manifest digest is not sha256:<64 hex digits>".into(),
            })
        }
    }
}

fn parse(repository: &str, image: &str) -> Result<Reference, RegistryError> {
    crate::image_ref::parse(image).ok_or_else(|| RegistryError::Invalid {
        repository: repository.to_owned(),
        detail: "not an image reference".to_owned(),
    })
}

fn auth(credential: Option<&Credential>) -> RegistryAuth {
    match credential {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    }
}

async fn timed<T>(
    timeout: Duration,
    repository: &str,
    call: impl Future<Output = Result<T, OciDistributionError>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(RegistryError::Unavailable {
            repository: repository.to_owned(),
            detail: format!("no answer within {:?}", timeout),
        }),
        Ok(result) => result.map_err(|e| classify(repository, &e)),
    }
}

/// Sorts a client error into what the user can act on.
fn classify(repository: &str, error: &OciDistributionError) -> RegistryError {
    use OciDistributionError as E;
    let repository = repository.to_owned();
    match error {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => RegistryError::Unauthorized {
            repository,
            detail: "401 Unauthorized".into(),
        },
        E::ServerError { code, .. } if *code == 401 || *code == 403 => RegistryError::Unauthorized {
            repository,
            detail: format!("HTTP {code}"),
        },
        E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => {
            RegistryError::NotFound { what: repository }
        }
        // The body of an error page may hold anything (and change on every request): the code
        // says enough.
        E::ServerError { code, .. } => RegistryError::Unavailable {
            repository,
            detail: format!("HTTP {code}"),
        },
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope.errors.iter().map(|e| format!("{:?}", e.code)).collect();
            let text = codes.join(", ");
            if text.contains("Unauthorized") || text.contains("Denied") {
                RegistryError::Unauthorized {
                    repository,
                    detail: text,
                }
            } else if text.contains("Unknown") {
                RegistryError::NotFound { what: repository }
            } else {
                RegistryError::Unavailable {
                    repository,
                    detail: text,
                }
            }
        }
        E::JsonError(e) => RegistryError::Invalid {
            repository,
            detail: format!("{:?} at line {} column {}", e.classify(), e.line(), e.column()),
        },
        E::ManifestEncodingError(_) => RegistryError::Invalid {
            repository,
            detail: "the answer is not UTF-8".into(),
        },
        E::RequestError(e) if e.status().is_some_and(|s| s == 401 || s == 403) => RegistryError::Unauthorized {
            repository,
            detail: format!("HTTP {}", e.status().map(|s| s.as_u16()).unwrap_or_default()),
        },
        other => RegistryError::Unavailable {
            repository,
            detail: short(other),
        },
    }
}

/// An error's text without URLs' query strings (tokens can travel there).
fn short(error: &OciDistributionError) -> String {
    let text = error.to_string();
    text.split_whitespace()
        .map(|word| word.split_once('?').map_or(word, |(before, _)| before))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
