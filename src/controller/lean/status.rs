//! A runtime's status as the caches keep it. Most of a status is the same text in every runtime
//! (six conditions whose types, reasons and messages repeat; the image, version and instance
//! type), so each distinct string and each distinct condition text is kept once and shared: a
//! `Running` runtime's status took about 1.6 KiB as JSON and more as a typed value, and takes a
//! few hundred bytes here. Each condition keeps its own transition time and generation.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{HandledActions, PromptFlowRuntimeStatus, RuntimePhase};

/// The shared copies alive. A value only the table holds is dropped when the table has doubled
/// since it was last swept, so the table stays within twice the values in use.
struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized> Default for Table<T> {
    fn default() -> Self {
        Self {
            values: HashSet::new(),
            sweep_at: 64,
        }
    }
}

/// The shared copy of `value`, made by `make` when none is alive.
fn shared<T, Q>(table: &Mutex<Table<T>>, value: &Q, make: impl FnOnce() -> Arc<T>) -> Arc<T>
where
    T: ?Sized + Hash + Eq,
    Q: ?Sized + Hash + Eq,
    Arc<T>: Borrow<Q>,
{
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = table.values.get(value) {
        return found.clone();
    }
    if table.values.len() >= table.sweep_at {
        table.values.retain(|v| Arc::strong_count(v) > 1);
        let kept = table.values.len();
        table.values.shrink_to(kept * 2);
        table.sweep_at = (kept * 2).max(64);
    }
    let made = make();
    table.values.insert(made.clone());
    made
}

static STRINGS: LazyLock<Mutex<Table<str>>> = LazyLock::new(Default::default);
static TEXTS: LazyLock<Mutex<Table<ConditionText>>> = LazyLock::new(Default::default);

/// The shared copy of a string (also for the pod cache's repeated names and reasons).
pub(crate) fn text(value: &str) -> Arc<str> {
    shared(&STRINGS, value, || Arc::from(value))
}

fn text_of(value: Option<&String>) -> Option<Arc<str>> {
    value.map(|v| text(v))
}

fn owned(value: Option<&Arc<str>>) -> Option<String> {
    value.map(|v| v.to_string())
}

/// What a condition says, apart from when and for which generation.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ConditionText {
    type_: Arc<str>,
    status: Arc<str>,
    reason: Arc<str>,
    message: Arc<str>,
}

#[derive(Clone, Debug)]
struct LeanCondition {
    text: Arc<ConditionText>,
    at: Time,
    generation: Option<i64>,
}

/// A runtime's status, its strings and condition texts shared with the other runtimes'.
#[derive(Clone, Debug)]
pub struct LeanStatus {
    phase: RuntimePhase,
    reason: Option<Arc<str>>,
    message: Option<Arc<str>>,
    observed_generation: Option<i64>,
    compute: Option<Arc<str>>,
    instance_type: Option<Arc<str>>,
    image: Option<Arc<str>>,
    version: Option<Arc<str>>,
    latest_version: Option<Arc<str>>,
    url: Option<Arc<str>>,
    last_activity_time: Option<Time>,
    handled_actions: Option<Box<HandledActions>>,
    conditions: Box<[LeanCondition]>,
}

impl From<&PromptFlowRuntimeStatus> for LeanStatus {
    fn from(status: &PromptFlowRuntimeStatus) -> Self {
        let conditions = status
            .conditions
            .iter()
            .map(|c| {
                let said = ConditionText {
                    type_: text(&c.type_),
                    status: text(&c.status),
                    reason: text(&c.reason),
                    message: text(&c.message),
                };
                LeanCondition {
                    text: shared(&TEXTS, &said, || Arc::new(said.clone())),
                    at: c.last_transition_time.clone(),
                    generation: c.observed_generation,
                }
            })
            .collect();
        Self {
            phase: status.phase,
            reason: text_of(status.reason.as_ref()),
            message: text_of(status.message.as_ref()),
            observed_generation: status.observed_generation,
            compute: text_of(status.compute.as_ref()),
            instance_type: text_of(status.instance_type.as_ref()),
            image: text_of(status.image.as_ref()),
            version: text_of(status.version.as_ref()),
            latest_version: text_of(status.latest_version.as_ref()),
            url: text_of(status.url.as_ref()),
            last_activity_time: status.last_activity_time.clone(),
            handled_actions: status.handled_actions.clone().map(Box::new),
            conditions,
        }
    }
}

impl LeanStatus {
    /// The status as the API types it (built per read).
    pub fn full(&self) -> PromptFlowRuntimeStatus {
        PromptFlowRuntimeStatus {
            phase: self.phase,
            reason: owned(self.reason.as_ref()),
            message: owned(self.message.as_ref()),
            observed_generation: self.observed_generation,
            compute: owned(self.compute.as_ref()),
            instance_type: owned(self.instance_type.as_ref()),
            image: owned(self.image.as_ref()),
            version: owned(self.version.as_ref()),
            latest_version: owned(self.latest_version.as_ref()),
            url: owned(self.url.as_ref()),
            last_activity_time: self.last_activity_time.clone(),
            handled_actions: self.handled_actions.as_deref().cloned(),
            conditions: self
                .conditions
                .iter()
                .map(|c| Condition {
                    type_: c.text.type_.to_string(),
                    status: c.text.status.to_string(),
                    reason: c.text.reason.to_string(),
                    message: c.text.message.to_string(),
                    last_transition_time: c.at.clone(),
                    observed_generation: c.generation,
                })
                .collect(),
        }
    }

    /// `status.phase`.
    pub fn phase(&self) -> RuntimePhase {
        self.phase
    }

    /// `status.reason`.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// `status.compute`.
    pub fn compute(&self) -> Option<&str> {
        self.compute.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pod: &str) -> PromptFlowRuntimeStatus {
        serde_json::from_value(serde_json::json!({
            "phase": "Running", "reason": "PodReady", "message": format!("pod {pod} is Ready at 10.0.0.1"),
            "observedGeneration": 3, "compute": "Serverless", "instanceType": "Standard_D2s_v3",
            "image": "r.example/rt:20240222.v4", "version": "20240222.v4", "latestVersion": "20240301.v1",
            "url": format!("http://{pod}.a.svc:8081"), "lastActivityTime": "2026-01-01T00:00:00Z",
            "handledActions": {"update": "1"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "PodReady", "message": format!("pod {pod} is Ready"),
                 "lastTransitionTime": "2026-01-01T00:00:01Z", "observedGeneration": 3},
                {"type": "SpecApplied", "status": "True", "reason": "SpecApplied",
                 "message": "the pod is built from the runtime's current spec", "lastTransitionTime": "2026-01-01T00:00:02Z"},
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_lean_status_reads_back_as_it_was() {
        let typed = status("a");
        assert_eq!(LeanStatus::from(&typed).full(), typed);
        let empty = PromptFlowRuntimeStatus::default();
        assert_eq!(LeanStatus::from(&empty).full(), empty);
    }

    #[test]
    fn runtimes_share_their_common_texts() {
        let (a, b) = (LeanStatus::from(&status("a")), LeanStatus::from(&status("b")));
        assert!(Arc::ptr_eq(a.image.as_ref().unwrap(), b.image.as_ref().unwrap()));
        assert!(
            Arc::ptr_eq(&a.conditions[1].text, &b.conditions[1].text),
            "SpecApplied says the same"
        );
        assert!(
            !Arc::ptr_eq(&a.conditions[0].text, &b.conditions[0].text),
            "Ready names the pod"
        );
        assert!(Arc::ptr_eq(&a.conditions[0].text.type_, &b.conditions[0].text.type_));
    }

    #[test]
    fn texts_no_runtime_holds_are_swept_when_the_table_doubles() {
        let table: Mutex<Table<str>> = Mutex::default();
        let kept: Vec<Arc<str>> = (0..10)
            .map(|i| {
                let value = format!("kept-{i}");
                shared(&table, value.as_str(), || Arc::from(value.as_str()))
            })
            .collect();
        for i in 0..1000 {
            let gone = format!("gone-{i}");
            drop(shared(&table, gone.as_str(), || Arc::from(gone.as_str())));
        }
        let left = table.lock().unwrap().values.len();
        assert!(left <= 2 * 64 + kept.len(), "{left} values kept");
        let again = shared(&table, "kept-3", || Arc::from("new"));
        assert!(Arc::ptr_eq(&again, &kept[3]), "a value in use is the one shared");
    }
}
