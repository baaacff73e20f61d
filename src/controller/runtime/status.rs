//! Status: the verdict a user reads, and conditions that keep their `lastTransitionTime` while
//! their status does not change. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::plan::PodFacts;
use crate::api::conditions::{self, reasons};
use crate::api::{HandledActions, PromptFlowRuntimeStatus, RuntimePhase};

/// The phase, reason and message the user reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `Not available` or `Running`.
    pub phase: RuntimePhase,
    /// CamelCase reason.
    pub reason: String,
    /// What is happening or what to fix.
    pub message: String,
    /// The reason asks the user to act: moving into it is a Warning event.
    pub problem: bool,
}

impl Verdict {
    /// A `Not available` verdict; a problem when `reason` is one of [`reasons::PROBLEMS`].
    pub fn not_available(reason: &str, message: impl Into<String>) -> Self {
        Self {
            phase: RuntimePhase::NotAvailable,
            reason: reason.to_owned(),
            message: message.into(),
            problem: reasons::PROBLEMS.contains(&reason),
        }
    }
}

/// A condition to report besides `Ready`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionState {
    /// The condition type, from [`conditions`].
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// What it means for the user.
    pub message: String,
}

impl ConditionState {
    /// A condition that is `True` when `holds`, else `False`.
    pub fn new(type_: &'static str, holds: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: if holds { "True" } else { "False" },
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A condition whose status cannot be known.
    pub fn unknown(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: "Unknown",
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// kstatus' condition for a resource that is `running` or not: `Stalled` when it cannot get
/// there until someone acts (unless the reason is one the cluster may get past by itself, see
/// [`reasons::TRANSIENT`]), none at rest or once running, else `Reconciling`.
pub fn progress(running: bool, at_rest: bool, stalled: bool, reason: &str, message: &str) -> Option<ConditionState> {
    let stalled = stalled && !reasons::TRANSIENT.contains(&reason);
    let type_ = match (running, at_rest, stalled) {
        (_, _, true) => conditions::STALLED,
        (true, _, _) | (_, true, _) => return None,
        _ => conditions::RECONCILING,
    };
    Some(ConditionState::new(type_, true, reason, message))
}

/// The runtime's kstatus condition: a problem (or a failing pod) stalls it, and so does a spec
/// change that cannot be applied while the pod from the earlier spec keeps serving.
fn runtime_progress(verdict: &Verdict, others: &[ConditionState]) -> Option<ConditionState> {
    let blocked = others
        .iter()
        .find(|c| c.type_ == conditions::SPEC_APPLIED && c.status == "False");
    if let Some(blocked) = blocked.filter(|_| verdict.phase == RuntimePhase::Running) {
        return progress(true, false, true, &blocked.reason, &blocked.message);
    }
    progress(
        verdict.phase == RuntimePhase::Running,
        reasons::AT_REST.contains(&verdict.reason.as_str()),
        verdict.problem || reasons::FAILING.contains(&verdict.reason.as_str()),
        &verdict.reason,
        &verdict.message,
    )
}

/// The conditions of `previous` other than `Ready`, to carry over unchanged (a stopped runtime
/// keeps what was last known about it).
pub fn carried(previous: &[Condition]) -> Vec<ConditionState> {
    const TYPES: [&str; 5] = [
        conditions::IDENTITY_RESOLVED,
        conditions::SPEC_APPLIED,
        conditions::TEMPLATE_CURRENT,
        conditions::IDLE,
        conditions::UPDATE_AVAILABLE,
    ];
    previous
        .iter()
        .filter_map(|c| {
            let type_ = TYPES.into_iter().find(|t| *t == c.type_)?;
            let status = ["True", "False", "Unknown"].into_iter().find(|s| *s == c.status)?;
            Some(ConditionState {
                type_,
                status,
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
        })
        .collect()
}

/// Sets `condition` in `conditions`. Its `lastTransitionTime` is the time of this change; when
/// `previous` held the same type with the same status, that earlier time is kept.
pub fn set_condition(conditions: &mut Vec<Condition>, previous: &[Condition], mut condition: Condition) {
    if let Some(earlier) = previous
        .iter()
        .find(|c| c.type_ == condition.type_ && c.status == condition.status)
    {
        condition.last_transition_time = earlier.last_transition_time.clone();
    }
    conditions.retain(|c| c.type_ != condition.type_);
    conditions.push(condition);
}

/// The condition `state` describes, observed at `generation`, changed at `now`.
pub fn condition(state: &ConditionState, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: state.type_.to_owned(),
        status: state.status.to_owned(),
        reason: state.reason.clone(),
        message: state.message.chars().take(32768).collect(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// What a reconcile reports: the status is composed from it. Fields this controller owns are
/// replaced; fields other parts of the operator own (versions, other handled actions) are
/// carried over.
pub struct Report<'a> {
    /// The verdict: phase, reason, message, and the `Ready` condition.
    pub verdict: &'a Verdict,
    /// Every other condition this controller reports; conditions not listed are dropped.
    pub conditions: &'a [ConditionState],
    /// `Serverless` or the instance's name.
    pub compute: &'a str,
    /// Image, version and instance type, once decided.
    pub facts: Option<&'a PodFacts>,
    /// Action values just handled (the fields that are set replace the recorded ones).
    pub handled: &'a HandledActions,
    /// The Service's URL, once it exists; `None` keeps the one recorded.
    pub url: Option<&'a str>,
    /// The runtime has no Service of its own (someone else's holds the name, or it could not be
    /// made): the recorded URL goes.
    pub drop_url: bool,
    /// Newer activity the proxy reported, to record.
    pub last_activity: Option<&'a Time>,
    /// The newest allowed version in the registry, when known.
    pub latest: Option<&'a str>,
    /// An event of this reconcile's own (a newer version found, an update begun), published
    /// after the status write that records it, as the transitions' are.
    pub notice: Option<&'a super::report::Notice>,
}

/// The status to write over `previous` for a runtime at `generation`; new transitions at `now`.
pub fn compose(
    previous: Option<&PromptFlowRuntimeStatus>,
    inputs: &Report<'_>,
    generation: Option<i64>,
    now: &Time,
) -> PromptFlowRuntimeStatus {
    let previous = previous.cloned().unwrap_or_default();
    let verdict = inputs.verdict;
    let ready = ConditionState::new(
        conditions::READY,
        verdict.phase == RuntimePhase::Running,
        &verdict.reason,
        verdict.message.clone(),
    );
    let progress = runtime_progress(verdict, inputs.conditions);
    let mut conditions = vec![];
    for state in std::iter::once(&ready).chain(inputs.conditions).chain(&progress) {
        set_condition(&mut conditions, &previous.conditions, condition(state, generation, now));
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    let handled_actions = merge_handled(previous.handled_actions.clone(), inputs.handled);
    PromptFlowRuntimeStatus {
        phase: verdict.phase,
        reason: Some(verdict.reason.clone()),
        message: Some(verdict.message.clone()),
        observed_generation: generation,
        compute: Some(inputs.compute.to_owned()),
        instance_type: inputs.facts.map(|f| f.size.clone()).or(previous.instance_type),
        image: inputs.facts.map(|f| f.image.clone()).or(previous.image),
        version: inputs.facts.map(|f| f.version.clone()).or(previous.version),
        handled_actions,
        url: if inputs.drop_url {
            None
        } else {
            inputs.url.map(str::to_owned).or(previous.url)
        },
        last_activity_time: inputs.last_activity.cloned().or(previous.last_activity_time),
        latest_version: inputs.latest.map(str::to_owned).or(previous.latest_version),
        conditions,
    }
}

/// The recorded action values with the newly handled ones over them.
fn merge_handled(previous: Option<HandledActions>, new: &HandledActions) -> Option<HandledActions> {
    if *new == HandledActions::default() {
        return previous;
    }
    let previous = previous.unwrap_or_default();
    let pick = |new: &Option<String>, old: Option<String>| new.clone().or(old);
    Some(HandledActions {
        check_version: pick(&new.check_version, previous.check_version),
        update: pick(&new.update, previous.update),
        start: pick(&new.start, previous.start),
        restart: pick(&new.restart, previous.restart),
        stop: pick(&new.stop, previous.stop),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Vec<ConditionState> {
        vec![ConditionState::new(
            conditions::IDENTITY_RESOLVED,
            true,
            reasons::IDENTITY_RESOLVED,
            "ok",
        )]
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let starting = Verdict::not_available(reasons::POD_STARTING, "waiting");
        let others = identity();
        let facts = PodFacts {
            image: "img:1".into(),
            version: "1".into(),
            size: "Standard_D2s_v3".into(),
        };
        let none = HandledActions::default();
        let report = |verdict| Report {
            verdict,
            conditions: &others,
            compute: "Serverless",
            facts: Some(&facts),
            handled: &none,
            url: None,
            drop_url: false,
            last_activity: None,
            latest: None,
            notice: None,
        };
        let first = compose(None, &report(&starting), Some(1), &t0);
        let again = compose(Some(&first), &report(&starting), Some(1), &t1);
        assert_eq!(first, again, "an unchanged verdict must give an identical status");

        let failed = Verdict::not_available(reasons::ERR_IMAGE_PULL, "cannot pull");
        let changed = compose(Some(&first), &report(&failed), Some(1), &t1);
        let ready = changed.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            ready.last_transition_time, t0,
            "Ready stayed False, so its transition time stays"
        );
        assert_eq!(ready.reason, "ErrImagePull");

        let running = Verdict {
            phase: RuntimePhase::Running,
            reason: "PodReady".into(),
            message: "up".into(),
            problem: false,
        };
        let up = compose(Some(&changed), &report(&running), Some(1), &t1);
        let ready = up.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), &ready.last_transition_time), ("True", &t1));
    }

    #[test]
    fn fields_owned_elsewhere_are_carried_over_and_restarts_recorded() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        let previous = PromptFlowRuntimeStatus {
            latest_version: Some("20250101.v1".into()),
            handled_actions: Some(HandledActions {
                update: Some("u1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let others = identity();
        let report = Report {
            verdict: &Verdict::not_available("Pending", "x"),
            conditions: &others,
            compute: "Serverless",
            facts: None,
            handled: &HandledActions {
                restart: Some("r1".into()),
                ..Default::default()
            },
            url: Some("http://chat.a.svc:8081"),
            drop_url: false,
            last_activity: None,
            latest: None,
            notice: None,
        };
        let status = compose(Some(&previous), &report, Some(2), &now);
        assert_eq!(status.latest_version.as_deref(), Some("20250101.v1"));
        assert_eq!(status.url.as_deref(), Some("http://chat.a.svc:8081"));
        assert_eq!(status.observed_generation, Some(2));
        let handled = status.handled_actions.unwrap();
        assert_eq!(
            (handled.update.as_deref(), handled.restart.as_deref()),
            (Some("u1"), Some("r1"))
        );
        let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["IdentityResolved", "Ready", "Reconciling"]);
    }

    #[test]
    fn the_url_is_kept_when_not_known_and_goes_when_the_service_is_not_the_runtimes() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let previous = PromptFlowRuntimeStatus {
            url: Some("http://db.a.svc:8081".into()),
            ..Default::default()
        };
        let none = HandledActions::default();
        let conflict = Verdict::not_available(reasons::SERVICE_CONFLICT, "Service db exists");
        let report = |drop_url| Report {
            verdict: &conflict,
            conditions: &[],
            compute: "Serverless",
            facts: None,
            handled: &none,
            url: None,
            drop_url,
            last_activity: None,
            latest: None,
            notice: None,
        };
        let kept = compose(Some(&previous), &report(false), Some(1), &now);
        assert_eq!(kept.url.as_deref(), Some("http://db.a.svc:8081"));
        assert_eq!(compose(Some(&previous), &report(true), Some(1), &now).url, None);
    }

    #[test]
    fn kstatus_reads_starting_as_reconciling_problems_as_stalled_and_rest_as_neither() {
        let kstatus = |verdict: &Verdict, others: &[ConditionState]| {
            runtime_progress(verdict, others).map(|c| (c.type_, c.reason))
        };
        let running = Verdict {
            phase: RuntimePhase::Running,
            reason: reasons::POD_READY.into(),
            message: "up".into(),
            problem: false,
        };
        assert_eq!(kstatus(&running, &identity()), None);
        let starting = Verdict::not_available(reasons::POD_STARTING, "waiting");
        assert_eq!(kstatus(&starting, &[]), Some(("Reconciling", "PodStarting".into())));
        let quota = Verdict::not_available(reasons::QUOTA_EXCEEDED, "no size fits");
        assert_eq!(kstatus(&quota, &[]), Some(("Stalled", "QuotaExceeded".into())));
        let unschedulable = Verdict::not_available(reasons::POD_UNSCHEDULABLE, "no node has room");
        assert_eq!(
            kstatus(&unschedulable, &[]),
            Some(("Reconciling", "PodUnschedulable".into()))
        );
        let crash = Verdict::not_available(reasons::CRASH_LOOP_BACK_OFF, "restarts");
        assert_eq!(kstatus(&crash, &[]), Some(("Stalled", "CrashLoopBackOff".into())));
        let idle = Verdict::not_available(reasons::STOPPED_IDLE, "idle");
        assert_eq!(kstatus(&idle, &[]), None);
        let held = [ConditionState::new(
            conditions::SPEC_APPLIED,
            false,
            reasons::UNKNOWN_INSTANCE_TYPE,
            "spec.compute.serverless.instanceType",
        )];
        assert_eq!(
            kstatus(&running, &held),
            Some(("Stalled", "UnknownInstanceType".into()))
        );
    }
}
