//! `ps-serve`: the prediction service. It serves versions of models from the
//! registry (`ps-registry`), or the live weights of a training cluster, over
//! gRPC (`ps.serve.v1`) and HTTP/JSON (TF Serving's conventions), with
//! dynamic batching and version swaps that fail no request.
//!
//! - [`model`]: a saved model ready to predict ([`model::Servable`]), the
//!   inputs of each kind, and their checks. The math is `ps-model`'s.
//! - [`slot`]: one served name: its [`slot::Source`] (a registry version,
//!   a label followed as it moves, the newest version, or a live cluster),
//!   the version served now, and the hot swap.
//! - [`batch`]: the batcher task of a model.
//! - [`online`]: read-only reads of a live cluster's model.
//! - [`grpc`], [`http`]: the two interfaces, over the same slots; [`server`]
//!   binds them.
//! - [`metrics`]: Prometheus metrics, at `GET /metrics` on the HTTP
//!   listener (prediction latency per model version, errors, every gRPC call).
//! - [`cli`]: the binary's flags.
//! - [`error`]: the one error type, and its one mapping to gRPC codes (HTTP
//!   statuses follow from it).

pub mod batch;
pub mod cli;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod online;
pub mod server;
pub mod slot;

pub use error::{Error, Result};
