//! The sharded client: splits every request by owning shard (with
//! `ps_common::partition`), sends one request per shard concurrently, and
//! reassembles the answers in request order.
//!
//! Pushes carry a `(worker, seq)` pair per shard, so a push that times out is
//! retried with the same seq and applied once. A pull or push a shard
//! refuses for want of room now (its bytes in flight, this worker's rate)
//! comes with a pushback, and is sent again after it ([`Pushbacks`]). At most one push per shard is
//! in flight at a time from one client (the methods take `&mut self`), which
//! keeps the seqs a shard sees increasing.
//!
//! Codecs: the client records each table's codecs when it registers it,
//! encodes every push in the table's push codec (with error feedback for
//! lossy ones, see [`crate::feedback`]), and asks training pulls in the
//! tables' pull codecs. A client that registered nothing (an evaluator)
//! moves f32 both ways, so saved models and final scores are exact. It
//! counts the protobuf bytes it pushes and pulls ([`ShardedClient::wire_bytes`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::join_all;
use ps_common::codec::{self, SharedF32};
use ps_common::compress::{self, Codec, CodecKind, Codecs};
use ps_common::dataplane::{Body, CallError, DataLink, Kind, Placement, Pulled};
use ps_common::partition::{self, ShardId, fnv1a64, splitmix64};
use ps_common::spec::{Backup, Consistency, Layout, TableSpec};
use ps_common::transport::{self, TransportConfig, duration_ms};
use ps_common::wire::pb;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::feedback::Residuals;
use crate::plan::{PlanCache, in_parallel, threads};
use prost::Message;
use ps_common::cache::{PREFETCH_AHEAD, prefetch};

/// Connection and retry settings (the `[job.client]` table of a run file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientOptions {
    /// Keep trying to connect for this long (servers may still be starting).
    #[serde(rename = "connect_within_ms", with = "duration_ms")]
    pub connect_within: Duration,
    /// Deadline of one push or non-blocking call.
    #[serde(rename = "request_timeout_ms", with = "duration_ms")]
    pub request_timeout: Duration,
    /// Deadline of a read, which may block under BSP/SSP.
    #[serde(rename = "read_timeout_ms", with = "duration_ms")]
    pub read_timeout: Duration,
    /// Retries of a push that timed out (with the same seq).
    pub push_retries: u32,
    /// How long a worker keeps retrying a shard it cannot reach (a shard
    /// being restarted from a checkpoint) before it gives up.
    #[serde(rename = "recover_within_ms", with = "duration_ms")]
    pub recover_within: Duration,
    /// HTTP/2 settings and the message limit (`[job.client.transport]`).
    pub transport: TransportConfig,
    /// What this process attaches to every call (a bearer token, from
    /// `--token-file` / `PS_TOKEN_FILE`); never in a run file.
    #[serde(skip)]
    pub credential: ps_common::auth::Credential,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_within: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(180),
            push_retries: 5,
            recover_within: Duration::from_secs(120),
            transport: TransportConfig::default(),
            credential: ps_common::auth::Credential::none(),
        }
    }
}

impl ClientOptions {
    pub fn validate(&self) -> Result<()> {
        for (name, d) in
            [("request_timeout_ms", self.request_timeout), ("read_timeout_ms", self.read_timeout)]
        {
            if d.is_zero() {
                return Err(Error::Config(format!("client {name} must be positive")));
            }
        }
        self.transport.validate()?;
        Ok(())
    }
}

/// A dense gradient to push, laid out like its [`DenseSet`]: floats the
/// request copies (or encodes), or [`SharedF32`] floats whose bytes an f32
/// push carries as they are, without a copy (the reference trainer's
/// gradients; a compressed push encodes them as it would a slice).
#[derive(Debug, Clone, Copy)]
pub enum Grads<'a> {
    Copied(&'a [f32]),
    Shared(&'a SharedF32),
}

impl Grads<'_> {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Grads::Copied(floats) => floats,
            Grads::Shared(shared) => shared.as_slice(),
        }
    }
}

impl<'a> From<&'a [f32]> for Grads<'a> {
    fn from(floats: &'a [f32]) -> Self {
        Grads::Copied(floats)
    }
}

impl<'a> From<&'a Vec<f32>> for Grads<'a> {
    fn from(floats: &'a Vec<f32>) -> Self {
        Grads::Copied(floats)
    }
}

impl<'a, const N: usize> From<&'a [f32; N]> for Grads<'a> {
    fn from(floats: &'a [f32; N]) -> Self {
        Grads::Copied(floats)
    }
}

impl<'a> From<&'a SharedF32> for Grads<'a> {
    fn from(shared: &'a SharedF32) -> Self {
        Grads::Shared(shared)
    }
}

/// Where each element of a flat buffer lives: the chunks of a set of dense
/// tensors laid end to end, grouped by owning shard.
#[derive(Debug, Clone)]
pub struct DenseSet {
    /// (tensor name, element count) in buffer order.
    tensors: Vec<(String, usize)>,
    len: usize,
    /// Per shard: (tensor, chunk index, range in the flat buffer).
    by_shard: Vec<Vec<(String, u32, Range<usize>)>>,
}

impl DenseSet {
    /// Builds the routing of `specs` (all dense) over `num_shards` shards.
    pub fn new(specs: &[TableSpec], num_shards: u32) -> Result<DenseSet> {
        let mut by_shard = vec![Vec::new(); num_shards as usize];
        let mut tensors = Vec::new();
        let mut offset = 0;
        for spec in specs {
            let Layout::Dense { shape, chunk_len } = &spec.layout else {
                return Err(Error::Config(format!("`{}` is not a dense tensor", spec.name)));
            };
            let len = Layout::dense_len(shape)
                .ok_or_else(|| Error::Config(format!("`{}` too large", spec.name)))?;
            for i in 0..partition::num_chunks(len, *chunk_len as usize) {
                let r = partition::chunk_range(len, *chunk_len as usize, i);
                let shard = partition::chunk_shard(&spec.name, i as u32, num_shards);
                by_shard[shard as usize].push((
                    spec.name.clone(),
                    i as u32,
                    offset + r.start..offset + r.end,
                ));
            }
            tensors.push((spec.name.clone(), len));
            offset += len;
        }
        Ok(DenseSet { tensors, len: offset, by_shard })
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tensors(&self) -> &[(String, usize)] {
        &self.tensors
    }

    /// Elements held by each shard.
    pub fn shard_loads(&self) -> Vec<usize> {
        self.by_shard.iter().map(|c| c.iter().map(|(_, _, r)| r.len()).sum()).collect()
    }

    /// `out` (laid out like this set) cut into each chunk's elements: per
    /// shard, in the order of its chunks. `None` if the chunks do not fit
    /// in `out` side by side.
    fn places<'a>(&self, out: &'a mut [f32]) -> Option<Vec<Vec<&'a mut [f32]>>> {
        let mut order: Vec<(usize, usize, &Range<usize>)> = (self.by_shard.iter().enumerate())
            .flat_map(|(i, chunks)| chunks.iter().enumerate().map(move |(j, (_, _, r))| (i, j, r)))
            .collect();
        order.sort_by_key(|(_, _, r)| r.start);
        let mut places: Vec<Vec<Option<&'a mut [f32]>>> =
            self.by_shard.iter().map(|chunks| chunks.iter().map(|_| None).collect()).collect();
        let (mut rest, mut at) = (out, 0);
        for (i, j, r) in order {
            let rest_len = rest.len();
            let skip = r.start.checked_sub(at).filter(|skip| skip + r.len() <= rest_len)?;
            let (place, tail) = std::mem::take(&mut rest)[skip..].split_at_mut(r.len());
            places[i][j] = Some(place);
            (rest, at) = (tail, r.start + r.len());
        }
        places.into_iter().map(|chunks| chunks.into_iter().collect()).collect()
    }

    /// Where in `out` the answers to `pulls` (by shard) go, each read
    /// straight into its place ([`Placement`]); `None` for one whose
    /// answer is taken from its frame.
    fn placements<'a>(
        &self,
        pulls: &[(usize, pb::PullDenseRequest)],
        out: &'a mut [f32],
    ) -> Vec<Option<Placement<'a>>> {
        let mut places = self.places(out).unwrap_or_default();
        let mut place = |i: usize, pull| Placement::new(pull, std::mem::take(places.get_mut(i)?));
        pulls.iter().map(|(i, pull)| place(*i, pull)).collect()
    }
}

/// One worker's connections to every shard.
pub struct ShardedClient {
    shards: Vec<transport::ShardClient>,
    /// Each shard's data plane, where it offers one: pulls and pushes go
    /// there, everything else over gRPC.
    data: Vec<Option<DataLink>>,
    addrs: Vec<String>,
    worker: u64,
    /// Next seq per shard.
    next_seq: Vec<u64>,
    /// Set when a shard could not be reached; the worker then rejoins.
    lost_contact: Arc<AtomicBool>,
    opts: ClientOptions,
    /// The codecs of every table this client registered (registering takes
    /// `&self`, like every call that does not consume a seq).
    codecs: RwLock<HashMap<String, Codecs>>,
    /// Keep what lossy pushes did not send, for the next push.
    error_feedback: bool,
    residuals: Residuals,
    /// Protobuf bytes of push requests and pull answers.
    bytes_pushed: AtomicU64,
    bytes_pulled: AtomicU64,
    /// The job's backup workers, sent with every join.
    backup: Backup,
    /// The highest clock a shard answered a ticking push with since the
    /// last [`ShardedClient::take_clock`] (a late worker's clock jumps).
    pushed_clock: AtomicU64,
    /// Pushes the shards called late (backup workers).
    late_pushes: AtomicU64,
    /// Requests refused with a pushback, and sent again.
    pushbacks: Pushbacks,
    /// Each sparse table's last batch's plan, for a push of the keys just
    /// pulled.
    plans: PlanCache,
}

/// How a client waits out a shard's pushbacks (`transport::with_pushback`):
/// it sends the refused request again after the pushback (plus up to half
/// of it again at random, so that refused workers do not come back
/// together), for as long as the shard keeps refusing it, up to `within`
/// (`recover_within`) of waiting per request.
struct Pushbacks {
    within: Duration,
    /// Requests sent again after a pushback.
    waits: AtomicU64,
}

impl Pushbacks {
    /// Whether a request refused with `status`, after `waited` of waiting
    /// for it so far, is to be sent again; if so, the pushback has been
    /// waited (and added to `waited`) when this returns. False: return the
    /// refusal (none pushed back, or waited long enough).
    async fn wait_out(&self, status: &tonic::Status, waited: &mut Duration) -> bool {
        use rand::Rng;
        let Some(after) = transport::pushback(status) else { return false };
        let after = after + after.mul_f64(rand::rng().random_range(0.0..0.5));
        if *waited + after > self.within {
            return false;
        }
        if self.waits.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(code = ?status.code(), message = status.message(), "a shard asked this worker to wait; sending again");
        } else {
            tracing::debug!(code = ?status.code(), ?after, "pushed back; sending again");
        }
        tokio::time::sleep(after).await;
        *waited += after;
        true
    }
}

/// A range of minibatches from the data queue: `start..end` of epoch
/// `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRange {
    pub epoch: u32,
    pub start: u64,
    pub end: u64,
}

/// The data queue's answer ([`ShardedClient::take_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// This worker's range; `None` when none is free now.
    pub range: Option<DataRange>,
    /// Every range of the plan is completed.
    pub finished: bool,
    pub completed: u64,
    pub total: u64,
}

/// A caller's buffer of `got` floats must hold `need`.
fn check_len(what: &str, got: usize, need: usize) -> Result<()> {
    if got == need { Ok(()) } else { Err(Error::Config(format!("{what} has {got} floats, need {need}"))) }
}

fn is_transient(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
}

/// The shard is not there (down, or restarting): worth waiting for. A
/// connection that breaks under a request in flight surfaces as `Unknown`
/// with the transport's error as its source; a shard's own refusals never
/// carry a source.
fn is_unreachable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

impl Error {
    /// A shard could not be reached: the worker may wait for it to come back
    /// ([`ShardedClient::rejoin`]) and try again.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Status { status, .. } if is_unreachable(status))
    }
}

impl ShardedClient {
    /// Connects to every shard; `addrs[i]` must be shard `i`.
    pub async fn connect(addrs: &[String], worker: u64, opts: ClientOptions) -> Result<ShardedClient> {
        if addrs.is_empty() {
            return Err(Error::Config("no server addresses".into()));
        }
        let mut shards = Vec::with_capacity(addrs.len());
        let mut data = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let endpoint = transport::endpoint(&opts.transport, addr)?;
            let deadline = tokio::time::Instant::now() + opts.connect_within;
            let mut warned = false;
            let channel = loop {
                match endpoint.connect().await {
                    Ok(c) => break c,
                    Err(e) if tokio::time::Instant::now() >= deadline || transport::is_tls_failure(&e) => {
                        return Err(Error::Connect { addr: addr.clone(), source: e });
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(worker, %addr, error = %e, "waiting for the shard to accept connections");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                }
            };
            let client = transport::client(&opts.transport, channel, opts.credential.clone());
            data.push(data_link(&client, shards.len(), addr, &opts).await?);
            shards.push(client);
        }
        let (n, within) = (shards.len(), opts.recover_within);
        Ok(ShardedClient {
            shards,
            data,
            addrs: addrs.to_vec(),
            worker,
            next_seq: vec![1; n],
            lost_contact: Arc::default(),
            opts,
            codecs: RwLock::default(),
            error_feedback: true,
            residuals: Residuals::default(),
            bytes_pushed: AtomicU64::new(0),
            bytes_pulled: AtomicU64::new(0),
            backup: Backup::default(),
            pushed_clock: AtomicU64::new(0),
            late_pushes: AtomicU64::new(0),
            pushbacks: Pushbacks { within, waits: AtomicU64::new(0) },
            plans: PlanCache::default(),
        })
    }

    /// The job's backup workers, sent with every join from now on.
    pub fn set_backup(&mut self, backup: Backup) {
        self.backup = backup;
    }

    /// The highest clock a shard reported for this worker after a ticking
    /// push since the last call (0 if none): more than the iteration count
    /// when a late push made the worker jump (backup workers).
    pub fn take_clock(&self) -> u64 {
        self.pushed_clock.swap(0, Ordering::Relaxed)
    }

    /// Pushes the shards called late so far (backup workers).
    pub fn late_pushes(&self) -> u64 {
        self.late_pushes.load(Ordering::Relaxed)
    }

    /// Pulls and pushes a shard refused with a pushback and this client
    /// sent again, so far.
    pub fn pushback_waits(&self) -> u64 {
        self.pushbacks.waits.load(Ordering::Relaxed)
    }

    /// Reports `done` (ranges whose every push is applied) to the data
    /// queue on shard 0 and takes this worker's next range (the same one
    /// again until it is reported done). Retried like a push.
    pub async fn take_range(&self, plan: pb::DataPlan, done: &[DataRange], lease: Duration) -> Result<Taken> {
        let msg = pb::TakeRangeRequest {
            worker: self.worker,
            plan: Some(plan),
            done: done.iter().map(|r| pb::DataRange { epoch: r.epoch, start: r.start, end: r.end }).collect(),
            lease_ms: lease.as_millis().min(u128::from(u32::MAX)) as u32,
        };
        let r = retry(&self.opts, &self.lost_contact, &self.pushbacks, || {
            let mut c = self.shards[0].clone();
            let req = self.request(msg.clone(), self.opts.request_timeout);
            async move { c.take_range(req).await }
        })
        .await
        .map_err(|s| self.status(0, s))?;
        Ok(Taken {
            range: r.range.map(|r| DataRange { epoch: r.epoch, start: r.start, end: r.end }),
            finished: r.finished,
            completed: r.completed,
            total: r.total,
        })
    }

    /// Whether lossy pushes keep an error-feedback residual (the default).
    pub fn set_error_feedback(&mut self, on: bool) {
        self.error_feedback = on;
    }

    /// Protobuf bytes of the push requests built and of the pull answers
    /// received so far (each push counted once, however often it is retried).
    pub fn wire_bytes(&self) -> (u64, u64) {
        (self.bytes_pushed.load(Ordering::Relaxed), self.bytes_pulled.load(Ordering::Relaxed))
    }

    /// The error-feedback residual of every element of `set`, laid out
    /// like it (zeros where none is kept).
    pub fn dense_residual(&self, set: &DenseSet) -> Vec<f32> {
        let mut out = vec![0.0; set.len];
        for (t, idx, r) in set.by_shard.iter().flatten() {
            if let Some(res) = self.residuals.dense_chunk(t, *idx) {
                out[r.clone()].copy_from_slice(res);
            }
        }
        out
    }

    /// The error-feedback residual of the rows of `keys` (`dim` each).
    pub fn sparse_residual(&self, table: &str, keys: &[u64], dim: usize) -> Vec<f32> {
        let mut out = vec![0.0; keys.len() * dim];
        for (&k, o) in keys.iter().zip(out.chunks_exact_mut(dim)) {
            if let Some(r) = self.residuals.row(table, k, dim) {
                o.copy_from_slice(r);
            }
        }
        out
    }

    fn codecs_of(&self, table: &str) -> Codecs {
        let codecs = self.codecs.read().unwrap_or_else(|p| p.into_inner());
        codecs.get(table).copied().unwrap_or_default()
    }

    fn count_pulled(&self, msg: &impl Message) {
        self.bytes_pulled.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
    }

    /// Counts the bytes of a pull's answer read into `place`.
    fn count_placed<E>(
        &self,
        pulled: std::result::Result<Pulled, E>,
        place: Option<&Placement<'_>>,
    ) -> std::result::Result<Pulled, E> {
        if let (Ok(Pulled::Placed), Some(place)) = (&pulled, place) {
            self.bytes_pulled.fetch_add(place.body_len() as u64, Ordering::Relaxed);
        }
        pulled
    }

    fn count_pushed(&self, msg: &impl Message) {
        self.bytes_pushed.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
    }

    /// The stochastic-rounding seed of one block of one push: a function of
    /// (worker, clock, table, block), so a run is reproducible.
    fn seed(&self, clock: u64, table: &str, block: u64) -> u64 {
        splitmix64(self.worker.rotate_left(40) ^ splitmix64(clock) ^ fnv1a64(table).wrapping_add(block))
    }

    /// Encodes one block of a push in `codec`, through the block's residual
    /// when error feedback is on.
    fn encode_push(
        &mut self,
        codec: Codec,
        grad: &[f32],
        tensor: &str,
        index: u32,
        seed: u64,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        if codec.is_lossy() && self.error_feedback {
            let residual = self.residuals.dense(tensor, index, grad.len());
            compress::encode_with_feedback(codec, grad, residual, grad.len(), seed, &mut out)?;
        } else {
            compress::encode(codec, grad, grad.len(), seed, &mut out);
        }
        Ok(out)
    }

    pub fn num_shards(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn worker(&self) -> u64 {
        self.worker
    }

    fn status(&self, shard: usize, status: tonic::Status) -> Error {
        self.note_unreachable(&status);
        Error::Status { shard: shard as ShardId, addr: self.addrs[shard].clone(), status }
    }

    /// Remembers that a shard could not be reached (the training loop then
    /// tells a restored shard where this worker is).
    fn note_unreachable(&self, status: &tonic::Status) {
        if is_unreachable(status) {
            self.lost_contact.store(true, Ordering::Relaxed);
        }
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// Registers a table on every shard (idempotent for identical specs),
    /// waiting up to `recover_within` for a shard that cannot be reached (at
    /// start-up a shard may still be starting, or cut off for a while), and
    /// waiting out pushbacks.
    pub async fn register(&self, spec: &TableSpec) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.opts.recover_within;
        let (mut backoff, mut waited) = (Duration::from_millis(50), Duration::ZERO);
        loop {
            match self.register_once(spec).await {
                Err(Error::Status { ref status, .. })
                    if self.pushbacks.wait_out(status, &mut waited).await => {}
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(worker = self.worker, error = %e, "waiting for a shard to register a table");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    async fn register_once(&self, spec: &TableSpec) -> Result<()> {
        let table = pb::TableSpec::from(spec);
        let num_shards = self.num_shards();
        let calls = self.shards.iter().map(|c| {
            let mut c = c.clone();
            let req = self.request(
                pb::RegisterRequest { table: Some(table.clone()), num_shards },
                self.opts.request_timeout,
            );
            async move { c.register(req).await }
        });
        for (i, r) in join_all(calls).await.into_iter().enumerate() {
            r.map_err(|s| self.status(i, s))?;
        }
        self.codecs.write().unwrap_or_else(|p| p.into_inner()).insert(spec.name.clone(), spec.codecs);
        Ok(())
    }

    /// Joins the clock set of every shard as a worker that has completed
    /// `clock` iterations, and continues this worker id's seqs where each
    /// shard left them (a restarted worker). Returns the clock the shards
    /// hold for this worker: `clock`, or more when the job is resumed from a
    /// checkpoint (the worker then continues from there).
    pub async fn join(&mut self, consistency: Consistency, lease: Duration, clock: u64) -> Result<u64> {
        let msg = pb::JoinRequest {
            worker: self.worker,
            consistency: Some(consistency.into()),
            lease_ms: lease.as_millis().min(u128::from(u32::MAX)) as u32,
            clock,
            backup_workers: self.backup.workers,
            late_gradients: pb::LateGradients::from(self.backup.late) as i32,
        };
        let calls = self.shards.iter().map(|c| {
            let mut c = c.clone();
            let req = self.request(msg, self.opts.request_timeout);
            async move { c.join(req).await }
        });
        let results = join_all(calls).await;
        let mut at = clock;
        for (i, r) in results.into_iter().enumerate() {
            let r = r.map_err(|s| self.status(i, s))?.into_inner();
            self.next_seq[i] = self.next_seq[i].max(r.last_seq + 1);
            at = at.max(r.clock);
        }
        Ok(at)
    }

    /// Whether a shard could not be reached since the last call (then the
    /// worker should [`Self::rejoin`]: the shard may have been restored).
    pub fn take_lost_contact(&self) -> bool {
        self.lost_contact.swap(false, Ordering::Relaxed)
    }

    /// Waits (up to `recover_within`) until every shard answers, and rejoins
    /// each as a worker at `clock`: a shard restored from a checkpoint learns
    /// where this worker is. Returns the clock the shards hold for it. A
    /// worker's first join goes through here too, so a shard cut off at
    /// start-up is waited for like one cut off later.
    pub async fn rejoin(&mut self, consistency: Consistency, lease: Duration, clock: u64) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + self.opts.recover_within;
        let (mut backoff, mut waited) = (Duration::from_millis(50), Duration::ZERO);
        loop {
            match self.join(consistency, lease, clock).await {
                Ok(at) => {
                    self.lost_contact.store(false, Ordering::Relaxed);
                    return Ok(at);
                }
                Err(Error::Status { ref status, .. })
                    if self.pushbacks.wait_out(status, &mut waited).await => {}
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(worker = self.worker, error = %e, "waiting for a shard to come back");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Leaves the clock set of every shard, all at once. A shard that
    /// refuses with a pushback (its rate limit or in-flight budget) is asked
    /// again after it, as pushes are, up to `recover_within` of waiting; a
    /// refused `Leave` used to fail the job's end.
    pub async fn leave(&self) -> Result<()> {
        let calls = self.shards.iter().map(|c| {
            let mut c = c.clone();
            async move {
                let mut waited = Duration::ZERO;
                loop {
                    let req =
                        self.request(pb::LeaveRequest { worker: self.worker }, self.opts.request_timeout);
                    match c.leave(req).await {
                        Err(status) if self.pushbacks.wait_out(&status, &mut waited).await => {}
                        r => return r,
                    }
                }
            }
        });
        for (i, r) in join_all(calls).await.into_iter().enumerate() {
            r.map_err(|s| self.status(i, s))?;
        }
        Ok(())
    }

    /// Spawns a task that renews this worker's lease every `every`.
    pub fn spawn_heartbeat(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let shards = self.shards.clone();
        let worker = self.worker;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for c in &shards {
                    let mut c = c.clone();
                    let mut req = tonic::Request::new(pb::HeartbeatRequest { worker });
                    req.set_timeout(every);
                    if let Err(e) = c.heartbeat(req).await {
                        tracing::debug!(worker, error = %e, "heartbeat failed");
                    }
                }
            }
        })
    }

    /// Start barrier: waits until every shard's clock set has `workers`
    /// members, or someone has already completed an iteration (the barrier
    /// was released before, e.g. this worker is a restart), or `within`
    /// passes (returns false). Without it a worker that joins late finds the
    /// early ones far ahead, and BSP/SSP bounds do not hold for its pushes.
    /// Call after [`ShardedClient::join`] and the heartbeat, so waiting keeps
    /// the lease alive.
    pub async fn wait_for_members(&self, workers: usize, within: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Heartbeats answer with the clock set: a worker needs no Stats.
            let calls = self.shards.iter().map(|c| {
                let mut c = c.clone();
                let req =
                    self.request(pb::HeartbeatRequest { worker: self.worker }, self.opts.request_timeout);
                async move { c.heartbeat(req).await }
            });
            let mut sets = Vec::new();
            for (i, r) in join_all(calls).await.into_iter().enumerate() {
                sets.push(r.map_err(|s| self.status(i, s))?.into_inner());
            }
            let started = sets.iter().any(|s| s.started);
            if started || sets.iter().all(|s| s.members as usize >= workers) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pulls every element of `set` into `out` (same layout), reading at
    /// `clock` (BSP/SSP reads block until the clock set allows it). On an
    /// error `out` may hold part of the answer (values are read into it as
    /// they arrive).
    pub async fn pull_dense(&self, set: &DenseSet, clock: u64, out: &mut [f32]) -> Result<()> {
        check_len("pull buffer", out.len(), set.len)?;
        let meta = self.read_meta(set, clock);
        let pulls: Vec<_> = (0..set.by_shard.len())
            .filter(|&i| !set.by_shard[i].is_empty())
            .map(|i| (i, pull_request(set, i, meta)))
            .collect();
        let placements = set.placements(&pulls, out);
        let calls = pulls.iter().zip(placements).map(|((i, msg), mut place)| async move {
            (*i, self.pull_shard(*i, self.data[*i].as_ref(), msg, place.as_mut()).await)
        });
        let answers = join_all(calls).await;
        for (i, r) in answers {
            let pulled = r.map_err(|s| self.status(i, s))?;
            self.take_pulled(set, i, pulled, out)?;
        }
        Ok(())
    }

    /// Shard `i`'s part of a dense pull, over `data` if given (its values
    /// read straight into `place`, if given), else gRPC.
    async fn pull_shard(
        &self,
        i: usize,
        data: Option<&DataLink>,
        msg: &pb::PullDenseRequest,
        mut place: Option<&mut Placement<'_>>,
    ) -> std::result::Result<Pulled, tonic::Status> {
        let timeout = self.opts.read_timeout;
        let grpc = || {
            let mut c = self.shards[i].clone();
            let req = self.request(msg.clone(), timeout);
            async move { c.pull_dense(req).await.map(|r| Pulled::Answer(r.into_inner())) }
        };
        // As `hot_call`, with the answer read into `place`.
        let mut waited = Duration::ZERO;
        loop {
            let answer = match data {
                Some(link) => or_grpc(link.pull_into(msg, place.as_deref_mut(), timeout).await, grpc).await,
                None => grpc().await,
            };
            match answer {
                Err(status) if self.pushbacks.wait_out(&status, &mut waited).await => {}
                answer => return self.count_placed(answer, place.as_deref()),
            }
        }
    }

    /// What a pull of `set` at `clock` says of itself.
    fn read_meta(&self, set: &DenseSet, clock: u64) -> pb::ReadMeta {
        let compressed = set.tensors.iter().any(|(t, _)| self.codecs_of(t).pull.is_lossy());
        pb::ReadMeta { worker: self.worker, clock, compressed }
    }

    /// Decodes shard `i`'s answer to [`pull_request`] into its places in
    /// `out`, unless it is there already.
    fn take_pulled(&self, set: &DenseSet, i: usize, pulled: Pulled, out: &mut [f32]) -> Result<()> {
        let Pulled::Answer(resp) = pulled else { return Ok(()) };
        self.count_pulled(&resp);
        decode_pulled(&set.by_shard[i], i, &resp, out)
    }

    /// Pushes `grads` (laid out like `set`) computed at `read_clock` as part of
    /// iteration `clock`. With `tick`, every shard is told the iteration is
    /// complete (shards with no chunk of `set` get an empty push).
    pub async fn push_dense(
        &mut self,
        set: &DenseSet,
        grads: impl Into<Grads<'_>>,
        clock: u64,
        read_clock: u64,
        tick: bool,
    ) -> Result<()> {
        let requests = self.dense_push_requests(set, grads.into(), clock, read_clock, tick)?;
        self.send_dense_pushes(requests, Sending::First).await
    }

    /// Pushes the gradient of iteration `clock` (with `tick`) and, in the
    /// same round trip, pulls the parameters for iteration `clock + 1` into
    /// `out`. On the data plane each shard gets both on one connection and
    /// runs the pull after the push, so the pull sees it
    /// ([`ShardedClient::push_then_pull`]). Over gRPC the two go at once:
    /// under BSP the shards serve the pull only after this push; under SSP
    /// and ASP the pull may miss it (one iteration of staleness on the
    /// worker's own update). Returns false if the push went through but a
    /// shard could not be reached for the pull: the iteration is complete,
    /// and the caller pulls again (`out` may hold part of the answer).
    pub async fn push_and_pull_dense(
        &mut self,
        set: &DenseSet,
        grads: impl Into<Grads<'_>>,
        clock: u64,
        out: &mut [f32],
    ) -> Result<bool> {
        check_len("pull buffer", out.len(), set.len)?;
        let requests = self.dense_push_requests(set, grads.into(), clock, clock, true)?;
        let links: Option<Vec<DataLink>> = self.data.iter().cloned().collect();
        let (pushed, pulled) = if let Some(links) = links {
            self.push_then_pull(&links, set, requests, clock + 1, out).await
        } else {
            tokio::join!(
                self.send_dense_pushes(requests, Sending::First),
                self.pull_dense(set, clock + 1, out)
            )
        };
        pushed?;
        match pulled {
            Ok(()) => Ok(true),
            Err(e) if e.is_unreachable() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`ShardedClient::push_and_pull_dense`] on the data plane: to each
    /// shard, its push and its pull in one write on one connection
    /// ([`DataLink::push_then_pull`]); the shard runs the pull after the push
    /// and answers both together, so an iteration is one round trip per
    /// shard, and the pull sees the push. A push the shard did not answer
    /// is sent again with its seq, as [`ShardedClient::push_dense`] would.
    /// Returns the pushes' result and the pulls'.
    async fn push_then_pull(
        &self,
        links: &[DataLink],
        set: &DenseSet,
        requests: Vec<(usize, pb::PushDenseRequest)>,
        clock: u64,
        out: &mut [f32],
    ) -> (Result<()>, Result<()>) {
        let timeout = self.opts.read_timeout.max(self.opts.request_timeout);
        let meta = self.read_meta(set, clock);
        let pulls: Vec<_> = (requests.iter())
            .filter(|(i, _)| !set.by_shard[*i].is_empty())
            .map(|&(i, _)| (i, pull_request(set, i, meta)))
            .collect();
        // In the requests' order: each shard's pull (if it has one) with its placement.
        let mut pending = pulls.iter().zip(set.placements(&pulls, out)).peekable();
        let calls = requests.into_iter().map(|(i, push)| {
            let data = &links[i];
            let (pull, mut place) = match pending.next_if(|((at, _), _)| *at == i) {
                Some(((_, pull), place)) => (Some(pull), place),
                None => (None, None),
            };
            async move {
                let (seq, resends) = (push.seq(), data.resends());
                let (pushed, pulled) = match pull {
                    Some(pull) => {
                        match data.push_then_pull(&push, pull, place.as_mut(), timeout).await {
                            Ok((pushed, pulled)) => (pushed, Some(self.count_placed(pulled, place.as_ref()))),
                            Err(CallError::Sent(s)) => (Err(s.clone()), Some(Err(s))),
                            // Nothing went out: both over gRPC, the pull after the push.
                            Err(CallError::NotSent(_)) => {
                                let pushed = self.send_dense_pushes(vec![(i, push)], Sending::First).await;
                                let pulled = match pushed {
                                    Ok(()) => Some(self.pull_shard(i, None, pull, None).await),
                                    Err(_) => None,
                                };
                                return (i, pushed.map(|()| None), pulled);
                            }
                        }
                    }
                    None => match data.try_call(Kind::PushDense, &push, timeout).await {
                        Ok(r) => (Ok(r), None),
                        Err(CallError::Sent(s)) => (Err(s), None),
                        Err(CallError::NotSent(_)) => {
                            let pushed = self.send_dense_pushes(vec![(i, push)], Sending::First).await;
                            return (i, pushed.map(|()| None), None);
                        }
                    },
                };
                let mut pushed_back = false;
                let pushed = match pushed {
                    // Sent once unless the link sent it again under the call.
                    Ok(r) => Ok(Some((seq, data.resends() == resends, r))),
                    // Refused before it was applied: sent again after the pushback.
                    Err(s) if self.pushbacks.wait_out(&s, &mut Duration::default()).await => {
                        pushed_back = true;
                        self.send_dense_pushes(vec![(i, push)], Sending::First).await.map(|()| None)
                    }
                    Err(s) if is_transient(&s) || is_unreachable(&s) => {
                        self.note_unreachable(&s);
                        tracing::warn!(code = ?s.code(), "push failed, retrying with the same seq");
                        self.send_dense_pushes(vec![(i, push)], Sending::Again).await.map(|()| None)
                    }
                    Err(s) => Err(self.status(i, s)),
                };
                // A pull pushed back is sent again once the push is in; so is
                // one that ran before its push (pushed back), so that it sees it.
                let again = pushed.is_ok()
                    && (pushed_back
                        || match &pulled {
                            Some(Err(s)) => self.pushbacks.wait_out(s, &mut Duration::default()).await,
                            _ => false,
                        });
                let pulled = match pull {
                    Some(pull) if again => Some(self.pull_shard(i, Some(data), pull, place.as_mut()).await),
                    _ => pulled,
                };
                (i, pushed, pulled)
            }
        });
        let answers = join_all(calls).await;
        let (mut pushes, mut pulls) = (Ok(()), Ok(()));
        for (i, pushed, pulled) in answers {
            match pushed.and_then(|p| p.map_or(Ok(()), |(seq, once, r)| self.took_push(i, seq, once, &r))) {
                Ok(()) => {}
                Err(e) => pushes = pushes.and(Err(e)),
            }
            let taken = match pulled {
                Some(Ok(pulled)) => self.take_pulled(set, i, pulled, out),
                Some(Err(s)) => Err(self.status(i, s)),
                None => Ok(()),
            };
            pulls = pulls.and(taken);
        }
        (pushes, pulls)
    }

    /// Builds one push per shard, taking the next seq of each.
    fn dense_push_requests(
        &mut self,
        set: &DenseSet,
        grads: Grads<'_>,
        clock: u64,
        read_clock: u64,
        tick: bool,
    ) -> Result<Vec<(usize, pb::PushDenseRequest)>> {
        let floats = grads.as_slice();
        check_len("gradient", floats.len(), set.len)?;
        let mut requests = Vec::new();
        for (i, chunks) in set.by_shard.iter().enumerate() {
            if chunks.is_empty() && !tick {
                continue;
            }
            let mut out = Vec::with_capacity(chunks.len());
            let mut kinds = Vec::with_capacity(chunks.len());
            for (t, idx, r) in chunks {
                let codec = self.codecs_of(t).push;
                let seed = self.seed(clock, t, u64::from(*idx));
                let values = match grads {
                    Grads::Shared(shared) if codec == Codec::F32 => shared.bytes(r.clone()),
                    _ => self.encode_push(codec, &floats[r.clone()], t, *idx, seed)?.into(),
                };
                out.push(pb::DenseChunk { tensor: t.clone(), index: *idx, values });
                kinds.push(codec.kind());
            }
            let mut meta = self.next_meta(i, clock, read_clock, tick);
            meta.codecs = compress::codecs_tag(kinds);
            let msg = pb::PushDenseRequest { chunks: out, meta: Some(meta) };
            self.count_pushed(&msg);
            requests.push((i, msg));
        }
        Ok(requests)
    }

    async fn send_dense_pushes(
        &self,
        requests: Vec<(usize, pb::PushDenseRequest)>,
        sending: Sending,
    ) -> Result<()> {
        self.send_pushes(
            requests,
            sending,
            Kind::PushDense,
            |mut c, req| async move { c.push_dense(req).await },
        )
        .await
    }

    /// Sends one push per shard concurrently, each retried on transient
    /// errors with its seq unchanged.
    async fn send_pushes<M, F, Fut>(
        &self,
        requests: Vec<(usize, M)>,
        sending: Sending,
        kind: Kind,
        send: F,
    ) -> Result<()>
    where
        M: Body + Clone + Sequenced,
        F: Fn(transport::ShardClient, tonic::Request<M>) -> Fut + Copy,
        Fut: std::future::Future<
                Output = std::result::Result<tonic::Response<pb::PushResponse>, tonic::Status>,
            >,
    {
        let calls = requests.into_iter().map(|(i, msg)| {
            let (c, data) = (&self.shards[i], &self.data[i]);
            let (opts, lost, pushbacks) = (&self.opts, &*self.lost_contact, &self.pushbacks);
            async move {
                let (resends, mut sends) = (data.as_ref().map(DataLink::resends), 0);
                let r = retry(opts, lost, pushbacks, || {
                    sends += 1;
                    hot_call(None, data.as_ref(), kind, &msg, opts.request_timeout, move |req| {
                        send(c.clone(), req)
                    })
                })
                .await;
                let once = sending == Sending::First
                    && sends == 1
                    && data.as_ref().map(DataLink::resends) == resends;
                (i, msg.seq(), once, r)
            }
        });
        let mut result = Ok(());
        for (i, seq, once, r) in join_all(calls).await {
            let took = r.map_err(|s| self.status(i, s)).and_then(|r| self.took_push(i, seq, once, &r));
            result = result.and(took);
        }
        result
    }

    /// Notes a push's answer: the clock it moved the worker to, lateness.
    /// A push sent `once` (its seq never sent before, no retry, no resend
    /// under it) that the shard answers as already applied was not applied:
    /// the shard holds this seq of this worker id from another sender.
    /// That is an error, not a push that went through.
    fn took_push(&self, shard: usize, seq: u64, once: bool, r: &pb::PushResponse) -> Result<()> {
        if r.duplicate && once {
            return Err(Error::SeqTaken {
                shard: shard as ShardId,
                addr: self.addrs[shard].clone(),
                worker: self.worker,
                seq,
            });
        }
        self.pushed_clock.fetch_max(r.clock, Ordering::Relaxed);
        if r.late {
            self.late_pushes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn next_meta(&mut self, shard: usize, clock: u64, read_clock: u64, tick: bool) -> pb::PushMeta {
        let seq = self.next_seq[shard];
        self.next_seq[shard] += 1;
        pb::PushMeta { worker: self.worker, seq, clock, tick, read_clock, codecs: 0 }
    }

    /// Every row of sparse table `table` that exists, on every shard, as
    /// (keys, rows of `dim` floats): for saving a model whose keys no worker
    /// lists (CTR embeddings). Reads page by page, outside the clock
    /// discipline; a shard that answers out of order is a protocol error.
    pub async fn scan_sparse(&self, table: &str, dim: usize) -> Result<(Vec<u64>, Vec<f32>)> {
        let per_page = (self.opts.transport.max_message_bytes() / (8 + 4 * dim.max(1)) / 2).max(1);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (i, shard) in self.shards.iter().enumerate() {
            let mut after = None;
            loop {
                let msg = pb::ScanSparseRequest {
                    table: table.to_string(),
                    start_after: after.unwrap_or(0),
                    from_start: after.is_none(),
                    limit: per_page.min(u32::MAX as usize) as u32,
                };
                let req = self.request(msg, self.opts.read_timeout);
                let r = shard.clone().scan_sparse(req).await.map_err(|s| self.status(i, s))?.into_inner();
                let page = codec::decode_u64("scanned keys", &r.keys)?;
                let rows = codec::decode_f32("scanned rows", &r.values)?;
                let ordered = page.windows(2).all(|w| w[0] < w[1])
                    && page.first().is_none_or(|&k| after.is_none_or(|a| k > a));
                if r.dim as usize != dim
                    || rows.len() != page.len() * dim
                    || !ordered
                    || (page.is_empty() && !r.done)
                {
                    return Err(Error::Protocol(format!(
                        "shard {i} answered a scan of `{table}` inconsistently"
                    )));
                }
                after = page.last().copied().or(after);
                keys.extend_from_slice(&page);
                values.extend_from_slice(&rows);
                if r.done {
                    break;
                }
            }
        }
        Ok((keys, values))
    }

    /// Pulls the rows of `keys` (duplicates allowed) into `out`
    /// (`keys.len() * dim` floats, in key order), creating missing rows on
    /// their shards. Each distinct key is sent once, to its shard.
    pub async fn pull_sparse(
        &self,
        table: &str,
        dim: usize,
        keys: &[u64],
        clock: u64,
        out: &mut [f32],
    ) -> Result<()> {
        self.read_sparse(table, dim, keys, clock, out, false).await
    }

    /// As [`Self::pull_sparse`], but creates nothing: missing rows read as
    /// their initial values (for evaluation on unseen keys).
    pub async fn lookup_sparse(
        &self,
        table: &str,
        dim: usize,
        keys: &[u64],
        clock: u64,
        out: &mut [f32],
    ) -> Result<()> {
        self.read_sparse(table, dim, keys, clock, out, true).await
    }

    async fn read_sparse(
        &self,
        table: &str,
        dim: usize,
        keys: &[u64],
        clock: u64,
        out: &mut [f32],
        read_only: bool,
    ) -> Result<()> {
        check_len("pull buffer", out.len(), keys.len() * dim)?;
        let (plan, sent) = self.plans.plan(table, keys, self.num_shards())?;
        // Evaluation (read-only lookups) reads exact values.
        let compressed = !read_only && self.codecs_of(table).pull.is_lossy();
        let meta = pb::ReadMeta { worker: self.worker, clock, compressed };
        let calls = plan.ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(i, _)| {
            let c = &self.shards[i];
            let msg = pb::PullSparseRequest {
                table: table.to_string(),
                keys: sent[i].clone(),
                meta: Some(meta),
                read_only,
            };
            async move {
                let data = self.data[i].as_ref();
                let call = hot_call(
                    Some(&self.pushbacks),
                    data,
                    Kind::PullSparse,
                    &msg,
                    self.opts.read_timeout,
                    |req| {
                        let mut c = c.clone();
                        async move { c.pull_sparse(req).await }
                    },
                );
                (i, call.await)
            }
        });
        // Each shard's rows, checked: the answer's f32 bytes as they came,
        // or the values of a lossy codec decoded.
        let mut pulled = Vec::with_capacity(plan.ranges.len());
        for (i, r) in join_all(calls).await {
            let resp = r.map_err(|s| self.status(i, s))?.into_inner();
            if resp.dim as usize != dim {
                return Err(Error::Protocol(format!(
                    "table `{table}` has rows of {}, caller expects {dim}",
                    resp.dim
                )));
            }
            self.count_pulled(&resp);
            let kind = CodecKind::from_wire("pulled rows", resp.codec)?;
            let n = plan.ranges[i].len() * dim;
            let rows = if kind == CodecKind::F32 {
                if resp.values.len() != n * 4 {
                    return Err(ps_common::Error::LengthMismatch {
                        what: "pulled rows",
                        expected: n,
                        got: resp.values.len() / 4,
                    }
                    .into());
                }
                SparseRows::Raw(resp.values)
            } else {
                SparseRows::Decoded(compress::decode(kind, "pulled rows", &resp.values, n, dim)?)
            };
            pulled.push((i, rows));
        }
        // Each distinct key's row goes straight to its first occurrence in
        // `out` (one copy from an f32 answer). For a large batch `out` is cut
        // into one part per core, each filled on its own thread from every
        // answer. Rows come in the shard's order: each place in `out` is
        // asked for a few rows ahead. Repeats are copied at the end.
        if dim > 0 {
            let per = keys.len().div_ceil(threads(keys.len())).max(1);
            let parts: Vec<(usize, &mut [f32])> =
                out.chunks_mut(per * dim).enumerate().map(|(t, o)| (t * per, o)).collect();
            let fill = |(start, part): (usize, &mut [f32])| -> Result<()> {
                let mine = start..start + part.len() / dim;
                for (i, rows) in &pulled {
                    let first = &plan.first[plan.ranges[*i].clone()];
                    for (j, &p) in first.iter().enumerate() {
                        if let Some(&q) =
                            first.get(j + PREFETCH_AHEAD).filter(|&&q| mine.contains(&(q as usize)))
                        {
                            let q = q as usize - start;
                            prefetch(&part[q * dim..(q + 1) * dim]);
                        }
                        let p = p as usize;
                        if !mine.contains(&p) {
                            continue;
                        }
                        let to = &mut part[(p - start) * dim..(p - start + 1) * dim];
                        match rows {
                            SparseRows::Raw(b) => {
                                codec::decode_f32_into("pulled rows", &b[j * dim * 4..(j + 1) * dim * 4], to)?
                            }
                            SparseRows::Decoded(v) => to.copy_from_slice(&v[j * dim..(j + 1) * dim]),
                        }
                    }
                }
                Ok(())
            };
            in_parallel(parts, keys.len(), fill).into_iter().collect::<Result<()>>()?;
        }
        for &(p, u) in plan.repeats.iter().flatten() {
            let from = plan.first[u as usize] as usize * dim;
            out.copy_within(from..from + dim, p as usize * dim);
        }
        Ok(())
    }

    /// Pushes per-occurrence row gradients of `keys` (duplicates are summed
    /// first, so each key is updated once).
    #[allow(clippy::too_many_arguments)]
    pub async fn push_sparse(
        &mut self,
        table: &str,
        dim: usize,
        keys: &[u64],
        grads: &[f32],
        clock: u64,
        read_clock: u64,
        tick: bool,
    ) -> Result<()> {
        check_len("gradient", grads.len(), keys.len() * dim)?;
        // A training step pushes the keys it pulled: their plan is kept.
        let (plan, sent) = self.plans.plan(table, keys, self.num_shards())?;
        // Each shard's rows (on up to one thread each, for a large batch):
        // one per distinct key, a first occurrence's gradient plus its
        // repeats'. The first occurrences are visited in the shard's order,
        // each asked for a few rows ahead.
        let merge = |s: usize| {
            let range = plan.ranges[s].clone();
            let first = &plan.first[range.clone()];
            let mut rows = Vec::with_capacity(first.len() * dim);
            for (j, &p) in first.iter().enumerate() {
                if let Some(&q) = first.get(j + PREFETCH_AHEAD) {
                    prefetch(&grads[q as usize * dim..(q as usize + 1) * dim]);
                }
                let p = p as usize;
                rows.extend_from_slice(&grads[p * dim..(p + 1) * dim]);
            }
            for &(p, u) in &plan.repeats[s] {
                let (p, u) = (p as usize, u as usize - range.start);
                for (m, v) in rows[u * dim..(u + 1) * dim].iter_mut().zip(&grads[p * dim..(p + 1) * dim]) {
                    *m += v;
                }
            }
            rows
        };
        let merged = in_parallel((0..plan.ranges.len()).collect(), keys.len(), merge);
        let codec = self.codecs_of(table).push;
        let mut requests = Vec::new();
        for (i, (range, rows)) in plan.ranges.iter().zip(merged).enumerate() {
            let ks = &plan.keys[range.clone()];
            if ks.is_empty() && !tick {
                continue;
            }
            // int8: one scale per row; top-k: over the whole push.
            let seed = self.seed(clock, table, i as u64);
            let grads = if codec == Codec::F32 {
                // The rows' own bytes, no copy.
                codec::into_f32_bytes(rows)
            } else if codec.is_lossy() && self.error_feedback {
                let (mut residual, mut out) = (vec![0.0f32; rows.len()], Vec::new());
                self.residuals.take_rows(table, ks, dim, &mut residual);
                compress::encode_with_feedback(codec, &rows, &mut residual, dim, seed, &mut out)?;
                self.residuals.put_rows(table, ks, dim, &residual);
                out.into()
            } else {
                let mut out = Vec::new();
                compress::encode(codec, &rows, dim, seed, &mut out);
                out.into()
            };
            let mut meta = self.next_meta(i, clock, read_clock, tick);
            meta.codecs = compress::codecs_tag([codec.kind()]);
            let msg = pb::PushSparseRequest {
                table: table.to_string(),
                keys: sent[i].clone(),
                grads,
                meta: Some(meta),
            };
            self.count_pushed(&msg);
            requests.push((i, msg));
        }
        self.send_pushes(requests, Sending::First, Kind::PushSparse, |mut c, req| async move {
            c.push_sparse(req).await
        })
        .await
    }

    /// The specs of every table, as shard 0 lists them (tables are
    /// registered on every shard).
    pub async fn list_tables(&self) -> Result<Vec<TableSpec>> {
        let req = self.request(pb::ListTablesRequest {}, self.opts.request_timeout);
        let resp = self.shards[0].clone().list_tables(req).await.map_err(|s| self.status(0, s))?.into_inner();
        if resp.num_shards != self.num_shards() {
            return Err(Error::Config(format!(
                "the cluster has {} shards, {} addresses given",
                resp.num_shards,
                self.num_shards()
            )));
        }
        resp.tables.into_iter().map(|t| Ok(TableSpec::try_from(t)?)).collect()
    }

    /// Stats of every shard, in shard order.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>> {
        let calls = self.shards.iter().map(|c| {
            let mut c = c.clone();
            let req = self.request(pb::StatsRequest {}, self.opts.request_timeout);
            async move { c.stats(req).await }
        });
        let mut out = Vec::new();
        for (i, r) in join_all(calls).await.into_iter().enumerate() {
            out.push(r.map_err(|s| self.status(i, s))?.into_inner());
        }
        Ok(out)
    }
}

/// Runs `call` until it succeeds or fails for good. A timed-out call is
/// retried `push_retries` times; an unreachable shard (down or restarting) is
/// retried until `recover_within` has passed. Backoff doubles from 50 ms.
/// The data plane of the shard at `addr` (reached as `client`), if it offers
/// one and `opts` uses it; it is asked over gRPC where it listens. A shard
/// of a version without one answers UNIMPLEMENTED: then gRPC only.
async fn data_link(
    client: &transport::ShardClient,
    shard: usize,
    addr: &str,
    opts: &ClientOptions,
) -> Result<Option<DataLink>> {
    if !opts.transport.data_plane {
        return Ok(None);
    }
    let mut req = tonic::Request::new(pb::DataPlaneRequest {});
    req.set_timeout(opts.request_timeout);
    let (port, socket) = match client.clone().data_plane(req).await {
        Ok(r) => {
            let r = r.into_inner();
            (r.port, r.socket)
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => (0, String::new()),
        Err(status) => return Err(Error::Status { shard: shard as ShardId, addr: addr.to_string(), status }),
    };
    if port == 0 || port > u32::from(u16::MAX) {
        tracing::info!(%addr, "the shard offers no data plane; pulls and pushes go over gRPC");
        return Ok(None);
    }
    let host = transport::host_of(addr);
    let socket = (!socket.is_empty()).then(|| std::path::PathBuf::from(socket));
    Ok(Some(DataLink::new(
        &opts.transport,
        (host, port as u16, socket),
        opts.credential.token(),
        Some(client.clone()),
    )?))
}

/// Sends a pull or push: on the shard's data plane if it has one, else over
/// gRPC with `grpc`. Either way the answer, or a status that reads the same
/// (UNAVAILABLE for a shard that cannot be reached, DEADLINE_EXCEEDED).
/// The pull of shard `i`'s chunks of `set`, with `meta`.
fn pull_request(set: &DenseSet, i: usize, meta: pb::ReadMeta) -> pb::PullDenseRequest {
    let ids =
        set.by_shard[i].iter().map(|(t, idx, _)| pb::ChunkId { tensor: t.clone(), index: *idx }).collect();
    pb::PullDenseRequest { chunks: ids, meta: Some(meta) }
}

/// One pull or push: on the shard's data plane if it has one, else (or if
/// it cannot be reached) over gRPC with `grpc`; sent again while the shard
/// pushes it back, with `pushbacks` ([`Pushbacks`]; a caller that retries
/// on its own, [`retry`], passes none).
async fn hot_call<M, R, F, Fut>(
    pushbacks: Option<&Pushbacks>,
    data: Option<&DataLink>,
    kind: Kind,
    msg: &M,
    timeout: Duration,
    grpc: F,
) -> std::result::Result<tonic::Response<R>, tonic::Status>
where
    M: Body + Clone,
    R: Message + Default,
    F: Fn(tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
{
    let mut waited = Duration::ZERO;
    loop {
        let answer = match data {
            Some(link) => {
                let sent = link.try_call(kind, msg, timeout).await.map(tonic::Response::new);
                or_grpc(sent, || grpc_call(&grpc, msg, timeout)).await
            }
            None => grpc_call(&grpc, msg, timeout).await,
        };
        match (answer, pushbacks) {
            (Err(status), Some(p)) if p.wait_out(&status, &mut waited).await => {}
            (answer, _) => return answer,
        }
    }
}

/// A data-plane call's answer, or if it could not be sent, `grpc`'s: the
/// data plane only makes calls faster, and a shard at its connection limit,
/// or a peer holding every slot, must not stop training.
async fn or_grpc<R, Fut>(
    sent: std::result::Result<R, CallError>,
    grpc: impl FnOnce() -> Fut,
) -> std::result::Result<R, tonic::Status>
where
    Fut: std::future::Future<Output = std::result::Result<R, tonic::Status>>,
{
    match sent {
        Ok(r) => Ok(r),
        Err(CallError::Sent(status)) => Err(status),
        Err(CallError::NotSent(_)) => grpc().await,
    }
}

async fn grpc_call<M: Clone, T, F, Fut>(grpc: &F, msg: &M, timeout: Duration) -> T
where
    F: Fn(tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut req = tonic::Request::new(msg.clone());
    req.set_timeout(timeout);
    grpc(req).await
}

/// Whether a push's seq goes out for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    First,
    /// Again, after a send whose outcome is unknown (the shard may have
    /// applied it): a "duplicate" answer is then the push's own.
    Again,
}

/// A push's seq.
trait Sequenced {
    fn seq(&self) -> u64;
}

impl Sequenced for pb::PushDenseRequest {
    fn seq(&self) -> u64 {
        self.meta.map_or(0, |m| m.seq)
    }
}

impl Sequenced for pb::PushSparseRequest {
    fn seq(&self) -> u64 {
        self.meta.map_or(0, |m| m.seq)
    }
}

/// A call that may be sent again with the same seq: retried while the
/// shard is unreachable (up to `recover_within`), after a transient error
/// (up to `push_retries` times), and while the shard pushes it back.
async fn retry<T, F, Fut>(
    opts: &ClientOptions,
    lost_contact: &AtomicBool,
    pushbacks: &Pushbacks,
    mut call: F,
) -> std::result::Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + opts.recover_within;
    let mut backoff = Duration::from_millis(50);
    let (mut attempt, mut waited) = (0, Duration::ZERO);
    loop {
        let status = match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        if pushbacks.wait_out(&status, &mut waited).await {
            continue;
        }
        if is_unreachable(&status) && tokio::time::Instant::now() < deadline {
            lost_contact.store(true, Ordering::Relaxed);
            tracing::warn!(code = ?status.code(), "shard unreachable; retrying the push with the same seq");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        } else if is_transient(&status) && attempt < opts.push_retries {
            attempt += 1;
            tracing::warn!(attempt, code = ?status.code(), "push failed, retrying with the same seq");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        } else {
            return Err(status);
        }
    }
}

/// One shard's answer to a sparse pull, checked ([`ShardedClient::pull_sparse`]).
enum SparseRows {
    /// f32 rows as the answer's little-endian bytes.
    Raw(bytes::Bytes),
    /// Rows decoded from a lossy codec.
    Decoded(Vec<f32>),
}

/// Decodes shard `i`'s answer to a dense pull of the chunks `expected`
/// (tensor, index, place in `out`) into their places. The answer must name
/// the chunks asked for, in the order asked: a shard that answered others
/// (another build, or a hostile peer) would otherwise put one chunk's values
/// where another's belong whenever their lengths match.
fn decode_pulled(
    expected: &[(String, u32, Range<usize>)],
    i: usize,
    resp: &pb::PullDenseResponse,
    out: &mut [f32],
) -> Result<()> {
    if resp.chunks.len() != expected.len() {
        return Err(Error::Protocol(format!(
            "shard {i} returned {} chunks for {} requested",
            resp.chunks.len(),
            expected.len()
        )));
    }
    if !resp.codecs.is_empty() && resp.codecs.len() != expected.len() {
        return Err(Error::Protocol(format!("shard {i} named {} codecs", resp.codecs.len())));
    }
    for (j, (chunk, (tensor, index, range))) in resp.chunks.iter().zip(expected).enumerate() {
        if (&chunk.tensor, chunk.index) != (tensor, *index) {
            return Err(Error::Protocol(format!(
                "shard {i} answered chunk {} of `{}` where chunk {index} of `{tensor}` was asked",
                chunk.index, chunk.tensor
            )));
        }
        let kind = match resp.codecs.get(j) {
            Some(&k) => CodecKind::from_wire("pulled chunk", k)?,
            None => CodecKind::F32,
        };
        let len = range.len();
        compress::decode_into(kind, "pulled values", &chunk.values, len, &mut out[range.clone()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each chunk's place is its range of the buffer, cut out per shard in
    /// the shard's order; a buffer too short gets no places.
    #[test]
    fn a_buffer_is_cut_into_each_chunks_place() {
        use ps_common::spec::{Init, Layout, TableSpec};
        let opt = ps_common::optim::Rule::sgd(0.1).into();
        let mut specs = vec![TableSpec::dense("a", &[10, 7], Init::zeros(), opt)];
        specs.push(TableSpec::dense("b", &[25], Init::zeros(), opt));
        for spec in &mut specs {
            let Layout::Dense { chunk_len, .. } = &mut spec.layout else { unreachable!() };
            *chunk_len = 8;
        }
        let set = DenseSet::new(&specs, 3).unwrap();
        let mut out: Vec<f32> = (0..set.len()).map(|i| i as f32).collect();
        let expected: Vec<Vec<Vec<f32>>> = (set.by_shard.iter())
            .map(|chunks| chunks.iter().map(|(_, _, r)| out[r.clone()].to_vec()).collect())
            .collect();
        assert!(expected.iter().filter(|chunks| chunks.len() > 1).count() > 1, "{:?}", set.by_shard);
        let places = set.places(&mut out).unwrap();
        let got: Vec<Vec<Vec<f32>>> =
            places.iter().map(|chunks| chunks.iter().map(|place| place.to_vec()).collect()).collect();
        assert_eq!(got, expected);
        assert!(set.places(&mut out[1..]).is_none());
    }

    /// A pull's answer goes into its places only if it names the chunks
    /// asked for, in order: swapped chunks of equal length, a chunk of
    /// another tensor, or one too few are refused, not decoded.
    #[test]
    fn a_pull_answer_naming_other_chunks_is_refused() {
        let expected =
            vec![("a".to_string(), 0, 0..2), ("a".to_string(), 1, 2..4), ("b".to_string(), 0, 4..6)];
        let chunk = |t: &str, i, v: [f32; 2]| pb::DenseChunk {
            tensor: t.into(),
            index: i,
            values: ps_common::codec::encode_f32(&v),
        };
        let answer = |chunks| pb::PullDenseResponse { chunks, codecs: vec![] };
        let mut out = [0.0; 6];
        let right =
            answer(vec![chunk("a", 0, [1.0, 2.0]), chunk("a", 1, [3.0, 4.0]), chunk("b", 0, [5.0, 6.0])]);
        decode_pulled(&expected, 0, &right, &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let swapped = answer(vec![chunk("a", 1, [0.0; 2]), chunk("a", 0, [0.0; 2]), chunk("b", 0, [0.0; 2])]);
        let e = decode_pulled(&expected, 1, &swapped, &mut out).unwrap_err().to_string();
        assert!(e.contains("shard 1 answered chunk 1 of `a` where chunk 0 of `a` was asked"), "{e}");
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "nothing decoded from a refused first chunk");
        let other = answer(vec![chunk("a", 0, [0.0; 2]), chunk("a", 1, [0.0; 2]), chunk("c", 0, [0.0; 2])]);
        assert!(decode_pulled(&expected, 0, &other, &mut out).is_err());
        // As documented on `pull_dense`: a failed pull may leave part of its
        // answer in the buffer (the chunks before the one refused), no more.
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 5.0, 6.0]);
        let short = answer(vec![chunk("a", 0, [9.0; 2]), chunk("a", 1, [9.0; 2])]);
        assert!(decode_pulled(&expected, 0, &short, &mut out).is_err());
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 5.0, 6.0], "a short answer is refused before any chunk");
    }

    #[test]
    fn options_read_from_a_run_file_table() {
        assert_eq!(toml::from_str::<ClientOptions>("").unwrap(), ClientOptions::default());
        let text = "read_timeout_ms = 1500\npush_retries = 0\n[transport]\nmax_message_mib = 64\n";
        let opts: ClientOptions = toml::from_str(text).unwrap();
        assert_eq!(opts.read_timeout, Duration::from_millis(1500));
        assert_eq!((opts.push_retries, opts.transport.max_message_mib), (0, 64));
        assert_eq!(opts.request_timeout, ClientOptions::default().request_timeout);
        let back: ClientOptions = toml::from_str(&toml::to_string(&opts).unwrap()).unwrap();
        assert_eq!(back, opts);
        assert!(toml::from_str::<ClientOptions>("read_timeout = 5").is_err(), "unknown keys are errors");
        let zero: ClientOptions = toml::from_str("request_timeout_ms = 0").unwrap();
        assert!(zero.validate().is_err());
        let bad: ClientOptions = toml::from_str("[transport]\nmax_message_mib = 0").unwrap();
        assert!(matches!(bad.validate(), Err(Error::Wire(ps_common::Error::InvalidTransport(_)))));
    }
}
