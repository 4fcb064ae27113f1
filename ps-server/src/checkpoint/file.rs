//! One shard's file in a checkpoint.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use prost::Message;
use ps_common::seal::Keys;
use ps_common::spec::{Consistency, TableSpec};
use ps_common::wire::pb;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

use super::{FORMAT_VERSION, ShardEntry};
use crate::clock::ClockCapture;
use crate::error::{Error, Result};
use crate::store::{Capture, TableCapture};

// Blocks are written as their in-memory bytes.
#[cfg(target_endian = "big")]
compile_error!("checkpoint files are little-endian; big-endian hosts are not supported");

/// What a sealed shard file says it is.
pub const SHARD_KIND: &str = "checkpoint-shard";

/// First bytes of every shard file (inside the seal, when sealed).
pub const MAGIC: &[u8; 8] = b"PSCKPT01";

/// Largest shard file read back (64 GiB): a bound, not a promise.
const MAX_FILE_BYTES: u64 = 64 << 30;

/// What one shard contributes to a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardFile {
    pub checkpoint: String,
    pub shard: u32,
    pub num_shards: u32,
    pub clocks: ClockCapture,
    pub store: Capture,
}

/// `shard-<i>-of-<n>.ckpt`
pub fn shard_file_name(shard: u32, num_shards: u32) -> String {
    format!("shard-{shard}-of-{num_shards}.ckpt")
}

// The record as serialized. Borrowed for writing, owned for reading.
#[derive(Serialize)]
struct RecordOut<'a> {
    version: u32,
    checkpoint: &'a str,
    shard: u32,
    num_shards: u32,
    consistency: Option<Consistency>,
    members: Vec<Member>,
    left: &'a [(u64, u64)],
    last_seq: &'a [(u64, u64)],
    tables: Vec<TableOut<'a>>,
}

#[derive(Serialize)]
struct TableOut<'a> {
    spec: ByteBuf,
    #[serde(with = "serde_bytes")]
    keys: &'a [u8],
    #[serde(with = "serde_bytes")]
    steps: &'a [u8],
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Deserialize)]
struct RecordIn {
    version: u32,
    checkpoint: String,
    shard: u32,
    num_shards: u32,
    consistency: Option<Consistency>,
    members: Vec<Member>,
    left: Vec<(u64, u64)>,
    last_seq: Vec<(u64, u64)>,
    tables: Vec<TableIn>,
}

#[derive(Deserialize)]
struct TableIn {
    spec: ByteBuf,
    keys: ByteBuf,
    steps: ByteBuf,
    data: ByteBuf,
}

#[derive(Serialize, Deserialize)]
struct Member {
    worker: u64,
    clock: u64,
    lease_ms: u64,
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Writes `file` into `dir` (created if missing) under its temporary name,
/// fsyncs it, and renames it into place; sealed (signed, and encrypted if
/// an encryption key is held) when `keys` hold a signing key. Returns its
/// entry for the manifest.
pub fn write_shard(dir: &Path, file: &ShardFile, keys: &Keys) -> Result<ShardEntry> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let name = shard_file_name(file.shard, file.num_shards);
    let (tmp, path) = (dir.join(format!("{name}.tmp")), dir.join(&name));
    let started = std::time::Instant::now();
    let record = RecordOut {
        version: FORMAT_VERSION,
        checkpoint: &file.checkpoint,
        shard: file.shard,
        num_shards: file.num_shards,
        consistency: file.clocks.model,
        members: (file.clocks.members.iter())
            .map(|&(worker, clock, lease)| Member { worker, clock, lease_ms: lease.as_millis() as u64 })
            .collect(),
        left: &file.clocks.left,
        last_seq: &file.store.last_seq,
        tables: file.store.tables.iter().map(table_out).collect(),
    };
    let f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let mut w = Hashing { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::new(), bytes: 0 };
    let written = if keys.signs() {
        // Signing needs the whole file: it is built in memory, sealed, written.
        let sealed = keys.seal_with(SHARD_KIND, |buf| {
            buf.reserve(file.store.tables.iter().map(|t| t.data.len() * 4 + t.keys.len() * 16).sum());
            buf.extend_from_slice(MAGIC);
            rmp_serde::encode::write_named(buf, &record).map_err(|e| Error::BadCheckpoint(e.to_string()))
        })?;
        (|| {
            w.write_all(&sealed)?;
            w.flush()?;
            w.inner.get_ref().sync_all()
        })()
    } else {
        (|| {
            w.write_all(MAGIC)?;
            rmp_serde::encode::write_named(&mut w, &record).map_err(std::io::Error::other)?;
            w.flush()?;
            w.inner.get_ref().sync_all()
        })()
    };
    written.map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", tmp.display())))?;
    sync_dir(dir)?;
    Ok(ShardEntry {
        shard: file.shard,
        file: name,
        bytes: w.bytes,
        sha256: format!("{:x}", w.hash.finalize()),
        held_ms: 0.0,
        write_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

fn table_out(t: &TableCapture) -> TableOut<'_> {
    TableOut {
        spec: ByteBuf::from(pb::TableSpec::from(&t.spec).encode_to_vec()),
        keys: bytemuck::cast_slice(&t.keys),
        steps: bytemuck::cast_slice(&t.steps),
        data: bytemuck::cast_slice(&t.data),
    }
}

/// Makes a rename in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))
}

/// Reads shard `shard` of `num_shards` from `dir`, checking it against the
/// manifest's `entry` (size and SHA-256) and then its seal (`keys`) before
/// decoding anything.
pub fn read_shard(
    dir: &Path,
    entry: &ShardEntry,
    shard: u32,
    num_shards: u32,
    keys: &Keys,
) -> Result<ShardFile> {
    let bad = |reason: String| Error::BadCheckpoint(format!("{}: {reason}", dir.join(&entry.file).display()));
    if entry.file != shard_file_name(shard, num_shards) {
        return Err(bad(format!("the manifest names it for another shard than {shard} of {num_shards}")));
    }
    let path = dir.join(&entry.file);
    let f = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
    let len = f.metadata().map_err(io(format!("reading {}", path.display())))?.len();
    if len != entry.bytes || len > MAX_FILE_BYTES {
        return Err(bad(format!("{len} bytes, the manifest says {} (truncated or replaced?)", entry.bytes)));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut bytes).map_err(io(format!("reading {}", path.display())))?;
    let sum = format!("{:x}", Sha256::digest(&bytes));
    if sum != entry.sha256 {
        return Err(bad(format!("SHA-256 {sum} does not match the manifest's {} (corrupted)", entry.sha256)));
    }
    let payload = keys.open(SHARD_KIND, &bytes).map_err(|e| bad(super::seal_hint(e)))?;
    decode(&payload).map_err(|e| bad(e.to_string()))
}

/// Decodes a whole shard file; any inconsistency is an error.
pub fn decode(bytes: &[u8]) -> Result<ShardFile> {
    let bad = |m: String| Error::BadCheckpoint(m);
    let body =
        bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| bad("not a shard checkpoint file".into()))?;
    let r: RecordIn = rmp_serde::from_slice(body).map_err(|e| bad(format!("undecodable: {e}")))?;
    if r.version != FORMAT_VERSION {
        return Err(bad(format!("format version {}, this build reads {FORMAT_VERSION}", r.version)));
    }
    if r.num_shards == 0 || r.shard >= r.num_shards {
        return Err(bad(format!("shard {} of {}", r.shard, r.num_shards)));
    }
    let tables = r.tables.into_iter().map(table_in).collect::<Result<Vec<_>>>()?;
    let members = (r.members.into_iter())
        .map(|m| (m.worker, m.clock, Duration::from_millis(m.lease_ms.clamp(100, 3_600_000))))
        .collect();
    Ok(ShardFile {
        checkpoint: r.checkpoint,
        shard: r.shard,
        num_shards: r.num_shards,
        clocks: ClockCapture { model: r.consistency, members, left: r.left },
        store: Capture { tables, last_seq: r.last_seq },
    })
}

fn table_in(t: TableIn) -> Result<TableCapture> {
    let bad = |m: String| Error::BadCheckpoint(m);
    let spec = pb::TableSpec::decode(t.spec.as_slice()).map_err(|e| bad(format!("table spec: {e}")))?;
    let spec = TableSpec::try_from(spec).map_err(|e| bad(format!("table spec: {e}")))?;
    let words = |b: &[u8], what: &str| {
        if !b.len().is_multiple_of(8) {
            return Err(bad(format!("table `{}`: {what} of {} bytes", spec.name, b.len())));
        }
        Ok(b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect::<Vec<_>>())
    };
    let (keys, steps) = (words(&t.keys, "keys")?, words(&t.steps, "step counts")?);
    if !t.data.len().is_multiple_of(4) {
        return Err(bad(format!("table `{}`: values of {} bytes", spec.name, t.data.len())));
    }
    let data = t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok(TableCapture { spec, keys, steps, data })
}
