//! One training run on a local cluster: servers up, workers to completion,
//! final evaluation and server stats, servers down; everything written to a
//! run folder (config.toml, metrics.jsonl, stats.json, summary.json, model);
//! then the model is registered, unless the run file opts out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_worker::config::RunConfig;
use ps_worker::event::Event;

use crate::artifact::{JsonFile, RunSummary, ShardStats, StatsFile};
use crate::cluster::{self, Result, RunOptions, Servers};

/// What to run and where to write it.
pub struct Plan<'a> {
    pub exe: &'a Path,
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub kill_worker_after: Option<(usize, Duration)>,
}

/// Runs the plan; `on_event` sees every worker event as it arrives.
pub async fn run(plan: Plan<'_>, on_event: impl FnMut(usize, &Event)) -> Result<RunSummary> {
    let config_path = cluster::write_config(&plan.run_dir, &plan.config)?;
    let servers = Servers::start(plan.exe, plan.config.cluster.servers, &plan.run_dir).await?;
    let result = run_on(&plan, &config_path, &servers, on_event).await;
    servers.stop(Duration::from_secs(10)).await;
    let summary = result?;
    summary.write(&plan.run_dir)?;
    crate::models::register_run(&plan.config.registry, &plan.run_dir).await;
    Ok(summary)
}

async fn run_on(
    plan: &Plan<'_>,
    config_path: &Path,
    servers: &Servers,
    on_event: impl FnMut(usize, &Event),
) -> Result<RunSummary> {
    let job = &plan.config.job;
    let opts = RunOptions {
        exe: plan.exe,
        run_dir: &plan.run_dir,
        config_path,
        workers: plan.config.cluster.workers,
        kill_worker_after: plan.kill_worker_after,
    };
    let outcome = cluster::run_workers(opts, servers, on_event).await?;

    let client = ps_worker::session::evaluator(job, &servers.addrs).await?;
    let stats = StatsFile::new(client.stats().await?.iter().map(ShardStats::from_wire).collect());
    stats.write(&plan.run_dir)?;
    let eval = ps_worker::train::evaluate_job(job, &servers.addrs).await?;
    if let Some(model) = &eval.model {
        model.write(&plan.run_dir.join("model.msgpack"))?;
    }

    let samples: u64 = outcome.done.iter().map(|e| if let Event::Done(d) = e { d.samples } else { 0 }).sum();
    Ok(RunSummary {
        schema_version: RunSummary::VERSION,
        run_dir: plan.run_dir.clone(),
        consistency: job.consistency.to_string(),
        servers: plan.config.cluster.servers,
        workers: plan.config.cluster.workers,
        wall_s: outcome.wall_s,
        samples_per_s: samples as f64 / outcome.wall_s.max(1e-9),
        test_loss: eval.loss,
        test_score: eval.score,
        score_name: eval.score_name.to_string(),
        failed: outcome.failed,
        done: outcome.done,
        staleness_histogram: ShardStats::total_histogram(&stats.shards),
        blocked_s: stats.shards.iter().map(|s| s.blocked_s).sum(),
        server_peak_rss: outcome.server_peak_rss,
        sparse_rows: stats.shards.iter().map(|s| s.sparse_rows).sum(),
    })
}
