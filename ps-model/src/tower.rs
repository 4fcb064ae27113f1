//! A small MLP for binary targets that also returns the gradient with
//! respect to its input, so the input can be a concatenation of pulled
//! embedding rows whose gradients go back to a sparse table.
//!
//! Layer `l` maps `sizes[l]` inputs to `sizes[l + 1]` outputs as `X · W + b`
//! (`W` is `[in, out]` row-major, as in [`crate::Mlp`]); hidden layers
//! use ReLU, the last layer has one output, the logit. Parameters are the
//! tensors `fc1.weight, fc1.bias, fc2.weight, ...` end to end in one flat
//! slice. The loss is the mean binary cross-entropy with logits.
//!
//! ([`crate::Mlp`] has a softmax head and keeps its activations
//! private, so it cannot hand back the input gradient; this is the compact
//! version that can.)

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::dense::{Layer, Layers};
use crate::loss::bce_with_logits;
use crate::param::ParamSpec;

#[derive(Debug, Clone, PartialEq)]
pub struct Tower {
    layers: Layers,
}

/// Activations of one batch, grown (the only allocation) for larger batches.
#[derive(Debug, Clone, Default)]
pub struct TowerWorkspace {
    /// `acts[l]`: layer `l`'s output, `rows x sizes[l + 1]`; overwritten by the
    /// backward pass with the gradient with respect to its pre-activation.
    acts: Vec<Vec<f32>>,
    scratch: Vec<f32>,
}

impl Tower {
    /// A tower over `input` features with the given hidden widths and one
    /// output. Panics if a width is 0.
    pub fn new(input: usize, hidden: &[usize]) -> Tower {
        let mut sizes = vec![input];
        sizes.extend_from_slice(hidden);
        sizes.push(1);
        assert!(sizes.iter().all(|&n| n > 0), "layer widths must be positive: {sizes:?}");
        Tower { layers: Layers::new(sizes) }
    }

    pub fn sizes(&self) -> &[usize] {
        self.layers.sizes()
    }

    pub fn input_len(&self) -> usize {
        self.sizes()[0]
    }

    pub fn num_params(&self) -> usize {
        self.layers.num_params()
    }

    /// `{prefix}fc{l}.weight` (Glorot uniform) and `{prefix}fc{l}.bias`
    /// (zeros) per layer, in parameter order.
    pub fn param_specs(&self, prefix: &str) -> Vec<ParamSpec> {
        self.layers.param_specs(prefix)
    }

    fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs `x` (`rows x input`, row-major) forward; returns the logits.
    pub fn logits<'w>(&self, params: &[f32], x: &[f32], ws: &'w mut TowerWorkspace) -> &'w [f32] {
        let rows = self.forward(params, x, ws);
        &ws.acts[self.layers() - 1][..rows]
    }

    /// Mean binary cross-entropy of the batch `(x, y)` (`y` in {0, 1}).
    /// Overwrites `grads` (layout of the parameters) and `dx` (layout of `x`)
    /// with the gradients of the mean loss. Returns the mean loss and the
    /// number of rows whose prediction (`logit > 0`) matches the label.
    pub fn loss_and_grad(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        grads: &mut [f32],
        dx: &mut [f32],
        ws: &mut TowerWorkspace,
    ) -> (f32, usize) {
        assert_eq!(grads.len(), self.num_params(), "gradient length");
        assert_eq!(dx.len(), x.len(), "input gradient length");
        let rows = self.forward(params, x, ws);
        assert_eq!(y.len(), rows, "one label per row");
        if rows == 0 {
            grads.fill(0.0);
            return (0.0, 0);
        }
        let last = self.layers() - 1;
        let scale = 1.0 / rows as f32;
        let (mut loss, mut correct) = (0.0f64, 0);
        for (z, &t) in ws.acts[last][..rows].iter_mut().zip(y) {
            let (l, g) = bce_with_logits(*z, t);
            loss += f64::from(l);
            correct += usize::from((*z > 0.0) == (t > 0.5));
            *z = g * scale;
        }
        for l in (0..=last).rev() {
            let layer = self.layers.layer(l);
            let (n_in, n_out) = (layer.n_in, layer.n_out);
            let (below, this) = ws.acts.split_at_mut(l);
            let dz = view(&this[0], rows, n_out);
            let input = match below.last() {
                Some(a) => view(a, rows, n_in),
                None => view(x, rows, n_in),
            };
            let (gw, gb) = grads[layer.all()].split_at_mut(n_in * n_out);
            let mut gw = ArrayViewMut2::from_shape((n_in, n_out), gw).expect("weight gradient shape");
            general_mat_mul(1.0, &input.t(), &dz, 0.0, &mut gw);
            gb.fill(0.0);
            for row in this[0][..rows * n_out].chunks_exact(n_out) {
                gb.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
            }
            // dL/d(input) = dz · Wᵀ; for a hidden input, masked by ReLU'.
            let w = layer.w(params);
            match below.last_mut() {
                None => {
                    let mut d =
                        ArrayViewMut2::from_shape((rows, n_in), &mut dx[..rows * n_in]).expect("dx shape");
                    general_mat_mul(1.0, &dz, &w.t(), 0.0, &mut d);
                }
                Some(a) => {
                    let scratch = &mut ws.scratch[..rows * n_in];
                    let mut d =
                        ArrayViewMut2::from_shape((rows, n_in), &mut *scratch).expect("scratch shape");
                    general_mat_mul(1.0, &dz, &w.t(), 0.0, &mut d);
                    for (a, &d) in a[..rows * n_in].iter_mut().zip(scratch.iter()) {
                        *a = if *a > 0.0 { d } else { 0.0 };
                    }
                }
            }
        }
        ((loss * f64::from(scale)) as f32, correct)
    }

    /// Forward pass; `ws.acts[l]` gets layer `l`'s output. Returns the rows.
    fn forward(&self, params: &[f32], x: &[f32], ws: &mut TowerWorkspace) -> usize {
        assert_eq!(params.len(), self.num_params(), "parameter length");
        let sizes = self.sizes();
        assert_eq!(x.len() % sizes[0], 0, "input is not whole rows");
        let rows = x.len() / sizes[0];
        ws.acts.resize(self.layers(), Vec::new());
        for (a, &n) in ws.acts.iter_mut().zip(&sizes[1..]) {
            if a.len() < rows * n {
                a.resize(rows * n, 0.0);
            }
        }
        let widest = sizes[1..self.layers()].iter().max().copied().unwrap_or(0);
        if ws.scratch.len() < rows * widest {
            ws.scratch.resize(rows * widest, 0.0);
        }
        let last = self.layers() - 1;
        for l in 0..=last {
            let layer = self.layers.layer(l);
            let Layer { n_in, n_out, .. } = layer;
            let (below, this) = ws.acts.split_at_mut(l);
            let out = &mut this[0][..rows * n_out];
            let (w, bias) = (layer.w(params), &params[layer.bias.clone()]);
            let mut z = ArrayViewMut2::from_shape((rows, n_out), &mut *out).expect("activation shape");
            match below.last() {
                None => general_mat_mul(1.0, &view(x, rows, n_in), &w, 0.0, &mut z),
                Some(a) => general_mat_mul(1.0, &view(a, rows, n_in), &w, 0.0, &mut z),
            }
            for row in out.chunks_exact_mut(n_out) {
                if l < last {
                    row.iter_mut().zip(bias).for_each(|(v, &b)| *v = (*v + b).max(0.0));
                } else {
                    row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
                }
            }
        }
        rows
    }
}

fn view(buf: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &buf[..rows * cols]).expect("buffer holds rows * cols")
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Central differences of the mean loss in f64 against the analytic
    /// gradients of both the parameters and the input.
    #[test]
    fn gradients_match_finite_differences() {
        let tower = Tower::new(6, &[5, 4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut params: Vec<f32> = (0..tower.num_params()).map(|_| rng.random_range(-0.8..0.8)).collect();
        let mut x: Vec<f32> = (0..3 * 6).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y = [1.0, 0.0, 1.0];
        let mut ws = TowerWorkspace::default();
        let (mut grads, mut dx) = (vec![0.0; tower.num_params()], vec![0.0; x.len()]);
        let (loss, _) = tower.loss_and_grad(&params, &x, &y, &mut grads, &mut dx, &mut ws);

        let mean_loss = |params: &[f32], x: &[f32], ws: &mut TowerWorkspace| -> f64 {
            let z = tower.logits(params, x, ws);
            z.iter().zip(&y).map(|(&z, &t)| f64::from(bce_with_logits(z, t).0)).sum::<f64>() / 3.0
        };
        assert!((mean_loss(&params, &x, &mut ws) - f64::from(loss)).abs() < 1e-5);
        let h = 1e-2f32;
        let check = |num: f64, ana: f32, what: &str| {
            assert!(
                (num - f64::from(ana)).abs() < 2e-3 * (1.0 + num.abs()),
                "{what}: numeric {num}, analytic {ana}"
            );
        };
        for i in 0..params.len() {
            let keep = params[i];
            params[i] = keep + h;
            let up = mean_loss(&params, &x, &mut ws);
            params[i] = keep - h;
            let down = mean_loss(&params, &x, &mut ws);
            params[i] = keep;
            check((up - down) / (2.0 * f64::from(h)), grads[i], &format!("param {i}"));
        }
        for i in 0..x.len() {
            let keep = x[i];
            x[i] = keep + h;
            let up = mean_loss(&params, &x, &mut ws);
            x[i] = keep - h;
            let down = mean_loss(&params, &x, &mut ws);
            x[i] = keep;
            check((up - down) / (2.0 * f64::from(h)), dx[i], &format!("input {i}"));
        }
    }

    #[test]
    fn specs_cover_the_parameters() {
        let tower = Tower::new(208, &[64]);
        let specs = tower.param_specs("ctr.");
        assert_eq!(
            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["ctr.fc1.weight", "ctr.fc1.bias", "ctr.fc2.weight", "ctr.fc2.bias"]
        );
        assert_eq!(specs.iter().map(ParamSpec::len).sum::<usize>(), tower.num_params());
    }
}
