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
//! How the cut is taken is in [`coordinator`] and ARCHITECTURE.md.

pub mod coordinator;
mod file;
mod manifest;
#[cfg(test)]
mod tests;

pub use file::{MAGIC, ShardFile, read_shard, shard_file_name, write_shard};
pub use manifest::{
    CheckpointRef, MANIFEST, Manifest, ShardEntry, WorkerEntry, complete, latest, next_name, prune, resolve,
};

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
