//! Progress events: one JSON line each on a worker's stdout.
//!
//! The launcher reads them to draw progress bars and writes them to a run's
//! `metrics.jsonl`; [`Reporter`] is where a worker sends them (stdout in the
//! binary, a closure in tests).

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One line of a worker's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        worker: usize,
        iters_per_epoch: u64,
        epochs: u32,
        total_iters: u64,
        /// The clock the worker starts at: 0, or where a resumed job's
        /// checkpoint cut it.
        #[serde(default)]
        first_iter: u64,
    },
    Progress {
        worker: usize,
        epoch: u32,
        iter: u64,
        wall_s: f64,
        /// Mean training loss and accuracy since the previous event.
        loss: f64,
        acc: f64,
        samples_per_s: f64,
    },
    Eval {
        worker: usize,
        epoch: u32,
        iter: u64,
        wall_s: f64,
        test_loss: f64,
        test_acc: f64,
    },
    /// The worker finished; see [`WorkerDone`].
    Done(WorkerDone),
    /// Where the worker serves Prometheus metrics (`--metrics`), once bound:
    /// the port is known here when the flag said 0.
    Metrics {
        worker: usize,
        addr: std::net::SocketAddr,
    },
}

/// A worker's totals when it finishes: iterations, samples, and the seconds
/// spent in each phase of its iterations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerDone {
    pub worker: usize,
    pub iters: u64,
    pub samples: u64,
    pub wall_s: f64,
    pub samples_per_s: f64,
    /// Seconds spent in each phase.
    pub pull_s: f64,
    pub compute_s: f64,
    pub push_s: f64,
    pub straggle_s: f64,
    /// Protobuf bytes of the worker's push requests and pull answers (each
    /// push once, however often retried; evaluation reads included).
    #[serde(default)]
    pub bytes_pushed: u64,
    #[serde(default)]
    pub bytes_pulled: u64,
    /// Pulls, pushes and control calls a shard refused with a pushback (its
    /// rate limit, its bytes in flight) and the worker sent again.
    #[serde(default)]
    pub pushback_waits: u64,
}

/// The wall time of one iteration's phases, told to [`Reporter::iteration`]
/// every iteration (metrics; never an event line).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IterationTimes {
    pub pull: Duration,
    pub compute: Duration,
    pub push: Duration,
    /// Injected straggler sleep.
    pub straggle: Duration,
}

/// Where events go: stdout (as JSON lines) in the worker binary, a closure in tests.
pub trait Reporter: Send {
    fn report(&mut self, event: Event);

    /// One iteration ended (every iteration; progress events are sparser).
    fn iteration(&mut self, _times: IterationTimes) {}
}

/// Writes events as JSON lines to stdout.
pub struct StdoutReporter;

impl Reporter for StdoutReporter {
    fn report(&mut self, event: Event) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (launcher gone) must not kill the worker mid-push.
        if let Ok(line) = serde_json::to_string(&event) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

impl<F: FnMut(Event) + Send> Reporter for F {
    fn report(&mut self, event: Event) {
        self(event)
    }
}
