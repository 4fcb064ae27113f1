//! A synthetic click-through-rate workload, sized to stress the sparse path.
//!
//! **Data.** Every example has `slots` categorical features. The id of each
//! slot is drawn from Zipf(`key_space`, `zipf_exponent`) (ids `1..=key_space`,
//! id 1 the most frequent), so a few ids are very common and a long tail is
//! seen once or never, as in real ad logs. The pair `(slot, id)` is hashed to
//! a key of the embedding table, `splitmix64(slot << 48 | id) mod key_space`
//! ([`ps_model::ctr::key`])
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

use std::ops::Range;

use ps_common::partition::splitmix64;
use ps_common::spec::{Init, InitKind, Layout, TableSpec};
use ps_model::loss::{auc, bce_with_logits, sigmoid};
use ps_model::{DenseTensor, ModelKind, SavedModel, SparseTable, Tower, TowerWorkspace, ctr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use super::{BatchLoss, Iteration, Role, Score, Workload, dense_tables, trainer, wrong_kind};
use crate::client::{DenseSet, ShardedClient};
use crate::config::{CtrConfig, JobConfig, Workload as Kind};
use crate::data::shard_range;
use crate::error::{Error, Result};

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

/// The CTR settings of `job`.
pub fn config(job: &JobConfig) -> Result<&CtrConfig> {
    match &job.workload {
        Kind::Ctr(c) => Ok(c),
        _ => Err(wrong_kind("ctr", job)),
    }
}

/// The tower over the concatenated embedding rows of an example.
pub fn tower(c: &CtrConfig) -> Tower {
    Tower::new(c.slots * c.emb_dim as usize, &c.hidden)
}

/// The embedding table, then the tower's dense tables in parameter order
/// (tensor `i` seeded `seed + 1 + i`).
pub fn tables(job: &JobConfig, c: &CtrConfig) -> (TableSpec, Vec<TableSpec>) {
    let emb = TableSpec::sparse(
        EMBEDDINGS,
        c.emb_dim,
        Init { kind: InitKind::Normal { mean: 0.0, std: EMB_INIT_STD }, seed: job.seed },
        c.embedding_optimizer.unwrap_or(job.optimizer),
    );
    let params = tower(c).param_specs(TOWER_PREFIX);
    let dense =
        dense_tables(params, job.seed.wrapping_add(1), job.optimizer, ps_common::spec::DEFAULT_CHUNK_LEN);
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
    pub fn new(c: &CtrConfig, seed: u64) -> Result<Generator> {
        let zipf = Zipf::new(c.key_space as f64, c.zipf_exponent)
            .map_err(|e| Error::Config(format!("zipf({}, {}): {e}", c.key_space, c.zipf_exponent)))?;
        Ok(Generator { slots: c.slots, key_space: c.key_space, zipf, seed })
    }

    /// The embedding key of a pair.
    pub fn key(&self, slot: usize, id: u64) -> u64 {
        ctr::key(slot, id, self.key_space)
    }

    /// The hidden weight of a pair, uniform in ±[`TRUTH_AMPLITUDE`].
    pub fn truth(&self, slot: usize, id: u64) -> f32 {
        let h = splitmix64(ctr::pair(slot, id) ^ splitmix64(self.seed ^ 0x7275_7468));
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

pub struct Ctr {
    config: CtrConfig,
    emb_dim: usize,
    tower: Tower,
    examples: Generator,
    emb: TableSpec,
    dense: Vec<TableSpec>,
    set: DenseSet,
    params: Vec<f32>,
    ws: TowerWorkspace,
    train: Option<Train>,
}

struct Train {
    worker: usize,
    /// This worker's examples per epoch.
    rows: usize,
    keys: Vec<u64>,
    labels: Vec<f32>,
    /// The batch's embedding rows in key order (the tower's input), and
    /// their gradients.
    x: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<f32>,
}

impl Workload for Ctr {
    const SCORE_NAME: &'static str = "auc";

    fn open(job: &JobConfig, role: Role, num_shards: u32) -> Result<Self> {
        let config = config(job)?.clone();
        let examples = Generator::new(&config, job.seed)?;
        let (emb, dense) = tables(job, &config);
        let set = DenseSet::new(&dense, num_shards)?;
        let train = match role {
            Role::Train(id) => Some(Train {
                worker: id.index,
                rows: shard_range(config.rows_per_epoch, id.index, id.count)?.len(),
                keys: Vec::new(),
                labels: Vec::new(),
                x: Vec::new(),
                dx: Vec::new(),
                grads: vec![0.0; set.len()],
            }),
            Role::Evaluate => None,
        };
        let tower = tower(&config);
        Ok(Ctr {
            emb_dim: config.emb_dim as usize,
            config,
            tower,
            examples,
            emb,
            dense,
            params: vec![0.0; set.len()],
            set,
            ws: TowerWorkspace::default(),
            train,
        })
    }

    fn tables(&self) -> Vec<TableSpec> {
        let mut all = vec![self.emb.clone()];
        all.extend(self.dense.iter().cloned());
        all
    }

    /// Examples are generated, not stored: the rows only count them, and
    /// batch `b` of an epoch is the generator's batch `b`.
    fn train_rows(&self) -> Range<usize> {
        self.train.as_ref().map_or(0..0, |t| 0..t.rows)
    }

    async fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> Result<()> {
        let dim = self.emb_dim;
        let t = trainer(&mut self.train)?;
        self.examples.fill(stream(it.epoch, t.worker), it.batch, it.rows.len(), &mut t.keys, &mut t.labels);
        t.x.resize(t.keys.len() * dim, 0.0);
        t.dx.resize(t.x.len(), 0.0);
        tokio::try_join!(
            client.pull_sparse(EMBEDDINGS, dim, &t.keys, it.clock, &mut t.x),
            client.pull_dense(&self.set, it.clock, &mut self.params),
        )?;
        Ok(())
    }

    fn compute(&mut self) -> BatchLoss {
        let Some(t) = &mut self.train else { return BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 } };
        let (loss, correct) =
            self.tower.loss_and_grad(&self.params, &t.x, &t.labels, &mut t.grads, &mut t.dx, &mut self.ws);
        BatchLoss { samples: t.labels.len(), loss, score: correct as f64 }
    }

    async fn push(&mut self, client: &mut ShardedClient, it: Iteration<'_>) -> Result<()> {
        let dim = self.emb_dim;
        let t = trainer(&mut self.train)?;
        client.push_sparse(EMBEDDINGS, dim, &t.keys, &t.dx, it.clock, it.clock, false).await?;
        // The last push of the iteration ticks every shard.
        client.push_dense(&self.set, &t.grads, it.clock, it.clock, true).await
    }

    /// Test log loss and AUC on the test stream; unseen keys read as their
    /// initial values and are not created.
    async fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> Result<Score> {
        let (s, dim) = (&self.config, self.emb_dim);
        client.pull_dense(&self.set, clock, &mut self.params).await?;
        let (mut keys, mut labels, mut x) = (Vec::new(), Vec::new(), Vec::new());
        let (mut scores, mut all_labels) = (Vec::with_capacity(s.test_rows), Vec::with_capacity(s.test_rows));
        let mut loss = 0.0f64;
        for (b, start) in (0..s.test_rows).step_by(EVAL_BATCH).enumerate() {
            let rows = EVAL_BATCH.min(s.test_rows - start);
            self.examples.fill(TEST_STREAM, b as u64, rows, &mut keys, &mut labels);
            x.resize(keys.len() * dim, 0.0);
            client.lookup_sparse(EMBEDDINGS, dim, &keys, clock, &mut x).await?;
            for (&z, &y) in self.tower.logits(&self.params, &x, &mut self.ws).iter().zip(&labels) {
                loss += f64::from(bce_with_logits(z, y).0);
                scores.push(z);
            }
            all_labels.extend_from_slice(&labels);
        }
        Ok(Score { loss: loss / s.test_rows.max(1) as f64, score: auc(&scores, &all_labels) })
    }

    /// The tower's tensors, and the embedding rows that exist (found by a
    /// table scan on every shard: no worker knows every key).
    async fn save(&mut self, client: &ShardedClient) -> Result<Option<SavedModel>> {
        let mut params = vec![0.0f32; self.set.len()];
        client.pull_dense(&self.set, 0, &mut params).await?;
        let mut at = 0;
        let mut dense = Vec::with_capacity(self.dense.len());
        for (name, len) in self.set.tensors() {
            let shape = match self.dense.iter().find(|t| &t.name == name).map(|t| &t.layout) {
                Some(Layout::Dense { shape, .. }) => shape.iter().map(|&d| d as usize).collect(),
                _ => return Err(Error::Protocol(format!("no dense spec for `{name}`"))),
            };
            dense.push(DenseTensor { name: name.clone(), shape, values: params[at..at + len].to_vec() });
            at += len;
        }
        let (keys, values) = client.scan_sparse(EMBEDDINGS, self.emb_dim).await?;
        let model = ModelKind::Ctr {
            slots: self.config.slots,
            key_space: self.config.key_space,
            emb_dim: self.emb_dim,
            hidden: self.config.hidden.clone(),
            embeddings: EMBEDDINGS.into(),
            tower_prefix: TOWER_PREFIX.into(),
        };
        let emb = SparseTable {
            name: EMBEDDINGS.into(),
            dim: self.emb_dim,
            keys,
            values,
            init: Some(self.emb.init),
        };
        Ok(Some(SavedModel::new(model, dense, vec![emb])))
    }
}

/// A CTR job small enough for tests (~240 iterations per worker of 2).
#[cfg(test)]
pub(crate) const SMALL_JOB: &str = r#"
    epochs = 3
    batch_size = 256
    progress_every_ms = 0
    eval_every_epochs = 0
    optimizer = { rule = "adam", lr = 0.003 }
    workload = { kind = "ctr", key_space = 100000, zipf_exponent = 1.1, rows_per_epoch = 40000, test_rows = 8000,
                 hidden = [32], embedding_optimizer = { rule = "adagrad", lr = 0.05 } }
"#;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn job(text: &str) -> JobConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn batches_are_deterministic_and_skewed() {
        let j = job(SMALL_JOB);
        let s = config(&j).unwrap();
        let examples = Generator::new(s, 42).unwrap();
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
}
