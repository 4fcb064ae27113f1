//! Physical baselines: what this machine does with the same bytes and no
//! parameter server at all, measured in the same run as the figure they
//! stand beside (the machines are shared and noisy; ratios travel better
//! than absolute numbers).
//!
//! - [`Tcp`]: round trips over one raw loopback TCP connection
//!   (`TCP_NODELAY`, buffers allocated once), or a Unix socket: a pull of `n` bytes is a
//!   32-byte request answered by `n` bytes, a push of `n` bytes is `n` bytes
//!   answered by 32, a ping-pong is 32 bytes each way.
//! - [`memcpy_rate`]: bytes per second of one large `copy_from_slice`.

use std::io;
use std::time::{Duration, Instant};

use ps_common::dataplane::Io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The size of a small request or answer (ping-pong, pull request, push ack).
pub const SMALL: usize = 32;

/// One raw loopback connection (TCP, or a Unix socket) to a task that
/// answers every request with the number of bytes the request asks for.
/// Stopped on drop.
pub struct Tcp {
    stream: Box<dyn Io>,
    out: Vec<u8>,
    back: Vec<u8>,
    server: tokio::task::JoinHandle<()>,
}

impl Tcp {
    /// Over loopback TCP (`TCP_NODELAY`).
    pub async fn connect() -> io::Result<Tcp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let Ok((s, _)) = listener.accept().await else { return };
            let _ = s.set_nodelay(true);
            answer(s).await;
        });
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Tcp { stream: Box::new(stream), out: Vec::new(), back: Vec::new(), server })
    }

    /// Over a Unix socket at `path` (which must not exist yet).
    pub async fn connect_unix(path: &std::path::Path) -> io::Result<Tcp> {
        let listener = tokio::net::UnixListener::bind(path)?;
        let server = tokio::spawn(async move {
            let Ok((s, _)) = listener.accept().await else { return };
            answer(s).await;
        });
        let stream = tokio::net::UnixStream::connect(path).await?;
        Ok(Tcp { stream: Box::new(stream), out: Vec::new(), back: Vec::new(), server })
    }

    /// One round trip: `request` bytes out, `answer` bytes back.
    pub async fn round_trip(&mut self, request: usize, answer: usize) -> io::Result<()> {
        self.out.resize(16 + request, 1);
        self.out[..8].copy_from_slice(&(request as u64).to_le_bytes());
        self.out[8..16].copy_from_slice(&(answer as u64).to_le_bytes());
        self.back.resize(answer, 0);
        self.stream.write_all(&self.out).await?;
        self.stream.read_exact(&mut self.back).await?;
        Ok(())
    }

    /// Mean time of one round trip over `reps` (after one unmeasured).
    pub async fn time(&mut self, request: usize, answer: usize, reps: u32) -> io::Result<Duration> {
        self.round_trip(request, answer).await?;
        let t = Instant::now();
        for _ in 0..reps.max(1) {
            self.round_trip(request, answer).await?;
        }
        Ok(t.elapsed() / reps.max(1))
    }

    /// Mean time of a pull of `bytes`: a small request, `bytes` back.
    pub async fn pull(&mut self, bytes: usize, reps: u32) -> io::Result<Duration> {
        self.time(SMALL, bytes, reps).await
    }

    /// Mean time of a push of `bytes`: `bytes` out, a small answer back.
    pub async fn push(&mut self, bytes: usize, reps: u32) -> io::Result<Duration> {
        self.time(bytes, SMALL, reps).await
    }

    /// Mean time of a ping-pong of [`SMALL`] bytes each way.
    pub async fn ping_pong(&mut self, reps: u32) -> io::Result<Duration> {
        self.time(SMALL, SMALL, reps).await
    }
}

/// Answers requests on `s` until it closes. Request: u64 length of the
/// body, u64 length of the answer, body.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let (mut inbox, mut answer) = (Vec::new(), Vec::new());
    let mut head = [0u8; 16];
    while s.read_exact(&mut head).await.is_ok() {
        let body = u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) as usize;
        let reply = u64::from_le_bytes(head[8..].try_into().unwrap_or_default()) as usize;
        inbox.resize(body, 0);
        answer.resize(reply, 7);
        if s.read_exact(&mut inbox).await.is_err() || s.write_all(&answer).await.is_err() {
            return;
        }
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Bytes per second of copying `bytes` bytes with one `copy_from_slice`,
/// the best of `reps` (after one unmeasured copy, so the pages exist).
pub fn memcpy_rate(bytes: usize, reps: u32) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed());
    }
    std::hint::black_box(&dst);
    bytes as f64 / best.as_secs_f64().max(1e-12)
}
