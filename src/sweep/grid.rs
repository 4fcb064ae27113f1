//! The sweep file: `[grid]` and `[sweep]` over a base run file, parsed into
//! the list of [`Point`]s (the cartesian product, in run order), each with a
//! stable name that is also its run folder's name.

use std::collections::BTreeSet;
use std::path::Path;

use ps_common::optim::DelayCompensation;
use ps_common::spec::Consistency;
use ps_worker::config::{DataAssignment, RunConfig, Straggler};
use serde::Deserialize;

use super::{Error, Result, io};

/// Most points a grid may have (each is a whole training run).
pub const MAX_POINTS: usize = 10_000;

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
    /// `fixed`, `dynamic` (see `[job] data`).
    #[serde(default)]
    pub data: Vec<String>,
    /// Backup workers b (BSP/SSP with dynamic data only; other points of
    /// the product with b > 0 are left out of the grid).
    #[serde(default)]
    pub backup_workers: Vec<u32>,
    /// `off`, `LAMBDA` (DC-ASGD-c) or `a:LAMBDA` (DC-ASGD-a).
    #[serde(default)]
    pub delay_compensation: Vec<String>,
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

/// `fixed` or `dynamic`.
pub fn parse_data(s: &str) -> std::result::Result<DataAssignment, String> {
    match s.trim() {
        "fixed" => Ok(DataAssignment::Fixed),
        "dynamic" => Ok(DataAssignment::Dynamic),
        _ => Err(format!("expected fixed or dynamic, got `{s}`")),
    }
}

/// `off`, `LAMBDA` (DC-ASGD-c) or `a:LAMBDA` (DC-ASGD-a, the mean square's
/// decay at its default).
pub fn parse_dc(s: &str) -> std::result::Result<Option<DelayCompensation>, String> {
    let bad = || format!("expected off, LAMBDA or a:LAMBDA, got `{s}`");
    let s = s.trim();
    if s == "off" {
        return Ok(None);
    }
    let (adaptive, lambda) = match s.strip_prefix("a:") {
        Some(l) => (true, l),
        None => (false, s),
    };
    let lambda: f32 = lambda.parse().map_err(|_| bad())?;
    let dc = DelayCompensation { lambda, adaptive, momentum: 0.95 };
    dc.validate().map_err(|e| e.to_string())?;
    Ok(Some(dc))
}

/// `dc0.04`, `dca2` (empty without compensation).
fn dc_label(dc: Option<DelayCompensation>) -> String {
    match dc {
        None => String::new(),
        Some(d) => format!("dc{}{}", if d.adaptive { "a" } else { "" }, d.lambda),
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
pub(super) fn bound_key(c: Consistency) -> u64 {
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
    pub data: DataAssignment,
    pub backup_workers: u32,
    pub delay_compensation: Option<DelayCompensation>,
}

impl Point {
    /// The run folder's name: `bsp-w2-factor3-seed1`, then `-sa` when the
    /// learning rate is staleness-aware, `-dyn` for dynamic data, `-bN`
    /// with backup workers, `-dcL` / `-dcaL` with delay compensation.
    pub fn name(&self) -> String {
        let sa = if self.staleness_aware { "-sa" } else { "" };
        format!(
            "{}-w{}-{}-seed{}{sa}{}",
            model_key(self.consistency),
            self.workers,
            self.straggler.label(),
            self.seed,
            self.mode_suffix()
        )
    }

    /// `-dyn-b1-dca2`: the straggler remedies of this point (empty: none).
    fn mode_suffix(&self) -> String {
        let mut s = String::new();
        if self.data == DataAssignment::Dynamic {
            s += "-dyn";
        }
        if self.backup_workers > 0 {
            s += &format!("-b{}", self.backup_workers);
        }
        if self.delay_compensation.is_some() {
            s += &format!("-{}", dc_label(self.delay_compensation));
        }
        s
    }

    /// The training mode without the straggler and seed: `ASP`, `BSP
    /// dynamic b1`, `ASP dynamic DC-a2 sa`.
    pub fn mode(&self) -> String {
        let mut s = self.consistency.to_string();
        if self.data == DataAssignment::Dynamic {
            s += " dynamic";
        }
        if self.backup_workers > 0 {
            s += &format!(" b{}", self.backup_workers);
        }
        if let Some(d) = self.delay_compensation {
            s += &format!(" DC-{}{}", if d.adaptive { "a" } else { "c" }, d.lambda);
        }
        if self.staleness_aware {
            s += " sa";
        }
        s
    }

    /// The base run with this point's settings.
    pub fn config(&self, base: &RunConfig) -> RunConfig {
        let mut c = base.clone();
        c.cluster.workers = self.workers;
        c.job.consistency = self.consistency;
        c.job.seed = self.seed;
        c.job.straggler = self.straggler.resolve(self.workers);
        c.job.optimizer.staleness_aware = self.staleness_aware;
        c.job.data = self.data;
        c.job.backup.workers = self.backup_workers;
        c.job.optimizer.delay_compensation = self.delay_compensation;
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
        // At most a year: the runner makes a `Duration` of it (1e300 panicked).
        let max_s = ps_worker::config::MAX_SECONDS;
        if !(settings.run_timeout_s > 0.0 && settings.run_timeout_s <= max_s) {
            return Err(format!("run_timeout_s must be in (0, {max_s}], got {}", settings.run_timeout_s));
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
        let datas = match grid.data.is_empty() {
            true => vec![base.job.data],
            false => grid.data.iter().map(|s| parse_data(s)).collect::<std::result::Result<_, _>>()?,
        };
        let dcs = match grid.delay_compensation.is_empty() {
            true => vec![base.job.optimizer.delay_compensation],
            false => {
                grid.delay_compensation.iter().map(|s| parse_dc(s)).collect::<std::result::Result<_, _>>()?
            }
        };
        let backups = or(&grid.backup_workers, base.job.backup.workers);
        let (seeds, workers) = (or(&grid.seeds, base.job.seed), or(&grid.workers, base.cluster.workers));
        let max_workers = ps_worker::config::MAX_PROCESSES;
        if let Some(&w) = workers.iter().find(|&&w| w == 0 || w > max_workers) {
            return Err(format!("grid workers must be 1..={max_workers}, got {w}"));
        }
        let staleness = or(&grid.staleness_aware, base.job.optimizer.staleness_aware);
        // Counted before any point is made: every list is short, their
        // product need not be (eight lists of 1000 were 10^24 points).
        let count = [
            seeds.len(),
            workers.len(),
            stragglers.len(),
            staleness.len(),
            datas.len(),
            backups.len(),
            dcs.len(),
            models.len(),
        ]
        .into_iter()
        .try_fold(1usize, usize::checked_mul)
        .filter(|&n| n <= MAX_POINTS);
        if count.is_none() {
            return Err(format!("the grid has more than {MAX_POINTS} points"));
        }
        let mut points = Vec::new();
        for &seed in &seeds {
            for &workers in &workers {
                for straggler in &stragglers {
                    for &staleness_aware in &staleness {
                        for &data in &datas {
                            for &backup_workers in &backups {
                                for &delay_compensation in &dcs {
                                    for &consistency in &models {
                                        // Backup workers only mean something where reads wait
                                        // and clocks need not name data positions.
                                        if backup_workers > 0
                                            && (consistency.bound().is_none()
                                                || data == DataAssignment::Fixed)
                                        {
                                            continue;
                                        }
                                        points.push(Point {
                                            consistency,
                                            workers,
                                            straggler: straggler.clone(),
                                            seed,
                                            staleness_aware,
                                            data,
                                            backup_workers,
                                            delay_compensation,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if points.is_empty() {
            return Err("the grid has no point (backup workers need BSP/SSP and dynamic data)".into());
        }
        let mut names = BTreeSet::new();
        for p in &points {
            if !names.insert(p.name()) {
                return Err(format!("grid point {} appears twice", p.name()));
            }
            if p.backup_workers >= p.workers {
                return Err(format!(
                    "{}: {} backup workers of {} workers",
                    p.name(),
                    p.backup_workers,
                    p.workers
                ));
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
        let text = ps_common::files::read_text_capped(path, ps_common::files::MAX_TEXT_FILE)
            .map_err(io(format!("reading {}", path.display())))?;
        Sweep::parse(&text).map_err(|reason| Error::Config { path: path.display().to_string(), reason })
    }
}

/// `v`, or `[d]` if it is empty.
fn or<T: Clone>(v: &[T], d: T) -> Vec<T> {
    if v.is_empty() { vec![d] } else { v.to_vec() }
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
    fn straggler_remedies_are_axes_and_backups_only_where_they_apply() {
        let text = format!(
            "{BASE}\n[grid]\nconsistency = [\"bsp\", \"asp\"]\ndata = [\"fixed\", \"dynamic\"]\nbackup_workers = [0, 1]\ndelay_compensation = [\"off\", \"a:2\"]\n"
        );
        let s = Sweep::parse(&text).unwrap();
        let names: Vec<String> = s.points.iter().map(Point::name).collect();
        // 2 models x 2 data x 2 dc without backups, plus BSP dynamic b1 x 2 dc.
        assert_eq!(names.len(), 10, "{names:?}");
        assert!(names.contains(&"bsp-w2-none-seed42".to_string()), "unchanged names without remedies");
        assert!(names.contains(&"asp-w2-none-seed42-dyn-dca2".to_string()), "{names:?}");
        assert!(names.contains(&"bsp-w2-none-seed42-dyn-b1".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("asp") && n.contains("-b1")), "{names:?}");
        assert!(!names.iter().any(|n| !n.contains("-dyn") && n.contains("-b1")), "{names:?}");
        let p = s.points.iter().find(|p| p.name() == "bsp-w2-none-seed42-dyn-b1-dca2").unwrap();
        let c = p.config(&s.base);
        assert_eq!(c.job.data, DataAssignment::Dynamic);
        assert_eq!(c.job.backup.workers, 1);
        assert!(c.job.optimizer.delay_compensation.is_some_and(|d| d.adaptive && d.lambda == 2.0));
        assert_eq!(p.mode(), "BSP dynamic b1 DC-a2");
        for (grid, why) in [
            ("data = [\"random\"]", "fixed or dynamic"),
            ("delay_compensation = [\"x\"]", "LAMBDA"),
            ("consistency = [\"bsp\"]\ndata = [\"dynamic\"]\nbackup_workers = [2]", "backup workers of 2"),
            ("consistency = [\"asp\"]\nbackup_workers = [1]", "no point"),
        ] {
            let err = Sweep::parse(&format!("{BASE}\n[grid]\n{grid}\n")).unwrap_err();
            assert!(err.contains(why), "{grid}: {err}");
        }
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

    /// A sweep file naming a timeout no `Duration` holds, workers by the
    /// billion, or a product of lists with 10^24 points is refused: the
    /// timeout panicked in the runner, the workers were listed one by one
    /// (32 GiB), the points made one by one.
    #[test]
    fn absurd_sweeps_are_refused_before_anything_is_made() {
        let seeds: Vec<String> = (0..1000).map(|s| s.to_string()).collect();
        let seeds = format!("seeds = [{}]", seeds.join(", "));
        let bools = "staleness_aware = [true, false]";
        let product =
            format!("{seeds}\n{bools}\ndata = [\"fixed\", \"dynamic\"]\nworkers = [1, 2, 3, 4, 5, 6]");
        for (text, why) in [
            (format!("{BASE}\n[sweep]\nrun_timeout_s = 1e300\n"), "run_timeout_s"),
            (
                format!("{BASE}\n[grid]\nworkers = [4000000000]\nstraggler = [\"random:0.5:10\"]\n"),
                "grid workers",
            ),
            (format!("{BASE}\n[grid]\n{product}\n"), "more than 10000 points"),
        ] {
            let err = Sweep::parse(&text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn the_example_sweeps_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sweeps");
        for (file, points) in
            [("mnist.toml", 21), ("a9a.toml", 21), ("stragglers.toml", 20), ("stragglers-w4.toml", 8)]
        {
            let s = Sweep::load(&dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(s.points.len(), points, "{file}");
            assert!(s.settings.target_accuracy.is_some(), "{file}");
        }
    }
}
