//! The error type of `ps-model`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model format version {found} is not supported (this build reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("tensor `{name}`: {reason}")]
    Shape { name: String, reason: String },
    #[error("cannot decode the model: {0}")]
    Decode(String),
    #[error("cannot encode the model: {0}")]
    Encode(String),
    /// A safetensors file the `safetensors` crate refuses (header, offsets, sizes).
    #[error("not a valid safetensors file: {0}")]
    SafeTensors(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{path}: {source}")]
    InFile { path: String, source: Box<Error> },
}

impl Error {
    /// Names the file the error came from.
    pub fn in_file(self, path: &Path) -> Error {
        Error::InFile { path: path.display().to_string(), source: Box::new(self) }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
