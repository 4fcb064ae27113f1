//! Magnitude pruning of an MLP, the sparse file format of a pruned model, and
//! its sparse forward pass.
//!
//! [`magnitude_prune`] zeroes, in each layer's weight on its own, the given
//! fraction of weights of smallest magnitude (biases are kept). The result is
//! still a dense [`ModelKind::Mlp`]: what a fine-tune starts from (the
//! MNIST workload's `init_from` with `keep_zeros`, which keeps the zeros
//! zero). [`to_sparse`] then stores it as a [`ModelKind::MlpSparse`]:
//! each weight is a [`MaskedTensor`], one bit per weight saying whether it
//! is stored plus the stored values in row-major order, so the file shrinks
//! with the sparsity (at 90%: 1 bit + 0.1 values per weight instead of one
//! value). [`SparseMlp`] runs the network from the stored values alone.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::saved::{DenseTensor, ModelKind, SavedModel};

/// A tensor stored as the bitmask of its non-zero entries and their values.
/// Bit `i` (byte `i / 8`, bit `i % 8`, least significant first) is set when
/// element `i` (row-major) is stored; `values` holds the stored elements in
/// order, so there are exactly as many values as set bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(with = "serde_bytes")]
    pub mask: Vec<u8>,
    pub values: Vec<f32>,
}

impl MaskedTensor {
    /// The non-zero entries of a dense tensor.
    pub fn from_dense(t: &DenseTensor) -> MaskedTensor {
        let mut mask = vec![0u8; t.values.len().div_ceil(8)];
        let mut values = Vec::new();
        for (i, &v) in t.values.iter().enumerate() {
            if v != 0.0 {
                mask[i / 8] |= 1 << (i % 8);
                values.push(v);
            }
        }
        MaskedTensor { name: t.name.clone(), shape: t.shape.clone(), mask, values }
    }

    /// Elements of the tensor, stored or not.
    pub fn len(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// The mask covers the shape exactly (no stray bit past the end) and
    /// holds one set bit per value: what makes indexing by it safe.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Shape { name: self.name.clone(), reason });
        let Some(len) = self.len() else { return bad(format!("shape {:?} overflows", self.shape)) };
        if self.mask.len() != len.div_ceil(8) {
            return bad(format!(
                "shape {:?} needs {} mask bytes, found {}",
                self.shape,
                len.div_ceil(8),
                self.mask.len()
            ));
        }
        if len % 8 != 0 && self.mask.last().is_some_and(|&b| b >> (len % 8) != 0) {
            return bad("the mask has bits set past the last element".into());
        }
        let set: usize = self.mask.iter().map(|b| b.count_ones() as usize).sum();
        if set != self.values.len() {
            return bad(format!("the mask stores {set} elements but {} values are given", self.values.len()));
        }
        Ok(())
    }

    /// The stored elements as `(index, value)`, in order (after [`Self::check`]).
    pub fn entries(&self) -> impl Iterator<Item = (usize, f32)> + '_ {
        self.mask
            .iter()
            .enumerate()
            .flat_map(|(byte, &b)| (0..8).filter(move |bit| b >> bit & 1 == 1).map(move |bit| byte * 8 + bit))
            .zip(self.values.iter().copied())
    }

    /// The dense tensor, zeros where nothing is stored (after [`Self::check`]).
    pub fn to_dense(&self) -> DenseTensor {
        let mut values = vec![0.0; self.len().unwrap_or(0)];
        for (i, v) in self.entries() {
            values[i] = v;
        }
        DenseTensor { name: self.name.clone(), shape: self.shape.clone(), values }
    }
}

fn layers_of(model: &SavedModel, want: &str) -> Result<Vec<usize>> {
    model.validate()?;
    match (&model.model, want) {
        (ModelKind::Mlp { layers }, "mlp") | (ModelKind::MlpSparse { layers }, "mlp_sparse") => {
            Ok(layers.clone())
        }
        (other, _) => Err(Error::Shape {
            name: "model".into(),
            reason: format!("a {} model, where an {want} model is needed", other.name()),
        }),
    }
}

/// The weight tensors' names of an MLP of `layers`.
fn weight_names(layers: &[usize]) -> impl Iterator<Item = String> {
    (1..layers.len()).map(|l| format!("fc{l}.weight"))
}

/// Zeroes the `round(sparsity * n)` weights of smallest magnitude of each
/// layer's weight (`n` weights; ties broken by position); biases are kept.
/// An f32 MLP in, an f32 MLP with zeros out.
pub fn magnitude_prune(model: &SavedModel, sparsity: f64) -> Result<SavedModel> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::Shape {
            name: "model".into(),
            reason: format!("sparsity {sparsity} is not in [0, 1)"),
        });
    }
    let layers = layers_of(model, "mlp")?;
    let mut out = model.clone();
    for name in weight_names(&layers) {
        let t = out.dense.iter_mut().find(|t| t.name == name).expect("validated");
        let k = (sparsity * t.values.len() as f64).round() as usize;
        let mut order: Vec<usize> = (0..t.values.len()).collect();
        order.sort_by(|&a, &b| t.values[a].abs().total_cmp(&t.values[b].abs()).then(a.cmp(&b)));
        for &i in &order[..k] {
            t.values[i] = 0.0;
        }
    }
    Ok(out)
}

/// The fraction of an MLP's weights (not biases) that are zero; for a sparse
/// model, that are not stored.
pub fn sparsity(model: &SavedModel) -> Result<f64> {
    let (zeros, total) = match &model.model {
        ModelKind::Mlp { layers } => {
            weight_names(layers).filter_map(|n| model.dense(&n)).fold((0, 0), |(z, n), t| {
                (z + t.values.iter().filter(|&&v| v == 0.0).count(), n + t.values.len())
            })
        }
        ModelKind::MlpSparse { .. } => model.masked.iter().fold((0, 0), |(z, n), t| {
            let len = t.len().unwrap_or(0);
            (z + len - t.values.len().min(len), n + len)
        }),
        other => {
            return Err(Error::Shape {
                name: "model".into(),
                reason: format!("a {} model has no sparsity", other.name()),
            });
        }
    };
    Ok(if total == 0 { 0.0 } else { zeros as f64 / total as f64 })
}

/// Stores an f32 MLP's weights sparsely (their zeros are dropped): a
/// [`ModelKind::MlpSparse`] of the same function.
pub fn to_sparse(model: &SavedModel) -> Result<SavedModel> {
    let layers = layers_of(model, "mlp")?;
    let (mut dense, mut masked) = (Vec::new(), Vec::new());
    for t in &model.dense {
        if t.name.ends_with(".weight") {
            masked.push(MaskedTensor::from_dense(t));
        } else {
            dense.push(t.clone());
        }
    }
    let mut out = SavedModel::new(ModelKind::MlpSparse { layers }, dense, Vec::new());
    out.masked = masked;
    out.validate()?;
    Ok(out)
}

/// The f32 MLP of a sparse one (zeros where nothing is stored): what
/// export writes, since safetensors has no sparse tensors.
pub fn densify(model: &SavedModel) -> Result<SavedModel> {
    let layers = layers_of(model, "mlp_sparse")?;
    let kind = ModelKind::Mlp { layers };
    let dense = kind
        .dense_tensors()?
        .into_iter()
        .map(|(name, _)| match model.masked.iter().find(|t| t.name == name) {
            Some(t) => t.to_dense(),
            None => model.dense(&name).expect("validated").clone(),
        })
        .collect();
    let out = SavedModel::new(kind, dense, Vec::new());
    out.validate()?;
    Ok(out)
}

/// One layer in compressed sparse rows: input `k`'s outgoing weights are
/// `cols[starts[k]..starts[k + 1]]` with `vals` at the same positions.
struct Layer {
    n_in: usize,
    n_out: usize,
    starts: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<f32>,
    bias: Vec<f32>,
}

/// A pruned MLP ready to predict, multiplying by the stored weights only.
#[derive(Default)]
pub struct SparseMlp {
    layers: Vec<Layer>,
}

impl std::fmt::Debug for SparseMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stored: Vec<usize> = self.layers.iter().map(|l| l.vals.len()).collect();
        f.debug_struct("SparseMlp")
            .field("inputs", &self.input_width())
            .field("stored_weights", &stored)
            .finish()
    }
}

impl SparseMlp {
    /// The network of a [`ModelKind::MlpSparse`] model (validated first).
    pub fn new(model: &SavedModel) -> Result<SparseMlp> {
        let layers = layers_of(model, "mlp_sparse")?;
        let mut out = SparseMlp::default();
        for (l, w) in layers.windows(2).enumerate() {
            let (n_in, n_out) = (w[0], w[1]);
            let weight =
                model.masked.iter().find(|t| t.name == format!("fc{}.weight", l + 1)).expect("validated");
            let mut counts = vec![0usize; n_in + 1];
            let (mut cols, mut vals) =
                (Vec::with_capacity(weight.values.len()), Vec::with_capacity(weight.values.len()));
            for (i, v) in weight.entries() {
                counts[i / n_out + 1] += 1;
                cols.push((i % n_out) as u32);
                vals.push(v);
            }
            for k in 0..n_in {
                counts[k + 1] += counts[k];
            }
            let bias = model.dense(&format!("fc{}.bias", l + 1)).expect("validated").values.clone();
            out.layers.push(Layer { n_in, n_out, starts: counts, cols, vals, bias });
        }
        Ok(out)
    }

    pub fn input_width(&self) -> usize {
        self.layers.first().map_or(0, |l| l.n_in)
    }

    pub fn num_classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.n_out)
    }

    /// Class probabilities of the `x.len() / input_width()` examples of `x`
    /// (row-major), into `out`. Zero inputs (MNIST pixels, ReLU outputs) and
    /// pruned weights cost nothing.
    pub fn predict(&self, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        let (mut a, mut z) = (Vec::new(), Vec::new());
        for row in x.chunks_exact(self.input_width().max(1)) {
            a.clear();
            a.extend_from_slice(row);
            for (i, layer) in self.layers.iter().enumerate() {
                z.clear();
                z.extend_from_slice(&layer.bias);
                for (k, &xk) in a.iter().enumerate().take(layer.n_in) {
                    if xk == 0.0 {
                        continue;
                    }
                    let span = layer.starts[k]..layer.starts[k + 1];
                    for (&j, &w) in layer.cols[span.clone()].iter().zip(&layer.vals[span]) {
                        z[j as usize] += xk * w;
                    }
                }
                if i + 1 < self.layers.len() {
                    z.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                std::mem::swap(&mut a, &mut z);
            }
            let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = a.iter().map(|v| (v - max).exp()).sum();
            out.extend(a.iter().map(|v| (v - max).exp() / sum));
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::ArrayView2;
    use proptest::prelude::*;

    use super::*;

    fn sized(layers: &[usize], seed: u64) -> SavedModel {
        let params = crate::Mlp::new(layers).init_params(seed);
        let mut m = SavedModel::from_flat(ModelKind::Mlp { layers: layers.to_vec() }, &params).unwrap();
        // Non-zero biases, so that a bias lost in conversion shows.
        for t in m.dense.iter_mut().filter(|t| t.name.ends_with(".bias")) {
            t.values.iter_mut().enumerate().for_each(|(i, v)| *v = 0.01 * (i % 7) as f32 - 0.03);
        }
        m
    }

    proptest! {
        /// Any tensor with zeros survives the masked form exactly.
        #[test]
        fn masked_tensors_round_trip(values in proptest::collection::vec(prop_oneof![Just(0.0f32), -2.0f32..2.0], 0..70)) {
            let t = DenseTensor { name: "w".into(), shape: vec![values.len()], values };
            let m = MaskedTensor::from_dense(&t);
            prop_assert!(m.check().is_ok());
            prop_assert_eq!(m.values.len(), t.values.iter().filter(|&&v| v != 0.0).count());
            prop_assert_eq!(m.to_dense(), t);
        }
    }

    #[test]
    fn pruning_zeroes_the_smallest_weights_of_each_layer() {
        let model = sized(&[30, 20, 5], 1);
        for s in [0.0, 0.5, 0.8, 0.9] {
            let pruned = magnitude_prune(&model, s).unwrap();
            for (t, before) in pruned.dense.iter().zip(&model.dense) {
                if t.name.ends_with(".bias") {
                    assert_eq!(t, before, "biases are kept");
                    continue;
                }
                let zeros = t.values.iter().filter(|&&v| v == 0.0).count();
                assert_eq!(zeros, (s * t.values.len() as f64).round() as usize, "{} at {s}", t.name);
                let kept_min =
                    t.values.iter().filter(|&&v| v != 0.0).map(|v| v.abs()).fold(f32::MAX, f32::min);
                let cut_max = before
                    .values
                    .iter()
                    .zip(&t.values)
                    .filter(|(_, v)| **v == 0.0)
                    .map(|(b, _)| b.abs())
                    .fold(0.0, f32::max);
                assert!(cut_max <= kept_min, "{}: cut {cut_max} above kept {kept_min}", t.name);
                assert!(before.values.iter().zip(&t.values).all(|(b, v)| *v == 0.0 || v == b));
            }
            assert!((sparsity(&pruned).unwrap() - s).abs() < 0.01);
        }
        assert!(magnitude_prune(&model, 1.0).is_err());
        assert!(magnitude_prune(&model, f64::NAN).is_err());
    }

    #[test]
    fn the_sparse_file_shrinks_with_sparsity_and_computes_the_same_function() {
        let model = sized(&[200, 64, 10], 2);
        let dense_bytes = model.to_bytes().unwrap().len();
        let net = crate::Mlp::new(&[200, 64, 10]);
        let x: Vec<f32> = (0..200 * 20).map(|i| ((i * 37 % 101) as f32 / 100.0).max(0.4) - 0.4).collect();
        let mut last = usize::MAX;
        for s in [0.5, 0.8, 0.9] {
            let pruned = magnitude_prune(&model, s).unwrap();
            let sparse = to_sparse(&pruned).unwrap();
            let bytes = sparse.to_bytes().unwrap();
            assert_eq!(SavedModel::from_bytes(&bytes).unwrap(), sparse);
            assert!(bytes.len() < last, "{} bytes at {s}, {last} before", bytes.len());
            let expected = (1.0 - s) * dense_bytes as f64 + dense_bytes as f64 / 32.0 + 1000.0;
            assert!((bytes.len() as f64) < expected, "{} bytes at {s}, dense {dense_bytes}", bytes.len());
            last = bytes.len();
            assert_eq!(densify(&sparse).unwrap(), pruned);
            assert!((sparsity(&sparse).unwrap() - s).abs() < 0.01);

            let params: Vec<f32> = pruned.dense.iter().flat_map(|t| t.values.clone()).collect();
            let (mut want, mut got) = (Vec::new(), Vec::new());
            let view = ArrayView2::from_shape((20, 200), &x).unwrap();
            net.predict(&params, view, &mut net.workspace(20), &mut want);
            SparseMlp::new(&sparse).unwrap().predict(&x, &mut got);
            assert_eq!(want.len(), got.len());
            let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "probabilities differ by {worst} at {s}");
        }
    }

    #[test]
    fn a_damaged_sparse_model_is_refused() {
        let good = to_sparse(&magnitude_prune(&sized(&[20, 16, 5], 3), 0.8).unwrap()).unwrap();
        let check = |edit: &dyn Fn(&mut SavedModel), needle: &str| {
            let mut m = good.clone();
            edit(&mut m);
            let err = SavedModel::from_bytes(&m.to_bytes().unwrap()).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        };
        check(&|m| m.masked[0].values.truncate(1), "values are given");
        check(&|m| m.masked[0].values.push(1.0), "values are given");
        check(&|m| m.masked[0].mask.truncate(3), "mask bytes");
        check(&|m| m.masked[1].shape = vec![5, 16], "int8 or masked tensors");
        check(&|m| m.masked[0].shape = vec![usize::MAX, 2], "overflows");
        check(&|m| m.masked.truncate(1), "masked tensors");
        check(&|m| m.masked.clear(), "masked tensors");
        // 16 * 5 = 80 bits fill 10 bytes exactly; 5 * 3 = 15 leaves a stray bit.
        let mut odd = to_sparse(&sized(&[5, 3, 2], 4)).unwrap();
        *odd.masked[0].mask.last_mut().unwrap() |= 0x80;
        odd.masked[0].values.push(1.0);
        let err = SavedModel::from_bytes(&odd.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(err.contains("past the last element"), "{err}");
        assert!(to_sparse(&good).is_err(), "only an f32 MLP is made sparse");
        assert!(SparseMlp::new(&sized(&[5, 3, 2], 4)).is_err());
    }
}
