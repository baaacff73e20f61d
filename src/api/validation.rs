//! Apply-time validation: the patterns and CEL rules the API server enforces, so bad YAML is
//! rejected by `kubectl apply` with a message that names the field. What can only be known at run
//! time (a missing service account, an unknown time zone) becomes a condition instead.

use kube::core::{Rule, cel::Message};

/// A Go duration as Kubernetes writes them (`90s`, `15m`, `1h30m`, `72h`), or `0`.
pub const GO_DURATION: &str = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$";
/// A DNS-1123 subdomain: the form of ConfigMap, ServiceAccount and custom resource names.
pub const DNS1123_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An image repository without tag or digest: optional `host[:port]/` and lowercase path parts.
/// All lowercase: container runtimes refuse upper-case repository paths (InvalidImageName), and
/// registry hosts are case-insensitive, so lowercase is always right.
pub const IMAGE_REPOSITORY: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$";
/// An image version: a tag (`20240222.v4`, `latest`) or a digest (`sha256:` and 64 hex digits).
pub const IMAGE_VERSION: &str = r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[a-f0-9]{64})$";
/// A Kubernetes quantity (`500m`, `2`, `8Gi`, `1e3`), the API server's own grammar.
pub const QUANTITY: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";
/// An instance type name as the catalog spells them (`Standard_E4ds_v4`).
pub const INSTANCE_TYPE: &str = r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$";
/// An IANA time zone name (`UTC`, `Europe/Berlin`, `America/Argentina/Buenos_Aires`, `Etc/GMT+2`).
pub const TIME_ZONE: &str = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$";

/// One field of a five-field cron expression: `*`, a value, a range, a list, each with a step.
fn cron_field(value: &str) -> String {
    let item = format!(r"(\*|{value}(-{value})?)(/[0-9]{{1,2}})?");
    format!("{item}(,{item})*")
}

/// A five-field cron expression (minute hour day-of-month month day-of-week), values in range.
pub fn cron_pattern() -> String {
    let minute = cron_field("[0-5]?[0-9]");
    let hour = cron_field("([01]?[0-9]|2[0-3])");
    let day = cron_field("(0?[1-9]|[12][0-9]|3[01])");
    let month = cron_field("(0?[1-9]|1[0-2]|(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec))");
    let weekday = cron_field("([0-7]|(?i:sun|mon|tue|wed|thu|fri|sat))");
    format!("^{minute} {hour} {day} {month} {weekday}$")
}

/// CEL: the string matches `pattern`; the message names `field`.
pub fn matches(pattern: &str, message: &str) -> Rule {
    Rule::new(format!("self.matches('{}')", escape_cel(pattern))).message(Message::Message(message.to_owned()))
}

/// CEL: a Go duration between `min` and `max` (or exactly `0` when `allow_zero`).
pub fn duration_between(min: &str, max: &str, allow_zero: bool, message: &str) -> Rule {
    let zero = if allow_zero { "self == '0' || " } else { "" };
    // Guarded by the format check so a malformed value reports the format message, not a CEL error.
    let rule = format!(
        "!self.matches('{re}') || {zero}(duration(self) >= duration('{min}') && duration(self) <= duration('{max}'))",
        re = escape_cel(GO_DURATION),
    );
    Rule::new(rule).message(Message::Message(message.to_owned()))
}

/// Escapes a regular expression for a single-quoted CEL string literal.
fn escape_cel(pattern: &str) -> String {
    pattern.replace('\\', "\\\\").replace('\'', "\\'")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server evaluates these with RE2; Rust's `regex` implements the same syntax here.
    fn full_match(pattern: &str, input: &str) -> bool {
        regex::Regex::new(pattern).unwrap().is_match(input)
    }

    #[test]
    fn cron_accepts_common_schedules() {
        let cron = cron_pattern();
        for ok in [
            "0 19 * * 1-5",
            "*/15 * * * *",
            "30 7 1,15 * MON-FRI",
            "0 0 1 jan *",
            "5 4 * * sun",
        ] {
            assert!(full_match(&cron, ok), "{ok} should be accepted");
        }
    }

    #[test]
    fn cron_rejects_out_of_range_and_wrong_arity() {
        let cron = cron_pattern();
        for bad in [
            "60 * * * *",
            "0 24 * * *",
            "0 0 32 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "* * * *",
            "@daily",
            "0 19 * * 1-5 *",
        ] {
            assert!(!full_match(&cron, bad), "{bad} should be rejected");
        }
    }

    #[test]
    fn go_durations() {
        for ok in ["0", "15m", "1h30m", "72h", "90s", "1.5h"] {
            assert!(full_match(GO_DURATION, ok), "{ok}");
        }
        for bad in ["", "1d", "one hour", "-5m", "15", "PT1H"] {
            assert!(!full_match(GO_DURATION, bad), "{bad}");
        }
    }

    #[test]
    fn image_references() {
        for ok in [
            "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable",
            "127.0.0.1:5000/azureml/promptflow/promptflow-runtime-stable",
            "localhost:5000/runtime",
            "runtime",
        ] {
            assert!(full_match(IMAGE_REPOSITORY, ok), "{ok}");
        }
        for bad in [
            "",
            "Runtime/UPPER",
            "repo:tag",
            "repo@sha256:abc",
            "/leading",
            "MCR.Microsoft.com/azureml/runtime",
            "MyOrg/runtime",
        ] {
            assert!(!full_match(IMAGE_REPOSITORY, bad), "{bad}");
        }
        for ok in ["20240222.v4", "latest", &format!("sha256:{}", "a".repeat(64))] {
            assert!(full_match(IMAGE_VERSION, ok), "{ok}");
        }
        for bad in ["", ".hidden", "sha256:short", "has space", &"x".repeat(129)] {
            assert!(!full_match(IMAGE_VERSION, bad), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        for ok in ["500m", "2", "8Gi", "1.5", "1e3", "+4", ".5Mi"] {
            assert!(full_match(QUANTITY, ok), "{ok}");
        }
        for bad in ["lots", "8 GB", "8GB", "", "2cpu", "Gi"] {
            assert!(!full_match(QUANTITY, bad), "{bad}");
        }
    }

    #[test]
    fn cel_literals_escape_backslashes() {
        let rule = matches(r"^a\.b$", "x");
        assert_eq!(rule.rule, r"self.matches('^a\\.b$')");
    }
}
