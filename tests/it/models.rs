//! `ps-cluster models export`: a registered version leaves as safetensors
//! that read back to the same model, and a damaged artifact is never
//! exported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ps_model::export::{ModelCard, import};
use ps_model::{DenseTensor, ModelKind, SavedModel};
use ps_registry::{Lineage, NewVersion, Registry};

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

fn small_mlp() -> SavedModel {
    let tensor = |name: &str, shape: Vec<usize>| {
        let values = (0..shape.iter().product::<usize>()).map(|i| i as f32 * 0.01 - 0.1).collect();
        DenseTensor { name: name.into(), shape, values }
    };
    SavedModel::new(
        ModelKind::Mlp { layers: vec![784, 8, 10] },
        vec![
            tensor("fc1.weight", vec![784, 8]),
            tensor("fc1.bias", vec![8]),
            tensor("fc2.weight", vec![8, 10]),
            tensor("fc2.bias", vec![10]),
        ],
        Vec::new(),
    )
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
