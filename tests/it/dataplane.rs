//! The data plane (`ps_common::dataplane`): pulls and pushes on it read and
//! change the same state as over gRPC, a refused request gets the same
//! status on both paths, hostile frames end only their own connection, and
//! a client notices a shard that stopped instead of waiting on it.

use std::time::{Duration, Instant};

use ps_common::codec;
use ps_common::dataplane::{DataLink, Kind};
use ps_common::optim::Rule;
use ps_common::partition::{key_shard, splitmix64};
use ps_common::spec::{Consistency, Init, InitKind, Layout, TableSpec};
use ps_common::transport::{TransportConfig, pushback};
use ps_common::wire::pb;
use ps_server::local::LocalShards;
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::util::raw_client;

fn specs() -> (TableSpec, TableSpec) {
    let init = Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: 5 };
    let dense = TableSpec::dense("w", &[3000], init, Rule::adam(0.01).into());
    let sparse = TableSpec::sparse(
        "e",
        4,
        init,
        Rule::Adagrad { lr: 0.1, eps: 1e-8, initial_accumulator: 0.1, weight_decay: 0.0 }.into(),
    );
    (dense, sparse)
}

async fn client(shards: &LocalShards, worker: u64, data_plane: bool) -> ShardedClient {
    let mut opts = ClientOptions::default();
    opts.transport.data_plane = data_plane;
    ShardedClient::connect(&shards.addrs, worker, opts).await.expect("connect")
}

/// The data-plane port shard `addr` advertises.
async fn data_port(addr: &str) -> u16 {
    let port = raw_client(addr)
        .await
        .data_plane(pb::DataPlaneRequest {})
        .await
        .expect("DataPlane")
        .into_inner()
        .port;
    assert_ne!(port, 0, "an in-process shard serves a data plane by default");
    port as u16
}

/// A second client pushing as a worker id whose seqs the shards already
/// hold (two processes given one id, or a worker started again without
/// `join`) is told so, on the data plane and over gRPC, instead of having
/// its pushes answered as duplicates and dropped unseen; nothing it sent
/// is applied. After `join` it continues the worker's seqs and its pushes
/// apply.
#[tokio::test]
async fn a_push_whose_seq_another_client_used_is_an_error_not_a_silent_drop() {
    let shards = LocalShards::start(2).await.expect("start");
    let (dense, sparse) = specs();
    let set = DenseSet::new(std::slice::from_ref(&dense), 2).unwrap();
    let grad = vec![0.5f32; set.len()];
    let keys: Vec<u64> = (0..64).map(|k| k * 7919).collect();
    let rows = vec![0.25f32; keys.len() * 4];
    for (worker, data_plane) in [(10, true), (20, false)] {
        let mut first = client(&shards, worker, data_plane).await;
        first.register(&dense).await.unwrap();
        first.register(&sparse).await.unwrap();
        for clock in 0..3 {
            first.push_dense(&set, &grad, clock, clock, false).await.unwrap();
            first.push_sparse("e", 4, &keys, &rows, clock, clock, false).await.unwrap();
        }
        let before = read_all(&first, &set, &keys).await;

        let mut second = client(&shards, worker, data_plane).await;
        let err = second.push_dense(&set, &grad, 0, 0, false).await.unwrap_err();
        assert!(
            matches!(err, ps_worker::Error::SeqTaken { worker: w, seq: 1, .. } if w == worker),
            "data plane {data_plane}: {err}"
        );
        assert!(err.to_string().contains("another client is pushing as worker"), "{err}");
        let err = second.push_sparse("e", 4, &keys, &rows, 0, 0, false).await.unwrap_err();
        assert!(matches!(err, ps_worker::Error::SeqTaken { .. }), "data plane {data_plane}: {err}");
        assert!(
            read_all(&second, &set, &keys).await == before,
            "data plane {data_plane}: a refused push changed values"
        );

        second.join(Consistency::Asp, Duration::from_secs(60), 0).await.unwrap();
        second.push_dense(&set, &grad, 3, 3, false).await.unwrap();
        second.push_sparse("e", 4, &keys, &rows, 3, 3, false).await.unwrap();
        let after = read_all(&second, &set, &keys).await;
        assert!(
            after.0 != before.0 && after.1 != before.1,
            "data plane {data_plane}: pushes after join not applied"
        );
    }
}

#[tokio::test]
async fn both_paths_read_and_change_the_same_state() {
    let shards = LocalShards::start(2).await.expect("start");
    let (dense, sparse) = specs();
    let mut fast = client(&shards, 1, true).await;
    let mut slow = client(&shards, 2, false).await;
    fast.register(&dense).await.unwrap();
    fast.register(&sparse).await.unwrap();
    slow.register(&dense).await.unwrap();
    let set = DenseSet::new(&[dense], 2).unwrap();
    let keys: Vec<u64> = (0..500).map(|k| k * 7919).collect();

    // Pushes alternate between the paths; after each, both read the same.
    for round in 0..4u64 {
        let grad: Vec<f32> = (0..set.len()).map(|i| ((i as u64 + round) % 7) as f32 - 3.0).collect();
        let rows: Vec<f32> = (0..keys.len() * 4).map(|i| ((i as u64 * 3 + round) % 5) as f32 - 2.0).collect();
        let pusher = if round % 2 == 0 { &mut fast } else { &mut slow };
        pusher.push_dense(&set, &grad, round, round, false).await.unwrap();
        pusher.push_sparse("e", 4, &keys, &rows, round, round, false).await.unwrap();
        let (mut a, mut b) = (vec![0.0; set.len()], vec![0.0; set.len()]);
        fast.pull_dense(&set, 0, &mut a).await.unwrap();
        slow.pull_dense(&set, 0, &mut b).await.unwrap();
        assert_eq!(a, b, "dense values after round {round}");
        let (mut a, mut b) = (vec![0.0; keys.len() * 4], vec![0.0; keys.len() * 4]);
        fast.pull_sparse("e", 4, &keys, 0, &mut a).await.unwrap();
        slow.pull_sparse("e", 4, &keys, 0, &mut b).await.unwrap();
        assert_eq!(a, b, "sparse rows after round {round}");
    }
    // Every push was applied once: each round pushed to the shards holding
    // a dense chunk and to both shards' rows.
    let dense_shards = set.shard_loads().iter().filter(|&&n| n > 0).count() as u64;
    let stats = fast.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.pushes).sum::<u64>(), 4 * (dense_shards + 2));
    assert_eq!(stats.iter().map(|s| s.duplicate_pushes).sum::<u64>(), 0);
    shards.stop().await.unwrap();
}

/// A gradient handed over as [`SharedF32`] (its bytes sent as they are, the
/// trainer's way) is applied bit for bit as the same floats copied into the
/// request, on the data plane and over gRPC, alone and with the next pull;
/// and its vector is back in its pool once the push is done.
#[tokio::test]
async fn a_shared_gradient_is_applied_as_a_copied_one() {
    let shards = LocalShards::start(2).await.expect("start");
    // Constant: a seeded initializer draws other values for another table's name.
    let init = Init { kind: InitKind::Constant { value: 0.5 }, seed: 5 };
    for data_plane in [true, false] {
        let mut c = client(&shards, if data_plane { 1 } else { 2 }, data_plane).await;
        let [copied, shared] = ["copied", "shared"]
            .map(|t| TableSpec::dense(format!("{t}.{data_plane}"), &[3000], init, Rule::adam(0.01).into()));
        c.register(&copied).await.unwrap();
        c.register(&shared).await.unwrap();
        let (copied, shared) = (DenseSet::new(&[copied], 2).unwrap(), DenseSet::new(&[shared], 2).unwrap());
        let pool = codec::F32Pool::default();
        let (mut a, mut b) = (vec![0.0; copied.len()], vec![0.0; shared.len()]);
        for clock in 0..6u64 {
            let mut grad = pool.take(shared.len());
            let at = grad.as_ptr();
            grad.iter_mut().enumerate().for_each(|(i, g)| *g = ((i as u64 * 7 + clock) % 11) as f32 - 5.0);
            let copy = grad.clone();
            let grad = codec::SharedF32::pooled(grad, &pool);
            if clock % 2 == 0 {
                c.push_dense(&copied, &copy, clock, clock, false).await.unwrap();
                c.push_dense(&shared, &grad, clock, clock, false).await.unwrap();
            } else {
                assert!(c.push_and_pull_dense(&copied, &copy, clock, &mut a).await.unwrap());
                assert!(c.push_and_pull_dense(&shared, &grad, clock, &mut b).await.unwrap());
                assert_eq!(a, b, "pulled with push {clock} (data plane {data_plane})");
            }
            drop(grad);
            let back = pool.take(shared.len());
            assert_eq!(back.as_ptr(), at, "push {clock}: the vector is back");
        }
        c.pull_dense(&copied, 0, &mut a).await.unwrap();
        c.pull_dense(&shared, 0, &mut b).await.unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "data plane {data_plane}");
    }
    shards.stop().await.unwrap();
}

/// With `on_huge_gradient = "clip"`, a gradient value over `max_gradient`
/// is applied clipped and counted, on the data plane (where the shard uses
/// the gradient where it lies in the frame) and over gRPC, dense and
/// sparse; the values the worker handed over are left as they were.
#[tokio::test]
async fn huge_gradient_values_are_clipped_on_both_paths() {
    use ps_server::budget::{Limits, OnHuge};
    let limits = Limits { max_gradient: 10.0, on_huge_gradient: OnHuge::Clip, ..Default::default() };
    let shards = LocalShards::start_with(&ps_server::ServerConfig { limits, ..Default::default() }, 1)
        .await
        .expect("start");
    let init = Init { kind: InitKind::Constant { value: 0.0 }, seed: 0 };
    for (worker, data_plane) in [(1, true), (2, false)] {
        let mut c = client(&shards, worker, data_plane).await;
        let dense = TableSpec::dense(format!("w{worker}"), &[4000], init, Rule::sgd(1.0).into());
        let table = format!("e{worker}");
        c.register(&dense).await.unwrap();
        c.register(&TableSpec::sparse(&table, 4, init, Rule::sgd(1.0).into())).await.unwrap();
        let set = DenseSet::new(&[dense], 1).unwrap();
        let grad: Vec<f32> = (0..set.len()).map(|i| [1e6, -3.0, -50.0, 7.5][i % 4]).collect();
        let shared = codec::SharedF32::new(grad.clone());
        c.push_dense(&set, &shared, 0, 0, false).await.unwrap();
        c.push_sparse(&table, 4, &[5, 9], &grad[..8], 0, 0, false).await.unwrap();
        assert_eq!(shared.as_slice(), &grad[..], "the worker's floats are not clipped in place");
        let (mut values, mut rows) = (vec![0.0; set.len()], vec![0.0; 8]);
        c.pull_dense(&set, 0, &mut values).await.unwrap();
        c.pull_sparse(&table, 4, &[5, 9], 0, &mut rows).await.unwrap();
        for (v, g) in values.iter().chain(&rows).zip(grad.iter().chain(&grad[..8])) {
            assert_eq!(*v, -g.clamp(-10.0, 10.0), "data plane {data_plane}");
        }
    }
    let stats = client(&shards, 9, false).await.stats().await.unwrap();
    // Half of each push's values were over the limit, on each path.
    assert_eq!(stats.iter().map(|s| s.clipped_values).sum::<u64>(), 2 * (4000 / 2 + 8 / 2));
    shards.stop().await.unwrap();
}

/// A peer holding every data-plane slot of the shards (connections that
/// send nothing: each holds its slot until the hello timeout) does not stop
/// a worker: a call that finds no connection goes over gRPC instead, with
/// the same result, and every push is applied once.
#[tokio::test]
async fn a_worker_shut_out_of_the_data_plane_goes_on_over_grpc() {
    let limits = ps_server::budget::Limits { max_data_connections: 2, ..Default::default() };
    let config = ps_server::ServerConfig { limits, ..Default::default() };
    let shards = LocalShards::start_with(&config, 2).await.expect("start");
    let mut squatters = Vec::new();
    for addr in &shards.addrs {
        let port = data_port(addr).await;
        for _ in 0..2 {
            squatters.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect"));
        }
    }
    // Both slots of each shard are taken once the shard has accepted them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (dense, sparse) = specs();
    let mut opts = ClientOptions { recover_within: Duration::from_secs(2), ..ClientOptions::default() };
    opts.transport.local_socket = false;
    let mut worker = ShardedClient::connect(&shards.addrs, 1, opts).await.expect("connect");
    let reader = client(&shards, 2, false).await;
    worker.register(&dense).await.unwrap();
    worker.register(&sparse).await.unwrap();
    worker.join(Consistency::Asp, Duration::from_secs(30), 0).await.unwrap();
    let set = DenseSet::new(&[dense], 2).unwrap();
    let keys: Vec<u64> = (0..300).map(|k| k * 7919).collect();
    let started = Instant::now();
    let mut pulled = vec![0.0; set.len()];
    for clock in 0..3u64 {
        let grad: Vec<f32> = (0..set.len()).map(|i| ((i as u64 + clock) % 7) as f32 - 3.0).collect();
        let rows: Vec<f32> = (0..keys.len() * 4).map(|i| ((i as u64 + clock) % 5) as f32 - 2.0).collect();
        worker.push_sparse("e", 4, &keys, &rows, clock, clock, false).await.expect("sparse push over gRPC");
        let complete = worker.push_and_pull_dense(&set, &grad, clock, &mut pulled).await;
        assert!(complete.expect("push and pull over gRPC"), "the pull went through");
    }
    let mut exact = vec![0.0; set.len()];
    reader.pull_dense(&set, 0, &mut exact).await.unwrap();
    assert_eq!(pulled, exact, "the worker's last pull read every push");
    let (mut a, mut b) = (vec![0.0; keys.len() * 4], vec![0.0; keys.len() * 4]);
    worker.pull_sparse("e", 4, &keys, 0, &mut a).await.expect("sparse pull over gRPC");
    reader.pull_sparse("e", 4, &keys, 0, &mut b).await.unwrap();
    assert_eq!(a, b);
    // Within the squatters' hello timeout (10 s): their slots were held throughout.
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    // Each round: a ticking dense push to both shards, rows on both.
    let stats = reader.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.pushes).sum::<u64>(), 3 * (2 + 2));
    assert_eq!(stats.iter().map(|s| s.duplicate_pushes).sum::<u64>(), 0);
    drop(squatters);
    shards.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_request_reads_the_same_on_both_paths() {
    let shards = LocalShards::start(2).await.expect("start");
    let (_, sparse) = specs();
    client(&shards, 1, false).await.register(&sparse).await.unwrap();
    let addr = &shards.addrs[0];
    let link =
        DataLink::new(&TransportConfig::default(), ("127.0.0.1", data_port(addr).await, None), None, None)
            .unwrap();
    let mut grpc = raw_client(addr).await;
    let other = (0..).find(|&k| key_shard(k, 2) == 1).unwrap();
    let mine = (0..).find(|&k| key_shard(k, 2) == 0).unwrap();
    let pull = |table: &str, keys: &[u64]| pb::PullSparseRequest {
        table: table.into(),
        keys: codec::encode_u64(keys),
        meta: None,
        read_only: false,
    };
    let push = |keys: &[u64], grads: &[f32], seq: u64| pb::PushSparseRequest {
        table: "e".into(),
        keys: codec::encode_u64(keys),
        grads: codec::encode_f32(grads),
        meta: Some(pb::PushMeta { worker: 3, seq, ..Default::default() }),
    };
    let t = Duration::from_secs(10);
    let pulls = [pull("nope", &[mine]), pull("e", &[other]), pull("e", &[mine, mine])];
    for (i, msg) in pulls.into_iter().enumerate() {
        let fast = link.call::<_, pb::PullSparseResponse>(Kind::PullSparse, &msg, t).await.unwrap_err();
        let slow = grpc.pull_sparse(msg).await.unwrap_err();
        assert_eq!((fast.code(), fast.message()), (slow.code(), slow.message()), "pull {i}");
        assert_ne!(fast.code(), Code::Ok);
    }
    let pushes =
        [push(&[mine], &[1.0; 3], 1), push(&[mine], &[f32::NAN; 4], 1), push(&[mine], &[1.0; 4], 1 << 40)];
    for (i, msg) in pushes.into_iter().enumerate() {
        let fast = link.call::<_, pb::PushResponse>(Kind::PushSparse, &msg, t).await.unwrap_err();
        let slow = grpc.push_sparse(msg).await.unwrap_err();
        assert_eq!((fast.code(), fast.message()), (slow.code(), slow.message()), "push {i}");
    }
    // Nothing was applied: the first good push is seq 1.
    let ok =
        link.call::<_, pb::PushResponse>(Kind::PushSparse, &push(&[mine], &[1.0; 4], 1), t).await.unwrap();
    assert_eq!((ok.applied, ok.duplicate), (1, false));
    let again = grpc.push_sparse(push(&[mine], &[1.0; 4], 1)).await.unwrap().into_inner();
    assert!(again.duplicate, "the same (worker, seq) over gRPC is the same push");
    shards.stop().await.unwrap();
}

/// Writes `bytes` on a fresh connection to the data plane and reads until
/// the shard closes it (or 5 s pass): what the shard answered.
async fn send_raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    answer
}

pub(crate) fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn hostile_frames_end_their_connection_and_nothing_else() {
    let shards = LocalShards::start(1).await.expect("start");
    let (dense, _) = specs();
    let good = client(&shards, 1, true).await;
    good.register(&dense).await.unwrap();
    let set = DenseSet::new(&[dense], 1).unwrap();
    let mut before = vec![0.0; set.len()];
    good.pull_dense(&set, 0, &mut before).await.unwrap();
    let port = data_port(&shards.addrs[0]).await;

    // An HTTP/2 client on the wrong port: its preface reads as a frame of
    // half a GiB, over the limit, and the connection is closed.
    assert!(send_raw(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.is_empty());
    // A first frame that is not a hello: told so, and closed.
    let answer = send_raw(port, &frame(0, b"GET / HTTP/1.1")).await;
    assert!(String::from_utf8_lossy(&answer).contains("not a data-plane client"), "{answer:?}");
    // A frame announcing 2 GiB: closed at its header, nothing allocated.
    assert!(send_raw(port, &[0, 0, 0, 0x80, 0]).await.is_empty());
    // A frame cut short by the client's end of stream: closed.
    assert!(send_raw(port, &[100, 0, 0, 0, 0, b'P']).await.is_empty());
    // After a good hello: an unknown kind and an undecodable body are
    // answered with a status each, on the same connection.
    let mut bytes = frame(0, b"PSD1");
    bytes.extend(frame(9, b""));
    bytes.extend(frame(1, &[0xff; 7]));
    let answer = send_raw(port, &bytes).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("no data-plane request of kind 9") && text.contains("undecodable request"),
        "{text}"
    );

    // The shard still serves, and nothing changed.
    let mut after = vec![0.0; set.len()];
    good.pull_dense(&set, 0, &mut after).await.unwrap();
    assert_eq!(before, after);
    shards.stop().await.unwrap();
}

/// A push of `values` floats of gradient for chunk 0 of `w`, as worker 5.
fn dense_push(values: usize, seq: u64) -> pb::PushDenseRequest {
    pb::PushDenseRequest {
        chunks: vec![pb::DenseChunk {
            tensor: "w".into(),
            index: 0,
            values: codec::encode_f32(&vec![0.5; values]),
        }],
        meta: Some(pb::PushMeta { worker: 5, seq, ..Default::default() }),
    }
}

/// Request bytes in flight are charged to the shard's `max_inflight_mib` as
/// they arrive: a request larger than the budget is refused with
/// RESOURCE_EXHAUSTED on both paths before the shard holds it, the data-plane
/// connection goes on (the refused frame is read and dropped), and every
/// refused request gives its bytes back: requests within the budget are
/// served after any number of refusals.
#[tokio::test]
async fn requests_over_the_in_flight_budget_are_refused_and_give_their_bytes_back() {
    let limits = ps_server::budget::Limits { max_inflight_mib: 1, ..Default::default() };
    let config = ps_server::ServerConfig { limits, ..Default::default() };
    let shards = LocalShards::start_with(&config, 1).await.expect("start");
    let (dense, _) = specs();
    client(&shards, 1, false).await.register(&dense).await.unwrap();
    let addr = &shards.addrs[0];
    let port = data_port(addr).await;
    let link = DataLink::new(&TransportConfig::default(), ("127.0.0.1", port, None), None, None).unwrap();
    let mut grpc = raw_client(addr).await;
    let t = Duration::from_secs(10);
    // 2 MiB of gradient: over the whole budget.
    let big = || dense_push(1 << 19, 1);
    let mut seq = 0;
    // Enough rounds that the bytes of the requests, had any stayed charged,
    // would add up to more than the budget.
    for _ in 0..50 {
        let slow = grpc.push_dense(big()).await.unwrap_err();
        assert_eq!(slow.code(), Code::ResourceExhausted, "{slow:?}");
        assert!(slow.message().contains("max_inflight_mib"), "{}", slow.message());
        let fast = link.call::<_, pb::PushResponse>(Kind::PushDense, &big(), t).await.unwrap_err();
        assert_eq!(fast.code(), Code::ResourceExhausted, "{fast:?}");
        // Larger than the budget: it would never fit, so nothing says to
        // send it again.
        assert_eq!((pushback(&slow), pushback(&fast)), (None, None));
        assert!(fast.message().contains("max_inflight_mib"), "{}", fast.message());
        // The tensor's 3000 values (12 KB) fit, on both paths, and apply.
        seq += 1;
        let ok = grpc.push_dense(dense_push(3000, seq)).await.expect("a push within the budget").into_inner();
        assert_eq!((ok.applied, ok.duplicate), (3000, false));
        seq += 1;
        let ok = link.call::<_, pb::PushResponse>(Kind::PushDense, &dense_push(3000, seq), t).await.unwrap();
        assert_eq!((ok.applied, ok.duplicate), (3000, false));
    }
    assert_eq!(link.resends(), 0, "the refused frames did not cost the connection");

    // On one raw connection: a hello, a refused 2 MiB request, then a request
    // of an unknown kind: both answered, in order.
    let mut bytes = frame(0, b"PSD1");
    bytes.extend(frame(Kind::PushDense as u8, &vec![7; 2 << 20]));
    bytes.extend(frame(9, b""));
    let answer = send_raw(port, &bytes).await;
    let text = String::from_utf8_lossy(&answer);
    let (refused, unknown) = (text.find("max_inflight_mib"), text.find("no data-plane request of kind 9"));
    assert!(matches!((refused, unknown), (Some(a), Some(b)) if a < b), "{text}");
    // A hello is a magic and a token: one of 20 KiB is not read, and the
    // connection is closed.
    let mut hello = b"PSD1".to_vec();
    hello.extend(vec![b'a'; 20 << 10]);
    assert!(send_raw(port, &frame(0, &hello)).await.is_empty());
    shards.stop().await.unwrap();
}

#[tokio::test]
async fn a_stopped_shard_is_noticed_not_waited_for() {
    let shards = LocalShards::start(1).await.expect("start");
    let (dense, _) = specs();
    let mut opts = ClientOptions { read_timeout: Duration::from_secs(20), ..ClientOptions::default() };
    opts.transport.connect_timeout = Duration::from_secs(2);
    let c = ShardedClient::connect(&shards.addrs, 1, opts).await.unwrap();
    c.register(&dense).await.unwrap();
    let set = DenseSet::new(&[dense], 1).unwrap();
    let mut out = vec![0.0; set.len()];
    c.pull_dense(&set, 0, &mut out).await.unwrap();
    shards.stop().await.unwrap();
    let started = Instant::now();
    let err = c.pull_dense(&set, 0, &mut out).await.expect_err("the shard is gone");
    assert!(err.is_unreachable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "noticed in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_push_and_the_next_pull_in_one_write_run_in_order() {
    // Two clusters in the same state: one trained through the pipelined
    // push-and-pull of the data plane, the other with a push, then a pull,
    // over gRPC. The pipelined pull sees its own push: both read the same.
    let (a, b) = (LocalShards::start(2).await.expect("start"), LocalShards::start(2).await.expect("start"));
    let (dense, _) = specs();
    let mut fast = client(&a, 1, true).await;
    let mut slow = client(&b, 1, false).await;
    fast.register(&dense).await.unwrap();
    slow.register(&dense).await.unwrap();
    let set = DenseSet::new(&[dense], 2).unwrap();
    let (mut x, mut y) = (vec![0.0; set.len()], vec![0.0; set.len()]);
    for clock in 0..5u64 {
        let grad: Vec<f32> = (0..set.len()).map(|i| ((i as u64 + clock) % 7) as f32 - 3.0).collect();
        assert!(fast.push_and_pull_dense(&set, &grad, clock, &mut x).await.unwrap());
        slow.push_dense(&set, &grad, clock, clock, true).await.unwrap();
        slow.pull_dense(&set, clock + 1, &mut y).await.unwrap();
        assert_eq!(x, y, "values read after the push of clock {clock}");
    }
    let stats = fast.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.pushes).sum::<u64>(), 5 * 2, "one push per shard per clock");
    assert_eq!(stats.iter().map(|s| s.duplicate_pushes).sum::<u64>(), 0);

    // A client that writes many requests at once and reads nothing until
    // the end: every answer comes back, in order.
    let owner = ps_common::partition::chunk_shard("w", 0, 2);
    let port = data_port(&a.addrs[owner as usize]).await;
    let mut bytes = frame(0, b"PSD1");
    let pull =
        |index| pb::PullDenseRequest { chunks: vec![pb::ChunkId { tensor: "w".into(), index }], meta: None };
    for n in 0..2000u32 {
        let msg = if n % 2 == 0 { pull(0) } else { pull(u32::MAX) };
        bytes.extend(frame(Kind::PullDense as u8, &prost::Message::encode_to_vec(&msg)));
    }
    let answer = send_raw(port, &bytes).await;
    let mut reader = ps_common::dataplane::FrameReader::new(1 << 26);
    let mut src = answer.as_slice();
    let mut kinds = Vec::new();
    while let Some((kind, _)) = reader.next(&mut src).await.unwrap() {
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 2001, "the hello's answer and one per request");
    assert!(kinds[1..].iter().step_by(2).all(|&k| k == 0), "the good pulls are answered OK");
    assert!(kinds[2..].iter().step_by(2).all(|&k| k != 0), "the bad ones are refused, in their places");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// The dense set's values and the rows of `keys` in table `e`.
/// A pull's answer carries a chunk as it was when the pull read it, even
/// when a push to that chunk is applied while the answer is still being
/// written out: the shard answers from the chunk's values themselves, and a
/// push copies them first while an answer holds them (copy on write,
/// `ps-server/src/store.rs`). One 1M-float chunk (4 MiB, more than a
/// loopback socket takes at once), pushed a gradient of ones under SGD with
/// learning rate 1 while another client pulls it: every value of a pull is
/// the same, and the pulls saw several pushes' results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_answer_being_written_never_shows_a_push_applied_meanwhile() {
    const ROUNDS: u64 = 40;
    let shards = LocalShards::start(1).await.expect("start");
    let n = 1usize << 20;
    let mut spec = TableSpec::dense("big", &[n as u64], Init::zeros(), Rule::sgd(1.0).into());
    spec.layout = Layout::Dense { shape: vec![n as u64], chunk_len: n as u32 };
    let mut pusher = client(&shards, 1, true).await;
    pusher.register(&spec).await.unwrap();
    let puller = client(&shards, 2, true).await;
    let set = DenseSet::new(std::slice::from_ref(&spec), 1).unwrap();
    let pushes = tokio::spawn({
        let set = set.clone();
        async move {
            let grad = vec![1.0f32; n];
            for c in 0..ROUNDS {
                pusher.push_dense(&set, &grad, c, c, false).await.unwrap();
            }
        }
    });
    let mut out = vec![0.0f32; n];
    let mut seen = Vec::new();
    while !pushes.is_finished() {
        puller.pull_dense(&set, 0, &mut out).await.unwrap();
        let first = out[0];
        if let Some(i) = out.iter().position(|v| v.to_bits() != first.to_bits()) {
            panic!("a torn pull: value 0 is {first}, value {i} is {}", out[i]);
        }
        seen.push(first);
    }
    pushes.await.unwrap();
    seen.dedup();
    assert!(seen.len() >= 3, "the pulls saw only {seen:?}: they did not overlap the pushes");
    puller.pull_dense(&set, 0, &mut out).await.unwrap();
    assert!(out.iter().all(|&v| v == -(ROUNDS as f32)), "every push applied once");
}

async fn read_all(c: &ShardedClient, set: &DenseSet, keys: &[u64]) -> (Vec<f32>, Vec<f32>) {
    let (mut d, mut s) = (vec![0.0; set.len()], vec![0.0; keys.len() * 4]);
    c.pull_dense(set, 0, &mut d).await.unwrap();
    c.pull_sparse("e", 4, keys, 0, &mut s).await.unwrap();
    (d, s)
}

#[tokio::test]
async fn a_client_on_the_shards_host_uses_its_unix_socket_and_tcp_when_it_cannot() {
    let dir = crate::util::TempDir::new("unix");
    let config = ps_server::ServerConfig { data_socket: Some(dir.0.join("s")), ..Default::default() };
    let shards = LocalShards::start_with(&config, 2).await.expect("start");
    let sockets: Vec<_> = (0..2).map(|i| dir.0.join(format!("s-{i}"))).collect();
    for (addr, path) in shards.addrs.iter().zip(&sockets) {
        let answer = raw_client(addr).await.data_plane(pb::DataPlaneRequest {}).await.unwrap().into_inner();
        assert_eq!(answer.socket, path.to_str().unwrap(), "the shard names its socket, as an absolute path");
        assert_eq!(crate::util::connected_to(path), 0);
    }
    let (dense, sparse) = specs();
    let mut local = client(&shards, 1, true).await;
    let mut grpc = client(&shards, 2, false).await;
    local.register(&dense).await.unwrap();
    local.register(&sparse).await.unwrap();
    let set = DenseSet::new(&[dense], 2).unwrap();
    let keys: Vec<u64> = (0..300).map(|k| k * 104_729).collect();
    let grad: Vec<f32> = (0..set.len()).map(|i| (i % 5) as f32 - 2.0).collect();
    let rows: Vec<f32> = (0..keys.len() * 4).map(|i| (i % 3) as f32 - 1.0).collect();
    local.push_dense(&set, &grad, 0, 0, false).await.unwrap();
    local.push_sparse("e", 4, &keys, &rows, 0, 0, false).await.unwrap();
    // What went over the sockets is what gRPC reads.
    assert_eq!(read_all(&local, &set, &keys).await, read_all(&grpc, &set, &keys).await);
    for path in &sockets {
        assert!(crate::util::connected_to(path) >= 1, "the same-host client is on {}", path.display());
    }

    // With `local_socket` off, a client stays on TCP.
    let before: Vec<usize> = sockets.iter().map(|p| crate::util::connected_to(p)).collect();
    let mut opts = ClientOptions::default();
    opts.transport.local_socket = false;
    let tcp = ShardedClient::connect(&shards.addrs, 3, opts).await.unwrap();
    assert_eq!(read_all(&tcp, &set, &keys).await, read_all(&grpc, &set, &keys).await);
    assert_eq!(sockets.iter().map(|p| crate::util::connected_to(p)).collect::<Vec<_>>(), before);

    // A socket the client cannot open (not on its file system, say): TCP.
    std::fs::remove_file(&sockets[0]).unwrap();
    let fallback = client(&shards, 4, true).await;
    assert_eq!(read_all(&fallback, &set, &keys).await, read_all(&grpc, &set, &keys).await);
    grpc.push_dense(&set, &grad, 1, 1, false).await.unwrap();
    assert_eq!(read_all(&fallback, &set, &keys).await, read_all(&local, &set, &keys).await);
    drop((local, grpc, tcp, fallback));
    shards.stop().await.unwrap();
    assert!(!sockets[1].exists(), "a stopped shard removes its socket");
}

/// Starts one shard with `data_socket` `path` and returns how it ended
/// (within a second: a shard that starts is stopped then).
async fn start_at(path: &std::path::Path) -> ps_server::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ps_server::ServerConfig { data_socket: Some(path.to_path_buf()), ..Default::default() };
    ps_server::serve(config, listener, tokio::time::sleep(Duration::from_secs(1))).await
}

#[tokio::test]
async fn a_data_socket_path_in_use_or_not_a_socket_is_refused_and_left_alone() {
    let dir = crate::util::TempDir::new("sockpath");
    // A file that is not a socket.
    let file = dir.0.join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = start_at(&file).await.unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // A socket another process serves.
    let live = dir.0.join("live.sock");
    let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = start_at(&live).await.unwrap_err().to_string();
    assert!(err.contains("another process serves"), "{err}");
    assert!(live.exists());
    // A socket left by a process that is gone: replaced, then removed at stop.
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    start_at(&stale).await.unwrap();
    assert!(!stale.exists());
    // A path longer than a socket address holds.
    let long = dir.0.join("x".repeat(120));
    let err = start_at(&long).await.unwrap_err().to_string();
    assert!(err.contains("at most 107"), "{err}");
}

/// A worker over its rate limit is refused with a pushback
/// (`transport::with_pushback`), waits it out and sends the same request
/// again, on the data plane and over gRPC, pulls and pushes, dense and
/// sparse, registrations, joins and leaves: the job goes on instead of stopping at the first
/// RESOURCE_EXHAUSTED, and every push is applied exactly once.
#[tokio::test]
async fn a_worker_over_its_rate_waits_out_the_pushbacks_and_every_push_applies_once() {
    const ITERATIONS: u64 = 25;
    let limits = ps_server::budget::Limits { requests_per_sec: 100, burst: 3, ..Default::default() };
    let config = ps_server::ServerConfig { limits, ..Default::default() };
    let shards = LocalShards::start_with(&config, 2).await.expect("start");
    let init = Init { kind: InitKind::Constant { value: 1.0 }, seed: 0 };
    for (worker, data_plane) in [(1, true), (2, false)] {
        let name = format!("w{worker}");
        let dense = TableSpec::dense(&name, &[3000], init, Rule::sgd(0.5).into());
        let table = format!("e{worker}");
        let sparse = TableSpec::sparse(&table, 4, init, Rule::sgd(0.5).into());
        let mut c = client(&shards, worker, data_plane).await;
        // Control calls are pushed back too: more at once than the burst.
        for _ in 0..3 {
            c.register(&dense).await.unwrap();
            c.register(&sparse).await.unwrap();
            c.rejoin(Consistency::Asp, Duration::from_secs(60), 0).await.unwrap();
        }
        let set = DenseSet::new(&[dense], 2).unwrap();
        let keys: Vec<u64> = (0..64).map(|k| k * 7919).collect();
        let (grad, rows) = (vec![0.01f32; set.len()], vec![0.01f32; keys.len() * 4]);
        let (mut values, mut pulled) = (vec![0f32; set.len()], vec![0f32; keys.len() * 4]);
        for clock in 0..ITERATIONS {
            assert!(c.push_and_pull_dense(&set, &grad, clock, &mut values).await.unwrap());
            // On the data plane the pull runs after its push, pushed back or not.
            let now = 1.0 - 0.5 * 0.01 * (clock + 1) as f32;
            if data_plane {
                assert!(values.iter().all(|v| (v - now).abs() < 1e-4), "iteration {clock}: {}", values[0]);
            }
            c.pull_sparse(&table, 4, &keys, clock, &mut pulled).await.unwrap();
            c.push_sparse(&table, 4, &keys, &rows, clock, clock, false).await.unwrap();
        }
        c.pull_dense(&set, ITERATIONS, &mut values).await.unwrap();
        c.pull_sparse(&table, 4, &keys, ITERATIONS, &mut pulled).await.unwrap();
        let expected = 1.0 - 0.5 * 0.01 * ITERATIONS as f32;
        for v in values.iter().chain(&pulled) {
            assert!((v - expected).abs() < 1e-4, "data plane {data_plane}: {v}, expected {expected}");
        }
        // 2 shards x 3 requests an iteration at 100 a second, 3 at once:
        // most of them were pushed back.
        let waits = c.pushback_waits();
        assert!(waits >= ITERATIONS, "data plane {data_plane}: {waits} pushbacks");
        // Leaving is pushed back too (it failed the job's end): each leave
        // right after a rejoin that emptied the bucket.
        for _ in 0..3 {
            c.rejoin(Consistency::Asp, Duration::from_secs(60), ITERATIONS).await.unwrap();
            c.leave().await.unwrap();
        }
    }
    shards.stop().await.unwrap();
}

/// A batch large enough for the client's per-shard work on several threads
/// (64k keys and more), most of its keys named several times: a push sums
/// each key's gradients and updates its row once, and a pull puts each
/// key's row at every place the batch names it.
#[tokio::test]
async fn a_large_batch_with_repeats_is_read_and_updated_key_by_key() {
    for n in [2, 3] {
        let shards = LocalShards::start(n).await.expect("start");
        let mut c = client(&shards, 1, true).await;
        c.register(&TableSpec::sparse("big", 2, Init::zeros(), Rule::sgd(1.0).into())).await.unwrap();
        let keys: Vec<u64> = (0..100_000u64).map(|i| splitmix64(i) % 30_000).collect();
        // Small whole numbers: their sums are exact in f32.
        let grads: Vec<f32> = (0..keys.len() * 2).map(|i| (i % 3) as f32).collect();
        c.push_sparse("big", 2, &keys, &grads, 0, 0, false).await.unwrap();
        let mut want: std::collections::HashMap<u64, [f32; 2]> = std::collections::HashMap::new();
        for (j, &k) in keys.iter().enumerate() {
            let row = want.entry(k).or_default();
            row[0] -= grads[2 * j];
            row[1] -= grads[2 * j + 1];
        }
        assert!(want.len() < keys.len() / 3, "most keys are repeated");
        let mut out = vec![f32::NAN; keys.len() * 2];
        c.pull_sparse("big", 2, &keys, 0, &mut out).await.unwrap();
        for (j, &k) in keys.iter().enumerate() {
            assert_eq!(out[2 * j..2 * j + 2], want[&k], "{n} shards: key {k} at {j}");
        }
        shards.stop().await.unwrap();
    }
}

/// Well-framed requests with mangled bodies (bytes changed, cut, inserted,
/// repeated; a body sent as another kind of request), all on one
/// connection: each is answered, with a status or an answer, within
/// seconds; the connection and the shard go on serving; and whatever the
/// mangled requests that still decode did, every value stays finite.
#[tokio::test]
async fn mangled_requests_are_each_answered_and_every_value_stays_finite() {
    use prost::Message;
    use rand::{Rng, SeedableRng};

    let shards = LocalShards::start(1).await.expect("start");
    let (dense, sparse) = specs();
    let good = client(&shards, 1, true).await;
    good.register(&dense).await.unwrap();
    good.register(&sparse).await.unwrap();
    let port = data_port(&shards.addrs[0]).await;
    let keys = codec::encode_u64(&[1, 2, 3, 1 << 40]);
    let read = Some(pb::ReadMeta { worker: 7, clock: 0, compressed: false });
    let push = |seq| Some(pb::PushMeta { worker: 7, seq, ..Default::default() });
    let chunk = pb::ChunkId { tensor: "w".into(), index: 0 };
    let valid: [(Kind, Vec<u8>); 4] = [
        (Kind::PullDense, pb::PullDenseRequest { chunks: vec![chunk], meta: read }.encode_to_vec()),
        (
            Kind::PushDense,
            pb::PushDenseRequest {
                chunks: vec![pb::DenseChunk {
                    tensor: "w".into(),
                    index: 0,
                    values: codec::encode_f32(&[0.25; 3000]),
                }],
                meta: push(0),
            }
            .encode_to_vec(),
        ),
        (
            Kind::PullSparse,
            pb::PullSparseRequest { table: "e".into(), keys: keys.clone(), meta: read, read_only: false }
                .encode_to_vec(),
        ),
        (
            Kind::PushSparse,
            pb::PushSparseRequest {
                table: "e".into(),
                keys,
                grads: codec::encode_f32(&[0.5; 16]),
                meta: push(0),
            }
            .encode_to_vec(),
        ),
    ];
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&frame(0, b"PSD1")).await.unwrap();
    // Answers are read as a client reads them (`FrameReader`): each one
    // whole, its kind 0 (OK) or a status code.
    let mut answers = ps_common::dataplane::FrameReader::new(64 << 20);
    let mut kind_of_next = async |s: &mut tokio::net::TcpStream| {
        answers.next(s).await.expect("an answer").expect("an answer, not the end of the stream").0
    };
    assert_eq!(kind_of_next(&mut s).await, 0, "welcome");
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let (mut answered, mut refused) = (0, 0);
    for round in 0..3000 {
        let (kind, body) = &valid[rng.random_range(0..valid.len())];
        let mut body = body.clone();
        for _ in 0..rng.random_range(1..=2) {
            let at = rng.random_range(0..=body.len());
            match rng.random_range(0..6) {
                0..3 if at < body.len() => body[at] = rng.random(),
                3 => body.truncate(at),
                4 => {
                    let junk: Vec<u8> = (0..rng.random_range(1..9)).map(|_| rng.random()).collect();
                    body.splice(at..at, junk);
                }
                _ => {
                    let end = (at + rng.random_range(1..64)).min(body.len());
                    let piece = body[at..end].to_vec();
                    body.splice(at..at, piece);
                }
            }
        }
        // Now and then a body goes as another kind of request, or none.
        let kind = match rng.random_range(0..10) {
            0 => rng.random_range(1..=6),
            _ => *kind as u8,
        };
        s.write_all(&frame(kind, &body)).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), kind_of_next(&mut s))
            .await
            .unwrap_or_else(|_| panic!("request {round} (kind {kind}) was not answered"));
        if status == 0 { answered += 1 } else { refused += 1 }
    }
    // Both happened: the mangling neither left every request valid nor
    // made every one undecodable.
    assert!(answered >= 300 && refused >= 300, "{answered} answered, {refused} refused");
    // The connection still serves a valid pull, and so does the shard.
    s.write_all(&frame(Kind::PullDense as u8, &valid[0].1)).await.unwrap();
    assert_eq!(kind_of_next(&mut s).await, 0);
    let set = DenseSet::new(&[dense], 1).unwrap();
    let (values, rows) = read_all(&good, &set, &[1, 2, 3, 1 << 40]).await;
    assert!(values.iter().chain(&rows).all(|v| v.is_finite()), "a value is not finite");
    shards.stop().await.unwrap();
}
