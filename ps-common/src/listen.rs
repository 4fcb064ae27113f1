//! Accepting TCP connections with a cap on how many are open at once.
//!
//! Every listener of a process that faces the network (a shard's gRPC
//! port, `ps-serve`'s gRPC and HTTP ports, `/metrics`) accepts through a
//! [`Listener`]: a connection beyond the listener's cap is closed as soon as
//! it is accepted, so that a peer opening connections in a loop holds at
//! most `max` of them and never the process's file descriptors. Without
//! it, such a flood ran a shard out of descriptors, and tonic's accept loop
//! then retried the failing `accept` at once, forever: a shard spun a core
//! while the flood lasted (docs/SECURITY.md). Here an `accept` that fails
//! for want of descriptors or memory is retried after a pause.
//!
//! A listener may also cap the connections of one peer host ([`PerHost`],
//! [`Listener::per_host`]), so that a flood from one host cannot take every
//! slot from the others.
//!
//! The data plane (`ps_server::dataplane`) has its own accept loop, over
//! TCP and a Unix socket, and uses [`PerHost`] and [`ReportEvery`] too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a listener waits after an `accept` that failed for want of
/// resources (descriptors, memory) before it tries again.
const BACKOFF: Duration = Duration::from_millis(100);

/// How often a [`ReportEvery`] reports.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Events of one kind (connections refused at a cap, failed accepts) to be
/// reported at most once per 10 s with their count: a peer opening
/// connections in a loop must not flood the log with one warning each.
#[derive(Debug, Default)]
pub struct ReportEvery {
    since_report: u64,
    last_report: Option<Instant>,
}

impl ReportEvery {
    /// Counts one event; returns how many there were since the last report
    /// when it is time for the next one (the caller reports them).
    pub fn note(&mut self) -> Option<u64> {
        self.since_report += 1;
        if self.last_report.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return None;
        }
        self.last_report = Some(Instant::now());
        Some(std::mem::take(&mut self.since_report))
    }
}

/// The open connections of each peer host, each host held to `max`. Its
/// map has an entry per host with a connection open, no more.
#[derive(Debug)]
pub struct PerHost {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerHost {
    /// At most `max` (at least 1) connections from one host.
    pub fn new(max: usize) -> Arc<PerHost> {
        Arc::new(PerHost { max: max.max(1), open: Mutex::default() })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot of `ip`'s, held until dropped; `None` when `ip` holds `max`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HostSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(HostSlot { hosts: Arc::clone(self), ip })
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&ip).copied().unwrap_or(0)
    }
}

/// One connection's place in its host's count ([`PerHost::enter`]).
#[derive(Debug)]
pub struct HostSlot {
    hosts: Arc<PerHost>,
    ip: IpAddr,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut open = self.hosts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A TCP listener that keeps at most `max` of its connections open: each
/// accepted [`Connection`] holds a slot until it is dropped, and a
/// connection accepted with every slot taken is closed at once.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    hosts: Arc<PerHost>,
    nodelay: bool,
    what: &'static str,
    refused: ReportEvery,
    failing: ReportEvery,
}

impl Listener {
    /// `what` names the listener in its reports ("shard gRPC"), `max` is its
    /// cap (at least 1), `nodelay` sets `TCP_NODELAY` on each connection.
    pub fn new(listener: TcpListener, max: usize, nodelay: bool, what: &'static str) -> Listener {
        let max = max.max(1);
        let (refused, failing) = (ReportEvery::default(), ReportEvery::default());
        let (slots, hosts) = (Arc::new(Semaphore::new(max)), PerHost::new(max));
        Listener { listener, slots, max, hosts, nodelay, what, refused, failing }
    }

    /// Also at most `max` connections from one peer host (by default, as
    /// many as the listener's cap).
    pub fn per_host(mut self, max: usize) -> Listener {
        self.hosts = PerHost::new(max);
        self
    }

    /// The next connection within the cap, and its peer's address. Never
    /// fails: a connection over the cap is closed, a failed accept retried.
    pub async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((io, addr)) => {
                    let host = self.hosts.enter(addr.ip());
                    match (host, Arc::clone(&self.slots).try_acquire_owned()) {
                        (Some(host), Ok(slot)) => {
                            // Best effort: a socket that refuses the option still works.
                            let _ = io.set_nodelay(self.nodelay);
                            return (Connection { io, _slot: slot, _host: host }, addr);
                        }
                        _ => {
                            drop(io);
                            if let Some(refused) = self.refused.note() {
                                tracing::warn!(
                                    %addr,
                                    refused,
                                    "{}: connections refused at its limit of {} open, or of {} from one host \
                                     (refused: how many since the last report; addr: the last one's peer)",
                                    self.what,
                                    self.max,
                                    self.hosts.max()
                                );
                            }
                        }
                    }
                }
                // The connection failed before it was accepted: the next one is unaffected.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    if let Some(failed) = self.failing.note() {
                        tracing::warn!(error = %e, failed, "{}: accept failed; retrying every 100 ms", self.what);
                    }
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }

    /// The accepted connections as a stream, for tonic's
    /// `serve_with_incoming`: it never ends and never yields an error.
    pub fn into_stream(self) -> Incoming {
        Incoming { next: Box::pin(accept_owned(self)) }
    }
}

async fn accept_owned(mut listener: Listener) -> (Listener, Connection) {
    let (connection, _) = listener.accept().await;
    (listener, connection)
}

/// [`Listener::into_stream`].
pub struct Incoming {
    next: Pin<Box<dyn Future<Output = (Listener, Connection)> + Send>>,
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (listener, connection) = std::task::ready!(self.next.as_mut().poll(cx));
        self.next = Box::pin(accept_owned(listener));
        Poll::Ready(Some(Ok(connection)))
    }
}

/// Errors of one connection that failed while it was being accepted (the
/// peer gave up); anything else is the process's (out of descriptors).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock)
}

/// An accepted TCP connection holding its slot of its [`Listener`]'s cap
/// until dropped.
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    _host: HostSlot,
}

impl Connection {
    /// Waits until the peer has sent something (or closed), reading
    /// nothing.
    pub async fn peeked(&self) -> std::io::Result<()> {
        self.io.peek(&mut [0u8; 1]).await.map(drop)
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Whether the server closed `s` (end of stream or reset) within a
    /// second; a held connection, to which nobody writes, times out.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    /// With 2 slots, 2 connections are held and the next 3 closed at accept;
    /// a slot given back takes the next connection.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_accept_and_slots_come_back() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut listener = Listener::new(tcp, 2, true, "test");
            loop {
                let (connection, _) = listener.accept().await;
                tx.send(connection).unwrap();
            }
        });
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let held = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        let mut fates = Vec::new();
        for c in &mut clients {
            fates.push(closed(c).await);
        }
        assert_eq!(fates, [false, false, true, true, true]);
        assert!(rx.try_recv().is_err());

        drop(held.0);
        let mut next = TcpStream::connect(addr).await.unwrap();
        let third = rx.recv().await.unwrap();
        assert!(!closed(&mut next).await);
        let mut over = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut over).await);
        drop((held.1, third));
        server.abort();
    }

    /// A connection from `from` (a loopback address) to `to`.
    async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// With 2 connections a host among 10 slots, a host's third is closed
    /// while another host is served; its count comes back as its
    /// connections close, and hosts with none leave the map.
    #[tokio::test]
    async fn one_host_cannot_take_the_slots_of_others() {
        let tcp = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut listener = Listener::new(tcp, 10, true, "test").per_host(2);
            loop {
                let (connection, addr) = listener.accept().await;
                tx.send((connection, addr)).unwrap();
            }
        });
        let mut flood = Vec::new();
        for _ in 0..5 {
            flood.push(connect_from([127, 0, 0, 2], to).await);
        }
        let mut other = Vec::new();
        for _ in 0..2 {
            other.push(connect_from([127, 0, 0, 3], to).await);
        }
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(rx.recv().await.unwrap());
        }
        let mut fates = Vec::new();
        for c in flood.iter_mut().chain(&mut other) {
            fates.push(closed(c).await);
        }
        assert_eq!(fates, [false, false, true, true, true, false, false]);
        assert!(rx.try_recv().is_err());
        // One of the flooding host's connections closes: it may open one more.
        let i = held.iter().position(|(_, a)| a.ip() == IpAddr::from([127, 0, 0, 2])).unwrap();
        drop(held.remove(i));
        let mut again = connect_from([127, 0, 0, 2], to).await;
        held.push(rx.recv().await.unwrap());
        assert!(!closed(&mut again).await);
        server.abort();
        let _ = server.await;
        drop(held);
        let hosts = PerHost::new(1);
        let slot = hosts.enter(IpAddr::from([10, 0, 0, 1])).unwrap();
        assert!(hosts.enter(IpAddr::from([10, 0, 0, 1])).is_none());
        drop(slot);
        assert_eq!(hosts.open(IpAddr::from([10, 0, 0, 1])), 0);
        assert!(hosts.open.lock().unwrap().is_empty(), "no entry for a host with nothing open");
    }

    /// A thousand refused connections in a burst make one report, not a
    /// thousand; the count goes on until the next one.
    #[test]
    fn events_are_reported_once_per_period_with_their_count() {
        let mut r = ReportEvery::default();
        let reports: Vec<u64> = (0..1000).filter_map(|_| r.note()).collect();
        assert_eq!((reports, r.since_report), (vec![1], 999));
        r.last_report = Some(Instant::now() - REPORT_EVERY);
        assert_eq!(r.note(), Some(1000));
        assert_eq!(r.since_report, 0);
    }
}
