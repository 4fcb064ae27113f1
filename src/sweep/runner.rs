//! Running the points of a sweep, one local cluster after the other: resume
//! (skip points whose folder already holds results of the same config),
//! per-run timeouts, Ctrl-C, and the progress display on stderr.

use std::path::Path;
use std::time::{Duration, Instant};

use ps_worker::config::RunConfig;
use ps_worker::event::Event;

use super::collect::Row;
use super::grid::Sweep;
use super::{Error, Options, Result, io, report, write_file};
use crate::artifact::{JsonFile, RunSummary, SweepStatus};
use crate::run::{self, Plan};

/// True if `dir` holds finished results of `config`: a `summary.json` and
/// the same `config.toml`.
pub(super) fn is_done(dir: &Path, config: &RunConfig) -> bool {
    dir.join(RunSummary::FILE).is_file()
        && ps_common::files::read_text_capped(&dir.join("config.toml"), ps_common::files::MAX_TEXT_FILE)
            .ok()
            .and_then(|t| toml::from_str::<RunConfig>(&t).ok())
            .is_some_and(|c| &c == config)
}

/// Prints every point and whether it is done.
pub(super) fn list(sweep: &Sweep, out: &Path) {
    use std::io::Write;
    let n = sweep.points.len();
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

/// Runs every point of `sweep` not yet done (all of them if `opts.fresh`),
/// in order, rewriting the reports after each. Ctrl-C stops the current run
/// (no process is left) and returns [`Error::Interrupted`] after writing the
/// reports so far.
pub(super) async fn run_points(sweep: &Sweep, opts: &Options, out: &Path) -> Result<Vec<Row>> {
    let n = sweep.points.len();
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    let source = ps_common::files::read_capped(&opts.file, ps_common::files::MAX_TEXT_FILE)
        .map_err(io(format!("reading {}", opts.file.display())))?;
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
        let plan = Plan::new(&opts.exe, config, dir.clone());
        let mut bar = RunBar::new(&name);
        let mut rx = int_rx.clone();
        let status = tokio::select! {
            r = tokio::time::timeout(timeout, run::run(plan, |w, e| bar.update(w, e))) => match r {
                Ok(Ok(s)) if s.failed.is_empty() => SweepStatus::new("ok", None),
                Ok(Ok(s)) => {
                    let why: Vec<String> = s.failed.iter().map(|(w, e)| format!("worker {w}: {e}")).collect();
                    SweepStatus::new("failed", Some(why.join("; ")))
                }
                Ok(Err(crate::cluster::Error::Interrupted)) => SweepStatus::new("interrupted", None),
                Ok(Err(e)) => SweepStatus::new("error", Some(e.to_string())),
                Err(_) => SweepStatus::new("timeout", Some(format!("killed after {} s", sweep.settings.run_timeout_s))),
            },
            // Dropping the run kills its processes (they are `kill_on_drop`).
            _ = rx.wait_for(|&v| v) => SweepStatus::new("interrupted", None),
        };
        bar.finish();
        let status = SweepStatus { elapsed_s: started.elapsed().as_secs_f64(), ..status };
        status.write(&dir)?;
        if status.status == "interrupted" {
            interrupted = true;
            eprintln!("[{}/{n}] interrupted {name}", i + 1);
            break;
        }
        took.push(status.elapsed_s);
        ran += 1;
        let rows = report::write_all(sweep, out)?;
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
    let rows = report::write_all(sweep, out)?;
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
            Event::Done(d) => self.iters[worker] = d.iters,
            Event::Metrics { .. } => {}
        }
        self.bar.set_position(self.iters.iter().sum());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
