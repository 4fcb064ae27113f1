//! The training loop, one for every workload: pull -> compute -> push, one
//! iteration per clock tick, with the [`Driver`] keeping the clock, the
//! straggler injection, the phase timers and the progress events.
//!
//! [`run`] trains one worker of a job; [`evaluate_job`] scores (and saves)
//! the trained model as an outside reader. Both pick the workload from the
//! job's `workload` table and call the same generic code.

use std::ops::Range;
use std::time::{Duration, Instant};

use ps_model::SavedModel;

use crate::client::{DataRange, ShardedClient};
use crate::config::{DataAssignment, JobConfig, Workload as Kind};
use crate::data::Batches;
use crate::driver::{Driver, Marks};
use crate::error::Result;
use crate::event::Reporter;
use crate::session::{self, Session, WorkerId};
use crate::workload::{Iteration, Role, Workload, ctr::Ctr, logreg::Logreg, mf::Mf, mnist::Mnist};

/// Runs one worker of `job` against the shards at `servers` until its epochs
/// (or `max_iters`) are done, then leaves the clock set.
pub async fn run(
    job: &JobConfig,
    servers: &[String],
    id: WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    job.validate()?;
    match &job.workload {
        Kind::MnistMlp { .. } => run_as::<Mnist>(job, servers, id, reporter).await,
        Kind::A9aLogreg { .. } => run_as::<Logreg>(job, servers, id, reporter).await,
        Kind::MovielensMf { .. } => run_as::<Mf>(job, servers, id, reporter).await,
        Kind::Ctr { .. } => run_as::<Ctr>(job, servers, id, reporter).await,
    }
}

async fn run_as<W: Workload>(
    job: &JobConfig,
    servers: &[String],
    id: WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let client = session::connect(job, servers, id).await?;
    let dynamic = job.data == DataAssignment::Dynamic;
    // Under dynamic assignment every worker holds every row (as worker 0 of 1).
    let role = if dynamic { Role::Train(WorkerId { index: 0, count: 1 }) } else { Role::Train(id) };
    let mut workload = W::open(job, role, client.num_shards())?;
    let mut tables = workload.tables();
    job.codecs.apply(&mut tables)?;
    let mut session = Session::join(client, job, id, &tables).await?;
    let start = session.start_clock;
    let result = if dynamic {
        dynamic_loop(&mut workload, &mut session.client, job, id, start, reporter).await
    } else {
        train_loop(&mut workload, &mut session.client, job, id, start, reporter).await
    };
    session.close(result).await
}

/// One iteration of either loop: pull, compute, push, and the driver's
/// bookkeeping.
async fn step<W: Workload>(
    w: &mut W,
    client: &mut ShardedClient,
    job: &JobConfig,
    d: &mut Driver<'_>,
    it: Iteration<'_>,
) -> Result<()> {
    let start = Instant::now();
    // A shard that cannot be reached may be restarting from a checkpoint:
    // wait for it, rejoin, and read again. Nothing of this iteration has
    // been pushed yet.
    while let Err(e) = w.pull(client, it).await {
        if !e.is_unreachable() {
            return Err(e);
        }
        tracing::warn!(worker = client.worker(), error = %e, "a shard is unreachable; waiting for it");
        Session::recover(client, job, d.clock).await?;
    }
    let pulled = Instant::now();
    let out = w.compute();
    let computed = Instant::now();
    // A diverged batch is not pushed; the driver then stops the run.
    if out.loss.is_finite() {
        w.push(client, it).await?;
    }
    let marks = Marks { start, pulled, computed, pushed: Instant::now() };
    d.end_iteration(it.epoch, marks, out.samples, out.loss, out.score).await?;
    // A late push (backup workers) moved this worker's clock on; without
    // backup workers the shards' clock is the driver's.
    d.clock = d.clock.max(client.take_clock());
    if client.take_lost_contact() {
        // A push waited for a shard: tell a restored shard where we are.
        Session::recover(client, job, d.clock).await?;
    }
    Ok(())
}

/// Trains from iteration `first` (0, or a resumed job's cut): the data order
/// is a function of the seed, the worker and the epoch, so iteration `c` is
/// batch `c % per_epoch` of epoch `c / per_epoch` however the run got there.
async fn train_loop<W: Workload>(
    w: &mut W,
    client: &mut ShardedClient,
    job: &JobConfig,
    id: WorkerId,
    first: u64,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let mut batches = worker_batches(job, id, w.train_rows());
    let per_epoch = batches.num_batches() as u64;
    let mut d = Driver::new(job, id.index, per_epoch, first, reporter);
    let first_epoch = first.checked_div(per_epoch).unwrap_or(0).min(u64::from(job.epochs)) as u32;
    'epochs: for epoch in first_epoch..job.epochs {
        batches.shuffle(u64::from(epoch));
        let first_batch = if epoch == first_epoch { first.checked_rem(per_epoch).unwrap_or(0) } else { 0 };
        for batch in first_batch..per_epoch {
            if d.finished() {
                break 'epochs;
            }
            let rows = batches.batch(batch as usize);
            let last = d.clock + 1 >= d.total_iters;
            let next =
                (job.pipeline && !last && batch + 1 < per_epoch).then(|| batches.batch(batch as usize + 1));
            let it = Iteration { epoch, batch, clock: d.clock, rows, last, next };
            step(w, client, job, &mut d, it).await?;
        }
        if d.should_eval(epoch) {
            // A read outside the clock discipline: evaluation holds no one up.
            let s = w.evaluate(client, d.clock).await?;
            d.eval(epoch, s.loss, s.score);
        }
    }
    d.done(client);
    Ok(())
}

/// How long a worker with no range waits before asking the queue again.
const QUEUE_POLL: Duration = Duration::from_millis(20);

/// Trains on ranges of minibatches taken from the job's data queue (on
/// shard 0) until every range of every epoch is completed. Every worker
/// holds every row, and epoch `e`'s order is the same on all of them
/// (shuffled with the job's seed), so a range names the same rows
/// everywhere.
///
/// Clocks: the worker's clock counts its own iterations, which differ
/// between workers. A worker that finds no free range (the others hold the
/// last ones) leaves the clock set while it waits, so a BSP/SSP read of the
/// others never waits for it; if a dead worker's range comes back to it, it
/// rejoins at its clock and trains it. A late push (backup workers) makes
/// the worker's clock jump to the iteration the others are at.
async fn dynamic_loop<W: Workload>(
    w: &mut W,
    client: &mut ShardedClient,
    job: &JobConfig,
    id: WorkerId,
    first: u64,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    if first > 0 {
        return Err(crate::error::Error::Config(
            "data = \"dynamic\" cannot resume: the data queue is not part of a checkpoint".into(),
        ));
    }
    let mut batches = Batches::for_rows(w.train_rows(), job.batch_size, job.seed);
    let per_epoch = batches.num_batches() as u64;
    let plan = ps_common::wire::pb::DataPlan {
        epochs: job.epochs,
        batches_per_epoch: per_epoch,
        range_batches: job.range_batches,
    };
    let lease = Duration::from_millis(job.lease_ms);
    // The Start event shows an even share; the queue decides the real one.
    let mut d = Driver::new(job, id.index, per_epoch.div_ceil(id.count as u64), first, reporter);
    d.total_iters = job.max_iters.unwrap_or(u64::MAX);
    let (mut done, mut member) = (Vec::<DataRange>::new(), true);
    let mut epoch: Option<u32> = None;
    loop {
        let taken = client.take_range(plan, &done, lease).await?;
        done.clear();
        let Some(range) = taken.range else {
            if taken.finished {
                break;
            }
            if member {
                client.leave().await?;
                member = false;
            }
            tokio::time::sleep(QUEUE_POLL).await;
            continue;
        };
        if !member {
            Session::recover(client, job, d.clock).await?;
            member = true;
        }
        if epoch != Some(range.epoch) {
            if let Some(e) = epoch
                && d.should_eval(e)
            {
                let s = w.evaluate(client, d.clock).await?;
                d.eval(e, s.loss, s.score);
            }
            batches.shuffle(u64::from(range.epoch));
            epoch = Some(range.epoch);
        }
        for batch in range.start..range.end {
            if d.finished() {
                break;
            }
            let rows = batches.batch(batch as usize);
            let it = Iteration { epoch: range.epoch, batch, clock: d.clock, rows, last: false, next: None };
            step(w, client, job, &mut d, it).await?;
        }
        if d.finished() {
            // The iteration budget (max_iters) ends this worker; its range
            // goes back to the queue when its lease runs out.
            break;
        }
        done.push(range);
    }
    if !done.is_empty() {
        client.take_range(plan, &done, lease).await?;
    }
    if let Some(e) = epoch
        && d.should_eval(e)
    {
        let s = w.evaluate(client, d.clock).await?;
        d.eval(e, s.loss, s.score);
    }
    d.done(client);
    Ok(())
}

/// Batches of worker `id` over `rows`, shuffled per epoch with the seed
/// `job.seed ^ (id.index << 32)`.
pub fn worker_batches(job: &JobConfig, id: WorkerId, rows: Range<usize>) -> Batches {
    Batches::for_rows(rows, job.batch_size, job.seed ^ ((id.index as u64) << 32))
}

/// The result of evaluating a trained job on its test set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    /// Accuracy for classifiers, RMSE for regression, AUC for CTR.
    pub score: f64,
    pub score_name: &'static str,
    /// The model, where the workload can save it.
    pub model: Option<SavedModel>,
}

/// Reads the trained parameters of `job` from `servers`, scores them on the
/// test set and saves the model.
pub async fn evaluate_job(job: &JobConfig, servers: &[String]) -> Result<Evaluation> {
    match &job.workload {
        Kind::MnistMlp { .. } => evaluate_as::<Mnist>(job, servers).await,
        Kind::A9aLogreg { .. } => evaluate_as::<Logreg>(job, servers).await,
        Kind::MovielensMf { .. } => evaluate_as::<Mf>(job, servers).await,
        Kind::Ctr { .. } => evaluate_as::<Ctr>(job, servers).await,
    }
}

async fn evaluate_as<W: Workload>(job: &JobConfig, servers: &[String]) -> Result<Evaluation> {
    let client = session::evaluator(job, servers).await?;
    let mut w = W::open(job, Role::Evaluate, client.num_shards())?;
    let score = w.evaluate(&client, 0).await?;
    let model = w.save(&client).await?;
    Ok(Evaluation { loss: score.loss, score: score.score, score_name: W::SCORE_NAME, model })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Whole jobs in one process: in-process shards, workers as tasks.

    use std::sync::{Arc, Mutex};

    use crate::config::JobConfig;
    use crate::event::Event;
    use crate::session::WorkerId;

    /// Runs `workers` workers of `job` concurrently (as `train::run` does in
    /// each worker process) and collects their events.
    pub async fn train(job: &JobConfig, addrs: &[String], workers: usize) -> Vec<Event> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..workers)
            .map(|index| {
                let (job, addrs, events) = (job.clone(), addrs.to_vec(), events.clone());
                tokio::spawn(async move {
                    let mut sink = |e| events.lock().unwrap().push(e);
                    super::run(&job, &addrs, WorkerId { index, count: workers }, &mut sink).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("worker panicked").expect("worker failed");
        }
        Arc::try_unwrap(events).unwrap().into_inner().unwrap()
    }

    /// Worker 0's training loss in its first progress event (one batch at
    /// the start, with `progress_every_ms = 0`) and the mean over the last
    /// fifth of its events.
    pub fn first_and_last_loss(events: &[Event]) -> (f64, f64) {
        let losses: Vec<f64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Progress { worker: 0, loss, .. } => Some(*loss),
                _ => None,
            })
            .collect();
        assert!(!losses.is_empty(), "no progress events");
        let n = (losses.len() / 5).max(1);
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        (losses[0], mean(&losses[losses.len() - n..]))
    }
}

#[cfg(test)]
mod tests {
    //! Each sparse workload trained end to end by the one loop, on two
    //! in-process shards and two workers. (MNIST is trained the same way by
    //! the integration tests, `tests/it/`.)

    use std::path::PathBuf;

    use ps_server::local::LocalShards;

    use super::testing::{first_and_last_loss, train};
    use super::*;
    use crate::workload::logreg::{self, TABLE};
    use crate::workload::mf::{ITEM_BIAS, USERS};

    fn a9a(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/a9a").join(file)
    }

    /// Two shards, two workers, one epoch of Adagrad (255 iterations each):
    /// the training loss falls well below ln 2 and the test accuracy beats
    /// the majority class (76.4% of the a9a test set is negative) clearly.
    /// The saved model scores the same as the evaluation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_learn_a9a_in_one_epoch() {
        let text = format!(
            r#"
            epochs = 1
            batch_size = 64
            progress_every_ms = 0
            eval_every_epochs = 0
            optimizer = {{ rule = "adagrad", lr = 0.1 }}
            workload = {{ kind = "a9a_logreg", train = {:?}, test = {:?} }}
            "#,
            a9a("a9a.gz"),
            a9a("a9a.t.gz")
        );
        let job: JobConfig = toml::from_str(&text).unwrap();
        let shards = LocalShards::start(2).await.expect("start shards");
        let events = train(&job, &shards.addrs, 2).await;
        // Zero weights start at ln 2; the other worker may be well ahead by
        // the time worker 0 reports, so compare with that, not its first batch.
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate_job(&job, &shards.addrs).await.unwrap();
        eprintln!("training loss {first} -> {last}; evaluation {evaluation:?}");
        assert!(last < 0.6 * std::f64::consts::LN_2, "training loss {first} -> {last}");
        assert!(evaluation.score > 0.80, "test accuracy {}, log loss {}", evaluation.score, evaluation.loss);

        let model = evaluation.model.as_ref().expect("a9a saves its weights");
        assert_eq!(
            &SavedModel::from_bytes(&model.to_bytes().unwrap()).unwrap(),
            model,
            "the file reads back"
        );
        let table = model.sparse(TABLE).expect("the weight table");
        assert_eq!(table.keys, (0..=123).collect::<Vec<u64>>());
        let test = crate::data::load_libsvm(&a9a("a9a.t.gz"), Some(123)).unwrap();
        let rescored = logreg::score(&table.values, &test);
        assert!((rescored.score - evaluation.score).abs() < 1e-12, "{rescored:?} vs {evaluation:?}");
        shards.stop().await.expect("stop shards");
    }

    /// Two shards, two workers, a few epochs on u1 (about 600 iterations per
    /// worker): the training loss falls and the test RMSE beats predicting
    /// the global mean (1.154 on u1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_factorize_movielens() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/ml-100k");
        if !dir.is_dir() {
            eprintln!("skipping: MovieLens not found at {} (it is not part of the project)", dir.display());
            return;
        }
        let text = format!(
            r#"
            epochs = 4
            batch_size = 256
            progress_every_ms = 0
            eval_every_epochs = 0
            optimizer = {{ rule = "adam", lr = 0.01 }}
            workload = {{ kind = "movielens_mf", data_dir = {dir:?}, dim = 16, reg = 0.05 }}
            "#
        );
        let job: JobConfig = toml::from_str(&text).unwrap();
        let shards = LocalShards::start(2).await.expect("start shards");
        let events = train(&job, &shards.addrs, 2).await;
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate_job(&job, &shards.addrs).await.unwrap();
        eprintln!("training loss {first} -> {last}; RMSE {}", evaluation.score);
        assert!(last < first * 0.8, "training loss {first} -> {last}");
        assert!(evaluation.score < 1.0, "test RMSE {}", evaluation.score);
        let model = evaluation.model.as_ref().expect("MF saves its rows");
        assert_eq!(
            &SavedModel::from_bytes(&model.to_bytes().unwrap()).unwrap(),
            model,
            "the file reads back"
        );
        // u1.base: 943 users and 1650 items.
        assert_eq!(model.sparse(USERS).map(|t| (t.keys.len(), t.dim)), Some((943, 16)));
        assert_eq!(model.sparse(ITEM_BIAS).map(|t| (t.keys.len(), t.dim)), Some((1650, 1)));
        shards.stop().await.expect("stop shards");
    }
    /// Two shards, two workers, ~240 iterations each: the training loss
    /// falls and the test AUC is clearly above chance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_learn_ctr() {
        let j: JobConfig = toml::from_str(crate::workload::ctr::SMALL_JOB).unwrap();
        let shards = LocalShards::start(2).await.expect("start shards");
        let events = train(&j, &shards.addrs, 2).await;
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate_job(&j, &shards.addrs).await.unwrap();
        eprintln!("training loss {first} -> {last}; test AUC {}", evaluation.score);
        assert!(last < first - 0.02, "training loss {first} -> {last}");
        assert!(evaluation.score > 0.65, "test AUC {}, log loss {}", evaluation.score, evaluation.loss);

        // The saved model holds every embedding row the shards hold, with
        // their values, and reads back from its bytes.
        let model = evaluation.model.expect("CTR saves its model");
        let model = SavedModel::from_bytes(&model.to_bytes().unwrap()).unwrap();
        let emb = model.sparse(crate::workload::ctr::EMBEDDINGS).expect("embeddings");
        let client = session::evaluator(&j, &shards.addrs).await.unwrap();
        let rows: u64 = client.stats().await.unwrap().iter().map(|s| s.sparse_rows).sum();
        assert_eq!(emb.keys.len() as u64, rows, "every row that exists, once");
        let sample: Vec<u64> = emb.keys.iter().step_by(97).copied().collect();
        let mut live = vec![0.0f32; sample.len() * emb.dim];
        client.lookup_sparse(&emb.name, emb.dim, &sample, 0, &mut live).await.unwrap();
        let saved: Vec<f32> = (emb.keys.iter().zip(emb.values.chunks(emb.dim)))
            .step_by(97)
            .flat_map(|(_, row)| row.iter().copied())
            .collect();
        assert_eq!(saved, live, "the saved rows are the shards' rows");
        shards.stop().await.expect("stop shards");
    }

    /// The same CTR job with int8 embedding gradients (error feedback) and
    /// bf16 pulls of every table still learns, and every worker reports the
    /// bytes it moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ctr_learns_with_int8_embedding_gradients_and_bf16_pulls() {
        let text = format!(
            "{}\n[codecs]\npull = {{ codec = \"bf16\" }}\n[codecs.tables.\"{}\"]\npush = {{ codec = \"int8\" }}\n",
            crate::workload::ctr::SMALL_JOB,
            crate::workload::ctr::EMBEDDINGS
        );
        let j: JobConfig = toml::from_str(&text).unwrap();
        assert_eq!(j.codecs.describe(), "push f32, pull bf16; ctr.emb: push int8");
        let shards = LocalShards::start(2).await.expect("start shards");
        let events = train(&j, &shards.addrs, 2).await;
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate_job(&j, &shards.addrs).await.unwrap();
        eprintln!("int8 embeddings: training loss {first} -> {last}; test AUC {}", evaluation.score);
        assert!(last < first - 0.02, "training loss {first} -> {last}");
        assert!(evaluation.score > 0.65, "test AUC {}", evaluation.score);
        let done: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                crate::event::Event::Done(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(done.len(), 2);
        for d in &done {
            assert!(d.bytes_pushed > 0 && d.bytes_pulled > 0, "{d:?}");
        }
        shards.stop().await.expect("stop shards");
    }
}
