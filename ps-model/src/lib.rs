//! The models of the parameter server, usable without the training client:
//! what a worker computes gradients with and what a serving binary predicts
//! with. No I/O but the saved-model file; neither tonic nor tokio.
//!
//! - [`param`]: parameters as named tensors ([`ParamSpec`]) laid end to end in
//!   one flat `[f32]`, the layout the shards store.
//! - [`Mlp`]: a dense ReLU network with a softmax cross-entropy head (MNIST).
//! - [`Tower`]: a small binary MLP that also returns its input gradient, fed by
//!   embedding rows (CTR).
//! - [`logreg`], [`mf`]: sparse logistic regression and biased matrix
//!   factorization, as per-occurrence losses and gradients and as scorers.
//! - [`ctr`]: the hashing of categorical slots into embedding keys.
//! - [`loss`]: stable sigmoid, softplus, binary cross-entropy, AUC.
//! - [`saved`]: the versioned saved-model file ([`SavedModel`]).
//! - [`export`]: a saved model as safetensors with a model card, and back.
//! - [`quant`]: post-training int8 quantization of an MLP, executed in int8.
//! - [`prune`]: magnitude pruning of an MLP, its sparse file form and sparse
//!   forward pass.

pub mod ctr;
mod dense;
pub mod error;
pub mod export;
pub mod logreg;
pub mod loss;
pub mod mf;
mod mlp;
pub mod param;
pub mod prune;
pub mod quant;
pub mod saved;
mod sparse_input;
mod tower;

pub use error::{Error, Result};
pub use mlp::{Distill, Mlp, Workspace};
pub use param::{InitKind, ParamSpec};
pub use saved::{DenseTensor, ModelKind, SavedModel, SparseTable};
pub use tower::{Tower, TowerWorkspace};
