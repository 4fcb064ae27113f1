//! Shared vocabulary of the parameter server: the wire protocol, the
//! partitioning of keys and tensor chunks over shards, and the optimizer rules.
//!
//! - [`wire`] holds the generated protobuf/gRPC types (package `ps.v1`) and the
//!   only conversions between them and the domain types. Nothing else in the
//!   project builds or reads a prost struct.
//! - [`codec`] packs and unpacks the little-endian value and key buffers.
//! - [`compress`] holds the lossy wire codecs (fp16, bf16, int8, top-k) a
//!   table may choose, and the error-feedback step for gradients.
//! - [`partition`] is the single function family that maps a sparse key or a
//!   dense chunk to its shard. Servers and workers both call it.
//! - [`optim`] holds the update rules (SGD, momentum/Nesterov, Adagrad,
//!   Adam/AdamW, FTRL-proximal) as pure functions over slices; the caller owns
//!   the locking and the optimizer state.
//! - [`spec`] is the domain form of a table: layout, initializer, optimizer.
//! - [`transport`] builds every server and client channel (HTTP/2 windows and
//!   frames, keep-alive, `TCP_NODELAY`, message limits) from one
//!   [`transport::TransportConfig`].
//! - [`dataplane`] carries the four hot RPCs (dense and sparse pull and push)
//!   as length-prefixed protobuf frames on plain TCP or TLS, beside gRPC:
//!   the frame format, and the client's pooled link to one shard.
//!
//! - [`auth`] is who calls and what they may do: principals (`admin`,
//!   `reader`, `worker:<N>`), roles, Ed25519 bearer tokens, the principal of
//!   a request (token or client certificate) and the credential a client
//!   attaches to every call.
//! - [`seal`] signs (ed25519) and optionally encrypts (AES-256-GCM) files at
//!   rest: checkpoints and registry artifacts; it reads and writes key files.
//!
//! - [`bounded`] is the lock-free capped count beneath the in-flight and
//!   memory budgets.
//! - [`cache`] asks for memory a loop will touch a few rows ahead.
//! - [`files`] reads a file whole but never past a cap (run files, keys,
//!   manifests, models): a device or a huge file is an error, not an abort.
//!
//! - [`metrics`] is the per-RPC layer of every server, the process collector
//!   and the `/metrics` endpoint (Prometheus, `prometheus-client`).
//!
//! `partition`, `optim`, `cache`, `codec`, `compress` and `spec` do no I/O and use neither tonic nor
//! tokio; `wire`, `transport`, `dataplane`, `auth` and `metrics` are the only modules that touch them.

pub mod auth;
pub mod bounded;
pub mod cache;
pub mod codec;
pub mod compress;
pub mod dataplane;
pub mod error;
pub mod files;
pub mod inflight;
pub mod listen;
pub mod metrics;
pub mod optim;
pub mod partition;
pub mod seal;
pub mod spec;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};

/// Makes jemalloc (`tikv-jemallocator`, which the calling crate depends on)
/// the program's allocator, with purging of freed memory done by its
/// background threads.
///
/// jemalloc keeps freed pages for reuse, where glibc gave every multi-MiB
/// message buffer back to the kernel and faulted it in again on the next
/// request. Left to purge on the threads that free memory, it still gave
/// back most of a large buffer before the next request of the same size:
/// a sparse push of 1M keys faulted in its 64 MB of merged gradients every
/// time (`perf stat`: 656k page faults in a `bench_sparse` run, 373k with
/// background threads; docs/PERFORMANCE.md). Its background threads purge
/// pages unused for about 10 s (`dirty_decay_ms`), so memory still goes back.
/// `_RJEM_MALLOC_CONF` in the environment overrides these options.
#[macro_export]
macro_rules! jemalloc {
    () => {
        #[global_allocator]
        static ALLOC: ::tikv_jemallocator::Jemalloc = ::tikv_jemallocator::Jemalloc;

        // Read by jemalloc when it starts (`malloc_conf`, with
        // tikv-jemalloc-sys's symbol prefix).
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: &[u8; 23] = b"background_thread:true\0";
    };
}
