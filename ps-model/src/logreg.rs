//! Sparse logistic regression: one weight per feature plus a bias, the
//! probability of the positive class `sigmoid(b + Σ w_j x_j)`.
//!
//! In training the weights are rows of a width-1 sparse table (key `j` for
//! feature `j`, key `num_features` for the bias), so a batch is laid out by
//! occurrence: each row's feature keys, then the bias key with value 1. The
//! gradient is computed per occurrence; the client sums the occurrences of a
//! key before pushing.

use crate::loss::bce_with_logits;

/// Rows laid out by occurrence for the weight table: each row's feature keys,
/// then the bias key with value 1.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub keys: Vec<u64>,
    pub vals: Vec<f32>,
    /// Row `i` owns occurrences `ptr[i]..ptr[i + 1]`.
    pub ptr: Vec<usize>,
    pub labels: Vec<f32>,
}

impl Batch {
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.vals.clear();
        self.labels.clear();
        self.ptr.clear();
    }

    /// Appends one example: its features `(idx, val)`, its label, and the bias
    /// occurrence under key `bias`.
    pub fn push_row(&mut self, idx: &[u32], val: &[f32], label: f32, bias: u64) {
        if self.ptr.is_empty() {
            self.ptr.push(0);
        }
        self.keys.extend(idx.iter().map(|&i| u64::from(i)));
        self.vals.extend_from_slice(val);
        self.keys.push(bias);
        self.vals.push(1.0);
        self.ptr.push(self.keys.len());
        self.labels.push(label);
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

/// The logit of one example under the dense weights `w`: the feature
/// weights, then the bias last. A feature index past the weights reads as
/// weight 0, the table's initial value (a feature never seen in training).
pub fn logit(w: &[f32], idx: &[u32], val: &[f32]) -> f32 {
    let Some((&bias, weights)) = w.split_last() else { return 0.0 };
    bias + idx.iter().zip(val).map(|(&j, &x)| weights.get(j as usize).map_or(0.0, |w| w * x)).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Rows that share features (so keys repeat) and the bias; 4 features.
    fn toy() -> Batch {
        let rows: [(&[u32], &[f32], f32); 4] = [
            (&[0, 2, 3], &[1.0, 0.5, -2.0], 1.0),
            (&[2, 3], &[1.5, 1.0], 0.0),
            (&[1], &[3.0], 1.0),
            (&[2, 3], &[1.5, 1.0], 0.0),
        ];
        let mut batch = Batch::default();
        for (idx, val, y) in rows {
            batch.push_row(idx, val, y, 4);
        }
        batch
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let batch = toy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut theta: Vec<f32> = (0..5).map(|_| rng.random_range(-1.0..1.0)).collect();
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
    }

    #[test]
    fn logit_agrees_with_the_batch_and_reads_unseen_features_as_zero() {
        let batch = toy();
        let w = [0.3, -0.2, 0.7, 0.1, -0.4];
        let occ = |i: usize| batch.ptr[i]..batch.ptr[i + 1];
        for i in 0..batch.len() {
            let z: f32 = occ(i).map(|j| w[batch.keys[j] as usize] * batch.vals[j]).sum();
            let features = occ(i).len() - 1;
            let idx: Vec<u32> = batch.keys[occ(i)][..features].iter().map(|&k| k as u32).collect();
            assert!((logit(&w, &idx, &batch.vals[occ(i)][..features]) - z).abs() < 1e-6);
        }
        assert_eq!(logit(&w, &[99], &[5.0]), -0.4);
        assert_eq!(logit(&[], &[0], &[1.0]), 0.0);
    }
}
