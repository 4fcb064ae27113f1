//! Consistency control of one shard: the clock set of a training job.
//!
//! Each worker's clock is the number of iterations it has completed; a push
//! with `tick` set advances it after the push is applied. Before serving a
//! read from a worker at clock `c`, a shard under SSP with bound `s` waits
//! until every member's clock is at least `c - s` (BSP is `s = 0`, ASP never
//! waits). Since a member's clock passes `t` only after its iteration-`t`
//! pushes are applied here, the read then includes every update from
//! iterations `<= c - s - 1` of every worker — the SSP guarantee of Ho et al.
//! (NIPS 2013), enforced per shard with no central coordinator.
//!
//! Members that leave, or whose lease runs out (no request for `lease`), are
//! dropped from the set so the others go on. Readers outside the set (an
//! evaluator, a dropped worker) never wait.
//!
//! Observed staleness of a push from iteration `c`: how many iterations the
//! fastest *other* member has completed beyond it, `max(0, max_other - (c+1))`.
//! Under SSP with bound `s` it never exceeds `s`; under ASP it is unbounded.
//!
//! **Backup workers** (Chen et al., "Revisiting Distributed Synchronous SGD",
//! 2016): with `b` backups among `N` members, iteration `c` completes once
//! `N - b` members have pushed it, so the read gate waits for the
//! `(N - b)`-th highest clock instead of the lowest (with `b = 0`, the same),
//! and never for the slowest `b` workers. A push of iteration `c` that
//! arrives after `N - b` *other* members have completed `c` is late: the
//! shard drops it (or down-weights it, [`LateGradients::Weight`]), and the
//! late worker's clock jumps to the iteration the others are at, as a backup
//! worker abandons its iteration in the paper.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use ps_common::spec::{Backup, Consistency, LateGradients};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Buckets of the staleness histogram; the last one counts everything above.
pub const STALENESS_BUCKETS: usize = 64;

#[derive(Debug, Clone)]
struct Member {
    clock: u64,
    last_seen: Instant,
    lease: Duration,
    /// The minimum clock this member waits for, while blocked in a read.
    waiting_for: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    model: Option<Consistency>,
    backup: Backup,
    members: BTreeMap<u64, Member>,
    /// Clocks of workers that left or were dropped: a worker that comes back
    /// (or a resumed job's worker that had finished) continues from there.
    left: BTreeMap<u64, u64>,
    histogram: Vec<u64>,
    /// The highest clock the set has held (clocks only grow): the base of
    /// the clock lead limit (`budget::Limits::check_clock`).
    high: u64,
}

impl State {
    /// The clock reads wait for: the lowest member clock, or with `b` backup
    /// workers the `(N - b)`-th highest (u64::MAX without members).
    fn gate_clock(&self) -> u64 {
        let b =
            if self.model.is_some_and(|m| m.bound().is_some()) { self.backup.workers as usize } else { 0 };
        if b == 0 {
            return self.members.values().map(|m| m.clock).min().unwrap_or(u64::MAX);
        }
        let mut clocks: Vec<u64> = self.members.values().map(|m| m.clock).collect();
        if clocks.is_empty() {
            return u64::MAX;
        }
        let k = b.min(clocks.len() - 1);
        *clocks.select_nth_unstable(k).1
    }

    /// With backup workers: the clock `worker`'s push of iteration `clock`
    /// jumps it to if the push is late (the `(N - b)`-th highest clock of the
    /// others, when that many have completed `clock`), else `None`.
    fn late(&self, worker: u64, clock: u64) -> Option<u64> {
        let b = self.backup.workers as usize;
        if b == 0 || self.model.is_none_or(|m| m.bound().is_none()) || !self.members.contains_key(&worker) {
            return None;
        }
        let need = self.members.len().saturating_sub(b);
        let mut ahead: Vec<u64> = self
            .members
            .iter()
            .filter(|(w, m)| **w != worker && m.clock > clock)
            .map(|(_, m)| m.clock)
            .collect();
        if need == 0 || ahead.len() < need {
            return None;
        }
        ahead.sort_unstable_by(|a, b| b.cmp(a));
        Some(ahead[need - 1])
    }
}

/// What a shard does with a push (backup workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeliness {
    OnTime,
    /// Late: the iteration completed without it; the worker jumps to `to`.
    Late {
        to: u64,
        handling: LateGradients,
    },
}

/// The clock set as a checkpoint keeps it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClockCapture {
    pub model: Option<Consistency>,
    /// (worker, clock, lease).
    pub members: Vec<(u64, u64, Duration)>,
    /// (worker, clock) of workers that left.
    pub left: Vec<(u64, u64)>,
}

/// One member's row of the status table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub worker: u64,
    pub clock: u64,
    pub waiting_for: Option<u64>,
    /// Members whose clock is below what this one waits for.
    pub blocked_on: Vec<u64>,
}

pub struct Clocks {
    state: Mutex<State>,
    /// The minimum clock over the members (u64::MAX when there are none),
    /// republished after every change; readers wait on it.
    min_tx: watch::Sender<u64>,
    wait_micros: std::sync::atomic::AtomicU64,
    /// Late pushes (backup workers) dropped, and applied down-weighted.
    pub late_dropped: std::sync::atomic::AtomicU64,
    pub late_weighted: std::sync::atomic::AtomicU64,
    /// Most distinct workers (members and those that left) the set keeps.
    max_workers: usize,
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks {
            state: Mutex::default(),
            min_tx: watch::Sender::new(u64::MAX),
            wait_micros: Default::default(),
            late_dropped: Default::default(),
            late_weighted: Default::default(),
            max_workers: crate::budget::Limits::default().max_workers,
        }
    }
}

impl Clocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps at most `n` distinct workers: a join of one more is refused.
    pub fn with_max_workers(mut self, n: usize) -> Clocks {
        self.max_workers = n;
        self
    }

    /// The highest clock any worker has had here (0 at first).
    pub fn highest(&self) -> u64 {
        self.lock().high
    }

    fn publish(&self, state: &State) {
        let min = state.gate_clock();
        self.min_tx.send_if_modified(|m| std::mem::replace(m, min) != min);
    }

    /// Adds a worker to the clock set (or renews it). The first member fixes
    /// the job's consistency model; a different one is refused while any
    /// member remains. Returns the worker's clock.
    pub fn join(&self, worker: u64, model: Consistency, lease: Duration) -> Result<u64> {
        self.rejoin(worker, model, lease, 0)
    }

    /// As [`Clocks::join`], for a worker that has completed `clock`
    /// iterations: the member's clock becomes at least `clock`. A worker
    /// rejoining a shard restored from a checkpoint says where it is, so the
    /// shard's older record of its clock does not hold the others' reads.
    pub fn rejoin(&self, worker: u64, model: Consistency, lease: Duration, clock: u64) -> Result<u64> {
        self.rejoin_with(worker, model, Backup::default(), lease, clock)
    }

    /// As [`Clocks::rejoin`], with the job's backup workers, which the first
    /// member fixes along with the model.
    pub fn rejoin_with(
        &self,
        worker: u64,
        model: Consistency,
        backup: Backup,
        lease: Duration,
        clock: u64,
    ) -> Result<u64> {
        let mut st = self.lock();
        let known = st.members.len() + st.left.len();
        if known >= self.max_workers && !st.members.contains_key(&worker) && !st.left.contains_key(&worker) {
            return Err(Error::LimitExceeded {
                what: "workers",
                got: known as u64 + 1,
                limit: self.max_workers as u64,
            });
        }
        match st.model {
            Some(current) if (current, st.backup) != (model, backup) && !st.members.is_empty() => {
                let show = |m: Consistency, b: Backup| match b.workers {
                    0 => m.to_string(),
                    n => format!("{m} with {n} backup workers ({} late gradients)", b.late),
                };
                return Err(Error::ConsistencyConflict {
                    worker,
                    current: show(current, st.backup),
                    requested: show(model, backup),
                });
            }
            _ => {
                st.model = Some(model);
                st.backup = backup;
            }
        }
        let now = Instant::now();
        let before = st.members.get(&worker).map(|m| m.clock).or_else(|| st.left.remove(&worker));
        let clock = before.unwrap_or(0).max(clock);
        st.high = st.high.max(clock);
        st.members.insert(worker, Member { clock, last_seen: now, lease, waiting_for: None });
        self.publish(&st);
        Ok(clock)
    }

    pub fn model(&self) -> Option<Consistency> {
        self.lock().model
    }

    pub fn backup(&self) -> Backup {
        self.lock().backup
    }

    /// Whether `worker`'s push of iteration `clock` is late (backup workers).
    pub fn timeliness(&self, worker: u64, clock: u64) -> Timeliness {
        let st = self.lock();
        match st.late(worker, clock) {
            Some(to) => Timeliness::Late { to, handling: st.backup.late },
            None => Timeliness::OnTime,
        }
    }

    /// Renews a member's lease; false if it is not a member.
    pub fn touch(&self, worker: u64) -> bool {
        match self.lock().members.get_mut(&worker) {
            Some(m) => {
                m.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    pub fn leave(&self, worker: u64) {
        let mut st = self.lock();
        if let Some(m) = st.members.remove(&worker) {
            st.left.insert(worker, m.clock);
            tracing::info!(worker, "worker left the clock set");
        }
        self.publish(&st);
    }

    /// Drops members whose lease ran out; returns them. A member blocked in a
    /// read is alive by definition and is not dropped.
    pub fn reap(&self, now: Instant) -> Vec<u64> {
        let mut st = self.lock();
        let dead: Vec<u64> = st
            .members
            .iter()
            .filter(|(_, m)| m.waiting_for.is_none() && now.saturating_duration_since(m.last_seen) > m.lease)
            .map(|(w, _)| *w)
            .collect();
        for w in &dead {
            if let Some(m) = st.members.remove(w) {
                st.left.insert(*w, m.clock);
            }
            tracing::warn!(worker = w, "lease expired: worker dropped from the clock set");
        }
        if !dead.is_empty() {
            self.publish(&st);
        }
        dead
    }

    /// The staleness a push from `worker` computed at `read_clock` would have
    /// if applied now.
    pub fn staleness(&self, worker: u64, read_clock: u64) -> u64 {
        let st = self.lock();
        let fastest_other = st.members.iter().filter(|(w, _)| **w != worker).map(|(_, m)| m.clock).max();
        fastest_other.map_or(0, |f| f.saturating_sub(read_clock + 1))
    }

    /// Adds an applied push's staleness to the histogram.
    pub fn record_staleness(&self, tau: u64) {
        let mut st = self.lock();
        if st.histogram.is_empty() {
            st.histogram = vec![0; STALENESS_BUCKETS];
        }
        st.histogram[(tau as usize).min(STALENESS_BUCKETS - 1)] += 1;
    }

    /// Marks `worker`'s iteration `clock` complete (its pushes are applied).
    pub fn tick(&self, worker: u64, clock: u64) {
        self.tick_to(worker, clock + 1);
    }

    /// Moves `worker`'s clock to at least `to` (a tick, or a late worker's
    /// jump); returns its clock, if it is a member.
    pub fn tick_to(&self, worker: u64, to: u64) -> Option<u64> {
        let mut st = self.lock();
        let now = st.members.get_mut(&worker).map(|m| {
            m.clock = m.clock.max(to);
            m.last_seen = Instant::now();
            m.clock
        });
        st.high = st.high.max(now.unwrap_or(0));
        self.publish(&st);
        now
    }

    /// Waits until `worker` may read at `clock`, or fails after `max_wait`.
    pub async fn wait_read(&self, worker: u64, clock: u64, max_wait: Duration) -> Result<()> {
        let target = {
            let mut st = self.lock();
            let Some(bound) = st.model.and_then(|m| m.bound()) else { return Ok(()) };
            let target = clock.saturating_sub(bound);
            if st.gate_clock() >= target {
                return Ok(());
            }
            let Some(me) = st.members.get_mut(&worker) else { return Ok(()) };
            me.waiting_for = Some(target);
            me.last_seen = Instant::now();
            target
        };
        // If this future is dropped mid-wait (the reader's connection died
        // with its process), the member must not stay "blocked in a read",
        // which would exempt it from reaping forever.
        let _clear = ClearWaiting { clocks: self, worker };
        let started = Instant::now();
        let mut rx = self.min_tx.subscribe();
        // Drop the watch's read guard (`Ref`) before taking the state lock:
        // `publish` takes them in the other order (state, then the watch's
        // write lock), and holding both here deadlocked the shard.
        let wait = async { rx.wait_for(|&min| min >= target).await.map(|_| ()) };
        let waited = tokio::time::timeout(max_wait, wait).await;
        self.wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(me) = st.members.get_mut(&worker) {
            me.waiting_for = None;
            me.last_seen = Instant::now();
        }
        match waited {
            Ok(Ok(_)) => Ok(()),
            // The sender lives as long as `self`: cannot be closed here.
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => {
                let (slowest, slowest_clock) = st
                    .members
                    .iter()
                    .min_by_key(|(_, m)| m.clock)
                    .map(|(w, m)| (*w, m.clock))
                    .unwrap_or((0, 0));
                Err(Error::WaitTimeout {
                    worker,
                    needed: target,
                    waited_ms: started.elapsed().as_millis() as u64,
                    slowest,
                    slowest_clock,
                })
            }
        }
    }

    /// Who is where, and who waits on whom.
    pub fn status(&self) -> Vec<MemberStatus> {
        let st = self.lock();
        st.members
            .iter()
            .map(|(w, m)| MemberStatus {
                worker: *w,
                clock: m.clock,
                waiting_for: m.waiting_for,
                blocked_on: match m.waiting_for {
                    Some(t) => st.members.iter().filter(|(_, o)| o.clock < t).map(|(o, _)| *o).collect(),
                    None => Vec::new(),
                },
            })
            .collect()
    }

    /// The member's clock, if it is a member.
    pub fn clock_of(&self, worker: u64) -> Option<u64> {
        self.lock().members.get(&worker).map(|m| m.clock)
    }

    /// The consistency model and every member's clock and lease: what a
    /// checkpoint keeps of the clock set.
    pub fn capture(&self) -> ClockCapture {
        let st = self.lock();
        let members = st.members.iter().map(|(w, m)| (*w, m.clock, m.lease)).collect();
        let left = st.left.iter().map(|(w, c)| (*w, *c)).collect();
        ClockCapture { model: st.model, members, left }
    }

    /// A clock set restored from a checkpoint. Every member gets a fresh
    /// lease: a worker that does not come back is dropped when it runs out.
    pub fn restore(capture: ClockCapture) -> Clocks {
        let clocks = Clocks::default();
        {
            let mut st = clocks.lock();
            st.model = capture.model;
            let now = Instant::now();
            for (worker, clock, lease) in capture.members {
                st.members.insert(worker, Member { clock, last_seen: now, lease, waiting_for: None });
            }
            st.left = capture.left.into_iter().collect();
            st.high =
                st.members.values().map(|m| m.clock).chain(st.left.values().copied()).max().unwrap_or(0);
            clocks.publish(&st);
        }
        clocks
    }

    pub fn histogram(&self) -> Vec<u64> {
        self.lock().histogram.clone()
    }

    pub fn wait_micros(&self) -> u64 {
        self.wait_micros.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Clears a member's `waiting_for` when a read's wait ends in any way.
struct ClearWaiting<'a> {
    clocks: &'a Clocks,
    worker: u64,
}

impl Drop for ClearWaiting<'_> {
    fn drop(&mut self) {
        if let Some(me) = self.clocks.lock().members.get_mut(&self.worker) {
            me.waiting_for = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn bsp_read_waits_for_the_slowest_worker() {
        let c = std::sync::Arc::new(Clocks::default());
        c.join(1, Consistency::Bsp, LEASE).unwrap();
        c.join(2, Consistency::Bsp, LEASE).unwrap();
        c.tick(1, 0);
        let c2 = c.clone();
        let reader = tokio::spawn(async move { c2.wait_read(1, 1, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        assert_eq!(c.status()[0].blocked_on, vec![2]);
        c.tick(2, 0);
        reader.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn ssp_lets_a_worker_run_ahead_by_the_bound() {
        let c = Clocks::default();
        c.join(1, Consistency::Ssp { staleness: 2 }, LEASE).unwrap();
        c.join(2, Consistency::Ssp { staleness: 2 }, LEASE).unwrap();
        for t in 0..2 {
            c.tick(1, t);
        }
        c.wait_read(1, 2, Duration::from_secs(1)).await.unwrap();
        c.tick(1, 2);
        let err = c.wait_read(1, 3, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, Error::WaitTimeout { needed: 1, slowest: 2, .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_worker_is_dropped_and_the_others_go_on() {
        let c = std::sync::Arc::new(Clocks::default());
        c.join(1, Consistency::Bsp, LEASE).unwrap();
        c.join(2, Consistency::Bsp, LEASE).unwrap();
        c.tick(1, 0);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        // Worker 1 is blocked in a read, so only worker 2 is reaped.
        let c2 = c.clone();
        let reader = tokio::spawn(async move { c2.wait_read(1, 1, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert_eq!(c.reap(Instant::now()), vec![2]);
        reader.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_dies_while_blocked_is_still_reaped() {
        let c = std::sync::Arc::new(Clocks::default());
        c.join(1, Consistency::Bsp, LEASE).unwrap();
        c.join(2, Consistency::Bsp, LEASE).unwrap();
        c.tick(2, 0);
        // Worker 2 blocks on worker 1, then its read is dropped (its
        // connection died with its process).
        let c2 = c.clone();
        let reader = tokio::spawn(async move { c2.wait_read(2, 1, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert_eq!(c.status()[1].waiting_for, Some(1));
        reader.abort();
        let _ = reader.await;
        assert_eq!(c.status()[1].waiting_for, None);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert_eq!(c.reap(Instant::now()), vec![1, 2]);
    }

    /// With b backup workers among N, a read at clock c waits only for the
    /// N - b fastest: the slowest b never hold anyone up, whatever the
    /// clocks (every assignment of clocks 0..4 to 4 workers, b = 0..3).
    #[tokio::test(start_paused = true)]
    async fn backup_workers_never_wait_for_the_slowest_b() {
        let backup = |workers| Backup { workers, late: LateGradients::Drop };
        for b in 0..4u32 {
            for code in 0..4u32.pow(4) {
                let clocks: Vec<u64> = (0..4).map(|i| u64::from(code / 4u32.pow(i) % 4)).collect();
                let c = Clocks::default();
                for (w, &clock) in clocks.iter().enumerate() {
                    c.rejoin_with(w as u64, Consistency::Bsp, backup(b), LEASE, clock).unwrap();
                }
                // Reader 0 reads at its own clock: it may go on iff at least
                // N - b members (itself included) have reached it.
                let reached = clocks.iter().filter(|&&k| k >= clocks[0]).count();
                let waited = c.wait_read(0, clocks[0], Duration::from_millis(1)).await;
                assert_eq!(waited.is_ok(), reached >= 4 - (b as usize).min(3), "b {b}, clocks {clocks:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_push_is_called_late_and_its_worker_jumps_ahead() {
        let c = std::sync::Arc::new(Clocks::default());
        let b = Backup { workers: 1, late: LateGradients::Drop };
        for w in 0..3 {
            c.rejoin_with(w, Consistency::Bsp, b, LEASE, 0).unwrap();
        }
        // Workers 0 and 1 complete iterations 0..5 while 2 never pushes:
        // no read of theirs waits (each within 1 ms of paused time).
        for t in 0..5 {
            for w in 0..2 {
                c.wait_read(w, t, Duration::from_millis(1)).await.unwrap();
                assert_eq!(c.timeliness(w, t), Timeliness::OnTime);
                c.tick(w, t);
            }
        }
        // Worker 2's push of iteration 0 is late; it jumps to clock 5.
        assert_eq!(c.timeliness(2, 0), Timeliness::Late { to: 5, handling: LateGradients::Drop });
        assert_eq!(c.tick_to(2, 5), Some(5));
        // Without backups nobody is late and a read waits for the slowest.
        let plain = Clocks::default();
        plain.join(0, Consistency::Bsp, LEASE).unwrap();
        plain.join(1, Consistency::Bsp, LEASE).unwrap();
        plain.tick(0, 0);
        assert_eq!(plain.timeliness(1, 0), Timeliness::OnTime);
        assert!(plain.wait_read(0, 1, Duration::from_millis(1)).await.is_err());
        // Another backup setting is a conflict while members remain.
        let other = Backup { workers: 2, late: LateGradients::Drop };
        assert!(c.rejoin_with(9, Consistency::Bsp, other, LEASE, 0).is_err());
    }

    #[test]
    fn staleness_counts_iterations_of_faster_workers() {
        let c = Clocks::default();
        c.join(1, Consistency::Asp, LEASE).unwrap();
        c.join(2, Consistency::Asp, LEASE).unwrap();
        for t in 0..5 {
            c.tick(2, t);
        }
        // Worker 1 pushes its iteration 0 while worker 2 has done 5.
        assert_eq!(c.staleness(1, 0), 4);
        assert_eq!(c.staleness(2, 5), 0);
        c.record_staleness(4);
        assert_eq!(c.histogram()[4], 1);
    }

    #[test]
    fn conflicting_models_are_refused() {
        let c = Clocks::default();
        c.join(1, Consistency::Bsp, LEASE).unwrap();
        assert!(c.join(2, Consistency::Asp, LEASE).is_err());
        c.leave(1);
        c.join(2, Consistency::Asp, LEASE).unwrap();
    }

    #[test]
    fn the_set_keeps_at_most_max_workers_and_tracks_its_highest_clock() {
        let c = Clocks::default().with_max_workers(2);
        c.join(1, Consistency::Asp, LEASE).unwrap();
        c.join(2, Consistency::Asp, LEASE).unwrap();
        c.leave(2);
        let err = c.join(3, Consistency::Asp, LEASE).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { what: "workers", got: 3, limit: 2 }), "{err}");
        // Those it knows may come back.
        assert_eq!(c.rejoin(2, Consistency::Asp, LEASE, 7).unwrap(), 7);
        c.tick(1, 9);
        assert_eq!(c.highest(), 10);
    }
}
