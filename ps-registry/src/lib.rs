//! The model registry: versions of trained models on a real database, an
//! embedded SQLite file by default or a PostgreSQL server shared by many
//! hosts, through one code path (sqlx's `Any` driver; the schema is
//! `migrations/`, applied on open).
//!
//! - [`Registry`] opens a registry (a database URL and an artifact folder)
//!   and does everything else: [`Registry::register`] a [`NewVersion`],
//!   list and read [`ModelVersion`]s, [`Registry::promote`] and
//!   [`Registry::rollback`] [`Label`]s, read their audit history
//!   ([`LabelMove`]).
//! - [`store::ArtifactStore`] keeps each model file under the sha256 of its
//!   bytes and re-hashes it on every read.
//!
//! Versions are numbered per model name (1, 2, ...), as in MLflow; a
//! version is immutable. Labels (`staging`, `production`, or any alias) are
//! the only thing that moves.
//!
//! # Safety
//!
//! - The artifact is written, flushed and renamed into place before the
//!   version row commits; a crash in between leaves no visible version, only
//!   an unreferenced file that the next registration of the same bytes reuses.
//! - Each label move is one transaction that locks the label and appends to
//!   its history, so concurrent moves of a label serialize: each is recorded,
//!   each starts from the version the previous one set, and the label ends on
//!   the last one.
//! - A missing or altered artifact is an [`Error::Artifact`], never a model.

mod error;
mod registry;
pub mod store;

pub use error::{ArtifactFault, Error, Result};
pub use registry::{
    Backend, Label, LabelMove, Lineage, ModelVersion, NewVersion, Pending, Registry, check_label,
    check_model_name, keys_choice, location,
};
