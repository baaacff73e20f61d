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

/// How flow requirements are installed, the administrator's side: the pip settings every install
/// uses and whether a requirements file may name its own package sources.
#[derive(Clone, Debug, PartialEq)]
pub struct RequirementsPolicy {
    /// `PIP_INDEX_URL` of every install.
    pub index_url: Option<String>,
    /// `PIP_EXTRA_INDEX_URL` of every install.
    pub extra_index_urls: Vec<String>,
    /// `PIP_TRUSTED_HOST` of every install.
    pub trusted_hosts: Vec<String>,
    /// Requirement files may carry index and source options, direct URLs and VCS links.
    pub allow_sources: bool,
    /// The size limit of the volume requirements are installed into.
    pub packages_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

/// The packages volume's size limit when none is configured.
pub const DEFAULT_PACKAGES_SIZE_LIMIT: &str = "4Gi";

impl Default for RequirementsPolicy {
    fn default() -> Self {
        Self {
            index_url: None,
            extra_index_urls: vec![],
            trusted_hosts: vec![],
            allow_sources: false,
            packages_size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                DEFAULT_PACKAGES_SIZE_LIMIT.into(),
            )),
        }
    }
}

/// Options of a requirements file that choose where packages come from (pip's names, long and
/// short). `-r` and `-c` are followed into the files of the folder instead.
const SOURCE_OPTIONS: [&str; 9] = [
    "--index-url",
    "--extra-index-url",
    "--no-index",
    "--find-links",
    "--trusted-host",
    "--editable",
    "-i",
    "-f",
    "-e",
];

/// VCS schemes pip installs from (`git+https://…`).
const VCS_PREFIXES: [&str; 4] = ["git+", "hg+", "svn+", "bzr+"];

/// The first line of requirements file `file` (and of the folder's files it includes with `-r`
/// or `-c`) that names a package source of its own: an index or source option, a URL or a VCS
/// link. `Some("requirements.txt line 3: …")`.
fn source_option(files: &dyn Fn(&str) -> Option<String>, file: &str, depth: usize) -> Option<String> {
    let text = files(file)?;
    let mut logical = String::new();
    let mut first_line = 0;
    for (index, raw) in text.lines().enumerate() {
        if logical.is_empty() {
            first_line = index + 1;
        }
        // pip joins lines ending in a backslash, then drops comments (`#` at the start or after
        // whitespace).
        if let Some(joined) = raw.strip_suffix('\\') {
            logical.push_str(joined);
            continue;
        }
        logical.push_str(raw);
        let line = std::mem::take(&mut logical);
        let line = match line.find(" #").or_else(|| line.find("\t#")) {
            _ if line.trim_start().starts_with('#') => continue,
            Some(at) => line[..at].to_owned(),
            None => line,
        };
        if let Some(found) = source_in_line(files, line.trim(), depth) {
            return Some(format!("{file} line {first_line}: {found}"));
        }
    }
    None
}

fn source_in_line(files: &dyn Fn(&str) -> Option<String>, line: &str, depth: usize) -> Option<String> {
    let first = line.split_whitespace().next()?;
    for option in SOURCE_OPTIONS {
        let long = option.starts_with("--");
        let named = if long {
            first == option || first.starts_with(&format!("{option}="))
        } else {
            first.starts_with(option)
        };
        if named {
            return Some(format!("{option} names a package source"));
        }
    }
    for include in ["-r", "--requirement", "-c", "--constraint"] {
        let target = if first == include {
            line.split_whitespace().nth(1)
        } else if include.starts_with("--") {
            first.strip_prefix(&format!("{include}="))
        } else {
            first
                .strip_prefix(include)
                .filter(|rest| !rest.is_empty() && !rest.starts_with('-'))
        };
        if let Some(target) = target {
            if target.contains("://") {
                return Some(format!("{include} {target} names a file by URL"));
            }
            if depth >= 8 {
                return Some(format!(
                    "{include} {target}: requirement files included more than 8 deep"
                ));
            }
            return source_option(files, target.trim_start_matches("./"), depth + 1)
                .map(|found| format!("included from here: {found}"));
        }
    }
    if first.starts_with('-') {
        // Other options (`--hash`, `--pre`, `--only-binary`, …) choose among the index's files.
        return None;
    }
    if VCS_PREFIXES.iter().any(|prefix| first.starts_with(prefix)) || line.contains("://") {
        return Some(format!("{:?} is a direct URL or VCS link", line));
    }
    None
}

/// Reads the flow environment from the ConfigMap `name` (`None` when it does not exist), checking
/// its requirements file against the administrator's `policy`.
pub fn read(
    name: &str,
    config_map: Option<&ConfigMap>,
    policy: &RequirementsPolicy,
) -> Result<FlowEnvironment, FlowProblem> {
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
    if let Some(file) = &requirements_file
        && !policy.allow_sources
    {
        let files = |key: &str| -> Option<String> {
            data.get(key).cloned().or_else(|| {
                let binary = config_map.binary_data.as_ref()?.get(key)?;
                Some(String::from_utf8_lossy(&binary.0).into_owned())
            })
        };
        if let Some(found) = source_option(&files, file, 0) {
            return Err(FlowProblem::Invalid(format!(
                "ConfigMap {name}, {found}; this cluster installs flow requirements only from the package index \
                 its administrator configured: remove the line (ask the administrator to add the index)"
            )));
        }
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
        let flow = read("chat-flow", Some(&cm), &RequirementsPolicy::default()).unwrap();
        assert_eq!(flow.image.as_deref(), Some("registry.example/team/flow:1.2"));
        assert_eq!(flow.requirements_file.as_deref(), Some("requirements.txt"));
        assert_eq!(flow.content_hash.len(), 16);
    }

    #[test]
    fn a_flow_without_environment_changes_nothing() {
        let flow = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "inputs: {}\nnodes: []\n")])),
            &RequirementsPolicy::default(),
        )
        .unwrap();
        assert_eq!((flow.image, flow.requirements_file), (None, None));
        assert!(
            read(
                "f",
                Some(&config_map(&[(FLOW_FILE, "")])),
                &RequirementsPolicy::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn missing_things_are_not_found_and_name_what_is_missing() {
        let err = read("chat-flow", None, &RequirementsPolicy::default()).unwrap_err();
        assert_eq!(err.reason(), "FlowNotFound");
        assert!(err.to_string().contains("chat-flow"));
        let err = read(
            "chat-flow",
            Some(&config_map(&[("other", "x")])),
            &RequirementsPolicy::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(FLOW_FILE));
        let err = read(
            "f",
            Some(&config_map(&[(
                FLOW_FILE,
                "environment: {python_requirements_txt: req.txt}",
            )])),
            &RequirementsPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "FlowNotFound");
        assert!(err.to_string().contains("req.txt"));
    }

    #[test]
    fn unparsable_yaml_and_bad_images_are_invalid_with_the_parser_message() {
        let err = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "environment: [unclosed")])),
            &RequirementsPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "FlowInvalid");
        assert!(err.to_string().contains("does not parse"), "{err}");
        let err = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "environment: {image: 'Not An Image!'}")])),
            &RequirementsPolicy::default(),
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
    fn requirement_files_naming_their_own_sources_are_refused_unless_allowed() {
        let flow = |requirements: &str| {
            config_map(&[
                (FLOW_FILE, "environment: {python_requirements_txt: requirements.txt}"),
                ("requirements.txt", requirements),
                ("more.txt", "--extra-index-url https://evil.example/simple\n"),
            ])
        };
        let strict = RequirementsPolicy::default();
        for (requirements, line, named) in [
            ("requests\n--index-url https://evil.example/simple\n", 2, "--index-url"),
            (
                "--extra-index-url=https://evil.example/simple\nrequests\n",
                1,
                "--extra-index-url",
            ),
            ("-ihttps://evil.example/simple\n", 1, "-i names"),
            ("requests\n\n-f /tmp/wheels\n", 3, "-f names"),
            ("--trusted-host evil.example\n", 1, "--trusted-host"),
            ("--no-index\n", 1, "--no-index"),
            ("-e git+https://evil.example/x.git#egg=x\n", 1, "-e names"),
            ("git+https://evil.example/x.git\n", 1, "VCS link"),
            ("x @ https://evil.example/x-1.0.tar.gz\n", 1, "direct URL"),
            ("requests \\\n  @ https://evil.example/r.whl\n", 1, "direct URL"),
            ("-r https://evil.example/r.txt\n", 1, "by URL"),
            ("# ours\n-r more.txt\n", 2, "more.txt line 1: --extra-index-url"),
        ] {
            let err = read("f", Some(&flow(requirements)), &strict).unwrap_err();
            assert_eq!(err.reason(), "FlowInvalid", "{requirements:?}");
            let message = err.to_string();
            assert!(
                message.contains(&format!("requirements.txt line {line}:")) && message.contains(named),
                "{requirements:?}: {message}"
            );
        }
        for fine in [
            "requests==2.32.3 --hash=sha256:0123\n",
            "# --index-url https://evil.example in a comment\nnumpy>=1.26 ; python_version >= '3.9'\n",
            "--only-binary :all:\n--pre\npandas  # see https://pandas.pydata.org\n",
            "-r extra.txt\n",
        ] {
            let mut files = flow(fine);
            files.data.as_mut().unwrap().insert("extra.txt".into(), "tqdm\n".into());
            assert!(read("f", Some(&files), &strict).is_ok(), "{fine:?}");
        }
        let open = RequirementsPolicy {
            allow_sources: true,
            ..Default::default()
        };
        assert!(
            read(
                "f",
                Some(&flow("--index-url https://mirror.example/simple\nrequests\n")),
                &open
            )
            .is_ok()
        );
    }

    #[test]
    fn a_content_change_changes_the_hash() {
        let a = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "inputs: {}")])),
            &RequirementsPolicy::default(),
        )
        .unwrap();
        let b = read(
            "f",
            Some(&config_map(&[(FLOW_FILE, "inputs: {x: 1}")])),
            &RequirementsPolicy::default(),
        )
        .unwrap();
        assert_ne!(a.content_hash, b.content_hash);
    }
}
