//! The command line of `ps-serve` (in the library, so that the deployment
//! manifests' arguments can be checked against it).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serve models from the registry (or a training cluster) over gRPC and HTTP.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// A model to serve: NAME (follows label `production`), NAME@LABEL
    /// (follows that label), NAME:N (version N only) or NAME:latest (the
    /// newest version, followed). Repeat for several models.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Registry database [default: sqlite://<registry-root>/registry.db].
    #[arg(long, env = "PS_REGISTRY")]
    pub registry: Option<String>,
    /// Folder of the registry's artifacts.
    #[arg(long, env = "PS_REGISTRY_ROOT", default_value = "registry")]
    pub registry_root: PathBuf,
    /// The registry's keys: a folder with verify.pub (signing.key to
    /// register, encryption.key for encrypted artifacts)
    /// [default: <registry-root>/keys/, made for a new registry].
    #[arg(long, env = "PS_REGISTRY_KEYS", value_name = "DIR", conflicts_with = "no_seal")]
    pub registry_keys: Option<PathBuf>,
    /// Write and read registry artifacts unsigned (a registry without keys).
    #[arg(long, env = "PS_REGISTRY_NO_SEAL")]
    pub no_seal: bool,
    /// Serve the live weights of the training cluster whose shards are
    /// these (comma-separated, shard 0 first) instead of the registry; one
    /// --model gives the name.
    #[arg(long, value_delimiter = ',')]
    pub online: Vec<String>,
    /// Online mode: the architecture, from a registry version (NAME:N,
    /// NAME@LABEL) or a model file (model.msgpack); an MLP needs none.
    #[arg(long)]
    pub template: Option<String>,
    /// How often to look for a new version (registry) or re-read the
    /// weights (online), in milliseconds.
    #[arg(long)]
    pub refresh_ms: Option<u64>,
    /// gRPC listener.
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub grpc: SocketAddr,
    /// HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8501")]
    pub http: SocketAddr,
    /// Run each request alone instead of batching.
    #[arg(long)]
    pub no_batching: bool,
    /// Examples per batch.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// How long a batch waits for more requests, in microseconds (0: only
    /// what is already queued).
    #[arg(long, default_value_t = 0)]
    pub batch_delay_us: u64,
    /// Requests that may wait for a batch; more are refused (429 /
    /// RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    /// Most examples in one request.
    #[arg(long, default_value_t = 1024)]
    pub max_request_rows: usize,
    /// Largest request, in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_request_mib: usize,
}
