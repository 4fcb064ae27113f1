//! Sparse logistic regression on a9a (LIBSVM, 123 binary features).
//!
//! The model is one sparse table `a9a.w` of width 1: key `j < num_features`
//! holds the weight of feature `j`, key `num_features` the bias. A batch
//! pulls the weights of the features its rows use (the bias once per row),
//! computes the mean binary cross-entropy with logits, and pushes one
//! gradient per occurrence; the client sums the occurrences of a key. Only
//! touched rows move, which is what makes FTRL and lazy Adam apply.

use std::path::Path;
use std::time::Instant;

use ps_common::spec::{Init, TableSpec};

use super::{Session, bce_with_logits};
use crate::client::ShardedClient;
use crate::config::{JobConfig, Workload};
use crate::data::{Batches, SparseDataset, load_libsvm, shard_range};
use crate::error::{Error, Result};
use crate::train::{Driver, Marks, Reporter, WorkerId};

/// The weight table.
pub const TABLE: &str = "a9a.w";

/// The table as every worker registers it: zeros, the job's rule.
pub fn table(job: &JobConfig) -> TableSpec {
    TableSpec::sparse(TABLE, 1, Init { seed: job.seed, ..Init::zeros() }, job.optimizer)
}

fn params(job: &JobConfig) -> Result<(&Path, &Path, usize)> {
    match &job.workload {
        Workload::A9aLogreg { train, test, num_features } => Ok((train, test, *num_features)),
        other => Err(Error::Config(format!("not an a9a_logreg job: {other:?}"))),
    }
}

/// Rows of a data set laid out for the table: each row's feature keys, then
/// the bias key with value 1.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub keys: Vec<u64>,
    pub vals: Vec<f32>,
    /// Row `i` owns occurrences `ptr[i]..ptr[i + 1]`.
    pub ptr: Vec<usize>,
    pub labels: Vec<f32>,
}

impl Batch {
    /// Replaces the contents with `rows` of `data`, reusing the buffers.
    pub fn fill(&mut self, data: &SparseDataset, rows: impl IntoIterator<Item = usize>) {
        self.keys.clear();
        self.vals.clear();
        self.labels.clear();
        self.ptr.clear();
        self.ptr.push(0);
        let bias = data.num_features as u64;
        for r in rows {
            let (idx, val) = data.row(r);
            self.keys.extend(idx.iter().map(|&i| u64::from(i)));
            self.vals.extend_from_slice(val);
            self.keys.push(bias);
            self.vals.push(1.0);
            self.ptr.push(self.keys.len());
            self.labels.push(data.labels[r]);
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Mean binary cross-entropy of `batch` whose occurrence `j` has weight
/// `w[j]`. Overwrites `grad[j]` with d(mean loss)/d(w[j]); the gradient of a
/// key is the sum over its occurrences. Returns the mean loss and the number
/// of rows classified right (`logit > 0` predicts 1).
pub fn loss_and_grad(batch: &Batch, w: &[f32], grad: &mut [f32]) -> (f32, usize) {
    debug_assert_eq!(w.len(), batch.keys.len());
    debug_assert_eq!(grad.len(), batch.keys.len());
    if batch.is_empty() {
        return (0.0, 0);
    }
    let scale = 1.0 / batch.len() as f32;
    let (mut loss, mut correct) = (0.0f64, 0);
    for (i, &y) in batch.labels.iter().enumerate() {
        let occ = batch.ptr[i]..batch.ptr[i + 1];
        let z: f32 = w[occ.clone()].iter().zip(&batch.vals[occ.clone()]).map(|(w, x)| w * x).sum();
        let (l, dz) = bce_with_logits(z, y);
        loss += f64::from(l);
        correct += usize::from((z > 0.0) == (y > 0.5));
        for (g, &x) in grad[occ.clone()].iter_mut().zip(&batch.vals[occ]) {
            *g = dz * scale * x;
        }
    }
    ((loss * f64::from(scale)) as f32, correct)
}

/// Mean log loss and accuracy of the dense weights `w` (bias last) on `data`.
pub fn score(w: &[f32], data: &SparseDataset) -> (f64, f64) {
    let bias = w[data.num_features];
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for i in 0..data.len() {
        let (idx, val) = data.row(i);
        let z = bias + idx.iter().zip(val).map(|(&j, &x)| w[j as usize] * x).sum::<f32>();
        let y = data.labels[i];
        loss += f64::from(bce_with_logits(z, y).0);
        correct += usize::from((z > 0.0) == (y > 0.5));
    }
    let n = data.len().max(1) as f64;
    (loss / n, correct as f64 / n)
}

/// Pulls every weight (reading at `clock`) and scores them on `test`.
async fn eval_on(client: &ShardedClient, clock: u64, test: &SparseDataset) -> Result<(f64, f64)> {
    let keys: Vec<u64> = (0..=test.num_features as u64).collect();
    let mut w = vec![0.0f32; keys.len()];
    client.lookup_sparse(TABLE, 1, &keys, clock, &mut w).await?;
    Ok(score(&w, test))
}

/// Pulls the trained weights and returns (test log loss, test accuracy).
pub async fn evaluate(job: &JobConfig, servers: &[String]) -> Result<(f64, f64)> {
    let (_, test, num_features) = params(job)?;
    let test = load_libsvm(test, Some(num_features))?;
    let client = super::evaluator(servers).await?;
    eval_on(&client, 0, &test).await
}

/// Trains one worker on its contiguous block of the training rows.
pub async fn run(
    job: &JobConfig,
    servers: &[String],
    id: WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    job.validate()?;
    let (train, test, num_features) = params(job)?;
    let train = load_libsvm(train, Some(num_features))?;
    let test = load_libsvm(test, Some(num_features))?;
    let used = job.train_limit.map_or(train.len(), |n| n.min(train.len()));
    let rows = shard_range(used, id.index, id.count)?;
    let mut session = Session::open(job, servers, &id, &[table(job)]).await?;
    let result = train_loop(job, &mut session.client, &train, rows, &test, &id, reporter).await;
    session.close(result).await
}

async fn train_loop(
    job: &JobConfig,
    client: &mut ShardedClient,
    train: &SparseDataset,
    rows: std::ops::Range<usize>,
    test: &SparseDataset,
    id: &WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let mut batches = Batches::for_rows(rows, job.batch_size, job.seed ^ ((id.index as u64) << 32));
    let mut d = Driver::new(job, id.index, batches.num_batches() as u64, reporter);
    let mut batch = Batch::default();
    let (mut w, mut grad) = (Vec::new(), Vec::new());
    'epochs: for epoch in 0..job.epochs {
        for rows in batches.epoch(u64::from(epoch)) {
            if d.finished() {
                break 'epochs;
            }
            let clock = d.clock;
            let start = Instant::now();
            batch.fill(train, rows.iter().copied());
            w.resize(batch.keys.len(), 0.0);
            grad.resize(batch.keys.len(), 0.0);
            client.pull_sparse(TABLE, 1, &batch.keys, clock, &mut w).await?;
            let pulled = Instant::now();
            let (loss, correct) = loss_and_grad(&batch, &w, &mut grad);
            let computed = Instant::now();
            if loss.is_finite() {
                client.push_sparse(TABLE, 1, &batch.keys, &grad, clock, clock, true).await?;
            }
            let marks = Marks { start, pulled, computed, pushed: Instant::now() };
            d.end_iteration(epoch, marks, rows.len(), loss, correct as f64).await?;
        }
        if d.should_eval(epoch) {
            let (loss, acc) = eval_on(client, d.clock, test).await?;
            d.eval(epoch, loss, acc);
        }
    }
    d.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::sparse::test_util::{Shards, first_and_last_loss, train as train_workers};

    /// A batch whose rows share features (so keys repeat) and the bias.
    fn toy() -> (SparseDataset, Batch) {
        let data = SparseDataset {
            indptr: vec![0, 3, 5, 6],
            indices: vec![0, 2, 3, 2, 3, 1],
            values: vec![1.0, 0.5, -2.0, 1.5, 1.0, 3.0],
            labels: vec![1.0, 0.0, 1.0],
            num_features: 4,
        };
        let mut batch = Batch::default();
        batch.fill(&data, [0, 1, 2, 1]);
        (data, batch)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (data, batch) = toy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut theta: Vec<f32> = (0..=data.num_features).map(|_| rng.random_range(-1.0..1.0)).collect();
        let gather = |theta: &[f32]| batch.keys.iter().map(|&k| theta[k as usize]).collect::<Vec<f32>>();
        let mean_loss = |theta: &[f32]| {
            let mut g = vec![0.0; batch.keys.len()];
            f64::from(loss_and_grad(&batch, &gather(theta), &mut g).0)
        };
        let mut grad = vec![0.0; batch.keys.len()];
        loss_and_grad(&batch, &gather(&theta), &mut grad);
        let h = 1e-2;
        for k in 0..theta.len() {
            let analytic: f32 =
                batch.keys.iter().zip(&grad).filter(|&(&key, _)| key == k as u64).map(|(_, g)| g).sum();
            let keep = theta[k];
            theta[k] = keep + h;
            let up = mean_loss(&theta);
            theta[k] = keep - h;
            let down = mean_loss(&theta);
            theta[k] = keep;
            let numeric = (up - down) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(analytic)).abs() < 1e-3,
                "key {k}: numeric {numeric}, analytic {analytic}"
            );
        }
        // The dense scorer agrees with the batch loss on the same rows.
        let mut once = Batch::default();
        once.fill(&data, 0..3);
        let mut g = vec![0.0; once.keys.len()];
        let w: Vec<f32> = once.keys.iter().map(|&k| theta[k as usize]).collect();
        let (loss, correct) = loss_and_grad(&once, &w, &mut g);
        let (loss2, acc) = score(&theta, &data);
        assert!((f64::from(loss) - loss2).abs() < 1e-6 && (correct as f64 / 3.0 - acc).abs() < 1e-12);
    }

    fn a9a(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/a9a").join(file)
    }

    /// Two shards, two workers, one epoch of Adagrad (255 iterations each):
    /// the training loss falls well below ln 2 and the test accuracy beats
    /// the majority class (76.4% of the a9a test set is negative) clearly.
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
        let shards = Shards::start(2).await;
        let events = train_workers(&job, &shards.addrs, 2).await;
        // Zero weights start at ln 2; the other worker may be well ahead by
        // the time worker 0 reports, so compare with that, not its first batch.
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate(&job, &shards.addrs).await.unwrap();
        let (test_loss, acc) = evaluation;
        eprintln!("training loss {first} -> {last}; evaluation {evaluation:?}");
        assert!(last < 0.6 * std::f64::consts::LN_2, "training loss {first} -> {last}");
        assert!(acc > 0.80, "test accuracy {acc}, log loss {test_loss}");
        shards.stop().await;
    }
}
