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
//! Reading goes through the typed run artifacts of [`crate::artifact`]: a
//! run folder written by a newer ps-cluster is reported as an error, not
//! misread.
//!
//! Resuming is the default: a point whose folder has a `summary.json` and
//! the same `config.toml` as planned is not run again, so rerunning an
//! interrupted (or extended) sweep continues it; points that errored or
//! timed out (no `summary.json`) are retried. `fresh` reruns everything.
//!
//! The parts: `grid` parses the sweep file into points, `runner` runs
//! them, `collect` reads run folders into [`Row`]s, `report` writes the
//! tables, charts and summary.

mod collect;
mod grid;
mod report;
mod runner;

use std::path::{Path, PathBuf};

pub use collect::Row;
pub use grid::{Grid, Point, Settings, StragglerSpec, Sweep, parse_consistency};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("sweep file {path}: {reason}")]
    Config { path: String, reason: String },
    #[error(transparent)]
    Artifact(#[from] crate::artifact::Error),
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

/// Does what `opts` asks of the sweep file `opts.file`: list its points
/// (returns no rows), rewrite its reports from the run folders, or run every
/// point not yet done and then write the reports (see the module docs).
pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let sweep = Sweep::load(&opts.file)?;
    let out = opts.out_dir();
    if opts.list {
        runner::list(&sweep, &out);
        return Ok(Vec::new());
    }
    if opts.report_only {
        return report::write_all(&sweep, &out);
    }
    runner::run_points(&sweep, opts, &out).await
}
