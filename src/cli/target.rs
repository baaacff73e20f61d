//! The object a subcommand acts on: `NAME` (a runtime), or `KIND/NAME` with the kinds' names,
//! short names and plurals as kubectl knows them.

use std::fmt;
use std::str::FromStr;

/// One of the two kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `PromptFlowRuntime`.
    Runtime,
    /// `ComputeInstance`.
    Instance,
}

impl Kind {
    /// How messages name the kind.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Runtime => "runtime",
            Kind::Instance => "compute instance",
        }
    }

    /// The `KIND/` prefix that names it on the command line.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Runtime => "pfrt",
            Kind::Instance => "pfci",
        }
    }
}

/// What a subcommand acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The kind.
    pub kind: Kind,
    /// The object's name.
    pub name: String,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, name) = match text.split_once('/') {
            None => (Kind::Runtime, text),
            Some((kind, name)) => {
                let kind = match kind.to_ascii_lowercase().as_str() {
                    "pfrt"
                    | "promptflowruntime"
                    | "promptflowruntimes"
                    | "runtime"
                    | "runtimes"
                    | "promptflowruntimes.promptflow.dev" => Kind::Runtime,
                    "pfci"
                    | "computeinstance"
                    | "computeinstances"
                    | "instance"
                    | "instances"
                    | "computeinstances.promptflow.dev" => Kind::Instance,
                    other => {
                        return Err(format!(
                            "unknown kind {other:?}: use pfrt/NAME (a runtime) or pfci/NAME (a compute instance)"
                        ));
                    }
                };
                (kind, name)
            }
        };
        if name.is_empty() {
            return Err("a name is needed: NAME, pfrt/NAME or pfci/NAME".into());
        }
        let valid = name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid {
            return Err(format!(
                "{name:?} is not an object name (lowercase letters, digits, '-' and '.')"
            ));
        }
        Ok(Target {
            kind,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_a_runtime_and_kinds_take_kubectls_names() {
        assert_eq!(
            "chat".parse(),
            Ok(Target {
                kind: Kind::Runtime,
                name: "chat".into()
            })
        );
        assert_eq!(
            "pfci/gpu".parse(),
            Ok(Target {
                kind: Kind::Instance,
                name: "gpu".into()
            })
        );
        assert_eq!(
            "computeinstances.promptflow.dev/gpu".parse::<Target>().map(|t| t.kind),
            Ok(Kind::Instance)
        );
        assert_eq!(
            "PromptFlowRuntime/chat".parse::<Target>().map(|t| t.kind),
            Ok(Kind::Runtime)
        );
        assert!("pod/chat".parse::<Target>().unwrap_err().contains("pfrt/NAME"));
        assert!("pfrt/".parse::<Target>().is_err());
        assert!("pfrt/chat/status".parse::<Target>().is_err(), "no subresource paths");
    }
}
