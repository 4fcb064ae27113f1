//! Biased matrix factorization ([`ps_model::mf`]) on MovieLens 100k.
//!
//! `p` and `q` live in the sparse tables `mf.user` and `mf.item` (width k,
//! normal initial values), the biases in `mf.user_bias` and `mf.item_bias`
//! (width 1, zeros), keyed by the ids of the file. The global mean μ is not a
//! parameter: every worker computes it from the whole training file, so all
//! agree. Predictions are clipped to [1, 5] for evaluation only; the score is
//! the test RMSE. In progress events "acc" is the training MSE.
//!
//! MovieLens may not be copied into the project: `data_dir` points at a copy
//! outside it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ps_common::spec::{Init, InitKind, TableSpec};
use ps_model::mf::{self, Batch, Rows};
use ps_model::{ModelKind, SavedModel, SparseTable};

use super::{BatchLoss, Iteration, Role, Score, Workload, trainer, wrong_kind};
use crate::client::ShardedClient;
use crate::config::{JobConfig, Workload as Kind};
use crate::data::{Rating, load_ratings, shard_range};
use crate::error::{Error, Result};

pub const USERS: &str = "mf.user";
pub const ITEMS: &str = "mf.item";
pub const USER_BIAS: &str = "mf.user_bias";
pub const ITEM_BIAS: &str = "mf.item_bias";

pub struct Mf {
    tables: Vec<TableSpec>,
    k: usize,
    reg: f32,
    /// Global mean of the training ratings.
    mu: f32,
    /// The users and items of the training file: the rows training creates.
    users: Vec<u64>,
    items: Vec<u64>,
    test: Vec<Rating>,
    train: Option<Train>,
}

struct Train {
    ratings: Vec<Rating>,
    rows: Range<usize>,
    batch: Batch,
    values: Rows,
    grads: Rows,
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

/// Reads `keys`' rows of all four tables at `clock` into `v` (read-only:
/// missing rows read as their initial values).
async fn lookup(client: &ShardedClient, k: usize, batch: &Batch, clock: u64, v: &mut Rows) -> Result<()> {
    v.resize(batch.len(), k);
    let Rows { p, q, bu, bi } = v;
    tokio::try_join!(
        client.lookup_sparse(USERS, k, &batch.users, clock, p),
        client.lookup_sparse(ITEMS, k, &batch.items, clock, q),
        client.lookup_sparse(USER_BIAS, 1, &batch.users, clock, bu),
        client.lookup_sparse(ITEM_BIAS, 1, &batch.items, clock, bi),
    )?;
    Ok(())
}

impl Workload for Mf {
    const SCORE_NAME: &'static str = "rmse";

    fn open(job: &JobConfig, role: Role, _num_shards: u32) -> Result<Self> {
        let Kind::MovielensMf { data_dir, split, dim, reg, init_std } = &job.workload else {
            return Err(wrong_kind("movielens_mf", job));
        };
        let factors = |i: u64| Init {
            kind: InitKind::Normal { mean: 0.0, std: *init_std },
            seed: job.seed.wrapping_add(i),
        };
        let zeros = Init { seed: job.seed, ..Init::zeros() };
        // In push order: the item biases last, with the tick.
        let tables = vec![
            TableSpec::sparse(USERS, *dim, factors(0), job.optimizer),
            TableSpec::sparse(ITEMS, *dim, factors(1), job.optimizer),
            TableSpec::sparse(USER_BIAS, 1, zeros, job.optimizer),
            TableSpec::sparse(ITEM_BIAS, 1, zeros, job.optimizer),
        ];
        let mut ratings = load_ratings(&find(data_dir, split, "base")?)?;
        if let Some(n) = job.train_limit {
            ratings.truncate(n);
        }
        let test = load_ratings(&find(data_dir, split, "test")?)?;
        let mu = mf::global_mean(ratings.iter().map(|r| r.rating));
        let users: BTreeSet<u64> = ratings.iter().map(|r| u64::from(r.user)).collect();
        let items: BTreeSet<u64> = ratings.iter().map(|r| u64::from(r.item)).collect();
        let train = match role {
            Role::Train(id) => {
                let rows = shard_range(ratings.len(), id.index, id.count)?;
                Some(Train {
                    ratings,
                    rows,
                    batch: Batch::default(),
                    values: Rows::default(),
                    grads: Rows::default(),
                })
            }
            Role::Evaluate => None,
        };
        Ok(Mf {
            tables,
            k: *dim as usize,
            reg: *reg,
            mu,
            users: users.into_iter().collect(),
            items: items.into_iter().collect(),
            test,
            train,
        })
    }

    fn tables(&self) -> Vec<TableSpec> {
        self.tables.clone()
    }

    fn train_rows(&self) -> Range<usize> {
        self.train.as_ref().map_or(0..0, |t| t.rows.clone())
    }

    async fn pull(&mut self, client: &ShardedClient, it: Iteration<'_>) -> Result<()> {
        let k = self.k;
        let t = trainer(&mut self.train)?;
        t.batch.clear();
        for &r in it.rows {
            let r = t.ratings[r];
            t.batch.push(r.user, r.item, r.rating);
        }
        t.values.resize(t.batch.len(), k);
        let Rows { p, q, bu, bi } = &mut t.values;
        let batch = &t.batch;
        tokio::try_join!(
            client.pull_sparse(USERS, k, &batch.users, it.clock, p),
            client.pull_sparse(ITEMS, k, &batch.items, it.clock, q),
            client.pull_sparse(USER_BIAS, 1, &batch.users, it.clock, bu),
            client.pull_sparse(ITEM_BIAS, 1, &batch.items, it.clock, bi),
        )?;
        Ok(())
    }

    fn compute(&mut self) -> BatchLoss {
        let Some(t) = &mut self.train else { return BatchLoss { samples: 0, loss: f32::NAN, score: 0.0 } };
        let (loss, sse) = mf::loss_and_grad(&t.batch, self.k, self.mu, self.reg, &t.values, &mut t.grads);
        BatchLoss { samples: t.batch.len(), loss, score: sse }
    }

    async fn push(&mut self, client: &mut ShardedClient, it: Iteration<'_>) -> Result<()> {
        let k = self.k;
        let t = trainer(&mut self.train)?;
        let (b, g, c) = (&t.batch, &t.grads, it.clock);
        client.push_sparse(USERS, k, &b.users, &g.p, c, c, false).await?;
        client.push_sparse(ITEMS, k, &b.items, &g.q, c, c, false).await?;
        client.push_sparse(USER_BIAS, 1, &b.users, &g.bu, c, c, false).await?;
        // The last push of the iteration ticks every shard.
        client.push_sparse(ITEM_BIAS, 1, &b.items, &g.bi, c, c, true).await
    }

    async fn evaluate(&mut self, client: &ShardedClient, clock: u64) -> Result<Score> {
        let mut batch = Batch::default();
        for r in &self.test {
            batch.push(r.user, r.item, r.rating);
        }
        let mut v = Rows::default();
        lookup(client, self.k, &batch, clock, &mut v).await?;
        let k = self.k;
        let mut sse = 0.0f64;
        for (j, &r) in batch.ratings.iter().enumerate() {
            let rows = j * k..(j + 1) * k;
            let pred = mf::predict(self.mu, &v.p[rows.clone()], &v.q[rows], v.bu[j], v.bi[j]).clamp(1.0, 5.0);
            sse += f64::from((r - pred) * (r - pred));
        }
        let mse = sse / self.test.len().max(1) as f64;
        Ok(Score { loss: mse, score: mse.sqrt() })
    }

    /// The rows of every user and item of the training file.
    async fn save(&mut self, client: &ShardedClient) -> Result<Option<SavedModel>> {
        let k = self.k;
        let tables = &self.tables;
        let read = |name: &'static str, dim: usize, keys: Vec<u64>| async move {
            let mut values = vec![0.0f32; keys.len() * dim];
            client.lookup_sparse(name, dim, &keys, 0, &mut values).await?;
            let init = tables.iter().find(|t| t.name == name).map(|t| t.init);
            Ok::<_, Error>(SparseTable { name: name.into(), dim, keys, values, init })
        };
        let (users, items, user_bias, item_bias) = tokio::try_join!(
            read(USERS, k, self.users.clone()),
            read(ITEMS, k, self.items.clone()),
            read(USER_BIAS, 1, self.users.clone()),
            read(ITEM_BIAS, 1, self.items.clone()),
        )?;
        let model = ModelKind::Mf {
            dim: k,
            global_mean: self.mu,
            users: USERS.into(),
            items: ITEMS.into(),
            user_bias: USER_BIAS.into(),
            item_bias: ITEM_BIAS.into(),
        };
        Ok(Some(SavedModel::new(model, Vec::new(), vec![users, items, user_bias, item_bias])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_data_dir_is_named() {
        let err = find(Path::new("/nonexistent/ml-100k"), "u1", "base").unwrap_err().to_string();
        assert!(err.contains("MovieLens not found at /nonexistent/ml-100k; pass data_dir"), "{err}");
    }
}
