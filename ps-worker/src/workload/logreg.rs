//! Sparse logistic regression on a9a (LIBSVM, 123 binary features).
//!
//! The model ([`ps_model::logreg`]) is one sparse table `a9a.w` of width 1:
//! key `j < num_features` holds the weight of feature `j`, key
//! `num_features` the bias. A batch pulls the weights of the features its
//! rows use (the bias once per row) and pushes one gradient per occurrence;
//! the client sums the occurrences of a key. Only touched rows move, which is
//! what makes FTRL and lazy Adam apply.

use std::ops::Range;

use ps_common::spec::{Init, TableSpec};
use ps_model::logreg::{self, Batch};
use ps_model::loss::bce_with_logits;
use ps_model::{ModelKind, SavedModel, SparseTable};

use super::{BatchLoss, Iteration, Role, Score, Workload, trainer, wrong_kind};
use crate::client::ShardedClient;
use crate::config::{JobConfig, Workload as Kind};
use crate::data::{SparseDataset, load_libsvm, shard_range};
use crate::error::Result;

/// The weight table.
pub const TABLE: &str = "a9a.w";

pub struct Logreg {
    table: TableSpec,
    num_features: usize,
    test: SparseDataset,
    train: Option<Train>,
}

struct Train {
    data: SparseDataset,
    rows: Range<usize>,
    batch: Batch,
    w: Vec<f32>,
    grad: Vec<f32>,
}

/// Mean log loss and accuracy of the dense weights `w` (bias last) on `data`.
pub fn score(w: &[f32], data: &SparseDataset) -> Score {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for i in 0..data.len() {
        let (idx, val) = data.row(i);
        let z = logreg::logit(w, idx, val);
        let y = data.labels[i];
        loss += f64::from(bce_with_logits(z, y).0);
        correct += usize::from((z > 0.0) == (y > 0.5));
    }
    let n = data.len().max(1) as f64;
    Score { loss: loss / n, score: correct as f64 / n }
}

impl Logreg {
    /// Every weight, bias last, read at `clock` (missing rows read as zeros).
    async fn weights(&self, client: &ShardedClient, clock: u64) -> Result<(Vec<u64>, Vec<f32>)> {
        let keys: Vec<u64> = (0..=self.num_features as u64).collect();
        let mut w = vec![0.0f32; keys.len()];
        client.lookup_sparse(TABLE, 1, &keys, clock, &mut w).await?;
        Ok((keys, w))
    }
}

impl Workload for Logreg {
    const SCORE_NAME: &'static str = "accuracy";

    fn open(job: &JobConfig, role: Role, _num_shards: u32) -> Result<Self> {
        let Kind::A9aLogreg { train, test, num_features } = &job.workload else {
            return Err(wrong_kind("a9a_logreg", job));
        };
        let table = TableSpec::sparse(TABLE, 1, Init { seed: job.seed, ..Init::zeros() }, job.optimizer);
        let test = load_libsvm(test, Some(*num_features))?;
        let train = match role {
            Role::Train(id) => {
                let data = load_libsvm(train, Some(*num_features))?;
                let used = job.train_limit.map_or(data.len(), |n| n.min(data.len()));
                let rows = shard_range(used, id.index, id.count)?;
                Some(Train { data, rows, batch: Batch::default(), w: Vec::new(), grad: Vec::new() })
            }
            Role::Evaluate => None,
        };
        Ok(Logreg { table, num_features: *num_features, test, train })
    }

    fn tables(&self) -> Vec<TableSpec> {
        vec![self.table.clone()]
    }

    fn train_rows(&self) -> Range<usize> {
        self.train.as_ref().map_or(0..0, |t| t.rows.clone())
    }

    async fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> Result<()> {
        let bias = self.num_features as u64;
        let t = trainer(&mut self.train)?;
        t.batch.clear();
        for &r in it.rows {
            let (idx, val) = t.data.row(r);
            t.batch.push_row(idx, val, t.data.labels[r], bias);
        }
        t.w.resize(t.batch.keys.len(), 0.0);
        t.grad.resize(t.batch.keys.len(), 0.0);
        client.pull_sparse(TABLE, 1, &t.batch.keys, it.clock, &mut t.w).await
    }

    fn compute(&mut self) -> BatchLoss {
        let Some(t) = &mut self.train else { return BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 } };
        let (loss, correct) = logreg::loss_and_grad(&t.batch, &t.w, &mut t.grad);
        BatchLoss { samples: t.batch.len(), loss, score: correct as f64 }
    }

    async fn push(&mut self, client: &mut ShardedClient, it: Iteration<'_>) -> Result<()> {
        let t = trainer(&mut self.train)?;
        client.push_sparse(TABLE, 1, &t.batch.keys, &t.grad, it.clock, it.clock, true).await
    }

    async fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> Result<Score> {
        let (_, w) = self.weights(client, clock).await?;
        Ok(score(&w, &self.test))
    }

    async fn save(&mut self, client: &ShardedClient) -> Result<Option<SavedModel>> {
        let (keys, values) = self.weights(client, 0).await?;
        let model = ModelKind::Logreg { num_features: self.num_features, table: TABLE.into() };
        let table = SparseTable { name: TABLE.into(), dim: 1, keys, values, init: Some(self.table.init) };
        Ok(Some(SavedModel::new(model, Vec::new(), vec![table])))
    }
}
