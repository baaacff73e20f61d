//! `kubectl promptflow describe`: what the status says, its conditions and the object's recent
//! events, on one screen.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};

use super::status::{instance_deadline, runtime_deadline};
use super::table::{age, cell, render, until};
use super::{Cli, CliError, Kind, Target, print_as};
use crate::api::{ComputeInstance, PromptFlowRuntime};

/// How many of the newest events are shown.
const EVENTS: usize = 10;

/// `Field:  value` lines, the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    pairs
        .iter()
        .map(|(key, value)| format!("{:<width$}{value}\n", format!("{key}:")))
        .collect()
}

/// The conditions as a table.
pub fn conditions_table(conditions: &[Condition], now: Timestamp) -> String {
    let rows: Vec<Vec<String>> = conditions
        .iter()
        .map(|c| {
            vec![
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                age(c.last_transition_time.0, now),
                c.message.clone(),
            ]
        })
        .collect();
    render(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows)
}

fn event_time(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or(event.last_timestamp.as_ref().map(|t| t.0))
        .or(event.event_time.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The newest events, oldest first, as a table.
pub fn events_table(mut events: Vec<Event>, now: Timestamp) -> String {
    events.sort_by_key(event_time);
    let skip = events.len().saturating_sub(EVENTS);
    let rows: Vec<Vec<String>> = events
        .iter()
        .skip(skip)
        .map(|e| {
            let count = e.series.as_ref().and_then(|s| s.count).or(e.count).unwrap_or(1);
            let seen = event_time(e).map_or("<unknown>".into(), |t| age(t, now));
            vec![
                if count > 1 { format!("{seen} (x{count})") } else { seen },
                cell(e.type_.as_deref()),
                cell(e.reason.as_deref()),
                cell(e.message.as_deref()),
            ]
        })
        .collect();
    render(&["LAST SEEN", "TYPE", "REASON", "MESSAGE"], &rows)
}

/// The object's events; a user who may read the object but not list events still gets the rest.
async fn events_of(client: &Client, namespace: &str, object: &impl Resource) -> Result<Vec<Event>, String> {
    let uid = object.meta().uid.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await
        .map(|list| list.items)
        .map_err(|error| error.to_string())
}

fn runtime_fields(rt: &PromptFlowRuntime, now: Timestamp) -> String {
    let status = rt.status.clone().unwrap_or_default();
    let phase = status.phase.as_str();
    let latest = match (&status.latest_version, &status.version) {
        (Some(latest), Some(version)) if latest != version => {
            format!("{latest} (update: kubectl promptflow update {})", rt.name_any())
        }
        (Some(latest), _) => latest.clone(),
        (None, _) => "<unknown>".into(),
    };
    fields(&[
        ("Name", rt.name_any()),
        ("Namespace", rt.namespace().unwrap_or_default()),
        ("Kind", "PromptFlowRuntime".into()),
        (
            "Phase",
            format!("{phase} ({})", status.reason.as_deref().unwrap_or("-")),
        ),
        ("Message", cell(status.message.as_deref())),
        (
            "Compute",
            format!(
                "{} {}",
                cell(status.compute.as_deref()),
                status
                    .instance_type
                    .as_deref()
                    .map(|t| format!("({t})"))
                    .unwrap_or_default()
            ),
        ),
        ("Image", cell(status.image.as_deref())),
        ("Version", cell(status.version.as_deref())),
        ("Latest", latest),
        ("URL", cell(status.url.as_deref())),
        (
            "Last activity",
            status
                .last_activity_time
                .as_ref()
                .map_or("<none>".into(), |t| format!("{} ago", age(t.0, now))),
        ),
        (
            "Idle deadline",
            runtime_deadline(rt).map_or("-".into(), |d| format!("{d} ({})", until(d, now))),
        ),
        (
            "Generation",
            format!(
                "{} (observed {})",
                rt.metadata.generation.unwrap_or(0),
                status.observed_generation.map_or("-".into(), |g| g.to_string())
            ),
        ),
    ])
}

fn instance_fields(ci: &ComputeInstance, now: Timestamp) -> String {
    let status = ci.status.clone().unwrap_or_default();
    fields(&[
        ("Name", ci.name_any()),
        ("Namespace", ci.namespace().unwrap_or_default()),
        ("Kind", "ComputeInstance".into()),
        (
            "State",
            format!("{:?} ({})", status.state, status.reason.as_deref().unwrap_or("-")),
        ),
        ("Message", cell(status.message.as_deref())),
        ("Instance type", ci.spec.instance_type.clone()),
        ("Runtimes", cell(Some(&status.runtimes.join(", ")))),
        (
            "Idle deadline",
            instance_deadline(ci).map_or("-".into(), |d| format!("{d} ({})", until(d, now))),
        ),
        (
            "Next action",
            status.next_scheduled_action.as_ref().map_or("-".into(), |n| {
                format!("{:?} at {} ({})", n.action, n.time.0, until(n.time.0, now))
            }),
        ),
        (
            "Generation",
            format!(
                "{} (observed {})",
                ci.metadata.generation.unwrap_or(0),
                status.observed_generation.map_or("-".into(), |g| g.to_string())
            ),
        ),
    ])
}

/// Reads and prints.
pub async fn run(client: &Client, cli: &Cli, namespace: &str, target: &Target) -> Result<(), CliError> {
    let missing = || CliError::Failed(format!("{target} not found in namespace {namespace}"));
    let now = Timestamp::now();
    let (head, conditions, events, object) = match target.kind {
        Kind::Runtime => {
            let api: Api<PromptFlowRuntime> = Api::namespaced(client.clone(), namespace);
            let rt = api.get_opt(&target.name).await?.ok_or_else(missing)?;
            let events = events_of(client, namespace, &rt).await;
            let conditions = rt.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
            (runtime_fields(&rt, now), conditions, events, serde_json::to_value(&rt))
        }
        Kind::Instance => {
            let api: Api<ComputeInstance> = Api::namespaced(client.clone(), namespace);
            let ci = api.get_opt(&target.name).await?.ok_or_else(missing)?;
            let events = events_of(client, namespace, &ci).await;
            let conditions = ci.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
            (instance_fields(&ci, now), conditions, events, serde_json::to_value(&ci))
        }
    };
    if let Some(output) = cli.output {
        return print_as(output, &object.map_err(|e| CliError::Failed(e.to_string()))?);
    }
    print!("{head}\nConditions:\n{}", indent(&conditions_table(&conditions, now)));
    match events {
        Ok(events) if events.is_empty() => println!("\nEvents: <none>"),
        Ok(events) => print!("\nEvents:\n{}", indent(&events_table(events, now))),
        Err(error) => println!("\nEvents: <cannot be listed: {error}>"),
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}
