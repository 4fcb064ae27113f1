//! A worker's membership of a job, and the outside readers.
//!
//! A training worker connects, registers its tables (idempotent: every worker
//! registers the same specs), joins the clock set, heartbeats, and waits at
//! the start barrier; [`Session::close`] leaves even after a failure, so the
//! others are not held up. Evaluators use the id [`EVALUATOR`] and never join.

use std::time::Duration;

use ps_common::spec::TableSpec;
use tokio::task::JoinHandle;

use crate::client::ShardedClient;
use crate::config::JobConfig;
use crate::error::Result;

/// The worker id of evaluators: never joins the clock set, so it never waits
/// and holds no one up.
pub const EVALUATOR: u64 = u64::MAX;

/// How long a worker waits for the others to join before training alone.
pub const START_BARRIER: Duration = Duration::from_secs(60);

/// Identity of this worker in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerId {
    pub index: usize,
    pub count: usize,
}

/// A training worker's membership of the job: tables registered, joined,
/// heartbeating.
pub struct Session {
    pub client: ShardedClient,
    /// Iterations this worker had completed when it joined: 0 for a new job,
    /// the checkpoint's cut for a resumed one.
    pub start_clock: u64,
    heartbeat: JoinHandle<()>,
}

impl Session {
    /// Registers `tables`, joins the clock set, starts the heartbeat and
    /// waits at the start barrier.
    pub async fn join(
        mut client: ShardedClient,
        job: &JobConfig,
        id: WorkerId,
        tables: &[TableSpec],
    ) -> Result<Session> {
        client.set_error_feedback(job.codecs.error_feedback);
        client.set_backup(job.backup);
        for t in tables {
            client.register(t).await?;
        }
        // `rejoin`: the first join too waits for a shard it cannot reach.
        let start_clock = client.rejoin(job.consistency, lease(job), 0).await?;
        let heartbeat = client.spawn_heartbeat(Duration::from_millis(job.lease_ms / 4));
        start_barrier(&client, id.count).await;
        Ok(Session { client, start_clock, heartbeat })
    }

    /// After a shard could not be reached: waits for every shard and rejoins
    /// as a worker at `clock` (see [`ShardedClient::rejoin`]).
    pub async fn recover(client: &mut ShardedClient, job: &JobConfig, clock: u64) -> Result<()> {
        client.rejoin(job.consistency, lease(job), clock).await?;
        tracing::info!(worker = client.worker(), clock, "rejoined every shard");
        Ok(())
    }

    /// Leaves the clock set (so the others are not held up) and returns the
    /// training result, or the leave error if training succeeded.
    pub async fn close(self, result: Result<()>) -> Result<()> {
        self.heartbeat.abort();
        let left = self.client.leave().await;
        result?;
        left
    }
}

fn lease(job: &JobConfig) -> Duration {
    Duration::from_millis(job.lease_ms)
}

/// Connects worker `id` of `job` to every shard, with the job's client options.
pub async fn connect(job: &JobConfig, servers: &[String], id: WorkerId) -> Result<ShardedClient> {
    ShardedClient::connect(servers, id.index as u64, job.client.clone()).await
}

/// A client of `job` for evaluation (id [`EVALUATOR`]).
pub async fn evaluator(job: &JobConfig, servers: &[String]) -> Result<ShardedClient> {
    ShardedClient::connect(servers, EVALUATOR, job.client.clone()).await
}

/// Waits (up to [`START_BARRIER`]) until all `workers` have joined; on
/// timeout or error it warns and lets the worker start anyway.
pub async fn start_barrier(client: &ShardedClient, workers: usize) {
    match client.wait_for_members(workers, START_BARRIER).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            worker = client.worker(),
            workers,
            "not every worker joined in time; starting anyway"
        ),
        Err(e) => {
            tracing::warn!(worker = client.worker(), error = %e, "start barrier failed; starting anyway")
        }
    }
}
