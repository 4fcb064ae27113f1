//! The reference model: a dense ReLU MLP ([`ps_model::Mlp`]) on MNIST, its
//! tensors in dense tables (`fc1.weight`, `fc1.bias`, ...).
//!
//! With `overlap` (the default) the pull for iteration `c + 1` travels with
//! the push of `c` (`push_and_pull_dense`), so an iteration's pull phase is
//! usually empty.

use std::ops::Range;

use ps_common::spec::TableSpec;
use ps_model::{Mlp, ModelKind, SavedModel, Workspace};

use super::{BatchLoss, Iteration, Role, Score, Workload, dense_tables, trainer, wrong_kind};
use crate::client::{DenseSet, ShardedClient};
use crate::config::{JobConfig, Workload as Kind};
use crate::data::{self, BatchBuf, DenseDataset};
use crate::error::{Error, Result};

pub struct Mnist {
    mlp: Mlp,
    tables: Vec<TableSpec>,
    set: DenseSet,
    test: DenseDataset,
    params: Vec<f32>,
    train: Option<Train>,
}

/// What only a training worker holds.
struct Train {
    data: DenseDataset,
    rows: Range<usize>,
    batch: BatchBuf,
    grads: Vec<f32>,
    ws: Workspace,
    overlap: bool,
    /// `params` already hold this iteration's values (pulled with the last push).
    prefetched: bool,
}

/// Loads the training set (limited by `train_limit`) and the test set.
pub fn load(job: &JobConfig) -> Result<(DenseDataset, DenseDataset)> {
    let Kind::MnistMlp { data_dir, .. } = &job.workload else { return Err(wrong_kind("mnist_mlp", job)) };
    let mut train = data::load_mnist(data_dir, data::Split::Train)?;
    if let Some(n) = job.train_limit {
        let (x, y) = train.slice(0..n.min(train.len()));
        train = DenseDataset { x: x.to_owned(), y: y.to_vec(), num_classes: train.num_classes };
    }
    Ok((train, data::load_mnist(data_dir, data::Split::Test)?))
}

/// The MLP of a job and its dense tables.
pub fn model(job: &JobConfig) -> Result<(Mlp, Vec<TableSpec>)> {
    let Kind::MnistMlp { layers, chunk_len, .. } = &job.workload else {
        return Err(wrong_kind("mnist_mlp", job));
    };
    let mlp = Mlp::new(layers);
    let tables = dense_tables(mlp.param_specs(), job.seed, job.optimizer, *chunk_len);
    Ok((mlp, tables))
}

impl Workload for Mnist {
    const SCORE_NAME: &'static str = "accuracy";

    fn open(job: &JobConfig, role: Role, num_shards: u32) -> Result<Self> {
        let (mlp, tables) = model(job)?;
        let Kind::MnistMlp { data_dir, .. } = &job.workload else { return Err(wrong_kind("mnist_mlp", job)) };
        let set = DenseSet::new(&tables, num_shards)?;
        let (test, train) = match role {
            Role::Train(id) => {
                let (train, test) = load(job)?;
                let data = train.shard(id.index, id.count)?;
                let train = Train {
                    rows: 0..data.len(),
                    data,
                    batch: BatchBuf::new(),
                    grads: vec![0.0; set.len()],
                    ws: mlp.workspace(job.batch_size),
                    overlap: job.overlap,
                    prefetched: false,
                };
                (test, Some(train))
            }
            Role::Evaluate => (data::load_mnist(data_dir, data::Split::Test)?, None),
        };
        Ok(Mnist { params: vec![0.0; set.len()], mlp, tables, set, test, train })
    }

    fn tables(&self) -> Vec<TableSpec> {
        self.tables.clone()
    }

    fn train_rows(&self) -> Range<usize> {
        self.train.as_ref().map_or(0..0, |t| t.rows.clone())
    }

    async fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> Result<()> {
        let t = trainer(&mut self.train)?;
        t.data.gather(it.rows, &mut t.batch);
        if !t.prefetched {
            client.pull_dense(&self.set, it.clock, &mut self.params).await?;
        }
        Ok(())
    }

    fn compute(&mut self) -> BatchLoss {
        let Some(t) = &mut self.train else { return BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 } };
        let (loss, correct) =
            self.mlp.loss_and_grad(&self.params, t.batch.x(), t.batch.y(), &mut t.grads, &mut t.ws);
        BatchLoss { samples: t.batch.len(), loss, score: correct as f64 }
    }

    async fn push(&mut self, client: &mut ShardedClient, it: Iteration<'_>) -> Result<()> {
        let t = trainer(&mut self.train)?;
        if t.overlap && !it.last {
            // A pull that missed a shard is done again in the next iteration.
            t.prefetched =
                client.push_and_pull_dense(&self.set, &t.grads, it.clock, &mut self.params).await?;
            Ok(())
        } else {
            t.prefetched = false;
            client.push_dense(&self.set, &t.grads, it.clock, it.clock, true).await
        }
    }

    async fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> Result<Score> {
        // A read outside the clock discipline: evaluation holds no one up.
        client.pull_dense(&self.set, clock, &mut self.params).await?;
        let (loss, acc) = self.mlp.evaluate(&self.params, self.test.x.view(), &self.test.y);
        Ok(Score { loss: f64::from(loss), score: f64::from(acc) })
    }

    async fn save(&mut self, client: &ShardedClient) -> Result<Option<SavedModel>> {
        let mut params = vec![0.0f32; self.set.len()];
        client.pull_dense(&self.set, 0, &mut params).await?;
        let kind = ModelKind::Mlp { layers: self.mlp.sizes().to_vec() };
        let model =
            SavedModel::from_flat(kind, &params).map_err(|e| Error::Protocol(format!("saving: {e}")))?;
        Ok(Some(model))
    }
}

#[cfg(test)]
mod tests {
    use ps_model::Mlp;

    use crate::data::{BatchBuf, Batches, Split, load_mnist};

    /// The model and the batching alone, no servers: plain SGD fits 2000
    /// training rows.
    #[test]
    fn sgd_on_2000_mnist_rows_fits_them() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let data = load_mnist(&dir, Split::Train).unwrap();
        let (x, y) = data.slice(0..2000);

        let mlp = Mlp::new(&[784, 64, 64, 10]);
        let mut params = mlp.init_params(1);
        let mut grads = vec![0.0; mlp.num_params()];
        let mut ws = mlp.workspace(32);
        let mut batches = Batches::new(2000, 32, 1);
        let mut buf = BatchBuf::new();
        for epoch in 0..10 {
            for rows in batches.epoch(epoch) {
                buf.fill(x, y, rows);
                mlp.loss_and_grad(&params, buf.x(), buf.y(), &mut grads, &mut ws);
                params.iter_mut().zip(&grads).for_each(|(p, g)| *p -= 0.1 * g);
            }
        }
        let (loss, accuracy) = mlp.evaluate(&params, x, y);
        assert!(accuracy > 0.85, "train accuracy {accuracy}, loss {loss}");
    }
}
