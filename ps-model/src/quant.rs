//! Post-training int8 quantization of an MLP, executed in int8.
//!
//! Weights are quantized once, symmetrically per output channel: column `j`
//! of a layer's `[in, out]` weight gets `scale_j = max_i |w_ij| / 127` and
//! `q_ij = round(w_ij / scale_j)` in [-127, 127]. Activations are quantized
//! per example at run time the same way (`scale_r = max_k |x_rk| / 127`).
//! A layer multiplies int8 by int8 into i32 sums and only then goes back to
//! f32: `z_rj = scale_r * scale_j * sum_k xq_rk * q_kj + b_j`. Biases stay
//! f32. Zero inputs are skipped (MNIST pixels, ReLU outputs).
//!
//! In a [`SavedModel`] of kind [`ModelKind::MlpInt8`], `fc{l}.weight` is an
//! [`Int8Tensor`] and `fc{l}.weight_scale` and `fc{l}.bias` are f32 tensors.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::saved::{DenseTensor, ModelKind, SavedModel};

/// An int8 tensor, row-major (the bytes are the i8 values' two's
/// complement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Int8Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(with = "serde_bytes")]
    pub values: Vec<u8>,
}

/// Quantizes the `[n_in, n_out]` weight `w` per output channel: the int8
/// values (row-major) and one scale per column.
pub fn quantize_columns(w: &[f32], n_in: usize, n_out: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scales = vec![0.0f32; n_out];
    for row in w.chunks_exact(n_out).take(n_in) {
        for (s, &v) in scales.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    scales.iter_mut().for_each(|s| *s /= 127.0);
    let q = w
        .chunks_exact(n_out)
        .flat_map(|row| {
            row.iter().zip(&scales).map(|(&v, &s)| if s > 0.0 { (v / s).round() as i8 } else { 0 })
        })
        .collect();
    (q, scales)
}

/// Quantizes `values` (one example) into `out`; returns the scale.
fn quantize_row(values: &[f32], out: &mut [i8]) -> f32 {
    let scale = values.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
    if scale == 0.0 {
        out.fill(0);
    } else {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = (v / scale).round() as i8;
        }
    }
    scale
}

/// The int8 form of an f32 MLP model: a [`ModelKind::MlpInt8`] model.
pub fn quantize_mlp(model: &SavedModel) -> Result<SavedModel> {
    model.validate()?;
    let ModelKind::Mlp { layers } = &model.model else {
        return Err(Error::Shape {
            name: "model".into(),
            reason: "only an MLP can be quantized to int8".into(),
        });
    };
    let (mut dense, mut int8) = (Vec::new(), Vec::new());
    for (l, w) in layers.windows(2).enumerate() {
        let (n_in, n_out) = (w[0], w[1]);
        let name = |t: &str| format!("fc{}.{t}", l + 1);
        let weight = model.dense(&name("weight")).expect("validated");
        let (q, scales) = quantize_columns(&weight.values, n_in, n_out);
        int8.push(Int8Tensor {
            name: name("weight"),
            shape: vec![n_in, n_out],
            values: q.into_iter().map(|v| v as u8).collect(),
        });
        dense.push(DenseTensor { name: name("weight_scale"), shape: vec![n_out], values: scales });
        dense.push(model.dense(&name("bias")).expect("validated").clone());
    }
    let mut out = SavedModel::new(ModelKind::MlpInt8 { layers: layers.clone() }, dense, Vec::new());
    out.int8 = int8;
    out.validate()?;
    Ok(out)
}

struct Layer {
    n_in: usize,
    n_out: usize,
    weight: Vec<i8>,
    scales: Vec<f32>,
    bias: Vec<f32>,
}

/// An int8 MLP ready to predict.
#[derive(Default)]
pub struct Int8Mlp {
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Int8Mlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<usize> = self.layers.iter().map(|l| l.n_out).collect();
        f.debug_struct("Int8Mlp").field("inputs", &self.input_width()).field("layers", &sizes).finish()
    }
}

impl Int8Mlp {
    /// The network of a validated [`ModelKind::MlpInt8`] model.
    pub fn new(model: &SavedModel) -> Result<Int8Mlp> {
        model.validate()?;
        let ModelKind::MlpInt8 { layers } = &model.model else {
            return Err(Error::Shape { name: "model".into(), reason: "not an int8 MLP".into() });
        };
        let mut out = Int8Mlp::default();
        for (l, w) in layers.windows(2).enumerate() {
            let name = |t: &str| format!("fc{}.{t}", l + 1);
            let weight = model.int8.iter().find(|t| t.name == name("weight")).expect("validated");
            out.layers.push(Layer {
                n_in: w[0],
                n_out: w[1],
                weight: weight.values.iter().map(|&v| v as i8).collect(),
                scales: model.dense(&name("weight_scale")).expect("validated").values.clone(),
                bias: model.dense(&name("bias")).expect("validated").values.clone(),
            });
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
    /// (row-major), into `out`.
    pub fn predict(&self, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        let (mut a, mut q, mut acc) = (Vec::new(), Vec::new(), Vec::new());
        for row in x.chunks_exact(self.input_width().max(1)) {
            a.clear();
            a.extend_from_slice(row);
            for (i, layer) in self.layers.iter().enumerate() {
                q.resize(layer.n_in, 0i8);
                let scale = quantize_row(&a, &mut q);
                acc.clear();
                acc.resize(layer.n_out, 0i32);
                for (k, &xk) in q.iter().enumerate() {
                    if xk == 0 {
                        continue;
                    }
                    let w = &layer.weight[k * layer.n_out..(k + 1) * layer.n_out];
                    for (s, &wj) in acc.iter_mut().zip(w) {
                        *s += i32::from(xk) * i32::from(wj);
                    }
                }
                a.clear();
                let hidden = i + 1 < self.layers.len();
                a.extend(acc.iter().zip(&layer.scales).zip(&layer.bias).map(|((&s, &ws), &b)| {
                    let z = s as f32 * scale * ws + b;
                    if hidden { z.max(0.0) } else { z }
                }));
            }
            let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = a.iter().map(|z| (z - max).exp()).sum();
            out.extend(a.iter().map(|z| (z - max).exp() / sum));
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::ArrayView2;
    use proptest::prelude::*;

    use super::*;

    fn mlp(seed: u64) -> SavedModel {
        sized(&[20, 16, 5], seed)
    }

    fn sized(layers: &[usize], seed: u64) -> SavedModel {
        let net = crate::Mlp::new(layers);
        let params = net.init_params(seed);
        SavedModel::from_flat(ModelKind::Mlp { layers: layers.to_vec() }, &params).unwrap()
    }

    proptest! {
        /// Each weight comes back within half a step of its column's scale.
        #[test]
        fn column_quantization_is_within_half_a_step(w in proptest::collection::vec(-3.0f32..3.0, 24)) {
            let (q, scales) = quantize_columns(&w, 6, 4);
            for (i, (&v, &qv)) in w.iter().zip(&q).enumerate() {
                let s = scales[i % 4];
                prop_assert!((v - f32::from(qv) * s).abs() <= s / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn the_int8_network_agrees_with_the_f32_one() {
        let model = mlp(3);
        let int8 = Int8Mlp::new(&quantize_mlp(&model).unwrap()).unwrap();
        let net = crate::Mlp::new(&[20, 16, 5]);
        let params: Vec<f32> = model.dense.iter().flat_map(|t| t.values.clone()).collect();
        let x: Vec<f32> = (0..20 * 50).map(|i| ((i * 37 % 101) as f32 / 100.0).max(0.3) - 0.3).collect();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        net.predict(
            &params,
            ArrayView2::from_shape((50, 20), &x).unwrap(),
            &mut net.workspace(50),
            &mut want,
        );
        int8.predict(&x, &mut got);
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 0.02, "probabilities differ by up to {worst}");
        let argmax = |p: &[f32]| p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let same = want.chunks(5).zip(got.chunks(5)).filter(|(a, b)| argmax(a) == argmax(b)).count();
        assert!(same >= 48, "{same} of 50 predictions agree");
    }

    #[test]
    fn a_quantized_model_round_trips_and_is_a_quarter_of_the_bytes() {
        let model = sized(&[200, 64, 10], 4);
        let q = quantize_mlp(&model).unwrap();
        let bytes = q.to_bytes().unwrap();
        assert_eq!(SavedModel::from_bytes(&bytes).unwrap(), q);
        let f32_bytes = model.to_bytes().unwrap().len();
        assert!(bytes.len() * 7 < f32_bytes * 2, "{} bytes against {f32_bytes}", bytes.len());
    }

    #[test]
    fn a_damaged_int8_model_is_refused() {
        let mut q = quantize_mlp(&mlp(5)).unwrap();
        q.int8[0].values.pop();
        assert!(q.validate().unwrap_err().to_string().contains("fc1.weight"));
        let mut q = quantize_mlp(&mlp(5)).unwrap();
        q.int8.clear();
        assert!(q.validate().is_err());
        assert!(quantize_mlp(&q).is_err(), "only an f32 MLP is quantized");
    }
}
