//! `ps-cluster models export` and `models register CHECKPOINT`: a registered
//! version leaves as safetensors that read back to the same model, a damaged
//! artifact is never exported, and a checkpoint registers the model its
//! shards hold, scored as its evaluation said.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ps_model::ModelKind;
use ps_model::export::{ModelCard, import};
use ps_registry::{Lineage, NewVersion, Registry};
use ps_server::ServerConfig;
use ps_server::checkpoint::coordinator;
use ps_server::local::LocalShards;
use ps_worker::config::RunConfig;
use ps_worker::event::Event;
use ps_worker::session::WorkerId;

use crate::util::small_mlp;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// `ps-cluster models --registry-root ROOT ARGS...` (its default SQLite file).
fn models(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ps-cluster"))
        .arg("models")
        .arg("--registry-root")
        .arg(root)
        .args(args)
        .env_remove("PS_REGISTRY")
        .env_remove("PS_REGISTRY_ROOT")
        .output()
        .expect("run ps-cluster")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn open(root: &Path) -> Registry {
    let url = format!("sqlite://{}", root.join("registry.db").display());
    Registry::open(&url, root).await.expect("open the registry")
}

#[tokio::test]
async fn export_writes_the_registered_model_and_refuses_a_corrupted_artifact() {
    let root = temp_dir("models-export");
    let model = small_mlp();
    let config = include_str!("../../examples/config/mnist.toml");
    let metrics = BTreeMap::from([("test_accuracy".to_string(), 0.97), ("test_loss".to_string(), 0.09)]);
    let reg = open(&root).await;
    let v = reg
        .register(NewVersion {
            model: "small".into(),
            artifact: model.to_bytes().unwrap(),
            metrics: metrics.clone(),
            lineage: Lineage {
                run_config: Some(config.into()),
                source_run: Some("runs/x".into()),
                checkpoint: Some("runs/x/checkpoints/ckpt-000002".into()),
                ..Lineage::default()
            },
            created_by: "test".into(),
        })
        .await
        .expect("register");
    let artifact = reg.artifact_path(&v);
    reg.close().await;

    let out_dir = root.join("out");
    let out = models(&root, &["export", "small:1", "--format", "safetensors", "--out", path(&out_dir)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("exported small:1"), "{}", text(&out));
    assert_eq!(import(&out_dir).expect("the export reads back"), model);
    let card = ModelCard::read(&out_dir).expect("the card reads back");
    assert_eq!(card.metrics, metrics);
    let run = card.run.expect("the run");
    assert_eq!((run.run_dir.as_str(), run.config_toml.as_str()), ("runs/x", config));
    assert!(card.preprocessing.iter().any(|p| p.contains("byte / 255")), "{:?}", card.preprocessing);

    // The version by number with --name; another model's version is refused.
    let by_name = root.join("by-name");
    let out = models(
        &root,
        &["export", "1", "--name", "small", "--format", "safetensors", "--out", path(&by_name)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(import(&by_name).unwrap(), model);
    let out = models(&root, &["export", "other:1", "--name", "small", "--format", "safetensors"]);
    assert!(!out.status.success() && text(&out).contains("not of --name small"), "{}", text(&out));

    // Only safetensors is a format.
    let out = models(&root, &["export", "small:1", "--format", "onnx"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("onnx") && text(&out).contains("safetensors"), "{}", text(&out));

    // One flipped byte: the export fails and writes nothing.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&artifact, &bytes).unwrap();
    let refused = root.join("refused");
    let out = models(&root, &["export", "small:1", "--format", "safetensors", "--out", path(&refused)]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is corrupted"), "{}", text(&out));
    assert!(!refused.join("model.safetensors").exists() && !refused.join("card.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// A run file for a tiny job: 2 shards, 1 worker, BSP, plain SGD.
fn run_file(lr: f64) -> String {
    format!(
        r#"
[cluster]
servers = 2
workers = 1

[job]
epochs = 1
batch_size = 50
train_limit = 2000
consistency = {{ model = "bsp" }}
seed = 11

[job.workload]
kind = "mnist_mlp"
data_dir = "{}"
layers = [784, 32, 10]
chunk_len = 4096

[job.optimizer]
rule = "sgd"
lr = {lr}
"#,
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_registers_the_model_its_shards_hold() {
    let dir = temp_dir("models-ckpt");
    let (run, root) = (dir.join("run"), dir.join("registry"));
    std::fs::create_dir_all(&run).unwrap();
    let config_text = run_file(0.1);
    std::fs::write(run.join("config.toml"), &config_text).unwrap();
    let config = RunConfig::from_toml(&config_text).unwrap();

    // Train on shards that can checkpoint, score the result, checkpoint it.
    let checkpoints = run.join("checkpoints");
    let server = ServerConfig { checkpoint_dir: Some(checkpoints.clone()), ..ServerConfig::default() };
    let shards = LocalShards::start_with(&server, 2).await.unwrap();
    let mut sink = |_: Event| {};
    ps_worker::train::run(&config.job, &shards.addrs, WorkerId { index: 0, count: 1 }, &mut sink)
        .await
        .expect("train");
    let live = ps_worker::train::evaluate_job(&config.job, &shards.addrs).await.expect("evaluate");
    let mut opts = coordinator::Options::new(&checkpoints);
    opts.job = Some(config.fingerprint());
    let manifest = coordinator::take_once(&shards.addrs, &opts).await.expect("checkpoint");
    shards.stop().await.unwrap();
    let ckpt = checkpoints.join(&manifest.name);

    // A run file of another job (another learning rate) is refused.
    std::fs::write(run.join("config.toml"), run_file(0.05)).unwrap();
    let out = models(&root, &["register", path(&ckpt)]);
    assert!(!out.status.success() && text(&out).contains("another job"), "{}", text(&out));
    std::fs::write(run.join("config.toml"), &config_text).unwrap();

    let out = models(&root, &["register", path(&ckpt)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("registered mnist_mlp:1"), "{}", text(&out));

    let reg = open(&root).await;
    let v = reg.latest("mnist_mlp").await.expect("the version");
    let model = reg.load(&v).expect("its artifact");
    reg.close().await;
    assert_eq!(Some(&model), live.model.as_ref(), "the model the shards held");
    assert_eq!(v.metrics["test_accuracy"], live.score);
    assert_eq!(v.metrics["test_loss"], live.loss);
    assert_eq!(v.lineage.checkpoint.as_deref(), Some(path(&ckpt)));
    assert_eq!(v.lineage.source_run.as_deref(), Some(path(&run)));
    assert_eq!(v.lineage.run_config.as_deref(), Some(config_text.as_str()));

    // The registered model re-scores on the test set as its metrics say.
    let ModelKind::Mlp { layers } = &model.model else { panic!("not an MLP: {:?}", model.model) };
    let params: Vec<f32> = model.dense.iter().flat_map(|t| t.values.iter().copied()).collect();
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");
    let test = ps_worker::data::load_mnist(Path::new(mnist), ps_worker::data::Split::Test).unwrap();
    let (_, rescored) = ps_model::Mlp::new(layers).evaluate(&params, test.x.view(), &test.y);
    let accuracy = v.metrics["test_accuracy"];
    assert!((f64::from(rescored) - accuracy).abs() < 1e-6, "re-scored {rescored}, registered {accuracy}");
    assert!(accuracy > 0.5, "the job trained: {accuracy}");
    let _ = std::fs::remove_dir_all(&dir);
}
