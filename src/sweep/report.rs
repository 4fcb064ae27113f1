//! The reports of a sweep, rewritten from the run folders after every run:
//! `results.csv` and `results.jsonl` (one row per point), a `curve.csv` in
//! every run folder, the charts under `plots/` (drawn by [`crate::plot`])
//! and `summary.md`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use ps_common::spec::Consistency;
use ps_worker::config::{RunConfig, Straggler};
use ps_worker::event::Event;

use super::collect::{Row, collect};
use super::grid::{Point, Sweep, bound_key};
use super::{Result, io, write_file};
use crate::artifact::MetricsLine;
use crate::plot::{Chart, Series, XAxis};

/// Rereads every run folder of `out` and rewrites every report; returns the rows.
pub(super) fn write_all(sweep: &Sweep, out: &Path) -> Result<Vec<Row>> {
    let rows = collect(sweep, out);
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
        "data",
        "backup_workers",
        "delay_compensation",
        "mode",
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
        "late_dropped",
        "late_weighted",
        "data_reassigned",
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
            r.data.clone(),
            r.backup_workers.to_string(),
            r.delay_compensation.clone(),
            r.mode.clone(),
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
            opt(r.late_dropped),
            opt(r.late_weighted),
            opt(r.data_reassigned),
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
fn curve_csv(metrics: &[MetricsLine]) -> String {
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
    /// Any of data assignment, backup workers, delay compensation.
    remedies: bool,
}

impl Varying {
    fn of(sweep: &Sweep) -> Varying {
        let distinct =
            |f: &dyn Fn(&Point) -> String| sweep.points.iter().map(f).collect::<BTreeSet<_>>().len() > 1;
        Varying {
            workers: distinct(&|p| p.workers.to_string()),
            seeds: distinct(&|p| p.seed.to_string()),
            staleness_aware: distinct(&|p| p.staleness_aware.to_string()),
            remedies: distinct(&|p| format!("{:?}{}{:?}", p.data, p.backup_workers, p.delay_compensation)),
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
        if self.remedies {
            file += &format!("-{}", p.data);
            title.push(format!("{} data", p.data));
            if p.backup_workers > 0 {
                file += &format!("-b{}", p.backup_workers);
                title.push(format!("{} backup worker(s)", p.backup_workers));
            }
            if let Some(d) = p.delay_compensation {
                file += &format!("-dc{}{}", if d.adaptive { "a" } else { "c" }, d.lambda);
                title.push(format!("DC-ASGD-{} λ={}", if d.adaptive { "a" } else { "c" }, d.lambda));
            }
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
        c.subtitle = format!("{workload}{title}; every run trains on the same total data");
        c.x = XAxis::Categories(labels.clone());
        c.y_from_zero = true;
        c.series = by_bound(&|r: &Row| r.wall_s);
        out.push((format!("wall-time{suffix}.svg"), c));
    }

    // Every training mode (model and remedies) side by side, one line per
    // straggler setting: wall time, time to target and final score.
    let mut modes: Vec<String> = Vec::new();
    for p in &sweep.points {
        if !modes.contains(&p.mode()) {
            modes.push(p.mode());
        }
    }
    if vary.remedies || vary.staleness_aware {
        let by_mode = |value: &dyn Fn(&Row) -> Option<f64>| -> Vec<Series> {
            stragglers
                .iter()
                .map(|st| {
                    let points = done
                        .iter()
                        .filter(|r| r.straggler == *st)
                        .filter_map(|r| Some((modes.iter().position(|m| *m == r.mode)? as f64, value(r)?)))
                        .collect();
                    Series::line(st.clone(), points, true)
                })
                .collect()
        };
        let score = rows.iter().find_map(|r| r.score_name.clone()).unwrap_or_else(|| "score".into());
        let mut charts = vec![
            (
                "wall-time-by-mode.svg",
                "Wall time by training mode",
                "wall time of the run (s)",
                by_mode(&|r| r.wall_s),
            ),
            (
                "final-score-by-mode.svg",
                "Final test score by training mode",
                "final test score",
                by_mode(&|r| r.test_score),
            ),
        ];
        if sweep.settings.target_accuracy.is_some() {
            charts.push((
                "time-to-target-by-mode.svg",
                "Time to target by training mode",
                "wall time to target (s)",
                by_mode(&|r| r.time_to_target_s),
            ));
        }
        for (file, title, y, series) in charts {
            let mut c = Chart::new(title, "training mode (consistency, data, backup workers, DC-ASGD)", y);
            c.subtitle = format!(
                "{workload}; one line per straggler setting; the same total data in every run ({score})"
            );
            c.x = XAxis::Categories(modes.clone());
            c.y_from_zero = file != "final-score-by-mode.svg";
            c.series = series;
            out.push((file.to_string(), c));
        }
    }
    out
}

/// The acceptance figure of the straggler remedies: for every straggler
/// setting, the fastest run that reached the target, against BSP with no
/// straggler and no remedy.
fn best_against_bsp(sweep: &Sweep, rows: &[Row]) -> Vec<String> {
    let plain = |r: &Row| {
        r.point.as_ref().is_some_and(|p| {
            p.consistency == Consistency::Bsp
                && p.data == ps_worker::config::DataAssignment::Fixed
                && p.backup_workers == 0
                && p.delay_compensation.is_none()
                && !p.staleness_aware
        })
    };
    let Some(base) = rows.iter().find(|r| r.straggler == "none" && plain(r)).and_then(|r| r.wall_s) else {
        return Vec::new();
    };
    let target = sweep.settings.target_accuracy;
    let mut stragglers: Vec<&str> = Vec::new();
    for r in rows {
        if r.straggler != "none" && !stragglers.contains(&r.straggler.as_str()) {
            stragglers.push(&r.straggler);
        }
    }
    let mut out = Vec::new();
    for st in stragglers {
        let best = rows
            .iter()
            .filter(|r| r.straggler == st && r.status == "ok")
            .filter(|r| target.is_none_or(|t| r.test_score.is_some_and(|s| s >= t)))
            .filter_map(|r| Some((r, r.wall_s?)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        out.push(match best {
            Some((r, wall)) => format!(
                "- {st}: best `{}` ({}), {wall:.1} s = **{:.2}x** BSP without straggler ({base:.1} s); final test score {:.4}",
                r.name,
                r.mode,
                wall / base,
                r.test_score.unwrap_or(f64::NAN)
            ),
            None => format!("- {st}: no run reached the target"),
        });
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
    if vary.remedies {
        header.extend(["data", "backup", "DC-ASGD"]);
    }
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
    if vary.remedies {
        header.push("late dropped");
        header.push("ranges reassigned");
    }
    let _ = writeln!(s, "| {} |", header.join(" | "));
    // Text columns up to and including `status` are left-aligned, numbers right-aligned.
    let numbers_from = header.iter().position(|h| *h == "status").map_or(0, |i| i + 1);
    let align: Vec<&str> = (0..header.len()).map(|i| if i < numbers_from { "---" } else { "---:" }).collect();
    let _ = writeln!(s, "|{}|", align.join("|"));
    let dash = || "–".to_string();
    for r in rows {
        let mut f = vec![r.consistency.clone(), r.straggler.clone()];
        if vary.remedies {
            f.push(r.data.clone());
            f.push(r.backup_workers.to_string());
            f.push(r.delay_compensation.clone());
        }
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
        if vary.remedies {
            f.push(r.late_dropped.map_or_else(dash, |v| v.to_string()));
            f.push(r.data_reassigned.map_or_else(dash, |v| v.to_string()));
        }
        let _ = writeln!(s, "| {} |", f.join(" | "));
    }
    let best = best_against_bsp(sweep, rows);
    if !best.is_empty() {
        let _ = writeln!(
            s,
            "\nFastest run per straggler setting that reached the target, against BSP with fixed shares and no straggler:\n"
        );
        for line in best {
            let _ = writeln!(s, "{line}");
        }
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
        "\nColumns: *wall s* from launch to the last worker's exit (every run trains on the same total data: with fixed shares each worker runs its share, with dynamic data the workers drain one queue); \
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

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
