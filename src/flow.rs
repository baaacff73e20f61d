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

/// Options a requirements file may carry: they choose among the index's files, never a source.
const ALLOWED_OPTIONS: [&str; 3] = ["--pre", "--prefer-binary", "--require-hashes"];
/// Allowed options that take a value (`--only-binary :all:` or `--only-binary=:all:`).
const ALLOWED_VALUE_OPTIONS: [&str; 2] = ["--only-binary", "--no-binary"];
/// Includes, followed into the folder's own files.
const INCLUDES: [&str; 4] = ["-r", "--requirement", "-c", "--constraint"];

/// Lines as Python's `str.splitlines` cuts them (pip reads files so): besides `\n`, `\r\n` and
/// `\r`, also form feeds, group separators, NEL and the Unicode line separators.
fn python_lines(text: &str) -> Vec<&str> {
    let mut lines = vec![];
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let breaks = matches!(
            c,
            '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
        );
        if breaks {
            lines.push(&text[start..at]);
            let mut next = at + c.len_utf8();
            if c == '\r' && chars.peek().is_some_and(|(_, n)| *n == '\n') {
                chars.next();
                next += 1;
            }
            start = next;
        }
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// pip's comment rule: `#` at the start of a line or after whitespace starts a comment.
fn without_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (at, b) in bytes.iter().enumerate() {
        if *b == b'#' && (at == 0 || bytes[at - 1].is_ascii_whitespace()) {
            return &line[..at];
        }
    }
    line
}

/// The first line of requirements file `file` (and of the folder's files it includes with `-r`
/// or `-c`) that could take packages from elsewhere than the configured index. An allowlist:
/// each line is a package name with versions, extras and markers (and `--hash` options), an
/// include of another file of the folder, or one of [`ALLOWED_OPTIONS`]. Lines are joined and
/// comments dropped as pip does. `Some("requirements.txt line 3: …")`.
fn source_option(files: &dyn Fn(&str) -> Option<String>, file: &str, depth: usize) -> Option<String> {
    let text = files(file)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut logical = String::new();
    let mut first_line = 0;
    for (index, raw) in python_lines(text).into_iter().enumerate() {
        if logical.is_empty() {
            first_line = index + 1;
        }
        let comment = raw.trim_start().starts_with('#');
        if !comment && let Some(joined) = raw.strip_suffix('\\') {
            logical.push_str(joined);
            continue;
        }
        logical.push_str(raw);
        let line = std::mem::take(&mut logical);
        let line = without_comment(&line).trim();
        if line.is_empty() {
            continue;
        }
        if let Some(found) = source_in_line(files, line, depth) {
            return Some(format!("{file} line {first_line}: {found}"));
        }
    }
    None
}

fn source_in_line(files: &dyn Fn(&str) -> Option<String>, line: &str, depth: usize) -> Option<String> {
    if line.contains("${") {
        return Some(format!(
            "{line:?} uses an environment variable, which pip expands after this check"
        ));
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let first = tokens[0];
    if first.starts_with('-') {
        let mut rest = tokens.iter().copied();
        while let Some(token) = rest.next() {
            if ALLOWED_OPTIONS.contains(&token)
                || ALLOWED_VALUE_OPTIONS
                    .iter()
                    .any(|o| token.starts_with(&format!("{o}=")))
            {
                continue;
            }
            if ALLOWED_VALUE_OPTIONS.contains(&token) {
                rest.next();
                continue;
            }
            let include = INCLUDES.iter().find_map(|option| {
                if token == *option {
                    Some(rest.next().unwrap_or_default())
                } else if option.starts_with("--") {
                    token.strip_prefix(&format!("{option}="))
                } else {
                    token
                        .strip_prefix(option)
                        .filter(|r| !r.is_empty() && !r.starts_with('-'))
                }
            });
            match include {
                Some(target) if !target.is_empty() && !target.contains('/') && files(target).is_some() => {
                    if depth >= 8 {
                        return Some(format!("{token} {target}: requirement files included more than 8 deep"));
                    }
                    if let Some(found) = source_option(files, target, depth + 1) {
                        return Some(format!("included from here: {found}"));
                    }
                }
                Some(target) => {
                    return Some(format!(
                        "{token} {target:?} is not a file of the flow folder (a ConfigMap key, named as it is)"
                    ));
                }
                None => {
                    return Some(format!(
                        "{token} is not allowed: only -r/-c of the folder's files and {}, {} may appear (index and source options, abbreviated or not, name a package source)",
                        ALLOWED_OPTIONS.join(", "),
                        ALLOWED_VALUE_OPTIONS.join(", ")
                    ));
                }
            }
        }
        return None;
    }
    // A requirement: a name, then extras, versions and markers; per-requirement options only
    // `--hash`.
    let options_at = tokens.iter().position(|t| t.starts_with("--")).unwrap_or(tokens.len());
    for option in &tokens[options_at..] {
        if !option.starts_with("--hash=") && !option.starts_with("sha256:") && *option != "--hash" {
            return Some(format!("{option} is not allowed after a requirement (only --hash)"));
        }
    }
    let requirement = tokens[..options_at].join(" ");
    let name_end = requirement
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .unwrap_or(requirement.len());
    let named = name_end > 0 && requirement.as_bytes()[0].is_ascii_alphanumeric();
    let rest = &requirement[name_end..];
    if !named || rest.contains(['@', '/', '\\']) || rest.contains("://") {
        return Some(format!(
            "{requirement:?} is not a package name with versions and markers (direct URLs, VCS links, paths and archives come from outside the index)"
        ));
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
            (
                "requests\n--index-url https://evil.example/simple\n",
                2,
                "--index-url is not allowed",
            ),
            (
                "--extra-index-url=https://evil.example/simple\nrequests\n",
                1,
                "--extra-index-url=",
            ),
            ("-ihttps://evil.example/simple\n", 1, "-ihttps"),
            ("requests\n\n-f /tmp/wheels\n", 3, "-f is not allowed"),
            ("--trusted-host evil.example\n", 1, "--trusted-host"),
            ("--no-index\n", 1, "--no-index"),
            ("-e git+https://evil.example/x.git#egg=x\n", 1, "-e is not allowed"),
            ("git+https://evil.example/x.git\n", 1, "not a package name"),
            ("x @ https://evil.example/x-1.0.tar.gz\n", 1, "not a package name"),
            ("requests \\\n  @ https://evil.example/r.whl\n", 1, "not a package name"),
            ("-r https://evil.example/r.txt\n", 1, "not a file of the flow folder"),
            ("# ours\n-r more.txt\n", 2, "more.txt line 1: --extra-index-url"),
            // What pip also honours: other options first, abbreviations, a comment ending in a
            // backslash, paths, environment variables, Python's other line breaks, a BOM.
            (
                "--pre --index-url https://evil.example/simple\n",
                1,
                "--index-url is not allowed",
            ),
            ("--prefer-binary -f https://evil.example/w/\n", 1, "-f is not allowed"),
            ("--extra https://evil.example/simple\n", 1, "--extra is not allowed"),
            ("--find https://evil.example/w/\n", 1, "--find is not allowed"),
            ("--req more.txt\n", 1, "--req is not allowed"),
            ("# note \\\n--index-url https://evil.example/simple\n", 2, "--index-url"),
            ("-r /flow/more.txt\n", 1, "not a file of the flow folder"),
            ("-r 'more.txt'\n", 1, "not a file of the flow folder"),
            ("/flow/evil-1.0-py3-none-any.whl\n", 1, "not a package name"),
            ("./evil.tar.gz\n", 1, "not a package name"),
            ("requests ${EVIL}\n", 1, "environment variable"),
            ("requests\u{0c}-f .\n", 2, "-f is not allowed"),
            ("requests\u{2028}--index-url=https://evil.example\n", 2, "--index-url="),
            ("\u{feff}-f ./w\n", 1, "-f is not allowed"),
            ("requests --global-option=--evil\n", 1, "only --hash"),
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
            "promptflow[azure]>=1.10,<2 \\\n  ; platform_machine == 'x86_64'\r\nlangchain_core~=0.2\n",
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
