//! `ps-cluster export` and `ps-cluster models export`: a run folder's or a
//! registered version's model as safetensors with a model card
//! ([`ps_model::export`]; the layout is in docs/EXPORT.md).
//!
//! From a run folder ([`export_run`]), the model comes from `model.msgpack`,
//! the metrics from `summary.json`, and the run file from `config.toml`,
//! which goes into the card verbatim and says which data the model was
//! trained on (hence its preprocessing). From the registry
//! ([`export_version`]), the same come from the version: its checked
//! artifact, its recorded metrics and its lineage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ps_model::SavedModel;
use ps_model::export::{CardExtra, ExportPaths, RunInfo};
use ps_registry::{ModelVersion, Registry};
use ps_worker::config::{RunConfig, Workload};

use crate::artifact::{JsonFile, RunSummary};

/// The model file of a run folder.
pub const MODEL_FILE: &str = "model.msgpack";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] ps_model::Error),
    #[error(transparent)]
    Artifact(#[from] crate::artifact::Error),
    #[error("{path}: {source}")]
    Config { path: String, source: ps_worker::Error },
    #[error(transparent)]
    Registry(#[from] ps_registry::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exports the model of `run_dir` into `out` (default `run_dir/export`).
pub fn export_run(run_dir: &Path, out: Option<&Path>) -> Result<ExportPaths> {
    let model = SavedModel::read(&run_dir.join(MODEL_FILE))?;
    let summary = RunSummary::read(run_dir)?;
    let config_path = run_dir.join("config.toml");
    let config_toml = std::fs::read_to_string(&config_path)
        .map_err(|source| Error::Io { what: format!("reading {}", config_path.display()), source })?;
    let config = RunConfig::from_toml(&config_toml)
        .map_err(|source| Error::Config { path: config_path.display().to_string(), source })?;
    let extra = CardExtra {
        preprocessing: data_preprocessing(&config.job.workload),
        metrics: BTreeMap::from([
            (format!("test_{}", summary.score_name), summary.test_score),
            ("test_loss".to_string(), summary.test_loss),
        ]),
        run: Some(RunInfo { run_dir: run_dir.display().to_string(), config_toml }),
    };
    let out = out.map_or_else(|| run_dir.join("export"), PathBuf::from);
    Ok(ps_model::export::export(&model, extra, &out)?)
}

/// Exports registered version `v` into `out`. The model is read through
/// [`Registry::load`], which re-hashes the artifact, so a missing or altered
/// one is an error and nothing is written. The card gets the version's
/// recorded metrics, and its run folder and run file from the lineage.
pub fn export_version(reg: &Registry, v: &ModelVersion, out: &Path) -> Result<ExportPaths> {
    let model = reg.load(v)?;
    let lineage = &v.lineage;
    // A run file this build no longer parses only costs the data's
    // preprocessing lines; the card still holds the file verbatim.
    let config = lineage.run_config.as_deref().and_then(|text| match RunConfig::from_toml(text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(model = %v.model, version = v.version, "run config not read: {e}");
            None
        }
    });
    let run = (lineage.source_run.is_some() || lineage.run_config.is_some()).then(|| RunInfo {
        run_dir: lineage.source_run.clone().unwrap_or_default(),
        config_toml: lineage.run_config.clone().unwrap_or_default(),
    });
    let extra = CardExtra {
        preprocessing: config.map(|c| data_preprocessing(&c.job.workload)).unwrap_or_default(),
        metrics: v.metrics.clone(),
        run,
    };
    Ok(ps_model::export::export(&model, extra, out)?)
}

/// How the workload's loader turns its files into the model's input.
fn data_preprocessing(workload: &Workload) -> Vec<String> {
    let line = match workload {
        Workload::MnistMlp { .. } => {
            "MNIST (IDX files): the 28x28 image row by row as 784 f32, each pixel byte / 255 \
             (in [0, 1]); no other normalization; labels are the digits 0..9"
        }
        Workload::A9aLogreg { .. } => {
            "LIBSVM: index i of a line (1-based) is feature i - 1, with the line's value; \
             label +1 is 1, -1 or 0 is 0"
        }
        Workload::MovielensMf { .. } => "MovieLens (u.data format): user and item ids as in the file",
        Workload::Ctr(_) => "synthetic: ids drawn per slot by ps-worker's CTR generator",
    };
    vec![line.to_string()]
}
