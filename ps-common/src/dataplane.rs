//! The data plane: pulls and pushes as length-prefixed frames on plain TCP
//! (or TLS), beside gRPC as the control plane (issue 14, docs/PERFORMANCE.md).
//!
//! gRPC costs a small pull or push several cross-thread wake-ups, HTTP/2
//! framing and HPACK, and copies a large one through tonic's encode and
//! decode buffers. The four hot RPCs (`PullDense`, `PushDense`,
//! `PullSparse`, `PushSparse`) therefore also travel here, as the same
//! protobuf messages in a frame of our own, answered in order by the
//! connection's own task on the shard: no
//! HTTP/2, no task hop. Every other RPC stays on gRPC, and a shard that
//! offers no data plane (or a client with `transport.data_plane = false`)
//! is served over gRPC as before. A shard answers a data-plane request
//! with the same handler, the same checks and the same status as over gRPC,
//! so the update semantics of ARCHITECTURE.md hold on either path.
//!
//! Wire format (all integers little-endian):
//!
//! ```text
//! frame    = len:u32 kind:u8 body      (len counts kind and body)
//! hello    = kind 0, body "PSD1" token  (the client's first frame; token: a
//!            bearer token's text, or empty)
//!          | kind 0, body "PSC1" token  (the same, on a Unix socket under
//!            TLS, asking to leave TLS once it is answered)
//! welcome  = kind 0, body a Welcome (the hello's answer; `clear`: both
//!            ends leave TLS now)
//! request  = kind 1..=4 (Kind), body a protobuf request
//! answer   = kind 0 (OK), body the protobuf response
//!          | kind c (a gRPC code), body the status message (UTF-8)
//!          | kind 0x40 | c, body pushback_ms:u32 and the message (a refusal
//!            that may succeed when sent again after that long,
//!            `transport::with_pushback`)
//! ```
//!
//! A client may send several requests before reading (a push and the next
//! pull, [`DataLink::push_then_pull`]): the shard answers them in order, and
//! writes its answers together once no further request is waiting in its
//! buffer.
//!
//! A shard may also serve the data plane on a Unix socket (its
//! `data_socket`), for clients on its own host: the same frames and hello,
//! and TLS on top when TLS is on, without the TCP stack (a 110 KB round
//! trip takes half the time of loopback TCP's, docs/PERFORMANCE.md). Under
//! TLS, a connection there runs the handshake and the hello under TLS and
//! then leaves it: its frames go in the clear, which only the kernel and
//! the two authenticated processes see ([`TransportConfig::local_socket_tls`]
//! keeps TLS on instead; [`into_clear`]). A
//! client uses it where the shard names one, the shard's address is a
//! loopback one (so the socket is on the client's host), and
//! `transport.local_socket` is on; if it cannot connect there it uses TCP.
//!
//! A frame longer than the message limit (`transport.max_message_mib`) is
//! refused before it is read; a frame's buffer grows only as its bytes
//! arrive, so a peer that announces a large frame and stalls holds little.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::transport::{TlsConfig, TransportConfig};
use crate::wire::pb;

/// The first bytes of a client's hello.
pub const MAGIC: &[u8; 4] = b"PSD1";
/// The first bytes of the hello of a client on a shard's Unix socket that
/// asks to go on in the clear, without TLS, once the hello is answered, if
/// the answer ([`Welcome`]) lets it ([`TransportConfig::local_socket_tls`]).
pub const CLEAR_MAGIC: &[u8; 4] = b"PSC1";
/// The ALPN protocol of a data-plane TLS connection.
pub const ALPN: &[u8] = b"ps-data/1";
/// A frame's header: length and kind.
const HEADER: usize = 5;
/// A frame's buffer grows by at most this much before its bytes arrive:
/// by as much as has arrived (doubling), [`FIRST_GROW`] at first.
const GROW: usize = 4 << 20;
/// What a frame's buffer may grow by before any of its body has arrived.
/// A header alone used to be charged [`GROW`] (4 MiB of a shard's in-flight
/// budget for 9 bytes sent, held while the peer stalled), so a few idle
/// connections could hold the share of large requests.
const FIRST_GROW: usize = 64 << 10;
/// How far the read of an answer may run past its end when the next answer
/// is read into its place ([`FrameReader::next_placed`]), and the read of
/// that answer's header past the header: a push's answer and the first
/// bytes of the pull's come in one read, and the bytes of the pull's answer
/// so read are copied once more. Reading up to 64 KiB ahead, as other reads
/// do, took most of a reference model's 110 KB answer through the buffer.
const SHORT_AHEAD: usize = 64;
/// A refused frame is read and dropped this many bytes at a time.
const SKIP_CHUNK: usize = 64 << 10;
/// The largest hello a shard reads: the magic and a bearer token (a
/// token is a header value for gRPC, where HTTP/2 servers take 16 KiB of
/// headers).
pub const MAX_HELLO: usize = 16 << 10;
/// Idle connections a client keeps per shard.
const MAX_IDLE: usize = 8;
/// After a connection to a shard's data plane could not be made, calls go
/// over gRPC ([`CallError::NotSent`]) for this long before it is tried again.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// Why a data-plane call failed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// No request went out: the data plane could not be reached (the shard
    /// is down or restarting, at its `max_data_connections`, or refused the
    /// hello), now or within the last [`DOWN_FOR`]. The caller may send the
    /// same requests over gRPC: they were never sent here.
    NotSent(Status),
    /// The requests went out (or may have): the shard's own status, a broken
    /// connection, or no answer in time.
    Sent(Status),
}

impl CallError {
    pub fn status(&self) -> &Status {
        match self {
            CallError::NotSent(s) | CallError::Sent(s) => s,
        }
    }
}

impl From<CallError> for Status {
    fn from(e: CallError) -> Status {
        match e {
            CallError::NotSent(s) | CallError::Sent(s) => s,
        }
    }
}

/// What a request frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    PullDense = 1,
    PushDense = 2,
    PullSparse = 3,
    PushSparse = 4,
}

impl Kind {
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::PullDense,
            2 => Kind::PushDense,
            3 => Kind::PullSparse,
            4 => Kind::PushSparse,
            _ => return None,
        })
    }
}

/// The kind byte of a hello and of an OK answer.
pub const OK: u8 = 0;
/// The bit of an answer's kind that says its body starts with a pushback.
const PUSHBACK: u8 = 0x40;

/// Reads frames from one connection into a buffer it reuses.
pub struct FrameReader {
    buf: BytesMut,
    max: usize,
    /// The capacity the buffer grew to for the largest frame read into it:
    /// taken back whole at the start of a frame once the frames handed out
    /// are dropped ([`FrameReader::next_within`]).
    held: usize,
}

impl FrameReader {
    /// A reader refusing frames whose body exceeds `max` bytes.
    pub fn new(max: usize) -> FrameReader {
        FrameReader { buf: BytesMut::new(), max, held: 0 }
    }

    /// The next frame as (kind, body); `None` at a clean end of stream
    /// (between frames).
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<Option<(u8, Bytes)>> {
        self.next_ahead(r, None).await
    }

    /// [`FrameReader::next`], reading at most `ahead` bytes (with `Some`)
    /// beyond what the frame still needs.
    async fn next_ahead<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        ahead: Option<usize>,
    ) -> std::io::Result<Option<(u8, Bytes)>> {
        match self.read_frame(r, &mut |_| Ok(()), ahead).await? {
            None => Ok(None),
            Some((kind, Ok(body))) => Ok(Some((kind, body))),
            // Not reached: nothing above refuses.
            Some((_, Err(status))) => Err(std::io::Error::other(status.message().to_string())),
        }
    }

    /// [`FrameReader::next`], asking `allow` for each part of the frame's body
    /// before its buffer grows for it (ahead of what has arrived by at most
    /// as much again, [`FIRST_GROW`] at first and [`GROW`] at most; the parts
    /// add up to the frame's length): a frame `allow`
    /// refuses is read to its end and dropped, a piece at a time, and comes
    /// back as its kind and the refusal, so the stream stays in step.
    pub async fn next_within<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        allow: &mut (dyn FnMut(usize) -> std::result::Result<(), Status> + Send),
    ) -> std::io::Result<Option<(u8, std::result::Result<Bytes, Status>)>> {
        self.read_frame(r, allow, None).await
    }

    /// [`FrameReader::next_within`], reading at most `ahead` bytes (with
    /// `Some`) beyond what the frame still needs.
    async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        allow: &mut (dyn FnMut(usize) -> std::result::Result<(), Status> + Send),
        ahead: Option<usize>,
    ) -> std::io::Result<Option<(u8, std::result::Result<Bytes, Status>)>> {
        // The memory of the frames before, once they are dropped, is taken
        // back whole (with what came of this frame with the last one, up to
        // `GROW` bytes, copied to its start), so that a frame no larger
        // than them is read without the buffer growing. Left to `reserve`,
        // the buffer kept its place after the last frame's end, and grew,
        // copying, each time a frame reached the allocation's end: a 36 MB
        // sparse push was copied once more on every push
        // (docs/PERFORMANCE.md, nineteenth session). Only memory this
        // connection already holds is taken ahead of the bytes; what the
        // frame is charged still follows its bytes (`allow`). With a frame
        // handed out still alive, this takes nothing.
        if self.held > 0 && self.buf.len() <= GROW {
            let _ = self.buf.try_reclaim(self.held.saturating_sub(self.buf.len()));
        }
        let Some(len) = self.header(r, ahead).await? else { return Ok(None) };
        if len == 0 || len - 1 > self.max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes; the limit is {} bytes", self.max + 1),
            ));
        }
        let (total, kind) = (4 + len, self.buf[4]);
        let mut allowed = 0;
        let mut ask = |upto: usize| match upto.checked_sub(allowed) {
            Some(more) if more > 0 => allow(more).map(|()| allowed = upto),
            _ => Ok(()),
        };
        while self.buf.len() < total {
            let upto = total.min(self.buf.len() + self.buf.len().clamp(FIRST_GROW, GROW));
            if let Err(refused) = ask(upto) {
                self.skip(r, total).await?;
                return Ok(Some((kind, Err(refused))));
            }
            self.buf.reserve(upto - self.buf.len());
            if self.read_some(r, total, ahead).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        // A frame that arrived with the one before it.
        if let Err(refused) = ask(total) {
            self.buf.advance(total);
            return Ok(Some((kind, Err(refused))));
        }
        self.held = self.held.max(self.buf.capacity());
        let mut frame = self.buf.split_to(total);
        frame.advance(HEADER);
        Ok(Some((kind, Ok(frame.freeze()))))
    }

    /// Reads until a frame's header is buffered, and returns the frame's
    /// length (as its header says: kind and body); `None` at a clean end of
    /// stream (before the header's first byte).
    async fn header<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        ahead: Option<usize>,
    ) -> std::io::Result<Option<usize>> {
        if self.buf.is_empty() {
            // The frame starts at a 4-byte boundary, so that what its sender
            // aligned (a push's gradients) lies aligned in memory. The
            // buffer's growth keeps the frame's start aligned: it copies it
            // to the start of a new allocation, or keeps its offset in one.
            self.buf.reserve(FIRST_GROW + 4);
            let skip = (4 - self.buf.as_ptr() as usize % 4) % 4;
            self.buf.put_bytes(0, skip);
            self.buf.advance(skip);
        }
        while self.buf.len() < HEADER {
            self.buf.reserve(64 << 10);
            if self.read_some(r, HEADER, ahead).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(Some(u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize))
    }

    /// Reads what the stream has into the buffer, up to `ahead` bytes (with
    /// `Some`) beyond the `upto` the buffer needs.
    async fn read_some<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        upto: usize,
        ahead: Option<usize>,
    ) -> std::io::Result<usize> {
        match ahead {
            None => r.read_buf(&mut self.buf).await,
            Some(ahead) => {
                let most = upto.saturating_sub(self.buf.len()) + ahead;
                r.read_buf(&mut (&mut self.buf).limit(most)).await
            }
        }
    }

    /// The next frame, an answer to a dense pull: if it is an OK answer laid
    /// out as `place` expects (as a shard lays out an uncompressed pull's
    /// answer), each chunk's values are read from the stream straight into
    /// their place, with no pass through the buffer, and
    /// [`Answer::Placed`] comes back. Any other frame (a refusal, or an
    /// answer laid out otherwise) is read whole, as by [`FrameReader::next`];
    /// values already placed are then put back where they were in it, so the
    /// frame comes back as it was sent.
    pub async fn next_placed<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        place: &mut Placement<'_>,
    ) -> std::io::Result<Answer> {
        // The header is read short too: the values stay in the socket.
        let len = (self.header(r, Some(SHORT_AHEAD)).await?)
            .ok_or(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        if self.buf[4] != OK || len != place.body_len + 1 || place.body_len > self.max {
            return self.next_answer(r, false).await;
        }
        let mut kept = BytesMut::with_capacity(HEADER + place.heads);
        kept.extend_from_slice(&self.buf.split_to(HEADER));
        // Where in `kept` each chunk placed so far had its values.
        let mut placed = Vec::with_capacity(place.chunks.len());
        for j in 0..place.chunks.len() {
            let (head, _) = &place.chunks[j];
            let at = kept.len();
            kept.resize(at + head.len(), 0);
            self.read_exact(r, &mut kept[at..]).await?;
            if kept[at..] != head[..] {
                // Not the layout expected: the frame as it came, then the rest.
                let mut frame = BytesMut::with_capacity(len + 4);
                let mut from = 0;
                for (&to, (_, values)) in placed.iter().zip(&place.chunks) {
                    frame.extend_from_slice(&kept[from..to]);
                    frame.extend_from_slice(bytemuck::cast_slice::<f32, u8>(values));
                    from = to;
                }
                frame.extend_from_slice(&kept[from..]);
                frame.extend_from_slice(&self.buf);
                self.buf = frame;
                return self.next_answer(r, false).await;
            }
            self.read_exact(r, bytemuck::cast_slice_mut::<f32, u8>(place.chunks[j].1)).await?;
            placed.push(kept.len());
        }
        Ok(Answer::Placed)
    }

    /// [`FrameReader::next`], where the stream may not end; with `short`,
    /// reading at most [`SHORT_AHEAD`] bytes beyond the frame's end, so
    /// that the answer after it (one read into its place) is left in the
    /// socket, not taken into the buffer.
    async fn next_answer<R: AsyncRead + Unpin>(&mut self, r: &mut R, short: bool) -> std::io::Result<Answer> {
        match self.next_ahead(r, short.then_some(SHORT_AHEAD)).await? {
            Some((kind, body)) => Ok(Answer::Frame(kind, body)),
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// Fills `to` with the stream's next bytes: those buffered first.
    async fn read_exact<R: AsyncRead + Unpin>(&mut self, r: &mut R, to: &mut [u8]) -> std::io::Result<()> {
        let buffered = to.len().min(self.buf.len());
        self.buf.copy_to_slice(&mut to[..buffered]);
        r.read_exact(&mut to[buffered..]).await.map(drop)
    }

    /// Reads the rest of a frame of `total` bytes (header included), part
    /// of which is buffered, and drops it, keeping at most [`SKIP_CHUNK`]
    /// bytes of it at a time.
    async fn skip<R: AsyncRead + Unpin>(&mut self, r: &mut R, total: usize) -> std::io::Result<()> {
        let mut left = total - self.buf.len();
        self.buf.clear();
        if self.buf.capacity() > SKIP_CHUNK {
            self.buf = BytesMut::new();
            self.held = 0;
        }
        while left > 0 {
            self.buf.reserve(left.min(SKIP_CHUNK));
            let n = r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            // What came beyond the frame is the next frame's.
            let dropped = n.min(left);
            self.buf.advance(dropped);
            left -= dropped;
        }
        Ok(())
    }

    /// Sets the largest frame body accepted from now on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Whether it holds no bytes of a frame.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether a whole frame is already buffered: the next [`FrameReader::next`]
    /// returns without reading.
    pub fn has_frame(&self) -> bool {
        self.buf.len() >= HEADER && {
            let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            self.buf.len() >= 4 + len
        }
    }
}

/// An answer as [`FrameReader::next_placed`] reads it.
#[derive(Debug)]
pub enum Answer {
    /// An OK answer to a dense pull, its values read into their place.
    Placed,
    /// Any other frame: its kind and body.
    Frame(u8, Bytes),
}

/// Where the values of the answer to one dense pull go: each chunk's
/// straight into the caller's floats ([`FrameReader::next_placed`]). A
/// client that took them from the frame copied every pulled byte once
/// more: a quarter of a 1M-float pull's time on loopback TCP
/// (docs/PERFORMANCE.md, twenty-fifth session).
pub struct Placement<'a> {
    /// Per chunk: the answer's bytes before its values (the chunk's key and
    /// length, its tensor and index, and the values' key and length), and
    /// the floats its values go to.
    chunks: Vec<(Vec<u8>, &'a mut [f32])>,
    /// The length of the heads, and of the answer's body.
    heads: usize,
    body_len: usize,
}

impl<'a> Placement<'a> {
    /// The placement of the uncompressed answer to `request` in `outs`
    /// (one per chunk, in the request's order, each as long as its chunk).
    /// `None` where there is none: a compressed pull, a count of `outs`
    /// that is not the request's, or a big-endian machine (where the wire's
    /// little-endian floats are not the machine's).
    pub fn new(request: &pb::PullDenseRequest, outs: Vec<&'a mut [f32]>) -> Option<Placement<'a>> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let compressed = request.meta.is_some_and(|m| m.compressed);
        if cfg!(target_endian = "big") || compressed || outs.len() != request.chunks.len() {
            return None;
        }
        let (mut heads, mut body_len) = (0, 0);
        let chunks = (request.chunks.iter().zip(outs))
            .map(|(id, out)| {
                // As a shard writes it (`Body for pb::PullDenseResponse`).
                let head =
                    pb::DenseChunk { tensor: id.tensor.clone(), index: id.index, values: Bytes::new() };
                let values = 4 * out.len();
                let field = match values {
                    0 => 0,
                    n => key_len(3) + encoded_len_varint(n as u64) + n,
                };
                let mut bytes = Vec::new();
                encode_key(1, WireType::LengthDelimited, &mut bytes);
                encode_varint((head.encoded_len() + field) as u64, &mut bytes);
                let _ = head.encode(&mut bytes);
                if values > 0 {
                    encode_key(3, WireType::LengthDelimited, &mut bytes);
                    encode_varint(values as u64, &mut bytes);
                }
                heads += bytes.len();
                body_len += bytes.len() + values;
                (bytes, out)
            })
            .collect();
        Some(Placement { chunks, heads, body_len })
    }

    /// The answer's body length, laid out as expected.
    pub fn body_len(&self) -> usize {
        self.body_len
    }
}

/// Bytes fields at least this long are written from their own buffer.
const SPLIT_AT: usize = 64 << 10;

/// Read buffer beneath a TLS session. rustls reads at most 4 KiB from its
/// transport per call (its deframer's `READ_SIZE`), so a 110 KB frame took
/// about 27 `recvfrom` calls, 4.6 times as many as in plaintext (strace of
/// a shard in the reference run); through this buffer it takes one or two.
const TLS_READ_BUFFER: usize = 64 << 10;

/// `stream` with a [`TLS_READ_BUFFER`]-sized read buffer, for a TLS session
/// to run on (writes pass straight through).
pub fn tls_transport<S: AsyncRead>(stream: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream)
}

/// An outgoing frame. Its header and small fields are encoded into one
/// buffer; its large `bytes` fields (a pull's rows, a push's gradients and
/// keys) are written from their own buffers after the field's key and
/// length, not copied in: copying a 32 MiB answer into a fresh frame buffer
/// cost a pass over it and a page fault every 4 KiB (docs/PERFORMANCE.md).
/// Protobuf decoders accept fields in any order, so the body still decodes
/// as the message. It may hold several frames, written together.
#[derive(Default)]
pub struct OutFrame {
    head: BytesMut,
    /// Written before what is left in `head`: head pieces and large fields.
    parts: Vec<Bytes>,
}

impl OutFrame {
    /// Starts a frame after those already held.
    fn start(&mut self, kind: u8, body_len: usize) {
        if !self.head.is_empty() {
            self.parts.push(self.head.split().freeze());
        }
        self.head.put_u32_le((body_len + 1) as u32);
        self.head.put_u8(kind);
    }

    /// Forgets the frames held (after writing them).
    pub fn clear(&mut self) {
        self.parts.clear();
        self.head.clear();
        // A large answer's buffer is not kept for a connection's lifetime.
        if self.head.capacity() > 1 << 20 {
            self.head = BytesMut::new();
        }
    }

    /// Whether no frame is held.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.head.is_empty()
    }

    /// A frame of `kind` holding `body` as it is.
    pub fn raw(&mut self, kind: u8, body: &[u8]) {
        self.start(kind, body.len());
        self.head.put_slice(body);
    }

    /// A frame of `kind` holding `msg`.
    pub fn message<M: Body>(&mut self, kind: u8, msg: &M) {
        let (len, before) = (msg.body_len(), self.len());
        self.start(kind, len);
        msg.put(self);
        debug_assert_eq!(self.len() - before, HEADER + len, "a Body's put writes its body_len");
    }

    /// An answer: OK and `msg`, or the status's code and message.
    pub fn answer<M: Body>(&mut self, answer: std::result::Result<M, Status>) {
        match answer {
            Ok(msg) => self.message(OK, &msg),
            Err(status) => self.status(&status),
        }
    }

    /// A refusal.
    pub fn status(&mut self, status: &Status) {
        let code = (status.code() as i32).clamp(1, 16) as u8;
        let message = status.message().as_bytes();
        match crate::transport::pushback(status) {
            Some(after) => {
                self.start(code | PUSHBACK, 4 + message.len());
                self.head.put_u32_le(after.as_millis() as u32);
                self.head.put_slice(message);
            }
            None => self.raw(code, message),
        }
    }

    /// Encodes every field of `msg` that is set into the head (a [`Body`]
    /// leaves its large fields empty here and puts them with
    /// [`OutFrame::put_bytes`]).
    pub fn put_fields(&mut self, msg: &impl Message) {
        // Cannot fail: a BytesMut grows.
        let _ = msg.encode(&mut self.head);
    }

    /// Field `tag` of type `bytes`, as protobuf encodes it (nothing when
    /// empty); its bytes are written from `value`'s own buffer when large.
    pub fn put_bytes(&mut self, tag: u32, value: &Bytes) {
        if value.len() < SPLIT_AT {
            if !value.is_empty() {
                prost::encoding::bytes::encode(tag, value, &mut self.head);
            }
            return;
        }
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut self.head);
        prost::encoding::encode_varint(value.len() as u64, &mut self.head);
        self.parts.push(self.head.split().freeze());
        self.parts.push(value.clone());
    }

    /// Length-delimited field `tag` holding `chunk` with `pad` bytes of
    /// padding before its values ([`ChunkLayout`]), which are put with
    /// [`OutFrame::put_bytes`].
    fn put_chunk(&mut self, tag: u32, chunk: &pb::DenseChunk, pad: usize) {
        let head = chunk_head(chunk);
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut self.head);
        prost::encoding::encode_varint((chunk.encoded_len() + pad) as u64, &mut self.head);
        self.put_fields(&head);
        if pad > 0 {
            prost::encoding::encode_key(
                PAD_FIELD,
                prost::encoding::WireType::LengthDelimited,
                &mut self.head,
            );
            prost::encoding::encode_varint((pad - 2) as u64, &mut self.head);
            self.head.put_bytes(0, pad - 2);
        }
        self.put_bytes(3, &chunk.values);
    }

    /// The frames' length in bytes, headers included.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum::<usize>() + self.head.len()
    }

    /// Writes the frames (in as few system calls as the stream allows: one
    /// vectored write of all their pieces on TCP) and flushes. They stay
    /// held until [`OutFrame::clear`] or the next [`OutFrame::send`].
    pub async fn write_to<W: AsyncWrite + Unpin + ?Sized>(&self, w: &mut W) -> std::io::Result<()> {
        self.write_within(w, None).await
    }

    /// [`OutFrame::write_to`], failing with `TimedOut` if the peer takes no
    /// byte for `stall` (with `Some`).
    async fn write_within<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        stall: Option<Duration>,
    ) -> std::io::Result<()> {
        let mut slices: Vec<std::io::IoSlice<'_>> =
            self.parts.iter().map(|p| &p[..]).chain([&self.head[..]]).map(std::io::IoSlice::new).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = within(stall, w.write_vectored(rest)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        within(stall, w.flush()).await
    }

    /// Writes the frames held, then forgets them.
    pub async fn send<W: AsyncWrite + Unpin + ?Sized>(&mut self, w: &mut W) -> std::io::Result<()> {
        let written = self.write_to(w).await;
        self.clear();
        written
    }

    /// [`OutFrame::send`] to a peer that must keep taking bytes: a write
    /// that makes no progress for `stall` fails with `TimedOut` (a shard's
    /// answer to a client that stopped reading is not waited on forever).
    pub async fn send_within<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        w: &mut W,
        stall: Duration,
    ) -> std::io::Result<()> {
        let written = self.write_within(w, Some(stall)).await;
        self.clear();
        written
    }
}

/// `io`, failing with `TimedOut` if it takes longer than `limit` (with `Some`).
async fn within<T>(
    limit: Option<Duration>,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    let Some(limit) = limit else { return io.await };
    tokio::time::timeout(limit, io).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took no bytes for {limit:?}"),
        ))
    })
}

/// A message as a frame lays it out: by default every field in the head;
/// the pulls' answers and the pushes put their large `bytes` fields after
/// it, from their own buffers ([`OutFrame`]).
pub trait Body: Message + Sized {
    /// The body's length in a frame: its encoded length, and the padding
    /// `put` adds, if any.
    fn body_len(&self) -> usize {
        self.encoded_len()
    }

    fn put(&self, out: &mut OutFrame) {
        out.put_fields(self);
    }
}

impl Body for pb::PullDenseRequest {}
impl Body for pb::PushResponse {}
impl Body for Welcome {}

impl Body for pb::PullDenseResponse {
    fn put(&self, out: &mut OutFrame) {
        out.put_fields(&pb::PullDenseResponse { chunks: Vec::new(), codecs: self.codecs.clone() });
        for chunk in &self.chunks {
            out.put_chunk(1, chunk, 0);
        }
    }
}

/// A push's gradients are laid out 4-byte aligned from the frame's start
/// ([`ChunkLayout`]): a shard whose read buffer starts the frame at a 4-byte
/// boundary ([`FrameReader`]) applies them where they lie instead of
/// copying them out first.
impl Body for pb::PushDenseRequest {
    fn body_len(&self) -> usize {
        let head = pb::PushDenseRequest { chunks: Vec::new(), meta: self.meta };
        let layout = ChunkLayout::new(head.encoded_len(), &self.chunks);
        head.encoded_len() + layout.map(|(_, framed)| framed).sum::<usize>()
    }

    fn put(&self, out: &mut OutFrame) {
        let head = pb::PushDenseRequest { chunks: Vec::new(), meta: self.meta };
        out.put_fields(&head);
        for (chunk, (pad, _)) in self.chunks.iter().zip(ChunkLayout::new(head.encoded_len(), &self.chunks)) {
            out.put_chunk(1, chunk, pad);
        }
    }
}

/// The field number of a chunk's padding: reserved in `DenseChunk`, so a
/// decoder skips it as an unknown field.
const PAD_FIELD: u32 = 15;

/// A dense chunk without its values.
fn chunk_head(chunk: &pb::DenseChunk) -> pb::DenseChunk {
    pb::DenseChunk { tensor: chunk.tensor.clone(), index: chunk.index, values: Bytes::new() }
}

/// The padding of each chunk of a message whose chunks (field 1) follow
/// `head` bytes of other fields, so that each chunk's values start at a
/// multiple of 4 bytes from the frame's start; with each chunk's length in
/// the body (key, length and padding included). The padding is a `bytes`
/// field of [`PAD_FIELD`] before the values: 0 bytes, or its key, its
/// length and 0 to 3 zeros (2 to 5 bytes), which reaches every remainder.
struct ChunkLayout<'a> {
    at: usize,
    chunks: std::slice::Iter<'a, pb::DenseChunk>,
}

impl ChunkLayout<'_> {
    fn new(head: usize, chunks: &[pb::DenseChunk]) -> ChunkLayout<'_> {
        ChunkLayout { at: HEADER + head, chunks: chunks.iter() }
    }
}

impl Iterator for ChunkLayout<'_> {
    /// (padding, length in the body)
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        use prost::encoding::{encoded_len_varint, key_len};
        let chunk = self.chunks.next()?;
        let values = chunk.values.len();
        let framed = |pad: usize| {
            let len = chunk.encoded_len() + pad;
            key_len(1) + encoded_len_varint(len as u64) + len
        };
        // The values are the chunk's last bytes.
        let values_at = |pad: usize| self.at + framed(pad) - values;
        let pad = match values {
            0 => 0,
            _ => std::iter::once(0).chain(2..6).find(|&pad| values_at(pad) % 4 == 0).unwrap_or(0),
        };
        self.at += framed(pad);
        Some((pad, framed(pad)))
    }
}

impl Body for pb::PullSparseRequest {
    fn put(&self, out: &mut OutFrame) {
        let (table, meta, read_only) = (self.table.clone(), self.meta, self.read_only);
        out.put_fields(&pb::PullSparseRequest { table, keys: Bytes::new(), meta, read_only });
        out.put_bytes(2, &self.keys);
    }
}

impl Body for pb::PullSparseResponse {
    fn put(&self, out: &mut OutFrame) {
        out.put_fields(&pb::PullSparseResponse { values: Bytes::new(), dim: self.dim, codec: self.codec });
        out.put_bytes(1, &self.values);
    }
}

impl Body for pb::PushSparseRequest {
    fn put(&self, out: &mut OutFrame) {
        let (table, meta) = (self.table.clone(), self.meta);
        out.put_fields(&pb::PushSparseRequest { table, keys: Bytes::new(), grads: Bytes::new(), meta });
        out.put_bytes(2, &self.keys);
        out.put_bytes(3, &self.grads);
    }
}

/// Decodes an answer into the response or the shard's status.
fn decode<M: Message + Default>(answer: Answer) -> std::result::Result<M, Status> {
    match answer {
        Answer::Frame(kind, body) => decode_answer(kind, body),
        Answer::Placed => Err(Status::internal("a dense pull's placed answer read as a message")),
    }
}

/// Decodes an answer frame into the response or the shard's status.
fn decode_answer<M: Message + Default>(kind: u8, mut body: Bytes) -> std::result::Result<M, Status> {
    if kind == OK {
        return M::decode(body).map_err(|e| Status::internal(format!("undecodable data-plane answer: {e}")));
    }
    let pushback = match kind & PUSHBACK {
        0 => None,
        _ if body.len() < 4 => return Err(Status::internal("data-plane refusal without its pushback")),
        _ => Some(Duration::from_millis(u64::from(body.get_u32_le()))),
    };
    let status = Status::new(Code::from_i32(i32::from(kind & !PUSHBACK)), String::from_utf8_lossy(&body));
    Err(match pushback {
        Some(after) => crate::transport::with_pushback(status, after),
        None => status,
    })
}

/// A dense pull's answer, as [`DataLink::pull_into`] reads it.
#[derive(Debug)]
pub enum Pulled {
    /// The values are in their place.
    Placed,
    /// The answer as sent (compressed, or laid out otherwise).
    Answer(pb::PullDenseResponse),
}

/// Decodes a dense pull's answer, unless it was placed.
fn pulled(answer: Answer) -> std::result::Result<Pulled, Status> {
    match answer {
        Answer::Placed => Ok(Pulled::Placed),
        answer => decode(answer).map(Pulled::Answer),
    }
}

/// A connection's byte stream: TCP or a Unix socket, with or without TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection with its buffers.
struct Conn {
    io: Box<dyn Io>,
    reader: FrameReader,
    out: OutFrame,
}

impl Conn {
    /// Sends the `N` frames `build` makes, together, and reads their `N`
    /// answers; the last one into `place`, if given
    /// ([`FrameReader::next_placed`]).
    async fn round_trips<const N: usize>(
        &mut self,
        build: impl FnOnce(&mut OutFrame),
        mut place: Option<&mut Placement<'_>>,
    ) -> std::io::Result<[Answer; N]> {
        build(&mut self.out);
        self.out.send(&mut self.io).await?;
        let mut answers = [const { Answer::Frame(OK, Bytes::new()) }; N];
        for (k, answer) in answers.iter_mut().enumerate() {
            *answer = match place.as_deref_mut() {
                Some(place) if k + 1 == N => self.reader.next_placed(&mut self.io, place).await?,
                _ => self.reader.next_answer(&mut self.io, place.is_some()).await?,
            };
        }
        Ok(answers)
    }
}

/// A client's data plane to one shard: a pool of connections, each used by
/// one call at a time (a call is one request, or a pair sent together).
/// Cheap to clone.
#[derive(Clone)]
pub struct DataLink(Arc<Link>);

struct Link {
    host: String,
    /// The shard's data-plane port: it changes when a shard restarts on a
    /// free port, and is asked again over gRPC ([`Link::discover`]).
    port: std::sync::atomic::AtomicU16,
    /// The shard's Unix socket, tried before TCP when the shard named one
    /// and is on this host.
    local: Option<PathBuf>,
    /// The shard's gRPC client, which says where its data plane is now.
    discover: Option<crate::transport::ShardClient>,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    /// The hello's token (a bearer token's text), or empty.
    token: Bytes,
    /// On the Unix socket under TLS, leave TLS once the hello is answered
    /// (`transport.local_socket_tls` off).
    clear_local: bool,
    max: usize,
    connect_timeout: Duration,
    nodelay: bool,
    /// Dead-peer detection: `transport.keep_alive_interval` and `_timeout`.
    keep_alive: Option<(Duration, Duration)>,
    idle: Mutex<Vec<Conn>>,
    /// Until when calls skip the data plane, and why: set when a
    /// connection could not be made ([`CallError::NotSent`]).
    down: Mutex<Option<(tokio::time::Instant, Status)>>,
    /// Requests sent again on a fresh connection after a pooled one failed
    /// ([`DataLink::resends`]).
    resends: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for DataLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataLink({})", self.addr())
    }
}

impl DataLink {
    /// The data plane of the shard at `host` (the host of its gRPC address)
    /// on `port`, with `config`'s TLS, limits and timeouts, sending `token`
    /// (a bearer token's text) in its hello. Nothing is connected yet. With
    /// `discover` (the shard's gRPC client), a connection refused on `port`
    /// makes it ask the shard where its data plane is now (a restarted shard
    /// may listen elsewhere). With `socket` (the Unix socket the shard
    /// named), connections go there when [`use_local_socket`] allows.
    pub fn new(
        config: &TransportConfig,
        (host, port, socket): (&str, u16, Option<PathBuf>),
        token: Option<&str>,
        discover: Option<crate::transport::ShardClient>,
    ) -> Result<DataLink> {
        let addr = format!("{host}:{port}");
        let tls = match &config.tls {
            Some(tls) => {
                let name =
                    tls.server_name.as_deref().unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
                let name = rustls_pki_types::ServerName::try_from(name.to_string()).map_err(|e| {
                    Error::InvalidAddress {
                        addr: addr.clone(),
                        reason: format!("not a TLS server name: {e}"),
                    }
                })?;
                Some((tokio_rustls::TlsConnector::from(client_tls(tls)?), name))
            }
            None => None,
        };
        Ok(DataLink(Arc::new(Link {
            // Unbracketed, as a socket address's host (an IPv6 literal).
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: port.into(),
            local: socket.filter(|_| use_local_socket(config, host)),
            discover,
            clear_local: tls.is_some() && !config.local_socket_tls,
            tls,
            token: Bytes::copy_from_slice(token.unwrap_or("").as_bytes()),
            max: config.max_message_bytes(),
            connect_timeout: config.connect_timeout,
            nodelay: config.tcp_nodelay,
            keep_alive: (!config.keep_alive_interval.is_zero())
                .then_some((config.keep_alive_interval, config.keep_alive_timeout)),
            idle: Mutex::new(Vec::new()),
            down: Mutex::new(None),
            resends: 0.into(),
        })))
    }

    /// How many times a call has sent its requests again, on a fresh
    /// connection, after a pooled connection failed under them (the shard
    /// may have run them the first time). A caller that reads it before and
    /// after a call knows the call sent its requests once if it did not
    /// change (a call of another task in between may change it too).
    pub fn resends(&self) -> u64 {
        self.0.resends.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `host:port` of the shard's data plane.
    pub fn addr(&self) -> String {
        let port = self.0.port.load(std::sync::atomic::Ordering::Relaxed);
        match self.0.host.contains(':') {
            true => format!("[{}]:{port}", self.0.host),
            false => format!("{}:{port}", self.0.host),
        }
    }

    /// Sends `msg` as a `kind` request and waits up to `timeout` for the
    /// answer. Failures read as gRPC's would: UNAVAILABLE when the shard
    /// cannot be reached or the connection breaks, DEADLINE_EXCEEDED on
    /// the timeout, else the shard's own status.
    pub async fn call<Req: Body, Resp: Message + Default>(
        &self,
        kind: Kind,
        msg: &Req,
        timeout: Duration,
    ) -> std::result::Result<Resp, Status> {
        Ok(self.try_call(kind, msg, timeout).await?)
    }

    /// [`DataLink::call`], telling a request that never went out
    /// ([`CallError::NotSent`]: the caller may send it over gRPC) from
    /// one that did.
    pub async fn try_call<Req: Body, Resp: Message + Default>(
        &self,
        kind: Kind,
        msg: &Req,
        timeout: Duration,
    ) -> std::result::Result<Resp, CallError> {
        let [answer] = self.exchange(|out| out.message(kind as u8, msg), None, timeout).await?;
        decode(answer).map_err(CallError::Sent)
    }

    /// A dense pull, as [`DataLink::try_call`] would send it, its answer's
    /// values read straight into `place` where it is laid out as expected.
    pub async fn pull_into(
        &self,
        msg: &pb::PullDenseRequest,
        place: Option<&mut Placement<'_>>,
        timeout: Duration,
    ) -> std::result::Result<Pulled, CallError> {
        let [answer] = self.exchange(|out| out.message(Kind::PullDense as u8, msg), place, timeout).await?;
        pulled(answer).map_err(CallError::Sent)
    }

    /// Sends a dense push and a dense pull on one connection, back to back
    /// in one write, and waits up to `timeout` for both answers: the shard
    /// runs them in order (the push, then the pull) and writes the answers
    /// together; the pull's values are read into `place` as by
    /// [`DataLink::pull_into`]. The outer error is the connection's
    /// (neither answer came back; the push may or may not have run, unless
    /// it is [`CallError::NotSent`]); the inner ones are each request's own
    /// status.
    #[allow(clippy::type_complexity)]
    pub async fn push_then_pull(
        &self,
        push: &pb::PushDenseRequest,
        pull: &pb::PullDenseRequest,
        place: Option<&mut Placement<'_>>,
        timeout: Duration,
    ) -> std::result::Result<
        (std::result::Result<pb::PushResponse, Status>, std::result::Result<Pulled, Status>),
        CallError,
    > {
        let build = |out: &mut OutFrame| {
            out.message(Kind::PushDense as u8, push);
            out.message(Kind::PullDense as u8, pull);
        };
        let [pushed, answer] = self.exchange(build, place, timeout).await?;
        Ok((decode(pushed), pulled(answer)))
    }

    /// Whether calls skip the data plane for now (a connection could not
    /// be made within the last [`DOWN_FOR`]); the reason if so.
    fn down(&self) -> Option<Status> {
        let mut down = self.0.down.lock().unwrap_or_else(|p| p.into_inner());
        match &*down {
            Some((until, why)) if tokio::time::Instant::now() < *until => Some(why.clone()),
            Some(_) => {
                *down = None;
                None
            }
            None => None,
        }
    }

    /// A new connection, or [`CallError::NotSent`] (and the data plane
    /// skipped for [`DOWN_FOR`]) if none can be made by `deadline`.
    async fn connect_or_skip(&self, deadline: tokio::time::Instant) -> std::result::Result<Conn, CallError> {
        match self.connect_by(deadline).await {
            Ok(conn) => Ok(conn),
            Err(status) => {
                let until = tokio::time::Instant::now() + DOWN_FOR;
                let was =
                    self.0.down.lock().unwrap_or_else(|p| p.into_inner()).replace((until, status.clone()));
                if was.is_none() {
                    tracing::warn!(addr = %self.addr(), error = %status.message(),
                        "data plane unreachable; using gRPC for this shard, trying again in {DOWN_FOR:?}");
                }
                Err(CallError::NotSent(status))
            }
        }
    }

    /// Sends the `N` requests `build` makes on a pooled (or new) connection
    /// and reads their answers by `timeout`.
    async fn exchange<const N: usize>(
        &self,
        build: impl Fn(&mut OutFrame),
        mut place: Option<&mut Placement<'_>>,
        timeout: Duration,
    ) -> std::result::Result<[Answer; N], CallError> {
        let link = &self.0;
        let deadline = tokio::time::Instant::now() + timeout;
        // A pooled connection the shard has closed meanwhile (restarted, or
        // idle too long) fails at once: then one fresh connection is tried.
        // Requests are safe to repeat: pushes carry their (worker, seq).
        let pooled = link.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut conn, mut retry) = match pooled {
            Some(c) => (c, true),
            None => match self.down() {
                Some(why) => return Err(CallError::NotSent(why)),
                None => (self.connect_or_skip(deadline).await?, false),
            },
        };
        let answers = loop {
            match tokio::time::timeout_at(deadline, conn.round_trips(&build, place.as_deref_mut())).await {
                Ok(Ok(answers)) => break answers,
                Ok(Err(e)) if retry => {
                    tracing::debug!(addr = %self.addr(), error = %e, "pooled data-plane connection failed; reconnecting");
                    conn = self.connect_by(deadline).await.map_err(CallError::Sent)?;
                    retry = false;
                    link.resends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => return Err(CallError::Sent(self.broken(e))),
                Err(_) => return Err(CallError::Sent(self.late(timeout))),
            }
        };
        let mut idle = link.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        drop(idle);
        Ok(answers)
    }

    fn broken(&self, e: std::io::Error) -> Status {
        Status::unavailable(format!("data plane {}: {e}", self.addr()))
    }

    fn late(&self, timeout: Duration) -> Status {
        Status::deadline_exceeded(format!("data plane {}: no answer within {timeout:?}", self.addr()))
    }

    /// A new connection, TLS set up and hello answered, by `deadline`.
    async fn connect_by(&self, deadline: tokio::time::Instant) -> std::result::Result<Conn, Status> {
        let link = &self.0;
        let until = deadline.min(tokio::time::Instant::now() + link.connect_timeout);
        match tokio::time::timeout_at(until, self.connect()).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(format!("data plane {}: connect timed out", self.addr()))),
        }
    }

    /// Connects to the port last known, and if that is refused, to the port
    /// the shard names now.
    async fn connect(&self) -> std::result::Result<Conn, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let port = self.0.port.load(Relaxed);
        match self.connect_to(port).await {
            Err(refused) if refused.code() == Code::Unavailable => {
                let Some(now) = self.discover().await.filter(|&p| p != port) else { return Err(refused) };
                tracing::info!(host = %self.0.host, old = port, new = now, "the shard's data plane moved");
                self.0.port.store(now, Relaxed);
                self.connect_to(now).await
            }
            r => r,
        }
    }

    /// Where the shard's data plane listens now, asked over gRPC.
    async fn discover(&self) -> Option<u16> {
        let mut rpc = self.0.discover.clone()?;
        let mut req = tonic::Request::new(crate::wire::pb::DataPlaneRequest {});
        req.set_timeout(self.0.connect_timeout);
        let port = rpc.data_plane(req).await.ok()?.into_inner().port;
        u16::try_from(port).ok().filter(|&p| p != 0)
    }

    /// A connection on the shard's Unix socket if it has one here, else on
    /// TCP `port`.
    async fn connect_to(&self, port: u16) -> std::result::Result<Conn, Status> {
        let link = &self.0;
        if let Some(path) = &link.local {
            match tokio::net::UnixStream::connect(path).await {
                Ok(unix) => return self.start(unix, link.clear_local).await,
                // Not on this host after all (another container, say), or
                // the shard is restarting: TCP finds it, or says why not.
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "data plane: Unix socket unusable; using TCP")
                }
            }
        }
        let tcp = TcpStream::connect((link.host.as_str(), port)).await.map_err(|e| self.broken(e))?;
        let _ = tcp.set_nodelay(link.nodelay);
        if let Some((interval, timeout)) = link.keep_alive {
            keep_alive(&tcp, interval, timeout);
        }
        self.start(tcp, false).await
    }

    /// Sets up TLS (if on) over `stream` and has the hello answered; with
    /// `clear` (a Unix socket), TLS is left once it is.
    async fn start<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        stream: S,
        clear: bool,
    ) -> std::result::Result<Conn, Status> {
        let link = &self.0;
        let io: Box<dyn Io> = match &link.tls {
            Some((connector, name)) => {
                let mut tls = connector.connect(name.clone(), tls_transport(stream)).await.map_err(|e| {
                    Status::unavailable(format!(
                        "data plane {}: TLS: {}",
                        self.addr(),
                        crate::transport::error_chain(&e)
                    ))
                })?;
                let magic = if clear { CLEAR_MAGIC } else { MAGIC };
                if self.greet(&mut tls, magic).await?.clear && clear {
                    let (io, session) = tls.into_inner();
                    Box::new(into_clear(io, session).map_err(|e| self.broken(e))?)
                } else {
                    Box::new(tls)
                }
            }
            None => {
                let mut stream = stream;
                self.greet(&mut stream, MAGIC).await?;
                Box::new(stream)
            }
        };
        Ok(Conn { io, reader: FrameReader::new(link.max), out: OutFrame::default() })
    }

    /// Sends the hello (`magic` and the token) on `io` and reads its answer.
    async fn greet<S: Io>(&self, io: &mut S, magic: &[u8; 4]) -> std::result::Result<Welcome, Status> {
        let mut out = OutFrame::default();
        out.raw(OK, &[magic.as_slice(), &self.0.token].concat());
        out.send(io).await.map_err(|e| self.broken(e))?;
        let mut reader = FrameReader::new(MAX_HELLO);
        let (kind, body) = reader
            .next(io)
            .await
            .and_then(|f| f.ok_or(std::io::ErrorKind::UnexpectedEof.into()))
            .map_err(|e| self.broken(e))?;
        let welcome = decode_answer::<Welcome>(kind, body)?;
        if !reader.is_empty() {
            return Err(self.broken(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the shard sent more than the hello's answer",
            )));
        }
        Ok(welcome)
    }
}

/// The stream beneath a TLS session whose hello has been answered, for the
/// connection to go on in the clear (on a Unix socket only): an error if
/// the session, or the read buffer beneath it, still holds bytes that
/// were not read or not sent, which would be lost and put the frames out
/// of step. Both ends call it at the same point of the exchange: the
/// client once it has read the hello's answer, the shard once it has sent
/// it, before either sends anything more.
pub fn into_clear<S: AsyncRead, D>(
    io: tokio::io::BufReader<S>,
    mut session: impl std::ops::DerefMut<Target = tokio_rustls::rustls::ConnectionCommon<D>>,
) -> std::io::Result<S> {
    let state = session.process_new_packets().map_err(std::io::Error::other)?;
    let held = state.plaintext_bytes_to_read() + state.tls_bytes_to_write() + io.buffer().len();
    if held > 0 || state.peer_has_closed() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{held} bytes beside the hello when leaving TLS (or the peer closed it)"),
        ));
    }
    Ok(io.into_inner())
}

/// Whether a client with `config` uses the Unix socket of the shard at
/// `host`: only with `transport.local_socket` on, and only when `host` is a
/// loopback address (the shard, and so the socket, is on this host).
pub fn use_local_socket(config: &TransportConfig, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    config.local_socket
        && (host.eq_ignore_ascii_case("localhost")
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
}

/// Makes a connection to a peer that stops answering fail within about
/// `interval + timeout`, as the HTTP/2 pings of a gRPC channel do: keepalive
/// probes after `interval` of silence (whole seconds, at least one), and
/// TCP_USER_TIMEOUT, which ends the connection once probes or data stay
/// unacknowledged for `interval + timeout`. Best effort: a socket that
/// refuses the options still works, and the request deadline still holds.
pub fn keep_alive(tcp: &TcpStream, interval: Duration, timeout: Duration) {
    let every = interval.max(Duration::from_secs(1));
    let probes = socket2::TcpKeepalive::new().with_time(every).with_interval(every);
    let socket = socket2::SockRef::from(tcp);
    let _ = socket.set_tcp_keepalive(&probes);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_user_timeout(Some(interval + timeout));
}

/// The rustls client settings of `tls`, with the data plane's ALPN.
fn client_tls(tls: &TlsConfig) -> Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    let mut config = crate::transport::rustls_client_config(tls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The rustls server settings of `tls`, with the data plane's ALPN.
pub fn server_tls(tls: &TlsConfig) -> Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    let mut config = Arc::unwrap_or_clone(crate::transport::rustls_server_config(tls)?);
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// What a shard learns from a connection's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The token, if one was sent.
    pub token: Option<String>,
    /// The client asks to leave TLS once the hello is answered
    /// ([`CLEAR_MAGIC`]).
    pub clear: bool,
}

/// Reads a connection's hello.
pub fn parse_hello(body: &[u8]) -> std::result::Result<Hello, Status> {
    let (token, clear) =
        match (body.strip_prefix(MAGIC.as_slice()), body.strip_prefix(CLEAR_MAGIC.as_slice())) {
            (Some(token), _) => (token, false),
            (_, Some(token)) => (token, true),
            _ => {
                return Err(Status::invalid_argument(
                    "not a data-plane client (no PSD1 hello); use gRPC on the shard's address",
                ));
            }
        };
    let token = match std::str::from_utf8(token) {
        _ if token.is_empty() => None,
        Ok(t) if t.is_ascii() => Some(t.to_string()),
        _ => return Err(Status::unauthenticated("the hello's token is not ASCII")),
    };
    Ok(Hello { token, clear })
}

/// The peer of a data-plane request, put in its extensions by the shard:
/// its address (for the rate limit) and the principal its TLS client
/// certificate named, checked at the handshake (the extensions of a gRPC
/// request come only from the server's own connection, never the wire).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<Arc<Vec<u8>>>,
}

/// The hello's answer.
#[derive(Clone, PartialEq, Message)]
pub struct Welcome {
    /// Both ends leave TLS now: the client asked ([`CLEAR_MAGIC`]) on the
    /// shard's Unix socket, and the shard lets it. Otherwise the
    /// connection stays as it is.
    #[prost(bool, tag = "1")]
    pub clear: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_shard_at_a_loopback_address_is_reached_on_its_unix_socket() {
        let mut config = TransportConfig::default();
        for host in ["127.0.0.1", "127.3.2.1", "[::1]", "::1", "localhost", "LOCALHOST"] {
            assert!(use_local_socket(&config, host), "{host}");
        }
        for host in ["10.0.0.1", "192.168.1.5", "[fe80::1]", "shard-0.ps.svc", "0.0.0.0", ""] {
            assert!(!use_local_socket(&config, host), "{host}");
        }
        config.local_socket = false;
        assert!(!use_local_socket(&config, "127.0.0.1"));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused_before_reading() {
        let mut out = OutFrame::default();
        let mut two = Vec::new();
        out.raw(3, b"hello");
        out.send(&mut two).await.unwrap();
        assert!(out.is_empty());
        out.raw(0, b"");
        out.send(&mut two).await.unwrap();
        // Two frames held at once go out together, in order.
        out.raw(5, b"a");
        let pull = pb::PullDenseRequest {
            chunks: Vec::new(),
            meta: Some(pb::ReadMeta { worker: 1, clock: 2, compressed: false }),
        };
        out.message(6, &pull);
        out.send(&mut two).await.unwrap();
        let mut r = FrameReader::new(16);
        let mut src = two.as_slice();
        assert_eq!(r.next(&mut src).await.unwrap(), Some((3, Bytes::from_static(b"hello"))));
        // Everything was read into the buffer at once: the rest is there.
        assert!(r.has_frame());
        assert_eq!(r.next(&mut src).await.unwrap(), Some((0, Bytes::new())));
        assert_eq!(r.next(&mut src).await.unwrap(), Some((5, Bytes::from_static(b"a"))));
        let (kind, body) = r.next(&mut src).await.unwrap().unwrap();
        assert_eq!((kind, pb::PullDenseRequest::decode(body).unwrap()), (6, pull));
        assert!(!r.has_frame());
        assert_eq!(r.next(&mut src).await.unwrap(), None);
        // A header announcing more than the limit: refused, nothing allocated for it.
        let mut big: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 1];
        let err = FrameReader::new(16).next(&mut big).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        // A frame cut short is an error, not a clean end.
        let mut cut: &[u8] = &[9, 0, 0, 0, 1, 1, 2];
        let err = FrameReader::new(16).next(&mut cut).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut zero: &[u8] = &[0, 0, 0, 0, 1];
        assert!(FrameReader::new(16).next(&mut zero).await.is_err());
    }

    /// A frame `allow` refuses is read to its end and dropped, whether it
    /// was still arriving (10 MiB, read a piece at a time) or had come with
    /// the frame before it, and the frames after it read as sent; what
    /// `allow` was asked for adds up to each frame's length.
    #[tokio::test]
    async fn a_refused_frame_is_skipped_and_the_next_read_as_sent() {
        let frame = |kind: u8, body: &[u8]| {
            let mut f = ((body.len() + 1) as u32).to_le_bytes().to_vec();
            f.push(kind);
            f.extend_from_slice(body);
            f
        };
        let mut wire = frame(1, b"small");
        wire.extend(frame(2, &vec![7; 10 << 20]));
        wire.extend(frame(3, b"after"));
        wire.extend(frame(4, b"tiny"));
        wire.extend(frame(5, b"last"));
        // A reader that gets at most 100 KB a read, like a socket.
        let (mut tx, mut rx) = tokio::io::duplex(100 << 10);
        let writer = tokio::spawn(async move { tokio::io::AsyncWriteExt::write_all(&mut tx, &wire).await });
        let mut r = FrameReader::new(64 << 20);
        let mut asked = Vec::new();
        let mut next = async |r: &mut FrameReader, limit: usize| {
            let mut frame_asks = 0;
            let mut allow = |n: usize| {
                frame_asks += n;
                if frame_asks > limit { Err(Status::resource_exhausted("over")) } else { Ok(()) }
            };
            let (kind, body) = r.next_within(&mut rx, &mut allow).await.unwrap().unwrap();
            asked.push(frame_asks);
            (kind, body.map_err(|s| s.code()))
        };
        assert_eq!(next(&mut r, 1 << 20).await, (1, Ok(Bytes::from_static(b"small"))));
        assert_eq!(next(&mut r, 1 << 20).await, (2, Err(Code::ResourceExhausted)));
        assert_eq!(next(&mut r, 1 << 20).await, (3, Ok(Bytes::from_static(b"after"))));
        // "tiny" and "last" come with "after" (one read): refused whole, then read.
        assert_eq!(next(&mut r, 3).await, (4, Err(Code::ResourceExhausted)));
        assert_eq!(next(&mut r, 1 << 20).await, (5, Ok(Bytes::from_static(b"last"))));
        writer.await.unwrap().unwrap();
        assert_eq!(r.next(&mut rx).await.unwrap(), None);
        // Whole frames are asked for in full; a refused one up to the refusal.
        assert_eq!(asked[0], 4 + 6);
        assert!(asked[1] > 1 << 20 && asked[1] <= (1 << 20) + GROW, "{asked:?}");
        assert_eq!(asked[2], 4 + 6);
        assert_eq!((asked[3], asked[4]), (4 + 5, 4 + 5));
        // Skipping kept at most a piece of the 10 MiB frame.
        assert!(r.buf.capacity() <= 4 * SKIP_CHUNK, "{}", r.buf.capacity());
    }

    /// A frame's reader asks for (and a shard charges to its in-flight
    /// budget) at most as much again as has arrived, 64 KiB at first: a peer
    /// that sends a header announcing 8 MiB and stalls holds 64 KiB of the
    /// budget, not 4 MiB, and one that sends the frame slowly at most twice
    /// what it sent. The frame still reads whole, asked for in full.
    #[tokio::test]
    async fn a_frame_is_asked_for_as_its_bytes_arrive_not_ahead() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let len = 8 << 20;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut wire = ((len + 1) as u32).to_le_bytes().to_vec();
        wire.push(2);
        wire.extend_from_slice(&body);
        let (mut tx, mut rx) = tokio::io::duplex(64 << 10);
        let (sent, asked, worst) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let reader = {
            let (sent, asked, worst) = (Arc::clone(&sent), Arc::clone(&asked), Arc::clone(&worst));
            tokio::spawn(async move {
                let mut allow = move |n: usize| {
                    let total = asked.fetch_add(n, SeqCst) + n;
                    // Ahead of what was sent: at most as much again, or 64 KiB.
                    worst.fetch_max(total.saturating_sub(2 * sent.load(SeqCst) + FIRST_GROW), SeqCst);
                    Ok(())
                };
                let mut r = FrameReader::new(16 << 20);
                r.next_within(&mut rx, &mut allow).await.unwrap().unwrap()
            })
        };
        // The header, then nothing for a while; then the body, 16 KiB at a time.
        sent.store(HEADER, SeqCst);
        tx.write_all(&wire[..HEADER]).await.unwrap();
        while asked.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(asked.load(SeqCst), HEADER + FIRST_GROW, "a stalled header is charged 64 KiB");
        for piece in wire[HEADER..].chunks(16 << 10) {
            sent.fetch_add(piece.len(), SeqCst);
            tx.write_all(piece).await.unwrap();
        }
        let (kind, read) = reader.await.unwrap();
        assert_eq!((kind, read.unwrap()), (2, Bytes::from(body)));
        assert_eq!(asked.load(SeqCst), wire.len(), "the whole frame is asked for");
        assert_eq!(worst.load(SeqCst), 0, "asked for more than twice what had arrived, or 64 KiB");
    }

    /// Gives `data` `step` bytes a read, noting where each read's bytes
    /// went (less their place in the stream: constant while the reader's
    /// buffer stays where it is).
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        /// (place in the stream, destination address less that place)
        reads: Vec<(usize, usize)>,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len() - self.at).min(buf.remaining());
            let (at, dest) = (self.at, buf.initialize_unfilled_to(n).as_ptr() as usize);
            self.reads.push((at, dest.wrapping_sub(at)));
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Once the frames read are dropped, the next frame no larger than them
    /// is read into their memory from the first byte on: the buffer is not
    /// grown or moved (copying what has arrived) while it arrives. A frame
    /// still held keeps its memory, and the next one goes elsewhere.
    #[tokio::test]
    async fn a_buffer_is_reused_whole_once_its_frames_are_dropped() {
        let frame = |kind: u8, len: usize| {
            let mut wire = ((len + 1) as u32).to_le_bytes().to_vec();
            wire.push(kind);
            wire.extend((0..len).map(|i| (i % 253) as u8));
            wire
        };
        let len = 3 << 20;
        let (mut data, mut ends) = (Vec::new(), Vec::new());
        for kind in 1..=4 {
            data.extend(frame(kind, len - usize::from(kind) * 1000));
            ends.push(data.len());
        }
        let mut src = Trickle { data, at: 0, step: 256 << 10, reads: Vec::new() };
        let mut r = FrameReader::new(64 << 20);
        let (_, first) = r.next(&mut src).await.unwrap().unwrap();
        let at = first.as_ptr();
        drop(first);
        let (kind, second) = r.next(&mut src).await.unwrap().unwrap();
        assert_eq!(kind, 2);
        assert_eq!(second[..], frame(2, len - 2000)[HEADER..]);
        assert_eq!(second.as_ptr(), at, "the second frame is read where the first was");
        let places: std::collections::HashSet<usize> =
            src.reads.iter().filter(|(p, _)| (ends[0]..ends[1]).contains(p)).map(|(_, d)| *d).collect();
        assert_eq!(places.len(), 1, "the buffer moved while the second frame arrived");
        // Held: the third frame cannot take its memory.
        let (_, third) = r.next(&mut src).await.unwrap().unwrap();
        assert_ne!(third.as_ptr(), at);
        assert_eq!(third[..], frame(3, len - 3000)[HEADER..]);
        drop((second, third));
        let (_, fourth) = r.next(&mut src).await.unwrap().unwrap();
        assert_eq!(fourth[..], frame(4, len - 4000)[HEADER..]);
        assert_eq!(r.next(&mut src).await.unwrap(), None);
    }

    /// The frame `out` holds, read back.
    async fn read_back(out: &OutFrame) -> (u8, Bytes) {
        let mut bytes = Vec::new();
        out.write_to(&mut bytes).await.unwrap();
        assert_eq!(bytes.len(), out.len());
        FrameReader::new(1 << 30).next(&mut bytes.as_slice()).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn answers_carry_the_status_code_and_message() {
        let mut out = OutFrame::default();
        out.answer::<Welcome>(Err(Status::permission_denied("not yours")));
        let (kind, body) = read_back(&out).await;
        let err = decode_answer::<Welcome>(kind, body).unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), "not yours");
        assert_eq!(parse_hello(b"PSD1").unwrap(), Hello { token: None, clear: false });
        assert_eq!(parse_hello(b"PSD1abc").unwrap(), Hello { token: Some("abc".into()), clear: false });
        assert_eq!(parse_hello(b"PSC1abc").unwrap(), Hello { token: Some("abc".into()), clear: true });
        assert_eq!(parse_hello(b"PSC1").unwrap(), Hello { token: None, clear: true });
        assert_eq!(parse_hello(b"PRI * HTTP/2.0").unwrap_err().code(), Code::InvalidArgument);
    }

    /// A refusal's pushback crosses the data plane as it crosses gRPC; a
    /// pushback frame too short to hold one is an error, not a panic, and
    /// a pushback beyond the longest one honoured is read as that.
    #[tokio::test]
    async fn refusals_carry_their_pushback() {
        use crate::transport::{MAX_PUSHBACK, pushback, with_pushback};
        let mut out = OutFrame::default();
        let busy = with_pushback(Status::resource_exhausted("busy"), Duration::from_millis(75));
        out.answer::<Welcome>(Err(busy));
        let (kind, body) = read_back(&out).await;
        assert_eq!(kind, PUSHBACK | Code::ResourceExhausted as u8);
        let err = decode_answer::<Welcome>(kind, body).unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::ResourceExhausted, "busy"));
        assert_eq!(pushback(&err), Some(Duration::from_millis(75)));
        // Without one, none comes back.
        let mut out = OutFrame::default();
        out.status(&Status::resource_exhausted("full"));
        let (kind, body) = read_back(&out).await;
        assert_eq!(pushback(&decode_answer::<Welcome>(kind, body).unwrap_err()), None);
        // Hostile or broken answers.
        let short = decode_answer::<Welcome>(PUSHBACK | 8, Bytes::from_static(b"ab")).unwrap_err();
        assert_eq!(short.code(), Code::Internal);
        let mut long = u32::MAX.to_le_bytes().to_vec();
        long.extend_from_slice(b"wait");
        let err = decode_answer::<Welcome>(PUSHBACK | 8, Bytes::from(long)).unwrap_err();
        assert_eq!((pushback(&err), err.message()), (Some(MAX_PUSHBACK), "wait"));
        let mut odd = Status::unavailable("x");
        odd.metadata_mut().insert(crate::transport::PUSHBACK_KEY, "soon".parse().unwrap());
        assert_eq!(pushback(&odd), None);
    }

    /// A push's gradients lie at a 4-byte boundary of the frame, whatever
    /// the lengths of the fields before them, and so in a reader's memory,
    /// wherever the frames before ended in its buffer.
    #[tokio::test]
    async fn a_push_lays_its_gradients_four_byte_aligned() {
        let mut reader = FrameReader::new(1 << 30);
        let mut checked = 0;
        for (round, len) in [0usize, 1, 4, 12, 4096, 100_000, 70_001].into_iter().enumerate() {
            for name in 0..6 {
                let chunk = |i: u32| pb::DenseChunk {
                    tensor: "w".repeat(name + i as usize),
                    index: i * 97 + 200 * round as u32,
                    values: Bytes::from(vec![i as u8; len + 4 * i as usize]),
                };
                let meta = (name % 2 == 0).then(|| pb::PushMeta {
                    worker: 3,
                    seq: 1 << (7 * name),
                    ..Default::default()
                });
                let push = pb::PushDenseRequest { chunks: (0..4).map(chunk).collect(), meta };
                let mut out = OutFrame::default();
                // A frame of any length before it, read on its own, long
                // enough that the reader's buffer has room after it.
                out.raw(OK, &vec![7u8; 300_000 + name]);
                let mut bytes = Vec::new();
                out.send(&mut bytes).await.unwrap();
                reader.next(&mut bytes.as_slice()).await.unwrap().unwrap();
                out.message(2, &push);
                let mut bytes = Vec::new();
                out.send(&mut bytes).await.unwrap();
                let (_, body) = reader.next(&mut bytes.as_slice()).await.unwrap().unwrap();
                let back = pb::PushDenseRequest::decode(body).unwrap();
                assert_eq!(back, push, "it decodes as itself");
                for c in back.chunks.iter().filter(|c| !c.values.is_empty()) {
                    assert_eq!(
                        c.values.as_ptr() as usize % 4,
                        0,
                        "values of {} bytes, name {name}",
                        c.values.len()
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 6 * 4 * 6 + 6 * 3);
    }

    /// Every message a frame splits decodes as itself, large fields or
    /// small, empty or not.
    #[tokio::test]
    async fn split_messages_decode_as_themselves() {
        let big = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let small = Bytes::from_static(b"0123456789abcdef");
        for values in [big.clone(), small.clone(), Bytes::new()] {
            let chunk = |i| pb::DenseChunk { tensor: format!("w{i}"), index: i, values: values.clone() };
            let meta = pb::PushMeta { worker: 3, seq: 9, clock: 4, tick: true, read_clock: 2, codecs: 7 };
            let read = pb::ReadMeta { worker: 1, clock: 5, compressed: true };
            let mut out = OutFrame::default();
            macro_rules! check {
                ($msg:expr) => {{
                    let msg = $msg;
                    out.clear();
                    out.message(2, &msg);
                    let (kind, body) = read_back(&out).await;
                    assert_eq!(kind, 2);
                    assert_eq!(body.len(), msg.body_len());
                    assert_eq!(Message::decode(body).ok(), Some(msg));
                }};
            }
            check!(pb::PushDenseRequest { chunks: vec![chunk(0), chunk(1), chunk(2)], meta: Some(meta) });
            check!(pb::PullDenseResponse { chunks: vec![chunk(4), chunk(5)], codecs: vec![0, 1] });
            check!(pb::PullSparseRequest {
                table: "t".into(),
                keys: values.clone(),
                meta: Some(read),
                read_only: true
            });
            check!(pb::PullSparseResponse { values: values.clone(), dim: 16, codec: 1 });
            check!(pb::PushSparseRequest {
                table: "e".into(),
                keys: small.clone(),
                grads: values.clone(),
                meta: None
            });
            check!(pb::PushSparseRequest {
                table: "e".into(),
                keys: big.clone(),
                grads: values.clone(),
                meta: Some(meta)
            });
        }
    }

    /// A dense pull's answer as a shard writes it is read into its places:
    /// chunks small and large (their values written from their own
    /// buffer), an empty one, after a frame that brought the answer's first
    /// bytes into the buffer with it; any other answer comes back whole and
    /// as sent, values placed before the difference put back.
    #[tokio::test]
    async fn a_pull_answer_is_read_into_its_places_or_else_whole() {
        let floats = |n: usize, k: f32| (0..n).map(|i| i as f32 * k).collect::<Vec<f32>>();
        let sizes = [3, 0, 100_000, 7];
        let request = pb::PullDenseRequest {
            chunks: (0..4).map(|i| pb::ChunkId { tensor: format!("w{i}"), index: i }).collect(),
            meta: Some(pb::ReadMeta { worker: 1, clock: 2, compressed: false }),
        };
        let answer = |tensor: &dyn Fn(u32) -> String, codecs: Vec<i32>| pb::PullDenseResponse {
            chunks: (0..4u32)
                .map(|i| pb::DenseChunk {
                    tensor: tensor(i),
                    index: i,
                    values: crate::codec::encode_f32(&floats(sizes[i as usize], 0.5 + i as f32)),
                })
                .collect(),
            codecs,
        };
        // The bytes of a short answer, then those of `pull` (as a shard
        // writes them, or a refusal), read after the short one.
        let read = async |pull: std::result::Result<pb::PullDenseResponse, Status>, short: bool| {
            let mut out = OutFrame::default();
            out.answer::<pb::PushResponse>(Ok(pb::PushResponse::default()));
            out.answer(pull);
            let mut wire = Vec::new();
            out.send(&mut wire).await.unwrap();
            let mut places: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![-1.0; n]).collect();
            let mut r = FrameReader::new(1 << 20);
            let mut src = wire.as_slice();
            let first = r.next_answer(&mut src, short).await.unwrap();
            assert!(matches!(first, Answer::Frame(OK, _)), "{first:?}");
            // Read short, it took no more than that of the answer after it.
            assert!(!short || r.buf.len() <= SHORT_AHEAD, "{} bytes read ahead", r.buf.len());
            let outs = places.iter_mut().map(Vec::as_mut_slice).collect();
            let mut place = Placement::new(&request, outs).unwrap();
            let got = r.next_placed(&mut src, &mut place).await.unwrap();
            assert!(r.is_empty() && src.is_empty());
            (got, places)
        };
        let name = |i: u32| format!("w{i}");
        for short in [false, true] {
            let (got, places) = read(Ok(answer(&name, Vec::new())), short).await;
            assert!(matches!(got, Answer::Placed), "{got:?}");
            for (i, place) in places.iter().enumerate() {
                assert_eq!(*place, floats(sizes[i], 0.5 + i as f32));
            }
        }
        // Laid out otherwise (the third chunk's tensor differs, the length
        // does not; or a compressed answer's codecs), or refused: the frame
        // as sent.
        let other = |i: u32| if i == 2 { "x2".to_string() } else { name(i) };
        for sent in [answer(&other, Vec::new()), answer(&name, vec![0, 0, 0, 0])] {
            let (got, _) = read(Ok(sent.clone()), false).await;
            let Answer::Frame(kind, body) = got else { panic!("placed {sent:?}") };
            assert_eq!((kind, pb::PullDenseResponse::decode(body).unwrap()), (OK, sent));
        }
        let (got, _) = read(Err(Status::unavailable("gone")), false).await;
        let Answer::Frame(kind, body) = got else { panic!("a refusal placed") };
        assert_eq!((kind, &body[..]), (Code::Unavailable as u8, &b"gone"[..]));
        // No placement for a compressed pull, or places that are not the chunks'.
        let mut compressed = request.clone();
        compressed.meta = Some(pb::ReadMeta { worker: 1, clock: 2, compressed: true });
        let mut four: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        fn outs(four: &mut [Vec<f32>]) -> Vec<&mut [f32]> {
            four.iter_mut().map(Vec::as_mut_slice).collect()
        }
        assert!(Placement::new(&request, outs(&mut four)).is_some());
        // Read alone, from an empty buffer: the header's read takes at most
        // SHORT_AHEAD bytes more, and the large chunk's values (but for what
        // came with the header) are read in one call, straight into place.
        struct Recorded<'a>(&'a [u8], Vec<usize>);
        impl AsyncRead for Recorded<'_> {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let n = buf.remaining().min(self.0.len());
                buf.put_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                self.1.push(n);
                std::task::Poll::Ready(Ok(()))
            }
        }
        let mut out = OutFrame::default();
        out.answer(Ok(answer(&name, Vec::new())));
        let mut wire = Vec::new();
        out.send(&mut wire).await.unwrap();
        let mut src = Recorded(&wire, Vec::new());
        let mut place = Placement::new(&request, outs(&mut four)).unwrap();
        let got = FrameReader::new(1 << 20).next_placed(&mut src, &mut place).await.unwrap();
        assert!(matches!(got, Answer::Placed) && src.0.is_empty(), "{got:?}");
        assert!(src.1[0] <= HEADER + SHORT_AHEAD && src.1.iter().any(|&n| n > 399_000), "reads {:?}", src.1);
        // The same answer cut short, in its heads or its values: an error,
        // not a hang.
        for cut in [HEADER + 3, wire.len() / 2, wire.len() - 1] {
            let mut place = Placement::new(&request, outs(&mut four)).unwrap();
            let err = FrameReader::new(1 << 20).next_placed(&mut &wire[..cut], &mut place).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        assert!(Placement::new(&compressed, outs(&mut four)).is_none());
        assert!(Placement::new(&request, outs(&mut four).into_iter().skip(1).collect()).is_none());
    }
}
