//! The workloads: a model, its tables and its data, behind one trait that the
//! training loop ([`crate::train`]) drives.
//!
//! - [`mnist::Mnist`]: the dense MLP on MNIST (the reference model).
//! - [`logreg::Logreg`]: sparse logistic regression on a9a (LIBSVM).
//! - [`mf::Mf`]: biased matrix factorization on MovieLens.
//! - [`ctr::Ctr`]: synthetic click-through data, embeddings into an MLP tower.
//!
//! A workload splits an iteration into [`Workload::pull`], [`Workload::compute`]
//! and [`Workload::push`]; the loop times the phases, skips the push of a
//! diverged batch, and owns the clock. Every iteration must end with exactly
//! one push carrying `tick` to every shard, as its last push: the clock
//! protocol counts those (see ARCHITECTURE.md, "Consistency models").

pub mod ctr;
pub mod logreg;
pub mod mf;
pub mod mnist;

use std::future::Future;
use std::ops::Range;

use ps_common::spec::{self, Init, Layout, OptimizerConfig, TableSpec};
use ps_model::{ParamSpec, SavedModel};

use crate::client::ShardedClient;
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::session::WorkerId;

/// What a workload is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One training worker: its share of the training data and the test set.
    Train(WorkerId),
    /// An outside reader: the test set (and what scoring needs) only.
    Evaluate,
}

/// Where the loop is: iteration `batch` of epoch `epoch`, at clock `clock`,
/// on the rows `rows` (indices into the workload's training data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iteration<'a> {
    pub epoch: u32,
    pub batch: u64,
    pub clock: u64,
    pub rows: &'a [usize],
    /// No iteration of this worker follows (so nothing is prefetched).
    pub last: bool,
    /// The rows of this worker's next iteration, where it follows in the
    /// same epoch and the job pipelines (`JobConfig::pipeline`).
    pub next: Option<&'a [usize]>,
}

/// The result of one batch's [`Workload::compute`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLoss {
    pub samples: usize,
    /// Mean loss of the batch.
    pub loss: f32,
    /// The batch's summed per-sample metric (correct predictions, squared error).
    pub score: f64,
}

/// A test-set evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub loss: f64,
    /// Accuracy, RMSE or AUC: see [`Workload::SCORE_NAME`].
    pub score: f64,
}

/// A model and its data, as the training loop and the evaluator see them.
pub trait Workload: Sized + Send {
    /// What [`Score::score`] is: `"accuracy"`, `"rmse"`, `"auc"`.
    const SCORE_NAME: &'static str;

    /// Loads what `role` needs, for a cluster of `num_shards` shards.
    fn open(job: &JobConfig, role: Role, num_shards: u32) -> Result<Self>;

    /// The tables every worker registers.
    fn tables(&self) -> Vec<TableSpec>;

    /// The rows this worker trains on, as indices into its training data;
    /// the loop shuffles them every epoch and cuts them into batches. Empty
    /// when opened for evaluation.
    fn train_rows(&self) -> Range<usize>;

    /// Gathers batch `it` and pulls the parameters it reads, at `it.clock`.
    fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> impl Future<Output = Result<()>> + Send;

    /// The loss and gradient of the pulled batch, no I/O.
    fn compute(&mut self) -> BatchLoss;

    /// Pushes the gradient; the last push carries `tick`.
    fn push(
        &mut self,
        client: &mut ShardedClient,
        it: Iteration<'_>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Scores the parameters read at `clock` on the test set.
    fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> impl Future<Output = Result<Score>> + Send;

    /// The trained model in its portable form, read from the shards; `None`
    /// where the workload cannot enumerate its rows yet.
    fn save(&mut self, client: &ShardedClient) -> impl Future<Output = Result<Option<SavedModel>>> + Send;
}

/// The training side of a workload opened with [`Role::Train`].
pub(crate) fn trainer<T>(part: &mut Option<T>) -> Result<&mut T> {
    part.as_mut().ok_or_else(|| Error::Config("workload opened for evaluation, not training".into()))
}

/// The dense tables of a model's parameters, in parameter order: tensor `i`
/// gets initializer seed `seed + i`.
pub(crate) fn dense_tables(
    params: Vec<ParamSpec>,
    seed: u64,
    optimizer: OptimizerConfig,
    chunk_len: u32,
) -> Vec<TableSpec> {
    params
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = match p.init {
                ps_model::InitKind::Zeros => spec::InitKind::Constant { value: 0.0 },
                ps_model::InitKind::Uniform { low, high } => spec::InitKind::Uniform { low, high },
            };
            TableSpec {
                name: p.name,
                layout: Layout::Dense { shape: p.shape.iter().map(|&d| d as u64).collect(), chunk_len },
                init: Init { kind, seed: seed.wrapping_add(i as u64) },
                optimizer,
                // The job's `[job.codecs]` are applied when the worker registers.
                codecs: Default::default(),
            }
        })
        .collect()
}

/// Names the workload a job is not.
pub(crate) fn wrong_kind(expected: &str, job: &JobConfig) -> Error {
    Error::Config(format!("not a {expected} job: {:?}", job.workload))
}
