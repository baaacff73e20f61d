//! Publishes Kubernetes events (`events.k8s.io/v1`), folding a repeat of the same event within six
//! minutes into a series on the first one, as kubectl and client-go expect.
//!
//! kube's `Recorder` does the same but keeps a full copy of every event it published (the object
//! reference, the note, the whole Event) for six minutes, and scans all of them on every publish:
//! at 10,000 runtimes, two events each, that is tens of MiB and a quadratic scan. Here the memory
//! of a published event is a 64-bit fingerprint of what makes it "the same" (type, reason,
//! action, note, the object), the event's name, its count and when it was last seen; expiry walks
//! a queue in time order, so a publish costs O(1) amortised.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// Repeats within this long become a series of the first event.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Normal or Warning.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// One event to publish about an object.
pub struct Draft<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

struct Published {
    name: Box<str>,
    count: i32,
    last: Instant,
}

#[derive(Default)]
struct Memory {
    published: HashMap<u64, Published>,
    /// (when, fingerprint) in publish order; an entry is dropped when its event was not seen again.
    expiry: VecDeque<(Instant, u64)>,
}

/// Publishes events as `controller` (and `instance`, the operator's pod, when known).
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    memory: Mutex<Memory>,
}

impl Recorder {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            memory: Mutex::default(),
        }
    }

    /// Creates the event, or adds one to the series of the same event published less than six
    /// minutes ago.
    pub async fn publish(&self, draft: &Draft<'_>, regarding: &ObjectReference) -> kube::Result<()> {
        let fingerprint = fingerprint(draft, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let now = Instant::now();
        let repeat = {
            let mut memory = self.memory.lock().expect("recorder lock");
            memory.expire(now);
            memory.published.get_mut(&fingerprint).map(|seen| {
                seen.count += 1;
                seen.last = now;
                (seen.name.to_string(), seen.count)
            })
        };
        let stamp = MicroTime(Timestamp::now());
        if let Some((name, count)) = repeat {
            let series = serde_json::json!({"series": EventSeries { count, last_observed_time: stamp }});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(series)).await?;
            return Ok(());
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            stamp.0.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            action: Some(draft.action.to_owned()),
            reason: Some(draft.reason.to_owned()),
            note: Some(draft.note.to_owned()),
            type_: Some(format!("{:?}", draft.type_)),
            event_time: Some(stamp),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        let mut memory = self.memory.lock().expect("recorder lock");
        memory.published.insert(
            fingerprint,
            Published {
                name: name.into(),
                count: 1,
                last: now,
            },
        );
        memory.expiry.push_back((now, fingerprint));
        Ok(())
    }

    /// How many published events are remembered (for tests).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.memory.lock().unwrap().published.len()
    }
}

impl Memory {
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, fingerprint)) = self.expiry.front() {
            if now.duration_since(at) < SERIES_WINDOW {
                break;
            }
            self.expiry.pop_front();
            let Some(seen) = self.published.get(&fingerprint) else {
                continue;
            };
            if now.duration_since(seen.last) >= SERIES_WINDOW {
                self.published.remove(&fingerprint);
            } else {
                // Seen again since: look at it once more when its own window ends.
                let last = seen.last;
                self.expiry.push_back((last, fingerprint));
            }
        }
    }
}

/// What makes two events the same event.
fn fingerprint(draft: &Draft<'_>, regarding: &ObjectReference) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (draft.type_, draft.reason, draft.action, draft.note).hash(&mut hasher);
    (&regarding.kind, &regarding.namespace, &regarding.name, &regarding.uid).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_forgets_an_event_six_minutes_after_it_was_last_seen() {
        let start = Instant::now();
        let mut memory = Memory::default();
        for (fingerprint, at) in [(1, 0), (2, 60)] {
            let last = start + Duration::from_secs(at);
            memory.published.insert(
                fingerprint,
                Published {
                    name: "e".into(),
                    count: 1,
                    last,
                },
            );
            memory.expiry.push_back((last, fingerprint));
        }
        // Event 1 was seen again at 300 s.
        memory.published.get_mut(&1).unwrap().last = start + Duration::from_secs(300);
        memory.expire(start + Duration::from_secs(361));
        assert!(
            memory.published.contains_key(&1),
            "seen again at 300 s: kept until 660 s"
        );
        assert!(memory.published.contains_key(&2), "last seen at 60 s: kept until 420 s");
        memory.expire(start + Duration::from_secs(421));
        assert!(!memory.published.contains_key(&2));
        assert!(memory.published.contains_key(&1));
        memory.expire(start + Duration::from_secs(661));
        assert!(memory.published.is_empty() && memory.expiry.is_empty());
    }

    fn runtime_reference() -> ObjectReference {
        ObjectReference {
            kind: Some("PromptFlowRuntime".into()),
            namespace: Some("a".into()),
            name: Some("rt".into()),
            uid: Some("u".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_event_is_the_same_fingerprint_and_a_different_note_is_not() {
        let regarding = runtime_reference();
        let notice = |note| Draft {
            type_: EventType::Normal,
            reason: "Running",
            action: "Reconcile",
            note,
        };
        assert_eq!(
            fingerprint(&notice("x"), &regarding),
            fingerprint(&notice("x"), &regarding)
        );
        assert_ne!(
            fingerprint(&notice("x"), &regarding),
            fingerprint(&notice("y"), &regarding)
        );
        let other = ObjectReference {
            uid: Some("v".into()),
            ..regarding.clone()
        };
        assert_ne!(fingerprint(&notice("x"), &regarding), fingerprint(&notice("x"), &other));
    }

    #[tokio::test]
    async fn a_repeat_patches_the_series_of_the_first_event_and_a_new_note_creates_one() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let recorder = Recorder::new(
            Client::new(service, "default"),
            "promptflow-operator",
            Some("pod-1".into()),
        );
        let regarding = runtime_reference();
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for _ in 0..3 {
                let (request, respond) = handle.next_request().await.expect("a request");
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let body = request.into_body().collect_bytes().await.unwrap();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let answer = if method == Method::POST {
                    json.clone()
                } else {
                    serde_json::json!({})
                };
                respond.send_response(Response::new(Body::from(serde_json::to_vec(&answer).unwrap())));
                seen.push((method, path, json));
            }
            seen
        });
        let notice = |note| Draft {
            type_: EventType::Warning,
            reason: "QuotaExceeded",
            action: "Reconcile",
            note,
        };
        recorder.publish(&notice("no room"), &regarding).await.unwrap();
        recorder.publish(&notice("no room"), &regarding).await.unwrap();
        recorder.publish(&notice("other"), &regarding).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[0].0, Method::POST);
        assert_eq!(seen[0].1, "/apis/events.k8s.io/v1/namespaces/a/events");
        assert_eq!(seen[0].2["reportingInstance"], "pod-1");
        assert_eq!(seen[0].2["type"], "Warning");
        let name = seen[0].2["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(name.starts_with("rt."));
        assert_eq!(seen[1].0, Method::PATCH);
        assert_eq!(seen[1].1, format!("/apis/events.k8s.io/v1/namespaces/a/events/{name}"));
        assert_eq!(seen[1].2["series"]["count"], 2);
        assert_eq!(seen[2].0, Method::POST);
        assert_eq!(recorder.remembered(), 2);
    }
}
