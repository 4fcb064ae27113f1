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
    /// Online mode: the bearer token sent to the shards (a `reader` token:
    /// `ps-cluster token --sub reader`, or a local run's auth/reader.token).
    #[arg(long, env = "PS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
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
    /// Bytes of requests being received or handled at once, both listeners
    /// together, in MiB; a request that does not fit is refused (429 /
    /// RESOURCE_EXHAUSTED) as it arrives. Requests over 256 KiB may fill
    /// three quarters.
    #[arg(long, default_value_t = 256)]
    pub max_inflight_mib: usize,
    /// Most open connections of each listener; one beyond it is closed at
    /// once. Keep both under the open-file limit (`ulimit -n`).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Most open connections of each listener from one peer host, so that
    /// one host cannot take every slot.
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_host: usize,
    /// TLS on both listeners (`serve.pem` in --tls-dir; HTTPS on --http);
    /// online mode reads the cluster as `reader` (`reader.pem` in --tls-dir,
    /// or no client certificate with --tls-ca).
    #[command(flatten)]
    pub tls: ps_common::transport::TlsArgs,
    /// Mutual TLS: refuse clients without a certificate signed by the CA.
    #[arg(long)]
    pub client_auth: bool,
}

impl Args {
    /// The listeners' transport settings: TLS or an explicit --plaintext.
    pub fn server_transport(&self) -> ps_common::Result<ps_common::transport::TransportConfig> {
        let mut t = ps_common::transport::TransportConfig::default();
        self.tls.apply(&mut t, "serve")?;
        if self.client_auth {
            let tls = t.tls.as_mut().ok_or_else(|| {
                ps_common::Error::InvalidTls("--client-auth needs TLS (--tls-dir or --tls-ca/...)".into())
            })?;
            tls.client_auth = true;
        }
        t.validate()?;
        t.require_security()?;
        Ok(t)
    }

    /// The online reader's transport settings (to the training cluster).
    pub fn online_transport(&self) -> ps_common::Result<ps_common::transport::TransportConfig> {
        let t = ps_common::transport::TransportConfig::default();
        let tls = match (&self.tls.tls_dir, &self.tls.tls_ca) {
            (Some(dir), ca) => {
                let mut tls = ps_common::transport::TlsConfig::from_dir(dir, "reader");
                if let Some(ca) = ca {
                    tls.ca = ca.clone();
                }
                Some(tls)
            }
            (None, Some(ca)) => Some(ps_common::transport::TlsConfig {
                ca: ca.clone(),
                cert: None,
                key: None,
                client_auth: false,
                server_name: None,
            }),
            (None, None) => None,
        };
        let t = t.with_tls(tls);
        t.validate()?;
        Ok(t)
    }
}
