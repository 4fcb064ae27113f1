//! Properties of the push path and of consistency control, checked with
//! proptest against real in-process gRPC shards on loopback.
//!
//! # The semantics under test
//!
//! - **Validation before application.** A push is validated in full (every
//!   chunk or row) before any of it is applied; a rejected push changes
//!   nothing and does not consume its seq. Application is atomic per block (a
//!   dense chunk or a sparse row): a concurrent pull may see some blocks of a
//!   push applied and others not, and there is no atomicity across shards.
//! - **Exactly once.** A push with `PushMeta { worker, seq > 0 }` is applied
//!   at most once per (worker, shard): the shard remembers the last applied
//!   seq of each worker, and a push with `seq <= last` is acknowledged with
//!   `duplicate = true` and not applied. Seq 0 means unsequenced (always
//!   applied). The per-worker lock spans the check and the apply, so a
//!   duplicate racing its original waits and is recognised.
//! - **SSP.** A read at clock `c` under bound `s` (BSP: `s = 0`) includes every
//!   update from iterations `<= c - s - 1` of every worker, and none from
//!   iterations `>= c + s + 1`. It may or may not include iterations in
//!   between: under BSP a read at `c` may already see another worker's
//!   iteration `c`, which that worker pushed after its own read at `c`.
//!
//! # The properties
//!
//! 1. [`linearity`]: concurrent dense and sparse pushes from several clients
//!    under plain SGD leave every parameter at `init - lr * sum(grads)`.
//! 2. [`exactly_once`]: pushes duplicated by the "transport" (copies sent
//!    again, concurrently, late, or after a timed-out attempt) are applied
//!    once per (worker, seq); a rejected push frees its seq for a valid one;
//!    the `pushes`, `duplicate_pushes` and `rejected` counters agree.
//! 3. [`atomicity`]: a push with one bad block among good ones changes
//!    nothing on its shard; the good blocks alone, same seq, then apply.
//! 4. [`partitioning`]: whatever the shapes, chunk lengths and shard count,
//!    the client's routing and the servers' ownership agree: every element and
//!    row lands exactly once, in the right place, on the shard that owns it.
//! 5. [`ssp_reads`]: random schedules of 2-4 workers under SSP/BSP; every read
//!    includes exactly what the bound requires (see above), and no shard's
//!    staleness histogram has a bucket above the bound.
//!
//! Round trips of the wire conversions and codecs are unit-tested next to the
//! code (`ps-common/src/wire.rs`, `ps-common/src/codec.rs`), not here. The
//! precise gRPC codes of rejected requests are in `service.rs`.
//!
//! # Case counts
//!
//! Each property runs a small default number of cases, so that the whole
//! module stays within a few seconds on two cores. For a longer (nightly)
//! run, either set `PROPTEST_CASES=n` (every property runs `n` cases) or
//! `PS_PROPTEST_SCALE=k` (every property runs `k` times its default). An
//! explicit `ProptestConfig::with_cases` would ignore `PROPTEST_CASES`, hence
//! [`cases`]. Failures are recorded in `tests/proptest-regressions/properties.txt`
//! and replayed first on every run.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::FutureExt;
use futures::future::join_all;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use ps_common::codec;
use ps_common::optim::Rule;
use ps_common::partition::{self, chunk_shard, key_shard};
use ps_common::spec::{Consistency, Init, InitKind, Layout, TableSpec};
use ps_common::wire::pb;
use ps_server::ServerConfig;
use ps_server::local::LocalShards;
use ps_worker::client::{DenseSet, ShardedClient};
use tonic::Code;

use crate::util::{RawClient, raw_client, sharded_client};

// ------------------------------------------------------------------ harness

/// The number of cases of a property whose default is `default`: see the
/// module docs.
fn cases(default: u32) -> u32 {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    match var("PROPTEST_CASES") {
        Some(n) => n,
        None => default.saturating_mul(var("PS_PROPTEST_SCALE").unwrap_or(1).max(1)),
    }
}

fn config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig { cases: cases(default_cases), ..ProptestConfig::default() };
    // Each case starts servers: keep shrinking bounded unless asked otherwise.
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 512;
    }
    config
}

/// A case that hangs fails instead: after this long, or if it panics.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// The runtime the cases run on, shared by all cases and properties (until
/// one hangs: see [`run`]).
static RUNTIME: Mutex<Option<Arc<tokio::runtime::Runtime>>> = Mutex::new(None);

fn runtime() -> Arc<tokio::runtime::Runtime> {
    let mut rt = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(rt.get_or_insert_with(|| {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        )
    }))
}

/// Runs one case. The case runs on the runtime's threads while this (the test)
/// thread keeps the time: a deadlock on a blocking lock in the server parks
/// every runtime thread, and then no tokio timer fires, so an in-runtime
/// timeout would never end the case. A hung runtime is leaked (its threads
/// are stuck) and later cases get a fresh one.
fn run(case: impl Future<Output = Result<()>> + Send + 'static) -> Result<(), TestCaseError> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let outcome = std::panic::AssertUnwindSafe(case).catch_unwind().await;
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(r)) => r.map_err(|e| TestCaseError::fail(format!("{e:#}"))),
        Ok(Err(panic)) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            Err(TestCaseError::fail(format!("case panicked: {msg}")))
        }
        Err(_) => {
            std::mem::forget(RUNTIME.lock().unwrap_or_else(PoisonError::into_inner).take());
            Err(TestCaseError::fail(format!("case hung for {CASE_TIMEOUT:?} (deadlock?)")))
        }
    }
}

/// Runs `fut`, failing with `what` if it takes longer than `secs` seconds: a
/// hang is reported with where it happened.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{what} did not finish within {secs} s"),
    }
}

/// Stops the shards, failing instead of hanging if a connection lingers.
async fn stop(shards: LocalShards) -> Result<()> {
    within(10, "graceful shutdown of the shards", async { shards.stop().await.context("stop shards") }).await
}

fn dense_spec(name: &str, shape: &[u64], chunk_len: u32, init: Init, rule: Rule) -> TableSpec {
    let mut t = TableSpec::dense(name, shape, init, rule.into());
    t.layout = Layout::Dense { shape: shape.to_vec(), chunk_len };
    t
}

async fn pull_set(c: &ShardedClient, set: &DenseSet) -> Result<Vec<f32>> {
    let mut out = vec![0.0; set.len()];
    c.pull_dense(set, 0, &mut out).await.context("pull dense")?;
    Ok(out)
}

async fn pull_rows(c: &ShardedClient, table: &str, dim: usize, keys: &[u64]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; keys.len() * dim];
    c.pull_sparse(table, dim, keys, 0, &mut out).await.context("pull sparse")?;
    Ok(out)
}

/// `v` truncated or zero-padded to `n` values: gradients are generated at a
/// maximum length and fitted to the block, so they shrink independently of
/// the shapes.
fn fit(v: &[f32], n: usize) -> Vec<f32> {
    (0..n).map(|i| v.get(i).copied().unwrap_or(0.0)).collect()
}

// ------------------------------------------------------------------ 1. linearity

/// Sparse keys of the linearity case are drawn from `0..KEY_SPACE`, so
/// batches repeat keys (merged by the client) and clients share rows.
const KEY_SPACE: u64 = 12;
const MAX_DENSE_LEN: usize = 24;
const MAX_BATCH: usize = 6;
const MAX_DIM: usize = 3;

#[derive(Clone)]
enum Op {
    /// A push of `grad` (fitted) to dense tensor `tensor` (0 or 1).
    Dense { tensor: usize, grad: Vec<f32> },
    /// A push of row gradients (fitted to `keys.len() * dim`) for `keys`.
    Sparse { keys: Vec<u64>, grads: Vec<f32> },
}

/// One line per push, even in proptest's pretty-printed failure report.
impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Dense { tensor, grad } => write!(f, "Dense {{ tensor: {tensor}, grad: {grad:?} }}"),
            Op::Sparse { keys, grads } => write!(f, "Sparse {{ keys: {keys:?}, grads: {grads:?} }}"),
        }
    }
}

#[derive(Debug, Clone)]
struct LinearityCase {
    shards: u32,
    lr: f32,
    seed: u64,
    /// (length, chunk_len) of two dense tensors.
    dense: [(usize, u32); 2],
    dim: usize,
    /// One list of pushes per client; clients run concurrently.
    clients: Vec<Vec<Op>>,
}

fn grad_value() -> impl Strategy<Value = f32> {
    prop_oneof![4 => -4.0f32..4.0, 1 => -1e-3f32..1e-3, 1 => Just(0.0)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize, vec(grad_value(), 0..=MAX_DENSE_LEN))
            .prop_map(|(tensor, grad)| Op::Dense { tensor, grad }),
        (vec(0..KEY_SPACE, 1..=MAX_BATCH), vec(grad_value(), 0..=MAX_BATCH * MAX_DIM))
            .prop_map(|(keys, grads)| Op::Sparse { keys, grads }),
    ]
}

fn linearity_case() -> impl Strategy<Value = LinearityCase> {
    let tensor = (1..=MAX_DENSE_LEN, 1..=5u32);
    (
        1..=3u32,
        0.01f32..1.0,
        any::<u64>(),
        [tensor.clone(), tensor],
        1..=MAX_DIM,
        vec(vec(op(), 1..=6), 1..=4),
    )
        .prop_map(|(shards, lr, seed, dense, dim, clients)| LinearityCase {
            shards,
            lr,
            seed,
            dense,
            dim,
            clients,
        })
}

/// A sum of terms in f64, and what it takes to bound the f32 error of
/// computing it on the server.
#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    sum: f64,
    abs: f64,
    terms: u32,
}

impl Acc {
    fn add(&mut self, g: f32) {
        self.sum += f64::from(g);
        self.abs += f64::from(g).abs();
        self.terms += 1;
    }

    /// Checks `got` against `init - lr * sum`. The server computes
    /// `p <- p - lr * g` in f32 once per push, and the client first sums the
    /// gradients of repeated keys in f32: per term at most three roundings
    /// (merge, product, difference), each of at most `eps / 2` times a
    /// partial result no larger than `S = |init| + lr * sum |g|`. So the error
    /// is below `1.5 * terms * eps * S`; we allow `2 * (terms + 1) * eps * S`.
    /// The bound is tight enough that one dropped or repeated non-tiny push is
    /// far outside it.
    fn check(&self, what: &str, init: f32, lr: f32, got: f32) -> Result<()> {
        let (init, lr) = (f64::from(init), f64::from(lr));
        let want = init - lr * self.sum;
        let tol = 2.0 * f64::from(self.terms + 1) * f64::from(f32::EPSILON) * (init.abs() + lr * self.abs);
        ensure!(
            (f64::from(got) - want).abs() <= tol,
            "{what}: got {got}, want {want} ± {tol:.3e} (init {init}, lr {lr}, {} terms summing to {})",
            self.terms,
            self.sum
        );
        Ok(())
    }
}

async fn check_linearity(case: LinearityCase) -> Result<()> {
    let shards = LocalShards::start(case.shards).await.expect("start shards");
    let init = Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: case.seed };
    let rule = Rule::sgd(case.lr);
    let specs: Vec<TableSpec> = case
        .dense
        .iter()
        .enumerate()
        .map(|(i, &(len, chunk_len))| dense_spec(&format!("d{i}"), &[len as u64], chunk_len, init, rule))
        .collect();
    let sparse = TableSpec::sparse("e", case.dim as u32, init, rule.into());
    let admin = sharded_client(&shards, 0).await;
    for spec in specs.iter().chain([&sparse]) {
        admin.register(spec).await?;
    }
    let sets: Vec<DenseSet> = specs
        .iter()
        .map(|s| DenseSet::new(std::slice::from_ref(s), case.shards))
        .collect::<Result<_, _>>()?;
    let keys: Vec<u64> = (0..KEY_SPACE).collect();
    let dim = case.dim;
    // Initial values are a pure function of (seed, table, chunk or key);
    // computing them here rather than pulling them leaves the rows to be
    // created by the pushes themselves, concurrently.
    let init_dense: Vec<Vec<f32>> = specs
        .iter()
        .map(|spec| {
            let Layout::Dense { shape, chunk_len } = &spec.layout else { unreachable!("dense") };
            let (len, chunk_len) = (shape[0] as usize, *chunk_len as usize);
            let mut v = vec![0.0; len];
            for i in 0..partition::num_chunks(len, chunk_len) {
                init.fill(&spec.name, i as u64, &mut v[partition::chunk_range(len, chunk_len, i)]);
            }
            v
        })
        .collect();
    let mut init_rows = vec![0.0; keys.len() * dim];
    for (&k, row) in keys.iter().zip(init_rows.chunks_mut(dim)) {
        init.fill("e", k, row);
    }

    // The f64 reference, and every client's pushes, fitted to the shapes.
    let mut dense_ref: Vec<Vec<Acc>> = sets.iter().map(|s| vec![Acc::default(); s.len()]).collect();
    let mut rows_ref = vec![Acc::default(); keys.len() * dim];
    let mut plans = Vec::new();
    for ops in &case.clients {
        let mut plan = Vec::new();
        for op in ops {
            match op {
                Op::Dense { tensor, grad } => {
                    let g = fit(grad, sets[*tensor].len());
                    for (acc, &v) in dense_ref[*tensor].iter_mut().zip(&g) {
                        acc.add(v);
                    }
                    plan.push(Op::Dense { tensor: *tensor, grad: g });
                }
                Op::Sparse { keys: ks, grads } => {
                    let g = fit(grads, ks.len() * dim);
                    for (&k, row) in ks.iter().zip(g.chunks(dim)) {
                        for (d, &v) in row.iter().enumerate() {
                            rows_ref[k as usize * dim + d].add(v);
                        }
                    }
                    plan.push(Op::Sparse { keys: ks.clone(), grads: g });
                }
            }
        }
        plans.push(plan);
    }

    // All clients connect first, then push at once.
    let mut clients = Vec::new();
    for w in 0..plans.len() {
        clients.push(sharded_client(&shards, w as u64 + 1).await);
    }
    let tasks = clients.into_iter().zip(plans).map(|(mut c, plan)| {
        let sets = sets.clone();
        tokio::spawn(async move {
            for op in plan {
                match op {
                    Op::Dense { tensor, grad } => c.push_dense(&sets[tensor], &grad, 0, 0, false).await?,
                    Op::Sparse { keys, grads } => c.push_sparse("e", dim, &keys, &grads, 0, 0, false).await?,
                }
            }
            Ok::<_, ps_worker::Error>(())
        })
    });
    for r in join_all(tasks).await {
        r.context("client task panicked")?.context("push")?;
    }

    for (t, set) in sets.iter().enumerate() {
        let got = pull_set(&admin, set).await?;
        for (e, acc) in dense_ref[t].iter().enumerate() {
            acc.check(&format!("d{t}[{e}]"), init_dense[t][e], case.lr, got[e])?;
        }
    }
    let got = pull_rows(&admin, "e", dim, &keys).await?;
    for (i, acc) in rows_ref.iter().enumerate() {
        acc.check(&format!("e[{}][{}]", i / dim, i % dim), init_rows[i], case.lr, got[i])?;
    }
    drop(admin);
    stop(shards).await
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn linearity(case in linearity_case()) {
        run(check_linearity(case))?;
    }
}

// ------------------------------------------------------------------ 2. exactly once

/// The exactly-once case's tables: dense `d` (12 elements, chunks of 3) and
/// sparse `s` (rows of 2), SGD with lr 1 from zeros, and small integer
/// gradients, so every sum is exact and values are compared exactly.
const EO_LEN: usize = 12;
const EO_CHUNK: usize = 3;
const EO_DIM: usize = 2;
/// Keys per shard a sparse push chooses from.
const EO_POOL: usize = 6;

#[derive(Debug, Clone)]
struct PushPlan {
    /// Target shard (mod the shard count).
    shard: u32,
    dense: bool,
    /// Which of the shard's chunks (or pool keys) the push touches; at least
    /// the first.
    mask: u8,
    grads: Vec<i8>,
    /// The first copies carry a NaN and are rejected; then the valid push is
    /// sent with the same seq.
    bad: bool,
    /// Copies of the valid push sent and awaited (and of the bad one).
    copies: usize,
    /// The first two copies are sent at once.
    concurrent: bool,
    /// Before the copies, one attempt with a deadline of this many
    /// microseconds whose answer is dropped: it may or may not be applied,
    /// before or after its retries.
    lost_after_us: Option<u16>,
    /// One more copy is sent after all of the worker's other pushes.
    late: bool,
}

#[derive(Debug, Clone)]
struct ExactlyOnceCase {
    shards: u32,
    workers: Vec<Vec<PushPlan>>,
}

fn push_plan() -> impl Strategy<Value = PushPlan> {
    (
        (0..3u32, any::<bool>(), any::<u8>(), vec(-8i8..=8, 0..=EO_LEN)),
        (
            prop::bool::weighted(0.2),
            1..=3usize,
            any::<bool>(),
            prop::option::weighted(0.2, 0..2000u16),
            any::<bool>(),
        ),
    )
        .prop_map(|((shard, dense, mask, grads), (bad, copies, concurrent, lost_after_us, late))| {
            PushPlan { shard, dense, mask, grads, bad, copies, concurrent, lost_after_us, late }
        })
}

fn exactly_once_case() -> impl Strategy<Value = ExactlyOnceCase> {
    (1..=3u32, vec(vec(push_plan(), 1..=6), 1..=3))
        .prop_map(|(shards, workers)| ExactlyOnceCase { shards, workers })
}

/// A push request of either kind, as sent to one shard.
#[derive(Debug, Clone)]
enum Push {
    Dense(pb::PushDenseRequest),
    Sparse(pb::PushSparseRequest),
}

impl Push {
    async fn send(
        &self,
        c: &RawClient,
        timeout: Option<Duration>,
    ) -> Result<pb::PushResponse, tonic::Status> {
        let mut c = c.clone();
        let resp = match self {
            Push::Dense(r) => {
                let mut req = tonic::Request::new(r.clone());
                if let Some(t) = timeout {
                    req.set_timeout(t);
                }
                c.push_dense(req).await
            }
            Push::Sparse(r) => {
                let mut req = tonic::Request::new(r.clone());
                if let Some(t) = timeout {
                    req.set_timeout(t);
                }
                c.push_sparse(req).await
            }
        };
        resp.map(tonic::Response::into_inner)
    }
}

/// What the test knows about one shard after the run.
#[derive(Debug, Default)]
struct Tally {
    /// Valid (worker, seq) pairs sent, each acknowledged at least once.
    distinct: u64,
    acked_duplicates: u64,
    /// Attempts whose answer was dropped.
    lost: u64,
    rejected: u64,
    /// Expected dense values and sparse rows.
    dense: Vec<f32>,
    rows: BTreeMap<u64, Vec<f32>>,
}

/// The chunks of `d` a shard owns, and its key pool.
fn eo_chunks(shard: u32, n: u32) -> Vec<u32> {
    let chunks = partition::num_chunks(EO_LEN, EO_CHUNK) as u32;
    (0..chunks).filter(|&i| chunk_shard("d", i, n) == shard).collect()
}

fn eo_pool(shard: u32, n: u32) -> Vec<u64> {
    (0..).filter(|&k| key_shard(k, n) == shard).take(EO_POOL).collect()
}

/// One gradient value of a push (SGD with lr 1 subtracts it once).
#[derive(Debug, Clone, Copy)]
enum Effect {
    /// On element `.0` of `d`.
    Dense(usize, f32),
    /// On value `.1` of row `.0` of `s`.
    Row(u64, usize, f32),
}

/// Builds the valid push of `plan`: its shard, the request, its effect.
fn build_push(plan: &PushPlan, n: u32, worker: u64, seq: u64) -> (u32, Push, Vec<Effect>) {
    let shard = plan.shard % n;
    let meta = Some(pb::PushMeta { worker, seq, ..Default::default() });
    let g = |i: usize| f32::from(plan.grads.get(i).copied().unwrap_or(1));
    let pick = |len: usize| -> Vec<usize> {
        (0..len).filter(|&i| i == 0 || plan.mask & (1 << (i % 8)) != 0).collect()
    };
    let mut effect = Vec::new();
    let push = if plan.dense {
        let owned = eo_chunks(shard, n);
        let mut chunks = Vec::new();
        let mut at = 0;
        for i in pick(owned.len()) {
            let index = owned[i];
            let range = partition::chunk_range(EO_LEN, EO_CHUNK, index as usize);
            let values: Vec<f32> = range.clone().map(|e| g(at + e - range.start)).collect();
            at += values.len();
            for (e, &v) in range.zip(&values) {
                effect.push(Effect::Dense(e, v));
            }
            chunks.push(pb::DenseChunk { tensor: "d".into(), index, values: codec::encode_f32(&values) });
        }
        Push::Dense(pb::PushDenseRequest { chunks, meta })
    } else {
        let pool = eo_pool(shard, n);
        let keys: Vec<u64> = pick(pool.len()).into_iter().map(|i| pool[i]).collect();
        let grads: Vec<f32> = (0..keys.len() * EO_DIM).map(g).collect();
        for (j, &k) in keys.iter().enumerate() {
            for d in 0..EO_DIM {
                effect.push(Effect::Row(k, d, grads[j * EO_DIM + d]));
            }
        }
        Push::Sparse(pb::PushSparseRequest {
            table: "s".into(),
            keys: codec::encode_u64(&keys),
            grads: codec::encode_f32(&grads),
            meta,
        })
    };
    (shard, push, effect)
}

/// The same push with one gradient value replaced by NaN.
fn poisoned(push: &Push) -> Push {
    let poison = |bytes: &[u8]| {
        let mut v = codec::decode_f32("grads", bytes).expect("own encoding");
        v[0] = f32::NAN;
        codec::encode_f32(&v)
    };
    match push {
        Push::Dense(r) => {
            let mut r = r.clone();
            r.chunks[0].values = poison(&r.chunks[0].values);
            Push::Dense(r)
        }
        Push::Sparse(r) => {
            let mut r = r.clone();
            r.grads = poison(&r.grads);
            Push::Sparse(r)
        }
    }
}

/// Sends `copies` copies of `push`, the first two at once if `concurrent`.
async fn send_copies(
    push: &Push,
    c: &RawClient,
    copies: usize,
    concurrent: bool,
) -> Vec<Result<pb::PushResponse, tonic::Status>> {
    let mut out = Vec::new();
    let mut left = copies;
    if concurrent && copies >= 2 {
        let (a, b) = tokio::join!(push.send(c, None), push.send(c, None));
        out.extend([a, b]);
        left -= 2;
    }
    for _ in 0..left {
        out.push(push.send(c, None).await);
    }
    out
}

/// Runs one worker's plans; returns its tallies per shard.
async fn run_worker(addrs: Vec<String>, worker: u64, plans: Vec<PushPlan>) -> Result<Vec<Tally>> {
    let n = addrs.len() as u32;
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(raw_client(a).await);
    }
    let mut tally: Vec<Tally> =
        (0..n).map(|_| Tally { dense: vec![0.0; EO_LEN], ..Tally::default() }).collect();
    let mut next_seq = vec![1u64; n as usize];
    let mut late = Vec::new();
    for (p, plan) in plans.iter().enumerate() {
        let shard = plan.shard % n;
        let seq = next_seq[shard as usize];
        next_seq[shard as usize] += 1;
        let (shard, push, effect) = build_push(plan, n, worker, seq);
        let (c, t) = (&clients[shard as usize], &mut tally[shard as usize]);
        let what = format!("worker {worker} push {p} (shard {shard}, seq {seq})");
        if plan.bad {
            for r in send_copies(&poisoned(&push), c, plan.copies, plan.concurrent).await {
                let code = r.as_ref().map_err(tonic::Status::code).err();
                ensure!(code == Some(Code::InvalidArgument), "{what}: a poisoned copy got {r:?}");
                t.rejected += 1;
            }
        }
        if let Some(us) = plan.lost_after_us {
            let _ = push.send(c, Some(Duration::from_micros(u64::from(us)))).await;
            t.lost += 1;
        }
        let acks = send_copies(&push, c, plan.copies, plan.concurrent).await;
        let mut applied = 0;
        for r in acks {
            let r = r.with_context(|| format!("{what}: a valid copy failed"))?;
            if r.duplicate {
                ensure!(r.applied == 0, "{what}: a duplicate reports {} applied", r.applied);
                t.acked_duplicates += 1;
            } else {
                let expected = match &push {
                    Push::Dense(_) => effect.len(),
                    Push::Sparse(_) => effect.len() / EO_DIM,
                };
                ensure!(r.applied == expected as u64, "{what}: applied {} of {expected}", r.applied);
                applied += 1;
            }
        }
        ensure!(applied <= 1, "{what}: applied by {applied} copies");
        ensure!(applied == 1 || plan.lost_after_us.is_some(), "{what}: no copy was applied");
        t.distinct += 1;
        for e in effect {
            match e {
                Effect::Dense(e, v) => t.dense[e] -= v,
                Effect::Row(k, d, v) => t.rows.entry(k).or_insert_with(|| vec![0.0; EO_DIM])[d] -= v,
            }
        }
        if plan.late {
            late.push((shard, push, what));
        }
    }
    for (shard, push, what) in late {
        let r =
            push.send(&clients[shard as usize], None).await.with_context(|| format!("{what}: late copy"))?;
        ensure!(r.duplicate && r.applied == 0, "{what}: a late copy was applied: {r:?}");
        tally[shard as usize].acked_duplicates += 1;
    }
    Ok(tally)
}

async fn check_exactly_once(case: ExactlyOnceCase) -> Result<()> {
    let n = case.shards;
    let shards = LocalShards::start(n).await.expect("start shards");
    let zeros = Init::zeros();
    let admin = sharded_client(&shards, 0).await;
    admin.register(&dense_spec("d", &[EO_LEN as u64], EO_CHUNK as u32, zeros, Rule::sgd(1.0))).await?;
    admin.register(&TableSpec::sparse("s", EO_DIM as u32, zeros, Rule::sgd(1.0).into())).await?;
    let tasks = case
        .workers
        .into_iter()
        .enumerate()
        .map(|(w, plans)| tokio::spawn(run_worker(shards.addrs.clone(), w as u64 + 1, plans)));
    let mut totals: Vec<Tally> =
        (0..n).map(|_| Tally { dense: vec![0.0; EO_LEN], ..Tally::default() }).collect();
    for r in join_all(tasks).await {
        for (total, t) in totals.iter_mut().zip(r.context("worker panicked")??) {
            total.distinct += t.distinct;
            total.acked_duplicates += t.acked_duplicates;
            total.lost += t.lost;
            total.rejected += t.rejected;
            for (a, b) in total.dense.iter_mut().zip(&t.dense) {
                *a += b;
            }
            for (k, row) in t.rows {
                let acc = total.rows.entry(k).or_insert_with(|| vec![0.0; EO_DIM]);
                for (a, b) in acc.iter_mut().zip(row) {
                    *a += b;
                }
            }
        }
    }

    let set = DenseSet::new(&[dense_spec("d", &[EO_LEN as u64], EO_CHUNK as u32, zeros, Rule::sgd(1.0))], n)?;
    let dense = pull_set(&admin, &set).await?;
    let stats = admin.stats().await?;
    for (shard, (t, s)) in totals.iter().zip(&stats).enumerate() {
        let shard = shard as u32;
        for (e, (&got, &want)) in dense.iter().zip(&t.dense).enumerate() {
            let ours = chunk_shard("d", (e / EO_CHUNK) as u32, n) == shard;
            ensure!(!ours || got == want, "d[{e}] on shard {shard}: got {got}, want {want}");
        }
        let keys: Vec<u64> = t.rows.keys().copied().collect();
        let rows = pull_rows(&admin, "s", EO_DIM, &keys).await?;
        for (k, got) in keys.iter().zip(rows.chunks(EO_DIM)) {
            ensure!(got == t.rows[k], "s[{k}] on shard {shard}: got {got:?}, want {:?}", t.rows[k]);
        }
        ensure!(
            s.pushes == t.distinct,
            "shard {shard}: {} pushes applied, {} distinct sent",
            s.pushes,
            t.distinct
        );
        ensure!(
            s.rejected == t.rejected,
            "shard {shard}: {} rejected, {} poisoned sent",
            s.rejected,
            t.rejected
        );
        // Every copy that reached the store and was not applied is counted;
        // a lost attempt may or may not have reached it.
        let (lo, hi) = (t.acked_duplicates, t.acked_duplicates + t.lost);
        ensure!(
            (lo..=hi).contains(&s.duplicate_pushes),
            "shard {shard}: duplicate_pushes {} not in {lo}..={hi}",
            s.duplicate_pushes
        );
    }
    drop(admin);
    stop(shards).await
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn exactly_once(case in exactly_once_case()) {
        run(check_exactly_once(case))?;
    }
}

// ------------------------------------------------------------------ 3. atomicity

#[derive(Debug, Clone, Copy)]
enum BadBlock {
    /// A chunk index past the end, or a key of another shard.
    NotOurs,
    /// A chunk index that exists but belongs to another shard (dense only;
    /// sparse: another shard's key, as `NotOurs`).
    OtherShard,
    /// A block already in the push.
    Repeated,
    NaN,
    Infinite,
    /// One value short (dense: that chunk; sparse: the whole gradient).
    Short,
}

#[derive(Debug, Clone)]
struct AtomicityCase {
    shards: u32,
    len: usize,
    chunk_len: u32,
    /// The shard pushed to (mod the shard count).
    target: u32,
    dense: bool,
    bad: BadBlock,
    /// Where the bad block goes among the good ones (clamped to their count).
    at: usize,
    seed: u64,
}

fn atomicity_case() -> impl Strategy<Value = AtomicityCase> {
    let bad = prop_oneof![
        Just(BadBlock::NotOurs),
        Just(BadBlock::OtherShard),
        Just(BadBlock::Repeated),
        Just(BadBlock::NaN),
        Just(BadBlock::Infinite),
        Just(BadBlock::Short),
    ];
    (2..=3u32, 12..=30usize, 1..=4u32, 0..3u32, any::<bool>(), bad, 0..6usize, any::<u64>()).prop_map(
        |(shards, len, chunk_len, target, dense, bad, at, seed)| AtomicityCase {
            shards,
            len,
            chunk_len,
            target,
            dense,
            bad,
            at,
            seed,
        },
    )
}

async fn check_atomicity(case: AtomicityCase) -> Result<()> {
    let n = case.shards;
    let target = case.target % n;
    let shards = LocalShards::start(n).await.expect("start shards");
    let init = Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: case.seed };
    let spec = dense_spec("d", &[case.len as u64], case.chunk_len, init, Rule::sgd(0.5));
    let admin = sharded_client(&shards, 0).await;
    admin.register(&spec).await?;
    admin.register(&TableSpec::sparse("s", 2, init, Rule::sgd(0.5).into())).await?;
    let chunk_len = case.chunk_len as usize;
    let num_chunks = partition::num_chunks(case.len, chunk_len) as u32;
    let grad_of =
        |index: u32| vec![0.5f32; partition::chunk_range(case.len, chunk_len, index as usize).len()];
    let pool: Vec<u64> = (0..).filter(|&k| key_shard(k, n) == target).take(4).collect();
    let foreign_key = (0..).find(|&k| key_shard(k, n) != target).expect("n >= 2");

    // The good blocks, and the whole push with the bad one inserted.
    let meta = Some(pb::PushMeta { worker: 1, seq: 1, ..Default::default() });
    let (good, bad) = if case.dense {
        let owned: Vec<u32> = (0..num_chunks).filter(|&i| chunk_shard("d", i, n) == target).collect();
        let chunk = |index: u32, values: Vec<f32>| pb::DenseChunk {
            tensor: "d".into(),
            index,
            values: codec::encode_f32(&values),
        };
        let good: Vec<pb::DenseChunk> = owned.iter().map(|&i| chunk(i, grad_of(i))).collect();
        let first = owned[0];
        let spoiled = |f: &dyn Fn(&mut Vec<f32>)| {
            let mut g = grad_of(first);
            f(&mut g);
            chunk(first, g)
        };
        let bad_block = match case.bad {
            BadBlock::NotOurs => chunk(num_chunks + (case.seed % 3) as u32, vec![0.5]),
            BadBlock::OtherShard => {
                let i =
                    (0..num_chunks).find(|&i| chunk_shard("d", i, n) != target).expect("chunks >= shards");
                chunk(i, grad_of(i))
            }
            BadBlock::Repeated => chunk(first, grad_of(first)),
            BadBlock::NaN => spoiled(&|g| *g.last_mut().expect("chunks are not empty") = f32::NAN),
            BadBlock::Infinite => spoiled(&|g| g[0] = f32::NEG_INFINITY),
            BadBlock::Short => spoiled(&|g| {
                g.pop();
            }),
        };
        let mut all = good.clone();
        // A repeated or spoiled copy of `first` replaces it unless it is a
        // second copy; either way the push holds one bad block.
        if matches!(case.bad, BadBlock::NaN | BadBlock::Infinite | BadBlock::Short) {
            all.remove(0);
        }
        all.insert(case.at.min(all.len()), bad_block);
        (
            Push::Dense(pb::PushDenseRequest { chunks: good, meta }),
            Push::Dense(pb::PushDenseRequest { chunks: all, meta }),
        )
    } else {
        let good_keys = pool.clone();
        let mut grads = vec![0.5f32; good_keys.len() * 2];
        let mut keys = good_keys.clone();
        match case.bad {
            BadBlock::NotOurs | BadBlock::OtherShard => {
                keys.insert(case.at.min(keys.len()), foreign_key);
                grads.extend([0.5, 0.5]);
            }
            BadBlock::Repeated => {
                keys.insert(case.at.min(keys.len()), pool[case.at % pool.len()]);
                grads.extend([0.5, 0.5]);
            }
            BadBlock::NaN | BadBlock::Infinite => {
                let i = case.at.min(grads.len() - 1);
                grads[i] = if matches!(case.bad, BadBlock::NaN) { f32::NAN } else { f32::INFINITY };
            }
            BadBlock::Short => {
                grads.pop();
            }
        }
        let push = |keys: &[u64], grads: &[f32]| {
            Push::Sparse(pb::PushSparseRequest {
                table: "s".into(),
                keys: codec::encode_u64(keys),
                grads: codec::encode_f32(grads),
                meta,
            })
        };
        (push(&good_keys, &vec![0.5; good_keys.len() * 2]), push(&keys, &grads))
    };

    let set = DenseSet::new(std::slice::from_ref(&spec), n)?;
    let state = async || -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((pull_set(&admin, &set).await?, pull_rows(&admin, "s", 2, &pool).await?))
    };
    let before = state().await?;
    let c = raw_client(&shards.addrs[target as usize]).await;
    let stats_before = admin.stats().await?;
    let err = match bad.send(&c, None).await {
        Ok(r) => anyhow::bail!("the bad push was accepted: {r:?}"),
        Err(e) => e,
    };
    ensure!(
        matches!(err.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "unexpected refusal {:?}: {}",
        err.code(),
        err.message()
    );
    let stats_after = admin.stats().await?;
    let after = state().await?;
    let changed = |b: &[f32], a: &[f32]| -> Vec<(usize, f32, f32)> {
        b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y).map(|(i, (&x, &y))| (i, x, y)).collect()
    };
    let (d, r) = (changed(&before.0, &after.0), changed(&before.1, &after.1));
    ensure!(
        d.is_empty() && r.is_empty(),
        "the refused push changed (index, before, after): d {d:?}, s {r:?}"
    );
    let t = target as usize;
    ensure!(stats_after[t].pushes == stats_before[t].pushes, "pushes counter moved");
    ensure!(stats_after[t].rejected == stats_before[t].rejected + 1, "rejected counter did not move by one");

    // The good blocks alone, same (worker, seq): applied, all of them.
    let r = good.send(&c, None).await.context("the good part")?;
    ensure!(!r.duplicate, "the refused push consumed its seq");
    let (dense, rows) = state().await?;
    for (e, (&b, &a)) in before.0.iter().zip(&dense).enumerate() {
        let ours = case.dense && chunk_shard("d", (e / chunk_len) as u32, n) == target;
        let want = if ours { b - 0.25 } else { b };
        ensure!(a == want, "d[{e}]: got {a}, want {want}");
    }
    for (i, (&b, &a)) in before.1.iter().zip(&rows).enumerate() {
        let want = if case.dense { b } else { b - 0.25 };
        ensure!(a == want, "s row value {i}: got {a}, want {want}");
    }
    drop((c, admin));
    stop(shards).await
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn atomicity(case in atomicity_case()) {
        run(check_atomicity(case))?;
    }
}

// ------------------------------------------------------------------ 4. partitioning

#[derive(Debug, Clone)]
struct PartitionCase {
    shards: u32,
    /// (name, shape, chunk_len) of each dense tensor of one set.
    tensors: Vec<(String, Vec<u64>, u32)>,
    keys: Vec<u64>,
    dim: u32,
}

fn partition_case() -> impl Strategy<Value = PartitionCase> {
    let tensor = ("[a-z.]{1,6}", vec(1..=6u64, 1..=3), 1..=40u32);
    (1..=3u32, vec(tensor, 1..=3), vec(any::<u64>(), 0..=20), 1..=3u32).prop_map(
        |(shards, tensors, keys, dim)| {
            // Names must differ: suffix the position.
            let tensors =
                tensors.into_iter().enumerate().map(|(i, (n, s, c))| (format!("{n}{i}"), s, c)).collect();
            PartitionCase { shards, tensors, keys, dim }
        },
    )
}

async fn check_partitioning(case: PartitionCase) -> Result<()> {
    let n = case.shards;
    let shards = LocalShards::start(n).await.expect("start shards");
    let rule = Rule::sgd(1.0);
    let specs: Vec<TableSpec> = case
        .tensors
        .iter()
        .map(|(name, shape, c)| dense_spec(name, shape, *c, Init::zeros(), rule))
        .collect();
    let sparse = TableSpec::sparse("e", case.dim, Init::zeros(), rule.into());
    let mut c = sharded_client(&shards, 1).await;
    for spec in specs.iter().chain([&sparse]) {
        c.register(spec).await?;
    }
    let set = DenseSet::new(&specs, n)?;
    // Element i of the flat buffer gets i + 1; row j of the distinct keys
    // gets j * dim + d + 1. All exact in f32.
    let grads: Vec<f32> = (0..set.len()).map(|i| -(i as f32 + 1.0)).collect();
    c.push_dense(&set, &grads, 0, 0, false).await?;
    let mut keys = case.keys.clone();
    keys.sort_unstable();
    keys.dedup();
    let dim = case.dim as usize;
    let row_grads: Vec<f32> = (0..keys.len() * dim).map(|i| -(i as f32 + 1.0)).collect();
    if !keys.is_empty() {
        c.push_sparse("e", dim, &keys, &row_grads, 0, 0, false).await?;
    }

    let got = pull_set(&c, &set).await?;
    for (i, &v) in got.iter().enumerate() {
        ensure!(v == i as f32 + 1.0, "element {i} of the set holds {v}");
    }
    let rows = pull_rows(&c, "e", dim, &keys).await?;
    for (i, &v) in rows.iter().enumerate() {
        ensure!(v == i as f32 + 1.0, "row value {i} (key {}) holds {v}", keys[i / dim]);
    }
    // Each shard holds, and was pushed, exactly what the partition assigns it.
    let stats = c.stats().await?;
    let mut chunks = vec![0u64; n as usize];
    let mut elements = vec![0u64; n as usize];
    for spec in &specs {
        let Layout::Dense { shape, chunk_len } = &spec.layout else { unreachable!() };
        let len = Layout::dense_len(shape).expect("small");
        for i in 0..partition::num_chunks(len, *chunk_len as usize) {
            let s = chunk_shard(&spec.name, i as u32, n) as usize;
            chunks[s] += 1;
            elements[s] += partition::chunk_range(len, *chunk_len as usize, i).len() as u64;
        }
    }
    let mut rows_of = vec![0u64; n as usize];
    for &k in &keys {
        rows_of[key_shard(k, n) as usize] += 1;
    }
    for (s, st) in stats.iter().enumerate() {
        ensure!(
            st.dense_chunks == chunks[s],
            "shard {s} holds {} chunks, want {}",
            st.dense_chunks,
            chunks[s]
        );
        ensure!(st.sparse_rows == rows_of[s], "shard {s} holds {} rows, want {}", st.sparse_rows, rows_of[s]);
        let pushed = elements[s] + rows_of[s];
        ensure!(
            st.values_pushed == pushed,
            "shard {s} was pushed {} values, want {pushed}",
            st.values_pushed
        );
        ensure!(st.rejected == 0, "shard {s} rejected {} requests", st.rejected);
    }
    ensure!(
        set.shard_loads().iter().map(|&l| l as u64).eq(elements.iter().copied()),
        "client and partition disagree"
    );
    drop(c);
    stop(shards).await
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn partitioning(case in partition_case()) {
        run(check_partitioning(case))?;
    }
}

// ------------------------------------------------------------------ 5. SSP

/// Iterations per worker.
const K: usize = 6;
const MAX_WORKERS: usize = 4;

#[derive(Debug, Clone)]
struct SspCase {
    shards: u32,
    workers: usize,
    consistency: Consistency,
    chunk_len: u32,
    /// Per (worker, iteration): (delay before the read, before the push). 0
    /// yields once; d > 0 sleeps d ms. Missing entries are 0.
    delays: Vec<(u8, u8)>,
}

fn ssp_case() -> impl Strategy<Value = SspCase> {
    let consistency =
        prop_oneof![Just(Consistency::Bsp), (0..=3u32).prop_map(|staleness| Consistency::Ssp { staleness })];
    (1..=2u32, 2..=MAX_WORKERS, consistency, 1..=6u32, vec((0..=3u8, 0..=3u8), 0..=MAX_WORKERS * K)).prop_map(
        |(shards, workers, consistency, chunk_len, delays)| SspCase {
            shards,
            workers,
            consistency,
            chunk_len,
            delays,
        },
    )
}

async fn pause(d: u8) {
    if d == 0 {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(u64::from(d))).await;
    }
}

/// One worker's loop: read at clock t, then push "worker w did iteration t"
/// as -1 at element w * K + t (SGD, lr 1, from zeros: the element becomes 1
/// once the update is applied). Returns the values each read saw.
async fn ssp_worker(
    mut c: ShardedClient,
    set: DenseSet,
    w: usize,
    delays: Vec<(u8, u8)>,
) -> Result<Vec<Vec<f32>>> {
    let mut reads = Vec::new();
    for t in 0..K {
        let (before_read, before_push) = delays.get(w * K + t).copied().unwrap_or((0, 0));
        pause(before_read).await;
        let mut values = vec![0.0; set.len()];
        c.pull_dense(&set, t as u64, &mut values)
            .await
            .with_context(|| format!("worker {w} read at clock {t}"))?;
        reads.push(values);
        pause(before_push).await;
        let mut grads = vec![0.0; set.len()];
        grads[w * K + t] = -1.0;
        c.push_dense(&set, &grads, t as u64, t as u64, true)
            .await
            .with_context(|| format!("worker {w} push {t}"))?;
    }
    Ok(reads)
}

async fn check_ssp(case: SspCase) -> Result<()> {
    let n = case.shards;
    let shards = LocalShards::start_with(&ServerConfig { max_wait_ms: 15_000, ..ServerConfig::default() }, n)
        .await
        .expect("start shards");
    let s = case.consistency.bound().expect("SSP or BSP") as usize;
    let spec =
        dense_spec("clock", &[(case.workers * K) as u64], case.chunk_len, Init::zeros(), Rule::sgd(1.0));
    let set = DenseSet::new(std::slice::from_ref(&spec), n)?;
    // Every shard must serve reads, or its clocks would not be gated (and its
    // histogram could exceed the bound): guaranteed by chunks >= shards.
    ensure!(set.shard_loads().iter().all(|&l| l > 0), "a shard holds no chunk: {:?}", set.shard_loads());
    // Every worker joins before any reads: a late joiner is not waited for.
    let mut clients = Vec::new();
    for w in 0..case.workers {
        let mut c = sharded_client(&shards, w as u64 + 1).await;
        if w == 0 {
            c.register(&spec).await?;
        }
        c.join(case.consistency, Duration::from_secs(60), 0).await?;
        clients.push(c);
    }
    let tasks = clients
        .into_iter()
        .enumerate()
        .map(|(w, c)| tokio::spawn(ssp_worker(c, set.clone(), w, case.delays.clone())));
    let results = match tokio::time::timeout(Duration::from_secs(20), join_all(tasks)).await {
        Ok(r) => r,
        Err(_) => {
            let clocks: Vec<_> = shards_stats(&shards).await?.into_iter().map(|s| s.clocks).collect();
            anyhow::bail!("workers still running after 20 s; clock tables per shard: {clocks:?}");
        }
    };
    let mut reads = Vec::new();
    for r in results {
        reads.push(r.context("worker panicked")??);
    }

    for (w, worker_reads) in reads.iter().enumerate() {
        for (c, values) in worker_reads.iter().enumerate() {
            for v in 0..case.workers {
                for t in 0..K {
                    let x = values[v * K + t];
                    ensure!(x == 0.0 || x == 1.0, "worker {w} at clock {c} read {x} for ({v}, {t})");
                    let seen = x == 1.0;
                    let what = format!(
                        "read of worker {w} at clock {c}, update of worker {v} iteration {t}, bound {s}"
                    );
                    ensure!(seen || t + s + 1 > c, "{what}: missing, but required by the bound");
                    ensure!(seen || v != w || t >= c, "{what}: missing its own earlier update");
                    ensure!(!seen || t <= c + s, "{what}: present, but the writer cannot be that far ahead");
                }
            }
        }
    }
    let stats = shards_stats(&shards).await?;
    for (i, st) in stats.iter().enumerate() {
        let over: u64 = st.staleness_histogram.iter().skip(s + 1).sum();
        ensure!(over == 0, "shard {i}: staleness above the bound {s}: {:?}", st.staleness_histogram);
        for m in &st.clocks {
            ensure!(m.clock == K as u64, "shard {i}: worker {} ends at clock {}", m.worker, m.clock);
        }
    }
    stop(shards).await
}

async fn shards_stats(shards: &LocalShards) -> Result<Vec<pb::StatsResponse>> {
    let mut out = Vec::new();
    for a in &shards.addrs {
        out.push(raw_client(a).await.stats(pb::StatsRequest {}).await?.into_inner());
    }
    Ok(out)
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn ssp_reads(case in ssp_case()) {
        run(check_ssp(case))?;
    }
}
