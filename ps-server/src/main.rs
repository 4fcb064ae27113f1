//! `ps-server`: runs one parameter-server shard until SIGINT or SIGTERM.
//!
//! ```text
//! ps-server --shard 0 --num-shards 2 --listen 0.0.0.0:7000
//! ps-server --config shard0.toml
//! ```
//! The first line on stdout is `listening on ADDR` (useful with port 0).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ps_server::ServerConfig;

#[derive(Parser, Debug)]
#[command(version, about = "One shard of the parameter server")]
struct Args {
    /// TOML config file (see examples/config/server.toml); flags override it.
    #[arg(long, env = "PS_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// This shard's index, 0..num-shards.
    #[arg(long)]
    shard: Option<u32>,
    /// Number of shards in the deployment.
    #[arg(long)]
    num_shards: Option<u32>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Largest message accepted, in MiB.
    #[arg(long)]
    max_message_mib: Option<usize>,
    /// Longest a BSP/SSP read may block, in milliseconds.
    #[arg(long)]
    max_wait_ms: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ServerConfig::default(),
    };
    if let Some(v) = args.shard {
        config.shard = v;
    }
    if let Some(v) = args.num_shards {
        config.num_shards = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.max_message_mib {
        config.max_message_mib = v;
    }
    if let Some(v) = args.max_wait_ms {
        config.max_wait_ms = v;
    }
    config.validate()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let shard = config.shard;
        ps_server::bind_and_serve(
            config,
            |addr| {
                println!("listening on {addr}");
                let _ = std::io::stdout().flush();
                tracing::info!(shard, %addr, "shard serving");
            },
            shutdown_signal(),
        )
        .await?;
        tracing::info!(shard, "shard stopped");
        Ok(())
    })
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
