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
}

impl InFlightLayer {
    /// The layer charging to `inflight`; a refusal ends the request with
    /// `refused`'s status (HTTP/2 resets just the stream: nothing drained).
    pub fn new(inflight: &Arc<InFlight>, refused: fn(Refused) -> tonic::Status) -> InFlightLayer {
        let errors = Errors { refused, inner: tonic::Status::from_error, drain: 0 };
        InFlightLayer { inflight: Arc::clone(inflight), errors }
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
    (req.map(|inner| ChargedBody { inner, charge, errors, refusal: None, drained: 0 }), held)
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
