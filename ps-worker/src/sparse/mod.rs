//! Workloads whose parameters live in sparse tables: u64 keys to fixed-width
//! rows that a shard creates on first touch (with the table's initializer)
//! and updates row by row with the table's rule. With `Rule::Adam` each row
//! keeps its own step count, so a sparse Adam table is lazy Adam; FTRL and
//! Adagrad are per coordinate anyway.
//!
//! - [`logreg`]: logistic regression on a9a, one weight row per feature.
//! - [`mf`]: biased matrix factorization on MovieLens 100k.
//! - [`ctr`]: a synthetic click-through workload: Zipf-distributed categorical
//!   slots hashed into one embedding table, concatenated into an MLP
//!   ([`tower::Tower`]) whose dense parameters live in dense tables.
//!
//! Each workload has `run` (one worker: pull the rows of a batch, compute
//! per-occurrence row gradients, push them; the client sums duplicates) and
//! `evaluate` (an outside reader, worker id `u64::MAX`, that never joins the
//! clock set). Every iteration ends with exactly one push carrying `tick` to
//! every shard, as the last push of the iteration, as the clock protocol
//! requires.

pub mod ctr;
pub mod logreg;
pub mod mf;
pub mod tower;

use std::time::Duration;

use ps_common::spec::TableSpec;
use tokio::task::JoinHandle;

use crate::client::{ClientOptions, ShardedClient};
use crate::config::JobConfig;
use crate::error::Result;
use crate::train::WorkerId;

/// The worker id of evaluators: never joins the clock set, so it never waits
/// and holds no one up.
pub const EVALUATOR: u64 = u64::MAX;

/// A training worker's membership of the job: connected, tables registered,
/// joined, heartbeating. [`Session::close`] leaves, even after a failure.
pub(crate) struct Session {
    pub client: ShardedClient,
    heartbeat: JoinHandle<()>,
}

impl Session {
    pub async fn open(
        job: &JobConfig,
        servers: &[String],
        id: &WorkerId,
        tables: &[TableSpec],
    ) -> Result<Session> {
        let mut client = ShardedClient::connect(servers, id.index as u64, ClientOptions::default()).await?;
        for t in tables {
            client.register(t).await?;
        }
        client.join(job.consistency, Duration::from_millis(job.lease_ms)).await?;
        let heartbeat = client.spawn_heartbeat(Duration::from_millis(job.lease_ms / 4));
        crate::train::start_barrier(&client, id.count).await;
        Ok(Session { client, heartbeat })
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

/// A client for evaluation (id [`EVALUATOR`]).
pub(crate) async fn evaluator(servers: &[String]) -> Result<ShardedClient> {
    ShardedClient::connect(servers, EVALUATOR, ClientOptions::default()).await
}

/// `ln(1 + e^z)` without overflow.
pub(crate) fn softplus(z: f32) -> f32 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

pub(crate) fn sigmoid(z: f32) -> f32 {
    // Both branches avoid exp of a large positive number.
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy with logits of one example, `softplus(z) - y·z`, and
/// its derivative in `z`, `sigmoid(z) - y`.
pub(crate) fn bce_with_logits(z: f32, y: f32) -> (f32, f32) {
    (softplus(z) - y * z, sigmoid(z) - y)
}

/// Area under the ROC curve of `scores` against binary `labels` (the
/// Mann-Whitney statistic, ties counted half); 0.5 if one class is absent.
pub(crate) fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut positives) = (0.0f64, 0usize);
    let mut i = 0;
    while i < order.len() {
        // A run of equal scores shares the mean of its ranks (1-based).
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            if labels[k] > 0.5 {
                rank_sum += mean_rank;
                positives += 1;
            }
        }
        i = j;
    }
    let negatives = scores.len() - positives;
    if positives == 0 || negatives == 0 {
        return 0.5;
    }
    let p = positives as f64;
    (rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! In-process shards on loopback, as in the integration tests.

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    pub struct Shards {
        pub addrs: Vec<String>,
        stops: Vec<oneshot::Sender<()>>,
        tasks: Vec<JoinHandle<ps_server::Result<()>>>,
    }

    impl Shards {
        pub async fn start(n: u32) -> Shards {
            let mut shards = Shards { addrs: Vec::new(), stops: Vec::new(), tasks: Vec::new() };
            for shard in 0..n {
                let config =
                    ps_server::ServerConfig { shard, num_shards: n, ..ps_server::ServerConfig::default() };
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                shards.addrs.push(listener.local_addr().expect("local addr").to_string());
                let (tx, rx) = oneshot::channel();
                shards.tasks.push(tokio::spawn(ps_server::serve(config, listener, async {
                    let _ = rx.await;
                })));
                shards.stops.push(tx);
            }
            shards
        }

        pub async fn stop(mut self) {
            for tx in self.stops.drain(..) {
                let _ = tx.send(());
            }
            for t in self.tasks.drain(..) {
                t.await.expect("shard task panicked").expect("shard failed");
            }
        }
    }

    impl Drop for Shards {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// Runs `workers` workers of `job` concurrently (as `train::run` does in
    /// each worker process) and collects their events.
    pub async fn train(
        job: &crate::config::JobConfig,
        addrs: &[String],
        workers: usize,
    ) -> Vec<crate::train::Event> {
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..workers)
            .map(|index| {
                let (job, addrs, events) = (job.clone(), addrs.to_vec(), events.clone());
                tokio::spawn(async move {
                    let mut sink = |e| events.lock().unwrap().push(e);
                    let id = crate::train::WorkerId { index, count: workers };
                    crate::train::run(&job, &addrs, id, &mut sink).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("worker panicked").expect("worker failed");
        }
        std::sync::Arc::try_unwrap(events).unwrap().into_inner().unwrap()
    }

    /// Worker 0's training loss in its first progress event (one batch at
    /// the start, with `progress_every_ms = 0`) and the mean over the last
    /// fifth of its events.
    pub fn first_and_last_loss(events: &[crate::train::Event]) -> (f64, f64) {
        let losses: Vec<f64> = events
            .iter()
            .filter_map(|e| match e {
                crate::train::Event::Progress { worker: 0, loss, .. } => Some(*loss),
                _ => None,
            })
            .collect();
        assert!(!losses.is_empty(), "no progress events");
        let n = (losses.len() / 5).max(1);
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        (losses[0], mean(&losses[losses.len() - n..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_helpers_are_stable() {
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert_eq!(softplus(100.0), 100.0);
        assert!(softplus(-100.0) >= 0.0 && softplus(-100.0) < 1e-30);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        let (l, g) = bce_with_logits(2.0, 1.0);
        assert!((l - (1.0 + (-2f32).exp()).ln()).abs() < 1e-6 && (g - (sigmoid(2.0) - 1.0)).abs() < 1e-7);
    }

    #[test]
    fn auc_counts_ordered_pairs() {
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
        // 2 positives, 2 negatives, 3 of 4 pairs ordered.
        assert_eq!(auc(&[0.1, 0.3, 0.2, 0.4], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert_eq!(auc(&[0.1, 0.2], &[1.0, 1.0]), 0.5);
    }
}
