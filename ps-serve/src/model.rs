//! A saved model ready to predict: [`Servable`], built once per version from
//! a [`SavedModel`], and the [`Inputs`] of each model kind.
//!
//! Requests are checked ([`Servable::check`]) before they join a batch, so a
//! bad request is refused alone and a batch never fails. Predicting reads the
//! model and allocates only the batch's activations and outputs.

use std::collections::HashMap;

use ndarray::ArrayView2;
use ps_model::{ModelKind, SavedModel, SparseTable, Tower, loss::sigmoid};

use crate::error::{Error, Result};

/// The examples of one request (or of a batch of requests).
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// MLP: rows of `width` features, row-major.
    Dense { width: usize, values: Vec<f32> },
    /// Logistic regression: one (indices, values) list per example.
    Sparse(Vec<(Vec<u32>, Vec<f32>)>),
    /// Matrix factorization: (user, item) pairs.
    Pairs { users: Vec<u64>, items: Vec<u64> },
    /// CTR: rows of `slots` categorical ids.
    Slots { slots: usize, ids: Vec<u64> },
}

impl Inputs {
    /// Number of examples.
    pub fn rows(&self) -> usize {
        match self {
            Inputs::Dense { width, values } => values.len().checked_div(*width).unwrap_or(0),
            Inputs::Sparse(rows) => rows.len(),
            Inputs::Pairs { users, .. } => users.len(),
            Inputs::Slots { slots, ids } => ids.len().checked_div(*slots).unwrap_or(0),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Inputs::Dense { .. } => "dense",
            Inputs::Sparse(_) => "sparse",
            Inputs::Pairs { .. } => "pairs",
            Inputs::Slots { .. } => "slots",
        }
    }

    /// Appends `other`'s examples (same kind and width, as checked).
    pub(crate) fn append(&mut self, other: Inputs) {
        match (self, other) {
            (Inputs::Dense { values, .. }, Inputs::Dense { values: v, .. }) => values.extend(v),
            (Inputs::Sparse(rows), Inputs::Sparse(r)) => rows.extend(r),
            (Inputs::Pairs { users, items }, Inputs::Pairs { users: u, items: i }) => {
                users.extend(u);
                items.extend(i);
            }
            (Inputs::Slots { ids, .. }, Inputs::Slots { ids: i, .. }) => ids.extend(i),
            (this, other) => unreachable!("batched {} with {} inputs", this.kind(), other.kind()),
        }
    }
}

/// The rows of a sparse table by key; a key without a row reads as its
/// initial value, as evaluation reads it on the shards.
#[derive(Debug)]
pub struct Rows {
    table: SparseTable,
    index: HashMap<u64, usize>,
}

impl Rows {
    fn new(table: SparseTable) -> Rows {
        let index = table.keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        Rows { table, index }
    }

    fn dim(&self) -> usize {
        self.table.dim
    }

    /// Writes the row of `key` into `out` (`dim` floats).
    fn read(&self, key: u64, out: &mut [f32]) {
        let dim = self.table.dim;
        match self.index.get(&key) {
            Some(&i) => out.copy_from_slice(&self.table.values[i * dim..(i + 1) * dim]),
            None => self.table.initial(key, out),
        }
    }

    fn scalar(&self, key: u64) -> f32 {
        let mut v = [0.0];
        self.read(key, &mut v);
        v[0]
    }
}

/// A model version in memory, ready to predict.
// One per loaded version: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Servable {
    Mlp {
        mlp: ps_model::Mlp,
        params: Vec<f32>,
    },
    /// An int8 MLP, executed in int8 ([`ps_model::quant`]).
    MlpInt8(ps_model::quant::Int8Mlp),
    /// A pruned MLP, multiplying by its stored weights only ([`ps_model::prune`]).
    MlpSparse(ps_model::prune::SparseMlp),
    Logreg {
        num_features: usize,
        weights: Rows,
    },
    Mf {
        mu: f32,
        users: Rows,
        items: Rows,
        user_bias: Rows,
        item_bias: Rows,
    },
    Ctr {
        slots: usize,
        key_space: u64,
        tower: Tower,
        params: Vec<f32>,
        embeddings: Rows,
    },
}

/// Largest number of (index, value) pairs of one logistic-regression example.
const MAX_SPARSE_NNZ: usize = 1 << 16;

impl Servable {
    /// Builds the model of `saved` (validated first).
    pub fn new(saved: SavedModel) -> Result<Servable> {
        saved.validate()?;
        if let ModelKind::MlpInt8 { .. } = saved.model {
            return Ok(Servable::MlpInt8(ps_model::quant::Int8Mlp::new(&saved)?));
        }
        if let ModelKind::MlpSparse { .. } = saved.model {
            return Ok(Servable::MlpSparse(ps_model::prune::SparseMlp::new(&saved)?));
        }
        let SavedModel { model, dense, mut sparse, .. } = saved;
        let mut table = |name: &str| -> Result<Rows> {
            let i = sparse.iter().position(|t| t.name == name).ok_or_else(|| {
                Error::Model(ps_model::Error::Shape { name: name.into(), reason: "missing".into() })
            })?;
            Ok(Rows::new(sparse.swap_remove(i)))
        };
        let flat = |kind: &ModelKind| -> Result<Vec<f32>> {
            let mut params = Vec::new();
            for (name, _) in kind.dense_tensors()? {
                let t = dense.iter().find(|t| t.name == name).ok_or_else(|| {
                    Error::Model(ps_model::Error::Shape { name: name.clone(), reason: "missing".into() })
                })?;
                params.extend_from_slice(&t.values);
            }
            Ok(params)
        };
        Ok(match &model {
            ModelKind::Mlp { layers } => {
                // Checks the layer sizes before `Mlp::new` would panic on them.
                let params = flat(&model)?;
                Servable::Mlp { mlp: ps_model::Mlp::new(layers), params }
            }
            ModelKind::MlpInt8 { .. } | ModelKind::MlpSparse { .. } => unreachable!("built above"),
            ModelKind::Logreg { num_features, table: name } => {
                Servable::Logreg { num_features: *num_features, weights: table(name)? }
            }
            ModelKind::Mf { global_mean, users, items, user_bias, item_bias, .. } => Servable::Mf {
                mu: *global_mean,
                users: table(users)?,
                items: table(items)?,
                user_bias: table(user_bias)?,
                item_bias: table(item_bias)?,
            },
            ModelKind::Ctr { slots, key_space, emb_dim, hidden, embeddings, .. } => {
                let params = flat(&model)?;
                Servable::Ctr {
                    slots: *slots,
                    key_space: *key_space,
                    tower: Tower::new(slots * emb_dim, hidden),
                    params,
                    embeddings: table(embeddings)?,
                }
            }
        })
    }

    /// `mlp`, `mlp_int8`, `mlp_sparse`, `logreg`, `mf` or `ctr`.
    pub fn kind(&self) -> &'static str {
        match self {
            Servable::Mlp { .. } => "mlp",
            Servable::MlpInt8(_) => "mlp_int8",
            Servable::MlpSparse(_) => "mlp_sparse",
            Servable::Logreg { .. } => "logreg",
            Servable::Mf { .. } => "mf",
            Servable::Ctr { .. } => "ctr",
        }
    }

    /// What one example is, for people.
    pub fn input(&self) -> String {
        match self {
            Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_) => {
                format!("{} features (MNIST: pixels scaled to [0, 1])", self.input_width())
            }
            Servable::Logreg { num_features, .. } => {
                format!("sparse features: indices in 0..{num_features} with their values")
            }
            Servable::Mf { .. } => "a (user, item) pair".into(),
            Servable::Ctr { slots, .. } => format!("{slots} categorical ids, one per slot, each below 2^48"),
        }
    }

    /// Features (MLP) or slots (CTR) per example; 0 for the others.
    pub fn input_width(&self) -> usize {
        match self {
            Servable::Mlp { mlp, .. } => mlp.sizes()[0],
            Servable::MlpInt8(m) => m.input_width(),
            Servable::MlpSparse(m) => m.input_width(),
            Servable::Ctr { slots, .. } => *slots,
            _ => 0,
        }
    }

    /// Outputs per example.
    pub fn output_width(&self) -> usize {
        match self {
            Servable::Mlp { mlp, .. } => mlp.num_classes(),
            Servable::MlpInt8(m) => m.num_classes(),
            Servable::MlpSparse(m) => m.num_classes(),
            _ => 1,
        }
    }

    /// Refuses inputs that are not this model's, with a message that says why.
    pub fn check(&self, inputs: &Inputs) -> Result<()> {
        let finite = |v: &[f32]| match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(Error::bad(format!("input value {i} is {}, not a finite number", v[i]))),
            None => Ok(()),
        };
        match (self, inputs) {
            (
                Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_),
                Inputs::Dense { width, values },
            ) => {
                let expected = self.input_width();
                if *width != expected {
                    return Err(Error::bad(format!(
                        "the model takes {expected} features per example, got {width}"
                    )));
                }
                if values.len() % expected != 0 {
                    return Err(Error::bad(format!(
                        "{} values are not whole examples of {expected} features",
                        values.len()
                    )));
                }
                finite(values)
            }
            (Servable::Logreg { num_features, .. }, Inputs::Sparse(rows)) => {
                for (r, (idx, val)) in rows.iter().enumerate() {
                    if idx.len() != val.len() {
                        return Err(Error::bad(format!(
                            "example {r}: {} indices but {} values",
                            idx.len(),
                            val.len()
                        )));
                    }
                    if idx.len() > MAX_SPARSE_NNZ {
                        return Err(Error::bad(format!("example {r}: more than {MAX_SPARSE_NNZ} features")));
                    }
                    if let Some(&j) = idx.iter().find(|&&j| j as usize >= *num_features) {
                        return Err(Error::bad(format!(
                            "example {r}: feature index {j} is outside the model's 0..{num_features}"
                        )));
                    }
                    finite(val).map_err(|e| Error::bad(format!("example {r}: {e}")))?;
                }
                Ok(())
            }
            (Servable::Mf { .. }, Inputs::Pairs { users, items }) if users.len() != items.len() => {
                Err(Error::bad(format!("{} users but {} items", users.len(), items.len())))
            }
            (Servable::Mf { .. }, Inputs::Pairs { .. }) => Ok(()),
            (Servable::Ctr { slots, .. }, Inputs::Slots { slots: s, ids }) => {
                if s != slots {
                    return Err(Error::bad(format!("the model takes {slots} ids per example, got {s}")));
                }
                if ids.len() % slots != 0 {
                    return Err(Error::bad(format!(
                        "{} ids are not whole examples of {slots} slots",
                        ids.len()
                    )));
                }
                match ids.iter().find(|&&id| id >= ps_model::ctr::MAX_ID) {
                    Some(id) => Err(Error::bad(format!("id {id} is not below 2^48"))),
                    None => Ok(()),
                }
            }
            (model, inputs) => Err(Error::bad(format!(
                "a {} model takes {} inputs, not {}",
                model.kind(),
                model.expected_inputs(),
                inputs.kind()
            ))),
        }
    }

    fn expected_inputs(&self) -> &'static str {
        match self {
            Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_) => "dense",
            Servable::Logreg { .. } => "sparse",
            Servable::Mf { .. } => "pairs",
            Servable::Ctr { .. } => "slots",
        }
    }

    /// Predicts the examples of `inputs` (already [`Servable::check`]ed):
    /// `out` gets `rows * output_width` values. MLP: class probabilities;
    /// logistic regression and CTR: the probability of the positive class;
    /// MF: the rating, clamped to [1, 5] as in evaluation.
    pub fn predict(&self, inputs: &Inputs, out: &mut Vec<f32>) -> Result<()> {
        self.check(inputs)?;
        out.clear();
        match (self, inputs) {
            (Servable::Mlp { mlp, params }, Inputs::Dense { width, values }) => {
                let rows = values.len() / width;
                let x = ArrayView2::from_shape((rows, *width), values)
                    .map_err(|e| Error::bad(format!("inputs: {e}")))?;
                let mut ws = mlp.workspace(rows.max(1));
                mlp.predict(params, x, &mut ws, out);
            }
            (Servable::MlpInt8(m), Inputs::Dense { values, .. }) => m.predict(values, out),
            (Servable::MlpSparse(m), Inputs::Dense { values, .. }) => m.predict(values, out),
            (Servable::Logreg { num_features, weights }, Inputs::Sparse(rows)) => {
                let bias = weights.scalar(*num_features as u64);
                out.extend(rows.iter().map(|(idx, val)| {
                    let z = bias
                        + idx.iter().zip(val).map(|(&j, &x)| weights.scalar(u64::from(j)) * x).sum::<f32>();
                    sigmoid(z)
                }));
            }
            (
                Servable::Mf { mu, users, items, user_bias, item_bias },
                Inputs::Pairs { users: u, items: i },
            ) => {
                let dim = users.dim();
                let (mut p, mut q) = (vec![0.0; dim], vec![0.0; dim]);
                for (&u, &i) in u.iter().zip(i) {
                    users.read(u, &mut p);
                    items.read(i, &mut q);
                    let r = ps_model::mf::predict(*mu, &p, &q, user_bias.scalar(u), item_bias.scalar(i));
                    out.push(r.clamp(1.0, 5.0));
                }
            }
            (Servable::Ctr { slots, key_space, tower, params, embeddings }, Inputs::Slots { ids, .. }) => {
                let dim = embeddings.dim();
                let mut x = vec![0.0f32; ids.len() * dim];
                for (e, (row, &id)) in x.chunks_exact_mut(dim).zip(ids).enumerate() {
                    embeddings.read(ps_model::ctr::key(e % slots, id, *key_space), row);
                }
                let mut ws = ps_model::TowerWorkspace::default();
                out.extend(tower.logits(params, &x, &mut ws).iter().map(|&z| sigmoid(z)));
            }
            _ => unreachable!("checked"),
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use super::*;

    /// One model of each kind the service serves: MLP (f32, int8, pruned),
    /// logistic regression, matrix factorization, CTR.
    pub(crate) fn every_saved() -> Vec<SavedModel> {
        use ps_common::spec::{Init, InitKind};
        use ps_model::SparseTable;
        let init = Some(Init { kind: InitKind::Normal { mean: 0.0, std: 0.1 }, seed: 2 });
        let table = |name: &str, dim: usize, keys: Vec<u64>| {
            let values = (0..keys.len() * dim).map(|i| (i % 5) as f32 / 10.0).collect();
            SparseTable { name: name.into(), dim, keys, values, init }
        };
        let layers = vec![3, 4, 2];
        let mlp = ps_model::Mlp::new(&layers);
        let mlp = SavedModel::from_flat(ModelKind::Mlp { layers }, &mlp.init_params(1)).unwrap();
        let logreg = ModelKind::Logreg { num_features: 5, table: "w".into() };
        let logreg = SavedModel::new(logreg, vec![], vec![table("w", 1, vec![0, 2, 5])]);
        let (users, items, user_bias, item_bias) = ("u".into(), "i".into(), "ub".into(), "ib".into());
        let mf = ModelKind::Mf { dim: 3, global_mean: 3.5, users, items, user_bias, item_bias };
        let mf = SavedModel::new(
            mf,
            vec![],
            vec![
                table("u", 3, vec![1, 2]),
                table("i", 3, vec![10]),
                table("ub", 1, vec![1]),
                table("ib", 1, vec![]),
            ],
        );
        let ctr = ModelKind::Ctr {
            slots: 2,
            key_space: 1000,
            emb_dim: 2,
            hidden: vec![3],
            embeddings: "e".into(),
            tower_prefix: "t.".into(),
        };
        let tower = ps_model::Tower::new(4, &[3]);
        let params: Vec<f32> = (0..tower.num_params()).map(|i| (i % 7) as f32 / 10.0 - 0.3).collect();
        let mut ctr = SavedModel::from_flat(ctr, &params).unwrap();
        ctr.sparse.push(table("e", 2, vec![ps_model::ctr::key(0, 42, 1000)]));
        let int8 = ps_model::quant::quantize_mlp(&mlp).unwrap();
        let pruned =
            ps_model::prune::to_sparse(&ps_model::prune::magnitude_prune(&mlp, 0.5).unwrap()).unwrap();
        vec![mlp, int8, pruned, logreg, mf, ctr]
    }

    /// An example of the kind `model` takes (a zero row; feature 0; user 1
    /// and item 10; ids 0).
    fn one_example(model: &Servable) -> Inputs {
        let width = model.input_width();
        match model {
            Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_) => {
                Inputs::Dense { width, values: vec![0.0; width] }
            }
            Servable::Logreg { .. } => Inputs::Sparse(vec![(vec![0], vec![1.0])]),
            Servable::Mf { .. } => Inputs::Pairs { users: vec![1], items: vec![10] },
            Servable::Ctr { .. } => Inputs::Slots { slots: width, ids: vec![0; width] },
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// A model file with bytes changed or cut off is refused when it is
        /// read or built, or it serves: what it accepts it predicts, and
        /// nothing panics or allocates past what the file holds.
        #[test]
        fn a_mangled_model_file_is_refused_or_serves(
            kind in 0usize..6,
            changes in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..4),
            cut in proptest::option::weighted(0.2, proptest::prelude::any::<proptest::sample::Index>()),
        ) {
            let mut bytes = every_saved().swap_remove(kind).to_bytes().unwrap();
            for (at, byte) in changes {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            let Ok(saved) = SavedModel::from_bytes(&bytes) else { return Ok(()) };
            let Ok(model) = Servable::new(saved) else { return Ok(()) };
            let inputs = one_example(&model);
            if model.check(&inputs).is_ok() {
                let mut out = Vec::new();
                model.predict(&inputs, &mut out).unwrap();
                proptest::prop_assert_eq!(out.len(), model.output_width());
            }
        }
    }

    /// [`every_saved`], ready to serve.
    pub(crate) fn every_kind() -> Vec<Servable> {
        every_saved().into_iter().map(|m| Servable::new(m).unwrap()).collect()
    }

    fn mlp() -> Servable {
        let net = ps_model::Mlp::new(&[3, 4, 2]);
        let params = net.init_params(7);
        let kind = ModelKind::Mlp { layers: vec![3, 4, 2] };
        Servable::new(SavedModel::from_flat(kind, &params).unwrap()).unwrap()
    }

    #[test]
    fn mlp_outputs_are_probabilities_and_rows_are_independent() {
        let m = mlp();
        let (a, b) = (vec![0.1, 0.5, 0.9], vec![1.0, 0.0, 0.3]);
        let (mut one, mut two, mut both) = (Vec::new(), Vec::new(), Vec::new());
        m.predict(&Inputs::Dense { width: 3, values: a.clone() }, &mut one).unwrap();
        m.predict(&Inputs::Dense { width: 3, values: b.clone() }, &mut two).unwrap();
        m.predict(&Inputs::Dense { width: 3, values: [a, b].concat() }, &mut both).unwrap();
        assert_eq!(one.len(), 2);
        assert!((one.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for (x, y) in both.iter().zip(one.iter().chain(&two)) {
            assert!((x - y).abs() < 1e-6, "batched {x} vs alone {y}");
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let m = mlp();
        let err = |i: Inputs| m.check(&i).unwrap_err().to_string();
        assert!(err(Inputs::Dense { width: 4, values: vec![0.0; 4] }).contains("takes 3 features"));
        assert!(err(Inputs::Dense { width: 3, values: vec![0.0; 4] }).contains("not whole examples"));
        assert!(err(Inputs::Dense { width: 3, values: vec![0.0, f32::NAN, 0.0] }).contains("NaN"));
        assert!(err(Inputs::Pairs { users: vec![1], items: vec![2] }).contains("takes dense inputs"));
    }

    #[test]
    fn unseen_keys_read_as_their_initial_values() {
        let init = ps_common::spec::Init {
            kind: ps_common::spec::InitKind::Normal { mean: 0.0, std: 0.1 },
            seed: 3,
        };
        let table = SparseTable {
            name: "w".into(),
            dim: 1,
            keys: vec![0, 2],
            values: vec![1.0, -1.0],
            init: Some(init),
        };
        let kind = ModelKind::Logreg { num_features: 2, table: "w".into() };
        let m = Servable::new(SavedModel::new(kind, Vec::new(), vec![table])).unwrap();
        let mut out = Vec::new();
        m.predict(&Inputs::Sparse(vec![(vec![0, 1], vec![1.0, 2.0])]), &mut out).unwrap();
        let mut w1 = [0.0];
        init.fill("w", 1, &mut w1);
        assert_eq!(out, vec![sigmoid(-1.0 + 1.0 + 2.0 * w1[0])]);
        let refused = m.check(&Inputs::Sparse(vec![(vec![2], vec![1.0])])).unwrap_err();
        assert!(refused.to_string().contains("outside the model's 0..2"), "{refused}");
    }
}
