//! `ps-serve` end to end: a real registry (SQLite in a temporary folder),
//! real listeners on loopback, and requests over gRPC and HTTP.
//!
//! - Version swaps under load fail no request, and every answer's outputs
//!   are those of the version it names.
//! - Every bad input is refused over both interfaces with the right code.
//! - The four model kinds predict what their scoring rules give.
//! - Online mode serves the weights of live shards and follows updates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ps_common::optim::Rule;
use ps_common::spec::{Consistency, Init, InitKind, TableSpec};
use ps_model::loss::sigmoid;
use ps_model::{ModelKind, SavedModel, SparseTable, Tower};
use ps_registry::{NewVersion, Registry};
use ps_serve::batch::BatchConfig;
use ps_serve::grpc::pb::{self, predict_request::Inputs as PbInputs, prediction_client::PredictionClient};
use ps_serve::model::{Inputs, Servable};
use ps_serve::online::Online;
use ps_serve::server::{self, Limits, Models, Running};
use ps_serve::slot::{ModelSlot, Source};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};
use serde_json::{Value, json};
use tonic::Code;

const LAYERS: [usize; 3] = [784, 16, 10];
const MAX_ROWS: usize = 100;

/// An MLP of [`LAYERS`] with weights drawn from `seed`.
fn mlp(seed: u64) -> SavedModel {
    let net = ps_model::Mlp::new(&LAYERS);
    let params = net.init_params(seed);
    SavedModel::from_flat(ModelKind::Mlp { layers: LAYERS.to_vec() }, &params).unwrap()
}

async fn registry(dir: &tempfile::TempDir) -> Arc<Registry> {
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    Arc::new(Registry::open(&url, dir.path()).await.unwrap())
}

async fn register(reg: &Registry, name: &str, model: &SavedModel) -> i64 {
    let new = NewVersion {
        model: name.into(),
        artifact: model.to_bytes().unwrap(),
        metrics: BTreeMap::new(),
        lineage: Default::default(),
        created_by: "test".into(),
    };
    reg.register(new).await.unwrap().version
}

async fn serve(slots: Vec<Arc<ModelSlot>>) -> Running {
    serve_with(slots, Limits { max_request_bytes: 1 << 20, ..Limits::default() }).await
}

/// A server of `slots` (loaded first) on free loopback ports.
async fn serve_with(slots: Vec<Arc<ModelSlot>>, limits: Limits) -> Running {
    for s in &slots {
        s.refresh().await.unwrap();
    }
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    server::start(Arc::new(Models::new(slots)), any, any, limits).await.unwrap()
}

/// A server with `limits` of `mnist` (an MLP of [`LAYERS`]) from a registry
/// in a fresh folder: the folder, the version and the server.
async fn serve_mnist(limits: Limits) -> (tempfile::TempDir, i64, Running) {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let v = register(&reg, "mnist", &mlp(1)).await;
    let slot = Arc::new(ModelSlot::from_registry("mnist".into(), Source::Version(v), reg, None, MAX_ROWS));
    (dir, v, serve_with(vec![slot], limits).await)
}

async fn grpc(running: &Running) -> PredictionClient<tonic::transport::Channel> {
    PredictionClient::connect(format!("http://{}", running.grpc)).await.unwrap()
}

/// A connection per request: a server may close a connection after refusing
/// a request (a body over the limit is answered 413 without being read), and
/// a pooled client that sends the next request on it before noticing fails
/// with `IncompleteMessage` (seen once under load).
fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http()
}

/// `POST` (with a body) or `GET` (without); the status and the JSON answer
/// (`Null` if the body is not JSON).
async fn http(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let uri = format!("http://{addr}{path}");
    let req = match body {
        Some(b) => hyper::Request::post(uri).body(Full::new(Bytes::from(b))),
        None => hyper::Request::get(uri).body(Full::new(Bytes::new())),
    };
    let resp = client.request(req.unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn pixels(rows: usize, seed: u32) -> Vec<f32> {
    (0..rows * LAYERS[0])
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0)
        .collect()
}

fn dense(values: Vec<f32>) -> Option<PbInputs> {
    Some(PbInputs::Dense(pb::DenseInputs { width: LAYERS[0] as u32, values }))
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_swaps_under_load_fail_no_request_and_each_answer_is_its_versions() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let (m1, m2) = (mlp(1), mlp(2));
    let (v1, v2) = (register(&reg, "mnist", &m1).await, register(&reg, "mnist", &m2).await);
    reg.promote("mnist", v1, "production", "test").await.unwrap();
    let batching = BatchConfig { max_batch: 32, max_delay: Duration::from_micros(200), queue: 1024 };
    let slot = Arc::new(ModelSlot::from_registry(
        "mnist".into(),
        Source::Label("production".into()),
        Arc::clone(&reg),
        Some(batching),
        MAX_ROWS,
    ));
    let running = serve(vec![Arc::clone(&slot)]).await;
    slot.spawn_watch(Duration::from_millis(10));

    let x = pixels(1, 5);
    let mut expected = BTreeMap::new();
    for (v, m) in [(v1, m1), (v2, m2)] {
        let mut out = Vec::new();
        Servable::new(m)
            .unwrap()
            .predict(&Inputs::Dense { width: LAYERS[0], values: x.clone() }, &mut out)
            .unwrap();
        expected.insert(v, out);
    }
    assert!(!close(&expected[&v1], &expected[&v2]), "the two versions must be told apart by their outputs");

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stop, x, expected) = (Arc::clone(&stop), x.clone(), expected.clone());
        let (mut g, h, addr) = (grpc(&running).await, http_client(), running.http);
        clients.push(tokio::spawn(async move {
            let (mut answers, mut wrong) = (BTreeMap::<i64, u64>::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // Half the clients on each interface.
                let (version, outputs) = if c % 2 == 0 {
                    let req =
                        pb::PredictRequest { model: "mnist".into(), version: 0, inputs: dense(x.clone()) };
                    match g.predict(req).await {
                        Ok(r) => (r.get_ref().version, r.into_inner().outputs),
                        Err(e) => {
                            wrong.push(format!("gRPC: {e}"));
                            continue;
                        }
                    }
                } else {
                    let body = serde_json::to_vec(&json!({"instances": [x]})).unwrap();
                    let (status, v) = http(&h, addr, "/v1/models/mnist:predict", Some(body)).await;
                    if status != 200 {
                        wrong.push(format!("HTTP {status}: {v}"));
                        continue;
                    }
                    let out: Vec<f32> = v["predictions"][0]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p.as_f64().unwrap() as f32)
                        .collect();
                    (v["model_version"].as_i64().unwrap(), out)
                };
                *answers.entry(version).or_default() += 1;
                if !expected.get(&version).is_some_and(|e| close(e, &outputs)) {
                    wrong.push(format!("version {version} answered outputs that are not its own"));
                }
            }
            (answers, wrong)
        }));
    }
    for _ in 0..10 {
        for (op, want) in [("promote", v2), ("rollback", v1)] {
            if op == "promote" {
                reg.promote("mnist", v2, "production", "test").await.unwrap();
            } else {
                reg.rollback("mnist", "production", "test").await.unwrap();
            }
            let t = tokio::time::Instant::now();
            while slot.current().unwrap().version != want {
                assert!(t.elapsed() < Duration::from_secs(5), "the slot never swapped to v{want}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = BTreeMap::<i64, u64>::new();
    for c in clients {
        let (a, wrong) = c.await.unwrap();
        assert!(wrong.is_empty(), "failed or wrong answers: {:?}", &wrong[..wrong.len().min(5)]);
        for (v, n) in a {
            *answers.entry(v).or_default() += n;
        }
    }
    assert!(
        answers.get(&v1).is_some_and(|&n| n > 0) && answers.get(&v2).is_some_and(|&n| n > 0),
        "{answers:?}"
    );
    let history = slot.status().unwrap().history;
    assert_eq!(history.len(), 21, "one load, then 20 swaps: {history:?}");
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_over_both_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let v = register(&reg, "mnist", &mlp(1)).await;
    let slot = ModelSlot::from_registry(
        "mnist".into(),
        Source::Version(v),
        reg,
        Some(BatchConfig::default()),
        MAX_ROWS,
    );
    let running = serve(vec![Arc::new(slot)]).await;
    let mut g = grpc(&running).await;

    let req = |model: &str, version: i64, inputs: Option<PbInputs>| pb::PredictRequest {
        model: model.into(),
        version,
        inputs,
    };
    let mut nan = pixels(1, 0);
    nan[100] = f32::NAN;
    let grpc_cases: Vec<(&str, pb::PredictRequest, Code, &str)> = vec![
        ("unknown model", req("nope", 0, dense(pixels(1, 0))), Code::NotFound, "no model `nope`"),
        ("unknown version", req("mnist", 99, dense(pixels(1, 0))), Code::NotFound, "no version 99"),
        (
            "wrong feature count",
            req("mnist", 0, Some(PbInputs::Dense(pb::DenseInputs { width: 783, values: vec![0.5; 783] }))),
            Code::InvalidArgument,
            "takes 784 features",
        ),
        (
            "partial example",
            req("mnist", 0, Some(PbInputs::Dense(pb::DenseInputs { width: 784, values: vec![0.5; 800] }))),
            Code::InvalidArgument,
            "not whole examples",
        ),
        ("NaN", req("mnist", 0, dense(nan)), Code::InvalidArgument, "NaN"),
        ("infinity", req("mnist", 0, dense(vec![f32::INFINITY; 784])), Code::InvalidArgument, "inf"),
        (
            "finite inputs that overflow",
            req("mnist", 0, dense([pixels(1, 0), vec![f32::MAX; 784]].concat())),
            Code::InvalidArgument,
            "the prediction for example 1 is not a finite number",
        ),
        (
            "oversized batch",
            req("mnist", 0, dense(pixels(MAX_ROWS + 1, 0))),
            Code::InvalidArgument,
            "the limit is 100",
        ),
        ("no inputs", req("mnist", 0, None), Code::InvalidArgument, "no inputs"),
        (
            "another kind's inputs",
            req("mnist", 0, Some(PbInputs::Pairs(pb::PairInputs { users: vec![1], items: vec![2] }))),
            Code::InvalidArgument,
            "takes dense inputs",
        ),
        (
            // 200k empty rows: 400 KB on the wire, 9.6 MB of `SparseRow`s
            // if decoded before they are counted.
            "empty sparse rows",
            req(
                "mnist",
                0,
                Some(PbInputs::Sparse(pb::SparseInputs::new(vec![pb::SparseRow::default(); 200_000]))),
            ),
            Code::InvalidArgument,
            "more than 100 examples in one request; the limit is 100",
        ),
        // 300 rows of 784 floats: over the 1 MiB message limit.
        ("oversized message", req("mnist", 0, dense(pixels(400, 0))), Code::OutOfRange, ""),
    ];
    for (what, r, code, msg) in grpc_cases {
        let e = g.predict(r).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e}");
        assert!(e.message().contains(msg), "{what}: {e}");
    }
    let e = g.get_model(pb::GetModelRequest { model: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let h = http_client();
    let one = serde_json::to_vec(&json!({"instances": [pixels(1, 0)]})).unwrap();
    let body = |v: Value| Some(serde_json::to_vec(&v).unwrap());
    let huge = format!("{{\"instances\": [[{}]]}}", vec!["0.5"; 600_000].join(","));
    // Instances past a limit, then something that is not an instance: the
    // parse stops at the limit, so the refusal names it. A parser that read
    // every instance first (200k empty rows: 600 KB of JSON, 4.8 MB of
    // `Vec`s) would refuse the tail instead.
    let empty_rows = format!("{{\"instances\": [{}\"x\"]}}", "[],".repeat(200_000));
    let row = format!("[{}]", vec!["0.5"; 784].join(","));
    let rows_past_limit = format!("{{\"instances\": [{}\"x\"]}}", format!("{row},").repeat(MAX_ROWS + 1));
    // (what, path, body, status, a fragment of the error)
    type Case = (&'static str, &'static str, Option<Vec<u8>>, u16, &'static str);
    let http_cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "/v1/models/mnist:predict",
            Some(b"{\"instances\": [".to_vec()),
            400,
            "malformed JSON",
        ),
        ("not an object", "/v1/models/mnist:predict", Some(b"[1, 2]".to_vec()), 400, "malformed JSON"),
        (
            "unknown field",
            "/v1/models/mnist:predict",
            body(json!({"instances": [], "x": 1})),
            400,
            "unknown field",
        ),
        ("unknown model", "/v1/models/nope:predict", Some(one.clone()), 404, "no model `nope`"),
        ("unknown version", "/v1/models/mnist/versions/99:predict", Some(one.clone()), 404, "no version 99"),
        (
            "version not a number",
            "/v1/models/mnist/versions/x:predict",
            Some(one.clone()),
            400,
            "not a number",
        ),
        ("unknown verb", "/v1/models/mnist:classify", Some(one.clone()), 400, "unknown verb"),
        (
            "wrong feature count",
            "/v1/models/mnist:predict",
            body(json!({"instances": [vec![0.5; 783]]})),
            400,
            "has 783 features",
        ),
        (
            "a string feature",
            "/v1/models/mnist:predict",
            body(json!({"instances": [["a"]]})),
            400,
            "invalid type",
        ),
        (
            "null feature",
            "/v1/models/mnist:predict",
            body(json!({"instances": [[null]]})),
            400,
            "invalid type",
        ),
        (
            "out of range",
            "/v1/models/mnist:predict",
            Some(format!("{{\"instances\": [[1e999{}]]}}", ",0.5".repeat(783)).into_bytes()),
            400,
            "instances",
        ),
        (
            "f32 overflow",
            "/v1/models/mnist:predict",
            Some(format!("{{\"instances\": [[1e300{}]]}}", ",0.5".repeat(783)).into_bytes()),
            400,
            "not a finite number",
        ),
        (
            "finite features that overflow the model",
            "/v1/models/mnist:predict",
            Some(format!("{{\"instances\": [{row}, [3.4e38{}]]}}", ",3.4e38".repeat(783)).into_bytes()),
            400,
            "the prediction for example 1 is not a finite number",
        ),
        (
            "oversized batch",
            "/v1/models/mnist:predict",
            body(json!({"instances": vec![vec![0.5; 784]; MAX_ROWS + 1]})),
            400,
            "the limit is 100",
        ),
        (
            "another kind's instances",
            "/v1/models/mnist:predict",
            body(json!({"instances": [{"user": 1, "item": 2}]})),
            400,
            "invalid type",
        ),
        (
            "empty rows",
            "/v1/models/mnist:predict",
            Some(empty_rows.into_bytes()),
            400,
            "instance 0 has 0 features; the model takes 784",
        ),
        (
            "too many rows, then not a row",
            "/v1/models/mnist:predict",
            Some(rows_past_limit.into_bytes()),
            400,
            "more than 100 examples in one request; the limit is 100",
        ),
        ("body over the limit", "/v1/models/mnist:predict", Some(huge.into_bytes()), 413, ""),
        ("no such endpoint", "/v2/whatever", Some(one.clone()), 404, "no such endpoint"),
    ];
    for (what, path, b, status, msg) in http_cases {
        let (s, v) = http(&h, running.http, path, b).await;
        assert_eq!(s, status, "{what}: {v}");
        assert!(msg.is_empty() || v["error"].as_str().is_some_and(|e| e.contains(msg)), "{what}: {v}");
    }
    // The server is still up and right after all of that.
    let (s, answer) = http(&h, running.http, "/v1/models/mnist:predict", Some(one)).await;
    assert_eq!((s, answer["model_version"].as_i64()), (200, Some(v)));
    let (s, v) = http(&h, running.http, "/v1/models/mnist", None).await;
    assert_eq!((s, v["model_version_status"][0]["state"].as_str()), (200, Some("AVAILABLE")));
    assert_eq!(http(&h, running.http, "/readyz", None).await.0, 200);
    running.abort();
}

/// The bytes of requests in flight are charged to `max_inflight_bytes` as
/// they arrive, on both listeners: a request larger than the budget is
/// refused (429 / RESOURCE_EXHAUSTED) before the server holds it, and every
/// request gives its bytes back, so requests within the budget are served
/// after any number of refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_budget_are_refused_and_give_their_bytes_back() {
    let limits = Limits { max_request_bytes: 8 << 20, max_inflight_bytes: 1 << 20, ..Limits::default() };
    let (_dir, v, running) = serve_mnist(limits).await;
    let mut g = grpc(&running).await;
    let h = http_client();
    // About 2.4 MB of JSON, and a 1.9 MB message: over the whole budget.
    let big_json = serde_json::to_vec(&json!({"instances": [pixels(600, 0)]})).unwrap();
    let big_pb = pb::PredictRequest { model: "mnist".into(), version: 0, inputs: dense(pixels(600, 0)) };
    let one_json = serde_json::to_vec(&json!({"instances": [pixels(1, 0)]})).unwrap();
    let one_pb = pb::PredictRequest { model: "mnist".into(), version: 0, inputs: dense(pixels(1, 0)) };
    // Enough rounds that the bytes of the requests, had any stayed charged,
    // would add up to more than the budget.
    for round in 0..40 {
        let (s, answer) = http(&h, running.http, "/v1/models/mnist:predict", Some(big_json.clone())).await;
        assert_eq!(s, 429, "round {round}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("max-inflight-mib")), "{answer}");
        let e = g.predict(big_pb.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "round {round}: {e}");
        assert!(e.message().contains("max-inflight-mib"), "{e}");
        let (s, answer) = http(&h, running.http, "/v1/models/mnist:predict", Some(one_json.clone())).await;
        assert_eq!((s, answer["model_version"].as_i64()), (200, Some(v)), "round {round}: {answer}");
        let r = g.predict(one_pb.clone()).await.expect("a request within the budget").into_inner();
        assert_eq!(r.outputs.len(), 10);
    }
    running.abort();
}

/// Each listener holds at most `max_connections`: idle connections beyond
/// it are closed as they are accepted, on gRPC and HTTP alike, and a
/// request is served again once the idle ones are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_on_both_listeners() {
    use tokio::io::AsyncReadExt;
    let (_dir, _, running) = serve_mnist(Limits { max_connections: 4, ..Limits::default() }).await;
    for addr in [running.grpc, running.http] {
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Closed: end of stream or reset within 2 s. Held ones get nothing
        // (HTTP) or the server's HTTP/2 settings (gRPC).
        let mut closed = 0;
        for s in &mut idle {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            closed += matches!(read, Ok(Ok(0) | Err(_))) as usize;
        }
        assert_eq!(closed, 6, "{addr}: {closed} of 10 idle connections closed, with 4 slots");
        drop(idle);
    }
    // The slots came back: both interfaces answer.
    let one_json = serde_json::to_vec(&json!({"instances": [pixels(1, 0)]})).unwrap();
    let mut answered = false;
    for _ in 0..50 {
        let uri = format!("http://{}/v1/models/mnist:predict", running.http);
        let req = hyper::Request::post(uri).body(Full::new(Bytes::from(one_json.clone()))).unwrap();
        if http_client().request(req).await.is_ok_and(|r| r.status() == 200) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "HTTP not served after the idle connections closed");
    let one_pb = pb::PredictRequest { model: "mnist".into(), version: 0, inputs: dense(pixels(1, 0)) };
    let r = grpc(&running).await.predict(one_pb).await.expect("gRPC served").into_inner();
    assert_eq!(r.outputs.len(), 10);
    running.abort();
}

/// A client that connects and sends nothing, or starts a request's headers
/// and never finishes them, is closed after the header timeout instead of
/// holding its connection (and its slot of the cap) for good; a request
/// beside them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_that_send_no_headers_are_closed_after_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, _, running) = serve_mnist(Limits::default()).await;
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(running.http).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(running.http).await.unwrap();
    partial.write_all(b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let one_json = serde_json::to_vec(&json!({"instances": [pixels(1, 0)]})).unwrap();
    let (s, _) = http(&http_client(), running.http, "/v1/models/mnist:predict", Some(one_json)).await;
    assert_eq!(s, 200);
    let limit = ps_common::transport::HEADER_TIMEOUT + Duration::from_secs(5);
    for (name, conn) in [("silent", &mut silent), ("partial", &mut partial)] {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(limit.saturating_sub(started.elapsed()), conn.read(&mut buf)).await;
        // Closed: end of stream (or a reset), with or without an error status first.
        let closed = match read {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(n)) => {
                let rest = conn.read(&mut buf).await;
                n > 0 && matches!(rest, Ok(0) | Err(_))
            }
            Err(_) => false,
        };
        assert!(closed, "{name} connection still open after {:?}", started.elapsed());
    }
    running.abort();
}

/// Clients that send a request's headers and then stall in its body (a
/// `Content-Length` body cut short, a chunked body never ended, over
/// HTTP/1; a stream whose body never ends, over HTTP/2) are answered 408
/// after the body timeout, and the HTTP/1 connections closed; a gRPC
/// message cut short, DEADLINE_EXCEEDED. hyper bounds only the headers'
/// time, tonic nothing: each used to hold its connection or stream, its
/// handler and the bytes it sent for as long as the client kept the
/// connection open. A request beside them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_that_stall_in_a_body_are_answered_and_closed_after_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_secs(1);
    let (_dir, _, running) = serve_mnist(Limits { body_timeout: timeout, ..Limits::default() }).await;
    let started = std::time::Instant::now();
    let head = "POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n";
    let mut cut = tokio::net::TcpStream::connect(running.http).await.unwrap();
    cut.write_all(format!("{head}Content-Length: 1000\r\n\r\n{{\"instan").as_bytes()).await.unwrap();
    let mut chunked = tokio::net::TcpStream::connect(running.http).await.unwrap();
    let start = format!("{head}Transfer-Encoding: chunked\r\n\r\n3\r\n{{\"i\r\n");
    chunked.write_all(start.as_bytes()).await.unwrap();
    // HTTP/2: one DATA frame, then the body stays open.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<hyper::body::Frame<Bytes>, std::io::Error>>();
    tx.unbounded_send(Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"inst")))).unwrap();
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = hyper::Request::post(format!("http://{}/v1/models/mnist:predict", running.http))
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    let stream = tokio::spawn(async move { h2.request(req).await.map(|r| r.status().as_u16()) });
    // gRPC: a message announced as 1000 bytes, 3 of them sent, then the
    // stream stays open.
    let (grpc_tx, grpc_rx) =
        futures::channel::mpsc::unbounded::<Result<hyper::body::Frame<Bytes>, std::io::Error>>();
    let mut cut_message = vec![0u8];
    cut_message.extend(1000u32.to_be_bytes());
    cut_message.extend([0x0a, 0x01, b'm']);
    grpc_tx.unbounded_send(Ok(hyper::body::Frame::data(Bytes::from(cut_message)))).unwrap();
    let req = hyper::Request::post(format!("http://{}/ps.serve.v1.Prediction/Predict", running.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(grpc_rx))
        .unwrap();
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let grpc_status = tokio::spawn(async move {
        let resp = h2.request(req).await.unwrap();
        let status = resp.headers().get("grpc-status").cloned();
        let message = resp.headers().get("grpc-message").cloned();
        (status, message)
    });
    let one_json = serde_json::to_vec(&json!({"instances": [pixels(1, 0)]})).unwrap();
    let (s, _) = http(&http_client(), running.http, "/v1/models/mnist:predict", Some(one_json)).await;
    assert_eq!(s, 200);
    let limit = timeout + Duration::from_secs(5);
    for (name, conn) in [("cut", &mut cut), ("chunked", &mut chunked)] {
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(limit.saturating_sub(started.elapsed()), conn.read_to_end(&mut answer));
        let closed = read.await.is_ok();
        let answer = String::from_utf8_lossy(&answer);
        assert!(closed, "{name} connection still open after {:?}", started.elapsed());
        assert!(answer.starts_with("HTTP/1.1 408"), "{name}: {answer}");
        assert!(answer.contains("did not arrive within 1s"), "{name}: {answer}");
    }
    let status = tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream).await;
    assert_eq!(status.expect("the HTTP/2 stream is answered").unwrap().ok(), Some(408));
    let grpc = tokio::time::timeout(limit.saturating_sub(started.elapsed()), grpc_status).await;
    let (code, message) = grpc.expect("the gRPC stream is answered").unwrap();
    assert_eq!(code.as_ref().and_then(|c| c.to_str().ok()), Some("4"), "DEADLINE_EXCEEDED: {message:?}");
    drop((tx, grpc_tx));
    running.abort();
}

/// Requests naming a version that is not in memory, all at once, share
/// one load of it: each used to read, check and build its own copy of the
/// model, so N concurrent requests held N copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_a_version_not_loaded_load_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let v1 = register(&reg, "mnist", &mlp(1)).await;
    let v2 = register(&reg, "mnist", &mlp(2)).await;
    let slot = ModelSlot::from_registry("mnist".into(), Source::Version(v1), reg, None, MAX_ROWS);
    slot.refresh().await.unwrap();
    let loaded = futures::future::join_all((0..16).map(|_| slot.resolve(Some(v2)))).await;
    let loaded: Vec<_> = loaded.into_iter().map(Result::unwrap).collect();
    assert!(loaded.iter().all(|l| l.version == v2));
    let copies = loaded.iter().filter(|l| !Arc::ptr_eq(l, &loaded[0])).count() + 1;
    assert_eq!(copies, 1, "16 concurrent requests for version {v2} loaded it {copies} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_model_kinds_predict_what_their_scoring_rules_give() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let init = |seed| Some(Init { kind: InitKind::Normal { mean: 0.0, std: 0.1 }, seed });
    let table = |name: &str, dim: usize, keys: Vec<u64>, seed| {
        let values = (0..keys.len() * dim).map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0).collect();
        SparseTable { name: name.into(), dim, keys, values, init: init(seed) }
    };
    // Logistic regression: 5 features, keys 0, 2 and the bias (5) trained.
    let lr = table("w", 1, vec![0, 2, 5], 1);
    let lr_model =
        SavedModel::new(ModelKind::Logreg { num_features: 5, table: "w".into() }, vec![], vec![lr.clone()]);
    // MF: users 1, 2 and items 10, 11 trained, width 3.
    let mf = ModelKind::Mf {
        dim: 3,
        global_mean: 3.5,
        users: "u".into(),
        items: "i".into(),
        user_bias: "ub".into(),
        item_bias: "ib".into(),
    };
    let mf_tables = vec![
        table("u", 3, vec![1, 2], 2),
        table("i", 3, vec![10, 11], 3),
        table("ub", 1, vec![1, 2], 4),
        table("ib", 1, vec![10, 11], 5),
    ];
    let mf_model = SavedModel::new(mf, vec![], mf_tables.clone());
    // CTR: 3 slots of width 4 into a tower with one hidden layer of 5.
    let ctr = ModelKind::Ctr {
        slots: 3,
        key_space: 1000,
        emb_dim: 4,
        hidden: vec![5],
        embeddings: "e".into(),
        tower_prefix: "t.".into(),
    };
    let tower = Tower::new(12, &[5]);
    let tower_params: Vec<f32> =
        (0..tower.num_params()).map(|i| ((i * 13 % 17) as f32 - 8.0) / 20.0).collect();
    let seen = ps_model::ctr::key(0, 42, 1000);
    let emb = table("e", 4, vec![seen], 6);
    let mut ctr_model = SavedModel::from_flat(ctr.clone(), &tower_params).unwrap();
    ctr_model.sparse.push(emb.clone());

    let mut slots = Vec::new();
    for (name, model) in [("lr", &lr_model), ("mf", &mf_model), ("ctr", &ctr_model)] {
        let v = register(&reg, name, model).await;
        slots.push(Arc::new(ModelSlot::from_registry(
            name.into(),
            Source::Version(v),
            Arc::clone(&reg),
            Some(BatchConfig::default()),
            MAX_ROWS,
        )));
    }
    let running = serve(slots).await;
    let h = http_client();
    let predict = |name: &'static str, instances: Value| {
        let h = h.clone();
        async move {
            let (s, v) = http(
                &h,
                running.http,
                &format!("/v1/models/{name}:predict"),
                Some(serde_json::to_vec(&json!({ "instances": instances })).unwrap()),
            )
            .await;
            assert_eq!(s, 200, "{name}: {v}");
            v["predictions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_f64().unwrap() as f32)
                .collect::<Vec<f32>>()
        }
    };
    let row = |t: &SparseTable, key: u64| -> Vec<f32> {
        match t.keys.iter().position(|&k| k == key) {
            Some(i) => t.values[i * t.dim..(i + 1) * t.dim].to_vec(),
            None => {
                let mut v = vec![0.0; t.dim];
                t.init.unwrap().fill(&t.name, key, &mut v);
                v
            }
        }
    };
    let near =
        |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);

    // Feature 1 was never trained: it reads as its initial value.
    let got = predict(
        "lr",
        json!([{"indices": [0, 1, 2], "values": [1.0, 2.0, -1.0]}, {"indices": [], "values": []}]),
    )
    .await;
    let bias = row(&lr, 5)[0];
    let z0 = bias + row(&lr, 0)[0] + 2.0 * row(&lr, 1)[0] - row(&lr, 2)[0];
    assert!(near(&got, &[sigmoid(z0), sigmoid(bias)]), "lr {got:?}");
    // The same rows over gRPC (whose sparse rows are decoded by ps-serve,
    // with a bound on their count).
    let sparse = |rows: Vec<pb::SparseRow>| pb::PredictRequest {
        model: "lr".into(),
        version: 0,
        inputs: Some(PbInputs::Sparse(pb::SparseInputs::new(rows))),
    };
    let rows = vec![
        pb::SparseRow { indices: vec![0, 1, 2], values: vec![1.0, 2.0, -1.0] },
        pb::SparseRow::default(),
    ];
    let mut g = grpc(&running).await;
    let got = g.predict(sparse(rows)).await.unwrap().into_inner().outputs;
    assert!(near(&got, &[sigmoid(z0), sigmoid(bias)]), "lr over gRPC {got:?}");
    let e = g.predict(sparse(vec![pb::SparseRow::default(); MAX_ROWS + 1])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("more than 100 examples in one request; the limit is 100"), "{e}");

    // User 3 and item 12 are unseen.
    let got = predict("mf", json!([{"user": 1, "item": 11}, {"user": 3, "item": 12}])).await;
    let want: Vec<f32> = [(1, 11), (3, 12)]
        .iter()
        .map(|&(u, i)| {
            let (p, q) = (row(&mf_tables[0], u), row(&mf_tables[1], i));
            ps_model::mf::predict(3.5, &p, &q, row(&mf_tables[2], u)[0], row(&mf_tables[3], i)[0])
                .clamp(1.0, 5.0)
        })
        .collect();
    assert!(near(&got, &want), "mf {got:?} vs {want:?}");

    let got = predict("ctr", json!([[42, 7, 9], [1, 2, 3]])).await;
    let mut x = Vec::new();
    for ids in [[42u64, 7, 9], [1, 2, 3]] {
        for (slot, id) in ids.into_iter().enumerate() {
            x.extend(row(&emb, ps_model::ctr::key(slot, id, 1000)));
        }
    }
    let mut ws = ps_model::TowerWorkspace::default();
    let want: Vec<f32> = tower.logits(&tower_params, &x, &mut ws).iter().map(|&z| sigmoid(z)).collect();
    assert!(near(&got, &want), "ctr {got:?} vs {want:?}");

    // Each kind refuses inputs that are not its own.
    for (name, bad, msg) in [
        ("lr", json!([{"indices": [5], "values": [1.0]}]), "outside the model's 0..5"),
        ("lr", json!([{"indices": [0, 1], "values": [1.0]}]), "2 indices but 1 values"),
        ("mf", json!([{"user": -1, "item": 2}]), "invalid value"),
        ("ctr", json!([[1, 2]]), "has 2 ids; the model takes 3"),
        ("ctr", json!([[1, 2, 281474976710656u64]]), "not below 2^48"),
    ] {
        let (s, v) = http(
            &h,
            running.http,
            &format!("/v1/models/{name}:predict"),
            Some(serde_json::to_vec(&json!({ "instances": bad })).unwrap()),
        )
        .await;
        assert_eq!(s, 400, "{name} {bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains(msg), "{name} {bad}: {v}");
    }
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_mode_serves_the_live_weights_and_says_how_fresh() {
    let shards = ps_server::local::LocalShards::start(2).await.unwrap();
    let mut trainer = ShardedClient::connect(&shards.addrs, 0, ClientOptions::default()).await.unwrap();
    let net = ps_model::Mlp::new(&LAYERS);
    let specs: Vec<TableSpec> = net
        .param_specs()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
            TableSpec::dense(
                &p.name,
                &shape,
                Init { kind: InitKind::Uniform { low: -0.1, high: 0.1 }, seed: i as u64 },
                Rule::sgd(1.0).into(),
            )
        })
        .collect();
    for s in &specs {
        trainer.register(s).await.unwrap();
    }
    trainer.join(Consistency::Asp, Duration::from_secs(30), 0).await.unwrap();
    let set = DenseSet::new(&specs, 2).unwrap();

    let online = Online::connect(&shards.addrs, None).await.unwrap();
    let slot = Arc::new(ModelSlot::from_cluster("live".into(), online, None, MAX_ROWS));
    let running = serve(vec![Arc::clone(&slot)]).await;
    let mut g = grpc(&running).await;
    let x = pixels(2, 9);
    let expect = |params: &[f32]| {
        let mut out = Vec::new();
        let view = ndarray::ArrayView2::from_shape((2, LAYERS[0]), &x[..]).unwrap();
        net.predict(params, view, &mut net.workspace(2), &mut out);
        out
    };
    let ask = |g: &mut PredictionClient<tonic::transport::Channel>| {
        let req = pb::PredictRequest { model: "live".into(), version: 0, inputs: dense(x.clone()) };
        let mut g = g.clone();
        async move { g.predict(req).await.unwrap().into_inner() }
    };
    let mut params = vec![0.0; set.len()];
    trainer.pull_dense(&set, 0, &mut params).await.unwrap();
    let before = ask(&mut g).await;
    assert!(close(&before.outputs, &expect(&params)), "online answers are the shards' weights");
    assert_eq!(before.freshness.map(|f| f.min_clock), Some(0));

    // One training step; the next refresh serves it.
    let grads: Vec<f32> = (0..set.len()).map(|i| if i % 3 == 0 { 0.05 } else { -0.02 }).collect();
    trainer.push_dense(&set, &grads, 0, 0, true).await.unwrap();
    trainer.pull_dense(&set, 0, &mut params).await.unwrap();
    assert!(slot.refresh().await.unwrap());
    let after = ask(&mut g).await;
    assert!(close(&after.outputs, &expect(&params)), "the refresh serves the update");
    assert!(!close(&after.outputs, &before.outputs), "the update changed the answers");
    let f = after.freshness.unwrap();
    assert_eq!(f.min_clock, 1, "the worker had finished one iteration");
    assert!(f.age_ms < 5_000, "{f:?}");
    let status = g.get_model(pb::GetModelRequest { model: "live".into() }).await.unwrap().into_inner();
    assert!(status.source.starts_with("online:"), "{status:?}");
    running.abort();
    shards.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_version_is_served_in_int8_and_names_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir).await;
    let f32_model = mlp(3);
    let parent = register(&reg, "mnist", &f32_model).await;
    let int8 = ps_model::quant::quantize_mlp(&f32_model).unwrap();
    let new = NewVersion {
        model: "mnist".into(),
        artifact: int8.to_bytes().unwrap(),
        metrics: BTreeMap::new(),
        lineage: ps_registry::Lineage {
            parent_version: Some(parent),
            method: Some("int8".into()),
            ..Default::default()
        },
        created_by: "test".into(),
    };
    let v = reg.register(new).await.unwrap();
    let stored = reg.version("mnist", v.version).await.unwrap();
    assert_eq!(
        (stored.lineage.parent_version, stored.lineage.method.as_deref()),
        (Some(parent), Some("int8"))
    );
    assert!(stored.artifact.size * 4 < reg.version("mnist", parent).await.unwrap().artifact.size);

    let slot = ModelSlot::from_registry(
        "mnist".into(),
        Source::Version(v.version),
        Arc::clone(&reg),
        Some(BatchConfig::default()),
        MAX_ROWS,
    );
    let running = serve(vec![Arc::new(slot)]).await;
    let x = pixels(3, 11);
    let mut want = Vec::new();
    ps_model::quant::Int8Mlp::new(&int8).unwrap().predict(&x, &mut want);
    let answer = grpc(&running)
        .await
        .predict(pb::PredictRequest { model: "mnist".into(), version: 0, inputs: dense(x) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.version, answer.width), (v.version, 10));
    assert!(close(&answer.outputs, &want), "served int8 outputs are the int8 network's");
    let (_, status) = http(&http_client(), running.http, "/v1/models/mnist", None).await;
    assert_eq!(status["kind"], "mlp_int8");
    running.abort();
}
