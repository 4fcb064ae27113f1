//! Resource budgets: what one shard lets its clients make it hold.
//!
//! - [`Limits`] is the `[limits]` section of the shard config: the memory
//!   budget, the most tables, name bytes, workers, streams and requests a
//!   second, the gradient bound and the clock and seq ranges. Its defaults
//!   are safe (no single request can take the shard down) and above what
//!   the tests and the reference run use.
//! - [`Budget`] is the accountant of the memory budget: bytes of dense
//!   chunks, sparse rows (values, optimizer state and [`BLOCK_OVERHEAD`]),
//!   tables ([`TABLE_OVERHEAD`]) and the reads kept for delay compensation.
//!   Every creation point reserves what it is about to allocate
//!   ([`Budget::try_reserve`]) *before* allocating; a reservation beyond the
//!   budget is refused with [`Error::OverBudget`] (`RESOURCE_EXHAUSTED`),
//!   and nothing is created.
//! - [`RateLimiter`] is a token bucket per [`Caller`]: per principal when
//!   auth is on (however many connections it opens), per connection when
//!   it is off, and per host for credentials that fail their check.
//!
//! ARCHITECTURE.md ("Invariants", "Resource budgets") states the rules and
//! docs/SECURITY.md ("Resource budgets") the keys and defaults.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ps_common::auth::Principal;
use ps_common::bounded::Bounded;
use ps_common::spec::TableSpec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes a block costs beside its floats: its map slot (key, boxed slice,
/// step: 32 B, at hashbrown's load factor) and its allocation's rounding, as
/// measured (ARCHITECTURE.md, "Memory per sparse key": 141 B a width-8
/// Adagrad row, 64 of them floats).
pub const BLOCK_OVERHEAD: u64 = 77;

/// Bytes a table costs before any block: its `Table` and spec, the empty
/// concurrent maps (one small hash map per DashMap shard), its name twice
/// (the table map's key and the spec).
pub const TABLE_OVERHEAD: u64 = 4096;

/// Bytes one block of `len` parameters of a table of `spec` costs: values,
/// optimizer state (including delay compensation's), and [`BLOCK_OVERHEAD`].
/// The one formula the budget charges blocks with.
pub fn block_bytes(spec: &TableSpec, len: usize) -> u64 {
    let floats = (len as u64).saturating_mul(1 + spec.optimizer.state_per_param() as u64);
    floats.saturating_mul(4).saturating_add(BLOCK_OVERHEAD)
}

/// Bytes a table's entry costs before its blocks.
pub fn table_bytes(spec: &TableSpec) -> u64 {
    TABLE_OVERHEAD + 2 * spec.name.len() as u64
}

/// Bytes the two reads of a dense chunk of `len` values kept for one worker
/// (delay compensation) cost.
pub fn reads_bytes(len: usize) -> u64 {
    (len as u64).saturating_mul(8).saturating_add(2 * BLOCK_OVERHEAD)
}

/// What a shard does with a gradient over [`Limits::max_gradient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnHuge {
    /// The whole push is refused (`INVALID_ARGUMENT`), nothing applied.
    #[default]
    Refuse,
    /// Each value is clipped to `[-max_gradient, max_gradient]` and counted.
    Clip,
}

/// The `[limits]` section of a shard's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory budget of the store, in MiB: dense chunks, sparse rows with
    /// their optimizer state and per-block overhead, tables, kept reads.
    pub memory_mib: u64,
    /// Most tables on the shard.
    pub max_tables: usize,
    /// Longest table name, in bytes (at most 256, the spec's own limit).
    pub max_name_bytes: usize,
    /// Most chunks of one dense table (registration walks them).
    pub max_chunks_per_table: u64,
    /// Most distinct worker ids the shard keeps state for (clock set
    /// members and workers that left, seq records, the data queue).
    pub max_workers: usize,
    /// Most concurrent HTTP/2 streams (requests in flight) per connection.
    pub max_concurrent_streams: u32,
    /// Most open gRPC connections; a connection beyond it is closed at
    /// once (`ps_common::listen`). With `max_data_connections`, keep it
    /// under the process's open-file limit (`ulimit -n`).
    pub max_connections: usize,
    /// Most open data-plane connections (each serves one request at a
    /// time); a connection beyond it is closed at once.
    pub max_data_connections: usize,
    /// Most open connections from one peer host, on the gRPC port and on
    /// the data plane's TCP port each (its Unix socket is the host's own),
    /// so that one host cannot take every slot.
    pub max_connections_per_host: usize,
    /// Bytes of request messages being received or handled at once, in
    /// MiB, over gRPC and the data plane together (`ps_common::inflight`): a
    /// request whose bytes do not fit is refused with `RESOURCE_EXHAUSTED`.
    pub max_inflight_mib: u64,
    /// Requests a second per connection (a token bucket; 0: no limit).
    pub requests_per_sec: u32,
    /// Bucket size: requests a connection may send at once after a pause.
    pub burst: u32,
    /// Largest gradient magnitude accepted.
    pub max_gradient: f32,
    /// A gradient over `max_gradient`: refuse the push, or clip it.
    pub on_huge_gradient: OnHuge,
    /// Clocks (join, push, read) must be below this.
    pub max_clock: u64,
    /// A clock may lead the highest clock the shard knows by at most this.
    pub max_clock_lead: u64,
    /// A push's seq may lead the worker's last applied seq by at most this.
    pub max_seq_jump: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 4096,
            max_tables: 1024,
            max_name_bytes: 256,
            max_chunks_per_table: 1 << 22,
            max_workers: 1024,
            max_concurrent_streams: 256,
            max_connections: 512,
            max_data_connections: 256,
            max_connections_per_host: 128,
            max_inflight_mib: 1024,
            requests_per_sec: 20_000,
            burst: 20_000,
            max_gradient: 1e15,
            on_huge_gradient: OnHuge::Refuse,
            max_clock: 1 << 40,
            max_clock_lead: 1 << 24,
            max_seq_jump: 1 << 24,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("[limits] {m}")));
        if self.memory_mib == 0 || self.memory_mib > 1 << 30 {
            return bad("memory_mib must be 1..=2^30");
        }
        if self.max_tables == 0
            || self.max_workers == 0
            || self.max_concurrent_streams == 0
            || self.max_connections == 0
            || self.max_data_connections == 0
            || self.max_connections_per_host == 0
        {
            return bad(
                "max_tables, max_workers, max_concurrent_streams, max_connections, max_data_connections and \
                 max_connections_per_host must be positive",
            );
        }
        if self.max_inflight_mib == 0 || self.max_inflight_mib > 1 << 30 {
            return bad("max_inflight_mib must be 1..=2^30");
        }
        if self.max_name_bytes == 0 || self.max_name_bytes > 256 {
            return bad("max_name_bytes must be 1..=256");
        }
        if self.max_chunks_per_table == 0 {
            return bad("max_chunks_per_table must be positive");
        }
        if self.requests_per_sec > 0 && self.burst == 0 {
            return bad("burst must be positive when requests_per_sec is");
        }
        if !(self.max_gradient.is_finite() && self.max_gradient > 0.0) {
            return bad("max_gradient must be finite and positive");
        }
        if self.max_clock == 0
            || self.max_clock > 1 << 62
            || self.max_clock_lead == 0
            || self.max_seq_jump == 0
        {
            return bad("max_clock must be 1..=2^62, max_clock_lead and max_seq_jump positive");
        }
        Ok(())
    }

    /// The memory budget in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// The budget of request bytes in flight.
    pub fn inflight_bytes(&self) -> u64 {
        self.max_inflight_mib << 20
    }

    /// Checks a new table's name length and the table count (`tables`:
    /// how many the shard holds now).
    pub fn check_table(&self, spec: &TableSpec, tables: usize) -> Result<()> {
        if spec.name.len() > self.max_name_bytes {
            return Err(Error::LimitExceeded {
                what: "table name bytes",
                got: spec.name.len() as u64,
                limit: self.max_name_bytes as u64,
            });
        }
        if tables >= self.max_tables {
            return Err(Error::LimitExceeded {
                what: "tables",
                got: tables as u64 + 1,
                limit: self.max_tables as u64,
            });
        }
        Ok(())
    }

    /// Checks `clock` (named `what`) against the absolute bound and the
    /// lead over `high`, the highest clock the shard knows.
    pub fn check_clock(&self, what: &'static str, clock: u64, high: u64) -> Result<()> {
        let lead_limit = high.saturating_add(self.max_clock_lead);
        if clock >= self.max_clock || clock > lead_limit {
            return Err(Error::OutOfRange {
                what,
                value: clock,
                rule: format!(
                    "must be < {} and <= {lead_limit} (highest clock {high} + {})",
                    self.max_clock, self.max_clock_lead
                ),
            });
        }
        Ok(())
    }

    /// Checks a push's `seq` against the worker's last applied seq `last`.
    pub fn check_seq(&self, seq: u64, last: u64) -> Result<()> {
        let limit = last.saturating_add(self.max_seq_jump);
        if seq > limit {
            return Err(Error::OutOfRange {
                what: "seq",
                value: seq,
                rule: format!("must be <= {limit} (last applied {last} + {})", self.max_seq_jump),
            });
        }
        Ok(())
    }
}

/// The accountant of a shard's memory budget. Lock-free: a reservation is
/// one compare-and-swap loop.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: Bounded,
    /// Reservations refused.
    pub refused: AtomicU64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(Limits::default().memory_bytes())
    }
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: Bounded::default(), refused: AtomicU64::new(0) }
    }

    /// Takes `bytes` from the budget, or refuses (nothing taken).
    pub fn try_reserve(&self, bytes: u64) -> Result<()> {
        self.used.try_add(bytes, self.limit).map_err(|used| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Error::OverBudget { bytes, used, limit: self.limit }
        })
    }

    /// Takes `bytes` and returns them when the [`Reservation`] drops, less
    /// what was [`Reservation::keep`]: for a request that may create up to
    /// so many blocks, of which a concurrent request may create some first.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation<'_>> {
        self.try_reserve(bytes)?;
        Ok(Reservation { budget: self, bytes })
    }

    /// Gives `bytes` back.
    pub fn release(&self, bytes: u64) {
        self.used.sub(bytes);
    }

    /// Adds what is already allocated (a restored checkpoint): refused if
    /// it is over the budget.
    pub fn charge(&self, bytes: u64) -> Result<()> {
        self.try_reserve(bytes)
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes taken from a [`Budget`]; what is not kept goes back on drop.
pub struct Reservation<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Reservation<'_> {
    /// Marks `bytes` of the reservation as allocated for good.
    pub fn keep(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Most buckets kept; idle (full) buckets are dropped first.
const MAX_BUCKETS: usize = 4096;

/// Whose bucket a request takes its token from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// Auth on: the principal its credential names, across all the
    /// connections it opens.
    Principal(Principal),
    /// Auth off: there are no identities, so the connection (peer address).
    Connection(SocketAddr),
    /// Auth on, a credential that failed its check (or none): the host it
    /// came from, so that a flood of bad credentials is bounded too.
    Host(IpAddr),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Principal(who) => write!(f, "principal {who}"),
            Caller::Connection(peer) => write!(f, "connection {peer}"),
            Caller::Host(ip) => write!(f, "unauthenticated requests from {ip}"),
        }
    }
}

/// A token bucket per [`Caller`]: `rate` requests a second, up to `burst`
/// at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Caller, (f64, Instant)>>,
    /// Requests refused.
    pub limited: AtomicU64,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> RateLimiter {
        RateLimiter {
            rate: f64::from(limits.requests_per_sec),
            burst: f64::from(limits.burst),
            buckets: Mutex::default(),
            limited: AtomicU64::new(0),
        }
    }

    /// Whether limits are on (`requests_per_sec > 0`).
    fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token of `caller`'s bucket; RESOURCE_EXHAUSTED (counted)
    /// if it has none.
    pub fn admit(&self, caller: Caller) -> Result<()> {
        self.take(caller, 1.0)
    }

    /// Whether `caller`'s bucket holds a token, without taking it; a
    /// refusal is counted. (For a check that costs more than the request
    /// it guards, before making it.)
    pub fn check(&self, caller: Caller) -> Result<()> {
        self.take(caller, 0.0)
    }

    fn take(&self, caller: Caller, cost: f64) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        // A refusal says when the bucket holds a token again.
        let refused = |after: Duration| {
            self.limited.fetch_add(1, Ordering::Relaxed);
            Err(Error::RateLimited { caller: caller.to_string(), rate: self.rate as u32, after })
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&caller) {
            // A full bucket is an idle caller's: forget those.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + rate * now.duration_since(*at).as_secs_f64() < burst);
            if buckets.len() >= MAX_BUCKETS {
                // Buckets fill in at most burst / rate.
                return refused(Duration::from_secs_f64((self.burst / self.rate).min(10.0)));
            }
        }
        let (tokens, at) = buckets.entry(caller).or_insert((self.burst, now));
        *tokens = (*tokens + self.rate * now.duration_since(*at).as_secs_f64()).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            return refused(Duration::from_secs_f64(((1.0 - *tokens) / self.rate).min(10.0)));
        }
        *tokens -= cost;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request refused for want of in-flight bytes that others hold is
    /// pushed back (sent again, it may fit); one larger than its whole cap
    /// is not, and neither are the memory budget's refusals.
    #[test]
    fn only_refusals_that_may_pass_later_carry_a_pushback() {
        use ps_common::inflight::{Charge, InFlight};
        use ps_common::transport::pushback;
        let inflight = InFlight::new(1 << 20);
        let holder = Charge::new(&inflight);
        holder.take(200 << 10).unwrap();
        let busy = Charge::new(&inflight).take(700 << 10).unwrap_err();
        let huge = Charge::new(&inflight).take(900 << 10).unwrap_err();
        let status = |e: Error| tonic::Status::from(e);
        assert_eq!(pushback(&status(busy.into())), Some(crate::error::INFLIGHT_PUSHBACK));
        assert_eq!(pushback(&status(huge.into())), None);
        let full = Budget::new(100).try_reserve(101).unwrap_err();
        assert_eq!(pushback(&status(full)), None);
    }

    #[test]
    fn a_budget_refuses_what_does_not_fit_and_gets_back_what_is_not_kept() {
        let b = Budget::new(100);
        b.try_reserve(60).unwrap();
        assert!(matches!(b.try_reserve(41), Err(Error::OverBudget { bytes: 41, used: 60, limit: 100 })));
        assert!(b.try_reserve(u64::MAX).is_err(), "no overflow");
        {
            let mut r = b.reserve(40).unwrap();
            r.keep(15);
        }
        assert_eq!(b.used(), 75);
        b.release(1000);
        assert_eq!(b.used(), 0);
        assert_eq!(b.refused.load(Ordering::Relaxed), 2);
        let status = tonic::Status::from(b.try_reserve(101).unwrap_err());
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn clocks_and_seqs_out_of_range_are_refused() {
        let l = Limits { max_clock: 1000, max_clock_lead: 10, max_seq_jump: 5, ..Limits::default() };
        l.check_clock("clock", 15, 5).unwrap();
        assert!(l.check_clock("clock", 16, 5).is_err());
        assert!(l.check_clock("clock", 1000, 995).is_err());
        assert!(l.check_clock("clock", u64::MAX, u64::MAX).is_err());
        l.check_seq(10, 5).unwrap();
        assert!(l.check_seq(11, 5).is_err());
        assert!(l.check_seq(u64::MAX, 0).is_err());
        l.check_seq(3, u64::MAX).unwrap();
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_refuses() {
        let l = Limits { requests_per_sec: 1, burst: 3, ..Limits::default() };
        let r = RateLimiter::new(&l);
        let (a, b): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        for _ in 0..3 {
            r.check(Caller::Connection(a)).unwrap();
            r.admit(Caller::Connection(a)).unwrap();
        }
        let limited = r.admit(Caller::Connection(a)).unwrap_err();
        assert!(matches!(limited, Error::RateLimited { .. }));
        // The refusal says when a token is back: within a second at 1 a second.
        let after = ps_common::transport::pushback(&tonic::Status::from(limited)).expect("a pushback");
        assert!(after > Duration::ZERO && after <= Duration::from_secs(1), "{after:?}");
        assert!(r.check(Caller::Connection(a)).is_err(), "an empty bucket is seen without taking");
        r.admit(Caller::Connection(b)).unwrap();
        // A principal's bucket is its own, whatever connection it comes on.
        let w1 = Caller::Principal(Principal::Worker(1));
        for _ in 0..3 {
            r.admit(w1).unwrap();
        }
        assert!(r.admit(w1).is_err());
        r.admit(Caller::Principal(Principal::Worker(2))).unwrap();
        r.admit(Caller::Host(a.ip())).unwrap();
        assert_eq!(r.limited.load(Ordering::Relaxed), 3);
        let off = RateLimiter::new(&Limits { requests_per_sec: 0, ..Limits::default() });
        for _ in 0..10 {
            off.admit(w1).unwrap();
        }
    }

    #[test]
    fn the_defaults_are_valid_and_a_bad_section_is_refused() {
        Limits::default().validate().unwrap();
        assert!(Limits { max_gradient: f32::INFINITY, ..Limits::default() }.validate().is_err());
        assert!(Limits { max_name_bytes: 300, ..Limits::default() }.validate().is_err());
        let l: Limits = toml::from_str("memory_mib = 64\non_huge_gradient = \"clip\"").unwrap();
        assert_eq!((l.memory_mib, l.on_huge_gradient), (64, OnHuge::Clip));
        assert!(toml::from_str::<Limits>("memory = 1").is_err());
    }
}
