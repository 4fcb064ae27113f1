//! `ps-cluster`: the launcher. With no arguments it trains the reference MLP
//! on MNIST with 2 shard and 2 worker processes on loopback.
//!
//! ```text
//! ps-cluster                      # = ps-cluster train (examples/config/mnist.toml)
//! ps-cluster train --config examples/config/a9a.toml --workers 4
//! ps-cluster sweep examples/sweeps/mnist.toml   # a grid of runs, plots, summary
//! ps-cluster bench                # throughput figures beside same-run baselines
//! ps-cluster status --servers 127.0.0.1:7000,127.0.0.1:7001
//! ps-cluster server ...           # one shard (same flags as ps-server)
//! ps-cluster worker ...           # one worker (same flags as ps-worker)
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use paramserver::artifact::RunSummary as Summary;
use paramserver::run::{self, Plan};
use ps_common::spec::Consistency;
use ps_worker::client::{ClientOptions, ShardedClient};
use ps_worker::config::RunConfig;
use ps_worker::train::Event;

/// The reference job, used when no --config is given.
const DEFAULT_CONFIG: &str = include_str!("../examples/config/mnist.toml");

#[derive(Parser, Debug)]
#[command(version, about = "Parameter-server training: local clusters, experiments, shards and workers")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a job on a local cluster of processes (the default command).
    Train(TrainArgs),
    /// Show each shard's clock table: who is where, who waits on whom.
    Status {
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
    },
    /// Print throughput figures, each beside a baseline from the same run.
    Bench {
        /// Epochs of each training measurement.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// Repetitions of each transport and apply measurement.
        #[arg(long, default_value_t = 20)]
        reps: u32,
    },
    /// Run a grid of jobs (consistency x workers x straggler x seed), each on
    /// its own local cluster, then write results.csv, summary.md and plots.
    /// Rerunning resumes: points with results are skipped.
    Sweep {
        /// Sweep file: a run file plus [grid] (and [sweep]); see examples/sweeps/.
        file: PathBuf,
        /// Sweep folder [default: sweeps/<file stem>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Rerun every point, even those with results.
        #[arg(long)]
        fresh: bool,
        /// List the grid points and whether each is done; run nothing.
        #[arg(long)]
        list: bool,
        /// Rewrite the reports from the run folders; run nothing.
        #[arg(long)]
        report: bool,
    },
    /// Run one shard (as `ps-server`).
    Server(ps_server::cli::Args),
    /// Run one worker (as `ps-worker`).
    Worker(ps_worker::cli::Args),
}

#[derive(clap::Args, Debug, Default)]
struct TrainArgs {
    /// Run file (TOML); default: the reference MNIST job.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the number of shard processes.
    #[arg(long)]
    servers: Option<u32>,
    /// Override the number of worker processes.
    #[arg(long)]
    workers: Option<u32>,
    /// Override the number of epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Override the consistency model: asp, bsp, or ssp:N.
    #[arg(long, value_parser = parse_consistency)]
    consistency: Option<Consistency>,
    /// Where run folders are created [default: runs].
    #[arg(long)]
    runs_dir: Option<PathBuf>,
    /// Name of the run folder (after a timestamp).
    #[arg(long)]
    name: Option<String>,
    /// Fault injection: SIGKILL worker W after S seconds (`W:S`).
    #[arg(long, value_parser = parse_kill)]
    kill_worker: Option<(usize, f64)>,
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    match s.to_ascii_lowercase().as_str() {
        "asp" => Ok(Consistency::Asp),
        "bsp" => Ok(Consistency::Bsp),
        other => match other.strip_prefix("ssp:").map(str::parse) {
            Some(Ok(staleness)) => Ok(Consistency::Ssp { staleness }),
            _ => Err(format!("expected asp, bsp or ssp:N, got `{s}`")),
        },
    }
}

fn parse_kill(s: &str) -> Result<(usize, f64), String> {
    let (w, t) = s.split_once(':').ok_or_else(|| format!("expected W:SECONDS, got `{s}`"))?;
    Ok((w.parse().map_err(|e| format!("{e}"))?, t.parse().map_err(|e| format!("{e}"))?))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Some(Command::Server(_)) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.unwrap_or(Command::Train(TrainArgs::default())) {
        Command::Server(args) => Ok(ps_server::cli::run(&args)?),
        Command::Worker(args) => Ok(ps_worker::cli::run(&args)?),
        Command::Status { servers } => tokio_runtime()?.block_on(status(servers)),
        Command::Bench { epochs, reps } => {
            let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
            let opts = paramserver::bench::BenchOptions { epochs, reps };
            Ok(tokio_runtime()?.block_on(paramserver::bench::run_all(&exe, DEFAULT_CONFIG, &opts))?)
        }
        Command::Sweep { file, out, fresh, list, report } => {
            let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
            let opts = paramserver::sweep::Options { file, out, fresh, list, report_only: report, exe };
            let rows = tokio_runtime()?.block_on(paramserver::sweep::run(&opts))?;
            if !list && !rows.is_empty() {
                let summary = std::fs::read_to_string(opts.out_dir().join("summary.md")).unwrap_or_default();
                println!("{}", summary.split("\n## Plots").next().unwrap_or(""));
            }
            Ok(())
        }
        Command::Train(args) => {
            let summary = tokio_runtime()?.block_on(train(args))?;
            if !summary.failed.is_empty() {
                anyhow::bail!("{} worker(s) failed: {:?}", summary.failed.len(), summary.failed);
            }
            Ok(())
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn train(args: TrainArgs) -> anyhow::Result<Summary> {
    let (text, source) = match &args.config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_string(), "built-in examples/config/mnist.toml".to_string()),
    };
    let mut config = RunConfig::from_toml(&text).with_context(|| format!("in {source}"))?;
    if let Some(v) = args.servers {
        config.cluster.servers = v;
    }
    if let Some(v) = args.workers {
        config.cluster.workers = v;
    }
    if let Some(v) = args.epochs {
        config.job.epochs = v;
    }
    if let Some(v) = args.consistency {
        config.job.consistency = v;
    }
    config.validate()?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.config
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("mnist".into(), |s| s.to_string_lossy().into_owned())
    });
    let run_dir = paramserver::cluster::new_run_dir(
        args.runs_dir.as_deref().unwrap_or(std::path::Path::new("runs")),
        &name,
    )?;
    let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
    eprintln!(
        "training {} on {} shard(s) and {} worker(s), {}; run folder {}",
        source,
        config.cluster.servers,
        config.cluster.workers,
        config.job.consistency,
        run_dir.display()
    );
    let bars = Bars::new();
    let plan = Plan {
        exe: &exe,
        config,
        run_dir,
        kill_worker_after: args.kill_worker.map(|(w, s)| (w, Duration::from_secs_f64(s))),
    };
    let summary = run::run(plan, |w, e| bars.update(w, e)).await?;
    bars.finish();
    print_summary(&summary);
    Ok(summary)
}

/// One progress bar per worker.
struct Bars {
    multi: MultiProgress,
    bars: std::sync::Mutex<HashMap<usize, ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
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

    fn update(&self, worker: usize, event: &Event) {
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
            Event::Done { .. } => bar.finish(),
        }
    }

    fn finish(&self) {
        let _ = self.multi.clear();
    }
}

fn print_summary(s: &Summary) {
    println!();
    println!("run folder      {}", s.run_dir.display());
    println!("cluster         {} shard(s), {} worker(s), {}", s.servers, s.workers, s.consistency);
    println!("test {:<10} {:.4}   (test loss {:.4})", s.score_name, s.test_score, s.test_loss);
    println!("wall time       {:.1} s", s.wall_s);
    println!("throughput      {:.0} samples/s (all workers)", s.samples_per_s);
    for e in &s.done {
        if let Event::Done { worker, samples_per_s, pull_s, compute_s, push_s, straggle_s, wall_s, .. } = e {
            let pct = |x: f64| 100.0 * x / wall_s.max(1e-9);
            println!(
                "  worker {worker}: {samples_per_s:>7.0} samples/s; time in pull {:.0}%, compute {:.0}%, push {:.0}%, straggle {:.0}%",
                pct(*pull_s),
                pct(*compute_s),
                pct(*push_s),
                pct(*straggle_s)
            );
        }
    }
    println!(
        "staleness       mean {:.2}, max {} (histogram {:?})",
        s.mean_staleness(),
        s.max_staleness(),
        s.staleness_histogram
    );
    println!("blocked in reads {:.1} s (summed over shards)", s.blocked_s);
    let rss: Vec<String> =
        s.server_peak_rss.iter().map(|b| format!("{:.1} MiB", *b as f64 / (1 << 20) as f64)).collect();
    println!("server peak RSS {}", rss.join(", "));
    if s.sparse_rows > 0 {
        println!("sparse rows     {}", s.sparse_rows);
    }
    for (w, why) in &s.failed {
        println!("FAILED worker {w}: {why}");
    }
}

async fn status(servers: Vec<String>) -> anyhow::Result<()> {
    let client = ShardedClient::connect(&servers, u64::MAX, ClientOptions::default()).await?;
    for s in client.stats().await? {
        let model = s
            .consistency
            .and_then(|c| Consistency::try_from(c).ok())
            .map_or("-".to_string(), |c| c.to_string());
        println!("shard {} of {}: {model}, {} pushes, {} pulls", s.shard, s.num_shards, s.pushes, s.pulls);
        for c in &s.clocks {
            let wait = if c.waiting {
                format!("waiting for clock {} on workers {:?}", c.waiting_for_clock, c.blocked_on)
            } else {
                "running".to_string()
            };
            println!("  worker {:>3}  clock {:>6}  {wait}", c.worker, c.clock);
        }
    }
    Ok(())
}
