//! A count that never goes over a cap, kept without a lock: the accounting
//! beneath a shard's memory budget (`ps_server::budget::Budget`) and every
//! server's bytes in flight ([`crate::inflight`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// A count that takers add to up to a cap they name, and give back to.
#[derive(Debug, Default)]
pub struct Bounded(AtomicU64);

impl Bounded {
    /// Adds `n` if the count stays within `cap`; otherwise changes nothing
    /// and returns the count it found. One compare-and-swap loop.
    pub fn try_add(&self, n: u64, cap: u64) -> Result<(), u64> {
        let mut held = self.0.load(Ordering::Relaxed);
        loop {
            let next = match held.checked_add(n) {
                Some(next) if next <= cap => next,
                _ => return Err(held),
            };
            match self.0.compare_exchange_weak(held, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => held = now,
            }
        }
    }

    /// Takes `n` off (a count never goes below 0).
    pub fn sub(&self, n: u64) {
        let _ =
            self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| Some(held.saturating_sub(n)));
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_stays_within_the_cap_its_taker_names() {
        let b = Bounded::default();
        b.try_add(60, 100).unwrap();
        assert_eq!(b.try_add(41, 100), Err(60));
        assert_eq!(b.try_add(u64::MAX, u64::MAX), Err(60), "no overflow");
        b.try_add(40, 100).unwrap();
        assert_eq!(b.try_add(1, 200), Ok(()), "another taker's cap");
        b.sub(1000);
        assert_eq!(b.get(), 0, "never below 0");
        // Concurrent takers never pass the cap together.
        let b = std::sync::Arc::new(Bounded::default());
        let taken: u64 = std::thread::scope(|s| {
            let ts: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter(|_| b.try_add(7, 10_000).is_ok()).count()))
                .collect();
            ts.into_iter().map(|t| t.join().unwrap() as u64).sum()
        });
        assert_eq!((taken, b.get()), (10_000 / 7, 10_000 / 7 * 7));
    }
}
