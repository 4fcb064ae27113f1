//! `ps-cluster bench`: throughput figures, each beside a baseline measured in
//! the same run (these machines are noisy; ratios travel better than
//! absolute numbers).
//!
//! 1. Training: samples/s of the reference MNIST job with 1 and 2 worker
//!    processes (2 shard processes), against one process training the same
//!    model with no servers at all.
//! 2. Transport: pull and push of a 1M-float dense tensor over loopback gRPC,
//!    against a plain memcpy of the same bytes.
//! 3. Server apply: params/s of each optimizer rule applied by the store
//!    (validation, locking), against the bare rule on a slice.
//! 4. Checkpoints: samples/s of the reference job with and without periodic
//!    checkpoints (alternating runs); and the write rate of a checkpoint of
//!    a large model (2 shards in-process) against `dd ... conv=fsync` of the
//!    same bytes to the same disk, and its push hold against a memcpy.

use std::path::Path;
use std::time::{Duration, Instant};

use ps_common::optim::Rule;
use ps_common::spec::{Init, InitKind, Layout, TableSpec};
use ps_model::Mlp;
use ps_server::store::{PushInfo, Store};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use ps_worker::config::RunConfig;
use ps_worker::data::{BatchBuf, Batches};

use crate::artifact::RunSummary;
use crate::cluster::{Error, Result};
use crate::run::{self, Plan};

/// Bench settings.
pub struct BenchOptions {
    /// Epochs of each training measurement.
    pub epochs: u32,
    /// Repetitions of each transport and apply measurement.
    pub reps: u32,
    /// Sections to run (`training`, `transport`, `apply`, `checkpoint`);
    /// empty: all.
    pub only: Vec<String>,
}

impl BenchOptions {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64().max(1e-12)
}

/// Runs every benchmark and prints the figures.
pub async fn run_all(exe: &Path, reference: &str, opts: &BenchOptions) -> Result<()> {
    let config = RunConfig::from_toml(reference)?;
    if opts.wants("training") {
        training(exe, &config, opts).await?;
    }
    if opts.wants("transport") {
        println!("\n== transport: 1M-float dense tensor over loopback gRPC (1 shard, in-process) ==");
        transport(opts.reps).await?;
    }
    if opts.wants("apply") {
        println!("\n== server apply rate (1M params per push, store without network) ==");
        apply_rates(opts.reps)?;
    }
    if opts.wants("checkpoint") {
        println!("\n== checkpoints ==");
        checkpoint_overhead(exe, &config, opts).await?;
        checkpoint_write(opts.reps.clamp(1, 5)).await?;
    }
    Ok(())
}

/// A scratch folder on the disk of the working directory (where run
/// folders and their checkpoints live), removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let dir = Path::new("target").join(format!("bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { what: "scratch dir".into(), source })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Samples/s of one run of `config`, its workers' loops summed.
async fn training_rate(exe: &Path, config: RunConfig, dir: &Path, name: &str) -> Result<(f64, RunSummary)> {
    let run_dir = crate::cluster::new_run_dir(dir, name)?;
    let s = run::run(Plan::new(exe, config, run_dir), |_, _| {}).await?;
    // Steady state: the workers' training loops, summed (they run in parallel).
    let looped: f64 = s
        .done
        .iter()
        .map(|e| if let ps_worker::event::Event::Done(d) = e { d.samples_per_s } else { 0.0 })
        .sum();
    Ok((looped, s))
}

async fn training(exe: &Path, config: &RunConfig, opts: &BenchOptions) -> Result<()> {
    println!("== training throughput (reference MLP, batch 32, {} epoch(s)) ==", opts.epochs);
    let local = local_training(config, opts.epochs)?;
    println!("{:<44} {:>10.0} samples/s   (baseline)", "1 process, no servers (local Adam)", local);
    let tmp = Scratch::new("train")?;
    for workers in [1, 2] {
        let mut c = config.clone();
        c.cluster.workers = workers;
        c.job.epochs = opts.epochs;
        c.job.eval_every_epochs = 0;
        c.registry.register = false;
        let (looped, s) = training_rate(exe, c, &tmp.0, &format!("bench-w{workers}")).await?;
        println!(
            "{:<44} {:>10.0} samples/s   ({:.2}x baseline; {:.0} samples/s end to end incl. start-up; test acc {:.4})",
            format!("2 shard + {workers} worker process(es)"),
            looped,
            looped / local,
            s.samples_per_s,
            s.test_score
        );
    }
    Ok(())
}

/// The reference job with and without checkpoints, alternating (two runs
/// each), at the default interval.
async fn checkpoint_overhead(exe: &Path, config: &RunConfig, opts: &BenchOptions) -> Result<()> {
    let tmp = Scratch::new("overhead")?;
    let mut rates = [Vec::new(), Vec::new()];
    let mut taken = Vec::new();
    for round in 0..2 {
        for (i, on) in [false, true].into_iter().enumerate() {
            let mut c = config.clone();
            c.job.epochs = opts.epochs;
            c.registry.register = false;
            c.checkpoint.enabled = on;
            let (rate, s) = training_rate(exe, c, &tmp.0, &format!("ckpt-{on}-{round}")).await?;
            rates[i].push(rate);
            if on {
                taken.push((s.checkpoints.taken, s.checkpoints.mean_held_ms, s.checkpoints.last_bytes));
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (off, on) = (mean(&rates[0]), mean(&rates[1]));
    println!(
        "{:<44} {:>10.0} samples/s   (baseline; runs {:?})",
        format!("reference job, {} epoch(s), no checkpoints", opts.epochs),
        off,
        rates[0].iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    let every = config.checkpoint.every_s;
    println!(
        "{:<44} {:>10.0} samples/s   ({:+.1}% vs baseline; runs {:?}; checkpoints per run, mean hold ms, bytes: {:?})",
        format!("same, checkpoint every {every} s"),
        on,
        100.0 * (on / off - 1.0),
        rates[1].iter().map(|r| r.round()).collect::<Vec<_>>(),
        taken
    );
    Ok(())
}

/// One large checkpoint (2 shards in-process, a 16M-parameter Adam tensor:
/// 192 MB of values and state) against dd of the same bytes.
async fn checkpoint_write(reps: u32) -> Result<()> {
    use ps_server::checkpoint::coordinator;
    const N: u64 = 16 << 20;
    let tmp = Scratch::new("write")?;
    let ckpts = tmp.0.join("checkpoints");
    let config = ps_server::ServerConfig { checkpoint_dir: Some(ckpts.clone()), ..Default::default() };
    let shards = ps_server::local::LocalShards::start_with(&config, 2).await?;
    let client = ShardedClient::connect(&shards.addrs, 1, ClientOptions::default()).await?;
    let mut spec = TableSpec::dense("big", &[N], Init::zeros(), Rule::adam(1e-3).into());
    spec.layout = Layout::Dense { shape: vec![N], chunk_len: 1 << 16 };
    client.register(&spec).await?;
    let mut opts = coordinator::Options::new(&ckpts);
    opts.keep = 1;
    let mut best: Option<(f64, f64, u64)> = None;
    for _ in 0..reps {
        let m = coordinator::take_once(&shards.addrs, &opts).await?;
        let (total, held) = (m.total_ms, m.held_ms);
        if best.is_none_or(|(t, _, _)| total < t) {
            best = Some((total, held, m.bytes()));
        }
    }
    drop(client);
    shards.stop().await?;
    let Some((total_ms, held_ms, bytes)) = best else { return Ok(()) };
    let mb = bytes as f64 / 1e6;

    // The same bytes through dd, fsynced, to the same disk.
    let dd_file = tmp.0.join("dd.bin");
    let count = bytes.div_ceil(1 << 20);
    let mut dd_ms = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let out = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "conv=fsync", "status=none", &format!("count={count}")])
            .arg(format!("of={}", dd_file.display()))
            .status()
            .map_err(|source| Error::Io { what: "running dd".into(), source })?;
        if !out.success() {
            return Err(Error::Config(format!("dd failed: {out}")));
        }
        dd_ms = dd_ms.min(t.elapsed().as_secs_f64() * 1e3);
        let _ = std::fs::remove_file(&dd_file);
    }
    // And the push hold against copying the same bytes in memory.
    let src = vec![1u8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    let t = Instant::now();
    dst.copy_from_slice(std::hint::black_box(&src));
    let memcpy_ms = t.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&dst);
    println!(
        "{:<44} {:>10.0} MB/s         (baseline: {mb:.0} MB in {dd_ms:.0} ms)",
        "dd bs=1M conv=fsync",
        mb / dd_ms * 1e3
    );
    println!(
        "{:<44} {:>10.0} MB/s         ({:.2}x dd; {mb:.0} MB in {total_ms:.0} ms, best of {reps})",
        "checkpoint, 2 shards, 16M Adam params",
        mb / total_ms * 1e3,
        (mb / total_ms) / (mb / dd_ms)
    );
    println!(
        "{:<44} {:>10.1} ms           (memcpy of the same bytes: {memcpy_ms:.1} ms)",
        "  pushes held (hold + drain + copy)", held_ms
    );
    Ok(())
}

/// One process, no servers: the same model, data order and optimizer.
fn local_training(config: &RunConfig, epochs: u32) -> Result<f64> {
    let job = &config.job;
    let (train, _) = ps_worker::workload::mnist::load(job)?;
    let ps_worker::config::Workload::MnistMlp { layers, .. } = &job.workload else {
        return Err(Error::Config("the bench needs an MNIST job".into()));
    };
    let mlp = Mlp::new(layers);
    let mut params = mlp.init_params(job.seed);
    let mut grads = vec![0.0; params.len()];
    let rule = job.optimizer.rule;
    let mut state = vec![0.0; params.len() * rule.state_per_param()];
    rule.init_state(&params, &mut state);
    let mut ws = mlp.workspace(job.batch_size);
    let mut batch = BatchBuf::new();
    let mut batches = Batches::new(train.len(), job.batch_size, job.seed);
    let (mut step, mut samples) = (0u64, 0usize);
    let t = Instant::now();
    for epoch in 0..epochs {
        for rows in batches.epoch(u64::from(epoch)) {
            train.gather(rows, &mut batch);
            mlp.loss_and_grad(&params, batch.x(), batch.y(), &mut grads, &mut ws);
            step += 1;
            rule.apply(step, 1.0, &mut params, &grads, &mut state);
            samples += rows.len();
        }
    }
    Ok(rate(samples as f64, t.elapsed()))
}

async fn transport(reps: u32) -> Result<()> {
    const N: usize = 1 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| Error::Io { what: "bind".into(), source })?;
    let addr = listener.local_addr().map_err(|source| Error::Io { what: "addr".into(), source })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ps_server::serve(ps_server::ServerConfig::default(), listener, async {
        let _ = stopped.await;
    }));
    let mut client = ShardedClient::connect(&[addr.to_string()], 1, ClientOptions::default()).await?;
    let mut spec = TableSpec::dense("bench", &[N as u64], Init::zeros(), Rule::sgd(1e-6).into());
    spec.layout = Layout::Dense { shape: vec![N as u64], chunk_len: 1 << 18 };
    client.register(&spec).await?;
    let set = DenseSet::new(&[spec], 1)?;
    let mut buf = vec![0.5f32; N];
    let bytes = (N * 4) as f64;

    let src = vec![1u8; N * 4];
    let mut dst = vec![0u8; N * 4];
    let t = Instant::now();
    for _ in 0..reps * 10 {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    let memcpy = rate(bytes * f64::from(reps * 10), t.elapsed());
    std::hint::black_box(&dst);
    println!("{:<44} {:>10.0} MB/s         (baseline)", "memcpy of 4 MiB", memcpy / 1e6);

    client.pull_dense(&set, 0, &mut buf).await?;
    let t = Instant::now();
    for _ in 0..reps {
        client.pull_dense(&set, 0, &mut buf).await?;
    }
    let d = t.elapsed();
    println!(
        "{:<44} {:>10.0} MB/s  {:>8.1} Mparams/s   ({:.3}x memcpy)",
        "pull 1M floats",
        rate(bytes * f64::from(reps), d) / 1e6,
        rate((N as u64 * u64::from(reps)) as f64, d) / 1e6,
        rate(bytes * f64::from(reps), d) / memcpy
    );
    let t = Instant::now();
    for _ in 0..reps {
        client.push_dense(&set, &buf, 0, 0, false).await?;
    }
    let d = t.elapsed();
    println!(
        "{:<44} {:>10.0} MB/s  {:>8.1} Mparams/s   ({:.3}x memcpy; includes SGD apply)",
        "push 1M floats",
        rate(bytes * f64::from(reps), d) / 1e6,
        rate((N as u64 * u64::from(reps)) as f64, d) / 1e6,
        rate(bytes * f64::from(reps), d) / memcpy
    );
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}

fn apply_rates(reps: u32) -> Result<()> {
    const N: usize = 1 << 20;
    let rules = [
        ("sgd", Rule::sgd(0.01)),
        (
            "momentum",
            Rule::Momentum { lr: 0.01, momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0 },
        ),
        (
            "nesterov",
            Rule::Momentum { lr: 0.01, momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 0.0 },
        ),
        ("adagrad", Rule::Adagrad { lr: 0.01, eps: 1e-10, initial_accumulator: 0.0, weight_decay: 0.0 }),
        ("adam", Rule::adam(1e-3)),
        (
            "adamw",
            Rule::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true },
        ),
        ("ftrl", Rule::Ftrl { alpha: 0.1, beta: 1.0, l1: 0.01, l2: 0.01 }),
    ];
    let grad: Vec<f32> = (0..N).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    println!("{:<10} {:>16} {:>18} {:>8}", "rule", "bare Mparams/s", "store Mparams/s", "ratio");
    for (name, rule) in rules {
        let mut params = vec![0.1f32; N];
        let mut state = vec![0.0f32; N * rule.state_per_param()];
        rule.init_state(&params, &mut state);
        let t = Instant::now();
        for step in 1..=u64::from(reps) {
            rule.apply(step, 1.0, &mut params, std::hint::black_box(&grad), &mut state);
        }
        let bare = rate((N as u64 * u64::from(reps)) as f64, t.elapsed());

        let store = Store::new(0, 1);
        let mut spec = TableSpec::dense(
            "w",
            &[N as u64],
            Init { kind: InitKind::Constant { value: 0.1 }, seed: 0 },
            rule.into(),
        );
        spec.layout = Layout::Dense { shape: vec![N as u64], chunk_len: 1 << 16 };
        store.register(spec, 1).map_err(|e| Error::Config(e.to_string()))?;
        let chunks: Vec<(&str, u32, &[f32])> =
            (0..16).map(|i| ("w", i as u32, &grad[i * (1 << 16)..(i + 1) * (1 << 16)])).collect();
        let t = Instant::now();
        for _ in 0..reps {
            store.push_dense(&chunks, PushInfo::default()).map_err(|e| Error::Config(e.to_string()))?;
        }
        let via_store = rate((N as u64 * u64::from(reps)) as f64, t.elapsed());
        println!("{name:<10} {:>16.0} {:>18.0} {:>8.2}", bare / 1e6, via_store / 1e6, via_store / bare);
    }
    Ok(())
}
