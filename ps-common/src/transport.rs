//! Connection settings of every server and client channel, written once.
//!
//! [`TransportConfig`] is the one description of HTTP/2 windows and frames,
//! keep-alive, `TCP_NODELAY`, the connect timeout and the message limit.
//! Shards build their server with [`server`] (every RPC measured by
//! [`crate::metrics::RpcMetrics`]), [`incoming`] and [`service`];
//! workers build each channel with [`endpoint`] and [`client`], which
//! attaches the process's [`Credential`] to every call. Both sides
//! read the same struct, so a limit cannot be raised on one side only.
//!
//! TLS is set here too ([`TlsConfig`], the `[transport.tls]` table):
//! [`server`] and [`endpoint`] are the only places that apply it, so every
//! shard, worker, launcher and `ps-serve` channel is encrypted the same way
//! (rustls with the ring provider, through tonic). A process front end
//! refuses to start without either TLS settings or an explicit
//! `plaintext = true` ([`TransportConfig::require_security`]); in-process
//! test clusters built from [`TransportConfig::default`] are plaintext.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tower_layer::Stack;

use crate::auth::Credential;
use crate::listen::{Incoming, Listener};
use crate::metrics::{RpcLayer, RpcMetrics};
use crate::wire::pb::parameter_server_client::ParameterServerClient;
use crate::wire::pb::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::{Error, Result};

/// HTTP/2 and socket settings shared by shards and workers (the `[transport]`
/// table of a shard config, `[job.client.transport]` of a run file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// HTTP/2 initial window of each stream (one request), in KiB. Large
    /// windows let a multi-MiB value buffer travel without waiting for
    /// WINDOW_UPDATE frames.
    pub stream_window_kib: u32,
    /// HTTP/2 initial window of a connection (all its streams), in KiB.
    pub connection_window_kib: u32,
    /// Largest HTTP/2 frame, in bytes: fewer, larger frames for the bulk
    /// value buffers.
    pub max_frame_bytes: u32,
    /// Client HTTP/2 PING interval (0: no pings); a dead shard is noticed
    /// within interval + timeout. Servers ping their idle connections too
    /// (every 60 s, closing them after 20 s without an answer).
    #[serde(rename = "keep_alive_interval_ms", with = "duration_ms")]
    pub keep_alive_interval: Duration,
    /// How long a client waits for a PING's answer before closing the channel.
    #[serde(rename = "keep_alive_timeout_ms", with = "duration_ms")]
    pub keep_alive_timeout: Duration,
    /// Ping idle channels too (a worker waiting at a BSP barrier is idle).
    pub keep_alive_while_idle: bool,
    /// `TCP_NODELAY` on every accepted and connected socket. Without it,
    /// responses of a few hundred KiB stall on Nagle's algorithm against
    /// delayed ACKs.
    pub tcp_nodelay: bool,
    /// Time allowed for one TCP connect attempt.
    #[serde(rename = "connect_timeout_ms", with = "duration_ms")]
    pub connect_timeout: Duration,
    /// Largest request or response accepted (decoded) or sent (encoded), in
    /// MiB; larger messages fail with RESOURCE_EXHAUSTED.
    pub max_message_mib: u32,
    /// TLS on this side's connections (`[transport.tls]`); absent: plaintext,
    /// which a process accepts only with `plaintext = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Run without TLS, knowingly (`--plaintext`). Exclusive with `tls`.
    #[serde(skip_serializing_if = "is_false")]
    pub plaintext: bool,
    /// Move pulls and pushes on the data plane (`ps_common::dataplane`): a
    /// shard serves it beside gRPC, a client uses it where the shard offers
    /// one. Off: everything goes over gRPC. (Written out only when off, so
    /// run files and job fingerprints from before it read the same.)
    #[serde(skip_serializing_if = "is_true")]
    pub data_plane: bool,
    /// A client reaches a shard on its own host through the shard's Unix
    /// socket, when the shard serves one (`data_socket`), instead of
    /// loopback TCP. (Written out only when off.)
    #[serde(skip_serializing_if = "is_true")]
    pub local_socket: bool,
    /// Keep TLS on a data-plane connection over a shard's Unix socket for
    /// all its frames. Off (the default), such a connection runs the TLS
    /// handshake and the hello under TLS, both ends authenticated as on
    /// TCP, and then carries its frames in the clear: the kernel moves them
    /// between the two processes, and the socket (mode 0600) admits only
    /// processes of its owner, who can read the keys anyway; as gRPC's
    /// local credentials rate a Unix socket private and intact. Encrypting
    /// them cost a quarter of the reference run's throughput
    /// (docs/SECURITY.md). A shard with it on keeps TLS whatever its
    /// clients ask; TCP connections always keep it.
    #[serde(skip_serializing_if = "is_false")]
    pub local_socket_tls: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The files of one side's TLS (PEM), as `ps-cluster certs` writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA that signs the peer's certificate: the shard's, for a client;
    /// the clients', for a shard with `client_auth`.
    pub ca: PathBuf,
    /// This side's certificate (chain): required on a server, and on a
    /// client of a server with `client_auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Server: require a client certificate signed by `ca` (mutual TLS); its
    /// Subject CN is the client's principal (`admin`, `reader`, `worker:N`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub client_auth: bool,
    /// Client: the name the server's certificate must carry, instead of the
    /// host of the address (for addresses the certificate does not list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// How long a server's connection may be idle before the server pings the
/// peer, and how long it then waits for the answer before closing it.
const SERVER_PING_INTERVAL: Duration = Duration::from_secs(60);
const SERVER_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest an HTTP server waits for a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams a server may reset for its peer's errors on one connection
/// before it closes the connection.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Longest a TLS handshake may take on a server, so that a client that
/// connects and says nothing holds no handshake slot for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsConfig {
    /// The files `ps-cluster certs` writes into `dir` for principal file name
    /// `name` (`shard`, `admin`, `reader`, `worker-0`, ...): `ca.pem`,
    /// `NAME.pem`, `NAME.key`.
    pub fn from_dir(dir: &Path, name: &str) -> TlsConfig {
        TlsConfig {
            ca: dir.join(CA_FILE),
            cert: Some(dir.join(format!("{name}.pem"))),
            key: Some(dir.join(format!("{name}.key"))),
            client_auth: false,
            server_name: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(Error::InvalidTls("`cert` and `key` go together".into()));
        }
        if let Some(name) = &self.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(Error::InvalidTls(format!("`server_name` {name:?} is not a DNS name or IP address")));
        }
        Ok(())
    }

    fn identity(&self) -> Result<Option<Identity>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(read_pem(cert)?, read_pem(key)?))),
            _ => Ok(None),
        }
    }

    /// The settings of a server's TLS acceptor.
    fn server(&self) -> Result<ServerTlsConfig> {
        self.validate()?;
        let identity =
            self.identity()?.ok_or_else(|| Error::InvalidTls("a server needs `cert` and `key`".into()))?;
        let mut tls = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
        if self.client_auth {
            tls = tls.client_ca_root(Certificate::from_pem(read_pem(&self.ca)?));
        }
        Ok(tls)
    }

    /// The settings of a client's TLS connector.
    fn client(&self) -> Result<ClientTlsConfig> {
        self.validate()?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(&self.ca)?));
        if let Some(identity) = self.identity()? {
            tls = tls.identity(identity);
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// The TLS flags of every process (`ps-server`, `ps-worker`, `ps-serve`,
/// `ps-cluster` commands that connect); they override the config file's
/// `[transport.tls]`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Folder made by `ps-cluster certs`: `ca.pem`, and this process's
    /// certificate and key (`shard`, `worker-N`, `admin`, `reader`, `serve`).
    #[arg(long, env = "PS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The CA certificate (PEM) that signs the peers' certificates.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Run without TLS: traffic is readable and forgeable on the network.
    #[arg(long, conflicts_with_all = ["tls_dir", "tls_ca", "tls_cert", "tls_key"])]
    pub plaintext: bool,
}

impl TlsArgs {
    /// Applies the flags to `transport`; `name` is this process's
    /// certificate in `--tls-dir` (`worker-0`: `worker-0.pem`, `worker-0.key`).
    /// Flags naming files override the folder's, which overrides the file's
    /// `[transport.tls]` (keeping its `client_auth` and `server_name`).
    pub fn apply(&self, transport: &mut TransportConfig, name: &str) -> Result<()> {
        if self.plaintext {
            transport.tls = None;
            transport.plaintext = true;
            return Ok(());
        }
        let given = self.tls_dir.is_some() || self.tls_ca.is_some() || self.tls_cert.is_some();
        if !given {
            return Ok(());
        }
        let mut tls = match (&self.tls_dir, &transport.tls) {
            (Some(dir), old) => TlsConfig {
                client_auth: old.as_ref().is_some_and(|t| t.client_auth),
                server_name: old.as_ref().and_then(|t| t.server_name.clone()),
                ..TlsConfig::from_dir(dir, name)
            },
            (None, Some(old)) => old.clone(),
            (None, None) => {
                let ca = self
                    .tls_ca
                    .clone()
                    .ok_or_else(|| Error::InvalidTls("--tls-cert needs --tls-ca (or --tls-dir)".into()))?;
                TlsConfig { ca, cert: None, key: None, client_auth: false, server_name: None }
            }
        };
        if let Some(ca) = &self.tls_ca {
            tls.ca = ca.clone();
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            (tls.cert, tls.key) = (Some(cert.clone()), Some(key.clone()));
        }
        transport.tls = Some(tls);
        transport.plaintext = false;
        Ok(())
    }

    /// The transport settings these flags give a client with the defaults
    /// otherwise, checked to be TLS or explicitly plaintext.
    pub fn client_transport(&self, name: &str) -> Result<TransportConfig> {
        let mut t = TransportConfig::default();
        self.apply(&mut t, name)?;
        t.require_security()?;
        Ok(t)
    }
}

/// A rustls server configuration from `tls` (ALPN h2 and HTTP/1.1), for
/// servers that tonic does not build (`ps-serve`'s HTTP listener). Clients
/// must present a certificate signed by `tls.ca` when `client_auth` is on.
pub fn rustls_server_config(tls: &TlsConfig) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    tls.validate()?;
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err(Error::InvalidTls("a server needs `cert` and `key`".into()));
    };
    let bad = |path: &Path, reason: String| Error::TlsFile { path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_slice_iter(&read_pem(cert)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read_pem(key)?).map_err(|e| bad(key, e.to_string()))?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidTls(e.to_string()))?;
    let builder = if tls.client_auth {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read_pem(&tls.ca)?) {
            let ca = ca.map_err(|e| bad(&tls.ca, e.to_string()))?;
            roots.add(ca).map_err(|e| bad(&tls.ca, e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|e| bad(&tls.ca, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(certs, key_der).map_err(|e| bad(cert, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// The rustls server settings of a process's `/metrics` over HTTPS: its own
/// certificate, and no client certificate asked for, whatever its gRPC side
/// asks. The endpoint shows counters, never parameters; TLS keeps them
/// private on the wire and lets a scraper check whom it reads, and probes
/// and scrapers (Kubernetes, Prometheus) need no client identity.
pub fn metrics_server_config(tls: &TlsConfig) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>> {
    rustls_server_config(&TlsConfig { client_auth: false, ..tls.clone() })
}

/// Serves `router` on `listener` until the task is aborted, over HTTPS with
/// `tls` (plain HTTP without): each accepted connection's TLS handshake
/// (bounded in time) and then HTTP/1.1 or HTTP/2 on its own task, so that
/// a slow client holds up no other. A client must send its first bytes (the
/// TLS handshake's included) within [`HEADER_TIMEOUT`] of connecting, and a
/// request's headers within [`HEADER_TIMEOUT`] of starting them: a
/// connection that says nothing, or trickles header bytes, does not hold
/// its slot of the listener's cap for good (`axum::serve` sets neither
/// timeout, nor serves TLS). Left: a client that finished a TLS handshake
/// (with its certificate, under mutual TLS) and then says nothing. For
/// `ps-serve`'s HTTP listener and every process's `/metrics`.
pub async fn serve_http(
    mut listener: Listener,
    router: axum::Router,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(SERVER_PING_INTERVAL)
        .keep_alive_timeout(SERVER_PING_TIMEOUT);
    let builder = std::sync::Arc::new(builder);
    loop {
        let (tcp, peer) = listener.accept().await;
        let (acceptor, router, builder) = (acceptor.clone(), router.clone(), std::sync::Arc::clone(&builder));
        tokio::spawn(async move {
            // hyper's own header timeout starts with the first bytes.
            if tokio::time::timeout(HEADER_TIMEOUT, tcp.peeked()).await.is_err() {
                tracing::debug!(%peer, "nothing sent; closed");
                return;
            }
            let service = hyper_util::service::TowerToHyperService::new(router);
            let served = match acceptor {
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => builder.serve_connection(TokioIo::new(stream), service).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// A rustls client configuration from `tls`, for connections tonic does not
/// make (the data plane, `ps_common::dataplane`): the server must present a
/// certificate signed by `tls.ca`; this side presents `cert` if given.
pub fn rustls_client_config(tls: &TlsConfig) -> Result<tokio_rustls::rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    tls.validate()?;
    let bad = |path: &Path, reason: String| Error::TlsFile { path: path.display().to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_pem(&tls.ca)?) {
        let ca = ca.map_err(|e| bad(&tls.ca, e.to_string()))?;
        roots.add(ca).map_err(|e| bad(&tls.ca, e.to_string()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidTls(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&read_pem(cert)?)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(cert, e.to_string()))?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&read_pem(key)?).map_err(|e| bad(key, e.to_string()))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| bad(cert, e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The crypto provider of every TLS channel: rustls's ring provider with
/// the AES-128-GCM suites first. rustls prefers AES-256-GCM; both are
/// standard TLS 1.3 suites, and AES-128 (10 rounds against 14) costs less
/// CPU per byte, which the bulk parameter traffic on a shared machine feels.
fn crypto() -> tokio_rustls::rustls::crypto::CryptoProvider {
    use tokio_rustls::rustls::CipherSuite;
    let mut provider = tokio_rustls::rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

fn provider() -> std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(crypto())
}

/// Makes [`provider`] the process's default, which tonic's TLS builders
/// read; once. (A provider installed before by someone else stays.)
fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = crypto().install_default();
    });
}

/// The CA certificate's file name in a folder made by `ps-cluster certs`.
pub const CA_FILE: &str = "ca.pem";

/// A PEM file, refused if it is not one (tonic reads the bytes later, and
/// would say only that no certificate was found). Files are small: a larger
/// one is not ours.
fn read_pem(path: &Path) -> Result<Vec<u8>> {
    const MAX_PEM: u64 = 1 << 20;
    let bad = |reason: String| Error::TlsFile { path: path.display().to_string(), reason };
    let len = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
    if len > MAX_PEM {
        return Err(bad(format!("{len} bytes; a PEM file of ours is at most {MAX_PEM}")));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(bad("not a PEM file (no -----BEGIN line)".into()));
    }
    Ok(bytes)
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            stream_window_kib: 8 << 10,
            connection_window_kib: 16 << 10,
            max_frame_bytes: (1 << 20) - 1,
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(20),
            keep_alive_while_idle: true,
            tcp_nodelay: true,
            connect_timeout: Duration::from_secs(5),
            max_message_mib: 256,
            tls: None,
            plaintext: false,
            data_plane: true,
            local_socket: true,
            local_socket_tls: false,
        }
    }
}

/// HTTP/2's limits (RFC 9113 §6.5.2, §6.9.1).
const MIN_FRAME: u32 = 1 << 14;
const MAX_FRAME: u32 = (1 << 24) - 1;
const MAX_WINDOW_KIB: u32 = ((1 << 31) - 1) >> 10;

impl TransportConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidTransport(m));
        for (name, kib) in [
            ("stream_window_kib", self.stream_window_kib),
            ("connection_window_kib", self.connection_window_kib),
        ] {
            if !(64..=MAX_WINDOW_KIB).contains(&kib) {
                return bad(format!("{name} must be 64..={MAX_WINDOW_KIB}, got {kib}"));
            }
        }
        if !(MIN_FRAME..=MAX_FRAME).contains(&self.max_frame_bytes) {
            return bad(format!(
                "max_frame_bytes must be {MIN_FRAME}..={MAX_FRAME}, got {}",
                self.max_frame_bytes
            ));
        }
        if !self.keep_alive_interval.is_zero() && self.keep_alive_timeout.is_zero() {
            return bad("keep_alive_timeout_ms must be positive when keep-alive is on".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout_ms must be positive".into());
        }
        // tonic counts message sizes in usize; 2047 MiB keeps them below 2^31.
        if self.max_message_mib == 0 || self.max_message_mib > 2047 {
            return bad(format!("max_message_mib must be 1..=2047, got {}", self.max_message_mib));
        }
        if let Some(tls) = &self.tls {
            if self.plaintext {
                return Err(Error::InvalidTls(
                    "`plaintext = true` and TLS settings exclude each other".into(),
                ));
            }
            tls.validate()?;
        }
        Ok(())
    }

    /// A process facing a network encrypts unless told not to: TLS settings
    /// or `plaintext = true`, one of them. (Library defaults are plaintext,
    /// for in-process clusters on loopback.)
    pub fn require_security(&self) -> Result<()> {
        match (&self.tls, self.plaintext) {
            (Some(_), false) | (None, true) => Ok(()),
            (Some(_), true) => {
                Err(Error::InvalidTls("`plaintext = true` and TLS settings exclude each other".into()))
            }
            (None, false) => Err(Error::InvalidTls(
                "no TLS settings: give a CA, certificate and key (--tls-dir DIR made by `ps-cluster certs`, \
                 --tls-ca/--tls-cert/--tls-key, or [transport.tls]), or ask for plaintext (--plaintext)"
                    .into(),
            )),
        }
    }

    /// Reads and parses a server's TLS files now, so that a bad one stops a
    /// process before it announces its address.
    pub fn check_server(&self) -> Result<()> {
        if let Some(tls) = &self.tls {
            install_provider();
            Server::builder().tls_config(tls.server()?).map_err(|e| Error::InvalidTls(error_chain(&e)))?;
        }
        Ok(())
    }

    /// These settings with TLS from `tls` (`None`: plaintext, explicitly).
    pub fn with_tls(&self, tls: Option<TlsConfig>) -> TransportConfig {
        TransportConfig { plaintext: tls.is_none(), tls, ..self.clone() }
    }

    /// The URI scheme of this side's channels.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The message limit in bytes.
    pub fn max_message_bytes(&self) -> usize {
        (self.max_message_mib as usize) << 20
    }
}

/// A server builder with `config`'s HTTP/2 settings and TLS, every RPC
/// measured in `metrics`; add services, then serve on [`incoming`]. Fails on
/// TLS files that cannot be read or parsed.
pub fn server(
    config: &TransportConfig,
    metrics: &RpcMetrics,
) -> Result<Server<Stack<RpcLayer, tower_layer::Identity>>> {
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        install_provider();
        builder = builder.tls_config(tls.server()?).map_err(|e| Error::InvalidTls(error_chain(&e)))?;
    }
    Ok(builder
        // Pings on idle connections: the connection of a peer whose host
        // vanished is closed, not kept (and its slot of the listener's cap).
        .http2_keepalive_interval(Some(SERVER_PING_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_PING_TIMEOUT))
        // A connection whose peer makes the server reset this many streams
        // (malformed requests and other stream errors) is closed with
        // GOAWAY (RUSTSEC-2024-0003). hyper's default, but tonic 0.14 passes
        // its own default of `None` on to hyper, which turns the limit off.
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .initial_stream_window_size(config.stream_window_kib << 10)
        .initial_connection_window_size(config.connection_window_kib << 10)
        .max_frame_size(config.max_frame_bytes)
        .tcp_nodelay(config.tcp_nodelay)
        .layer(metrics.layer()))
}

/// Whether `e` (or a source of it) is a TLS failure: a certificate refused
/// by either side, a protocol mismatch. Such a failure does not heal by
/// retrying, unlike a shard that is not up yet.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<tokio_rustls::rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The gRPC metadata key of a pushback (gRFC A6: the client may send the
/// same request again after this many milliseconds).
pub const PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// The longest pushback a client honours; a larger one (from a confused or
/// hostile server) is read as this.
pub const MAX_PUSHBACK: Duration = Duration::from_secs(10);

/// `status` saying that the same request may be sent again after `after`.
///
/// Servers refuse some requests only for want of room at the moment (their
/// bytes in flight are at the limit, the caller is over its rate): those
/// RESOURCE_EXHAUSTED refusals carry a pushback, and clients wait and send
/// the request again. The other RESOURCE_EXHAUSTED refusals (a memory
/// budget, too many tables, a request larger than any budget) carry none:
/// sent again, the request would be refused again.
pub fn with_pushback(mut status: tonic::Status, after: Duration) -> tonic::Status {
    let ms = after.as_millis().clamp(1, MAX_PUSHBACK.as_millis()) as u32;
    status.metadata_mut().insert(PUSHBACK_KEY, ms.into());
    status
}

/// The pushback `status` carries ([`with_pushback`]), at most
/// [`MAX_PUSHBACK`]; `None` if it has none or one that is not a number.
pub fn pushback(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status.metadata().get(PUSHBACK_KEY)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_PUSHBACK))
}

/// An error and its sources, one line (tonic's transport errors say
/// "transport error" and keep the cause in the source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// The connections accepted on `listener`, at most `max` open at once and
/// `per_host` from one peer host (`ps_common::listen`), with `TCP_NODELAY`
/// set as `config` says. (The builder's own `tcp_nodelay` only reaches
/// listeners it binds itself.) `what` names the listener in its warnings.
pub fn incoming(
    config: &TransportConfig,
    listener: TcpListener,
    (max, per_host): (usize, usize),
    what: &'static str,
) -> Incoming {
    Listener::new(listener, max, config.tcp_nodelay, what).per_host(per_host).into_stream()
}

/// The generated shard service with `config`'s message limits.
pub fn service<T: ParameterServer>(config: &TransportConfig, svc: T) -> ParameterServerServer<T> {
    ParameterServerServer::new(svc)
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes())
}

/// The endpoint of a shard at `addr` (`host:port`, or a URI with a scheme),
/// with `config`'s connection settings and TLS. Nothing is connected yet.
pub fn endpoint(config: &TransportConfig, addr: &str) -> Result<Endpoint> {
    let scheme = config.scheme();
    let uri = match addr.split_once("://") {
        Some((given, _)) if given != scheme => {
            return Err(Error::InvalidAddress {
                addr: addr.to_string(),
                reason: match config.tls {
                    Some(_) => "TLS is on: give host:port or an https:// URI".into(),
                    None => "TLS is off: give host:port or an http:// URI".into(),
                },
            });
        }
        Some(_) => addr.to_string(),
        None => format!("{scheme}://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidAddress { addr: addr.to_string(), reason: e.to_string() })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(config.tcp_nodelay)
        .initial_stream_window_size(config.stream_window_kib << 10)
        .initial_connection_window_size(config.connection_window_kib << 10)
        .max_frame_size(config.max_frame_bytes);
    if !config.keep_alive_interval.is_zero() {
        endpoint = endpoint
            .http2_keep_alive_interval(config.keep_alive_interval)
            .keep_alive_timeout(config.keep_alive_timeout)
            .keep_alive_while_idle(config.keep_alive_while_idle);
    }
    if let Some(tls) = &config.tls {
        install_provider();
        // `connect_timeout` covers the TCP connect only: without a handshake
        // timeout, a peer that accepts and never answers holds a connect
        // (and a reconnect under a request) for good.
        let client = tls.client()?.timeout(config.connect_timeout);
        endpoint = endpoint.tls_config(client).map_err(|e| Error::InvalidTls(error_chain(&e)))?;
    }
    Ok(endpoint)
}

/// The host of a shard address (`host:port`, `[v6]:port`, or a URI with a
/// scheme), as written: for reaching the same host on another port.
pub fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    match rest.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => rest,
    }
}

/// A shard client: the generated client over a channel that attaches the
/// process's credential to every call.
pub type ShardClient = ParameterServerClient<InterceptedService<Channel, Credential>>;

/// The generated shard client over `channel`, with `config`'s message limits,
/// sending `credential` (a bearer token, or none) with every call.
pub fn client(config: &TransportConfig, channel: Channel, credential: Credential) -> ShardClient {
    ParameterServerClient::with_interceptor(channel, credential)
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes())
}

/// Serde helper: a [`Duration`] written as whole milliseconds (`*_ms` keys).
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = TransportConfig::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("keep_alive_interval_ms = 10000"), "{text}");
        assert_eq!(toml::from_str::<TransportConfig>(&text).unwrap(), c);
        assert_eq!(toml::from_str::<TransportConfig>("").unwrap(), c);
        assert_eq!(c.max_message_bytes(), 256 << 20);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<TransportConfig>("max_message_bytes = 1").is_err());
        let check = |text: &str| toml::from_str::<TransportConfig>(text).unwrap().validate();
        assert!(check("max_message_mib = 0").is_err());
        assert!(check("max_message_mib = 2048").is_err());
        assert!(check("max_frame_bytes = 1000").is_err());
        assert!(check("stream_window_kib = 2097152").is_err());
        assert!(check("connect_timeout_ms = 0").is_err());
        assert!(check("keep_alive_timeout_ms = 0").is_err());
        check("keep_alive_interval_ms = 0\nkeep_alive_timeout_ms = 0").unwrap();
        check("max_message_mib = 2047\nmax_frame_bytes = 16384").unwrap();
    }

    #[test]
    fn a_process_must_choose_tls_or_plaintext() {
        let none = TransportConfig::default();
        let e = none.require_security().unwrap_err().to_string();
        assert!(e.contains("--tls-dir") && e.contains("--plaintext"), "names both ways out: {e}");
        let plain: TransportConfig = toml::from_str("plaintext = true").unwrap();
        plain.require_security().unwrap();
        let text = "[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_auth = true";
        let tls: TransportConfig = toml::from_str(text).unwrap();
        tls.require_security().unwrap();
        assert_eq!(toml::from_str::<TransportConfig>(&toml::to_string(&tls).unwrap()).unwrap(), tls);
        let both: TransportConfig = toml::from_str(&format!("plaintext = true\n{text}")).unwrap();
        assert!(both.validate().is_err() && both.require_security().is_err());
        let half: TransportConfig = toml::from_str("[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"").unwrap();
        assert!(half.validate().unwrap_err().to_string().contains("go together"));
        assert!(toml::from_str::<TransportConfig>("[tls]\nca = \"c\"\ncafile = \"x\"").is_err());
    }

    #[test]
    fn tls_flags_pick_this_process_certificate_and_override_the_file() {
        let dir = Path::new("certs");
        let mut t = TransportConfig::default();
        let args = TlsArgs { tls_dir: Some(dir.into()), ..TlsArgs::default() };
        args.apply(&mut t, "worker-3").unwrap();
        let tls = t.tls.clone().unwrap();
        assert_eq!(
            (tls.ca, tls.cert, tls.key),
            (dir.join("ca.pem"), Some(dir.join("worker-3.pem")), Some(dir.join("worker-3.key")))
        );
        let plain = TlsArgs { plaintext: true, ..TlsArgs::default() };
        plain.apply(&mut t, "worker-3").unwrap();
        assert!(t.tls.is_none() && t.plaintext);
        let cert_only =
            TlsArgs { tls_cert: Some("a.pem".into()), tls_key: Some("a.key".into()), ..TlsArgs::default() };
        assert!(cert_only.client_transport("admin").is_err(), "a certificate without a CA");
        assert!(TlsArgs::default().client_transport("admin").is_err(), "neither TLS nor --plaintext");
    }

    #[test]
    fn tls_endpoints_use_https_and_read_their_files() {
        let tls = TlsConfig {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            cert: None,
            key: None,
            client_auth: false,
            server_name: None,
        };
        let c = TransportConfig::default().with_tls(Some(tls));
        let e = endpoint(&c, "127.0.0.1:7000").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "names the file: {e}");
        let e = endpoint(&c, "http://127.0.0.1:7000").unwrap_err().to_string();
        assert!(e.contains("TLS is on"), "{e}");
        let e = endpoint(&TransportConfig::default(), "https://127.0.0.1:7000").unwrap_err().to_string();
        assert!(e.contains("TLS is off"), "{e}");
        assert!(matches!(c.check_server(), Err(Error::InvalidTls(_))), "a server needs a certificate");
    }

    #[test]
    fn endpoints_accept_bare_addresses_and_uris() {
        let c = TransportConfig::default();
        assert_eq!(endpoint(&c, "127.0.0.1:7000").unwrap().uri().to_string(), "http://127.0.0.1:7000/");
        assert_eq!(endpoint(&c, "http://[::1]:7000").unwrap().uri().to_string(), "http://[::1]:7000/");
        assert!(matches!(endpoint(&c, "not an address"), Err(Error::InvalidAddress { .. })));
    }
}
