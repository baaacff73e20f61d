//! The activity proxy's timeouts and limits: flags of the `activity-proxy` subcommand, which the
//! operator sets on every runtime pod's sidecar from its own `--proxy-…` flags (chart values).

use std::time::Duration;

use clap::builder::TypedValueParser;

/// Requests to these paths with GET or HEAD are health checks: forwarded, never activity.
pub const DEFAULT_HEALTH_PATHS: &str = "/health,/healthz,/readyz";
/// A new connection must deliver a complete request head within this long.
pub const DEFAULT_HEADER_TIMEOUT: &str = "10s";
/// A connection with no request in progress is closed after this long.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: &str = "60s";
/// The runtime must start answering within this long; flows may run for minutes.
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "10m";
/// Open client connections at most; more are answered 503 and closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// The largest request head accepted (bytes); also each connection's read buffer bound.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// On SIGTERM, requests in flight may finish for this long.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "60s";
/// Open connections on the activity port at most (only the operator asks there).
pub const ACTIVITY_MAX_CONNECTIONS: usize = 64;

/// The proxy's timeouts and limits.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct ProxyLimits {
    /// Paths (comma-separated) whose GET and HEAD requests are health checks: forwarded to the
    /// runtime but never counted as activity.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_HEALTH_PATHS)]
    pub health_paths: Vec<String>,
    /// A connection must deliver a complete request head within this long of opening, or of the
    /// first byte of its next request (Go duration).
    #[arg(long, default_value = DEFAULT_HEADER_TIMEOUT, value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this long (Go duration).
    #[arg(long, default_value = DEFAULT_KEEP_ALIVE_TIMEOUT, value_parser = parse_duration)]
    pub keep_alive_timeout: Duration,
    /// The runtime must start answering within this long (the caller gets 504 after it), and a
    /// request whose bytes stop moving in both directions for this long is cut (Go duration).
    #[arg(long, default_value = DEFAULT_UPSTREAM_TIMEOUT, value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Open client connections at most; one more is answered 503 and closed.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub max_connections: usize,
    /// The largest request head accepted, in bytes (at least 8192); larger ones get 431.
    #[arg(long, default_value_t = DEFAULT_MAX_HEADER_BYTES, value_parser = clap::value_parser!(u32).range(8192..).map(|n| n as usize))]
    pub max_header_bytes: usize,
    /// On SIGTERM the proxy stops accepting and lets requests in flight finish for this long
    /// (the pod's terminationGracePeriodSeconds is this plus 5 s) (Go duration).
    #[arg(long, default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// A Go duration of at least a second (a zero timeout would refuse every request).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        crate::idle::parse_duration(text).ok_or_else(|| format!("{text:?} is not a Go duration such as 10s or 5m"))?;
    if duration < Duration::from_secs(1) {
        return Err(format!("{text:?} is too short: at least 1s"));
    }
    Ok(duration)
}

/// Only the limits, to read their defaults from the one place they are written (the flags).
#[derive(clap::Parser)]
struct LimitsOnly {
    #[command(flatten)]
    limits: ProxyLimits,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        <LimitsOnly as clap::Parser>::parse_from(["activity-proxy"]).limits
    }
}

impl ProxyLimits {
    /// The flags that give a proxy these limits.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--health-paths={}", self.health_paths.join(",")),
            format!("--header-timeout={}", go_duration(self.header_timeout)),
            format!("--keep-alive-timeout={}", go_duration(self.keep_alive_timeout)),
            format!("--upstream-timeout={}", go_duration(self.upstream_timeout)),
            format!("--max-connections={}", self.max_connections),
            format!("--max-header-bytes={}", self.max_header_bytes),
            format!("--drain-timeout={}", go_duration(self.drain_timeout)),
        ]
    }

    /// The pod's `terminationGracePeriodSeconds`: the drain, and 5 s to exit.
    pub fn termination_grace_seconds(&self) -> i64 {
        i64::try_from(self.drain_timeout.as_secs()).unwrap_or(i64::MAX / 2) + 5
    }

    /// Whether a request is a health check (never activity).
    pub fn is_health_check(&self, method: &http::Method, path: &str) -> bool {
        (method == http::Method::GET || method == http::Method::HEAD) && self.health_paths.iter().any(|p| p == path)
    }
}

/// A duration as a Go duration flag, exact to the millisecond.
fn go_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        crate::idle::format_duration(duration)
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_defaults_render_to_flags_that_parse_back_to_them() {
        let limits = ProxyLimits::default();
        assert_eq!(limits.header_timeout, Duration::from_secs(10));
        assert_eq!(limits.upstream_timeout, Duration::from_secs(600));
        assert_eq!(limits.termination_grace_seconds(), 65);
        let tuned = ProxyLimits {
            health_paths: vec!["/ping".into()],
            header_timeout: Duration::from_millis(1500),
            max_connections: 7,
            ..limits
        };
        let parsed = LimitsOnly::parse_from(std::iter::once("activity-proxy".to_owned()).chain(tuned.args())).limits;
        assert_eq!(parsed, tuned);
    }

    #[test]
    fn only_gets_and_heads_of_the_listed_paths_are_health_checks() {
        let limits = ProxyLimits::default();
        assert!(limits.is_health_check(&http::Method::GET, "/health"));
        assert!(limits.is_health_check(&http::Method::HEAD, "/readyz"));
        assert!(!limits.is_health_check(&http::Method::POST, "/health"));
        assert!(!limits.is_health_check(&http::Method::GET, "/score"));
        assert!(!limits.is_health_check(&http::Method::GET, "/health/deep"));
    }

    #[test]
    fn bad_limits_are_refused_at_start() {
        let parse = |flag: &str| LimitsOnly::try_parse_from(["activity-proxy", flag]).map(|_| ());
        assert!(parse("--max-header-bytes=100").is_err());
        assert!(parse("--max-connections=0").is_err());
        assert!(parse("--header-timeout=soon").is_err());
        assert!(parse("--upstream-timeout=0s").is_err());
        assert!(parse("--drain-timeout=500ms").is_err());
    }
}
