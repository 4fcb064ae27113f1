//! The worker side of the parameter server.
//!
//! - [`client::ShardedClient`] routes pulls and pushes to shards (one request
//!   per shard, concurrently) and retries pushes exactly-once-safely.
//! - [`data`] loads MNIST (IDX), LIBSVM files and MovieLens ratings.
//! - [`model`] computes minibatch gradients with ndarray (the dense MLP).
//! - [`train`] is the loop: pull -> local gradient -> push, with clocks,
//!   stragglers, evaluation and progress events.

pub mod cli;
pub mod client;
pub mod config;
pub mod data;
pub mod error;
pub mod model;
pub mod sparse;
pub mod train;

pub use error::{Error, Result};
