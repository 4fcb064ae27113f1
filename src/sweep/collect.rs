//! Reading a sweep's run folders into result rows: one [`Row`] per grid
//! point, from the run's typed artifacts ([`RunSummary`], [`MetricsLine`],
//! [`SweepStatus`]), whatever state the folder is in (pending, stale,
//! failed, done).

use std::fmt::Write as _;
use std::path::Path;

use ps_worker::event::{Event, WorkerDone};
use serde::Serialize;

use super::grid::{Point, Sweep};
use super::runner::is_done;
use crate::artifact::{self, JsonFile, MetricsLine, RunSummary, SweepStatus};

/// The rows of every point of `sweep`, in grid order, from the folders under `out`.
pub(super) fn collect(sweep: &Sweep, out: &Path) -> Vec<Row> {
    sweep.points.iter().map(|p| collect_row(sweep, out, p)).collect()
}

/// One row of `results.csv` / `results.jsonl`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub name: String,
    /// `BSP`, `SSP(s=4)`, `ASP`.
    pub consistency: String,
    /// BSP 0, SSP s, ASP none.
    pub staleness_bound: Option<u64>,
    pub workers: u32,
    pub straggler: String,
    pub seed: u64,
    pub staleness_aware: bool,
    /// `fixed` or `dynamic` data assignment.
    pub data: String,
    pub backup_workers: u32,
    /// `off`, `c0.04` (DC-ASGD-c, lambda) or `a2` (DC-ASGD-a).
    pub delay_compensation: String,
    /// Consistency model and remedies in one label: `BSP dynamic b1`.
    pub mode: String,
    /// ok, failed (a worker failed; the rest is still measured), error,
    /// timeout, interrupted, pending (not run yet).
    pub status: String,
    pub error: Option<String>,
    pub wall_s: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_score: Option<f64>,
    pub score_name: Option<String>,
    pub target: Option<f64>,
    /// Launcher wall time of the first evaluation that reached `target`
    /// (the final evaluation counts, at `wall_s`).
    pub time_to_target_s: Option<f64>,
    pub mean_staleness: Option<f64>,
    pub max_staleness: Option<u64>,
    /// `max_staleness` is the histogram's overflow bucket: at least that much.
    pub max_staleness_overflow: bool,
    /// Seconds workers spent blocked in reads, summed over shards.
    pub blocked_s: Option<f64>,
    /// Late pushes (backup workers) dropped, and applied down-weighted,
    /// summed over shards (from stats.json).
    pub late_dropped: Option<u64>,
    pub late_weighted: Option<u64>,
    /// Data ranges handed out again after their worker died.
    pub data_reassigned: Option<u64>,
    pub per_worker: Vec<WorkerDone>,
    #[serde(skip)]
    pub(super) point: Option<Point>,
    #[serde(skip)]
    pub(super) metrics: Vec<MetricsLine>,
    #[serde(skip)]
    pub(super) histogram: Vec<u64>,
}

impl Row {
    pub(super) fn brief(&self) -> String {
        let mut s = String::new();
        if let (Some(score), Some(name)) = (self.test_score, &self.score_name) {
            let _ = write!(s, "test {name} {score:.4}");
        }
        if let Some(w) = self.wall_s {
            let _ = write!(s, ", wall {w:.1} s");
        }
        if let Some(t) = self.time_to_target_s {
            let _ = write!(s, ", target at {t:.1} s");
        }
        if let Some(m) = self.max_staleness {
            let _ = write!(s, ", max staleness {}{m}", if self.max_staleness_overflow { ">=" } else { "" });
        }
        s
    }

    /// The row of a run whose artifacts cannot be read (or are too new).
    fn failed_to_read(mut self, e: artifact::Error) -> Row {
        self.status = "error".into();
        self.error = Some(e.to_string());
        self
    }

    pub(super) fn max_staleness_text(&self) -> String {
        match self.max_staleness {
            Some(m) if self.max_staleness_overflow => format!("≥{m}"),
            Some(m) => m.to_string(),
            None => "–".into(),
        }
    }
}

fn higher_is_better(score_name: &str) -> bool {
    score_name != "rmse"
}

/// The row of `point`, from whatever its run folder holds.
fn collect_row(sweep: &Sweep, out: &Path, point: &Point) -> Row {
    let dir = out.join(point.name());
    let mut row = Row {
        name: point.name(),
        consistency: point.consistency.to_string(),
        staleness_bound: point.consistency.bound(),
        workers: point.workers,
        straggler: point.straggler.label(),
        seed: point.seed,
        staleness_aware: point.staleness_aware,
        data: point.data.to_string(),
        backup_workers: point.backup_workers,
        delay_compensation: point
            .delay_compensation
            .map_or("off".into(), |d| format!("{}{}", if d.adaptive { "a" } else { "c" }, d.lambda)),
        mode: point.mode(),
        status: "pending".into(),
        target: sweep.settings.target_accuracy,
        point: Some(point.clone()),
        ..Row::default()
    };
    let status = match SweepStatus::read(&dir) {
        Ok(st) => Some(st),
        Err(e @ artifact::Error::NewerVersion { .. }) => return row.failed_to_read(e),
        // Not run yet, or the sweep stopped before writing it.
        Err(_) => None,
    };
    if let Some(st) = &status {
        row.status = st.status.clone();
        row.error = st.error.clone();
    }
    if !is_done(&dir, &point.config(&sweep.base)) {
        if dir.join(RunSummary::FILE).exists() {
            row.status = "stale".into();
            row.error = Some("config.toml differs from the sweep file; will be rerun".into());
        }
        return row;
    }
    let s = match RunSummary::read(&dir) {
        Ok(s) => s,
        Err(e) => return row.failed_to_read(e),
    };
    if status.is_none() {
        row.status = if s.failed.is_empty() { "ok".into() } else { "failed".into() };
    }
    row.metrics = match MetricsLine::read(&dir) {
        Ok(m) => m,
        Err(e @ artifact::Error::NewerVersion { .. }) => return row.failed_to_read(e),
        // A run that died before its first event leaves no curve.
        Err(_) => Vec::new(),
    };
    let better = |score: f64, target: f64| {
        if higher_is_better(&s.score_name) { score >= target } else { score <= target }
    };
    row.time_to_target_s = sweep.settings.target_accuracy.and_then(|target| {
        let at_eval = row
            .metrics
            .iter()
            .filter_map(|m| match m.data {
                Event::Eval { test_acc, .. } if better(test_acc, target) => Some(m.t),
                _ => None,
            })
            .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.min(t))));
        at_eval.or_else(|| better(s.test_score, target).then_some(s.wall_s))
    });
    let max = s.max_staleness();
    row.mean_staleness = Some(s.mean_staleness());
    row.max_staleness = Some(max as u64);
    row.max_staleness_overflow = max + 1 >= ps_server::clock::STALENESS_BUCKETS;
    row.wall_s = Some(s.wall_s);
    row.samples_per_s = Some(s.samples_per_s);
    row.test_loss = Some(s.test_loss);
    row.test_score = Some(s.test_score);
    row.score_name = Some(s.score_name.clone());
    row.blocked_s = Some(s.blocked_s);
    if let Ok(stats) = artifact::StatsFile::read(&dir) {
        let sum = |f: &dyn Fn(&artifact::StragglerStats) -> u64| {
            stats.shards.iter().map(|x| f(&x.stragglers)).sum()
        };
        row.late_dropped = Some(sum(&|x| x.late_dropped));
        row.late_weighted = Some(sum(&|x| x.late_weighted));
        row.data_reassigned = Some(sum(&|x| x.data_reassigned));
    }
    row.histogram = s.staleness_histogram.clone();
    let mut per_worker: Vec<WorkerDone> =
        s.done.iter().filter_map(|e| if let Event::Done(d) = e { Some(d.clone()) } else { None }).collect();
    per_worker.sort_by_key(|w| w.worker);
    row.per_worker = per_worker;
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::RunSummary;

    const SWEEP: &str = r#"
[cluster]
servers = 2
workers = 2

[job]
epochs = 1
consistency = { model = "bsp" }

[job.workload]
kind = "mnist_mlp"

[sweep]
target_accuracy = 0.8
"#;

    fn summary(dir: &Path) -> RunSummary {
        RunSummary {
            schema_version: RunSummary::VERSION,
            run_dir: dir.to_path_buf(),
            consistency: "BSP".into(),
            servers: 2,
            workers: 2,
            wall_s: 10.0,
            samples_per_s: 100.0,
            test_loss: 0.5,
            test_score: 0.85,
            score_name: "accuracy".into(),
            failed: vec![],
            done: vec![],
            staleness_histogram: vec![3, 1],
            blocked_s: 1.5,
            server_peak_rss: vec![],
            sparse_rows: 0,
            checkpoints: Default::default(),
            recoveries: vec![],
            resumed_from: None,
            codecs: String::new(),
            bytes_pushed_per_iter: 0.0,
            bytes_pulled_per_iter: 0.0,
        }
    }

    #[test]
    fn a_run_folder_becomes_a_row_and_a_newer_one_an_error() {
        let sweep = Sweep::parse(SWEEP).unwrap();
        let out = std::env::temp_dir().join(format!("ps-sweep-collect-{}", std::process::id()));
        let point = &sweep.points[0];
        let dir = out.join(point.name());
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(collect(&sweep, &out)[0].status, "pending");

        crate::cluster::write_config(&dir, &point.config(&sweep.base)).unwrap();
        summary(&dir).write(&dir).unwrap();
        let mut metrics = MetricsLine::create(&dir, false).unwrap();
        let eval = |t, acc| {
            MetricsLine::new(
                t,
                0,
                Event::Eval { worker: 0, epoch: 0, iter: 1, wall_s: t, test_loss: 0.5, test_acc: acc },
            )
        };
        metrics.append(&eval(4.0, 0.7)).unwrap();
        metrics.append(&eval(6.0, 0.82)).unwrap();
        drop(metrics);
        let row = &collect(&sweep, &out)[0];
        assert_eq!((row.status.as_str(), row.time_to_target_s), ("ok", Some(6.0)));
        assert_eq!((row.mean_staleness, row.max_staleness, row.blocked_s), (Some(0.25), Some(1), Some(1.5)));

        RunSummary { schema_version: RunSummary::VERSION + 1, ..summary(&dir) }.write(&dir).unwrap();
        let row = &collect(&sweep, &out)[0];
        assert_eq!(row.status, "error");
        let why = row.error.as_deref().unwrap_or_default();
        assert!(why.contains("summary.json") && why.contains("version 2 is newer"), "{why}");
        let _ = std::fs::remove_dir_all(&out);
    }
}
