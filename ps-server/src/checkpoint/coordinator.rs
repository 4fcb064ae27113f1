//! Taking a checkpoint of a running job: the coordinator's side.
//!
//! 1. **Hold** every shard: each stops admitting pushes, waits for the pushes
//!    in flight, and answers with its clock table (per worker: iterations
//!    whose pushes it has applied).
//! 2. The cut gives every worker the highest clock any shard reported for it.
//!    A worker may be mid-iteration when the holds land (its iteration pushed
//!    to some shards and not yet to others); the cut then includes that
//!    iteration everywhere.
//! 3. **Cut** every shard: each admits the worker's pushes of iterations below
//!    its cut clock (the rest of the half-pushed iteration), waits until every
//!    member reaches it, copies its state, opens its gate again, and writes
//!    the copy to its file. Pushes are held only for hold + drain + copy.
//! 4. The coordinator checks the files and writes the manifest last.
//!
//! The result is one state of the job: for every worker `w` with cut clock
//! `c_w`, every shard holds exactly the updates of `w`'s iterations `< c_w`.
//! A worker that left the clock set (finished, or dropped on lease expiry)
//! is not waited for; a dead worker's half-pushed iteration stays half
//! applied, as it was in the running job.
//!
//! Any failure releases every shard and leaves no manifest, so the previous
//! checkpoint stays the latest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ps_common::auth::Credential;
use ps_common::seal::Keys;
use ps_common::transport::{self, TransportConfig};
use ps_common::wire::pb;

use super::{Manifest, WorkerEntry};
use crate::error::{Error, Result};

/// How a checkpoint is taken.
#[derive(Debug, Clone)]
pub struct Options {
    /// Root folder of the checkpoints: the shards' `checkpoint_dir` (the
    /// same folder, on one host or a shared file system).
    pub root: PathBuf,
    /// Fingerprint of the job, recorded in the manifest.
    pub job: Option<String>,
    /// Complete checkpoints kept under `root` (older ones are deleted).
    pub keep: usize,
    /// Longest a shard holds pushes waiting for the cut.
    pub hold_timeout: Duration,
    /// Longest a shard waits for the workers to reach the cut.
    pub cut_timeout: Duration,
    pub transport: TransportConfig,
    /// Sent with every call (checkpoints are admin's).
    pub credential: Credential,
    /// Seals the manifest and reads the checkpoints to prune (the shards
    /// seal their files with their own keys).
    pub keys: Keys,
}

impl Options {
    pub fn new(root: impl Into<PathBuf>) -> Options {
        Options {
            root: root.into(),
            job: None,
            keep: 3,
            hold_timeout: Duration::from_secs(10),
            cut_timeout: Duration::from_secs(10),
            transport: TransportConfig::default(),
            credential: Credential::none(),
            keys: Keys::none(),
        }
    }
}

/// Connected shards, `clients[i]` being shard `i`.
pub struct Shards {
    clients: Vec<transport::ShardClient>,
    addrs: Vec<String>,
}

impl Shards {
    /// Connects to every shard (fails fast: the shards must be up).
    pub async fn connect(
        addrs: &[String],
        transport: &TransportConfig,
        credential: &Credential,
    ) -> Result<Shards> {
        let mut clients = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let endpoint = transport::endpoint(transport, addr).map_err(Error::Malformed)?;
            let channel = endpoint.connect().await?;
            clients.push(transport::client(transport, channel, credential.clone()));
        }
        Ok(Shards { clients, addrs: addrs.to_vec() })
    }

    fn failed(&self, shard: usize, status: tonic::Status) -> Error {
        Error::Peer { addr: self.addrs[shard].clone(), status }
    }

    /// The lowest clock of any training worker on any shard (`None` before a
    /// worker joins): how far the slowest worker has got.
    pub async fn min_worker_clock(&self) -> Result<Option<u64>> {
        let stats = join_all(self.clients.iter().map(|c| {
            let mut c = c.clone();
            async move { c.stats(pb::StatsRequest {}).await }
        }))
        .await;
        let mut min: Option<u64> = None;
        for (i, s) in stats.into_iter().enumerate() {
            let s = s.map_err(|e| self.failed(i, e))?.into_inner();
            for w in s.clocks {
                min = Some(min.map_or(w.clock, |m| m.min(w.clock)));
            }
        }
        Ok(min)
    }

    /// Ends any hold (best effort: a shard also ends it by itself).
    async fn release(&self) {
        join_all(self.clients.iter().map(|c| {
            let mut c = c.clone();
            async move { c.release(pb::ReleaseRequest {}).await }
        }))
        .await;
    }
}

/// Takes one checkpoint of the shards and returns its manifest.
pub async fn take(shards: &Shards, opts: &Options) -> Result<Manifest> {
    let started = Instant::now();
    let name = super::next_name(&opts.root)?;
    let result = cut(shards, opts, &name).await;
    let (mut manifest, dir) = match result {
        Ok(r) => r,
        Err(e) => {
            shards.release().await;
            return Err(e);
        }
    };
    manifest.total_ms = started.elapsed().as_secs_f64() * 1e3;
    manifest.write(&dir, &opts.keys)?;
    let deleted = super::prune(&opts.root, opts.keep, &opts.keys)?;
    tracing::info!(
        checkpoint = %manifest.name,
        bytes = manifest.bytes(),
        held_ms = manifest.held_ms,
        total_ms = manifest.total_ms,
        deleted = deleted.len(),
        "checkpoint complete"
    );
    Ok(manifest)
}

async fn cut(shards: &Shards, opts: &Options, name: &str) -> Result<(Manifest, PathBuf)> {
    let n = shards.clients.len();
    let hold_ms = opts.hold_timeout.as_millis().min(60_000) as u32;
    let holds = join_all(shards.clients.iter().map(|c| {
        let mut c = c.clone();
        async move { c.hold(pb::HoldRequest { timeout_ms: hold_ms }).await }
    }))
    .await;
    let mut cut: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, h) in holds.into_iter().enumerate() {
        let h = h.map_err(|s| shards.failed(i, s))?.into_inner();
        if h.shard as usize != i || h.num_shards as usize != n {
            return Err(Error::BadCheckpoint(format!(
                "{} is shard {} of {}, expected shard {i} of {n}",
                shards.addrs[i], h.shard, h.num_shards
            )));
        }
        for w in h.workers {
            let c = cut.entry(w.worker).or_default();
            *c = (*c).max(w.clock);
        }
    }
    let limits: Vec<pb::WorkerCut> =
        cut.iter().map(|(&worker, &clock)| pb::WorkerCut { worker, clock, last_seq: 0 }).collect();
    let cut_ms = opts.cut_timeout.as_millis().min(600_000) as u32;
    let cuts = join_all(shards.clients.iter().map(|c| {
        let mut c = c.clone();
        let req = pb::CutRequest { checkpoint: name.to_string(), limits: limits.clone(), timeout_ms: cut_ms };
        async move { c.cut(req).await }
    }))
    .await;
    let dir = opts.root.join(name);
    let mut entries = Vec::with_capacity(n);
    for (i, r) in cuts.into_iter().enumerate() {
        let r = r.map_err(|s| shards.failed(i, s))?.into_inner();
        let path = dir.join(&r.file);
        let on_disk = std::fs::metadata(&path).map(|m| m.len()).ok();
        if on_disk != Some(r.bytes) {
            return Err(Error::BadCheckpoint(format!(
                "shard {i} wrote {} but {} holds {on_disk:?} bytes: is {} the shards' checkpoint dir?",
                r.file,
                path.display(),
                opts.root.display()
            )));
        }
        entries.push(super::ShardEntry {
            shard: r.shard,
            file: r.file,
            bytes: r.bytes,
            sha256: r.sha256,
            held_ms: r.held_micros as f64 / 1e3,
            write_ms: r.write_micros as f64 / 1e3,
        });
    }
    let manifest = Manifest {
        version: super::FORMAT_VERSION,
        name: name.to_string(),
        created_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        job: opts.job.clone(),
        num_shards: n as u32,
        workers: cut.into_iter().map(|(worker, clock)| WorkerEntry { worker, clock }).collect(),
        held_ms: entries.iter().map(|e| e.held_ms).fold(0.0, f64::max),
        shards: entries,
        total_ms: 0.0,
    };
    Ok((manifest, dir))
}

/// Takes a checkpoint of the shards at `addrs` into `root` (for the
/// `ps-cluster checkpoint` command).
pub async fn take_once(addrs: &[String], opts: &Options) -> Result<Manifest> {
    let shards = Shards::connect(addrs, &opts.transport, &opts.credential).await?;
    take(&shards, opts).await
}
