//! Model compression on the cluster: a pruned model fine-tuned with Adam
//! keeps its zeros exactly (checked on the shards' tables, not only in the
//! saved model), and `ps-cluster models prune` and `models distill` register
//! versions whose lineage names the parent and method, stored and scored as
//! ps-serve runs them.

use std::path::Path;
use std::process::{Command, Output};

use ps_model::{ModelKind, SavedModel};
use ps_registry::{Lineage, NewVersion, Registry};
use ps_server::local::LocalShards;
use ps_worker::client::DenseSet;
use ps_worker::config::RunConfig;
use ps_worker::event::Event;
use ps_worker::session::WorkerId;

use crate::util::{TempDir, sharded_client};

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");

/// A tiny job: 2 shards, 1 worker, 2000 training rows, Adam.
fn run_file(layers: &str, extra: &str) -> String {
    format!(
        r#"
[cluster]
servers = 2
workers = 1

[checkpoint]
enabled = false

[job]
epochs = 1
batch_size = 32
train_limit = 2000
consistency = {{ model = "bsp" }}
seed = 5

[job.workload]
kind = "mnist_mlp"
data_dir = "{MNIST}"
layers = {layers}
chunk_len = 4096
{extra}

[job.optimizer]
rule = "adam"
lr = 0.003
"#
    )
}

async fn train(config: &RunConfig) -> ps_worker::train::Evaluation {
    let shards = LocalShards::start(2).await.unwrap();
    let mut sink = |_: Event| {};
    ps_worker::train::run(&config.job, &shards.addrs, WorkerId { index: 0, count: 1 }, &mut sink)
        .await
        .expect("train");
    let eval = ps_worker::train::evaluate_job(&config.job, &shards.addrs).await.expect("evaluate");
    shards.stop().await.unwrap();
    eval
}

/// Adam from a zero state with zero gradients leaves a value at zero: the
/// masked weights stay exactly zero on the shards, the rest train.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_weights_stay_exactly_zero_through_adam_fine_tuning() {
    let dir = TempDir::new("prune-mask");
    let layers = [784, 16, 10];
    let params = ps_model::Mlp::new(&layers).init_params(3);
    let dense = SavedModel::from_flat(ModelKind::Mlp { layers: layers.to_vec() }, &params).unwrap();
    let pruned = ps_model::prune::magnitude_prune(&dense, 0.8).unwrap();
    let init = dir.0.join("init.msgpack");
    pruned.write(&init).unwrap();
    let extra = format!("init_from = \"{}\"\nkeep_zeros = true", init.display());
    let config = RunConfig::from_toml(&run_file("[784, 16, 10]", &extra)).unwrap();

    let shards = LocalShards::start(2).await.unwrap();
    let mut sink = |_: Event| {};
    ps_worker::train::run(&config.job, &shards.addrs, WorkerId { index: 0, count: 1 }, &mut sink)
        .await
        .expect("fine-tune");
    // The tables hold the change from the pruned weights.
    let (_, tables) = ps_worker::workload::mnist::model(&config.job).unwrap();
    let set = DenseSet::new(&tables, 2).unwrap();
    let mut delta = vec![f32::NAN; set.len()];
    sharded_client(&shards, 99).await.pull_dense(&set, 0, &mut delta).await.unwrap();
    let eval = ps_worker::train::evaluate_job(&config.job, &shards.addrs).await.expect("evaluate");
    shards.stop().await.unwrap();

    let base: Vec<f32> = pruned.dense.iter().flat_map(|t| t.values.iter().copied()).collect();
    // fc1.weight, fc1.bias, fc2.weight, fc2.bias; biases are not pruned.
    let is_weight = |i: usize| i < 784 * 16 || (784 * 16 + 16..784 * 16 + 16 + 160).contains(&i);
    let (mut masked, mut moved, mut biases) = (0, 0, 0);
    for (i, (&b, &d)) in base.iter().zip(&delta).enumerate() {
        if is_weight(i) && b == 0.0 {
            assert_eq!(d.to_bits(), 0, "pruned weight {i} moved to {d}");
            masked += 1;
        } else if d != 0.0 {
            moved += 1;
            biases += usize::from(!is_weight(i));
        }
    }
    // The biases start at zero (Keras' initializer) but are not pruned.
    assert!(biases > 20, "only {biases} of 26 biases trained");
    assert_eq!(masked, (0.8 * 784.0 * 16.0f64).round() as usize + (0.8 * 160.0f64).round() as usize);
    // 2,567 are not pruned; those fed by pixels that are zero in every
    // training image get no gradient either.
    assert!(moved > 1200, "only {moved} unpruned parameters trained");

    let model = eval.model.expect("a saved model");
    assert!((ps_model::prune::sparsity(&model).unwrap() - 0.8).abs() < 1e-3, "the saved model is 80% zeros");
    // A random 784-16-10 net, 80% pruned, after 62 Adam steps: it learned.
    let test = ps_worker::data::load_mnist(Path::new(MNIST), ps_worker::data::Split::Test).unwrap();
    let (_, before) = ps_model::Mlp::new(&layers).evaluate(&base, test.x.view(), &test.y);
    assert!(eval.score > f64::from(before) + 0.15, "accuracy {} after, {before} before", eval.score);
}

/// `ps-cluster models --registry-root ROOT ARGS...`.
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

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A teacher trained in-process and registered with its run file; then
/// `models prune` and `models distill` train on local clusters from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_distill_register_children_of_their_parent() {
    let dir = TempDir::new("compress-cmds");
    let (root, runs) = (dir.0.join("registry"), dir.0.join("runs"));
    let teacher_file = run_file("[784, 32, 10]", "");
    let teacher = train(&RunConfig::from_toml(&teacher_file).unwrap()).await;
    let url = format!("sqlite://{}", root.join("registry.db").display());
    let reg = Registry::open(&url, &root).await.unwrap();
    let metrics = [("test_accuracy".to_string(), teacher.score)].into();
    let lineage = Lineage { run_config: Some(teacher_file.clone()), ..Lineage::default() };
    let model = teacher.model.expect("the teacher's model");
    let new = NewVersion {
        model: "m".into(),
        artifact: model.to_bytes().unwrap(),
        metrics,
        lineage,
        created_by: "t".into(),
    };
    reg.register(new).await.unwrap();

    let runs_dir = runs.to_str().unwrap();
    let out = models(&root, &["prune", "m:1", "--sparsity", "0.9", "--mnist", MNIST, "--runs-dir", runs_dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("registered m:2 (90% pruned of m:1)"), "{}", text(&out));
    let out = models(
        &root,
        &[
            "distill",
            "m:1",
            "--hidden",
            "8",
            "--temperature",
            "3",
            "--alpha",
            "0.6",
            "--epochs",
            "1",
            "--runs-dir",
            runs_dir,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("registered m:3 (student [784, 8, 10] of m:1)"), "{}", text(&out));
    // Only MNIST MLPs with a run file are pruned or taught from.
    let out = models(&root, &["distill", "m:2", "--runs-dir", runs_dir]);
    assert!(!out.status.success() && text(&out).contains("a teacher must be an f32 MLP"), "{}", text(&out));

    let test = ps_worker::data::load_mnist(Path::new(MNIST), ps_worker::data::Split::Test).unwrap();
    let accuracy = |probs: &[f32]| {
        let hits = probs.chunks(10).zip(&test.y).filter(|(p, y)| {
            p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i) == Some(**y as usize)
        });
        hits.count() as f64 / test.y.len() as f64
    };

    let pruned = reg.version("m", 2).await.unwrap();
    assert_eq!(pruned.lineage.parent_version, Some(1));
    assert!(pruned.lineage.method.as_deref().unwrap().starts_with("prune: weight magnitude, 90%"));
    assert!(pruned.lineage.run_config.as_deref().unwrap().contains("keep_zeros = true"));
    let sparse = reg.load(&pruned).unwrap();
    assert!(matches!(sparse.model, ModelKind::MlpSparse { .. }), "{:?}", sparse.model);
    assert!((ps_model::prune::sparsity(&sparse).unwrap() - 0.9).abs() < 1e-3);
    assert!(pruned.artifact.size * 4 < reg.version("m", 1).await.unwrap().artifact.size, "stored sparsely");
    let mut probs = Vec::new();
    ps_model::prune::SparseMlp::new(&sparse).unwrap().predict(test.x.as_slice().unwrap(), &mut probs);
    assert_eq!(accuracy(&probs), pruned.metrics["test_accuracy"]);
    assert!(pruned.metrics["test_accuracy"] > 0.6, "{:?}", pruned.metrics);

    let student = reg.version("m", 3).await.unwrap();
    assert_eq!(student.lineage.parent_version, Some(1));
    let method = student.lineage.method.as_deref().unwrap();
    assert!(
        method.starts_with("distill: student [784, 8, 10]") && method.contains("temperature 3"),
        "{method}"
    );
    let config = RunConfig::from_toml(student.lineage.run_config.as_deref().unwrap()).unwrap();
    let ps_worker::config::Workload::MnistMlp { layers, teacher, .. } = &config.job.workload else {
        panic!()
    };
    assert_eq!((layers.as_slice(), teacher.as_ref().map(|t| t.alpha)), (&[784, 8, 10][..], Some(0.6)));
    let small = reg.load(&student).unwrap();
    assert_eq!(small.model, ModelKind::Mlp { layers: vec![784, 8, 10] });
    let params: Vec<f32> = small.dense.iter().flat_map(|t| t.values.iter().copied()).collect();
    let (_, acc) = ps_model::Mlp::new(&[784, 8, 10]).evaluate(&params, test.x.view(), &test.y);
    assert!((f64::from(acc) - student.metrics["test_accuracy"]).abs() < 1e-6);
    assert!(acc > 0.5, "the student learned: {acc}");
    reg.close().await;
}
