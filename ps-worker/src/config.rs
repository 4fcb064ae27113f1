//! The run file: one TOML document with a `[cluster]` table (read by the
//! launcher), a `[job]` table (read by every worker) and an optional
//! `[registry]` table (read by the launcher when training ends). See
//! `examples/config/*.toml` for commented examples; a test parses each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ps_common::compress::{Codec, Codecs};
use ps_common::optim::Rule;
use ps_common::spec::{Backup, Consistency, OptimizerConfig, TableSpec};
use serde::{Deserialize, Serialize};

use crate::client::ClientOptions;
use crate::error::{Error, Result};

/// Largest straggler slowdown factor.
pub const MAX_STRAGGLER_FACTOR: f64 = 1e6;

/// Longest time a run file may name, in seconds (a year): what a `Duration`
/// holds with room to spare, where 1e300 seconds panicked converting.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Most servers, and most workers, a run file may ask the launcher for
/// (a shard accepts 1024 distinct workers by default).
pub const MAX_PROCESSES: u32 = 1024;

/// Largest mini-batch: a worker holds a batch's activations (at most
/// [`MAX_DENSE_PARAMS`] of them, checked per workload) and row indices.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// Most parameters of a dense model (an MLP, a CTR tower), which every
/// worker holds several copies of (4 GiB each at this bound).
pub const MAX_DENSE_PARAMS: usize = 1 << 30;

/// Most features of a logistic regression, whose evaluation and saving
/// read every weight (12 bytes each) into one worker.
pub const MAX_FEATURES: usize = 1 << 28;

/// Most synthetic examples per epoch, or held out, of the CTR workload
/// (a worker holds an index or a score per example).
pub const MAX_SYNTHETIC_ROWS: usize = 1 << 28;

/// Whether dense layers `sizes[l] -> sizes[l + 1]` fit a worker: at most
/// [`MAX_DENSE_PARAMS`] parameters (weights and biases), and at most as many
/// values in a batch of `batch_size` rows' inputs and activations (the MLP's
/// workspace holds them all from the start). Otherwise the reason.
fn check_dense(sizes: &[usize], batch_size: usize) -> std::result::Result<(), String> {
    let params = sizes
        .windows(2)
        .try_fold(0usize, |n, w| n.checked_add(w[0].checked_mul(w[1])?.checked_add(w[1])?))
        .filter(|&n| n <= MAX_DENSE_PARAMS);
    if params.is_none() {
        return Err(format!("layers {sizes:?} have more than {MAX_DENSE_PARAMS} parameters"));
    }
    let acts = sizes
        .iter()
        .try_fold(0usize, |n, &w| n.checked_add(w))
        .and_then(|n| n.checked_mul(batch_size))
        .filter(|&n| n <= MAX_DENSE_PARAMS);
    if acts.is_none() {
        return Err(format!(
            "layers {sizes:?} with batch_size {batch_size} need more than {MAX_DENSE_PARAMS} inputs and activations"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Periodic checkpoints of a launcher run (`[checkpoint]`).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    pub job: JobConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// Whether and where the launcher registers the trained model when training
/// ends (see `ps-cluster models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Register the final model (`false` opts out).
    pub register: bool,
    /// Registry database, `sqlite://PATH` or `postgres://...` [default:
    /// `$PS_REGISTRY`, else `sqlite://<root>/registry.db`].
    pub url: Option<String>,
    /// Folder of the registry's artifacts [default: `$PS_REGISTRY_ROOT`, else `registry`].
    pub root: Option<PathBuf>,
    /// Model name [default: the workload's kind, e.g. `mnist_mlp`].
    pub name: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { register: true, url: None, root: None, name: None }
    }
}

/// When the launcher checkpoints its shards, and how many it keeps. A shard
/// that dies is restarted from the newest checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint at all (and supervise the shards).
    pub enabled: bool,
    /// Seconds between checkpoints (0: not by time).
    pub every_s: f64,
    /// Iterations of the slowest worker between checkpoints (0: not by count).
    pub every_iters: u64,
    /// Complete checkpoints kept; older ones are deleted.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { enabled: true, every_s: 5.0, every_iters: 0, keep: 3 }
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> Result<()> {
        // A time the launcher can wait for (`Duration` panics on more).
        if !(self.every_s >= 0.0 && self.every_s <= MAX_SECONDS) {
            return Err(Error::Config(format!(
                "checkpoint every_s must be in [0, {MAX_SECONDS}], got {}",
                self.every_s
            )));
        }
        if self.enabled && self.keep == 0 {
            return Err(Error::Config("checkpoint keep must be at least 1".into()));
        }
        Ok(())
    }
}

/// How many processes the launcher starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub servers: u32,
    pub workers: u32,
    /// Run the local cluster without TLS (`ps-cluster train --plaintext`);
    /// by default the launcher makes certificates in `<run>/tls/` and every
    /// channel uses mutual TLS. Not written when false, so the job
    /// fingerprint of earlier runs is unchanged.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
    /// Pin each process of the local cluster to one CPU (shard `k` and
    /// worker `k` to the `k`-th CPU the launcher may use, in turn). Not
    /// written when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pin_cpus: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { servers: 2, workers: 2, plaintext: false, pin_cpus: false }
    }
}

/// What to train and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub workload: Workload,
    #[serde(default)]
    pub consistency: Consistency,
    #[serde(default = "defaults::epochs")]
    pub epochs: u32,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    #[serde(default = "defaults::optimizer")]
    pub optimizer: OptimizerConfig,
    /// Slow some workers down, for staleness experiments.
    #[serde(default)]
    pub straggler: Option<Straggler>,
    /// A worker silent for this long is dropped from the clock set.
    #[serde(default = "defaults::lease_ms")]
    pub lease_ms: u64,
    /// Stop each worker after this many iterations (experiments, tests).
    #[serde(default)]
    pub max_iters: Option<u64>,
    /// Train on the first N training rows only (tests).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Worker 0 evaluates on the test set every this many epochs (0: never).
    #[serde(default = "defaults::one")]
    pub eval_every_epochs: u32,
    /// Send the push of iteration c and the pull for c + 1 together, so
    /// communication overlaps (see `ShardedClient::push_and_pull_dense`).
    #[serde(default = "defaults::yes")]
    pub overlap: bool,
    /// Compute each batch while the previous iteration's push (and the pull
    /// it carries) is in flight, on another core: the batch's gradient is
    /// then computed on weights that miss this worker's own last push (one
    /// more iteration of staleness). ASP only (BSP and SSP promise fresher
    /// reads), `mnist_mlp` with `overlap` and fixed data shares only. Not
    /// written when false, so the job fingerprint of earlier runs is
    /// unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pipeline: bool,
    /// Minimum time between progress events.
    #[serde(default = "defaults::progress_every_ms")]
    pub progress_every_ms: u64,
    /// Connection, timeout and retry settings of the workers' clients.
    #[serde(default)]
    pub client: ClientOptions,
    /// How gradients and values travel, per table (`[job.codecs]`). Left
    /// out of a written run file at its default, so the job fingerprint of
    /// an f32 job (and `--resume` of its checkpoints) is as before codecs.
    #[serde(default, skip_serializing_if = "CodecConfig::is_default")]
    pub codecs: CodecConfig,
    /// How the training data is split among the workers: `fixed` shares
    /// (the default) or `dynamic` (ranges of minibatches from a queue on
    /// shard 0, so fast workers do more of each epoch).
    #[serde(default, skip_serializing_if = "DataAssignment::is_fixed")]
    pub data: DataAssignment,
    /// Minibatches per range of the dynamic data queue.
    #[serde(default = "defaults::range_batches", skip_serializing_if = "defaults::is_range_batches")]
    pub range_batches: u32,
    /// Backup workers under BSP/SSP (`{ workers = 1, late = "drop" }`):
    /// an iteration completes when all but `workers` workers have pushed it.
    #[serde(default, skip_serializing_if = "is_no_backup")]
    pub backup: Backup,
}

/// How the training data is split among the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataAssignment {
    /// Worker `i` of `n` owns the `i`-th contiguous `1/n` of the rows.
    #[default]
    Fixed,
    /// Every worker holds every row and takes ranges of minibatches from a
    /// shared queue (held by shard 0), each exactly once per epoch.
    Dynamic,
}

impl DataAssignment {
    fn is_fixed(&self) -> bool {
        *self == DataAssignment::Fixed
    }
}

impl std::fmt::Display for DataAssignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataAssignment::Fixed => "fixed",
            DataAssignment::Dynamic => "dynamic",
        })
    }
}

fn is_no_backup(b: &Backup) -> bool {
    *b == Backup::default()
}

/// Wire codecs (`[job.codecs]`): one for every table's pushes and one for
/// its training pulls, and overrides by table name
/// (`[job.codecs.tables."fc1.weight"]`). They become part of each table's
/// spec, so the shards refuse a worker whose codecs differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecConfig {
    /// Gradients of pushes: f32, fp16, bf16, int8, top_k.
    pub push: Codec,
    /// Values of the workers' training pulls: f32, fp16, bf16. Evaluation
    /// and saving always read f32.
    pub pull: Codec,
    /// Keep what a lossy push did not send and add it to the next gradient.
    pub error_feedback: bool,
    /// Per-table overrides, by table name.
    pub tables: BTreeMap<String, TableCodecs>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig { push: Codec::F32, pull: Codec::F32, error_feedback: true, tables: BTreeMap::new() }
    }
}

/// One table's codecs; what is left out is the job's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableCodecs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Codec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<Codec>,
}

impl CodecConfig {
    /// The codecs of table `name`.
    pub fn of(&self, name: &str) -> Codecs {
        let t = self.tables.get(name);
        Codecs {
            push: t.and_then(|t| t.push).unwrap_or(self.push),
            pull: t.and_then(|t| t.pull).unwrap_or(self.pull),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let check =
            |what: &str, c: Codecs| c.validate().map_err(|e| Error::Config(format!("codecs of {what}: {e}")));
        check("every table", Codecs { push: self.push, pull: self.pull })?;
        for name in self.tables.keys() {
            check(&format!("`{name}`"), self.of(name))?;
        }
        Ok(())
    }

    /// Sets the codecs of `tables`; an override naming no table is an error.
    pub fn apply(&self, tables: &mut [TableSpec]) -> Result<()> {
        if let Some(name) = self.tables.keys().find(|n| !tables.iter().any(|t| &&t.name == n)) {
            let known: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::Config(format!(
                "[job.codecs.tables] names `{name}`, which is not a table of this job ({})",
                known.join(", ")
            )));
        }
        for t in tables {
            t.codecs = self.of(&t.name);
        }
        Ok(())
    }

    /// One line for a run summary: `push int8, pull fp16; embeddings: push
    /// top_k 0.1` (and whether error feedback is off).
    pub fn describe(&self) -> String {
        let mut out = format!("push {}, pull {}", self.push, self.pull);
        for (name, t) in &self.tables {
            let mut parts = Vec::new();
            if let Some(c) = t.push {
                parts.push(format!("push {c}"));
            }
            if let Some(c) = t.pull {
                parts.push(format!("pull {c}"));
            }
            out += &format!("; {name}: {}", parts.join(", "));
        }
        if !self.error_feedback && !self.is_plain() {
            out += " (no error feedback)";
        }
        out
    }

    fn is_default(&self) -> bool {
        *self == CodecConfig::default()
    }

    /// Whether every table moves f32 both ways.
    pub fn is_plain(&self) -> bool {
        self.push == Codec::F32
            && self.pull == Codec::F32
            && self
                .tables
                .values()
                .all(|t| t.push.is_none_or(|c| c == Codec::F32) && t.pull.is_none_or(|c| c == Codec::F32))
    }
}

mod defaults {
    use super::*;
    pub fn epochs() -> u32 {
        10
    }
    pub fn batch_size() -> usize {
        32
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn optimizer() -> OptimizerConfig {
        Rule::adam(1e-3).into()
    }
    pub fn lease_ms() -> u64 {
        5_000
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> u32 {
        1
    }
    pub fn progress_every_ms() -> u64 {
        500
    }
    pub fn range_batches() -> u32 {
        8
    }
    pub fn is_range_batches(n: &u32) -> bool {
        *n == range_batches()
    }
}

/// The model and data of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Workload {
    /// A dense ReLU MLP with softmax cross-entropy on MNIST.
    MnistMlp {
        #[serde(default = "mnist_dir")]
        data_dir: PathBuf,
        #[serde(default = "mnist_layers")]
        layers: Vec<usize>,
        /// Dense chunk length in elements.
        #[serde(default = "chunk_len")]
        chunk_len: u32,
        /// Start from this model file's weights (an f32 MLP of `layers`,
        /// e.g. a pruned one) instead of the initializer: the tables then
        /// hold the change from them (see `workload::mnist`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_from: Option<PathBuf>,
        /// With `init_from`: the weights that are zero in it stay exactly
        /// zero (a pruning mask; their gradients are not sent).
        #[serde(default, skip_serializing_if = "is_false")]
        keep_zeros: bool,
        /// Train against a teacher's soft targets as well as the labels
        /// (knowledge distillation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        teacher: Option<TeacherConfig>,
    },
    /// Sparse logistic regression on a9a (LIBSVM): one weight per feature in
    /// a sparse table, the bias under key `num_features`.
    A9aLogreg {
        #[serde(default = "a9a_train")]
        train: PathBuf,
        #[serde(default = "a9a_test")]
        test: PathBuf,
        #[serde(default = "a9a_features")]
        num_features: usize,
    },
    /// Biased matrix factorization on a MovieLens 100k split.
    MovielensMf {
        /// Holds `{split}.base` and `{split}.test`, gzipped or plain.
        #[serde(default = "movielens_dir")]
        data_dir: PathBuf,
        #[serde(default = "movielens_split")]
        split: String,
        /// Embedding width k.
        #[serde(default = "mf_dim")]
        dim: u32,
        /// L2 penalty on every touched row, per rating.
        #[serde(default = "mf_reg")]
        reg: f32,
        /// Standard deviation of the initial factors.
        #[serde(default = "mf_init_std")]
        init_std: f32,
    },
    /// Synthetic CTR: Zipf-distributed categorical slots hashed into a
    /// sparse embedding table, feeding a small MLP.
    Ctr(CtrConfig),
}

/// The teacher of a distilled MNIST model (`[job.workload.teacher]`):
/// loss = `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// The teacher's model file (an f32 MLP on the same inputs and classes).
    pub model: PathBuf,
    /// The softmax temperature T of both teacher and student in the soft term.
    #[serde(default = "teacher_temperature")]
    pub temperature: f32,
    /// The weight of the soft term, in [0, 1].
    #[serde(default = "teacher_alpha")]
    pub alpha: f32,
}

fn teacher_temperature() -> f32 {
    4.0
}

fn teacher_alpha() -> f32 {
    0.7
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The settings of the synthetic CTR workload (`kind = "ctr"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtrConfig {
    #[serde(default = "ctr_slots")]
    pub slots: usize,
    /// Keys are `splitmix64(slot, id) mod key_space`.
    #[serde(default = "ctr_key_space")]
    pub key_space: u64,
    /// Zipf exponent of the ids of every slot (ids in `1..=key_space`).
    #[serde(default = "ctr_zipf_exponent")]
    pub zipf_exponent: f64,
    /// Fresh examples per epoch, over all workers.
    #[serde(default = "ctr_rows_per_epoch")]
    pub rows_per_epoch: usize,
    /// Held-out examples for evaluation.
    #[serde(default = "ctr_test_rows")]
    pub test_rows: usize,
    #[serde(default = "ctr_emb_dim")]
    pub emb_dim: u32,
    /// Hidden layer widths of the MLP over the concatenated embeddings.
    #[serde(default = "ctr_hidden")]
    pub hidden: Vec<usize>,
    /// Rule of the embedding table (default: the job's optimizer).
    #[serde(default)]
    pub embedding_optimizer: Option<OptimizerConfig>,
}

fn a9a_train() -> PathBuf {
    PathBuf::from("data/a9a/a9a.gz")
}

fn a9a_test() -> PathBuf {
    PathBuf::from("data/a9a/a9a.t.gz")
}

fn a9a_features() -> usize {
    123
}

fn movielens_dir() -> PathBuf {
    PathBuf::from("../shared/data/ml-100k")
}

fn movielens_split() -> String {
    "u1".into()
}

fn mf_dim() -> u32 {
    32
}

fn mf_reg() -> f32 {
    0.02
}

fn mf_init_std() -> f32 {
    0.1
}

fn ctr_slots() -> usize {
    26
}

fn ctr_key_space() -> u64 {
    1 << 24
}

fn ctr_zipf_exponent() -> f64 {
    1.05
}

fn ctr_rows_per_epoch() -> usize {
    1_000_000
}

fn ctr_test_rows() -> usize {
    20_000
}

fn ctr_emb_dim() -> u32 {
    8
}

fn ctr_hidden() -> Vec<usize> {
    vec![64]
}

fn mnist_dir() -> PathBuf {
    PathBuf::from("data/mnist")
}

fn mnist_layers() -> Vec<usize> {
    vec![784, 64, 64, 10]
}

fn chunk_len() -> u32 {
    ps_common::spec::DEFAULT_CHUNK_LEN
}

/// Which workers are slowed, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Straggler {
    /// Each iteration of the listed workers takes `factor` times as long
    /// (the worker sleeps `factor - 1` times its own iteration time).
    Factor { workers: Vec<usize>, factor: f64 },
    /// After each iteration, the listed workers sleep with probability
    /// `probability` for an exponentially distributed time of mean `mean_ms`.
    Random { workers: Vec<usize>, probability: f64, mean_ms: f64 },
}

impl RunConfig {
    pub fn from_toml(text: &str) -> Result<RunConfig> {
        let config: RunConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.cluster.servers == 0 || self.cluster.workers == 0 {
            return bad("cluster needs at least one server and one worker".into());
        }
        if self.cluster.servers > MAX_PROCESSES || self.cluster.workers > MAX_PROCESSES {
            return bad(format!(
                "cluster servers and workers must be at most {MAX_PROCESSES}, got {} and {}",
                self.cluster.servers, self.cluster.workers
            ));
        }
        self.checkpoint.validate()?;
        self.job.validate()
    }

    /// What a checkpoint of this run must match to be resumed by it: the
    /// cluster's shape and the job, less what only says how long or how
    /// verbosely to train (epochs, max_iters, progress and evaluation
    /// cadence, client timeouts). SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        let job = JobConfig {
            epochs: 0,
            max_iters: None,
            progress_every_ms: 0,
            eval_every_epochs: 0,
            client: ClientOptions::default(),
            ..self.job.clone()
        };
        #[derive(Serialize)]
        struct Identity<'a> {
            cluster: &'a ClusterConfig,
            job: JobConfig,
        }
        // How the processes talk, and where they run, is not the job.
        let cluster = ClusterConfig { plaintext: false, pin_cpus: false, ..self.cluster.clone() };
        let text = toml::to_string(&Identity { cluster: &cluster, job }).unwrap_or_default();
        format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
    }
}

impl JobConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return bad(format!("batch_size must be 1..={MAX_BATCH_SIZE}, got {}", self.batch_size));
        }
        if self.lease_ms < 100 {
            return bad(format!("lease_ms must be at least 100, got {}", self.lease_ms));
        }
        self.optimizer.validate()?;
        self.client.validate()?;
        if self.range_batches == 0 {
            return bad("range_batches must be positive".into());
        }
        if self.backup.workers > 0 {
            if self.consistency.bound().is_none() {
                return bad("backup workers need BSP or SSP (under ASP no read waits for anyone)".into());
            }
            if self.data != DataAssignment::Dynamic {
                return bad(
                    "backup workers need data = \"dynamic\": a late worker's clock jumps ahead, so it \
                     no longer names a position in a fixed share of the data"
                        .into(),
                );
            }
        }
        self.codecs.validate()?;
        if self.pipeline {
            if self.consistency.bound().is_some() {
                return bad("pipeline needs ASP: it computes a batch on weights that miss this worker's \
                            last push, fresher reads than BSP and SSP promise"
                    .into());
            }
            if !self.overlap
                || self.data != DataAssignment::Fixed
                || !matches!(self.workload, Workload::MnistMlp { .. })
            {
                return bad(
                    "pipeline needs overlap = true, fixed data shares and the mnist_mlp workload".into()
                );
            }
        }
        match &self.workload {
            Workload::MnistMlp { layers, chunk_len, init_from, keep_zeros, teacher, .. } => {
                if *keep_zeros && init_from.is_none() {
                    return bad("keep_zeros needs init_from (the model whose zeros are kept)".into());
                }
                if let Some(t) = teacher
                    && !(t.temperature.is_finite() && t.temperature > 0.0 && (0.0..=1.0).contains(&t.alpha))
                {
                    return bad(format!(
                        "teacher temperature must be > 0 and alpha in [0, 1], got {} and {}",
                        t.temperature, t.alpha
                    ));
                }
                if layers.len() < 2
                    || layers.contains(&0)
                    || layers[0] != 784
                    || *layers.last().unwrap_or(&0) != 10
                {
                    return bad(format!(
                        "mnist layers must start at 784, end at 10, all positive: {layers:?}"
                    ));
                }
                check_dense(layers, self.batch_size).map_err(|e| Error::Config(format!("mnist {e}")))?;
                if *chunk_len == 0 {
                    return bad("chunk_len must be positive".into());
                }
            }
            Workload::A9aLogreg { num_features, .. } => {
                if *num_features == 0 || *num_features > MAX_FEATURES {
                    return bad(format!("num_features must be 1..={MAX_FEATURES}, got {num_features}"));
                }
            }
            Workload::MovielensMf { split, dim, reg, init_std, .. } => {
                if split.is_empty() || split.contains(['/', '\\']) {
                    return bad(format!("split must be a file stem like \"u1\", got {split:?}"));
                }
                if *dim == 0 || *dim > 1 << 16 {
                    return bad(format!("dim must be 1..=65536, got {dim}"));
                }
                // A batch pulls a user row and an item row per rating.
                if self.batch_size.saturating_mul(2 * *dim as usize) > MAX_DENSE_PARAMS {
                    return bad(format!(
                        "batch_size {} with dim {dim} pulls more than {MAX_DENSE_PARAMS} values a batch",
                        self.batch_size
                    ));
                }
                if !(reg.is_finite() && *reg >= 0.0 && init_std.is_finite() && *init_std >= 0.0) {
                    return bad(format!(
                        "reg and init_std must be finite and >= 0, got {reg} and {init_std}"
                    ));
                }
            }
            Workload::Ctr(CtrConfig {
                slots,
                key_space,
                zipf_exponent,
                rows_per_epoch,
                test_rows,
                emb_dim,
                hidden,
                embedding_optimizer,
            }) => {
                if *slots == 0 || *slots > 1 << 16 {
                    return bad(format!("slots must be 1..=65536, got {slots}"));
                }
                if *key_space == 0 || *key_space > 1 << 48 {
                    return bad(format!("key_space must be 1..=2^48, got {key_space}"));
                }
                if !(zipf_exponent.is_finite() && *zipf_exponent >= 0.0) {
                    return bad(format!("zipf_exponent must be finite and >= 0, got {zipf_exponent}"));
                }
                if !(1..=MAX_SYNTHETIC_ROWS).contains(rows_per_epoch)
                    || !(1..=MAX_SYNTHETIC_ROWS).contains(test_rows)
                {
                    return bad(format!(
                        "rows_per_epoch and test_rows must be 1..={MAX_SYNTHETIC_ROWS}, got {rows_per_epoch} and \
                         {test_rows}"
                    ));
                }
                if *emb_dim == 0 || *emb_dim > 1 << 16 || hidden.contains(&0) {
                    return bad(format!(
                        "emb_dim must be 1..=65536 and hidden widths positive: {emb_dim}, {hidden:?}"
                    ));
                }
                let tower: Vec<usize> = std::iter::once(slots * *emb_dim as usize)
                    .chain(hidden.iter().copied())
                    .chain([1])
                    .collect();
                check_dense(&tower, self.batch_size)
                    .map_err(|e| Error::Config(format!("the ctr tower (slots x emb_dim, hidden, 1): {e}")))?;
                if let Some(o) = embedding_optimizer {
                    o.rule.validate()?;
                }
            }
        }
        // Bounded so that a sleep they make is a `Duration` (1e300 panicked).
        match &self.straggler {
            Some(Straggler::Factor { factor, .. })
                if !(*factor >= 1.0 && *factor <= MAX_STRAGGLER_FACTOR) =>
            {
                bad(format!("straggler factor must be in [1, {MAX_STRAGGLER_FACTOR}], got {factor}"))
            }
            Some(Straggler::Random { probability, mean_ms, .. })
                if !((0.0..=1.0).contains(probability)
                    && *mean_ms >= 0.0
                    && *mean_ms <= MAX_SECONDS * 1e3) =>
            {
                bad(format!(
                    "random straggler needs probability in [0, 1] and mean_ms in [0, {}], got {probability} and \
                     {mean_ms}",
                    MAX_SECONDS * 1e3
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "[job]\nworkload = { kind = \"mnist_mlp\" }\n";

    /// The straggler remedies read from the run file, stay out of a run
    /// file (and its fingerprint) at their defaults, and refuse backup
    /// workers where they mean nothing.
    #[test]
    fn straggler_remedies_parse_and_validate() {
        let plain = RunConfig::from_toml(RUN).unwrap();
        let written = toml::to_string(&plain).unwrap();
        for key in ["data", "range_batches", "backup", "delay_compensation"] {
            let named = |l: &str| l.split([' ', '=']).next() == Some(key) || l.contains(&format!(".{key}]"));
            assert!(!written.lines().any(named), "{key} written at its default: {written}");
        }
        let text = "[job]\nworkload = { kind = \"mnist_mlp\" }\ndata = \"dynamic\"\nrange_batches = 4\n\
                    consistency = { model = \"bsp\" }\nbackup = { workers = 1, late = \"weight\" }\n\
                    optimizer = { rule = \"sgd\", lr = 0.1, delay_compensation = { lambda = 2.0, adaptive = true } }\n";
        let c = RunConfig::from_toml(text).unwrap();
        assert_eq!((c.job.data, c.job.range_batches), (DataAssignment::Dynamic, 4));
        assert_eq!(c.job.backup, Backup { workers: 1, late: ps_common::spec::LateGradients::Weight });
        let dc = c.job.optimizer.delay_compensation.expect("DC-ASGD");
        assert!(dc.adaptive && dc.lambda == 2.0 && dc.momentum == 0.95, "{dc:?}");
        assert_ne!(c.fingerprint(), plain.fingerprint());
        for (bad, why) in [
            (text.replace("\"dynamic\"", "\"fixed\""), "dynamic"),
            (text.replace("\"bsp\"", "\"asp\""), "BSP or SSP"),
            (text.replace("range_batches = 4", "range_batches = 0"), "range_batches"),
            (text.replace("lambda = 2.0", "lambda = -1.0"), "lambda"),
        ] {
            let err = RunConfig::from_toml(&bad).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    /// Absurd sizes and times in a run file are clear errors, not a panic
    /// (a `Duration` of 1e300 s, a layer product that overflows) or an
    /// allocation sized by them (2^40-wide layers, 2^62 synthetic rows, 4e9
    /// features, 4e9 processes): each of these was accepted.
    /// `pipeline` reads from the run file, stays out of it (and its
    /// fingerprint) when off, and is refused where it would break a promise
    /// or do nothing.
    #[test]
    fn pipeline_is_asp_and_mnist_only() {
        let plain = RunConfig::from_toml(RUN).unwrap();
        assert!(!toml::to_string(&plain).unwrap().contains("pipeline"));
        let text = format!("{RUN}pipeline = true\n");
        let c = RunConfig::from_toml(&text).unwrap();
        assert!(c.job.pipeline);
        assert_ne!(c.fingerprint(), plain.fingerprint());
        for (bad, why) in [
            (format!("{text}consistency = {{ model = \"bsp\" }}\n"), "ASP"),
            (format!("{text}consistency = {{ model = \"ssp\", staleness = 3 }}\n"), "ASP"),
            (format!("{text}overlap = false\n"), "overlap"),
            (format!("{text}data = \"dynamic\"\n"), "fixed data"),
            (text.replace("mnist_mlp\" }", "a9a_logreg\", num_features = 123 }"), "mnist_mlp"),
        ] {
            let err = RunConfig::from_toml(&bad).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn absurd_sizes_and_times_are_refused() {
        let ctr = "[job]\nworkload = { kind = \"ctr\" }\n";
        let cases = [
            (format!("[checkpoint]\nevery_s = 1e300\n{RUN}"), "every_s"),
            (format!("[cluster]\nservers = 4000000000\n{RUN}"), "at most 1024"),
            (format!("[cluster]\nworkers = 100000\n{RUN}"), "at most 1024"),
            (format!("{RUN}straggler = {{ kind = \"factor\", workers = [0], factor = 1e300 }}\n"), "factor"),
            (
                format!(
                    "{RUN}straggler = {{ kind = \"random\", workers = [0], probability = 1.0, mean_ms = 1e300 }}\n"
                ),
                "mean_ms",
            ),
            (RUN.replace("\" }", &format!("\", layers = [784, {}, 10] }}", 1u64 << 40)), "parameters"),
            (RUN.replace("\" }", &format!("\", layers = [784, {}, 10] }}", 1u64 << 62)), "parameters"),
            (format!("{RUN}batch_size = {}\n", 1u64 << 40), "batch_size"),
            (
                format!(
                    "[job]\nbatch_size = {MAX_BATCH_SIZE}\nworkload = {{ kind = \"movielens_mf\", dim = 65536 }}\n"
                ),
                "a batch",
            ),
            (
                format!("{RUN}batch_size = {MAX_BATCH_SIZE}\n")
                    .replace("\" }", "\", layers = [784, 4096, 10] }"),
                "activations",
            ),
            (
                "[job]\nworkload = { kind = \"a9a_logreg\", num_features = 4000000000 }\n".into(),
                "num_features",
            ),
            (ctr.replace("\" }", "\", hidden = [1099511627776] }"), "parameters"),
            (ctr.replace("\" }", &format!("\", rows_per_epoch = {} }}", 1u64 << 62)), "rows_per_epoch"),
            (ctr.replace("\" }", &format!("\", test_rows = {} }}", 1u64 << 62)), "test_rows"),
            (ctr.replace("\" }", "\", slots = 65536, emb_dim = 65536 }"), "parameters"),
        ];
        for (text, why) in cases {
            match RunConfig::from_toml(&text) {
                Err(Error::Config(e)) => assert!(e.contains(why), "{text}: {e}"),
                other => panic!("{text}: {:?}", other.map(|_| ())),
            }
        }
        // The defaults and the largest accepted values still pass.
        for text in [
            RUN.to_string(),
            ctr.to_string(),
            format!("[checkpoint]\nevery_s = {MAX_SECONDS}\n{RUN}"),
            format!(
                "{RUN}straggler = {{ kind = \"factor\", workers = [0], factor = {MAX_STRAGGLER_FACTOR} }}\n"
            ),
        ] {
            RunConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    /// Codecs at their default are not written, so an f32 job's run file and
    /// fingerprint are those of a job from before codecs; codecs change both.
    #[test]
    fn default_codecs_leave_the_run_file_and_fingerprint_alone() {
        let plain = RunConfig::from_toml(RUN).unwrap();
        assert!(!toml::to_string(&plain).unwrap().contains("codecs"));
        let text = format!("{RUN}[job.codecs]\npush = {{ codec = \"int8\" }}\n");
        let int8 = RunConfig::from_toml(&text).unwrap();
        assert_eq!(int8.job.codecs.of("fc1.weight").push, Codec::Int8 { stochastic: false });
        assert_ne!(plain.fingerprint(), int8.fingerprint());
        let back = RunConfig::from_toml(&toml::to_string(&int8).unwrap()).unwrap();
        assert_eq!(back, int8, "written and read back");
        let unknown = format!("{RUN}[job.codecs.tables.nope]\npush = {{ codec = \"fp16\" }}\n");
        let mut tables =
            vec![TableSpec::sparse("e", 2, ps_common::spec::Init::zeros(), Rule::sgd(0.1).into())];
        let err = RunConfig::from_toml(&unknown).unwrap().job.codecs.apply(&mut tables).unwrap_err();
        assert!(err.to_string().contains("`nope`, which is not a table of this job (e)"), "{err}");
        let pull_int8 = format!("{RUN}[job.codecs]\npull = {{ codec = \"int8\" }}\n");
        assert!(RunConfig::from_toml(&pull_int8).is_err(), "pulls travel in f32, fp16 or bf16");
    }
}
