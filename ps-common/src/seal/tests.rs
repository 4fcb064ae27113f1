use proptest::prelude::*;

use super::*;

const KIND: &str = "checkpoint-shard";

fn keys(encrypt: bool) -> Keys {
    Keys::new(Some(new_signing_key()), None, encrypt.then(new_encryption_key))
}

/// Reader-side keys of `k`: the verify key and the encryption key only.
fn reader(k: &Keys) -> Keys {
    Keys::new(None, k.verify, k.encryption.clone())
}

fn payload() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn round_trips_signed_and_encrypted() {
    for encrypt in [false, true] {
        let k = keys(encrypt);
        let file = k.seal(KIND, &payload()).unwrap();
        assert!(is_sealed(&file));
        assert_eq!(file.windows(64).any(|w| w == &payload()[..64]), !encrypt, "encrypted: no plaintext");
        assert_eq!(reader(&k).open(KIND, &file).unwrap().as_ref(), payload().as_slice());
        assert_eq!(k.open(KIND, &file).unwrap().as_ref(), payload().as_slice(), "the writer reads its own");
        // An empty payload too.
        let empty = k.seal(KIND, &[]).unwrap();
        assert!(reader(&k).open(KIND, &empty).unwrap().is_empty());
    }
}

#[test]
fn two_seals_of_one_payload_differ_when_encrypted() {
    let k = keys(true);
    assert_ne!(k.seal(KIND, b"same").unwrap(), k.seal(KIND, b"same").unwrap(), "a fresh nonce per file");
}

#[test]
fn without_a_signing_key_the_file_is_the_payload() {
    assert_eq!(Keys::none().seal(KIND, b"plain").unwrap(), b"plain");
    assert_eq!(Keys::none().open(KIND, b"plain").unwrap().as_ref(), b"plain");
    let enc_only = Keys::new(None, None, Some(new_encryption_key()));
    assert!(matches!(enc_only.seal(KIND, b"x"), Err(Error::CannotSeal(_))));
}

#[test]
fn every_flipped_byte_is_refused() {
    for encrypt in [false, true] {
        let k = keys(encrypt);
        let r = reader(&k);
        let file = k.seal(KIND, &payload()[..300]).unwrap();
        let header = PREFIX + KIND.len() + SUFFIX;
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            let err = r.open(KIND, &bad).expect_err(&format!("byte {i} flipped (encrypt {encrypt})"));
            let region = if i < 8 {
                "magic"
            } else if i < header {
                "header"
            } else if i < file.len() - 64 {
                "payload"
            } else {
                "signature"
            };
            match region {
                "magic" => assert_eq!(err, Error::Unsigned, "byte {i}"),
                "payload" | "signature" => assert_eq!(err, Error::BadSignature, "byte {i}"),
                _ => assert!(
                    matches!(
                        err,
                        Error::SealFormat(_)
                            | Error::SealKind { .. }
                            | Error::WrongSigner { .. }
                            | Error::BadSignature
                    ),
                    "byte {i}: {err}"
                ),
            }
        }
    }
}

#[test]
fn truncated_and_extended_files_are_refused() {
    let k = keys(true);
    let file = k.seal(KIND, &payload()).unwrap();
    for len in [0, 7, 8, 12, 13, 40, 100, 150, file.len() / 2, file.len() - 64, file.len() - 1] {
        let err = reader(&k).open(KIND, &file[..len]).unwrap_err();
        assert!(matches!(err, Error::SealFormat(_) | Error::Unsigned), "{len} bytes: {err}");
    }
    let mut longer = file.clone();
    longer.push(0);
    assert!(matches!(reader(&k).open(KIND, &longer), Err(Error::SealFormat(m)) if m.contains("extended")));
}

#[test]
fn wrong_key_unsigned_kind_and_missing_keys_are_refused() {
    let k = keys(false);
    let file = k.seal(KIND, b"model").unwrap();
    // Signed by another key.
    let other = reader(&keys(false));
    assert!(matches!(other.open(KIND, &file), Err(Error::WrongSigner { .. })));
    // A forged fingerprint does not help: the signature is still checked.
    let mut forged = keys(false).seal(KIND, b"model").unwrap();
    let at = PREFIX + KIND.len();
    forged[at..at + 32].copy_from_slice(&fingerprint(&k.verify.unwrap()));
    assert_eq!(reader(&k).open(KIND, &forged).unwrap_err(), Error::BadSignature);
    // Unsigned, when a verify key is configured.
    assert_eq!(reader(&k).open(KIND, b"model").unwrap_err(), Error::Unsigned);
    // Signed, with no verify key.
    assert!(matches!(Keys::none().open(KIND, &file), Err(Error::NoVerifyKey { .. })));
    // Another kind of file.
    assert!(matches!(reader(&k).open("registry-artifact", &file), Err(Error::SealKind { .. })));
}

#[test]
fn encrypted_files_need_their_key() {
    let k = keys(true);
    let file = k.seal(KIND, b"secret weights").unwrap();
    let no_key = Keys::new(None, k.verify, None);
    assert!(matches!(no_key.open(KIND, &file), Err(Error::NoDecryptionKey { .. })));
    let wrong = Keys::new(None, k.verify, Some(new_encryption_key()));
    assert!(matches!(wrong.open(KIND, &file), Err(Error::WrongDecryptionKey { .. })));
}

#[test]
fn a_resigned_tampered_ciphertext_fails_decryption() {
    // Someone holding the signing key but not the encryption key cannot
    // alter an encrypted payload undetected: GCM authenticates it.
    let k = keys(true);
    let mut file = k.seal(KIND, b"secret weights").unwrap();
    let header = PREFIX + KIND.len() + SUFFIX;
    file[header] ^= 1;
    file.truncate(file.len() - 64);
    let sig = k.signing.as_ref().unwrap().sign(&file);
    file.extend_from_slice(&sig.to_bytes());
    assert_eq!(reader(&k).open(KIND, &file).unwrap_err(), Error::DecryptFailed);
}

#[test]
fn key_files_round_trip_and_secrets_are_private() {
    let dir = std::env::temp_dir().join(format!("ps-seal-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let paths = generate(&dir, true).unwrap();
    assert_eq!(paths, KeyPaths::in_dir(&dir));
    let k = paths.load().unwrap();
    assert!(k.signs() && k.verifies() && k.encrypts());
    let file = k.seal(KIND, b"x").unwrap();
    let r = KeyPaths { signing_key: None, ..paths.clone() }.load().unwrap();
    assert_eq!(r.open(KIND, &file).unwrap().as_ref(), b"x");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Option<PathBuf>| {
            std::fs::metadata(p.as_ref().unwrap()).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&paths.signing_key), 0o600);
        assert_eq!(mode(&paths.encryption_key), 0o600);
    }
    // Never overwritten.
    assert!(matches!(generate(&dir, false), Err(Error::KeyFile { reason, .. }) if reason.contains("exists")));
    // A verify key that is not the signing key's is refused.
    let other = dir.join("other");
    let other_paths = generate(&other, false).unwrap();
    let mixed = KeyPaths { verify_key: other_paths.verify_key, ..paths.clone() };
    assert!(matches!(mixed.load(), Err(Error::KeyFile { .. })));
    // Malformed key files name themselves.
    std::fs::write(dir.join("bad.key"), "not a key").unwrap();
    for p in [
        KeyPaths { signing_key: Some(dir.join("bad.key")), ..KeyPaths::default() },
        KeyPaths { verify_key: Some(dir.join("bad.key")), ..KeyPaths::default() },
        KeyPaths { encryption_key: Some(dir.join("bad.key")), ..KeyPaths::default() },
    ] {
        assert!(matches!(p.load(), Err(Error::KeyFile { path, .. }) if path.ends_with("bad.key")));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A key path naming a device that never ends (its size reads as 0) is
/// refused: it was read to the end, growing without bound.
#[test]
fn a_key_path_naming_an_endless_device_is_refused() {
    let zero = Path::new("/dev/zero");
    if !zero.exists() {
        return;
    }
    for p in [
        KeyPaths { signing_key: Some(zero.into()), ..KeyPaths::default() },
        KeyPaths { verify_key: Some(zero.into()), ..KeyPaths::default() },
        KeyPaths { encryption_key: Some(zero.into()), ..KeyPaths::default() },
    ] {
        assert!(
            matches!(p.load(), Err(Error::KeyFile { ref reason, .. }) if reason.contains("not a key file")),
            "{:?}",
            p.load().map(|_| ())
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No byte string panics the reader, sealed-looking or not.
    #[test]
    fn no_input_panics_the_reader(
        tail in proptest::collection::vec(any::<u8>(), 0..400),
        sealed_prefix in any::<bool>(),
        kind_len in 0u8..40,
        flags in 0u16..4,
    ) {
        let k = reader(&keys(true));
        let mut bytes = Vec::new();
        if sealed_prefix {
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.push(kind_len);
        }
        bytes.extend_from_slice(&tail);
        let _ = k.open(KIND, &bytes);
        let _ = Keys::none().open(KIND, &bytes);
    }

    /// A real file with any one byte range overwritten never opens to
    /// anything but an error (or, untouched, its payload).
    #[test]
    fn an_altered_file_never_opens(at in 0usize..600, junk in proptest::collection::vec(any::<u8>(), 1..16)) {
        let k = keys(true);
        let file = k.seal(KIND, &payload()[..400]).unwrap();
        let mut bad = file.clone();
        let at = at % bad.len();
        for (i, b) in junk.iter().enumerate() {
            if let Some(x) = bad.get_mut(at + i) { *x = *b; }
        }
        let opened = reader(&k).open(KIND, &bad);
        if bad == file {
            let p = payload();
            let opened = opened.unwrap();
            prop_assert_eq!(opened.as_ref(), &p[..400]);
        } else {
            prop_assert!(opened.is_err());
        }
    }
}
