//! The error type of `ps-serve`, and its one mapping to gRPC codes; HTTP
//! statuses follow from the gRPC code ([`Error::http_status`]), so both
//! interfaces refuse the same request the same way.

use tonic::Code;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the prediction service can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no model `{0}` is served here")]
    UnknownModel(String),
    #[error("model `{model}` has no version {version}")]
    UnknownVersion { model: String, version: i64 },
    /// The request is malformed or does not fit the model.
    #[error("invalid request: {0}")]
    BadInput(String),
    #[error("model `{0}` has no version loaded yet")]
    NotReady(String),
    /// The batching queue is full: the caller should retry later.
    #[error("model `{0}` is overloaded (its queue is full)")]
    Overloaded(String),
    #[error("the model's batcher has stopped")]
    Stopped,
    #[error(transparent)]
    Registry(#[from] ps_registry::Error),
    #[error("model file: {0}")]
    Model(#[from] ps_model::Error),
    /// Online mode: the training cluster did not answer as expected.
    #[error("reading the training cluster: {0}")]
    Online(#[from] ps_worker::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("internal error: {0}")]
    Internal(String),
    /// The bytes of requests being received or handled are at the limit.
    #[error(
        "requests in flight: {} more bytes would exceed the {} bytes a request of this size may share \
         ({} held by requests being received or handled; --max-inflight-mib, of which requests over \
         256 KiB may fill three quarters)",
        .0.bytes, .0.cap, .0.used
    )]
    InFlight(ps_common::inflight::Refused),
    /// A request's body did not arrive in time (`http::Body`, and
    /// `InFlightLayer::within` for gRPC).
    #[error("the request's body did not arrive within {0:?} of its headers")]
    SlowBody(std::time::Duration),
}

impl From<ps_common::inflight::Refused> for Error {
    fn from(r: ps_common::inflight::Refused) -> Error {
        Error::InFlight(r)
    }
}

impl Error {
    /// The gRPC code of the error: the one place that decides it.
    pub fn code(&self) -> Code {
        match self {
            Error::UnknownModel(_) | Error::UnknownVersion { .. } => Code::NotFound,
            Error::Registry(ps_registry::Error::NoVersion { .. } | ps_registry::Error::NoModel(_)) => {
                Code::NotFound
            }
            Error::BadInput(_) => Code::InvalidArgument,
            Error::NotReady(_) | Error::Online(_) | Error::Stopped => Code::Unavailable,
            Error::Overloaded(_) | Error::InFlight(_) => Code::ResourceExhausted,
            Error::SlowBody(_) => Code::DeadlineExceeded,
            Error::Registry(_) | Error::Model(_) | Error::Io { .. } | Error::Internal(_) => Code::Internal,
        }
    }

    /// How long the caller should wait before sending the same request
    /// again, for refusals that are only for want of room now (a full
    /// queue, the bytes in flight at the limit); `None` for the others.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Overloaded(_) => Some(std::time::Duration::from_millis(10)),
            Error::InFlight(r) if r.transient() => Some(std::time::Duration::from_millis(20)),
            _ => None,
        }
    }

    /// The HTTP status of the error: the usual mapping of its gRPC code.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::InvalidArgument => 400,
            Code::NotFound => 404,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            // Only a client too slow to send its request's body.
            Code::DeadlineExceeded => 408,
            _ => 500,
        }
    }

    pub(crate) fn bad(msg: impl Into<String>) -> Error {
        Error::BadInput(msg.into())
    }
}

/// The refusal of a request with more than `max` examples, at example
/// `max + 1` while it is read (so without a count of them all).
pub(crate) fn too_many_rows(max: usize) -> String {
    format!("more than {max} examples in one request; the limit is {max}")
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let status = tonic::Status::new(e.code(), e.to_string());
        match e.retry_after() {
            Some(after) => ps_common::transport::with_pushback(status, after),
            None => status,
        }
    }
}
