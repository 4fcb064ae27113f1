//! Biased matrix factorization on MovieLens 100k (Koren, Bell & Volinsky,
//! "Matrix Factorization Techniques for Recommender Systems", 2009):
//!
//! ```text
//! r̂(u, i) = μ + b_u + b_i + p_u · q_i
//! loss    = mean over the batch of (r − r̂)² + λ(‖p_u‖² + ‖q_i‖² + b_u² + b_i²)
//! ```
//!
//! `p` and `q` live in the sparse tables `mf.user` and `mf.item` (width k,
//! normal initial values), the biases in `mf.user_bias` and `mf.item_bias`
//! (width 1, zeros), keyed by the ids of the file. The global mean μ is not a
//! parameter: every worker computes it from the whole training file, so all
//! agree. The penalty is on the rows a batch touches, once per rating, as in
//! per-rating SGD. Predictions are clipped to [1, 5] for evaluation only;
//! the score is the test RMSE. In progress events "acc" is the training MSE.
//!
//! MovieLens may not be copied into the project: `data_dir` points at a copy
//! outside it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ps_common::spec::{Init, InitKind, TableSpec};

use super::Session;
use crate::client::ShardedClient;
use crate::config::{JobConfig, Workload};
use crate::data::{Batches, Rating, load_ratings, shard_range};
use crate::error::{Error, Result};
use crate::train::{Driver, Marks, Reporter, WorkerId};

pub const USERS: &str = "mf.user";
pub const ITEMS: &str = "mf.item";
pub const USER_BIAS: &str = "mf.user_bias";
pub const ITEM_BIAS: &str = "mf.item_bias";

/// The settings of an MF job.
#[derive(Debug, Clone)]
struct Setup {
    data_dir: PathBuf,
    split: String,
    k: usize,
    reg: f32,
    init_std: f32,
}

fn setup(job: &JobConfig) -> Result<Setup> {
    match &job.workload {
        Workload::MovielensMf { data_dir, split, dim, reg, init_std } => Ok(Setup {
            data_dir: data_dir.clone(),
            split: split.clone(),
            k: *dim as usize,
            reg: *reg,
            init_std: *init_std,
        }),
        other => Err(Error::Config(format!("not a movielens_mf job: {other:?}"))),
    }
}

/// The four tables, in the order they are pushed (the bias of items last).
pub fn tables(job: &JobConfig) -> Result<Vec<TableSpec>> {
    let s = setup(job)?;
    let factors = |i: u64| Init {
        kind: InitKind::Normal { mean: 0.0, std: s.init_std },
        seed: job.seed.wrapping_add(i),
    };
    let zeros = Init { seed: job.seed, ..Init::zeros() };
    let k = s.k as u32;
    Ok(vec![
        TableSpec::sparse(USERS, k, factors(0), job.optimizer),
        TableSpec::sparse(ITEMS, k, factors(1), job.optimizer),
        TableSpec::sparse(USER_BIAS, 1, zeros, job.optimizer),
        TableSpec::sparse(ITEM_BIAS, 1, zeros, job.optimizer),
    ])
}

/// `{split}.{part}.gz` or `{split}.{part}` in `dir`.
fn find(dir: &Path, split: &str, part: &str) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::Config(format!("MovieLens not found at {}; pass data_dir", dir.display())));
    }
    let gz = dir.join(format!("{split}.{part}.gz"));
    let plain = dir.join(format!("{split}.{part}"));
    [gz, plain].into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Config(format!("{split}.{part}(.gz) not found in {}; pass data_dir and split", dir.display()))
    })
}

/// The rows one batch touches, one per rating: keys, and row values (or,
/// with the same layout, row gradients).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub users: Vec<u64>,
    pub items: Vec<u64>,
    pub ratings: Vec<f32>,
}

impl Batch {
    pub fn fill(&mut self, ratings: &[Rating], rows: impl IntoIterator<Item = usize>) {
        self.users.clear();
        self.items.clear();
        self.ratings.clear();
        for r in rows {
            let r = ratings[r];
            self.users.push(u64::from(r.user));
            self.items.push(u64::from(r.item));
            self.ratings.push(r.rating);
        }
    }

    pub fn len(&self) -> usize {
        self.ratings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ratings.is_empty()
    }
}

/// Per-rating rows: `p` and `q` are `len x k`, the biases `len`.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub p: Vec<f32>,
    pub q: Vec<f32>,
    pub bu: Vec<f32>,
    pub bi: Vec<f32>,
}

impl Rows {
    fn resize(&mut self, n: usize, k: usize) {
        self.p.resize(n * k, 0.0);
        self.q.resize(n * k, 0.0);
        self.bu.resize(n, 0.0);
        self.bi.resize(n, 0.0);
    }
}

/// The prediction `μ + b_u + b_i + p·q` of one rating, unclipped.
fn predict(mu: f32, p: &[f32], q: &[f32], bu: f32, bi: f32) -> f32 {
    mu + bu + bi + p.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()
}

/// The batch objective (see the module docs) of rows `v`; overwrites `g`
/// with its gradient per rating (the gradient of a key is the sum over its
/// ratings). Returns the objective and the sum of squared errors.
pub fn loss_and_grad(batch: &Batch, k: usize, mu: f32, reg: f32, v: &Rows, g: &mut Rows) -> (f32, f64) {
    g.resize(batch.len(), k);
    if batch.is_empty() {
        return (0.0, 0.0);
    }
    let scale = 1.0 / batch.len() as f32;
    let (mut obj, mut sse) = (0.0f64, 0.0f64);
    for (j, &r) in batch.ratings.iter().enumerate() {
        let rows = j * k..(j + 1) * k;
        let (p, q) = (&v.p[rows.clone()], &v.q[rows.clone()]);
        let (bu, bi) = (v.bu[j], v.bi[j]);
        let e = r - predict(mu, p, q, bu, bi);
        let norms = p.iter().chain(q).map(|x| x * x).sum::<f32>() + bu * bu + bi * bi;
        sse += f64::from(e * e);
        obj += f64::from(e * e + reg * norms);
        // d/dp of (e² + λ‖p‖²) with e = r − (… + p·q): −2e·q + 2λ·p.
        let (two_e, two_reg) = (2.0 * e * scale, 2.0 * reg * scale);
        for (((gp, gq), &pv), &qv) in g.p[rows.clone()].iter_mut().zip(&mut g.q[rows]).zip(p).zip(q) {
            *gp = -two_e * qv + two_reg * pv;
            *gq = -two_e * pv + two_reg * qv;
        }
        g.bu[j] = -two_e + two_reg * bu;
        g.bi[j] = -two_e + two_reg * bi;
    }
    ((obj * f64::from(scale)) as f32, sse)
}

/// The mean of the ratings (0 for none).
pub fn global_mean(ratings: &[Rating]) -> f32 {
    (ratings.iter().map(|r| f64::from(r.rating)).sum::<f64>() / ratings.len().max(1) as f64) as f32
}

/// Pulls the rows of every user and item of `test` (reading at `clock`);
/// returns (MSE, RMSE) of the clipped predictions.
async fn eval_on(
    client: &ShardedClient,
    clock: u64,
    k: usize,
    mu: f32,
    test: &[Rating],
) -> Result<(f64, f64)> {
    let mut batch = Batch::default();
    batch.fill(test, 0..test.len());
    let mut v = Rows::default();
    v.resize(batch.len(), k);
    let Rows { p, q, bu, bi } = &mut v;
    tokio::try_join!(
        client.lookup_sparse(USERS, k, &batch.users, clock, p),
        client.lookup_sparse(ITEMS, k, &batch.items, clock, q),
        client.lookup_sparse(USER_BIAS, 1, &batch.users, clock, bu),
        client.lookup_sparse(ITEM_BIAS, 1, &batch.items, clock, bi),
    )?;
    let mut sse = 0.0f64;
    for (j, &r) in batch.ratings.iter().enumerate() {
        let rows = j * k..(j + 1) * k;
        let pred = predict(mu, &v.p[rows.clone()], &v.q[rows], v.bu[j], v.bi[j]).clamp(1.0, 5.0);
        sse += f64::from((r - pred) * (r - pred));
    }
    let mse = sse / test.len().max(1) as f64;
    Ok((mse, mse.sqrt()))
}

/// Loads the training ratings (limited by `train_limit`) and the test ratings.
fn load(job: &JobConfig, s: &Setup) -> Result<(Vec<Rating>, Vec<Rating>)> {
    let mut train = load_ratings(&find(&s.data_dir, &s.split, "base")?)?;
    if let Some(n) = job.train_limit {
        train.truncate(n);
    }
    let test = load_ratings(&find(&s.data_dir, &s.split, "test")?)?;
    Ok((train, test))
}

/// Pulls the trained rows and returns (test MSE, test RMSE).
pub async fn evaluate(job: &JobConfig, servers: &[String]) -> Result<(f64, f64)> {
    let s = setup(job)?;
    let (train, test) = load(job, &s)?;
    let client = super::evaluator(servers).await?;
    eval_on(&client, 0, s.k, global_mean(&train), &test).await
}

/// Trains one worker on its contiguous block of the training ratings.
pub async fn run(
    job: &JobConfig,
    servers: &[String],
    id: WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    job.validate()?;
    let s = setup(job)?;
    let (train, test) = load(job, &s)?;
    let rows = shard_range(train.len(), id.index, id.count)?;
    let mut session = Session::open(job, servers, &id, &tables(job)?).await?;
    let result = train_loop(job, &s, &mut session.client, &train, rows, &test, &id, reporter).await;
    session.close(result).await
}

#[allow(clippy::too_many_arguments)]
async fn train_loop(
    job: &JobConfig,
    s: &Setup,
    client: &mut ShardedClient,
    train: &[Rating],
    rows: std::ops::Range<usize>,
    test: &[Rating],
    id: &WorkerId,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let (k, mu) = (s.k, global_mean(train));
    let mut batches = Batches::for_rows(rows, job.batch_size, job.seed ^ ((id.index as u64) << 32));
    let mut d = Driver::new(job, id.index, batches.num_batches() as u64, reporter);
    let mut batch = Batch::default();
    let (mut v, mut g) = (Rows::default(), Rows::default());
    'epochs: for epoch in 0..job.epochs {
        for rows in batches.epoch(u64::from(epoch)) {
            if d.finished() {
                break 'epochs;
            }
            let clock = d.clock;
            let start = Instant::now();
            batch.fill(train, rows.iter().copied());
            v.resize(batch.len(), k);
            {
                let Rows { p, q, bu, bi } = &mut v;
                let c = &*client;
                tokio::try_join!(
                    c.pull_sparse(USERS, k, &batch.users, clock, p),
                    c.pull_sparse(ITEMS, k, &batch.items, clock, q),
                    c.pull_sparse(USER_BIAS, 1, &batch.users, clock, bu),
                    c.pull_sparse(ITEM_BIAS, 1, &batch.items, clock, bi),
                )?;
            }
            let pulled = Instant::now();
            let (loss, sse) = loss_and_grad(&batch, k, mu, s.reg, &v, &mut g);
            let computed = Instant::now();
            if loss.is_finite() {
                client.push_sparse(USERS, k, &batch.users, &g.p, clock, clock, false).await?;
                client.push_sparse(ITEMS, k, &batch.items, &g.q, clock, clock, false).await?;
                client.push_sparse(USER_BIAS, 1, &batch.users, &g.bu, clock, clock, false).await?;
                // The last push of the iteration ticks every shard.
                client.push_sparse(ITEM_BIAS, 1, &batch.items, &g.bi, clock, clock, true).await?;
            }
            let marks = Marks { start, pulled, computed, pushed: Instant::now() };
            d.end_iteration(epoch, marks, rows.len(), loss, sse).await?;
        }
        if d.should_eval(epoch) {
            let (mse, rmse) = eval_on(client, d.clock, k, mu, test).await?;
            d.eval(epoch, mse, rmse);
        }
    }
    d.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::sparse::test_util::{Shards, first_and_last_loss, train as train_workers};

    #[test]
    fn gradient_matches_finite_differences() {
        let k = 3;
        // User 1 rates twice, item 7 is rated twice: repeated keys.
        let ratings =
            [(1, 7, 4.0), (2, 7, 2.0), (1, 9, 5.0)].map(|(user, item, rating)| Rating { user, item, rating });
        let mut batch = Batch::default();
        batch.fill(&ratings, 0..3);
        let (mu, reg) = (3.5, 0.1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Dense parameters: users 0..3, items 0..10, each [p/q (k), bias].
        let mut users: Vec<f32> = (0..3 * (k + 1)).map(|_| rng.random_range(-0.7..0.7)).collect();
        let mut items: Vec<f32> = (0..10 * (k + 1)).map(|_| rng.random_range(-0.7..0.7)).collect();
        let gather = |users: &[f32], items: &[f32]| {
            let mut v = Rows::default();
            for (&u, &i) in batch.users.iter().zip(&batch.items) {
                let (u, i) = (u as usize * (k + 1), i as usize * (k + 1));
                v.p.extend_from_slice(&users[u..u + k]);
                v.q.extend_from_slice(&items[i..i + k]);
                v.bu.push(users[u + k]);
                v.bi.push(items[i + k]);
            }
            v
        };
        let objective = |users: &[f32], items: &[f32]| {
            f64::from(loss_and_grad(&batch, k, mu, reg, &gather(users, items), &mut Rows::default()).0)
        };
        let mut g = Rows::default();
        loss_and_grad(&batch, k, mu, reg, &gather(&users, &items), &mut g);
        // Sum the per-rating gradients into dense ones.
        let (mut gu, mut gi) = (vec![0.0f32; users.len()], vec![0.0f32; items.len()]);
        for (j, (&u, &i)) in batch.users.iter().zip(&batch.items).enumerate() {
            let (u, i) = (u as usize * (k + 1), i as usize * (k + 1));
            for c in 0..k {
                gu[u + c] += g.p[j * k + c];
                gi[i + c] += g.q[j * k + c];
            }
            gu[u + k] += g.bu[j];
            gi[i + k] += g.bi[j];
        }
        let h = 1e-2f32;
        for (which, n) in [(0, users.len()), (1, items.len())] {
            for e in 0..n {
                let params = if which == 0 { &mut users } else { &mut items };
                let keep = params[e];
                params[e] = keep + h;
                let up = objective(&users, &items);
                let params = if which == 0 { &mut users } else { &mut items };
                params[e] = keep - h;
                let down = objective(&users, &items);
                let params = if which == 0 { &mut users } else { &mut items };
                params[e] = keep;
                let numeric = (up - down) / (2.0 * f64::from(h));
                let analytic = if which == 0 { gu[e] } else { gi[e] };
                assert!(
                    (numeric - f64::from(analytic)).abs() < 1e-3 * (1.0 + numeric.abs()),
                    "{} element {e}: numeric {numeric}, analytic {analytic}",
                    ["user", "item"][which]
                );
            }
        }
    }

    #[test]
    fn a_missing_data_dir_is_named() {
        let err = find(Path::new("/nonexistent/ml-100k"), "u1", "base").unwrap_err().to_string();
        assert!(err.contains("MovieLens not found at /nonexistent/ml-100k; pass data_dir"), "{err}");
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
        let shards = Shards::start(2).await;
        let events = train_workers(&job, &shards.addrs, 2).await;
        let (first, last) = first_and_last_loss(&events);
        let evaluation = evaluate(&job, &shards.addrs).await.unwrap();
        let (_, rmse) = evaluation;
        eprintln!("training loss {first} -> {last}; evaluation {evaluation:?}");
        assert!(last < first * 0.8, "training loss {first} -> {last}");
        assert!(rmse < 1.0, "test RMSE {rmse}");
        shards.stop().await;
    }
}
