//! Command-line front end of a shard, shared by the `ps-server` binary and
//! the launcher's `ps-cluster server` subcommand.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{Error, Result, ServerConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// TOML config file (see README.md, Configuration); flags override it.
    #[arg(long, env = "PS_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This shard's index, 0..num-shards (Kubernetes: from the StatefulSet
    /// pod's index label, through `PS_SHARD`).
    #[arg(long, env = "PS_SHARD")]
    pub shard: Option<u32>,
    /// Number of shards in the deployment.
    #[arg(long)]
    pub num_shards: Option<u32>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Port of the data plane (pulls and pushes as frames on TCP) on the
    /// listen address; 0 picks a free one, which clients ask for over gRPC.
    #[arg(long, env = "PS_DATA_PORT")]
    pub data_port: Option<u16>,
    /// Also serve the data plane on a Unix socket at this path, for workers
    /// on this host (they reach the shard at a loopback address).
    #[arg(long)]
    pub data_socket: Option<PathBuf>,
    /// Serve pulls and pushes over gRPC only (`transport.data_plane = false`).
    #[arg(long)]
    pub no_data_plane: bool,
    /// Largest message accepted or sent, in MiB (`transport.max_message_mib`).
    #[arg(long)]
    pub max_message_mib: Option<u32>,
    /// Longest a BSP/SSP read may block, in milliseconds.
    #[arg(long)]
    pub max_wait_ms: Option<u64>,
    /// Folder this shard writes its checkpoint files into.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Start from a checkpoint: a checkpoint folder, or a folder of
    /// checkpoints (its newest complete one).
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9100;
    /// HTTPS with TLS on; port 0: a free port, printed as `metrics on ADDR`).
    #[arg(long, env = "PS_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// TLS: this shard's certificate is `shard.pem` in --tls-dir.
    #[command(flatten)]
    pub tls: ps_common::transport::TlsArgs,
    /// Mutual TLS: refuse clients without a certificate signed by the CA
    /// (`[transport.tls] client_auth`).
    #[arg(long)]
    pub client_auth: bool,
    /// Turn auth on, verifying bearer tokens with this Ed25519 public key
    /// (PEM, from `ps-cluster token --gen-key`); `[auth]` in the config file.
    #[arg(long, env = "PS_AUTH_KEY")]
    pub auth_key: Option<PathBuf>,
    /// Signs (ed25519 PKCS#8 PEM) the checkpoint files this shard writes.
    #[arg(long, env = "PS_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Checks the signature of a checkpoint restored (SPKI PEM; default:
    /// the signing key's own); unsigned files are then refused.
    #[arg(long, env = "PS_VERIFY_KEY")]
    pub verify_key: Option<PathBuf>,
    /// Encrypts checkpoint files at rest, and decrypts them (64 hex digits).
    #[arg(long, env = "PS_ENCRYPTION_KEY")]
    pub encryption_key: Option<PathBuf>,
}

/// Reads the config file (if any), applies the flags, validates.
pub fn config(args: &Args) -> Result<ServerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = ps_common::files::read_text_capped(path, ps_common::files::MAX_TEXT_FILE)
                .map_err(|source| Error::Io { what: format!("reading {}", path.display()), source })?;
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
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
    if let Some(v) = args.data_port {
        config.data_port = v;
    }
    if let Some(v) = &args.data_socket {
        config.data_socket = Some(v.clone());
    }
    if args.no_data_plane {
        config.transport.data_plane = false;
    }
    if let Some(v) = args.max_message_mib {
        config.transport.max_message_mib = v;
    }
    if let Some(v) = args.max_wait_ms {
        config.max_wait_ms = v;
    }
    if let Some(v) = &args.checkpoint_dir {
        config.checkpoint_dir = Some(v.clone());
    }
    if let Some(v) = &args.restore {
        config.restore = Some(v.clone());
    }
    if let Some(v) = args.metrics {
        config.metrics = Some(v);
    }
    args.tls.apply(&mut config.transport, "shard")?;
    if args.client_auth {
        let tls = config.transport.tls.as_mut().ok_or_else(|| {
            Error::Config("--client-auth needs TLS (--tls-dir or --tls-ca/--tls-cert/--tls-key)".into())
        })?;
        tls.client_auth = true;
    }
    if let Some(v) = &args.auth_key {
        config.auth = crate::AuthConfig { enabled: true, token_key: Some(v.clone()) };
    }
    for (flag, slot) in [
        (&args.signing_key, &mut config.seal.signing_key),
        (&args.verify_key, &mut config.seal.verify_key),
        (&args.encryption_key, &mut config.seal.encryption_key),
    ] {
        if let Some(v) = flag {
            *slot = Some(v.clone());
        }
    }
    config.validate()?;
    config.transport.require_security()?;
    Ok(config)
}

/// Runs a shard until SIGINT or SIGTERM. Once it is ready (checkpoint
/// restored, every listener bound) it prints `listening on ADDR` as the
/// first line on stdout and, with `--metrics`, `metrics on ADDR` as the
/// second (the bound ports, useful with port 0).
pub fn run(args: &Args) -> Result<()> {
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads())
        .enable_all()
        .build()
        .map_err(|source| Error::Io { what: "starting the runtime".into(), source })?;
    runtime.block_on(async move {
        let shard = config.shard;
        crate::bind_and_serve(
            config,
            |bound| {
                println!("listening on {}", bound.grpc);
                if let Some(metrics) = bound.metrics {
                    println!("metrics on {metrics}");
                }
                let _ = std::io::stdout().flush();
                tracing::info!(shard, addr = %bound.grpc, "shard serving");
            },
            shutdown_signal(),
        )
        .await?;
        tracing::info!(shard, "shard stopped");
        Ok(())
    })
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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

/// Runtime threads: `PS_THREADS`, default 2 (measured: one thread per process
/// was 10% slower on the reference run with 4 processes on 2 cores, not pinned;
/// the knob is for larger machines). The launcher gives a process it pins to
/// one CPU 1.
fn threads() -> usize {
    std::env::var("PS_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(2)
}
