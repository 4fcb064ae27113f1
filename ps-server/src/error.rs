//! The error type of a shard, and its one mapping to gRPC status codes.

use ps_common::partition::ShardId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad request: {0}")]
    Malformed(#[from] ps_common::Error),
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    #[error("table `{name}` is {actual}, not {expected}")]
    WrongKind { name: String, expected: &'static str, actual: &'static str },
    #[error("table `{0}` already exists with a different spec")]
    SpecConflict(String),
    #[error("caller routes over {caller} shards, this server is shard {shard} of {ours}")]
    ShardCountMismatch { caller: u32, ours: u32, shard: ShardId },
    #[error("{what} of `{table}` belongs to shard {owner}, not shard {this}")]
    WrongShard { table: String, what: String, owner: ShardId, this: ShardId },
    #[error("chunk {index} of `{tensor}` out of range (tensor has {chunks} chunks)")]
    ChunkOutOfRange { tensor: String, index: u32, chunks: usize },
    #[error("chunk {index} of `{tensor}`: expected {expected} values, got {got}")]
    DimMismatch { tensor: String, index: u32, expected: usize, got: usize },
    #[error("{what} appears twice in one request")]
    Duplicate { what: String },
    #[error("non-finite gradient value in {what}")]
    NonFinite { what: String },
    #[error("consistency model conflict: job uses {current}, worker {worker} asked for {requested}")]
    ConsistencyConflict { worker: u64, current: String, requested: String },
    #[error(
        "worker {worker} waited {waited_ms} ms for clock {needed} (slowest worker {slowest} at {slowest_clock})"
    )]
    WaitTimeout { worker: u64, needed: u64, waited_ms: u64, slowest: u64, slowest_clock: u64 },
    #[error("{what} of {} values is over the limit of {limit}", values.map_or("too many".to_string(), |n| n.to_string()))]
    TooLarge { what: &'static str, values: Option<usize>, limit: usize },
    #[error("invalid checkpoint name {0:?}: letters, digits, '-' and '_' only, at most 64")]
    CheckpointName(String),
    #[error("bad checkpoint: {0}")]
    BadCheckpoint(String),
    #[error("a checkpoint is already being taken")]
    CheckpointBusy,
    #[error("no checkpoint hold is in place (it expired, or was never taken)")]
    NotHeld,
    #[error("checkpoint: the shard could not reach a quiet cut in time; pushes resumed")]
    HoldTimeout,
    #[error("this shard has no checkpoint directory (start it with --checkpoint-dir)")]
    NoCheckpointDir,
    #[error("data queue: {0}")]
    DataPlan(String),
    #[error("data queue: {0}")]
    BadRange(String),
    /// A caller without a valid credential, or outside its role
    /// (`ps_common::Error::Unauthenticated` / `PermissionDenied`).
    #[error("{0}")]
    Auth(ps_common::Error),
    #[error("shard {addr}: {status}")]
    Peer { addr: String, status: tonic::Status },
    #[error("gradient value {value:e} in {what} is over the limit of {limit:e} in magnitude")]
    HugeGradient { what: String, value: f32, limit: f32 },
    #[error(
        "memory budget: {bytes} more bytes would exceed the shard's budget ({used} of {limit} bytes used)"
    )]
    OverBudget { bytes: u64, used: u64, limit: u64 },
    #[error(
        "requests in flight: {} more bytes would exceed the {} bytes a request of this size may share \
         ({} held by requests being received or handled; [limits] max_inflight_mib, of which requests \
         over 256 KiB may fill three quarters)",
        .0.bytes, .0.cap, .0.used
    )]
    InFlight(ps_common::inflight::Refused),
    #[error("too many {what}: {got} is over the shard's limit of {limit}")]
    LimitExceeded { what: &'static str, got: u64, limit: u64 },
    #[error("{what} {value} is out of range: {rule}")]
    OutOfRange { what: &'static str, value: u64, rule: String },
    #[error("{caller}: over the rate limit of {rate} requests a second")]
    RateLimited { caller: String, rate: u32, after: std::time::Duration },
    #[error("the request's message did not arrive within {0:?} of its start")]
    SlowRequest(std::time::Duration),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("invalid server config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ps_common::inflight::Refused> for Error {
    fn from(r: ps_common::inflight::Refused) -> Error {
        Error::InFlight(r)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        // One exhaustive match: a new variant forces a choice of code.
        let code = match &e {
            Error::Malformed(_)
            | Error::DimMismatch { .. }
            | Error::Duplicate { .. }
            | Error::NonFinite { .. }
            | Error::HugeGradient { .. }
            | Error::ChunkOutOfRange { .. }
            | Error::CheckpointName(_)
            | Error::BadRange(_) => Code::InvalidArgument,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::UnknownTable(_) => Code::NotFound,
            Error::WrongKind { .. }
            | Error::ShardCountMismatch { .. }
            | Error::WrongShard { .. }
            | Error::ConsistencyConflict { .. }
            | Error::DataPlan(_) => Code::FailedPrecondition,
            Error::SpecConflict(_) => Code::AlreadyExists,
            Error::WaitTimeout { .. } | Error::SlowRequest(_) => Code::DeadlineExceeded,
            Error::TooLarge { .. }
            | Error::OverBudget { .. }
            | Error::InFlight(_)
            | Error::LimitExceeded { .. }
            | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::BadCheckpoint(_) => Code::DataLoss,
            Error::CheckpointBusy => Code::Aborted,
            Error::NotHeld | Error::NoCheckpointDir => Code::FailedPrecondition,
            Error::HoldTimeout => Code::DeadlineExceeded,
            Error::Auth(ps_common::Error::PermissionDenied(_)) => Code::PermissionDenied,
            Error::Auth(_) => Code::Unauthenticated,
            Error::Peer { status, .. } => status.code(),
            Error::Config(_) | Error::Io { .. } | Error::Transport(_) => Code::Internal,
        };
        // Refusals for want of room now say when to try again.
        let pushback = match &e {
            Error::InFlight(r) if r.transient() => Some(INFLIGHT_PUSHBACK),
            Error::RateLimited { after, .. } => Some(*after),
            _ => None,
        };
        let status = tonic::Status::new(code, e.to_string());
        match pushback {
            Some(after) => ps_common::transport::with_pushback(status, after),
            None => status,
        }
    }
}

/// How long a client waits before sending a request refused for want of
/// in-flight bytes again: about as long as a large request takes to be
/// answered and give its bytes back.
pub const INFLIGHT_PUSHBACK: std::time::Duration = std::time::Duration::from_millis(20);
