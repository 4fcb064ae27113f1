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
//! - [`metrics`] is the per-RPC layer of every server, the process collector
//!   and the `/metrics` endpoint (Prometheus, `prometheus-client`).
//!
//! `partition`, `optim`, `codec`, `compress` and `spec` do no I/O and use neither tonic nor
//! tokio; `wire`, `transport`, `dataplane`, `auth` and `metrics` are the only modules that touch them.

pub mod auth;
pub mod codec;
pub mod compress;
pub mod dataplane;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod partition;
pub mod seal;
pub mod spec;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
