//! Watch health: whether every watch the operator runs is delivering. A watch that keeps failing
//! (API server gone, RBAC revoked, a resource version it cannot resume from) makes the operator
//! blind while its process looks fine; `/readyz` and `/healthz` read this to say so.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per watch, since when it has been failing without a success in between.
#[derive(Default)]
pub struct WatchHealth {
    failing_since: Mutex<BTreeMap<&'static str, Instant>>,
}

/// The verdict on all watches at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchReport {
    /// The watch that has been failing longest, and for how long.
    pub worst: Option<(&'static str, Duration)>,
}

impl WatchReport {
    /// Whether no watch has been failing for longer than `bound`.
    pub fn within(&self, bound: Duration) -> bool {
        self.worst.is_none_or(|(_, failing)| failing <= bound)
    }

    /// A sentence for the health endpoints.
    pub fn describe(&self) -> String {
        match self.worst {
            None => "every watch is delivering".to_owned(),
            Some((watch, failing)) => format!("the {watch} watch has been failing for {}s", failing.as_secs()),
        }
    }
}

impl WatchHealth {
    /// Records one item of the watch `name`: `ok` ends a failure streak, an error starts one.
    pub fn observe(&self, name: &'static str, ok: bool) {
        let mut failing = self.failing_since.lock().expect("watch health lock");
        if ok {
            failing.remove(name);
        } else {
            failing.entry(name).or_insert_with(Instant::now);
        }
    }

    /// The state of every watch now.
    pub fn report(&self) -> WatchReport {
        let failing = self.failing_since.lock().expect("watch health lock");
        let worst = failing
            .iter()
            .map(|(name, since)| (*name, since.elapsed()))
            .max_by_key(|(_, elapsed)| *elapsed);
        WatchReport { worst }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_ends_the_failure_streak() {
        let health = WatchHealth::default();
        assert!(health.report().within(Duration::ZERO));
        health.observe("pods", false);
        std::thread::sleep(Duration::from_millis(5));
        health.observe("pods", false);
        let report = health.report();
        assert_eq!(report.worst.map(|(name, _)| name), Some("pods"));
        assert!(!report.within(Duration::from_millis(1)), "{report:?}");
        assert!(report.within(Duration::from_secs(60)));
        assert!(report.describe().contains("pods watch"));
        health.observe("pods", true);
        assert_eq!(health.report().worst, None);
    }
}
