//! Reading the runtime pod as a user would want it read: Ready, starting, unschedulable, a
//! container the kubelet cannot start or that keeps failing (with its reason and last exit),
//! ended, or being deleted. Pure.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use super::status::Verdict;
use crate::api::RuntimePhase;
use crate::api::conditions::reasons;
use crate::build::instance::{INSTANCE_CONTAINER, INSTANCE_LABEL};

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
    /// A container cannot be started or keeps failing, as the kubelet reports it.
    ContainerProblem(ContainerProblem),
    /// The pod ended (`Failed` or `Succeeded`): a runtime must not end, so it is recreated.
    Ended {
        /// What the pod status says.
        message: String,
    },
    /// Being deleted.
    Terminating,
}

/// A container of the pod that the kubelet cannot start, or that keeps exiting.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerProblem {
    /// The container's name.
    pub container: String,
    /// The kubelet's reason: `ErrImagePull`, `CrashLoopBackOff`, `OOMKilled`,
    /// `CreateContainerConfigError`, …
    pub reason: String,
    /// The kubelet's message, and the last termination when there was one.
    pub message: String,
}

/// Waiting reasons that are part of a normal start.
const STARTING_REASONS: [&str; 2] = ["ContainerCreating", "PodInitializing"];

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
    // A compute instance's pod is the instance's: its runtimes' containers speak for their
    // runtimes (each runtime's status follows its own), not for the instance. Init containers
    // hold every container back, so they count for all.
    let instance_pod = pod.labels().contains_key(INSTANCE_LABEL);
    let counts = |name: &str| !instance_pod || name == INSTANCE_CONTAINER;
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten().filter(|c| counts(&c.name)));
    if let Some(problem) = containers.filter_map(container_problem).next() {
        return PodState::ContainerProblem(problem);
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
    let ready = if instance_pod {
        status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.name == INSTANCE_CONTAINER && c.ready)
    } else {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    match (ready, status.pod_ip.clone()) {
        (true, Some(ip)) => PodState::Ready { ip },
        _ => PodState::Starting,
    }
}

/// The problem a container status shows: a waiting reason that is not part of a normal start,
/// or a failed termination. A crash loop whose last exit was for memory reads as `OOMKilled`.
pub fn container_problem(container: &ContainerStatus) -> Option<ContainerProblem> {
    let state = container.state.as_ref()?;
    let last_exit = container
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| {
            (
                t.reason.clone().unwrap_or_else(|| "Error".into()),
                t.exit_code,
                t.message.clone(),
            )
        });
    let describe_exit = |(reason, code, message): &(String, i32, Option<String>)| {
        format!(
            "; last exit: {reason} (exit code {code}){}",
            message
                .as_deref()
                .map(|m| format!(": {}", m.trim()))
                .unwrap_or_default()
        )
    };
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.clone().unwrap_or_default();
        if reason.is_empty() || STARTING_REASONS.contains(&reason.as_str()) {
            return None;
        }
        let reason = match &last_exit {
            Some((exit, _, _)) if exit == reasons::OOM_KILLED && reason == reasons::CRASH_LOOP_BACK_OFF => exit.clone(),
            _ => reason,
        };
        let mut message = waiting.message.clone().unwrap_or_default();
        message.push_str(&last_exit.as_ref().map(describe_exit).unwrap_or_default());
        return Some(ContainerProblem {
            container: container.name.clone(),
            reason,
            message: message.trim_start_matches("; ").to_owned(),
        });
    }
    let terminated = state.terminated.as_ref()?;
    if terminated.exit_code == 0 {
        return None;
    }
    let exit = (
        terminated.reason.clone().unwrap_or_else(|| "Error".into()),
        terminated.exit_code,
        terminated.message.clone(),
    );
    Some(ContainerProblem {
        container: container.name.clone(),
        reason: exit.0.clone(),
        message: describe_exit(&exit).trim_start_matches("; ").to_owned(),
    })
}

fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// The verdict for a pod in `state`.
pub fn pod_verdict(pod_name: &str, image: &str, state: &PodState) -> Verdict {
    match state {
        PodState::Ready { ip } => Verdict {
            phase: RuntimePhase::Running,
            reason: reasons::POD_READY.to_owned(),
            message: format!("pod {pod_name} is Ready at {ip}"),
            problem: false,
        },
        PodState::Starting => Verdict::not_available(
            reasons::POD_STARTING,
            format!("waiting for pod {pod_name} to become Ready"),
        ),
        PodState::Terminating => Verdict::not_available(
            reasons::POD_TERMINATING,
            format!("pod {pod_name} is being deleted; a new one is created once it is gone"),
        ),
        PodState::ContainerProblem(problem) => Verdict {
            phase: RuntimePhase::NotAvailable,
            reason: problem.reason.clone(),
            message: format!(
                "container {} of pod {pod_name}: {}{}; {}",
                problem.container,
                problem.reason,
                suffix(&problem.message),
                what_to_do(&problem.reason, pod_name, &problem.container, image)
            ),
            problem: true,
        },
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

fn what_to_do(reason: &str, pod_name: &str, container: &str, image: &str) -> String {
    match reason {
        reasons::ERR_IMAGE_PULL | reasons::IMAGE_PULL_BACK_OFF | reasons::INVALID_IMAGE_NAME => format!(
            "check that image {image} exists and that the service account's imagePullSecrets hold credentials for its registry"
        ),
        reasons::OOM_KILLED => {
            "it ran out of memory: choose a larger instance type or raise spec.compute.serverless.resources.limits.memory"
                .to_owned()
        }
        "CreateContainerConfigError" | "CreateContainerError" => {
            "the kubelet cannot create the container: fix the object the message names".to_owned()
        }
        _ => format!("see `kubectl logs {pod_name} -c {container} --previous` for why it exits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "chat-runtime"}, "status": status})).unwrap()
    }

    fn container(state: serde_json::Value, last: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"phase": "Running", "containerStatuses": [{
            "name": "runtime", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
            "state": state, "lastState": last}]})
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
        let creating = pod(container(
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
            serde_json::json!({}),
        ));
        assert_eq!(classify(&creating), PodState::Starting);
    }

    #[test]
    fn kubelet_reasons_surface_with_the_last_exit() {
        let pulling = pod(container(
            serde_json::json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}),
            serde_json::json!({}),
        ));
        let PodState::ContainerProblem(problem) = classify(&pulling) else {
            panic!()
        };
        assert_eq!(
            (problem.reason.as_str(), problem.message.as_str()),
            ("ImagePullBackOff", "Back-off pulling image")
        );

        let crashing = pod(container(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}),
            serde_json::json!({"terminated": {"reason": "Error", "exitCode": 1, "message": "ModuleNotFoundError: x\n"}}),
        ));
        let verdict = pod_verdict("chat-runtime", "img:1", &classify(&crashing));
        assert_eq!(verdict.reason, "CrashLoopBackOff");
        assert!(verdict.problem);
        assert!(
            verdict
                .message
                .contains("last exit: Error (exit code 1): ModuleNotFoundError: x")
                && verdict
                    .message
                    .contains("kubectl logs chat-runtime -c runtime --previous"),
            "{}",
            verdict.message
        );

        let oom = pod(container(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            serde_json::json!({"terminated": {"reason": "OOMKilled", "exitCode": 137}}),
        ));
        let verdict = pod_verdict("chat-runtime", "img:1", &classify(&oom));
        assert_eq!(verdict.reason, "OOMKilled");
        assert!(verdict.message.contains("limits.memory"), "{}", verdict.message);

        let exited = pod(container(
            serde_json::json!({"terminated": {"reason": "Error", "exitCode": 2}}),
            serde_json::json!({}),
        ));
        let PodState::ContainerProblem(problem) = classify(&exited) else {
            panic!()
        };
        assert_eq!(problem.reason, "Error");
        assert_eq!(problem.message, "last exit: Error (exit code 2)");
    }

    #[test]
    fn a_pod_being_deleted_reads_as_such() {
        let mut deleting = pod(serde_json::json!({"phase": "Running"}));
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ));
        let verdict = pod_verdict("chat-runtime", "img:1", &classify(&deleting));
        assert_eq!(verdict.reason, "PodTerminating");
        assert!(verdict.message.contains("being deleted"));
    }

    #[test]
    fn image_pull_verdicts_say_what_to_fix() {
        let state = PodState::ContainerProblem(ContainerProblem {
            container: "runtime".into(),
            reason: "ErrImagePull".into(),
            message: "not found".into(),
        });
        let verdict = pod_verdict("chat-runtime", "img:1", &state);
        assert_eq!(
            (verdict.phase, verdict.reason.as_str()),
            (RuntimePhase::NotAvailable, "ErrImagePull")
        );
        assert!(verdict.message.contains("img:1") && verdict.message.contains("imagePullSecrets"));
    }

    #[test]
    fn an_instance_pod_is_judged_by_the_instance_container_alone() {
        let instance = |statuses: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "ci-instance", "labels": {"promptflow.dev/compute-instance": "ci"}},
                "status": {"phase": "Running", "podIP": "127.0.1.9",
                    "conditions": [{"type": "Ready", "status": "False"}], "containerStatuses": statuses}}))
            .unwrap()
        };
        let running = |name: &str| {
            serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}})
        };
        let crashing = serde_json::json!({"name": "req-bad", "image": "x", "imageID": "", "ready": false,
            "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}});
        // One runtime's installer crashes and the pod is not Ready: the instance still runs.
        let pod = instance(serde_json::json!([running("instance"), crashing, running("rt-good")]));
        assert_eq!(classify(&pod), PodState::Ready { ip: "127.0.1.9".into() });
        // The instance's own container failing is the instance's problem.
        let mut own = crashing_named("instance");
        own["restartCount"] = 5.into();
        let pod = instance(serde_json::json!([own, running("rt-good")]));
        assert!(matches!(classify(&pod), PodState::ContainerProblem(p) if p.container == "instance"));
    }

    fn crashing_named(name: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": false,
            "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}})
    }
}
