//! The shard's sparse store alone, beside memory's speed: no network, no
//! encoding, one thread.
//!
//! ```text
//! cargo run --release --example bench_apply -- [--keys 500000] [--width 16] [--reps 5]
//! ```
//!
//! Creates `--keys` distinct uniform rows of `--width` values (Adagrad: as
//! much state again) in a one-shard `Store`, as one shard holds half of
//! `bench_sparse`'s 1M keys on 2 shards, then times, median of `--reps`:
//!
//! - `pull`: `Store::pull_sparse` copying every row's values into an answer
//!   buffer in request order;
//! - `push`: `Store::push_sparse` applying one gradient row per key;
//!
//! each beside a large `memcpy` of the bytes the call must touch, measured
//! in the same run: the values read out (pull), and the rows' values and
//! state read and written back (push). `x memcpy` is the call's time over
//! the copy's.

use std::time::Instant;

use anyhow::Result;
use ps_common::optim::Rule;
use ps_common::spec::{Init, InitKind, TableSpec};
use ps_server::store::{PushInfo, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

ps_common::jemalloc!();

/// The sparse store alone, beside a memcpy (see the file's doc comment).
#[derive(clap::Parser)]
struct Args {
    /// Keys drawn (repeats dropped).
    #[arg(long, default_value_t = 500_000)]
    keys: usize,
    /// Row width.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    width: u16,
    /// Repetitions of each timed call.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let (keys_n, width, reps) = (args.keys, usize::from(args.width), args.reps as usize);
    let mut rng = StdRng::seed_from_u64(7);
    let mut keys: Vec<u64> = (0..keys_n).map(|_| rng.random_range(0..100_000_000_000u64)).collect();
    // A request may not repeat a key; the order stays random.
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.retain(|k| seen.insert(*k));
    let n = keys.len();

    let store = Store::new(0, 1);
    let rule = Rule::Adagrad { lr: 0.01, eps: 1e-10, initial_accumulator: 0.0, weight_decay: 0.0 };
    let init = Init { kind: InitKind::Uniform { low: -0.01, high: 0.01 }, seed: 1 };
    store.register(TableSpec::sparse("t", width as u32, init, rule.into()), 1)?;
    let mut out = vec![0.0f32; n * width];
    let pull = |out: &mut [f32]| -> Result<f64> {
        let t = Instant::now();
        store
            .pull_sparse("t", &keys, false, |i, row| out[i * width..(i + 1) * width].copy_from_slice(row))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let cold = pull(&mut out)?;
    let grads: Vec<f32> = (0..n * width).map(|i| 1e-3 * ((i % 7) as f32 - 3.0)).collect();

    let row_bytes = n * width * 4 * (1 + rule.state_per_param());
    let (src, mut dst) = (vec![1u8; row_bytes], vec![0u8; row_bytes]);
    let mut copy = |bytes: usize| {
        let t = Instant::now();
        dst[..bytes].copy_from_slice(&src[..bytes]);
        std::hint::black_box(&dst);
        t.elapsed().as_secs_f64()
    };
    let (mut pulls, mut pushes, mut copies_out, mut copies_rows) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        pulls.push(pull(&mut out)?);
        let t = Instant::now();
        store.push_sparse("t", &keys, &grads, PushInfo::default())?;
        pushes.push(t.elapsed().as_secs_f64());
        copies_out.push(copy(n * width * 4));
        copies_rows.push(copy(row_bytes));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let (pull_ms, push_ms) = (median(&mut pulls), median(&mut pushes));
    let (out_ms, rows_ms) = (median(&mut copies_out), median(&mut copies_rows));
    println!(
        "sparse store, one shard, {n} distinct uniform keys x width {width} (Adagrad), median of {reps}; \
         rows created by a first pull in {:.1} ms",
        cold * 1e3
    );
    println!("      |  call ms | memcpy ms (bytes)       | x memcpy | ns per row");
    for (name, ms, base, bytes) in
        [("pull", pull_ms, out_ms, n * width * 4), ("push", push_ms, rows_ms, row_bytes)]
    {
        println!(
            "{name:>5} | {ms:>8.1} | {base:>9.1} ({:>6.1} MB)     | {:>8.1} | {:>10.0}",
            bytes as f64 / 1e6,
            ms / base,
            ms * 1e6 / n as f64
        );
    }
    Ok(())
}
