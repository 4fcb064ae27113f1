//! Packing of bulk values on the wire: f32 values and gradients and u64 keys
//! travel as little-endian bytes. Encoding is one copy; decoding is one copy
//! into a caller-owned buffer, and checks the length before touching it.

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
    if cfg!(target_endian = "little") {
        return Bytes::from_owner(F32s(values));
    }
    encode_f32(&values)
}

/// Floats seen as their bytes (little-endian machines only).
struct F32s(Vec<f32>);

impl AsRef<[u8]> for F32s {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
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
    fn decode_into_checks_length() {
        let bytes = encode_f32(&[1.0, 2.0, 3.0]);
        let mut out = [0.0f32; 2];
        assert_eq!(
            decode_f32_into("values", &bytes, &mut out),
            Err(Error::LengthMismatch { what: "values", expected: 2, got: 3 })
        );
        assert_eq!(out, [0.0, 0.0], "a failed decode writes nothing");
    }
}
