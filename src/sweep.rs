//! Experiment sweeps: the cartesian product of a grid of consistency models,
//! worker counts, stragglers, seeds and staleness-aware learning rates, each
//! point trained on its own local cluster ([`crate::run::run`]), one after
//! the other, then tabulated and plotted.
//!
//! A sweep file is a run file (`[cluster]`, `[job]`, as
//! `examples/config/*.toml`) plus two tables:
//!
//! ```toml
//! [sweep]
//! target_accuracy = 0.97   # optional: report the time to reach it
//! run_timeout_s = 600      # a run still going after this is killed
//!
//! [grid]                   # every list is optional (default: the base job's value)
//! consistency = ["bsp", "ssp:1", "ssp:4", "asp"]
//! workers = [2]
//! straggler = ["none", "factor:3", "random:0.05:20"]
//! seeds = [1]
//! staleness_aware = [false, true]
//! ```
//!
//! Stragglers: `factor:F` slows the *last* worker (each of its iterations
//! takes F times as long; worker 0 stays at full speed, since it evaluates
//! and its clock is the iteration axis of the plots); `random:P:MEAN_MS`
//! makes *every* worker sleep after an iteration with probability P for an
//! exponential time of mean MEAN_MS (transient stragglers). Either takes an
//! explicit worker list: `factor:3@0`, `random:0.1:10@0,1`.
//!
//! The sweep folder holds one run folder per point, named after it
//! (`bsp-w2-factor3-seed1`, `ssp4-w2-none-seed1-sa`), and the reports:
//! `results.csv`, `results.jsonl`, `summary.md`, `plots/*.svg`, and a
//! `curve.csv` in every run folder. Reports are rewritten after every run.
//!
//! Resuming is the default: a point whose folder has a `summary.json` and
//! the same `config.toml` as planned is not run again, so rerunning an
//! interrupted (or extended) sweep continues it; points that errored or
//! timed out (no `summary.json`) are retried. `fresh` reruns everything.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ps_common::spec::Consistency;
use ps_worker::config::{RunConfig, Straggler};
use ps_worker::event::Event;
use serde::{Deserialize, Serialize};

use crate::plot::{Chart, Series, XAxis};
use crate::run::{self, Plan};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("sweep file {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("interrupted; run the same command again to resume")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).map_err(io(format!("writing {}", path.display())))
}

/// The `[grid]` table. An empty (or missing) list means the base job's value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// `bsp`, `asp`, `ssp:N`.
    #[serde(default)]
    pub consistency: Vec<String>,
    #[serde(default)]
    pub workers: Vec<u32>,
    /// `none`, `factor:F[@W,..]`, `random:P:MEAN_MS[@W,..]`.
    #[serde(default)]
    pub straggler: Vec<String>,
    #[serde(default)]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub staleness_aware: Vec<bool>,
}

/// The `[sweep]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Report the wall time at which the test score first reaches this
    /// (accuracy and AUC: at least; RMSE: at most).
    #[serde(default)]
    pub target_accuracy: Option<f64>,
    /// A run still going after this long is killed and recorded as `timeout`.
    #[serde(default = "default_run_timeout_s")]
    pub run_timeout_s: f64,
}

fn default_run_timeout_s() -> f64 {
    900.0
}

impl Default for Settings {
    fn default() -> Self {
        Settings { target_accuracy: None, run_timeout_s: default_run_timeout_s() }
    }
}

/// A straggler setting of the grid, before it is resolved against a worker count.
#[derive(Debug, Clone, PartialEq)]
pub enum StragglerSpec {
    None,
    Factor { factor: f64, workers: Option<Vec<usize>> },
    Random { probability: f64, mean_ms: f64, workers: Option<Vec<usize>> },
}

impl StragglerSpec {
    pub fn parse(s: &str) -> std::result::Result<StragglerSpec, String> {
        let bad = || format!("expected none, factor:F[@W,..] or random:P:MEAN_MS[@W,..], got `{s}`");
        let (spec, workers) = match s.split_once('@') {
            Some((spec, list)) => {
                let ws: std::result::Result<Vec<usize>, _> =
                    list.split(',').map(|w| w.trim().parse()).collect();
                (spec, Some(ws.map_err(|_| bad())?))
            }
            None => (s, None),
        };
        let num = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(bad);
        let parts: Vec<&str> = spec.split(':').collect();
        match parts.as_slice() {
            ["none"] if workers.is_none() => Ok(StragglerSpec::None),
            ["factor", f] => Ok(StragglerSpec::Factor { factor: num(f)?, workers }),
            ["random", p, m] => Ok(StragglerSpec::Random { probability: num(p)?, mean_ms: num(m)?, workers }),
            _ => Err(bad()),
        }
    }

    /// A short name, safe in a file name: `none`, `factor3`, `factor3-on0`,
    /// `random0.05x20ms`, `random0.05x20ms-on0+1`.
    pub fn label(&self) -> String {
        let on = |w: &Option<Vec<usize>>| match w {
            Some(ws) => format!("-on{}", ws.iter().map(usize::to_string).collect::<Vec<_>>().join("+")),
            None => String::new(),
        };
        match self {
            StragglerSpec::None => "none".into(),
            StragglerSpec::Factor { factor, workers } => format!("factor{factor}{}", on(workers)),
            StragglerSpec::Random { probability, mean_ms, workers } => {
                format!("random{probability}x{mean_ms}ms{}", on(workers))
            }
        }
    }

    /// The job's straggler for `workers` workers.
    pub fn resolve(&self, workers: u32) -> Option<Straggler> {
        let last = vec![workers.saturating_sub(1) as usize];
        let all = (0..workers as usize).collect();
        match self {
            StragglerSpec::None => None,
            StragglerSpec::Factor { factor, workers } => {
                Some(Straggler::Factor { workers: workers.clone().unwrap_or(last), factor: *factor })
            }
            StragglerSpec::Random { probability, mean_ms, workers } => Some(Straggler::Random {
                workers: workers.clone().unwrap_or(all),
                probability: *probability,
                mean_ms: *mean_ms,
            }),
        }
    }
}

/// `bsp`, `asp` or `ssp:N`.
pub fn parse_consistency(s: &str) -> std::result::Result<Consistency, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "asp" => Ok(Consistency::Asp),
        "bsp" => Ok(Consistency::Bsp),
        other => match other.strip_prefix("ssp:").map(str::parse) {
            Some(Ok(staleness)) => Ok(Consistency::Ssp { staleness }),
            _ => Err(format!("expected asp, bsp or ssp:N, got `{s}`")),
        },
    }
}

/// Sort key of a consistency model: by staleness bound, ASP last.
fn bound_key(c: Consistency) -> u64 {
    c.bound().unwrap_or(u64::MAX)
}

fn model_key(c: Consistency) -> String {
    match c {
        Consistency::Asp => "asp".into(),
        Consistency::Bsp => "bsp".into(),
        Consistency::Ssp { staleness } => format!("ssp{staleness}"),
    }
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub consistency: Consistency,
    pub workers: u32,
    pub straggler: StragglerSpec,
    pub seed: u64,
    pub staleness_aware: bool,
}

impl Point {
    /// The run folder's name: `bsp-w2-factor3-seed1`, `-sa` appended when
    /// the learning rate is staleness-aware.
    pub fn name(&self) -> String {
        let sa = if self.staleness_aware { "-sa" } else { "" };
        format!(
            "{}-w{}-{}-seed{}{sa}",
            model_key(self.consistency),
            self.workers,
            self.straggler.label(),
            self.seed
        )
    }

    /// The base run with this point's settings.
    pub fn config(&self, base: &RunConfig) -> RunConfig {
        let mut c = base.clone();
        c.cluster.workers = self.workers;
        c.job.consistency = self.consistency;
        c.job.seed = self.seed;
        c.job.straggler = self.straggler.resolve(self.workers);
        c.job.optimizer.staleness_aware = self.staleness_aware;
        c
    }
}

/// A parsed sweep file.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub base: RunConfig,
    pub settings: Settings,
    pub grid: Grid,
    /// In run order: seeds, workers, stragglers, staleness-awareness, then
    /// consistency models innermost.
    pub points: Vec<Point>,
}

impl Sweep {
    pub fn parse(text: &str) -> std::result::Result<Sweep, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let grid: Grid = match table.remove("grid") {
            Some(v) => v.try_into().map_err(|e| format!("[grid]: {e}"))?,
            None => Grid::default(),
        };
        let settings: Settings = match table.remove("sweep") {
            Some(v) => v.try_into().map_err(|e| format!("[sweep]: {e}"))?,
            None => Settings::default(),
        };
        if !(settings.run_timeout_s.is_finite() && settings.run_timeout_s > 0.0) {
            return Err(format!("run_timeout_s must be positive, got {}", settings.run_timeout_s));
        }
        let base: RunConfig = toml::Value::Table(table).try_into().map_err(|e| e.to_string())?;
        base.validate().map_err(|e| e.to_string())?;
        if base.job.straggler.is_some() {
            return Err("[job] straggler is set: list stragglers in [grid] straggler instead".into());
        }

        let models = if grid.consistency.is_empty() {
            vec![base.job.consistency]
        } else {
            grid.consistency.iter().map(|s| parse_consistency(s)).collect::<std::result::Result<_, _>>()?
        };
        let stragglers = if grid.straggler.is_empty() {
            vec![StragglerSpec::None]
        } else {
            grid.straggler.iter().map(|s| StragglerSpec::parse(s)).collect::<std::result::Result<_, _>>()?
        };
        let mut points = Vec::new();
        for &seed in &or(&grid.seeds, base.job.seed) {
            for &workers in &or(&grid.workers, base.cluster.workers) {
                for straggler in &stragglers {
                    for &staleness_aware in &or(&grid.staleness_aware, base.job.optimizer.staleness_aware) {
                        for &consistency in &models {
                            points.push(Point {
                                consistency,
                                workers,
                                straggler: straggler.clone(),
                                seed,
                                staleness_aware,
                            });
                        }
                    }
                }
            }
        }
        let mut names = BTreeSet::new();
        for p in &points {
            if !names.insert(p.name()) {
                return Err(format!("grid point {} appears twice", p.name()));
            }
            if let Some(Straggler::Factor { workers, .. } | Straggler::Random { workers, .. }) =
                p.straggler.resolve(p.workers)
                && let Some(w) = workers.iter().find(|&&w| w >= p.workers as usize)
            {
                return Err(format!("{}: straggler worker {w} does not exist", p.name()));
            }
            // A factor straggler sleeps in proportion to its iteration time,
            // which includes time blocked in reads: two of them under a
            // staleness bound wait for each other's sleeps, which then grow
            // without end.
            if let Some(Straggler::Factor { workers, .. }) = p.straggler.resolve(p.workers)
                && workers.len() > 1
                && p.consistency.bound().is_some()
            {
                return Err(format!(
                    "{}: a factor straggler on several workers feeds on itself under BSP/SSP (its delay grows with \
                     time blocked in reads); slow one worker, or use random:P:MEAN_MS",
                    p.name()
                ));
            }
            p.config(&base).validate().map_err(|e| format!("{}: {e}", p.name()))?;
        }
        Ok(Sweep { base, settings, grid, points })
    }

    pub fn load(path: &Path) -> Result<Sweep> {
        let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
        Sweep::parse(&text).map_err(|reason| Error::Config { path: path.display().to_string(), reason })
    }
}

/// What [`run`] is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub file: PathBuf,
    /// Sweep folder; default `sweeps/<file stem>`.
    pub out: Option<PathBuf>,
    /// Rerun points that have results.
    pub fresh: bool,
    /// Only list the points and whether each is done.
    pub list: bool,
    /// Only rewrite the reports from the run folders.
    pub report_only: bool,
    /// The launcher executable (`ps-cluster`), which runs shards and workers.
    pub exe: PathBuf,
}

impl Options {
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let stem = self.file.file_stem().map_or("sweep".into(), |s| s.to_string_lossy().into_owned());
            Path::new("sweeps").join(stem)
        })
    }
}

/// How one run ended, as written to its folder's `sweep-status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunStatus {
    status: String,
    error: Option<String>,
    elapsed_s: f64,
}

/// True if `dir` holds finished results of `config`.
fn is_done(dir: &Path, config: &RunConfig) -> bool {
    dir.join("summary.json").is_file()
        && std::fs::read_to_string(dir.join("config.toml"))
            .ok()
            .and_then(|t| toml::from_str::<RunConfig>(&t).ok())
            .is_some_and(|c| &c == config)
}

/// `v`, or `[d]` if it is empty.
fn or<T: Clone>(v: &[T], d: T) -> Vec<T> {
    if v.is_empty() { vec![d] } else { v.to_vec() }
}

/// "; ETA 3m05s" from the mean time of the runs so far.
fn eta(took: &[f64], remaining: usize) -> String {
    if took.is_empty() {
        return String::new();
    }
    let mean = took.iter().sum::<f64>() / took.len() as f64;
    format!("; ETA {}", fmt_duration(mean * remaining as f64))
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 60 { format!("{}m{:02}s", s / 60, s % 60) } else { format!("{s}s") }
}

/// Runs the sweep of `opts.file`: every point not yet done, in order, then
/// the reports. Ctrl-C stops the current run (no process is left) and
/// returns [`Error::Interrupted`] after writing the reports so far.
pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let sweep = Sweep::load(&opts.file)?;
    let out = opts.out_dir();
    let n = sweep.points.len();
    if opts.list {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        for (i, p) in sweep.points.iter().enumerate() {
            let done = is_done(&out.join(p.name()), &p.config(&sweep.base));
            // A closed pipe (`| head`) ends the listing, not the process.
            if writeln!(stdout, "{:>3}/{n}  {}  {}", i + 1, p.name(), if done { "done" } else { "to run" })
                .is_err()
            {
                break;
            }
        }
        return Ok(Vec::new());
    }
    if opts.report_only {
        return report(&sweep, &out);
    }
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    let source = std::fs::read(&opts.file).map_err(io(format!("reading {}", opts.file.display())))?;
    write_file(&out.join("sweep.toml"), source)?;

    // One listener for the whole sweep: a Ctrl-C between runs is not lost.
    let (int_tx, int_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = int_tx.send(true);
        }
    });
    let timeout = Duration::from_secs_f64(sweep.settings.run_timeout_s);
    let todo = sweep
        .points
        .iter()
        .filter(|p| opts.fresh || !is_done(&out.join(p.name()), &p.config(&sweep.base)))
        .count();
    eprintln!(
        "sweep {}: {n} point(s), {todo} to run, {} done; folder {}",
        opts.file.display(),
        n - todo,
        out.display()
    );
    let sweep_started = Instant::now();
    let mut took: Vec<f64> = Vec::new();
    let mut interrupted = false;
    let mut ran = 0;
    for (i, point) in sweep.points.iter().enumerate() {
        let name = point.name();
        let dir = out.join(&name);
        let config = point.config(&sweep.base);
        if !opts.fresh && is_done(&dir, &config) {
            continue;
        }
        if *int_rx.borrow() {
            interrupted = true;
            break;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("clearing {}", dir.display())))?;
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        eprintln!(
            "[{}/{n}] start {name} ({}{})",
            i + 1,
            fmt_duration(sweep_started.elapsed().as_secs_f64()),
            eta(&took, todo - ran)
        );
        let started = Instant::now();
        let plan = Plan { exe: &opts.exe, config, run_dir: dir.clone(), kill_worker_after: None };
        let mut bar = RunBar::new(&name);
        let mut rx = int_rx.clone();
        let status = tokio::select! {
            r = tokio::time::timeout(timeout, run::run(plan, |w, e| bar.update(w, e))) => match r {
                Ok(Ok(s)) if s.failed.is_empty() => RunStatus { status: "ok".into(), error: None, elapsed_s: 0.0 },
                Ok(Ok(s)) => {
                    let why: Vec<String> = s.failed.iter().map(|(w, e)| format!("worker {w}: {e}")).collect();
                    RunStatus { status: "failed".into(), error: Some(why.join("; ")), elapsed_s: 0.0 }
                }
                Ok(Err(crate::cluster::Error::Interrupted)) => {
                    RunStatus { status: "interrupted".into(), error: None, elapsed_s: 0.0 }
                }
                Ok(Err(e)) => RunStatus { status: "error".into(), error: Some(e.to_string()), elapsed_s: 0.0 },
                Err(_) => RunStatus {
                    status: "timeout".into(),
                    error: Some(format!("killed after {} s", sweep.settings.run_timeout_s)),
                    elapsed_s: 0.0,
                },
            },
            // Dropping the run kills its processes (they are `kill_on_drop`).
            _ = rx.wait_for(|&v| v) => RunStatus { status: "interrupted".into(), error: None, elapsed_s: 0.0 },
        };
        bar.finish();
        let status = RunStatus { elapsed_s: started.elapsed().as_secs_f64(), ..status };
        write_file(
            &dir.join("sweep-status.json"),
            serde_json::to_string_pretty(&status).unwrap_or_default(),
        )?;
        if status.status == "interrupted" {
            interrupted = true;
            eprintln!("[{}/{n}] interrupted {name}", i + 1);
            break;
        }
        took.push(status.elapsed_s);
        ran += 1;
        let rows = report(&sweep, &out)?;
        let brief = rows.iter().find(|r| r.name == name).map(Row::brief).unwrap_or_default();
        let why = status.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        eprintln!(
            "[{}/{n}] {} {name} in {:.1} s{why}: {brief}{}",
            i + 1,
            if status.status == "ok" { "done" } else { status.status.as_str() },
            status.elapsed_s,
            eta(&took, todo - ran)
        );
    }
    listener.abort();
    let rows = report(&sweep, &out)?;
    if interrupted {
        return Err(Error::Interrupted);
    }
    eprintln!(
        "sweep done in {}; reports in {}",
        fmt_duration(sweep_started.elapsed().as_secs_f64()),
        out.display()
    );
    Ok(rows)
}

/// A progress bar over all workers' iterations of one run (drawn only on a terminal).
struct RunBar {
    bar: indicatif::ProgressBar,
    iters: Vec<u64>,
}

impl RunBar {
    fn new(name: &str) -> RunBar {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {pos}/{len} iterations {elapsed}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let bar = indicatif::ProgressBar::new(0).with_style(style).with_prefix(name.to_string());
        RunBar { bar, iters: Vec::new() }
    }

    fn update(&mut self, worker: usize, event: &Event) {
        if self.iters.len() <= worker {
            self.iters.resize(worker + 1, 0);
        }
        match event {
            Event::Start { total_iters, .. } => self.bar.inc_length(*total_iters),
            Event::Progress { iter, .. } | Event::Eval { iter, .. } => self.iters[worker] = *iter,
            Event::Done { iters, .. } => self.iters[worker] = *iters,
        }
        self.bar.set_position(self.iters.iter().sum());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

// ---------------------------------------------------------------------------
// Results.

/// The part of `summary.json` a sweep reads.
#[derive(Debug, Clone, Deserialize)]
struct SummaryFile {
    wall_s: f64,
    samples_per_s: f64,
    test_loss: f64,
    test_score: f64,
    score_name: String,
    #[serde(default)]
    failed: Vec<(usize, String)>,
    #[serde(default)]
    done: Vec<Event>,
    #[serde(default)]
    staleness_histogram: Vec<u64>,
    #[serde(default)]
    blocked_s: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Deserialize)]
struct MetricLine {
    t: f64,
    worker: usize,
    data: Event,
}

/// A worker's `Done` event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerStats {
    pub worker: usize,
    pub iters: u64,
    pub samples: u64,
    pub wall_s: f64,
    pub samples_per_s: f64,
    pub pull_s: f64,
    pub compute_s: f64,
    pub push_s: f64,
    pub straggle_s: f64,
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
    pub per_worker: Vec<WorkerStats>,
    #[serde(skip)]
    point: Option<Point>,
    #[serde(skip)]
    metrics: Vec<MetricLine>,
    #[serde(skip)]
    histogram: Vec<u64>,
}

impl Row {
    fn brief(&self) -> String {
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

    fn max_staleness_text(&self) -> String {
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

fn read_metrics(path: &Path) -> Vec<MetricLine> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
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
        status: "pending".into(),
        target: sweep.settings.target_accuracy,
        point: Some(point.clone()),
        ..Row::default()
    };
    let status: Option<RunStatus> = std::fs::read_to_string(dir.join("sweep-status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(st) = &status {
        row.status = st.status.clone();
        row.error = st.error.clone();
    }
    if !is_done(&dir, &point.config(&sweep.base)) {
        if dir.join("summary.json").exists() {
            row.status = "stale".into();
            row.error = Some("config.toml differs from the sweep file; will be rerun".into());
        }
        return row;
    }
    let summary: Option<SummaryFile> =
        std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let Some(s) = summary else {
        row.status = "error".into();
        row.error = Some("unreadable summary.json".into());
        return row;
    };
    if status.is_none() {
        row.status = if s.failed.is_empty() { "ok".into() } else { "failed".into() };
    }
    row.metrics = read_metrics(&dir.join("metrics.jsonl"));
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
    let n: u64 = s.staleness_histogram.iter().sum();
    let weighted: u64 = s.staleness_histogram.iter().enumerate().map(|(i, c)| i as u64 * c).sum();
    let max = s.staleness_histogram.iter().rposition(|&c| c > 0).unwrap_or(0);
    row.mean_staleness = Some(weighted as f64 / n.max(1) as f64);
    row.max_staleness = Some(max as u64);
    row.max_staleness_overflow = max + 1 >= ps_server::clock::STALENESS_BUCKETS;
    row.wall_s = Some(s.wall_s);
    row.samples_per_s = Some(s.samples_per_s);
    row.test_loss = Some(s.test_loss);
    row.test_score = Some(s.test_score);
    row.score_name = Some(s.score_name.clone());
    row.blocked_s = Some(s.blocked_s);
    row.histogram = s.staleness_histogram.clone();
    let mut per_worker: Vec<WorkerStats> = s
        .done
        .iter()
        .filter_map(|e| match *e {
            Event::Done {
                worker,
                iters,
                samples,
                wall_s,
                samples_per_s,
                pull_s,
                compute_s,
                push_s,
                straggle_s,
            } => Some(WorkerStats {
                worker,
                iters,
                samples,
                wall_s,
                samples_per_s,
                pull_s,
                compute_s,
                push_s,
                straggle_s,
            }),
            _ => None,
        })
        .collect();
    per_worker.sort_by_key(|w| w.worker);
    row.per_worker = per_worker;
    row
}

/// Rereads every run folder of `out` and rewrites every report; returns the rows.
fn report(sweep: &Sweep, out: &Path) -> Result<Vec<Row>> {
    let rows: Vec<Row> = sweep.points.iter().map(|p| collect_row(sweep, out, p)).collect();
    for r in &rows {
        if !r.metrics.is_empty() {
            write_file(&out.join(&r.name).join("curve.csv"), curve_csv(&r.metrics))?;
        }
    }
    write_file(&out.join("results.csv"), results_csv(&rows))?;
    let jsonl: String = rows.iter().filter_map(|r| serde_json::to_string(r).ok()).map(|l| l + "\n").collect();
    write_file(&out.join("results.jsonl"), jsonl)?;
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots).map_err(io(format!("creating {}", plots.display())))?;
    let charts = charts(sweep, &rows);
    for (file, chart) in &charts {
        write_file(&plots.join(file), chart.to_svg())?;
    }
    write_file(&out.join("summary.md"), summary_md(sweep, &rows, &charts))?;
    Ok(rows)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// `results.csv`: one row per point; per-worker columns for the largest worker count.
fn results_csv(rows: &[Row]) -> String {
    let max_workers = rows.iter().map(|r| r.workers as usize).max().unwrap_or(0);
    let mut header: Vec<String> = [
        "name",
        "consistency",
        "staleness_bound",
        "workers",
        "straggler",
        "seed",
        "staleness_aware",
        "status",
        "error",
        "wall_s",
        "samples_per_s",
        "test_loss",
        "test_score",
        "score_name",
        "target",
        "time_to_target_s",
        "mean_staleness",
        "max_staleness",
        "max_staleness_overflow",
        "blocked_s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for w in 0..max_workers {
        for f in ["iters", "wall_s", "samples_per_s", "pull_s", "compute_s", "push_s", "straggle_s"] {
            header.push(format!("w{w}_{f}"));
        }
    }
    let mut s = header.join(",") + "\n";
    for r in rows {
        let mut f = vec![
            r.name.clone(),
            r.consistency.clone(),
            opt(r.staleness_bound),
            r.workers.to_string(),
            r.straggler.clone(),
            r.seed.to_string(),
            r.staleness_aware.to_string(),
            r.status.clone(),
            r.error.clone().unwrap_or_default(),
            opt(r.wall_s),
            opt(r.samples_per_s),
            opt(r.test_loss),
            opt(r.test_score),
            r.score_name.clone().unwrap_or_default(),
            opt(r.target),
            opt(r.time_to_target_s),
            opt(r.mean_staleness),
            opt(r.max_staleness),
            r.max_staleness_overflow.to_string(),
            opt(r.blocked_s),
        ];
        for w in 0..max_workers {
            match r.per_worker.iter().find(|d| d.worker == w) {
                Some(d) => f.extend(
                    [
                        d.iters as f64,
                        d.wall_s,
                        d.samples_per_s,
                        d.pull_s,
                        d.compute_s,
                        d.push_s,
                        d.straggle_s,
                    ]
                    .iter()
                    .map(f64::to_string),
                ),
                None => f.extend(std::iter::repeat_n(String::new(), 7)),
            }
        }
        s += &f.iter().map(|x| csv_field(x)).collect::<Vec<_>>().join(",");
        s.push('\n');
    }
    s
}

/// A run's `curve.csv`: every progress and evaluation event, in arrival order.
/// `t` is the launcher's wall time, `iter` the worker's clock.
fn curve_csv(metrics: &[MetricLine]) -> String {
    let mut s = String::from("t,worker,event,epoch,iter,loss,acc,test_loss,test_acc\n");
    for m in metrics {
        match m.data {
            Event::Progress { epoch, iter, loss, acc, .. } => {
                let _ = writeln!(s, "{},{},progress,{epoch},{iter},{loss},{acc},,", m.t, m.worker);
            }
            Event::Eval { epoch, iter, test_loss, test_acc, .. } => {
                let _ = writeln!(s, "{},{},eval,{epoch},{iter},,,{test_loss},{test_acc}", m.t, m.worker);
            }
            _ => {}
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Plots and the Markdown summary.

/// Which grid dimensions other than consistency and straggler vary: those
/// name the plot files and the summary's extra columns.
struct Varying {
    workers: bool,
    seeds: bool,
    staleness_aware: bool,
}

impl Varying {
    fn of(sweep: &Sweep) -> Varying {
        let distinct =
            |f: &dyn Fn(&Point) -> String| sweep.points.iter().map(f).collect::<BTreeSet<_>>().len() > 1;
        Varying {
            workers: distinct(&|p| p.workers.to_string()),
            seeds: distinct(&|p| p.seed.to_string()),
            staleness_aware: distinct(&|p| p.staleness_aware.to_string()),
        }
    }

    /// File-name suffix and title text for the dimensions that vary.
    fn suffix(&self, p: &Point) -> (String, String) {
        let (mut file, mut title) = (String::new(), Vec::new());
        if self.workers {
            file += &format!("-w{}", p.workers);
            title.push(format!("{} workers", p.workers));
        }
        if self.seeds {
            file += &format!("-seed{}", p.seed);
            title.push(format!("seed {}", p.seed));
        }
        if self.staleness_aware {
            file += if p.staleness_aware { "-sa" } else { "-plain" };
            title.push(if p.staleness_aware { "staleness-aware lr".into() } else { "plain lr".into() });
        }
        (file, if title.is_empty() { String::new() } else { format!(", {}", title.join(", ")) })
    }
}

fn workload_name(config: &RunConfig) -> String {
    let kind = toml::Value::try_from(&config.job.workload)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_default();
    match kind.as_str() {
        "mnist_mlp" => "MNIST MLP".into(),
        "a9a_logreg" => "a9a logistic regression".into(),
        "movielens_mf" => "MovieLens matrix factorization".into(),
        "ctr" => "synthetic CTR".into(),
        other => other.to_string(),
    }
}

fn straggler_text(p: &Point) -> String {
    match p.straggler.resolve(p.workers) {
        None => "no straggler".into(),
        Some(Straggler::Factor { workers, factor }) => format!("worker(s) {workers:?} {factor}x slower"),
        Some(Straggler::Random { workers, probability, mean_ms }) => {
            format!("worker(s) {workers:?} pause w.p. {probability} for ~{mean_ms} ms")
        }
    }
}

/// Every chart of the sweep, with its file name under `plots/`.
fn charts(sweep: &Sweep, rows: &[Row]) -> Vec<(String, Chart)> {
    let vary = Varying::of(sweep);
    let workload = workload_name(&sweep.base);
    let mut out = Vec::new();
    let done: Vec<&Row> = rows.iter().filter(|r| r.wall_s.is_some()).collect();
    let point = |r: &Row| r.point.clone().expect("rows carry their point");

    // Per (straggler, other dims): loss vs time, loss vs iterations, staleness.
    let mut groups: Vec<(String, String, Point)> = Vec::new();
    for p in &sweep.points {
        let (suffix, title) = vary.suffix(p);
        let key = format!("{}{suffix}", p.straggler.label());
        if !groups.iter().any(|(k, _, _)| *k == key) {
            groups.push((key, title, p.clone()));
        }
    }
    for (key, title, example) in &groups {
        let mut members: Vec<&Row> = done
            .iter()
            .copied()
            .filter(|r| {
                let p = point(r);
                format!("{}{}", p.straggler.label(), vary.suffix(&p).0) == *key
            })
            .collect();
        members.sort_by_key(|r| bound_key(point(r).consistency));
        let subtitle = format!(
            "{workload}, {}{title}; worker 0's training loss (mean per progress window)",
            straggler_text(example)
        );
        let progress = |r: &Row, by_iter: bool| -> Vec<(f64, f64)> {
            r.metrics
                .iter()
                .filter_map(|m| match m.data {
                    Event::Progress { iter, loss, .. } if m.worker == 0 => {
                        Some((if by_iter { iter as f64 } else { m.t }, loss))
                    }
                    _ => None,
                })
                .collect()
        };
        let series = |by_iter: bool| -> Vec<Series> {
            members.iter().map(|r| Series::line(r.consistency.clone(), progress(r, by_iter), false)).collect()
        };
        let mut c = Chart::new(
            format!("Training loss vs wall time — {}", example.straggler.label()),
            "wall time since launch (s)",
            "training loss",
        );
        c.subtitle = subtitle.clone();
        c.series = series(false);
        out.push((format!("loss-vs-time-{key}.svg"), c));
        let mut c = Chart::new(
            format!("Training loss vs iterations — {}", example.straggler.label()),
            "iteration (worker 0's clock)",
            "training loss",
        );
        c.subtitle = subtitle;
        c.series = series(true);
        out.push((format!("loss-vs-iter-{key}.svg"), c));

        let mut c = Chart::new(
            format!("Staleness of pushes — {}", example.straggler.label()),
            "staleness τ (iterations the fastest other worker is ahead)",
            "fraction of pushes",
        );
        c.subtitle = format!(
            "{workload}, {}{title}; the last bucket counts τ ≥ {}",
            straggler_text(example),
            ps_server::clock::STALENESS_BUCKETS - 1
        );
        c.log_y = true;
        c.series = members
            .iter()
            .map(|r| {
                let n: u64 = r.histogram.iter().sum::<u64>().max(1);
                let points =
                    r.histogram.iter().enumerate().map(|(i, &c)| (i as f64, c as f64 / n as f64)).collect();
                Series::dots(r.consistency.clone(), points)
            })
            .collect();
        out.push((format!("staleness-{key}.svg"), c));
    }

    // Per other dims: time to target and wall time vs the staleness bound.
    let mut models: Vec<Consistency> = Vec::new();
    for p in &sweep.points {
        if !models.contains(&p.consistency) {
            models.push(p.consistency);
        }
    }
    models.sort_by_key(|&c| bound_key(c));
    let labels: Vec<String> = models
        .iter()
        .map(|c| match c {
            Consistency::Bsp => "BSP (0)".into(),
            Consistency::Ssp { staleness } => staleness.to_string(),
            Consistency::Asp => "ASP".into(),
        })
        .collect();
    let mut outer: Vec<(String, String)> = Vec::new();
    for p in &sweep.points {
        let s = vary.suffix(p);
        if !outer.contains(&s) {
            outer.push(s);
        }
    }
    let mut stragglers: Vec<String> = Vec::new();
    for p in &sweep.points {
        if !stragglers.contains(&p.straggler.label()) {
            stragglers.push(p.straggler.label());
        }
    }
    for (suffix, title) in &outer {
        let by_bound = |value: &dyn Fn(&Row) -> Option<f64>| -> Vec<Series> {
            stragglers
                .iter()
                .map(|st| {
                    let points = done
                        .iter()
                        .filter(|r| r.straggler == *st && vary.suffix(&point(r)).0 == *suffix)
                        .filter_map(|r| {
                            let i = models.iter().position(|&m| m == point(r).consistency)?;
                            Some((i as f64, value(r)?))
                        })
                        .collect();
                    Series::line(st.clone(), points, true)
                })
                .collect()
        };
        if let Some(target) = sweep.settings.target_accuracy {
            let mut c = Chart::new(
                format!("Time to test score {target} vs staleness bound"),
                "staleness bound s",
                "wall time to target (s)",
            );
            c.subtitle = format!(
                "{workload}{title}; first evaluation reaching the target (a missing point: never reached)"
            );
            c.x = XAxis::Categories(labels.clone());
            c.y_from_zero = true;
            c.series = by_bound(&|r: &Row| r.time_to_target_s);
            out.push((format!("time-to-target{suffix}.svg"), c));
        }
        let mut c =
            Chart::new("Wall time vs staleness bound", "staleness bound s", "wall time of the run (s)");
        c.subtitle = format!("{workload}{title}; every worker runs its full share of iterations");
        c.x = XAxis::Categories(labels.clone());
        c.y_from_zero = true;
        c.series = by_bound(&|r: &Row| r.wall_s);
        out.push((format!("wall-time{suffix}.svg"), c));
    }
    out
}

fn summary_md(sweep: &Sweep, rows: &[Row], charts: &[(String, Chart)]) -> String {
    let vary = Varying::of(sweep);
    let score = rows.iter().find_map(|r| r.score_name.clone()).unwrap_or_else(|| "score".into());
    let mut s = String::new();
    let _ = writeln!(s, "# Sweep: {}\n", workload_name(&sweep.base));
    let count = |st: &str| rows.iter().filter(|r| r.status == st).count();
    let _ = writeln!(
        s,
        "{} runs: {} ok, {} failed, {} error, {} timeout, {} pending. Each run: {} shard(s), its own local cluster; sweep file: `sweep.toml`.\n",
        rows.len(),
        count("ok"),
        count("failed"),
        count("error"),
        count("timeout"),
        rows.len() - count("ok") - count("failed") - count("error") - count("timeout"),
        sweep.base.cluster.servers
    );
    let mut header = vec!["model", "straggler"];
    if vary.workers {
        header.push("workers");
    }
    if vary.seeds {
        header.push("seed");
    }
    if vary.staleness_aware {
        header.push("staleness-aware lr");
    }
    let final_col = format!("final test {score}");
    let target_col = sweep.settings.target_accuracy.map(|t| format!("time to {t} (s)"));
    header.extend(["status", "wall s", "samples/s", &final_col]);
    if let Some(t) = &target_col {
        header.push(t);
    }
    header.extend(["mean staleness", "max staleness", "blocked s"]);
    let _ = writeln!(s, "| {} |", header.join(" | "));
    // Text columns up to and including `status` are left-aligned, numbers right-aligned.
    let numbers_from = header.iter().position(|h| *h == "status").map_or(0, |i| i + 1);
    let align: Vec<&str> = (0..header.len()).map(|i| if i < numbers_from { "---" } else { "---:" }).collect();
    let _ = writeln!(s, "|{}|", align.join("|"));
    let dash = || "–".to_string();
    for r in rows {
        let mut f = vec![r.consistency.clone(), r.straggler.clone()];
        if vary.workers {
            f.push(r.workers.to_string());
        }
        if vary.seeds {
            f.push(r.seed.to_string());
        }
        if vary.staleness_aware {
            f.push(if r.staleness_aware { "yes".into() } else { "no".into() });
        }
        f.push(r.status.clone());
        f.push(r.wall_s.map_or_else(dash, |v| format!("{v:.1}")));
        f.push(r.samples_per_s.map_or_else(dash, |v| format!("{v:.0}")));
        f.push(r.test_score.map_or_else(dash, |v| format!("{v:.4}")));
        if target_col.is_some() {
            f.push(match (r.time_to_target_s, r.wall_s) {
                (Some(t), _) => format!("{t:.1}"),
                (None, Some(_)) => "not reached".into(),
                (None, None) => dash(),
            });
        }
        f.push(r.mean_staleness.map_or_else(dash, |v| format!("{v:.2}")));
        f.push(r.max_staleness_text());
        f.push(r.blocked_s.map_or_else(dash, |v| format!("{v:.1}")));
        let _ = writeln!(s, "| {} |", f.join(" | "));
    }
    let errors: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\nProblems:\n");
        for r in errors {
            let _ = writeln!(s, "- `{}` ({}): {}", r.name, r.status, r.error.as_deref().unwrap_or(""));
        }
    }
    let _ = writeln!(
        s,
        "\nColumns: *wall s* from launch to the last worker's exit (every worker runs its full share of iterations); \
         *samples/s* over all workers; *time to target*: launcher wall time of worker 0's first per-epoch evaluation \
         reaching the target (or of the final evaluation); *staleness* τ of a push: how many iterations the fastest \
         other worker had completed beyond the iteration the push was computed at, counted on every shard \
         (≥{} is the histogram's overflow bucket); *blocked s*: time reads waited at the consistency gate, summed over shards.\n",
        ps_server::clock::STALENESS_BUCKETS - 1
    );
    let _ = writeln!(s, "Per-run curves: `<run>/curve.csv`; all numbers: `results.csv`, `results.jsonl`.\n");
    let _ = writeln!(s, "## Plots\n");
    for (file, chart) in charts {
        let _ = writeln!(s, "- [{}](plots/{file})", chart.title);
    }
    let _ = writeln!(s);
    for (file, chart) in charts {
        let _ = writeln!(s, "![{}](plots/{file})\n", chart.title);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[cluster]
servers = 2
workers = 2

[job]
epochs = 1
consistency = { model = "asp" }

[job.workload]
kind = "mnist_mlp"
"#;

    #[test]
    fn stragglers_parse_label_and_resolve() {
        let f = StragglerSpec::parse("factor:3").unwrap();
        assert_eq!(f.label(), "factor3");
        assert_eq!(f.resolve(4), Some(Straggler::Factor { workers: vec![3], factor: 3.0 }));
        let r = StragglerSpec::parse("random:0.05:20").unwrap();
        assert_eq!(r.label(), "random0.05x20ms");
        assert_eq!(
            r.resolve(2),
            Some(Straggler::Random { workers: vec![0, 1], probability: 0.05, mean_ms: 20.0 })
        );
        let on = StragglerSpec::parse("factor:1.5@0,2").unwrap();
        assert_eq!(on.label(), "factor1.5-on0+2");
        assert_eq!(on.resolve(3), Some(Straggler::Factor { workers: vec![0, 2], factor: 1.5 }));
        assert_eq!(StragglerSpec::parse("none").unwrap().resolve(2), None);
        for bad in ["", "factor", "factor:x", "random:0.1", "none@1", "slow:2", "factor:inf"] {
            assert!(StragglerSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_grid_is_a_cartesian_product_with_stable_names() {
        let text = format!(
            "{BASE}\n[grid]\nconsistency = [\"bsp\", \"ssp:2\", \"asp\"]\nstraggler = [\"none\", \"factor:3\"]\nseeds = [1, 2]\nstaleness_aware = [false, true]\n[sweep]\ntarget_accuracy = 0.9\n"
        );
        let s = Sweep::parse(&text).unwrap();
        assert_eq!(s.points.len(), 3 * 2 * 2 * 2);
        assert_eq!(s.points[0].name(), "bsp-w2-none-seed1");
        assert_eq!(s.points[1].name(), "ssp2-w2-none-seed1");
        assert_eq!(s.points[3].name(), "bsp-w2-none-seed1-sa");
        assert_eq!(s.points.last().unwrap().name(), "asp-w2-factor3-seed2-sa");
        let c = s.points[7].config(&s.base);
        assert_eq!(c.job.consistency, Consistency::Ssp { staleness: 2 });
        assert_eq!(c.job.straggler, Some(Straggler::Factor { workers: vec![1], factor: 3.0 }));
        assert!(!c.job.optimizer.staleness_aware);
        assert_eq!(s.settings.target_accuracy, Some(0.9));
    }

    #[test]
    fn an_empty_grid_is_the_base_job() {
        let s = Sweep::parse(BASE).unwrap();
        assert_eq!(s.points.len(), 1);
        assert_eq!(s.points[0].name(), "asp-w2-none-seed42");
        assert_eq!(s.points[0].config(&s.base), s.base);
    }

    #[test]
    fn bad_sweeps_are_refused() {
        for (grid, why) in [
            ("consistency = [\"bsp\", \"bsp\"]", "twice"),
            ("consistency = [\"ssp\"]", "ssp:N"),
            ("straggler = [\"factor:3@5\"]", "does not exist"),
            ("straggler = [\"factor:0.5\"]", "factor"),
            ("consistency = [\"bsp\"]\nstraggler = [\"factor:2@0,1\"]", "feeds on itself"),
            ("wokers = [2]", "unknown field"),
        ] {
            let err = Sweep::parse(&format!("{BASE}\n[grid]\n{grid}\n")).unwrap_err();
            assert!(err.contains(why), "{grid}: {err}");
        }
        assert!(Sweep::parse(&format!("{BASE}\n[sweep]\nrun_timeout_s = 0\n")).is_err());
    }

    #[test]
    fn the_example_sweeps_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sweeps");
        for (file, points) in [("mnist.toml", 21), ("a9a.toml", 21)] {
            let s = Sweep::load(&dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(s.points.len(), points, "{file}");
            assert!(s.settings.target_accuracy.is_some(), "{file}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
