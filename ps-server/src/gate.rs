//! The push gate: how a checkpoint holds a shard's pushes for a moment.
//!
//! Every push passes the gate before it is applied and holds a [`Permit`]
//! until its clock tick is recorded. Normally the gate is open. A hold closes
//! it: new pushes wait, and [`Gate::hold`] returns once the pushes already
//! admitted have finished. A cut then admits, per worker, only the pushes of
//! iterations below that worker's limit, so a worker whose iteration was
//! half-pushed when the hold began can complete it here; pushes of later
//! iterations wait until [`Gate::open`].
//!
//! A hold ends by itself at its deadline, so a coordinator that dies between
//! hold and cut cannot stop training: waiting pushes then go through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};

#[derive(Debug)]
struct Hold {
    since: Instant,
    until: Instant,
    /// worker -> first iteration that may not pass; `None`: nothing passes.
    admit: Option<HashMap<u64, u64>>,
}

#[derive(Default)]
pub struct Gate {
    hold: Mutex<Option<Hold>>,
    /// Bumped on every change of the hold, so waiting pushes look again.
    changed: watch::Sender<u64>,
    in_flight: AtomicUsize,
}

/// Admission of one push; the push is "in flight" until this is dropped.
pub struct Permit<'a>(&'a Gate);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Hold>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Waits until a push of `worker`'s iteration `clock` may be applied.
    pub async fn enter(&self, worker: u64, clock: u64) -> Permit<'_> {
        loop {
            // Subscribed under the lock only when held (not on the open-gate
            // path every push takes): `open` bumps after it releases the
            // lock, so the change cannot be missed.
            let (deadline, mut changed) = {
                let mut hold = self.lock();
                let passes = match &*hold {
                    None => true,
                    Some(h) if Instant::now() >= h.until => {
                        tracing::warn!("checkpoint hold expired without a cut; pushes resume");
                        *hold = None;
                        self.bump();
                        true
                    }
                    Some(h) => {
                        h.admit.as_ref().and_then(|a| a.get(&worker)).is_some_and(|&limit| clock < limit)
                    }
                };
                if passes {
                    // Counted under the lock, so a hold never misses it.
                    self.in_flight.fetch_add(1, Ordering::AcqRel);
                    return Permit(self);
                }
                (hold.as_ref().map(|h| h.until), self.changed.subscribe())
            };
            let deadline = deadline.unwrap_or_else(Instant::now);
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Closes the gate for at most `timeout`, then waits until no push is in
    /// flight. Fails if a hold is already in place (another checkpoint).
    pub async fn hold(&self, timeout: Duration) -> Result<()> {
        let now = Instant::now();
        {
            let mut hold = self.lock();
            if hold.as_ref().is_some_and(|h| now < h.until) {
                return Err(Error::CheckpointBusy);
            }
            *hold = Some(Hold { since: now, until: now + timeout, admit: None });
        }
        self.bump();
        self.wait_until(now + timeout, || self.in_flight.load(Ordering::Acquire) == 0).await
    }

    /// Lets through the pushes of iterations below each worker's limit, and
    /// waits until `done` holds with no push in flight, or `timeout` passes.
    /// Returns when the hold began.
    pub async fn drain(
        &self,
        limits: HashMap<u64, u64>,
        timeout: Duration,
        done: impl Fn() -> bool,
    ) -> Result<Instant> {
        let since = {
            let mut hold = self.lock();
            let Some(h) = hold.as_mut().filter(|h| Instant::now() < h.until) else {
                return Err(Error::NotHeld);
            };
            h.admit = Some(limits);
            h.until = h.until.max(Instant::now() + timeout);
            h.since
        };
        self.bump();
        let idle = || self.in_flight.load(Ordering::Acquire) == 0;
        self.wait_until(Instant::now() + timeout, || done() && idle()).await?;
        Ok(since)
    }

    /// Opens the gate.
    pub fn open(&self) {
        *self.lock() = None;
        self.bump();
    }

    /// Polls `ready` every millisecond until it holds or `deadline` passes
    /// (then the gate is opened and the hold fails).
    async fn wait_until(&self, deadline: Instant, ready: impl Fn() -> bool) -> Result<()> {
        while !ready() {
            if Instant::now() >= deadline {
                self.open();
                return Err(Error::HoldTimeout);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_hold_stops_new_pushes_and_a_drain_admits_only_those_below_the_limit() {
        let gate = Arc::new(Gate::default());
        gate.hold(Duration::from_secs(5)).await.unwrap();
        assert!(matches!(gate.hold(Duration::from_secs(5)).await, Err(Error::CheckpointBusy)));
        let g = Arc::clone(&gate);
        let late = tokio::spawn(async move {
            let _p = g.enter(1, 7).await;
        });
        let g = Arc::clone(&gate);
        let early = tokio::spawn(async move {
            let _p = g.enter(1, 6).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!early.is_finished() && !late.is_finished(), "a hold admits nothing");
        gate.drain(HashMap::from([(1, 7)]), Duration::from_secs(5), || true).await.unwrap();
        early.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "iteration 7 is beyond the cut");
        gate.open();
        late.await.unwrap();
    }

    #[tokio::test]
    async fn a_hold_without_a_cut_ends_by_itself() {
        let gate = Gate::default();
        gate.hold(Duration::from_millis(30)).await.unwrap();
        let started = Instant::now();
        drop(gate.enter(3, 0).await);
        assert!(started.elapsed() >= Duration::from_millis(20));
        let err = gate.drain(HashMap::new(), Duration::from_secs(1), || true).await.unwrap_err();
        assert!(matches!(err, Error::NotHeld));
    }

    #[tokio::test]
    async fn a_drain_that_cannot_finish_times_out_and_opens_the_gate() {
        let gate = Gate::default();
        gate.hold(Duration::from_secs(5)).await.unwrap();
        let err = gate.drain(HashMap::new(), Duration::from_millis(20), || false).await.unwrap_err();
        assert!(matches!(err, Error::HoldTimeout));
        drop(gate.enter(1, 100).await);
    }
}
