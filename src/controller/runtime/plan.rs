//! Plan: from what was observed, decide the pod the runtime should have, or the one problem that
//! keeps it from having one. Pure: no client, no context, unit-tested from fixtures.

use k8s_openapi::api::core::v1::Pod;

use super::observe::Observed;
use super::size;
use super::status::ConditionState;
use crate::api::PromptFlowRuntime;
use crate::api::conditions::{self, reasons};
use crate::build::pod::{self, PodTemplate, RuntimePodInputs};
use crate::catalog::Catalog;
use crate::flow::{self, FlowEnvironment, FlowProblem};
use crate::identity::{self, IdentityProblem, PullIdentity};

/// Why a runtime cannot have the pod its spec asks for: a reason constant and a message that
/// names the field or object to fix. Identity, flow and sizing problems all become one.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// CamelCase reason from [`reasons`].
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl From<&IdentityProblem> for Problem {
    fn from(problem: &IdentityProblem) -> Self {
        Self {
            reason: problem.reason(),
            message: problem.to_string(),
        }
    }
}

impl From<&FlowProblem> for Problem {
    fn from(problem: &FlowProblem) -> Self {
        Self {
            reason: problem.reason(),
            message: problem.to_string(),
        }
    }
}

/// What a pod is made of, as the status reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    /// The image reference.
    pub image: String,
    /// The runtime version.
    pub version: String,
    /// The instance type.
    pub size: String,
}

/// The pod to run, and the facts it was made from.
#[derive(Clone, Debug)]
pub struct DesiredPod {
    /// The pod, spec hash included.
    pub pod: Pod,
    /// Image, version and size.
    pub facts: PodFacts,
}

/// The outcome of planning.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The `IdentityResolved` condition.
    pub identity: ConditionState,
    /// The pod, or the problem that keeps the runtime from having one.
    pub pod: Result<DesiredPod, Problem>,
}

/// What a runtime's containers are made of, wherever they run: image, pull identity, flow.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The image reference to run.
    pub image: String,
    /// Its version.
    pub version: String,
    /// The pull identity.
    pub identity: PullIdentity,
    /// The flow ConfigMap's name and environment.
    pub flow: Option<(String, FlowEnvironment)>,
    /// The repository versions are checked in: `spec.image.repository`, or the flow image's
    /// repository when the flow names an image.
    pub repository: String,
    /// The image comes from the flow's `environment.image` (never pinned by the operator).
    pub from_flow: bool,
    /// The pull identity's login for the image's registry, if it has one.
    pub credential: Option<crate::identity::Credential>,
}

/// Resolves the runtime's image, identity and flow: the `IdentityResolved` condition, and what
/// its containers are made of or the problem that keeps it from having them.
pub fn resolve(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    requirements: &flow::RequirementsPolicy,
) -> (ConditionState, Result<Resolved, Problem>) {
    let flow = observed.flow.as_ref().map(|source| {
        (
            source.config_map.clone(),
            flow::read(&source.config_map, source.found.as_ref(), requirements),
        )
    });
    let flow_environment = flow.as_ref().and_then(|(_, read)| read.as_ref().ok());
    let (image, version) = runtime_image(runtime, flow_environment);
    let from_flow = flow_environment.is_some_and(|f| f.image.is_some());
    let repository = if from_flow {
        crate::image_ref::parse(&image)
            .map_or_else(|| image.clone(), |r| format!("{}/{}", r.registry(), r.repository()))
    } else {
        runtime.spec.image.repository.clone()
    };
    let registry = identity::registry_host(&image);
    let resolved = identity::resolve(
        &observed.account_name,
        observed.account.as_deref(),
        &observed.secrets,
        &registry,
    );
    let condition = match &resolved {
        Ok(found) => ConditionState::new(
            conditions::IDENTITY_RESOLVED,
            true,
            reasons::IDENTITY_RESOLVED,
            identity_message(found, &registry),
        ),
        Err(problem) => ConditionState::new(
            conditions::IDENTITY_RESOLVED,
            false,
            problem.reason(),
            problem.to_string(),
        ),
    };
    let outcome = resolved.map_err(|p| Problem::from(&p)).and_then(|identity| {
        let flow = match flow {
            None => None,
            Some((config_map, read)) => Some((config_map, read.map_err(|p| Problem::from(&p))?)),
        };
        let secrets: Vec<Option<&k8s_openapi::api::core::v1::Secret>> = identity
            .pull_secrets
            .iter()
            .map(|name| observed.secrets.get(name).and_then(Option::as_ref))
            .collect();
        let credential = identity::credential(&secrets, &registry);
        Ok(Resolved {
            image,
            version,
            identity,
            flow,
            repository,
            from_flow,
            credential,
        })
    });
    (condition, outcome)
}

/// Decides a serverless runtime's pod from what was observed.
#[cfg(test)]
pub fn plan(runtime: &PromptFlowRuntime, observed: &Observed, catalog: &Catalog, template: &PodTemplate) -> Plan {
    let (identity, resolved) = resolve(runtime, observed, &template.requirements);
    finish(runtime, observed, catalog, template, identity, resolved)
}

/// Decides a serverless runtime's pod from what was resolved (and pinned).
pub fn finish(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    catalog: &Catalog,
    template: &PodTemplate,
    identity: ConditionState,
    resolved: Result<Resolved, Problem>,
) -> Plan {
    let pod = resolved.and_then(|resolved| desired_pod(runtime, observed, catalog, template, resolved));
    Plan { identity, pod }
}

fn desired_pod(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    catalog: &Catalog,
    template: &PodTemplate,
    resolved: Resolved,
) -> Result<DesiredPod, Problem> {
    let size = size::choose(runtime, observed.pod.as_deref(), &observed.quotas, catalog)?;
    let pod = pod::runtime_pod(&RuntimePodInputs {
        runtime,
        image: &resolved.image,
        size,
        identity: &resolved.identity,
        flow: resolved.flow.as_ref().map(|(cm, env)| (cm.as_str(), env)),
        template,
    });
    Ok(DesiredPod {
        pod,
        facts: PodFacts {
            image: resolved.image,
            version: resolved.version,
            size: size.name.clone(),
        },
    })
}

/// The image the runtime runs and its version: the flow's `environment.image` when it names one,
/// else `spec.image` (`latest` until version checks land; a digest is pulled by digest).
fn runtime_image(runtime: &PromptFlowRuntime, flow: Option<&FlowEnvironment>) -> (String, String) {
    let spec_image = &runtime.spec.image;
    let version = spec_image.version.clone().unwrap_or_else(|| "latest".to_owned());
    match flow.and_then(|f| f.image.clone()) {
        Some(flow_image) => {
            let tag = crate::image_ref::parse(&flow_image).and_then(|r| r.tag().map(str::to_owned));
            (flow_image, tag.unwrap_or(version))
        }
        None if version.starts_with("sha256:") => (format!("{}@{version}", spec_image.repository), version),
        None => (format!("{}:{version}", spec_image.repository), version),
    }
}

fn identity_message(identity: &PullIdentity, host: &str) -> String {
    let secrets = if identity.pull_secrets.is_empty() {
        "no imagePullSecrets".to_owned()
    } else {
        format!("imagePullSecrets {}", identity.pull_secrets.join(", "))
    };
    if identity.has_registry_credentials {
        format!(
            "service account {} with {secrets}, holding credentials for {host}",
            identity.service_account
        )
    } else {
        format!(
            "service account {} with {secrets}; none holds credentials for {host}, so the image is pulled anonymously",
            identity.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};

    use super::*;

    fn runtime(spec: serde_json::Value) -> PromptFlowRuntime {
        crate::fixtures::runtime(spec, serde_json::json!({}))
    }
    use crate::controller::runtime::observe::FlowSource;

    fn observed(account: bool, flow: Option<&str>) -> Observed {
        Observed {
            account_name: "default".into(),
            account: account.then(|| Arc::new(ServiceAccount::default())),
            secrets: BTreeMap::new(),
            flow: flow.map(|dag| FlowSource {
                config_map: "chat-flow".into(),
                found: Some(ConfigMap {
                    data: Some(BTreeMap::from([("flow.dag.yaml".to_owned(), dag.to_owned())])),
                    ..Default::default()
                }),
            }),
            pod: None,
            quotas: vec![],
        }
    }

    fn planned(runtime: &PromptFlowRuntime, observed: &Observed) -> Plan {
        plan(runtime, observed, &Catalog::builtin(), &PodTemplate::default())
    }

    #[test]
    fn a_minimal_runtime_gets_the_latest_tag_and_the_first_size() {
        let plan = planned(&runtime(serde_json::json!({})), &observed(true, None));
        let desired = plan.pod.unwrap();
        assert_eq!(desired.facts.version, "latest");
        assert!(desired.facts.image.ends_with("promptflow-runtime-stable:latest"));
        assert_eq!(desired.facts.size, Catalog::builtin().instance_types[0].name);
        assert_eq!(plan.identity.status, "True");
        assert!(
            plan.identity.message.contains("pulled anonymously"),
            "{}",
            plan.identity.message
        );
    }

    #[test]
    fn a_digest_is_pulled_by_digest_and_the_flow_image_wins() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let rt = runtime(serde_json::json!({"image": {"repository": "r.example/rt", "version": digest}}));
        let desired = planned(&rt, &observed(true, None)).pod.unwrap();
        assert_eq!(desired.facts.image, format!("r.example/rt@{digest}"));
        let flow = observed(true, Some("environment: {image: 'r.example/team/flow:7'}"));
        let desired = planned(&rt, &flow).pod.unwrap();
        assert_eq!(
            (desired.facts.image.as_str(), desired.facts.version.as_str()),
            ("r.example/team/flow:7", "7")
        );
    }

    #[test]
    fn identity_then_flow_problems_block_the_pod_and_name_the_object() {
        let rt = runtime(serde_json::json!({}));
        let plan = planned(&rt, &observed(false, None));
        assert_eq!(plan.identity.status, "False");
        let problem = plan.pod.unwrap_err();
        assert_eq!(problem.reason, reasons::SERVICE_ACCOUNT_NOT_FOUND);
        assert!(problem.message.contains("service account default"));

        let problem = planned(&rt, &observed(true, Some("environment: [unclosed")))
            .pod
            .unwrap_err();
        assert_eq!(problem.reason, reasons::FLOW_INVALID);
        assert!(problem.message.contains("chat-flow"), "{}", problem.message);
    }
}
