//! The bench's results: a JSON report and a PNG chart (Running over time, operator against the
//! floor) under the cargo target directory, and one summary line per size.

use std::path::PathBuf;

use plotters::prelude::*;
use serde::Serialize;

/// Targets from the scale issues. Writes are asserted (zero with nothing to do, at most five per
/// runtime); speed and memory depend on the machine and are reported as met or missed.
pub const TARGET_RSS_MIB_AT_10K: f64 = 64.0;
/// Backlog to all Running, against the floor: at 10,000 runtimes and more.
pub const TARGET_RATIO_AT_10K: f64 = 2.0;
/// Backlog to all Running, against the floor: below 10,000 runtimes.
pub const TARGET_RATIO: f64 = 1.3;
/// Operator writes per runtime from creation to Running, events included.
pub const TARGET_WRITES_PER_RUNTIME: f64 = 5.0;

/// One target, as measured at one size.
pub struct Target {
    /// What was measured against what.
    pub line: String,
    /// Whether it was met.
    pub met: bool,
    /// Whether a miss fails the run.
    pub asserted: bool,
}

/// One phase's timeline: seconds until all were done, and the count over time.
#[derive(Serialize)]
pub struct Convergence {
    pub seconds: f64,
    pub points: Vec<(f64, usize)>,
    /// Writes the API server served per object from the start until 3 s after convergence, by
    /// every client (operator or bench, scheduler, controller manager, kwok, node leases).
    pub cluster_writes_per_object: f64,
}

/// What the operator did and cost in one phase.
#[derive(Serialize)]
pub struct OperatorRun {
    pub converged: Convergence,
    pub ratio_to_floor: f64,
    pub writes_per_runtime: f64,
    pub reads_per_runtime: f64,
    pub event_writes_per_runtime: f64,
    pub steady_writes_per_minute: f64,
    pub steady_reads_per_minute: f64,
    pub rss_at_start_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_steady_mib: f64,
    pub cpu_seconds: f64,
    pub reconciles: f64,
    pub registry_requests: f64,
    /// Writes while every runtime was touched with an annotation nobody reads (backlog only).
    pub noop_writes: f64,
}

/// Everything measured at one size.
#[derive(Serialize)]
pub struct SizeResult {
    pub runtimes: usize,
    pub nodes: usize,
    pub floor: Convergence,
    /// Runtimes created with the operator stopped, then the operator started.
    pub backlog: OperatorRun,
    /// Runtimes created while the operator runs.
    pub live: OperatorRun,
    /// Steady RSS minus the RSS of the operator with no runtime, per runtime (live phase), KiB.
    pub kib_per_runtime: f64,
}

/// The whole report.
#[derive(Serialize)]
pub struct Report {
    pub machine: String,
    pub concurrency: usize,
    pub steady_window_seconds: u64,
    pub sizes: Vec<SizeResult>,
}

/// The directory the report goes to: `<cargo target dir>/bench/n<sizes>` (a smoke run at N=50
/// does not overwrite a full run's report).
pub fn directory(sizes: &[usize]) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
    target.join("bench").join(format!("n{}", sizes.join("-")))
}

/// One line per size, for the terminal and the README.
pub fn summary(size: &SizeResult) -> String {
    let b = &size.backlog;
    let l = &size.live;
    format!(
        "bench N={}: floor {:.1}s ({:.1} cluster writes/pod); backlog {:.1}s ({:.2}x floor), live {:.1}s ({:.2}x); {:.1} cluster writes/runtime; operator {:.2} writes/runtime ({:.2} events), {:.2} reads; \
         steady {:.0} writes/min, {:.1} reads/min; no-op pass {:.0} writes; RSS peak {:.1} MiB, steady {:.1} MiB ({:.1} KiB/runtime); CPU {:.1}s; \
         {:.0} registry requests",
        size.runtimes,
        size.floor.seconds,
        size.floor.cluster_writes_per_object,
        b.converged.seconds,
        b.ratio_to_floor,
        l.converged.seconds,
        l.ratio_to_floor,
        b.converged.cluster_writes_per_object,
        b.writes_per_runtime,
        b.event_writes_per_runtime,
        b.reads_per_runtime,
        b.steady_writes_per_minute,
        b.steady_reads_per_minute,
        b.noop_writes,
        b.rss_peak_mib.max(l.rss_peak_mib),
        b.rss_steady_mib,
        size.kib_per_runtime,
        b.cpu_seconds,
        b.registry_requests,
    )
}

/// One line for a backlog-only run (heap profiles).
pub fn backlog_summary(n: usize, run: &OperatorRun) -> String {
    format!(
        "bench N={n} backlog: all Running after {:.1}s; {:.2} writes, {:.2} reads per runtime; RSS peak {:.1} MiB; CPU {:.1}s",
        run.converged.seconds, run.writes_per_runtime, run.reads_per_runtime, run.rss_peak_mib, run.cpu_seconds
    )
}

/// Every target at one size, met or missed, beside the floor it is measured against.
pub fn verdicts(size: &SizeResult) -> Vec<Target> {
    let target = |line: String, met: bool, asserted: bool| Target {
        line: format!("{line}: {}", if met { "met" } else { "MISSED" }),
        met,
        asserted,
    };
    let ratio = if size.runtimes >= 10_000 {
        TARGET_RATIO_AT_10K
    } else {
        TARGET_RATIO
    };
    let b = &size.backlog;
    let writes = b.writes_per_runtime.max(size.live.writes_per_runtime);
    let mut lines = vec![
        target(
            format!(
                "backlog {:.1}s against the floor's {:.1}s = {:.2} ≤ {ratio}",
                b.converged.seconds, size.floor.seconds, b.ratio_to_floor
            ),
            b.ratio_to_floor <= ratio,
            false,
        ),
        target(
            format!("operator writes per runtime {writes:.2} ≤ {TARGET_WRITES_PER_RUNTIME} (events included)"),
            writes <= TARGET_WRITES_PER_RUNTIME,
            true,
        ),
        target(
            format!(
                "cluster-wide writes per runtime {:.1} (floor {:.1} per bare pod)",
                b.converged.cluster_writes_per_object, size.floor.cluster_writes_per_object
            ),
            true,
            false,
        ),
        target(
            format!(
                "steady writes {:.0}/min = 0",
                b.steady_writes_per_minute.max(size.live.steady_writes_per_minute)
            ),
            b.steady_writes_per_minute == 0.0 && size.live.steady_writes_per_minute == 0.0,
            true,
        ),
    ];
    if size.runtimes >= 10_000 {
        let peak = b.rss_peak_mib.max(size.live.rss_peak_mib);
        lines.push(target(
            format!("RSS peak {peak:.1} MiB ≤ {TARGET_RSS_MIB_AT_10K} MiB"),
            peak <= TARGET_RSS_MIB_AT_10K,
            false,
        ));
    }
    lines
}

/// Writes `report.json` and `running.png`; returns their paths.
pub fn write(report: &Report) -> (PathBuf, PathBuf) {
    let sizes: Vec<usize> = report.sizes.iter().map(|s| s.runtimes).collect();
    let dir = directory(&sizes);
    std::fs::create_dir_all(&dir).expect("bench report directory");
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report).unwrap()).expect("write report.json");
    let png = dir.join("running.png");
    chart(report, &png);
    (json, png)
}

/// Registers a TrueType font for the chart's text (plotters draws text only with one).
fn font() -> bool {
    const CANDIDATES: [&str; 2] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    CANDIDATES.iter().any(|path| {
        std::fs::read(path)
            .ok()
            .map(|bytes| &*Box::leak(bytes.into_boxed_slice()))
            .is_some_and(|bytes| plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok())
    })
}

/// One panel per size: the fraction of runtimes Running (pods Ready for the floor) over time.
fn chart(report: &Report, path: &PathBuf) {
    assert!(font(), "the chart needs DejaVuSans.ttf (Debian: fonts-dejavu-core)");
    let panels = report.sizes.len().max(1);
    let root = BitMapBackend::new(path, (560 * panels as u32, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    for (area, size) in root.split_evenly((1, panels)).iter().zip(&report.sizes) {
        let end = [&size.floor, &size.backlog.converged, &size.live.converged]
            .iter()
            .map(|c| c.seconds)
            .fold(1.0, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} runtimes", size.runtimes), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..end, 0.0..size.runtimes as f64 * 1.02)
            .unwrap();
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("Running")
            .label_style(("sans-serif", 14))
            .draw()
            .unwrap();
        let series: [(&str, &Convergence, RGBColor); 3] = [
            ("floor (bare pods Ready)", &size.floor, RGBColor(120, 120, 120)),
            ("operator, backlog", &size.backlog.converged, RGBColor(31, 119, 180)),
            ("operator, live", &size.live.converged, RGBColor(214, 39, 40)),
        ];
        for (label, convergence, color) in series {
            chart
                .draw_series(LineSeries::new(
                    convergence.points.iter().map(|(t, n)| (*t, *n as f64)),
                    color.stroke_width(2),
                ))
                .unwrap()
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .unwrap();
    }
    root.present().expect("write the chart");
}
