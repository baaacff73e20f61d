//! `kubectl promptflow status`: one table of runtimes and one of compute instances.

use jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::table::{age, cell, render, until};
use super::{Cli, CliError, print_as};
use crate::api::{ComputeInstance, InstanceState, PromptFlowRuntime, RuntimePhase};
use crate::idle::{IdleSettings, add, last_known_activity, parse_duration, policy};

/// When an idle runtime stops at the earliest: its last known activity plus its idle timeout
/// (activity the proxy has seen since the operator last asked moves it later).
pub fn runtime_deadline(runtime: &PromptFlowRuntime) -> Option<Timestamp> {
    let running = runtime.status.as_ref()?.phase == RuntimePhase::Running;
    let policy = policy(runtime, &IdleSettings::default()).filter(|_| running)?;
    Some(add(
        last_known_activity(runtime, Timestamp::UNIX_EPOCH, None, Timestamp::now()),
        policy.timeout,
    ))
}

/// When an idle instance stops at the earliest (the operator's minimum may raise the timeout).
pub fn instance_deadline(instance: &ComputeInstance) -> Option<Timestamp> {
    let status = instance.status.as_ref().filter(|s| s.state == InstanceState::Running)?;
    let timeout = parse_duration(instance.spec.idle_time_before_shutdown.as_deref()?)?;
    Some(add(status.last_activity_time.as_ref()?.0, timeout))
}

fn created(object: &impl ResourceExt) -> Option<Timestamp> {
    object.meta().creation_timestamp.as_ref().map(|t| t.0)
}

/// The runtime table's rows.
pub fn runtime_rows(runtimes: &[PromptFlowRuntime], namespaces: bool, now: Timestamp) -> Vec<Vec<String>> {
    runtimes
        .iter()
        .map(|rt| {
            let status = rt.status.clone().unwrap_or_default();
            let mut row = vec![
                rt.name_any(),
                status.phase.as_str().to_owned(),
                cell(status.reason.as_deref()),
                cell(status.compute.as_deref()),
                cell(status.version.as_deref()),
                cell(status.latest_version.as_deref()),
                runtime_deadline(rt).map_or("-".into(), |d| until(d, now)),
                created(rt).map_or("<unknown>".into(), |t| age(t, now)),
            ];
            if namespaces {
                row.insert(0, rt.namespace().unwrap_or_default());
            }
            row
        })
        .collect()
}

/// The instance table's rows.
pub fn instance_rows(instances: &[ComputeInstance], namespaces: bool, now: Timestamp) -> Vec<Vec<String>> {
    instances
        .iter()
        .map(|ci| {
            let status = ci.status.clone().unwrap_or_default();
            let state = ci.status.as_ref().map(|s| format!("{:?}", s.state));
            let next = status
                .next_scheduled_action
                .as_ref()
                .map(|next| format!("{:?} {}", next.action, until(next.time.0, now)));
            let mut row = vec![
                ci.name_any(),
                cell(state.as_deref()),
                cell(status.reason.as_deref()),
                ci.spec.instance_type.clone(),
                cell(Some(&status.runtimes.join(","))),
                instance_deadline(ci).map_or("-".into(), |d| until(d, now)),
                next.unwrap_or_else(|| "-".into()),
                created(ci).map_or("<unknown>".into(), |t| age(t, now)),
            ];
            if namespaces {
                row.insert(0, ci.namespace().unwrap_or_default());
            }
            row
        })
        .collect()
}

const RUNTIME_HEADERS: [&str; 8] = [
    "NAME",
    "PHASE",
    "REASON",
    "COMPUTE",
    "VERSION",
    "LATEST",
    "IDLE DEADLINE",
    "AGE",
];
const INSTANCE_HEADERS: [&str; 8] = [
    "NAME",
    "STATE",
    "REASON",
    "TYPE",
    "RUNTIMES",
    "IDLE DEADLINE",
    "NEXT ACTION",
    "AGE",
];

fn headers(names: &[&'static str], namespaces: bool) -> Vec<&'static str> {
    namespaces
        .then_some("NAMESPACE")
        .into_iter()
        .chain(names.iter().copied())
        .collect()
}

/// Lists and prints.
pub async fn run(client: &Client, cli: &Cli, namespace: &str) -> Result<(), CliError> {
    let (runtimes, instances): (Api<PromptFlowRuntime>, Api<ComputeInstance>) = if cli.all_namespaces {
        (Api::all(client.clone()), Api::all(client.clone()))
    } else {
        (
            Api::namespaced(client.clone(), namespace),
            Api::namespaced(client.clone(), namespace),
        )
    };
    let mut runtimes = runtimes.list(&ListParams::default()).await?.items;
    let mut instances = instances.list(&ListParams::default()).await?.items;
    runtimes.sort_by_key(|o| (o.namespace(), o.name_any()));
    instances.sort_by_key(|o| (o.namespace(), o.name_any()));
    if let Some(output) = cli.output {
        let items: Vec<serde_json::Value> = runtimes
            .iter()
            .map(|o| serde_json::to_value(o).unwrap_or_default())
            .chain(instances.iter().map(|o| serde_json::to_value(o).unwrap_or_default()))
            .collect();
        return print_as(output, &json!({"apiVersion": "v1", "kind": "List", "items": items}));
    }
    if runtimes.is_empty() && instances.is_empty() {
        let place = if cli.all_namespaces {
            "any namespace".to_owned()
        } else {
            format!("namespace {namespace}")
        };
        eprintln!("No prompt flow runtimes or compute instances in {place}.");
        return Ok(());
    }
    let now = Timestamp::now();
    let all = cli.all_namespaces;
    if !runtimes.is_empty() {
        println!("RUNTIMES");
        print!(
            "{}",
            render(&headers(&RUNTIME_HEADERS, all), &runtime_rows(&runtimes, all, now))
        );
    }
    if !instances.is_empty() {
        if !runtimes.is_empty() {
            println!();
        }
        println!("COMPUTE INSTANCES");
        print!(
            "{}",
            render(&headers(&INSTANCE_HEADERS, all), &instance_rows(&instances, all, now))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_runtime_shows_its_version_latest_and_idle_deadline() {
        let runtime: PromptFlowRuntime = serde_json::from_value(json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "PromptFlowRuntime",
            "metadata": {"name": "chat", "namespace": "team-a", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"idle": {"timeout": "30m"}},
            "status": {"phase": "Running", "reason": "PodReady", "compute": "Serverless",
                "version": "20240222.v4", "latestVersion": "20240501.v2",
                "conditions": [{"type": "Ready", "status": "True", "reason": "PodReady", "message": "",
                    "lastTransitionTime": "2026-01-01T00:10:00Z"}]}
        }))
        .unwrap();
        let now: Timestamp = "2026-01-01T00:20:00Z".parse().unwrap();
        let rows = runtime_rows(&[runtime], true, now);
        assert_eq!(
            rows[0],
            [
                "team-a",
                "chat",
                "Running",
                "PodReady",
                "Serverless",
                "20240222.v4",
                "20240501.v2",
                "in 20m",
                "20m"
            ]
        );
    }

    #[test]
    fn a_stopped_instance_has_no_idle_deadline_and_shows_its_next_action() {
        let instance: ComputeInstance = serde_json::from_value(json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
            "metadata": {"name": "gpu", "namespace": "team-a"},
            "spec": {"instanceType": "Standard_DS3_v2", "idleTimeBeforeShutdown": "1h"},
            "status": {"state": "Stopped", "reason": "ScheduledStop", "runtimes": ["chat", "qa"],
                "nextScheduledAction": {"action": "Start", "time": "2026-01-01T08:00:00Z"}}
        }))
        .unwrap();
        let now: Timestamp = "2026-01-01T07:00:00Z".parse().unwrap();
        let rows = instance_rows(&[instance], false, now);
        assert_eq!(
            rows[0],
            [
                "gpu",
                "Stopped",
                "ScheduledStop",
                "Standard_DS3_v2",
                "chat,qa",
                "-",
                "Start in 60m",
                "<unknown>"
            ]
        );
    }
}
