//! Plan: from what was observed, decide where the runtime's containers run and what they are made
//! of — a pod of its own (serverless), or its containers in a compute instance's pod — or the one
//! problem that keeps it from having them. Pure: no client, no context, unit-tested from fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};

use super::observe::{Observed, PullSecrets};
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
    /// Where the runtime's containers run.
    pub work: Work,
}

/// Where a runtime's containers run, as planned.
#[derive(Clone, Debug)]
pub enum Work {
    /// A pod of its own, or the problem that keeps the runtime from having one.
    Pod(Box<Result<DesiredPod, Problem>>),
    /// Containers in a compute instance's pod; the instance controller builds that pod.
    Instance(InstanceWork),
}

/// A runtime's part of a compute instance, as planned.
#[derive(Clone, Debug)]
pub struct InstanceWork {
    /// The instance's name.
    pub name: String,
    /// `spec.compute.instance.acknowledgeRestart`: attaching restarts the instance.
    pub acknowledged: bool,
    /// What its containers are made of (`None` while the registry's first answer is awaited:
    /// the unpinned image would read as a pin), or the problem that keeps it from having them.
    pub containers: Result<Option<PodFacts>, Problem>,
    /// The instance controller takes the runtime's version from the pin its status holds
    /// (no `spec.image.version`, no image from the flow): the status must name the planned
    /// image for the instance to restart with it.
    pub pinned_by_status: bool,
}

impl Plan {
    /// Image, version and size, once decided.
    pub fn facts(&self) -> Option<&PodFacts> {
        match &self.work {
            Work::Pod(pod) => (**pod).as_ref().ok().map(|desired| &desired.facts),
            Work::Instance(work) => work.containers.as_ref().ok().and_then(Option::as_ref),
        }
    }

    /// The planned pod of a serverless runtime.
    #[cfg(test)]
    fn into_pod(self) -> Result<DesiredPod, Problem> {
        match self.work {
            Work::Pod(pod) => *pod,
            Work::Instance(work) => panic!("planned on compute instance {}", work.name),
        }
    }

    /// The problem that keeps the runtime from having its containers, if any.
    pub fn problem(&self) -> Option<&Problem> {
        match &self.work {
            Work::Pod(pod) => (**pod).as_ref().err(),
            Work::Instance(work) => work.containers.as_ref().err(),
        }
    }
}

/// The login version checks use for the image's registry.
#[derive(Clone, Debug)]
pub enum Login {
    /// Read from the pull secrets: the login, if one holds it.
    Read(Option<crate::identity::Credential>),
    /// Remembered: only its key ([`identity::login_key`]; empty for none).
    Remembered(String),
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
    /// The pull identity's login for the image's registry.
    pub login: Login,
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
    let resolved = match &observed.pull {
        PullSecrets::Read(secrets) => {
            identity::resolve(&observed.account_name, observed.account.as_deref(), secrets, &registry)
        }
        // Remembered only for an account that resolved, and only while it is unchanged.
        PullSecrets::Remembered(logins) => Ok(PullIdentity {
            service_account: observed.account_name.clone(),
            pull_secrets: observed
                .account
                .as_deref()
                .map(identity::pull_secret_names)
                .unwrap_or_default(),
            has_registry_credentials: logins.for_host(&registry).is_some(),
        }),
    };
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
        let login = match &observed.pull {
            PullSecrets::Read(secrets) => Login::Read(identity::credential(
                &pull_secrets(&identity.pull_secrets, secrets),
                &registry,
            )),
            PullSecrets::Remembered(logins) => {
                Login::Remembered(logins.for_host(&registry).unwrap_or_default().to_owned())
            }
        };
        Ok(Resolved {
            image,
            version,
            identity,
            flow,
            repository,
            from_flow,
            login,
        })
    });
    (condition, outcome)
}

/// The pull secrets `names` (an account's, in its order), as read.
pub fn pull_secrets<'a>(names: &[String], secrets: &'a BTreeMap<String, Option<Secret>>) -> Vec<Option<&'a Secret>> {
    names
        .iter()
        .map(|name| secrets.get(name).and_then(Option::as_ref))
        .collect()
}

/// Decides a runtime's containers from what was observed.
#[cfg(test)]
pub fn plan(runtime: &PromptFlowRuntime, observed: &Observed, catalog: &Catalog, template: &PodTemplate) -> Plan {
    let (identity, resolved) = resolve(runtime, observed, &template.requirements);
    finish(runtime, observed, catalog, template, identity, resolved, false)
}

/// Decides a runtime's containers from what was resolved (and pinned): its own pod, sized and
/// built, or its part of the compute instance it asks for. `awaiting_registry`: the first
/// version answer is still awaited.
pub fn finish(
    runtime: &PromptFlowRuntime,
    observed: &Observed,
    catalog: &Catalog,
    template: &PodTemplate,
    identity: ConditionState,
    resolved: Result<Resolved, Problem>,
    awaiting_registry: bool,
) -> Plan {
    let work = match &runtime.spec.compute.instance {
        Some(asked) => Work::Instance(InstanceWork {
            name: asked.name.clone(),
            acknowledged: asked.acknowledge_restart,
            pinned_by_status: runtime.spec.image.version.is_none()
                && resolved.as_ref().is_ok_and(|found| !found.from_flow),
            containers: resolved.map(|found| {
                (!awaiting_registry).then(|| PodFacts {
                    image: found.image,
                    version: found.version,
                    size: observed
                        .instance
                        .as_ref()
                        .and_then(|seen| seen.object.as_ref())
                        .map(|instance| instance.spec.instance_type.clone())
                        .unwrap_or_default(),
                })
            }),
        }),
        None => {
            Work::Pod(Box::new(resolved.and_then(|resolved| {
                desired_pod(runtime, observed, catalog, template, resolved)
            })))
        }
    };
    Plan { identity, work }
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
            pull: PullSecrets::Read(BTreeMap::new()),
            flow: flow.map(|dag| FlowSource {
                config_map: "chat-flow".into(),
                found: Some(ConfigMap {
                    data: Some(BTreeMap::from([("flow.dag.yaml".to_owned(), dag.to_owned())])),
                    ..Default::default()
                }),
            }),
            pod: None,
            instance: None,
            quotas: vec![],
        }
    }

    fn planned(runtime: &PromptFlowRuntime, observed: &Observed) -> Plan {
        plan(runtime, observed, &Catalog::builtin(), &PodTemplate::default())
    }

    #[test]
    fn a_minimal_runtime_gets_the_latest_tag_and_the_first_size() {
        let plan = planned(&runtime(serde_json::json!({})), &observed(true, None));
        let desired = plan.clone().into_pod().unwrap();
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
        let desired = planned(&rt, &observed(true, None)).into_pod().unwrap();
        assert_eq!(desired.facts.image, format!("r.example/rt@{digest}"));
        let flow = observed(true, Some("environment: {image: 'r.example/team/flow:7'}"));
        let desired = planned(&rt, &flow).into_pod().unwrap();
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
        let problem = plan.into_pod().unwrap_err();
        assert_eq!(problem.reason, reasons::SERVICE_ACCOUNT_NOT_FOUND);
        assert!(problem.message.contains("service account default"));

        let problem = planned(&rt, &observed(true, Some("environment: [unclosed")))
            .into_pod()
            .unwrap_err();
        assert_eq!(problem.reason, reasons::FLOW_INVALID);
        assert!(problem.message.contains("chat-flow"), "{}", problem.message);
    }

    #[test]
    fn a_runtime_on_an_instance_is_planned_as_its_part_of_the_instance_never_a_pod() {
        let rt = runtime(serde_json::json!({"compute": {"instance": {"name": "ci", "acknowledgeRestart": true}}}));
        let mut seen = observed(true, None);
        let instance: crate::api::ComputeInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "promptflow.dev/v1alpha1", "kind": "ComputeInstance",
            "metadata": {"name": "ci", "namespace": "team"},
            "spec": {"instanceType": "Standard_DS3_v2"}
        }))
        .unwrap();
        seen.instance = Some(crate::controller::runtime::observe::InstanceSeen {
            object: Some(Arc::new(instance)),
            pod: None,
        });
        let catalog = Catalog::builtin();
        let template = PodTemplate::default();
        let (identity, resolved) = resolve(&rt, &seen, &template.requirements);
        let plan = finish(&rt, &seen, &catalog, &template, identity, resolved, false);
        let Work::Instance(work) = &plan.work else {
            panic!("{plan:?}")
        };
        assert_eq!((work.name.as_str(), work.acknowledged), ("ci", true));
        assert_eq!(plan.facts().unwrap().size, "Standard_DS3_v2");
        // The registry's first answer awaited: no facts yet, so no pin is read into the status.
        let (identity, resolved) = resolve(&rt, &seen, &template.requirements);
        let plan = finish(&rt, &seen, &catalog, &template, identity, resolved, true);
        assert!(plan.facts().is_none() && plan.problem().is_none(), "{plan:?}");
        // Its problems are the plan's, as a serverless runtime's are.
        let lost = observed(false, None);
        let (identity, resolved) = resolve(&rt, &lost, &template.requirements);
        let plan = finish(&rt, &lost, &catalog, &template, identity, resolved, false);
        assert_eq!(plan.problem().unwrap().reason, reasons::SERVICE_ACCOUNT_NOT_FOUND);
    }
}
