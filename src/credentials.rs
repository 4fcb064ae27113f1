//! Credentials: `ps-cluster token` (token keys and bearer tokens) and the
//! credentials the launcher issues to the processes of a local cluster
//! (docs/SECURITY.md, "Roles and credentials").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_common::auth::{self, Credential, Principal, TokenIssuer};

use crate::cluster::{Error, Result};

fn credential(e: ps_common::Error) -> Error {
    Error::Config(e.to_string())
}

/// Writes `text` to a new file readable by its owner only (a key or token).
fn write_secret(path: &Path, text: &str) -> Result<()> {
    let io = |source| Error::Io { what: format!("writing {}", path.display()), source };
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let mut file = open.open(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The public key's file beside private key `key`: `KEY.pub`.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

/// `ps-cluster token --gen-key --key KEY`: a new Ed25519 key pair, the
/// private half in KEY (mode 0600) and the public half in KEY.pub (for the
/// shards' `--auth-key`). Refuses to overwrite either.
pub fn generate_key(key: &Path) -> Result<PathBuf> {
    let pair = auth::generate_key_pair().map_err(credential)?;
    let public = public_key_path(key);
    write_secret(key, &pair.private_pem)?;
    std::fs::write(&public, &pair.public_pem)
        .map_err(|source| Error::Io { what: format!("writing {}", public.display()), source })?;
    Ok(public)
}

/// `ps-cluster token --key KEY --sub WHO --ttl T`: a bearer token.
pub fn issue(key: &Path, sub: &str, ttl: Duration) -> Result<String> {
    let who: Principal = sub.parse().map_err(credential)?;
    TokenIssuer::from_file(key).map_err(credential)?.issue(who, ttl).map_err(credential)
}

/// How long the tokens of a local cluster are valid: longer than any run
/// on one machine; the key pair is made per run and never written.
pub const LOCAL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The credentials of one local cluster: a key pair made for the run (the
/// private half stays in the launcher's memory), the public key the shards
/// verify with, and a token file per worker plus one for readers in
/// `<run>/auth/`.
pub struct LocalAuth {
    issuer: TokenIssuer,
    dir: PathBuf,
    /// The public key file (the shards' `--auth-key`).
    pub public_key: PathBuf,
    /// The launcher's own credential (admin).
    pub admin: Credential,
}

impl LocalAuth {
    /// Makes the key pair and writes `<run_dir>/auth/token.pub` and
    /// `<run_dir>/auth/reader.token` (for `ps-serve --online`).
    pub fn create(run_dir: &Path) -> Result<LocalAuth> {
        let dir = run_dir.join("auth");
        // A resumed run makes a new pair: the old tokens stop working.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::Io { what: format!("creating {}", dir.display()), source })?;
        let pair = auth::generate_key_pair().map_err(credential)?;
        let issuer = TokenIssuer::from_pem(pair.private_pem.as_bytes()).map_err(credential)?;
        let public_key = dir.join("token.pub");
        std::fs::write(&public_key, &pair.public_pem)
            .map_err(|source| Error::Io { what: format!("writing {}", public_key.display()), source })?;
        let admin = Credential::bearer(&issuer.issue(Principal::Admin, LOCAL_TTL).map_err(credential)?)
            .map_err(credential)?;
        let auth = LocalAuth { issuer, dir, public_key, admin };
        auth.token_file(Principal::Reader)?;
        Ok(auth)
    }

    /// Writes the token of `who` to `<run>/auth/<who>.token` (once) and
    /// returns its path.
    pub fn token_file(&self, who: Principal) -> Result<PathBuf> {
        let path = self.dir.join(format!("{}.token", who.to_string().replace(':', "-")));
        if !path.exists() {
            let token = self.issuer.issue(who, LOCAL_TTL).map_err(credential)?;
            write_secret(&path, &token)?;
        }
        Ok(path)
    }
}

/// The credential named by `PS_TOKEN_FILE`, if set (the commands that talk
/// to running shards: `status`, `checkpoint`).
pub fn from_env() -> Result<Credential> {
    let path = std::env::var_os(auth::TOKEN_FILE_ENV).map(PathBuf::from);
    Credential::from_optional_file(path.as_deref()).map_err(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_issue_tokens_and_are_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("ps-cred-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("token.key");
        let public = generate_key(&key).unwrap();
        assert!(generate_key(&key).is_err(), "an existing key is overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let token = issue(&key, "worker:3", Duration::from_secs(60)).unwrap();
        let verifier = auth::TokenVerifier::from_file(&public).unwrap();
        assert_eq!(verifier.verify(&token).unwrap(), Principal::Worker(3));
        assert!(issue(&key, "root", Duration::from_secs(60)).is_err());

        let local = LocalAuth::create(&dir).unwrap();
        let w = local.token_file(Principal::Worker(1)).unwrap();
        let cred = Credential::from_token_file(&w).unwrap();
        assert!(!cred.is_none() && !local.admin.is_none());
        let local_verifier = auth::TokenVerifier::from_file(&local.public_key).unwrap();
        let text = std::fs::read_to_string(&w).unwrap();
        assert_eq!(local_verifier.verify(&text).unwrap(), Principal::Worker(1));
        assert!(verifier.verify(&text).is_err(), "a run's tokens verify with its own key only");
        assert!(dir.join("auth/reader.token").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
