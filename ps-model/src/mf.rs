//! Biased matrix factorization (Koren, Bell & Volinsky, 2009): the rating of
//! user `u` for item `i` is predicted as `μ + b_u + b_i + p_u · q_i`, with
//! `μ` the global mean of the training ratings.
//!
//! The batch objective is the mean over its ratings of
//! `e² + λ (‖p_u‖² + ‖q_i‖² + b_u² + b_i²)` with `e` the error, so
//! regularization acts on the rows a batch touches, as in the usual SGD form.

/// The rows one batch touches, one per rating: keys and targets.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub users: Vec<u64>,
    pub items: Vec<u64>,
    pub ratings: Vec<f32>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.users.clear();
        self.items.clear();
        self.ratings.clear();
    }

    pub fn push(&mut self, user: u32, item: u32, rating: f32) {
        self.users.push(u64::from(user));
        self.items.push(u64::from(item));
        self.ratings.push(rating);
    }

    pub fn len(&self) -> usize {
        self.ratings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ratings.is_empty()
    }
}

/// Per-rating rows: `p` and `q` are `len x k`, the biases `len`. The same
/// layout holds row values and row gradients.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub p: Vec<f32>,
    pub q: Vec<f32>,
    pub bu: Vec<f32>,
    pub bi: Vec<f32>,
}

impl Rows {
    pub fn resize(&mut self, n: usize, k: usize) {
        self.p.resize(n * k, 0.0);
        self.q.resize(n * k, 0.0);
        self.bu.resize(n, 0.0);
        self.bi.resize(n, 0.0);
    }
}

/// The prediction `μ + b_u + b_i + p·q` of one rating, unclipped.
pub fn predict(mu: f32, p: &[f32], q: &[f32], bu: f32, bi: f32) -> f32 {
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

/// The mean of `ratings` (0 for none).
pub fn global_mean(ratings: impl ExactSizeIterator<Item = f32>) -> f32 {
    let n = ratings.len().max(1) as f64;
    (ratings.map(f64::from).sum::<f64>() / n) as f32
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let k = 3;
        // User 1 rates twice, item 7 is rated twice: repeated keys.
        let mut batch = Batch::default();
        for (user, item, rating) in [(1, 7, 4.0), (2, 7, 2.0), (1, 9, 5.0)] {
            batch.push(user, item, rating);
        }
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
        for which in 0..2 {
            let n = if which == 0 { users.len() } else { items.len() };
            for e in 0..n {
                let nudge = |users: &mut Vec<f32>, items: &mut Vec<f32>, v: f32| {
                    if which == 0 { users[e] = v } else { items[e] = v }
                };
                let keep = if which == 0 { users[e] } else { items[e] };
                nudge(&mut users, &mut items, keep + h);
                let up = objective(&users, &items);
                nudge(&mut users, &mut items, keep - h);
                let down = objective(&users, &items);
                nudge(&mut users, &mut items, keep);
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
    fn global_mean_of_nothing_is_zero() {
        assert_eq!(global_mean([1.0f32, 2.0, 6.0].into_iter()), 3.0);
        assert_eq!(global_mean(std::iter::empty()), 0.0);
    }
}
