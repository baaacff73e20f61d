//! The buttons: each sets its annotation to a new value (the time, so every press is new), then
//! follows the object until the operator has handled that value and the result shows, or a
//! `Stalled` condition says why it cannot, or the timeout passes. Judging is pure.

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::watch_object;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::progress::Progress;
use super::{Cli, CliError, Kind, Target, print_as};
use crate::api::conditions::{self, reasons};
use crate::api::{ComputeInstance, DesiredState, InstanceState, PromptFlowRuntime, RuntimePhase, annotations};

/// A button.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `promptflow.dev/start`.
    Start,
    /// `promptflow.dev/stop`.
    Stop,
    /// `promptflow.dev/restart`.
    Restart,
    /// `promptflow.dev/check-version`.
    CheckVersion,
    /// `promptflow.dev/update`.
    Update,
}

impl Action {
    /// The annotation the button sets.
    pub fn annotation(self) -> &'static str {
        match self {
            Action::Start => annotations::START,
            Action::Stop => annotations::STOP,
            Action::Restart => annotations::RESTART,
            Action::CheckVersion => annotations::CHECK_VERSION,
            Action::Update => annotations::UPDATE,
        }
    }
}

/// Where an action stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not there yet: what is happening.
    Waiting(String),
    /// Done: what happened.
    Done(String),
    /// It cannot get there: why, and what to fix.
    Failed(String),
}

impl Step {
    /// What the step says.
    pub fn text(&self) -> &str {
        match self {
            Step::Waiting(text) | Step::Done(text) | Step::Failed(text) => text,
        }
    }
}

/// What was asked: the annotation's value, when (to whole seconds, as status times are), and the
/// version running before.
#[derive(Clone, Debug)]
pub struct Asked {
    /// The annotation's new value.
    pub value: String,
    /// When it was set, rounded down to the second.
    pub since: Timestamp,
    /// `status.version` before.
    pub version_before: Option<String>,
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn phase_text(phase: RuntimePhase) -> &'static str {
    match phase {
        RuntimePhase::Running => "Running",
        RuntimePhase::NotAvailable => "Not available",
    }
}

/// Refuses what the operator would not do, before anything is changed.
pub fn precheck_runtime(action: Action, runtime: &PromptFlowRuntime) -> Result<(), String> {
    let name = runtime.name_any();
    if let Some(instance) = &runtime.spec.compute.instance
        && matches!(action, Action::Start | Action::Stop | Action::Restart)
    {
        return Err(format!(
            "runtime {name} runs on compute instance {0}, whose lifecycle it shares: use `kubectl promptflow {1} pfci/{0}`",
            instance.name,
            if action == Action::Stop { "stop" } else { "start" }
        ));
    }
    if let (Action::Update, Some(version)) = (action, &runtime.spec.image.version) {
        return Err(format!(
            "runtime {name} is pinned by spec.image.version ({version}); the operator never changes the spec: edit spec.image.version (in Git, when a GitOps tool applies it)"
        ));
    }
    Ok(())
}

/// Refuses what compute instances do not have.
pub fn precheck_instance(action: Action, instance: &ComputeInstance) -> Result<(), String> {
    let name = instance.name_any();
    match action {
        Action::Start if instance.spec.state == DesiredState::Stopped => Err(format!(
            "compute instance {name} has spec.state Stopped, which wins over the start button: set spec.state to Running"
        )),
        Action::Start | Action::Stop => Ok(()),
        _ => Err(
            "compute instances have start and stop only; their runtimes restart, check versions and update (pfrt/NAME)"
                .into(),
        ),
    }
}

/// Where a runtime action stands.
pub fn judge_runtime(action: Action, asked: &Asked, runtime: &PromptFlowRuntime) -> Step {
    let Some(status) = runtime.status.as_ref() else {
        return Step::Waiting("waiting for the operator to report a status".into());
    };
    let now = format!(
        "{} ({}): {}",
        phase_text(status.phase),
        status.reason.as_deref().unwrap_or("-"),
        status.message.as_deref().unwrap_or("")
    );
    let handled = status.handled_actions.clone().unwrap_or_default();
    let taken = match action {
        Action::Start => handled.start,
        Action::Stop => handled.stop,
        Action::Restart => handled.restart,
        Action::CheckVersion => handled.check_version,
        Action::Update => handled.update,
    }
    .as_deref()
        == Some(asked.value.as_str());
    let versions = find(&status.conditions, conditions::UPDATE_AVAILABLE);
    if !taken {
        let registry = versions.filter(|c| c.status == "Unknown" && c.reason != reasons::PENDING);
        let why = registry.map_or(now, |c| format!("{}: {}", c.reason, c.message));
        return Step::Waiting(format!(
            "waiting for the operator to take {}: {why}",
            action.annotation()
        ));
    }
    let running = status.phase == RuntimePhase::Running;
    let version = status.version.clone().unwrap_or_default();
    let stalled = find(&status.conditions, conditions::STALLED).filter(|c| c.status == "True");
    let failed = stalled.map(|c| Step::Failed(format!("{}: {}", c.reason, c.message)));
    let url = status.url.as_deref().map(|u| format!(" at {u}")).unwrap_or_default();
    match action {
        Action::Start if running => Step::Done(format!("running {version}{url}")),
        Action::Restart => {
            let ready_since = find(&status.conditions, conditions::READY)
                .filter(|c| c.status == "True")
                .map(|c| c.last_transition_time.0);
            match ready_since {
                Some(since) if since >= asked.since => Step::Done(format!("restarted; running {version}{url}")),
                _ => failed.unwrap_or(Step::Waiting(now)),
            }
        }
        Action::Stop if status.reason.as_deref() == Some(reasons::STOPPED_BY_USER) => {
            Step::Done("stopped (its pod is gone; the runtime and its Service stay)".into())
        }
        Action::Stop => Step::Waiting(now),
        Action::CheckVersion => match versions {
            Some(c) if c.status == "Unknown" && c.reason != reasons::NOT_VERSIONED => {
                Step::Failed(format!("the registry did not answer: {}: {}", c.reason, c.message))
            }
            Some(c) => Step::Done(c.message.clone()),
            None => Step::Waiting(now),
        },
        Action::Update if running && status.latest_version.as_deref() == Some(version.as_str()) => {
            match asked.version_before.as_deref() {
                Some(before) if before != version => Step::Done(format!("updated from {before} to {version}{url}")),
                _ => Step::Done(format!("already at the newest version, {version}")),
            }
        }
        _ => failed.unwrap_or(Step::Waiting(now)),
    }
}

/// Where a compute instance action stands.
pub fn judge_instance(action: Action, asked: &Asked, instance: &ComputeInstance) -> Step {
    let Some(status) = instance.status.as_ref() else {
        return Step::Waiting("waiting for the operator to report a status".into());
    };
    let now = format!(
        "{:?} ({}): {}",
        status.state,
        status.reason.as_deref().unwrap_or("-"),
        status.message.as_deref().unwrap_or("")
    );
    let handled = status.handled_actions.clone().unwrap_or_default();
    let value = Some(asked.value.as_str());
    let reason = status.reason.clone().unwrap_or_default();
    match (action, status.state) {
        (_, InstanceState::Failed) => Step::Failed(format!("{reason}: {}", status.message.clone().unwrap_or_default())),
        (Action::Start, InstanceState::Running) if handled.start.as_deref() == value => {
            Step::Done(format!("running with runtimes [{}]", status.runtimes.join(", ")))
        }
        (Action::Stop, InstanceState::Stopped) if handled.stop.as_deref() == value => {
            Step::Done("stopped (its pod is gone; its runtimes wait for it)".into())
        }
        _ => Step::Waiting(now),
    }
}

/// Sets the annotation, then follows the object until the judge says done or failed.
pub async fn run(client: &Client, cli: &Cli, namespace: &str, target: &Target, action: Action) -> Result<(), CliError> {
    match target.kind {
        Kind::Runtime => {
            let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
            let runtime = get(&api, target, namespace).await?;
            precheck_runtime(action, &runtime).map_err(CliError::Failed)?;
            let version = runtime.status.as_ref().and_then(|s| s.version.clone());
            press(&api, cli, target, action, version, judge_runtime).await
        }
        Kind::Instance => {
            let api: Api<ComputeInstance> = Api::namespaced(client.clone(), namespace);
            let instance = get(&api, target, namespace).await?;
            precheck_instance(action, &instance).map_err(CliError::Failed)?;
            press(&api, cli, target, action, None, judge_instance).await
        }
    }
}

async fn get<K>(api: &Api<K>, target: &Target, namespace: &str) -> Result<K, CliError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(&target.name)
        .await?
        .ok_or_else(|| CliError::Failed(format!("{target} not found in namespace {namespace}")))
}

async fn press<K>(
    api: &Api<K>,
    cli: &Cli,
    target: &Target,
    action: Action,
    version_before: Option<String>,
    judge: fn(Action, &Asked, &K) -> Step,
) -> Result<(), CliError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
{
    let now = Timestamp::now();
    let value = now.to_string();
    let asked = Asked {
        value: value.clone(),
        since: Timestamp::from_second(now.as_second()).unwrap_or(now),
        version_before,
    };
    let patch = serde_json::json!({"metadata": {"annotations": {action.annotation(): value}}});
    api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    eprintln!("{target}: set {}={value}", action.annotation());
    if cli.no_wait {
        return Ok(());
    }
    let mut progress = Progress::new();
    let mut updates = std::pin::pin!(watch_object(api.clone(), &target.name));
    let mut last_step = Step::Waiting("waiting for the operator".into());
    let mut last_object = None;
    let outcome = tokio::time::timeout(cli.timeout, async {
        while let Some(event) = updates.next().await {
            let object = match event {
                Ok(Some(object)) => object,
                Ok(None) => return Err(CliError::Failed(format!("{target} was deleted"))),
                // The watcher retries by itself; show the error meanwhile.
                Err(error) => {
                    progress.update(&format!("watch: {error}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            last_step = judge(action, &asked, &object);
            last_object = Some(object);
            match &last_step {
                Step::Waiting(text) => progress.update(text),
                Step::Done(_) | Step::Failed(_) => return Ok(()),
            }
        }
        Err(CliError::Failed("the watch ended".into()))
    })
    .await;
    progress.finish();
    match outcome {
        Err(_elapsed) => {
            return Err(CliError::Failed(format!(
                "{target}: no result within {}; last seen: {}",
                crate::idle::format_duration(cli.timeout),
                last_step.text()
            )));
        }
        Ok(Err(error)) => return Err(error),
        Ok(Ok(())) => {}
    }
    match last_step {
        Step::Done(text) => {
            match (cli.output, &last_object) {
                (Some(output), Some(object)) => print_as(output, object)?,
                _ => println!("{target}: {text}"),
            }
            Ok(())
        }
        other => Err(CliError::Failed(format!("{target}: {}", other.text()))),
    }
}
