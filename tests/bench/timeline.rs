//! How many objects of a namespace are done (a runtime Running, a pod Ready) over time, read from
//! a watch: the bench never lists thousands of objects in a loop, which would load the API server
//! it is measuring.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

/// Counts of done objects, sampled at every change, in seconds since `start`.
pub struct Timeline {
    points: Arc<Mutex<Vec<(f64, usize)>>>,
    done: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
    start: Instant,
}

impl Timeline {
    /// Watches `api` and counts the objects for which `is_done` holds, from `start` on.
    pub fn watch<K>(api: Api<K>, start: Instant, is_done: fn(&K) -> bool) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        K::DynamicType: Default,
    {
        let points = Arc::new(Mutex::new(vec![(0.0, 0)]));
        let (tx, done) = tokio::sync::watch::channel(0);
        let recorded = points.clone();
        let task = tokio::spawn(async move {
            let mut finished = HashSet::new();
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                let (watcher::Event::Apply(object) | watcher::Event::InitApply(object)) = event else {
                    if let watcher::Event::Delete(object) = event {
                        finished.remove(&object.name_any());
                    }
                    continue;
                };
                let changed = if is_done(&object) {
                    finished.insert(object.name_any())
                } else {
                    finished.remove(&object.name_any())
                };
                if changed {
                    let at = start.elapsed().as_secs_f64();
                    recorded.lock().unwrap().push((at, finished.len()));
                    tx.send_replace(finished.len());
                }
            }
        });
        Self {
            points,
            done,
            task,
            start,
        }
    }

    /// Waits until `count` objects are done; returns the time since `start`, or `None` after
    /// `timeout` (with how many were done).
    pub async fn wait_for(&mut self, count: usize, timeout: Duration) -> Result<Duration, usize> {
        let reached = tokio::time::timeout(timeout, self.done.wait_for(|done| *done >= count))
            .await
            .is_ok_and(|seen| seen.is_ok());
        if reached {
            Ok(self.first_reached(count).unwrap_or_else(|| self.start.elapsed()))
        } else {
            Err(*self.done.borrow())
        }
    }

    /// How many are done now.
    pub fn count(&self) -> usize {
        *self.done.borrow()
    }

    /// When the count first reached `count`, as recorded by the watch.
    fn first_reached(&self, count: usize) -> Option<Duration> {
        let points = self.points.lock().unwrap();
        let (at, _) = points.iter().find(|(_, done)| *done >= count)?;
        Some(Duration::from_secs_f64(*at))
    }

    /// The recorded points, thinned to at most `max` for the report.
    pub fn points(&self, max: usize) -> Vec<(f64, usize)> {
        let points = self.points.lock().unwrap();
        let step = points.len().div_ceil(max.max(1)).max(1);
        let mut thinned: Vec<_> = points.iter().step_by(step).copied().collect();
        if let Some(last) = points.last()
            && thinned.last() != Some(last)
        {
            thinned.push(*last);
        }
        thinned
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}
