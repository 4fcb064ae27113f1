//! First-layer products that skip zero inputs.
//!
//! Many inputs are mostly zeros (an MNIST image is 19% ink), and the first layer holds
//! nearly all of an MLP's arithmetic. When a batch is sparse enough, [`SparseRows`]
//! compacts it once, and both `X · W` and `Xᵀ · dZ` then cost one row of `W` (or of the
//! gradient) per non-zero input instead of per input. The result equals the dense
//! product up to floating-point summation order (terms `0 · w` are skipped, which
//! differs only if `w` is infinite or NaN).
//!
//! The loops are plain Rust, written so the compiler keeps a block of output columns in
//! vector registers; on x86-64 they are compiled a second time with AVX2 enabled and
//! picked at run time.

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

/// A batch in compressed sparse row form: `(column, value)` of each non-zero; and, once
/// [`SparseRows::weight_grad`] needs it, in compressed sparse column form too.
#[derive(Debug, Clone, Default)]
pub(super) struct SparseRows {
    indptr: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<f32>,
    /// Column `k`'s non-zeros are `(t_rows[p], t_vals[p])` for `p` in
    /// `t_ptr[k]..t_ptr[k + 1]`, rows ascending.
    t_ptr: Vec<usize>,
    t_next: Vec<usize>,
    t_rows: Vec<u32>,
    t_vals: Vec<f32>,
}

impl SparseRows {
    /// Compacts `x` if at most `max_density` of its entries are non-zero; returns whether
    /// it did (when not, the contents are unspecified).
    pub(super) fn compact_if_sparse(&mut self, x: ArrayView2<'_, f32>, max_density: f32) -> bool {
        let total = x.len();
        if total == 0 || max_density <= 0.0 {
            return false;
        }
        let nnz = count_nonzero(x);
        if nnz as f32 > max_density * total as f32 {
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
        for row in x.rows() {
            match row.as_slice() {
                Some(row) => n = dispatch!(compact_row(row, &mut self.cols, &mut self.vals, n)),
                None => {
                    for (c, &v) in row.iter().enumerate() {
                        if v != 0.0 {
                            (self.cols[n], self.vals[n]) = (c as u32, v);
                            n += 1;
                        }
                    }
                }
            }
            self.indptr.push(n);
        }
        assert_eq!(n, nnz, "compaction kept what was counted");
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

    /// `gw = Xᵀ · dz` with `dz` of shape `rows x n_out`, `gw` `[in, n_out]`.
    ///
    /// Goes column by column of `X` (row by row of `gw`), so each gradient row is summed
    /// in registers and written once, rather than read and written per non-zero.
    pub(super) fn weight_grad(&mut self, dz: &[f32], n_out: usize, gw: &mut [f32]) {
        self.transpose(gw.len() / n_out);
        dispatch!(weight_grad(self, dz, n_out, gw))
    }

    /// Fills the column form from the row form by a counting sort on the column.
    fn transpose(&mut self, n_in: usize) {
        let nnz = self.indptr[self.rows()];
        self.t_ptr.clear();
        self.t_ptr.resize(n_in + 1, 0);
        for &k in &self.cols[..nnz] {
            self.t_ptr[k as usize + 1] += 1;
        }
        for k in 0..n_in {
            self.t_ptr[k + 1] += self.t_ptr[k];
        }
        self.t_next.clear();
        self.t_next.extend_from_slice(&self.t_ptr[..n_in]);
        self.t_rows.resize(nnz, 0);
        self.t_vals.resize(nnz, 0.0);
        for r in 0..self.rows() {
            let range = self.indptr[r]..self.indptr[r + 1];
            for (&k, &v) in self.cols[range.clone()].iter().zip(&self.vals[range]) {
                let slot = &mut self.t_next[k as usize];
                (self.t_rows[*slot], self.t_vals[*slot]) = (r as u32, v);
                *slot += 1;
            }
        }
    }

    fn column(&self, k: usize) -> (&[u32], &[f32]) {
        let range = self.t_ptr[k]..self.t_ptr[k + 1];
        (&self.t_rows[range.clone()], &self.t_vals[range])
    }
}


fn count_nonzero(x: ArrayView2<'_, f32>) -> usize {
    match x.as_slice_memory_order() {
        Some(all) => dispatch!(count_nonzero(all)),
        None => x.iter().filter(|&&v| v != 0.0).count(),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{CHUNK, SparseRows, kernels};

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
    pub(super) fn count_nonzero(x: &[f32]) -> usize {
        kernels::count_nonzero(x)
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
    pub(super) fn forward(sp: &SparseRows, w: &[f32], bias: &[f32], out: &mut [f32], relu: bool) {
        kernels::forward(sp, w, bias, out, relu)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn weight_grad(sp: &SparseRows, dz: &[f32], n_out: usize, gw: &mut [f32]) {
        kernels::weight_grad(sp, dz, n_out, gw)
    }
}

mod kernels {
    use super::SparseRows;

    #[inline(always)]
    pub(super) fn count_nonzero(x: &[f32]) -> usize {
        x.iter().map(|&v| usize::from(v != 0.0)).sum()
    }

    /// Appends the non-zeros of `row` at `cols[n..]`, `vals[n..]`; returns the new end.
    #[inline(always)]
    pub(super) fn compact_row(row: &[f32], cols: &mut [u32], vals: &mut [f32], n: usize) -> usize {
        compact_from(row, 0, cols, vals, n)
    }

    /// [`compact_row`] for `row[start..]`.
    #[inline(always)]
    pub(super) fn compact_from(row: &[f32], start: usize, cols: &mut [u32], vals: &mut [f32], mut n: usize) -> usize {
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
                if $c0 + $b <= $n {
                    $body!($b, $c0);
                    $c0 += $b;
                }
            )*
            debug_assert_eq!($c0, $n);
        };
    }

    #[inline(always)]
    pub(super) fn forward(sp: &SparseRows, w: &[f32], bias: &[f32], out: &mut [f32], relu: bool) {
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

    /// Needs the column form (`SparseRows::transpose`).
    #[inline(always)]
    pub(super) fn weight_grad(sp: &SparseRows, dz: &[f32], n_out: usize, gw: &mut [f32]) {
        for (k, g_row) in gw.chunks_exact_mut(n_out).enumerate() {
            let (rows, vals) = sp.column(k);
            macro_rules! block {
                ($b:literal, $c0:expr) => {{
                    let c0 = $c0;
                    let mut acc = [0.0f32; $b];
                    for (&r, &v) in rows.iter().zip(vals) {
                        let d: &[f32; $b] = dz[r as usize * n_out + c0..][..$b].try_into().expect("block");
                        for j in 0..$b {
                            acc[j] += v * d[j];
                        }
                    }
                    g_row[c0..c0 + $b].copy_from_slice(&acc);
                }};
            }
            for_blocks!(n_out, block);
        }
    }
}
