//! The layout both MLPs share: a stack of dense layers `X · W + b` in one
//! flat parameter vector, with `W` of shape `[in, out]` row-major (Keras'
//! kernel layout) and each layer's bias right after its weight.

use std::ops::Range;

use ndarray::ArrayView2;

use crate::param::{InitKind, ParamSpec};

/// Where each layer's weight and bias sit in the flat parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layers {
    sizes: Vec<usize>,
    /// Offset of layer `l`'s weight; its bias follows the weight.
    offsets: Vec<usize>,
    num_params: usize,
}

/// One layer: `n_in` inputs, `n_out` outputs, and its ranges in the flat vector.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layer {
    pub n_in: usize,
    pub n_out: usize,
    pub weight: Range<usize>,
    pub bias: Range<usize>,
}

impl Layer {
    /// The weight as an `[n_in, n_out]` view into `params`.
    pub fn w<'p>(&self, params: &'p [f32]) -> ArrayView2<'p, f32> {
        ArrayView2::from_shape((self.n_in, self.n_out), &params[self.weight.clone()]).expect("weight shape")
    }

    /// The weight and the bias together (they are adjacent).
    pub fn all(&self) -> Range<usize> {
        self.weight.start..self.bias.end
    }
}

impl Layers {
    /// Layers mapping `sizes[l]` inputs to `sizes[l + 1]` outputs. The caller
    /// checks that there are at least two sizes, all positive.
    pub fn new(sizes: Vec<usize>) -> Layers {
        let mut offsets = Vec::with_capacity(sizes.len().saturating_sub(1));
        let mut at = 0;
        for pair in sizes.windows(2) {
            offsets.push(at);
            at += pair[0] * pair[1] + pair[1];
        }
        Layers { sizes, offsets, num_params: at }
    }

    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn num_params(&self) -> usize {
        self.num_params
    }

    pub fn layer(&self, l: usize) -> Layer {
        let (n_in, n_out, at) = (self.sizes[l], self.sizes[l + 1], self.offsets[l]);
        Layer {
            n_in,
            n_out,
            weight: at..at + n_in * n_out,
            bias: at + n_in * n_out..at + n_in * n_out + n_out,
        }
    }

    /// `{prefix}fc{l}.weight` (`[in, out]`, Glorot uniform) and
    /// `{prefix}fc{l}.bias` (`[out]`, zeros) per layer, in parameter order,
    /// as Keras initializes `Dense`.
    pub fn param_specs(&self, prefix: &str) -> Vec<ParamSpec> {
        (0..self.len())
            .flat_map(|l| {
                let Layer { n_in, n_out, .. } = self.layer(l);
                [
                    ParamSpec {
                        name: format!("{prefix}fc{}.weight", l + 1),
                        shape: vec![n_in, n_out],
                        init: InitKind::glorot_uniform(n_in, n_out),
                    },
                    ParamSpec {
                        name: format!("{prefix}fc{}.bias", l + 1),
                        shape: vec![n_out],
                        init: InitKind::Zeros,
                    },
                ]
            })
            .collect()
    }
}
