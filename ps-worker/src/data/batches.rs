//! Which rows a worker trains on, in which order, in which batches.

use std::ops::Range;

use ndarray::ArrayView2;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::DataError;

/// The rows worker `worker_index` of `num_workers` owns out of `len`: one contiguous
/// block, blocks in worker order, sizes differing by at most one (the first
/// `len % num_workers` workers get the extra row). Contiguous blocks keep a worker's
/// rows together in memory and make a shard a cheap slice of the full data set.
pub fn shard_range(len: usize, worker_index: usize, num_workers: usize) -> Result<Range<usize>, DataError> {
    if worker_index >= num_workers {
        return Err(DataError::BadShard { worker_index, num_workers });
    }
    let (base, extra) = (len / num_workers, len % num_workers);
    let start = worker_index * base + worker_index.min(extra);
    let size = base + usize::from(worker_index < extra);
    Ok(start..start + size)
}

/// A deterministic shuffle of a range of rows, cut into mini-batches.
///
/// The order of epoch `e` depends only on `(seed, e)`, not on the epochs drawn before,
/// so a restarted worker that knows its epoch sees the same batches. The last batch of
/// an epoch may be short. (`StdRng` is not guaranteed stable across `rand` versions:
/// the same seed gives the same order only with the same build.)
#[derive(Debug, Clone)]
pub struct Batches {
    rows: Range<usize>,
    order: Vec<usize>,
    batch_size: usize,
    seed: u64,
}

impl Batches {
    /// Batches over rows `0..num_rows`.
    pub fn new(num_rows: usize, batch_size: usize, seed: u64) -> Self {
        Self::for_rows(0..num_rows, batch_size, seed)
    }

    /// Batches over `rows` only, e.g. a worker's [`shard_range`] of the full data set.
    ///
    /// Panics if `batch_size` is 0.
    pub fn for_rows(rows: Range<usize>, batch_size: usize, seed: u64) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        Self { order: rows.clone().collect(), rows, batch_size, seed }
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn num_rows(&self) -> usize {
        self.order.len()
    }

    /// Batches per epoch, counting a short last one.
    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// Shuffles for epoch `epoch` and returns its batches of row indices.
    pub fn epoch(&mut self, epoch: u64) -> std::slice::Chunks<'_, usize> {
        self.shuffle(epoch);
        self.order.chunks(self.batch_size)
    }

    /// Puts the rows in epoch `epoch`'s order; [`Batches::batch`] then cuts it.
    pub fn shuffle(&mut self, epoch: u64) {
        for (slot, row) in self.order.iter_mut().zip(self.rows.clone()) {
            *slot = row;
        }
        // Distinct epochs get well-separated seeds; seed_from_u64 scrambles them further.
        let mut rng = StdRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order.shuffle(&mut rng);
    }

    /// Batch `b` of the current order (empty past the last batch).
    pub fn batch(&self, b: usize) -> &[usize] {
        let start = b.saturating_mul(self.batch_size).min(self.order.len());
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }

    /// Rows in their original order, cut into batches (for evaluation).
    pub fn in_order(&mut self) -> std::slice::Chunks<'_, usize> {
        for (slot, row) in self.order.iter_mut().zip(self.rows.clone()) {
            *slot = row;
        }
        self.order.chunks(self.batch_size)
    }
}

/// A reusable buffer holding one gathered mini-batch of a dense data set; after the
/// first batch of the largest size, filling it allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct BatchBuf {
    x: Vec<f32>,
    y: Vec<u32>,
    cols: usize,
}

impl BatchBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// The batch's features, `len() x num_features`.
    pub fn x(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((self.y.len(), self.cols), &self.x).expect("x holds rows * cols values")
    }

    pub fn y(&self) -> &[u32] {
        &self.y
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Replaces the contents with rows `rows` of `(x, y)`. Panics if a row is out of range.
    pub fn fill(&mut self, x: ArrayView2<'_, f32>, y: &[u32], rows: &[usize]) {
        self.x.clear();
        self.y.clear();
        self.cols = x.ncols();
        for &r in rows {
            let row = x.row(r);
            match row.as_slice() {
                Some(s) => self.x.extend_from_slice(s),
                None => self.x.extend(row.iter()),
            }
            self.y.push(y[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;
    use proptest::prelude::*;

    use super::super::DenseDataset;
    use super::*;

    #[test]
    fn shards_are_balanced_contiguous_blocks() {
        let ranges: Vec<_> = (0..3).map(|i| shard_range(10, i, 3).unwrap()).collect();
        assert_eq!(ranges, [0..4, 4..7, 7..10]);
        assert_eq!(shard_range(2, 2, 3).unwrap(), 2..2);
        assert!(matches!(shard_range(10, 3, 3), Err(DataError::BadShard { .. })));
        assert!(matches!(shard_range(10, 0, 0), Err(DataError::BadShard { .. })));
    }

    proptest! {
        #[test]
        fn shards_partition_the_rows(len in 0usize..1000, num_workers in 1usize..17) {
            let mut next = 0;
            for i in 0..num_workers {
                let r = shard_range(len, i, num_workers).unwrap();
                prop_assert_eq!(r.start, next);
                prop_assert!(r.len() == len / num_workers || r.len() == len / num_workers + 1);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn each_epoch_is_a_permutation(n in 0usize..300, batch in 1usize..40, seed: u64, epoch in 0u64..5) {
            let mut b = Batches::for_rows(7..7 + n, batch, seed);
            let mut seen: Vec<usize> = b.epoch(epoch).flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (7..7 + n).collect::<Vec<_>>());
            prop_assert_eq!(b.epoch(epoch).count(), n.div_ceil(batch));
        }
    }

    #[test]
    fn indexed_batches_match_the_epoch_chunks() {
        let mut a = Batches::for_rows(3..103, 32, 7);
        let chunks: Vec<Vec<usize>> = a.epoch(2).map(|c| c.to_vec()).collect();
        a.shuffle(2);
        let indexed: Vec<Vec<usize>> = (0..a.num_batches()).map(|b| a.batch(b).to_vec()).collect();
        assert_eq!(chunks, indexed);
        assert!(a.batch(a.num_batches()).is_empty() && a.batch(usize::MAX).is_empty());
    }

    #[test]
    fn epochs_are_deterministic_and_differ() {
        let mut a = Batches::new(100, 32, 42);
        let mut b = Batches::new(100, 32, 42);
        let a1: Vec<Vec<usize>> = a.epoch(1).map(<[usize]>::to_vec).collect();
        let _ = b.epoch(0); // history does not matter
        let b1: Vec<Vec<usize>> = b.epoch(1).map(<[usize]>::to_vec).collect();
        assert_eq!(a1, b1);
        assert_eq!(a1.iter().map(Vec::len).collect::<Vec<_>>(), [32, 32, 32, 4]);
        let a2: Vec<usize> = a.epoch(2).flatten().copied().collect();
        assert_ne!(a1.concat(), a2);
        let c1: Vec<usize> = Batches::new(100, 32, 43).epoch(1).flatten().copied().collect();
        assert_ne!(a1.concat(), c1);
    }

    #[test]
    fn gather_copies_the_chosen_rows() {
        let data = DenseDataset {
            x: Array2::from_shape_fn((5, 3), |(i, j)| (10 * i + j) as f32),
            y: vec![0, 1, 2, 3, 4],
            num_classes: 5,
        };
        let mut buf = BatchBuf::new();
        data.gather(&[4, 1], &mut buf);
        assert_eq!(buf.y(), [4, 1]);
        assert_eq!(buf.x(), ndarray::array![[40.0, 41.0, 42.0], [10.0, 11.0, 12.0]]);
        // Non-contiguous rows (a column-major copy) gather the same values.
        let fortran = data.x.t().to_owned();
        buf.fill(fortran.t(), &data.y, &[4, 1]);
        assert_eq!(buf.x(), ndarray::array![[40.0, 41.0, 42.0], [10.0, 11.0, 12.0]]);
        let shard = data.shard(1, 2).unwrap();
        assert_eq!(shard.y, [3, 4]);
    }
}
