//! `ps-cluster models`: the model registry ([`ps_registry`]) from the
//! command line, and the registration of a run folder, by hand (`models
//! register RUN_DIR`) or by [`crate::run`] when training ends.
//!
//! ```text
//! ps-cluster models list [MODEL]
//! ps-cluster models show VERSION              # metrics, lineage, labels; checks the artifact
//! ps-cluster models quantize MODEL:N          (int8 version, parent N)
//! ps-cluster models prune MODEL:N --sparsity 0.8 [--fine-tune-epochs 1]
//! ps-cluster models distill MODEL:N --hidden 32 --temperature 4 --alpha 0.7 --epochs 10
//! ps-cluster models register RUN_DIR [--name N] [--parent V] [--checkpoint ID]
//! ps-cluster models register RUN_DIR/checkpoints/ckpt-N [--name N] [--parent V]
//! ps-cluster models promote VERSION --to production
//! ps-cluster models rollback [MODEL@]production
//! ps-cluster models history [MODEL] [--label L]
//! ps-cluster models diff VERSION VERSION     # metrics and run config side by side
//! ps-cluster models export VERSION [--name N] --format safetensors [--out DIR]
//! ```
//!
//! VERSION is `MODEL:N`, `MODEL@LABEL`, `MODEL` (its latest version), `N` or
//! `@LABEL`; without a model name, the registry's only model is meant.
//!
//! A checkpoint has no model file: registering one restores its shards in
//! this process and evaluates the run's job on them ([`from_checkpoint`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use ps_registry::{Lineage, ModelVersion, NewVersion, Registry, location};
use ps_worker::config::{RegistryConfig, RunConfig, Workload};

use crate::artifact::{JsonFile as _, RunSummary};

/// Where the registry is: `--registry URL` / `$PS_REGISTRY` and
/// `--registry-root DIR` / `$PS_REGISTRY_ROOT`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Registry database: sqlite://PATH or postgres://USER@HOST:PORT/DATABASE
    /// [default: sqlite://<registry-root>/registry.db].
    #[arg(long, env = "PS_REGISTRY", global = true)]
    registry: Option<String>,
    /// Folder of the registry's artifacts (and of its default SQLite file).
    #[arg(long, env = "PS_REGISTRY_ROOT", global = true, default_value = "registry")]
    registry_root: PathBuf,
    /// The registry's keys: a folder with verify.pub (signing.key to
    /// register, encryption.key for encrypted artifacts)
    /// [default: <registry-root>/keys/, made for a new registry].
    #[arg(long, env = "PS_REGISTRY_KEYS", value_name = "DIR", conflicts_with = "no_seal", global = true)]
    pub registry_keys: Option<PathBuf>,
    /// Write and read registry artifacts unsigned (a registry without keys).
    #[arg(long, env = "PS_REGISTRY_NO_SEAL", global = true)]
    pub no_seal: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// List versions with their labels and test metrics.
    List {
        /// Only this model's versions.
        model: Option<String>,
    },
    /// One version in full: metrics, lineage, labels; checks its artifact.
    Show {
        /// MODEL:N, MODEL@LABEL or MODEL (its latest version).
        version: String,
        /// Also print the run file it was trained with.
        #[arg(long)]
        config: bool,
    },
    /// Register the model of a run folder (model.msgpack, summary.json,
    /// config.toml), or of a checkpoint in one (RUN_DIR/checkpoints/ckpt-N:
    /// its shards are restored in-process and the run's job evaluates them).
    Register {
        /// A run folder, or a checkpoint folder (with manifest.json) inside one.
        path: PathBuf,
        /// Model name [default: the run file's [registry] name, else the workload kind].
        #[arg(long)]
        name: Option<String>,
        /// The version this model was fine-tuned or compressed from.
        #[arg(long)]
        parent: Option<i64>,
        /// The checkpoint a run folder's model came from (path or id).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Who registers [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Point a label (staging, production, or any alias) at a version.
    Promote {
        /// MODEL:N, MODEL@LABEL or MODEL (its latest version).
        version: String,
        /// The label: staging, production, or any alias (lowercase).
        #[arg(long)]
        to: String,
        /// Who moves it [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Move a label back to the version it pointed to before its last move.
    Rollback {
        /// `[MODEL@]LABEL`.
        label: String,
        /// Who moves it [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Every move of a model's labels, oldest first.
    History {
        /// [default: the registry's only model]
        model: Option<String>,
        /// Only this label's moves.
        #[arg(long)]
        label: Option<String>,
    },
    /// Metrics and run config of two versions side by side.
    Diff {
        /// MODEL:N, MODEL@LABEL or MODEL (its latest version).
        a: String,
        b: String,
    },
    /// Write a version's model in another format (docs/EXPORT.md), with a
    /// model card of its metrics and run; a damaged artifact is refused.
    Export {
        /// MODEL:N, MODEL@LABEL, MODEL (its latest version), N or @LABEL.
        version: String,
        /// The model, when VERSION is `N` or `@LABEL`.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Output folder [default: export/MODEL-N].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Quantize an MLP version to int8 (post-training, a scale per output
    /// channel; served in int8 by ps-serve), evaluate it on the MNIST test
    /// set, and register it as a new version whose parent is VERSION.
    Quantize {
        /// MODEL:N, MODEL@LABEL or MODEL (its latest version).
        version: String,
        /// The MNIST folder of the test set.
        #[arg(long, default_value = "data/mnist")]
        mnist: PathBuf,
        /// Who registers [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Prune an MLP version by weight magnitude (each layer's smallest
    /// weights set to zero), fine-tune it on a local cluster with the zeros
    /// kept (the parent's run file, starting from the pruned weights), and
    /// register it, stored sparsely, as a new version whose parent is
    /// VERSION. ps-serve runs it with a sparse forward pass.
    Prune {
        /// MODEL:N, MODEL@LABEL or MODEL (its latest version).
        version: String,
        /// Fraction of each layer's weights set to zero, in [0, 1).
        #[arg(long)]
        sparsity: f64,
        /// Epochs of fine-tuning (0: register the pruned weights as they are).
        #[arg(long, default_value_t = 1)]
        fine_tune_epochs: u32,
        /// The MNIST folder of the test set.
        #[arg(long, default_value = "data/mnist")]
        mnist: PathBuf,
        #[command(flatten)]
        train: TrainOn,
    },
    /// Train a smaller MLP (the student) on a local cluster against VERSION's
    /// soft targets at a temperature plus the labels (the parent's run file,
    /// with the student's layers), and register it as a new version whose
    /// parent is VERSION (the teacher).
    Distill {
        /// The teacher: MODEL:N, MODEL@LABEL or MODEL (its latest version).
        version: String,
        /// The student's hidden layer widths, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "32")]
        hidden: Vec<usize>,
        /// Softmax temperature T of the soft term.
        #[arg(long, default_value_t = 4.0)]
        temperature: f32,
        /// Weight of the soft term: loss = alpha T^2 KL + (1 - alpha) CE.
        #[arg(long, default_value_t = 0.7)]
        alpha: f32,
        /// Epochs of training [default: the parent's run file's].
        #[arg(long)]
        epochs: Option<u32>,
        #[command(flatten)]
        train: TrainOn,
    },
}

/// Pruning and distillation options.
#[derive(clap::Args, Debug)]
struct TrainOn {
    /// Where the training run's folder is created.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Shard and worker processes of the training run [default: the parent's run file's].
    #[arg(long)]
    servers: Option<u32>,
    #[arg(long)]
    workers: Option<u32>,
    /// Who registers [default: $USER].
    #[arg(long)]
    by: Option<String>,
}

/// The formats `models export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ExportFormat {
    /// model.safetensors + card.json (docs/EXPORT.md).
    Safetensors,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (url, root) = location(args.registry, Some(args.registry_root));
    let keys = ps_registry::keys_choice(args.registry_keys.as_deref(), args.no_seal);
    let reg = Registry::open_with(&url, &root, keys)
        .await
        .with_context(|| format!("opening the registry {url}"))?;
    let result = command(&reg, args.command).await;
    reg.close().await;
    result
}

async fn command(reg: &Registry, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { model } => print!("{}", list(reg, model.as_deref()).await?),
        Command::Show { version, config } => return show(reg, &version, config).await,
        Command::Register { path, name, parent, checkpoint, by } => {
            let by = by.unwrap_or_else(user);
            let is_checkpoint = path.join(ps_server::checkpoint::MANIFEST).exists();
            let mut new = if is_checkpoint {
                if checkpoint.is_some() {
                    bail!(
                        "{} is a checkpoint, recorded as the version's own: leave out --checkpoint",
                        path.display()
                    );
                }
                from_checkpoint(&path, name.as_deref(), &by).await?
            } else {
                let mut new = from_run(&path, name.as_deref(), &by)?;
                new.lineage.checkpoint = checkpoint;
                new
            };
            new.lineage.parent_version = parent;
            let v = reg.register(new).await?;
            println!("registered {}:{} (sha256 {})", v.model, v.version, v.artifact.sha256);
            if is_checkpoint {
                println!("  evaluated from {}: {}", path.display(), test_metrics(&v));
            }
        }
        Command::Quantize { version, mnist, by } => {
            let parent = resolve(reg, &version).await?;
            let model = ps_model::quant::quantize_mlp(&reg.load(&parent)?)
                .with_context(|| format!("quantizing {}:{}", parent.model, parent.version))?;
            let test = ps_worker::data::load_mnist(&mnist, ps_worker::data::Split::Test)
                .with_context(|| format!("reading the MNIST test set in {}", mnist.display()))?;
            let metrics = int8_metrics(&model, &test)?;
            let lineage = Lineage {
                parent_version: Some(parent.version),
                method: Some(INT8_METHOD.into()),
                ..parent.lineage.clone()
            };
            let artifact = model.to_bytes()?;
            let new = NewVersion {
                model: parent.model.clone(),
                artifact,
                metrics,
                lineage,
                created_by: by.unwrap_or_else(user),
            };
            let v = reg.register(new).await?;
            println!(
                "registered {}:{} (int8 of {}:{}): {} bytes against {}; {} against {}",
                v.model,
                v.version,
                parent.model,
                parent.version,
                v.artifact.size,
                parent.artifact.size,
                test_metrics(&v),
                test_metrics(&parent),
            );
        }
        Command::Prune { version, sparsity, fine_tune_epochs, mnist, train } => {
            return prune(reg, &version, sparsity, fine_tune_epochs, &mnist, train).await;
        }
        Command::Distill { version, hidden, temperature, alpha, epochs, train } => {
            return distill(reg, &version, &hidden, temperature, alpha, epochs, train).await;
        }
        Command::Promote { version, to, by } => {
            let v = resolve(reg, &version).await?;
            let m = reg.promote(&v.model, v.version, &to, &by.unwrap_or_else(user)).await?;
            println!("{}@{}: {} -> {}", m.model, m.label, show_from(m.from_version), m.to_version);
        }
        Command::Rollback { label, by } => {
            let (model, label) = match label.split_once('@') {
                Some((m, l)) if !m.is_empty() => (m.to_string(), l.to_string()),
                Some((_, l)) => (only_model(reg).await?, l.to_string()),
                None => (only_model(reg).await?, label),
            };
            let m = reg.rollback(&model, &label, &by.unwrap_or_else(user)).await?;
            println!("{}@{}: {} -> {} (rollback)", m.model, m.label, show_from(m.from_version), m.to_version);
        }
        Command::History { model, label } => {
            let model = match model {
                Some(m) => m,
                None => only_model(reg).await?,
            };
            print!("{}", history(reg, &model, label.as_deref()).await?);
        }
        Command::Diff { a, b } => {
            let (a, b) = (resolve(reg, &a).await?, resolve(reg, &b).await?);
            print!("{}", diff(&a, &b));
        }
        Command::Export { version, name, format: ExportFormat::Safetensors, out } => {
            let v = resolve(reg, &qualify(&version, name.as_deref())?).await?;
            let out = out.unwrap_or_else(|| Path::new("export").join(format!("{}-{}", v.model, v.version)));
            let paths = crate::export::export_version(reg, &v, &out)
                .with_context(|| format!("exporting {}:{}", v.model, v.version))?;
            println!(
                "exported {}:{} to {} and {}",
                v.model,
                v.version,
                paths.model.display(),
                paths.card.display()
            );
        }
    }
    Ok(())
}

/// VERSION with `--name` as its model: `N` becomes `NAME:N`, `@L` becomes
/// `NAME@L`, and the empty string `NAME`; a VERSION that names another model
/// is refused.
fn qualify(spec: &str, name: Option<&str>) -> anyhow::Result<String> {
    let Some(name) = name else { return Ok(spec.to_string()) };
    let model = spec.split([':', '@']).next().unwrap_or_default();
    Ok(if spec.is_empty() {
        name.to_string()
    } else if spec.starts_with('@') {
        format!("{name}{spec}")
    } else if spec.bytes().all(|b| b.is_ascii_digit()) {
        format!("{name}:{spec}")
    } else if model == name {
        spec.to_string()
    } else {
        bail!("`{spec}` is a version of {model}, not of --name {name}")
    })
}

/// Registers the model of a finished run, as its run file's `[registry]`
/// says. A run without a model (CTR) registers nothing; a failure is a
/// warning, not a failed run: the model is still in the run folder.
pub async fn register_run(config: &RegistryConfig, run_dir: &Path) {
    if !config.register {
        return;
    }
    if !run_dir.join("model.msgpack").exists() {
        tracing::info!(run = %run_dir.display(), "no model.msgpack: nothing to register");
        return;
    }
    let (url, root) = location(config.url.clone(), config.root.clone());
    let result = async {
        let new = from_run(run_dir, config.name.as_deref(), &user())?;
        let reg = Registry::open(&url, &root).await?;
        let v = reg.register(new).await;
        reg.close().await;
        anyhow::Ok(v?)
    }
    .await;
    match result {
        Ok(v) => eprintln!("registered {}:{} in {url}", v.model, v.version),
        Err(e) => tracing::warn!(run = %run_dir.display(), registry = %url, "model not registered: {e:#}"),
    }
}

/// A version from a run folder: its model (checked), metrics from
/// summary.json, and lineage from config.toml (the run file and checksums of
/// the data files it names).
pub fn from_run(run_dir: &Path, name: Option<&str>, by: &str) -> anyhow::Result<NewVersion> {
    let config_path = run_dir.join("config.toml");
    let config_text = ps_common::files::read_text_capped(&config_path, ps_common::files::MAX_TEXT_FILE)
        .with_context(|| {
            format!("reading {} (is {} a run folder?)", config_path.display(), run_dir.display())
        })?;
    let config =
        RunConfig::from_toml(&config_text).with_context(|| format!("in {}", config_path.display()))?;
    let summary = RunSummary::read(run_dir).context("the run has no summary: did it finish?")?;

    let model_path = run_dir.join("model.msgpack");
    let artifact = ps_common::files::read_capped(&model_path, ps_model::saved::MAX_FILE_BYTES)
        .with_context(|| format!("reading {}", model_path.display()))?;
    ps_model::SavedModel::from_bytes(&artifact).map_err(|e| e.in_file(&model_path))?;

    let mut metrics = BTreeMap::from([
        (format!("test_{}", summary.score_name), summary.test_score),
        ("test_loss".to_string(), summary.test_loss),
        ("wall_s".to_string(), summary.wall_s),
        ("samples_per_s".to_string(), summary.samples_per_s),
        ("failed_workers".to_string(), summary.failed.len() as f64),
    ]);
    metrics.retain(|_, v| v.is_finite());
    let name = name.or(config.registry.name.as_deref()).unwrap_or(workload_kind(&config.job.workload));
    Ok(NewVersion {
        model: name.to_string(),
        artifact,
        metrics,
        lineage: Lineage {
            run_config: Some(config_text),
            data_checksums: data_checksums(&config.job.workload),
            source_run: Some(run_dir.display().to_string()),
            checkpoint: None,
            parent_version: None,
            method: None,
        },
        created_by: by.to_string(),
    })
}

/// A version from a checkpoint folder `<run>/checkpoints/ckpt-N`: its shards
/// are started in this process, restored from it, and the run's job
/// (`<run>/config.toml`) evaluates and saves the model they hold. Metrics are
/// that evaluation's; the lineage is the run's, with the checkpoint. A
/// checkpoint taken of another job (its manifest's fingerprint) is refused.
pub async fn from_checkpoint(path: &Path, name: Option<&str>, by: &str) -> anyhow::Result<NewVersion> {
    // The keys of the run the checkpoint belongs to (`<run>/keys/`, if any).
    let keys = (path.ancestors().take(3))
        .find(|d| d.join("config.toml").exists())
        .map(|run| ps_common::seal::KeyPaths::in_dir(&crate::run::keys_dir(run)))
        .unwrap_or_default();
    let ckpt = ps_server::checkpoint::resolve(path, &keys.load()?)?;
    let run_dir = ckpt
        .dir
        .parent()
        .and_then(Path::parent)
        .filter(|run| run.join("config.toml").exists())
        .with_context(|| format!("{} is not a checkpoint inside a run folder", ckpt.dir.display()))?;
    let config_path = run_dir.join("config.toml");
    let config_text = ps_common::files::read_text_capped(&config_path, ps_common::files::MAX_TEXT_FILE)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config =
        RunConfig::from_toml(&config_text).with_context(|| format!("in {}", config_path.display()))?;
    if ckpt.manifest.job.as_deref().is_some_and(|job| job != config.fingerprint()) {
        bail!("{} was taken of another job than {}", ckpt.dir.display(), config_path.display());
    }

    let server =
        ps_server::ServerConfig { restore: Some(ckpt.dir.clone()), seal: keys, ..Default::default() };
    let shards = ps_server::local::LocalShards::start_with(&server, ckpt.manifest.num_shards).await?;
    let mut job = config.job.clone();
    // The shards listen already; one whose restore fails closes its port,
    // which the evaluator need not retry for long (its error is the shard's).
    job.client.connect_within = std::time::Duration::from_secs(5);
    let eval = ps_worker::train::evaluate_job(&job, &shards.addrs).await;
    shards.stop().await.with_context(|| format!("restoring {}", ckpt.dir.display()))?;
    let eval = eval.with_context(|| format!("evaluating {}", ckpt.dir.display()))?;
    let kind = workload_kind(&config.job.workload);
    let model = eval.model.with_context(|| format!("a {kind} job saves no model"))?;

    let mut metrics = BTreeMap::from([
        (format!("test_{}", eval.score_name), eval.score),
        ("test_loss".to_string(), eval.loss),
    ]);
    metrics.retain(|_, v| v.is_finite());
    Ok(NewVersion {
        model: name.or(config.registry.name.as_deref()).unwrap_or(kind).to_string(),
        artifact: model.to_bytes()?,
        metrics,
        lineage: Lineage {
            run_config: Some(config_text),
            data_checksums: data_checksums(&config.job.workload),
            source_run: Some(run_dir.display().to_string()),
            checkpoint: Some(ckpt.dir.display().to_string()),
            parent_version: None,
            method: None,
        },
        created_by: by.to_string(),
    })
}

/// The run file's name of a workload, the default model name.
fn workload_kind(w: &Workload) -> &'static str {
    match w {
        Workload::MnistMlp { .. } => "mnist_mlp",
        Workload::A9aLogreg { .. } => "a9a_logreg",
        Workload::MovielensMf { .. } => "movielens_mf",
        Workload::Ctr(_) => "ctr",
    }
}

/// sha256 of each data file the workload reads, as the run file names it
/// (relative to where training ran). Synthetic data (CTR) has none: its run
/// file's seed is its lineage. A file that cannot be read is left out.
fn data_checksums(w: &Workload) -> BTreeMap<String, String> {
    let files: Vec<PathBuf> = match w {
        Workload::MnistMlp { data_dir, .. } => files_in(data_dir, |_| true),
        Workload::A9aLogreg { train, test, .. } => vec![train.clone(), test.clone()],
        Workload::MovielensMf { data_dir, split, .. } => {
            files_in(data_dir, |name| name.starts_with(&format!("{split}.")))
        }
        Workload::Ctr(_) => vec![],
    };
    files
        .into_iter()
        .filter_map(|f| match ps_registry::store::sha256_file(&f) {
            Ok(sum) => Some((f.display().to_string(), sum)),
            Err(e) => {
                tracing::warn!(file = %f.display(), "data file not checksummed: {e}");
                None
            }
        })
        .collect()
}

fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| keep(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// `$USER`, else `$LOGNAME`, else `unknown`.
/// The `method` of an int8 version's lineage.
const INT8_METHOD: &str =
    "int8: post-training quantization, weights per output channel, activations per example";

/// Test accuracy and loss of an int8 MLP on `test`, as the service computes
/// them (int8 forward pass, softmax).
fn int8_metrics(
    model: &ps_model::SavedModel,
    test: &ps_worker::data::DenseDataset,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let net = ps_model::quant::Int8Mlp::new(model)?;
    served_metrics(test, net.num_classes(), |x, out| net.predict(x, out))
}

/// Test accuracy and loss of the class probabilities `predict` gives for
/// the images of `test`.
fn served_metrics(
    test: &ps_worker::data::DenseDataset,
    classes: usize,
    predict: impl Fn(&[f32], &mut Vec<f32>),
) -> anyhow::Result<BTreeMap<String, f64>> {
    let x = test.x.as_slice().context("MNIST images are row-major")?;
    let mut probs = Vec::new();
    predict(x, &mut probs);
    let (mut correct, mut loss) = (0usize, 0.0f64);
    for (p, &label) in probs.chunks_exact(classes).zip(&test.y) {
        let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        correct += usize::from(best == Some(label as usize));
        loss -= f64::from(p[label as usize].max(1e-30)).ln();
    }
    let n = test.y.len().max(1) as f64;
    Ok(BTreeMap::from([("test_accuracy".into(), correct as f64 / n), ("test_loss".into(), loss / n)]))
}

/// Prunes `spec` to `sparsity`, fine-tunes it with the zeros kept, and
/// registers it stored sparsely (`models prune`).
async fn prune(
    reg: &Registry,
    spec: &str,
    sparsity: f64,
    epochs: u32,
    mnist: &Path,
    on: TrainOn,
) -> anyhow::Result<()> {
    let parent = resolve(reg, spec).await?;
    let mut loaded = reg.load(&parent)?;
    if let ps_model::ModelKind::MlpSparse { .. } = loaded.model {
        loaded = ps_model::prune::densify(&loaded)?;
    }
    let pruned = ps_model::prune::magnitude_prune(&loaded, sparsity)
        .with_context(|| format!("pruning {}:{}", parent.model, parent.version))?;
    let by = on.by.clone().unwrap_or_else(user);
    let (tuned, mut new) = if epochs == 0 {
        let lineage = parent.lineage.clone();
        let new = NewVersion {
            model: parent.model.clone(),
            artifact: Vec::new(),
            metrics: BTreeMap::new(),
            lineage,
            created_by: by,
        };
        (pruned, new)
    } else {
        let layers = match &pruned.model {
            ps_model::ModelKind::Mlp { layers } => layers.clone(),
            other => bail!("a {} model cannot be pruned", other.name()),
        };
        let run_dir =
            train_child(&parent, &format!("prune-{:02.0}", sparsity * 100.0), &on, |config, run_dir| {
                let init = run_dir.join("init.msgpack");
                pruned.write(&init)?;
                set_mnist(config, |w| {
                    let Workload::MnistMlp { init_from, keep_zeros, layers: l, .. } = w else {
                        unreachable!()
                    };
                    *l = layers.clone();
                    *init_from = Some(init.clone());
                    *keep_zeros = true;
                })?;
                config.job.epochs = epochs;
                Ok(())
            })
            .await?;
        let mut new = from_run(&run_dir, Some(&parent.model), &by)?;
        let tuned = ps_model::SavedModel::from_bytes(&new.artifact)?;
        new.metrics.retain(|k, _| !k.starts_with("test_"));
        (tuned, new)
    };
    let zeros = ps_model::prune::sparsity(&tuned)?;
    if zeros + 1e-3 < sparsity {
        bail!("the fine-tuned model has {:.4} of its weights at zero, below the {sparsity} asked", zeros);
    }
    let model = ps_model::prune::to_sparse(&tuned)?;
    let net = ps_model::prune::SparseMlp::new(&model)?;
    let test = ps_worker::data::load_mnist(mnist, ps_worker::data::Split::Test)
        .with_context(|| format!("reading the MNIST test set in {}", mnist.display()))?;
    new.metrics.extend(served_metrics(&test, net.num_classes(), |x, out| net.predict(x, out))?);
    new.metrics.insert("sparsity".into(), zeros);
    new.artifact = model.to_bytes()?;
    new.lineage.parent_version = Some(parent.version);
    new.lineage.checkpoint = None;
    new.lineage.method = Some(format!(
        "prune: weight magnitude, {:.0}% of each layer's weights zero, fine-tuned {epochs} epoch(s) with the zeros kept; \
         stored as a bitmask and the non-zero values",
        sparsity * 100.0
    ));
    let v = reg.register(new).await?;
    println!(
        "registered {}:{} ({:.0}% pruned of {}:{}): {} bytes against {}; {} against {}",
        v.model,
        v.version,
        zeros * 100.0,
        parent.model,
        parent.version,
        v.artifact.size,
        parent.artifact.size,
        test_metrics(&v),
        test_metrics(&parent),
    );
    Ok(())
}

/// Trains a student against `spec`'s soft targets and registers it
/// (`models distill`).
async fn distill(
    reg: &Registry,
    spec: &str,
    hidden: &[usize],
    temperature: f32,
    alpha: f32,
    epochs: Option<u32>,
    on: TrainOn,
) -> anyhow::Result<()> {
    let parent = resolve(reg, spec).await?;
    let teacher = reg.load(&parent)?;
    if !matches!(teacher.model, ps_model::ModelKind::Mlp { .. }) {
        bail!(
            "{}:{} is a {} model; a teacher must be an f32 MLP",
            parent.model,
            parent.version,
            teacher.model.name()
        );
    }
    let by = on.by.clone().unwrap_or_else(user);
    let run_dir = train_child(&parent, "distill", &on, |config, run_dir| {
        let path = run_dir.join("teacher.msgpack");
        teacher.write(&path)?;
        set_mnist(config, |w| {
            let Workload::MnistMlp { layers, init_from, keep_zeros, teacher, .. } = w else { unreachable!() };
            *layers = new_layers(hidden);
            (*init_from, *keep_zeros) = (None, false);
            *teacher = Some(ps_worker::config::TeacherConfig { model: path.clone(), temperature, alpha });
        })?;
        if let Some(e) = epochs {
            config.job.epochs = e;
        }
        Ok(())
    })
    .await?;
    let mut new = from_run(&run_dir, Some(&parent.model), &by)?;
    new.lineage.parent_version = Some(parent.version);
    new.lineage.method = Some(format!(
        "distill: student {:?} trained against the teacher's soft targets at temperature {temperature}, \
         loss = {alpha} T^2 KL(teacher_T || student_T) + {} CE(labels)",
        new_layers(hidden),
        1.0 - alpha
    ));
    let v = reg.register(new).await?;
    println!(
        "registered {}:{} (student {:?} of {}:{}): {} bytes against {}; {} against {}",
        v.model,
        v.version,
        new_layers(hidden),
        parent.model,
        parent.version,
        v.artifact.size,
        parent.artifact.size,
        test_metrics(&v),
        test_metrics(&parent),
    );
    Ok(())
}

fn new_layers(hidden: &[usize]) -> Vec<usize> {
    [784].into_iter().chain(hidden.iter().copied()).chain([10]).collect()
}

/// Edits the MNIST workload of `config`; another workload is an error.
fn set_mnist(config: &mut RunConfig, edit: impl FnOnce(&mut Workload)) -> anyhow::Result<()> {
    if !matches!(config.job.workload, Workload::MnistMlp { .. }) {
        bail!(
            "the parent was trained by a {} job; pruning and distillation take MNIST MLPs",
            workload_kind(&config.job.workload)
        );
    }
    edit(&mut config.job.workload);
    Ok(())
}

/// Runs a training job derived from `parent`'s run file (edited by `edit`,
/// which may write files into the new run folder) on a local cluster, with
/// registration off (the caller registers); returns the run folder.
async fn train_child(
    parent: &ModelVersion,
    name: &str,
    on: &TrainOn,
    edit: impl FnOnce(&mut RunConfig, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let text = parent.lineage.run_config.as_deref().with_context(|| {
        format!(
            "{}:{} has no run file in its lineage (it was not trained on the cluster)",
            parent.model, parent.version
        )
    })?;
    let mut config = RunConfig::from_toml(text).context("the parent's run file")?;
    let run_dir =
        crate::cluster::new_run_dir(&on.runs_dir, &format!("{}-{}-{name}", parent.model, parent.version))?;
    edit(&mut config, &run_dir)?;
    config.registry.register = false;
    if let Some(n) = on.servers {
        config.cluster.servers = n;
    }
    if let Some(n) = on.workers {
        config.cluster.workers = n;
    }
    config.validate()?;
    let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
    eprintln!(
        "training on {} shard(s) and {} worker(s), {} epoch(s); run folder {}",
        config.cluster.servers,
        config.cluster.workers,
        config.job.epochs,
        run_dir.display()
    );
    let bars = crate::render::Bars::new();
    let summary =
        crate::run::run(crate::run::Plan::new(&exe, config, run_dir.clone()), |w, e| bars.update(w, e))
            .await?;
    bars.finish();
    if !summary.failed.is_empty() {
        bail!("{} worker(s) of {} failed: {:?}", summary.failed.len(), run_dir.display(), summary.failed);
    }
    Ok(run_dir)
}

fn user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// The registry's only model, for commands that name none.
async fn only_model(reg: &Registry) -> anyhow::Result<String> {
    let models = reg.models().await?;
    match models.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("the registry is empty"),
        many => bail!("the registry holds {} models ({}); name one", many.len(), many.join(", ")),
    }
}

async fn model_or_only(reg: &Registry, model: &str) -> anyhow::Result<String> {
    if model.is_empty() { only_model(reg).await } else { Ok(model.to_string()) }
}

/// `MODEL:N`, `MODEL@LABEL`, `MODEL` (latest), `N`, `@LABEL`.
async fn resolve(reg: &Registry, spec: &str) -> anyhow::Result<ModelVersion> {
    let number =
        |n: &str| n.parse::<i64>().with_context(|| format!("`{spec}`: `{n}` is not a version number"));
    Ok(if let Some((m, label)) = spec.split_once('@') {
        let m = model_or_only(reg, m).await?;
        let n = reg.label(&m, label).await?;
        reg.version(&m, n).await?
    } else if let Some((m, n)) = spec.split_once(':') {
        let n = number(n)?;
        reg.version(&model_or_only(reg, m).await?, n).await?
    } else if spec.bytes().all(|b| b.is_ascii_digit()) {
        let n = number(spec)?;
        reg.version(&only_model(reg).await?, n).await?
    } else {
        reg.latest(spec).await?
    })
}

fn show_from(v: Option<i64>) -> String {
    v.map_or("(none)".into(), |v| v.to_string())
}

/// The `test_*` metrics, compactly.
fn test_metrics(v: &ModelVersion) -> String {
    let parts: Vec<String> = v
        .metrics
        .iter()
        .filter(|(k, _)| k.starts_with("test_"))
        .map(|(k, x)| format!("{k}={x:.4}"))
        .collect();
    parts.join(" ")
}

async fn list(reg: &Registry, model: Option<&str>) -> anyhow::Result<String> {
    let versions = reg.versions(model).await?;
    let mut labels: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
    for l in reg.labels(model).await? {
        labels.entry((l.model, l.version)).or_default().push(l.label);
    }
    let mut out = format!(
        "{:<16} {:>7}  {:<20} {:<20} {:<10} {:<12} {}\n",
        "MODEL", "VERSION", "LABELS", "CREATED", "BY", "SHA256", "METRICS"
    );
    for v in &versions {
        let l = labels.get(&(v.model.clone(), v.version)).map(|l| l.join(",")).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:>7}  {:<20} {:<20} {:<10} {:<12} {}",
            v.model,
            v.version,
            l,
            v.created_at,
            v.created_by,
            v.artifact.sha256.get(..12).unwrap_or(&v.artifact.sha256),
            test_metrics(v)
        );
    }
    if versions.is_empty() {
        out.push_str("(no versions)\n");
    }
    Ok(out)
}

async fn show(reg: &Registry, spec: &str, with_config: bool) -> anyhow::Result<()> {
    let v = resolve(reg, spec).await?;
    let labels: Vec<String> = reg
        .labels(Some(&v.model))
        .await?
        .into_iter()
        .filter(|l| l.version == v.version)
        .map(|l| l.label)
        .collect();
    let check = reg.artifact(&v);
    let l = &v.lineage;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("{}:{}", v.model, v.version);
    println!("  created     {} by {}", v.created_at, v.created_by);
    println!("  labels      {}", if labels.is_empty() { "-".into() } else { labels.join(", ") });
    println!(
        "  artifact    {} ({} bytes): {}",
        reg.artifact_path(&v).display(),
        v.artifact.size,
        match &check {
            Ok(_) => "ok, sha256 verified".to_string(),
            Err(ps_registry::Error::Artifact { fault, .. }) => format!("UNUSABLE, {fault}"),
            Err(e) => format!("UNUSABLE, {e}"),
        }
    );
    println!("  metrics");
    for (k, x) in &v.metrics {
        println!("    {k:<18} {x:.4}");
    }
    println!("  source run  {}", opt(&l.source_run));
    println!("  checkpoint  {}", opt(&l.checkpoint));
    println!("  parent      {}", l.parent_version.map_or("-".into(), |p| format!("{}:{p}", v.model)));
    println!("  method      {}", l.method.as_deref().unwrap_or("-"));
    println!("  data");
    for (f, sum) in &l.data_checksums {
        println!("    {sum}  {f}");
    }
    if with_config {
        println!("  run config");
        for line in l.run_config.as_deref().unwrap_or("").lines() {
            println!("    {line}");
        }
    }
    check.map(|_| ()).context("the artifact cannot be served")
}

async fn history(reg: &Registry, model: &str, label: Option<&str>) -> anyhow::Result<String> {
    let mut out = format!(
        "{:<12} {:>4}  {:<9} {:>6} -> {:<6} {:<20} {}\n",
        "LABEL", "SEQ", "ACTION", "FROM", "TO", "AT", "BY"
    );
    for m in reg.history(model, label).await? {
        let _ = writeln!(
            out,
            "{:<12} {:>4}  {:<9} {:>6} -> {:<6} {:<20} {}",
            m.label,
            m.seq,
            m.action,
            m.from_version.map_or("-".into(), |v| v.to_string()),
            m.to_version,
            m.moved_at,
            m.moved_by
        );
    }
    Ok(out)
}

/// Metrics (with the change) and the run-file keys that differ, side by side.
fn diff(a: &ModelVersion, b: &ModelVersion) -> String {
    let (na, nb) = (format!("{}:{}", a.model, a.version), format!("{}:{}", b.model, b.version));
    let cell = |x: Option<&String>| x.cloned().unwrap_or_else(|| "-".into());
    let mut out = format!("{:<34} {:>20} {:>20} {:>12}\n", "", na, nb, "change");
    out.push_str("metrics\n");
    let keys: BTreeSet<&String> = a.metrics.keys().chain(b.metrics.keys()).collect();
    for k in keys {
        let (x, y) = (a.metrics.get(k), b.metrics.get(k));
        let change = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.4}", y - x),
            _ => String::new(),
        };
        let fmt = |v: Option<&f64>| v.map(|v| format!("{v:.4}"));
        let _ = writeln!(
            out,
            "  {k:<32} {:>20} {:>20} {change:>12}",
            cell(fmt(x).as_ref()),
            cell(fmt(y).as_ref())
        );
    }
    let (ca, cb) = (flat_config(a), flat_config(b));
    let keys: BTreeSet<&String> = ca.keys().chain(cb.keys()).collect();
    let differing: Vec<&String> = keys.iter().copied().filter(|k| ca.get(*k) != cb.get(*k)).collect();
    let _ =
        writeln!(out, "run config ({} keys differ, {} equal)", differing.len(), keys.len() - differing.len());
    for k in differing {
        let _ = writeln!(out, "  {k:<32} {:>20} {:>20}", cell(ca.get(k)), cell(cb.get(k)));
    }
    let lineage = |v: &ModelVersion| {
        format!(
            "{} {}",
            v.artifact.sha256.get(..12).unwrap_or_default(),
            v.lineage.source_run.as_deref().unwrap_or("-")
        )
    };
    let _ = writeln!(out, "artifact and source\n  {na}: {}\n  {nb}: {}", lineage(a), lineage(b));
    out
}

/// The run file as `dotted.key -> value` (values in TOML syntax).
fn flat_config(v: &ModelVersion) -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in table {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(t) => walk(&key, t, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Some(table) = v.lineage.run_config.as_deref().and_then(|t| t.parse::<toml::Table>().ok()) {
        walk("", &table, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: i64, config: &str, accuracy: f64) -> ModelVersion {
        ModelVersion {
            model: "mnist_mlp".into(),
            version: n,
            artifact: ps_registry::store::Artifact { sha256: "ab".repeat(32), size: 1 },
            metrics: BTreeMap::from([("test_accuracy".into(), accuracy)]),
            lineage: Lineage { run_config: Some(config.into()), ..Lineage::default() },
            created_at: "2026-11-29T16:00:00Z".into(),
            created_by: "me".into(),
        }
    }

    #[test]
    fn diff_shows_changed_metrics_and_config_keys() {
        let a = version(1, "[job]\nepochs = 10\nseed = 42\n[job.optimizer]\nlr = 0.001\n", 0.97);
        let b = version(2, "[job]\nepochs = 3\nseed = 42\n[job.optimizer]\nlr = 0.001\n", 0.95);
        let d = diff(&a, &b);
        assert!(d.contains("mnist_mlp:1") && d.contains("mnist_mlp:2"), "{d}");
        assert!(d.contains("test_accuracy") && d.contains("-0.0200"), "{d}");
        assert!(d.contains("(1 keys differ, 2 equal)") && d.contains("job.epochs"), "{d}");
        assert!(!d.contains("job.seed") && !d.contains("job.optimizer.lr "), "{d}");
    }

    #[test]
    fn location_defaults_to_a_sqlite_file_under_the_root() {
        let (url, root) = location(None, Some(PathBuf::from("/tmp/r")));
        if std::env::var_os("PS_REGISTRY").is_none() {
            assert_eq!(url, "sqlite:///tmp/r/registry.db");
        }
        assert_eq!(root, PathBuf::from("/tmp/r"));
        assert_eq!(location(Some("postgres://u@h/db".into()), None).0, "postgres://u@h/db");
    }
}
