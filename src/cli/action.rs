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

/// What was asked, and what the object said before: its `Ready` condition's last transition (a
/// server time, so no client clock is compared with the cluster's) and its version.
#[derive(Clone, Debug, Default)]
pub struct Asked {
    /// The annotation's new value.
    pub value: String,
    /// `Ready`'s `lastTransitionTime` before the press.
    pub ready_before: Option<Timestamp>,
    /// `status.version` before.
    pub version_before: Option<String>,
    /// `Ready` was seen not True after the operator took the value.
    pub seen_down: bool,
}

impl Asked {
    /// The press of a button on an object whose conditions and version were these.
    pub fn new(value: String, conditions: &[Condition], version_before: Option<String>) -> Self {
        Self {
            value,
            ready_before: find(conditions, conditions::READY).map(|c| c.last_transition_time.0),
            version_before,
            seen_down: false,
        }
    }

    /// `Ready` is True and turned so after the press: it was seen down since, or its transition
    /// time is later (whole seconds: a restart within the second it turned Ready shows as down).
    fn ready_again(&self, conditions: &[Condition]) -> bool {
        find(conditions, conditions::READY)
            .filter(|c| c.status == "True")
            .is_some_and(|c| self.seen_down || self.ready_before.is_none_or(|before| c.last_transition_time.0 > before))
    }
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Refuses what the operator would not do, before anything is changed.
pub fn precheck_runtime(action: Action, runtime: &PromptFlowRuntime) -> Result<(), String> {
    let name = runtime.name_any();
    let status = runtime.status.clone().unwrap_or_default();
    let reason = status.reason.as_deref().unwrap_or_default();
    let needs_running = matches!(action, Action::Restart | Action::CheckVersion | Action::Update);
    if needs_running && [reasons::STOPPED_IDLE, reasons::STOPPED_BY_USER].contains(&reason) {
        return Err(format!(
            "runtime {name} is stopped ({reason}); start it first: kubectl promptflow start {name}"
        ));
    }
    let stalled = find(&status.conditions, conditions::STALLED).filter(|c| c.status == "True");
    if let Some(stalled) = stalled.filter(|_| needs_running) {
        return Err(format!(
            "runtime {name} cannot run until this is fixed: {}: {}",
            stalled.reason, stalled.message
        ));
    }
    if let Some(instance) = &runtime.spec.compute.instance
        && matches!(action, Action::Start | Action::Stop | Action::Restart)
    {
        return Err(format!(
            "runtime {name} runs on compute instance {0}, whose lifecycle it shares: use `kubectl promptflow {1} pfci/{0}`",
            instance.name,
            if action == Action::Stop { "stop" } else { "start" }
        ));
    }
    // An image from the flow's `environment.image` is the flow's to change, not the registry's.
    let repository = &runtime.spec.image.repository;
    let from_flow = status.image.as_deref().is_some_and(|image| {
        image
            .strip_prefix(repository.as_str())
            .is_none_or(|rest| !rest.starts_with(':') && !rest.starts_with('@'))
    });
    if action == Action::Update && from_flow {
        return Err(format!(
            "runtime {name} runs {}, the image its flow's environment.image names (flow.dag.yaml): change it there",
            status.image.as_deref().unwrap_or_default()
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
        Action::Start
            if instance
                .status
                .as_ref()
                .is_some_and(|s| s.state == InstanceState::Failed) =>
        {
            let status = instance.status.clone().unwrap_or_default();
            Err(format!(
                "compute instance {name} failed ({}: {}); fix that first",
                status.reason.unwrap_or_default(),
                status.message.unwrap_or_default()
            ))
        }
        Action::Start | Action::Stop => Ok(()),
        _ => Err(
            "compute instances have start and stop only; their runtimes restart, check versions and update (pfrt/NAME)"
                .into(),
        ),
    }
}

/// Where a runtime action stands.
pub fn judge_runtime(action: Action, asked: &mut Asked, runtime: &PromptFlowRuntime) -> Step {
    let Some(status) = runtime.status.as_ref() else {
        return Step::Waiting("waiting for the operator to report a status".into());
    };
    let now = format!(
        "{} ({}): {}",
        status.phase.as_str(),
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
        let asks_registry = matches!(action, Action::CheckVersion | Action::Update);
        let registry = versions.filter(|c| asks_registry && c.status == "Unknown" && c.reason != reasons::PENDING);
        let why = registry.map_or(now, |c| format!("{}: {}", c.reason, c.message));
        return Step::Waiting(format!(
            "waiting for the operator to take {}: {why}",
            action.annotation()
        ));
    }
    let running = status.phase == RuntimePhase::Running;
    asked.seen_down |= !running;
    let version = status.version.clone().unwrap_or_default();
    let stalled = find(&status.conditions, conditions::STALLED).filter(|c| c.status == "True");
    let failed = stalled.map(|c| Step::Failed(format!("{}: {}", c.reason, c.message)));
    let url = status.url.as_deref().map(|u| format!(" at {u}")).unwrap_or_default();
    match action {
        Action::Start if running => Step::Done(format!("running {version}{url}")),
        Action::Restart if asked.ready_again(&status.conditions) => {
            Step::Done(format!("restarted; running {version}{url}"))
        }
        Action::Stop if status.reason.as_deref() == Some(reasons::STOPPED_BY_USER) => {
            Step::Done("stopped (its pod is being deleted; the runtime and its Service stay)".into())
        }
        Action::Stop => Step::Waiting(now),
        Action::CheckVersion => match versions {
            Some(c) if c.status == "Unknown" && c.reason != reasons::NOT_VERSIONED => {
                Step::Failed(format!("the registry did not answer: {}: {}", c.reason, c.message))
            }
            Some(c) => Step::Done(c.message.clone()),
            None => Step::Waiting(now),
        },
        Action::Update if status.latest_version.is_none() => Step::Failed(format!(
            "no newer version is known: {}",
            versions.map_or(now, |c| format!("{}: {}", c.reason, c.message))
        )),
        Action::Update if running && status.latest_version.as_deref() == Some(version.as_str()) => {
            match asked.version_before.as_deref() {
                Some(before) if before == version => Step::Done(format!("already at the newest version, {version}")),
                // Moved: done once the runtime turned Ready on it (on a compute instance the
                // status names the new version before the instance has restarted).
                Some(before) if asked.ready_again(&status.conditions) => {
                    Step::Done(format!("updated from {before} to {version}{url}"))
                }
                None => Step::Done(format!("running the newest version, {version}{url}")),
                Some(_) => failed.unwrap_or(Step::Waiting(now)),
            }
        }
        _ => failed.unwrap_or(Step::Waiting(now)),
    }
}

/// Where a compute instance action stands.
pub fn judge_instance(action: Action, asked: &mut Asked, instance: &ComputeInstance) -> Step {
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
    let taken = match action {
        Action::Start => handled.start.as_deref() == value,
        _ => handled.stop.as_deref() == value,
    };
    let stalled = find(&status.conditions, conditions::STALLED).filter(|c| c.status == "True");
    match (action, status.state) {
        _ if !taken => Step::Waiting(format!(
            "waiting for the operator to take {}: {now}",
            action.annotation()
        )),
        (_, _) if stalled.is_some() => {
            let stalled = stalled.expect("checked");
            Step::Failed(format!("{}: {}", stalled.reason, stalled.message))
        }
        (Action::Start, InstanceState::Running) => {
            Step::Done(format!("running with runtimes [{}]", status.runtimes.join(", ")))
        }
        (Action::Stop, InstanceState::Stopped) => {
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
            let status = runtime.status.clone().unwrap_or_default();
            press(
                &api,
                cli,
                target,
                action,
                &status.conditions,
                status.version,
                judge_runtime,
            )
            .await
        }
        Kind::Instance => {
            let api: Api<ComputeInstance> = Api::namespaced(client.clone(), namespace);
            let instance = get(&api, target, namespace).await?;
            precheck_instance(action, &instance).map_err(CliError::Failed)?;
            let conditions = instance.status.map(|s| s.conditions).unwrap_or_default();
            press(&api, cli, target, action, &conditions, None, judge_instance).await
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
    conditions: &[Condition],
    version_before: Option<String>,
    judge: fn(Action, &mut Asked, &K) -> Step,
) -> Result<(), CliError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
{
    // The time makes every press a new value; only the operator compares it, with its own record.
    let value = Timestamp::now().to_string();
    let mut asked = Asked::new(value.clone(), conditions, version_before);
    let patch = serde_json::json!({"metadata": {"annotations": {action.annotation(): value}}});
    let params = PatchParams {
        field_manager: Some("kubectl-promptflow".into()),
        ..Default::default()
    };
    api.patch(&target.name, &params, &Patch::Merge(&patch)).await?;
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
            last_step = judge(action, &mut asked, &object);
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn runtime(status: serde_json::Value) -> PromptFlowRuntime {
        serde_json::from_value(json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "chat"}, "spec": {}, "status": status
        }))
        .unwrap()
    }

    fn ready(status: &str, at: &str) -> serde_json::Value {
        json!({"type": "Ready", "status": status, "reason": "r", "message": "", "lastTransitionTime": at})
    }

    #[test]
    fn a_restart_is_done_once_ready_again_after_the_press_not_on_the_old_ready() {
        let before = runtime(json!({"phase": "Running", "conditions": [ready("True", "2026-01-01T00:00:00Z")]}));
        let mut asked = Asked::new("v".into(), &before.status.clone().unwrap().conditions, None);
        let taken = |phase: &str, ready_: serde_json::Value| {
            runtime(json!({"phase": phase, "handledActions": {"restart": "v"}, "conditions": [ready_]}))
        };
        // Taken, still showing the old Ready of the same second: not done.
        let same = taken("Running", ready("True", "2026-01-01T00:00:00Z"));
        assert!(matches!(
            judge_runtime(Action::Restart, &mut asked, &same),
            Step::Waiting(_)
        ));
        // Down, then up again within that same second: done.
        let down = taken("Not available", ready("False", "2026-01-01T00:00:00Z"));
        assert!(matches!(
            judge_runtime(Action::Restart, &mut asked, &down),
            Step::Waiting(_)
        ));
        assert!(matches!(
            judge_runtime(Action::Restart, &mut asked, &same),
            Step::Done(_)
        ));
        // A later Ready without having seen it down is done too.
        let mut fresh = Asked::new("v".into(), &before.status.unwrap().conditions, None);
        let later = taken("Running", ready("True", "2026-01-01T00:00:05Z"));
        assert!(matches!(
            judge_runtime(Action::Restart, &mut fresh, &later),
            Step::Done(_)
        ));
    }

    #[test]
    fn an_update_waits_for_the_new_version_to_be_ready_and_a_failed_check_fails() {
        let status = |version: &str, ready_at: &str| {
            json!({"phase": "Running", "version": version, "latestVersion": "2",
                   "handledActions": {"update": "v", "checkVersion": "v"},
                   "conditions": [ready("True", ready_at)]})
        };
        let mut asked = Asked::new("v".into(), &[], Some("1".into()));
        asked.ready_before = Some("2026-01-01T00:00:00Z".parse().unwrap());
        // The status names the new version while the old container still serves (an instance).
        let named = runtime(status("2", "2026-01-01T00:00:00Z"));
        assert!(matches!(
            judge_runtime(Action::Update, &mut asked, &named),
            Step::Waiting(_)
        ));
        let moved = runtime(status("2", "2026-01-01T00:01:00Z"));
        assert_eq!(
            judge_runtime(Action::Update, &mut asked, &moved),
            Step::Done("updated from 1 to 2".into())
        );
        let unreachable = runtime(json!({"phase": "Running", "handledActions": {"checkVersion": "v"},
            "conditions": [{"type": "UpdateAvailable", "status": "Unknown", "reason": "RegistryUnavailable",
                            "message": "no route", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}));
        let step = judge_runtime(Action::CheckVersion, &mut asked, &unreachable);
        assert!(matches!(step, Step::Failed(text) if text.contains("RegistryUnavailable")));
    }

    #[test]
    fn an_update_is_refused_for_an_image_the_flow_names() {
        let mut from_flow = runtime(json!({"phase": "Running", "image": "registry.example/team/custom:3"}));
        from_flow.spec.image.repository = "registry.example/runtime".into();
        assert!(
            precheck_runtime(Action::Update, &from_flow)
                .unwrap_err()
                .contains("environment.image")
        );
        let mut own = runtime(json!({"phase": "Running", "image": "registry.example/runtime:20240222.v4@sha256:ab"}));
        own.spec.image.repository = "registry.example/runtime".into();
        assert_eq!(precheck_runtime(Action::Update, &own), Ok(()));
        // A longer repository with the same prefix is another repository.
        let mut longer = runtime(json!({"phase": "Running", "image": "registry.example/runtime-gpu:1"}));
        longer.spec.image.repository = "registry.example/runtime".into();
        assert!(precheck_runtime(Action::Update, &longer).is_err());
    }

    #[test]
    fn an_instance_that_failed_before_the_press_is_not_judged_until_the_press_is_taken() {
        let instance = |handled: serde_json::Value| -> ComputeInstance {
            serde_json::from_value(json!({
                "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
                "metadata": {"name": "gpu"}, "spec": {"instanceType": "Standard_DS3_v2"},
                "status": {"state": "Failed", "reason": "PodRejected", "handledActions": handled,
                    "conditions": [{"type": "Stalled", "status": "True", "reason": "PodRejected",
                                    "message": "denied", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
            }))
            .unwrap()
        };
        let mut asked = Asked::new("v".into(), &[], None);
        let before = instance(json!({}));
        assert!(matches!(
            judge_instance(Action::Stop, &mut asked, &before),
            Step::Waiting(_)
        ));
        let after = instance(json!({"stop": "v"}));
        assert!(
            matches!(judge_instance(Action::Stop, &mut asked, &after), Step::Failed(t) if t.contains("PodRejected"))
        );
        assert!(precheck_instance(Action::Start, &after).unwrap_err().contains("failed"));
    }
}
