//! The shard's side of the data plane (`ps_common::dataplane`): the four
//! pull and push RPCs as frames on plain TCP or TLS, beside gRPC, and on a
//! Unix socket for clients on the same host when `data_socket` is set.
//!
//! Each connection is served by one task, one request at a time and in
//! order (a client may send several before reading), with the
//! same handlers as gRPC ([`Service`]'s `ParameterServer` methods): the same
//! rate limit, role check, consistency waits, budget and store calls, and
//! the same statuses. What differs is only how the request arrived: its
//! peer (address, and the client certificate the TLS handshake verified)
//! is put in the request's extensions, and the hello's bearer token, if
//! any, in its `authorization` metadata, where the handlers look for them.
//! A Unix-socket peer has no IP address: it reads as 127.0.0.1 (this host),
//! with a port number of its own per connection, so that the rate limit's
//! per-connection and per-host buckets (auth off; unchecked credentials)
//! treat it as a local client.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use ps_common::dataplane::{self, FrameReader, Kind, OutFrame, Peer};
use ps_common::listen::{PerHost, ReportEvery};
use ps_common::transport::TransportConfig;
use ps_common::wire::pb::parameter_server_server::ParameterServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;

use crate::error::{Error, Result};
use crate::service::Service;

/// Longest a new connection may take to finish its TLS handshake and send
/// its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no request for this long is closed (a client whose
/// host vanished leaves no slot taken for good); clients reconnect.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that takes none of its answers' bytes for this long has
/// stopped reading (or vanished): its connection is closed, so that it
/// does not hold a slot (and the answers held for it) for good.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers held for a client's pipelined requests are written once they
/// reach this many bytes.
const HOLD_AT: usize = 256 << 10;

/// Where the data plane listens: a TCP port, or a Unix socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A Unix socket's path, removed when dropped (the shard keeps it until
/// it stops).
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// The next connection (with `TCP_NODELAY` as `nodelay` says, on TCP)
    /// and its peer's address (a Unix-socket peer's is 127.0.0.1 and a port
    /// number of its own).
    async fn accept(&self, nodelay: bool) -> std::io::Result<(Box<dyn dataplane::Io>, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                let _ = tcp.set_nodelay(nodelay);
                Ok((Box::new(tcp), addr))
            }
            Listener::Unix(l) => {
                static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
                let (unix, _) = l.accept().await?;
                let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok((Box::new(unix), SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
            }
        }
    }
}

/// Serves the data plane on `listener` until dropped: the task is aborted
/// with the shard, and its connections with it (they live in its `JoinSet`),
/// so a stopped shard answers nothing more here either. `slots` bounds the
/// connections of every listener of the shard together, and `hosts` those
/// of one peer host on a TCP listener (a Unix socket's peers are all this
/// host: the socket file's permissions decide who connects).
pub async fn serve(
    listener: Listener,
    service: Service,
    config: TransportConfig,
    (slots, hosts): (Arc<Semaphore>, Arc<PerHost>),
) {
    let tls = match &config.tls {
        Some(tls) => match dataplane::server_tls(tls) {
            Ok(c) => Some(tokio_rustls::TlsAcceptor::from(c)),
            Err(e) => {
                // The gRPC server read the same files first and failed the start.
                tracing::error!(error = %e, "data plane: TLS settings unusable; not serving it");
                return;
            }
        },
        None => None,
    };
    let max = config.max_message_bytes();
    let mut connections = tokio::task::JoinSet::new();
    let mut refusals = ReportEvery::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept(config.tcp_nodelay) => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!(error = %e, "data plane: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let host = match listener {
            Listener::Tcp(_) => hosts.enter(addr.ip()).map(Some),
            Listener::Unix(_) => Some(None),
        };
        let (Some(host), Ok(slot)) = (host, Arc::clone(&slots).try_acquire_owned()) else {
            if let Some(refused) = refusals.note() {
                tracing::warn!(
                    %addr,
                    refused,
                    "data plane: connections refused at [limits] max_data_connections or \
                     max_connections_per_host (refused: how many since the last report; addr: the last one's \
                     peer)"
                );
            }
            continue;
        };
        let (service, tls) = (service.clone(), tls.clone());
        // Leaving TLS after the hello: on the Unix socket only, and only if
        // this shard does not keep it there.
        let may_clear = matches!(listener, Listener::Unix(_)) && !config.local_socket_tls;
        connections.spawn(async move {
            if let Err(e) = connection(service, stream, addr, tls, (max, may_clear)).await {
                tracing::debug!(%addr, error = %e, "data plane: connection closed");
            }
            drop((slot, host));
        });
    }
}

async fn connection(
    service: Service,
    stream: Box<dyn dataplane::Io>,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    (max, may_clear): (usize, bool),
) -> std::io::Result<()> {
    match tls {
        None => serve_stream(service, stream, Peer { addr, certificate: None }, max).await,
        Some(acceptor) => {
            let mut stream =
                tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(dataplane::tls_transport(stream)))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
            let certificate =
                stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| Arc::new(c.to_vec()));
            let peer = Peer { addr, certificate };
            let Some(Greeted { token, reader, clear }) =
                greet(&service, &mut stream, &peer, (true, may_clear)).await?
            else {
                return Ok(());
            };
            if !clear {
                return serve_requests(service, stream, (peer, token), reader, max).await;
            }
            // The client asked to leave TLS, and may: both ends do it now,
            // before either sends anything more.
            let (io, session) = stream.into_inner();
            let io = dataplane::into_clear(io, session)?;
            serve_requests(service, io, (peer, token), reader, max).await
        }
    }
}

/// Answers the hello, then each request in turn until the client closes
/// (a connection without TLS).
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    service: Service,
    mut io: S,
    peer: Peer,
    max: usize,
) -> std::io::Result<()> {
    match greet(&service, &mut io, &peer, (false, false)).await? {
        Some(Greeted { token, reader, .. }) => serve_requests(service, io, (peer, token), reader, max).await,
        None => Ok(()),
    }
}

/// A connection whose hello was answered OK.
struct Greeted {
    /// The token its requests carry.
    token: Option<AsciiMetadataValue>,
    /// The reader to go on with (empty when `clear`).
    reader: FrameReader,
    /// Both ends leave TLS now.
    clear: bool,
}

/// Reads and answers the hello: `None` if the client closed, or was
/// refused (its refusal sent). With `clear` in the answer, the client
/// asked to leave TLS and may (`tls`: the connection is under TLS;
/// `may_clear`: it may leave it).
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    service: &Service,
    io: &mut S,
    peer: &Peer,
    (tls, may_clear): (bool, bool),
) -> std::io::Result<Option<Greeted>> {
    // The hello is a magic and at most a token; requests come after it is
    // accepted.
    let mut reader = FrameReader::new(dataplane::MAX_HELLO);
    let mut out = OutFrame::default();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, reader.next(io))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello"))??;
    let Some((_, body)) = hello else { return Ok(None) };
    let accepted = dataplane::parse_hello(&body).and_then(|hello| {
        // Without TLS there is nothing to leave; on TCP, or with
        // `local_socket_tls`, the shard keeps it and says so.
        let clear = hello.clear && tls && may_clear;
        // What came with the hello would be lost when leaving TLS.
        if clear && !reader.is_empty() {
            return Err(Status::invalid_argument("a hello that leaves TLS must come alone"));
        }
        Ok((hello_token(service, hello.token, peer)?, clear))
    });
    let (token, clear) = match accepted {
        Ok(accepted) => accepted,
        Err(status) => {
            out.status(&status);
            out.send_within(io, STALL_TIMEOUT).await?;
            return Ok(None);
        }
    };
    out.raw(dataplane::OK, &dataplane::Welcome { clear }.encode_to_vec());
    out.send_within(io, STALL_TIMEOUT).await?;
    Ok(Some(Greeted { token, reader, clear }))
}

/// Answers each request in turn until the client closes.
async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    service: Service,
    mut io: S,
    (peer, token): (Peer, Option<AsciiMetadataValue>),
    mut reader: FrameReader,
    max: usize,
) -> std::io::Result<()> {
    let mut out = OutFrame::default();
    reader.set_max(max);
    loop {
        // Each request's bytes are charged to the shard's in-flight budget
        // as they arrive, and given back once it is answered.
        let charge = ps_common::inflight::Charge::new(&service.0.inflight);
        let mut allow = |bytes| charge.take(bytes).map_err(|r| Status::from(Error::from(r)));
        let next = reader.next_within(&mut io, &mut allow);
        let Ok(next) = tokio::time::timeout(IDLE_TIMEOUT, next).await else { break };
        let Some((kind, body)) = next? else { break };
        let context = Context { peer: &peer, token: token.as_ref() };
        match (body, Kind::from_byte(kind)) {
            (Err(refused), _) => out.status(&refused),
            (Ok(body), Some(Kind::PullDense)) => {
                out.answer(call(body, &context, |r| service.pull_dense(r)).await)
            }
            (Ok(body), Some(Kind::PushDense)) => {
                out.answer(call(body, &context, |r| service.push_dense(r)).await)
            }
            (Ok(body), Some(Kind::PullSparse)) => {
                out.answer(call(body, &context, |r| service.pull_sparse(r)).await)
            }
            (Ok(body), Some(Kind::PushSparse)) => {
                out.answer(call(body, &context, |r| service.push_sparse(r)).await)
            }
            (Ok(_), None) => {
                out.status(&Status::unimplemented(format!("no data-plane request of kind {kind}")))
            }
        }
        drop(charge);
        // A client that sent several requests at once gets its answers
        // together, once none is left waiting (`DataLink::push_then_pull`), or
        // once they hold `HOLD_AT` bytes: a client that sends requests and
        // reads nothing makes the shard hold at most that plus one answer.
        if !reader.has_frame() || out.len() >= HOLD_AT {
            out.send_within(&mut io, STALL_TIMEOUT).await?;
        }
    }
    Ok(())
}

/// What every request of a connection carries.
struct Context<'a> {
    peer: &'a Peer,
    token: Option<&'a AsciiMetadataValue>,
}

/// Checks the hello's token: with auth on, that the connection names a
/// principal (its token or client certificate). Returns the token as the
/// `authorization` metadata each request will carry.
fn hello_token(
    service: &Service,
    token: Option<String>,
    peer: &Peer,
) -> std::result::Result<Option<AsciiMetadataValue>, Status> {
    let header = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<AsciiMetadataValue>()
                .map_err(|_| Status::unauthenticated("the hello's token is not printable ASCII"))?,
        ),
        None => None,
    };
    if let Some(auth) = &service.0.auth {
        let probe = request((), &Context { peer, token: header.as_ref() });
        auth.principal_of(&probe).map_err(|e| Status::from(Error::Auth(e)))?;
    }
    Ok(header)
}

/// A tonic request of `msg` as the connection's: its peer and token.
fn request<T>(msg: T, context: &Context<'_>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(context.peer.clone());
    if let Some(token) = context.token {
        req.metadata_mut().insert("authorization", token.clone());
    }
    req
}

/// Decodes a request, runs its handler, and returns its answer.
async fn call<Req, Resp, F, Fut>(
    body: Bytes,
    context: &Context<'_>,
    handler: F,
) -> std::result::Result<Resp, Status>
where
    Req: Message + Default,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<Resp>, Status>>,
{
    let msg = Req::decode(body).map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))?;
    handler(request(msg, context)).await.map(tonic::Response::into_inner)
}

/// Binds the data plane beside the gRPC listener at `grpc`: same address,
/// port `port` (0: any free one).
pub async fn bind(grpc: SocketAddr, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::new(grpc.ip(), port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io { what: format!("binding the data plane {addr}"), source })
}

/// The longest path a Unix socket may have: `sun_path` holds 108 bytes with
/// the terminating NUL (Linux).
pub const MAX_SOCKET_PATH: usize = 107;

/// Binds the data plane's Unix socket at `path`, readable and writable by
/// this user only. A socket left there by a shard that did not stop cleanly
/// (nothing answers on it) is replaced; a socket something still serves,
/// and any other file, are errors, and are left alone.
pub async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let what = |doing: &str| format!("{doing} the data plane's Unix socket {}", path.display());
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::Config(format!(
            "{}: {} bytes long; a Unix socket's path may have at most {MAX_SOCKET_PATH}",
            what("binding"),
            path.as_os_str().len()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A listener that answers, or one that does not accept within a
            // second (its backlog full), is alive: not ours to replace.
            let probe =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(path)).await;
            if !matches!(probe, Ok(Err(_))) {
                return Err(Error::Config(format!(
                    "{}: another process serves that socket (a shard already running?)",
                    what("binding")
                )));
            }
            std::fs::remove_file(path).map_err(|source| Error::Io { what: what("replacing"), source })?
        }
        Ok(_) => {
            return Err(Error::Config(format!("{}: a file that is not a socket is there", what("binding"))));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Io { what: what("binding"), source })?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| Error::Io { what: what("restricting"), source })?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::service::Shard;

    fn service() -> Service {
        Service(Arc::new(Shard {
            store: crate::store::Store::new(0, 1),
            clocks: Default::default(),
            gate: Default::default(),
            max_wait: Duration::from_secs(1),
            checkpoint_dir: None,
            seal: Default::default(),
            queue: Default::default(),
            metrics: Default::default(),
            rate: crate::budget::RateLimiter::new(&Default::default()),
            inflight: ps_common::inflight::InFlight::new(1 << 30),
            limits: Default::default(),
            auth: None,
            data_port: Default::default(),
            data_socket: Default::default(),
        }))
    }

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(body);
        f
    }

    /// A client that sends requests and never reads their answers: the
    /// shard's writes stall, and once none makes progress for
    /// `STALL_TIMEOUT` the connection ends (it held its slot for good).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_no_answers_is_dropped_not_waited_on() {
        let (client, shard) = tokio::io::duplex(64 << 10);
        let peer = Peer { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), certificate: None };
        let started = tokio::time::Instant::now();
        let connection = tokio::spawn(serve_stream(service(), shard, peer, 1 << 20));
        let (mut read, mut write) = tokio::io::split(client);
        let mut hello = [0u8; 5];
        write.write_all(&frame(0, b"PSD1")).await.unwrap();
        read.read_exact(&mut hello).await.unwrap();
        assert_eq!(hello, [1, 0, 0, 0, dataplane::OK]);
        // Requests of an unknown kind: each answered with a status, ~50 bytes.
        let requests: Vec<u8> = (0..100_000).flat_map(|_| frame(9, b"")).collect();
        let _writer = tokio::spawn(async move {
            let _ = write.write_all(&requests).await;
            write
        });
        let ended = tokio::time::timeout(IDLE_TIMEOUT, connection).await;
        let err =
            ended.expect("the connection still waits on a client that reads nothing").unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < STALL_TIMEOUT * 2, "{:?}", started.elapsed());
        drop(read);
    }
}
