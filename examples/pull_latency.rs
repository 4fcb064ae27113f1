//! Latency of one dense pull and one dense push of `n` floats (default: the
//! reference model's 55,050) to one in-process shard over loopback gRPC,
//! each beside raw loopback TCP moving the same bytes and a 32-byte TCP
//! ping-pong, measured in the same run.
//!
//! ```text
//! cargo run --release --example pull_latency -- [n] [reps]
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use paramserver::bench::baseline;
use ps_common::optim::Rule;
use ps_common::spec::{Init, TableSpec};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};

// jemalloc keeps freed pages for reuse; glibc gave every multi-MiB message
// buffer back to the kernel and faulted it in again on the next request
// (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map(|s| s.parse()).transpose().context("n")?.unwrap_or(55_050);
    let reps: u32 = args.next().map(|s| s.parse()).transpose().context("reps")?.unwrap_or(200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(ps_server::serve(ps_server::ServerConfig::default(), listener, std::future::pending()));
    let mut c = ShardedClient::connect(&[addr.to_string()], 1, ClientOptions::default()).await?;
    let t = TableSpec::dense("w", &[n], Init::zeros(), Rule::sgd(0.1).into());
    c.register(&t).await?;
    let set = DenseSet::new(&[t], 1)?;
    let mut buf = vec![0.0; n as usize];
    for _ in 0..10 {
        c.pull_dense(&set, 0, &mut buf).await?;
    }
    let t0 = Instant::now();
    for _ in 0..reps {
        c.pull_dense(&set, 0, &mut buf).await?;
    }
    let pull = t0.elapsed() / reps;
    let t0 = Instant::now();
    for _ in 0..reps {
        c.push_dense(&set, &buf, 0, 0, false).await?;
    }
    let push = t0.elapsed() / reps;
    let mut tcp = baseline::Tcp::connect().await?;
    let bytes = n as usize * 4;
    let (tcp_pull, tcp_push) = (tcp.pull(bytes, reps).await?, tcp.push(bytes, reps).await?);
    let ping = tcp.ping_pong(reps).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{n} floats ({bytes} bytes), mean of {reps}; raw TCP measured in the same run:");
    for (op, d, raw) in [("pull", pull, tcp_pull), ("push", push, tcp_push)] {
        println!(
            "{op} {:>9.3} ms | raw TCP same bytes {:>7.3} ms ({:.2}x its speed) | TCP ping-pong {:.3} ms ({:.1}x)",
            ms(d),
            ms(raw),
            raw.as_secs_f64() / d.as_secs_f64(),
            ms(ping),
            d.as_secs_f64() / ping.as_secs_f64()
        );
    }
    Ok(())
}
