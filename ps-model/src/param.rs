//! Parameters as named tensors laid end to end in one flat `[f32]`.
//!
//! A model describes its parameters as a list of [`ParamSpec`]s in list order. The
//! parameter server stores and updates them by that layout; the worker pulls the flat
//! vector, calls the model, and pushes a gradient of the same layout.

/// One parameter tensor of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// `"fc1.weight"`, `"fc1.bias"`, ...
    pub name: String,
    /// Row-major shape; the tensor occupies `shape.iter().product()` values.
    pub shape: Vec<usize>,
    pub init: InitKind,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a tensor's initial values are drawn, each value independently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    /// Uniform on `[low, high)`.
    Uniform {
        low: f32,
        high: f32,
    },
    Zeros,
}

impl InitKind {
    /// Glorot (Xavier) uniform, Keras' default for `Dense` kernels: `U(-l, l)` with
    /// `l = sqrt(6 / (fan_in + fan_out))` (Glorot & Bengio, 2010).
    pub fn glorot_uniform(fan_in: usize, fan_out: usize) -> Self {
        let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
        InitKind::Uniform { low: -limit, high: limit }
    }

    /// Fills `out` with draws from this distribution.
    pub fn sample(&self, rng: &mut impl rand::Rng, out: &mut [f32]) {
        match *self {
            InitKind::Zeros => out.fill(0.0),
            InitKind::Uniform { low, high } if low < high => {
                out.iter_mut().for_each(|v| *v = rng.random_range(low..high));
            }
            InitKind::Uniform { low, .. } => out.fill(low),
        }
    }
}
