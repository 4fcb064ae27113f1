//! A dense multi-layer perceptron: ReLU hidden layers, softmax cross-entropy output.
//!
//! Layer `l` maps `sizes[l]` inputs to `sizes[l + 1]` outputs as `X · W + b`, with `W`
//! of shape `[in, out]` row-major (Keras' kernel layout), so a batch goes forward as
//! `X (batch x in) · W` without transposes. The parameters are the tensors
//! `fc1.weight, fc1.bias, fc2.weight, ...` laid end to end in one flat slice.
//!
//! The matrix products run through ndarray's `general_mat_mul` (the `matrixmultiply`
//! crate's SIMD kernels) on views into the flat parameter and gradient slices and into a
//! preallocated [`Workspace`], so a training step allocates nothing. When a batch of
//! inputs is mostly zeros (MNIST is), the first layer instead skips the zeros (see
//! `sparse_input`): the same function, and on MNIST (19% non-zeros) the whole gradient
//! takes about 55% of the dense time.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::dense::Layers;
use crate::param::ParamSpec;
use crate::sparse_input::SparseBatch;

/// Rows per forward pass in [`Mlp::evaluate`].
const EVAL_BATCH: usize = 1000;
/// Default for [`Mlp::with_sparse_input`]. Measured on 784-64-64-10, batch 32, AVX2:
/// skipping zeros takes 45% of the dense time at 10% non-zeros, 70% at 30%, and breaks
/// even at about half.
const SPARSE_INPUT_MAX_DENSITY: f32 = 0.5;

/// The network's shape; parameters are passed in, so one `Mlp` serves any number of
/// parameter vectors (and threads).
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    layers: Layers,
    sparse_input_max_density: f32,
}

/// Per-batch buffers for [`Mlp::loss_and_grad`], sized for a number of rows and grown
/// (the only allocation) if a larger batch comes.
#[derive(Debug, Clone)]
pub struct Workspace {
    sizes: Vec<usize>,
    rows: usize,
    /// `acts[l]`: the output of layer `l`, `rows x sizes[l + 1]`. The backward pass
    /// overwrites each with the gradient of the loss with respect to its pre-activation.
    acts: Vec<Vec<f32>>,
    /// Gradient with respect to a hidden layer's output, before the ReLU mask.
    scratch: Vec<f32>,
    /// The current batch's inputs, compacted if `sparse_active`.
    sparse: SparseBatch,
    sparse_active: bool,
}

impl Workspace {
    /// Buffers for `mlp` and batches of up to `rows` rows.
    pub fn new(mlp: &Mlp, rows: usize) -> Self {
        let mut ws = Self {
            sizes: mlp.layers.sizes().to_vec(),
            rows: 0,
            acts: Vec::new(),
            scratch: Vec::new(),
            sparse: SparseBatch::default(),
            sparse_active: false,
        };
        ws.reserve(rows);
        ws
    }

    fn reserve(&mut self, rows: usize) {
        if rows <= self.rows {
            return;
        }
        self.rows = rows;
        self.acts = self.sizes[1..].iter().map(|&n| vec![0.0; rows * n]).collect();
        let widest_hidden = self.sizes[1..self.sizes.len() - 1].iter().copied().max().unwrap_or(0);
        self.scratch = vec![0.0; rows * widest_hidden];
    }
}

impl Mlp {
    /// A network with `sizes[0]` inputs, `sizes.last()` classes and hidden layers of the
    /// sizes in between. Panics unless there are at least two sizes, all positive.
    pub fn new(sizes: &[usize]) -> Self {
        assert!(sizes.len() >= 2, "an MLP needs input and output sizes, got {sizes:?}");
        assert!(sizes.iter().all(|&n| n > 0), "layer sizes must be positive, got {sizes:?}");
        Self { layers: Layers::new(sizes.to_vec()), sparse_input_max_density: SPARSE_INPUT_MAX_DENSITY }
    }

    /// Row-major batches whose fraction of non-zero inputs is at most `max_density` take
    /// the zero-skipping first layer; `0.0` always uses the dense kernel. The default is
    /// 0.5. Both paths compute the same function, up to floating-point summation order.
    pub fn with_sparse_input(mut self, max_density: f32) -> Self {
        self.sparse_input_max_density = max_density;
        self
    }

    pub fn sizes(&self) -> &[usize] {
        self.layers.sizes()
    }

    pub fn num_classes(&self) -> usize {
        *self.sizes().last().expect("at least two sizes")
    }

    pub fn num_params(&self) -> usize {
        self.layers.num_params()
    }

    /// `fc{l}.weight` (`[in, out]`, Glorot uniform) and `fc{l}.bias` (`[out]`, zeros) for
    /// each layer, as Keras initializes `Dense`.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.layers.param_specs("")
    }

    /// A parameter vector drawn from [`Mlp::param_specs`]' initializers.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = vec![0.0; self.num_params()];
        let mut at = 0;
        for spec in self.param_specs() {
            spec.init.sample(&mut rng, &mut params[at..at + spec.len()]);
            at += spec.len();
        }
        params
    }

    /// Buffers for batches of up to `rows` rows.
    pub fn workspace(&self, rows: usize) -> Workspace {
        Workspace::new(self, rows)
    }

    /// Mean cross-entropy of the batch `(x, y)` and its gradient.
    ///
    /// `params` is the concatenation of the tensors of [`Mlp::param_specs`]; `grads`, of
    /// the same layout, is overwritten with the gradient of the mean loss. Returns the mean
    /// loss and the number of rows whose arg-max prediction equals the label.
    ///
    /// Panics if lengths or shapes disagree with the network, or a label is not a class;
    /// these are programming errors (the loaders check labels).
    pub fn loss_and_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: &[u32],
        grads: &mut [f32],
        ws: &mut Workspace,
    ) -> (f32, usize) {
        self.loss_and_grad_with(params, x, y, grads, ws, |_, row, label, scale| {
            softmax_xent(row, label, Some(scale))
        })
    }

    /// Knowledge distillation (Hinton et al., 2015): the mean over the batch
    /// of `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)`,
    /// where `_T` is the softmax of the logits divided by the temperature `T`
    /// and `target.soft` holds the teacher's `softmax(logits / T)`, one row of
    /// `num_classes` per example. The `T^2` keeps the soft term's gradient,
    /// `alpha * T * (student_T - teacher_T)` per logit, on the scale of the
    /// hard one as `T` grows. Writes the gradient into `grads`; returns the
    /// mean loss and the rows whose arg-max is the label, as
    /// [`Mlp::loss_and_grad`] does.
    ///
    /// Panics if `target.soft` is not `x.nrows() * num_classes` long.
    pub fn distill_loss_and_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: &[u32],
        target: Distill<'_>,
        grads: &mut [f32],
        ws: &mut Workspace,
    ) -> (f32, usize) {
        let classes = self.num_classes();
        assert_eq!(target.soft.len(), x.nrows() * classes, "one row of soft targets per example");
        let mut scratch = vec![0.0f32; classes];
        self.loss_and_grad_with(params, x, y, grads, ws, |r, row, label, scale| {
            distill_row(row, &target.soft[r * classes..(r + 1) * classes], label, target, scale, &mut scratch)
        })
    }

    fn loss_and_grad_with(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: &[u32],
        grads: &mut [f32],
        ws: &mut Workspace,
        mut head: impl FnMut(usize, &mut [f32], usize, f32) -> (f64, bool),
    ) -> (f32, usize) {
        assert_eq!(grads.len(), self.num_params(), "gradient length");
        let rows = x.nrows();
        if rows == 0 {
            grads.fill(0.0);
            return (0.0, 0);
        }
        self.check_labels(x, y);
        self.forward(params, x, ws);

        // Softmax cross-entropy; the logits become dL/dlogits in place.
        let classes = self.num_classes();
        let last = self.layers.len() - 1;
        let scale = 1.0 / rows as f32;
        let mut loss = 0.0f64;
        let mut correct = 0;
        for (r, (row, &label)) in ws.acts[last][..rows * classes].chunks_exact_mut(classes).zip(y).enumerate()
        {
            let (row_loss, hit) = head(r, row, label as usize, scale);
            loss += row_loss;
            correct += usize::from(hit);
        }

        // Backward, from the last layer to the first. Invariant: `ws.acts[l]` holds the
        // gradient with respect to layer l's pre-activation.
        for l in (0..=last).rev() {
            let layer = self.layers.layer(l);
            let (n_in, n_out) = (layer.n_in, layer.n_out);
            let (below, this) = ws.acts.split_at_mut(l);
            let dz = view(&this[0], rows, n_out);

            let (gw, gb) = grads[layer.all()].split_at_mut(n_in * n_out);
            match below.last() {
                None if ws.sparse_active => {
                    let x = x.as_slice().expect("compacted inputs are row-major");
                    ws.sparse.weight_grad(x, &this[0][..rows * n_out], n_out, gw)
                }
                None => general_mat_mul(1.0, &x.t(), &dz, 0.0, &mut weight_grad_view(gw, n_in, n_out)),
                Some(input) => general_mat_mul(
                    1.0,
                    &view(input, rows, n_in).t(),
                    &dz,
                    0.0,
                    &mut weight_grad_view(gw, n_in, n_out),
                ),
            }
            gb.fill(0.0);
            for dz_row in this[0][..rows * n_out].chunks_exact(n_out) {
                gb.iter_mut().zip(dz_row).for_each(|(g, &d)| *g += d);
            }

            if let Some(input) = below.last_mut() {
                // dL/d(input) = dz · Wᵀ, masked by ReLU' (the input's activation > 0).
                let w = layer.w(params);
                let mut da = ArrayViewMut2::from_shape((rows, n_in), &mut ws.scratch[..rows * n_in])
                    .expect("scratch shape");
                general_mat_mul(1.0, &dz, &w.t(), 0.0, &mut da);
                for (a, &d) in input[..rows * n_in].iter_mut().zip(&ws.scratch[..rows * n_in]) {
                    *a = if *a > 0.0 { d } else { 0.0 };
                }
            }
        }
        ((loss * f64::from(scale)) as f32, correct)
    }

    /// Mean cross-entropy and accuracy of the model on `(x, y)`, in batches of 1000 rows.
    pub fn evaluate(&self, params: &[f32], x: ArrayView2<'_, f32>, y: &[u32]) -> (f32, f32) {
        let rows = x.nrows();
        if rows == 0 {
            return (0.0, 0.0);
        }
        let classes = self.num_classes();
        let last = self.layers.len() - 1;
        let mut ws = self.workspace(EVAL_BATCH.min(rows));
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for start in (0..rows).step_by(EVAL_BATCH) {
            let end = (start + EVAL_BATCH).min(rows);
            let yb = &y[start..end];
            let xb = x.slice(ndarray::s![start..end, ..]);
            self.check_labels(xb, yb);
            self.forward(params, xb, &mut ws);
            for (row, &label) in ws.acts[last][..(end - start) * classes].chunks_exact_mut(classes).zip(yb) {
                let (row_loss, hit) = softmax_xent(row, label as usize, None);
                loss += row_loss;
                correct += usize::from(hit);
            }
        }
        ((loss / rows as f64) as f32, correct as f32 / rows as f32)
    }

    /// Class probabilities (softmax of the logits) of the rows of `x`: `out`
    /// gets `x.nrows() * num_classes` values, row by row. The serving path.
    ///
    /// Panics if `params` or `x` disagree with the network in length or width.
    pub fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>, ws: &mut Workspace, out: &mut Vec<f32>) {
        self.predict_tempered(params, x, 1.0, ws, out);
    }

    /// `softmax(logits / temperature)` of the rows of `x`, as [`Mlp::predict`]
    /// (a teacher's soft targets for [`Mlp::distill_loss_and_grad`]).
    pub fn predict_tempered(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        temperature: f32,
        ws: &mut Workspace,
        out: &mut Vec<f32>,
    ) {
        out.clear();
        let rows = x.nrows();
        if rows == 0 {
            return;
        }
        self.forward(params, x, ws);
        let classes = self.num_classes();
        let logits = &ws.acts[self.layers.len() - 1][..rows * classes];
        out.extend(logits.iter().map(|z| z / temperature));
        for row in out.chunks_exact_mut(classes) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
    }

    /// Panics unless `y` has one label per row of `x`, each a class.
    fn check_labels(&self, x: ArrayView2<'_, f32>, y: &[u32]) {
        assert_eq!(y.len(), x.nrows(), "one label per row");
        let classes = self.num_classes();
        assert!(y.iter().all(|&c| (c as usize) < classes), "label outside 0..{classes}");
    }

    /// Runs the batch through the network: `ws.acts[l]` gets layer `l`'s output (ReLU
    /// applied for hidden layers, raw logits for the last).
    fn forward(&self, params: &[f32], x: ArrayView2<'_, f32>, ws: &mut Workspace) {
        assert_eq!(params.len(), self.num_params(), "parameter length");
        assert_eq!(x.ncols(), self.sizes()[0], "input width");
        assert_eq!(ws.sizes, self.sizes(), "workspace made for another network");
        let rows = x.nrows();
        ws.reserve(rows);
        ws.sparse_active = ws.sparse.compact_if_sparse(x, self.sparse_input_max_density);

        let last = self.layers.len() - 1;
        for l in 0..=last {
            let layer = self.layers.layer(l);
            let (n_in, n_out) = (layer.n_in, layer.n_out);
            let (w, bias) = (layer.w(params), &params[layer.bias.clone()]);

            let (below, this) = ws.acts.split_at_mut(l);
            let out = &mut this[0][..rows * n_out];
            if l == 0 && ws.sparse_active {
                ws.sparse.forward(&params[layer.weight.clone()], bias, out, l < last);
                continue;
            }
            let mut z = ArrayViewMut2::from_shape((rows, n_out), &mut *out).expect("activation shape");
            match below.last() {
                None => general_mat_mul(1.0, &x, &w, 0.0, &mut z),
                Some(input) => general_mat_mul(1.0, &view(input, rows, n_in), &w, 0.0, &mut z),
            }
            if l < last {
                for row in out.chunks_exact_mut(n_out) {
                    row.iter_mut().zip(bias).for_each(|(v, &b)| *v = (*v + b).max(0.0));
                }
            } else {
                for row in out.chunks_exact_mut(n_out) {
                    row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
                }
            }
        }
    }
}

/// The teacher's side of [`Mlp::distill_loss_and_grad`].
#[derive(Debug, Clone, Copy)]
pub struct Distill<'a> {
    /// `softmax(teacher_logits / temperature)`, one row per example.
    pub soft: &'a [f32],
    pub temperature: f32,
    /// Weight of the soft term; `1 - alpha` weighs the labels' cross-entropy.
    pub alpha: f32,
}

/// The distillation loss of one row of student logits, and whether its
/// arg-max is `label`; the row is overwritten with `scale` times the
/// gradient. `q` is scratch of the row's length.
fn distill_row(
    row: &mut [f32],
    soft: &[f32],
    label: usize,
    d: Distill<'_>,
    scale: f32,
    q: &mut [f32],
) -> (f64, bool) {
    let t = d.temperature;
    // Student at temperature T: q = softmax(z / T), ln q = z / T - lse(z / T).
    let max_t = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z / t));
    let mut sum_t = 0.0f32;
    for (qi, &z) in q.iter_mut().zip(row.iter()) {
        *qi = (z / t - max_t).exp();
        sum_t += *qi;
    }
    let lse_t = max_t + sum_t.ln();
    let mut kl = 0.0f64;
    for (&p, &z) in soft.iter().zip(row.iter()) {
        if p > 0.0 {
            kl += f64::from(p) * (f64::from(p.ln()) - f64::from(z / t - lse_t));
        }
    }
    q.iter_mut().for_each(|v| *v /= sum_t);
    // The hard term turns the row into scale * (softmax(z) - onehot).
    let (ce, hit) = softmax_xent(row, label, Some(scale * (1.0 - d.alpha)));
    for ((g, &qi), &p) in row.iter_mut().zip(q.iter()).zip(soft) {
        *g += scale * d.alpha * t * (qi - p);
    }
    let loss = f64::from(d.alpha) * f64::from(t * t) * kl + f64::from(1.0 - d.alpha) * ce;
    (loss, hit)
}

fn weight_grad_view(gw: &mut [f32], n_in: usize, n_out: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((n_in, n_out), gw).expect("weight gradient shape")
}

/// The first `rows x cols` values of `buf` as a matrix.
fn view(buf: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &buf[..rows * cols]).expect("buffer holds rows * cols")
}

/// Cross-entropy of one row of logits against `label`, and whether the arg-max (first
/// on ties) is `label`. With `grad_scale: Some(s)` the row is overwritten with
/// `s * (softmax - onehot(label))`, the gradient of `s * loss`.
///
/// Stable form: with `m = max(z)`, `loss = ln Σ exp(z - m) - (z_label - m)`.
fn softmax_xent(row: &mut [f32], label: usize, grad_scale: Option<f32>) -> (f64, bool) {
    let (mut arg, mut max) = (0, row[0]);
    for (j, &v) in row.iter().enumerate().skip(1) {
        if v > max {
            (arg, max) = (j, v);
        }
    }
    let shifted_label = row[label] - max;
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let loss = f64::from(sum.ln() - shifted_label);
    if let Some(scale) = grad_scale {
        let k = scale / sum;
        row.iter_mut().for_each(|v| *v *= k);
        row[label] -= scale;
    }
    (loss, arg == label)
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;
    use rand::Rng;

    use super::*;
    use crate::param::InitKind;

    /// Row `r`'s logits computed naively in f64 (the reference losses' forward pass).
    fn reference_logits(mlp: &Mlp, params: &[f64], x: &Array2<f32>, r: usize) -> Vec<f64> {
        let sizes = mlp.sizes();
        let mut a: Vec<f64> = x.row(r).iter().map(|&v| f64::from(v)).collect();
        for l in 0..sizes.len() - 1 {
            let (n_in, n_out, at) = (sizes[l], sizes[l + 1], mlp.layers.layer(l).weight.start);
            let mut z: Vec<f64> = params[at + n_in * n_out..at + n_in * n_out + n_out].to_vec();
            for (i, &ai) in a.iter().enumerate() {
                for (j, zj) in z.iter_mut().enumerate() {
                    *zj += ai * params[at + i * n_out + j];
                }
            }
            if l < sizes.len() - 2 {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            a = z;
        }
        a
    }

    /// The loss computed naively in f64, for finite differences that are exact enough to
    /// judge the f32 gradient by.
    fn reference_loss(mlp: &Mlp, params: &[f64], x: &Array2<f32>, y: &[u32]) -> f64 {
        let mut total = 0.0;
        for (r, &label) in y.iter().enumerate() {
            let a = reference_logits(mlp, params, x, r);
            let m = a.iter().copied().fold(f64::MIN, f64::max);
            let lse = m + a.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - a[label as usize];
        }
        total / y.len() as f64
    }

    fn random_batch(rows: usize, cols: usize, classes: u32, seed: u64) -> (Array2<f32>, Vec<u32>) {
        sparse_batch(rows, cols, classes, 1.0, seed)
    }

    /// A batch in which each input is non-zero with probability `density`.
    fn sparse_batch(
        rows: usize,
        cols: usize,
        classes: u32,
        density: f64,
        seed: u64,
    ) -> (Array2<f32>, Vec<u32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = Array2::from_shape_fn((rows, cols), |_| {
            if rng.random_bool(density) { rng.random_range(-1.0..1.0) } else { 0.0 }
        });
        let y = (0..rows).map(|_| rng.random_range(0..classes)).collect();
        (x, y)
    }

    /// The distillation loss computed naively in f64.
    fn reference_distill(
        mlp: &Mlp,
        params: &[f64],
        x: &Array2<f32>,
        y: &[u32],
        soft: &[f32],
        t: f64,
        alpha: f64,
    ) -> f64 {
        let classes = mlp.num_classes();
        let mut total = 0.0;
        for (r, &label) in y.iter().enumerate() {
            let a = reference_logits(mlp, params, x, r);
            let lse = |v: &[f64]| {
                let m = v.iter().copied().fold(f64::MIN, f64::max);
                m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
            };
            let ce = lse(&a) - a[label as usize];
            let zt: Vec<f64> = a.iter().map(|v| v / t).collect();
            let lt = lse(&zt);
            let kl: f64 = soft[r * classes..(r + 1) * classes]
                .iter()
                .zip(&zt)
                .map(|(&p, z)| if p > 0.0 { f64::from(p) * (f64::from(p).ln() - (z - lt)) } else { 0.0 })
                .sum();
            total += alpha * t * t * kl + (1.0 - alpha) * ce;
        }
        total / y.len() as f64
    }

    #[test]
    fn distillation_gradient_matches_finite_differences() {
        for (t, alpha) in [(4.0f32, 0.7f32), (1.0, 1.0), (2.0, 0.0)] {
            let sizes = [6, 5, 4];
            let mlp = Mlp::new(&sizes);
            let params = mlp.init_params(3);
            let (x, y) = random_batch(3, 6, 4, 9);
            // A teacher's soft targets: another network's tempered softmax.
            let teacher = mlp.init_params(4);
            let mut soft = Vec::new();
            mlp.predict_tempered(&teacher, x.view(), t, &mut mlp.workspace(3), &mut soft);
            assert!(soft.chunks(4).all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
            let mut grads = vec![f32::NAN; mlp.num_params()];
            let target = Distill { soft: &soft, temperature: t, alpha };
            let (loss, hits) =
                mlp.distill_loss_and_grad(&params, x.view(), &y, target, &mut grads, &mut mlp.workspace(1));
            let (_, plain_hits) = mlp.loss_and_grad(
                &params,
                x.view(),
                &y,
                &mut vec![0.0; mlp.num_params()],
                &mut mlp.workspace(1),
            );
            assert_eq!(hits, plain_hits);

            let p64: Vec<f64> = params.iter().map(|&p| f64::from(p)).collect();
            let f = |p: &[f64]| reference_distill(&mlp, p, &x, &y, &soft, f64::from(t), f64::from(alpha));
            let reference = f(&p64);
            assert!((f64::from(loss) - reference).abs() < 1e-5, "T {t}: loss {loss} vs {reference}");
            let eps = 1e-6;
            for i in 0..params.len() {
                let (mut plus, mut minus) = (p64.clone(), p64.clone());
                plus[i] += eps;
                minus[i] -= eps;
                let numeric = (f(&plus) - f(&minus)) / (2.0 * eps);
                let analytic = f64::from(grads[i]);
                assert!(
                    (analytic - numeric).abs() <= 1e-5 + 1e-3 * numeric.abs(),
                    "T {t} alpha {alpha} param {i}: analytic {analytic} vs numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn param_specs_follow_keras_dense() {
        let mlp = Mlp::new(&[784, 64, 64, 10]);
        let specs = mlp.param_specs();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]);
        assert_eq!(specs[0].shape, [784, 64]);
        assert_eq!(specs[5].shape, [10]);
        assert_eq!(specs.iter().map(ParamSpec::len).sum::<usize>(), mlp.num_params());
        assert_eq!(mlp.num_params(), 55_050);
        let limit = (6.0f32 / 848.0).sqrt();
        assert_eq!(specs[0].init, InitKind::Uniform { low: -limit, high: limit });
        assert_eq!(specs[1].init, InitKind::Zeros);

        let params = mlp.init_params(7);
        assert_eq!(params, mlp.init_params(7));
        assert!(params[..784 * 64].iter().all(|v| v.abs() <= limit));
        assert!(params[784 * 64..784 * 64 + 64].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let cases = [
            (&[5, 4, 3][..], 3, 1.0),
            (&[6, 5, 4, 3][..], 4, 1.0),
            (&[3, 2][..], 2, 1.0),
            // Inputs with zeros, through the zero-skipping first layer.
            (&[9, 4, 3][..], 3, 0.4),
            (&[11, 6, 5, 3][..], 5, 0.3),
        ];
        for (sizes, rows, density) in cases {
            let sparse = density < 1.0;
            let mlp = Mlp::new(sizes).with_sparse_input(if sparse { 1.0 } else { 0.0 });
            let params = mlp.init_params(11);
            let (x, y) = sparse_batch(rows, sizes[0], *sizes.last().unwrap() as u32, density, 5);
            let mut grads = vec![f32::NAN; mlp.num_params()];
            let mut ws = mlp.workspace(1);
            let (loss, _) = mlp.loss_and_grad(&params, x.view(), &y, &mut grads, &mut ws);
            assert_eq!(ws.sparse_active, sparse);

            let p64: Vec<f64> = params.iter().map(|&p| f64::from(p)).collect();
            let reference = reference_loss(&mlp, &p64, &x, &y);
            assert!((f64::from(loss) - reference).abs() < 1e-5, "loss {loss} vs {reference}");

            let eps = 1e-6;
            for i in 0..params.len() {
                let (mut plus, mut minus) = (p64.clone(), p64.clone());
                plus[i] += eps;
                minus[i] -= eps;
                let numeric = (reference_loss(&mlp, &plus, &x, &y) - reference_loss(&mlp, &minus, &x, &y))
                    / (2.0 * eps);
                let analytic = f64::from(grads[i]);
                assert!(
                    (analytic - numeric).abs() <= 1e-5 + 1e-3 * numeric.abs(),
                    "{sizes:?} param {i}: analytic {analytic} vs numeric {numeric}"
                );
            }
        }
    }

    /// Loss, hits and gradient of `mlp` on `(x, y)` with the sparse path allowed or not.
    fn run(
        mlp: &Mlp,
        sparse: bool,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: &[u32],
    ) -> (f32, usize, Vec<f32>, bool) {
        let mlp = mlp.clone().with_sparse_input(if sparse { 1.0 } else { 0.0 });
        let mut grads = vec![f32::NAN; mlp.num_params()];
        let mut ws = mlp.workspace(x.nrows());
        let (loss, hits) = mlp.loss_and_grad(params, x, y, &mut grads, &mut ws);
        (loss, hits, grads, ws.sparse_active)
    }

    #[test]
    fn sparse_and_dense_first_layers_agree() {
        // Odd widths exercise every block width and the compaction tail; more than 32
        // rows, several mask groups.
        for (sizes, rows, density) in [
            (&[784, 64, 64, 10][..], 32, 0.2),
            (&[13, 70, 4][..], 40, 0.3),
            (&[100, 131, 7, 5][..], 65, 0.05),
            (&[8, 3][..], 1, 0.5),
        ] {
            let mlp = Mlp::new(sizes);
            let params = mlp.init_params(4);
            let (mut x, y) = sparse_batch(rows, sizes[0], *sizes.last().unwrap() as u32, density, 6);
            x.row_mut(0).fill(0.0); // an all-zero row
            let (dense_loss, dense_hits, dense_grads, dense_active) = run(&mlp, false, &params, x.view(), &y);
            let (loss, hits, grads, active) = run(&mlp, true, &params, x.view(), &y);
            assert!(active && !dense_active);
            assert!((loss - dense_loss).abs() < 1e-5 * dense_loss.abs(), "{sizes:?}: {loss} vs {dense_loss}");
            assert_eq!(hits, dense_hits);
            for (i, (g, d)) in grads.iter().zip(&dense_grads).enumerate() {
                assert!((g - d).abs() <= 1e-6 + 1e-4 * d.abs(), "{sizes:?} param {i}: {g} vs {d}");
            }
        }
    }

    #[test]
    fn dense_batches_and_strided_views_take_the_dense_path() {
        let mlp = Mlp::new(&[6, 4, 3]);
        let params = mlp.init_params(2);
        let (x, y) = sparse_batch(5, 6, 3, 0.9, 3);
        let mut ws = mlp.workspace(5);
        mlp.loss_and_grad(&params, x.view(), &y, &mut vec![0.0; mlp.num_params()], &mut ws);
        assert!(!ws.sparse_active, "too dense for the default");
        let (x, y) = sparse_batch(5, 6, 3, 0.2, 3);
        let mut column_major = Array2::zeros(ndarray::ShapeBuilder::f((5, 6)));
        column_major.assign(&x);
        let (loss, _, grads, active) = run(&mlp, true, &params, column_major.view(), &y);
        assert!(!active, "a column-major view is not compacted");
        let (loss2, _, grads2, _) = run(&mlp, true, &params, x.view(), &y);
        assert!((loss - loss2).abs() < 1e-6);
        assert!(grads.iter().zip(&grads2).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn uniform_logits_cost_ln_of_the_class_count() {
        let mlp = Mlp::new(&[784, 64, 64, 10]);
        let params = vec![0.0; mlp.num_params()];
        let (x, y) = random_batch(8, 784, 10, 1);
        let mut grads = vec![0.0; mlp.num_params()];
        let (loss, _) = mlp.loss_and_grad(&params, x.view(), &y, &mut grads, &mut mlp.workspace(8));
        assert!((loss - 10f32.ln()).abs() < 1e-6, "{loss}");
        assert!(grads.iter().all(|g| g.is_finite()));
        let (eval_loss, _) = mlp.evaluate(&params, x.view(), &y);
        assert!((eval_loss - 10f32.ln()).abs() < 1e-6, "{eval_loss}");
    }

    #[test]
    fn batch_size_may_change_between_calls() {
        let mlp = Mlp::new(&[6, 5, 3]);
        let params = mlp.init_params(3);
        let (x, y) = random_batch(9, 6, 3, 2);
        let mut ws = mlp.workspace(2);
        let mut big = vec![0.0; mlp.num_params()];
        mlp.loss_and_grad(&params, x.view(), &y, &mut big, &mut ws);
        let mut small = vec![0.0; mlp.num_params()];
        let (x2, y2) = (x.slice(ndarray::s![..2, ..]), &y[..2]);
        let (loss, _) = mlp.loss_and_grad(&params, x2, y2, &mut small, &mut ws);
        let mut fresh = vec![0.0; mlp.num_params()];
        let (fresh_loss, _) = mlp.loss_and_grad(&params, x2, y2, &mut fresh, &mut mlp.workspace(2));
        assert_eq!((loss, &small), (fresh_loss, &fresh));
    }

    #[test]
    fn evaluate_agrees_with_the_training_loss_and_counts() {
        let mlp = Mlp::new(&[7, 6, 4]);
        let params = mlp.init_params(9);
        let (x, y) = random_batch(2500, 7, 4, 8);
        let mut grads = vec![0.0; mlp.num_params()];
        let (loss, correct) = mlp.loss_and_grad(&params, x.view(), &y, &mut grads, &mut mlp.workspace(1));
        let (eval_loss, accuracy) = mlp.evaluate(&params, x.view(), &y);
        assert!((loss - eval_loss).abs() < 1e-5, "{loss} vs {eval_loss}");
        assert_eq!(accuracy, correct as f32 / 2500.0);
    }
}
