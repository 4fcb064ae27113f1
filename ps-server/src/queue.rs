//! Dynamic data assignment: the job's queue of minibatch ranges.
//!
//! Instead of each worker owning a fixed share of the data, the workers take
//! ranges of minibatches from one queue, held by one shard (shard 0 by
//! convention), so a fast worker does more of the epoch than a slow one. The
//! job's [`Plan`] is `epochs` passes over `batches_per_epoch` minibatches, cut
//! into ranges of `range_batches`; range `id` is minibatches
//! `start..end` of epoch `id / ranges_per_epoch` (the epoch's order is a
//! pure function of the seed and the epoch, the same on every worker).
//!
//! The guarantees:
//! - **Exactly-once completion.** Every range is completed once: a range
//!   is leased to one worker at a time, and only its holder (or, after a
//!   reclaim, the first to report it) completes it.
//! - **One lease per worker.** A worker holds at most one range; asking
//!   again without reporting it done returns the same range, so a retried
//!   request does not leak a lease.
//! - **A dead worker's range goes back.** A range whose holder is neither a
//!   member of the clock set nor heard from within its lease is put back
//!   and handed to the next worker that asks (counted as `reassigned`). The
//!   batches of that range the dead worker had pushed are trained again: the
//!   queue assigns data exactly once, training is at least once for the
//!   range a worker died in.
//!
//! The queue is in memory only: it is not part of a checkpoint.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// Most ranges one plan may have (a bitmap of this many bits is 8 MiB).
pub const MAX_RANGES: u64 = 1 << 26;

/// A job's data plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub epochs: u32,
    pub batches_per_epoch: u64,
    pub range_batches: u32,
}

impl Plan {
    fn ranges_per_epoch(&self) -> u64 {
        self.batches_per_epoch.div_ceil(u64::from(self.range_batches))
    }

    fn total(&self) -> Option<u64> {
        self.ranges_per_epoch().checked_mul(u64::from(self.epochs))
    }

    fn validate(&self) -> Result<u64> {
        let bad = |m: String| Err(Error::DataPlan(m));
        if self.epochs == 0 || self.batches_per_epoch == 0 || self.range_batches == 0 {
            return bad(format!("every field must be positive, got {self:?}"));
        }
        match self.total() {
            Some(t) if t <= MAX_RANGES => Ok(t),
            _ => bad(format!("{self:?} has more than {MAX_RANGES} ranges")),
        }
    }

    /// The range with id `id` (`id < total`).
    pub fn range(&self, id: u64) -> Range {
        let per = self.ranges_per_epoch();
        let start = (id % per) * u64::from(self.range_batches);
        let end = (start + u64::from(self.range_batches)).min(self.batches_per_epoch);
        Range { epoch: (id / per) as u32, start, end }
    }

    /// The id of `r`, if it is a range of this plan.
    fn id(&self, r: Range) -> Option<u64> {
        let rb = u64::from(self.range_batches);
        let id = u64::from(r.epoch).checked_mul(self.ranges_per_epoch())? + r.start / rb;
        (r.epoch < self.epochs && r.start.is_multiple_of(rb) && r.start < self.batches_per_epoch)
            .then_some(id)
            .filter(|&id| self.range(id) == r)
    }
}

/// Minibatches `start..end` of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub epoch: u32,
    pub start: u64,
    pub end: u64,
}

/// What a worker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Its range; `None` when every range is leased or done.
    pub range: Option<Range>,
    /// Every range is completed.
    pub finished: bool,
    pub completed: u64,
    pub total: u64,
}

/// Counters of the queue (for the stats RPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub completed: u64,
    pub total: u64,
    pub reassigned: u64,
}

#[derive(Debug)]
struct Job {
    plan: Plan,
    total: u64,
    /// Ids below this were handed out at least once.
    next: u64,
    /// Ranges put back after their worker died, handed out first.
    free: BTreeSet<u64>,
    /// worker -> its one leased range.
    leased: HashMap<u64, u64>,
    /// One bit per range.
    done: Vec<u64>,
    completed: u64,
    reassigned: u64,
    /// worker -> (last request, its lease).
    seen: HashMap<u64, (Instant, Duration)>,
}

impl Job {
    fn new(plan: Plan, total: u64) -> Job {
        Job {
            plan,
            total,
            next: 0,
            free: BTreeSet::new(),
            leased: HashMap::new(),
            done: vec![0; total.div_ceil(64) as usize],
            completed: 0,
            reassigned: 0,
            seen: HashMap::new(),
        }
    }

    fn is_done(&self, id: u64) -> bool {
        self.done[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    fn finished(&self) -> bool {
        self.completed == self.total
    }

    /// Marks `id` completed by `worker`, if `worker` may complete it: it
    /// holds it, or nobody does (it was put back after `worker` was taken
    /// for dead). A range another worker holds now is theirs to complete.
    fn complete(&mut self, worker: u64, id: u64) {
        if self.is_done(id) || id >= self.next {
            return;
        }
        if self.leased.get(&worker) == Some(&id) {
            self.leased.remove(&worker);
        } else if !self.free.remove(&id) {
            return;
        }
        self.done[(id / 64) as usize] |= 1 << (id % 64);
        self.completed += 1;
    }
}

/// The data queue of a shard (empty until the first request sets its plan).
pub struct DataQueue {
    job: Mutex<Option<Job>>,
    /// Most distinct workers a queue keeps track of.
    max_workers: usize,
}

impl Default for DataQueue {
    fn default() -> Self {
        DataQueue::with_max_workers(crate::budget::Limits::default().max_workers)
    }
}

impl DataQueue {
    /// An empty queue that keeps track of at most `n` workers.
    pub fn with_max_workers(n: usize) -> DataQueue {
        DataQueue { job: Mutex::default(), max_workers: n }
    }

    /// `worker` reports the ranges in `done` completed and asks for its
    /// range. `lease` is how long it may go unheard before its range is
    /// taken for lost (unless `is_member` says it is in the clock set).
    ///
    /// The first request fixes the plan; another plan is refused while the
    /// queue is unfinished, and starts a new queue once it is finished.
    pub fn take(
        &self,
        worker: u64,
        plan: Plan,
        done: &[Range],
        lease: Duration,
        now: Instant,
        is_member: impl Fn(u64) -> bool,
    ) -> Result<Answer> {
        let total = plan.validate()?;
        let ids = done
            .iter()
            .map(|&r| plan.id(r).ok_or_else(|| Error::BadRange(format!("{r:?} is not a range of {plan:?}"))))
            .collect::<Result<Vec<u64>>>()?;
        let mut guard = self.job.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Some(job) if job.plan == plan => {}
            Some(job) if !job.finished() => {
                return Err(Error::DataPlan(format!(
                    "the queue serves {:?} ({} of {} ranges done); worker {worker} asked for {plan:?}",
                    job.plan, job.completed, job.total
                )));
            }
            _ => *guard = Some(Job::new(plan, total)),
        }
        let job = guard.as_mut().expect("set above");
        if job.seen.len() >= self.max_workers && !job.seen.contains_key(&worker) {
            let (got, limit) = (job.seen.len() as u64 + 1, self.max_workers as u64);
            return Err(Error::LimitExceeded { what: "workers taking ranges", got, limit });
        }
        job.seen.insert(worker, (now, lease));
        for id in ids {
            job.complete(worker, id);
        }
        // Put back the ranges of workers that are gone.
        let gone: Vec<u64> = (job.leased.keys())
            .filter(|&&w| w != worker && !is_member(w))
            .filter(|w| job.seen.get(w).is_none_or(|(at, lease)| now.saturating_duration_since(*at) > *lease))
            .copied()
            .collect();
        for w in gone {
            if let Some(id) = job.leased.remove(&w) {
                tracing::warn!(worker = w, range = ?job.plan.range(id), "worker gone: its data range is reassigned");
                job.free.insert(id);
                job.reassigned += 1;
            }
        }
        let id = match job.leased.get(&worker) {
            Some(&id) => Some(id),
            None => {
                let id = job.free.pop_first().or_else(|| (job.next < job.total).then_some(job.next));
                if let Some(id) = id {
                    job.next = job.next.max(id + 1);
                    job.leased.insert(worker, id);
                }
                id
            }
        };
        Ok(Answer {
            range: id.map(|id| job.plan.range(id)),
            finished: job.finished(),
            completed: job.completed,
            total: job.total,
        })
    }

    /// The queue's counters, once it has a plan.
    pub fn stats(&self) -> Option<QueueStats> {
        let guard = self.job.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|j| QueueStats {
            completed: j.completed,
            total: j.total,
            reassigned: j.reassigned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: Plan = Plan { epochs: 2, batches_per_epoch: 10, range_batches: 4 };
    const LEASE: Duration = Duration::from_secs(1);

    #[test]
    fn ranges_cover_every_batch_of_every_epoch_once() {
        let q = DataQueue::default();
        let now = Instant::now();
        let mut seen = Vec::new();
        let mut last = Vec::new();
        loop {
            let a = q.take(7, PLAN, &last, LEASE, now, |_| true).unwrap();
            let Some(r) = a.range else {
                assert!(a.finished);
                break;
            };
            seen.push((r.epoch, r.start, r.end));
            last = vec![r];
        }
        assert_eq!(seen, vec![(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4), (1, 4, 8), (1, 8, 10)]);
        assert_eq!(q.stats(), Some(QueueStats { completed: 6, total: 6, reassigned: 0 }));
    }

    #[test]
    fn asking_again_returns_the_same_range() {
        let q = DataQueue::default();
        let now = Instant::now();
        let a = q.take(1, PLAN, &[], LEASE, now, |_| true).unwrap();
        let b = q.take(1, PLAN, &[], LEASE, now, |_| true).unwrap();
        assert_eq!(a.range, b.range);
        let c = q.take(2, PLAN, &[], LEASE, now, |_| true).unwrap();
        assert_ne!(a.range, c.range);
    }

    #[test]
    fn a_dead_workers_range_is_reassigned_once_its_lease_is_over() {
        let q = DataQueue::default();
        let t0 = Instant::now();
        let dead = q.take(1, PLAN, &[], LEASE, t0, |_| true).unwrap().range.unwrap();
        // Still a member, or heard from recently: not reassigned.
        let a = q.take(2, PLAN, &[], LEASE, t0, |_| true).unwrap().range.unwrap();
        let later = t0 + LEASE * 2;
        let a2 = q.take(2, PLAN, &[a], LEASE, later, |w| w == 2).unwrap().range.unwrap();
        assert_eq!(a2, dead, "the dead worker's range is handed out first");
        assert_eq!(q.stats().unwrap().reassigned, 1);
        // The dead worker comes back and reports it: worker 2 holds it now.
        q.take(1, PLAN, &[dead], LEASE, later, |_| true).unwrap();
        assert_eq!(q.stats().unwrap().completed, 1);
        q.take(2, PLAN, &[a2], LEASE, later, |_| true).unwrap();
        assert_eq!(q.stats().unwrap().completed, 2);
    }

    #[test]
    fn bad_plans_and_ranges_are_refused() {
        let q = DataQueue::default();
        let now = Instant::now();
        let zero = Plan { range_batches: 0, ..PLAN };
        assert!(matches!(q.take(1, zero, &[], LEASE, now, |_| true), Err(Error::DataPlan(_))));
        let huge = Plan { epochs: u32::MAX, batches_per_epoch: u64::MAX, range_batches: 1 };
        assert!(matches!(q.take(1, huge, &[], LEASE, now, |_| true), Err(Error::DataPlan(_))));
        let odd = Range { epoch: 0, start: 1, end: 5 };
        assert!(matches!(q.take(1, PLAN, &[odd], LEASE, now, |_| true), Err(Error::BadRange(_))));
        q.take(1, PLAN, &[], LEASE, now, |_| true).unwrap();
        let other = Plan { epochs: 3, ..PLAN };
        assert!(matches!(q.take(1, other, &[], LEASE, now, |_| true), Err(Error::DataPlan(_))));
    }
}
