//! Binary losses and scores shared by the logistic models (a9a LR, the CTR
//! tower): numerically stable sigmoid and softplus, binary cross-entropy with
//! logits, and the area under the ROC curve.

/// `ln(1 + e^z)` without overflow.
pub fn softplus(z: f32) -> f32 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

pub fn sigmoid(z: f32) -> f32 {
    // Both branches avoid exp of a large positive number.
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy with logits of one example, `softplus(z) - y·z`, and
/// its derivative in `z`, `sigmoid(z) - y`.
pub fn bce_with_logits(z: f32, y: f32) -> (f32, f32) {
    (softplus(z) - y * z, sigmoid(z) - y)
}

/// Area under the ROC curve of `scores` against binary `labels` (the
/// Mann-Whitney statistic, ties counted half); 0.5 if one class is absent.
pub fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut positives) = (0.0f64, 0usize);
    let mut i = 0;
    while i < order.len() {
        // A run of equal scores shares the mean of its ranks (1-based).
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            if labels[k] > 0.5 {
                rank_sum += mean_rank;
                positives += 1;
            }
        }
        i = j;
    }
    let negatives = scores.len() - positives;
    if positives == 0 || negatives == 0 {
        return 0.5;
    }
    let p = positives as f64;
    (rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_helpers_are_stable() {
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert_eq!(softplus(100.0), 100.0);
        assert!(softplus(-100.0) >= 0.0 && softplus(-100.0) < 1e-30);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        let (l, g) = bce_with_logits(2.0, 1.0);
        assert!((l - (1.0 + (-2f32).exp()).ln()).abs() < 1e-6 && (g - (sigmoid(2.0) - 1.0)).abs() < 1e-7);
    }

    #[test]
    fn auc_counts_ordered_pairs() {
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
        // 2 positives, 2 negatives, 3 of 4 pairs ordered.
        assert_eq!(auc(&[0.1, 0.3, 0.2, 0.4], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert_eq!(auc(&[0.1, 0.2], &[1.0, 1.0]), 0.5);
    }
}
