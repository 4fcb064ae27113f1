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

/// The residuals of one worker, by table.
#[derive(Debug, Default)]
pub struct Residuals {
    /// (tensor, chunk index) -> residual of the chunk.
    dense: HashMap<(String, u32), Vec<f32>>,
    /// table -> key -> residual of the row (rows whose residual is zero are
    /// not kept).
    sparse: HashMap<String, HashMap<u64, Box<[f32]>>>,
}

impl Residuals {
    /// The residual of chunk `index` of `tensor` (zeros the first time).
    pub fn dense(&mut self, tensor: &str, index: u32, len: usize) -> &mut [f32] {
        let r = self.dense.entry((tensor.to_string(), index)).or_default();
        r.resize(len, 0.0);
        r
    }

    /// Moves the residuals of `keys` (rows of `dim`) out of the store into
    /// `out` (`keys.len() * dim`, zeros where a key has none).
    pub fn take_rows(&mut self, table: &str, keys: &[u64], dim: usize, out: &mut [f32]) {
        out.fill(0.0);
        let Some(rows) = self.sparse.get_mut(table) else { return };
        for (&k, o) in keys.iter().zip(out.chunks_exact_mut(dim)) {
            if let Some(r) = rows.remove(&k) {
                o.copy_from_slice(&r);
            }
        }
    }

    /// Stores the residuals of `keys` (rows of `dim` in `residual`), keeping
    /// only rows that are not all zero.
    pub fn put_rows(&mut self, table: &str, keys: &[u64], dim: usize, residual: &[f32]) {
        let rows = self.sparse.entry(table.to_string()).or_default();
        for (&k, r) in keys.iter().zip(residual.chunks_exact(dim)) {
            if r.iter().any(|&v| v != 0.0) {
                rows.insert(k, r.into());
            }
        }
    }

    /// The residual of chunk `index` of `tensor`, if it has one.
    pub fn dense_chunk(&self, tensor: &str, index: u32) -> Option<&[f32]> {
        self.dense.get(&(tensor.to_string(), index)).map(Vec::as_slice)
    }

    /// The residual of row `key` of `table`, if it has one.
    pub fn row(&self, table: &str, key: u64) -> Option<&[f32]> {
        self.sparse.get(table)?.get(&key).map(|r| &r[..])
    }

    /// Sparse rows holding a residual, over all tables.
    pub fn sparse_rows(&self) -> usize {
        self.sparse.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_move_out_and_back() {
        let mut r = Residuals::default();
        r.put_rows("e", &[1, 2, 3], 2, &[1.0, 2.0, 0.0, 0.0, 5.0, 0.0]);
        assert_eq!(r.sparse_rows(), 2, "the all-zero row of key 2 is not kept");
        let mut out = vec![9.0; 6];
        r.take_rows("e", &[3, 4, 1], 2, &mut out);
        assert_eq!(out, [5.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
        assert_eq!(r.sparse_rows(), 0, "taken rows leave the store");
        r.dense("w", 0, 3)[1] = 4.0;
        assert_eq!(r.dense("w", 0, 3), [0.0, 4.0, 0.0]);
        assert_eq!(r.dense("w", 1, 2), [0.0, 0.0]);
    }
}
