//! Every kind of request a shard refuses: the exact gRPC code, and proof that
//! the refusal changed nothing.
//!
//! The requests are crafted with the raw generated client, since the sharded
//! client never sends most of them. [`check`] takes one request and the code
//! (and a fragment of the message) it must fail with; around the call it
//! reads the whole observable state of every shard (the values of every
//! block, the counters, the clock set) and requires it unchanged, except the
//! `rejected` counter of the shard that refused, which must go up by one.
//! [`check_uncounted`] is the same for messages the transport refuses
//! (oversized requests or answers), which leave `rejected` alone.
//!
//! The bad pushes all carry `(worker 9, seq 1)`; each push test ends by
//! pushing a good `(9, 1)`, which must be applied: a rejected push does not
//! consume its seq.

use ps_common::codec;
use ps_common::optim::Rule;
use ps_common::partition::{chunk_range, chunk_shard, key_shard};
use ps_common::spec::{Init, InitKind, Layout, TableSpec};
use ps_common::wire::pb;
use ps_server::ServerConfig;
use ps_server::local::LocalShards;
use tonic::{Code, Status};

use crate::util::{RawClient, raw_client};

const SHARDS: u32 = 2;
/// A dense tensor of 10 elements in chunks of 4, 4 and 2.
const W: &str = "w";
const W_SHAPE: [u64; 2] = [2, 5];
const W_LEN: usize = 10;
const W_CHUNK: usize = 4;
const W_CHUNKS: u32 = 3;
/// A sparse table with rows of 3.
const E: &str = "e";
const E_DIM: usize = 3;
/// Sparse keys whose rows are part of the compared state.
const KEYS: std::ops::Range<u64> = 0..12;
/// The identity of every rejected push.
const BAD_WORKER: u64 = 9;

fn init() -> Init {
    Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: 3 }
}

fn dense_spec() -> TableSpec {
    let mut t = TableSpec::dense(W, &W_SHAPE, init(), Rule::sgd(0.5).into());
    t.layout = Layout::Dense { shape: W_SHAPE.to_vec(), chunk_len: W_CHUNK as u32 };
    t
}

fn sparse_spec() -> TableSpec {
    TableSpec::sparse(E, E_DIM as u32, init(), Rule::sgd(0.5).into())
}

fn chunk_len(index: u32) -> usize {
    chunk_range(W_LEN, W_CHUNK, index as usize).len()
}

/// A chunk of `W` that `shard` owns, and one that it does not.
fn own_chunk(shard: usize) -> u32 {
    (0..W_CHUNKS).find(|&i| chunk_shard(W, i, SHARDS) == shard as u32).expect("every shard owns a chunk")
}

fn foreign_chunk(shard: usize) -> u32 {
    (0..W_CHUNKS).find(|&i| chunk_shard(W, i, SHARDS) != shard as u32).expect("some chunk is elsewhere")
}

/// The `nth` key of `KEYS` that `shard` owns, and one that it does not.
fn own_key(shard: usize, nth: usize) -> u64 {
    KEYS.filter(|&k| key_shard(k, SHARDS) == shard as u32).nth(nth).expect("enough keys per shard")
}

/// A key that `shard` owns, outside `KEYS` (never created by the tests).
fn fresh_key(shard: usize) -> u64 {
    (1000..).find(|&k| key_shard(k, SHARDS) == shard as u32).expect("some key")
}

/// The two chunks of `W` held by the same shard, and that shard.
fn two_chunks() -> (usize, u32, u32) {
    let owned = |s: u32| (0..W_CHUNKS).filter(move |&i| chunk_shard(W, i, SHARDS) == s);
    let s = (0..SHARDS).find(|&s| owned(s).count() == 2).expect("3 chunks on 2 shards");
    let mut it = owned(s);
    (s as usize, it.next().unwrap(), it.next().unwrap())
}

fn foreign_key(shard: usize) -> u64 {
    KEYS.clone().find(|&k| key_shard(k, SHARDS) != shard as u32).expect("some key is elsewhere")
}

fn bad_meta() -> Option<pb::PushMeta> {
    Some(pb::PushMeta { worker: BAD_WORKER, seq: 1, ..Default::default() })
}

fn f32s(values: &[f32]) -> Vec<u8> {
    codec::encode_f32(values).to_vec()
}

// ------------------------------------------------------------------ requests

/// One request of any kind, so a table of cases can mix them.
enum Req {
    Register(pb::RegisterRequest),
    PullDense(pb::PullDenseRequest),
    PushDense(pb::PushDenseRequest),
    PullSparse(pb::PullSparseRequest),
    PushSparse(pb::PushSparseRequest),
    Join(pb::JoinRequest),
}

impl Req {
    async fn send(self, c: &mut RawClient) -> Result<(), Status> {
        match self {
            Req::Register(r) => c.register(r).await.map(drop),
            Req::PullDense(r) => c.pull_dense(r).await.map(drop),
            Req::PushDense(r) => c.push_dense(r).await.map(drop),
            Req::PullSparse(r) => c.pull_sparse(r).await.map(drop),
            Req::PushSparse(r) => c.push_sparse(r).await.map(drop),
            Req::Join(r) => c.join(r).await.map(drop),
        }
    }
}

/// A dense push of (tensor, chunk, gradient) triples.
fn push_dense(chunks: &[(&str, u32, &[f32])]) -> Req {
    push_dense_bytes(chunks.iter().map(|&(t, i, g)| (t, i, f32s(g))).collect())
}

fn push_dense_bytes(chunks: Vec<(&str, u32, Vec<u8>)>) -> Req {
    let chunks = chunks
        .into_iter()
        .map(|(t, index, values)| pb::DenseChunk { tensor: t.to_string(), index, values: values.into() })
        .collect();
    Req::PushDense(pb::PushDenseRequest { chunks, meta: bad_meta() })
}

/// A gradient of the right length for chunk `index` of `W`, filled with `v`.
fn grad(index: u32, v: f32) -> Vec<f32> {
    vec![v; chunk_len(index)]
}

/// The same, with `bad` at position 1.
fn grad_with(index: u32, bad: f32) -> Vec<f32> {
    let mut g = grad(index, 0.25);
    g[1] = bad;
    g
}

fn pull_dense(chunks: &[(&str, u32)]) -> Req {
    let chunks = chunks.iter().map(|&(t, index)| pb::ChunkId { tensor: t.to_string(), index }).collect();
    Req::PullDense(pb::PullDenseRequest { chunks, meta: None })
}

fn push_sparse(table: &str, keys: &[u64], grads: &[f32]) -> Req {
    push_sparse_bytes(table, codec::encode_u64(keys).to_vec(), f32s(grads))
}

fn push_sparse_bytes(table: &str, keys: Vec<u8>, grads: Vec<u8>) -> Req {
    Req::PushSparse(pb::PushSparseRequest {
        table: table.to_string(),
        keys: keys.into(),
        grads: grads.into(),
        meta: bad_meta(),
    })
}

fn pull_sparse(table: &str, keys: &[u64]) -> Req {
    pull_sparse_bytes(table, codec::encode_u64(keys).to_vec())
}

fn pull_sparse_bytes(table: &str, keys: Vec<u8>) -> Req {
    Req::PullSparse(pb::PullSparseRequest {
        table: table.to_string(),
        keys: keys.into(),
        meta: None,
        read_only: false,
    })
}

fn register(spec: pb::TableSpec, num_shards: u32) -> Req {
    Req::Register(pb::RegisterRequest { table: Some(spec), num_shards })
}

/// `spec` on the wire with its optimizer replaced by `rule` (unvalidated).
fn with_rule(spec: &TableSpec, rule: pb::optimizer_spec::Rule) -> pb::TableSpec {
    let mut t = pb::TableSpec::from(spec);
    t.optimizer = Some(pb::OptimizerSpec { rule: Some(rule), staleness_aware: false, ..Default::default() });
    t
}

fn sgd(lr: f32) -> pb::optimizer_spec::Rule {
    pb::optimizer_spec::Rule::Sgd(pb::Sgd { lr, weight_decay: 0.0 })
}

fn join(worker: u64, model: pb::ConsistencyModel, staleness: u32) -> Req {
    Req::Join(pb::JoinRequest {
        worker,
        consistency: Some(pb::ConsistencySpec { model: model as i32, staleness }),
        lease_ms: 60_000,
        clock: 0,
        ..Default::default()
    })
}

// ------------------------------------------------------------------ harness

/// Two shards with `W` and `E` registered, and a raw client to each.
struct Env {
    shards: LocalShards,
    clients: Vec<RawClient>,
}

/// Everything a client can observe of one shard.
#[derive(Debug, PartialEq)]
struct State {
    /// `W`'s chunks and `E`'s rows held by this shard, in order.
    values: Vec<Vec<f32>>,
    /// Counters, sizes and the clock set; `rejected` is compared separately,
    /// and the fields our own reads change are zeroed.
    stats: pb::StatsResponse,
    rejected: u64,
}

impl Env {
    async fn start() -> Env {
        let env = Env::unregistered(LocalShards::start(SHARDS).await.expect("start shards")).await;
        for shard in 0..SHARDS as usize {
            for spec in [dense_spec(), sparse_spec()] {
                env.register(shard, &spec).await;
            }
        }
        env
    }

    async fn unregistered(shards: LocalShards) -> Env {
        let mut clients = Vec::new();
        for addr in &shards.addrs {
            clients.push(raw_client(addr).await);
        }
        Env { shards, clients }
    }

    async fn register(&self, shard: usize, spec: &TableSpec) {
        let req = pb::RegisterRequest { table: Some(spec.into()), num_shards: SHARDS };
        self.clients[shard].clone().register(req).await.expect("register");
    }

    async fn state(&self, shard: usize) -> State {
        let mut c = self.clients[shard].clone();
        let mut values = Vec::new();
        let registered = c.stats(pb::StatsRequest {}).await.expect("stats").into_inner().tables > 0;
        if registered {
            for i in (0..W_CHUNKS).filter(|&i| chunk_shard(W, i, SHARDS) == shard as u32) {
                let req = pb::PullDenseRequest {
                    chunks: vec![pb::ChunkId { tensor: W.into(), index: i }],
                    meta: None,
                };
                let chunk = &c.pull_dense(req).await.expect("pull").into_inner().chunks[0];
                values.push(codec::decode_f32("values", &chunk.values).expect("decode"));
            }
            let keys: Vec<u64> = KEYS.filter(|&k| key_shard(k, SHARDS) == shard as u32).collect();
            let req = pb::PullSparseRequest {
                table: E.into(),
                keys: codec::encode_u64(&keys),
                meta: None,
                read_only: false,
            };
            let rows = c.pull_sparse(req).await.expect("pull").into_inner();
            values.extend(
                codec::decode_f32("rows", &rows.values).expect("decode").chunks(E_DIM).map(<[f32]>::to_vec),
            );
        }
        // Read after the pulls: the first pull of a row creates it.
        let mut stats = c.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
        let rejected = std::mem::take(&mut stats.rejected);
        stats.pulls = 0;
        stats.values_pulled = 0;
        stats.wait_micros = 0;
        State { values, stats, rejected }
    }

    async fn states(&self) -> Vec<State> {
        let mut out = Vec::new();
        for shard in 0..self.clients.len() {
            out.push(self.state(shard).await);
        }
        out
    }

    /// A good push of `(BAD_WORKER, 1)` to `shard` must now be applied once.
    async fn seq_is_unused(&self, shard: usize) {
        let i = own_chunk(shard);
        let Req::PushDense(req) = push_dense(&[(W, i, &grad(i, 1.0))]) else { unreachable!() };
        let mut c = self.clients[shard].clone();
        let first = c.push_dense(req.clone()).await.expect("good push").into_inner();
        assert_eq!(
            first,
            pb::PushResponse { applied: chunk_len(i) as u64, duplicate: false, ..Default::default() }
        );
        let again = c.push_dense(req).await.expect("good push").into_inner();
        assert_eq!(again, pb::PushResponse { applied: 0, duplicate: true, ..Default::default() });
    }

    async fn stop(self) {
        drop(self.clients);
        self.shards.stop().await.expect("stop shards");
    }
}

/// Sends `req` to `shard`: it must fail with `code` and a message containing
/// `msg`, change nothing anywhere, and count as rejected on `shard`.
async fn check(env: &Env, shard: usize, req: Req, code: Code, msg: &str) {
    check_with(env, shard, req, code, msg, 1).await;
}

/// As [`check`], for requests refused by the transport before they reach the
/// service (oversized messages), which the shard cannot count.
async fn check_uncounted(env: &Env, shard: usize, req: Req, code: Code, msg: &str) {
    check_with(env, shard, req, code, msg, 0).await;
}

async fn check_with(env: &Env, shard: usize, req: Req, code: Code, msg: &str, counted: u64) {
    let before = env.states().await;
    let status = match req.send(&mut env.clients[shard].clone()).await {
        Ok(()) => panic!("expected {code:?} containing {msg:?}, got success"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(status.message().contains(msg), "message {:?} does not contain {msg:?}", status.message());
    let after = env.states().await;
    for (s, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(b.values, a.values, "values of shard {s} changed by a {code:?} request");
        assert_eq!(b.stats, a.stats, "stats of shard {s} changed by a {code:?} request");
        let expected = b.rejected + if s == shard { counted } else { 0 };
        assert_eq!(a.rejected, expected, "rejected counter of shard {s}");
    }
}

// ------------------------------------------------------------------ cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_dense_pushes_change_nothing() {
    let env = Env::start().await;
    let (own, other, foreign) = (own_chunk(0), own_chunk(1), foreign_chunk(0));
    let ok = grad(own, 0.25);
    check(&env, 0, push_dense(&[("nope", 0, &[1.0])]), Code::NotFound, "unknown table `nope`").await;
    check(
        &env,
        0,
        push_dense(&[(W, foreign, &grad(foreign, 1.0))]),
        Code::FailedPrecondition,
        "belongs to shard 1",
    )
    .await;
    check(&env, 0, push_dense(&[(W, W_CHUNKS, &[1.0])]), Code::InvalidArgument, "out of range").await;
    check(&env, 0, push_dense(&[(W, u32::MAX, &[1.0])]), Code::InvalidArgument, "out of range").await;
    check(&env, 0, push_dense(&[(W, own, &ok[1..])]), Code::InvalidArgument, "expected").await;
    check(
        &env,
        0,
        push_dense(&[(W, own, &[ok.clone(), vec![1.0]].concat())]),
        Code::InvalidArgument,
        "expected",
    )
    .await;
    check(&env, 0, push_dense(&[(W, own, &[])]), Code::InvalidArgument, "expected").await;
    check(&env, 0, push_dense(&[(W, own, &grad_with(own, f32::NAN))]), Code::InvalidArgument, "non-finite")
        .await;
    check(
        &env,
        0,
        push_dense(&[(W, own, &grad_with(own, f32::INFINITY))]),
        Code::InvalidArgument,
        "non-finite",
    )
    .await;
    check(
        &env,
        0,
        push_dense(&[(W, own, &grad_with(own, f32::NEG_INFINITY))]),
        Code::InvalidArgument,
        "non-finite",
    )
    .await;
    check(
        &env,
        0,
        push_dense_bytes(vec![(W, own, vec![0; 4 * ok.len() - 1])]),
        Code::InvalidArgument,
        "multiple of 4",
    )
    .await;
    check(&env, 0, push_dense(&[(E, 0, &[1.0; E_DIM])]), Code::FailedPrecondition, "is sparse, not dense")
        .await;
    // One bad block spoils the whole push, wherever it is.
    check(&env, 0, push_dense(&[(W, own, &ok), (W, own, &ok)]), Code::InvalidArgument, "appears twice").await;
    check(
        &env,
        0,
        push_dense(&[(W, own, &ok), (W, foreign, &grad(foreign, 1.0))]),
        Code::FailedPrecondition,
        "belongs",
    )
    .await;
    check(&env, 0, push_dense(&[(W, own, &ok), (W, 7, &ok)]), Code::InvalidArgument, "out of range").await;
    check(&env, 0, push_dense(&[(W, own, &ok), ("nope", 0, &ok)]), Code::NotFound, "unknown table").await;
    let (s, a, b) = two_chunks();
    let (ok_a, ok_b) = (grad(a, 0.25), grad(b, 0.25));
    check(
        &env,
        s,
        push_dense(&[(W, a, &ok_a), (W, b, &grad_with(b, f32::NAN))]),
        Code::InvalidArgument,
        "non-finite",
    )
    .await;
    check(
        &env,
        s,
        push_dense(&[(W, a, &grad_with(a, f32::NAN)), (W, b, &ok_b)]),
        Code::InvalidArgument,
        "non-finite",
    )
    .await;
    check(&env, s, push_dense(&[(W, a, &ok_a), (W, b, &ok_b[1..])]), Code::InvalidArgument, "expected").await;
    check(
        &env,
        1,
        push_dense(&[(W, other, &grad(other, 1.0)), (W, own, &ok)]),
        Code::FailedPrecondition,
        "shard 0",
    )
    .await;
    env.seq_is_unused(0).await;
    env.seq_is_unused(1).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_sparse_pushes_change_nothing() {
    let env = Env::start().await;
    let (k, k2, foreign) = (own_key(0, 0), own_key(0, 1), foreign_key(0));
    let row = [0.5; E_DIM];
    let rows2 = [0.5; 2 * E_DIM];
    let mut nan = rows2;
    nan[E_DIM + 1] = f32::NAN;
    check(&env, 0, push_sparse("nope", &[k], &row), Code::NotFound, "unknown table `nope`").await;
    check(&env, 0, push_sparse(E, &[foreign], &row), Code::FailedPrecondition, "belongs to shard 1").await;
    check(&env, 0, push_sparse(E, &[k, k], &rows2), Code::InvalidArgument, "appears twice").await;
    check(&env, 0, push_sparse(E, &[k, k2], &nan), Code::InvalidArgument, "non-finite").await;
    check(&env, 0, push_sparse(E, &[k], &[0.5, f32::INFINITY, 0.5]), Code::InvalidArgument, "non-finite")
        .await;
    check(&env, 0, push_sparse(E, &[k, k2], &row), Code::InvalidArgument, "expected 6 values, got 3").await;
    check(&env, 0, push_sparse(E, &[], &row), Code::InvalidArgument, "expected 0 values").await;
    check(
        &env,
        0,
        push_sparse_bytes(E, codec::encode_u64(&[k]).to_vec(), vec![0; 11]),
        Code::InvalidArgument,
        "of 4",
    )
    .await;
    check(&env, 0, push_sparse(W, &[k], &row), Code::FailedPrecondition, "is dense, not sparse").await;
    // A good key with a bad one: nothing applied.
    check(&env, 0, push_sparse(E, &[k, foreign], &rows2), Code::FailedPrecondition, "belongs").await;
    check(&env, 0, push_sparse(E, &[k, k2, k], &[0.5; 3 * E_DIM]), Code::InvalidArgument, "appears twice")
        .await;
    // Keys are decoded by the service, before the store sees the push.
    check(&env, 0, push_sparse_bytes(E, vec![0; 12], f32s(&row)), Code::InvalidArgument, "multiple of 8")
        .await;
    env.seq_is_unused(0).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_pulls_change_nothing() {
    let env = Env::start().await;
    check(&env, 0, pull_dense(&[("nope", 0)]), Code::NotFound, "unknown table").await;
    check(
        &env,
        0,
        pull_dense(&[(W, own_chunk(0)), (W, foreign_chunk(0))]),
        Code::FailedPrecondition,
        "belongs",
    )
    .await;
    check(&env, 0, pull_dense(&[(W, W_CHUNKS)]), Code::InvalidArgument, "out of range").await;
    check(&env, 0, pull_dense(&[(E, 0)]), Code::FailedPrecondition, "is sparse, not dense").await;
    check(&env, 0, pull_sparse("nope", &[own_key(0, 0)]), Code::NotFound, "unknown table").await;
    // The key that would be created first is valid: rows are created only
    // once the whole request is checked.
    check(&env, 0, pull_sparse(E, &[fresh_key(0), foreign_key(0)]), Code::FailedPrecondition, "belongs")
        .await;
    check(&env, 0, pull_sparse(W, &[own_key(0, 0)]), Code::FailedPrecondition, "is dense, not sparse").await;
    check(&env, 0, pull_sparse_bytes(E, vec![0; 7]), Code::InvalidArgument, "multiple of 8").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_registrations_and_joins_change_nothing() {
    let env = Env::start().await;
    let dense = dense_spec();
    let mut other_shape = dense.clone();
    other_shape.layout = Layout::Dense { shape: vec![11], chunk_len: W_CHUNK as u32 };
    let mut other_lr = dense.clone();
    other_lr.optimizer = Rule::sgd(0.25).into();
    let mut zero_chunk = dense.clone();
    zero_chunk.name = "z".into();
    zero_chunk.layout = Layout::Dense { shape: vec![4], chunk_len: 0 };
    let fresh = |name: &str| TableSpec { name: name.into(), ..dense.clone() };
    let adam = |beta1| {
        pb::optimizer_spec::Rule::Adam(pb::Adam {
            lr: 0.1,
            beta1,
            beta2: 0.9,
            eps: 1e-8,
            ..Default::default()
        })
    };
    check(&env, 0, register((&other_shape).into(), SHARDS), Code::AlreadyExists, "different spec").await;
    check(&env, 1, register((&other_lr).into(), SHARDS), Code::AlreadyExists, "different spec").await;
    check(&env, 0, register((&sparse_spec()).into(), 3), Code::FailedPrecondition, "routes over 3").await;
    check(&env, 0, register((&fresh("x")).into(), 1), Code::FailedPrecondition, "routes over 1").await;
    check(&env, 0, register(with_rule(&fresh("x"), sgd(-1.0)), SHARDS), Code::InvalidArgument, "sgd.lr")
        .await;
    check(&env, 0, register(with_rule(&fresh("x"), sgd(f32::NAN)), SHARDS), Code::InvalidArgument, "sgd.lr")
        .await;
    check(&env, 0, register(with_rule(&fresh("x"), adam(1.0)), SHARDS), Code::InvalidArgument, "adam.beta1")
        .await;
    check(&env, 0, register((&zero_chunk).into(), SHARDS), Code::InvalidArgument, "chunk_len").await;
    check(&env, 0, register((&fresh("")).into(), SHARDS), Code::InvalidArgument, "table name").await;
    check(
        &env,
        0,
        Req::Register(pb::RegisterRequest { table: None, num_shards: 2 }),
        Code::InvalidArgument,
        "table",
    )
    .await;
    // Consistency: the first member fixes the model.
    join(1, pb::ConsistencyModel::Bsp, 0).send(&mut env.clients[0].clone()).await.expect("first join");
    check(&env, 0, join(2, pb::ConsistencyModel::Asp, 0), Code::FailedPrecondition, "uses BSP").await;
    check(&env, 0, join(2, pb::ConsistencyModel::Ssp, 1), Code::FailedPrecondition, "uses BSP").await;
    check(&env, 1, join(2, pb::ConsistencyModel::Unspecified, 0), Code::InvalidArgument, "consistency").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_before_registration_is_not_found() {
    let env = Env::unregistered(LocalShards::start(SHARDS).await.expect("start shards")).await;
    env.register(0, &dense_spec()).await;
    env.register(0, &sparse_spec()).await;
    let i = own_chunk(1);
    check(&env, 1, push_dense(&[(W, i, &grad(i, 1.0))]), Code::NotFound, "unknown table `w`").await;
    check(&env, 1, pull_dense(&[(W, i)]), Code::NotFound, "unknown table `w`").await;
    env.register(1, &dense_spec()).await;
    env.seq_is_unused(1).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let shards = {
        let mut config = ServerConfig::default();
        config.transport.max_message_mib = 1;
        LocalShards::start_with(&config, SHARDS).await.expect("start shards")
    };
    let env = Env::unregistered(shards).await;
    for shard in 0..SHARDS as usize {
        env.register(shard, &dense_spec()).await;
        env.register(shard, &sparse_spec()).await;
    }
    let own = own_chunk(0);
    // 2 MiB of gradient for one chunk: refused by the transport, as
    // OUT_OF_RANGE (tonic's code for a message over the decoding limit).
    let big = vec![0.0f32; 1 << 19];
    check_uncounted(&env, 0, push_dense(&[(W, own, &big)]), Code::OutOfRange, "too large").await;
    let keys: Vec<u64> = (0..1 << 18).collect();
    // The answer is over the encoding limit: the service served it, the
    // transport refused to send it, so the shard counts no rejection.
    check_uncounted(&env, 0, pull_sparse(E, &keys), Code::OutOfRange, "too large").await;
    env.seq_is_unused(0).await;
    env.stop().await;
}
