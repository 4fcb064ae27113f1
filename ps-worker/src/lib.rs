//! The worker side of the parameter server.
//!
//! - [`client::ShardedClient`] routes pulls and pushes to shards (one request
//!   per shard, concurrently) and retries pushes exactly-once-safely.
//! - [`data`] loads MNIST (IDX), LIBSVM files and MovieLens ratings.
//! - [`model`] computes minibatch gradients with ndarray (the dense MLP).
//! - [`train`] holds the [`train::Driver`] every loop shares (clock,
//!   stragglers, timing, progress events) and the dense MLP loop.
//! - [`sparse`] holds the sparse workloads: logistic regression on LIBSVM
//!   data, matrix factorization on MovieLens, and a CTR-style model with
//!   embedding tables feeding a small MLP.
//! - [`config`] is the run file (`[cluster]`, `[job]`); [`cli`] the shared
//!   command-line front end.

pub mod cli;
pub mod client;
pub mod config;
pub mod data;
pub mod error;
pub mod model;
pub mod sparse;
pub mod train;

pub use error::{Error, Result};
