//! The flow folder (a ConfigMap) and the environment its `flow.dag.yaml` asks of the runtime.

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::conditions::reasons;

/// The flow definition file in the flow folder.
pub const FLOW_FILE: &str = "flow.dag.yaml";

/// What the flow asks of the runtime.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowEnvironment {
    /// `environment.image`: replaces the runtime's base image.
    pub image: Option<String>,
    /// `environment.python_requirements_txt`: a file of the folder to pip-install before start.
    pub requirements_file: Option<String>,
    /// A digest of the folder's content; a change rolls the runtime pod.
    pub content_hash: String,
}

/// Why the flow cannot be used; each names the ConfigMap or file to fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FlowProblem {
    /// The ConfigMap or a file it should hold is missing.
    #[error("{0}")]
    NotFound(String),
    /// `flow.dag.yaml` does not parse or names something invalid.
    #[error("{0}")]
    Invalid(String),
}

impl FlowProblem {
    /// The condition reason for this problem.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => reasons::FLOW_NOT_FOUND,
            Self::Invalid(_) => reasons::FLOW_INVALID,
        }
    }
}

#[derive(Deserialize, Default)]
struct FlowDag {
    #[serde(default)]
    environment: Option<Environment>,
}

#[derive(Deserialize, Default)]
struct Environment {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    python_requirements_txt: Option<String>,
}

/// Reads the flow environment from the ConfigMap `name` (`None` when it does not exist).
pub fn read(name: &str, config_map: Option<&ConfigMap>) -> Result<FlowEnvironment, FlowProblem> {
    let config_map = config_map.ok_or_else(|| {
        FlowProblem::NotFound(format!(
            "flow ConfigMap {name} does not exist; create it or fix spec.flow.configMapName"
        ))
    })?;
    let data = config_map.data.clone().unwrap_or_default();
    let has_file = |file: &str| {
        data.contains_key(file)
            || config_map
                .binary_data
                .as_ref()
                .is_some_and(|binary| binary.contains_key(file))
    };
    let dag = data.get(FLOW_FILE).ok_or_else(|| {
        FlowProblem::NotFound(format!(
            "flow ConfigMap {name} has no {FLOW_FILE} key; add the flow definition"
        ))
    })?;
    let parsed: FlowDag = serde_norway::from_str::<Option<FlowDag>>(dag)
        .map_err(|e| FlowProblem::Invalid(format!("{FLOW_FILE} in ConfigMap {name} does not parse: {e}")))?
        .unwrap_or_default();
    let environment = parsed.environment.unwrap_or_default();

    let image = environment.image.filter(|i| !i.trim().is_empty());
    if let Some(image) = &image
        && !is_image_reference(image)
    {
        return Err(FlowProblem::Invalid(format!(
            "{FLOW_FILE} in ConfigMap {name}: environment.image {image:?} is not an image reference"
        )));
    }
    let requirements_file = environment.python_requirements_txt.filter(|f| !f.trim().is_empty());
    if let Some(file) = &requirements_file
        && !has_file(file)
    {
        return Err(FlowProblem::NotFound(format!(
            "{FLOW_FILE} in ConfigMap {name} names environment.python_requirements_txt {file}, which the ConfigMap does not hold"
        )));
    }
    Ok(FlowEnvironment {
        image,
        requirements_file,
        content_hash: content_hash(config_map),
    })
}

/// A stable digest of the ConfigMap's files (keys sorted by the BTreeMaps).
fn content_hash(config_map: &ConfigMap) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in config_map.data.iter().flatten() {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    for (key, value) in config_map.binary_data.iter().flatten() {
        hasher.update(key.as_bytes());
        hasher.update([1]);
        hasher.update(&value.0);
        hasher.update([1]);
    }
    hex(&hasher.finalize()[..8])
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `repository[:tag][@digest]`, as container runtimes accept it.
fn is_image_reference(image: &str) -> bool {
    crate::image_ref::parse(image).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config_map(files: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                files
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn environment_image_and_requirements_are_read() {
        let cm = config_map(&[
            (
                FLOW_FILE,
                "environment:\n  image: registry.example/team/flow:1.2\n  python_requirements_txt: requirements.txt\n",
            ),
            ("requirements.txt", "requests\n"),
        ]);
        let flow = read("chat-flow", Some(&cm)).unwrap();
        assert_eq!(flow.image.as_deref(), Some("registry.example/team/flow:1.2"));
        assert_eq!(flow.requirements_file.as_deref(), Some("requirements.txt"));
        assert_eq!(flow.content_hash.len(), 16);
    }

    #[test]
    fn a_flow_without_environment_changes_nothing() {
        let flow = read("f", Some(&config_map(&[(FLOW_FILE, "inputs: {}\nnodes: []\n")]))).unwrap();
        assert_eq!((flow.image, flow.requirements_file), (None, None));
        assert!(read("f", Some(&config_map(&[(FLOW_FILE, "")]))).is_ok());
    }

    #[test]
    fn missing_things_are_not_found_and_name_what_is_missing() {
        let err = read("chat-flow", None).unwrap_err();
        assert_eq!(err.reason(), "FlowNotFound");
        assert!(err.to_string().contains("chat-flow"));
        let err = read("chat-flow", Some(&config_map(&[("other", "x")]))).unwrap_err();
        assert!(err.to_string().contains(FLOW_FILE));
        let err = read(
            "f",
            Some(&config_map(&[(
                FLOW_FILE,
                "environment: {python_requirements_txt: req.txt}",
            )])),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "FlowNotFound");
        assert!(err.to_string().contains("req.txt"));
    }

    #[test]
    fn unparsable_yaml_and_bad_images_are_invalid_with_the_parser_message() {
        let err = read("f", Some(&config_map(&[(FLOW_FILE, "environment: [unclosed")]))).unwrap_err();
        assert_eq!(err.reason(), "FlowInvalid");
        assert!(err.to_string().contains("does not parse"), "{err}");
        let err = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "environment: {image: 'Not An Image!'}")])),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "FlowInvalid");
    }

    #[test]
    fn image_references() {
        for ok in [
            "python",
            "python:3.11",
            "127.0.0.1:5000/a/b:1",
            &format!("a/b@sha256:{}", "0".repeat(64)),
        ] {
            assert!(is_image_reference(ok), "{ok}");
        }
        for bad in ["", "a b", "a/B", "a:", "a@sha256:12", "a//b"] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn a_content_change_changes_the_hash() {
        let a = read("f", Some(&config_map(&[(FLOW_FILE, "inputs: {}")]))).unwrap();
        let b = read("f", Some(&config_map(&[(FLOW_FILE, "inputs: {x: 1}")]))).unwrap();
        assert_ne!(a.content_hash, b.content_hash);
    }
}
