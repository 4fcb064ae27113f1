//! The error type of `ps-worker`.

use ps_common::partition::ShardId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to server {addr}: {}", ps_common::transport::error_chain(source))]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("shard {shard} ({addr}): {} ({:?})", status.message(), status.code())]
    Status { shard: ShardId, addr: String, status: tonic::Status },
    #[error("unexpected answer from a server: {0}")]
    Protocol(String),
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
