//! Packing of bulk values on the wire: f32 values and gradients and u64 keys
//! travel as little-endian bytes. Encoding is one copy; decoding is one copy
//! into a caller-owned buffer, and checks the length before touching it.

use std::borrow::Cow;

use bytes::Bytes;

use crate::{Error, Result};

/// Packs `values` as little-endian f32 bytes.
pub fn encode_f32(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    append_f32(&mut out, values);
    Bytes::from(out)
}

/// `values` as little-endian f32 bytes, without a copy on a little-endian
/// machine: the bytes are the vector's own, which the `Bytes` keeps.
pub fn into_f32_bytes(values: Vec<f32>) -> Bytes {
    let len = values.len();
    SharedF32::new(values).bytes(0..len)
}

/// The little-endian bytes of `values`, without a copy on a little-endian
/// machine: the `Bytes` holds a clone of the `Arc` (a shard's dense chunk,
/// which its next update copies first while one is held).
pub fn shared_f32_bytes(values: &std::sync::Arc<[f32]>) -> Bytes {
    if cfg!(target_endian = "little") {
        return Bytes::from_owner(F32Bytes(values.clone()));
    }
    encode_f32(values)
}

/// Shared floats seen as their bytes, for a `Bytes` to keep (little-endian
/// machines only): an `Arc<[f32]>`, or a [`SharedF32`]'s vector.
struct F32Bytes<T>(T);

impl<T: std::ops::Deref<Target: AsRef<[f32]>>> AsRef<[u8]> for F32Bytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice((*self.0).as_ref())
    }
}

/// Floats whose little-endian bytes requests carry without a copy: the
/// bytes of a range of them are a view of the same memory
/// ([`SharedF32::bytes`]). Made from a vector that is given up; with a
/// pool, the vector goes back to it once this value and every view of it
/// are dropped, for the next gradient ([`F32Pool::take`]). Cheap to clone.
#[derive(Clone)]
pub struct SharedF32 {
    floats: std::sync::Arc<Pooled>,
    /// The floats' bytes: a view of `floats` on a little-endian machine, a
    /// copy on a big-endian one.
    bytes: Bytes,
}

impl SharedF32 {
    /// Takes `values`.
    pub fn new(values: Vec<f32>) -> SharedF32 {
        SharedF32::with_pool(values, None)
    }

    /// Takes `values`, which go back to `pool` when no longer viewed.
    pub fn pooled(values: Vec<f32>, pool: &F32Pool) -> SharedF32 {
        SharedF32::with_pool(values, Some(pool.clone()))
    }

    fn with_pool(values: Vec<f32>, pool: Option<F32Pool>) -> SharedF32 {
        let floats = std::sync::Arc::new(Pooled { values, pool });
        let bytes = match cfg!(target_endian = "little") {
            true => Bytes::from_owner(F32Bytes(floats.clone())),
            false => encode_f32(&floats.values),
        };
        SharedF32 { floats, bytes }
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.floats.values
    }

    pub fn len(&self) -> usize {
        self.floats.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.floats.values.is_empty()
    }

    /// The little-endian bytes of the floats in `range` (floats, not bytes),
    /// without a copy.
    ///
    /// # Panics
    /// If `range` is out of bounds, as slicing is.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> Bytes {
        self.bytes.slice(range.start * 4..range.end * 4)
    }
}

impl std::fmt::Debug for SharedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedF32({} floats)", self.len())
    }
}

/// The vector a [`SharedF32`] took, and where it goes back.
struct Pooled {
    values: Vec<f32>,
    pool: Option<F32Pool>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.values));
        }
    }
}

impl AsRef<[f32]> for Pooled {
    fn as_ref(&self) -> &[f32] {
        &self.values
    }
}

/// Float vectors given back by [`SharedF32`]s, handed out again: a worker
/// that sends its gradient without copying it computes the next one in the
/// same memory once the push is done. Holds at most [`F32Pool::KEEP`]
/// vectors. Cheap to clone (clones share the vectors).
#[derive(Clone, Default)]
pub struct F32Pool(std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>);

impl F32Pool {
    /// How many vectors the pool keeps; more are freed.
    pub const KEEP: usize = 2;

    /// A vector of `len` floats: one given back (its values are those it
    /// held, so the caller overwrites them all), or a new one of zeros.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut values = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        values.resize(len, 0.0);
        values
    }

    fn put(&self, values: Vec<f32>) {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < F32Pool::KEEP {
            free.push(values);
        }
    }
}

/// Appends `values` to `out` as little-endian f32 bytes (for answers built
/// block by block).
pub fn append_f32(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        // The floats' own bytes: one memcpy, and no zeroing pass first.
        out.extend_from_slice(bytemuck::cast_slice(values));
        return;
    }
    let start = out.len();
    out.resize(start + values.len() * 4, 0);
    for (b, v) in out[start..].chunks_exact_mut(4).zip(values) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

/// Packs `keys` as little-endian u64 bytes.
pub fn encode_u64(keys: &[u64]) -> Bytes {
    let mut out = Vec::with_capacity(keys.len() * 8);
    for k in keys {
        out.extend_from_slice(&k.to_le_bytes());
    }
    Bytes::from(out)
}

/// Number of f32 values in `bytes`, or an error if it is not a whole number.
pub fn f32_len(what: &'static str, bytes: &[u8]) -> Result<usize> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Misaligned { what, len: bytes.len(), width: 4 });
    }
    Ok(bytes.len() / 4)
}

/// Unpacks little-endian f32 bytes into `out`, which must have exactly the
/// right length.
pub fn decode_f32_into(what: &'static str, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = f32_len(what, bytes)?;
    if n != out.len() {
        return Err(Error::LengthMismatch { what, expected: out.len(), got: n });
    }
    if cfg!(target_endian = "little") {
        // One memcpy, whatever the alignment of `bytes`.
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
        return Ok(());
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Unpacks little-endian f32 bytes into a new vector.
pub fn decode_f32(what: &'static str, bytes: &[u8]) -> Result<Vec<f32>> {
    // Filled in one pass (no zeroing first): a copy on little-endian.
    let mut out = Vec::with_capacity(f32_len(what, bytes)?);
    out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(out)
}

/// Little-endian f32 bytes as values: where they lie when they are 4-byte
/// aligned on a little-endian machine (as the data plane lays out a dense
/// push's gradients), else unpacked into a new vector.
pub fn f32s<'a>(what: &'static str, bytes: &'a [u8]) -> Result<Cow<'a, [f32]>> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) if cfg!(target_endian = "little") => Ok(Cow::Borrowed(values)),
        _ => decode_f32(what, bytes).map(Cow::Owned),
    }
}

/// Unpacks little-endian u64 bytes into a new vector.
pub fn decode_u64(what: &'static str, bytes: &[u8]) -> Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(Error::Misaligned { what, len: bytes.len(), width: 8 });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn f32_round_trip(values in proptest::collection::vec(any::<f32>(), 0..300)) {
            let bytes = encode_f32(&values);
            let back = decode_f32("values", &bytes).unwrap();
            // Compare bit patterns so NaN payloads count too.
            let a: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(a, b);
            let mut appended = vec![7u8];
            append_f32(&mut appended, &values);
            prop_assert_eq!(&appended[1..], &bytes[..]);
        }

        #[test]
        fn u64_round_trip(keys in proptest::collection::vec(any::<u64>(), 0..300)) {
            prop_assert_eq!(decode_u64("keys", &encode_u64(&keys)).unwrap(), keys);
        }

        #[test]
        fn misaligned_bytes_are_rejected(len in 0usize..64) {
            let bytes = vec![0u8; len];
            prop_assert_eq!(decode_f32("v", &bytes).is_ok(), len % 4 == 0);
            prop_assert_eq!(decode_u64("k", &bytes).is_ok(), len % 8 == 0);
        }
    }

    #[test]
    fn aligned_f32_bytes_are_read_where_they_lie_and_others_copied() {
        let values = [1.5f32, -2.0, 3.25];
        let mut bytes = vec![0u8; 4];
        bytes.extend_from_slice(&encode_f32(&values));
        for at in 0..4 {
            let read = f32s("values", &bytes[at..at + 12]).unwrap();
            let aligned = (bytes[at..].as_ptr() as usize).is_multiple_of(4);
            assert_eq!(matches!(read, Cow::Borrowed(_)), aligned && cfg!(target_endian = "little"));
            assert_eq!(&*read, &decode_f32("values", &bytes[at..at + 12]).unwrap()[..]);
        }
        assert!(f32s("values", &bytes[..7]).is_err());
    }

    #[test]
    fn decode_into_checks_length() {
        let bytes = encode_f32(&[1.0, 2.0, 3.0]);
        let mut out = [0.0f32; 2];
        assert_eq!(
            decode_f32_into("values", &bytes, &mut out),
            Err(Error::LengthMismatch { what: "values", expected: 2, got: 3 })
        );
        assert_eq!(out, [0.0, 0.0], "a failed decode writes nothing");
    }

    #[test]
    fn shared_floats_are_their_bytes_and_go_back_to_the_pool_after_the_last_view() {
        let pool = F32Pool::default();
        let values: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
        let owned = values.clone();
        let at = owned.as_ptr();
        let shared = SharedF32::pooled(owned, &pool);
        let view = shared.bytes(3..7);
        assert_eq!(view, encode_f32(&values[3..7]));
        assert_eq!(shared.as_slice(), &values[..]);
        if cfg!(target_endian = "little") {
            assert_eq!(view.as_ptr(), at.wrapping_add(3).cast(), "a view, not a copy");
        }
        drop(shared);
        assert!(pool.0.lock().unwrap().is_empty(), "a view still holds the floats");
        drop(view);
        let again = pool.take(10);
        assert_eq!(again.as_ptr(), at, "the same vector, handed out again");
        assert_eq!(again, values, "with its old values");
        drop(SharedF32::pooled(again, &pool));
        assert_eq!(pool.take(12)[8..], [3.0, 3.5, 0.0, 0.0], "grown with zeros");
        assert_eq!(pool.take(3), vec![0.0; 3], "an empty pool makes a new vector");
    }
}
