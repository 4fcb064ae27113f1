//! The run file: one TOML document with a `[cluster]` table (read by the
//! launcher) and a `[job]` table (read by every worker). See
//! `examples/config/*.toml` for commented examples; a test parses each.

use std::path::PathBuf;

use ps_common::optim::Rule;
use ps_common::spec::{Consistency, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub job: JobConfig,
}

/// How many processes the launcher starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub servers: u32,
    pub workers: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { servers: 2, workers: 2 }
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
    /// Minimum time between progress events.
    #[serde(default = "defaults::progress_every_ms")]
    pub progress_every_ms: u64,
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
    pub fn one() -> u32 {
        1
    }
    pub fn progress_every_ms() -> u64 {
        500
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
    },
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
        self.job.validate()
    }
}

impl JobConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        if self.lease_ms < 100 {
            return bad(format!("lease_ms must be at least 100, got {}", self.lease_ms));
        }
        self.optimizer.rule.validate()?;
        match &self.workload {
            Workload::MnistMlp { layers, chunk_len, .. } => {
                if layers.len() < 2 || layers.iter().any(|&n| n == 0) || layers[0] != 784 || *layers.last().unwrap_or(&0) != 10 {
                    return bad(format!("mnist layers must start at 784, end at 10, all positive: {layers:?}"));
                }
                if *chunk_len == 0 {
                    return bad("chunk_len must be positive".into());
                }
            }
        }
        match &self.straggler {
            Some(Straggler::Factor { factor, .. }) if !(factor.is_finite() && *factor >= 1.0) => {
                bad(format!("straggler factor must be >= 1, got {factor}"))
            }
            Some(Straggler::Random { probability, mean_ms, .. })
                if !((0.0..=1.0).contains(probability) && mean_ms.is_finite() && *mean_ms >= 0.0) =>
            {
                bad("random straggler needs probability in [0, 1] and mean_ms >= 0".into())
            }
            _ => Ok(()),
        }
    }
}
