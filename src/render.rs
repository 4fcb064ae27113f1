//! What `ps-cluster` shows a person: the progress bars of a training run,
//! the summary printed after it, and the `status` table of the shards'
//! clocks. Text is built from the typed artifacts ([`RunSummary`],
//! [`ShardStats`]), never from wire structs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ps_worker::event::{Event, WorkerDone};

use crate::artifact::{RunSummary, ShardStats};

/// One progress bar per worker, on stderr; evaluations are printed above them.
pub struct Bars {
    multi: MultiProgress,
    bars: std::sync::Mutex<HashMap<usize, ProgressBar>>,
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

impl Bars {
    pub fn new() -> Bars {
        Bars { multi: MultiProgress::new(), bars: Default::default() }
    }

    fn bar(&self, worker: usize) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.entry(worker)
            .or_insert_with(|| {
                let style = ProgressStyle::with_template(
                    "{prefix:>9} [{bar:32.cyan/blue}] {pos:>6}/{len:6} {elapsed_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> ");
                self.multi.add(ProgressBar::new(0).with_style(style).with_prefix(format!("worker {worker}")))
            })
            .clone()
    }

    /// Shows one event of `worker`.
    pub fn update(&self, worker: usize, event: &Event) {
        let bar = self.bar(worker);
        match event {
            Event::Start { total_iters, .. } => bar.set_length(*total_iters),
            Event::Progress { epoch, iter, loss, acc, samples_per_s, .. } => {
                bar.set_position(*iter);
                bar.set_message(format!(
                    "epoch {:>2}  loss {loss:.4}  acc {:5.2}%  {samples_per_s:>7.0} samples/s",
                    epoch + 1,
                    acc * 100.0
                ));
            }
            Event::Eval { epoch, test_loss, test_acc, wall_s, .. } => {
                self.multi.suspend(|| {
                    eprintln!(
                        "epoch {:>2}  test loss {test_loss:.4}  test score {test_acc:.4}  ({wall_s:.1} s, worker {worker})",
                        epoch + 1
                    )
                });
            }
            Event::Done(_) => bar.finish(),
            Event::Metrics { .. } => {}
        }
    }

    /// Removes the bars.
    pub fn finish(&self) {
        let _ = self.multi.clear();
    }
}

/// The summary printed after a training run.
pub fn run_summary(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(out, "run folder      {}", s.run_dir.display());
    let _ =
        writeln!(out, "cluster         {} shard(s), {} worker(s), {}", s.servers, s.workers, s.consistency);
    let _ = writeln!(out, "test {:<10} {:.4}   (test loss {:.4})", s.score_name, s.test_score, s.test_loss);
    let _ = writeln!(out, "wall time       {:.1} s", s.wall_s);
    let _ = writeln!(out, "throughput      {:.0} samples/s (all workers)", s.samples_per_s);
    for e in &s.done {
        if let Event::Done(d) = e {
            let WorkerDone { worker, samples_per_s, pull_s, compute_s, push_s, straggle_s, wall_s, .. } = d;
            let pct = |x: f64| 100.0 * x / wall_s.max(1e-9);
            let _ = write!(
                out,
                "  worker {worker}: {samples_per_s:>7.0} samples/s; time in pull {:.0}%, compute {:.0}%, push {:.0}%, straggle {:.0}%",
                pct(*pull_s),
                pct(*compute_s),
                pct(*push_s),
                pct(*straggle_s)
            );
            // Shards that refused requests for want of room (rate, bytes
            // in flight) slowed the worker down: say so.
            let _ = match d.pushback_waits {
                0 => writeln!(out),
                n => writeln!(out, "; {n} requests pushed back by shards and sent again"),
            };
        }
    }
    let _ = writeln!(
        out,
        "wire            {:.1} KiB pushed, {:.1} KiB pulled per iteration of a worker; codecs: {}",
        s.bytes_pushed_per_iter / 1024.0,
        s.bytes_pulled_per_iter / 1024.0,
        if s.codecs.is_empty() { "f32" } else { &s.codecs }
    );
    let _ = writeln!(
        out,
        "staleness       mean {:.2}, max {} (histogram {:?})",
        s.mean_staleness(),
        s.max_staleness(),
        s.staleness_histogram
    );
    let _ = writeln!(out, "blocked in reads {:.1} s (summed over shards)", s.blocked_s);
    let rss: Vec<String> =
        s.server_peak_rss.iter().map(|b| format!("{:.1} MiB", *b as f64 / (1 << 20) as f64)).collect();
    let _ = writeln!(out, "server peak RSS {}", rss.join(", "));
    if s.sparse_rows > 0 {
        let _ = writeln!(out, "sparse rows     {}", s.sparse_rows);
    }
    if let Some(from) = &s.resumed_from {
        let _ = writeln!(out, "resumed from    {}", from.display());
    }
    let c = &s.checkpoints;
    if c.taken > 0 || c.failed > 0 {
        let _ = writeln!(
            out,
            "checkpoints     {} taken ({} failed), last {:.1} MiB; pushes held {:.1} ms mean, {:.1} ms max; {:.0} ms each",
            c.taken,
            c.failed,
            c.last_bytes as f64 / (1 << 20) as f64,
            c.mean_held_ms,
            c.max_held_ms,
            c.mean_total_ms
        );
    }
    for r in &s.recoveries {
        let _ = writeln!(out, "RECOVERED       {}", r.describe());
    }
    for (w, why) in &s.failed {
        let _ = writeln!(out, "FAILED worker {w}: {why}");
    }
    out
}

/// The `status` table: each shard's model and counters, then its clock table.
pub fn status(shards: &[ShardStats]) -> String {
    let mut out = String::new();
    for s in shards {
        let model = s.consistency.map_or("-".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "shard {} of {}: {model}, {} pushes, {} pulls",
            s.shard, s.num_shards, s.pushes, s.pulls
        );
        for c in &s.clocks {
            let wait = match c.waiting_for_clock {
                Some(clock) => format!("waiting for clock {clock} on workers {:?}", c.blocked_on),
                None => "running".to_string(),
            };
            let _ = writeln!(out, "  worker {:>3}  clock {:>6}  {wait}", c.worker, c.clock);
        }
    }
    out
}

/// The table part of a sweep's `summary.md` (everything before its plots),
/// printed when a sweep ends.
pub fn sweep_summary(out_dir: &Path) -> String {
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap_or_default();
    summary.split("\n## Plots").next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use ps_common::spec::Consistency;

    use super::*;
    use crate::artifact::{JsonFile, WorkerClock};

    #[test]
    fn the_status_table_shows_models_and_waits() {
        let shard = ShardStats {
            shard: 1,
            num_shards: 2,
            consistency: Some(Consistency::Ssp { staleness: 2 }),
            pulls: 7,
            pushes: 9,
            duplicate_pushes: 0,
            rejected: 0,
            values_pulled: 0,
            values_pushed: 0,
            tables: 1,
            dense_chunks: 1,
            sparse_rows: 0,
            staleness_histogram: vec![],
            blocked_s: 0.0,
            clocks: vec![
                WorkerClock {
                    worker: 0,
                    clock: 12,
                    waiting_for_clock: Some(12),
                    blocked_on: vec![1],
                    alive: true,
                },
                WorkerClock { worker: 1, clock: 9, waiting_for_clock: None, blocked_on: vec![], alive: true },
            ],
            stragglers: Default::default(),
        };
        let unjoined = ShardStats { consistency: None, clocks: vec![], shard: 0, ..shard.clone() };
        assert_eq!(
            status(&[unjoined, shard]),
            "shard 0 of 2: -, 9 pushes, 7 pulls\n\
             shard 1 of 2: SSP(s=2), 9 pushes, 7 pulls\n\
             \x20 worker   0  clock     12  waiting for clock 12 on workers [1]\n\
             \x20 worker   1  clock      9  running\n"
        );
    }

    #[test]
    fn the_run_summary_names_failures_and_staleness() {
        let s = RunSummary {
            schema_version: RunSummary::VERSION,
            run_dir: "runs/1-mnist".into(),
            consistency: "BSP".into(),
            servers: 2,
            workers: 2,
            wall_s: 12.9,
            samples_per_s: 46684.0,
            test_loss: 0.1071,
            test_score: 0.9731,
            score_name: "accuracy".into(),
            failed: vec![(1, "signal: 9".into())],
            done: vec![
                Event::Done(WorkerDone { worker: 0, wall_s: 1.0, ..Default::default() }),
                Event::Done(WorkerDone { worker: 1, wall_s: 1.0, pushback_waits: 7, ..Default::default() }),
            ],
            staleness_histogram: vec![3, 1],
            blocked_s: 0.0,
            server_peak_rss: vec![3 << 20],
            sparse_rows: 0,
            checkpoints: Default::default(),
            recoveries: vec![],
            resumed_from: None,
            codecs: String::new(),
            bytes_pushed_per_iter: 0.0,
            bytes_pulled_per_iter: 0.0,
        };
        let text = run_summary(&s);
        assert!(text.contains("test accuracy   0.9731   (test loss 0.1071)"), "{text}");
        assert!(text.contains("staleness       mean 0.25, max 1"), "{text}");
        assert!(text.contains("server peak RSS 3.0 MiB"), "{text}");
        assert!(text.contains("FAILED worker 1: signal: 9"), "{text}");
        assert!(text.contains("straggle 0%\n  worker 1:"), "no pushbacks, nothing said: {text}");
        assert!(text.contains("straggle 0%; 7 requests pushed back by shards and sent again\n"), "{text}");
    }
}
