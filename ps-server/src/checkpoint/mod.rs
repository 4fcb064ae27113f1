//! Checkpoints: one consistent cut of every shard, on disk.
//!
//! A checkpoint is a folder `<root>/ckpt-NNNNNN/` holding one file per shard
//! (`shard-<i>-of-<n>.ckpt`) and `manifest.json`, which names the shard files
//! with their sizes and SHA-256 sums, the cut (every worker's clock), and the
//! job's fingerprint. It is complete only once its manifest exists: shard files
//! and the manifest are each written to a temporary name, fsynced and renamed,
//! and the manifest is written last, so a crash at any point leaves the
//! previous complete checkpoint as the latest one.
//!
//! A shard file is the magic `PSCKPT01`, then one MessagePack record
//! ([`ShardFile`]): the shard's place (index, count), its clock set, the last
//! seq per worker, and every table with its spec, block keys, step counts,
//! values and optimizer state. Reading checks size and checksum against the
//! manifest before decoding, then every structural fact (see
//! [`crate::store::Store::restore`]), so a truncated, corrupted or foreign
//! file is refused whole; nothing is half-loaded.
//!
//! With keys ([`ps_common::seal::Keys`]) every shard file and the manifest
//! are sealed: signed with ed25519, encrypted with AES-256-GCM if an
//! encryption key is configured. Reading checks the seal after the
//! manifest's size and checksum and before decoding; a file that is
//! unsigned (when a verify key is configured), signed by another key,
//! altered, truncated or encrypted for a key not held is refused whole.
//! [`reseal`] re-signs a checkpoint under new keys (or none).
//!
//! How the cut is taken is in [`coordinator`] and ARCHITECTURE.md.

pub mod coordinator;
mod file;
mod manifest;
#[cfg(test)]
mod tests;

pub use file::{MAGIC, SHARD_KIND, ShardFile, read_shard, shard_file_name, write_shard};
pub use manifest::{
    CheckpointRef, MANIFEST, MANIFEST_KIND, Manifest, ShardEntry, WorkerEntry, complete, latest, next_name,
    prune, resolve,
};

use std::path::Path;

use ps_common::seal::Keys;

/// Format version of shard files and manifests written by this code.
pub const FORMAT_VERSION: u32 = 1;

/// A checkpoint name is a folder name: letters, digits, `-` and `_`, at most
/// 64 characters (it arrives over the network).
pub fn check_name(name: &str) -> crate::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok { Ok(()) } else { Err(crate::Error::CheckpointName(name.to_string())) }
}

/// A seal error as a message, saying what to do about an unsigned file.
pub(crate) fn seal_hint(e: ps_common::Error) -> String {
    match e {
        ps_common::Error::Unsigned => format!(
            "{e} (a checkpoint written without keys): re-sign it with `ps-cluster keys --reseal CHECKPOINT --with KEYDIR`, \
             or read it with no keys (`ps-cluster train --resume RUN --no-seal`, or a shard without key flags)"
        ),
        e => e.to_string(),
    }
}

/// Rewrites the checkpoint in `dir` under `to`: every shard file and the
/// manifest are read and checked with `from` (a plain checkpoint: no keys),
/// then written sealed with `to` (or plain, with no keys), each by
/// temporary name and rename, the manifest last. Returns the new manifest.
pub fn reseal(dir: &Path, from: &Keys, to: &Keys) -> crate::Result<Manifest> {
    let mut m = Manifest::read(dir, from)?;
    for entry in &mut m.shards {
        let path = dir.join(&entry.file);
        // The whole check of a restore: size, checksum, seal, and a decode.
        file::read_shard(dir, entry, entry.shard, m.num_shards, from)?;
        let bytes = std::fs::read(&path)
            .map_err(|source| crate::Error::Io { what: format!("reading {}", path.display()), source })?;
        let payload =
            from.open(SHARD_KIND, &bytes).map_err(|e| crate::Error::BadCheckpoint(e.to_string()))?;
        let sealed = to.seal(SHARD_KIND, &payload).map_err(|e| crate::Error::BadCheckpoint(e.to_string()))?;
        let tmp = dir.join(format!("{}.tmp", entry.file));
        let io = |what: &str| {
            let what = format!("{what} {}", tmp.display());
            move |source| crate::Error::Io { what, source }
        };
        let f = std::fs::File::create(&tmp).map_err(io("creating"))?;
        std::io::Write::write_all(&mut &f, &sealed).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
        entry.bytes = sealed.len() as u64;
        entry.sha256 = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&sealed));
    }
    file::sync_dir(dir)?;
    m.write(dir, to)?;
    Ok(m)
}
