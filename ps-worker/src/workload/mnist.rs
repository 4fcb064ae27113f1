//! The reference model: a dense ReLU MLP ([`ps_model::Mlp`]) on MNIST, its
//! tensors in dense tables (`fc1.weight`, `fc1.bias`, ...).
//!
//! With `overlap` (the default) the pull for iteration `c + 1` travels with
//! the push of `c` (`push_and_pull_dense`: on the data plane, in one round
//! trip per shard), so an iteration's pull phase is usually empty. With
//! `pipeline` too (ASP only), the next batch's gradient is computed on a
//! blocking thread while that round trip is in flight, on the weights
//! pulled with the push before (so it misses this worker's own last push):
//! the worker's compute and its communication then run at once.
//!
//! Two options serve model compression (`ps-cluster models prune` and
//! `distill`):
//! - `init_from` starts from a model file's weights. The shards' tables
//!   cannot be initialized from values (a table's initializer is a seeded
//!   distribution, part of its spec on the wire), so they start at zero and
//!   hold the change: the network's weights are `base + table`. With
//!   `keep_zeros`, the weights that are zero in the base (a pruning mask)
//!   have their gradient zeroed before the push, so their table values get
//!   zero updates from a zero optimizer state and stay exactly zero (SGD,
//!   momentum, Adam, Adagrad; `tests/it/compress.rs` checks the shards),
//!   and the mask is also applied to the weights the worker computes with.
//! - `teacher` trains against a teacher model's soft targets
//!   (`Mlp::distill_loss_and_grad`), computed once per training row when the
//!   worker opens.

use std::ops::Range;
use std::sync::Arc;

use ps_common::codec::{F32Pool, SharedF32};
use ps_common::spec::TableSpec;
use ps_model::{Distill, InitKind, Mlp, ModelKind, SavedModel, Workspace};

use super::{BatchLoss, Iteration, Role, Score, Workload, dense_tables, trainer, wrong_kind};
use crate::client::{DenseSet, ShardedClient};
use crate::config::{JobConfig, TeacherConfig, Workload as Kind};
use crate::data::{self, BatchBuf, DenseDataset};
use crate::error::{Error, Result};

pub struct Mnist {
    mlp: Mlp,
    tables: Vec<TableSpec>,
    set: DenseSet,
    test: DenseDataset,
    /// What the shards hold: the weights, or their change from `base`.
    params: Vec<f32>,
    /// `init_from`'s weights and mask, if any.
    base: Option<Arc<Base>>,
    /// The weights computed with when there is a base (`base + params`).
    weights: Vec<f32>,
    train: Option<Train>,
}

/// The weights a job starts from (`init_from`), and which may change.
struct Base {
    values: Vec<f32>,
    /// `keep_zeros`: `false` where the base is zero (kept zero).
    mask: Option<Vec<bool>>,
}

impl Base {
    /// Reads `path`: an f32 MLP of `layers` (a sparse one is densified).
    /// The mask covers weights only: a bias at zero still trains.
    fn read(path: &std::path::Path, layers: &[usize], keep_zeros: bool) -> Result<Base> {
        let values = read_mlp(path, layers)?;
        let mask = keep_zeros.then(|| {
            let mut at = 0;
            let mut mask = Vec::with_capacity(values.len());
            for spec in Mlp::new(layers).param_specs() {
                let part = &values[at..at + spec.len()];
                at += spec.len();
                let weight = spec.name.ends_with(".weight");
                mask.extend(part.iter().map(|&v| !weight || v != 0.0));
            }
            mask
        });
        Ok(Base { values, mask })
    }

    /// `out = base + delta`, masked.
    fn apply(&self, delta: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend(self.values.iter().zip(delta).map(|(b, d)| b + d));
        if let Some(mask) = &self.mask {
            out.iter_mut().zip(mask).filter(|(_, keep)| !**keep).for_each(|(w, _)| *w = 0.0);
        }
    }
}

/// The flat parameters of the MLP in `path`, which must have `layers` (an
/// f32 MLP, or a pruned one, densified).
fn read_mlp(path: &std::path::Path, layers: &[usize]) -> Result<Vec<f32>> {
    let bad = |e: String| Error::Config(format!("{}: {e}", path.display()));
    let mut model = SavedModel::read(path).map_err(|e| bad(e.to_string()))?;
    if let ModelKind::MlpSparse { .. } = model.model {
        model = ps_model::prune::densify(&model).map_err(|e| bad(e.to_string()))?;
    }
    match &model.model {
        ModelKind::Mlp { layers: l } if l.as_slice() == layers => {}
        other => {
            return Err(bad(format!(
                "a {} model of {other:?}, where an MLP of {layers:?} is needed",
                other.name()
            )));
        }
    }
    Ok(model.dense.iter().flat_map(|t| t.values.iter().copied()).collect())
}

/// The teacher's `softmax(logits / T)` of every row of `x`.
fn soft_targets(t: &TeacherConfig, x: &DenseDataset) -> Result<Vec<f32>> {
    let model = SavedModel::read(&t.model)
        .map_err(|e| Error::Config(format!("teacher {}: {e}", t.model.display())))?;
    let ModelKind::Mlp { layers } = &model.model else {
        return Err(Error::Config(format!(
            "teacher {}: a {} model, not an f32 MLP",
            t.model.display(),
            model.model.name()
        )));
    };
    if layers.first() != Some(&x.x.ncols()) || layers.last() != Some(&x.num_classes) {
        return Err(Error::Config(format!(
            "teacher {}: layers {layers:?} do not take {} inputs to {} classes",
            t.model.display(),
            x.x.ncols(),
            x.num_classes
        )));
    }
    let teacher = Mlp::new(layers);
    let params = read_mlp(&t.model, layers)?;
    let (mut ws, mut out, mut soft) =
        (teacher.workspace(1000), Vec::new(), Vec::with_capacity(x.len() * x.num_classes));
    for start in (0..x.len()).step_by(1000) {
        let rows = x.x.slice(ndarray::s![start..(start + 1000).min(x.len()), ..]);
        teacher.predict_tempered(&params, rows, t.temperature, &mut ws, &mut out);
        soft.extend_from_slice(&out);
    }
    Ok(soft)
}

/// What only a training worker holds.
struct Train {
    data: DenseDataset,
    rows: Range<usize>,
    /// What computing a batch needs (boxed: it moves to a blocking thread
    /// and back while a pipelined push is in flight; `None` only after that
    /// thread failed, which ends the run).
    step: Option<Box<Step>>,
    /// Where the gradients' vectors come back to once their push is done.
    pool: F32Pool,
    overlap: bool,
    pipeline: bool,
    /// `params` already hold this iteration's values (pulled with the last push).
    prefetched: bool,
    /// Pipelined: the batch computed during the last push, `(epoch, batch)`,
    /// and its loss; its gradient is in `step.grads`.
    ahead: Option<((u32, u64), BatchLoss)>,
    /// Pipelined: the vector the next pull writes into while `params` are
    /// computed with.
    spare: Vec<f32>,
    /// Distillation: the teacher's soft targets of every row of `data`.
    teacher: Option<Vec<f32>>,
}

impl Train {
    fn step(&mut self) -> Result<&mut Step> {
        self.step.as_deref_mut().ok_or_else(Train::no_step)
    }

    /// Gathers `rows` (and their soft targets) into the step.
    fn gather(&mut self, rows: &[usize]) -> Result<()> {
        let step = self.step.as_deref_mut().ok_or_else(Train::no_step)?;
        step.gather(&self.data, self.teacher.as_deref(), rows);
        Ok(())
    }

    fn no_step() -> Error {
        Error::Compute("an earlier batch's computation failed".into())
    }
}

/// One batch's inputs, gradient and scratch: everything [`Step::run`]
/// touches but the parameters.
struct Step {
    mlp: Mlp,
    batch: BatchBuf,
    /// The gradient being computed: handed to the push without a copy
    /// ([`SharedF32`]), and back from the pool (the same memory, once the
    /// push is done) for the next one.
    grads: Vec<f32>,
    ws: Workspace,
    /// `base + params`, when there is a base.
    weights: Vec<f32>,
    base: Option<Arc<Base>>,
    /// Distillation: the batch's soft targets, and the temperature and weight.
    teacher: Option<(Vec<f32>, TeacherConfig)>,
}

impl Step {
    /// Gathers `rows` of `data` (and their soft targets, from `soft`).
    fn gather(&mut self, data: &DenseDataset, soft: Option<&[f32]>, rows: &[usize]) {
        data.gather(rows, &mut self.batch);
        if let (Some((batch, _)), Some(soft)) = (&mut self.teacher, soft) {
            let classes = data.num_classes;
            batch.clear();
            for &r in rows {
                batch.extend_from_slice(&soft[r * classes..(r + 1) * classes]);
            }
        }
    }

    /// The gathered batch's loss and gradient (into `grads`, `len` floats)
    /// at `params`.
    fn run(&mut self, params: &[f32], pool: &F32Pool) -> BatchLoss {
        if self.grads.len() != params.len() {
            // Given to the last push. What it holds is overwritten (`Mlp::loss_and_grad`).
            self.grads = pool.take(params.len());
        }
        let params = match &self.base {
            Some(base) => {
                base.apply(params, &mut self.weights);
                &self.weights
            }
            None => params,
        };
        let (loss, correct) = match &self.teacher {
            Some((soft, c)) => {
                let target = Distill { soft, temperature: c.temperature, alpha: c.alpha };
                self.mlp.distill_loss_and_grad(
                    params,
                    self.batch.x(),
                    self.batch.y(),
                    target,
                    &mut self.grads,
                    &mut self.ws,
                )
            }
            None => {
                self.mlp.loss_and_grad(params, self.batch.x(), self.batch.y(), &mut self.grads, &mut self.ws)
            }
        };
        if let Some(mask) = self.base.as_ref().and_then(|b| b.mask.as_ref()) {
            self.grads.iter_mut().zip(mask).filter(|(_, keep)| !**keep).for_each(|(g, _)| *g = 0.0);
        }
        BatchLoss { samples: self.batch.len(), loss, score: correct as f64 }
    }
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
    let mut specs = mlp.param_specs();
    if let Kind::MnistMlp { init_from: Some(_), .. } = &job.workload {
        // The tables hold the change from the base.
        specs.iter_mut().for_each(|s| s.init = InitKind::Zeros);
    }
    let tables = dense_tables(specs, job.seed, job.optimizer, *chunk_len);
    Ok((mlp, tables))
}

impl Workload for Mnist {
    const SCORE_NAME: &'static str = "accuracy";

    fn open(job: &JobConfig, role: Role, num_shards: u32) -> Result<Self> {
        let (mlp, tables) = model(job)?;
        let Kind::MnistMlp { data_dir, layers, init_from, keep_zeros, teacher, .. } = &job.workload else {
            return Err(wrong_kind("mnist_mlp", job));
        };
        let set = DenseSet::new(&tables, num_shards)?;
        let base =
            init_from.as_deref().map(|p| Base::read(p, layers, *keep_zeros).map(Arc::new)).transpose()?;
        let (test, train) = match role {
            Role::Train(id) => {
                let (train, test) = load(job)?;
                let data = train.shard(id.index, id.count)?;
                let soft = teacher.as_ref().map(|t| soft_targets(t, &data)).transpose()?;
                let step = Some(Box::new(Step {
                    mlp: mlp.clone(),
                    batch: BatchBuf::new(),
                    grads: Vec::new(),
                    ws: mlp.workspace(job.batch_size),
                    weights: Vec::new(),
                    base: base.clone(),
                    teacher: teacher.as_ref().map(|t| (Vec::new(), t.clone())),
                }));
                let train = Train {
                    teacher: soft,
                    rows: 0..data.len(),
                    data,
                    step,
                    pool: F32Pool::default(),
                    overlap: job.overlap,
                    pipeline: job.pipeline,
                    prefetched: false,
                    ahead: None,
                    spare: Vec::new(),
                };
                (test, Some(train))
            }
            Role::Evaluate => (data::load_mnist(data_dir, data::Split::Test)?, None),
        };
        Ok(Mnist { params: vec![0.0; set.len()], base, weights: Vec::new(), mlp, tables, set, test, train })
    }

    fn tables(&self) -> Vec<TableSpec> {
        self.tables.clone()
    }

    fn train_rows(&self) -> Range<usize> {
        self.train.as_ref().map_or(0..0, |t| t.rows.clone())
    }

    async fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> Result<()> {
        let t = trainer(&mut self.train)?;
        if t.ahead.as_ref().is_some_and(|(at, _)| *at != (it.epoch, it.batch)) {
            // Not the batch the loop went on with (it stopped early): dropped.
            t.ahead = None;
        }
        if t.ahead.is_none() {
            t.gather(it.rows)?;
        }
        if !t.prefetched {
            client.pull_dense(&self.set, it.clock, &mut self.params).await?;
        }
        Ok(())
    }

    fn compute(&mut self) -> BatchLoss {
        // Not reached without a trainer and its step (`pull` said so); a
        // NaN loss would end the run.
        let Some(t) = &mut self.train else { return BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 } };
        match (t.ahead.take(), &mut t.step) {
            (Some((_, out)), _) => out,
            (None, Some(step)) => step.run(&self.params, &t.pool),
            (None, None) => BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 },
        }
    }

    async fn push(&mut self, client: &mut ShardedClient, it: Iteration<'_>) -> Result<()> {
        let t = trainer(&mut self.train)?;
        let grads = SharedF32::pooled(std::mem::take(&mut t.step()?.grads), &t.pool);
        match it.next {
            _ if !t.overlap || it.last => {
                t.prefetched = false;
                client.push_dense(&self.set, &grads, it.clock, it.clock, true).await
            }
            Some(next) if t.pipeline => {
                // The next batch is computed at the weights this one was,
                // on a blocking thread, while the round trip brings the
                // weights after this push into `spare`.
                t.gather(next)?;
                let mut step = t.step.take().ok_or_else(Train::no_step)?;
                let (params, pool) = (std::mem::take(&mut self.params), t.pool.clone());
                let computing = tokio::task::spawn_blocking(move || {
                    let out = step.run(&params, &pool);
                    (step, params, out)
                });
                let mut into = std::mem::take(&mut t.spare);
                into.resize(self.set.len(), 0.0);
                let pushed = client.push_and_pull_dense(&self.set, &grads, it.clock, &mut into).await;
                let (step, params, out) = computing.await.map_err(|e| Error::Compute(e.to_string()))?;
                t.step = Some(step);
                t.ahead = Some(((it.epoch, it.batch + 1), out));
                t.prefetched = matches!(pushed, Ok(true));
                // A pull that missed a shard leaves `params` as they were
                // and is done again in the next iteration.
                (self.params, t.spare) = if t.prefetched { (into, params) } else { (params, into) };
                pushed.map(|_| ())
            }
            _ => {
                // A pull that missed a shard is done again in the next iteration.
                t.prefetched =
                    client.push_and_pull_dense(&self.set, &grads, it.clock, &mut self.params).await?;
                Ok(())
            }
        }
    }

    async fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> Result<Score> {
        // A read outside the clock discipline: evaluation holds no one up.
        client.pull_dense(&self.set, clock, &mut self.params).await?;
        let params = match &self.base {
            Some(base) => {
                base.apply(&self.params, &mut self.weights);
                &self.weights
            }
            None => &self.params,
        };
        let (loss, acc) = self.mlp.evaluate(params, self.test.x.view(), &self.test.y);
        Ok(Score { loss: f64::from(loss), score: f64::from(acc) })
    }

    async fn save(&mut self, client: &ShardedClient) -> Result<Option<SavedModel>> {
        let mut params = vec![0.0f32; self.set.len()];
        client.pull_dense(&self.set, 0, &mut params).await?;
        if let Some(base) = &self.base {
            let delta = std::mem::take(&mut params);
            base.apply(&delta, &mut params);
        }
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
