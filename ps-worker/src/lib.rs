//! The worker side of the parameter server.
//!
//! - [`client::ShardedClient`] routes pulls and pushes to shards (one request
//!   per shard, concurrently) and retries pushes exactly-once-safely.
//! - [`session`]: a worker's membership of a job (register, join, heartbeat,
//!   start barrier, leave) and the outside readers ([`session::EVALUATOR`]).
//! - [`feedback`]: the error-feedback residuals of lossy push codecs.
//! - [`workload`]: the [`workload::Workload`] trait and its four
//!   implementations (MNIST MLP, a9a logistic regression, MovieLens matrix
//!   factorization, CTR embeddings + tower). The models themselves live in
//!   the `ps-model` crate, where serving can reach them.
//! - [`train`]: the one training loop that drives any workload, and
//!   [`train::evaluate_job`]; [`driver::Driver`] is its bookkeeping (clock,
//!   stragglers, timing, progress) and [`event`] the progress events;
//!   [`metrics`] turns events and iteration times into Prometheus metrics.
//! - [`data`] loads MNIST (IDX), LIBSVM files and MovieLens ratings.
//! - [`config`] is the run file (`[cluster]`, `[job]`); [`cli`] the shared
//!   command-line front end.

pub mod cli;
pub mod client;
pub mod config;
pub mod data;
pub mod driver;
pub mod error;
pub mod event;
pub mod feedback;
pub mod metrics;
mod plan;
pub mod session;
pub mod train;
pub mod workload;

pub use error::{Error, Result};
