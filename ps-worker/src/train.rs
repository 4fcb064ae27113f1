//! The training loop of one worker: pull -> local gradient -> push, one
//! iteration per clock tick, with progress events on stdout.
//!
//! Events are JSON lines (see [`Event`]); the launcher reads them to draw
//! progress bars and writes them to the run's `metrics.jsonl`.

use std::io::Write;
use std::time::{Duration, Instant};

use ps_common::spec::{Init, InitKind, Layout, TableSpec};
use rand::{Rng, SeedableRng};

use serde::{Deserialize, Serialize};

use crate::client::{ClientOptions, DenseSet, ShardedClient};
use crate::config::{JobConfig, Straggler, Workload};
use crate::data::{self, Batches, BatchBuf, DenseDataset};
use crate::error::{Error, Result};
use crate::model::{self, Mlp};

/// One line of a worker's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start { worker: usize, iters_per_epoch: u64, epochs: u32, total_iters: u64 },
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
    Eval { worker: usize, epoch: u32, iter: u64, wall_s: f64, test_loss: f64, test_acc: f64 },
    Done {
        worker: usize,
        iters: u64,
        samples: u64,
        wall_s: f64,
        samples_per_s: f64,
        /// Seconds spent in each phase.
        pull_s: f64,
        compute_s: f64,
        push_s: f64,
        straggle_s: f64,
    },
}

/// Where events go: stdout (as JSON lines) in the worker binary, a closure in tests.
pub trait Reporter: Send {
    fn report(&mut self, event: Event);
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

/// The dense tables of an MLP, as registered on the servers.
pub fn mlp_tables(mlp: &Mlp, job: &JobConfig, chunk_len: u32) -> Vec<TableSpec> {
    mlp.param_specs()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = match p.init {
                model::InitKind::Zeros => InitKind::Constant { value: 0.0 },
                model::InitKind::Uniform { low, high } => InitKind::Uniform { low, high },
            };
            TableSpec {
                name: p.name,
                layout: Layout::Dense { shape: p.shape.iter().map(|&d| d as u64).collect(), chunk_len },
                init: Init { kind, seed: job.seed.wrapping_add(i as u64) },
                optimizer: job.optimizer,
            }
        })
        .collect()
}

/// Injected slowdown of one worker.
struct Slowdown {
    straggler: Option<Straggler>,
    rng: rand::rngs::StdRng,
}

impl Slowdown {
    fn new(job: &JobConfig, worker: usize) -> Slowdown {
        let applies = match &job.straggler {
            Some(Straggler::Factor { workers, .. }) | Some(Straggler::Random { workers, .. }) => workers.contains(&worker),
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
            Some(Straggler::Factor { factor, .. }) => took.mul_f64(factor - 1.0),
            Some(Straggler::Random { probability, mean_ms, .. }) => {
                if self.rng.random::<f64>() < *probability {
                    // Exponential by inversion.
                    let u: f64 = self.rng.random::<f64>();
                    Duration::from_secs_f64(-(1.0 - u).ln() * mean_ms / 1e3)
                } else {
                    Duration::ZERO
                }
            }
        }
    }
}

/// Identity of this worker in the job.
#[derive(Debug, Clone)]
pub struct WorkerId {
    pub index: usize,
    pub count: usize,
}

/// Loads the training and test sets of an MNIST job (limited by `train_limit`).
pub fn load_mnist(job: &JobConfig) -> Result<(DenseDataset, DenseDataset)> {
    let Workload::MnistMlp { data_dir, .. } = &job.workload else {
        return Err(Error::Config("not an MNIST job".into()));
    };
    let mut train = data::load_mnist(data_dir, data::Split::Train)?;
    if let Some(n) = job.train_limit {
        let n = n.min(train.len());
        let (x, y) = train.slice(0..n);
        train = DenseDataset { x: x.to_owned(), y: y.to_vec(), num_classes: train.num_classes };
    }
    let test = data::load_mnist(data_dir, data::Split::Test)?;
    Ok((train, test))
}

/// Runs one worker of `job` against the shards at `servers` until its epochs
/// (or `max_iters`) are done, then leaves the clock set.
pub async fn run(job: &JobConfig, servers: &[String], id: WorkerId, reporter: &mut dyn Reporter) -> Result<()> {
    job.validate()?;
    let (layers, chunk_len) = match &job.workload {
        Workload::MnistMlp { layers, chunk_len, .. } => (layers, chunk_len),
        Workload::A9aLogreg { .. } => return crate::sparse::logreg::run(job, servers, id, reporter).await,
        Workload::MovielensMf { .. } => return crate::sparse::mf::run(job, servers, id, reporter).await,
        Workload::Ctr { .. } => return crate::sparse::ctr::run(job, servers, id, reporter).await,
    };
    let (train, test) = load_mnist(job)?;
    let shard = train.shard(id.index, id.count)?;
    let mlp = Mlp::new(layers);
    let tables = mlp_tables(&mlp, job, *chunk_len);

    let mut client = ShardedClient::connect(servers, id.index as u64, ClientOptions::default()).await?;
    for t in &tables {
        client.register(t).await?;
    }
    let set = DenseSet::new(&tables, client.num_shards())?;
    client.join(job.consistency, Duration::from_millis(job.lease_ms)).await?;
    let heartbeat = client.spawn_heartbeat(Duration::from_millis(job.lease_ms / 4));
    start_barrier(&client, id.count).await;

    let result = train_loop(job, &mut client, &set, &mlp, &shard, &test, &id, reporter).await;
    heartbeat.abort();
    // Leave even after a failure, so the others are not held up.
    let left = client.leave().await;
    result?;
    left
}

/// How long a worker waits for the others to join before training alone.
pub const START_BARRIER: Duration = Duration::from_secs(60);

/// Waits (up to [`START_BARRIER`]) until all `workers` have joined; on
/// timeout or error it warns and lets the worker start anyway.
pub async fn start_barrier(client: &ShardedClient, workers: usize) {
    match client.wait_for_members(workers, START_BARRIER).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(worker = client.worker(), workers, "not every worker joined in time; starting anyway"),
        Err(e) => tracing::warn!(worker = client.worker(), error = %e, "start barrier failed; starting anyway"),
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
    /// Starts the clock and reports `Start`.
    pub fn new(job: &'a JobConfig, worker: usize, iters_per_epoch: u64, reporter: &'a mut dyn Reporter) -> Self {
        let all = iters_per_epoch * u64::from(job.epochs);
        let total_iters = job.max_iters.map_or(all, |m| m.min(all));
        reporter.report(Event::Start { worker, iters_per_epoch, epochs: job.epochs, total_iters });
        let now = Instant::now();
        Driver {
            job,
            worker,
            reporter,
            slow: Slowdown::new(job, worker),
            started: now,
            clock: 0,
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
    pub async fn end_iteration(&mut self, epoch: u32, m: Marks, samples: usize, loss: f32, score: f64) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::Diverged(loss));
        }
        let extra = self.slow.delay(m.pushed - m.start);
        if !extra.is_zero() {
            tokio::time::sleep(extra).await;
            self.straggle += extra;
        }
        self.pull += m.pulled - m.start;
        self.compute += m.computed - m.pulled;
        self.push += m.pushed - m.computed;
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
        self.worker == 0 && self.job.eval_every_epochs > 0 && (epoch + 1).is_multiple_of(self.job.eval_every_epochs)
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

    /// Reports `Done` with the time breakdown.
    pub fn done(self) {
        let wall = self.elapsed();
        self.reporter.report(Event::Done {
            worker: self.worker,
            iters: self.clock,
            samples: self.samples,
            wall_s: wall,
            samples_per_s: self.samples as f64 / wall.max(1e-9),
            pull_s: self.pull.as_secs_f64(),
            compute_s: self.compute.as_secs_f64(),
            push_s: self.push.as_secs_f64(),
            straggle_s: self.straggle.as_secs_f64(),
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn train_loop(
    job: &JobConfig,
    client: &mut ShardedClient,
    set: &DenseSet,
    mlp: &Mlp,
    shard: &DenseDataset,
    test: &DenseDataset,
    id: &WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let mut batches = Batches::new(shard.len(), job.batch_size, job.seed ^ (id.index as u64) << 32);
    let mut d = Driver::new(job, id.index, batches.num_batches() as u64, reporter);
    let mut params = vec![0.0f32; set.len()];
    let mut grads = vec![0.0f32; set.len()];
    let mut ws = mlp.workspace(job.batch_size);
    let mut batch = BatchBuf::new();

    // With overlap, the pull for iteration c + 1 travels with the push of c.
    let mut have_params = false;
    'epochs: for epoch in 0..job.epochs {
        for rows in batches.epoch(u64::from(epoch)) {
            if d.finished() {
                break 'epochs;
            }
            let clock = d.clock;
            let start = Instant::now();
            if !have_params {
                client.pull_dense(set, clock, &mut params).await?;
            }
            let pulled = Instant::now();
            shard.gather(rows, &mut batch);
            let (loss, correct) = mlp.loss_and_grad(&params, batch.x(), batch.y(), &mut grads, &mut ws);
            let computed = Instant::now();
            if loss.is_finite() {
                if job.overlap && clock + 1 < d.total_iters {
                    client.push_and_pull_dense(set, &grads, clock, &mut params).await?;
                    have_params = true;
                } else {
                    client.push_dense(set, &grads, clock, clock, true).await?;
                    have_params = false;
                }
            }
            let marks = Marks { start, pulled, computed, pushed: Instant::now() };
            d.end_iteration(epoch, marks, rows.len(), loss, correct as f64).await?;
        }
        if d.should_eval(epoch) {
            // A read outside the clock discipline: evaluation holds no one up.
            client.pull_dense(set, d.clock, &mut params).await?;
            let (test_loss, test_acc) = mlp.evaluate(&params, test.x.view(), &test.y);
            d.eval(epoch, f64::from(test_loss), f64::from(test_acc));
        }
    }
    d.done();
    Ok(())
}

/// The trained model, as written to a run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedModel {
    /// Format version of this file.
    pub version: u32,
    pub layers: Vec<usize>,
    /// (name, shape, values) in parameter order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

/// The result of evaluating a trained job on its test set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    /// Accuracy for classifiers, RMSE for regression.
    pub score: f64,
    pub score_name: &'static str,
    /// The model, where the workload has a portable form of it.
    pub model: Option<SavedModel>,
}

/// Pulls the trained parameters of `job` from `servers` and evaluates them.
pub async fn evaluate_job(job: &JobConfig, servers: &[String]) -> Result<Evaluation> {
    match &job.workload {
        Workload::MnistMlp { .. } => {
            let (loss, acc, model) = final_eval(job, servers).await?;
            Ok(Evaluation { loss: f64::from(loss), score: f64::from(acc), score_name: "accuracy", model: Some(model) })
        }
        Workload::A9aLogreg { .. } => {
            let (loss, acc) = crate::sparse::logreg::evaluate(job, servers).await?;
            Ok(Evaluation { loss, score: acc, score_name: "accuracy", model: None })
        }
        Workload::MovielensMf { .. } => {
            let (mse, rmse) = crate::sparse::mf::evaluate(job, servers).await?;
            Ok(Evaluation { loss: mse, score: rmse, score_name: "rmse", model: None })
        }
        Workload::Ctr { .. } => {
            let (loss, auc) = crate::sparse::ctr::evaluate(job, servers).await?;
            Ok(Evaluation { loss, score: auc, score_name: "auc", model: None })
        }
    }
}

/// Pulls the current parameters of an MNIST job and evaluates them on the
/// test set; returns (test loss, test accuracy, model).
pub async fn final_eval(job: &JobConfig, servers: &[String]) -> Result<(f32, f32, SavedModel)> {
    let Workload::MnistMlp { data_dir, layers, chunk_len } = &job.workload else {
        return Err(Error::Config("not an MNIST job".into()));
    };
    let test = data::load_mnist(data_dir, data::Split::Test)?;
    let mlp = Mlp::new(layers);
    let tables = mlp_tables(&mlp, job, *chunk_len);
    // An id no training worker uses; it never joins the clock set.
    let client = ShardedClient::connect(servers, u64::MAX, ClientOptions::default()).await?;
    let set = DenseSet::new(&tables, client.num_shards())?;
    let mut params = vec![0.0f32; set.len()];
    client.pull_dense(&set, 0, &mut params).await?;
    let (loss, acc) = mlp.evaluate(&params, test.x.view(), &test.y);
    let mut at = 0;
    let tensors = mlp
        .param_specs()
        .into_iter()
        .map(|p| {
            let n = p.len();
            at += n;
            (p.name, p.shape, params[at - n..at].to_vec())
        })
        .collect();
    Ok((loss, acc, SavedModel { version: 1, layers: layers.clone(), tensors }))
}
