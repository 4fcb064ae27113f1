//! The error type of `ps-registry`.

use std::path::PathBuf;

/// Everything the registry can refuse or fail at; each names what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registry URL `{0}`: expected sqlite://PATH or postgres://USER@HOST:PORT/DATABASE")]
    Url(String),
    // Not `#[from]`: sqlx's messages already include their causes, which a
    // source chain would print a second time.
    #[error("registry database: {0}")]
    Db(sqlx::Error),
    #[error("migrating the registry schema: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("invalid {what} `{value}`: {reason}")]
    Name { what: &'static str, value: String, reason: &'static str },
    #[error("no model `{0}` in the registry")]
    NoModel(String),
    #[error("{model} has no version {version}")]
    NoVersion { model: String, version: i64 },
    #[error("{model} has no label `{label}`")]
    NoLabel { model: String, label: String },
    #[error("label `{label}` of {model} has no earlier version to roll back to (its last move set it first)")]
    NoHistory { model: String, label: String },
    /// The artifact of a version cannot be served as it was registered.
    #[error("{model} version {version}: artifact {} {fault}", path.display())]
    Artifact { model: String, version: i64, path: PathBuf, fault: ArtifactFault },
    #[error("sealing an artifact: {0}")]
    Seal(ps_common::Error),
    /// The registry's keys (`<root>/keys/`, or those given) cannot be used.
    #[error("registry keys {}: {reason}", path.display())]
    Keys { path: PathBuf, reason: String },
    #[error("not a valid model file: {0}")]
    Model(#[from] ps_model::Error),
    /// A stored value that does not parse (a database edited by hand).
    #[error("{model} version {version}: stored {column} is invalid: {reason}")]
    Row { model: String, version: i64, column: &'static str, reason: String },
}

/// What is wrong with an artifact file.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactFault {
    #[error("is missing")]
    Missing,
    #[error("is corrupted: {0}")]
    Corrupted(String),
    #[error("cannot be read: {0}")]
    Unreadable(std::io::Error),
    /// Its seal does not fit the registry's keys (unsigned, another signer,
    /// encrypted for a key not held); see docs/SECURITY.md.
    #[error(
        "is refused: {0} (docs/SECURITY.md: the registry's keys are <root>/keys/ unless given; open it with the keys that wrote it, or with --no-seal)"
    )]
    Refused(ps_common::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Db(e)
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Error {
        Error::Migrate(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
