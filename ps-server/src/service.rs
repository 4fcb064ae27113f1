//! The gRPC service of one shard: converts requests at the edge, enforces
//! consistency, and calls the store.
//!
//! This is the only place in the shard that sees wire bytes: keys and
//! gradients are decoded here (`ps_common::codec`) before the store sees
//! them, and pulled values are encoded here as the store hands them out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ps_common::auth::{self, Access, Authenticator};
use ps_common::codec;
use ps_common::compress::{self, Codec, CodecKind};
use ps_common::dataplane;
use ps_common::spec::{Backup, Consistency, TableSpec};
use ps_common::wire::pb::{self, parameter_server_server::ParameterServer};
use tonic::{Request, Response, Status};

use crate::budget::{Caller, Limits, OnHuge, RateLimiter};
use crate::checkpoint::{self, ShardFile};
use crate::clock::{Clocks, Timeliness};
use crate::error::Error;
use crate::gate::Gate;
use crate::metrics::ShardMetrics;
use crate::store::{PushInfo, Store};

/// Everything a shard holds: the store, the clock set, and the push gate
/// that checkpoints close for a moment.
pub struct Shard {
    pub store: Store,
    pub clocks: Clocks,
    pub gate: Gate,
    pub max_wait: Duration,
    /// Where this shard writes its checkpoint files (`None`: it refuses cuts).
    pub checkpoint_dir: Option<PathBuf>,
    /// Seals the checkpoint files this shard writes.
    pub seal: ps_common::seal::Keys,
    /// The job's data queue (dynamic data assignment; used on shard 0).
    pub queue: crate::queue::DataQueue,
    /// What is measured only for the metrics endpoint.
    pub metrics: ShardMetrics,
    /// Requests a second per connection.
    pub rate: RateLimiter,
    /// Bytes of requests being received or handled (`ps_common::inflight`).
    pub inflight: std::sync::Arc<ps_common::inflight::InFlight>,
    /// The `[limits]` the shard enforces (the store keeps its own copy).
    pub limits: Limits,
    /// Who calls (`None`: auth off, every request is admitted).
    pub auth: Option<Authenticator>,
    /// The port of this shard's data plane (0: none), set once it is bound.
    pub data_port: std::sync::atomic::AtomicU16,
    /// The path of this shard's data-plane Unix socket, set once it is bound.
    pub data_socket: std::sync::OnceLock<String>,
}

/// Who may call what: the one table of RPC -> access, read by
/// [`Shard::check`] at the top of every handler, before the request
/// touches anything (docs/SECURITY.md, "Roles and credentials").
pub trait Guarded {
    fn access(&self) -> Access;
}

/// A read: an outside reader's (no worker id, or an [`auth::OUTSIDE_READERS`]
/// label) that creates nothing is open to every role; any other read renews a
/// lease, waits in the clock set or may create rows, so it is the named
/// worker's (a pull that creates rows and names no one: any worker's).
fn read_access(meta: Option<&pb::ReadMeta>, creates_nothing: bool) -> Access {
    match meta {
        None if creates_nothing => Access::Read,
        None => Access::AnyWorker,
        Some(m) if creates_nothing && auth::is_outside_reader(m.worker) => Access::Read,
        Some(m) => Access::Member(m.worker),
    }
}

macro_rules! guarded {
    ($($request:ty => |$r:ident| $access:expr;)*) => {
        $(impl Guarded for $request {
            fn access(&self) -> Access {
                let $r = self;
                $access
            }
        })*
    };
}

guarded! {
    pb::RegisterRequest => |_r| Access::AnyWorker;
    pb::PullDenseRequest => |r| read_access(r.meta.as_ref(), true);
    pb::PullSparseRequest => |r| read_access(r.meta.as_ref(), r.read_only);
    pb::PushDenseRequest => |r| Access::Member(r.meta.map_or(0, |m| m.worker));
    pb::PushSparseRequest => |r| Access::Member(r.meta.map_or(0, |m| m.worker));
    pb::JoinRequest => |r| Access::Member(r.worker);
    pb::HeartbeatRequest => |r| Access::Member(r.worker);
    pb::LeaveRequest => |r| Access::Member(r.worker);
    pb::TakeRangeRequest => |r| Access::Member(r.worker);
    pb::StatsRequest => |_r| Access::Monitor;
    pb::HoldRequest => |_r| Access::Admin;
    pb::CutRequest => |_r| Access::Admin;
    pb::ReleaseRequest => |_r| Access::Admin;
    pb::ListTablesRequest => |_r| Access::Read;
    pb::ScanSparseRequest => |_r| Access::Read;
    pb::DataPlaneRequest => |_r| Access::Read;
}

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct Service(pub Arc<Shard>);

impl Shard {
    /// Admits `req`: one token of its caller's rate bucket
    /// (`limits.requests_per_sec`), then, with auth on, the role check of
    /// the table above. A refusal is RESOURCE_EXHAUSTED, UNAUTHENTICATED or
    /// PERMISSION_DENIED, counted, and nothing else happens.
    ///
    /// The bucket is the principal's with auth on (all its connections
    /// share it), the connection's with auth off (no identities). A
    /// credential not seen before is checked (an Ed25519 signature, about
    /// 50 µs) only while its host has tokens: each failed check takes one of
    /// the host's bucket, so a flood of bad credentials from one host is
    /// refused before it costs the shard a signature check each.
    fn admit<T: Guarded>(&self, req: &Request<T>) -> Result<(), Status> {
        let peer = req.remote_addr().or_else(|| req.extensions().get::<dataplane::Peer>().map(|p| p.addr));
        let Some(authenticator) = &self.auth else {
            // In-process calls have no peer and are not limited.
            let Some(peer) = peer else { return Ok(()) };
            return self.rate.admit(Caller::Connection(peer)).map_err(|e| self.refuse(e));
        };
        let host = peer.map(|p| Caller::Host(p.ip()));
        let who = match authenticator.known_principal_of(req) {
            Ok(Some(who)) => Ok(who),
            Ok(None) => {
                if let Some(h) = host {
                    self.rate.check(h).map_err(|e| self.refuse(e))?;
                }
                authenticator.principal_of(req)
            }
            Err(e) => Err(e),
        };
        let who = who.map_err(|e| {
            if let Some(h) = host {
                // The refusal is UNAUTHENTICATED either way; the token
                // taken bounds the checks the host gets.
                let _ = self.rate.admit(h);
            }
            self.refuse(Error::Auth(e))
        })?;
        if peer.is_some() {
            self.rate.admit(Caller::Principal(who)).map_err(|e| self.refuse(e))?;
        }
        auth::authorize(who, req.get_ref().access()).map_err(|e| self.refuse(Error::Auth(e)))
    }

    /// Counts a refused request and turns it into its status.
    fn refuse(&self, e: impl Into<Error>) -> Status {
        self.store.counters.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Status::from(e.into())
    }

    /// Refuses a clock out of range: at or over `limits.max_clock`, or more
    /// than `limits.max_clock_lead` beyond the highest clock of the set.
    fn check_clock(&self, what: &'static str, clock: u64) -> Result<(), Error> {
        self.limits.check_clock(what, clock, self.clocks.highest())
    }

    /// Clips a push's gradient to `limits.max_gradient` in clip mode
    /// (counted); in refuse mode the store refuses it whole.
    fn clip(&self, grad: &mut Cow<'_, [f32]>) {
        let max = self.limits.max_gradient;
        let huge = |g: &f32| g.is_finite() && g.abs() > max;
        if self.limits.on_huge_gradient != OnHuge::Clip || !grad.iter().any(huge) {
            return;
        }
        let mut clipped = 0;
        for g in grad.to_mut().iter_mut().filter(|g| huge(g)) {
            *g = g.clamp(-max, max);
            clipped += 1;
        }
        self.store.counters.clipped_values.fetch_add(clipped, std::sync::atomic::Ordering::Relaxed);
    }

    /// The push's staleness and, with backup workers, whether it is late
    /// (then the worker's clock jumps to `Timeliness::Late::to` on its tick).
    /// Its clocks are checked first.
    fn before_push(&self, meta: &pb::PushMeta) -> Result<(PushInfo, Timeliness), Status> {
        self.check_clock("push clock", meta.clock).map_err(|e| self.refuse(e))?;
        self.check_clock("push read clock", meta.read_clock).map_err(|e| self.refuse(e))?;
        self.clocks.touch(meta.worker);
        let staleness = self.clocks.staleness(meta.worker, meta.read_clock);
        let timeliness = self.clocks.timeliness(meta.worker, meta.clock);
        let late = match timeliness {
            Timeliness::Late { handling, .. } => Some(handling),
            Timeliness::OnTime => None,
        };
        Ok((
            PushInfo { worker: meta.worker, seq: meta.seq, staleness, read_clock: meta.read_clock, late },
            timeliness,
        ))
    }

    /// Records the staleness of an applied push, then ticks the clock (a
    /// late worker's jumps to where the others are). The answer carries the
    /// worker's clock and whether the push was late.
    fn after_push(
        &self,
        meta: &pb::PushMeta,
        (info, timeliness): (PushInfo, Timeliness),
        out: crate::store::PushOutcome,
    ) -> pb::PushResponse {
        use std::sync::atomic::Ordering::Relaxed;
        let mut answer =
            pb::PushResponse { applied: out.applied, duplicate: out.duplicate, clock: 0, late: false };
        if out.duplicate {
            answer.clock = self.clocks.clock_of(meta.worker).unwrap_or(0);
            return answer;
        }
        self.clocks.record_staleness(info.staleness);
        let to = match timeliness {
            Timeliness::Late { to, handling } => {
                answer.late = true;
                match handling {
                    ps_common::spec::LateGradients::Drop => self.clocks.late_dropped.fetch_add(1, Relaxed),
                    ps_common::spec::LateGradients::Weight => self.clocks.late_weighted.fetch_add(1, Relaxed),
                };
                to.max(meta.clock + 1)
            }
            Timeliness::OnTime => meta.clock + 1,
        };
        if meta.tick {
            answer.clock = self.clocks.tick_to(meta.worker, to).unwrap_or(0);
        }
        answer
    }

    /// Every member's clock and last applied seq.
    fn clock_table(&self) -> Vec<pb::WorkerCut> {
        let members = self.clocks.capture().members;
        (members.into_iter())
            .map(|(worker, clock, _)| pb::WorkerCut { worker, clock, last_seq: self.store.last_seq(worker) })
            .collect()
    }

    /// The folder of checkpoint `name` in this shard's checkpoint dir.
    fn checkpoint_folder(&self, name: &str) -> Result<PathBuf, Error> {
        checkpoint::check_name(name)?;
        let root = self.checkpoint_dir.as_ref().ok_or(Error::NoCheckpointDir)?;
        Ok(root.join(name))
    }

    /// The push codec of table `name` (f32 for a table this shard does not
    /// know: the store refuses the push anyway, naming it).
    fn push_kind(&self, name: &str) -> CodecKind {
        self.store.codecs(name).map_or(CodecKind::F32, |c| c.push.kind())
    }

    /// Decodes the gradient of chunk `c` of a dense push, sent as `kind` (its
    /// table's push codec). An f32 gradient is decoded as it comes and its
    /// length checked by the store (naming the chunk); a compressed one is
    /// decoded to the chunk's length, which the store knows.
    /// An f32 gradient that lies 4-byte aligned (as the data plane lays a
    /// push out) is used where it lies, on a little-endian machine.
    fn dense_gradient<'a>(&self, c: &'a pb::DenseChunk, kind: CodecKind) -> Result<Cow<'a, [f32]>, Error> {
        if kind == CodecKind::F32 {
            return Ok(codec::f32s("gradient", &c.values)?);
        }
        let (_, len) = self.store.dense_wire(&c.tensor, c.index)?;
        Ok(Cow::Owned(compress::decode(kind, "gradient", &c.values, len, len)?))
    }

    /// Decodes the gradient of a sparse push of `keys` rows, sent as `kind`
    /// (int8: one scale per row).
    fn sparse_gradient<'a>(
        &self,
        table: &str,
        grads: &'a [u8],
        keys: usize,
        kind: CodecKind,
    ) -> Result<Cow<'a, [f32]>, Error> {
        if kind == CodecKind::F32 {
            return Ok(codec::f32s("gradient", grads)?);
        }
        let (_, dim) = self.store.sparse_wire(table)?;
        let n = keys.checked_mul(dim);
        self.store.check_push_size(n)?;
        Ok(Cow::Owned(compress::decode(kind, "gradient", grads, n.unwrap_or(0), dim)?))
    }

    async fn before_read(&self, meta: Option<&pb::ReadMeta>) -> Result<(), Error> {
        if let Some(m) = meta {
            self.check_clock("read clock", m.clock)?;
            self.clocks.touch(m.worker);
            let started = std::time::Instant::now();
            self.clocks.wait_read(m.worker, m.clock, self.max_wait).await?;
            self.metrics.read_wait.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// Floats a request's store call touches from which it leaves its runtime
/// thread to the thread's other tasks ([`heavy`]): milliseconds of work (a
/// sparse row costs 40 to 90 ns, a dense float 1 to 3 ns). Below it the
/// hand-off costs more than it saves: a dense push of 1M floats on
/// loopback TCP took 2.5 to 2.9 ms with it, 1.9 to 2.3 ms without (bench
/// --only transport, alternated).
const HEAVY_FLOATS: usize = 1 << 22;

/// Runs `work`, a store call touching `floats` floats. One that holds its
/// runtime thread for milliseconds runs in `block_in_place`, which hands
/// the thread's queue to another thread meanwhile. Without it, a task woken
/// while the call runs (another connection's request, when a client
/// writes to several shards of one process) may wait for the call's end in
/// the thread's LIFO slot, which no other thread steals: two shards'
/// halves of a large push ran one after the other instead of together
/// (docs/PERFORMANCE.md, nineteenth session). A current-thread runtime
/// (tests) has no other thread, and the call runs as it is.
fn heavy<T>(floats: usize, work: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if floats >= HEAVY_FLOATS && multi { tokio::task::block_in_place(work) } else { work() }
}

/// A push's codec fingerprint (`PushMeta.codecs`) must be that of its
/// blocks' tables' push codecs: a worker that encodes otherwise is refused
/// before anything is decoded.
fn check_push_codecs(meta: &pb::PushMeta, blocks: &[(&str, CodecKind)]) -> Result<(), Error> {
    if meta.codecs == compress::codecs_tag(blocks.iter().map(|b| b.1)) {
        return Ok(());
    }
    let mut lossy: Vec<String> =
        blocks.iter().filter(|b| b.1 != CodecKind::F32).map(|(t, k)| format!("`{t}` {k}")).collect();
    lossy.dedup();
    let expected = if lossy.is_empty() { "all f32".to_string() } else { lossy.join(", ") };
    let got = if meta.codecs == 0 { "f32".to_string() } else { format!("fingerprint {:#x}", meta.codecs) };
    Err(ps_common::Error::CodecMismatch { expected, got }.into())
}

#[tonic::async_trait]
impl ParameterServer for Service {
    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard()))]
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let table = req.table.ok_or(ps_common::Error::MissingField("table")).map_err(|e| self.0.refuse(e))?;
        let spec = TableSpec::try_from(table).map_err(|e| self.0.refuse(e))?;
        let name = spec.name.clone();
        let created = self.0.store.register(spec, req.num_shards).map_err(|e| self.0.refuse(e))?;
        if created {
            tracing::info!(table = %name, "table registered");
        }
        Ok(Response::new(pb::RegisterResponse { created }))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), chunks = req.get_ref().chunks.len()))]
    async fn pull_dense(
        &self,
        req: Request<pb::PullDenseRequest>,
    ) -> Result<Response<pb::PullDenseResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        self.0.before_read(req.meta.as_ref()).await.map_err(|e| self.0.refuse(e))?;
        let ids: Vec<(&str, u32)> = req.chunks.iter().map(|c| (c.tensor.as_str(), c.index)).collect();
        let mut values = Vec::with_capacity(ids.len());
        let compressed = req.meta.is_some_and(|m| m.compressed);
        // Each chunk in its table's pull codec (f32 unless asked).
        let codecs: Vec<_> = if compressed {
            ids.iter().map(|(t, _)| self.0.store.codecs(t).map_or(compress::Codec::F32, |c| c.pull)).collect()
        } else {
            Vec::new()
        };
        // A training member's read is kept for delay compensation.
        let reader =
            req.meta.filter(|m| self.0.clocks.clock_of(m.worker).is_some()).map(|m| (m.worker, m.clock));
        // Uncompressed, an answer holds each block's values themselves (no
        // copy; the block's next update copies them while it is held);
        // compressed, they are encoded straight from the block, under its lock.
        (self.0.store)
            .pull_dense_as(reader, &ids, |v| {
                let codec = codecs.get(values.len()).copied().unwrap_or_default();
                values.push(match codec {
                    Codec::F32 => codec::shared_f32_bytes(v),
                    _ => {
                        let mut out = Vec::new();
                        compress::encode(codec, v, v.len(), 0, &mut out);
                        out.into()
                    }
                });
            })
            .map_err(|e| self.0.refuse(e))?;
        let chunks = req
            .chunks
            .into_iter()
            .zip(values)
            .map(|(c, values)| pb::DenseChunk { tensor: c.tensor, index: c.index, values })
            .collect();
        let codecs = codecs.iter().map(|c| c.kind().to_wire()).collect();
        Ok(Response::new(pb::PullDenseResponse { chunks, codecs }))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), chunks = req.get_ref().chunks.len()))]
    async fn push_dense(
        &self,
        req: Request<pb::PushDenseRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let meta = req.meta.unwrap_or_default();
        let _admitted = self.0.gate.enter(meta.worker, meta.clock).await;
        let info = self.0.before_push(&meta)?;
        let kinds: Vec<(&str, CodecKind)> =
            req.chunks.iter().map(|c| (c.tensor.as_str(), self.0.push_kind(&c.tensor))).collect();
        check_push_codecs(&meta, &kinds).map_err(|e| self.0.refuse(e))?;
        let mut grads = (req.chunks.iter().zip(&kinds).map(|(c, &(_, kind))| self.0.dense_gradient(c, kind)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.0.refuse(e))?;
        grads.iter_mut().for_each(|g| self.0.clip(g));
        let chunks: Vec<(&str, u32, &[f32])> =
            req.chunks.iter().zip(&grads).map(|(c, g)| (c.tensor.as_str(), c.index, &g[..])).collect();
        let floats = grads.iter().map(|g| g.len()).sum();
        let out = heavy(floats, || self.0.store.push_dense(&chunks, info.0)).map_err(|e| self.0.refuse(e))?;
        Ok(Response::new(self.0.after_push(&meta, info, out)))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), table = %req.get_ref().table))]
    async fn pull_sparse(
        &self,
        req: Request<pb::PullSparseRequest>,
    ) -> Result<Response<pb::PullSparseResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        self.0.before_read(req.meta.as_ref()).await.map_err(|e| self.0.refuse(e))?;
        // An answer over the limit is refused before the keys are copied.
        let dim =
            self.0.store.check_sparse_pull(&req.table, req.keys.len() / 8).map_err(|e| self.0.refuse(e))?;
        let keys = codec::decode_u64("keys", &req.keys).map_err(|e| self.0.refuse(e))?;
        let compressed = req.meta.is_some_and(|m| m.compressed);
        let codec = match self.0.store.codecs(&req.table) {
            Some(c) if compressed => c.pull,
            _ => compress::Codec::F32,
        };
        // Rows arrive stripe by stripe; each is encoded into its place in
        // request order (f32, fp16 and bf16 rows have a fixed width). The
        // answer is allocated at the first row, after the store has checked
        // the pull's size.
        let (mut values, mut scratch) = (Vec::new(), Vec::new());
        let n = keys.len();
        let floats = n.saturating_mul(dim);
        let dim = heavy(floats, || {
            self.0.store.pull_sparse(&req.table, &keys, req.read_only, |i, row| {
                let width = compress::encoded_len(codec.kind(), row.len(), row.len()).unwrap_or(0);
                if values.is_empty() {
                    values = vec![0u8; n * width];
                }
                let out = &mut values[i * width..(i + 1) * width];
                if codec == compress::Codec::F32 {
                    for (b, v) in out.chunks_exact_mut(4).zip(row) {
                        b.copy_from_slice(&v.to_le_bytes());
                    }
                } else {
                    scratch.clear();
                    compress::encode(codec, row, row.len(), 0, &mut scratch);
                    out.copy_from_slice(&scratch);
                }
            })
        })
        .map_err(|e| self.0.refuse(e))?;
        let codec = codec.kind().to_wire();
        Ok(Response::new(pb::PullSparseResponse { values: values.into(), dim: dim as u32, codec }))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), table = %req.get_ref().table))]
    async fn push_sparse(
        &self,
        req: Request<pb::PushSparseRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let meta = req.meta.unwrap_or_default();
        let _admitted = self.0.gate.enter(meta.worker, meta.clock).await;
        let info = self.0.before_push(&meta)?;
        let keys = codec::decode_u64("keys", &req.keys).map_err(|e| self.0.refuse(e))?;
        let kind = self.0.push_kind(&req.table);
        check_push_codecs(&meta, &[(&req.table, kind)]).map_err(|e| self.0.refuse(e))?;
        let mut grads =
            self.0.sparse_gradient(&req.table, &req.grads, keys.len(), kind).map_err(|e| self.0.refuse(e))?;
        self.0.clip(&mut grads);
        let out = heavy(grads.len(), || self.0.store.push_sparse(&req.table, &keys, &grads, info.0))
            .map_err(|e| self.0.refuse(e))?;
        Ok(Response::new(self.0.after_push(&meta, info, out)))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let model = match req.consistency {
            Some(c) => Consistency::try_from(c).map_err(|e| self.0.refuse(e))?,
            None => Consistency::Asp,
        };
        let lease = Duration::from_millis(u64::from(req.lease_ms.clamp(100, 3_600_000)));
        self.0.check_clock("join clock", req.clock).map_err(|e| self.0.refuse(e))?;
        let backup =
            Backup::from_wire(req.backup_workers, req.late_gradients).map_err(|e| self.0.refuse(e))?;
        let clock = (self.0.clocks)
            .rejoin_with(req.worker, model, backup, lease, req.clock)
            .map_err(|e| self.0.refuse(e))?;
        tracing::info!(worker = req.worker, %model, backup_workers = backup.workers, clock, "worker joined");
        Ok(Response::new(pb::JoinResponse { last_seq: self.0.store.last_seq(req.worker), clock }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.0.admit(&req)?;
        self.0.clocks.touch(req.into_inner().worker);
        let members = self.0.clocks.status();
        Ok(Response::new(pb::HeartbeatResponse {
            members: members.len().min(u32::MAX as usize) as u32,
            // The highest clock any worker has had, not the members' now: a
            // fast worker may finish its share and leave before a slow one
            // polls, and the slow one must still see the barrier released.
            started: self.0.clocks.highest() > 0,
        }))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        self.0.admit(&req)?;
        let worker = req.into_inner().worker;
        self.0.clocks.leave(worker);
        self.0.store.forget_reads(worker);
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        self.0.admit(&req)?;
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0.store;
        let c = &s.counters;
        let (tables, dense_chunks, sparse_rows) = s.sizes();
        let clocks = self
            .0
            .clocks
            .status()
            .into_iter()
            .map(|m| pb::WorkerClock {
                worker: m.worker,
                clock: m.clock,
                waiting: m.waiting_for.is_some(),
                waiting_for_clock: m.waiting_for.unwrap_or(0),
                blocked_on: m.blocked_on,
                alive: true,
            })
            .collect();
        Ok(Response::new(pb::StatsResponse {
            shard: s.shard(),
            num_shards: s.num_shards(),
            pulls: c.pulls.load(Relaxed),
            pushes: c.pushes.load(Relaxed),
            duplicate_pushes: c.duplicate_pushes.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            values_pulled: c.values_pulled.load(Relaxed),
            values_pushed: c.values_pushed.load(Relaxed),
            tables,
            dense_chunks,
            sparse_rows,
            staleness_histogram: self.0.clocks.histogram(),
            clocks,
            consistency: self.0.clocks.model().map(Into::into),
            wait_micros: self.0.clocks.wait_micros(),
            late_dropped: self.0.clocks.late_dropped.load(Relaxed),
            nonfinite_updates: c.nonfinite_updates.load(Relaxed),
            clipped_values: c.clipped_values.load(Relaxed),
            budget_used_bytes: s.budget.used(),
            budget_limit_bytes: s.budget.limit(),
            over_budget: s.budget.refused.load(Relaxed),
            rate_limited: self.0.rate.limited.load(Relaxed),
            late_weighted: self.0.clocks.late_weighted.load(Relaxed),
            backup_workers: self.0.clocks.backup().workers,
            data_queue: self.0.queue.stats().map(|q| pb::DataQueueStats {
                completed: q.completed,
                total: q.total,
                reassigned: q.reassigned,
            }),
        }))
    }

    async fn hold(&self, req: Request<pb::HoldRequest>) -> Result<Response<pb::HoldResponse>, Status> {
        self.0.admit(&req)?;
        let timeout = Duration::from_millis(u64::from(req.into_inner().timeout_ms.clamp(1, 60_000)));
        self.0.gate.hold(timeout).await.map_err(|e| self.0.refuse(e))?;
        Ok(Response::new(pb::HoldResponse {
            shard: self.0.store.shard(),
            num_shards: self.0.store.num_shards(),
            workers: self.0.clock_table(),
        }))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), checkpoint = %req.get_ref().checkpoint))]
    async fn cut(&self, req: Request<pb::CutRequest>) -> Result<Response<pb::CutResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let shard = &self.0;
        let dir = shard.checkpoint_folder(&req.checkpoint).map_err(|e| shard.refuse(e))?;
        let limits: HashMap<u64, u64> = req.limits.iter().map(|w| (w.worker, w.clock)).collect();
        let reached = |(w, limit): (&u64, &u64)| shard.clocks.clock_of(*w).is_none_or(|c| c >= *limit);
        let timeout = Duration::from_millis(u64::from(req.timeout_ms.clamp(1, 600_000)));
        let since = (shard.gate.drain(limits.clone(), timeout, || limits.iter().all(reached)).await)
            .map_err(|e| shard.refuse(e))?;
        let file = ShardFile {
            checkpoint: req.checkpoint,
            shard: shard.store.shard(),
            num_shards: shard.store.num_shards(),
            clocks: shard.clocks.capture(),
            store: shard.store.capture(),
        };
        let workers = shard.clock_table();
        shard.gate.open();
        let held = since.elapsed();
        let keys = shard.seal.clone();
        let entry = tokio::task::spawn_blocking(move || checkpoint::write_shard(&dir, &file, &keys))
            .await
            .map_err(|e| Status::internal(format!("checkpoint writer: {e}")))?
            .map_err(|e| shard.refuse(e))?;
        shard.metrics.checkpoint_written(entry.bytes, held);
        tracing::info!(
            bytes = entry.bytes,
            held_ms = held.as_secs_f64() * 1e3,
            write_ms = entry.write_ms,
            "cut written"
        );
        Ok(Response::new(pb::CutResponse {
            shard: shard.store.shard(),
            file: entry.file,
            bytes: entry.bytes,
            sha256: entry.sha256,
            workers,
            held_micros: held.as_micros() as u64,
            write_micros: (entry.write_ms * 1e3) as u64,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.0.admit(&req)?;
        self.0.gate.open();
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn list_tables(
        &self,
        req: Request<pb::ListTablesRequest>,
    ) -> Result<Response<pb::ListTablesResponse>, Status> {
        self.0.admit(&req)?;
        let s = &self.0.store;
        let tables = s.specs().iter().map(pb::TableSpec::from).collect();
        Ok(Response::new(pb::ListTablesResponse { tables, num_shards: s.num_shards() }))
    }

    #[tracing::instrument(skip_all, fields(shard = self.0.store.shard(), table = %req.get_ref().table))]
    async fn scan_sparse(
        &self,
        req: Request<pb::ScanSparseRequest>,
    ) -> Result<Response<pb::ScanSparseResponse>, Status> {
        self.0.admit(&req)?;
        let req = req.into_inner();
        let after = (!req.from_start).then_some(req.start_after);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let (dim, done) = (self.0.store)
            .scan_sparse(&req.table, after, req.limit as usize, |k, row| {
                keys.push(k);
                codec::append_f32(&mut values, row);
            })
            .map_err(|e| self.0.refuse(e))?;
        Ok(Response::new(pb::ScanSparseResponse {
            keys: codec::encode_u64(&keys),
            values: values.into(),
            dim: dim as u32,
            done,
        }))
    }

    async fn take_range(
        &self,
        req: Request<pb::TakeRangeRequest>,
    ) -> Result<Response<pb::TakeRangeResponse>, Status> {
        self.0.admit(&req)?;
        use crate::queue::{Plan, Range};
        let req = req.into_inner();
        let p = req.plan.ok_or(ps_common::Error::MissingField("plan")).map_err(|e| self.0.refuse(e))?;
        let plan =
            Plan { epochs: p.epochs, batches_per_epoch: p.batches_per_epoch, range_batches: p.range_batches };
        let done: Vec<Range> =
            req.done.iter().map(|r| Range { epoch: r.epoch, start: r.start, end: r.end }).collect();
        let lease = Duration::from_millis(u64::from(req.lease_ms.clamp(100, 3_600_000)));
        let clocks = &self.0.clocks;
        let answer = (self.0.queue)
            .take(req.worker, plan, &done, lease, tokio::time::Instant::now(), |w| {
                clocks.clock_of(w).is_some()
            })
            .map_err(|e| self.0.refuse(e))?;
        Ok(Response::new(pb::TakeRangeResponse {
            range: answer.range.map(|r| pb::DataRange { epoch: r.epoch, start: r.start, end: r.end }),
            finished: answer.finished,
            completed: answer.completed,
            total: answer.total,
        }))
    }

    async fn data_plane(
        &self,
        req: Request<pb::DataPlaneRequest>,
    ) -> Result<Response<pb::DataPlaneResponse>, Status> {
        self.0.admit(&req)?;
        let port = self.0.data_port.load(std::sync::atomic::Ordering::Relaxed);
        let socket = self.0.data_socket.get().cloned().unwrap_or_default();
        Ok(Response::new(pb::DataPlaneResponse { port: u32::from(port), socket }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task woken while a large store call runs is run by another thread
    /// meanwhile: here the call itself waits for it. Woken from a runtime
    /// thread, the task goes into that thread's LIFO slot, which no other
    /// thread steals, so without `block_in_place` it would run only after
    /// the call (and the call would wait out its 10 s for nothing).
    #[test]
    fn a_task_woken_during_a_heavy_call_runs_meanwhile() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
        let ran = rt.block_on(async {
            tokio::spawn(async {
                let (wake, woken) = tokio::sync::oneshot::channel::<()>();
                let (done, seen) = std::sync::mpsc::channel();
                let waiter = tokio::spawn(async move {
                    if woken.await.is_ok() {
                        let _ = done.send(());
                    }
                });
                // Let the waiter park on its channel before it is woken.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = wake.send(());
                let ran = heavy(HEAVY_FLOATS, || seen.recv_timeout(Duration::from_secs(10)).is_ok());
                waiter.await.unwrap();
                ran
            })
            .await
            .unwrap()
        });
        assert!(ran, "the woken task waited for the call's end");
        // Small calls, and calls outside a multi-thread runtime, run as they are.
        assert_eq!(heavy(HEAVY_FLOATS - 1, || 7), 7);
        assert_eq!(heavy(HEAVY_FLOATS, || 8), 8);
    }
}
