//! Roles and credentials against real in-process shards with auth on: every
//! refusal has its code and changes nothing (values, seqs, clocks, members),
//! and the allowed paths work.

use std::time::{Duration, SystemTime};

use ps_common::auth::{self, Credential, Principal, TokenIssuer};
use ps_common::codec;
use ps_common::optim::Rule;
use ps_common::spec::{Init, TableSpec};
use ps_common::transport::{self, ShardClient, TransportConfig};
use ps_common::wire::pb;
use ps_server::budget::Limits;
use ps_server::local::LocalShards;
use ps_server::{AuthConfig, ServerConfig};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use tonic::Code;

use crate::util::TempDir;

/// One shard with auth on, and the key that signs its tokens.
struct Secured {
    shards: LocalShards,
    issuer: TokenIssuer,
    _dir: TempDir,
}

impl Secured {
    async fn start() -> Secured {
        Secured::start_with(Limits::default()).await
    }

    async fn start_with(limits: Limits) -> Secured {
        let dir = TempDir::new("auth");
        let pair = auth::generate_key_pair().unwrap();
        let key = dir.0.join("token.pub");
        std::fs::write(&key, &pair.public_pem).unwrap();
        let config = ServerConfig {
            auth: AuthConfig { enabled: true, token_key: Some(key) },
            reap_interval_ms: 50,
            limits,
            ..ServerConfig::default()
        };
        let shards = LocalShards::start_with(&config, 1).await.unwrap();
        let issuer = TokenIssuer::from_pem(pair.private_pem.as_bytes()).unwrap();
        Secured { shards, issuer, _dir: dir }
    }

    fn credential(&self, who: Principal) -> Credential {
        Credential::bearer(&self.issuer.issue(who, Duration::from_secs(600)).unwrap()).unwrap()
    }

    async fn client_with(&self, credential: Credential) -> ShardClient {
        let t = TransportConfig::default();
        let channel = transport::endpoint(&t, &self.shards.addrs[0]).unwrap().connect().await.unwrap();
        transport::client(&t, channel, credential)
    }

    async fn client(&self, who: Principal) -> ShardClient {
        self.client_with(self.credential(who)).await
    }
}

fn spec() -> TableSpec {
    TableSpec::dense("w", &[4], Init::zeros(), Rule::sgd(1.0).into())
}

fn push(worker: u64, seq: u64, tick: bool, grad: f32) -> pb::PushDenseRequest {
    pb::PushDenseRequest {
        chunks: vec![pb::DenseChunk { tensor: "w".into(), index: 0, values: codec::encode_f32(&[grad; 4]) }],
        meta: Some(pb::PushMeta { worker, seq, clock: 0, tick, read_clock: 0, codecs: 0 }),
    }
}

fn pull(meta: Option<pb::ReadMeta>) -> pb::PullDenseRequest {
    pb::PullDenseRequest { chunks: vec![pb::ChunkId { tensor: "w".into(), index: 0 }], meta }
}

fn join(worker: u64, lease_ms: u32) -> pb::JoinRequest {
    pb::JoinRequest { worker, lease_ms, ..Default::default() }
}

/// What a refusal must leave as it was: the values, every member's clock
/// and last seq, and the shard's push counters.
#[derive(Debug, PartialEq)]
struct State {
    values: Vec<f32>,
    members: Vec<(u64, u64, u64)>,
    pushes: u64,
    values_pushed: u64,
    sparse_rows: u64,
}

async fn state(admin: &mut ShardClient) -> (State, u64) {
    let values = admin.pull_dense(pull(None)).await.unwrap().into_inner();
    let values = codec::decode_f32("w", &values.chunks[0].values).unwrap();
    let stats = admin.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    // The clock table with each member's last applied seq (a hold of 1 ms).
    let held = admin.hold(pb::HoldRequest { timeout_ms: 1 }).await.unwrap().into_inner();
    admin.release(pb::ReleaseRequest {}).await.unwrap();
    let mut members: Vec<_> = held.workers.iter().map(|w| (w.worker, w.clock, w.last_seq)).collect();
    members.sort_unstable();
    let state = State {
        values,
        members,
        pushes: stats.pushes,
        values_pushed: stats.values_pushed,
        sparse_rows: stats.sparse_rows,
    };
    (state, stats.rejected)
}

fn refused<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, code: Code) {
    match r {
        Err(s) => assert_eq!(s.code(), code, "{what}: {}", s.message()),
        Ok(r) => panic!("{what} was admitted: {r:?}"),
    }
}

#[tokio::test]
async fn every_refusal_has_its_code_and_changes_nothing() {
    let s = Secured::start().await;
    let mut admin = s.client(Principal::Admin).await;
    let mut w0 = s.client(Principal::Worker(0)).await;
    let mut w1 = s.client(Principal::Worker(1)).await;
    let mut reader = s.client(Principal::Reader).await;

    // The job: admin registers, two workers join, worker 0 pushes once.
    let table = Some(pb::TableSpec::from(&spec()));
    admin.register(pb::RegisterRequest { table: table.clone(), num_shards: 1 }).await.unwrap();
    w0.join(join(0, 60_000)).await.unwrap();
    w1.join(join(1, 60_000)).await.unwrap();
    let first = w0.push_dense(push(0, 1, true, 1.0)).await.unwrap().into_inner();
    assert!(first.applied > 0 && !first.duplicate, "{first:?}");
    let (before, rejected_before) = state(&mut admin).await;
    assert_eq!(before.values, vec![-1.0; 4]);
    assert_eq!(before.members, vec![(0, 1, 1), (1, 0, 0)]);

    // No credential, expired token, token of another key: UNAUTHENTICATED.
    let mut anonymous = s.client_with(Credential::none()).await;
    refused("no credential", anonymous.push_dense(push(0, 2, true, 5.0)).await, Code::Unauthenticated);
    refused("no credential", anonymous.stats(pb::StatsRequest {}).await, Code::Unauthenticated);
    let expired = s.issuer.issue_expiring(Principal::Worker(0), SystemTime::now() - Duration::from_secs(60));
    let mut expired = s.client_with(Credential::bearer(&expired.unwrap()).unwrap()).await;
    refused("expired token", expired.push_dense(push(0, 2, true, 5.0)).await, Code::Unauthenticated);
    let stranger = TokenIssuer::from_pem(auth::generate_key_pair().unwrap().private_pem.as_bytes()).unwrap();
    let forged =
        Credential::bearer(&stranger.issue(Principal::Admin, Duration::from_secs(600)).unwrap()).unwrap();
    let mut forged = s.client_with(forged).await;
    refused("another key's token", forged.push_dense(push(0, 2, true, 5.0)).await, Code::Unauthenticated);
    refused("another key's token", forged.leave(pb::LeaveRequest { worker: 0 }).await, Code::Unauthenticated);

    // A reader pushing, or acting as a member.
    refused("reader push", reader.push_dense(push(0, 2, true, 5.0)).await, Code::PermissionDenied);
    refused(
        "reader register",
        reader.register(pb::RegisterRequest { table, num_shards: 1 }).await,
        Code::PermissionDenied,
    );
    let member_read = Some(pb::ReadMeta { worker: 0, clock: 1, compressed: false });
    refused("reader member read", reader.pull_dense(pull(member_read)).await, Code::PermissionDenied);

    // Worker 1 acting as worker 0: a high seq (which would make worker 0's
    // real pushes duplicates), a tick, a pull, a join, a heartbeat, a leave,
    // a data range.
    refused("seq as another", w1.push_dense(push(0, 1_000, false, 5.0)).await, Code::PermissionDenied);
    refused("tick as another", w1.push_dense(push(0, 2, true, 0.0)).await, Code::PermissionDenied);
    let sparse = pb::PushSparseRequest {
        table: "w".into(),
        keys: codec::encode_u64(&[1]),
        grads: codec::encode_f32(&[1.0]),
        meta: Some(pb::PushMeta { worker: 0, seq: 1_000, ..Default::default() }),
    };
    refused("sparse push as another", w1.push_sparse(sparse).await, Code::PermissionDenied);
    refused("pull as another", w1.pull_dense(pull(member_read)).await, Code::PermissionDenied);
    let creating = pb::PullSparseRequest {
        table: "w".into(),
        keys: codec::encode_u64(&[1]),
        meta: Some(pb::ReadMeta { worker: 0, clock: 0, compressed: false }),
        read_only: false,
    };
    refused("row-creating pull as another", w1.pull_sparse(creating).await, Code::PermissionDenied);
    refused("join as another", w1.join(join(0, 60_000)).await, Code::PermissionDenied);
    refused(
        "heartbeat as another",
        w1.heartbeat(pb::HeartbeatRequest { worker: 0 }).await,
        Code::PermissionDenied,
    );
    refused("leave as another", w1.leave(pb::LeaveRequest { worker: 0 }).await, Code::PermissionDenied);
    let take = pb::TakeRangeRequest {
        worker: 0,
        plan: Some(pb::DataPlan { epochs: 1, batches_per_epoch: 4, range_batches: 1 }),
        ..Default::default()
    };
    refused("range as another", w1.take_range(take).await, Code::PermissionDenied);

    // A worker calling admin's RPCs.
    refused("worker stats", w1.stats(pb::StatsRequest {}).await, Code::PermissionDenied);
    refused("worker hold", w1.hold(pb::HoldRequest { timeout_ms: 1 }).await, Code::PermissionDenied);
    let cut = pb::CutRequest { checkpoint: "c".into(), limits: Vec::new(), timeout_ms: 1 };
    refused("worker cut", w1.cut(cut).await, Code::PermissionDenied);
    refused("worker release", w1.release(pb::ReleaseRequest {}).await, Code::PermissionDenied);
    refused("reader cut", reader.release(pb::ReleaseRequest {}).await, Code::PermissionDenied);

    let (after, rejected_after) = state(&mut admin).await;
    assert_eq!(after, before, "a refused request changed the shard");
    assert_eq!(rejected_after - rejected_before, 22, "every refusal is counted");

    // Worker 0's own next push (seq 2) is applied, not taken for a
    // duplicate of the seq worker 1 tried to claim.
    let next = w0.push_dense(push(0, 2, true, 1.0)).await.unwrap().into_inner();
    assert!(next.applied > 0 && !next.duplicate, "{next:?}");
    let (last, _) = state(&mut admin).await;
    assert_eq!(last.values, vec![-2.0; 4]);
    // Its seq is recorded; its clock stays 1 (this push says clock 0, and a
    // tick only moves a clock forward, to the push's clock + 1).
    assert_eq!(last.members, vec![(0, 1, 2), (1, 0, 0)]);
    s.shards.stop().await.unwrap();
}

#[tokio::test]
async fn a_heartbeat_as_another_worker_does_not_renew_its_lease() {
    let s = Secured::start().await;
    let mut admin = s.client(Principal::Admin).await;
    let mut w2 = s.client(Principal::Worker(2)).await;
    let mut w3 = s.client(Principal::Worker(3)).await;
    w2.join(join(2, 100)).await.unwrap();
    // Worker 3 heartbeats as worker 2 for well past its lease: refused each
    // time, so worker 2 is dropped when its lease runs out.
    for _ in 0..12 {
        refused(
            "heartbeat as another",
            w3.heartbeat(pb::HeartbeatRequest { worker: 2 }).await,
            Code::PermissionDenied,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = admin.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.clocks.iter().all(|c| c.worker != 2), "worker 2 kept alive: {:?}", stats.clocks);
    s.shards.stop().await.unwrap();
}

#[tokio::test]
async fn readers_read_without_creating_and_workers_train_with_roles_on() {
    let s = Secured::start().await;
    let opts = |who| ClientOptions { credential: s.credential(who), ..ClientOptions::default() };
    let (rows, dense) = (TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), spec());

    // Two workers register, join, and train a few iterations under BSP
    // through the sharded client (the start barrier reads heartbeats).
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let c = ShardedClient::connect(&s.shards.addrs, w, opts(Principal::Worker(w))).await.unwrap();
        c.register(&dense).await.unwrap();
        c.register(&rows).await.unwrap();
        workers.push(c);
    }
    let bsp = ps_common::spec::Consistency::Bsp;
    for c in &mut workers {
        c.join(bsp, Duration::from_secs(30), 0).await.unwrap();
    }
    assert!(workers[0].wait_for_members(2, Duration::from_secs(5)).await.unwrap());
    let set = DenseSet::new(std::slice::from_ref(&dense), 1).unwrap();
    let mut handles = Vec::new();
    for mut c in workers {
        let set = set.clone();
        handles.push(tokio::spawn(async move {
            let mut buf = vec![0.0f32; 4];
            for clock in 0..3u64 {
                c.pull_dense(&set, clock, &mut buf).await.unwrap();
                c.push_sparse("e", 2, &[7], &[1.0, 1.0], clock, clock, false).await.unwrap();
                c.push_dense(&set, &[0.5; 4], clock, clock, true).await.unwrap();
            }
            c.leave().await.unwrap();
        }));
    }
    for h in handles {
        h.await.unwrap();
    }

    // A reader: stats, tables, dense values, rows, and a read-only lookup
    // of an unseen key, which creates no row.
    let reader = ShardedClient::connect(&s.shards.addrs, auth::OUTSIDE_READERS, opts(Principal::Reader))
        .await
        .unwrap();
    assert_eq!(reader.list_tables().await.unwrap().len(), 2);
    let mut values = vec![0.0f32; 4];
    reader.pull_dense(&set, 0, &mut values).await.unwrap();
    assert_eq!(values, vec![-3.0; 4], "2 workers x 3 iterations x 0.5");
    let (keys, rows_read) = reader.scan_sparse("e", 2).await.unwrap();
    assert_eq!((keys, rows_read), (vec![7], vec![-6.0, -6.0]));
    let mut unseen = vec![0.0f32; 2];
    reader.lookup_sparse("e", 2, &[99], 0, &mut unseen).await.unwrap();
    let stats = reader.stats().await.unwrap();
    assert_eq!(stats[0].sparse_rows, 1, "a reader's lookup created a row");
    s.shards.stop().await.unwrap();
}

/// Sends `n` ListTables on `client`; the number admitted. Every refusal
/// must be RESOURCE_EXHAUSTED.
async fn admitted(client: &mut ShardClient, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        match client.list_tables(pb::ListTablesRequest {}).await {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message()),
        }
    }
    ok
}

#[tokio::test]
async fn the_rate_limit_is_per_principal_and_bad_credentials_are_bounded_per_host() {
    const BURST: usize = 20;
    let s =
        Secured::start_with(Limits { requests_per_sec: 1, burst: BURST as u32, ..Limits::default() }).await;
    let started = std::time::Instant::now();
    // Worker 1 on ten connections: one bucket among them.
    let w1 = s.credential(Principal::Worker(1));
    let mut ok = 0;
    for _ in 0..10 {
        ok += admitted(&mut s.client_with(w1.clone()).await, 5).await;
    }
    // The bucket refills at 1 a second while the test runs.
    let refill = started.elapsed().as_secs() as usize + 1;
    assert!((BURST..=BURST + refill).contains(&ok), "worker 1 got {ok} of 50 over 10 connections");
    // Worker 2 has its own bucket; its token is checked now, before the flood.
    let mut w2 = s.client(Principal::Worker(2)).await;
    assert_eq!(admitted(&mut w2, 10).await, 10);

    // Tokens signed by another key, from this host: each failed check takes
    // a token of the host's bucket; once it is empty they are refused before
    // their signature is checked.
    let stranger = TokenIssuer::from_pem(auth::generate_key_pair().unwrap().private_pem.as_bytes()).unwrap();
    let forged = Credential::bearer(&stranger.issue(Principal::Worker(1), Duration::from_secs(600)).unwrap());
    let mut bad = s.client_with(forged.unwrap()).await;
    let (mut unauthenticated, mut limited) = (0, 0);
    for _ in 0..2 * BURST {
        match bad.list_tables(pb::ListTablesRequest {}).await {
            Err(st) if st.code() == Code::Unauthenticated => unauthenticated += 1,
            Err(st) if st.code() == Code::ResourceExhausted => {
                assert!(st.message().contains("unauthenticated requests from 127.0.0.1"), "{}", st.message());
                limited += 1;
            }
            other => panic!("a forged token got {other:?}"),
        }
    }
    assert!(unauthenticated >= BURST && limited > 0, "{unauthenticated} checked, {limited} limited");
    // A token checked before the flood still works; a new one from the same
    // host waits for the host's bucket to refill.
    assert_eq!(admitted(&mut w2, 5).await, 5);
    let mut w3 = s.client(Principal::Worker(3)).await;
    refused(
        "a new token while its host is limited",
        w3.list_tables(pb::ListTablesRequest {}).await,
        Code::ResourceExhausted,
    );
    let mut admin = s.client(Principal::Admin).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stats = admin.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    // Worker 1's refusals, the unchecked forged tokens and worker 3's.
    assert!(stats.rate_limited as usize > 50 - ok + limited, "{stats:?}");
    s.shards.stop().await.unwrap();
}
