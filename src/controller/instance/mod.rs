//! The ComputeInstance reconciler: one pod per running instance, carrying its primary container
//! and every attached runtime's containers. The pipeline: validate (catalog, schedules) →
//! decide whether it runs ([`crate::instance::decide`]: spec, schedules, action annotations,
//! idleness) → attach (resolve the runtimes that asked for it) → apply (create the pod, or
//! restart it once per batch of attach and detach changes) → report (status, one event per
//! transition). Requeues at the next schedule trigger or idle deadline, never polls.

mod attach;
mod idle;
mod memory;
mod report;
mod restart;
mod storage;

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

pub use self::memory::InstanceMemory;
use self::report::InstanceReport;
use super::context::Context;
use super::index::Dependency;
use super::runtime::apply;
use super::runtime::observe::read_secret;
use super::runtime::plan::{DesiredPod, PodFacts};
use super::runtime::pod_state::{self, PodState};
use super::runtime::status::ConditionState;
use crate::api::conditions::{self, reasons};
use crate::api::{ComputeInstance, HandledActions, InstanceState, RuntimePhase, ScheduledAction};
use crate::build::instance::{self as pod_builder, InstancePodInputs, ResourceLayout};
use crate::build::pod::live_inputs_hash;
use crate::error::{Error, Result};
use crate::identity;
use crate::instance::{self as decisions, Run, RunInputs, schedule};

/// How long a failed instance reconcile waits before it is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Reconciles one compute instance from its full state.
pub async fn reconcile(instance: Arc<ComputeInstance>, ctx: Arc<Context>) -> Result<Action> {
    let key = ObjectRef::from_obj(&*instance);
    let result = reconcile_instance(instance.clone(), ctx.clone()).await;
    // Deleted while this reconcile ran: what it recorded after the deletion was forgotten is
    // forgotten again, and nothing is retried.
    if ctx.instances.get(&key).is_none() {
        forget(&ctx, &instance);
        return Ok(Action::await_change());
    }
    result
}

async fn reconcile_instance(instance: Arc<ComputeInstance>, ctx: Arc<Context>) -> Result<Action> {
    ctx.caches_filled().await?;
    let own_view;
    let instance = match ctx.instance_memory.baseline(&instance) {
        Some(baseline) if instance.status.as_ref() != Some(&baseline) => {
            own_view = ComputeInstance {
                status: Some(baseline),
                ..(*instance).clone()
            };
            &own_view
        }
        _ => &*instance,
    };
    if instance.meta().deletion_timestamp.is_some() {
        // The garbage collector deletes the pod; runtimes see the instance going and let go.
        return Ok(Action::await_change());
    }
    let namespace = instance.namespace().ok_or(Error::NotNamespaced)?;
    let name = instance.name_any();
    let key = ObjectRef::from_obj(instance);
    let now = Timestamp::now();
    let previous = instance.status.clone().unwrap_or_default();
    // The disk's last known state, while the instance has one and this reconcile does not look.
    let kept_storage = previous.storage.clone().filter(|_| instance.spec.storage.is_some());
    let live = ctx.own_pod(&pod_builder::pod_name(&name), &namespace, instance);
    let live_layout = live.as_deref().and_then(pod_builder::layout_of);

    // Schedules: what fell due since the announced trigger, and what comes next.
    let (compiled, problems) = schedule::compile(&instance.spec.schedules);
    let fired = previous
        .next_scheduled_action
        .as_ref()
        .filter(|announced| announced.time.0 <= now)
        .and_then(|announced| {
            let from = announced.time.0 - jiff::SignedDuration::from_secs(1);
            schedule::latest_in(&compiled, from, now)
        });
    let next = schedule::next(&compiled, now).map(|(action, at)| ScheduledAction { action, time: Time(at) });
    let accepted = match problems.first() {
        None => ConditionState::new(conditions::ACCEPTED, true, reasons::ACCEPTED, "the spec is accepted"),
        Some(_) => ConditionState::new(
            conditions::ACCEPTED,
            false,
            reasons::INVALID_SCHEDULE,
            format!(
                "{}; the other schedules apply",
                problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ),
        ),
    };
    let mut conditions = vec![accepted];
    let mut wake_at = next.as_ref().map(|n| crate::idle::until(now, n.time.0));

    let Some(size) = ctx.catalog.get(&instance.spec.instance_type) else {
        let message = format!(
            "instance type {} is not in the catalog; set spec.instanceType to one of: {}",
            instance.spec.instance_type,
            ctx.catalog.names()
        );
        if let Some(live) = &live {
            apply::delete_pod(&ctx, live, instance.uid().as_deref()).await?;
        }
        let failed = InstanceReport {
            state: InstanceState::Failed,
            reason: reasons::UNKNOWN_INSTANCE_TYPE.to_owned(),
            message,
            runtimes: vec![],
            next,
            conditions,
            last_activity: None,
            handled: HandledActions::default(),
            layout: None,
            storage: kept_storage.clone(),
        };
        report::write(instance, &ctx, &failed).await?;
        return Ok(Action::await_change());
    };

    // The disk, in every state: it outlives the pod, and its owner follows the reclaim policy
    // whether the instance runs or not.
    let disk = match &instance.spec.storage {
        Some(asked) => Some(storage::ensure(&ctx, instance, asked).await?),
        None => None,
    };
    if let Some(disk) = &disk {
        conditions.push(disk.condition.clone());
    }
    let kept_storage = disk.as_ref().map(|d| d.status.clone());

    // Idle: asked only of a Running instance at its deadline.
    let ready_pod = live
        .as_deref()
        .filter(|pod| matches!(pod_state::classify(pod), PodState::Ready { .. }));
    let mut last_activity = None;
    let mut idle_due = false;
    if let (Some(pod), InstanceState::Running) = (ready_pod, previous.state) {
        let carried: Vec<_> = pod_builder::attached(pod)
            .into_iter()
            .filter_map(|rt| ctx.runtime(rt, &namespace))
            .collect();
        let carried: Vec<_> = carried.iter().collect();
        let look = idle::look(instance, &ctx, pod, &carried, now).await;
        conditions.extend(look.condition);
        idle_due = look.due;
        last_activity = look.last_activity;
        wake_at = earliest(wake_at, look.requeue);
    }

    let run = decisions::decide(instance, &RunInputs { fired, idle_due });
    let mut handled = HandledActions::default();
    let mut start_cause = None;
    let stopping = match run {
        Run::No { reason, message, stop } => Some((reason, message, stop)),
        Run::Yes { reason, start } => {
            handled.start = start;
            start_cause = reason;
            if let Some(reason) = reason {
                info!(%name, %namespace, %reason, "starting compute instance");
            }
            None
        }
    };
    if let Some((reason, message, stop)) = stopping {
        handled.stop = stop;
        ctx.instance_memory.settled(&key);
        let state = match &live {
            Some(live) => {
                apply::delete_pod(&ctx, live, instance.uid().as_deref()).await?;
                InstanceState::Stopping
            }
            None => InstanceState::Stopped,
        };
        if state == InstanceState::Stopping && previous.state != InstanceState::Stopping {
            info!(%name, %namespace, %reason, "stopping compute instance");
        }
        let stopped = InstanceReport {
            state,
            reason,
            message,
            runtimes: vec![],
            next,
            conditions,
            last_activity,
            handled,
            layout: None,
            storage: kept_storage.clone(),
        };
        report::write(instance, &ctx, &stopped).await?;
        return Ok(wake_at.map_or_else(Action::await_change, Action::requeue));
    }

    // What every report from here on carries; each exit says what state the instance is in and
    // why.
    let frame = InstanceReport {
        state: previous.state,
        reason: String::new(),
        message: String::new(),
        runtimes: live.as_deref().map(carried_names).unwrap_or_default(),
        next,
        conditions,
        last_activity,
        handled,
        layout: live_layout,
        storage: kept_storage,
    };

    // Runs: resolve the identity and the runtimes, then create, keep or restart the pod.
    let mut dependencies = vec![
        Dependency::ServiceAccount(namespace.clone(), instance.spec.service_account_name.clone()),
        Dependency::Quotas(namespace.clone()),
    ];
    ctx.instance_index.record(key.clone(), dependencies.clone());
    let account = ctx
        .accounts
        .get(&ObjectRef::new(&instance.spec.service_account_name).within(&namespace));
    let mut secrets = std::collections::BTreeMap::new();
    for secret in account.as_deref().map(identity::pull_secret_names).unwrap_or_default() {
        let found = read_secret(&ctx.client, &namespace, &secret).await?;
        secrets.insert(secret, found);
    }
    let image = ctx.instance_settings.image.clone();
    let registry = identity::registry_host(&image);
    let pull = match identity::resolve(
        &instance.spec.service_account_name,
        account.as_deref(),
        &secrets,
        &registry,
    ) {
        Ok(pull) => pull,
        Err(problem) => {
            let message = match &problem {
                identity::IdentityProblem::ServiceAccountNotFound(account) => format!(
                    "service account {account} does not exist in the instance's namespace; create it or set spec.serviceAccountName"
                ),
                other => other.to_string(),
            };
            let waiting = frame.holding(previous.state, live.as_deref(), problem.reason().to_owned(), message);
            report::write(instance, &ctx, &waiting).await?;
            return Ok(Action::requeue(earliest(wake_at, Some(RETRY)).unwrap_or(RETRY)));
        }
    };
    let attach::Attach { resolved, unresolved } = attach::runtimes(instance, &ctx, &mut dependencies).await?;
    ctx.instance_index.record(key.clone(), dependencies);
    let attached = attach::as_attached(&resolved, live.as_deref());
    // A claim of the disk's name that is not the instance's holds the pod (a pod without the
    // disk the user asked for would lose what they write).
    if let Some(disk) = &disk {
        wake_at = earliest(wake_at, disk.requeue);
    }
    if let Some(disk) = disk.as_ref().filter(|d| d.claim.is_none()) {
        let (reason, message) = disk.waiting.clone().unwrap_or_default();
        let held = frame.holding(previous.state, live.as_deref(), reason, message);
        report::write(instance, &ctx, &held).await?;
        return Ok(wake_at.map_or_else(Action::await_change, Action::requeue));
    }
    let inputs = |layout| InstancePodInputs {
        instance,
        size,
        identity: &pull,
        image: &image,
        runtimes: &attached,
        template: &ctx.template,
        layout,
        home_claim: disk.as_ref().and_then(|d| d.claim.as_deref()),
    };
    if ctx.instance_settings.layout.unverified() {
        restart::check_layout(
            &ctx,
            &namespace,
            &pod_builder::instance_pod(&inputs(ResourceLayout::Pod)),
        )
        .await;
    }
    let pod = pod_builder::instance_pod(&inputs(ctx.instance_settings.layout.get()));
    let changes = live
        .as_deref()
        .filter(|live| live.metadata.deletion_timestamp.is_none())
        .filter(|live| live_inputs_hash(live) != live_inputs_hash(&pod))
        .map(|live| restart::describe_changes(live, &pod));
    let remade = restart::remade(&ctx, live.as_deref(), &namespace);
    let remade_note =
        (!remade.is_empty()).then(|| format!("runtime {} was made again under its name", remade.join(", ")));
    let changes = changes.or_else(|| remade_note.as_ref().map(|note| format!("take the new one: {note}")));
    if changes.is_none() {
        // Nothing to restart for (any more): a later change starts a fresh batch window.
        ctx.instance_memory.settled(&key);
    }
    // A runtime the pod carries whose flow, account or pull secret stopped resolving keeps its
    // containers as they are: restarting would take it off and cost every runtime its work.
    let holding: Vec<&str> = live
        .as_deref()
        .filter(|live| live.metadata.deletion_timestamp.is_none())
        .map(|live| {
            pod_builder::attached(live)
                .into_iter()
                .filter(|carried| unresolved.iter().any(|u| u == carried))
                .collect()
        })
        .unwrap_or_default();
    if changes.is_some()
        && !holding.is_empty()
        && let Some(live) = live.as_deref()
    {
        ctx.instance_memory.settled(&key);
        let message = format!(
            "pod {} is kept as it is: runtime {} cannot be resolved now (its status says why), and a restart would take it off; fix it or detach it, and pending changes follow",
            live.name_any(),
            holding.join(", ")
        );
        let held = frame.holding(
            previous.state,
            Some(live),
            reasons::RUNTIME_UNRESOLVED.to_owned(),
            message,
        );
        report::write(instance, &ctx, &held).await?;
        return Ok(wake_at.map_or_else(Action::await_change, Action::requeue));
    }
    if let Some(changes) = &changes {
        // A restart waits a moment for more attach and detach changes to join it.
        if let Some(wait) = ctx.instance_memory.batch_wait(&key, ctx.instance_settings.batch) {
            let keep = InstanceReport {
                reason: previous.reason.clone().unwrap_or_else(|| reasons::POD_READY.to_owned()),
                message: previous.message.clone().unwrap_or_default(),
                ..frame
            };
            report::write(instance, &ctx, &keep).await?;
            info!(%name, %namespace, %changes, wait_ms = wait.as_millis() as u64, "restart batched");
            return Ok(Action::requeue(wait));
        }
    }
    let desired = DesiredPod {
        pod,
        facts: PodFacts {
            image: image.clone(),
            version: String::new(),
            size: size.name.clone(),
        },
    };
    let outcome = apply::apply_pod(&ctx, &desired, live.as_deref(), remade_note.as_deref(), false).await?;
    if changes.is_some() {
        ctx.instance_memory.settled(&key);
    }
    let verdict = outcome.verdict;
    let pod_ready = verdict.phase == RuntimePhase::Running;
    let conflict = verdict.reason == reasons::POD_CONFLICT;
    let refused = outcome.refused.is_some();
    // The live pod's layout while it stays; the new one's when a pod is being made.
    let keeps_live = refused || (changes.is_none() && live.is_some());
    let (state, reason, message) = if verdict.reason == reasons::POD_REJECTED || conflict {
        (InstanceState::Failed, verdict.reason, verdict.message)
    } else if let Some(why) = outcome.refused {
        // The restart would end in a pod the API server refuses: the instance keeps its pod and
        // its runtimes their work.
        let state = decisions::running_state(Some(previous.state), live.as_ref().map(|_| pod_ready));
        (state, reasons::POD_REJECTED.to_owned(), why)
    } else if let Some(changes) = changes {
        (
            InstanceState::Restarting,
            reasons::RUNTIMES_CHANGED.to_owned(),
            format!("restarting to apply runtime changes: {changes}"),
        )
    } else {
        let state = decisions::running_state(Some(previous.state), live.as_ref().map(|_| pod_ready));
        let cause = [reasons::RUNTIMES_CHANGED, reasons::SCHEDULED_START, reasons::STARTING];
        let carried_cause = previous
            .reason
            .clone()
            .filter(|r| state == previous.state && state != InstanceState::Running && cause.contains(&r.as_str()))
            .filter(|_| !reasons::PROBLEMS.contains(&verdict.reason.as_str()));
        match (state, start_cause, carried_cause) {
            (InstanceState::Running, _, _) => {
                let carried = live.as_deref().map(carried_names).unwrap_or_default();
                let runtimes = if carried.is_empty() {
                    "no runtimes attached".to_owned()
                } else {
                    format!("runtimes {}", carried.join(", "))
                };
                let message = format!("pod {} is Ready with {runtimes}", pod_builder::pod_name(&name));
                (state, reasons::POD_READY.to_owned(), message)
            }
            (_, Some(cause), _) => (state, cause.to_owned(), verdict.message),
            (_, None, Some(carried)) => (state, carried, previous.message.clone().unwrap_or(verdict.message)),
            _ => (state, verdict.reason, verdict.message),
        }
    };
    // A pod waiting for its disk says so, rather than only that it is not scheduled.
    let (reason, message) = match disk.as_ref().and_then(|d| d.waiting.clone()) {
        Some(waiting) if state != InstanceState::Running && !reasons::PROBLEMS.contains(&reason.as_str()) => waiting,
        Some(waiting) if reason == reasons::POD_UNSCHEDULABLE => waiting,
        _ => (reason, message),
    };
    let runtimes = live
        .as_deref()
        .filter(|_| state != InstanceState::Restarting || refused)
        .map(carried_names)
        .unwrap_or_default();
    let layout = if keeps_live {
        live_layout
    } else {
        Some(ctx.instance_settings.layout.get()).filter(|_| state != InstanceState::Stopped)
    };
    let running = InstanceReport {
        state,
        reason,
        message,
        runtimes,
        layout,
        ..frame
    };
    report::write(instance, &ctx, &running).await?;
    info!(%name, %namespace, state = ?state, "reconciled compute instance");
    let retry = if conflict {
        Some(apply::CONFLICT_RECHECK)
    } else {
        outcome.requeue
    };
    Ok(earliest(wake_at, retry).map_or_else(Action::await_change, Action::requeue))
}

/// The runtimes a live pod carries.
fn carried_names(pod: &Pod) -> Vec<String> {
    pod_builder::attached(pod).into_iter().map(str::to_owned).collect()
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Failed reconciles are retried after a fixed delay.
pub fn error_policy(instance: Arc<ComputeInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    warn!(name = %instance.name_any(), namespace = ?instance.namespace(), error = %error, retry_in = ?RETRY, "compute instance reconcile failed");
    Action::requeue(RETRY)
}

/// Drops everything kept for an instance that was deleted.
/// Drops what is kept for instances that no longer exist (after a watch re-list, which reports
/// no deletions for what went away while the watch was down).
pub fn forget_missing(ctx: &Context, exists: impl Fn(&ObjectRef<ComputeInstance>) -> bool) {
    ctx.instance_index.retain(&exists);
    ctx.instance_memory.retain(&exists);
}

/// Drops everything kept for an instance that was deleted.
pub fn forget(ctx: &Context, instance: &ComputeInstance) {
    let key = ObjectRef::from_obj(instance);
    ctx.instance_index.forget(&key);
    ctx.instance_memory.forget(&key);
    let pod =
        ObjectRef::new(&pod_builder::pod_name(&instance.name_any())).within(&instance.namespace().unwrap_or_default());
    ctx.own_writes.forget_pod(&pod);
}
