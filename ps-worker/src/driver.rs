//! The bookkeeping of the training loop, the same for every workload: the
//! worker's clock and iteration budget, straggler injection, phase timers and
//! progress events.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::config::{JobConfig, Straggler};
use crate::error::{Error, Result};
use crate::event::{Event, IterationTimes, Reporter, WorkerDone};

/// Injected slowdown of one worker.
struct Slowdown {
    straggler: Option<Straggler>,
    rng: rand::rngs::StdRng,
}

impl Slowdown {
    fn new(job: &JobConfig, worker: usize) -> Slowdown {
        let applies = match &job.straggler {
            Some(Straggler::Factor { workers, .. }) | Some(Straggler::Random { workers, .. }) => {
                workers.contains(&worker)
            }
            None => false,
        };
        Slowdown {
            straggler: if applies { job.straggler.clone() } else { None },
            rng: rand::rngs::StdRng::seed_from_u64(job.seed ^ (worker as u64).wrapping_mul(0x9e37_79b9)),
        }
    }

    /// The extra sleep after an iteration that took `took`.
    fn delay(&mut self, took: Duration) -> Duration {
        match &self.straggler {
            None => Duration::ZERO,
            // Saturating: `mul_f64` and `from_secs_f64` panic past `Duration::MAX`.
            Some(Straggler::Factor { factor, .. }) => {
                Duration::try_from_secs_f64(took.as_secs_f64() * (factor - 1.0)).unwrap_or(Duration::MAX)
            }
            Some(Straggler::Random { probability, mean_ms, .. }) => {
                if self.rng.random::<f64>() < *probability {
                    // Exponential by inversion.
                    let u: f64 = self.rng.random::<f64>();
                    Duration::try_from_secs_f64(-(1.0 - u).ln() * mean_ms / 1e3).unwrap_or(Duration::MAX)
                } else {
                    Duration::ZERO
                }
            }
        }
    }
}

/// Bookkeeping shared by every workload's loop: clock, iteration budget,
/// straggler injection, phase timers and progress events.
pub struct Driver<'a> {
    job: &'a JobConfig,
    pub worker: usize,
    reporter: &'a mut dyn Reporter,
    slow: Slowdown,
    started: Instant,
    /// Iterations completed = this worker's clock.
    pub clock: u64,
    pub total_iters: u64,
    samples: u64,
    pull: Duration,
    compute: Duration,
    push: Duration,
    straggle: Duration,
    win: (f64, f64, usize, Instant),
    last_event: Instant,
}

/// Wall-clock marks of one iteration: start, pulled, computed, pushed.
#[derive(Debug, Clone, Copy)]
pub struct Marks {
    pub start: Instant,
    pub pulled: Instant,
    pub computed: Instant,
    pub pushed: Instant,
}

impl<'a> Driver<'a> {
    /// Starts the clock at `first_iter` (0, or a resumed job's cut) and
    /// reports `Start`.
    pub fn new(
        job: &'a JobConfig,
        worker: usize,
        iters_per_epoch: u64,
        first_iter: u64,
        reporter: &'a mut dyn Reporter,
    ) -> Self {
        let all = iters_per_epoch * u64::from(job.epochs);
        let total_iters = job.max_iters.map_or(all, |m| m.min(all));
        reporter.report(Event::Start {
            worker,
            iters_per_epoch,
            epochs: job.epochs,
            total_iters,
            first_iter,
        });
        let now = Instant::now();
        Driver {
            job,
            worker,
            reporter,
            slow: Slowdown::new(job, worker),
            started: now,
            clock: first_iter,
            total_iters,
            samples: 0,
            pull: Duration::ZERO,
            compute: Duration::ZERO,
            push: Duration::ZERO,
            straggle: Duration::ZERO,
            win: (0.0, 0.0, 0, now),
            last_event: now,
        }
    }

    /// True once the iteration budget is spent.
    pub fn finished(&self) -> bool {
        self.clock >= self.total_iters
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends an iteration: injects the straggler delay, advances the clock,
    /// and reports progress now and then. `loss` is the batch mean, `score`
    /// the batch's summed accuracy (or any per-sample metric).
    pub async fn end_iteration(
        &mut self,
        epoch: u32,
        m: Marks,
        samples: usize,
        loss: f32,
        score: f64,
    ) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::Diverged(loss));
        }
        let extra = self.slow.delay(m.pushed - m.start);
        if !extra.is_zero() {
            tokio::time::sleep(extra).await;
            self.straggle = self.straggle.saturating_add(extra);
        }
        let times = IterationTimes {
            pull: m.pulled - m.start,
            compute: m.computed - m.pulled,
            push: m.pushed - m.computed,
            straggle: extra,
        };
        self.reporter.iteration(times);
        self.pull += times.pull;
        self.compute += times.compute;
        self.push += times.push;
        self.clock += 1;
        self.samples += samples as u64;
        self.win.0 += f64::from(loss) * samples as f64;
        self.win.1 += score;
        self.win.2 += samples;
        if self.last_event.elapsed() >= Duration::from_millis(self.job.progress_every_ms) || self.finished() {
            let (loss, score, n, since) = self.win;
            let n = n.max(1) as f64;
            self.reporter.report(Event::Progress {
                worker: self.worker,
                epoch,
                iter: self.clock,
                wall_s: self.elapsed(),
                loss: loss / n,
                acc: score / n,
                samples_per_s: n / since.elapsed().as_secs_f64().max(1e-9),
            });
            self.win = (0.0, 0.0, 0, Instant::now());
            self.last_event = Instant::now();
        }
        Ok(())
    }

    /// Whether worker 0 should evaluate after `epoch`.
    pub fn should_eval(&self, epoch: u32) -> bool {
        self.worker == 0
            && self.job.eval_every_epochs > 0
            && (epoch + 1).is_multiple_of(self.job.eval_every_epochs)
    }

    /// Reports a test-set evaluation (`test_acc` may be any score, e.g. RMSE).
    pub fn eval(&mut self, epoch: u32, test_loss: f64, test_acc: f64) {
        self.reporter.report(Event::Eval {
            worker: self.worker,
            epoch,
            iter: self.clock,
            wall_s: self.elapsed(),
            test_loss,
            test_acc,
        });
    }

    /// Reports `Done` with the time breakdown, the protobuf bytes the
    /// worker pushed and pulled, and the requests pushed back.
    pub fn done(self, client: &crate::client::ShardedClient) {
        let (bytes_pushed, bytes_pulled) = client.wire_bytes();
        let wall = self.elapsed();
        self.reporter.report(Event::Done(WorkerDone {
            worker: self.worker,
            iters: self.clock,
            samples: self.samples,
            wall_s: wall,
            samples_per_s: self.samples as f64 / wall.max(1e-9),
            pull_s: self.pull.as_secs_f64(),
            compute_s: self.compute.as_secs_f64(),
            push_s: self.push.as_secs_f64(),
            straggle_s: self.straggle.as_secs_f64(),
            bytes_pushed,
            bytes_pulled,
            pushback_waits: client.pushback_waits(),
        }));
    }
}
