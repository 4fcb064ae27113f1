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
    let on_disk = checkpoint::latest(&dir.0).unwrap().unwrap().manifest;
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
