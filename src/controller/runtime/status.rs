//! Status: what the runtime pod's state means for the user, and conditions that keep their
//! `lastTransitionTime` while their status does not change.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::plan::{IdentityCondition, PodFacts};
use crate::api::conditions::{self, reasons};
use crate::api::{PromptFlowRuntimeStatus, RuntimePhase};

/// Container waiting reasons that mean the image cannot be pulled.
const IMAGE_PULL_REASONS: [&str; 3] = [
    reasons::ERR_IMAGE_PULL,
    reasons::IMAGE_PULL_BACK_OFF,
    reasons::INVALID_IMAGE_NAME,
];

/// What the runtime pod is doing.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Ready: the runtime serves on this IP.
    Ready {
        /// The pod IP.
        ip: String,
    },
    /// Scheduled or starting, not Ready yet.
    Starting,
    /// The scheduler finds no node for it.
    Unschedulable {
        /// The scheduler's message.
        message: String,
    },
    /// The image cannot be pulled.
    ImagePullFailed {
        /// `ErrImagePull`, `ImagePullBackOff` or `InvalidImageName`.
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// The pod ended (`Failed` or `Succeeded`): a runtime must not end, so it is recreated.
    Ended {
        /// What the pod status says.
        message: String,
    },
    /// Being deleted.
    Terminating,
}

/// Reads the pod's state.
pub fn classify(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    let Some(status) = pod.status.as_ref() else {
        return PodState::Starting;
    };
    if let Some(phase @ ("Failed" | "Succeeded")) = status.phase.as_deref() {
        let detail = status
            .message
            .clone()
            .or_else(|| status.reason.clone())
            .unwrap_or_default();
        return PodState::Ended {
            message: format!("pod phase {phase}{}", suffix(&detail)),
        };
    }
    let waiting = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| w.reason.as_deref().is_some_and(|r| IMAGE_PULL_REASONS.contains(&r)));
    if let Some(waiting) = waiting {
        return PodState::ImagePullFailed {
            reason: waiting.reason.clone().unwrap_or_default(),
            message: waiting.message.clone().unwrap_or_default(),
        };
    }
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    if let Some(condition) = unschedulable {
        return PodState::Unschedulable {
            message: condition.message.clone().unwrap_or_default(),
        };
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    match (ready, status.pod_ip.clone()) {
        (true, Some(ip)) => PodState::Ready { ip },
        _ => PodState::Starting,
    }
}

fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// The phase, reason and message the user reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `Not available` or `Running`.
    pub phase: RuntimePhase,
    /// CamelCase reason.
    pub reason: String,
    /// What is happening or what to fix.
    pub message: String,
}

impl Verdict {
    /// A `Not available` verdict.
    pub fn not_available(reason: &str, message: impl Into<String>) -> Self {
        Self {
            phase: RuntimePhase::NotAvailable,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// The verdict for a pod in `state`.
pub fn pod_verdict(pod_name: &str, image: &str, state: &PodState) -> Verdict {
    match state {
        PodState::Ready { ip } => Verdict {
            phase: RuntimePhase::Running,
            reason: reasons::POD_READY.to_owned(),
            message: format!("pod {pod_name} is Ready and serves on {ip}:8080"),
        },
        PodState::Starting | PodState::Terminating => Verdict::not_available(
            reasons::POD_STARTING,
            format!("waiting for pod {pod_name} to become Ready"),
        ),
        PodState::ImagePullFailed { reason, message } => Verdict::not_available(
            reason,
            format!(
                "pod {pod_name} cannot pull image {image}{}; check that the version exists and that the service account's imagePullSecrets hold credentials for its registry",
                suffix(message)
            ),
        ),
        PodState::Unschedulable { message } => Verdict::not_available(
            reasons::POD_UNSCHEDULABLE,
            format!(
                "no node can run pod {pod_name}{}; choose a smaller instance type or add capacity",
                suffix(message)
            ),
        ),
        PodState::Ended { message } => Verdict::not_available(
            reasons::POD_FAILED,
            format!("pod {pod_name} ended ({message}); recreating it"),
        ),
    }
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

fn condition(type_: &str, status: bool, reason: &str, message: &str, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Builds the new status from the old one: fields this controller owns are replaced, fields other
/// parts of the operator own (versions, activity, handled actions) are carried over.
pub struct StatusInputs<'a> {
    /// The status now.
    pub previous: Option<&'a PromptFlowRuntimeStatus>,
    /// The verdict.
    pub verdict: &'a Verdict,
    /// The `IdentityResolved` condition.
    pub identity: &'a IdentityCondition,
    /// `Serverless` or the instance's name.
    pub compute: &'a str,
    /// Image, version and instance type, once decided.
    pub facts: Option<&'a PodFacts>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The time used for new transitions.
    pub now: &'a Time,
}

/// The status to write.
pub fn compose(inputs: &StatusInputs<'_>) -> PromptFlowRuntimeStatus {
    let previous = inputs.previous.cloned().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    let verdict = inputs.verdict;
    let ready = verdict.phase == RuntimePhase::Running;
    let new = condition(
        conditions::READY,
        ready,
        &verdict.reason,
        &verdict.message,
        inputs.generation,
        inputs.now,
    );
    set_condition(&mut conditions, &previous.conditions, new);
    let new = condition(
        conditions::IDENTITY_RESOLVED,
        inputs.identity.resolved,
        inputs.identity.reason,
        &inputs.identity.message,
        inputs.generation,
        inputs.now,
    );
    set_condition(&mut conditions, &previous.conditions, new);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    PromptFlowRuntimeStatus {
        phase: verdict.phase,
        reason: Some(verdict.reason.clone()),
        message: Some(verdict.message.clone()),
        observed_generation: inputs.generation,
        compute: Some(inputs.compute.to_owned()),
        instance_type: inputs.facts.map(|f| f.size.clone()).or(previous.instance_type),
        image: inputs.facts.map(|f| f.image.clone()).or(previous.image),
        version: inputs.facts.map(|f| f.version.clone()).or(previous.version),
        conditions,
        ..previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "chat-runtime"}, "status": status})).unwrap()
    }

    fn resolved() -> IdentityCondition {
        IdentityCondition {
            resolved: true,
            reason: reasons::IDENTITY_RESOLVED,
            message: "ok".into(),
        }
    }

    #[test]
    fn pod_states() {
        assert_eq!(
            classify(&pod(serde_json::json!({"phase": "Pending"}))),
            PodState::Starting
        );
        let ready = pod(
            serde_json::json!({"phase": "Running", "podIP": "127.0.1.5", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert_eq!(classify(&ready), PodState::Ready { ip: "127.0.1.5".into() });
        let pulling = pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "runtime", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}));
        assert_eq!(
            classify(&pulling),
            PodState::ImagePullFailed {
                reason: "ImagePullBackOff".into(),
                message: "Back-off pulling image".into()
            }
        );
        assert!(matches!(
            classify(&pod(serde_json::json!({"phase": "Failed", "reason": "Evicted"}))),
            PodState::Ended { .. }
        ));
        let pending = pod(serde_json::json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]}));
        assert_eq!(
            classify(&pending),
            PodState::Unschedulable {
                message: "0/3 nodes are available".into()
            }
        );
    }

    #[test]
    fn verdicts_say_what_to_fix() {
        let v = pod_verdict(
            "chat-runtime",
            "img:1",
            &PodState::ImagePullFailed {
                reason: "ErrImagePull".into(),
                message: "not found".into(),
            },
        );
        assert_eq!(
            (v.phase, v.reason.as_str()),
            (RuntimePhase::NotAvailable, "ErrImagePull")
        );
        assert!(v.message.contains("img:1") && v.message.contains("imagePullSecrets"));
        let v = pod_verdict("chat-runtime", "img:1", &PodState::Ready { ip: "127.0.1.2".into() });
        assert_eq!(v.phase, RuntimePhase::Running);
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let starting = Verdict::not_available(reasons::POD_STARTING, "waiting");
        let identity = resolved();
        let facts = PodFacts {
            image: "img:1".into(),
            version: "1".into(),
            size: "Standard_D2s_v3".into(),
        };
        let inputs = |previous, verdict, now| StatusInputs {
            previous,
            verdict,
            identity: &identity,
            compute: "Serverless",
            facts: Some(&facts),
            generation: Some(1),
            now,
        };
        let first = compose(&inputs(None, &starting, &t0));
        let again = compose(&inputs(Some(&first), &starting, &t1));
        assert_eq!(first, again, "an unchanged verdict must give an identical status");

        let failed = Verdict::not_available(reasons::ERR_IMAGE_PULL, "cannot pull");
        let changed = compose(&inputs(Some(&first), &failed, &t1));
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
        };
        let up = compose(&inputs(Some(&changed), &running, &t1));
        let ready = up.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), &ready.last_transition_time), ("True", &t1));
    }

    #[test]
    fn fields_owned_elsewhere_are_carried_over() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        let previous = PromptFlowRuntimeStatus {
            latest_version: Some("20250101.v1".into()),
            ..Default::default()
        };
        let status = compose(&StatusInputs {
            previous: Some(&previous),
            verdict: &Verdict::not_available("Pending", "x"),
            identity: &resolved(),
            compute: "Serverless",
            facts: None,
            generation: Some(2),
            now: &now,
        });
        assert_eq!(status.latest_version.as_deref(), Some("20250101.v1"));
        assert_eq!(status.observed_generation, Some(2));
    }
}
