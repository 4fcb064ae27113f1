//! The bytes of requests a shard is receiving or handling, across gRPC and
//! the data plane: one budget (`[limits] max_inflight_mib`) that every
//! request's body is charged to as it arrives, before the shard buffers it,
//! and that gets the bytes back when the request has been answered.
//!
//! Without it a shard's memory for requests in flight was bounded only by
//! connections x streams x the message limit: a client (authenticated or
//! not: a gRPC request's caller is checked once its message is decoded)
//! could make the shard buffer 256 concurrent 256 MiB messages per
//! connection, and 256 data-plane connections one each. A request whose
//! bytes do not fit is refused at once with `RESOURCE_EXHAUSTED`; nothing
//! waits for room, so requests that each hold part of the budget cannot
//! wait on each other. Requests larger than [`SMALL`] may fill only three
//! quarters of the budget, so that a flood of large messages cannot refuse
//! the small requests (clock ticks, heartbeats, a worker's pulls of a
//! small model) that training needs.
//!
//! - gRPC: [`InFlightLayer`] wraps each request's body; each DATA frame is
//!   charged when tonic reads it, and the charge is held until the handler
//!   has answered (the response is made) and the body is dropped.
//! - Data plane: `ps_server::dataplane` charges each frame's body as its
//!   buffer grows ([`ps_common::dataplane::FrameReader::next_within`]) and
//!   releases it when the frame is answered; a refused frame is read to its
//!   end and dropped, and answered `RESOURCE_EXHAUSTED`, on the same
//!   connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;

use crate::budget::Budget;
use crate::error::Error;

/// The budget of request bytes in flight on one shard.
pub type InFlight = Arc<Budget>;

/// A request whose bytes are at most this may use the whole budget; larger
/// ones three quarters of it.
pub const SMALL: u64 = 256 << 10;

/// Bytes charged to an [`InFlight`] budget for one request; they go back
/// when it is dropped.
pub struct Charge {
    budget: InFlight,
    bytes: AtomicU64,
}

impl Charge {
    pub fn new(budget: &InFlight) -> Charge {
        Charge { budget: Arc::clone(budget), bytes: AtomicU64::new(0) }
    }

    /// Charges `bytes` more, or refuses (nothing charged).
    pub fn take(&self, bytes: usize) -> Result<(), Status> {
        let total = self.bytes.load(Ordering::Relaxed).saturating_add(bytes as u64);
        let limit = self.budget.limit();
        let cap = if total <= SMALL { limit } else { limit - limit / 4 };
        self.budget.try_reserve_within(bytes as u64, cap).map_err(|e| match e {
            Error::OverBudget { bytes, used, limit } => Status::from(Error::InFlight { bytes, used, limit }),
            other => Status::from(other),
        })?;
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(*self.bytes.get_mut());
    }
}

/// The tower layer charging every gRPC request body to the budget.
#[derive(Clone)]
pub struct InFlightLayer(pub InFlight);

impl<S> tower_layer::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> InFlightService<S> {
        InFlightService { inner, budget: Arc::clone(&self.0) }
    }
}

/// The service made by [`InFlightLayer`].
#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    budget: InFlight,
}

impl<S, B> tower_service::Service<http::Request<B>> for InFlightService<S>
where
    S: tower_service::Service<http::Request<ChargedBody<B>>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let charge = Arc::new(Charge::new(&self.budget));
        let held = Arc::clone(&charge);
        let fut = self.inner.call(req.map(|inner| ChargedBody { inner, charge }));
        Box::pin(async move {
            let resp = fut.await;
            // The handler has answered: its request's bytes are released once
            // the body (which tonic may still hold) is dropped as well.
            drop(held);
            resp
        })
    }
}

/// A request body whose DATA frames are charged to the budget as they are
/// read; a frame that does not fit ends the body with `RESOURCE_EXHAUSTED`.
pub struct ChargedBody<B> {
    inner: B,
    charge: Arc<Charge>,
}

impl<B> http_body::Body for ChargedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(refused) = this.charge.take(data.len())
                {
                    return Poll::Ready(Some(Err(refused)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
