//! One parameter-server shard.
//!
//! - [`store::Store`] holds the tables this shard owns: dense chunks and
//!   sparse rows in [`dashmap::DashMap`]s, each block with its optimizer state.
//!   It validates every push in full before applying it and applies each
//!   `(worker, seq)` at most once.
//! - [`clock::Clocks`] is the clock set of the training job: BSP/SSP/ASP read
//!   gates, leases, and the staleness histogram.
//! - [`service::Service`] is the gRPC edge: protobuf in, domain calls, protobuf
//!   out; [`error::Error`] maps to a gRPC status in one place.
//! - [`serve`] runs a shard on a listener until a shutdown future resolves,
//!   with the server built by `ps_common::transport` from
//!   [`ServerConfig::transport`]; `main.rs` is a thin wrapper that parses flags
//!   and waits for SIGINT/SIGTERM.
//! - [`queue::DataQueue`] is the job's queue of minibatch ranges for dynamic
//!   data assignment (served by shard 0).
//! - [`metrics`] is what `/metrics` shows (`ServerConfig::metrics` turns
//!   it on): the store's counters and table sizes, the clock set, read waits,
//!   checkpoints, and every RPC (`ps_common::metrics`).
//! - [`local::LocalShards`] starts N shards in-process on loopback, for tests,
//!   benchmarks and examples.

pub mod budget;
pub mod checkpoint;
pub mod cli;
pub mod clock;
pub mod dataplane;
pub mod error;
mod gate;
pub mod local;
pub mod metrics;
pub mod queue;
pub mod service;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ps_common::transport::{self, TransportConfig};
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
use service::{Service, Shard};

/// Longest a gRPC request's message may take to arrive once its stream has
/// started (256 MiB, the largest message by default, at 2.1 MiB/s): a client
/// that stops sending in the middle of one (its connection kept open by
/// HTTP/2 pings) is answered DEADLINE_EXCEEDED, and the bytes it sent are
/// given back to the in-flight budget, instead of holding both for good.
/// The data plane's frames have their own bound (`dataplane`).
pub const REQUEST_ARRIVAL: Duration = Duration::from_secs(120);

/// Settings of one shard process (TOML file and/or flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// This shard's index, `0..num_shards`.
    pub shard: u32,
    /// How many shards the deployment has; every worker must agree.
    pub num_shards: u32,
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// Port of the data plane on `listen`'s address (0: a free one, which
    /// clients learn over gRPC). Served when `transport.data_plane` is on.
    pub data_port: u16,
    /// Also serve the data plane on a Unix socket at this path, for clients
    /// on this host (they find it over gRPC, and use it when they reach the
    /// shard at a loopback address). Absent: TCP only.
    pub data_socket: Option<PathBuf>,
    /// Longest a BSP/SSP read may wait before failing with DEADLINE_EXCEEDED.
    pub max_wait_ms: u64,
    /// How often expired worker leases are checked.
    pub reap_interval_ms: u64,
    /// HTTP/2 settings and the message limit (`[transport]`).
    pub transport: TransportConfig,
    /// Where this shard writes its part of each checkpoint (one folder per
    /// checkpoint inside it). Without it the shard refuses checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Start from this checkpoint (a checkpoint folder, or a folder of
    /// checkpoints: its newest complete one) instead of empty.
    pub restore: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (see `metrics`);
    /// HTTPS, with the shard's certificate, when `transport.tls` is set.
    pub metrics: Option<SocketAddr>,
    /// Resource budgets (`[limits]`, see `budget` and docs/SECURITY.md).
    pub limits: budget::Limits,
    /// Who may call what (`[auth]`; docs/SECURITY.md, "Roles and credentials").
    pub auth: AuthConfig,
    /// Keys that seal this shard's checkpoint files and check the ones it
    /// restores (`[seal]`; none: plain files). See docs/SECURITY.md.
    pub seal: ps_common::seal::KeyPaths,
}

/// The `[auth]` table of a shard config. Off by default, for tests and
/// setups older than roles (the shard then warns at start); the launcher's
/// local cluster turns it on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check every request's credential and role.
    pub enabled: bool,
    /// Ed25519 public key (PEM) that verifies bearer tokens. Without it only
    /// TLS client certificates identify callers.
    pub token_key: Option<PathBuf>,
}

impl AuthConfig {
    /// The authenticator of a shard with these settings (`None`: auth off).
    pub fn authenticator(&self) -> Result<Option<ps_common::auth::Authenticator>> {
        if !self.enabled {
            return Ok(None);
        }
        let tokens = match &self.token_key {
            Some(path) => Some(
                ps_common::auth::TokenVerifier::from_file(path).map_err(|e| Error::Config(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Some(ps_common::auth::Authenticator::new(tokens)))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shard: 0,
            num_shards: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_port: 0,
            data_socket: None,
            max_wait_ms: 120_000,
            reap_interval_ms: 250,
            transport: TransportConfig::default(),
            checkpoint_dir: None,
            restore: None,
            metrics: None,
            limits: budget::Limits::default(),
            auth: AuthConfig::default(),
            seal: Default::default(),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_shards == 0 || self.shard >= self.num_shards {
            return bad(format!("shard {} is not in 0..{}", self.shard, self.num_shards));
        }
        if self.reap_interval_ms == 0 {
            return bad("reap_interval_ms must be positive".into());
        }
        if self.data_socket.is_some() && !self.transport.data_plane {
            return bad("data_socket is set but the data plane is off (transport.data_plane = false)".into());
        }
        self.limits.validate()?;
        self.transport.validate().map_err(|e| Error::Config(e.to_string()))
    }
}

/// Serves one shard on `listener` until `shutdown` resolves, then drains
/// in-flight requests and returns.
pub async fn serve(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_when_ready(config, listener, |_| {}, shutdown).await
}

/// Where a shard listens, once every listener it has is bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    /// The Prometheus endpoint, when `config.metrics` asked for one (its
    /// port is known here when the configuration said 0).
    pub metrics: Option<SocketAddr>,
}

/// [`serve`], telling `on_ready` where it listens once it is ready: the
/// checkpoint restored and the metrics and data-plane listeners bound. A
/// shard that cannot bind one of them fails before it is announced.
async fn serve_when_ready(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    on_ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    let limits = &config.limits;
    let keys = config.seal.load().map_err(|e| Error::Config(e.to_string()))?;
    let (store, clocks) = match &config.restore {
        Some(path) => restore(&config, path, &keys)?,
        None => (store::Store::new(config.shard, config.num_shards), clock::Clocks::default()),
    };
    let auth = config.auth.authenticator()?;
    if auth.is_none() {
        tracing::warn!(
            shard = config.shard,
            "auth is off: any client that reaches this shard may act in any role"
        );
    }
    let shard = Arc::new(Shard {
        auth,
        // An answer must fit in one message (4 bytes a value).
        store: store
            .with_max_pull_values(config.transport.max_message_bytes() / 4)
            .with_limits(limits.clone())?,
        clocks: clocks.with_max_workers(limits.max_workers),
        gate: gate::Gate::default(),
        max_wait: Duration::from_millis(config.max_wait_ms),
        checkpoint_dir: config.checkpoint_dir.clone(),
        seal: keys,
        queue: queue::DataQueue::with_max_workers(limits.max_workers),
        metrics: metrics::ShardMetrics::default(),
        rate: budget::RateLimiter::new(limits),
        inflight: ps_common::inflight::InFlight::new(limits.inflight_bytes()),
        limits: limits.clone(),
        data_port: Default::default(),
        data_socket: Default::default(),
    });
    let (registry, rpc) = metrics::registry(&shard);
    // The metrics endpoint, if asked for; aborted with the shard.
    let (_metrics, metrics_addr) = match config.metrics {
        Some(addr) => {
            // HTTPS with the shard's certificate, when it has TLS on.
            let tls = config.transport.tls.as_ref().map(transport::metrics_server_config).transpose()?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let (bound, task) =
                ps_common::metrics::serve(addr, Arc::new(registry), tls).await.map_err(|source| {
                    Error::Io { what: format!("binding the metrics listener {addr}"), source }
                })?;
            tracing::info!(addr = %bound, "metrics on {scheme}://{bound}/metrics");
            (Some(AbortOnDrop(task)), Some(bound))
        }
        None => (None, None),
    };
    // Aborted on drop too, so a shard whose serve future is dropped (aborted
    // in tests) leaves no reaper behind.
    let _reaper = AbortOnDrop({
        let shard = Arc::clone(&shard);
        let every = Duration::from_millis(config.reap_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                shard.clocks.reap(tokio::time::Instant::now());
            }
        })
    });
    let t = &config.transport;
    let grpc = listener.local_addr().map_err(|e| Error::Io { what: "local_addr".into(), source: e })?;
    // The data plane, beside the gRPC listener; aborted with the shard.
    let (_data_plane, _socket_file) = if t.data_plane {
        let data = dataplane::bind(grpc, config.data_port).await?;
        let port = data.local_addr().map_err(|e| Error::Io { what: "local_addr".into(), source: e })?.port();
        shard.data_port.store(port, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(shard = config.shard, port, "data plane listening");
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_data_connections));
        let mut listeners = vec![dataplane::Listener::Tcp(data)];
        let mut socket_file = None;
        if let Some(path) = &config.data_socket {
            // Named to clients as an absolute path: theirs may run elsewhere.
            let path = &std::path::absolute(path)
                .map_err(|source| Error::Io { what: format!("resolving {}", path.display()), source })?;
            let (unix, file) = dataplane::bind_unix(path).await?;
            let _ = shard.data_socket.set(path.display().to_string());
            tracing::info!(shard = config.shard, path = %path.display(), "data plane listening on a Unix socket");
            listeners.push(dataplane::Listener::Unix(unix));
            socket_file = Some(file);
        }
        let tasks: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                let service = Service(Arc::clone(&shard));
                let hosts = ps_common::listen::PerHost::new(limits.max_connections_per_host);
                let slots = (Arc::clone(&slots), hosts);
                AbortOnDrop(tokio::spawn(dataplane::serve(l, service, t.clone(), slots)))
            })
            .collect();
        (tasks, socket_file)
    } else {
        (Vec::new(), None)
    };
    let inflight = ps_common::inflight::InFlightLayer::new(&shard.inflight, |r| Error::from(r).into())
        .within(REQUEST_ARRIVAL, |limit| Error::SlowRequest(limit).into());
    let server = transport::server(t, &rpc)?.layer(inflight);
    on_ready(&Bound { grpc, metrics: metrics_addr });
    let result = server
        .max_concurrent_streams(limits.max_concurrent_streams)
        .add_service(transport::service(t, Service(shard)))
        .serve_with_incoming_shutdown(
            transport::incoming(
                t,
                listener,
                (limits.max_connections, limits.max_connections_per_host),
                "shard gRPC",
            ),
            shutdown,
        )
        .await;
    result.map_err(Error::from)
}

/// Loads this shard's part of the checkpoint at `path`, refusing one made
/// for another shard count or whose file does not match its manifest.
pub(crate) fn restore(
    config: &ServerConfig,
    path: &std::path::Path,
    keys: &ps_common::seal::Keys,
) -> Result<(store::Store, clock::Clocks)> {
    let ckpt = checkpoint::resolve(path, keys)?;
    let m = &ckpt.manifest;
    if m.num_shards != config.num_shards {
        return Err(Error::BadCheckpoint(format!(
            "{} was taken of {} shards; this deployment has {}",
            ckpt.dir.display(),
            m.num_shards,
            config.num_shards
        )));
    }
    let file =
        checkpoint::read_shard(&ckpt.dir, m.shard(config.shard)?, config.shard, config.num_shards, keys)?;
    if file.checkpoint != m.name || file.shard != config.shard || file.num_shards != config.num_shards {
        return Err(Error::BadCheckpoint(format!(
            "{}: the file belongs to checkpoint {:?}, shard {} of {}",
            ckpt.dir.display(),
            file.checkpoint,
            file.shard,
            file.num_shards
        )));
    }
    check_restored_workers(&ckpt.dir, &file, &config.limits)?;
    let store = store::Store::restore(config.shard, config.num_shards, file.store, &config.limits)?;
    let (tables, chunks, rows) = store.sizes();
    tracing::info!(checkpoint = %ckpt.dir.display(), tables, chunks, rows, "shard restored");
    Ok((store, clock::Clocks::restore(file.clocks)))
}

/// A restored clock set and seq records are held to the shard's limits as
/// if their workers had joined and pushed: at most `limits.max_workers`
/// distinct workers (members and those that left), no clock past
/// `limits.max_clock` (a tick of the last clock a push may name reaches
/// it). Unchecked, a file could list any number of workers (a push's
/// staleness walks every member) and clocks no push may name.
fn check_restored_workers(
    dir: &std::path::Path,
    file: &checkpoint::ShardFile,
    limits: &budget::Limits,
) -> Result<()> {
    let bad = |m: String| Err(Error::BadCheckpoint(format!("{}: {m}", dir.display())));
    let (clocks, seqs) = (&file.clocks, &file.store.last_seq);
    let workers = clocks.members.len() + clocks.left.len();
    if workers > limits.max_workers || seqs.len() > limits.max_workers {
        return bad(format!(
            "{workers} workers in the clock set and {} with seq records, over the limit of {} (limits.max_workers)",
            seqs.len(),
            limits.max_workers
        ));
    }
    let clock = clocks.members.iter().map(|m| m.1).chain(clocks.left.iter().map(|l| l.1)).max();
    if let Some(c) = clock.filter(|&c| c > limits.max_clock) {
        return bad(format!("a worker's clock {c} is over {} (limits.max_clock)", limits.max_clock));
    }
    Ok(())
}

/// Binds `config.listen` and serves; `on_ready` learns the actual addresses
/// (useful with port 0) once the shard is ready to answer.
pub async fn bind_and_serve(
    config: ServerConfig,
    on_ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    // Unreadable TLS files fail the start, before the address is announced.
    config.transport.check_server()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io { what: format!("bind {}", config.listen), source: e })?;
    serve_when_ready(config, listener, on_ready, shutdown).await
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
