//! Reading the events the operator publishes (events.k8s.io/v1), for the e2e tests: by object,
//! counted across their series (a repeated event is one object with a count).

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use tokio::time::{Instant, sleep};

use crate::harness::TestNamespace;

const EVENT_WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(250);

/// The events about the `kind` object `name`.
pub async fn events_about(ns: &TestNamespace, kind: &str, name: &str) -> Vec<Event> {
    let events = ns.api::<Event>().list(&ListParams::default()).await.unwrap();
    events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect()
}

/// How often `reason` was recorded: a repeated event is one Event object with a series count.
pub fn times(events: &[Event], reason: &str) -> i32 {
    events
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum()
}

/// "type reason ×count: note" of each event, for failure messages.
fn describe(events: &[Event]) -> Vec<String> {
    let count = |e: &Event| e.series.as_ref().map_or(1, |s| s.count);
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} x{}: {}",
                e.type_.as_deref().unwrap_or_default(),
                e.reason.as_deref().unwrap_or_default(),
                count(e),
                e.note.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

/// Waits until an event about the object satisfies `check`.
pub async fn wait_event(ns: &TestNamespace, kind: &str, name: &str, what: &str, check: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let events = events_about(ns, kind, name).await;
        if events.iter().any(&check) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event about {kind} {name}: {:?}",
            describe(&events)
        );
        sleep(POLL).await;
    }
}

/// Waits until an event with `reason` about the object exists.
pub async fn wait_reason(ns: &TestNamespace, kind: &str, name: &str, reason: &str) {
    wait_event(ns, kind, name, reason, |e| e.reason.as_deref() == Some(reason)).await;
}

/// Asserts that `reason` was recorded exactly `expected` times about the object (giving a late
/// event a moment to arrive).
pub async fn assert_event_times(ns: &TestNamespace, kind: &str, name: &str, reason: &str, expected: i32) {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let events = events_about(ns, kind, name).await;
        let seen = times(&events, reason);
        if seen >= expected || Instant::now() >= deadline {
            assert_eq!(
                seen,
                expected,
                "{reason} events about {kind} {name}: {:?}",
                describe(&events)
            );
            return;
        }
        sleep(POLL).await;
    }
}
