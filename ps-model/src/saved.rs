//! The saved-model file: what a run leaves behind for evaluation, export and
//! serving (`model.msgpack` in a run folder).
//!
//! One [`SavedModel`] holds the architecture ([`ModelKind`]), the dense
//! tensors and the sparse tables of a trained model, and a format version.
//! It is MessagePack (rmp-serde, named fields). Reading checks the version and
//! every shape before anything uses the values, so a hostile or truncated file
//! is an [`Error`], never a panic or an outsized allocation.

use std::path::Path;

use ps_common::spec::Init;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::prune::MaskedTensor;
use crate::quant::Int8Tensor;

/// The version this code writes and reads. Version 1 (`layers` and
/// `tensors`, MLP only) was the first `model.msgpack`; it is not read.
pub const FORMAT_VERSION: u32 = 2;

/// Largest file [`SavedModel::read`] accepts (4 GiB).
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// The architecture of a saved model, with what serving needs to rebuild it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelKind {
    /// [`crate::Mlp`] with these layer sizes; tensors `fc1.weight`, `fc1.bias`, ...
    Mlp { layers: Vec<usize> },
    /// The same network quantized to int8 ([`crate::quant`]): int8 tensors
    /// `fc{l}.weight`, f32 tensors `fc{l}.weight_scale` and `fc{l}.bias`.
    MlpInt8 { layers: Vec<usize> },
    /// The same network pruned ([`crate::prune`]): masked (sparse) tensors
    /// `fc{l}.weight`, f32 tensors `fc{l}.bias`.
    MlpSparse { layers: Vec<usize> },
    /// [`crate::logreg`]: one sparse table of width 1, keys `0..num_features`
    /// for the features and `num_features` for the bias.
    Logreg { num_features: usize, table: String },
    /// [`crate::mf`]: user and item factor tables of width `dim`, bias tables
    /// of width 1, and the global mean of the training ratings.
    Mf { dim: usize, global_mean: f32, users: String, items: String, user_bias: String, item_bias: String },
    /// [`crate::ctr`] keys into the embedding table, then a [`crate::Tower`].
    Ctr {
        slots: usize,
        key_space: u64,
        emb_dim: usize,
        hidden: Vec<usize>,
        embeddings: String,
        tower_prefix: String,
    },
}

impl ModelKind {
    /// `mlp`, `mlp_int8`, `mlp_sparse`, `logreg`, `mf` or `ctr`.
    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::Mlp { .. } => "mlp",
            ModelKind::MlpInt8 { .. } => "mlp_int8",
            ModelKind::MlpSparse { .. } => "mlp_sparse",
            ModelKind::Logreg { .. } => "logreg",
            ModelKind::Mf { .. } => "mf",
            ModelKind::Ctr { .. } => "ctr",
        }
    }

    /// The dense tensors of the architecture, in parameter order, with their
    /// shapes: `{prefix}fc{l}.weight` (`[in, out]`) and `{prefix}fc{l}.bias`
    /// (`[out]`) per layer of an MLP or a CTR tower; none for the others.
    pub fn dense_tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        match self {
            ModelKind::Mlp { layers } => dense_stack("", layers),
            ModelKind::MlpInt8 { layers } => Ok(dense_stack("", layers)?
                .into_iter()
                .map(|(name, shape)| match name.strip_suffix(".weight") {
                    Some(layer) => (format!("{layer}.weight_scale"), vec![shape[1]]),
                    None => (name, shape),
                })
                .collect()),
            ModelKind::MlpSparse { layers } => {
                Ok(dense_stack("", layers)?.into_iter().filter(|(n, _)| !n.ends_with(".weight")).collect())
            }
            ModelKind::Logreg { .. } | ModelKind::Mf { .. } => Ok(Vec::new()),
            ModelKind::Ctr { slots, emb_dim, hidden, tower_prefix, .. } => {
                let input = slots.checked_mul(*emb_dim).ok_or_else(|| Error::Shape {
                    name: tower_prefix.clone(),
                    reason: format!("{slots} slots of width {emb_dim} overflow"),
                })?;
                let sizes: Vec<usize> =
                    std::iter::once(input).chain(hidden.iter().copied()).chain([1]).collect();
                dense_stack(tower_prefix, &sizes)
            }
        }
    }

    /// The int8 tensors of the architecture, with their shapes.
    pub fn int8_tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        match self {
            ModelKind::MlpInt8 { layers } => {
                Ok(dense_stack("", layers)?.into_iter().filter(|(n, _)| n.ends_with(".weight")).collect())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The masked (sparse) tensors of the architecture, with their shapes.
    pub fn masked_tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        match self {
            ModelKind::MlpSparse { layers } => {
                Ok(dense_stack("", layers)?.into_iter().filter(|(n, _)| n.ends_with(".weight")).collect())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The sparse tables of the architecture and their widths.
    pub fn sparse_tables(&self) -> Vec<(&str, usize)> {
        match self {
            ModelKind::Mlp { .. } | ModelKind::MlpInt8 { .. } | ModelKind::MlpSparse { .. } => Vec::new(),
            ModelKind::Logreg { table, .. } => vec![(table, 1)],
            ModelKind::Mf { dim, users, items, user_bias, item_bias, .. } => {
                vec![(users, *dim), (items, *dim), (user_bias, 1), (item_bias, 1)]
            }
            ModelKind::Ctr { emb_dim, embeddings, .. } => vec![(embeddings, *emb_dim)],
        }
    }
}

/// `{prefix}fc{l}.weight` (`[in, out]`) and `{prefix}fc{l}.bias` (`[out]`)
/// for the layers of `sizes`, in order.
fn dense_stack(prefix: &str, sizes: &[usize]) -> Result<Vec<(String, Vec<usize>)>> {
    if sizes.len() < 2 || sizes.contains(&0) {
        return Err(Error::Shape {
            name: format!("{prefix}fc*"),
            reason: format!("layer sizes {sizes:?}: need two or more, all positive"),
        });
    }
    Ok(sizes
        .windows(2)
        .enumerate()
        .flat_map(|(l, w)| {
            [
                (format!("{prefix}fc{}.weight", l + 1), vec![w[0], w[1]]),
                (format!("{prefix}fc{}.bias", l + 1), vec![w[1]]),
            ]
        })
        .collect())
}

/// A dense tensor, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The rows of a sparse table that exist: `keys[i]` owns
/// `values[i * dim..(i + 1) * dim]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseTable {
    pub name: String,
    pub dim: usize,
    pub keys: Vec<u64>,
    pub values: Vec<f32>,
    /// The table's initializer: a key that has no row reads as its initial
    /// values, as on the shards (`None`: zeros; models saved before it was
    /// recorded).
    #[serde(default)]
    pub init: Option<Init>,
}

impl SparseTable {
    /// Writes the initial values of `key` (a key without a row) into `out`.
    pub fn initial(&self, key: u64, out: &mut [f32]) {
        match &self.init {
            Some(init) => init.fill(&self.name, key, out),
            None => out.fill(0.0),
        }
    }
}

/// A trained model as written to a run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedModel {
    /// [`FORMAT_VERSION`] when written by this code.
    pub version: u32,
    pub model: ModelKind,
    pub dense: Vec<DenseTensor>,
    pub sparse: Vec<SparseTable>,
    /// The int8 tensors of a quantized model ([`crate::quant`]).
    #[serde(default)]
    pub int8: Vec<Int8Tensor>,
    /// The masked (sparse) tensors of a pruned model ([`crate::prune`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<MaskedTensor>,
}

impl SavedModel {
    /// A model of `kind` with no sparse table, its dense tensors cut in
    /// order from `params`, the flat layout the shards store (an MLP's
    /// `Mlp::param_specs` order).
    pub fn from_flat(kind: ModelKind, params: &[f32]) -> Result<SavedModel> {
        let shapes = kind.dense_tensors()?;
        let total = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>();
        if total != params.len() {
            let reason = format!("the architecture has {total} parameters, {} given", params.len());
            return Err(Error::Shape { name: "dense tensors".into(), reason });
        }
        let mut at = 0;
        let dense = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                at += n;
                DenseTensor { name, shape, values: params[at - n..at].to_vec() }
            })
            .collect();
        Ok(SavedModel::new(kind, dense, Vec::new()))
    }

    /// A model of the current format version.
    pub fn new(model: ModelKind, dense: Vec<DenseTensor>, sparse: Vec<SparseTable>) -> SavedModel {
        SavedModel { version: FORMAT_VERSION, model, dense, sparse, int8: Vec::new(), masked: Vec::new() }
    }

    /// Every tensor's length matches its shape and every table's its keys.
    pub fn validate(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            return Err(Error::Version { found: self.version, supported: FORMAT_VERSION });
        }
        for t in &self.dense {
            let len = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if len != Some(t.values.len()) {
                return Err(Error::Shape {
                    name: t.name.clone(),
                    reason: format!("shape {:?} but {} values", t.shape, t.values.len()),
                });
            }
        }
        for t in &self.sparse {
            if t.dim == 0 || t.keys.len().checked_mul(t.dim) != Some(t.values.len()) {
                return Err(Error::Shape {
                    name: t.name.clone(),
                    reason: format!("{} keys of width {} but {} values", t.keys.len(), t.dim, t.values.len()),
                });
            }
            // The values a key without a row reads as (served, and exported):
            // an initializer that draws non-finite ones is refused as the
            // shards refuse it at registration.
            if let Some(init) = &t.init {
                init.validate().map_err(|e| Error::Decode(format!("sparse table `{}`: {e}", t.name)))?;
            }
        }
        for t in &self.int8 {
            let len = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if len != Some(t.values.len()) {
                return Err(Error::Shape {
                    name: t.name.clone(),
                    reason: format!("shape {:?} but {} int8 values", t.shape, t.values.len()),
                });
            }
        }
        for t in &self.masked {
            t.check()?;
        }
        let expected = self.model.int8_tensors()?;
        let found: Vec<(&str, &[usize])> =
            self.int8.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
        if expected.len() != found.len()
            || !expected.iter().zip(&found).all(|((n, s), (fn_, fs))| n == fn_ && s.as_slice() == *fs)
        {
            let reason = format!("the architecture needs int8 tensors {expected:?}, found {found:?}");
            return Err(Error::Shape { name: "fc1.weight (int8 or masked tensors)".into(), reason });
        }
        let expected = self.model.masked_tensors()?;
        let found: Vec<(&str, &[usize])> =
            self.masked.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
        if expected.len() != found.len()
            || !expected.iter().zip(&found).all(|((n, s), (fn_, fs))| n == fn_ && s.as_slice() == *fs)
        {
            let reason = format!("the architecture needs masked tensors {expected:?}, found {found:?}");
            return Err(Error::Shape { name: "fc1.weight (int8 or masked tensors)".into(), reason });
        }
        self.validate_architecture()
    }

    /// The tensors and tables are exactly the ones the architecture names,
    /// with its shapes, so that a model built from the file cannot index out
    /// of range.
    fn validate_architecture(&self) -> Result<()> {
        let tables = self.model.sparse_tables();
        for &(name, dim) in &tables {
            match self.sparse(name) {
                Some(t) if t.dim == dim => {}
                Some(t) => {
                    let reason = format!("width {}, expected {dim}", t.dim);
                    return Err(Error::Shape { name: name.into(), reason });
                }
                None => return Err(Error::Shape { name: name.into(), reason: "missing".into() }),
            }
        }
        let expected = self.model.dense_tensors()?;
        let found: Vec<(&str, &[usize])> =
            self.dense.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
        let matches = expected.len() == found.len()
            && expected.iter().zip(&found).all(|((n, s), (fn_, fs))| n == fn_ && s.as_slice() == *fs);
        if !matches {
            let reason = format!("the architecture's layers need tensors {expected:?}, found {found:?}");
            return Err(Error::Shape { name: "dense tensors".into(), reason });
        }
        if self.sparse.len() != tables.len() {
            let found: Vec<&str> = self.sparse.iter().map(|t| t.name.as_str()).collect();
            let reason = format!("the architecture names tables {tables:?}, found {found:?}");
            return Err(Error::Shape { name: "sparse tables".into(), reason });
        }
        Ok(())
    }

    /// The dense tensor called `name`.
    pub fn dense(&self, name: &str) -> Option<&DenseTensor> {
        self.dense.iter().find(|t| t.name == name)
    }

    /// The sparse table called `name`.
    pub fn sparse(&self, name: &str) -> Option<&SparseTable> {
        self.sparse.iter().find(|t| t.name == name)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::Encode(e.to_string()))
    }

    /// Decodes and validates a model. serde caps what a length prefix can
    /// preallocate, so a lying header cannot reserve more than the input holds.
    pub fn from_bytes(bytes: &[u8]) -> Result<SavedModel> {
        // Read the version alone first, so a newer file says so instead of
        // failing on a field it does not know.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } = rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        if version != FORMAT_VERSION {
            return Err(Error::Version { found: version, supported: FORMAT_VERSION });
        }
        let model: SavedModel = rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        model.validate()?;
        Ok(model)
    }

    /// Writes the model to `path` through a temporary file and a rename, so a
    /// reader never sees half a model.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_bytes()?).map_err(io("writing"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into"))
    }

    pub fn read(path: &Path) -> Result<SavedModel> {
        let bytes = read_file(path, MAX_FILE_BYTES)?;
        SavedModel::from_bytes(&bytes).map_err(|e| e.in_file(path))
    }
}

/// The bytes of `path`, refused past `cap` (a device, a huge file) with a
/// decode error naming the file.
pub(crate) fn read_file(path: &Path, cap: u64) -> Result<Vec<u8>> {
    ps_common::files::read_capped(path, cap).map_err(|source| match source.kind() {
        std::io::ErrorKind::InvalidData => Error::Decode(source.to_string()).in_file(path),
        _ => Error::Io { what: format!("reading {}", path.display()), source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CTR model: a sparse embedding table and a two-layer tower.
    fn model() -> SavedModel {
        let dense = |name: &str, shape: Vec<usize>| {
            let values = vec![0.5; shape.iter().product()];
            DenseTensor { name: name.into(), shape, values }
        };
        SavedModel::new(
            ModelKind::Ctr {
                slots: 1,
                key_space: 10,
                emb_dim: 2,
                hidden: vec![3],
                embeddings: "emb".into(),
                tower_prefix: "t.".into(),
            },
            vec![
                dense("t.fc1.weight", vec![2, 3]),
                dense("t.fc1.bias", vec![3]),
                dense("t.fc2.weight", vec![3, 1]),
                dense("t.fc2.bias", vec![1]),
            ],
            vec![SparseTable {
                name: "emb".into(),
                dim: 2,
                keys: vec![7, 9],
                values: vec![1.0, 2.0, 3.0, 4.0],
                init: Some(Init::zeros()),
            }],
        )
    }

    #[test]
    fn round_trips_through_bytes_and_files() {
        let m = model();
        assert_eq!(SavedModel::from_bytes(&m.to_bytes().unwrap()).unwrap(), m);
        let dir = std::env::temp_dir().join(format!("ps-model-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.msgpack");
        m.write(&path).unwrap();
        assert_eq!(SavedModel::read(&path).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A model path naming a device whose length reads as 0 (here by a
    /// symlink, as in a run folder) is refused unread: the model file and
    /// an export's safetensors were both read until memory ran out.
    #[cfg(unix)]
    #[test]
    fn a_model_file_that_is_an_endless_device_is_refused() {
        if !Path::new("/dev/zero").exists() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ps-model-endless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.msgpack");
        std::os::unix::fs::symlink("/dev/zero", &model).unwrap();
        let err = SavedModel::read(&model).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::os::unix::fs::symlink("/dev/zero", dir.join(crate::export::MODEL_FILE)).unwrap();
        let err = crate::export::import(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_newer_versions_bad_shapes_and_garbage() {
        let mut m = model();
        m.version = FORMAT_VERSION + 1;
        let err = SavedModel::from_bytes(&m.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(err.contains(&format!("version {}", FORMAT_VERSION + 1)), "{err}");

        let mut m = model();
        m.dense[0].shape = vec![2, 4];
        let err = SavedModel::from_bytes(&m.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(err.contains("t.fc1.weight") && err.contains("[2, 4]"), "{err}");

        let mut m = model();
        m.sparse[0].keys.push(11);
        assert!(SavedModel::from_bytes(&m.to_bytes().unwrap()).is_err());

        let mut m = model();
        m.dense[0].shape = vec![usize::MAX, 2];
        assert!(SavedModel::from_bytes(&m.to_bytes().unwrap()).is_err());

        let bytes = model().to_bytes().unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(SavedModel::from_bytes(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        // A map header claiming 2^32 entries, then nothing.
        assert!(SavedModel::from_bytes(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn refuses_tensors_that_do_not_fit_the_architecture() {
        let check = |m: SavedModel, needle: &str| {
            let err = SavedModel::from_bytes(&m.to_bytes().unwrap()).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        };
        // Consistent shapes and values, but not the tensors the tower needs.
        let mut m = model();
        m.dense.swap(0, 1);
        check(m, "need tensors");
        let mut m = model();
        m.dense.pop();
        check(m, "need tensors");
        let mut m = model();
        m.sparse[0].name = "other".into();
        check(m, "`emb`: missing");
        let mut m = model();
        m.sparse.push(SparseTable { name: "extra".into(), ..m.sparse[0].clone() });
        check(m, "names tables");
        let mut m = model();
        m.sparse[0].init =
            Some(Init { kind: ps_common::spec::InitKind::Uniform { low: -3e38, high: 3e38 }, seed: 1 });
        check(m, "sparse table `emb`");
        let mut m = model();
        m.model = ModelKind::Mlp { layers: vec![2, 0, 3] };
        check(m, "all positive");
        let mut m = model();
        m.model = ModelKind::Ctr {
            slots: usize::MAX,
            key_space: 1,
            emb_dim: 2,
            hidden: vec![],
            embeddings: "emb".into(),
            tower_prefix: "t.".into(),
        };
        check(m, "overflow");
        let mut m = model();
        m.model = ModelKind::Logreg { num_features: 4, table: "emb".into() };
        check(m, "width 2, expected 1");
    }
}
