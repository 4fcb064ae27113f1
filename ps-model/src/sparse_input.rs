//! First-layer products that skip zero inputs.
//!
//! Many inputs are mostly zeros (an MNIST image is 19% ink), and the first layer holds
//! nearly all of an MLP's arithmetic. When a batch is sparse enough, [`SparseBatch`]
//! indexes its non-zeros once, and then
//!
//! - `X · W` goes row by row over each row's non-zeros (compressed sparse rows), adding
//!   one row of `W` per non-zero into an accumulator held in vector registers;
//! - `Xᵀ · dZ` goes column by column over the rows set in the column's bit mask, summing
//!   one row of `dZ` per non-zero in registers and writing each gradient row once.
//!
//! The result equals the dense product up to floating-point summation order: terms
//! `0 · w` are skipped, which differs only if `w` is infinite or NaN.
//!
//! The loops are plain Rust with compile-time block widths, so the compiler vectorizes
//! them; on x86-64 they are compiled a second time with AVX2 enabled and picked at run
//! time (the row compaction there uses AVX2 intrinsics). No FMA: results do not depend
//! on the CPU.

use ndarray::ArrayView2;

/// Inputs examined at once when skipping runs of zeros.
const CHUNK: usize = 8;

/// Calls `kernels::$f` compiled for AVX2 when the CPU has it, else the baseline build.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, as just checked.
                unsafe { avx2::$f($($arg),*) }
            } else {
                kernels::$f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            kernels::$f($($arg),*)
        }
    }};
}

/// The non-zeros of a batch: by row, `(column, value)` pairs; by column, a bit mask of
/// the rows.
#[derive(Debug, Clone, Default)]
pub(super) struct SparseBatch {
    indptr: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<f32>,
    /// Columns of the batch.
    n_in: usize,
    /// Bit `r % 32` of `masks[(r / 32) * n_in + k]` is set if `x[r, k] != 0`.
    masks: Vec<u32>,
}

impl SparseBatch {
    /// Compacts `x` if it is row-major and at most `max_density` of its entries are
    /// non-zero; returns whether it did (when not, the contents are unspecified).
    pub(super) fn compact_if_sparse(&mut self, x: ArrayView2<'_, f32>, max_density: f32) -> bool {
        let Some(all) = x.as_slice() else { return false };
        if all.is_empty() || max_density <= 0.0 {
            return false;
        }
        self.n_in = x.ncols();
        self.masks.clear();
        self.masks.resize(x.nrows().div_ceil(32) * self.n_in, 0);
        dispatch!(build_masks(all, self.n_in, &mut self.masks));
        let nnz: usize = self.masks.iter().map(|m| m.count_ones() as usize).sum();
        if nnz as f32 > max_density * all.len() as f32 {
            return false;
        }
        // The vector compaction stores whole chunks: leave a chunk of slack.
        if self.cols.len() < nnz + CHUNK {
            self.cols.resize(nnz + CHUNK, 0);
            self.vals.resize(nnz + CHUNK, 0.0);
        }
        self.indptr.clear();
        self.indptr.push(0);
        let mut n = 0;
        for row in all.chunks_exact(self.n_in) {
            n = dispatch!(compact_row(row, &mut self.cols, &mut self.vals, n));
            self.indptr.push(n);
        }
        assert_eq!(n, nnz, "compaction keeps what was counted");
        true
    }

    pub(super) fn rows(&self) -> usize {
        self.indptr.len() - 1
    }

    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let range = self.indptr[r]..self.indptr[r + 1];
        (&self.cols[range.clone()], &self.vals[range])
    }

    /// `out = act(X · W + bias)` with `W` of shape `[in, n_out]` row-major, `out`
    /// `rows x n_out`; `act` is ReLU if `relu`, else the identity.
    pub(super) fn forward(&self, w: &[f32], bias: &[f32], out: &mut [f32], relu: bool) {
        dispatch!(forward(self, w, bias, out, relu))
    }

    /// `gw = Xᵀ · dz` with `x` the compacted batch (row-major), `dz` of shape
    /// `rows x n_out`, `gw` `[in, n_out]`.
    ///
    /// Goes column by column of `X` (row by row of `gw`), visiting the rows set in the
    /// column's mask, so each gradient row is summed in registers and written once
    /// rather than read and written per non-zero. (Masks rather than a column-sorted
    /// copy of the non-zeros: building that copy by counting sort costs as much as the
    /// product, its scattered stores stalling on memory dependences.)
    pub(super) fn weight_grad(&self, x: &[f32], dz: &[f32], n_out: usize, gw: &mut [f32]) {
        dispatch!(weight_grad(self, x, dz, n_out, gw))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{CHUNK, SparseBatch, kernels};

    /// `LEFT_PACK[mask]` lists the positions of the set bits of `mask`, lowest first:
    /// the lane permutation that moves the selected lanes to the front.
    static LEFT_PACK: [[u32; CHUNK]; 1 << CHUNK] = {
        let mut table = [[0; CHUNK]; 1 << CHUNK];
        let mut mask = 0;
        while mask < 1 << CHUNK {
            let (mut bit, mut n) = (0, 0);
            while bit < CHUNK {
                if mask >> bit & 1 == 1 {
                    table[mask][n] = bit as u32;
                    n += 1;
                }
                bit += 1;
            }
            mask += 1;
        }
        table
    };

    #[target_feature(enable = "avx2")]
    pub(super) fn build_masks(x: &[f32], n_in: usize, masks: &mut [u32]) {
        kernels::build_masks(x, n_in, masks)
    }

    /// [`kernels::compact_row`], eight inputs at a time without branches: compare with
    /// zero, permute the non-zeros to the front, store all eight lanes, advance by the
    /// number kept. Needs `CHUNK` slots of slack past the last non-zero.
    #[target_feature(enable = "avx2")]
    pub(super) fn compact_row(row: &[f32], cols: &mut [u32], vals: &mut [f32], mut n: usize) -> usize {
        let chunks = row.chunks_exact(CHUNK);
        let tail_start = row.len() - chunks.remainder().len();
        for (c, chunk) in chunks.enumerate() {
            assert!(n + CHUNK <= cols.len() && n + CHUNK <= vals.len(), "compaction slack");
            // SAFETY: `chunk` holds CHUNK = 8 floats; the stores write 8 lanes at `n`,
            // in bounds as just asserted; the table row holds 8 u32s. No alignment needed.
            unsafe {
                let v = _mm256_loadu_ps(chunk.as_ptr());
                let keep = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(v, _mm256_setzero_ps())) as usize;
                let perm = _mm256_loadu_si256(LEFT_PACK[keep].as_ptr().cast());
                let col = _mm256_add_epi32(perm, _mm256_set1_epi32((c * CHUNK) as i32));
                _mm256_storeu_ps(vals.as_mut_ptr().add(n), _mm256_permutevar8x32_ps(v, perm));
                _mm256_storeu_si256(cols.as_mut_ptr().add(n).cast(), col);
                n += keep.count_ones() as usize;
            }
        }
        kernels::compact_from(row, tail_start, cols, vals, n)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn forward(sp: &SparseBatch, w: &[f32], bias: &[f32], out: &mut [f32], relu: bool) {
        kernels::forward(sp, w, bias, out, relu)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn weight_grad(sp: &SparseBatch, x: &[f32], dz: &[f32], n_out: usize, gw: &mut [f32]) {
        kernels::weight_grad(sp, x, dz, n_out, gw)
    }
}

mod kernels {
    use super::SparseBatch;

    /// Sets bit `r % 32` of `masks[(r / 32) * n_in + k]` for each non-zero `x[r, k]`
    /// (`masks` zeroed). A row at a time, so the compare-and-or runs across columns in
    /// vector lanes.
    #[inline(always)]
    pub(super) fn build_masks(x: &[f32], n_in: usize, masks: &mut [u32]) {
        for (r, row) in x.chunks_exact(n_in).enumerate() {
            let bit = 1u32 << (r % 32);
            let group = &mut masks[(r / 32) * n_in..][..n_in];
            for (m, &v) in group.iter_mut().zip(row) {
                *m |= if v != 0.0 { bit } else { 0 };
            }
        }
    }

    /// Appends the non-zeros of `row` at `cols[n..]`, `vals[n..]`; returns the new end.
    #[inline(always)]
    pub(super) fn compact_row(row: &[f32], cols: &mut [u32], vals: &mut [f32], n: usize) -> usize {
        compact_from(row, 0, cols, vals, n)
    }

    /// [`compact_row`] for `row[start..]`.
    #[inline(always)]
    pub(super) fn compact_from(
        row: &[f32],
        start: usize,
        cols: &mut [u32],
        vals: &mut [f32],
        mut n: usize,
    ) -> usize {
        for (c, &v) in row.iter().enumerate().skip(start) {
            if v != 0.0 {
                (cols[n], vals[n]) = (c as u32, v);
                n += 1;
            }
        }
        n
    }

    /// Calls `$body!(B, c0)` for consecutive column blocks covering `0..n`: blocks of 64
    /// while they fit, then 32, 16, 8, 4, 2, 1, so every block has a compile-time width
    /// (the compiler keeps it in vector registers).
    macro_rules! for_blocks {
        ($n:expr, $body:ident) => {{
            let n = $n;
            let mut c0 = 0;
            while c0 + 64 <= n {
                $body!(64, c0);
                c0 += 64;
            }
            for_blocks!(@tail n, c0, $body, 32, 16, 8, 4, 2, 1);
        }};
        (@tail $n:ident, $c0:ident, $body:ident, $($b:literal),*) => {
            $(
                if $n - $c0 >= $b {
                    $body!($b, $c0);
                    $c0 += $b;
                }
            )*
            debug_assert_eq!($c0, $n);
        };
    }

    #[inline(always)]
    pub(super) fn forward(sp: &SparseBatch, w: &[f32], bias: &[f32], out: &mut [f32], relu: bool) {
        let n_out = bias.len();
        for (r, out_row) in out.chunks_exact_mut(n_out).enumerate().take(sp.rows()) {
            let (cols, vals) = sp.row(r);
            macro_rules! block {
                ($b:literal, $c0:expr) => {{
                    let c0 = $c0;
                    let mut acc: [f32; $b] = bias[c0..c0 + $b].try_into().expect("block");
                    for (&k, &v) in cols.iter().zip(vals) {
                        let w_row: &[f32; $b] = w[k as usize * n_out + c0..][..$b].try_into().expect("block");
                        for j in 0..$b {
                            acc[j] += v * w_row[j];
                        }
                    }
                    if relu {
                        acc.iter_mut().for_each(|a| *a = a.max(0.0));
                    }
                    out_row[c0..c0 + $b].copy_from_slice(&acc);
                }};
            }
            for_blocks!(n_out, block);
        }
    }

    #[inline(always)]
    pub(super) fn weight_grad(sp: &SparseBatch, x: &[f32], dz: &[f32], n_out: usize, gw: &mut [f32]) {
        let n_in = sp.n_in;
        for (k, g_row) in gw.chunks_exact_mut(n_out).enumerate() {
            macro_rules! block {
                ($b:literal, $c0:expr) => {{
                    let c0 = $c0;
                    let mut acc = [0.0f32; $b];
                    for (g, &mask) in sp.masks[k..].iter().step_by(n_in).enumerate() {
                        let mut bits = mask;
                        while bits != 0 {
                            let r = g * 32 + bits.trailing_zeros() as usize;
                            bits &= bits - 1;
                            let v = x[r * n_in + k];
                            let d: &[f32; $b] = dz[r * n_out + c0..][..$b].try_into().expect("block");
                            for j in 0..$b {
                                acc[j] += v * d[j];
                            }
                        }
                    }
                    g_row[c0..c0 + $b].copy_from_slice(&acc);
                }};
            }
            for_blocks!(n_out, block);
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rows: usize, cols: usize, density: f64, rng: &mut StdRng) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| {
            if rng.random_bool(density) { rng.random_range(-1.0..1.0) } else { 0.0 }
        })
    }

    /// Compares compaction, both products and (on AVX2 machines) the two builds of each
    /// kernel against naive loops.
    fn check(rows: usize, n_in: usize, n_out: usize, density: f64) {
        let mut rng = StdRng::seed_from_u64((rows * 1000 + n_in * 10 + n_out) as u64);
        let x = random(rows, n_in, density, &mut rng);
        let w = random(n_in, n_out, 1.0, &mut rng);
        let bias: Vec<f32> = (0..n_out).map(|_| rng.random_range(-1.0..1.0)).collect();
        let dz = random(rows, n_out, 1.0, &mut rng);
        let label = format!("{rows}x{n_in} -> {n_out} at {density}");

        let mut sp = SparseBatch::default();
        assert!(sp.compact_if_sparse(x.view(), 1.0), "{label}");
        for (r, row) in x.rows().into_iter().enumerate() {
            let expected: (Vec<u32>, Vec<f32>) =
                row.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(k, &v)| (k as u32, v)).unzip();
            assert_eq!(sp.row(r), (&expected.0[..], &expected.1[..]), "{label} row {r}");
        }

        let mut out = vec![f32::NAN; rows * n_out];
        for relu in [false, true] {
            sp.forward(w.as_slice().unwrap(), &bias, &mut out, relu);
            let mut naive = x.dot(&w) + ndarray::aview1(&bias);
            if relu {
                naive.mapv_inplace(|v| v.max(0.0));
            }
            for (a, b) in out.iter().zip(&naive) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{label} forward: {a} vs {b}");
            }
        }

        let mut gw = vec![f32::NAN; n_in * n_out];
        sp.weight_grad(x.as_slice().unwrap(), dz.as_slice().unwrap(), n_out, &mut gw);
        let naive = x.t().dot(&dz);
        for (a, b) in gw.iter().zip(&naive) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{label} weight grad: {a} vs {b}");
        }

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // Same sums in the same order, so bitwise equal.
            let mut generic = SparseBatch { indptr: vec![0], ..sp.clone() };
            let mut n = 0;
            for row in x.as_slice().unwrap().chunks_exact(n_in) {
                n = kernels::compact_row(row, &mut generic.cols, &mut generic.vals, n);
                generic.indptr.push(n);
            }
            assert_eq!(generic.indptr, sp.indptr);
            assert_eq!(generic.cols[..n], sp.cols[..n]);
            let mut generic_out = vec![0.0; rows * n_out];
            kernels::forward(&generic, w.as_slice().unwrap(), &bias, &mut generic_out, true);
            assert_eq!(generic_out, out, "{label}");
            let mut generic_gw = vec![0.0; n_in * n_out];
            kernels::weight_grad(
                &generic,
                x.as_slice().unwrap(),
                dz.as_slice().unwrap(),
                n_out,
                &mut generic_gw,
            );
            assert_eq!(generic_gw, gw, "{label}");
        }
    }

    #[test]
    fn kernels_match_naive_products() {
        for (rows, n_in, n_out, density) in [
            (32, 784, 64, 0.2),
            (1, 1, 1, 1.0),
            (3, 13, 5, 0.5),
            (33, 17, 127, 0.3),
            (70, 64, 200, 0.1),
            (4, 9, 3, 0.0),
        ] {
            check(rows, n_in, n_out, density);
        }
    }

    #[test]
    fn compaction_keeps_nan_and_infinity_and_drops_negative_zero() {
        let x = ndarray::array![[0.0, -0.0, f32::NAN, 1.0, 0.0, 0.0, 0.0, 0.0, f32::INFINITY, -0.0]];
        let mut sp = SparseBatch::default();
        assert!(sp.compact_if_sparse(x.view(), 1.0));
        let (cols, vals) = sp.row(0);
        assert_eq!(cols, [2, 3, 8]);
        assert!(vals[0].is_nan() && vals[1] == 1.0 && vals[2] == f32::INFINITY);
    }

    #[test]
    fn only_sparse_enough_row_major_batches_are_compacted() {
        let x = ndarray::array![[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]];
        let mut sp = SparseBatch::default();
        assert!(sp.compact_if_sparse(x.view(), 0.375));
        assert!(!sp.compact_if_sparse(x.view(), 0.374));
        assert!(!sp.compact_if_sparse(x.view(), 0.0));
        assert!(!sp.compact_if_sparse(x.t(), 1.0));
        assert!(!sp.compact_if_sparse(x.slice(ndarray::s![.., ..2]), 1.0));
    }
}
