//! What the bench reads about the operator process: memory and CPU from `/proc`, counters from its
//! `/metrics`.

/// A `/proc/<pid>/status` field in MiB (`VmRSS:` now, `VmHWM:` the peak).
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or_default()
        / 1024.0
}

/// User and system CPU seconds the process used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or_default();
    (ticks(11) + ticks(12)) / 100.0
}

/// The sum of every sample of `name` whose labels contain `labels` (all of them when empty).
pub fn metric(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// API requests so far: (reads, writes), events included.
pub fn requests(metrics: &str) -> (f64, f64) {
    let name = "promptflow_operator_kube_requests_total";
    (
        metric(metrics, name, r#"kind="read""#),
        metric(metrics, name, r#"kind="write""#),
    )
}

/// Writes the API server has served so far (every client: the bench, the operator, the
/// scheduler, the controller manager, kwok), from its own `apiserver_request_total`.
pub async fn cluster_writes(client: &kube::Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["POST", "PUT", "PATCH", "DELETE", "APPLY"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Why the operator wrote more than `budget` times per runtime in `namespace`: every event but
/// one `Running` per runtime (a runtime that left `Running` and came back, a warning), printed
/// for the run's report. Runs only when the budget was exceeded.
pub async fn explain_extra_writes(client: &kube::Client, namespace: &str) {
    use k8s_openapi::api::core::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), namespace);
    let Ok(list) = events.list(&Default::default()).await else {
        return;
    };
    let unusual: Vec<String> = list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() != Some("Running") || e.count.unwrap_or(1) > 1)
        .map(|e| {
            format!(
                "{} {} ×{} on {}: {}",
                e.type_.as_deref().unwrap_or_default(),
                e.reason.as_deref().unwrap_or_default(),
                e.count.unwrap_or(1),
                e.involved_object.name.as_deref().unwrap_or_default(),
                e.message.as_deref().unwrap_or_default()
            )
        })
        .collect();
    println!("bench: {} events besides one Running per runtime:", unusual.len());
    for line in unusual.iter().take(20) {
        println!("  {line}");
    }
}
