//! Shard files and manifests: round trip, and every kind of bad checkpoint
//! refused whole, with the previous checkpoint still good.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_common::optim::Rule;
use ps_common::partition;
use ps_common::spec::{Consistency, Init, TableSpec};

use ps_common::seal::Keys;

use super::*;
use crate::clock::Clocks;
use crate::store::{PushInfo, Store};
use crate::{Error, ServerConfig};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ps-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Shard `shard` of 2 after a few pushes: a dense Adam tensor (optimizer
/// state and step counts) and a sparse Adagrad table.
fn trained_shard(shard: u32) -> (Store, Clocks) {
    let store = Store::new(shard, 2);
    let mut dense = TableSpec::dense("w", &[1000], Init::zeros(), Rule::adam(0.01).into());
    dense.layout = ps_common::spec::Layout::Dense { shape: vec![1000], chunk_len: 64 };
    store.register(dense, 2).unwrap();
    store
        .register(
            TableSpec::sparse(
                "e",
                4,
                Init::zeros(),
                Rule::Adagrad { lr: 0.1, eps: 1e-10, initial_accumulator: 0.1, weight_decay: 0.0 }.into(),
            ),
            2,
        )
        .unwrap();
    let chunks: Vec<u32> = (0..16).filter(|&i| partition::chunk_shard("w", i, 2) == shard).collect();
    let keys: Vec<u64> = (0..200).filter(|&k| partition::key_shard(k, 2) == shard).collect();
    for seq in 1..=3u64 {
        let grads: Vec<Vec<f32>> = chunks
            .iter()
            .map(|&i| {
                let n = if i == 15 { 1000 - 15 * 64 } else { 64 };
                (0..n).map(|j| (j as f32 + seq as f32).sin()).collect()
            })
            .collect();
        let push: Vec<(&str, u32, &[f32])> =
            chunks.iter().zip(&grads).map(|(&i, g)| ("w", i, g.as_slice())).collect();
        store.push_dense(&push, PushInfo { worker: 7, seq, ..PushInfo::default() }).unwrap();
        let g: Vec<f32> = (0..keys.len() * 4).map(|j| j as f32 * 0.01).collect();
        store
            .push_sparse(
                "e",
                &keys[..keys.len() / (seq as usize)],
                &g[..keys.len() / (seq as usize) * 4],
                PushInfo::default(),
            )
            .unwrap();
    }
    let clocks = Clocks::default();
    clocks.join(7, Consistency::Bsp, Duration::from_secs(5)).unwrap();
    clocks.tick(7, 2);
    clocks.join(8, Consistency::Bsp, Duration::from_secs(5)).unwrap();
    clocks.leave(8);
    (store, clocks)
}

fn file_of(checkpoint: &str, shard: u32, store: &Store, clocks: &Clocks) -> ShardFile {
    ShardFile {
        checkpoint: checkpoint.into(),
        shard,
        num_shards: 2,
        clocks: clocks.capture(),
        store: store.capture(),
    }
}

/// Writes a complete two-shard checkpoint `name` under `root`.
fn write_checkpoint(root: &Path, name: &str) -> Manifest {
    write_checkpoint_with(root, name, &Keys::none())
}

/// [`write_checkpoint`], sealed with `keys`.
fn write_checkpoint_with(root: &Path, name: &str, keys: &Keys) -> Manifest {
    let dir = root.join(name);
    let shards = (0..2)
        .map(|s| {
            let (store, clocks) = trained_shard(s);
            write_shard(&dir, &file_of(name, s, &store, &clocks), keys).unwrap()
        })
        .collect();
    let m = Manifest {
        version: FORMAT_VERSION,
        name: name.into(),
        created_unix_ms: 0,
        job: Some("job".into()),
        num_shards: 2,
        workers: vec![WorkerEntry { worker: 7, clock: 3 }],
        shards,
        held_ms: 0.0,
        total_ms: 0.0,
    };
    m.write(&dir, keys).unwrap();
    m
}

fn config(shard: u32, num_shards: u32, restore: &Path) -> ServerConfig {
    ServerConfig { shard, num_shards, restore: Some(restore.to_path_buf()), ..ServerConfig::default() }
}

#[test]
fn a_shard_comes_back_exactly_as_it_was_checkpointed() {
    let tmp = TempDir::new("roundtrip");
    write_checkpoint(&tmp.0, "ckpt-000001");
    for shard in 0..2 {
        let (store, clocks) = trained_shard(shard);
        let (restored, rclocks) = crate::restore(&config(shard, 2, &tmp.0), &tmp.0, &Keys::none()).unwrap();
        assert!(restored.capture() == store.capture(), "values, optimizer state, steps and seqs");
        assert_eq!(rclocks.capture().members.len(), 1);
        assert_eq!(rclocks.clock_of(7), Some(3));
        assert_eq!(rclocks.capture().left, clocks.capture().left, "workers that left keep their clock");
        assert_eq!(restored.last_seq(7), 3);
        // The next update lands on the restored optimizer state exactly as
        // on the original.
        let chunk = (0..16).find(|&i| partition::chunk_shard("w", i, 2) == shard).unwrap();
        let g = vec![0.5f32; 64];
        for s in [&store, &restored] {
            s.push_dense(&[("w", chunk, &g)], PushInfo { worker: 7, seq: 4, ..PushInfo::default() }).unwrap();
        }
        assert!(restored.capture() == store.capture());
    }
}

/// Replaces shard 0's file with `trained_shard(0)` as edited by `edit`,
/// re-signed in the manifest, so only the content checks can catch it.
fn forge(d: &Path, m: &Manifest, edit: impl Fn(&mut ShardFile)) {
    let (store, clocks) = trained_shard(0);
    let mut f = file_of(&m.name, 0, &store, &clocks);
    edit(&mut f);
    let tmp = d.join("forged");
    let e = write_shard(&tmp, &f, &Keys::none()).unwrap();
    let bytes = std::fs::read(tmp.join(e.file)).unwrap();
    std::fs::remove_dir_all(tmp).unwrap();
    resign(d, m, bytes);
}

/// Writes `bytes` as shard 0's file and re-signs it in the manifest.
fn resign(dir: &Path, m: &Manifest, bytes: Vec<u8>) {
    resign_with(dir, m, bytes, &Keys::none())
}

/// [`resign`], the manifest sealed with `keys`.
fn resign_with(dir: &Path, m: &Manifest, bytes: Vec<u8>, keys: &Keys) {
    std::fs::write(dir.join(shard_file_name(0, 2)), &bytes).unwrap();
    let mut m = m.clone();
    m.shards[0].bytes = bytes.len() as u64;
    m.shards[0].sha256 = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
    m.write(dir, keys).unwrap();
}

/// Damage done to a checkpoint folder, given its manifest.
type Damage = Box<dyn Fn(&Path, &Manifest)>;

/// Each kind of damage, applied to the newest of two checkpoints: restoring
/// it fails with a clear error, and the older one still restores.
#[test]
fn bad_checkpoints_are_refused_whole_and_the_previous_one_stays_good() {
    let file0 = |dir: &Path| dir.join(shard_file_name(0, 2));
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(move |d, _| {
                let b = std::fs::read(file0(d)).unwrap();
                std::fs::write(file0(d), &b[..b.len() / 2]).unwrap();
            }),
            "truncated",
        ),
        (
            "corrupted",
            Box::new(move |d, _| {
                let mut b = std::fs::read(file0(d)).unwrap();
                let n = b.len();
                b[n - 10] ^= 0xff;
                std::fs::write(file0(d), &b).unwrap();
            }),
            "SHA-256",
        ),
        ("missing file", Box::new(move |d, _| std::fs::remove_file(file0(d)).unwrap()), "opening"),
        (
            "foreign version",
            Box::new(move |d, m| {
                let (store, clocks) = trained_shard(0);
                let mut b = Vec::from(MAGIC.as_slice());
                let record = file_of(&m.name, 0, &store, &clocks);
                let tmp = d.join("v2");
                let e = write_shard(&tmp, &record, &Keys::none()).unwrap();
                let body = std::fs::read(tmp.join(e.file)).unwrap();
                // The record starts with its version: a map whose first value is 1.
                let mut body = body[MAGIC.len()..].to_vec();
                let at = body.iter().position(|&x| x == 1).unwrap();
                body[at] = 2;
                b.extend(body);
                std::fs::remove_dir_all(tmp).unwrap();
                resign(d, m, b);
            }),
            "format version 2",
        ),
        (
            "not a checkpoint",
            Box::new(move |d, m| resign(d, m, b"{\"hello\": 1}".to_vec())),
            "not a shard checkpoint",
        ),
        (
            "garbage after the magic",
            Box::new(move |d, m| {
                let mut b = MAGIC.to_vec();
                b.extend([0xdd, 0xff, 0xff, 0xff, 0xff, 0x00]);
                resign(d, m, b)
            }),
            "undecodable",
        ),
        (
            "another shard's file",
            Box::new(move |d, m| {
                let b = std::fs::read(d.join(shard_file_name(1, 2))).unwrap();
                resign(d, m, b)
            }),
            "shard 1 of 2",
        ),
        (
            "a lying block length",
            Box::new(|d, m| {
                forge(d, m, |f| {
                    f.store.tables[0].data.pop();
                })
            }),
            "fewer values",
        ),
        (
            "a row of another shard",
            Box::new(|d, m| {
                forge(d, m, |f| {
                    let t = f.store.tables.iter_mut().find(|t| t.spec.name == "e").unwrap();
                    t.keys[0] = (0..).find(|&k| partition::key_shard(k, 2) == 1).unwrap();
                })
            }),
            "belongs to shard 1",
        ),
        (
            "a non-finite value",
            Box::new(|d, m| {
                forge(d, m, |f| {
                    f.store.tables[0].data[3] = f32::NAN;
                })
            }),
            "non-finite",
        ),
        (
            "a manifest missing a shard",
            Box::new(move |d, m| {
                let mut m = m.clone();
                m.shards.pop();
                m.write(d, &Keys::none()).unwrap();
            }),
            "lists shards",
        ),
        (
            "a corrupted manifest",
            Box::new(move |d, _| std::fs::write(d.join(MANIFEST), b"{\"version\":").unwrap()),
            "manifest.json",
        ),
    ];
    for (what, damage, expected) in cases {
        let tmp = TempDir::new(&what.replace(' ', "-"));
        write_checkpoint(&tmp.0, "ckpt-000001");
        let m = write_checkpoint(&tmp.0, "ckpt-000002");
        let newest = tmp.0.join("ckpt-000002");
        damage(&newest, &m);
        let err = crate::restore(&config(0, 2, &newest), &newest, &Keys::none())
            .err()
            .unwrap_or_else(|| panic!("{what}: restored"));
        let text = err.to_string();
        assert!(text.contains(expected), "{what}: {text}");
        let older = tmp.0.join("ckpt-000001");
        let (store, _) = crate::restore(&config(0, 2, &older), &older, &Keys::none()).unwrap();
        assert!(store.capture() == trained_shard(0).0.capture(), "{what}: the previous checkpoint");
    }
}

#[test]
fn a_checkpoint_of_another_shard_count_is_refused() {
    let tmp = TempDir::new("count");
    write_checkpoint(&tmp.0, "ckpt-000001");
    let err = crate::restore(&config(0, 3, &tmp.0), &tmp.0, &Keys::none()).err().unwrap();
    assert!(matches!(err, Error::BadCheckpoint(ref m) if m.contains("of 2 shards")), "{err}");
}

/// A checkpoint is restored under the shard's own `[limits]`, not the
/// defaults: one holding more tables than the shard allows is refused (it
/// was restored, over the limit), and its tables are checked against the
/// shard's budget as they are registered.
#[test]
fn a_checkpoint_is_restored_under_the_shards_own_limits() {
    let tmp = TempDir::new("limits");
    write_checkpoint(&tmp.0, "ckpt-000001");
    let mut c = config(0, 2, &tmp.0);
    c.limits.max_tables = 1;
    let err =
        crate::restore(&c, &tmp.0, &Keys::none()).err().expect("two tables restored under max_tables = 1");
    assert!(err.to_string().contains("tables"), "{err}");
    let (store, _) = crate::restore(&config(0, 2, &tmp.0), &tmp.0, &Keys::none()).unwrap();
    assert_eq!(store.sizes().0, 2);
}

/// A checkpoint's clock set and seq records are restored under the
/// shard's `[limits]` too: more workers than `max_workers`, or a clock past
/// `max_clock`, is refused (both were restored as they were).
#[test]
fn a_checkpoints_workers_are_restored_under_the_shards_limits() {
    let tmp = TempDir::new("worker-limits");
    write_checkpoint(&tmp.0, "ckpt-000001");
    // Shard 0 holds workers 7 (clock 3) and 8 (left).
    for (limits, expected) in [
        (crate::budget::Limits { max_workers: 1, ..Default::default() }, "max_workers"),
        (crate::budget::Limits { max_clock: 2, ..Default::default() }, "max_clock"),
    ] {
        let c = ServerConfig { limits, ..config(0, 2, &tmp.0) };
        let err = crate::restore(&c, &tmp.0, &Keys::none()).err().expect("restored over the limits");
        assert!(matches!(err, Error::BadCheckpoint(ref m) if m.contains(expected)), "{err}");
    }
    let c = ServerConfig {
        limits: crate::budget::Limits { max_workers: 2, max_clock: 3, ..Default::default() },
        ..config(0, 2, &tmp.0)
    };
    let (_, clocks) = crate::restore(&c, &tmp.0, &Keys::none()).unwrap();
    assert_eq!(clocks.highest(), 3);
}

/// What a crash while writing leaves behind (a temporary shard file, or
/// renamed shard files without a manifest) is not a checkpoint: the previous
/// one stays the latest, and it goes once a newer complete one exists.
#[test]
fn a_crash_while_writing_leaves_the_previous_checkpoint_the_latest() {
    let tmp = TempDir::new("crash");
    write_checkpoint(&tmp.0, "ckpt-000001");
    let cut_short = tmp.0.join("ckpt-000002");
    std::fs::create_dir_all(&cut_short).unwrap();
    std::fs::write(cut_short.join(format!("{}.tmp", shard_file_name(0, 2))), b"PSCKPT01 half").unwrap();
    let (store, clocks) = trained_shard(1);
    write_shard(&cut_short, &file_of("ckpt-000002", 1, &store, &clocks), &Keys::none()).unwrap();
    assert_eq!(latest(&tmp.0, &Keys::none()).unwrap().unwrap().manifest.name, "ckpt-000001");
    assert_eq!(resolve(&tmp.0, &Keys::none()).unwrap().manifest.name, "ckpt-000001");
    crate::restore(&config(0, 2, &tmp.0), &tmp.0, &Keys::none()).unwrap();
    assert_eq!(next_name(&tmp.0).unwrap(), "ckpt-000003", "a cut-short name is not reused");
    write_checkpoint(&tmp.0, "ckpt-000003");
    write_checkpoint(&tmp.0, "ckpt-000004");
    let deleted = prune(&tmp.0, 2, &Keys::none()).unwrap();
    assert_eq!(deleted, vec![tmp.0.join("ckpt-000001"), cut_short]);
    let left: Vec<String> =
        complete(&tmp.0, &Keys::none()).unwrap().into_iter().map(|c| c.manifest.name).collect();
    assert_eq!(left, ["ckpt-000003", "ckpt-000004"]);
}

#[test]
fn checkpoint_names_from_the_network_cannot_escape_the_folder() {
    for bad in ["", "..", "../x", "a/b", "x y", &"a".repeat(65)] {
        assert!(matches!(check_name(bad), Err(Error::CheckpointName(_))), "{bad:?}");
    }
    check_name("ckpt-000001").unwrap();
}

fn seal_keys(encrypt: bool) -> Keys {
    use ps_common::seal::{new_encryption_key, new_signing_key};
    Keys::new(Some(new_signing_key()), None, encrypt.then(new_encryption_key))
}

/// A sealed checkpoint restores exactly; each attack on it is refused with
/// an error naming the file, and the intact checkpoint then still restores.
#[test]
fn a_sealed_checkpoint_restores_and_every_tamper_is_refused() {
    use ps_common::seal::{Keys, is_sealed};
    for encrypt in [false, true] {
        let tmp = TempDir::new(&format!("sealed-{encrypt}"));
        let keys = seal_keys(encrypt);
        let m = write_checkpoint_with(&tmp.0, "ckpt-000001", &keys);
        let dir = tmp.0.join("ckpt-000001");
        let (file0, manifest) = (dir.join(shard_file_name(0, 2)), dir.join(MANIFEST));
        let (shard0, manifest0) = (std::fs::read(&file0).unwrap(), std::fs::read(&manifest).unwrap());
        assert!(is_sealed(&shard0) && is_sealed(&manifest0));
        let (store, _) = trained_shard(0);
        if encrypt {
            let plain =
                store.capture().tables[0].data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>();
            assert!(!shard0.windows(64).any(|w| w == &plain[..64]), "no plaintext values on disk");
        }
        // The readers hold the verify key (and the encryption key) only.
        let reader = Keys::new(None, Some(keys_verify(&keys)), keys_encryption(&keys));
        let restore = |k: &Keys| crate::restore(&config(0, 2, &tmp.0), &tmp.0, k);
        assert!(restore(&reader).unwrap().0.capture() == store.capture());

        let other = seal_keys(encrypt);
        // (what, how to damage the files, the error it must give, the file it names)
        type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str, &'a Path);
        let mut cases: Vec<Case> = vec![
            ("no verify key", Box::new(|| ()), "no verify key is configured", &manifest),
            ("signed by another key", Box::new(|| ()), "not by the configured verify key", &manifest),
            (
                "a flipped byte, the checksum re-signed",
                Box::new(|| {
                    let mut b = shard0.clone();
                    b[shard0.len() / 2] ^= 1;
                    resign_with(&dir, &m, b, &keys);
                }),
                "signature does not verify",
                &file0,
            ),
            (
                "truncated, the checksum re-signed",
                Box::new(|| resign_with(&dir, &m, shard0[..shard0.len() - 100].to_vec(), &keys)),
                "truncated",
                &file0,
            ),
            (
                "an unsigned file, the checksum re-signed",
                Box::new(|| {
                    let (store, clocks) = trained_shard(0);
                    let plain = dir.join("plain");
                    let e = write_shard(&plain, &file_of("ckpt-000001", 0, &store, &clocks), &Keys::none())
                        .unwrap();
                    resign_with(&dir, &m, std::fs::read(plain.join(e.file)).unwrap(), &keys);
                    std::fs::remove_dir_all(plain).unwrap();
                }),
                "--reseal CHECKPOINT",
                &file0,
            ),
            (
                "a flipped byte in the manifest",
                Box::new(|| {
                    let mut b = manifest0.clone();
                    b[manifest0.len() - 80] ^= 1;
                    std::fs::write(&manifest, b).unwrap();
                }),
                "signature does not verify",
                &manifest,
            ),
        ];
        if encrypt {
            cases.push(("encrypted, no encryption key", Box::new(|| ()), "no encryption key", &file0));
        }
        for (what, damage, message, named) in cases {
            damage();
            let k = match what {
                "no verify key" => Keys::none(),
                "signed by another key" => Keys::new(None, Some(keys_verify(&other)), keys_encryption(&keys)),
                "encrypted, no encryption key" => Keys::new(None, Some(keys_verify(&keys)), None),
                _ => reader.clone(),
            };
            let err = restore(&k).err().unwrap_or_else(|| panic!("{what}: restored"));
            let text = err.to_string();
            assert!(matches!(err, Error::BadCheckpoint(_)), "{what}: {err}");
            assert!(text.contains(message) && text.contains(&named.display().to_string()), "{what}: {text}");
            // Undo: the intact checkpoint restores again.
            std::fs::write(&file0, &shard0).unwrap();
            std::fs::write(&manifest, &manifest0).unwrap();
            assert!(restore(&reader).unwrap().0.capture() == store.capture(), "{what}: intact again");
        }
    }
}

fn keys_verify(k: &Keys) -> ps_common::seal::VerifyingKey {
    k.verifying_key().unwrap()
}

fn keys_encryption(k: &Keys) -> Option<ps_common::seal::EncryptionKey> {
    k.encryption_key().cloned()
}

/// A checkpoint written without keys is refused once keys are configured,
/// with the way out in the message; `reseal` signs it in place.
#[test]
fn an_unsigned_checkpoint_is_refused_until_resealed() {
    let tmp = TempDir::new("reseal");
    write_checkpoint(&tmp.0, "ckpt-000001");
    let keys = seal_keys(true);
    let err = crate::restore(&config(1, 2, &tmp.0), &tmp.0, &keys).err().unwrap();
    assert!(
        err.to_string().contains("not signed") && err.to_string().contains("ps-cluster keys --reseal"),
        "{err}"
    );
    let dir = tmp.0.join("ckpt-000001");
    reseal(&dir, &Keys::none(), &keys).unwrap();
    let (store, _) = trained_shard(1);
    assert!(crate::restore(&config(1, 2, &tmp.0), &tmp.0, &keys).unwrap().0.capture() == store.capture());
    assert!(crate::restore(&config(1, 2, &tmp.0), &tmp.0, &Keys::none()).is_err(), "now sealed");
    // And back: resealing with no keys disables the seal.
    reseal(&dir, &keys, &Keys::none()).unwrap();
    assert!(
        crate::restore(&config(1, 2, &tmp.0), &tmp.0, &Keys::none()).unwrap().0.capture() == store.capture()
    );
}

/// A manifest claiming 2^32 - 1 shards (plain, or signed by a key the
/// reader trusts) is refused without allocating by that count (it was a
/// 16 GiB list of shard numbers).
#[test]
fn a_manifest_claiming_billions_of_shards_is_refused_without_allocating() {
    let tmp = TempDir::new("manyshards");
    let mut m = write_checkpoint(&tmp.0, "ckpt-000001");
    let dir = tmp.0.join("ckpt-000001");
    m.num_shards = u32::MAX;
    for keys in [Keys::none(), seal_keys(false)] {
        m.write(&dir, &keys).unwrap();
        let err = Manifest::read(&dir, &keys).unwrap_err();
        assert!(matches!(err, Error::BadCheckpoint(ref e) if e.contains("for 4294967295 shards")), "{err}");
    }
}

/// A manifest that is an endless device (a symlink to one; its length
/// reads as 0) is refused after one byte: it was read until memory ran out.
#[cfg(unix)]
#[test]
fn a_manifest_that_is_an_endless_device_is_refused() {
    if !Path::new("/dev/zero").exists() {
        return;
    }
    let tmp = TempDir::new("endless");
    write_checkpoint(&tmp.0, "ckpt-000001");
    let dir = tmp.0.join("ckpt-000001");
    std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join(MANIFEST)).unwrap();
    let err = Manifest::read(&dir, &Keys::none()).unwrap_err();
    assert!(matches!(err, Error::BadCheckpoint(ref m) if m.contains("not a regular file")), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

    /// A shard file with bytes changed or cut off, its size and SHA-256
    /// then set right in the manifest (so only decoding and the content
    /// checks stand in the way): restoring it is refused, or gives a shard
    /// that serves pulls and pushes. Nothing panics, and nothing is sized
    /// by a number read from the file before it is checked.
    #[test]
    fn a_mangled_shard_file_is_refused_or_restores_a_working_shard(
        changes in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            1..4,
        ),
        cut in proptest::option::weighted(0.2, proptest::prelude::any::<proptest::sample::Index>()),
    ) {
        let tmp = TempDir::new("mangled");
        let m = write_checkpoint(&tmp.0, "ckpt-000001");
        let dir = tmp.0.join("ckpt-000001");
        let mut bytes = std::fs::read(dir.join(shard_file_name(0, 2))).unwrap();
        for (at, byte) in changes {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        resign(&dir, &m, bytes);
        let Ok((store, _)) = crate::restore(&config(0, 2, &tmp.0), &tmp.0, &Keys::none()) else {
            return Ok(());
        };
        let held = store.capture();
        proptest::prop_assert!(held.tables.iter().all(|t| t.data.iter().all(|v| v.is_finite())));
        // It serves: what it holds is read and updated (or refused with an
        // error, if the change renamed or reshaped a table).
        let chunk = (0..16).find(|&i| partition::chunk_shard("w", i, 2) == 0).unwrap();
        let g = vec![0.5f32; 64];
        let keys: Vec<u64> = (0..50).filter(|&k| partition::key_shard(k, 2) == 0).collect();
        let mut finite = true;
        if store.push_dense(&[("w", chunk, &g)], PushInfo::default()).is_ok() {
            store.pull_dense(&[("w", chunk)], |v| finite &= v.iter().all(|x| x.is_finite())).unwrap();
        }
        if let Ok(dim) = store.pull_sparse("e", &keys, false, |_, row| finite &= row.iter().all(|x| x.is_finite())) {
            store.push_sparse("e", &keys, &vec![0.5; keys.len() * dim], PushInfo::default()).unwrap();
        }
        proptest::prop_assert!(finite);
    }
}
