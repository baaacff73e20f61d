//! Versions: which version a runtime runs, and whether a newer one exists. A runtime without
//! `spec.image.version` is pinned at first start to the newest allowed version, by digest
//! (`repository:version@sha256:…`, kept in `status.image`), so it never changes under the user;
//! it moves only on `promptflow.dev/update`, or by itself with `updatePolicy: Automatic`. The
//! operator never writes `spec`. Registry answers come from the shared [`VersionCache`]; a
//! version check never keeps a runtime from running.
//!
//! [`VersionCache`]: crate::registry::VersionCache

use std::time::Duration;

use kube::ResourceExt;

use super::Context;
use super::plan::{Login, Resolved};
use super::report::Notice;
use super::status::ConditionState;
use crate::api::conditions::{self, reasons};
use crate::api::{HandledActions, PromptFlowRuntime, UpdatePolicy, annotations};
use crate::registry::version::Version;
use crate::registry::{Latest, Lookup};

/// How soon a runtime whose registry refused its credentials looks again (its pull secret may
/// have been fixed; secrets are not watched).
const UNAUTHORIZED_RETRY: Duration = Duration::from_secs(30);

/// What the version step came to.
pub struct VersionOutcome {
    /// `UpdateAvailable`.
    pub condition: ConditionState,
    /// `status.latestVersion`, when known.
    pub latest: Option<String>,
    /// The check-version and update values handled.
    pub handled: HandledActions,
    /// An event: a newer version appeared, or an update started.
    pub notice: Option<Notice>,
    /// When to check again.
    pub requeue: Duration,
    /// First start, and the registry has not answered yet: wait (the runtime is woken when it
    /// answers) rather than start on an unpinned tag.
    pub waiting: bool,
}

impl VersionOutcome {
    /// Adds the condition and the handled values to a report's parts; returns
    /// `status.latestVersion`, the event to publish once the status records it, and when to
    /// check again. (Published before the write, a write that failed would announce it again.)
    pub fn record(
        self,
        conditions: &mut Vec<ConditionState>,
        handled: &mut HandledActions,
    ) -> (Option<String>, Option<Notice>, Duration) {
        conditions.push(self.condition);
        handled.check_version = self.handled.check_version;
        handled.update = self.handled.update;
        (self.latest, self.notice, self.requeue)
    }
}

impl VersionOutcome {
    /// The pod made from the chosen version was refused and the one from before keeps serving:
    /// an update asked for stays asked for (tried again with the pod), and no `Updating` event
    /// says otherwise.
    pub fn not_applied(&mut self) {
        self.handled.update = None;
        if self.notice.as_ref().is_some_and(|n| n.reason == reasons::UPDATING) {
            self.notice = None;
        }
    }
}

/// A fresh (not yet handled) value of an action annotation.
fn fresh(runtime: &PromptFlowRuntime, annotation: &str, handled: Option<&String>) -> Option<String> {
    runtime
        .annotations()
        .get(annotation)
        .filter(|value| Some(*value) != handled)
        .cloned()
}

/// Whether the check-version or update button was pressed and not yet handled.
pub fn asked(runtime: &PromptFlowRuntime) -> bool {
    let handled = runtime
        .status
        .as_ref()
        .and_then(|s| s.handled_actions.clone())
        .unwrap_or_default();
    fresh(runtime, annotations::CHECK_VERSION, handled.check_version.as_ref()).is_some()
        || fresh(runtime, annotations::UPDATE, handled.update.as_ref()).is_some()
}

/// The pin a runtime's status holds for `repository`: its image and version, when the image is
/// from that repository (a runtime that started unpinned on `latest` keeps that too).
pub fn pinned(runtime: &PromptFlowRuntime, repository: &str) -> Option<(String, String)> {
    let status = runtime.status.as_ref()?;
    let image = status.image.as_ref()?;
    let version = status.version.as_ref()?;
    let rest = image.strip_prefix(repository)?;
    (rest.starts_with(':') || rest.starts_with('@')).then(|| (image.clone(), version.clone()))
}

/// Applies the pin the status holds to `resolved`, without asking the registry (the instance
/// controller builds attached runtimes' containers this way).
pub fn apply_pin(runtime: &PromptFlowRuntime, resolved: &mut Resolved) {
    if runtime.spec.image.version.is_none()
        && !resolved.from_flow
        && let Some((image, version)) = pinned(runtime, &resolved.repository)
    {
        resolved.image = image;
        resolved.version = version;
    }
}

/// Decides the version to run (updating `resolved`) and reports on newer ones. `None`: the
/// login was remembered and the registry's answer for it is due to be asked again (or a button
/// was pressed), which takes the login itself: read the pull secrets and step again.
pub async fn step(runtime: &PromptFlowRuntime, ctx: &Context, resolved: &mut Resolved) -> Option<VersionOutcome> {
    let status = runtime.status.clone().unwrap_or_default();
    let handled_before = status.handled_actions.clone().unwrap_or_default();
    let check = fresh(
        runtime,
        annotations::CHECK_VERSION,
        handled_before.check_version.as_ref(),
    );
    let update = fresh(runtime, annotations::UPDATE, handled_before.update.as_ref());
    let cache = &ctx.versions;
    let requeue = jittered(cache.interval(), &runtime.uid().unwrap_or_default());
    // The buttons ask the registry now (this runtime's reconcile waits for it, at most the call
    // timeout); everything else reads the shared answer without waiting.
    let pressed = check.is_some() || update.is_some();
    let lookup = match &resolved.login {
        Login::Remembered(_) if pressed => return None,
        Login::Remembered(key) => Lookup::Known(cache.fresh(&resolved.repository, key)?),
        Login::Read(credential) if pressed => {
            Lookup::Known(cache.ask_now(&resolved.repository, credential.as_ref()).await)
        }
        Login::Read(credential) => cache.lookup(&resolved.repository, credential.as_ref()),
    };
    let handled = HandledActions {
        check_version: check.clone(),
        update: update.clone(),
        ..Default::default()
    };
    let mut outcome = VersionOutcome {
        condition: ConditionState::unknown(conditions::UPDATE_AVAILABLE, reasons::PENDING, "asking the registry"),
        latest: None,
        handled,
        notice: None,
        requeue,
        waiting: false,
    };
    let answer = match lookup {
        Lookup::Known(answer) => answer,
        Lookup::Pending => {
            let first_start = runtime.spec.image.version.is_none()
                && !resolved.from_flow
                && pinned(runtime, &resolved.repository).is_none();
            outcome.waiting = first_start;
            // Not known yet (an operator restart, a new credential): keep the pin.
            apply_pin(runtime, resolved);
            // A check-version value is handled once the registry answered.
            outcome.handled.check_version = None;
            outcome.handled.update = None;
            return Some(outcome);
        }
    };
    let spec_version = runtime.spec.image.version.clone();
    // The version to run: the spec's; else the pin; else (first start, update, Automatic) the
    // newest allowed version; else `latest`, unpinned, when the registry cannot say.
    if spec_version.is_none() && !resolved.from_flow {
        let current = pinned(runtime, &resolved.repository);
        let wants_newest =
            update.is_some() || runtime.spec.update_policy == UpdatePolicy::Automatic || current.is_none();
        match (&answer, current) {
            (Ok(Some(latest)), current) if wants_newest => {
                let image = format!("{}:{}@{}", resolved.repository, latest.version, latest.digest);
                if let Some((before, version)) = current.filter(|(before, _)| *before != image) {
                    outcome.notice = Some(Notice::normal(
                        reasons::UPDATING,
                        format!("updating from {version} ({before}) to {} ({image})", latest.version),
                    ));
                }
                resolved.image = image;
                resolved.version = latest.version.to_string();
            }
            (_, Some((image, version))) => {
                resolved.image = image;
                resolved.version = version;
            }
            _ => {}
        }
    }
    if let Err(error) = &answer {
        // The shared cache asks a failing registry again by itself and wakes the runtimes when
        // the answer changes. Refused credentials are this runtime's own (its pull secret, which
        // is not watched, may be fixed): only then does it look again soon. An update asked for
        // while the registry cannot answer is not done: it stays asked for.
        if error.reason() == reasons::UNAUTHORIZED {
            outcome.requeue = UNAUTHORIZED_RETRY;
        }
        outcome.handled.update = None;
    }
    let running = resolved.version.clone();
    let keeps = format!("the runtime keeps running {running}");
    outcome.condition = match &answer {
        Err(error) => ConditionState::unknown(
            conditions::UPDATE_AVAILABLE,
            error.reason(),
            format!("{error}; {keeps}"),
        ),
        Ok(None) => ConditionState::unknown(
            conditions::UPDATE_AVAILABLE,
            reasons::NOT_VERSIONED,
            format!(
                "no tag of {} is a version (YYYYMMDD.vN), so no newer version is known; {keeps}",
                resolved.repository
            ),
        ),
        Ok(Some(latest)) => {
            outcome.latest = Some(latest.version.to_string());
            report_latest(
                runtime,
                resolved,
                latest,
                &running,
                &mut outcome.notice,
                status.latest_version.as_deref(),
            )
        }
    };
    if spec_version.is_some() && update.is_some() {
        outcome.notice = Some(Notice::normal(
            reasons::UPDATING,
            format!(
                "{} asks for an update, but spec.image.version pins {running}: change spec.image.version to move",
                annotations::UPDATE
            ),
        ));
    }
    Some(outcome)
}

/// `UpdateAvailable` from the newest allowed version; an event when a newer one first appears.
fn report_latest(
    runtime: &PromptFlowRuntime,
    resolved: &Resolved,
    latest: &Latest,
    running: &str,
    notice: &mut Option<Notice>,
    announced: Option<&str>,
) -> ConditionState {
    let newer = running
        .parse::<Version>()
        .map_or(true, |current| latest.version > current);
    if !newer {
        return ConditionState::new(
            conditions::UPDATE_AVAILABLE,
            false,
            reasons::UP_TO_DATE,
            format!(
                "running {running}, the newest allowed version of {}",
                resolved.repository
            ),
        );
    }
    let how = if runtime.spec.image.version.is_some() {
        "change spec.image.version to move to it".to_owned()
    } else if resolved.from_flow {
        "change the flow's environment.image to move to it".to_owned()
    } else {
        format!("set a new value of {} to move to it", annotations::UPDATE)
    };
    let message = format!("version {} is available; running {running}; {how}", latest.version);
    if announced != Some(latest.version.as_str()) && notice.is_none() {
        *notice = Some(Notice::normal(reasons::NEWER_VERSION, message.clone()));
    }
    ConditionState::new(conditions::UPDATE_AVAILABLE, true, reasons::NEWER_VERSION, message)
}

/// `interval` spread by ±10% per runtime, so runtimes started together do not all look at once.
fn jittered(interval: Duration, uid: &str) -> Duration {
    let spread = uid
        .bytes()
        .fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 201;
    interval.mul_f64(0.9 + spread as f64 / 1000.0)
}
