//! A synthetic click-through-rate workload, sized to stress the sparse path.
//!
//! **Data.** Every example has `slots` categorical features. The id of each
//! slot is drawn from Zipf(`key_space`, `zipf_exponent`) (ids `1..=key_space`,
//! id 1 the most frequent), so a few ids are very common and a long tail is
//! seen once or never, as in real ad logs. The pair `(slot, id)` is hashed to
//! a key of the embedding table, `splitmix64(slot << 48 | id) mod key_space`
//! (the hashing trick: distinct pairs may share a key). The label is drawn
//! from a hidden logistic model: each pair has a fixed weight in
//! `[-TRUTH_AMPLITUDE, TRUTH_AMPLITUDE]` derived from its hash, and
//! `P(click) = sigmoid(TRUTH_BIAS + Σ weights)`. Only frequent ids can be
//! learned, so the reachable loss sits between the Bayes loss and ln 2.
//!
//! Data is generated on the fly and never stored: batch `b` of epoch `e` of
//! worker `w` is a pure function of `(seed, e, w, b)`, and every epoch is
//! fresh (an online stream), so the set of touched keys keeps growing. The
//! test set is a separate stream.
//!
//! **Model.** The `slots` embedding rows of an example (table `ctr.emb`,
//! width `emb_dim`) are concatenated into one input row of a [`Tower`] (dense
//! tables `ctr.fc1.weight`, ...). The pulled rows, in key order, already are
//! the input matrix, and the tower's input gradient is the per-occurrence row
//! gradient to push: no copies. Each iteration pushes the embedding rows and
//! then the dense gradient, which carries the tick.
//!
//! **Score.** Evaluation reports the test log loss and AUC; progress events
//! report training log loss and accuracy.

use std::time::Instant;

use ps_common::partition::splitmix64;
use ps_common::spec::{Init, InitKind, OptimizerConfig, TableSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use super::tower::{Tower, TowerWorkspace};
use super::{Session, auc, bce_with_logits, sigmoid};
use crate::client::{DenseSet, ShardedClient};
use crate::config::{JobConfig, Workload};
use crate::data::shard_range;
use crate::error::{Error, Result};
use crate::model;
use crate::train::{Driver, Marks, Reporter, WorkerId};

/// The embedding table.
pub const EMBEDDINGS: &str = "ctr.emb";
/// Prefix of the dense tables of the tower.
pub const TOWER_PREFIX: &str = "ctr.";
/// Half-width of the hidden per-pair weights.
pub const TRUTH_AMPLITUDE: f32 = 0.6;
/// Intercept of the hidden model (about 38% positives).
pub const TRUTH_BIAS: f32 = -0.5;
/// Standard deviation of the initial embedding values.
const EMB_INIT_STD: f32 = 0.05;
/// Rows per evaluation batch.
const EVAL_BATCH: usize = 4096;
/// The test stream's id (training streams are `(epoch, worker)`).
const TEST_STREAM: u64 = u64::MAX;

/// The settings of a CTR job.
#[derive(Debug, Clone)]
pub struct Setup {
    pub slots: usize,
    pub key_space: u64,
    pub zipf_exponent: f64,
    pub rows_per_epoch: usize,
    pub test_rows: usize,
    pub emb_dim: usize,
    pub hidden: Vec<usize>,
    pub emb_optimizer: OptimizerConfig,
}

impl Setup {
    pub fn of(job: &JobConfig) -> Result<Setup> {
        match &job.workload {
            Workload::Ctr {
                slots,
                key_space,
                zipf_exponent,
                rows_per_epoch,
                test_rows,
                emb_dim,
                hidden,
                embedding_optimizer,
            } => Ok(Setup {
                slots: *slots,
                key_space: *key_space,
                zipf_exponent: *zipf_exponent,
                rows_per_epoch: *rows_per_epoch,
                test_rows: *test_rows,
                emb_dim: *emb_dim as usize,
                hidden: hidden.clone(),
                emb_optimizer: embedding_optimizer.unwrap_or(job.optimizer),
            }),
            other => Err(Error::Config(format!("not a ctr job: {other:?}"))),
        }
    }

    pub fn tower(&self) -> Tower {
        Tower::new(self.slots * self.emb_dim, &self.hidden)
    }
}

/// The embedding table, then the tower's dense tables in parameter order.
pub fn tables(job: &JobConfig, s: &Setup) -> (TableSpec, Vec<TableSpec>) {
    let emb = TableSpec::sparse(
        EMBEDDINGS,
        s.emb_dim as u32,
        Init { kind: InitKind::Normal { mean: 0.0, std: EMB_INIT_STD }, seed: job.seed },
        s.emb_optimizer,
    );
    let dense = s
        .tower()
        .param_specs(TOWER_PREFIX)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = match p.init {
                model::InitKind::Zeros => InitKind::Constant { value: 0.0 },
                model::InitKind::Uniform { low, high } => InitKind::Uniform { low, high },
            };
            let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
            TableSpec::dense(
                p.name,
                &shape,
                Init { kind, seed: job.seed.wrapping_add(i as u64 + 1) },
                job.optimizer,
            )
        })
        .collect();
    (emb, dense)
}

/// The example generator (see the module docs).
#[derive(Debug, Clone)]
pub struct Generator {
    slots: usize,
    key_space: u64,
    zipf: Zipf<f64>,
    seed: u64,
}

impl Generator {
    pub fn new(s: &Setup, seed: u64) -> Result<Generator> {
        let zipf = Zipf::new(s.key_space as f64, s.zipf_exponent)
            .map_err(|e| Error::Config(format!("zipf({}, {}): {e}", s.key_space, s.zipf_exponent)))?;
        Ok(Generator { slots: s.slots, key_space: s.key_space, zipf, seed })
    }

    /// The pair `(slot, id)` as one u64 (`id < 2^48`, checked by the config).
    fn pair(slot: usize, id: u64) -> u64 {
        ((slot as u64) << 48) | id
    }

    /// The embedding key of a pair.
    pub fn key(&self, slot: usize, id: u64) -> u64 {
        splitmix64(Self::pair(slot, id)) % self.key_space
    }

    /// The hidden weight of a pair, uniform in ±[`TRUTH_AMPLITUDE`].
    pub fn truth(&self, slot: usize, id: u64) -> f32 {
        let h = splitmix64(Self::pair(slot, id) ^ splitmix64(self.seed ^ 0x7275_7468));
        let unit = (h >> 40) as f32 / (1u64 << 24) as f32;
        TRUTH_AMPLITUDE * (2.0 * unit - 1.0)
    }

    /// Replaces `keys` (`rows x slots`, row-major) and `labels` with batch
    /// `batch` of stream `stream`.
    pub fn fill(&self, stream: u64, batch: u64, rows: usize, keys: &mut Vec<u64>, labels: &mut Vec<f32>) {
        keys.clear();
        labels.clear();
        let mut rng =
            StdRng::seed_from_u64(splitmix64(self.seed ^ splitmix64(stream) ^ batch.rotate_left(32)));
        for _ in 0..rows {
            let mut z = TRUTH_BIAS;
            for slot in 0..self.slots {
                // Samples are integral floats in [1, key_space].
                let id = (self.zipf.sample(&mut rng) as u64).clamp(1, self.key_space);
                keys.push(self.key(slot, id));
                z += self.truth(slot, id);
            }
            labels.push(f32::from(u8::from(rng.random::<f32>() < sigmoid(z))));
        }
    }
}

/// The stream of worker `worker` in epoch `epoch`.
fn stream(epoch: u32, worker: usize) -> u64 {
    (u64::from(epoch) << 32) | worker as u64
}

/// Evaluates at `clock`: returns (test log loss, test AUC).
async fn eval_on(
    client: &ShardedClient,
    clock: u64,
    s: &Setup,
    examples: &Generator,
    set: &DenseSet,
) -> Result<(f64, f64)> {
    let tower = s.tower();
    let mut params = vec![0.0f32; set.len()];
    client.pull_dense(set, clock, &mut params).await?;
    let (mut keys, mut labels, mut x) = (Vec::new(), Vec::new(), Vec::new());
    let mut ws = TowerWorkspace::default();
    let (mut scores, mut all_labels) = (Vec::with_capacity(s.test_rows), Vec::with_capacity(s.test_rows));
    let mut loss = 0.0f64;
    for (b, start) in (0..s.test_rows).step_by(EVAL_BATCH).enumerate() {
        let rows = EVAL_BATCH.min(s.test_rows - start);
        examples.fill(TEST_STREAM, b as u64, rows, &mut keys, &mut labels);
        x.resize(keys.len() * s.emb_dim, 0.0);
        client.lookup_sparse(EMBEDDINGS, s.emb_dim, &keys, clock, &mut x).await?;
        for (&z, &y) in tower.logits(&params, &x, &mut ws).iter().zip(&labels) {
            loss += f64::from(bce_with_logits(z, y).0);
            scores.push(z);
        }
        all_labels.extend_from_slice(&labels);
    }
    Ok((loss / s.test_rows as f64, auc(&scores, &all_labels)))
}

/// Pulls the trained model and returns (test log loss, test AUC). The test
/// pulls create the rows of unseen keys, as a serving lookup would.
pub async fn evaluate(job: &JobConfig, servers: &[String]) -> Result<(f64, f64)> {
    let s = Setup::of(job)?;
    let (_, dense) = tables(job, &s);
    let client = super::evaluator(servers).await?;
    let set = DenseSet::new(&dense, client.num_shards())?;
    eval_on(&client, 0, &s, &Generator::new(&s, job.seed)?, &set).await
}

/// Trains one worker on its share of each epoch's fresh examples.
pub async fn run(
    job: &JobConfig,
    servers: &[String],
    id: WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    job.validate()?;
    let s = Setup::of(job)?;
    let examples = Generator::new(&s, job.seed)?;
    let (emb, dense) = tables(job, &s);
    let mut all = vec![emb];
    all.extend(dense.iter().cloned());
    let mut session = Session::open(job, servers, &id, &all).await?;
    let result = match DenseSet::new(&dense, session.client.num_shards()) {
        Ok(set) => train_loop(job, &s, &examples, &mut session.client, &set, &id, reporter).await,
        Err(e) => Err(e),
    };
    session.close(result).await
}

async fn train_loop(
    job: &JobConfig,
    s: &Setup,
    examples: &Generator,
    client: &mut ShardedClient,
    set: &DenseSet,
    id: &WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let mine = shard_range(s.rows_per_epoch, id.index, id.count)?.len();
    let iters_per_epoch = mine.div_ceil(job.batch_size);
    let mut d = Driver::new(job, id.index, iters_per_epoch as u64, reporter);
    let tower = s.tower();
    let mut ws = TowerWorkspace::default();
    let (mut keys, mut labels) = (Vec::new(), Vec::new());
    let (mut x, mut dx) = (Vec::new(), Vec::new());
    let (mut params, mut grads) = (vec![0.0f32; set.len()], vec![0.0f32; set.len()]);
    'epochs: for epoch in 0..job.epochs {
        for b in 0..iters_per_epoch {
            if d.finished() {
                break 'epochs;
            }
            let clock = d.clock;
            let start = Instant::now();
            let rows = job.batch_size.min(mine - b * job.batch_size);
            examples.fill(stream(epoch, id.index), b as u64, rows, &mut keys, &mut labels);
            x.resize(keys.len() * s.emb_dim, 0.0);
            dx.resize(x.len(), 0.0);
            let c = &*client;
            tokio::try_join!(
                c.pull_sparse(EMBEDDINGS, s.emb_dim, &keys, clock, &mut x),
                c.pull_dense(set, clock, &mut params),
            )?;
            let pulled = Instant::now();
            let (loss, correct) = tower.loss_and_grad(&params, &x, &labels, &mut grads, &mut dx, &mut ws);
            let computed = Instant::now();
            if loss.is_finite() {
                client.push_sparse(EMBEDDINGS, s.emb_dim, &keys, &dx, clock, clock, false).await?;
                // The last push of the iteration ticks every shard.
                client.push_dense(set, &grads, clock, clock, true).await?;
            }
            let marks = Marks { start, pulled, computed, pushed: Instant::now() };
            d.end_iteration(epoch, marks, rows, loss, correct as f64).await?;
        }
        if d.should_eval(epoch) {
            let (loss, auc) = eval_on(client, d.clock, s, examples, set).await?;
            d.eval(epoch, loss, auc);
        }
    }
    d.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::sparse::test_util::{Shards, first_and_last_loss, train as train_workers};

    fn job(text: &str) -> JobConfig {
        toml::from_str(text).unwrap()
    }

    const SMALL: &str = r#"
        epochs = 3
        batch_size = 256
        progress_every_ms = 0
        eval_every_epochs = 0
        optimizer = { rule = "adam", lr = 0.003 }
        workload = { kind = "ctr", key_space = 100000, zipf_exponent = 1.1, rows_per_epoch = 40000, test_rows = 8000,
                     hidden = [32], embedding_optimizer = { rule = "adagrad", lr = 0.05 } }
    "#;

    #[test]
    fn batches_are_deterministic_and_skewed() {
        let j = job(SMALL);
        let s = Setup::of(&j).unwrap();
        let examples = Generator::new(&s, 42).unwrap();
        let (mut k1, mut l1, mut k2, mut l2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        examples.fill(stream(0, 1), 5, 1000, &mut k1, &mut l1);
        examples.fill(stream(0, 1), 5, 1000, &mut k2, &mut l2);
        assert_eq!((&k1, &l1), (&k2, &l2));
        examples.fill(stream(1, 1), 5, 1000, &mut k2, &mut l2);
        assert_ne!(k1, k2, "epochs are fresh");
        assert_eq!(k1.len(), 26_000);
        assert!(k1.iter().all(|&k| k < 100_000));
        // Zipf: the most frequent id of slot 0 takes a good share of the draws.
        let top = examples.key(0, 1);
        let hits = k1.iter().step_by(26).filter(|&&k| k == top).count();
        assert!(hits > 60, "id 1 drawn {hits} times of 1000");
        let distinct: HashSet<_> = k1.iter().collect();
        assert!(distinct.len() > 2000, "only {} distinct keys", distinct.len());
        let positives = l1.iter().filter(|&&y| y == 1.0).count();
        assert!((200..600).contains(&positives), "{positives} positives of 1000");
    }

    /// Two shards, two workers, ~240 iterations each: the training loss
    /// falls and the test AUC is clearly above chance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_learn_ctr() {
        let j = job(SMALL);
        let shards = Shards::start(2).await;
        let events = train_workers(&j, &shards.addrs, 2).await;
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate(&j, &shards.addrs).await.unwrap();
        let (test_loss, test_auc) = evaluation;
        eprintln!("training loss {first} -> {last}; evaluation {evaluation:?}");
        assert!(last < first - 0.02, "training loss {first} -> {last}");
        assert!(test_auc > 0.65, "test AUC {test_auc}, log loss {test_loss}");
        shards.stop().await;
    }
}
