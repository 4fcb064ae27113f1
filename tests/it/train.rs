//! End-to-end: the launcher trains the reference MLP on a subset of MNIST with
//! real shard and worker processes, and writes a complete run folder.

use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn project_path(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel).display().to_string()
}

#[test]
fn launcher_trains_mnist_subset_with_two_shards_and_two_workers() {
    let dir = temp_dir("train");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[cluster]
servers = 2
workers = 2

[job]
epochs = 2
batch_size = 32
train_limit = 8000
consistency = {{ model = "ssp", staleness = 2 }}

[job.workload]
kind = "mnist_mlp"
data_dir = "{}"

[job.optimizer]
rule = "adam"
lr = 0.001
"#,
            project_path("data/mnist")
        ),
    )
    .expect("write config");
    let registry = temp_dir("train-registry");
    let out = Command::new(env!("CARGO_BIN_EXE_ps-cluster"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--runs-dir")
        .arg(&dir)
        .env("PS_REGISTRY_ROOT", &registry)
        .env_remove("PS_REGISTRY")
        .output()
        .expect("run ps-cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "launcher failed: {stdout}\n{stderr}");
    // Training registered its model (the run file does not opt out).
    assert!(stderr.contains("registered mnist_mlp:1"), "{stderr}");
    assert_eq!(std::fs::read_dir(registry.join("artifacts/sha256")).expect("artifacts").count(), 1);

    let run = std::fs::read_dir(&dir)
        .expect("list runs")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a run folder");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "stats.json",
        "summary.json",
        "model.msgpack",
        "server-0.log",
        "worker-1.log",
    ] {
        assert!(run.join(f).exists(), "{f} missing from {}", run.display());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    // 2 epochs over 8,000 images give about 93% on the 10,000 test images;
    // 85% would still catch a model that does not learn (10% is chance).
    let acc = summary["test_score"].as_f64().unwrap();
    assert!(acc > 0.85, "test accuracy {acc}");
    // The saved model reads back, and scores on the test set what the run reported.
    let model = ps_model::SavedModel::read(&run.join("model.msgpack")).expect("model.msgpack reads back");
    let ps_model::ModelKind::Mlp { layers } = &model.model else { panic!("not an MLP: {:?}", model.model) };
    let params: Vec<f32> = model.dense.iter().flat_map(|t| t.values.iter().copied()).collect();
    let test =
        ps_worker::data::load_mnist(Path::new(&project_path("data/mnist")), ps_worker::data::Split::Test)
            .expect("MNIST test set");
    let (_, rescored) = ps_model::Mlp::new(layers).evaluate(&params, test.x.view(), &test.y);
    assert!(
        (f64::from(rescored) - acc).abs() < 1e-6,
        "saved model scores {rescored}, the run reported {acc}"
    );
    // The registered version is that model, with the run's score and lineage.
    let url = format!("sqlite://{}", registry.join("registry.db").display());
    let (version, registered) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let reg = ps_registry::Registry::open(&url, &registry).await.expect("open the registry");
        let v = reg.latest("mnist_mlp").await.expect("a registered version");
        let m = reg.load(&v).expect("its artifact");
        reg.close().await;
        (v, m)
    });
    assert_eq!(registered, model);
    assert_eq!(version.metrics["test_accuracy"], acc);
    assert_eq!(version.lineage.source_run.as_deref(), Some(run.display().to_string().as_str()));
    assert!(version.lineage.run_config.as_deref().unwrap_or("").contains("train_limit = 8000"));
    assert_eq!(version.lineage.data_checksums.len(), 4, "the four MNIST files");
    assert_eq!(summary["failed"].as_array().unwrap().len(), 0);
    let done = summary["done"].as_array().unwrap();
    assert_eq!(done.len(), 2, "both workers report done");
    for d in done {
        // 4,000 rows per worker, batch 32 -> 125 iterations per epoch.
        assert_eq!(d["iters"].as_u64(), Some(250), "{d}");
    }
    // Under SSP(2) no applied push is staler than the bound.
    let hist = summary["staleness_histogram"].as_array().unwrap();
    assert!(hist.len() <= 3, "staleness above the SSP bound: {hist:?}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"event\":\"eval\"")), "no eval event");
    assert!(!metrics.contains("\"event\":\"metrics\""), "endpoints go to metrics.txt, not the curves");
    // Each process told the metrics port it bound (port 0 asked): four
    // distinct, real ports.
    let endpoints = std::fs::read_to_string(run.join("metrics.txt")).unwrap();
    let mut names: Vec<&str> = endpoints.lines().filter_map(|l| l.split(' ').next()).collect();
    names.sort();
    assert_eq!(names, ["shard-0", "shard-1", "worker-0", "worker-1"], "{endpoints}");
    assert!(endpoints.lines().all(|l| l.contains(" https://")), "TLS on, so HTTPS: {endpoints}");
    let mut ports: Vec<u16> = endpoints
        .lines()
        .filter_map(|l| l.split("://127.0.0.1:").nth(1))
        .filter_map(|rest| rest.strip_suffix("/metrics")?.parse().ok())
        .collect();
    ports.sort();
    ports.dedup();
    assert!(ports.len() == 4 && ports[0] > 0, "{endpoints}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&registry);
}

#[test]
fn every_shipped_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/config") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = ps_worker::config::RunConfig::from_toml(&text) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 1, "no configs found in {}", dir.display());
}

#[test]
fn bad_configs_are_rejected_with_a_reason() {
    let check = |text: &str, needle: &str| {
        let err = ps_worker::config::RunConfig::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(needle), "`{err}` does not mention `{needle}`");
    };
    check("[job]\nworkload = { kind = \"mnist_mlp\" }\nbatch_size = 0", "batch_size");
    check("[job]\nworkload = { kind = \"mnist_mlp\" }\nbogus = 1", "bogus");
    check("[job]\nworkload = { kind = \"mnist_mlp\", layers = [784, 10, 3] }", "layers");
    check("[job]\nworkload = { kind = \"mnist_mlp\" }\noptimizer = { rule = \"adam\", lr = -1.0 }", "lr");
    check("[cluster]\nservers = 0\n[job]\nworkload = { kind = \"mnist_mlp\" }", "server");
    check("[job]\nworkload = { kind = \"ctr\", bogus = 1 }", "bogus");
    check("[job]\nworkload = { kind = \"ctr\", slots = 0 }", "slots");
    check("[job]\nworkload = { kind = \"a9a_logreg\", bogus = 1 }", "bogus");
}
