//! One training run on a local cluster: servers up, workers to completion,
//! final evaluation and server stats, servers down; everything written to a
//! run folder (config.toml, metrics.jsonl, stats.json, summary.json, model,
//! checkpoints/); then the model is registered, unless the run file opts out.
//!
//! While the workers train, a checkpointer task takes a checkpoint of the
//! shards every `[checkpoint] every_s` seconds or `every_iters` iterations
//! (and one as soon as training has begun), and the launcher restarts a shard
//! that dies from the newest one (see `cluster::Servers::supervise`).

use ps_common::seal::KeyPaths;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ps_common::transport::TransportConfig;
use ps_server::checkpoint::coordinator::{self, Shards};
use ps_worker::config::RunConfig;
use ps_worker::event::Event;

use crate::artifact::{CheckpointLog, JsonFile, RunSummary, ShardStats, StatsFile};
use crate::cluster::{self, Pinning, Result, RunOptions, Security, ServerOptions, Servers};
use crate::credentials::LocalAuth;

/// The file of a run folder that lists the shard addresses, comma-separated.
pub const SHARDS_FILE: &str = "shards.txt";

/// What to run and where to write it.
pub struct Plan<'a> {
    pub exe: &'a Path,
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub kill_worker_after: Option<(usize, Duration)>,
    pub kill_server_after: Option<(usize, Duration)>,
    /// Resume from this checkpoint (the run folder is the stopped run's).
    pub resume_from: Option<PathBuf>,
    /// The keys of the run's checkpoints; `None`: the run folder's own
    /// ([`checkpoint_keys`], made for a new run), `Some(empty)`: unsigned.
    pub seal: Option<KeyPaths>,
}

impl<'a> Plan<'a> {
    /// A plain run: no fault injection, not resumed.
    pub fn new(exe: &'a Path, config: RunConfig, run_dir: PathBuf) -> Plan<'a> {
        Plan {
            exe,
            config,
            run_dir,
            kill_worker_after: None,
            kill_server_after: None,
            resume_from: None,
            seal: None,
        }
    }
}

/// The run folder's certificates (`ps-cluster certs`), unless the run is
/// plaintext.
pub fn tls_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tls")
}

/// Mutual TLS with certificates made in `<run>/tls/` (kept on resume), or
/// plaintext if the run file says `[cluster] plaintext = true`.
fn security(run_dir: &Path, config: &RunConfig) -> Result<Security> {
    if config.cluster.plaintext {
        return Ok(Security::Plaintext);
    }
    let dir = tls_dir(run_dir);
    let opts = crate::certs::Options { workers: config.cluster.workers, ..crate::certs::Options::default() };
    crate::certs::ensure(&dir, &opts)?;
    // The children run elsewhere than the launcher's working directory only
    // if a test says so; an absolute path holds in both cases.
    let dir = std::path::absolute(&dir)
        .map_err(|source| cluster::Error::Io { what: format!("resolving {}", dir.display()), source })?;
    Ok(Security::Tls(dir))
}

/// The run folder's checkpoint root.
pub fn checkpoint_root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Where a run keeps the keys of its checkpoints.
pub fn keys_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("keys")
}

/// The keys of a run's checkpoints: `explicit` (a folder written by
/// `ps-cluster keys`) if given; else the run's own `<run>/keys/`, made
/// (signing and verify key) for a new run when `create`. A run folder
/// without keys that is not created here (one written before checkpoints
/// were signed) gets none, and its checkpoints stay unsigned.
pub fn checkpoint_keys(run_dir: &Path, explicit: Option<&Path>, create: bool) -> Result<KeyPaths> {
    if let Some(dir) = explicit {
        let keys = KeyPaths::in_dir(dir);
        if keys.is_empty() {
            return Err(cluster::Error::Config(format!(
                "{} holds no keys (make them with `ps-cluster keys --out DIR`)",
                dir.display()
            )));
        }
        return Ok(keys);
    }
    let dir = keys_dir(run_dir);
    if dir.exists() {
        return Ok(KeyPaths::in_dir(&dir));
    }
    if !create {
        return Ok(KeyPaths::default());
    }
    ps_common::seal::generate(&dir, false).map_err(|e| cluster::Error::Config(e.to_string()))
}

/// Runs the plan; `on_event` sees every worker event as it arrives.
pub async fn run(mut plan: Plan<'_>, on_event: impl FnMut(usize, &Event)) -> Result<RunSummary> {
    let config_path = cluster::write_config(&plan.run_dir, &plan.config)?;
    if plan.seal.is_none() {
        let create = plan.config.checkpoint.enabled && plan.resume_from.is_none();
        plan.seal = Some(checkpoint_keys(&plan.run_dir, None, create)?);
    }
    let ckpt = &plan.config.checkpoint;
    let security = security(&plan.run_dir, &plan.config)?;
    // Auth on: a key pair for this run, a token per process.
    let auth = LocalAuth::create(&plan.run_dir)?;
    let server_opts = ServerOptions {
        checkpoint_dir: ckpt.enabled.then(|| checkpoint_root(&plan.run_dir)),
        restore: plan.resume_from.clone(),
        security: security.clone(),
        auth_key: Some(auth.public_key.clone()),
        seal: plan.seal.clone().unwrap_or_default(),
        pinning: Pinning::new(plan.config.cluster.pin_cpus, plan.config.cluster.servers),
    };
    let mut servers =
        Servers::start(plan.exe, plan.config.cluster.servers, &plan.run_dir, &server_opts).await?;
    servers.admin = auth.admin.clone();
    let result = run_on(&plan, &config_path, &security, &mut servers, &auth, on_event).await;
    servers.stop(Duration::from_secs(10)).await;
    let summary = result?;
    summary.write(&plan.run_dir)?;
    crate::models::register_run(&plan.config.registry, &plan.run_dir).await;
    Ok(summary)
}

async fn run_on(
    plan: &Plan<'_>,
    config_path: &Path,
    security: &Security,
    servers: &mut Servers,
    auth: &LocalAuth,
    on_event: impl FnMut(usize, &Event),
) -> Result<RunSummary> {
    // The launcher's own channels (checkpoints, stats, evaluation) as `admin`.
    let transport = security.admin_transport(&plan.config.job.client.transport);
    let mut launcher_job = plan.config.job.clone();
    launcher_job.client.transport = transport.clone();
    launcher_job.client.credential = auth.admin.clone();
    let job = &launcher_job;
    // Where the shards listen, for readers of the live model
    // (`ps-serve --online $(cat <run>/shards.txt)`).
    let shards = plan.run_dir.join(SHARDS_FILE);
    std::fs::write(&shards, servers.addrs.join(",") + "\n")
        .map_err(|source| cluster::Error::Io { what: format!("writing {}", shards.display()), source })?;
    let checkpointer = match plan.config.checkpoint.enabled {
        true => Some(
            Checkpointer::start(
                &servers.addrs,
                &plan.run_dir,
                &plan.config,
                &transport,
                auth,
                plan.seal.as_ref(),
            )
            .await?,
        ),
        false => None,
    };
    let opts = RunOptions {
        exe: plan.exe,
        run_dir: &plan.run_dir,
        config_path,
        workers: plan.config.cluster.workers,
        kill_worker_after: plan.kill_worker_after,
        kill_server_after: plan.kill_server_after,
        append_metrics: plan.resume_from.is_some(),
        security,
        transport: &transport,
        auth: Some(auth),
    };
    let outcome = cluster::run_workers(opts, servers, on_event).await;
    let checkpoints = match checkpointer {
        Some(c) => c.stop().await,
        None => CheckpointLog::default(),
    };
    let outcome = outcome?;

    let client = ps_worker::session::evaluator(job, &servers.addrs).await?;
    let stats = StatsFile::new(client.stats().await?.iter().map(ShardStats::from_wire).collect());
    stats.write(&plan.run_dir)?;
    let eval = ps_worker::train::evaluate_job(job, &servers.addrs).await?;
    if let Some(model) = &eval.model {
        model.write(&plan.run_dir.join("model.msgpack"))?;
    }

    let samples: u64 = outcome.done.iter().map(|e| if let Event::Done(d) = e { d.samples } else { 0 }).sum();
    let (mut iters, mut pushed, mut pulled) = (0u64, 0u64, 0u64);
    for e in &outcome.done {
        if let Event::Done(d) = e {
            (iters, pushed, pulled) = (iters + d.iters, pushed + d.bytes_pushed, pulled + d.bytes_pulled);
        }
    }
    let per_iter = |bytes: u64| bytes as f64 / iters.max(1) as f64;
    let (bytes_pushed_per_iter, bytes_pulled_per_iter) = (per_iter(pushed), per_iter(pulled));
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
        checkpoints,
        recoveries: outcome.recoveries,
        resumed_from: plan.resume_from.clone(),
        codecs: job.codecs.describe(),
        bytes_pushed_per_iter,
        bytes_pulled_per_iter,
    })
}

/// The periodic checkpoints of a run, as a background task.
struct Checkpointer {
    task: tokio::task::JoinHandle<()>,
    log: Arc<Mutex<CheckpointLog>>,
}

impl Checkpointer {
    async fn start(
        addrs: &[String],
        run_dir: &Path,
        config: &RunConfig,
        transport: &TransportConfig,
        auth: &LocalAuth,
        seal: Option<&KeyPaths>,
    ) -> Result<Self> {
        let c = &config.checkpoint;
        let mut opts = coordinator::Options::new(checkpoint_root(run_dir));
        opts.credential = auth.admin.clone();
        opts.keys =
            seal.cloned().unwrap_or_default().load().map_err(|e| cluster::Error::Config(e.to_string()))?;
        opts.job = Some(config.fingerprint());
        opts.keep = c.keep;
        opts.transport = transport.clone();
        let shards = Shards::connect(addrs, &opts.transport, &opts.credential).await?;
        let log = Arc::new(Mutex::new(CheckpointLog::default()));
        let every = (c.every_s > 0.0).then(|| Duration::from_secs_f64(c.every_s));
        let every_iters = (c.every_iters > 0).then_some(c.every_iters);
        let task = tokio::spawn(periodic(shards, opts, every, every_iters, Arc::clone(&log)));
        Ok(Checkpointer { task, log })
    }

    /// Stops taking checkpoints (one in progress is abandoned: it has no
    /// manifest, so it does not count) and returns the log.
    async fn stop(self) -> CheckpointLog {
        self.task.abort();
        let _ = self.task.await;
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Takes a first checkpoint once every worker has completed an iteration,
/// then one whenever `every` has passed or the slowest worker has completed
/// `every_iters` more iterations.
///
/// `last`: how long ago the previous checkpoint was taken, and at which
/// clock of the slowest worker; `clock`: that worker's clock now.
fn due(
    last: Option<(Duration, u64)>,
    clock: Option<u64>,
    every: Option<Duration>,
    every_iters: Option<u64>,
) -> bool {
    match (last, clock) {
        (_, None) => false,
        (None, Some(c)) => c >= 1,
        // Subtracted, not `from + n`: `every_iters` comes from the run file,
        // and `u64::MAX` overflowed (a panic that ended the checkpoints).
        (Some((ago, from)), Some(c)) => {
            every.is_some_and(|e| ago >= e) || every_iters.is_some_and(|n| c.saturating_sub(from) >= n)
        }
    }
}

async fn periodic(
    shards: Shards,
    opts: coordinator::Options,
    every: Option<Duration>,
    every_iters: Option<u64>,
    log: Arc<Mutex<CheckpointLog>>,
) {
    let mut last: Option<(Instant, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Ok(clock) = shards.min_worker_clock().await else { continue };
        if !due(last.map(|(at, from)| (at.elapsed(), from)), clock, every, every_iters) {
            continue;
        }
        match coordinator::take(&shards, &opts).await {
            Ok(m) => {
                let dir = opts.root.join(&m.name);
                if let Ok(mut l) = log.lock() {
                    l.record(dir, &m);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed");
                if let Ok(mut l) = log.lock() {
                    l.fail(e.to_string());
                }
            }
        }
        last = Some((Instant::now(), clock.unwrap_or(0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint is due after `every` or `every_iters`, whichever comes
    /// first; `every_iters = u64::MAX` (from a run file) never comes, and
    /// does not overflow (it panicked once a checkpoint had been taken).
    #[test]
    fn checkpoints_fall_due_by_time_or_iterations_without_overflow() {
        let s = Duration::from_secs;
        assert!(!due(None, None, Some(s(5)), None));
        assert!(!due(None, Some(0), Some(s(5)), None));
        assert!(due(None, Some(1), Some(s(5)), None));
        assert!(!due(Some((s(4), 10)), Some(12), Some(s(5)), Some(3)));
        assert!(due(Some((s(5), 10)), Some(12), Some(s(5)), Some(3)));
        assert!(due(Some((s(1), 10)), Some(13), Some(s(5)), Some(3)));
        assert!(!due(Some((s(1), 10)), Some(u64::MAX), None, Some(u64::MAX)));
        assert!(due(Some((s(1), 0)), Some(u64::MAX), None, Some(u64::MAX)));
    }
}
