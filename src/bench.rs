//! `ps-cluster bench`: throughput figures, each beside a baseline measured in
//! the same run (these machines are noisy; ratios travel better than
//! absolute numbers).
//!
//! 1. Training: samples/s of the reference MNIST job with 1 and 2 worker
//!    processes (2 shard processes), against one process training the same
//!    model with no servers at all.
//! 2. Transport: pulls and pushes of dense tensors over loopback gRPC
//!    (1M floats, 1k floats, the reference model), against raw loopback TCP
//!    moving the same bytes ([`baseline::Tcp`]) and a 32-byte ping-pong.
//! 3. Server apply: params/s of each optimizer rule applied by the store
//!    (validation, locking), against the bare rule on a slice and a memcpy
//!    of the same floats (memory bandwidth).
//! 4. Checkpoints: samples/s of the reference job with and without periodic
//!    checkpoints (alternating runs); and the write rate of a checkpoint of
//!    a large model (2 shards in-process) against `dd ... conv=fsync` of the
//!    same bytes to the same disk, and its push hold against a memcpy.

pub mod baseline;

use std::path::Path;
use std::time::{Duration, Instant};

use ps_common::codec::SharedF32;
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
        println!("\n== transport: dense pulls and pushes on the data plane beside raw loopback sockets ==");
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
    println!("{:<58} {:>10.0} samples/s   (baseline)", "1 process, no servers (local Adam)", local);
    let tmp = Scratch::new("train")?;
    let run = |workers: u32, plaintext: bool, data_plane: bool, tag: &'static str| {
        let mut c = config.clone();
        // `pipe` tags: each batch computed while the last push is in flight.
        c.job.pipeline = tag.contains("pipe");
        // `free` tags: processes not pinned to CPUs (the reference run pins them).
        c.cluster.pin_cpus &= !tag.contains("free");
        c.cluster.workers = workers;
        c.cluster.plaintext = plaintext;
        c.job.client.transport.data_plane = data_plane;
        // `tcp` tags: the data plane on loopback TCP, not the shards' Unix sockets.
        c.job.client.transport.local_socket = !tag.ends_with("tcp");
        // `kept` tags: TLS on the Unix socket's frames too, not only its handshake.
        c.job.client.transport.local_socket_tls = tag.ends_with("kept");
        c.job.epochs = opts.epochs;
        c.job.eval_every_epochs = 0;
        c.registry.register = false;
        training_rate(exe, c, &tmp.0, tag)
    };
    let mut tls = Vec::new();
    for workers in [1, 2] {
        let (looped, s) =
            run(workers, false, true, if workers == 1 { "bench-w1" } else { "bench-w2" }).await?;
        println!(
            "{:<58} {:>10.0} samples/s   ({:.2}x baseline; {:.0} samples/s end to end incl. start-up; test acc {:.4})",
            format!("2 shard + {workers} worker process(es)"),
            looped,
            looped / local,
            s.samples_per_s,
            s.test_score
        );
        if workers == 2 {
            tls.push(looped);
        }
    }
    // The same 2 + 2 run without TLS, the TLS + data plane default once more
    // (so that TLS is measured on both sides of the plaintext run), with TLS
    // kept on the Unix socket's frames (before and after the plaintext run
    // too), both on loopback TCP instead of the shards' Unix sockets, with
    // pulls and pushes over gRPC (no data plane), and plaintext with and
    // without `pipeline` (1 worker, where the worker waits on its round
    // trips, and 2, where the two cores are busy).
    let (mut plain, mut kept) = (0.0, Vec::new());
    for (label, plaintext, data_plane, tag) in [
        ("TLS kept on the Unix socket", false, true, "bench-tls-kept"),
        ("plaintext, data plane", true, true, "bench-plain"),
        ("plaintext, data plane, not pinned to CPUs", true, true, "bench-plain-free"),
        ("TLS, data plane (again)", false, true, "bench-tls2"),
        ("TLS kept on the Unix socket (again)", false, true, "bench-tls2-kept"),
        ("plaintext, data plane on loopback TCP", true, true, "bench-plain-tcp"),
        ("TLS, data plane on loopback TCP", false, true, "bench-tls-tcp"),
        ("TLS, gRPC only (no data plane)", false, false, "bench-grpc"),
        ("plaintext, data plane", true, true, "bench-plain-w1"),
        ("plaintext, data plane, pipelined", true, true, "bench-plain-w1-pipe"),
        ("plaintext, data plane, pipelined", true, true, "bench-plain-pipe"),
    ] {
        let workers = if tag.contains("-w1") { 1 } else { 2 };
        let (looped, s) = run(workers, plaintext, data_plane, tag).await?;
        println!(
            "{:<58} {:>10.0} samples/s   ({:.2}x baseline; test acc {:.4})",
            format!("2 shard + {workers} worker(s), {label}"),
            looped,
            looped / local,
            s.test_score
        );
        match (plaintext, data_plane, tag.ends_with("tcp"), tag.ends_with("kept")) {
            _ if workers == 1 || tag.contains("pipe") || tag.contains("free") => {}
            (true, _, false, _) => plain = looped,
            (false, true, false, false) => tls.push(looped),
            (false, true, false, true) => kept.push(looped),
            _ => {}
        }
    }
    let below = |runs: &[f64], what: &str| {
        let mean = runs.iter().sum::<f64>() / runs.len().max(1) as f64;
        let below = 100.0 * (1.0 - mean / plain.max(f64::MIN_POSITIVE));
        let (by, side) = if below >= 0.0 { (below, "below") } else { (-below, "above") };
        println!(
            "TLS against plaintext (data plane, 2 + 2), {what}: the runs before and after it average {mean:.0} \
             samples/s, {by:.1}% {side} plaintext's {plain:.0}"
        );
    };
    below(&tls, "TLS on TCP and for the Unix socket's handshake (the default)");
    below(&kept, "TLS on all the Unix socket's frames too (local_socket_tls)");
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

/// The reference model's parameter count (784-64-64-10 with biases).
pub const REFERENCE_PARAMS: usize = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10;

/// Dense transport on the data plane (1 shard, in-process), each figure
/// beside a raw loopback socket moving the same bytes in the same run:
/// pulls and pushes of 1M floats (speed as a fraction of the socket's),
/// 1k-float round trips against a 32-byte ping-pong, and one training
/// iteration of the reference model (its push and the next pull, sent
/// together as the trainer does). Twice: with the client on loopback TCP
/// (beside raw TCP), then on the shard's Unix socket (beside a raw Unix
/// socket, and raw TCP). Each figure and its baselines are timed in
/// alternating rounds ([`ROUNDS`]), so that a slow spell of the machine
/// falls on both.
async fn transport(reps: u32) -> Result<()> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| Error::Io { what: what.clone(), source }
    };
    let tmp = Scratch::new("transport")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(io("bind"))?;
    let addr = listener.local_addr().map_err(io("addr"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config =
        ps_server::ServerConfig { data_socket: Some(tmp.0.join("shard.sock")), ..Default::default() };
    let server = tokio::spawn(ps_server::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let memcpy = baseline::memcpy_rate(4 << 20, reps.max(3));
    println!("{:<40} {:>10.0} MB/s (memcpy of 4 MiB, for scale)", "memcpy", memcpy / 1e6);
    let mut tcp = baseline::Tcp::connect().await.map_err(io("loopback TCP baseline"))?;
    let mut unix =
        baseline::Tcp::connect_unix(&tmp.0.join("raw.sock")).await.map_err(io("Unix socket baseline"))?;
    for (worker, local) in [(1, false), (2, true)] {
        let mut options = ClientOptions::default();
        options.transport.local_socket = local;
        // A worker id of its own: a second client as the same worker would
        // start again at seq 1, and the shard would drop its pushes as
        // duplicates of the first one's instead of applying them.
        let mut client = ShardedClient::connect(&[addr.to_string()], worker, options).await?;
        let (on, raw) = if local { ("Unix socket", "raw Unix") } else { ("loopback TCP", "raw TCP") };
        println!(
            "{:<40} {:>10} {:>12} {:>16} {:>16}",
            format!("dense, 1 shard, on {on}"),
            "ms",
            format!("{raw} ms"),
            format!("speed / {raw}"),
            "speed / raw TCP"
        );
        for (n, chunk_len, rule, small) in [
            (1usize << 20, 1u32 << 18, Rule::sgd(1e-6), false),
            (1000, 1 << 18, Rule::sgd(1e-6), true),
            (REFERENCE_PARAMS, 1 << 16, Rule::adam(1e-3), false),
        ] {
            let name = format!("bench.{local}.{n}");
            let mut spec = TableSpec::dense(&name, &[n as u64], Init::zeros(), rule.into());
            spec.layout = Layout::Dense { shape: vec![n as u64], chunk_len };
            client.register(&spec).await?;
            let set = DenseSet::new(&[spec], 1)?;
            let mut buf = vec![0.5f32; n];
            let bytes = n * 4;
            // Enough repetitions for a few hundred ms each, in rounds.
            let per = if n >= 1 << 20 { reps.max(3) } else { reps.max(3) * 60 };
            let r = per * ROUNDS;
            client.pull_dense(&set, 0, &mut buf).await?;
            // Sent as the trainer sends its gradient: its floats' own bytes.
            let grads = SharedF32::new(buf.clone());
            // The raw socket of the same kind, and raw TCP, moving the same bytes.
            let small_bytes = baseline::SMALL;
            let mut unix = local.then_some(&mut unix);
            let [mut pull, mut push, mut raw_pull, mut tcp_pull, mut raw_push, mut tcp_push] =
                [Duration::ZERO; 6];
            for _ in 0..ROUNDS {
                let t = Instant::now();
                for _ in 0..per {
                    client.pull_dense(&set, 0, &mut buf).await?;
                }
                pull += t.elapsed() / r;
                let t = Instant::now();
                for _ in 0..per {
                    client.push_dense(&set, &grads, 0, 0, false).await?;
                }
                push += t.elapsed() / r;
                let (on_raw, on_tcp) = raw_times(unix.as_deref_mut(), &mut tcp, small_bytes, bytes, per)
                    .await
                    .map_err(io("raw pull"))?;
                (raw_pull, tcp_pull) = (raw_pull + on_raw / ROUNDS, tcp_pull + on_tcp / ROUNDS);
                let (on_raw, on_tcp) = raw_times(unix.as_deref_mut(), &mut tcp, bytes, small_bytes, per)
                    .await
                    .map_err(io("raw push"))?;
                (raw_push, tcp_push) = (raw_push + on_raw / ROUNDS, tcp_push + on_tcp / ROUNDS);
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let ratio = |raw: Duration, d: Duration| raw.as_secs_f64() / d.as_secs_f64();
            let label = |op: &str| format!("{op} {n} floats ({} KiB)", bytes >> 10);
            if small {
                let (ping, tcp_ping) = raw_times(unix.as_deref_mut(), &mut tcp, small_bytes, small_bytes, r)
                    .await
                    .map_err(io("ping-pong"))?;
                for (op, d) in [("pull", pull), ("push", push)] {
                    println!(
                        "{:<40} {:>10.3} {:>12.3} {:>16} {:>16}",
                        label(op),
                        ms(d),
                        ms(ping),
                        format!("{:.1}x ping-pong", d.as_secs_f64() / ping.as_secs_f64()),
                        format!("{:.1}x ping-pong", d.as_secs_f64() / tcp_ping.as_secs_f64())
                    );
                }
            } else {
                for (op, d, raw_d, tcp_d) in
                    [("pull", pull, raw_pull, tcp_pull), ("push", push, raw_push, tcp_push)]
                {
                    println!(
                        "{:<40} {:>10.3} {:>12.3} {:>16.3} {:>16.3}",
                        label(op),
                        ms(d),
                        ms(raw_d),
                        ratio(raw_d, d),
                        ratio(tcp_d, d)
                    );
                }
            }
            if n == REFERENCE_PARAMS {
                // The trainer's iteration: push of clock c with the pull of c + 1.
                let [mut both, mut raw_both, mut tcp_both] = [Duration::ZERO; 3];
                for round in 0..ROUNDS {
                    let t = Instant::now();
                    for c in 0..u64::from(per) {
                        client
                            .push_and_pull_dense(&set, &grads, u64::from(round * per) + c, &mut buf)
                            .await?;
                    }
                    both += t.elapsed() / r;
                    let (on_raw, on_tcp) = raw_times(unix.as_deref_mut(), &mut tcp, bytes, bytes, per)
                        .await
                        .map_err(io("raw push + pull"))?;
                    (raw_both, tcp_both) = (raw_both + on_raw / ROUNDS, tcp_both + on_tcp / ROUNDS);
                }
                println!(
                    "{:<40} {:>10.3} {:>12.3} {:>16.3} {:>16.3}",
                    "reference model: push + pull (Adam)",
                    ms(both),
                    ms(raw_both),
                    ratio(raw_both, both),
                    ratio(tcp_both, both)
                );
            }
        }
    }
    // Every timed push must have been applied, not dropped as a duplicate.
    let client = ShardedClient::connect(&[addr.to_string()], 0, ClientOptions::default()).await?;
    let duplicates: u64 = client.stats().await?.iter().map(|s| s.duplicate_pushes).sum();
    if duplicates > 0 {
        return Err(Error::Config(format!(
            "the shard dropped {duplicates} of the benchmark's pushes as duplicates: the push figures above are void"
        )));
    }
    drop((tcp, unix));
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}

/// Rounds in which [`transport`] alternates a figure with its baselines.
const ROUNDS: u32 = 5;

/// Mean time of a round trip of `request` bytes out and `answer` bytes back
/// on the raw Unix socket (when given) and on raw TCP: (the socket's, TCP's);
/// without a Unix socket both are the one TCP figure.
async fn raw_times(
    unix: Option<&mut baseline::Tcp>,
    tcp: &mut baseline::Tcp,
    request: usize,
    answer: usize,
    reps: u32,
) -> std::io::Result<(Duration, Duration)> {
    let on_tcp = tcp.time(request, answer, reps).await?;
    let on_unix = match unix {
        Some(unix) => unix.time(request, answer, reps).await?,
        None => on_tcp,
    };
    Ok((on_unix, on_tcp))
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
    // Memory bandwidth: a copy of the 1M floats (a rule reads the gradient
    // and reads and writes the values and its state).
    let memcpy = baseline::memcpy_rate(N * 4, reps.max(3)) / 4.0;
    println!("{:<10} {:>16.0} (baseline: memcpy of 1M floats, floats/s)", "memcpy", memcpy / 1e6);
    println!(
        "{:<10} {:>16} {:>18} {:>8} {:>9}",
        "rule", "bare Mparams/s", "store Mparams/s", "ratio", "x memcpy"
    );
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
        println!(
            "{name:<10} {:>16.0} {:>18.0} {:>8.2} {:>9.2}",
            bare / 1e6,
            via_store / 1e6,
            via_store / bare,
            via_store / memcpy
        );
    }
    Ok(())
}
