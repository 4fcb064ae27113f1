//! TLS on the shard's channel and on `ps-serve`'s: certificates made by
//! `ps-cluster certs` (`paramserver::certs`), a shard with mutual TLS, and the
//! clients it must refuse (plaintext, no certificate, another CA), each with
//! an error that says why, while the shard goes on serving the others.

use std::time::Duration;

use paramserver::certs;
use ps_common::transport::{TlsConfig, TransportConfig};
use ps_server::ServerConfig;
use ps_server::local::LocalShards;
use ps_worker::client::{ClientOptions, ShardedClient};

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let https_get = |path: &'static str| {
        let ca = ours.join("ca.pem");
        async move {
            use rustls_pki_types::pem::PemObject;
            use tokio_rustls::rustls;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(running.http).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the HTTP listener");
            let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            let _ = tls.read_to_string(&mut answer).await;
            answer
        }
    };
    let answer = https_get("/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(running.http).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    running.abort();
}
