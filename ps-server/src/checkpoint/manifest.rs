//! The manifest of a checkpoint, and the checkpoint folders under a root.

use std::path::{Path, PathBuf};

use ps_common::seal::Keys;
use serde::{Deserialize, Serialize};

use super::FORMAT_VERSION;
use super::file::sync_dir;
use crate::error::{Error, Result};

/// File name of the manifest inside a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";

/// What a sealed manifest says it is.
pub const MANIFEST_KIND: &str = "checkpoint-manifest";

/// Largest manifest read (it lists shards, not values).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// What makes a checkpoint complete: the list of its shard files, the cut, and
/// what job it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] when written by this code.
    pub version: u32,
    /// The folder name, `ckpt-NNNNNN`.
    pub name: String,
    pub created_unix_ms: u64,
    /// SHA-256 of the job's configuration, when the coordinator knew it:
    /// resuming another job from this checkpoint is refused.
    pub job: Option<String>,
    pub num_shards: u32,
    /// The cut: every worker's completed iterations.
    pub workers: Vec<WorkerEntry>,
    pub shards: Vec<ShardEntry>,
    /// Longest time any shard held pushes for this checkpoint.
    pub held_ms: f64,
    /// From the first hold to the manifest.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    pub worker: u64,
    /// Iterations completed at the cut: the worker resumes at this clock.
    pub clock: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard: u32,
    /// File name inside the checkpoint folder.
    pub file: String,
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
    pub held_ms: f64,
    pub write_ms: f64,
}

impl Manifest {
    /// Total bytes of the shard files.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// The entry of `shard`; the manifest must list every shard once.
    pub fn shard(&self, shard: u32) -> Result<&ShardEntry> {
        self.shards.iter().find(|s| s.shard == shard).ok_or_else(|| {
            Error::BadCheckpoint(format!("checkpoint {} has no file for shard {shard}", self.name))
        })
    }

    /// The clock a worker resumes at (0 for a worker not in the cut).
    pub fn clock_of(&self, worker: u64) -> u64 {
        self.workers.iter().find(|w| w.worker == worker).map_or(0, |w| w.clock)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadCheckpoint(format!("manifest of {}: {m}", self.name)));
        if self.version != FORMAT_VERSION {
            return bad(format!("format version {}, this build reads {FORMAT_VERSION}", self.version));
        }
        super::check_name(&self.name)?;
        let mut shards: Vec<u32> = self.shards.iter().map(|s| s.shard).collect();
        shards.sort_unstable();
        // Compared in place: `num_shards` comes from the file, so nothing is
        // allocated by it (a `0..num_shards` list of 2^32 - 1 was 16 GiB).
        let listed = shards.len() == self.num_shards as usize
            && shards.iter().enumerate().all(|(i, &s)| s as usize == i);
        if self.num_shards == 0 || !listed {
            let mut listed = format!("{shards:?}");
            if listed.len() > 200 {
                listed = format!("{} entries", shards.len());
            }
            return bad(format!("lists shards {listed} for {} shards", self.num_shards));
        }
        Ok(())
    }

    /// Writes `<dir>/manifest.json` by temporary name, fsync and rename: the
    /// step that makes the checkpoint complete. Sealed when `keys` sign.
    pub fn write(&self, dir: &Path, keys: &Keys) -> Result<()> {
        let (tmp, path) = (dir.join(format!("{MANIFEST}.tmp")), dir.join(MANIFEST));
        let io = |what: &str| {
            let what = format!("{what} {}", tmp.display());
            move |source| Error::Io { what, source }
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::BadCheckpoint(e.to_string()))?;
        // Signed, never encrypted: it holds names, clocks and checksums, and
        // tools that list checkpoints need only the verify key.
        let text = keys
            .signing_only()
            .seal(MANIFEST_KIND, &text)
            .map_err(|e| Error::BadCheckpoint(e.to_string()))?;
        let f = std::fs::File::create(&tmp).map_err(io("creating"))?;
        std::io::Write::write_all(&mut &f, &text).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
        sync_dir(dir)
    }

    /// Reads and checks `<dir>/manifest.json`: its seal first (`keys`).
    pub fn read(dir: &Path, keys: &Keys) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        // Never past the cap: a large file, a device (whose length reads as
        // 0) or a growing file is refused, not read whole.
        let text = ps_common::files::read_capped(&path, MAX_MANIFEST_BYTES).map_err(|source| match source
            .kind()
        {
            std::io::ErrorKind::InvalidData => {
                Error::BadCheckpoint(format!("{}: {source}: not a manifest", path.display()))
            }
            _ => Error::Io { what: format!("reading {}", path.display()), source },
        })?;
        let text = (keys.open(MANIFEST_KIND, &text))
            .map_err(|e| Error::BadCheckpoint(format!("{}: {}", path.display(), super::seal_hint(e))))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::BadCheckpoint(format!("{}: {e}", path.display())))?;
        m.validate()?;
        Ok(m)
    }
}

/// A complete checkpoint: its folder and manifest.
#[derive(Debug, Clone)]
pub struct CheckpointRef {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// The sequence number of a checkpoint folder name.
fn seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// Checkpoint folders under `root` (complete or not), oldest first.
fn folders(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::Io { what: format!("listing {}", root.display()), source }),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((seq_of(e.file_name().to_str()?)?, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// The folder name of the next checkpoint under `root`.
pub fn next_name(root: &Path) -> Result<String> {
    let next = folders(root)?.last().map_or(1, |(seq, _)| seq + 1);
    Ok(format!("ckpt-{next:06}"))
}

/// The complete checkpoints under `root`, oldest first. A folder without a
/// manifest (a checkpoint cut short) is skipped; so is one whose manifest
/// cannot be read, with a warning.
pub fn complete(root: &Path, keys: &Keys) -> Result<Vec<CheckpointRef>> {
    let mut out = Vec::new();
    for (_, dir) in folders(root)? {
        if !dir.join(MANIFEST).exists() {
            continue;
        }
        match Manifest::read(&dir, keys) {
            Ok(manifest) => out.push(CheckpointRef { dir, manifest }),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "skipping an unreadable checkpoint"),
        }
    }
    Ok(out)
}

/// The newest complete checkpoint under `root`. One whose manifest cannot
/// be read is skipped with a warning, but if none can be read, the newest
/// one's error is returned (a checkpoint refused for its seal is reported,
/// not mistaken for no checkpoint).
pub fn latest(root: &Path, keys: &Keys) -> Result<Option<CheckpointRef>> {
    let mut first_error = None;
    for (_, dir) in folders(root)?.into_iter().rev() {
        if !dir.join(MANIFEST).exists() {
            continue;
        }
        match Manifest::read(&dir, keys) {
            Ok(manifest) => return Ok(Some(CheckpointRef { dir, manifest })),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "skipping an unreadable checkpoint");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(None), Err)
}

/// `path` as a checkpoint: a checkpoint folder (with its manifest), or a
/// folder of checkpoints (its newest complete one).
pub fn resolve(path: &Path, keys: &Keys) -> Result<CheckpointRef> {
    if path.join(MANIFEST).exists() {
        return Ok(CheckpointRef { dir: path.to_path_buf(), manifest: Manifest::read(path, keys)? });
    }
    latest(path, keys)?
        .ok_or_else(|| Error::BadCheckpoint(format!("no complete checkpoint in {}", path.display())))
}

/// Keeps the newest `keep` complete checkpoints under `root` and deletes the
/// older ones, and any incomplete folder older than the newest complete one.
/// Returns the folders deleted.
pub fn prune(root: &Path, keep: usize, keys: &Keys) -> Result<Vec<PathBuf>> {
    let complete = complete(root, keys)?;
    let Some(newest) = complete.last().and_then(|c| seq_of(&c.manifest.name)) else { return Ok(Vec::new()) };
    let kept: Vec<&PathBuf> = complete.iter().rev().take(keep.max(1)).map(|c| &c.dir).collect();
    let mut deleted = Vec::new();
    for (seq, dir) in folders(root)? {
        if seq >= newest || kept.contains(&&dir) {
            continue;
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|source| Error::Io { what: format!("deleting {}", dir.display()), source })?;
        deleted.push(dir);
    }
    Ok(deleted)
}
