//! The files of a run folder that something else reads, each one typed and
//! versioned, shared by the writer ([`crate::run`], [`crate::cluster`]) and
//! the readers ([`crate::sweep`], tests, scripts):
//!
//! | file | type | version field | format |
//! | --- | --- | --- | --- |
//! | `summary.json` | [`RunSummary`] | `schema_version` | one pretty-printed JSON object |
//! | `stats.json` | [`StatsFile`] of [`ShardStats`] | `schema_version` | `{"schema_version", "shards": [..]}` |
//! | `metrics.jsonl` | [`MetricsLine`] | `v` on every line | one JSON object per worker event |
//! | `sweep-status.json` | [`SweepStatus`] | `schema_version` | how a sweep's run ended |
//!
//! A reader refuses a file of a newer version than it knows, naming the file
//! and both versions, rather than guess at fields it has never seen. A file
//! without a version field was written before versioning, in the layout of
//! version 1, and reads as version 1. Fields are only added within a version
//! (readers default them); renaming or removing one bumps the version.
//!
//! The model file (`model.msgpack`) carries its own version and is written
//! by [`crate::run`] in the worker's format.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ps_common::spec::Consistency;
use ps_common::wire::pb;
use ps_worker::event::Event;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Errors reading or writing an artifact; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}{}: {source}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Json { path: PathBuf, line: Option<usize>, source: serde_json::Error },
    #[error(
        "{}{}: version {found} is newer than this build reads (up to {supported}); use a newer ps-cluster",
        path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default()
    )]
    NewerVersion { path: PathBuf, line: Option<usize>, found: u32, supported: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Files written before versioning have the layout of version 1.
fn v1() -> u32 {
    1
}

/// Just the version of a JSON document (or line), read before the rest so a
/// newer layout is refused instead of half-parsed.
#[derive(Deserialize)]
struct Probe {
    #[serde(default = "v1", alias = "v")]
    schema_version: u32,
}

fn check_version(path: &Path, line: Option<usize>, text: &str, supported: u32) -> Result<()> {
    let json = |source| Error::Json { path: path.to_path_buf(), line, source };
    let found = serde_json::from_str::<Probe>(text).map_err(json)?.schema_version;
    if found > supported {
        return Err(Error::NewerVersion { path: path.to_path_buf(), line, found, supported });
    }
    Ok(())
}

/// A JSON file of a run folder: its name and schema version, and the one
/// write/read pair every writer and reader goes through.
pub trait JsonFile: Serialize + DeserializeOwned {
    const VERSION: u32;
    const FILE: &'static str;

    /// Writes `dir/FILE`.
    fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(Self::FILE), self)
    }

    /// Reads `dir/FILE`, refusing a newer schema version.
    fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join(Self::FILE), Self::VERSION)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path, supported: u32) -> Result<T> {
    let text = ps_common::files::read_text_capped(path, ps_common::files::MAX_TEXT_FILE)
        .map_err(|source| Error::Io { what: "reading", path: path.to_path_buf(), source })?;
    check_version(path, None, &text, supported)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), line: None, source })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------
// summary.json

/// Everything a run reports: `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub run_dir: PathBuf,
    /// `BSP`, `SSP(s=2)`, `ASP` (the `Display` of the job's consistency).
    pub consistency: String,
    pub servers: u32,
    pub workers: u32,
    pub wall_s: f64,
    /// Samples processed by all workers per second of wall time.
    pub samples_per_s: f64,
    /// Test loss and score (accuracy, or RMSE for regression) after training.
    pub test_loss: f64,
    pub test_score: f64,
    pub score_name: String,
    /// (worker index, why) of each worker that did not exit cleanly.
    #[serde(default)]
    pub failed: Vec<(usize, String)>,
    /// The `Done` event of each worker that finished.
    #[serde(default)]
    pub done: Vec<Event>,
    /// Staleness histogram summed over shards (index = staleness).
    #[serde(default)]
    pub staleness_histogram: Vec<u64>,
    /// Seconds workers spent blocked in reads, summed over shards.
    #[serde(default)]
    pub blocked_s: f64,
    /// Peak resident memory of each shard process, bytes.
    #[serde(default)]
    pub server_peak_rss: Vec<u64>,
    #[serde(default)]
    pub sparse_rows: u64,
    /// Checkpoints taken during the run.
    #[serde(default)]
    pub checkpoints: CheckpointLog,
    /// Shards that died and were restored from a checkpoint, and what it cost.
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// The checkpoint this run was resumed from.
    #[serde(default)]
    pub resumed_from: Option<PathBuf>,
    /// The job's wire codecs (`[job.codecs]`), described.
    #[serde(default)]
    pub codecs: String,
    /// Protobuf bytes of push requests and of pull answers per iteration of
    /// one worker (all workers' bytes over all their iterations).
    #[serde(default)]
    pub bytes_pushed_per_iter: f64,
    #[serde(default)]
    pub bytes_pulled_per_iter: f64,
}

/// What the periodic checkpoints of a run cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointLog {
    pub taken: u32,
    pub failed: u32,
    /// The newest complete checkpoint's folder.
    pub last: Option<PathBuf>,
    /// Bytes of the newest checkpoint (all shards).
    pub last_bytes: u64,
    /// Longest time a shard held pushes, over all checkpoints.
    pub max_held_ms: f64,
    pub mean_held_ms: f64,
    /// Hold to manifest, mean over checkpoints.
    pub mean_total_ms: f64,
    /// The first few failures, as text.
    pub errors: Vec<String>,
}

impl CheckpointLog {
    /// Adds a complete checkpoint.
    pub fn record(&mut self, dir: PathBuf, m: &ps_server::checkpoint::Manifest) {
        let n = f64::from(self.taken);
        self.mean_held_ms = (self.mean_held_ms * n + m.held_ms) / (n + 1.0);
        self.mean_total_ms = (self.mean_total_ms * n + m.total_ms) / (n + 1.0);
        self.max_held_ms = self.max_held_ms.max(m.held_ms);
        self.taken += 1;
        self.last = Some(dir);
        self.last_bytes = m.bytes();
    }

    /// Adds a failed attempt.
    pub fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(error);
        }
    }
}

/// A shard that died, restored from a checkpoint: what the job lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    pub shard: u32,
    /// Seconds into the run when the launcher noticed.
    pub at_s: f64,
    /// How the shard ended.
    pub exit: String,
    /// The checkpoint it was restored from.
    pub checkpoint: String,
    pub restart_s: f64,
    /// Per worker: (worker, clock at the checkpoint, clock when the shard
    /// died). The restored shard lost that worker's updates of the
    /// iterations in between; the other shards kept theirs.
    pub workers: Vec<(u64, u64, u64)>,
    /// Sum over workers of the iterations whose updates to this shard were
    /// lost (one push each).
    pub lost_iterations: u64,
}

impl Recovery {
    /// Reads the workers' clocks from a live shard to measure what the
    /// restart of `r` lost.
    pub async fn measure(
        r: &crate::cluster::Restart,
        addrs: &[String],
        credential: &ps_common::auth::Credential,
        started: std::time::Instant,
        transport: &ps_common::transport::TransportConfig,
    ) -> Recovery {
        let m = &r.checkpoint.manifest;
        let live = addrs.iter().enumerate().find(|(i, _)| *i != r.shard as usize).map(|(_, a)| a.clone());
        let mut now: Vec<(u64, u64)> = Vec::new();
        if let Some(addr) = live {
            let opts = ps_worker::client::ClientOptions {
                transport: transport.clone(),
                credential: credential.clone(),
                ..ps_worker::client::ClientOptions::default()
            };
            if let Ok(c) = ps_worker::client::ShardedClient::connect(&[addr], u64::MAX, opts).await
                && let Ok(stats) = c.stats().await
            {
                now = stats.iter().flat_map(|s| s.clocks.iter().map(|c| (c.worker, c.clock))).collect();
            }
        }
        if now.is_empty() {
            // One shard only: the cut is all we know.
            now = m.workers.iter().map(|w| (w.worker, w.clock)).collect();
        }
        let workers: Vec<(u64, u64, u64)> = now.iter().map(|&(w, c)| (w, m.clock_of(w), c)).collect();
        Recovery {
            shard: r.shard,
            at_s: started.elapsed().as_secs_f64() - r.restart_s,
            exit: r.exit.clone(),
            checkpoint: m.name.clone(),
            restart_s: r.restart_s,
            lost_iterations: workers.iter().map(|&(_, cut, at)| at.saturating_sub(cut)).sum(),
            workers,
        }
    }

    /// One line for the terminal.
    pub fn describe(&self) -> String {
        format!(
            "shard {} died ({}) at {:.1} s; restarted from {} in {:.0} ms; lost the updates of {} worker-iterations to it",
            self.shard,
            self.exit,
            self.at_s,
            self.checkpoint,
            self.restart_s * 1e3,
            self.lost_iterations
        )
    }
}

impl JsonFile for RunSummary {
    const VERSION: u32 = 1;
    const FILE: &'static str = "summary.json";
}

impl RunSummary {
    pub fn max_staleness(&self) -> usize {
        self.staleness_histogram.iter().rposition(|&c| c > 0).unwrap_or(0)
    }

    pub fn mean_staleness(&self) -> f64 {
        let n: u64 = self.staleness_histogram.iter().sum();
        let s: u64 = self.staleness_histogram.iter().enumerate().map(|(i, c)| i as u64 * c).sum();
        s as f64 / n.max(1) as f64
    }
}

// ---------------------------------------------------------------------------
// stats.json

/// One shard's counters, in domain terms: the typed form of `pb::StatsResponse`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: u32,
    #[serde(default)]
    pub num_shards: u32,
    /// The job's consistency model, once a worker has joined.
    #[serde(default)]
    pub consistency: Option<Consistency>,
    pub pulls: u64,
    pub pushes: u64,
    pub duplicate_pushes: u64,
    pub rejected: u64,
    pub values_pulled: u64,
    pub values_pushed: u64,
    pub tables: u64,
    pub dense_chunks: u64,
    pub sparse_rows: u64,
    /// `staleness_histogram[i]`: applied pushes of staleness i; the last
    /// bucket counts everything at or above its index.
    pub staleness_histogram: Vec<u64>,
    /// Seconds reads spent blocked at the consistency gate.
    pub blocked_s: f64,
    /// The clock table: one entry per member worker.
    #[serde(default)]
    pub clocks: Vec<WorkerClock>,
    /// Backup workers' late pushes and the data queue (issue 15).
    #[serde(default)]
    pub stragglers: StragglerStats,
}

/// What a shard counted of the straggler remedies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StragglerStats {
    pub backup_workers: u32,
    /// Late pushes (backup workers) dropped, and applied down-weighted.
    pub late_dropped: u64,
    pub late_weighted: u64,
    /// The data queue (shard 0 under dynamic data): ranges completed of
    /// the total, and ranges handed out again after their worker died.
    pub data_completed: u64,
    pub data_total: u64,
    pub data_reassigned: u64,
}

/// A member worker's clock on one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerClock {
    pub worker: u64,
    pub clock: u64,
    /// Set while the worker is blocked in a read: the clock it waits for.
    pub waiting_for_clock: Option<u64>,
    /// Workers whose clocks are too low for this one to proceed.
    pub blocked_on: Vec<u64>,
    pub alive: bool,
}

impl ShardStats {
    /// The one conversion from the wire.
    pub fn from_wire(s: &pb::StatsResponse) -> ShardStats {
        ShardStats {
            shard: s.shard,
            num_shards: s.num_shards,
            consistency: s.consistency.and_then(|c| Consistency::try_from(c).ok()),
            pulls: s.pulls,
            pushes: s.pushes,
            duplicate_pushes: s.duplicate_pushes,
            rejected: s.rejected,
            values_pulled: s.values_pulled,
            values_pushed: s.values_pushed,
            tables: s.tables,
            dense_chunks: s.dense_chunks,
            sparse_rows: s.sparse_rows,
            staleness_histogram: s.staleness_histogram.clone(),
            blocked_s: s.wait_micros as f64 / 1e6,
            clocks: s
                .clocks
                .iter()
                .map(|c| WorkerClock {
                    worker: c.worker,
                    clock: c.clock,
                    waiting_for_clock: c.waiting.then_some(c.waiting_for_clock),
                    blocked_on: c.blocked_on.clone(),
                    alive: c.alive,
                })
                .collect(),
            stragglers: StragglerStats {
                backup_workers: s.backup_workers,
                late_dropped: s.late_dropped,
                late_weighted: s.late_weighted,
                data_completed: s.data_queue.map_or(0, |q| q.completed),
                data_total: s.data_queue.map_or(0, |q| q.total),
                data_reassigned: s.data_queue.map_or(0, |q| q.reassigned),
            },
        }
    }

    /// The histograms of `shards` summed bucket by bucket, without trailing zeros.
    pub fn total_histogram(shards: &[ShardStats]) -> Vec<u64> {
        let mut hist: Vec<u64> = Vec::new();
        for s in shards {
            if hist.len() < s.staleness_histogram.len() {
                hist.resize(s.staleness_histogram.len(), 0);
            }
            for (h, c) in hist.iter_mut().zip(&s.staleness_histogram) {
                *h += c;
            }
        }
        while hist.last() == Some(&0) {
            hist.pop();
        }
        hist
    }
}

/// `stats.json`: every shard's stats at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsFile {
    pub schema_version: u32,
    pub shards: Vec<ShardStats>,
}

impl JsonFile for StatsFile {
    const VERSION: u32 = 1;
    const FILE: &'static str = "stats.json";
}

impl StatsFile {
    pub fn new(shards: Vec<ShardStats>) -> StatsFile {
        StatsFile { schema_version: Self::VERSION, shards }
    }
}

// ---------------------------------------------------------------------------
// metrics.jsonl

/// One line of `metrics.jsonl`: a worker's event as the launcher received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    #[serde(default = "v1")]
    pub v: u32,
    /// Launcher wall time since the workers were started, seconds.
    pub t: f64,
    pub worker: usize,
    pub data: Event,
}

/// Largest `metrics.jsonl` read back (a run writes a few hundred KiB).
const MAX_METRICS_FILE: u64 = 256 << 20;

impl MetricsLine {
    pub const VERSION: u32 = 1;
    pub const FILE: &'static str = "metrics.jsonl";

    pub fn new(t: f64, worker: usize, data: Event) -> MetricsLine {
        MetricsLine { v: Self::VERSION, t, worker, data }
    }

    /// Creates (truncates) `dir/metrics.jsonl` for [`MetricsWriter::append`].
    /// Opens `dir/metrics.jsonl` for writing: anew, or (`append`, a resumed
    /// run) after the lines already there.
    pub fn create(dir: &Path, append: bool) -> Result<MetricsWriter> {
        let path = dir.join(Self::FILE);
        let file =
            std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(&path);
        let file = file.map_err(|source| Error::Io { what: "creating", path: path.clone(), source })?;
        Ok(MetricsWriter { path, file: std::io::BufWriter::new(file) })
    }

    /// Reads every line of `dir/metrics.jsonl`. A line that does not parse
    /// (the last one of a run killed mid-write) is skipped; a line of a newer
    /// version is an error.
    pub fn read(dir: &Path) -> Result<Vec<MetricsLine>> {
        let path = dir.join(Self::FILE);
        let text = ps_common::files::read_text_capped(&path, MAX_METRICS_FILE)
            .map_err(|source| Error::Io { what: "reading", path: path.clone(), source })?;
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if let Err(e @ Error::NewerVersion { .. }) = check_version(&path, Some(i + 1), l, Self::VERSION) {
                return Err(e);
            }
            match serde_json::from_str(l) {
                Ok(m) => lines.push(m),
                Err(e) => {
                    tracing::debug!(path = %path.display(), line = i + 1, error = %e, "skipping metrics line")
                }
            }
        }
        Ok(lines)
    }
}

/// Appends [`MetricsLine`]s to a run's `metrics.jsonl`, one flushed line each.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsWriter {
    pub fn append(&mut self, line: &MetricsLine) -> Result<()> {
        let json = serde_json::to_string(line).map_err(|source| Error::Json {
            path: self.path.clone(),
            line: None,
            source,
        })?;
        writeln!(self.file, "{json}").and_then(|()| self.file.flush()).map_err(|source| Error::Io {
            what: "writing",
            path: self.path.clone(),
            source,
        })
    }
}

// ---------------------------------------------------------------------------
// sweep-status.json

/// How a sweep's run ended: `sweep-status.json` in the run folder, written by
/// the sweep runner, read when the sweep collects its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepStatus {
    #[serde(default = "v1")]
    pub schema_version: u32,
    /// ok, failed, error, timeout, interrupted.
    pub status: String,
    pub error: Option<String>,
    pub elapsed_s: f64,
}

impl JsonFile for SweepStatus {
    const VERSION: u32 = 1;
    const FILE: &'static str = "sweep-status.json";
}

impl SweepStatus {
    pub fn new(status: &str, error: Option<String>) -> SweepStatus {
        SweepStatus { schema_version: Self::VERSION, status: status.into(), error, elapsed_s: 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_worker::event::WorkerDone;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("ps-artifact-{name}-{}", std::process::id()));
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

    fn done(worker: usize) -> Event {
        Event::Done(WorkerDone {
            worker,
            iters: 10,
            samples: 320,
            wall_s: 1.5,
            samples_per_s: 213.3,
            pull_s: 0.1,
            compute_s: 0.5,
            push_s: 0.7,
            straggle_s: 0.0,
            bytes_pushed: 10 * 2048,
            bytes_pulled: 10 * 4096,
            pushback_waits: 0,
        })
    }

    fn summary(dir: &Path) -> RunSummary {
        RunSummary {
            schema_version: RunSummary::VERSION,
            run_dir: dir.to_path_buf(),
            consistency: "SSP(s=2)".into(),
            servers: 2,
            workers: 2,
            wall_s: 3.25,
            samples_per_s: 640.0,
            test_loss: 0.25,
            test_score: 0.9,
            score_name: "accuracy".into(),
            failed: vec![(1, "signal: 9".into())],
            done: vec![done(0)],
            staleness_histogram: vec![5, 3, 1],
            blocked_s: 0.5,
            server_peak_rss: vec![1 << 20, 2 << 20],
            sparse_rows: 7,
            checkpoints: Default::default(),
            recoveries: vec![],
            resumed_from: None,
            codecs: String::new(),
            bytes_pushed_per_iter: 0.0,
            bytes_pulled_per_iter: 0.0,
        }
    }

    fn shard(shard: u32) -> ShardStats {
        ShardStats {
            shard,
            num_shards: 2,
            consistency: Some(Consistency::Ssp { staleness: 2 }),
            pulls: 10,
            pushes: 11,
            duplicate_pushes: 1,
            rejected: 0,
            values_pulled: 100,
            values_pushed: 110,
            tables: 3,
            dense_chunks: 4,
            sparse_rows: 5,
            staleness_histogram: vec![4, 0, 2],
            blocked_s: 0.125,
            clocks: vec![WorkerClock {
                worker: 0,
                clock: 9,
                waiting_for_clock: Some(8),
                blocked_on: vec![1],
                alive: true,
            }],
            stragglers: StragglerStats::default(),
        }
    }

    /// Rewrites the version field of `dir/file` to one this build does not know.
    fn bump(dir: &Path, file: &str, field: &str) {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value[field] = serde_json::json!(99);
        std::fs::write(&path, value.to_string()).unwrap();
    }

    fn assert_refused<T: std::fmt::Debug>(r: Result<T>, file: &str) {
        let err = r.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::NewerVersion { found: 99, supported: 1, .. }), "{msg}");
        assert!(msg.contains(file) && msg.contains("99") && msg.contains("up to 1"), "{msg}");
    }

    #[test]
    fn run_summary_round_trips_and_refuses_a_newer_version() {
        let dir = TempDir::new("summary");
        let s = summary(&dir.0);
        s.write(&dir.0).unwrap();
        assert_eq!(RunSummary::read(&dir.0).unwrap(), s);
        assert_eq!((s.max_staleness(), s.mean_staleness()), (2, 5.0 / 9.0));
        bump(&dir.0, RunSummary::FILE, "schema_version");
        assert_refused(RunSummary::read(&dir.0), "summary.json");
    }

    #[test]
    fn a_summary_from_before_versioning_reads_as_version_1() {
        let dir = TempDir::new("summary-v0");
        summary(&dir.0).write(&dir.0).unwrap();
        let path = dir.0.join(RunSummary::FILE);
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        value.as_object_mut().unwrap().remove("schema_version");
        std::fs::write(&path, value.to_string()).unwrap();
        assert_eq!(RunSummary::read(&dir.0).unwrap(), summary(&dir.0));
    }

    #[test]
    fn stats_round_trip_and_refuse_a_newer_version() {
        let dir = TempDir::new("stats");
        let stats = StatsFile::new(vec![shard(0), shard(1)]);
        stats.write(&dir.0).unwrap();
        assert_eq!(StatsFile::read(&dir.0).unwrap(), stats);
        assert_eq!(ShardStats::total_histogram(&stats.shards), vec![8, 0, 4]);
        bump(&dir.0, StatsFile::FILE, "schema_version");
        assert_refused(StatsFile::read(&dir.0), "stats.json");
    }

    #[test]
    fn shard_stats_convert_from_the_wire() {
        let wire = pb::StatsResponse {
            shard: 1,
            num_shards: 2,
            pulls: 10,
            pushes: 11,
            duplicate_pushes: 1,
            rejected: 0,
            values_pulled: 100,
            values_pushed: 110,
            tables: 3,
            dense_chunks: 4,
            sparse_rows: 5,
            staleness_histogram: vec![4, 0, 2],
            clocks: vec![pb::WorkerClock {
                worker: 0,
                clock: 9,
                waiting: true,
                waiting_for_clock: 8,
                blocked_on: vec![1],
                alive: true,
            }],
            consistency: Some(Consistency::Ssp { staleness: 2 }.into()),
            wait_micros: 125_000,
            ..Default::default()
        };
        assert_eq!(ShardStats::from_wire(&wire), shard(1));
    }

    #[test]
    fn metrics_lines_round_trip_and_refuse_a_newer_version() {
        let dir = TempDir::new("metrics");
        let lines = vec![
            MetricsLine::new(
                0.5,
                0,
                Event::Start { worker: 0, iters_per_epoch: 5, epochs: 2, total_iters: 10, first_iter: 0 },
            ),
            MetricsLine::new(
                1.0,
                1,
                Event::Eval { worker: 1, epoch: 0, iter: 5, wall_s: 0.9, test_loss: 0.3, test_acc: 0.8 },
            ),
            MetricsLine::new(2.0, 0, done(0)),
        ];
        let mut w = MetricsLine::create(&dir.0, false).unwrap();
        for l in &lines {
            w.append(l).unwrap();
        }
        drop(w);
        let path = dir.0.join(MetricsLine::FILE);
        // A truncated last line (a killed run) is skipped, not an error.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"v\":1,\"t\":3.0,\"wor");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(MetricsLine::read(&dir.0).unwrap(), lines);
        // A line from before versioning reads as version 1.
        let old = r#"{"t":0.5,"worker":0,"data":{"event":"start","worker":0,"iters_per_epoch":5,"epochs":2,"total_iters":10}}"#;
        std::fs::write(&path, format!("{old}\n")).unwrap();
        assert_eq!(MetricsLine::read(&dir.0).unwrap(), lines[..1]);

        let newer = text.lines().next().unwrap().replace("\"v\":1", "\"v\":99");
        std::fs::write(&path, format!("{newer}\n")).unwrap();
        let err = MetricsLine::read(&dir.0).unwrap_err();
        assert!(err.to_string().contains("metrics.jsonl line 1"), "{err}");
        assert_refused(MetricsLine::read(&dir.0), "metrics.jsonl");
    }

    #[test]
    fn sweep_status_round_trips_and_refuses_a_newer_version() {
        let dir = TempDir::new("status");
        let s =
            SweepStatus { elapsed_s: 2.5, ..SweepStatus::new("timeout", Some("killed after 1 s".into())) };
        s.write(&dir.0).unwrap();
        assert_eq!(SweepStatus::read(&dir.0).unwrap(), s);
        bump(&dir.0, SweepStatus::FILE, "schema_version");
        assert_refused(SweepStatus::read(&dir.0), "sweep-status.json");
    }
}
