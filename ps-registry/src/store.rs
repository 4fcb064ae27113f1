//! The artifact store: files named by the sha256 of their bytes, under
//! `<root>/artifacts/sha256/<hex>`.
//!
//! A file is written to a temporary name in the same folder, flushed to disk
//! (`fsync`), renamed into place and the folder flushed, so that it is
//! complete on disk before the database row that names it commits. Reading
//! checks the length and re-hashes the bytes: a file that is missing or
//! whose hash differs is reported, never returned.
//!
//! With keys ([`ArtifactStore::with_keys`]) a file is sealed
//! ([`ps_common::seal`], kind `registry-artifact`): signed, and encrypted
//! if an encryption key is held. The name stays the sha256 of the model
//! bytes. Reading checks the seal before anything else (an unsigned file
//! is refused when a verify key is held), then the length and hash of what
//! it holds.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::seal::Keys;
use sha2::{Digest, Sha256};

use crate::error::{ArtifactFault, Error, Result};

/// Largest artifact the store reads back: the model file's own limit.
pub const MAX_ARTIFACT_BYTES: u64 = ps_model::saved::MAX_FILE_BYTES;

/// What a sealed artifact says it is.
pub const ARTIFACT_KIND: &str = "registry-artifact";

/// The most a seal adds to a file (header and signature).
const MAX_SEAL_BYTES: u64 = 256;

/// An artifact as stored: its hash (lowercase hex) and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub sha256: String,
    pub size: u64,
}

/// The artifact folder of a registry.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    keys: Keys,
}

impl ArtifactStore {
    /// The store under `root` (`root/artifacts/sha256/`); created on first write.
    pub fn new(root: &Path) -> ArtifactStore {
        ArtifactStore { dir: root.join("artifacts").join("sha256"), keys: Keys::none() }
    }

    /// The store sealing what it writes and checking what it reads with `keys`.
    pub fn with_keys(self, keys: Keys) -> ArtifactStore {
        ArtifactStore { keys, ..self }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Where the artifact of hash `sha256` lives.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Stores `bytes` durably and returns their hash. Content addressing makes
    /// this idempotent: an intact file of the same hash is kept as it is.
    pub fn put(&self, bytes: &[u8]) -> Result<Artifact> {
        let artifact = Artifact { sha256: sha256_hex(bytes), size: bytes.len() as u64 };
        let path = self.path(&artifact.sha256);
        if self.check(&path, &artifact).is_ok() {
            return Ok(artifact);
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        // A name no other writer uses, so concurrent puts never share a file.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            artifact.sha256,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let sealed = self.keys.seal(ARTIFACT_KIND, bytes).map_err(Error::Seal)?;
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&sealed).and_then(|()| f.sync_all()))
            .map_err(io("writing", &tmp))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(io("renaming into", &path)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        // The rename is durable once the folder's entry is on disk.
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("syncing", &self.dir))?;
        Ok(artifact)
    }

    /// Reads the artifact back, checking its length and hash first.
    pub fn get(&self, artifact: &Artifact) -> Result<Vec<u8>, ArtifactFault> {
        // The name comes from a database row: only a hash names a file here
        // (`../../x` opened a file outside the store, which could be a FIFO
        // that blocks the open forever).
        let is_hash = artifact.sha256.len() == 64
            && artifact.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !is_hash {
            return Err(ArtifactFault::Corrupted(format!(
                "{:?} is not a sha256 (64 lowercase hex digits)",
                artifact.sha256
            )));
        }
        self.check(&self.path(&artifact.sha256), artifact)
    }

    fn check(&self, path: &Path, artifact: &Artifact) -> Result<Vec<u8>, ArtifactFault> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ArtifactFault::Missing),
            Err(e) => return Err(ArtifactFault::Unreadable(e)),
        };
        let len = file.metadata().map_err(ArtifactFault::Unreadable)?.len();
        // A sealed file is a little longer than what it holds (also without a
        // verify key: the seal is then read only to be refused by name).
        let slack = MAX_SEAL_BYTES;
        if len < artifact.size
            || len > artifact.size.saturating_add(slack)
            || len > MAX_ARTIFACT_BYTES + slack
        {
            return Err(ArtifactFault::Corrupted(format!("{len} bytes, registered as {}", artifact.size)));
        }
        // `len` is bounded above, so this allocation is too; `take` guards
        // against a file that grows while it is read.
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes).map_err(ArtifactFault::Unreadable)?;
        // The seal is checked before anything reads the payload.
        let bytes = match self.keys.open(ARTIFACT_KIND, &bytes) {
            Ok(payload) => payload.into_owned(),
            Err(
                e @ (ps_common::Error::BadSignature
                | ps_common::Error::SealFormat(_)
                | ps_common::Error::DecryptFailed),
            ) => return Err(ArtifactFault::Corrupted(e.to_string())),
            Err(e) => return Err(ArtifactFault::Refused(e)),
        };
        if bytes.len() as u64 != artifact.size {
            return Err(ArtifactFault::Corrupted(format!(
                "holds {} bytes, registered as {}",
                bytes.len(),
                artifact.size
            )));
        }
        let found = sha256_hex(&bytes);
        if found != artifact.sha256 {
            return Err(ArtifactFault::Corrupted(format!(
                "sha256 {found}, registered as {}",
                artifact.sha256
            )));
        }
        Ok(bytes)
    }
}

/// The sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The sha256 of a file's contents, lowercase hex, streamed (for data files
/// of any size).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_hash_and_refuses_missing_and_altered_files() {
        let root = std::env::temp_dir().join(format!("ps-registry-store-{}", std::process::id()));
        let store = ArtifactStore::new(&root);
        let a = store.put(b"hello").unwrap();
        assert_eq!(a.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(store.put(b"hello").unwrap(), a, "idempotent");
        assert_eq!(store.get(&a).unwrap(), b"hello");

        std::fs::write(store.path(&a.sha256), b"jello").unwrap();
        assert!(matches!(store.get(&a), Err(ArtifactFault::Corrupted(m)) if m.contains("sha256")));
        std::fs::write(store.path(&a.sha256), b"hello!").unwrap();
        assert!(matches!(store.get(&a), Err(ArtifactFault::Corrupted(m)) if m.contains("6 bytes")));
        // A put repairs a damaged file of its hash.
        store.put(b"hello").unwrap();
        assert_eq!(store.get(&a).unwrap(), b"hello");
        std::fs::remove_file(store.path(&a.sha256)).unwrap();
        assert!(matches!(store.get(&a), Err(ArtifactFault::Missing)));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// An artifact name that is not a hash (a database row edited to point
    /// elsewhere) opens nothing: `../../outside` was read from outside the
    /// store (and a FIFO there would block the open forever).
    #[test]
    fn a_name_that_is_not_a_hash_opens_nothing() {
        let root = std::env::temp_dir().join(format!("ps-registry-names-{}", std::process::id()));
        let store = ArtifactStore::new(&root);
        store.put(b"hello").unwrap();
        std::fs::write(root.join("outside"), b"hello").unwrap();
        for name in ["../../outside", "/etc/hostname", "", &"A".repeat(64), &"0".repeat(63)] {
            let a = Artifact { sha256: name.into(), size: 5 };
            let got = store.get(&a);
            assert!(
                matches!(got, Err(ArtifactFault::Corrupted(ref m)) if m.contains("not a sha256")),
                "{name}: {got:?}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
