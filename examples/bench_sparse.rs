//! Sparse-table throughput and memory, beside the dense path as a baseline.
//!
//! ```text
//! cargo run --release --example bench_sparse -- [--keys 1000000] [--space 100000000]
//!     [--widths 8,16,64] [--shards 2,1] [--zipf 1.05] [--reps 3] [--via tcp,unix]
//!     [--memory-keys 10000000]
//! ```
//!
//! Starts in-process shards on loopback (a fresh set per shard count, row
//! width and `--via`) and, for uniform and Zipf keys over `--space`, times
//! with one client:
//!
//! - `cold pull`: the first pull of a batch of `--keys` keys, which creates
//!   every row (initializer + optimizer state);
//! - `pull` / `push`: the same rows again (mean of `--reps`), in place,
//!   after one push unmeasured (as the TCP baseline's first round trip is:
//!   the first push on a connection grows the shard's read buffer to its
//!   size, about 30 ms for 36 MB of fresh memory on the reference VM). As
//!   in a training step, each pull is of a batch the client did not send
//!   last (every other rep the batch's keys in another order), and each push
//!   is of the keys just pulled, so the push takes the pull's plan
//!   (`PlanCache` in `ps_worker::plan`) and the pull plans anew.
//!
//! Keys/s counts the keys of the request, duplicates included (the client
//! sends each distinct key once; the `distinct` column says how many). Beside
//! each width, the dense path moves the same number of floats (`keys x
//! width`) as one tensor; `x dense` is the sparse rate over the dense rate in
//! floats per second. Tables use Adagrad (one state slot per value), as the
//! CTR workload's embeddings do. A second table puts each pull and push
//! beside raw loopback TCP moving the same bytes in the same run
//! (`paramserver::bench::baseline`): `x TCP` is the time over TCP's time.
//!
//! `--via` says how the client reaches the shards' data plane: `tcp`
//! (loopback TCP, as from another host) and `unix` (each shard's Unix
//! socket, as every worker of a local cluster reaches its shards); a
//! `unix` row is also put beside a raw Unix socket moving the same bytes
//! (`x Unix`).
//!
//! Memory is measured first, in a fresh process (so freed memory the
//! allocator keeps does not hide growth): RSS (`VmRSS`) before and after
//! creating `--memory-keys` rows of width 8 (Adagrad) by pulls of 250,000
//! keys, per key, with the theoretical breakdown.
//!
//! Messages are capped at 256 MiB by server and client; requests are split so
//! that no shard's share exceeds about 96 MiB (1M keys of width 64 are 256
//! MiB of values: one shard would need three requests).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use paramserver::bench::baseline;
use ps_common::optim::Rule;
use ps_common::spec::{Init, InitKind, OptimizerConfig, TableSpec};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

ps_common::jemalloc!();

/// Sparse-table throughput and memory, beside the dense path and raw
/// loopback TCP (see the file's doc comment).
#[derive(clap::Parser)]
struct Args {
    /// Keys per batch.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Keys are drawn from 0..SPACE.
    #[arg(long, default_value_t = 100_000_000)]
    space: u64,
    /// Row widths to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 16, 64])]
    widths: Vec<usize>,
    /// Shard counts to measure, comma-separated; the first is also the
    /// memory figure's.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 1])]
    shards: Vec<u32>,
    /// The Zipf exponent of the skewed keys.
    #[arg(long, default_value_t = 1.05)]
    zipf: f64,
    /// Repetitions of each timed pull and push.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// How the client reaches the shards, comma-separated: `tcp` (loopback
    /// TCP), `unix` (the shards' Unix sockets).
    #[arg(long, value_delimiter = ',', default_values = ["tcp", "unix"])]
    via: Vec<Via>,
    /// Rows created for the memory figure (0: skip it).
    #[arg(long, default_value_t = 10_000_000)]
    memory_keys: usize,
}

/// How the client reaches the shards' data plane.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    Tcp,
    Unix,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Tcp => "tcp",
            Via::Unix => "unix",
        }
    }
}

fn parse_args() -> Result<Args> {
    let a = <Args as clap::Parser>::parse();
    if a.keys == 0 || a.space == 0 || a.reps == 0 || a.widths.contains(&0) || a.shards.contains(&0) {
        bail!("keys, space, reps, widths and shards must be positive");
    }
    if a.via.is_empty() {
        bail!("--via needs tcp, unix or both");
    }
    Ok(a)
}

/// In-process shards on 127.0.0.1:0, each also on a Unix socket in `dir`
/// if given; stopped on drop.
struct Shards {
    addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<ps_server::Result<()>>>,
}

impl Shards {
    async fn start(n: u32, dir: Option<&std::path::Path>) -> Result<Shards> {
        let mut s = Shards { addrs: Vec::new(), stops: Vec::new(), tasks: Vec::new() };
        for shard in 0..n {
            let data_socket = dir.map(|d| d.join(format!("shard-{shard}.sock")));
            let config = ps_server::ServerConfig { shard, num_shards: n, data_socket, ..Default::default() };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            s.addrs.push(listener.local_addr()?.to_string());
            let (tx, rx) = oneshot::channel();
            s.tasks.push(tokio::spawn(ps_server::serve(config, listener, async {
                let _ = rx.await;
            })));
            s.stops.push(tx);
        }
        Ok(s)
    }

    async fn stop(mut self) -> Result<()> {
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.await.context("shard task")??;
        }
        Ok(())
    }
}

/// Resident set size of this process, from /proc/self/status.
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kib * 1024)
}

/// Zipf(space, s) ranks by continuous inversion (rank r has density ∝ r^-s
/// on [1, space + 1)), mixed into keys so that hot keys are not clustered.
fn zipf_keys(n: usize, space: u64, s: f64, rng: &mut StdRng) -> Vec<u64> {
    let top = (space + 1) as f64;
    let mix = |r: u64| ps_common::partition::splitmix64(r) % space;
    if (s - 1.0).abs() < 1e-9 {
        return (0..n).map(|_| mix((top.powf(rng.random::<f64>()) as u64).clamp(1, space) - 1)).collect();
    }
    let (a, b) = (1.0 - s, top.powf(1.0 - s) - 1.0);
    (0..n)
        .map(|_| {
            let r = (1.0 + b * rng.random::<f64>()).powf(1.0 / a);
            mix((r as u64).clamp(1, space) - 1)
        })
        .collect()
}

fn adagrad() -> OptimizerConfig {
    Rule::Adagrad { lr: 0.01, eps: 1e-10, initial_accumulator: 0.0, weight_decay: 0.0 }.into()
}

/// Keys per request so that one shard's share stays under ~96 MiB.
fn keys_per_request(width: usize, shards: u32) -> usize {
    let per_key = width * 4 + 8;
    (96usize << 20) / per_key * shards as usize
}

async fn pull(
    c: &ShardedClient,
    table: &str,
    width: usize,
    keys: &[u64],
    out: &mut [f32],
    step: usize,
) -> Result<f64> {
    let t = Instant::now();
    for (k, o) in keys.chunks(step).zip(out.chunks_mut(step * width)) {
        c.pull_sparse(table, width, k, 0, o).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn push(
    c: &mut ShardedClient,
    table: &str,
    width: usize,
    keys: &[u64],
    grads: &[f32],
    step: usize,
) -> Result<f64> {
    let t = Instant::now();
    for (k, g) in keys.chunks(step).zip(grads.chunks(step * width)) {
        c.push_sparse(table, width, k, g, 0, 0, false).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Dense tensors of `floats` in total, each at most ~96 MiB per shard.
fn dense_specs(name: &str, floats: usize, shards: u32) -> Vec<TableSpec> {
    let piece = (24usize << 20) * shards as usize;
    (0..floats)
        .step_by(piece)
        .enumerate()
        .map(|(i, start)| {
            let len = piece.min(floats - start) as u64;
            TableSpec::dense(format!("{name}.{i}"), &[len], Init::zeros(), adagrad())
        })
        .collect()
}

struct Row {
    via: Via,
    shards: u32,
    width: usize,
    dist: &'static str,
    distinct: usize,
    cold: f64,
    pull: f64,
    push: f64,
    dense_pull: f64,
    dense_push: f64,
    /// Seconds of one raw loopback TCP round trip moving the bytes of one
    /// pull (distinct keys out, their rows back) and one push (keys and
    /// gradients out, a small answer back).
    tcp_pull: f64,
    tcp_push: f64,
    /// The same through a raw Unix socket, for rows `via` Unix.
    unix: Option<(f64, f64)>,
}

async fn bench_width(a: &Args, via: Via, shards: u32, width: usize, out: &mut Vec<Row>) -> Result<()> {
    // The shards' and the raw baseline's Unix sockets, in a short path (a
    // Unix socket's path is limited to about 100 bytes).
    let dir = match via {
        Via::Tcp => None,
        Via::Unix => Some(tempfile::Builder::new().prefix("bench-sparse").tempdir_in("/tmp")?),
    };
    let cluster = Shards::start(shards, dir.as_ref().map(|d| d.path())).await?;
    let mut c = ShardedClient::connect(&cluster.addrs, 1, ClientOptions::default()).await?;
    let step = keys_per_request(width, shards);
    let n = a.keys;

    // Dense baseline: the same number of floats as one pull of n rows.
    let floats = n * width;
    let specs = dense_specs(&format!("bench.dense.w{width}"), floats, shards);
    let mut sets = Vec::new();
    for spec in &specs {
        c.register(spec).await?;
        sets.push(DenseSet::new(std::slice::from_ref(spec), shards)?);
    }
    let mut buf: Vec<Vec<f32>> = sets.iter().map(|s| vec![0.0f32; s.len()]).collect();
    let (mut dense_pull, mut dense_push) = (0.0, 0.0);
    for _ in 0..a.reps {
        let t = Instant::now();
        for (s, b) in sets.iter().zip(&mut buf) {
            c.pull_dense(s, 0, b).await?;
        }
        dense_pull += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (s, b) in sets.iter().zip(&buf) {
            c.push_dense(s, b, 0, 0, false).await?;
        }
        dense_push += t.elapsed().as_secs_f64();
    }
    let reps = a.reps as f64;
    let (dense_pull, dense_push) = (floats as f64 * reps / dense_pull, floats as f64 * reps / dense_push);
    drop(buf);

    let mut rng = StdRng::seed_from_u64(width as u64 ^ (u64::from(shards) << 8));
    for dist in ["uniform", "zipf"] {
        let keys: Vec<u64> = match dist {
            "uniform" => (0..n).map(|_| rng.random_range(0..a.space)).collect(),
            _ => zipf_keys(n, a.space, a.zipf, &mut rng),
        };
        let distinct = {
            let mut k = keys.clone();
            k.sort_unstable();
            k.dedup();
            k.len()
        };
        let table = format!("bench.{dist}.w{width}");
        let init = Init { kind: InitKind::Uniform { low: -0.01, high: 0.01 }, seed: 1 };
        c.register(&TableSpec::sparse(&table, width as u32, init, adagrad())).await?;
        let mut vals = vec![0.0f32; n * width];
        let cold = pull(&c, &table, width, &keys, &mut vals, step).await?;
        // One push unmeasured, as the TCP baseline's first round trip: a
        // shard's connection grows its read buffer to the push's size once.
        push(&mut c, &table, width, &keys, &vals, step).await?;
        // The same keys in another order: the same rows, another plan.
        let mut shuffled = keys.clone();
        shuffled.shuffle(&mut rng);
        let (mut tp, mut tq) = (0.0, 0.0);
        for rep in 0..a.reps {
            let batch = if rep % 2 == 0 { &shuffled } else { &keys };
            tp += pull(&c, &table, width, batch, &mut vals, step).await?;
            tq += push(&mut c, &table, width, batch, &vals, step).await?;
        }
        let nk = n as f64;
        let raw = |link: baseline::Tcp| raw_times(link, distinct, width, a.reps as u32);
        let (tcp_pull, tcp_push) = raw(baseline::Tcp::connect().await?).await?;
        let unix = match &dir {
            Some(d) => Some(
                raw(baseline::Tcp::connect_unix(&d.path().join(format!("raw-{dist}.sock"))).await?).await?,
            ),
            None => None,
        };
        out.push(Row {
            via,
            shards,
            width,
            dist,
            distinct,
            cold: nk / cold,
            pull: nk * reps / tp,
            push: nk * reps / tq,
            dense_pull,
            dense_push,
            tcp_pull,
            tcp_push,
            unix,
        });
    }
    drop(c);
    cluster.stop().await
}

/// Seconds of one raw round trip on `link` moving the bytes of a pull of
/// `distinct` rows of `width` (keys out, rows back) and of their push (keys
/// and gradients out, a small answer back).
async fn raw_times(mut link: baseline::Tcp, distinct: usize, width: usize, reps: u32) -> Result<(f64, f64)> {
    let pull = link.time(distinct * 8, distinct * width * 4, reps).await?.as_secs_f64();
    let push = link.push(distinct * (8 + width * 4), reps).await?.as_secs_f64();
    Ok((pull, push))
}

/// Creates `keys` rows of width 8 by pulls; returns the rows held and the
/// memory they added.
async fn bench_memory(keys: usize, shards: u32) -> Result<Memory> {
    let cluster = Shards::start(shards, None).await?;
    let c = ShardedClient::connect(&cluster.addrs, 1, ClientOptions::default()).await?;
    let table = "bench.memory.w8";
    let init = Init { kind: InitKind::Uniform { low: -0.01, high: 0.01 }, seed: 1 };
    c.register(&TableSpec::sparse(table, 8, init, adagrad())).await?;
    let batch = 250_000usize.min(keys);
    let mut ks = vec![0u64; batch];
    let mut vals = vec![0.0f32; batch * 8];
    // Settle the allocator and the runtime before the first reading.
    c.pull_sparse(table, 8, &[u64::MAX], 0, &mut vals[..8]).await?;
    let before = rss_bytes()?;
    for start in (0..keys).step_by(batch) {
        let n = batch.min(keys - start);
        for (i, k) in ks[..n].iter_mut().enumerate() {
            *k = (start + i) as u64;
        }
        c.pull_sparse(table, 8, &ks[..n], 0, &mut vals[..n * 8]).await?;
    }
    drop((ks, vals));
    let after = rss_bytes()?;
    let rows: u64 = c.stats().await?.iter().map(|s| s.sparse_rows).sum();
    // Then the client's connections closed (their buffers held the last
    // request and answer on both ends) and what the allocator keeps for
    // reuse (freed buffers, the indexes' tables from before they grew)
    // given back: what remains is what the shards hold.
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    purge_allocator();
    let purged = rss_bytes()?;
    cluster.stop().await?;
    Ok(Memory { rows, grown: after.saturating_sub(before), purged: purged.saturating_sub(before) })
}

/// Rows created and the RSS they added, as grown and after
/// [`purge_allocator`].
struct Memory {
    rows: u64,
    grown: u64,
    purged: u64,
}

/// Returns every arena's unused pages to the kernel (jemalloc's
/// `arena.<MALLCTL_ARENAS_ALL>.purge`).
fn purge_allocator() {
    const ALL_ARENAS_PURGE: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name of a void mallctl: no old or new value.
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            ALL_ARENAS_PURGE.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if code != 0 {
        eprintln!("warning: jemalloc purge failed with {code}; the purged figure is as grown");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = parse_args()?;
    let started = Instant::now();
    if a.memory_keys > 0 {
        let shards = a.shards[0];
        let m = bench_memory(a.memory_keys, shards).await?;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let per_key = |b: u64| b as f64 / a.memory_keys as f64;
        println!(
            "memory: {} rows of width 8 (Adagrad) on {shards} shard(s), {} rows held: \
             RSS +{:.0} MiB = {:.1} B per key ({:.2}x values + state); \
             +{:.0} MiB = {:.1} B per key ({:.3}x) with the client gone and the allocator's free pages returned",
            a.memory_keys,
            m.rows,
            mib(m.grown),
            per_key(m.grown),
            per_key(m.grown) / 64.0,
            mib(m.purged),
            per_key(m.purged),
            per_key(m.purged) / 64.0,
        );
        for line in [
            "  theory per row of width 8 with one state slot (Adagrad), rows in slabs (ps_server::store::rows):",
            "    values + state  2 x 8 x 4 = 64 B, end to end in the stripe's pages",
            "    key             8 B beside the row in its page (no update count: Adagrad reads none)",
            "    index slot      u32 slot + 1 control byte = 5 B, at hashbrown load 7/16..7/8 between doublings: 6..11 B",
            "    total           78..83 B (the rest: partly filled pages, the allocator, the process)",
            "  dense baseline: the same 8 values + state are 64 B with no per-row overhead",
        ] {
            println!("{line}");
        }
        println!();
    }

    let mut rows = Vec::new();
    for &shards in &a.shards {
        for &width in &a.widths {
            for &via in &a.via {
                bench_width(&a, via, shards, width, &mut rows).await?;
            }
        }
    }
    println!(
        "sparse pull/push: {} keys per batch over a key space of {}, Zipf s = {}, mean of {} reps",
        a.keys, a.space, a.zipf, a.reps
    );
    println!(
        "{:>4} {:>6} {:>5} {:>7} {:>9} | {:>11} {:>11} {:>11} | {:>9} {:>9} | {:>12} {:>12} | {:>7} {:>7}",
        "via",
        "shards",
        "width",
        "keys",
        "distinct",
        "cold pull/s",
        "pull keys/s",
        "push keys/s",
        "pull MB/s",
        "push MB/s",
        "dense pull",
        "dense push",
        "pull",
        "push"
    );
    println!(
        "{:>4} {:>6} {:>5} {:>7} {:>9} | {:>37} | {:>19} | {:>25} | {:>15}",
        "",
        "",
        "",
        "",
        "",
        "(keys of the request per second)",
        "(row values)",
        "(floats/s, same bytes)",
        "(x dense)"
    );
    for r in &rows {
        let floats = |keys_per_s: f64| keys_per_s * r.width as f64;
        println!(
            "{:>4} {:>6} {:>5} {:>7} {:>9} | {:>11.3e} {:>11.3e} {:>11.3e} | {:>9.0} {:>9.0} | {:>12.3e} {:>12.3e} | {:>7.2} {:>7.2}",
            r.via.name(),
            r.shards,
            r.width,
            r.dist,
            r.distinct,
            r.cold,
            r.pull,
            r.push,
            floats(r.pull) * 4.0 / 1e6,
            floats(r.push) * 4.0 / 1e6,
            r.dense_pull,
            r.dense_push,
            floats(r.pull) / r.dense_pull,
            floats(r.push) / r.dense_push,
        );
    }
    println!(
        "\nbeside raw loopback TCP moving the same bytes in one round trip on one socket (same run; \
         pull: distinct keys out, rows back; push: keys + gradients out), and for `unix` rows a raw \
         Unix socket likewise:"
    );
    println!(
        "{:>4} {:>6} {:>5} {:>7} | {:>9} {:>9} {:>7} {:>9} {:>7} | {:>9} {:>9} {:>7} {:>9} {:>7}",
        "via",
        "shards",
        "width",
        "keys",
        "pull ms",
        "TCP ms",
        "x TCP",
        "Unix ms",
        "x Unix",
        "push ms",
        "TCP ms",
        "x TCP",
        "Unix ms",
        "x Unix"
    );
    for r in &rows {
        let (pull, push) = (a.keys as f64 / r.pull, a.keys as f64 / r.push);
        // A raw time and the time over it, or dashes.
        let raw = |ours: f64, raw: Option<f64>| match raw {
            Some(t) => (format!("{:.1}", t * 1e3), format!("{:.2}", ours / t)),
            None => ("-".to_string(), "-".to_string()),
        };
        let (unix_pull, x_unix_pull) = raw(pull, r.unix.map(|u| u.0));
        let (unix_push, x_unix_push) = raw(push, r.unix.map(|u| u.1));
        println!(
            "{:>4} {:>6} {:>5} {:>7} | {:>9.1} {:>9.1} {:>7.2} {:>9} {:>7} | {:>9.1} {:>9.1} {:>7.2} {:>9} {:>7}",
            r.via.name(),
            r.shards,
            r.width,
            r.dist,
            pull * 1e3,
            r.tcp_pull * 1e3,
            pull / r.tcp_pull,
            unix_pull,
            x_unix_pull,
            push * 1e3,
            r.tcp_push * 1e3,
            push / r.tcp_push,
            unix_push,
            x_unix_push,
        );
    }
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
