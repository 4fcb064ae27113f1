//! Codecs that make values and gradients smaller on the wire: fp16, bf16,
//! int8 with a scale per group, and top-k sparsification, plus the error
//! feedback step that keeps lossy gradient codecs from biasing training.
//!
//! A [`Codec`] is chosen per table and direction in the run file and is part
//! of the table's spec (so every worker and shard agree on it at
//! registration); decoding needs only its [`CodecKind`], which every push
//! and pull carries. Layouts (little-endian throughout):
//!
//! | kind   | bytes for `n` values                                              |
//! | ------ | ----------------------------------------------------------------- |
//! | `F32`  | `4n`                                                              |
//! | `F16`, `Bf16` | `2n` (IEEE 754 binary16; bfloat16), round to nearest even |
//! | `Int8` | per group of `group` values: an f32 scale, then one `i8` a value; value = `q * scale` |
//! | `TopK` | `u32 k`, `k` u32 indices (strictly increasing), `k` f32 values; the rest are 0 |
//!
//! A group is a dense chunk (one scale per chunk) or a sparse row (one scale
//! per row). Top-k spans the whole block (a chunk, or every row of a sparse
//! push). Decoding never trusts the bytes: the caller says how many values
//! it expects (the shard knows its chunk lengths and row widths), every
//! length is checked before anything is written, nothing is allocated from
//! a length read off the wire, and a failed decode writes nothing.
//!
//! Pure functions, no I/O. Half-precision conversions come from the `half`
//! crate (round to nearest even, subnormals, NaN handled as IEEE says).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::partition::splitmix64;
use crate::{Error, Result};

/// How a block of values travels, with its encoder settings. In a run
/// file: `{ codec = "f32" | "fp16" | "bf16" }`, `{ codec = "int8",
/// stochastic = true }`, `{ codec = "top_k", ratio = 0.1 }`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "CodecTable", into = "CodecTable")]
pub enum Codec {
    /// Plain little-endian f32 (lossless).
    #[default]
    F32,
    /// IEEE half precision: 11 significant bits, finite range +-65504
    /// (larger values are saturated).
    F16,
    /// bfloat16: 8 significant bits, f32's exponent range.
    Bf16,
    /// One signed byte a value and an f32 scale per group (`max |x| / 127`);
    /// rounds to nearest, or stochastically (unbiased) with `stochastic`.
    Int8 { stochastic: bool },
    /// Only the `ceil(ratio * n)` values of largest magnitude, with their
    /// indices.
    TopK { ratio: f32 },
}

/// The short form of the command line: `f32`, `fp16`, `bf16`, `int8`,
/// `int8:stochastic`, `top_k:RATIO`.
impl std::str::FromStr for Codec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Codec> {
        let codec = match s.split_once(':') {
            None => CodecTable { codec: s.to_string(), stochastic: None, ratio: None },
            Some(("int8", "stochastic")) => {
                CodecTable { codec: "int8".into(), stochastic: Some(true), ratio: None }
            }
            Some(("top_k", r)) => {
                let ratio = r
                    .parse()
                    .map_err(|_| Error::InvalidCodec(format!("top_k ratio `{r}` is not a number")))?;
                CodecTable { codec: "top_k".into(), stochastic: None, ratio: Some(ratio) }
            }
            _ => return Err(Error::InvalidCodec(format!("unknown codec `{s}`"))),
        };
        Codec::try_from(codec)
    }
}

/// A codec as a run file spells it (a flat table, so that a key that does
/// not belong to the codec is an error).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodecTable {
    codec: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stochastic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ratio: Option<f32>,
}

impl TryFrom<CodecTable> for Codec {
    type Error = Error;
    fn try_from(t: CodecTable) -> Result<Codec> {
        let codec = match (t.codec.as_str(), t.stochastic, t.ratio) {
            ("f32", None, None) => Codec::F32,
            ("fp16", None, None) => Codec::F16,
            ("bf16", None, None) => Codec::Bf16,
            ("int8", stochastic, None) => Codec::Int8 { stochastic: stochastic.unwrap_or(false) },
            ("top_k", None, Some(ratio)) => Codec::TopK { ratio },
            ("top_k", _, None) => return Err(Error::InvalidCodec("top_k needs a `ratio`".into())),
            ("f32" | "fp16" | "bf16" | "int8" | "top_k", ..) => {
                return Err(Error::InvalidCodec(format!(
                    "`stochastic` belongs to int8 and `ratio` to top_k, not {}",
                    t.codec
                )));
            }
            (other, ..) => {
                return Err(Error::InvalidCodec(format!(
                    "unknown codec `{other}` (f32, fp16, bf16, int8, top_k)"
                )));
            }
        };
        codec.validate()?;
        Ok(codec)
    }
}

impl From<Codec> for CodecTable {
    fn from(c: Codec) -> CodecTable {
        let (stochastic, ratio) = match c {
            Codec::Int8 { stochastic } => (Some(stochastic), None),
            Codec::TopK { ratio } => (None, Some(ratio)),
            _ => (None, None),
        };
        CodecTable { codec: c.kind().name().to_string(), stochastic, ratio }
    }
}

/// What is on the wire: all a decoder needs to know. The discriminants are
/// the wire enum's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodecKind {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    Int8 = 3,
    TopK = 4,
}

impl CodecKind {
    pub fn name(self) -> &'static str {
        match self {
            CodecKind::F32 => "f32",
            CodecKind::F16 => "fp16",
            CodecKind::Bf16 => "bf16",
            CodecKind::Int8 => "int8",
            CodecKind::TopK => "top_k",
        }
    }
}

impl std::fmt::Display for CodecKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Int8 { stochastic: true } => write!(f, "int8 (stochastic)"),
            Codec::TopK { ratio } => write!(f, "top_k {ratio}"),
            c => f.write_str(c.kind().name()),
        }
    }
}

impl Codec {
    pub fn kind(&self) -> CodecKind {
        match self {
            Codec::F32 => CodecKind::F32,
            Codec::F16 => CodecKind::F16,
            Codec::Bf16 => CodecKind::Bf16,
            Codec::Int8 { .. } => CodecKind::Int8,
            Codec::TopK { .. } => CodecKind::TopK,
        }
    }

    /// Whether the receiver may see other values than were encoded.
    pub fn is_lossy(&self) -> bool {
        !matches!(self, Codec::F32)
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Codec::TopK { ratio } if !(ratio.is_finite() && *ratio > 0.0 && *ratio <= 1.0) => {
                Err(Error::InvalidCodec(format!("top_k ratio must be in (0, 1], got {ratio}")))
            }
            _ => Ok(()),
        }
    }

    /// Values of pulls must arrive whole: only f32, fp16 and bf16 may carry them.
    pub fn validate_for_pull(&self) -> Result<()> {
        match self.kind() {
            CodecKind::F32 | CodecKind::F16 | CodecKind::Bf16 => Ok(()),
            k => Err(Error::InvalidCodec(format!("pulls travel in f32, fp16 or bf16, not {k}"))),
        }
    }
}

/// A table's codecs: gradients of pushes, values of training pulls.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Codecs {
    pub push: Codec,
    pub pull: Codec,
}

impl Codecs {
    pub fn validate(&self) -> Result<()> {
        self.push.validate()?;
        self.pull.validate()?;
        self.pull.validate_for_pull()
    }
}

/// Largest magnitude an int8 code takes.
const INT8_MAX: f32 = 127.0;

/// The finite range of fp16.
const F16_MAX: f32 = 65504.0;
const F16_MAX_NEG: f32 = -65504.0;

/// fp16 values are converted through stack buffers this long: `half`'s
/// slice conversions use F16C, several lanes at a time, where the CPU has it.
const BATCH: usize = 512;

/// Appends the encoding of `values` to `out`. `group` is the int8 scale
/// group (a dense chunk's length, or a sparse row's width); `seed` drives
/// stochastic rounding, so the same inputs always give the same bytes.
pub fn encode(codec: Codec, values: &[f32], group: usize, seed: u64, out: &mut Vec<u8>) {
    match codec {
        Codec::F32 => crate::codec::append_f32(out, values),
        Codec::F16 => {
            let start = out.len();
            out.resize(start + 2 * values.len(), 0);
            let (mut wide, mut half) = ([0.0f32; BATCH], [f16::ZERO; BATCH]);
            for (v, bytes) in values.chunks(BATCH).zip(out[start..].chunks_mut(2 * BATCH)) {
                let (wide, half) = (&mut wide[..v.len()], &mut half[..v.len()]);
                // Saturate: a large finite gradient must not become infinite
                // (NaN stays NaN).
                wide.iter_mut().zip(v).for_each(|(w, &x)| *w = x.clamp(F16_MAX_NEG, F16_MAX));
                half.convert_from_f32_slice(wide);
                bytes
                    .chunks_exact_mut(2)
                    .zip(half.iter())
                    .for_each(|(b, h)| b.copy_from_slice(&h.to_le_bytes()));
            }
        }
        Codec::Bf16 => {
            let start = out.len();
            out.resize(start + 2 * values.len(), 0);
            for (b, &v) in out[start..].chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
        Codec::Int8 { stochastic } => {
            let group = group.max(1);
            let start = out.len();
            out.resize(start + encoded_len(CodecKind::Int8, values.len(), group).unwrap_or(0), 0);
            let mut rng = seed;
            for (block, bytes) in values.chunks(group).zip(out[start..].chunks_mut(group + 4)) {
                let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = max / INT8_MAX;
                let (head, codes) = bytes.split_at_mut(4);
                head.copy_from_slice(&scale.to_le_bytes());
                // Multiply by 1 / scale where that is finite; a subnormal
                // scale has no finite inverse and is divided by.
                let inv = if scale >= f32::MIN_POSITIVE { 1.0 / scale } else { 0.0 };
                if !stochastic && inv > 0.0 {
                    // The common case as a branch-free loop the compiler
                    // vectorizes: round half away from zero (`as` truncates).
                    for (c, &v) in codes.iter_mut().zip(block) {
                        let y = (v * inv).clamp(-INT8_MAX, INT8_MAX);
                        *c = (y + 0.5f32.copysign(y)) as i8 as u8;
                    }
                    continue;
                }
                let unit = |v: f32| {
                    if inv > 0.0 {
                        v * inv
                    } else if scale > 0.0 {
                        v / scale
                    } else {
                        0.0
                    }
                };
                for (c, &v) in codes.iter_mut().zip(block) {
                    let y = unit(v);
                    let q = if stochastic {
                        // floor(y) + Bernoulli(frac(y)): E[q] = y.
                        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let u = (splitmix64(rng) >> 40) as f32 / (1u64 << 24) as f32;
                        let t = y as i32;
                        let floor = if t as f32 > y { t - 1 } else { t };
                        floor + i32::from(u < y - floor as f32)
                    } else {
                        // Round half away from zero (`as` truncates, and
                        // maps NaN to 0), without a libm call.
                        (y + 0.5f32.copysign(y)) as i32
                    };
                    *c = q.clamp(-127, 127) as i8 as u8;
                }
            }
        }
        Codec::TopK { ratio } => {
            let n = values.len();
            let k = top_k_count(ratio, n);
            let mut idx: Vec<u32> = (0..n.min(u32::MAX as usize) as u32).collect();
            if k < idx.len() {
                // Largest magnitudes first (NaN counts as largest: it is
                // sent, and the shard refuses it).
                idx.select_nth_unstable_by(k, |&a, &b| {
                    values[b as usize].abs().total_cmp(&values[a as usize].abs())
                });
                idx.truncate(k);
            }
            idx.sort_unstable();
            out.reserve(4 + 8 * idx.len());
            out.extend_from_slice(&(idx.len() as u32).to_le_bytes());
            for &i in &idx {
                out.extend_from_slice(&i.to_le_bytes());
            }
            for &i in &idx {
                out.extend_from_slice(&values[i as usize].to_le_bytes());
            }
        }
    }
}

/// The fingerprint of a push's codecs (`PushMeta.codecs`): 0 when every
/// block is f32, else FNV-1a 64 over one byte per block (the wire enum
/// value), never 0. A scalar, so the push metadata stays a plain value.
pub fn codecs_tag(kinds: impl IntoIterator<Item = CodecKind>) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut lossy = false;
    for k in kinds {
        lossy |= k != CodecKind::F32;
        hash = (hash ^ k as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    if lossy { hash.max(1) } else { 0 }
}

/// How many values top-k with `ratio` keeps of `n`: `ceil(ratio * n)`, at
/// least one of a non-empty block.
pub fn top_k_count(ratio: f32, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((f64::from(ratio) * n as f64).ceil() as usize).clamp(1, n)
}

fn bad(what: &'static str, kind: CodecKind, reason: String) -> Error {
    Error::BadEncoding { what, codec: kind.name(), reason }
}

/// Bytes of `n` values encoded as `kind` (int8 groups of `group`); `None`
/// for top-k, whose length depends on how many values were kept (or on
/// overflow).
pub fn encoded_len(kind: CodecKind, n: usize, group: usize) -> Option<usize> {
    match kind {
        CodecKind::F32 => n.checked_mul(4),
        CodecKind::F16 | CodecKind::Bf16 => n.checked_mul(2),
        CodecKind::Int8 => n.div_ceil(group.max(1)).checked_mul(4)?.checked_add(n),
        CodecKind::TopK => None,
    }
}

/// Decodes a block of `n` values into a new vector. For every kind but
/// top-k the byte length is checked before anything is allocated; a top-k
/// block allocates `n`, which the caller bounds (a registered chunk length,
/// or keys x row width under the shard's message limit).
pub fn decode(kind: CodecKind, what: &'static str, bytes: &[u8], n: usize, group: usize) -> Result<Vec<f32>> {
    if kind != CodecKind::TopK && encoded_len(kind, n, group) != Some(bytes.len()) {
        return Err(length_error(kind, what, bytes.len(), n, encoded_len(kind, n, group)));
    }
    let mut out = vec![0.0; n];
    decode_into(kind, what, bytes, group, &mut out)?;
    Ok(out)
}

fn length_error(kind: CodecKind, what: &'static str, got: usize, n: usize, expected: Option<usize>) -> Error {
    let expected = expected.map_or("more".into(), |e| e.to_string());
    bad(what, kind, format!("{got} bytes, expected {expected} for {n} values"))
}

/// Decodes `bytes` (of `kind`, int8 groups of `group`) into `out`, which
/// must be exactly as long as the block the sender encoded. Checks every
/// length, scale and index first; on an error `out` is unchanged.
pub fn decode_into(
    kind: CodecKind,
    what: &'static str,
    bytes: &[u8],
    group: usize,
    out: &mut [f32],
) -> Result<()> {
    let n = out.len();
    let want = |expected: Option<usize>| -> Result<()> {
        match expected {
            Some(e) if e == bytes.len() => Ok(()),
            _ => Err(length_error(kind, what, bytes.len(), n, expected)),
        }
    };
    match kind {
        CodecKind::F32 => crate::codec::decode_f32_into(what, bytes, out),
        CodecKind::F16 => {
            want(encoded_len(kind, n, group))?;
            let mut half = [f16::ZERO; BATCH];
            for (o, b) in out.chunks_mut(BATCH).zip(bytes.chunks(2 * BATCH)) {
                let half = &mut half[..o.len()];
                half.iter_mut()
                    .zip(b.chunks_exact(2))
                    .for_each(|(h, b)| *h = f16::from_le_bytes([b[0], b[1]]));
                half.convert_to_f32_slice(o);
            }
            Ok(())
        }
        CodecKind::Bf16 => {
            want(encoded_len(kind, n, group))?;
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            Ok(())
        }
        CodecKind::Int8 => {
            let group = group.max(1);
            want(encoded_len(kind, n, group))?;
            let scales = bytes.chunks(group + 4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if let Some(s) = scales.clone().find(|s| !(s.is_finite() && *s >= 0.0)) {
                return Err(bad(what, kind, format!("scale {s} is not a finite non-negative number")));
            }
            for ((o, b), scale) in out.chunks_mut(group).zip(bytes.chunks(group + 4)).zip(scales) {
                for (v, &q) in o.iter_mut().zip(&b[4..]) {
                    *v = f32::from(q as i8) * scale;
                }
            }
            Ok(())
        }
        CodecKind::TopK => {
            let Some(head) = bytes.get(..4) else {
                return Err(bad(what, kind, format!("{} bytes, no count", bytes.len())));
            };
            let k = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if k > n {
                return Err(bad(what, kind, format!("{k} values sent of a block of {n}")));
            }
            want(k.checked_mul(8).and_then(|b| b.checked_add(4)))?;
            let (indices, values) = bytes[4..].split_at(4 * k);
            let index = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let mut previous = None;
            for i in indices.chunks_exact(4).map(index) {
                if i >= n || previous.is_some_and(|p| i <= p) {
                    return Err(bad(
                        what,
                        kind,
                        format!("index {i} out of order or of range (block of {n})"),
                    ));
                }
                previous = Some(i);
            }
            out.fill(0.0);
            for (i, v) in indices.chunks_exact(4).map(index).zip(values.chunks_exact(4)) {
                out[i] = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            }
            Ok(())
        }
    }
}

/// One step of error feedback (Seide et al., "1-bit SGD", 2014; Karimireddy
/// et al., "Error feedback fixes SignSGD", 2019): encodes `grad + residual`
/// into `out` and leaves in `residual` what the receiver will not see
/// (`grad + residual - decode(out)`). Over any number of steps, the sum of
/// what was sent plus the last residual equals the sum of the gradients, so
/// a lossy codec delays information instead of losing it.
pub fn encode_with_feedback(
    codec: Codec,
    grad: &[f32],
    residual: &mut [f32],
    group: usize,
    seed: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    if grad.len() != residual.len() {
        return Err(Error::LengthMismatch { what: "residual", expected: grad.len(), got: residual.len() });
    }
    for (r, g) in residual.iter_mut().zip(grad) {
        *r += g;
    }
    let start = out.len();
    encode(codec, residual, group, seed, out);
    let mut sent = vec![0.0f32; residual.len()];
    decode_into(codec.kind(), "own encoding", &out[start..], group, &mut sent)?;
    for (r, s) in residual.iter_mut().zip(&sent) {
        *r -= s;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
