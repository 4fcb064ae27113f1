//! Export of a [`SavedModel`] to safetensors, with a model card beside it,
//! so that a model can be used without this code (Python: `safetensors` and
//! NumPy; any framework that reads safetensors).
//!
//! [`export`] writes two files into a folder (docs/EXPORT.md shows the
//! layout of each model kind and a Python scorer):
//!
//! - `model.safetensors`: every dense tensor as `F32` under its own name
//!   (row-major; MLP weights are `[in, out]`), and every sparse table as two
//!   tensors, `<table>.keys` (`U64`, `[n]`) and `<table>.values` (`F32`,
//!   `[n, dim]`): only the `n` rows that exist, row `i` belonging to key
//!   `keys[i]`. The header's `__metadata__` holds `format`,
//!   `format_version` and `architecture` (the JSON of [`ModelKind`]), and
//!   `sparse_init` (JSON: each sparse table's initializer, what a key without
//!   a row reads as) when the model records them, so the file alone can be
//!   [`import`]ed.
//! - `card.json`: a [`ModelCard`]: the architecture, the input and output,
//!   the forward pass, the preprocessing, every tensor with its layout, the
//!   metrics and the run that made the model.
//!
//! [`import`] reads `model.safetensors` back into a validated
//! [`SavedModel`]. A file is read whole, up to [`MAX_FILE_BYTES`]; the
//! `safetensors` crate checks the header against the file's length before
//! anything is read, so a truncated or lying file is an [`Error`], never a
//! panic or an outsized allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use ps_common::spec::Init;
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::quant::Int8Tensor;
use crate::saved::{DenseTensor, MAX_FILE_BYTES, ModelKind, SavedModel, SparseTable, read_file};

/// The value of `format` in the card and the safetensors metadata.
pub const FORMAT: &str = "ps-model-export";
/// The export layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The tensors' file in an export folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The model card's file in an export folder.
pub const CARD_FILE: &str = "card.json";
/// Largest `card.json` [`ModelCard::read`] accepts (16 MiB).
const MAX_CARD_BYTES: u64 = 16 << 20;
/// Metadata key of the sparse tables' initializers (JSON, table -> init),
/// present when any table records one.
const SPARSE_INIT: &str = "sparse_init";

/// What a person or a program needs to use an exported model (`card.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this code.
    pub format_version: u32,
    /// `ps-model <version>`.
    pub exported_by: String,
    pub architecture: ModelKind,
    /// What one example is.
    pub input: String,
    /// What the model returns for it.
    pub output: String,
    /// The forward pass, in terms of the tensors.
    pub forward: String,
    /// How raw data becomes the input, in order.
    pub preprocessing: Vec<String>,
    pub tensors: Vec<TensorCard>,
    /// Test metrics of the run, e.g. `test_accuracy`, `test_loss`.
    pub metrics: BTreeMap<String, f64>,
    pub run: Option<RunInfo>,
}

/// One tensor of `model.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorCard {
    pub name: String,
    /// `F32` or `U64` (safetensors' names).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// What the tensor holds and how it is laid out.
    pub layout: String,
}

/// The run that trained the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run folder, as given to the exporter.
    pub run_dir: String,
    /// The run's effective run file (`config.toml`), verbatim.
    pub config_toml: String,
}

/// What the card says that the model file does not know.
#[derive(Debug, Clone, Default)]
pub struct CardExtra {
    /// Data preprocessing (e.g. pixel scaling), after the model's own.
    pub preprocessing: Vec<String>,
    pub metrics: BTreeMap<String, f64>,
    pub run: Option<RunInfo>,
}

/// Where [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPaths {
    pub model: PathBuf,
    pub card: PathBuf,
}

/// A tensor ready for safetensors: little-endian bytes.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.data[..]).into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl Bytes {
    fn f32(shape: Vec<usize>, values: &[f32]) -> Bytes {
        Bytes { dtype: Dtype::F32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    fn u64(keys: &[u64]) -> Bytes {
        Bytes {
            dtype: Dtype::U64,
            shape: vec![keys.len()],
            data: keys.iter().flat_map(|k| k.to_le_bytes()).collect(),
        }
    }
}

fn keys_name(table: &str) -> String {
    format!("{table}.keys")
}

fn values_name(table: &str) -> String {
    format!("{table}.values")
}

impl ModelCard {
    /// The card of `model` (which the caller has validated), with `extra`.
    pub fn new(model: &SavedModel, extra: CardExtra) -> ModelCard {
        let (input, output, forward, mut preprocessing) = describe(&model.model);
        preprocessing.extend(extra.preprocessing);
        let mut tensors: Vec<TensorCard> = model
            .dense
            .iter()
            .map(|t| {
                let layout = if t.name.ends_with(".weight") {
                    "layer weight W, [in, out] row-major: y = x @ W + b"
                } else if t.name.ends_with(".weight_scale") {
                    "the scale of each output column of the int8 weight, [out]"
                } else {
                    "layer bias b, [out]"
                };
                TensorCard {
                    name: t.name.clone(),
                    dtype: "F32".into(),
                    shape: t.shape.clone(),
                    layout: layout.into(),
                }
            })
            .collect();
        for t in &model.int8 {
            tensors.push(TensorCard {
                name: t.name.clone(),
                dtype: "I8".into(),
                shape: t.shape.clone(),
                layout: "layer weight in int8, [in, out] row-major; W = value * weight_scale[out]".into(),
            });
        }
        for t in &model.sparse {
            let n = t.keys.len();
            tensors.push(TensorCard {
                name: keys_name(&t.name),
                dtype: "U64".into(),
                shape: vec![n],
                layout: format!("the keys of the {n} rows of table `{}` that exist", t.name),
            });
            tensors.push(TensorCard {
                name: values_name(&t.name),
                dtype: "F32".into(),
                shape: vec![n, t.dim],
                layout: format!("row i of table `{}` is the row of key {}[i]", t.name, keys_name(&t.name)),
            });
        }
        ModelCard {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            exported_by: concat!("ps-model ", env!("CARGO_PKG_VERSION")).into(),
            architecture: model.model.clone(),
            input,
            output,
            forward,
            preprocessing,
            tensors,
            metrics: extra.metrics,
            run: extra.run,
        }
    }

    /// Reads `dir/card.json`, refusing another format or format version.
    pub fn read(dir: &Path) -> Result<ModelCard> {
        let path = dir.join(CARD_FILE);
        let bytes = read_file(&path, MAX_CARD_BYTES)?;
        let card: ModelCard =
            serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()).in_file(&path))?;
        if card.format != FORMAT {
            let reason = format!("format `{}`, expected `{FORMAT}`", card.format);
            return Err(Error::Decode(reason).in_file(&path));
        }
        if card.format_version != FORMAT_VERSION {
            let found = card.format_version;
            return Err(Error::Version { found, supported: FORMAT_VERSION }.in_file(&path));
        }
        Ok(card)
    }
}

/// Input, output, forward pass and model-level preprocessing of an architecture.
fn describe(kind: &ModelKind) -> (String, String, String, Vec<String>) {
    let tower = |prefix: &str| {
        format!(
            "h = x; for each layer l = 1..L: h = h @ {prefix}fc{{l}}.weight + {prefix}fc{{l}}.bias, \
             then relu(h) for every layer but the last"
        )
    };
    match kind {
        ModelKind::Mlp { layers } | ModelKind::MlpSparse { layers } => (
            format!("x: f32 [batch, {}], one example a row", layers.first().unwrap_or(&0)),
            format!(
                "logits: f32 [batch, {}]; class = argmax(logits), probabilities = softmax(logits)",
                layers.last().unwrap_or(&0)
            ),
            tower(""),
            Vec::new(),
        ),
        ModelKind::MlpInt8 { layers } => (
            format!("x: f32 [batch, {}], one example a row", layers.first().unwrap_or(&0)),
            format!(
                "logits: f32 [batch, {}]; class = argmax(logits), probabilities = softmax(logits)",
                layers.last().unwrap_or(&0)
            ),
            "h = x; for each layer l = 1..L: s = max|h| / 127 per row, q = round(h / s) as int8, \
             h = s * (q @ fc{l}.weight) * fc{l}.weight_scale + fc{l}.bias (int8 products summed in int32), \
             then relu(h) for every layer but the last"
                .into(),
            Vec::new(),
        ),
        ModelKind::Logreg { num_features, table } => (
            format!("sparse features: (index j, value x_j) pairs, 0 <= j < {num_features}"),
            "logit: f32; P(y = 1) = sigmoid(logit); class = 1 if logit > 0".into(),
            format!(
                "logit = w[{num_features}] + sum_j w[j] * x_j, where w[k] is {table}.values[i, 0] for the i \
                 with {table}.keys[i] == k, and 0 if k has no row"
            ),
            vec![format!("feature j is key j; the bias is key {num_features}")],
        ),
        ModelKind::Mf { global_mean, users, items, user_bias, item_bias, .. } => (
            "(user id, item id) pairs; the ids are the keys".into(),
            "predicted rating: f32 (the run's evaluation clips it to [1, 5])".into(),
            format!(
                "rating = {global_mean} + b_u + b_i + dot(p_u, q_i), where p_u is the row of key u in {users}, \
                 q_i of key i in {items}, b_u in {user_bias}, b_i in {item_bias}; a user or item without a \
                 row contributes 0"
            ),
            Vec::new(),
        ),
        ModelKind::Ctr { slots, key_space, emb_dim, embeddings, tower_prefix, .. } => (
            format!("{slots} categorical ids a row, one per slot, each below 2^48"),
            "logit: f32; P(click) = sigmoid(logit)".into(),
            format!(
                "x = the {embeddings} rows of the row's {slots} keys, concatenated in slot order \
                 ([batch, {slots} * {emb_dim}]; a key without a row reads as zeros); then {}; one output, the logit",
                tower(tower_prefix)
            ),
            vec![format!(
                "the key of (slot, id) is splitmix64(slot << 48 | id) mod {key_space}, with \
                 splitmix64(k) in wrapping u64 arithmetic: z = k + 0x9e3779b97f4a7c15; \
                 z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9; z = (z ^ (z >> 27)) * 0x94d049bb133111eb; \
                 return z ^ (z >> 31)"
            )],
        ),
    }
}

/// Writes `model` and its card into `dir` (created if needed) as
/// `model.safetensors` and `card.json`, each through a temporary file, an
/// fsync and a rename, so a reader never sees half a file.
///
/// A pruned model (`mlp_sparse`) is written as the f32 MLP it computes, with
/// its zeros: safetensors has no sparse tensors.
pub fn export(model: &SavedModel, extra: CardExtra, dir: &Path) -> Result<ExportPaths> {
    let densified;
    let model = match model.model {
        ModelKind::MlpSparse { .. } => {
            densified = crate::prune::densify(model)?;
            &densified
        }
        _ => model,
    };
    let io = |what: String| move |source| Error::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;

    let bytes = to_safetensors(model)?;
    let paths = ExportPaths { model: dir.join(MODEL_FILE), card: dir.join(CARD_FILE) };
    write_atomic(&paths.model, &bytes)?;

    let card = ModelCard::new(model, extra);
    let text = serde_json::to_string_pretty(&card).map_err(|e| Error::Encode(e.to_string()))?;
    write_atomic(&paths.card, (text + "\n").as_bytes())?;
    Ok(paths)
}

/// The bytes of `model.safetensors` for `model` (see the module docs).
pub fn to_safetensors(model: &SavedModel) -> Result<Vec<u8>> {
    if let ModelKind::MlpSparse { .. } = model.model {
        return to_safetensors(&crate::prune::densify(model)?);
    }
    model.validate()?;
    let mut tensors: Vec<(String, Bytes)> = Vec::new();
    for t in &model.dense {
        tensors.push((t.name.clone(), Bytes::f32(t.shape.clone(), &t.values)));
    }
    for t in &model.int8 {
        tensors.push((
            t.name.clone(),
            Bytes { dtype: Dtype::I8, shape: t.shape.clone(), data: t.values.clone() },
        ));
    }
    for t in &model.sparse {
        tensors.push((keys_name(&t.name), Bytes::u64(&t.keys)));
        tensors.push((values_name(&t.name), Bytes::f32(vec![t.keys.len(), t.dim], &t.values)));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((name, _)) = tensors.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        return Err(Error::Shape {
            name: name.clone(),
            reason: "two tensors of the export have this name".into(),
        });
    }
    let architecture = serde_json::to_string(&model.model).map_err(|e| Error::Encode(e.to_string()))?;
    let mut metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("architecture".to_string(), architecture),
    ]);
    let inits: BTreeMap<&str, &Init> =
        model.sparse.iter().filter_map(|t| t.init.as_ref().map(|i| (t.name.as_str(), i))).collect();
    if !inits.is_empty() {
        let json = serde_json::to_string(&inits).map_err(|e| Error::Encode(e.to_string()))?;
        metadata.insert(SPARSE_INIT.to_string(), json);
    }
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Writes `path` through `path.tmp`, an fsync and a rename, then fsyncs the
/// folder so that the rename itself survives a crash.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| Error::Io { what, source }
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(io("creating a temporary file for"))?;
    std::io::Write::write_all(&mut file, bytes).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io("renaming into"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Not every platform can open a folder; the file itself is synced.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Reads `dir/model.safetensors` back into a validated [`SavedModel`].
pub fn import(dir: &Path) -> Result<SavedModel> {
    let path = dir.join(MODEL_FILE);
    let bytes = read_file(&path, MAX_FILE_BYTES)?;
    from_safetensors(&bytes).map_err(|e| e.in_file(&path))
}

/// Decodes the bytes of an exported `model.safetensors`: the metadata names
/// the architecture, which names every tensor the file must hold, with its
/// dtype and shape; any other tensor is an error.
pub fn from_safetensors(bytes: &[u8]) -> Result<SavedModel> {
    check_offsets(bytes)?;
    let invalid = |e: safetensors::SafeTensorError| Error::SafeTensors(e.to_string());
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let file = SafeTensors::deserialize(bytes).map_err(invalid)?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| Error::Decode(format!("the safetensors metadata has no `{key}`")))
    };
    if field("format")? != FORMAT {
        return Err(Error::Decode(format!("the safetensors metadata's format is not `{FORMAT}`")));
    }
    let version = field("format_version")?;
    let found =
        version.parse().map_err(|_| Error::Decode(format!("format_version `{version}` is not a number")))?;
    if found != FORMAT_VERSION {
        return Err(Error::Version { found, supported: FORMAT_VERSION });
    }
    let kind: ModelKind = serde_json::from_str(field("architecture")?)
        .map_err(|e| Error::Decode(format!("architecture: {e}")))?;

    let dense = kind
        .dense_tensors()?
        .into_iter()
        .map(|(name, shape)| {
            let values = f32s(tensor(&file, &name, Dtype::F32, &shape)?);
            Ok(DenseTensor { name, shape, values })
        })
        .collect::<Result<Vec<_>>>()?;
    let int8 = kind
        .int8_tensors()?
        .into_iter()
        .map(|(name, shape)| {
            let values = tensor(&file, &name, Dtype::I8, &shape)?.to_vec();
            Ok(Int8Tensor { name, shape, values })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut inits: BTreeMap<String, Init> = match meta.get(SPARSE_INIT) {
        Some(json) => serde_json::from_str(json).map_err(|e| Error::Decode(format!("{SPARSE_INIT}: {e}")))?,
        None => BTreeMap::new(),
    };
    let mut sparse = Vec::new();
    for (name, dim) in kind.sparse_tables() {
        let keys_view = file.tensor(&keys_name(name)).map_err(|_| missing(&keys_name(name)))?;
        let n = keys_view.shape().first().copied().unwrap_or(0);
        let keys = u64s(tensor(&file, &keys_name(name), Dtype::U64, &[n])?);
        let values = f32s(tensor(&file, &values_name(name), Dtype::F32, &[n, dim])?);
        let init = inits.remove(name);
        sparse.push(SparseTable { name: name.into(), dim, keys, values, init });
    }
    let expected = dense.len() + int8.len() + 2 * sparse.len();
    if file.len() != expected {
        let known: Vec<String> = dense
            .iter()
            .map(|t| t.name.clone())
            .chain(int8.iter().map(|t| t.name.clone()))
            .chain(sparse.iter().flat_map(|t| [keys_name(&t.name), values_name(&t.name)]))
            .collect();
        let mut extra: Vec<&str> =
            file.names().into_iter().filter(|n| !known.iter().any(|k| k == n)).collect();
        extra.sort_unstable();
        return Err(Error::Shape {
            name: extra.join(", "),
            reason: format!("not a tensor of the architecture {kind:?}"),
        });
    }
    let mut model = SavedModel::new(kind, dense, sparse);
    model.int8 = int8;
    model.validate()?;
    Ok(model)
}

/// safetensors' own limit on the header's length.
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Refuses a header whose tensors claim data past the end of the file.
/// safetensors 0.8 adds the last offset to the header's length unchecked,
/// which panics where overflow checks are on (debug and test builds) if the
/// offsets come near `usize::MAX`; this keeps such a file an error in every
/// build. Anything else wrong with the header is left to the crate.
fn check_offsets(bytes: &[u8]) -> Result<()> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        data_offsets: Option<(u64, u64)>,
    }
    let Some((len, rest)) = bytes.split_first_chunk::<8>() else { return Ok(()) };
    let header = usize::try_from(u64::from_le_bytes(*len))
        .ok()
        .filter(|&n| n <= MAX_HEADER_BYTES)
        .and_then(|n| rest.get(..n));
    let Some(header) = header else { return Ok(()) };
    let data_len = (rest.len() - header.len()) as u64;
    let Ok(entries) = serde_json::from_slice::<HashMap<String, Entry>>(header) else { return Ok(()) };
    let last = entries.into_iter().filter_map(|(name, e)| Some((e.data_offsets?.1, name))).max();
    match last {
        Some((end, name)) if end > data_len => Err(Error::SafeTensors(format!(
            "tensor `{name}` ends at byte {end} of a {data_len}-byte data section"
        ))),
        _ => Ok(()),
    }
}

fn missing(name: &str) -> Error {
    Error::Shape { name: name.into(), reason: "missing".into() }
}

/// The data of tensor `name`, which must have `dtype` and `shape`.
fn tensor<'a>(file: &SafeTensors<'a>, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8]> {
    let t = file.tensor(name).map_err(|_| missing(name))?;
    if t.dtype() != dtype {
        return Err(Error::Shape {
            name: name.into(),
            reason: format!("dtype {}, expected {dtype}", t.dtype()),
        });
    }
    if t.shape() != shape {
        return Err(Error::Shape {
            name: name.into(),
            reason: format!("shape {:?}, expected {shape:?}", t.shape()),
        });
    }
    // The crate checked that the data is exactly shape x dtype bytes.
    Ok(t.data())
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn u64s(data: &[u8]) -> Vec<u64> {
    data.chunks_exact(8)
        .map(|b| {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            u64::from_le_bytes(le)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mlp, Tower, TowerWorkspace, logreg, mf};

    /// Distinct, deterministic values.
    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
    }

    fn dense(name: &str, shape: Vec<usize>) -> DenseTensor {
        let values = values(shape.iter().product(), name.len() as f32);
        DenseTensor { name: name.into(), shape, values }
    }

    fn table(name: &str, dim: usize, keys: Vec<u64>) -> SparseTable {
        SparseTable {
            name: name.into(),
            dim,
            values: values(keys.len() * dim, name.len() as f32),
            keys,
            init: None,
        }
    }

    fn mlp() -> SavedModel {
        let dense = vec![
            dense("fc1.weight", vec![3, 4]),
            dense("fc1.bias", vec![4]),
            dense("fc2.weight", vec![4, 2]),
            dense("fc2.bias", vec![2]),
        ];
        SavedModel::new(ModelKind::Mlp { layers: vec![3, 4, 2] }, dense, Vec::new())
    }

    /// Features 1, 2 and 4 have no row; key 5 is the bias.
    fn logreg() -> SavedModel {
        let kind = ModelKind::Logreg { num_features: 5, table: "a9a.w".into() };
        SavedModel::new(kind, Vec::new(), vec![table("a9a.w", 1, vec![0, 3, 5])])
    }

    fn mf() -> SavedModel {
        let kind = ModelKind::Mf {
            dim: 2,
            global_mean: 3.53,
            users: "mf.user".into(),
            items: "mf.item".into(),
            user_bias: "mf.user_bias".into(),
            item_bias: "mf.item_bias".into(),
        };
        let sparse = vec![
            table("mf.user", 2, vec![1, 7]),
            table("mf.item", 2, vec![3, 942, 11]),
            table("mf.user_bias", 1, vec![1, 7]),
            table("mf.item_bias", 1, vec![3, 942, 11]),
        ];
        SavedModel::new(kind, Vec::new(), sparse)
    }

    fn ctr() -> SavedModel {
        let kind = ModelKind::Ctr {
            slots: 2,
            key_space: 100,
            emb_dim: 2,
            hidden: vec![3],
            embeddings: "ctr.emb".into(),
            tower_prefix: "ctr.".into(),
        };
        let dense = vec![
            dense("ctr.fc1.weight", vec![4, 3]),
            dense("ctr.fc1.bias", vec![3]),
            dense("ctr.fc2.weight", vec![3, 1]),
            dense("ctr.fc2.bias", vec![1]),
        ];
        SavedModel::new(kind, dense, vec![table("ctr.emb", 2, vec![5, 42, 99])])
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-model-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// One prediction per model kind, computed with the crate's models.
    fn predict(m: &SavedModel) -> Vec<f32> {
        let flat: Vec<f32> = m.dense.iter().flat_map(|t| t.values.iter().copied()).collect();
        let row = |table: &str, key: u64| {
            let t = m.sparse(table).unwrap();
            let i = t.keys.iter().position(|&k| k == key);
            i.map_or(vec![0.0; t.dim], |i| t.values[i * t.dim..(i + 1) * t.dim].to_vec())
        };
        match &m.model {
            ModelKind::Mlp { layers } => {
                let x = ndarray::Array2::from_shape_vec((2, 3), values(6, 9.0)).unwrap();
                let (loss, acc) = Mlp::new(layers).evaluate(&flat, x.view(), &[0, 1]);
                vec![loss, acc]
            }
            ModelKind::MlpInt8 { .. } => {
                let mut out = Vec::new();
                crate::quant::Int8Mlp::new(m).unwrap().predict(&values(6, 9.0), &mut out);
                out
            }
            ModelKind::MlpSparse { .. } => {
                let mut out = Vec::new();
                crate::prune::SparseMlp::new(m).unwrap().predict(&values(6, 9.0), &mut out);
                out
            }
            ModelKind::Logreg { num_features, table } => {
                let w: Vec<f32> = (0..=*num_features as u64).map(|k| row(table, k)[0]).collect();
                vec![logreg::logit(&w, &[0, 2, 3], &[1.0, 1.0, 0.5])]
            }
            ModelKind::Mf { global_mean, users, items, user_bias, item_bias, .. } => {
                let (p, q) = (row(users, 7), row(items, 942));
                vec![mf::predict(*global_mean, &p, &q, row(user_bias, 7)[0], row(item_bias, 942)[0])]
            }
            ModelKind::Ctr { embeddings, hidden, .. } => {
                let x: Vec<f32> = [42, 5, 99, 17].iter().flat_map(|&k| row(embeddings, k)).collect();
                Tower::new(4, hidden).logits(&flat, &x, &mut TowerWorkspace::default()).to_vec()
            }
        }
    }

    /// safetensors has no sparse tensors: a pruned model leaves as the f32
    /// MLP it computes.
    #[test]
    fn a_pruned_model_exports_as_its_dense_mlp() {
        let pruned = crate::prune::magnitude_prune(&mlp(), 0.5).unwrap();
        let sparse = crate::prune::to_sparse(&pruned).unwrap();
        assert_eq!(from_safetensors(&to_safetensors(&sparse).unwrap()).unwrap(), pruned);
    }

    #[test]
    fn every_kind_round_trips_through_a_folder_with_its_card() {
        let int8 = crate::quant::quantize_mlp(&mlp()).unwrap();
        for (tag, model) in
            [("mlp", mlp()), ("int8", int8), ("logreg", logreg()), ("mf", mf()), ("ctr", ctr())]
        {
            let dir = temp_dir(tag);
            let extra = CardExtra {
                preprocessing: vec!["data note".into()],
                metrics: BTreeMap::from([("test_loss".into(), 0.25)]),
                run: Some(RunInfo { run_dir: "runs/x".into(), config_toml: "[job]\n".into() }),
            };
            let paths = export(&model, extra, &dir).unwrap();
            assert_eq!(paths, ExportPaths { model: dir.join(MODEL_FILE), card: dir.join(CARD_FILE) });
            let back = import(&dir).unwrap();
            assert_eq!(back, model, "{tag}");
            assert_eq!(predict(&back), predict(&model), "{tag}");

            let card = ModelCard::read(&dir).unwrap();
            assert_eq!(card.architecture, model.model);
            assert_eq!(card.preprocessing.last().map(String::as_str), Some("data note"));
            assert_eq!(card.metrics["test_loss"], 0.25);
            assert_eq!(card.run.as_ref().unwrap().run_dir, "runs/x");
            let file = std::fs::read(&paths.model).unwrap();
            let file = SafeTensors::deserialize(&file).unwrap();
            for t in &card.tensors {
                let view = file.tensor(&t.name).unwrap();
                assert_eq!(
                    (view.dtype().to_string(), view.shape()),
                    (t.dtype.clone(), &t.shape[..]),
                    "{tag}"
                );
            }
            assert_eq!(card.tensors.len(), file.len());
            let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            left.sort();
            assert_eq!(left, [CARD_FILE, MODEL_FILE], "no temporary files are left");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// The layout docs/EXPORT.md promises: weights `[in, out]`, `x @ W + b`.
    #[test]
    fn the_documented_mlp_layout_reproduces_the_model() {
        let model = mlp();
        let bytes = to_safetensors(&model).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let get = |name: &str| f32s(file.tensor(name).unwrap().data());
        let x = values(6, 9.0);
        let mut loss = 0.0;
        for (row, label) in x.chunks(3).zip([0, 1]) {
            let mut h = row.to_vec();
            for l in 1..=2 {
                let (w, b) = (get(&format!("fc{l}.weight")), get(&format!("fc{l}.bias")));
                let out = b.len();
                h = (0..out)
                    .map(|j| b[j] + h.iter().enumerate().map(|(i, v)| v * w[i * out + j]).sum::<f32>())
                    .map(|z| if l < 2 { z.max(0.0) } else { z })
                    .collect();
            }
            let log_sum = h.iter().map(|z| z.exp()).sum::<f32>().ln();
            loss += (log_sum - h[label]) / 2.0;
        }
        assert!((loss - predict(&model)[0]).abs() < 1e-5, "{loss} vs {:?}", predict(&model));
    }

    #[test]
    fn sparse_tables_export_only_their_rows_with_keys() {
        let bytes = to_safetensors(&logreg()).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let keys = file.tensor("a9a.w.keys").unwrap();
        assert_eq!((keys.dtype(), keys.shape()), (Dtype::U64, &[3][..]));
        assert_eq!(u64s(keys.data()), [0, 3, 5]);
        let vals = file.tensor("a9a.w.values").unwrap();
        assert_eq!((vals.dtype(), vals.shape()), (Dtype::F32, &[3, 1][..]));
        assert_eq!(f32s(vals.data()), logreg().sparse[0].values);
        assert_eq!(file.len(), 2);
    }

    /// A file of `tensors` (name, dtype, shape; zero bytes) under the
    /// metadata of `kind`, for tampering.
    fn craft(kind: &ModelKind, tensors: &[(&str, Dtype, &[usize])]) -> Vec<u8> {
        let tensors: Vec<(String, Bytes)> = tensors
            .iter()
            .map(|&(name, dtype, shape)| {
                let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                (name.to_string(), Bytes { dtype, shape: shape.to_vec(), data: vec![0; len] })
            })
            .collect();
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("architecture".to_string(), serde_json::to_string(kind).unwrap()),
        ]);
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata)).unwrap()
    }

    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) {
        let err = from_safetensors(bytes).unwrap_err().to_string();
        assert!(err.contains(needle), "`{err}` lacks `{needle}`");
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let mlp_kind = mlp().model;
        let ok: [(&str, Dtype, &[usize]); 4] = [
            ("fc1.weight", Dtype::F32, &[3, 4]),
            ("fc1.bias", Dtype::F32, &[4]),
            ("fc2.weight", Dtype::F32, &[4, 2]),
            ("fc2.bias", Dtype::F32, &[2]),
        ];
        assert!(from_safetensors(&craft(&mlp_kind, &ok)).is_ok());

        let with = |i: usize, t: (&'static str, Dtype, &'static [usize])| {
            let mut v = ok.to_vec();
            v[i] = t;
            craft(&mlp_kind, &v)
        };
        refused(&with(0, ("fc1.weight", Dtype::F64, &[3, 4])), "dtype F64, expected F32");
        refused(&with(0, ("fc1.weight", Dtype::F32, &[4, 3])), "shape [4, 3], expected [3, 4]");
        refused(&craft(&mlp_kind, &ok[..3]), "`fc2.bias`: missing");
        let mut extra = ok.to_vec();
        extra.push(("fc3.weight", Dtype::F32, &[2, 2]));
        refused(&craft(&mlp_kind, &extra), "`fc3.weight`: not a tensor of the architecture");

        // Sparse tables: keys must be U64 [n] and values F32 [n, dim].
        let lr = logreg().model;
        assert!(
            from_safetensors(&craft(
                &lr,
                &[("a9a.w.keys", Dtype::U64, &[3]), ("a9a.w.values", Dtype::F32, &[3, 1])]
            ))
            .is_ok()
        );
        refused(
            &craft(&lr, &[("a9a.w.keys", Dtype::I64, &[3]), ("a9a.w.values", Dtype::F32, &[3, 1])]),
            "dtype I64",
        );
        refused(
            &craft(&lr, &[("a9a.w.keys", Dtype::U64, &[3]), ("a9a.w.values", Dtype::F32, &[2, 1])]),
            "shape [2, 1]",
        );
        refused(
            &craft(&lr, &[("a9a.w.keys", Dtype::U64, &[3, 1]), ("a9a.w.values", Dtype::F32, &[3, 1])]),
            "shape [3, 1]",
        );
        refused(&craft(&lr, &[("a9a.w.values", Dtype::F32, &[3, 1])]), "`a9a.w.keys`: missing");

        // An architecture far larger than the file asks for nothing.
        let huge = ModelKind::Mlp { layers: vec![1 << 40, 1 << 40] };
        refused(&craft(&huge, &ok), "`fc1.weight`: shape [3, 4], expected [1099511627776, 1099511627776]");

        // Truncated anywhere.
        let good = to_safetensors(&mlp()).unwrap();
        for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
            refused(&good[..cut], "not a valid safetensors file");
        }
        // Any one byte changed: an error or a model, never a panic.
        for i in 0..good.len() {
            for b in [0x00, 0xff, b'9', b'"', b'-'] {
                let mut bad = good.clone();
                bad[i] = b;
                let _ = from_safetensors(&bad);
            }
        }
        // A header length past the file, or absurd.
        for n in [good.len() as u64, u64::MAX] {
            let mut bad = good.clone();
            bad[..8].copy_from_slice(&n.to_le_bytes());
            refused(&bad, "not a valid safetensors file");
        }
        // A header whose offsets and shape claim 4 TB of data the file does not hold.
        let header =
            br#"{"fc1.weight":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}"#;
        let mut lying = (header.len() as u64).to_le_bytes().to_vec();
        lying.extend_from_slice(header);
        lying.extend_from_slice(&[0; 16]);
        refused(&lying, "not a valid safetensors file");

        // Offsets that add up to near usize::MAX (safetensors 0.8 alone would
        // overflow adding them to the header's length).
        let entries: Vec<String> = (0..8u64)
            .map(|i| {
                let size = (1u64 << 61) - 1;
                let (start, end) = (i * size, (i + 1) * size);
                format!(r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{start},{end}]}}"#)
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut lying = (header.len() as u64).to_le_bytes().to_vec();
        lying.extend_from_slice(header.as_bytes());
        refused(&lying, "ends at byte 18446744073709551608 of a 0-byte data section");

        // Metadata: absent, another format version, an unknown architecture.
        let plain = safetensors::serialize(Vec::<(&str, &Bytes)>::new(), None).unwrap();
        refused(&plain, "no `format`");
        let edit = |from: &str, to: &str| {
            let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
            let header = std::str::from_utf8(&good[8..8 + n]).unwrap().replace(from, to);
            assert_eq!(header.len(), n, "an edit of the same length");
            [&good[..8], header.as_bytes(), &good[8 + n..]].concat()
        };
        refused(&edit(r#""format_version":"1""#, r#""format_version":"2""#), "version 2");
        refused(&edit(r#""kind\":\"mlp"#, r#""kind\":\"rnn"#), "architecture: unknown variant `rnn`");
    }
}
