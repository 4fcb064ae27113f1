//! Signed, optionally encrypted files: checkpoints and registry artifacts.
//!
//! A sealed file is a small versioned envelope around a payload (integers
//! little-endian):
//!
//! ```text
//! magic        8  b"PSSEALED"
//! version      2  1
//! flags        2  bit 0: the payload is encrypted (AES-256-GCM); other bits 0
//! kind_len     1  1..=32
//! kind         kind_len ASCII bytes: what the file is ("checkpoint-shard", ...)
//! signer      32  SHA-256 of the ed25519 verifying key that signed
//! key_id      32  encrypted: SHA-256("ps-seal key id v1" || key); else zeros
//! nonce       12  encrypted: random per file; else zeros
//! payload_len  8  bytes of payload (with the 16-byte GCM tag when encrypted)
//! payload      payload_len bytes
//! signature   64  ed25519 over every byte before it (header and payload)
//! ```
//!
//! **What is signed: the bytes on disk** (encrypt, then sign). So a file is
//! checked before anything else touches it: the signature is verified before
//! the payload is decrypted, and decrypted before it is parsed; anyone with
//! the public key can check a file without the secret encryption key (an
//! encrypted registry can be audited by someone who cannot read it); and a
//! forged ciphertext never reaches the decryptor. The header is also the
//! AEAD's associated data, so a decryption authenticates it a second time.
//! `kind` is signed too, so a valid file of one kind is refused where
//! another is expected (a registry artifact is not a checkpoint shard).
//!
//! Reading allocates nothing from a length it has not checked: the header
//! is at most 133 bytes, and `payload_len` must equal what is left of the
//! input before the signature, which the caller has already bounded.
//!
//! Keys are files ([`KeyPaths`]): the signing key as PKCS#8 PEM and the
//! verify key as SPKI PEM (what `openssl pkey` reads and writes for
//! ed25519), the encryption key as one line of 64 hex digits. [`generate`]
//! writes a set, secrets with mode 0600.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// First bytes of every sealed file.
pub const MAGIC: &[u8; 8] = b"PSSEALED";
/// Envelope version written by this code.
pub const VERSION: u16 = 1;
const FLAG_ENCRYPTED: u16 = 1;
const MAX_KIND: usize = 32;
const SIG_LEN: usize = 64;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// Bytes before `kind`.
const PREFIX: usize = 8 + 2 + 2 + 1;
/// Bytes after `kind` up to the payload.
const SUFFIX: usize = 32 + 32 + NONCE_LEN + 8;

/// File names inside a key folder ([`KeyPaths::in_dir`], [`generate`]).
pub const SIGNING_KEY_FILE: &str = "signing.key";
pub const VERIFY_KEY_FILE: &str = "verify.pub";
pub const ENCRYPTION_KEY_FILE: &str = "encryption.key";

/// Where the keys are: each optional. A process that writes needs the
/// signing key (and the encryption key to encrypt); one that only reads
/// needs the verify key (and the encryption key to decrypt).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyPaths {
    pub signing_key: Option<PathBuf>,
    pub verify_key: Option<PathBuf>,
    pub encryption_key: Option<PathBuf>,
}

impl KeyPaths {
    /// The keys of a folder written by [`generate`]: each file that exists.
    pub fn in_dir(dir: &Path) -> KeyPaths {
        let some = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        KeyPaths {
            signing_key: some(SIGNING_KEY_FILE),
            verify_key: some(VERIFY_KEY_FILE),
            encryption_key: some(ENCRYPTION_KEY_FILE),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.signing_key.is_none() && self.verify_key.is_none() && self.encryption_key.is_none()
    }

    /// Reads the key files.
    pub fn load(&self) -> Result<Keys> {
        let signing = self.signing_key.as_deref().map(read_signing_key).transpose()?;
        let verify = self.verify_key.as_deref().map(read_verify_key).transpose()?;
        let encryption = self.encryption_key.as_deref().map(read_encryption_key).transpose()?;
        if let (Some(s), Some(v)) = (&signing, &verify)
            && s.verifying_key() != *v
        {
            return Err(key_err(
                self.verify_key.as_deref().unwrap_or(Path::new("")),
                "is not the verify key of the signing key given with it",
            ));
        }
        Ok(Keys::new(signing, verify, encryption))
    }
}

/// A 256-bit AES-GCM key.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    pub fn from_bytes(bytes: [u8; 32]) -> EncryptionKey {
        EncryptionKey(bytes)
    }

    /// Names the key without revealing it.
    pub fn id(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"ps-seal key id v1");
        h.update(self.0);
        h.finalize().into()
    }
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptionKey({})", short(&self.id()))
    }
}

/// The keys a process holds. [`Keys::none`] writes plain files and reads
/// plain files only (a sealed one is refused: its signature cannot be checked).
#[derive(Debug, Clone, Default)]
pub struct Keys {
    signing: Option<SigningKey>,
    verify: Option<VerifyingKey>,
    encryption: Option<EncryptionKey>,
}

impl Keys {
    /// No keys: files are written and read unsigned.
    pub fn none() -> Keys {
        Keys::default()
    }

    /// The verify key defaults to the signing key's own.
    pub fn new(
        signing: Option<SigningKey>,
        verify: Option<VerifyingKey>,
        encryption: Option<EncryptionKey>,
    ) -> Keys {
        let verify = verify.or_else(|| signing.as_ref().map(SigningKey::verifying_key));
        Keys { signing, verify, encryption }
    }

    /// Whether [`Keys::seal`] signs (a signing key is held).
    pub fn signs(&self) -> bool {
        self.signing.is_some()
    }

    /// Whether [`Keys::open`] requires a valid signature.
    pub fn verifies(&self) -> bool {
        self.verify.is_some()
    }

    pub fn encrypts(&self) -> bool {
        self.encryption.is_some()
    }

    /// These keys without the encryption key: files sealed with them are
    /// signed only (for metadata that anyone with the verify key may read).
    pub fn signing_only(&self) -> Keys {
        Keys { encryption: None, ..self.clone() }
    }

    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        self.verify
    }

    pub fn encryption_key(&self) -> Option<&EncryptionKey> {
        self.encryption.as_ref()
    }

    /// The verify key's fingerprint (hex), if one is held.
    pub fn fingerprint(&self) -> Option<String> {
        self.verify.as_ref().map(|v| hex(&fingerprint(v)))
    }

    /// The file to write for `payload`: sealed as `kind` if a signing key is
    /// held (encrypted if an encryption key is too), else `payload` itself.
    pub fn seal(&self, kind: &str, payload: &[u8]) -> Result<Vec<u8>> {
        self.seal_with(kind, |buf| {
            buf.extend_from_slice(payload);
            Ok::<_, Error>(())
        })
    }

    /// [`Keys::seal`] for a payload written by `write` into the file's own
    /// buffer (no copy of a large payload).
    pub fn seal_with<E: From<Error>>(
        &self,
        kind: &str,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Vec<u8>, E> {
        let Some(signing) = &self.signing else {
            if self.encryption.is_some() {
                return Err(Error::CannotSeal("an encryption key needs a signing key to write".into()).into());
            }
            let mut buf = Vec::new();
            write(&mut buf)?;
            return Ok(buf);
        };
        if kind.is_empty() || kind.len() > MAX_KIND || !kind.is_ascii() {
            return Err(Error::CannotSeal(format!("kind `{kind}`")).into());
        }
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.encryption.is_some() { FLAG_ENCRYPTED } else { 0 };
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.push(kind.len() as u8);
        buf.extend_from_slice(kind.as_bytes());
        buf.extend_from_slice(&fingerprint(&signing.verifying_key()));
        let mut nonce = [0u8; NONCE_LEN];
        match &self.encryption {
            Some(k) => {
                buf.extend_from_slice(&k.id());
                rand::rng().fill_bytes(&mut nonce);
            }
            None => buf.extend_from_slice(&[0u8; 32]),
        }
        buf.extend_from_slice(&nonce);
        let len_at = buf.len();
        buf.extend_from_slice(&[0u8; 8]);
        let header = buf.len();
        write(&mut buf)?;
        let tag_len = if self.encryption.is_some() { TAG_LEN } else { 0 };
        let payload_len = (buf.len() - header + tag_len) as u64;
        buf[len_at..header].copy_from_slice(&payload_len.to_le_bytes());
        if let Some(k) = &self.encryption {
            let (head, body) = buf.split_at_mut(header);
            let tag = Aes256Gcm::new(&k.0.into())
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), head, body)
                .map_err(|_| Error::CannotSeal("encryption failed".into()))?;
            buf.extend_from_slice(&tag);
        }
        let signature = signing.sign(&buf);
        buf.extend_from_slice(&signature.to_bytes());
        Ok(buf)
    }

    /// The payload of a file of `kind`, checked: a sealed file's header,
    /// signature (against the verify key), then its decryption; a plain
    /// file only when no verify key is held. Nothing of the payload is
    /// interpreted here, and nothing is returned from a file that fails.
    pub fn open<'a>(&self, kind: &str, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        if !bytes.starts_with(MAGIC) {
            return match &self.verify {
                Some(_) => Err(Error::Unsigned),
                None => Ok(Cow::Borrowed(bytes)),
            };
        }
        let env = Envelope::parse(bytes)?;
        if env.kind != kind.as_bytes() {
            return Err(Error::SealKind {
                found: String::from_utf8_lossy(env.kind).into_owned(),
                expected: kind.to_string(),
            });
        }
        let Some(verify) = &self.verify else {
            return Err(Error::NoVerifyKey { signer: short(env.signer) });
        };
        let expected = fingerprint(verify);
        if *env.signer != expected {
            return Err(Error::WrongSigner { found: short(env.signer), expected: short(&expected) });
        }
        let signature = Signature::from_bytes(env.signature);
        verify.verify_strict(env.signed, &signature).map_err(|_| Error::BadSignature)?;
        if !env.encrypted {
            return Ok(Cow::Borrowed(env.payload));
        }
        let Some(key) = &self.encryption else {
            return Err(Error::NoDecryptionKey { key_id: short(env.key_id) });
        };
        if *env.key_id != key.id() {
            return Err(Error::WrongDecryptionKey { found: short(env.key_id), expected: short(&key.id()) });
        }
        let (text, tag) = env.payload.split_at(env.payload.len() - TAG_LEN);
        let mut plain = text.to_vec();
        Aes256Gcm::new(&key.0.into())
            .decrypt_in_place_detached(
                Nonce::from_slice(env.nonce),
                env.header,
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| Error::DecryptFailed)?;
        Ok(Cow::Owned(plain))
    }
}

/// Whether `bytes` look like a sealed file (its magic).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The parts of a sealed file, borrowed, with every length checked.
struct Envelope<'a> {
    encrypted: bool,
    kind: &'a [u8],
    signer: &'a [u8; 32],
    key_id: &'a [u8; 32],
    nonce: &'a [u8; NONCE_LEN],
    header: &'a [u8],
    payload: &'a [u8],
    signed: &'a [u8],
    signature: &'a [u8; SIG_LEN],
}

impl<'a> Envelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>> {
        let bad = |m: String| Error::SealFormat(m);
        let truncated = || bad(format!("truncated ({} bytes)", bytes.len()));
        if bytes.len() < PREFIX {
            return Err(truncated());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(bad(format!("envelope version {version}, this build reads {VERSION}")));
        }
        let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
        if flags & !FLAG_ENCRYPTED != 0 {
            return Err(bad(format!("unknown flags {flags:#06x}")));
        }
        let kind_len = usize::from(bytes[12]);
        if kind_len == 0 || kind_len > MAX_KIND {
            return Err(bad(format!("kind of {kind_len} bytes")));
        }
        let header_len = PREFIX + kind_len + SUFFIX;
        let header = bytes.get(..header_len).ok_or_else(truncated)?;
        let kind = &header[PREFIX..PREFIX + kind_len];
        let rest = &header[PREFIX + kind_len..];
        let (signer, rest) = rest.split_at(32);
        let (key_id, rest) = rest.split_at(32);
        let (nonce, len) = rest.split_at(NONCE_LEN);
        let payload_len = u64::from_le_bytes(len.try_into().map_err(|_| truncated())?);
        let available = (bytes.len() - header_len).checked_sub(SIG_LEN).ok_or_else(truncated)?;
        if payload_len != available as u64 {
            return Err(bad(format!(
                "{} bytes, the header says {} (truncated or extended)",
                bytes.len(),
                (header_len as u64).saturating_add(payload_len).saturating_add(SIG_LEN as u64)
            )));
        }
        let encrypted = flags & FLAG_ENCRYPTED != 0;
        if encrypted && available < TAG_LEN {
            return Err(truncated());
        }
        let (signed, signature) = bytes.split_at(header_len + available);
        let arr = |s: &'a [u8]| <&[u8; 32]>::try_from(s).map_err(|_| truncated());
        Ok(Envelope {
            encrypted,
            kind,
            signer: arr(signer)?,
            key_id: arr(key_id)?,
            nonce: nonce.try_into().map_err(|_| truncated())?,
            header,
            payload: &signed[header_len..],
            signed,
            signature: signature.try_into().map_err(|_| truncated())?,
        })
    }
}

fn fingerprint(v: &VerifyingKey) -> [u8; 32] {
    Sha256::digest(v.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 8 bytes in hex: enough to tell keys apart in a message.
fn short(bytes: &[u8; 32]) -> String {
    hex(&bytes[..8])
}

fn key_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::KeyFile { path: path.display().to_string(), reason: reason.into() }
}

/// Key files are small: refuse to read anything larger.
const MAX_KEY_FILE: u64 = 16 << 10;

fn read_text(path: &Path) -> Result<String> {
    crate::files::read_text_capped(path, MAX_KEY_FILE)
        .map_err(|e| key_err(path, format!("{e}: not a key file")))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    SigningKey::from_pkcs8_pem(&read_text(path)?)
        .map_err(|e| key_err(path, format!("not an ed25519 PKCS#8 PEM private key: {e}")))
}

pub fn read_verify_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(&read_text(path)?)
        .map_err(|e| key_err(path, format!("not an ed25519 SPKI PEM public key: {e}")))
}

pub fn read_encryption_key(path: &Path) -> Result<EncryptionKey> {
    let text = read_text(path)?;
    let text = text.trim();
    let bad = || key_err(path, "expected one line of 64 hex digits (a 256-bit AES-GCM key)");
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(EncryptionKey(key))
}

/// Fresh keys from the OS-seeded CSPRNG.
pub fn new_signing_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

pub fn new_encryption_key() -> EncryptionKey {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    EncryptionKey(key)
}

/// Writes a new key set into `dir` (created if missing): `signing.key`
/// (mode 0600), `verify.pub`, and with `encrypt` `encryption.key` (0600).
/// Refuses to overwrite an existing key file. Returns the paths.
pub fn generate(dir: &Path, encrypt: bool) -> Result<KeyPaths> {
    std::fs::create_dir_all(dir).map_err(|e| key_err(dir, e.to_string()))?;
    let signing = new_signing_key();
    let pem = signing.to_pkcs8_pem(LineEnding::LF).map_err(|e| key_err(dir, e.to_string()))?;
    let public =
        signing.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|e| key_err(dir, e.to_string()))?;
    let paths = KeyPaths {
        signing_key: Some(dir.join(SIGNING_KEY_FILE)),
        verify_key: Some(dir.join(VERIFY_KEY_FILE)),
        encryption_key: encrypt.then(|| dir.join(ENCRYPTION_KEY_FILE)),
    };
    for p in [&paths.signing_key, &paths.verify_key, &paths.encryption_key].into_iter().flatten() {
        if p.exists() {
            return Err(key_err(p, "exists already; not overwritten"));
        }
    }
    write_new(paths.signing_key.as_deref().unwrap_or(dir), pem.as_bytes(), true)?;
    write_new(paths.verify_key.as_deref().unwrap_or(dir), public.as_bytes(), false)?;
    if let Some(p) = &paths.encryption_key {
        let line = format!("{}\n", hex(&new_encryption_key().0));
        write_new(p, line.as_bytes(), true)?;
    }
    Ok(paths)
}

/// Creates `path` (never replacing a file), secret ones with mode 0600 from
/// the start, and flushes it to disk.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| key_err(path, e.to_string()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| key_err(path, e.to_string()))
}

#[cfg(test)]
mod tests;
