//! One training run on a local cluster: servers up, workers to completion,
//! final evaluation and server stats, servers down; everything written to a
//! run folder (config.toml, metrics.jsonl, stats.json, summary.json, model).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_common::wire::pb;
use ps_worker::client::{ClientOptions, ShardedClient};
use ps_worker::config::RunConfig;
use ps_worker::event::Event;
use serde::Serialize;

use crate::cluster::{self, Error, Result, RunOptions, Servers};

/// Everything a run reports, also written as `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub consistency: String,
    pub servers: u32,
    pub workers: u32,
    pub wall_s: f64,
    /// Samples processed by all workers per second of wall time.
    pub samples_per_s: f64,
    /// Test loss and score (accuracy, or RMSE for regression) after training.
    pub test_loss: f64,
    pub test_score: f64,
    pub score_name: String,
    pub failed: Vec<(usize, String)>,
    pub done: Vec<Event>,
    /// Staleness histogram summed over shards (index = staleness).
    pub staleness_histogram: Vec<u64>,
    /// Seconds workers spent blocked in reads, summed over shards.
    pub blocked_s: f64,
    pub server_peak_rss: Vec<u64>,
    pub sparse_rows: u64,
}

impl Summary {
    pub fn max_staleness(&self) -> usize {
        self.staleness_histogram.iter().rposition(|&c| c > 0).unwrap_or(0)
    }

    pub fn mean_staleness(&self) -> f64 {
        let n: u64 = self.staleness_histogram.iter().sum();
        let s: u64 = self.staleness_histogram.iter().enumerate().map(|(i, c)| i as u64 * c).sum();
        s as f64 / n.max(1) as f64
    }
}

/// What to run and where to write it.
pub struct Plan<'a> {
    pub exe: &'a Path,
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub kill_worker_after: Option<(usize, Duration)>,
}

/// Runs the plan; `on_event` sees every worker event as it arrives.
pub async fn run(plan: Plan<'_>, on_event: impl FnMut(usize, &Event)) -> Result<Summary> {
    let config_path = cluster::write_config(&plan.run_dir, &plan.config)?;
    let servers = Servers::start(plan.exe, plan.config.cluster.servers, &plan.run_dir).await?;
    let result = run_on(&plan, &config_path, &servers, on_event).await;
    servers.stop(Duration::from_secs(10)).await;
    let summary = result?;
    let path = plan.run_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, text).map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })?;
    Ok(summary)
}

async fn run_on(
    plan: &Plan<'_>,
    config_path: &Path,
    servers: &Servers,
    on_event: impl FnMut(usize, &Event),
) -> Result<Summary> {
    let job = &plan.config.job;
    let opts = RunOptions {
        exe: plan.exe,
        run_dir: &plan.run_dir,
        config_path,
        workers: plan.config.cluster.workers,
        kill_worker_after: plan.kill_worker_after,
    };
    let outcome = cluster::run_workers(opts, servers, on_event).await?;

    let client = ShardedClient::connect(&servers.addrs, u64::MAX, ClientOptions::default()).await?;
    let stats = client.stats().await?;
    write_json(&plan.run_dir.join("stats.json"), &stats_json(&stats))?;
    let eval = ps_worker::train::evaluate_job(job, &servers.addrs).await?;
    if let Some(model) = &eval.model {
        let path = plan.run_dir.join("model.msgpack");
        let bytes = rmp_serde::to_vec_named(model).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(&path, bytes).map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })?;
    }

    let mut hist = Vec::new();
    for s in &stats {
        if hist.len() < s.staleness_histogram.len() {
            hist.resize(s.staleness_histogram.len(), 0);
        }
        for (h, c) in hist.iter_mut().zip(&s.staleness_histogram) {
            *h += c;
        }
    }
    while hist.last() == Some(&0) {
        hist.pop();
    }
    let samples: u64 = outcome.done.iter().map(|e| if let Event::Done { samples, .. } = e { *samples } else { 0 }).sum();
    Ok(Summary {
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
        staleness_histogram: hist,
        blocked_s: stats.iter().map(|s| s.wait_micros as f64 / 1e6).sum(),
        server_peak_rss: outcome.server_peak_rss,
        sparse_rows: stats.iter().map(|s| s.sparse_rows).sum(),
    })
}

fn stats_json(stats: &[pb::StatsResponse]) -> serde_json::Value {
    serde_json::Value::Array(
        stats
            .iter()
            .map(|s| {
                serde_json::json!({
                    "shard": s.shard, "pulls": s.pulls, "pushes": s.pushes,
                    "duplicate_pushes": s.duplicate_pushes, "rejected": s.rejected,
                    "values_pulled": s.values_pulled, "values_pushed": s.values_pushed,
                    "tables": s.tables, "dense_chunks": s.dense_chunks, "sparse_rows": s.sparse_rows,
                    "staleness_histogram": s.staleness_histogram, "blocked_s": s.wait_micros as f64 / 1e6,
                })
            })
            .collect(),
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(path, text).map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })
}
