//! Latency of one dense pull and one dense push of `n` floats (default: the
//! reference model's 55,050) to one in-process shard over loopback gRPC,
//! on the data plane and over gRPC, each beside raw loopback TCP moving the
//! same bytes and a 32-byte TCP ping-pong, measured in the same run.
//!
//! ```text
//! cargo run --release --example pull_latency -- [n] [reps]
//! ```

use std::time::{Duration, Instant};

use paramserver::bench::baseline;
use ps_common::optim::Rule;
use ps_common::spec::{Init, TableSpec};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};

ps_common::jemalloc!();

/// Mean (pull, push) time of `reps` dense pulls and pushes of `set`.
async fn time(
    c: &mut ShardedClient,
    set: &DenseSet,
    buf: &mut [f32],
    reps: u32,
) -> anyhow::Result<(Duration, Duration)> {
    for _ in 0..10 {
        c.pull_dense(set, 0, buf).await?;
    }
    let t0 = Instant::now();
    for _ in 0..reps {
        c.pull_dense(set, 0, buf).await?;
    }
    let pull = t0.elapsed() / reps;
    let t0 = Instant::now();
    for _ in 0..reps {
        c.push_dense(set, &*buf, 0, 0, false).await?;
    }
    Ok((pull, t0.elapsed() / reps))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Measured from a task on the runtime's threads, as a worker trains
    // (`ps_worker::cli`), not from `block_on` on the main thread, which
    // every answer would have to wake; the TCP baselines run there too.
    let args = <Args as clap::Parser>::parse();
    tokio::spawn(run(args.n, args.reps)).await?
}

/// One dense pull and push beside raw TCP (see the file's doc comment).
#[derive(clap::Parser)]
struct Args {
    /// Floats per pull and push (the reference model's 55,050 by default).
    #[arg(default_value_t = 55_050, value_parser = clap::value_parser!(u64).range(1..))]
    n: u64,
    /// Repetitions of each.
    #[arg(default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
}

async fn run(n: u64, reps: u32) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(ps_server::serve(ps_server::ServerConfig::default(), listener, std::future::pending()));
    let addrs = [addr.to_string()];
    let mut data = ShardedClient::connect(&addrs, 1, ClientOptions::default()).await?;
    let mut grpc_only = ClientOptions::default();
    grpc_only.transport.data_plane = false;
    let mut grpc = ShardedClient::connect(&addrs, 2, grpc_only).await?;
    let t = TableSpec::dense("w", &[n], Init::zeros(), Rule::sgd(0.1).into());
    data.register(&t).await?;
    let set = DenseSet::new(&[t], 1)?;
    let mut buf = vec![0.0; n as usize];
    let (pull, push) = time(&mut data, &set, &mut buf, reps).await?;
    let (grpc_pull, grpc_push) = time(&mut grpc, &set, &mut buf, reps).await?;
    let mut tcp = baseline::Tcp::connect().await?;
    let bytes = n as usize * 4;
    let (tcp_pull, tcp_push) = (tcp.pull(bytes, reps).await?, tcp.push(bytes, reps).await?);
    let ping = tcp.ping_pong(reps).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{n} floats ({bytes} bytes), mean of {reps}; gRPC and raw TCP measured in the same run:");
    for (op, d, g, raw) in [("pull", pull, grpc_pull, tcp_pull), ("push", push, grpc_push, tcp_push)] {
        println!(
            "{op} data plane {:>8.3} ms (gRPC {:>8.3} ms) | raw TCP same bytes {:>7.3} ms: data plane {:.2}x its speed, gRPC {:.2}x | TCP ping-pong {:.3} ms: data plane {:.1}x, gRPC {:.1}x",
            ms(d),
            ms(g),
            ms(raw),
            raw.as_secs_f64() / d.as_secs_f64(),
            raw.as_secs_f64() / g.as_secs_f64(),
            ms(ping),
            d.as_secs_f64() / ping.as_secs_f64(),
            g.as_secs_f64() / ping.as_secs_f64(),
        );
    }
    Ok(())
}
