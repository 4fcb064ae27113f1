//! TLS on the shard's channel and on `ps-serve`'s: certificates made by
//! `ps-cluster certs` (`paramserver::certs`), a shard with mutual TLS, and the
//! clients it must refuse (plaintext, no certificate, another CA), each with
//! an error that says why, while the shard goes on serving the others.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use paramserver::certs;
use ps_common::transport::{TlsConfig, TransportConfig};
use ps_server::ServerConfig;
use ps_server::local::LocalShards;
use ps_worker::client::{ClientOptions, ShardedClient};

use crate::dataplane::frame;
use crate::util::TempDir;

/// Certificates of a cluster with two workers in `dir/name`.
fn make_certs(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let out = dir.0.join(name);
    certs::create(&out, &certs::Options { workers: 2, ..certs::Options::default() }).expect("make certs");
    out
}

fn client_opts(tls: Option<TlsConfig>) -> ClientOptions {
    let transport = TransportConfig::default().with_tls(tls);
    // Refusals are not retried for long: a TLS failure ends the connect at
    // once, and a plaintext client gives up after a second.
    ClientOptions { connect_within: Duration::from_secs(1), transport, ..ClientOptions::default() }
}

/// Connects and asks for the table list: the first call that needs the
/// whole handshake (under TLS 1.3 a client learns that its certificate was
/// refused only when it reads).
async fn try_list(addrs: &[String], tls: Option<TlsConfig>) -> Result<usize, String> {
    let client = ShardedClient::connect(addrs, 0, client_opts(tls)).await.map_err(|e| e.to_string())?;
    client.list_tables().await.map(|t| t.len()).map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    })
}

#[tokio::test]
async fn a_mutual_tls_shard_serves_its_clients_and_refuses_the_others() {
    let dir = TempDir::new("tls");
    let ours = make_certs(&dir, "ours");
    let theirs = make_certs(&dir, "theirs");
    let shard_tls = TlsConfig { client_auth: true, ..TlsConfig::from_dir(&ours, "shard") };
    let config = ServerConfig {
        transport: TransportConfig::default().with_tls(Some(shard_tls)),
        ..ServerConfig::default()
    };
    let shards = LocalShards::start_with(&config, 1).await.expect("start a TLS shard");
    let worker = || Some(TlsConfig::from_dir(&ours, "worker-0"));
    assert_eq!(try_list(&shards.addrs, worker()).await, Ok(0), "a client with our certificate is served");

    // Plaintext against TLS: the shard reads no HTTP/2 preface, only garbage.
    let plain = try_list(&shards.addrs, None).await.expect_err("a plaintext client is refused");
    assert!(plain.contains(&shards.addrs[0]) || plain.contains("transport"), "{plain}");

    // Trusts our CA but shows no certificate: the shard requires one.
    let anonymous = TlsConfig { cert: None, key: None, ..TlsConfig::from_dir(&ours, "worker-0") };
    let e = try_list(&shards.addrs, Some(anonymous)).await.expect_err("a client without a certificate");
    // Refused, and told why: the shard's TLS alert, which tonic keeps under
    // its "transport error" status, is part of the message.
    assert!(e.contains("CertificateRequired"), "{e}");

    // Trusts another CA: it refuses the shard's certificate itself, at once.
    let e = try_list(&shards.addrs, Some(TlsConfig::from_dir(&theirs, "worker-0")))
        .await
        .expect_err("a client trusting another CA");
    // (Both dev CAs share one name, so rustls may find the issuer by name
    // and then reject its signature instead.)
    assert!(e.contains("UnknownIssuer") || e.contains("unknown issuer") || e.contains("BadSignature"), "{e}");

    // Trusts our CA but shows a certificate of another CA: the shard refuses it.
    let foreign = TlsConfig { ca: ours.join("ca.pem"), ..TlsConfig::from_dir(&theirs, "worker-1") };
    let e = try_list(&shards.addrs, Some(foreign)).await.expect_err("a certificate of another CA");
    // (The alert rustls sends depends on where the check fails: unknown CA,
    // bad certificate, or a signature that does not verify.)
    assert!(e.contains("received fatal alert"), "{e}");

    // The shard still serves: a second worker and the first one again.
    assert_eq!(try_list(&shards.addrs, Some(TlsConfig::from_dir(&ours, "worker-1"))).await, Ok(0));
    assert_eq!(try_list(&shards.addrs, worker()).await, Ok(0));
    shards.stop().await.expect("stop");
}

/// A peer that accepts the TCP connection and never answers the TLS
/// handshake (a hung process, a middlebox): the connect gives up after the
/// transport's `connect_timeout`, which covers the handshake too, and says
/// where it failed; it does not wait for good.
#[tokio::test]
async fn a_peer_that_never_answers_the_tls_handshake_is_given_up_on() {
    let dir = TempDir::new("tls-silent");
    let ours = make_certs(&dir, "ours");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let mut opts = client_opts(Some(TlsConfig::from_dir(&ours, "worker-0")));
    opts.transport.connect_timeout = Duration::from_millis(300);
    let connect = ShardedClient::connect(std::slice::from_ref(&addr), 0, opts);
    let outcome = tokio::time::timeout(Duration::from_secs(10), connect).await;
    let err =
        outcome.expect("the connect still waits on a silent TLS peer").err().expect("no shard answered");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test]
async fn a_server_without_client_auth_takes_a_client_with_the_ca_only() {
    let dir = TempDir::new("tls-one-way");
    let ours = make_certs(&dir, "ours");
    let config = ServerConfig {
        transport: TransportConfig::default().with_tls(Some(TlsConfig::from_dir(&ours, "shard"))),
        ..ServerConfig::default()
    };
    let shards = LocalShards::start_with(&config, 1).await.expect("start");
    let ca_only = TlsConfig { cert: None, key: None, ..TlsConfig::from_dir(&ours, "reader") };
    assert_eq!(try_list(&shards.addrs, Some(ca_only)).await, Ok(0));
    // Another host name than the certificate's: refused by the client.
    let wrong_name =
        TlsConfig { server_name: Some("elsewhere".into()), ..TlsConfig::from_dir(&ours, "reader") };
    let e = try_list(&shards.addrs, Some(wrong_name)).await.expect_err("a name the certificate lacks");
    assert!(e.contains("NotValidForName") || e.contains("not valid for"), "{e}");
    shards.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_tls_files_stop_a_shard_before_it_listens() {
    let dir = TempDir::new("tls-bad");
    let ours = make_certs(&dir, "ours");
    std::fs::write(dir.0.join("junk.pem"), "not a certificate").unwrap();
    let check = |tls: TlsConfig| {
        let config = ServerConfig {
            transport: TransportConfig::default().with_tls(Some(tls)),
            ..ServerConfig::default()
        };
        config.transport.check_server().map_err(|e| e.to_string())
    };
    let missing = check(TlsConfig::from_dir(&dir.0, "nobody")).unwrap_err();
    assert!(missing.contains("nobody.pem"), "names the file: {missing}");
    let junk = check(TlsConfig { cert: Some(dir.0.join("junk.pem")), ..TlsConfig::from_dir(&ours, "shard") })
        .unwrap_err();
    assert!(junk.contains("junk.pem") && junk.contains("not a PEM"), "{junk}");
    let no_cert =
        check(TlsConfig { cert: None, key: None, ..TlsConfig::from_dir(&ours, "shard") }).unwrap_err();
    assert!(no_cert.contains("needs `cert` and `key`"), "{no_cert}");
    check(TlsConfig::from_dir(&ours, "shard")).expect("good files");
}

#[tokio::test]
async fn ps_serve_answers_grpc_and_https_over_tls_only() {
    use ps_serve::grpc::pb::{HealthRequest, prediction_client::PredictionClient};

    let dir = TempDir::new("tls-serve");
    let ours = make_certs(&dir, "ours");
    let transport = TransportConfig::default().with_tls(Some(TlsConfig::from_dir(&ours, "serve")));
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let models = std::sync::Arc::new(ps_serve::server::Models::new(Vec::new()));
    let running =
        ps_serve::server::start_with(models, any, any, ps_serve::server::Limits::default(), &transport)
            .await
            .expect("start ps-serve with TLS");

    let client_tls = TransportConfig::default().with_tls(Some(TlsConfig::from_dir(&ours, "reader")));
    let channel = ps_common::transport::endpoint(&client_tls, &running.grpc.to_string())
        .unwrap()
        .connect()
        .await
        .expect("TLS connect to ps-serve");
    let health = PredictionClient::new(channel).health(HealthRequest {}).await;
    assert!(health.is_ok(), "{health:?}");
    let plain = PredictionClient::connect(format!("http://{}", running.grpc)).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.health(HealthRequest {}).await.is_err(),
    };
    assert!(refused, "a plaintext gRPC client is refused");

    // HTTPS: an HTTP/1.1 request inside TLS, checked against our CA.
    let answer = https_get(&ours.join("ca.pem"), running.http, "localhost", "/healthz").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    assert_plain_http_unanswered(running.http, "/healthz").await;
    running.abort();
}

/// `GET path` as HTTP/1.1 inside TLS to `addr`, whose certificate must be
/// signed by `ca` and name `name`: the whole answer, or why the handshake
/// failed.
async fn https_get(ca: &Path, addr: SocketAddr, name: &str, path: &str) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut tls = connector.connect(server, tcp).await.map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    Ok(answer)
}

/// Plain HTTP to an HTTPS port gets no HTTP answer.
async fn assert_plain_http_unanswered(addr: SocketAddr, path: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// A shard started as the launcher starts it (TLS, client certificates
/// required on gRPC, `--metrics 127.0.0.1:0`) prints the metrics port it
/// bound and serves `/metrics` there over HTTPS only, to a scraper that
/// checks the shard's certificate and shows none of its own.
#[tokio::test]
async fn a_shard_serves_its_metrics_over_https_on_the_port_it_prints() {
    use tokio::io::AsyncBufReadExt;
    let dir = TempDir::new("tls-metrics");
    let ours = make_certs(&dir, "ours");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ps-cluster"))
        .args(["server", "--shard", "0", "--num-shards", "1", "--listen", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0", "--client-auth", "--tls-dir"])
        .arg(&ours)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start a shard");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap()
    };
    let (first, second) = (next().await, next().await);
    assert!(first.starts_with("listening on 127.0.0.1:"), "{first}");
    let metrics: SocketAddr = second.strip_prefix("metrics on ").expect(&second).parse().unwrap();
    assert_ne!(metrics.port(), 0);

    let answer = https_get(&ours.join("ca.pem"), metrics, "127.0.0.1", "/metrics").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("ps_read_wait_seconds"), "the shard's own metrics: {answer}");
    assert_plain_http_unanswered(metrics, "/metrics").await;
    child.kill().await.unwrap();
}

/// A worker's certificate serves its metrics under the name `worker-N` and
/// no other: its key cannot pose as a shard (`localhost`, 127.0.0.1).
#[tokio::test]
async fn a_worker_certificate_serves_metrics_as_that_worker_only() {
    let dir = TempDir::new("tls-worker-metrics");
    let ours = make_certs(&dir, "ours");
    let tls = ps_common::transport::metrics_server_config(&TlsConfig::from_dir(&ours, "worker-1")).unwrap();
    let registry = std::sync::Arc::new(ps_worker::metrics::WorkerMetrics::registry(1).0);
    let (addr, task) =
        ps_common::metrics::serve("127.0.0.1:0".parse().unwrap(), registry, Some(tls)).await.unwrap();
    let ca = ours.join("ca.pem");
    let answer = https_get(&ca, addr, "worker-1", "/metrics").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for name in ["localhost", "127.0.0.1", "worker-0"] {
        let e = https_get(&ca, addr, name, "/metrics").await.expect_err(name);
        assert!(e.contains("NotValidForName") || e.contains("not valid for"), "{name}: {e}");
    }
    task.abort();
}

/// `ps-serve-load`, which `cargo test --workspace` builds beside this test
/// binary (`target/<profile>/`).
fn ps_serve_load() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join("ps-serve-load");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds ps-serve's binaries",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_serve_load_drives_a_tls_server_over_grpc_and_https() {
    use std::sync::Arc;

    use ps_model::{ModelKind, SavedModel};
    use ps_registry::{NewVersion, Registry};
    use ps_serve::slot::{ModelSlot, Source};

    let dir = TempDir::new("tls-load");
    let ours = make_certs(&dir, "ours");
    let root = dir.0.join("registry");
    std::fs::create_dir_all(&root).unwrap();
    let url = format!("sqlite://{}", root.join("registry.db").display());
    let registry = Arc::new(Registry::open(&url, &root).await.unwrap());
    let layers = vec![784, 16, 10];
    let params = ps_model::Mlp::new(&layers).init_params(1);
    let model = SavedModel::from_flat(ModelKind::Mlp { layers }, &params).unwrap();
    let new = NewVersion {
        model: "mnist_mlp".into(),
        artifact: model.to_bytes().unwrap(),
        metrics: Default::default(),
        lineage: Default::default(),
        created_by: "test".into(),
    };
    registry.register(new).await.unwrap();
    let slot = Arc::new(ModelSlot::from_registry("mnist_mlp".into(), Source::Latest, registry, None, 100));
    slot.refresh().await.unwrap();
    let transport = TransportConfig::default().with_tls(Some(TlsConfig::from_dir(&ours, "serve")));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let models = Arc::new(ps_serve::server::Models::new(vec![slot]));
    let running =
        ps_serve::server::start_with(models, any, any, ps_serve::server::Limits::default(), &transport)
            .await
            .expect("start ps-serve with TLS");

    let load = |interface: &str, addr: SocketAddr, security: &[&str]| {
        let mut cmd = std::process::Command::new(ps_serve_load());
        cmd.args(["--interface", interface, "--addr", &format!("localhost:{}", addr.port())])
            .args(["--model", "mnist_mlp", "--concurrency", "1,4", "--seconds", "0.3", "--warmup", "0.1"])
            .args(["--mnist", "data/mnist"])
            .args(security);
        let child = tokio::process::Command::from(cmd).output();
        async move {
            let out = child.await.expect("run ps-serve-load");
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        }
    };
    let tls_dir = ours.to_str().unwrap();
    for (interface, addr) in [("grpc", running.grpc), ("http", running.http)] {
        let (ok, text) = load(interface, addr, &["--tls-dir", tls_dir]).await;
        assert!(ok, "{interface} over TLS: {text}");
        // One row per concurrency, each with requests and none failed.
        let rows: Vec<&str> = text.lines().filter(|l| l.contains(" failed / ")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        for row in rows {
            let requests: u64 = row.split_whitespace().nth(2).and_then(|n| n.parse().ok()).expect(row);
            assert!(requests > 0 && row.contains(" 0 failed / v1:"), "{interface}: {row}");
        }
        // Neither TLS nor --plaintext: refused before any request.
        let (ok, text) = load(interface, addr, &[]).await;
        assert!(!ok && text.contains("--plaintext"), "{text}");
        // Plaintext against the TLS server: the first request fails.
        let (ok, text) = load(interface, addr, &["--plaintext"]).await;
        assert!(!ok, "{interface} in plaintext against TLS: {text}");
    }
    running.abort();
}

#[tokio::test]
async fn the_unix_socket_speaks_tls_and_names_workers_by_their_certificates() {
    use ps_common::auth::OUTSIDE_READERS;
    use ps_common::optim::Rule;
    use ps_common::spec::{Init, TableSpec};
    use ps_worker::client::DenseSet;

    let dir = TempDir::new("tls-unix");
    let ours = make_certs(&dir, "ours");
    let socket = dir.0.join("s");
    let config = ServerConfig {
        transport: TransportConfig::default()
            .with_tls(Some(TlsConfig { client_auth: true, ..TlsConfig::from_dir(&ours, "shard") })),
        auth: ps_server::AuthConfig { enabled: true, token_key: None },
        data_socket: Some(socket.clone()),
        ..ServerConfig::default()
    };
    let shards = LocalShards::start_with(&config, 1).await.expect("start");
    let socket = dir.0.join("s-0");
    let as_cert = |name: &str, worker: u64| {
        let opts = client_opts(Some(TlsConfig::from_dir(&ours, name)));
        let addrs = shards.addrs.clone();
        async move { ShardedClient::connect(&addrs, worker, opts).await.expect("connect") }
    };
    let spec = TableSpec::dense("w", &[8], Init::zeros(), Rule::sgd(1.0).into());
    as_cert("admin", OUTSIDE_READERS).await.register(&spec).await.unwrap();
    let set = DenseSet::new(std::slice::from_ref(&spec), 1).unwrap();

    // worker-0's certificate pushes as worker 0, over TLS on the socket.
    let before = crate::util::connected_to(&socket);
    let mut w0 = as_cert("worker-0", 0).await;
    w0.push_dense(&set, &[1.0; 8], 0, 0, false).await.unwrap();
    let mut read = vec![0.0f32; 8];
    w0.pull_dense(&set, 0, &mut read).await.unwrap();
    assert_eq!(read, vec![-1.0; 8]);
    assert!(crate::util::connected_to(&socket) > before, "worker 0 is on the Unix socket");

    // worker-1's certificate claiming worker 0: refused there too, nothing applied.
    let mut impostor = as_cert("worker-1", 0).await;
    let e = impostor.push_dense(&set, &[5.0; 8], 1, 1, false).await.unwrap_err();
    assert!(e.to_string().contains("PermissionDenied") || e.to_string().contains("permission"), "{e}");
    w0.pull_dense(&set, 0, &mut read).await.unwrap();
    assert_eq!(read, vec![-1.0; 8], "the refused push changed nothing");

    // A plaintext hello on the socket gets no answer frame: the shard wants TLS.
    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hello = 9u32.to_le_bytes().to_vec();
    hello.push(0);
    hello.extend_from_slice(b"PSD1");
    raw.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "the shard closes the connection");
    assert!(!answer.starts_with(&[1, 0, 0, 0, 0]), "no OK frame for plaintext: {answer:?}");
    drop((w0, impostor));
    shards.stop().await.expect("stop");
}

/// Waits until the shard's data plane has bound its socket at `path`
/// (it starts beside the gRPC listener).
async fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no socket at {}", path.display());
}

/// Reads one frame: (kind, body).
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    io.read_exact(&mut head).await.expect("a frame's header");
    let mut body = vec![0u8; u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize - 1];
    io.read_exact(&mut body).await.expect("a frame's body");
    (head[4], body)
}

/// A data-plane connection by hand on `stream`: TLS as worker 0 of
/// `certs`, then the hello with `magic`; returns the session and whether
/// the shard's answer lets it leave TLS.
async fn hello_by_hand<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    certs: &Path,
    stream: S,
    magic: &[u8],
) -> (tokio_rustls::client::TlsStream<tokio::io::BufReader<S>>, bool) {
    use prost::Message as _;
    use tokio::io::AsyncWriteExt;
    let config = ps_common::transport::rustls_client_config(&TlsConfig::from_dir(certs, "worker-0"))
        .expect("client TLS");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut tls =
        connector.connect(name, ps_common::dataplane::tls_transport(stream)).await.expect("handshake");
    tls.write_all(&frame(0, magic)).await.unwrap();
    tls.flush().await.unwrap();
    let (kind, body) = read_frame(&mut tls).await;
    assert_eq!(kind, ps_common::dataplane::OK, "the hello is answered: {}", String::from_utf8_lossy(&body));
    let welcome = ps_common::dataplane::Welcome::decode(body.as_slice()).expect("a Welcome");
    (tls, welcome.clear)
}

/// Under TLS, a data-plane connection on the shard's Unix socket runs the
/// handshake and the hello under TLS and then carries its frames in the
/// clear (`transport.local_socket_tls` off, the default): the kernel moves
/// them between two authenticated processes. On TCP the shard keeps TLS
/// whatever the client asks, and so does a shard with `local_socket_tls`
/// on; its clients then stay under TLS on the socket, still served there.
#[tokio::test]
async fn a_unix_socket_connection_leaves_tls_after_its_hello_and_tcp_ones_never_do() {
    use ps_common::dataplane::{CLEAR_MAGIC, MAGIC};
    use ps_common::optim::Rule;
    use ps_common::spec::{Init, TableSpec};
    use ps_worker::client::DenseSet;
    use tokio::io::AsyncWriteExt;

    let dir = TempDir::new("tls-clear");
    let ours = make_certs(&dir, "ours");
    let start = |keep_tls: bool, name: &str| {
        let mut transport = TransportConfig::default()
            .with_tls(Some(TlsConfig { client_auth: true, ..TlsConfig::from_dir(&ours, "shard") }));
        transport.local_socket_tls = keep_tls;
        let config =
            ServerConfig { transport, data_socket: Some(dir.0.join(name)), ..ServerConfig::default() };
        async move { LocalShards::start_with(&config, 1).await.expect("start") }
    };
    // An unknown request kind: the shard answers it with UNIMPLEMENTED.
    let unknown = frame(9, b"");
    let unimplemented = tonic::Code::Unimplemented as u8;

    let shards = start(false, "clear").await;
    let socket = dir.0.join("clear-0");
    wait_for(&socket).await;
    // On the socket: the shard lets the client leave TLS, and then reads
    // and answers frames in the clear.
    let unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (tls, clear) = hello_by_hand(&ours, unix, CLEAR_MAGIC).await;
    assert!(clear, "the shard leaves TLS on its Unix socket");
    let (io, session) = tls.into_inner();
    let mut unix = ps_common::dataplane::into_clear(io, session).expect("nothing held beside the hello");
    unix.write_all(&unknown).await.unwrap();
    let (kind, body) = read_frame(&mut unix).await;
    assert_eq!(kind, unimplemented, "a clear request read as such: {}", String::from_utf8_lossy(&body));

    // The old hello on the socket: TLS stays, and frames go under it.
    let unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut tls, clear) = hello_by_hand(&ours, unix, MAGIC).await;
    assert!(!clear);
    tls.write_all(&unknown).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_frame(&mut tls).await.0, unimplemented);

    // On TCP: asking to leave TLS is answered "stay", and frames go under TLS.
    let transport = client_opts(Some(TlsConfig::from_dir(&ours, "worker-0"))).transport;
    let channel =
        ps_common::transport::endpoint(&transport, &shards.addrs[0]).unwrap().connect().await.unwrap();
    let mut rpc = ps_common::transport::client(&transport, channel, ps_common::auth::Credential::none());
    let port =
        rpc.data_plane(ps_common::wire::pb::DataPlaneRequest {}).await.unwrap().into_inner().port as u16;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tls, clear) = hello_by_hand(&ours, tcp, CLEAR_MAGIC).await;
    assert!(!clear, "TCP keeps TLS");
    tls.write_all(&unknown).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_frame(&mut tls).await.0, unimplemented);

    // A request sent with the hello that leaves TLS would be lost: refused.
    let unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let config = ps_common::transport::rustls_client_config(&TlsConfig::from_dir(&ours, "worker-0"))
        .expect("client TLS");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, ps_common::dataplane::tls_transport(unix)).await.unwrap();
    tls.write_all(&[frame(0, CLEAR_MAGIC), unknown.clone()].concat()).await.unwrap();
    tls.flush().await.unwrap();
    let (kind, body) = read_frame(&mut tls).await;
    assert_eq!(kind, tonic::Code::InvalidArgument as u8, "{}", String::from_utf8_lossy(&body));

    // The client leaves TLS on the socket by default; what it pushes and
    // pulls there is what gRPC reads.
    let spec = TableSpec::dense("w", &[8], Init::zeros(), Rule::sgd(1.0).into());
    let client = |data_plane: bool, addrs: Vec<String>| {
        let mut opts = client_opts(Some(TlsConfig::from_dir(&ours, "worker-0")));
        opts.transport.data_plane = data_plane;
        async move { ShardedClient::connect(&addrs, 0, opts).await.expect("connect") }
    };
    let set = DenseSet::new(std::slice::from_ref(&spec), 1).unwrap();
    let mut w = client(true, shards.addrs.clone()).await;
    w.register(&spec).await.unwrap();
    let before = crate::util::connected_to(&socket);
    w.push_dense(&set, &[1.0; 8], 0, 0, false).await.unwrap();
    assert!(crate::util::connected_to(&socket) > before, "the client is on the Unix socket");
    let mut read = vec![0.0f32; 8];
    w.pull_dense(&set, 0, &mut read).await.unwrap();
    assert_eq!(read, vec![-1.0; 8]);
    let grpc = client(false, shards.addrs.clone()).await;
    let mut over_grpc = vec![0.0f32; 8];
    grpc.pull_dense(&set, 0, &mut over_grpc).await.unwrap();
    assert_eq!(over_grpc, read);
    drop((w, grpc));
    shards.stop().await.expect("stop");

    // A shard that keeps TLS on its socket: asked to leave it, it says stay,
    // and a default client is served there under TLS.
    let shards = start(true, "kept").await;
    let socket = dir.0.join("kept-0");
    wait_for(&socket).await;
    let unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut tls, clear) = hello_by_hand(&ours, unix, CLEAR_MAGIC).await;
    assert!(!clear, "local_socket_tls keeps TLS");
    tls.write_all(&unknown).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_frame(&mut tls).await.0, unimplemented);
    let mut w = client(true, shards.addrs.clone()).await;
    w.register(&spec).await.unwrap();
    let before = crate::util::connected_to(&socket);
    w.push_dense(&set, &[1.0; 8], 0, 0, false).await.unwrap();
    w.pull_dense(&set, 0, &mut read).await.unwrap();
    assert_eq!(read, vec![-1.0; 8]);
    assert!(crate::util::connected_to(&socket) > before, "the client is on the Unix socket, under TLS");
    drop(w);
    shards.stop().await.expect("stop");
}
