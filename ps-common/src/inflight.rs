//! The bytes of requests a server is receiving or handling: one budget
//! that every request's body is charged to as it arrives, before the server
//! buffers it, and that gets the bytes back once the request is answered.
//! Shards use it for gRPC and the data plane (`[limits] max_inflight_mib`),
//! `ps-serve` for gRPC and HTTP (`--max-inflight-mib`).
//!
//! Without it, a server's memory for requests in flight is bounded only by
//! connections x streams x the message limit, and a caller's credential is
//! checked once its message is decoded. A request whose bytes do not fit is
//! refused at once; nothing waits for room, so requests that each hold part
//! of the budget cannot wait on each other. Requests larger than [`SMALL`]
//! may fill only three quarters of the budget, so that a flood of large
//! messages cannot refuse the small requests (clock ticks, heartbeats, a
//! worker's pulls of a small model, one prediction) that others need.
//!
//! What a refusal becomes is the server crate's: each maps [`Refused`] into
//! its own error, and that to a status, in its one place.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use crate::bounded::Bounded;
use http_body::Frame;

/// A request whose bytes are at most this may use the whole budget; larger
/// ones three quarters of it.
pub const SMALL: u64 = 256 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The accountant of one server's request bytes in flight. Lock-free: a
/// charge is one compare-and-swap loop.
#[derive(Debug)]
pub struct InFlight {
    limit: u64,
    used: Bounded,
    /// Requests refused.
    pub refused: AtomicU64,
}

/// A charge that did not fit: `bytes` more would have made more than `cap`
/// (the part of the budget a request of its size may use) held, with
/// `used` held; the request would then have held `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub bytes: u64,
    pub used: u64,
    pub cap: u64,
    pub total: u64,
}

impl Refused {
    /// Whether the request could fit once others give their bytes back
    /// (sent again later, it may be served); a request larger than its cap
    /// never fits.
    pub fn transient(&self) -> bool {
        self.total <= self.cap
    }
}

impl InFlight {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<InFlight> {
        Arc::new(InFlight { limit, used: Bounded::default(), refused: AtomicU64::new(0) })
    }

    /// Takes `bytes` for a request that will then hold `total`, or refuses.
    fn take(&self, bytes: u64, total: u64) -> Result<(), Refused> {
        let cap = if total <= SMALL { self.limit } else { self.limit - self.limit / 4 };
        self.used.try_add(bytes, cap).map_err(|used| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Refused { bytes, used, cap, total }
        })
    }

    fn release(&self, bytes: u64) {
        self.used.sub(bytes);
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes charged for one request; they go back when it is dropped.
pub struct Charge {
    inflight: Arc<InFlight>,
    bytes: AtomicU64,
}

impl Charge {
    pub fn new(inflight: &Arc<InFlight>) -> Charge {
        Charge { inflight: Arc::clone(inflight), bytes: AtomicU64::new(0) }
    }

    /// Charges `bytes` more, or refuses (nothing charged).
    pub fn take(&self, bytes: usize) -> Result<(), Refused> {
        let total = self.bytes.load(Ordering::Relaxed).saturating_add(bytes as u64);
        self.inflight.take(bytes as u64, total)?;
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.inflight.release(*self.bytes.get_mut());
    }
}

/// How a body reports a refusal, and the inner body's own errors, as `E`;
/// and how much of a refused body to read and drop before reporting it.
pub struct Errors<E> {
    pub refused: fn(Refused) -> E,
    pub inner: fn(BoxError) -> E,
    /// Bytes of a refused body read and dropped (not held) before the
    /// refusal: an HTTP/1 server that answers while its client is still
    /// sending closes on unread bytes, and the client, its write reset,
    /// never reads the answer. 0 for HTTP/2, which resets just the stream.
    pub drain: u64,
}

impl<E> Clone for Errors<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Errors<E> {}

/// The tower layer charging every request body to `inflight`, for tonic
/// servers (`tonic::transport::Server::layer`): a refused body ends with
/// `errors.refused`'s status.
#[derive(Clone)]
pub struct InFlightLayer {
    pub inflight: Arc<InFlight>,
    pub errors: Errors<tonic::Status>,
    /// How long a request's body may take to arrive, and the status of one
    /// that does not ([`InFlightLayer::within`]).
    pub within: Option<(Duration, SlowStatus)>,
}

/// The status of a request whose body did not arrive within its limit.
pub type SlowStatus = fn(Duration) -> tonic::Status;

impl InFlightLayer {
    /// The layer charging to `inflight`; a refusal ends the request with
    /// `refused`'s status (HTTP/2 resets just the stream: nothing drained).
    pub fn new(inflight: &Arc<InFlight>, refused: fn(Refused) -> tonic::Status) -> InFlightLayer {
        let errors = Errors { refused, inner: tonic::Status::from_error, drain: 0 };
        InFlightLayer { inflight: Arc::clone(inflight), errors, within: None }
    }

    /// Ends a request whose body has not arrived whole `limit` after it is
    /// first read with `slow`'s status, so that a client that stops sending
    /// in the middle of a message (HTTP/2 pings keep its connection open)
    /// does not hold its stream, and the bytes it sent, for good. tonic reads
    /// a unary request's body to its end before calling the handler, so the
    /// handler's own time is not counted.
    pub fn within(mut self, limit: Duration, slow: SlowStatus) -> InFlightLayer {
        self.within = Some((limit, slow));
        self
    }
}

impl<S> tower_layer::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> InFlightService<S> {
        InFlightService { inner, layer: self.clone() }
    }
}

/// The service made by [`InFlightLayer`].
#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    layer: InFlightLayer,
}

impl<S, B> tower_service::Service<http::Request<B>> for InFlightService<S>
where
    S: tower_service::Service<http::Request<ChargedBody<B, tonic::Status>>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (req, charge) = charged(req, &self.layer.inflight, self.layer.errors);
        let req = req.map(|mut body| {
            body.deadline = self.layer.within.map(|(limit, slow)| Deadline { limit, slow, sleep: None });
            body
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            // Answered: the request's bytes go back once the body (which the
            // server may still hold) is dropped as well.
            drop(charge);
            resp
        })
    }
}

/// `req` with its body charged to `inflight`, and the charge, which the
/// caller holds until the request is answered.
pub fn charged<B, E>(
    req: http::Request<B>,
    inflight: &Arc<InFlight>,
    errors: Errors<E>,
) -> (http::Request<ChargedBody<B, E>>, Arc<Charge>) {
    let charge = Arc::new(Charge::new(inflight));
    let held = Arc::clone(&charge);
    (req.map(|inner| ChargedBody { inner, charge, errors, refusal: None, drained: 0, deadline: None }), held)
}

/// When a body must have arrived by: `limit` after it is first read.
struct Deadline<E> {
    limit: Duration,
    slow: fn(Duration) -> E,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A request body whose DATA frames are charged as they are read; a frame
/// that does not fit ends the body with `errors.refused`'s error.
pub struct ChargedBody<B, E> {
    inner: B,
    charge: Arc<Charge>,
    errors: Errors<E>,
    /// A refusal waiting for the body's end (`Errors::drain`).
    refusal: Option<E>,
    drained: u64,
    deadline: Option<Deadline<E>>,
}

impl<B, E> http_body::Body for ChargedBody<B, E>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    E: Unpin,
{
    type Data = Bytes;
    type Error = E;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        let this = &mut *self;
        if let Some(d) = &mut this.deadline {
            let sleep = d.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(d.limit)));
            if sleep.as_mut().poll(cx).is_ready() && !this.inner.is_end_stream() {
                let late = (d.slow)(d.limit);
                this.deadline = None;
                return Poll::Ready(Some(Err(late)));
            }
        }
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if this.refusal.is_some() {
                // Draining: each frame dropped as it comes.
                match polled {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        this.drained += frame.data_ref().map_or(0, |d| d.len() as u64);
                        if this.drained <= this.errors.drain {
                            continue;
                        }
                    }
                    Poll::Ready(_) => {}
                }
                return Poll::Ready(this.refusal.take().map(Err));
            }
            return match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref()
                        && let Err(refused) = this.charge.take(data.len())
                    {
                        let refusal = (this.errors.refused)(refused);
                        if this.errors.drain == 0 || this.inner.is_end_stream() {
                            return Poll::Ready(Some(Err(refusal)));
                        }
                        this.refusal = Some(refusal);
                        continue;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err((this.errors.inner)(e.into())))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use tower_layer::Layer as _;
    use tower_service::Service as _;

    /// A request body: `frames`, then the end, or (`stalls`) nothing more.
    struct Sent {
        frames: Vec<Bytes>,
        stalls: bool,
    }

    impl http_body::Body for Sent {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.frames.pop() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None if self.stalls => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty() && !self.stalls
        }
    }

    /// A handler that reads its request's body to its end (as tonic does
    /// before calling a unary handler), then takes `handling`: the sizes of
    /// the frames read, and the code that ended the body, if one did.
    #[derive(Clone)]
    struct ReadBody {
        handling: std::time::Duration,
    }

    type Read = (Vec<usize>, Option<tonic::Code>);

    impl tower_service::Service<http::Request<ChargedBody<Sent, tonic::Status>>> for ReadBody {
        type Response = Read;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Read, std::convert::Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<ChargedBody<Sent, tonic::Status>>) -> Self::Future {
            let handling = self.handling;
            Box::pin(async move {
                let mut body = req.into_body();
                let mut read = (Vec::new(), None);
                loop {
                    match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                        Some(Ok(frame)) => read.0.push(frame.into_data().map_or(0, |d| d.len())),
                        Some(Err(status)) => break read.1 = Some(status.code()),
                        None => break,
                    }
                }
                tokio::time::sleep(handling).await;
                Ok(read)
            })
        }
    }

    /// A request whose body has not arrived whole `within`'s limit after it
    /// is first read ends with the layer's status, and gives its bytes back;
    /// one whose body arrives in time is read whole, however long its
    /// handler then takes. Without the limit, the stalled body held its
    /// request (and its charged bytes) for as long as its client stayed.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_ends_at_its_deadline() {
        let inflight = InFlight::new(1 << 20);
        let limit = std::time::Duration::from_secs(2);
        let layer = InFlightLayer::new(&inflight, |_| tonic::Status::resource_exhausted("full"))
            .within(limit, |d| tonic::Status::deadline_exceeded(format!("not within {d:?}")));
        let handling = std::time::Duration::from_secs(5);
        let mut service = layer.layer(ReadBody { handling });
        let body =
            |stalls| Sent { frames: vec![Bytes::from(vec![1; 300]), Bytes::from(vec![2; 100])], stalls };

        let started = tokio::time::Instant::now();
        let stalled = service.call(http::Request::new(body(true)));
        let read = tokio::time::timeout(limit * 10, stalled).await.expect("a stalled body is ended");
        assert_eq!(read.unwrap(), (vec![100, 300], Some(tonic::Code::DeadlineExceeded)));
        assert_eq!(started.elapsed(), limit + handling);
        assert_eq!(inflight.used(), 0, "its bytes went back");

        let started = tokio::time::Instant::now();
        let whole = service.call(http::Request::new(body(false))).await.unwrap();
        assert_eq!(whole, (vec![100, 300], None), "a body that arrived is not cut by its handler's time");
        assert_eq!(started.elapsed(), handling);
    }

    /// Large requests stop at three quarters of the budget, small ones may
    /// use all of it, and every charge goes back when dropped.
    #[test]
    fn large_requests_leave_a_quarter_for_small_ones() {
        let inflight = InFlight::new(4 << 20);
        let big = Charge::new(&inflight);
        big.take(2 << 20).unwrap();
        let refused = big.take(2 << 20).unwrap_err();
        assert_eq!(refused, Refused { bytes: 2 << 20, used: 2 << 20, cap: 3 << 20, total: 4 << 20 });
        assert!(!refused.transient(), "4 MiB never fits under a cap of 3 MiB");
        big.take(1 << 20).unwrap();
        let small: Vec<Charge> = (0..4).map(|_| Charge::new(&inflight)).collect();
        for s in &small {
            s.take(256 << 10).unwrap();
        }
        assert_eq!(inflight.used(), 4 << 20);
        let full = small[0].take(1).unwrap_err();
        assert!(full.transient(), "257 KiB fits once others give their bytes back: {full:?}");
        drop(big);
        drop(small);
        assert_eq!(inflight.used(), 0);
        assert_eq!(inflight.refused.load(Ordering::Relaxed), 2);
    }
}
