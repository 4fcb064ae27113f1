//! `ps-cluster export`: a run folder's model becomes `model.safetensors` and
//! `card.json`, which read back to the same model, with the run's metrics.

use std::path::PathBuf;
use std::process::Command;

use ps_model::SavedModel;
use ps_model::export::{ModelCard, import};

use crate::util::small_mlp;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A run folder as `ps-cluster train` leaves it, with a small MLP.
fn run_folder(dir: &std::path::Path) -> SavedModel {
    let model = small_mlp();
    model.write(&dir.join("model.msgpack")).expect("write model");
    std::fs::write(dir.join("config.toml"), include_str!("../../examples/config/mnist.toml")).unwrap();
    let summary = serde_json::json!({
        "schema_version": 1, "run_dir": dir, "consistency": "ASP", "servers": 2, "workers": 2,
        "wall_s": 10.0, "samples_per_s": 1000.0, "test_loss": 0.088, "test_score": 0.9775,
        "score_name": "accuracy",
    });
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    model
}

fn ps_cluster(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ps-cluster")).args(args).output().expect("run ps-cluster")
}

#[test]
fn export_writes_safetensors_and_a_card_that_read_back() {
    let dir = temp_dir("export");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let model = run_folder(&run);

    let out = ps_cluster(&["export".as_ref(), run.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "export failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let export = run.join("export");
    assert!(stdout.contains("model.safetensors") && stdout.contains("card.json"), "{stdout}");
    assert_eq!(import(&export).expect("the export reads back"), model);

    let card = ModelCard::read(&export).expect("card.json reads back");
    assert_eq!(card.architecture, model.model);
    assert_eq!(card.metrics["test_accuracy"], 0.9775);
    assert_eq!(card.metrics["test_loss"], 0.088);
    assert!(card.preprocessing.iter().any(|p| p.contains("byte / 255")), "{:?}", card.preprocessing);
    let run_info = card.run.expect("the run");
    assert_eq!(run_info.config_toml, include_str!("../../examples/config/mnist.toml"));
    let names: Vec<&str> = card.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);

    // --out elsewhere; a folder without a model is an error that names the file.
    let elsewhere = dir.join("elsewhere");
    let out = ps_cluster(&["export".as_ref(), run.as_os_str(), "--out".as_ref(), elsewhere.as_os_str()]);
    assert!(out.status.success());
    assert_eq!(import(&elsewhere).unwrap(), model);
    std::fs::remove_file(run.join("model.msgpack")).unwrap();
    let out = ps_cluster(&["export".as_ref(), run.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("model.msgpack"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
