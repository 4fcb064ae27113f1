//! Checkpoints of a live job, and resuming from them (in-process shards and
//! workers; the launcher's supervision is tested in `cluster.rs`).

use std::time::Duration;

use ps_server::ServerConfig;
use ps_server::checkpoint::{self, coordinator};
use ps_server::local::LocalShards;
use ps_worker::config::JobConfig;
use ps_worker::event::Event;
use ps_worker::session::WorkerId;

use crate::util::TempDir;

/// One worker, BSP, plain SGD: a run whose result does not depend on timing.
fn job() -> JobConfig {
    let text = format!(
        r#"
epochs = 2
batch_size = 50
train_limit = 2000
consistency = {{ model = "bsp" }}
seed = 11

[workload]
kind = "mnist_mlp"
data_dir = "{}"
layers = [784, 32, 10]
chunk_len = 4096

[optimizer]
rule = "sgd"
lr = 0.1
"#,
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")
    );
    toml::from_str(&text).expect("job")
}

fn shard_config(dir: &TempDir, restore: bool) -> ServerConfig {
    ServerConfig {
        checkpoint_dir: Some(dir.0.clone()),
        restore: restore.then(|| dir.0.clone()),
        ..ServerConfig::default()
    }
}

/// Trains worker 0 of 1 to the end; returns its events.
async fn train(job: &JobConfig, addrs: &[String]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut sink = |e| events.push(e);
    ps_worker::train::run(job, addrs, WorkerId { index: 0, count: 1 }, &mut sink).await.expect("train");
    events
}

/// The trained tensors, read back as the evaluator saves them.
async fn tensors(job: &JobConfig, addrs: &[String]) -> Vec<(String, Vec<f32>)> {
    let eval = ps_worker::train::evaluate_job(job, addrs).await.expect("evaluate");
    eval.model.expect("mnist saves").dense.into_iter().map(|t| (t.name, t.values)).collect()
}

async fn worker_clock(addrs: &[String]) -> u64 {
    let c = ps_worker::session::evaluator(&job(), addrs).await.unwrap();
    let stats = c.stats().await.unwrap();
    stats.iter().flat_map(|s| s.clocks.iter().map(|c| c.clock)).min().unwrap_or(0)
}

/// A BSP SGD run that is checkpointed mid-way, killed, and resumed from the
/// checkpoint on fresh shards ends with the parameters of a run that was
/// never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_and_resumed_bsp_sgd_run_ends_with_the_same_parameters() {
    let job = job();

    let dir_a = TempDir::new("straight");
    let shards = LocalShards::start_with(&shard_config(&dir_a, false), 2).await.unwrap();
    train(&job, &shards.addrs).await;
    let straight = tensors(&job, &shards.addrs).await;
    shards.stop().await.unwrap();

    // The same job, checkpointed while it trains, then killed.
    let dir = TempDir::new("resumed");
    let shards = LocalShards::start_with(&shard_config(&dir, false), 2).await.unwrap();
    let (j, addrs) = (job.clone(), shards.addrs.clone());
    let first = tokio::spawn(async move { train(&j, &addrs).await });
    while worker_clock(&shards.addrs).await < 15 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let manifest = coordinator::take_once(&shards.addrs, &coordinator::Options::new(&dir.0)).await.unwrap();
    first.abort();
    drop(shards);
    let cut = manifest.clock_of(0);
    assert!((15..80).contains(&cut), "cut at {cut} of 80 iterations");
    // Read back from disk (its float timings may differ in the last bit).
    let on_disk = checkpoint::latest(&dir.0, &ps_common::seal::Keys::none()).unwrap().unwrap().manifest;
    assert_eq!(
        (&on_disk.name, &on_disk.workers, &on_disk.shards.len()),
        (&manifest.name, &manifest.workers, &2)
    );

    let shards = LocalShards::start_with(&shard_config(&dir, true), 2).await.unwrap();
    let events = train(&job, &shards.addrs).await;
    let first_iter = events.iter().find_map(|e| match e {
        Event::Start { first_iter, .. } => Some(*first_iter),
        _ => None,
    });
    assert_eq!(first_iter, Some(cut), "the worker resumes at the cut");
    let resumed = tensors(&job, &shards.addrs).await;
    shards.stop().await.unwrap();

    assert_eq!(straight.len(), resumed.len());
    for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: resumed differs by up to {worst}");
    }
    // Not trivially equal: training moved the parameters.
    let init = LocalShards::start(2).await.unwrap();
    let untrained_diff: f32 = {
        let j = JobConfig { max_iters: Some(1), ..job.clone() };
        train(&j, &init.addrs).await;
        let t = tensors(&j, &init.addrs).await;
        t.iter()
            .zip(&straight)
            .map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>())
            .sum()
    };
    init.stop().await.unwrap();
    assert!(untrained_diff > 1.0, "the runs trained: {untrained_diff}");
}

/// A checkpoint written by real shards with keys: sealed on disk; a
/// tampered shard file is refused by the restore (each way an attacker
/// without the signing key, or with it but not the shard's file, could try),
/// the files are left as they were, and the intact checkpoint restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_signed_checkpoint_is_refused_and_left_unchanged() {
    use ps_common::seal::{self, KeyPaths};
    let job = job();
    let dir = TempDir::new("sealed");
    let keys_dir = dir.0.join("keys");
    let paths = seal::generate(&keys_dir, true).unwrap();
    let root = dir.0.join("checkpoints");
    let config =
        ServerConfig { checkpoint_dir: Some(root.clone()), seal: paths.clone(), ..ServerConfig::default() };
    let shards = LocalShards::start_with(&config, 2).await.unwrap();
    let (j, addrs) = (job.clone(), shards.addrs.clone());
    let training = tokio::spawn(async move { train(&j, &addrs).await });
    while worker_clock(&shards.addrs).await < 5 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut opts = coordinator::Options::new(&root);
    opts.keys = paths.load().unwrap();
    let manifest = coordinator::take_once(&shards.addrs, &opts).await.unwrap();
    training.abort();
    drop(shards);

    let ckpt = root.join(&manifest.name);
    let file1 = ckpt.join(checkpoint::shard_file_name(1, 2));
    let manifest_path = ckpt.join(checkpoint::MANIFEST);
    let (good, good_manifest) = (std::fs::read(&file1).unwrap(), std::fs::read(&manifest_path).unwrap());
    assert!(seal::is_sealed(&good) && seal::is_sealed(&good_manifest), "sealed on disk");

    let restore = |seal: KeyPaths| {
        let config = ServerConfig { restore: Some(ckpt.clone()), seal, ..ServerConfig::default() };
        async move {
            match LocalShards::start_with(&config, 2).await {
                Ok(shards) => shards.stop().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    // The readers hold the verify and encryption keys only.
    let reader = KeyPaths { signing_key: None, ..paths.clone() };
    restore(reader.clone()).await.expect("the intact checkpoint restores");

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    let sha = ps_registry::store::sha256_hex;
    let mut forged = manifest.clone();
    forged.shards[1].sha256 = sha(&flipped);
    let plain_manifest = serde_json::to_vec_pretty(&forged).unwrap();
    let resigned_manifest =
        opts.keys.signing_only().seal(checkpoint::MANIFEST_KIND, &plain_manifest).unwrap();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("a flipped byte", flipped.clone(), good_manifest.clone(), "does not match the manifest"),
        ("a flipped byte, manifest rewritten unsigned", flipped.clone(), plain_manifest, "not signed"),
        ("a flipped byte, manifest re-signed", flipped, resigned_manifest, "signature does not verify"),
        ("truncated", good[..good.len() - 1].to_vec(), good_manifest.clone(), "truncated"),
    ];
    for (what, file, manifest_bytes, message) in cases {
        std::fs::write(&file1, &file).unwrap();
        std::fs::write(&manifest_path, &manifest_bytes).unwrap();
        let err = restore(reader.clone()).await.expect_err(what);
        assert!(err.contains(message) && err.contains(&ckpt.display().to_string()), "{what}: {err}");
        assert_eq!(std::fs::read(&file1).unwrap(), file, "{what}: the file is left as it was");
    }
    std::fs::write(&file1, &good).unwrap();
    std::fs::write(&manifest_path, &good_manifest).unwrap();
    // Signed by another key, and encrypted without the key.
    let other = seal::generate(&dir.0.join("other"), false).unwrap();
    let err = restore(KeyPaths { signing_key: None, ..other }).await.unwrap_err();
    assert!(err.contains("not by the configured verify key"), "{err}");
    let err = restore(KeyPaths { encryption_key: None, ..reader.clone() }).await.unwrap_err();
    assert!(err.contains("no encryption key is configured") && err.contains("shard-"), "{err}");
    restore(reader).await.expect("the intact checkpoint restores again");
}
