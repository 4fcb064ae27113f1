//! The error type of `ps-worker`.

use ps_common::partition::ShardId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to server {addr}: {}", ps_common::transport::error_chain(source))]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("shard {shard} ({addr}): {} ({:?}){}", status.message(), status.code(), cause(status))]
    Status { shard: ShardId, addr: String, status: tonic::Status },
    #[error("unexpected answer from a server: {0}")]
    Protocol(String),
    #[error(
        "shard {shard} ({addr}) had already applied push {seq} of worker {worker}, which this client sent for the \
         first time, so it did not apply it: another client is pushing as worker {worker}, or this one started \
         again without `join` (which continues a worker's seqs where the shards left them)"
    )]
    SeqTaken { shard: ShardId, addr: String, worker: u64, seq: u64 },
    #[error(transparent)]
    Wire(#[from] ps_common::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("training diverged: loss is {0}")]
    Diverged(f32),
    /// The thread computing a pipelined batch panicked (a bug).
    #[error("computing a batch on its own thread failed: {0}")]
    Compute(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What lies under a status the client made itself (tonic says "transport
/// error" and keeps the cause, such as the TLS alert of a shard that
/// refused this side's certificate, as its source); empty for a shard's
/// own refusals, which carry none.
fn cause(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(e) => format!(": {}", ps_common::transport::error_chain(e)),
        None => String::new(),
    }
}
