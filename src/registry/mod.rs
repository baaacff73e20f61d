//! Runtime versions from the registry: which versions exist ([`version`]), asking the registry
//! ([`client`]), and one shared answer per repository and credential per check interval
//! ([`VersionCache`]), so thousands of runtimes on one image cost one registry request each
//! interval, not one each.

pub mod client;
pub mod version;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::client::{Registry, RegistryError, RegistrySettings};
use self::version::Version;
use crate::identity::Credential;

/// The newest allowed version of a repository, and its manifest digest.
#[derive(Clone, Debug, PartialEq)]
pub struct Latest {
    /// The version.
    pub version: Version,
    /// Its manifest digest, `sha256:…`.
    pub digest: String,
}

/// How long a failed check is remembered before the registry is asked again.
const FAILURE_TTL: Duration = Duration::from_secs(30);

/// The answer of the last button request per repository and credential, with the moment that
/// request started.
type Asked = Arc<tokio::sync::Mutex<Option<(Instant, Result<Option<Latest>, RegistryError>)>>>;

/// What the cache knows about a repository right now.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// An answer, and whether a newer one is being fetched.
    Known(Result<Option<Latest>, RegistryError>),
    /// Never asked yet: the registry is being asked; the runtime is woken when it answers.
    Pending,
}

/// What version checks share. A lookup never waits for the registry: a stale or missing answer
/// starts one background request per repository and credential, and `answered` is told the
/// repository when a first or changed answer arrives (the controller wakes its runtimes). So a
/// slow registry never delays reconciles, and thousands of runtimes on one image cost one
/// registry request per interval.
pub struct VersionCache {
    registry: Registry,
    interval: Duration,
    denied: Vec<String>,
    entries: Arc<Mutex<HashMap<(String, String), Entry>>>,
    asked: Mutex<HashMap<(String, String), Asked>>,
    requests: Arc<dyn Fn(&'static str) + Send + Sync>,
    answered: Arc<dyn Fn(&str) + Send + Sync>,
}

#[derive(Clone)]
struct Entry {
    answer: Option<(Instant, Result<Option<Latest>, RegistryError>)>,
    refreshing: bool,
    /// When a runtime last asked: entries nobody asked for in two intervals are dropped (a
    /// rotated credential or a removed repository must not stay for ever).
    used: Instant,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            answer: None,
            refreshing: false,
            used: Instant::now(),
        }
    }
}

/// Whether two answers differ in what a user sees: the version and digest, or the kind of
/// failure (a registry's error text may change on every request).
fn differs(before: &Result<Option<Latest>, RegistryError>, after: &Result<Option<Latest>, RegistryError>) -> bool {
    match (before, after) {
        (Ok(a), Ok(b)) => a != b,
        (Err(a), Err(b)) => a.reason() != b.reason(),
        _ => true,
    }
}

impl VersionCache {
    /// A cache over `registry` that asks at most once per `interval` for each repository and
    /// credential, skipping `denied` versions; `requests` counts each registry call by kind, and
    /// `answered` hears of first and changed answers.
    pub fn new(
        registry: Registry,
        interval: Duration,
        denied: Vec<String>,
        requests: Arc<dyn Fn(&'static str) + Send + Sync>,
        answered: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        Self {
            registry,
            interval,
            denied,
            entries: Arc::new(Mutex::new(HashMap::new())),
            asked: Mutex::new(HashMap::new()),
            requests,
            answered,
        }
    }

    /// Button presses being answered now (each holds a slot).
    pub fn presses_in_progress(&self) -> usize {
        self.asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Repositories (per credential) whose answer is kept.
    pub fn answers_kept(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The check interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The denied versions.
    pub fn denied(&self) -> &[String] {
        &self.denied
    }

    /// The newest allowed version of `repository` as known now (`Ok(None)`: it has no version
    /// tags). An answer older than the interval starts a refresh in the background and is
    /// returned meanwhile.
    pub fn lookup(&self, repository: &str, credential: Option<&Credential>) -> Lookup {
        let key = (repository.to_owned(), crate::identity::login_key(credential));
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.entry(key.clone()).or_default();
        entry.used = Instant::now();
        if self.stale(entry) && !entry.refreshing {
            entry.refreshing = true;
            self.refresh(key, credential.cloned());
        }
        match &entry.answer {
            Some((_, answer)) => Lookup::Known(answer.clone()),
            None => Lookup::Pending,
        }
    }

    /// The answer for `repository` and the login `login_key` names ([`crate::identity::login_key`]),
    /// when one is known and not due to be asked again. Asks nothing: `None` means the caller
    /// needs the login itself ([`lookup`](Self::lookup)).
    pub fn fresh(&self, repository: &str, login_key: &str) -> Option<Result<Option<Latest>, RegistryError>> {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.get_mut(&(repository.to_owned(), login_key.to_owned()))?;
        if self.stale(entry) {
            return None;
        }
        entry.used = Instant::now();
        entry.answer.as_ref().map(|(_, answer)| answer.clone())
    }

    fn stale(&self, entry: &Entry) -> bool {
        match &entry.answer {
            None => true,
            Some((checked, answer)) => {
                let ttl = if answer.is_ok() { self.interval } else { FAILURE_TTL };
                checked.elapsed() >= ttl
            }
        }
    }

    /// Asks the registry now (the check-version and update buttons), and shares the answer.
    pub async fn ask_now(
        &self,
        repository: &str,
        credential: Option<&Credential>,
    ) -> Result<Option<Latest>, RegistryError> {
        // The answer must come from a request that started after the button was pressed.
        // Buttons pressed on many runtimes at once (`kubectl annotate --all`) queue here and share
        // the request that starts after the last of them: at most two requests for a burst.
        let pressed = Instant::now();
        let key = (repository.to_owned(), crate::identity::login_key(credential));
        let slot = {
            let mut asked = self.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            asked.entry(key.clone()).or_default().clone()
        };
        let answer = self.press(&slot, pressed, key.clone(), repository, credential).await;
        // A slot nobody holds can serve no later press (its request started before it), so the
        // last press of a burst takes it out: the map holds presses in progress only.
        let mut asked = self.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if asked
            .get(&key)
            .is_some_and(|held| Arc::ptr_eq(held, &slot) && Arc::strong_count(&slot) == 2)
        {
            asked.remove(&key);
        }
        answer
    }

    async fn press(
        &self,
        slot: &Asked,
        pressed: Instant,
        key: (String, String),
        repository: &str,
        credential: Option<&Credential>,
    ) -> Result<Option<Latest>, RegistryError> {
        let mut last = slot.lock().await;
        if let Some((started, answer)) = last.as_ref()
            && *started >= pressed
        {
            return answer.clone();
        }
        let started = Instant::now();
        let answer = ask(&self.registry, &self.denied, &*self.requests, repository, credential).await;
        *last = Some((started, answer.clone()));
        let changed = {
            let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = entries.entry(key).or_default();
            let changed = entry.answer.as_ref().is_none_or(|(_, before)| differs(before, &answer));
            entry.answer = Some((Instant::now(), answer.clone()));
            entry.used = Instant::now();
            changed
        };
        if changed {
            (self.answered)(repository);
        }
        answer
    }

    /// Asks in the background. A failure is asked again by this task, waiting 30 s and doubling
    /// up to the interval, while runtimes still look: runtimes never poll a failing registry
    /// themselves, and are woken when the answer changes (the registry is back).
    fn refresh(&self, key: (String, String), credential: Option<Credential>) {
        let (interval, unused) = (self.interval, self.interval * 2);
        let (registry, denied, requests, answered, entries) = (
            self.registry.clone(),
            self.denied.clone(),
            self.requests.clone(),
            self.answered.clone(),
            self.entries.clone(),
        );
        tokio::spawn(async move {
            let mut delay = FAILURE_TTL;
            loop {
                let answer = ask(&registry, &denied, &*requests, &key.0, credential.as_ref()).await;
                let failed = answer.is_err();
                let (changed, still_used) = {
                    let mut entries = entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    // `refresh` runs under the lock `lookup` holds, so unused entries go here.
                    entries.retain(|k, entry| *k == key || entry.refreshing || entry.used.elapsed() < unused);
                    let entry = entries.entry(key.clone()).or_default();
                    let changed = entry.answer.as_ref().is_none_or(|(_, before)| differs(before, &answer));
                    entry.answer = Some((Instant::now(), answer));
                    let still_used = entry.used.elapsed() < unused;
                    entry.refreshing = failed && still_used;
                    (changed, still_used)
                };
                if changed {
                    answered(&key.0);
                }
                if !failed || !still_used {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(interval);
            }
        });
    }
}

async fn ask(
    registry: &Registry,
    denied: &[String],
    requests: &(dyn Fn(&'static str) + Send + Sync),
    repository: &str,
    credential: Option<&Credential>,
) -> Result<Option<Latest>, RegistryError> {
    let session = registry.session();
    requests("tags");
    let tags = session.tags(repository, credential).await?;
    let Some(version) = version::newest_allowed(tags.iter().map(String::as_str), denied) else {
        return Ok(None);
    };
    requests("manifest");
    let digest = session.digest(repository, version.as_str(), credential).await?;
    Ok(Some(Latest { version, digest }))
}
