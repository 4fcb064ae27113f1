//! Consistency models end to end: BSP against a serial simulation, workers
//! killed mid-run under BSP and SSP, and Ctrl-C on the launcher.
//!
//! The in-process tests run shards ([`LocalShards`]) and workers
//! (`ps_worker::train::run`) as tasks of the test; the others start the real
//! launcher binary, which starts shard and worker processes. Every job is a
//! small MLP on a subset of MNIST, seeded.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ps_common::optim::Rule;
use ps_common::spec::{Consistency, Init, TableSpec};
use ps_server::ServerConfig;
use ps_server::local::LocalShards;
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use ps_worker::config::{JobConfig, RunConfig};
use ps_worker::data::{BatchBuf, Batches};
use ps_worker::event::Event;
use ps_worker::session::WorkerId;
use ps_worker::train;
use ps_worker::workload::mnist;

use crate::util::TempDir;

/// A run file: 2 shards, 2 workers, an MNIST MLP of `layers`, plain SGD,
/// no evaluation; `job` adds [job] keys (batch size 32 and the first 4,000
/// training images unless it sets them).
pub(crate) fn run_file(layers: &str, job: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let mut job = job.to_string();
    for (key, value) in [("batch_size", "32"), ("train_limit", "4000")] {
        if !job.contains(key) {
            job += &format!("\n{key} = {value}");
        }
    }
    format!(
        r#"
[cluster]
servers = 2
workers = 2

[job]
seed = 3
eval_every_epochs = 0
progress_every_ms = 100
{job}

[job.workload]
kind = "mnist_mlp"
data_dir = "{}"
layers = {layers}
chunk_len = 2048

[job.optimizer]
rule = "sgd"
lr = 0.05
"#,
        data.display()
    )
}

fn job(text: &str) -> JobConfig {
    RunConfig::from_toml(text).expect("valid run file").job
}

/// Every parameter of the job's MLP, pulled by a reader outside the clock set.
async fn pull_params(job: &JobConfig, addrs: &[String]) -> Vec<f32> {
    let (_, tables) = mnist::model(job).expect("an MNIST job");
    let client = ShardedClient::connect(addrs, u64::MAX, ClientOptions::default()).await.expect("connect");
    for t in &tables {
        client.register(t).await.expect("register");
    }
    let set = DenseSet::new(&tables, client.num_shards()).expect("dense set");
    let mut params = vec![0.0; set.len()];
    client.pull_dense(&set, 0, &mut params).await.expect("pull");
    params
}

/// Trains worker `index` of 2 in-process; returns its events.
async fn train_worker(job: JobConfig, addrs: Vec<String>, index: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut reporter = |e: Event| events.push(e);
    train::run(&job, &addrs, WorkerId { index, count: 2 }, &mut reporter).await.expect("worker trains");
    events
}

/// How the two workers' gradients of one clock are applied in [`simulate`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    /// Both on the same parameters, then the sum (BSP).
    Together,
    /// Worker `w`'s first, the other's on the result.
    First(usize),
}

/// The serial reading of BSP with plain SGD: at every clock, each worker's
/// gradient is computed on the same parameters, then all are applied:
/// `params -= lr * sum`. Data order as in `train::worker_batches`: worker
/// `i` shuffles its shard with seed `seed ^ (i << 32)`. `order(clock)` may
/// instead apply the workers one after the other at some clocks.
fn simulate(job: &JobConfig, init: &[f32], lr: f32, order: impl Fn(usize) -> Order) -> Vec<f32> {
    let (mlp, _) = mnist::model(job).expect("an MNIST job");
    let (data, _) = mnist::load(job).expect("load mnist");
    let shards: Vec<_> = (0..2).map(|i| data.shard(i, 2).expect("shard")).collect();
    let mut batches: Vec<Batches> =
        (0..2).map(|i| Batches::new(shards[i].len(), job.batch_size, job.seed ^ (i as u64) << 32)).collect();
    let mut params = init.to_vec();
    let mut grad = vec![0.0; params.len()];
    let mut sum = vec![0.0; params.len()];
    let mut ws = mlp.workspace(job.batch_size);
    let mut batch = BatchBuf::new();
    let mut clock = 0;
    for epoch in 0..u64::from(job.epochs) {
        let orders: Vec<Vec<Vec<usize>>> =
            batches.iter_mut().map(|b| b.epoch(epoch).map(<[usize]>::to_vec).collect()).collect();
        assert_eq!(orders[0].len(), orders[1].len(), "equal shards give equal clocks");
        // `i` indexes both workers' batch lists, in the order the clock dictates.
        #[allow(clippy::needless_range_loop)]
        for i in 0..orders[0].len() {
            sum.fill(0.0);
            let workers = match order(clock) {
                Order::Together => [0, 1],
                Order::First(w) => [w, 1 - w],
            };
            for w in workers {
                shards[w].gather(&orders[w][i], &mut batch);
                mlp.loss_and_grad(&params, batch.x(), batch.y(), &mut grad, &mut ws);
                match order(clock) {
                    Order::Together => sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g),
                    Order::First(_) => params.iter_mut().zip(&grad).for_each(|(p, g)| *p -= lr * g),
                }
            }
            params.iter_mut().zip(&sum).for_each(|(p, s)| *p -= lr * s);
            clock += 1;
        }
    }
    params
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bsp_with_sgd_equals_the_serial_simulation() {
    // BSP guarantees that a read of clock c sees every push of clocks < c;
    // it may also see pushes of clock c from a worker that got there first,
    // which the serial simulation does not model. After each read both
    // workers sleep (exponential, mean 50 ms) before they compute, so the
    // other worker's read, served when the same barrier opens, comes first.
    // Reads of clock 0 have no barrier: the workers leave the start barrier
    // a poll apart, and the later one may see the earlier one's first push;
    // so clock 0 may also have run in either order. (Factor stragglers would
    // not do: their sleep grows with time blocked in reads, and two of them
    // under BSP feed each other.)
    let text = run_file(
        "[784, 16, 10]",
        r#"epochs = 2
train_limit = 1000
batch_size = 50
consistency = { model = "bsp" }
overlap = true
straggler = { kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 50.0 }"#,
    );
    let job = job(&text);
    let shards = LocalShards::start(2).await.expect("start shards");
    let init = pull_params(&job, &shards.addrs).await;
    let workers: Vec<_> =
        (0..2).map(|i| tokio::spawn(train_worker(job.clone(), shards.addrs.clone(), i))).collect();
    for w in workers {
        let events = w.await.expect("worker task");
        assert!(matches!(events.last(), Some(Event::Done(d)) if d.iters == 20), "{events:?}");
    }
    let trained = pull_params(&job, &shards.addrs).await;
    shards.stop().await.expect("stop shards");

    let first = |w| move |clock| if clock == 0 { Order::First(w) } else { Order::Together };
    let admissible = [
        simulate(&job, &init, 0.05, |_| Order::Together),
        simulate(&job, &init, 0.05, first(0)),
        simulate(&job, &init, 0.05, first(1)),
    ];
    let errs: Vec<f32> = admissible.iter().map(|p| max_abs_diff(&trained, p)).collect();
    let err = errs.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(err < 1e-4, "BSP differs from every serial simulation: {errs:?}");
    // The check has teeth: training moved the parameters, and applying the
    // workers one after the other at every clock (ASP-like) lands elsewhere.
    let moved = max_abs_diff(&init, &admissible[0]);
    assert!(moved > 0.05, "training moved the parameters by only {moved}");
    let sequential = simulate(&job, &init, 0.05, |_| Order::First(0));
    let wrong = admissible.iter().map(|p| max_abs_diff(&sequential, p)).fold(f32::INFINITY, f32::min);
    assert!(wrong > 100.0 * err.max(1e-6), "sequential updates differ by only {wrong}");
}

/// One worker under ASP with SGD, by the serial reading of `pipeline`:
/// each epoch's first batch is computed on the weights as they are, every
/// later one on the weights before the last update was applied (the
/// worker's push of it was still in flight). `delayed = false` is the
/// plain loop's reading, for comparison.
fn simulate_one(job: &JobConfig, init: &[f32], lr: f32, delayed: bool) -> Vec<f32> {
    let (mlp, _) = mnist::model(job).expect("an MNIST job");
    let (data, _) = mnist::load(job).expect("load mnist");
    let mut batches = Batches::new(data.len(), job.batch_size, job.seed);
    let (mut params, mut before) = (init.to_vec(), init.to_vec());
    let mut grad = vec![0.0; params.len()];
    let mut ws = mlp.workspace(job.batch_size);
    let mut batch = BatchBuf::new();
    for epoch in 0..u64::from(job.epochs) {
        for (i, rows) in batches.epoch(epoch).enumerate() {
            data.gather(rows, &mut batch);
            let at = if delayed && i > 0 { &before } else { &params };
            mlp.loss_and_grad(at, batch.x(), batch.y(), &mut grad, &mut ws);
            before.copy_from_slice(&params);
            params.iter_mut().zip(&grad).for_each(|(p, g)| *p -= lr * g);
        }
    }
    params
}

/// One worker under ASP (deterministic, so exact) with SGD and `option`
/// (a line of the job table), 2 epochs of 640 rows on 2 shards: how far
/// the trained parameters are from `simulate_one`'s reading with `delayed`,
/// and from the other reading.
async fn one_asp_worker(option: &str, delayed: bool) -> (f32, f32) {
    let text = run_file(
        "[784, 16, 10]",
        &format!("epochs = 2\ntrain_limit = 640\nconsistency = {{ model = \"asp\" }}\n{option}"),
    );
    let job = job(&text);
    let shards = LocalShards::start(2).await.expect("start shards");
    let init = pull_params(&job, &shards.addrs).await;
    let mut events = Vec::new();
    let mut reporter = |e: Event| events.push(e);
    train::run(&job, &shards.addrs, WorkerId { index: 0, count: 1 }, &mut reporter)
        .await
        .expect("worker trains");
    assert!(matches!(events.last(), Some(Event::Done(d)) if d.iters == 40), "{:?}", events.last());
    let trained = pull_params(&job, &shards.addrs).await;
    shards.stop().await.expect("stop shards");
    let err = max_abs_diff(&trained, &simulate_one(&job, &init, 0.05, delayed));
    let other = max_abs_diff(&trained, &simulate_one(&job, &init, 0.05, !delayed));
    (err, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_worker_computes_each_batch_on_the_weights_before_its_last_push() {
    let (err, fresh) = one_asp_worker("pipeline = true", true).await;
    assert!(err < 1e-4, "the pipelined run differs from its serial reading by {err}");
    // The check has teeth: the plain loop's reading lands elsewhere.
    assert!(fresh > 100.0 * err.max(1e-6), "fresh-weight SGD differs by only {fresh}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapped_worker_trains_as_serial_sgd() {
    // With `overlap` each push travels with the next pull, which the shard
    // runs after it, so every batch is computed on the weights after the
    // worker's own last push: serial SGD exactly. A pull served before its
    // push (or a batch computed on stale weights, as `pipeline` does
    // knowingly) lands on the delayed reading instead.
    let (err, delayed) = one_asp_worker("overlap = true", false).await;
    assert!(err < 1e-4, "the overlapped run differs from serial SGD by {err}");
    assert!(delayed > 100.0 * err.max(1e-6), "delayed-gradient SGD differs by only {delayed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_in_process_is_reaped_and_the_shards_keep_serving() {
    // Worker 1 runs on a runtime of its own; shutting that runtime down ends
    // its training and heartbeat tasks and drops its connections without a
    // Leave, as SIGKILL would.
    let text = run_file(
        "[784, 16, 10]",
        r#"epochs = 100
max_iters = 300
lease_ms = 500
consistency = { model = "bsp" }
straggler = { kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 5.0 }"#,
    );
    let job = job(&text);
    let shards =
        LocalShards::start_with(&ServerConfig { reap_interval_ms: 50, ..ServerConfig::default() }, 2)
            .await
            .expect("start shards");
    let started = Instant::now();
    let doomed =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (job1, addrs1) = (job.clone(), shards.addrs.clone());
    doomed.spawn(async move {
        let mut reporter = move |e: Event| {
            let _ = tx.send(e);
        };
        let _ = train::run(&job1, &addrs1, WorkerId { index: 1, count: 2 }, &mut reporter).await;
    });
    let survivor = tokio::spawn(train_worker(job.clone(), shards.addrs.clone(), 0));
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("worker 1 makes progress")
        {
            Some(Event::Progress { iter, .. }) if iter >= 30 => break,
            Some(_) => {}
            None => panic!("worker 1 ended early"),
        }
    }
    doomed.shutdown_background();

    let events = tokio::time::timeout(Duration::from_secs(25), survivor)
        .await
        .expect("worker 0 is not held up by the dead worker")
        .expect("worker task");
    assert!(matches!(events.last(), Some(Event::Done(d)) if d.iters == 300), "{:?}", events.last());
    let client =
        ShardedClient::connect(&shards.addrs, u64::MAX, ClientOptions::default()).await.expect("connect");
    let stats = client.stats().await.expect("shards answer stats after the death");
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert!(s.clocks.is_empty(), "worker 0 left and worker 1 was reaped: {:?}", s.clocks);
        assert_eq!(s.consistency.and_then(|c| Consistency::try_from(c).ok()), Some(Consistency::Bsp));
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    shards.stop().await.expect("stop shards");
}

/// The start barrier stays released when the worker that released it has
/// finished and left: a fast worker can train its whole share between two
/// polls of a slow one (seen in `multihost`, where worker 1 joined, trained
/// 16 iterations and left in 11 ms, and worker 0 then waited out the whole
/// barrier). The shards answer from the highest clock any worker had, not
/// from the members' clocks now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_barrier_stays_released_after_the_releasing_worker_left() {
    let shards = LocalShards::start(2).await.expect("start shards");
    let spec = TableSpec::dense("w", &[64], Init::zeros(), Rule::sgd(0.1).into());
    let lease = Duration::from_secs(5);
    let connect = |w| ShardedClient::connect(&shards.addrs, w, ClientOptions::default());
    let mut fast = connect(1).await.expect("connect worker 1");
    fast.register(&spec).await.expect("register");
    fast.join(Consistency::Asp, lease, 0).await.expect("worker 1 joins");
    let set = DenseSet::new(std::slice::from_ref(&spec), 2).expect("dense set");
    for clock in 0..3 {
        fast.push_dense(&set, &[0.5; 64], clock, clock, true).await.expect("worker 1 pushes");
    }
    fast.leave().await.expect("worker 1 leaves");

    let mut slow = connect(0).await.expect("connect worker 0");
    slow.register(&spec).await.expect("register");
    slow.join(Consistency::Asp, lease, 0).await.expect("worker 0 joins");
    let asked = Instant::now();
    let released = slow.wait_for_members(2, Duration::from_secs(5)).await.expect("heartbeats");
    assert!(released, "worker 0 waited out the barrier although worker 1 had trained and left");
    assert!(asked.elapsed() < Duration::from_secs(1), "released after {:?}", asked.elapsed());
    shards.stop().await.expect("stop shards");
}

/// Runs `ps-cluster train` on `run_file` with a fault injected (`--kill-worker
/// 1:S` or `--kill-server 1:S`); returns (exit success, summary.json,
/// stats.json, elapsed).
pub(crate) fn train_with_a_fault(
    run_file: &str,
    fault: [&str; 2],
) -> (bool, serde_json::Value, serde_json::Value, Duration) {
    let dir = TempDir::new("kill");
    let config = dir.0.join("run.toml");
    std::fs::write(&config, run_file).expect("write run file");
    let log = std::fs::File::create(dir.0.join("launcher.log")).expect("log file");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ps-cluster"))
        .args(["train", "--config"])
        .arg(&config)
        .args(fault)
        .arg("--runs-dir")
        .arg(dir.0.join("runs"))
        .env("PS_REGISTRY_ROOT", dir.0.join("registry"))
        .env_remove("PS_REGISTRY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start ps-cluster");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ps-cluster") {
            break status;
        }
        // Generous: a deadlock never ends, and two of these runs share two
        // cores with the other tests of this binary.
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "launcher hung: {}",
                std::fs::read_to_string(dir.0.join("launcher.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let run = std::fs::read_dir(dir.0.join("runs"))
        .expect("runs folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a run folder");
    let read = |name: &str| -> serde_json::Value {
        let path = run.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; launcher said: {}\n{}",
                path.display(),
                std::fs::read_to_string(dir.0.join("launcher.log")).unwrap_or_default(),
                log_tails(&run)
            )
        });
        serde_json::from_str(&text).expect("valid json")
    };
    (status.success(), read("summary.json"), read("stats.json"), elapsed)
}

/// The end of each process log in a run folder: what a failed run's shards
/// and workers said, for the test's message (the folder is deleted after).
fn log_tails(run: &Path) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let mut out = String::new();
    for path in logs {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        out += &format!("--- {} (last 20 lines)\n{tail}\n", path.display());
    }
    out
}

/// Worker 1 is killed at 3 s, mid-run (workers start within ~1.5 s and
/// train for ~5 s); worker 0 must still finish all 500 iterations.
fn check_kill(consistency: &str) {
    let text = run_file(
        "[784, 16, 10]",
        &format!(
            r#"epochs = 100
max_iters = 500
lease_ms = 1000
consistency = {consistency}
straggler = {{ kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 10.0 }}"#
        ),
    );
    let (ok, summary, stats, elapsed) = train_with_a_fault(&text, ["--kill-worker", "1:3"]);
    assert!(!ok, "the launcher reports the killed worker as a failure");
    let failed = summary["failed"].as_array().expect("failed list");
    assert_eq!(failed.len(), 1, "{summary}");
    assert_eq!(failed[0][0], 1, "{summary}");
    let done = summary["done"].as_array().expect("done list");
    assert_eq!(done.len(), 1, "{summary}");
    assert_eq!(done[0]["worker"], 0, "{summary}");
    assert_eq!(done[0]["iters"], 500, "worker 0 finished every iteration: {summary}");
    // The shards answered stats after the SIGKILL, and the final evaluation ran.
    assert_eq!(stats["shards"].as_array().map(Vec::len), Some(2), "{stats}");
    assert!(summary["test_score"].as_f64().is_some_and(|a| a > 0.5), "{summary}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}

#[test]
fn a_killed_worker_does_not_deadlock_bsp() {
    check_kill(r#"{ model = "bsp" }"#);
}

#[test]
fn a_killed_worker_does_not_deadlock_ssp() {
    check_kill(r#"{ model = "ssp", staleness = 2 }"#);
}

/// Shard 1 is SIGKILLed mid-run under BSP; the launcher restarts it from
/// the newest checkpoint, the workers wait for it, rejoin, and finish every
/// iteration, and the summary says what was lost.
#[test]
fn a_killed_shard_is_restored_from_a_checkpoint_and_the_run_completes() {
    let text = run_file(
        "[784, 16, 10]",
        r#"epochs = 100
max_iters = 500
consistency = { model = "bsp" }
straggler = { kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 10.0 }"#,
    ) + "\n[checkpoint]\nevery_s = 0.5\n";
    let (ok, summary, _, elapsed) = train_with_a_fault(&text, ["--kill-server", "1:3"]);
    assert!(ok, "the run completes: {summary}");
    let done = summary["done"].as_array().expect("done list");
    assert_eq!(done.len(), 2, "{summary}");
    assert!(done.iter().all(|d| d["iters"] == 500), "every worker finished: {summary}");
    let recoveries = summary["recoveries"].as_array().expect("recoveries");
    assert_eq!(recoveries.len(), 1, "{summary}");
    let r = &recoveries[0];
    assert_eq!(r["shard"], 1, "{summary}");
    assert!(r["checkpoint"].as_str().is_some_and(|c| c.starts_with("ckpt-")), "{summary}");
    assert!(r["exit"].as_str().is_some_and(|e| e.contains("SIGKILL")), "{summary}");
    // Each worker's place at the checkpoint is no later than at the death.
    for w in r["workers"].as_array().expect("workers") {
        assert!(w[1].as_u64() <= w[2].as_u64(), "{summary}");
    }
    assert!(summary["checkpoints"]["taken"].as_u64().is_some_and(|n| n >= 2), "{summary}");
    assert!(summary["test_score"].as_f64().is_some_and(|a| a > 0.5), "{summary}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}

/// Every descendant of `pid` (children of all its threads, recursively).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.filter_map(Result::ok) {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(child);
            out.extend(descendants(child));
        }
    }
    out
}

/// Whether `pid` is still a process that runs (a zombie has exited).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[test]
fn ctrl_c_on_the_launcher_leaves_no_process_behind() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let dir = TempDir::new("sigint");
    let config = dir.0.join("run.toml");
    let text = run_file(
        "[784, 16, 10]",
        r#"epochs = 100
consistency = { model = "ssp", staleness = 2 }
straggler = { kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 10.0 }"#,
    );
    std::fs::write(&config, text).expect("write run file");
    // Its own process group, as a terminal's foreground job.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ps-cluster"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--runs-dir")
        .arg(dir.0.join("runs"))
        .env("PS_REGISTRY_ROOT", dir.0.join("registry"))
        .env_remove("PS_REGISTRY")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ps-cluster");
    let pid = child.id();
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("launcher starts");
        if line.starts_with("training ") {
            break;
        }
    }
    // 2 shard and 2 worker processes, and the workers past their start.
    let mut procs = descendants(pid);
    while procs.len() < 4 {
        assert!(Instant::now() < deadline, "only {procs:?} started");
        std::thread::sleep(Duration::from_millis(50));
        procs = descendants(pid);
    }
    std::thread::sleep(Duration::from_secs(2));
    procs = descendants(pid);
    assert!(procs.len() >= 4, "{procs:?}");

    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT)
        .expect("send SIGINT");
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if stopped.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("launcher still running 15 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "an interrupted run is not a success");
    // Orphans are reparented and reaped; give that a moment.
    let left = loop {
        let left: Vec<u32> = procs.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || stopped.elapsed() > Duration::from_secs(10) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
