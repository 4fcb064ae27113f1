//! The hostile-client suite: a real shard process (`ps-cluster server`)
//! under a memory limit (RLIMIT_AS, set by `prlimit`), a normal client
//! training beside it, and a hostile client trying, one case at a time,
//! what a single request or a flood can make a shard allocate or break.
//!
//! Each case asserts its refusal code; afterwards the shard is alive, its
//! peak resident memory is within its budget plus a stated margin, every
//! parameter is finite, and the normal client's training went on (every
//! one of its requests succeeded and its loss fell).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ps_common::codec;
use ps_common::optim::Rule;
use ps_common::spec::{Init, Layout, TableSpec};
use ps_common::wire::pb;
use tonic::Code;

use crate::util::{TempDir, raw_client};

/// The shard's memory budget (`[limits] memory_mib`).
const BUDGET_MIB: u64 = 48;
/// Resident memory allowed beyond the budget and the process's resident
/// size at start. What fills it, by the suite's own breakdown (it prints
/// how much each case grew the peak):
/// - the rows' pages beyond their rows: the budget charges rows, and a
///   stripe's pages double, so up to half of a page's room is unused (here
///   about 29 MiB, resident when the allocator hands out pages it had freed);
/// - answers being built and encoded (a pull of 25,000 rows: 6.4 MB, twice);
/// - requests in flight: at most 16 MiB charged, which decode buffers grown
///   by doubling and a decoded copy take about 2.5 times, plus what HTTP/2
///   has received and tonic not yet read: up to a connection window (16 MiB)
///   per connection, which no budget bounds yet (docs/SECURITY.md);
/// - freed memory the allocator keeps, per arena, for about 10 s.
///
/// Measured (debug build, 2 cores, 2026-12-06): peak 141 to 191 MiB in ten
/// runs beside the rest of `tests/it`; 199 MiB in one CI run (over the 128
/// MiB margin used until then); 219 and 245 MiB with an in-flight budget too
/// large to matter. This bound cannot tell that last case apart (the
/// refusals the large-message case asserts do): it catches a shard whose
/// memory grows with what it is sent, as the address-space limit would.
const MARGIN_MIB: u64 = 192;
/// The address-space limit the shard runs under (RLIMIT_AS): its virtual
/// size at start plus this. A shard that allocated without bound would hit
/// it and die.
const AS_HEADROOM_MIB: u64 = 1024;

const CONFIG: &str = r#"
[transport]
max_message_mib = 8

[limits]
memory_mib = 48
max_tables = 64
max_name_bytes = 64
max_workers = 64
max_concurrent_streams = 16
max_connections = 160
max_connections_per_host = 120
max_inflight_mib = 16
requests_per_sec = 1000
burst = 1000
max_clock_lead = 1000
max_seq_jump = 1000
"#;

/// The shard's open-file limit (RLIMIT_NOFILE): over `max_connections`
/// with room for its listeners and data-plane connections, under the
/// connection flood's count.
const NOFILE: u64 = 400;
/// Idle connections the connection-flood case opens and holds.
const FLOOD: usize = 500;

/// The shard process; killed on drop.
struct ShardProcess {
    child: Child,
    addr: String,
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the shard is alive");
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in status"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
}

/// Starts `ps-cluster server` with `config` under an address-space limit of
/// `as_bytes` (through `prlimit`, which sets it and execs the shard).
fn start_shard(dir: &TempDir, as_bytes: u64) -> ShardProcess {
    let config = dir.0.join("shard.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let mut child = Command::new("prlimit")
        .arg(format!("--as={as_bytes}"))
        .arg(format!("--nofile={NOFILE}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_ps-cluster"))
        .args(["server", "--shard", "0", "--num-shards", "1", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        // Loopback, knowingly (the TLS refusals are tests/it/tls.rs).
        .arg("--plaintext")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prlimit ps-cluster server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read the address");
    let addr =
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("got {line:?}")).to_string();
    ShardProcess { child, addr }
}

/// The CPU time a process has used, user and system (from /proc).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the shard is alive");
    // The fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_sec: u64 =
        String::from_utf8(Command::new("getconf").arg("CLK_TCK").output().expect("getconf").stdout)
            .expect("utf-8")
            .trim()
            .parse()
            .expect("CLK_TCK");
    Duration::from_secs_f64(ticks as f64 / per_sec as f64)
}

/// The virtual size of a shard at start, measured on one started without a
/// limit (threads' stacks and allocator arenas are reserved up front).
fn start_size() -> u64 {
    let dir = TempDir::new("hostile-probe");
    let probe = start_shard(&dir, u64::MAX);
    std::thread::sleep(Duration::from_millis(200));
    status_kib(probe.child.id(), "VmSize:") << 10
}

fn sparse(name: &str, dim: u32, lr: f32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        table: Some(pb::TableSpec::from(&TableSpec::sparse(name, dim, Init::zeros(), Rule::sgd(lr).into()))),
        num_shards: 1,
    }
}

fn dense(name: &str, shape: &[u64], chunk_len: u32, lr: f32) -> pb::RegisterRequest {
    let mut spec = TableSpec::dense(name, shape, Init::zeros(), Rule::sgd(lr).into());
    spec.layout = Layout::Dense { shape: shape.to_vec(), chunk_len };
    pb::RegisterRequest { table: Some(pb::TableSpec::from(&spec)), num_shards: 1 }
}

fn keys(k: impl IntoIterator<Item = u64>) -> prost::bytes::Bytes {
    codec::encode_u64(&k.into_iter().collect::<Vec<_>>())
}

fn f32s(v: &[f32]) -> prost::bytes::Bytes {
    let mut out = Vec::new();
    codec::append_f32(&mut out, v);
    out.into()
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

fn meta(worker: u64, seq: u64, clock: u64) -> Option<pb::PushMeta> {
    Some(pb::PushMeta { worker, seq, clock, tick: false, read_clock: clock, codecs: 0 })
}

/// What the normal client did.
#[derive(Debug, Default)]
struct Training {
    iterations: u64,
    errors: Vec<String>,
    first_loss: f64,
    last_loss: f64,
}

const W_LEN: usize = 4096;
const EMB_KEYS: u64 = 64;
const EMB_DIM: usize = 8;

/// A worker fitting `w` and 64 embedding rows to 1.0 (loss: half the
/// squared distance), one iteration every few milliseconds, until `stop`.
async fn train(addr: String, stop: Arc<AtomicBool>) -> Training {
    let mut c = raw_client(&addr).await;
    let mut t = Training::default();
    let consistency = Some(pb::ConsistencySpec::from(ps_common::spec::Consistency::Asp));
    let join = pb::JoinRequest { worker: 1, consistency, lease_ms: 60_000, ..Default::default() };
    if let Err(s) = c.join(join).await {
        t.errors.push(format!("join: {s}"));
        return t;
    }
    let chunks: Vec<pb::ChunkId> =
        (0..(W_LEN / 1024) as u32).map(|index| pb::ChunkId { tensor: "normal/w".into(), index }).collect();
    let mut clock = 0;
    while !stop.load(Ordering::Relaxed) || t.iterations < 20 {
        let read = Some(pb::ReadMeta { worker: 1, clock, compressed: false });
        let step = async {
            let d =
                c.pull_dense(pb::PullDenseRequest { chunks: chunks.clone(), meta: read }).await?.into_inner();
            let emb = c
                .pull_sparse(pb::PullSparseRequest {
                    table: "normal/emb".into(),
                    keys: keys(0..EMB_KEYS),
                    meta: read,
                    read_only: false,
                })
                .await?
                .into_inner();
            let mut loss = 0.0;
            let mut grad_chunks = Vec::new();
            for ch in d.chunks {
                let w = codec::decode_f32("w", &ch.values).expect("f32 values");
                let g: Vec<f32> = w.iter().map(|v| v - 1.0).collect();
                loss += g.iter().map(|x| f64::from(x * x) / 2.0).sum::<f64>();
                grad_chunks.push(pb::DenseChunk { tensor: ch.tensor, index: ch.index, values: f32s(&g) });
            }
            let e = codec::decode_f32("emb", &emb.values).expect("f32 values");
            assert_eq!(e.len(), EMB_KEYS as usize * EMB_DIM);
            let ge: Vec<f32> = e.iter().map(|v| v - 1.0).collect();
            loss += ge.iter().map(|x| f64::from(x * x) / 2.0).sum::<f64>();
            let push = |seq| Some(pb::PushMeta { tick: seq % 2 == 0, ..meta(1, seq, clock).unwrap() });
            let a = c
                .push_sparse(pb::PushSparseRequest {
                    table: "normal/emb".into(),
                    keys: keys(0..EMB_KEYS),
                    grads: f32s(&ge),
                    meta: push(2 * clock + 1),
                })
                .await?
                .into_inner();
            let b =
                c.push_dense(pb::PushDenseRequest { chunks: grad_chunks, meta: push(2 * clock + 2) }).await?;
            let applied = a.applied == EMB_KEYS && b.into_inner().applied == W_LEN as u64;
            Ok::<_, tonic::Status>((loss, applied))
        };
        match step.await {
            Ok((loss, applied)) => {
                if t.iterations == 0 {
                    t.first_loss = loss;
                }
                t.last_loss = loss;
                if !applied {
                    t.errors.push(format!("iteration {clock}: a push was not applied in full"));
                }
            }
            Err(s) => t.errors.push(format!("iteration {clock}: {s}")),
        }
        t.iterations += 1;
        clock += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t
}

/// One hostile case: its name, and the codes its requests got beside the
/// code each should have got.
struct Case {
    name: &'static str,
    got: Vec<(Code, Code)>,
    /// The shard's peak resident memory (VmHWM) when the case ended.
    peak_after: u64,
}

impl Case {
    fn new(name: &'static str) -> Case {
        Case { name, got: Vec::new(), peak_after: 0 }
    }

    fn ended(mut self, pid: u32) -> Case {
        self.peak_after = status_kib(pid, "VmHWM:") << 10;
        self
    }

    fn expect(&mut self, expected: Code, got: Code) {
        self.got.push((expected, got));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_under_attack_survives_within_its_budget_and_training_goes_on() {
    let as_bytes = start_size() + (AS_HEADROOM_MIB << 20);
    let dir = TempDir::new("hostile");
    let shard = start_shard(&dir, as_bytes);
    let pid = shard.child.id();
    let mut admin = raw_client(&shard.addr).await;
    admin.register(dense("normal/w", &[W_LEN as u64], 1024, 0.1)).await.expect("register w");
    admin.register(sparse("normal/emb", EMB_DIM as u32, 0.1)).await.expect("register emb");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_start = status_kib(pid, "VmRSS:") << 10;

    let stop = Arc::new(AtomicBool::new(false));
    let normal = tokio::spawn(train(shard.addr.clone(), Arc::clone(&stop)));
    let mut h = raw_client(&shard.addr).await;
    let mut cases = Vec::new();
    let started = Instant::now();

    // Giant key lists: an answer over the message limit (8 MiB: 2 Mi
    // values), refused before any row is read or created.
    let mut c = Case::new("giant key list");
    c.expect(Code::Ok, code(h.register(sparse("h/emb", 64, 0.1)).await));
    // (A table whose learning rate makes a large gradient overflow.)
    c.expect(Code::Ok, code(h.register(sparse("h/lr", 1, 1e30)).await));
    let giant =
        pb::PullSparseRequest { table: "h/emb".into(), keys: keys(0..900_000), meta: None, read_only: false };
    c.expect(Code::ResourceExhausted, code(h.pull_sparse(giant).await));
    cases.push(c.ended(pid));

    // Thousands of tables: beyond 64 in all, refused (4 exist).
    let mut c = Case::new("thousands of tables");
    let mut codes = Vec::new();
    for i in 0..2000 {
        codes.push(code(h.register(sparse(&format!("h/t{i}"), 1, 0.1)).await));
        if i % 400 == 399 {
            // Stay under the rate limit (1000 a second, 1000 at once).
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let created = codes.iter().filter(|&&c| c == Code::Ok).count();
    c.expect(Code::Ok, if created == 64 - 4 { Code::Ok } else { Code::Unknown });
    c.expect(Code::ResourceExhausted, codes[1999]);
    cases.push(c.ended(pid));

    // Rows beyond the memory budget: pulls of fresh keys, each within the
    // message limit, until the budget refuses.
    let mut c = Case::new("rows beyond the budget");
    let mut next = 1_000_000u64;
    let mut refused = None;
    for _ in 0..12 {
        let pull = pb::PullSparseRequest {
            table: "h/emb".into(),
            keys: keys(next..next + 25_000),
            meta: None,
            read_only: false,
        };
        next += 25_000;
        match h.pull_sparse(pull).await {
            Ok(_) => {}
            Err(s) => {
                refused = Some(s.code());
                break;
            }
        }
    }
    c.expect(Code::ResourceExhausted, refused.unwrap_or(Code::Ok));
    let push = pb::PushSparseRequest {
        table: "h/emb".into(),
        keys: keys(next..next + 1000),
        grads: f32s(&vec![0.5; 64_000]),
        meta: meta(900, 0, 0),
    };
    c.expect(Code::ResourceExhausted, code(h.push_sparse(push).await));
    // A read-only pull of unknown keys creates nothing and is still served.
    let ro = pb::PullSparseRequest {
        table: "h/emb".into(),
        keys: keys(next..next + 10),
        meta: None,
        read_only: true,
    };
    c.expect(Code::Ok, code(h.pull_sparse(ro).await));
    cases.push(c.ended(pid));

    // Repeated ids in one request.
    let mut c = Case::new("repeated ids");
    let rep = pb::PushSparseRequest {
        table: "normal/emb".into(),
        keys: keys([5, 5]),
        grads: f32s(&[1.0; 16]),
        meta: meta(900, 0, 0),
    };
    c.expect(Code::InvalidArgument, code(h.push_sparse(rep).await));
    let rep = pb::PullSparseRequest {
        table: "normal/emb".into(),
        keys: keys([7, 8, 7]),
        meta: None,
        read_only: true,
    };
    c.expect(Code::InvalidArgument, code(h.pull_sparse(rep).await));
    let id = || pb::ChunkId { tensor: "normal/w".into(), index: 1 };
    let rep = pb::PullDenseRequest { chunks: vec![id(), id()], meta: None };
    c.expect(Code::InvalidArgument, code(h.pull_dense(rep).await));
    let g = || pb::DenseChunk { tensor: "normal/w".into(), index: 1, values: f32s(&[1.0; 1024]) };
    let rep = pb::PushDenseRequest { chunks: vec![g(), g()], meta: meta(900, 0, 0) };
    c.expect(Code::InvalidArgument, code(h.push_dense(rep).await));
    cases.push(c.ended(pid));

    // Huge tables: over the budget, over the spec's bounds, too many chunks.
    let mut c = Case::new("huge table dims");
    c.expect(Code::ResourceExhausted, code(h.register(dense("h/huge", &[1 << 34], 16_384, 0.1)).await));
    c.expect(Code::InvalidArgument, code(h.register(dense("h/huger", &[1 << 40], 16_384, 0.1)).await));
    c.expect(
        Code::InvalidArgument,
        code(h.register(dense("h/shape", &[u64::MAX, u64::MAX], 16_384, 0.1)).await),
    );
    c.expect(Code::ResourceExhausted, code(h.register(dense("h/chunks", &[1 << 30], 1, 0.1)).await));
    c.expect(Code::InvalidArgument, code(h.register(sparse("h/wide", 1 << 20, 0.1)).await));
    cases.push(c.ended(pid));

    // Long names: over the spec's 256 bytes, and over this shard's 64.
    let mut c = Case::new("long names");
    c.expect(Code::InvalidArgument, code(h.register(sparse(&"x".repeat(100_000), 1, 0.1)).await));
    c.expect(Code::ResourceExhausted, code(h.register(sparse(&"y".repeat(65), 1, 0.1)).await));
    cases.push(c.ended(pid));

    // Thousands of worker ids joining (the normal worker is one of 64).
    let mut c = Case::new("thousands of worker joins");
    let mut codes = Vec::new();
    let asp = Some(pb::ConsistencySpec::from(ps_common::spec::Consistency::Asp));
    for w in 0..2000u64 {
        let join =
            pb::JoinRequest { worker: 10_000 + w, consistency: asp, lease_ms: 100, ..Default::default() };
        codes.push(code(h.join(join).await));
        if w % 400 == 399 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    c.expect(Code::Ok, codes[0]);
    c.expect(Code::ResourceExhausted, codes[1999]);
    cases.push(c.ended(pid));

    // Gradients: NaN, inf, 1e38 (refused whole); 1e12 on a table whose
    // learning rate makes the update overflow (accepted, not applied).
    let mut c = Case::new("hostile gradients");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38, -3e20] {
        let mut v = vec![0.0; 1024];
        v[17] = bad;
        let chunk = pb::DenseChunk { tensor: "normal/w".into(), index: 2, values: f32s(&v) };
        let push = pb::PushDenseRequest { chunks: vec![chunk], meta: meta(900, 0, 0) };
        c.expect(Code::InvalidArgument, code(h.push_dense(push).await));
    }
    cases.push(c.ended(pid));
    let mut c = Case::new("overflowing update");
    let push = pb::PushSparseRequest {
        table: "h/lr".into(),
        keys: keys([5, 6]),
        grads: f32s(&[1e12, 1.0]),
        meta: meta(900, 0, 0),
    };
    match h.push_sparse(push).await {
        Ok(r) => c.expect(Code::Ok, if r.into_inner().applied == 1 { Code::Ok } else { Code::Unknown }),
        Err(s) => c.expect(Code::Ok, s.code()),
    }
    cases.push(c.ended(pid));

    // Clocks and seqs at u64::MAX and far ahead of the job.
    let mut c = Case::new("clocks and seqs out of range");
    for (clock, seq) in [(u64::MAX, 0), (1 << 50, 0), (5_000_000, 0), (0, u64::MAX), (0, 1 << 40)] {
        let push = pb::PushSparseRequest {
            table: "normal/emb".into(),
            keys: keys([3]),
            grads: f32s(&[0.0; 8]),
            meta: Some(pb::PushMeta { worker: 901, seq, clock, tick: true, read_clock: 0, codecs: 0 }),
        };
        c.expect(Code::OutOfRange, code(h.push_sparse(push).await));
    }
    let read = Some(pb::ReadMeta { worker: 901, clock: u64::MAX, compressed: false });
    let pull =
        pb::PullSparseRequest { table: "normal/emb".into(), keys: keys([3]), meta: read, read_only: true };
    c.expect(Code::OutOfRange, code(h.pull_sparse(pull).await));
    let join = pb::JoinRequest {
        worker: 1,
        consistency: asp,
        lease_ms: 60_000,
        clock: u64::MAX,
        ..Default::default()
    };
    c.expect(Code::OutOfRange, code(h.join(join).await));
    cases.push(c.ended(pid));

    // Malformed encodings: keys not a whole number of u64s, a gradient of
    // the wrong length, an int8 top-k body on an f32 table, garbage protobuf.
    let mut c = Case::new("malformed encodings");
    let odd = pb::PullSparseRequest {
        table: "normal/emb".into(),
        keys: prost::bytes::Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7]),
        meta: None,
        read_only: true,
    };
    c.expect(Code::InvalidArgument, code(h.pull_sparse(odd).await));
    let short = pb::PushSparseRequest {
        table: "normal/emb".into(),
        keys: keys([3, 4]),
        grads: f32s(&[0.0; 9]),
        meta: meta(900, 0, 0),
    };
    c.expect(Code::InvalidArgument, code(h.push_sparse(short).await));
    let tagged = pb::PushSparseRequest {
        table: "normal/emb".into(),
        keys: keys([3]),
        grads: f32s(&[0.0; 8]),
        meta: Some(pb::PushMeta { codecs: 0xdead_beef, ..meta(900, 0, 0).unwrap() }),
    };
    c.expect(Code::InvalidArgument, code(h.push_sparse(tagged).await));
    c.expect(Code::Internal, garbage(&shard.addr, "/ps.v1.ParameterServer/PullSparse").await);
    c.expect(Code::Internal, garbage(&shard.addr, "/ps.v1.ParameterServer/Register").await);
    cases.push(c.ended(pid));

    // An over-long scan: the page is cut to what one answer may hold.
    let mut c = Case::new("over-long scan");
    let scan =
        pb::ScanSparseRequest { table: "h/emb".into(), start_after: 0, from_start: true, limit: u32::MAX };
    match h.scan_sparse(scan).await {
        Ok(r) => {
            let r = r.into_inner();
            let rows = r.keys.len() / 8;
            let ok = rows > 0 && rows * 64 <= (8 << 20) / 4 && !r.done;
            c.expect(Code::Ok, if ok { Code::Ok } else { Code::Unknown });
        }
        Err(s) => c.expect(Code::Ok, s.code()),
    }
    cases.push(c.ended(pid));

    // Large messages at once: 8 connections x 4 pushes of 7 MiB (224 MiB,
    // all within the message limit), which the shard would otherwise buffer
    // whole before their handlers ran. Requests in flight may hold 16 MiB:
    // the rest are refused as they arrive. Admitted ones name no table.
    let mut c = Case::new("large messages at once");
    let big = pb::PushDenseRequest {
        chunks: vec![pb::DenseChunk { tensor: "nope".into(), index: 0, values: f32s(&vec![1.0; 7 << 18]) }],
        meta: meta(77, 1, 0),
    };
    let codes = futures::future::join_all((0..8).map(|_| {
        let (addr, big) = (shard.addr.clone(), big.clone());
        async move {
            let client = raw_client(&addr).await;
            futures::future::join_all((0..4).map(|_| {
                let (mut client, big) = (client.clone(), big.clone());
                async move { code(client.push_dense(big).await) }
            }))
            .await
        }
    }))
    .await;
    let codes: Vec<Code> = codes.into_iter().flatten().collect();
    let refused = codes.iter().filter(|&&c| c == Code::ResourceExhausted).count();
    let others = codes.iter().filter(|&&c| c != Code::ResourceExhausted && c != Code::NotFound).count();
    c.expect(Code::ResourceExhausted, if refused > 0 { Code::ResourceExhausted } else { Code::Ok });
    c.expect(Code::Ok, if others == 0 { Code::Ok } else { Code::Unknown });
    eprintln!("large messages at once: {refused} of {} refused over the in-flight budget", codes.len());
    cases.push(c.ended(pid));

    // Floods: 3000 requests at once on one connection (over the rate limit
    // of 1000 a second), and 100 connections at once.
    let mut c = Case::new("request flood");
    let flood = futures::future::join_all((0..3000).map(|_| {
        let mut h = h.clone();
        async move { code(h.list_tables(pb::ListTablesRequest {}).await) }
    }))
    .await;
    let limited = flood.iter().filter(|&&c| c == Code::ResourceExhausted).count();
    let others = flood.iter().filter(|&&c| c != Code::ResourceExhausted && c != Code::Ok).count();
    c.expect(Code::ResourceExhausted, if limited > 0 { Code::ResourceExhausted } else { Code::Ok });
    c.expect(Code::Ok, if others == 0 { Code::Ok } else { Code::Unknown });
    let conns = futures::future::join_all((0..100).map(|_| {
        let addr = shard.addr.clone();
        async move {
            let mut c = raw_client(&addr).await;
            code(c.stats(pb::StatsRequest {}).await)
        }
    }))
    .await;
    c.expect(Code::Ok, if conns.iter().all(|&c| c == Code::Ok) { Code::Ok } else { Code::Unknown });
    cases.push(c.ended(pid));

    // Malformed requests on one HTTP/2 connection (no :method): the shard
    // resets each, and after 1024 closes the connection with GOAWAY
    // ENHANCE_YOUR_CALM instead of resetting streams for as long as the
    // peer sends them (RUSTSEC-2024-0003).
    let mut c = Case::new("HTTP/2 reset flood");
    let (resets, goaway) = reset_flood(&shard.addr, 3000).await;
    eprintln!("HTTP/2 reset flood: 3000 malformed requests, {resets} reset, GOAWAY {goaway:?}");
    c.expect(Code::Ok, if resets <= 1025 { Code::Ok } else { Code::Unknown });
    c.expect(Code::Ok, if goaway == Some(ENHANCE_YOUR_CALM) { Code::Ok } else { Code::Unknown });
    cases.push(c.ended(pid));

    // A connection flood from one host (127.0.0.2): more idle connections
    // than the shard may hold (`max_connections`), than one host may
    // (`max_connections_per_host`) and than it has file descriptors. Those
    // over the caps are closed as they are accepted; the shard neither runs
    // out of descriptors nor spins; a new client from the flooding host is
    // refused during the flood and served after it, one from another host
    // (127.0.0.1, like the normal client) is served during it.
    let mut c = Case::new("connection flood");
    raise_nofile(4096);
    let mut flood = Vec::with_capacity(FLOOD);
    let to: std::net::SocketAddr = shard.addr.parse().expect("the shard's address");
    for _ in 0..FLOOD {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind((FLOODER, 0).into()).expect("bind the flooder");
        match socket.connect(to).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect {} of the flood: {e}", flood.len()),
        }
    }
    // Each connection either gets the server's HTTP/2 settings (held) or is
    // closed (end of stream, or reset).
    let fates = futures::future::join_all(flood.iter_mut().map(|s| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => "closed",
            Ok(Ok(_)) => "held",
            Err(_) => "no answer",
        }
    }))
    .await;
    let held = fates.iter().filter(|&&f| f == "held").count();
    let closed = fates.iter().filter(|&&f| f == "closed").count();
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = cpu_time(pid) - before;
    let during = grpc_status(&shard.addr, FLOODER).await;
    let other_host = grpc_status(&shard.addr, [127, 0, 0, 1]).await;
    drop(flood);
    let mut after = Code::Unknown;
    for _ in 0..50 {
        after = grpc_status(&shard.addr, FLOODER).await;
        if after == Code::Ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "connection flood: of {FLOOD} from one host, {held} held and {closed} closed at once (cap 160, 120 a \
         host); shard CPU {busy:?} in 2 s of flood; a new client from that host during it: {during:?}, after \
         it: {after:?}; from another host during it: {other_host:?}"
    );
    c.expect(Code::Ok, if held <= 120 && held + closed == FLOOD { Code::Ok } else { Code::Unknown });
    c.expect(Code::Ok, other_host);
    c.expect(Code::Ok, if busy < Duration::from_secs(1) { Code::Ok } else { Code::Unknown });
    // Refused: closed at accept. The client reports the close as UNAVAILABLE,
    // CANCELLED or UNKNOWN, by when it lands in its HTTP/2 handshake.
    c.expect(Code::Unavailable, if during == Code::Ok { Code::Ok } else { Code::Unavailable });
    c.expect(Code::Ok, after);
    cases.push(c.ended(pid));
    let hostile_secs = started.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    let training = normal.await.expect("the normal client");

    // The shard is alive and answers; its memory stayed within budget.
    let rss_peak = status_kib(pid, "VmHWM:") << 10;
    let mut admin = raw_client(&shard.addr).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a fresh bucket
    let stats = admin.stats(pb::StatsRequest {}).await.expect("the shard answers").into_inner();

    // Every parameter is finite.
    let mut finite = true;
    let chunks: Vec<pb::ChunkId> =
        (0..4).map(|index| pb::ChunkId { tensor: "normal/w".into(), index }).collect();
    let w = admin.pull_dense(pb::PullDenseRequest { chunks, meta: None }).await.expect("pull w").into_inner();
    for ch in &w.chunks {
        finite &= codec::decode_f32("w", &ch.values).expect("f32").iter().all(|v| v.is_finite());
    }
    for table in ["h/emb", "h/lr", "normal/emb"] {
        let mut after = None;
        loop {
            let scan = pb::ScanSparseRequest {
                table: table.into(),
                start_after: after.unwrap_or(0),
                from_start: after.is_none(),
                limit: 50_000,
            };
            let page = admin.scan_sparse(scan).await.expect("scan").into_inner();
            finite &= codec::decode_f32("v", &page.values).expect("f32").iter().all(|v| v.is_finite());
            after = codec::decode_u64("k", &page.keys).expect("u64").last().copied();
            if page.done {
                break;
            }
        }
    }

    eprintln!(
        "hostile suite: {:.1} s of attacks; shard RSS at start {} MiB, peak {} MiB (budget {BUDGET_MIB} MiB, \
         budget bytes used {} MiB, margin {MARGIN_MIB} MiB); address-space limit {} MiB; \
         {} rejected, {} over budget, {} rate limited; normal client: {} iterations, loss {:.1} -> {:.3}",
        hostile_secs,
        rss_start >> 20,
        rss_peak >> 20,
        stats.budget_used_bytes >> 20,
        as_bytes >> 20,
        stats.rejected,
        stats.over_budget,
        stats.rate_limited,
        training.iterations,
        training.first_loss,
        training.last_loss,
    );
    // Where the peak grew: each case's growth of VmHWM, largest first.
    let mut growth = Vec::new();
    let mut before = rss_start;
    for case in &cases {
        growth.push((case.peak_after.saturating_sub(before), case.name));
        before = before.max(case.peak_after);
    }
    growth.sort_by(|a, b| b.cmp(a));
    let growth: Vec<String> =
        growth.iter().filter(|(g, _)| *g > 0).map(|(g, name)| format!("{name} +{} MiB", g >> 20)).collect();
    eprintln!("peak RSS grew in: {}", growth.join(", "));
    let mut failures = Vec::new();
    for case in &cases {
        for (i, (expected, got)) in case.got.iter().enumerate() {
            if expected != got {
                failures.push(format!("{} #{i}: expected {expected:?}, got {got:?}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "cases that did not get their refusal:\n{}", failures.join("\n"));
    assert!(shard_alive(pid), "the shard died");
    let limit = rss_start + ((BUDGET_MIB + MARGIN_MIB) << 20);
    assert!(
        rss_peak <= limit,
        "peak RSS {} MiB over start + budget + margin = {} MiB",
        rss_peak >> 20,
        limit >> 20
    );
    assert!(stats.budget_used_bytes <= BUDGET_MIB << 20);
    assert!(stats.over_budget > 0 && stats.rate_limited > 0);
    assert!(finite, "a parameter is not finite");
    assert!(training.errors.is_empty(), "the normal client was refused: {:?}", training.errors);
    assert!(training.iterations >= 20);
    assert!(training.last_loss < training.first_loss * 0.1, "{training:?}");
}

/// HTTP/2's error code for a peer generating excessive load.
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Sends `n` malformed requests (HEADERS without `:method`) on one raw
/// HTTP/2 connection to `addr`, then reads what the server sends until it
/// closes or is silent for 3 s. Returns the RST_STREAM frames received and
/// the error code of a GOAWAY, if one came.
async fn reset_flood(addr: &str, n: u32) -> (usize, Option<u32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK: `:scheme: http` (static 6), `:path: /` and `:authority: x`
    // (literals with static names 4 and 1).
    let block = [0x86, 0x04, 0x01, b'/', 0x01, 0x01, b'x'];
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for i in 0..n {
        out.extend(frame(0x1, 0x5, 2 * i + 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may close before it has read everything.
    let _ = s.write_all(&out).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(read)) = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
        if read == 0 {
            break;
        }
        got.extend_from_slice(&buf[..read]);
    }
    let (mut resets, mut goaway, mut at) = (0, None, 0);
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let payload = &got[at + 9..(at + 9 + len).min(got.len())];
        match got[at + 3] {
            0x3 => resets += 1,
            0x7 if payload.len() >= 8 => goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => {}
        }
        at += 9 + len;
    }
    (resets, goaway)
}

/// Raises this process's soft open-file limit to `n` (or its hard limit),
/// for the connection flood's sockets.
fn raise_nofile(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).expect("setrlimit");
    }
}

/// The code a new connection's `Stats` call gets.
/// The connection flood's source address.
const FLOODER: [u8; 4] = [127, 0, 0, 2];

/// The code of a `Stats` call to `addr` on a new connection from `from`.
async fn grpc_status(addr: &str, from: [u8; 4]) -> Code {
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .local_address(Some(from.into()))
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    {
        Ok(c) => c,
        Err(_) => return Code::Unavailable,
    };
    let mut client = pb::parameter_server_client::ParameterServerClient::new(channel);
    code(client.stats(pb::StatsRequest {}).await)
}

fn shard_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A message the server cannot decode: a string field of invalid UTF-8 and
/// a field of the wrong wire type. Returns the status code.
async fn garbage(addr: &str, path: &'static str) -> Code {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(bytes = "vec", tag = "1")]
        name: Vec<u8>,
        #[prost(uint64, tag = "2")]
        wrong_type: u64,
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let msg = Garbage { name: vec![0xff, 0xfe, 0x80], wrong_type: 7 };
    let codec = tonic_prost::ProstCodec::<Garbage, pb::PullSparseResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    code(grpc.unary(tonic::Request::new(msg), path, codec).await)
}
