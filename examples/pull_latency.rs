use ps_common::optim::Rule;
use ps_common::spec::{Init, TableSpec};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(55_000);
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
    for _ in 0..200 {
        c.pull_dense(&set, 0, &mut buf).await?;
    }
    println!("pull {} floats: {:.3} ms", n, t0.elapsed().as_secs_f64() * 1e3 / 200.0);
    let t0 = Instant::now();
    for _ in 0..200 {
        c.push_dense(&set, &buf, 0, 0, false).await?;
    }
    println!("push {} floats: {:.3} ms", n, t0.elapsed().as_secs_f64() * 1e3 / 200.0);
    Ok(())
}
