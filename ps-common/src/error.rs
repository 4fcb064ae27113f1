//! The error type of `ps-common`: malformed wire data, invalid specs,
//! invalid transport settings, and sealed files that do not open.

/// Everything that can be wrong with data or settings before it reaches a
/// store or a model. Servers wrap it in their own error (and map that to a
/// gRPC status in one place); workers wrap it in theirs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{what}: byte length {len} is not a multiple of {width}")]
    Misaligned { what: &'static str, len: usize, width: usize },
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    #[error("{what} ({codec}): {reason}")]
    BadEncoding { what: &'static str, codec: &'static str, reason: String },
    #[error("push codecs differ from the tables' ({expected}); the push says {got}")]
    CodecMismatch { expected: String, got: String },
    #[error("invalid codec: {0}")]
    InvalidCodec(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("invalid optimizer settings: {0}")]
    InvalidOptimizer(String),
    #[error("invalid initializer: {0}")]
    InvalidInitializer(String),
    #[error("invalid table spec: {0}")]
    InvalidSpec(String),
    #[error("invalid transport settings: {0}")]
    InvalidTransport(String),
    #[error("invalid TLS settings: {0}")]
    InvalidTls(String),
    #[error("TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("bad server address `{addr}`: {reason}")]
    InvalidAddress { addr: String, reason: String },
    /// No credential, or one that does not verify (UNAUTHENTICATED).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A verified caller outside its role (PERMISSION_DENIED).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A key, token or principal that cannot be used (a local setup error).
    #[error("credential: {0}")]
    Credential(String),
    // Sealed files (`seal`): the caller adds the file's path.
    #[error("not signed, and a verify key is configured")]
    Unsigned,
    #[error("not a readable sealed file: {0}")]
    SealFormat(String),
    #[error("a sealed {found}, not a {expected}")]
    SealKind { found: String, expected: String },
    #[error("signed by key {signer}, but no verify key is configured")]
    NoVerifyKey { signer: String },
    #[error("signed by key {found}, not by the configured verify key {expected}")]
    WrongSigner { found: String, expected: String },
    #[error("signature does not verify: the file was altered")]
    BadSignature,
    #[error("encrypted with key {key_id}, but no encryption key is configured")]
    NoDecryptionKey { key_id: String },
    #[error("encrypted with key {found}, not the configured encryption key {expected}")]
    WrongDecryptionKey { found: String, expected: String },
    #[error("decryption failed: the file was altered")]
    DecryptFailed,
    #[error("cannot seal: {0}")]
    CannotSeal(String),
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a binary's `main` returns for the `result` of its work: success,
/// or status 1 after printing the error as one line of its causes, each
/// once (`error: what: why`, [`crate::transport::error_chain`]). Returned
/// from `main` itself, an `anyhow::Error` printed each cause twice, and a
/// backtrace whenever `RUST_BACKTRACE` was set, after every mistyped flag
/// or missing file (a panic still prints its own).
pub fn exit_code<E: AsRef<dyn std::error::Error + 'static>>(
    result: std::result::Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::transport::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::transport::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("reading x: {0}")]
        Shows(#[source] std::io::Error),
        #[error("loading the model")]
        Hides(#[source] std::io::Error),
    }

    #[test]
    fn an_error_is_one_line_of_its_causes_each_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(error_chain(&Outer::Shows(io())), "reading x: no such file");
        assert_eq!(error_chain(&Outer::Hides(io())), "loading the model: no such file");
    }
}
