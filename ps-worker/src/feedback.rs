//! Error feedback for lossy push codecs: what a push did not carry (the
//! difference between the gradient plus the old residual and what the shard
//! will decode) is kept per table, per dense chunk or sparse row, and added
//! to the next gradient of the same block. The arithmetic is
//! `ps_common::compress::encode_with_feedback`; this module only stores the
//! residuals.
//!
//! **Recovery.** A residual is updated once, when a push is encoded; a push
//! retried (same seq, same bytes) or acknowledged as a duplicate does not
//! touch it again, so nothing is sent twice. The residuals live in the
//! worker's memory: a worker process that dies loses them (at most one
//! quantization error per value, as if one lossy push had had no feedback),
//! and a shard rolled back to a checkpoint loses the pushes since the cut as
//! it does without codecs; the residual stays with the worker.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use ps_common::partition::splitmix64;

/// The residuals of one worker, by table.
#[derive(Debug, Default)]
pub struct Residuals {
    /// (tensor, chunk index) -> residual of the chunk.
    dense: HashMap<(String, u32), Vec<f32>>,
    /// table -> rows of residuals.
    sparse: HashMap<String, Rows>,
}

/// The residual rows of one sparse table: a key's row, once it has had a
/// non-zero residual, keeps its slot in one flat arena (a CTR push touches
/// ~10^5 rows: no allocation per row, one hash lookup per row and step).
#[derive(Debug, Default)]
struct Rows {
    slot: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    values: Vec<f32>,
}

/// SplitMix64 of a u64 key: cheaper than SipHash, and the keys come from
/// the worker's own batches, not from the network.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = splitmix64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, k: u64) {
        self.0 = splitmix64(self.0 ^ k);
    }
}

impl Residuals {
    /// The residual of chunk `index` of `tensor` (zeros the first time).
    pub fn dense(&mut self, tensor: &str, index: u32, len: usize) -> &mut [f32] {
        let r = self.dense.entry((tensor.to_string(), index)).or_default();
        r.resize(len, 0.0);
        r
    }

    /// Copies the residuals of `keys` (rows of `dim`) into `out`
    /// (`keys.len() * dim`, zeros where a key has none); the caller stores
    /// the new ones with [`Self::put_rows`].
    pub fn take_rows(&self, table: &str, keys: &[u64], dim: usize, out: &mut [f32]) {
        out.fill(0.0);
        let Some(rows) = self.sparse.get(table) else { return };
        for (&k, o) in keys.iter().zip(out.chunks_exact_mut(dim)) {
            if let Some(&s) = rows.slot.get(&k) {
                let s = s as usize * dim;
                o.copy_from_slice(&rows.values[s..s + dim]);
            }
        }
    }

    /// Stores the residuals of `keys` (rows of `dim` in `residual`); a key
    /// without a slot gets one only if its row is not all zero.
    pub fn put_rows(&mut self, table: &str, keys: &[u64], dim: usize, residual: &[f32]) {
        let rows = self.sparse.entry(table.to_string()).or_default();
        for (&k, r) in keys.iter().zip(residual.chunks_exact(dim)) {
            let s = match rows.slot.get(&k) {
                Some(&s) => s as usize,
                None if r.iter().all(|&v| v == 0.0) => continue,
                None => {
                    let s = rows.values.len() / dim;
                    rows.slot.insert(k, s as u32);
                    rows.values.resize(rows.values.len() + dim, 0.0);
                    s
                }
            };
            rows.values[s * dim..(s + 1) * dim].copy_from_slice(r);
        }
    }

    /// The residual of chunk `index` of `tensor`, if it has one.
    pub fn dense_chunk(&self, tensor: &str, index: u32) -> Option<&[f32]> {
        self.dense.get(&(tensor.to_string(), index)).map(Vec::as_slice)
    }

    /// The residual of row `key` of `table` (`dim` wide), if it has a slot.
    pub fn row(&self, table: &str, key: u64, dim: usize) -> Option<&[f32]> {
        let rows = self.sparse.get(table)?;
        let s = *rows.slot.get(&key)? as usize * dim;
        rows.values.get(s..s + dim)
    }

    /// Sparse rows with a residual slot, over all tables.
    pub fn sparse_rows(&self) -> usize {
        self.sparse.values().map(|r| r.slot.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_and_written_in_place() {
        let mut r = Residuals::default();
        r.put_rows("e", &[1, 2, 3], 2, &[1.0, 2.0, 0.0, 0.0, 5.0, 0.0]);
        assert_eq!(r.sparse_rows(), 2, "the all-zero row of key 2 gets no slot");
        let mut out = vec![9.0; 6];
        r.take_rows("e", &[3, 4, 1], 2, &mut out);
        assert_eq!(out, [5.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
        r.put_rows("e", &[3, 4], 2, &[0.0, 0.0, 0.5, 0.5]);
        assert_eq!(r.row("e", 3, 2), Some(&[0.0, 0.0][..]), "a row that had a slot keeps it, zeroed");
        assert_eq!(r.row("e", 4, 2), Some(&[0.5, 0.5][..]));
        assert_eq!(r.row("e", 2, 2), None);
        assert_eq!(r.sparse_rows(), 3);
        r.dense("w", 0, 3)[1] = 4.0;
        assert_eq!(r.dense("w", 0, 3), [0.0, 4.0, 0.0]);
        assert_eq!(r.dense_chunk("w", 0), Some(&[0.0, 4.0, 0.0][..]));
        assert_eq!(r.dense("w", 1, 2), [0.0, 0.0]);
    }
}
