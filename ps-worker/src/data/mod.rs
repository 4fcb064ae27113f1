//! Data sets read from disk, and the batching that feeds them to a model.
//!
//! - [`DenseDataset`]: an `n x d` feature matrix with class ids, as produced by
//!   [`load_mnist`].
//! - [`SparseDataset`]: CSR rows with binary targets, as produced by [`load_libsvm`].
//! - [`Rating`]s: `(user, item, rating)` triples, as produced by [`load_ratings`].
//! - [`Batches`]: a seeded per-epoch shuffle of row indices cut into mini-batches, and
//!   [`shard_range`]: the rows one worker of `num_workers` trains on.
//!
//! Every loader accepts its files gzipped or plain (the gzip magic bytes decide), reads
//! the whole file in one go and decodes it in one pass. Nothing read from a file can
//! panic: every malformed input is a [`DataError`] naming the file (and line, for text).

mod batches;
mod libsvm;
mod mnist;
mod movielens;

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};

pub use batches::{BatchBuf, Batches, shard_range};
pub use libsvm::{SparseDataset, load_libsvm};
pub use mnist::{Split, load_mnist};
pub use movielens::{Rating, load_ratings};

/// What can go wrong reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: bad magic number {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic { path: PathBuf, expected: u32, found: u32 },
    #[error("{}: truncated: {expected} bytes expected, {found} found", path.display())]
    Truncated { path: PathBuf, expected: u64, found: u64 },
    #[error("{}: {found} bytes but the header describes {expected}: trailing data", path.display())]
    TrailingData { path: PathBuf, expected: u64, found: u64 },
    #[error("{}: bad header: {reason}", path.display())]
    BadHeader { path: PathBuf, reason: String },
    #[error("{}: label {label} at record {index} is not below {num_classes}", path.display())]
    BadLabel { path: PathBuf, index: usize, label: u32, num_classes: usize },
    #[error("{images} has {num_images} images but {labels} has {num_labels} labels",
        images = images.display(), labels = labels.display())]
    CountMismatch { images: PathBuf, num_images: usize, labels: PathBuf, num_labels: usize },
    #[error("{}:{line}: {reason}", path.display())]
    BadLine { path: PathBuf, line: usize, reason: String },
    #[error("{}:{line}: feature index {index} outside 1..={num_features}", path.display())]
    IndexOutOfRange { path: PathBuf, line: usize, index: u64, num_features: usize },
    #[error("worker index {worker_index} is not below the number of workers {num_workers}")]
    BadShard { worker_index: usize, num_workers: usize },
}

/// A dense data set for classification: row `i` of `x` has class `y[i] < num_classes`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseDataset {
    /// `len() x num_features()` features, row-major.
    pub x: Array2<f32>,
    /// One class id per row.
    pub y: Vec<u32>,
    pub num_classes: usize,
}

impl DenseDataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    pub fn num_features(&self) -> usize {
        self.x.ncols()
    }

    /// Rows `range` as views, without copying.
    pub fn slice(&self, range: std::ops::Range<usize>) -> (ArrayView2<'_, f32>, &[u32]) {
        (self.x.slice(ndarray::s![range.clone(), ..]), &self.y[range])
    }

    /// Copies rows `rows` (in that order) into `batch`, reusing its buffers.
    ///
    /// Panics if a row index is out of range (indices come from [`Batches`], not files).
    pub fn gather(&self, rows: &[usize], batch: &mut BatchBuf) {
        batch.fill(self.x.view(), &self.y, rows);
    }

    /// Counts of each class, `num_classes` long.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &c in &self.y {
            counts[c as usize] += 1;
        }
        counts
    }

    /// The contiguous block of rows worker `worker_index` of `num_workers` owns (see
    /// [`shard_range`]), copied.
    pub fn shard(&self, worker_index: usize, num_workers: usize) -> Result<Self, DataError> {
        let range = shard_range(self.len(), worker_index, num_workers)?;
        let (x, y) = self.slice(range);
        Ok(Self { x: x.to_owned(), y: y.to_vec(), num_classes: self.num_classes })
    }
}

/// Reads a whole file, decompressing it if it starts with the gzip magic bytes.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let raw = std::fs::read(path).map_err(io)?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(gzip_capacity_hint(&raw));
    flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

/// Deflate expands at most about 1032:1, so no gzip file of `n` bytes holds more.
const MAX_GZIP_RATIO: usize = 1032;

/// What to reserve for the decompressed bytes of gzip file `raw`: its
/// trailer's uncompressed size (mod 2^32), which the file may lie about, so
/// no more than `raw` can expand to (and at most 1 GiB). Unbounded, a
/// lying trailer made an 18-byte file reserve 1 GiB before it failed.
fn gzip_capacity_hint(raw: &[u8]) -> usize {
    let claimed = match raw.len() {
        n if n >= 18 => u32::from_le_bytes([raw[n - 4], raw[n - 3], raw[n - 2], raw[n - 1]]) as usize,
        _ => 0,
    };
    claimed.min(raw.len().saturating_mul(MAX_GZIP_RATIO)).min(1 << 30)
}

/// Decodes `bytes` as UTF-8 text, or reports the line holding the first bad byte.
pub(crate) fn as_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        DataError::BadLine { path: path.to_owned(), line, reason: "not valid UTF-8".into() }
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("ps-worker-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).expect("write temp file");
            path
        }

        pub fn write_gz(&self, name: &str, bytes: &[u8]) -> PathBuf {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(bytes).expect("gzip");
            self.write(name, &enc.finish().expect("gzip"))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `CARGO_MANIFEST_DIR/rel`.
    pub fn manifest_path(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// `parsed` (the result of parsing `text`) is a `BadLine` error for
    /// line `line` whose reason mentions `reason_part`.
    pub fn assert_bad_line<T: std::fmt::Debug>(
        parsed: Result<T, super::DataError>,
        text: &str,
        line: usize,
        reason_part: &str,
    ) {
        match parsed {
            Err(super::DataError::BadLine { line: got, reason, .. }) => {
                assert_eq!(got, line, "{reason}");
                assert!(reason.contains(reason_part), "{reason:?} lacks {reason_part:?}");
            }
            other => panic!("expected a bad line for {text:?}, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::TempDir;
    use super::*;

    #[test]
    fn reads_plain_and_gzipped_alike() {
        let dir = TempDir::new("readgz");
        let plain = dir.write("a.txt", b"hello\nworld\n");
        let gz = dir.write_gz("a.txt.gz", b"hello\nworld\n");
        assert_eq!(read_maybe_gz(&plain).unwrap(), b"hello\nworld\n");
        assert_eq!(read_maybe_gz(&gz).unwrap(), b"hello\nworld\n");
    }

    #[test]
    fn corrupt_gzip_is_an_io_error_naming_the_file() {
        let dir = TempDir::new("badgz");
        let path = dir.write("bad.gz", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        let err = read_maybe_gz(&path).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("bad.gz"), "{err}");
    }

    /// A gzip trailer claiming 4 GiB on a file of a few bytes reserves no
    /// more than those bytes can expand to (it reserved 1 GiB).
    #[test]
    fn a_lying_gzip_trailer_does_not_size_the_buffer() {
        let mut raw = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0];
        raw.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(gzip_capacity_hint(&raw) <= raw.len() * MAX_GZIP_RATIO, "{}", gzip_capacity_hint(&raw));
        let dir = TempDir::new("liegz");
        let path = dir.write("lie.gz", &raw);
        assert!(matches!(read_maybe_gz(&path), Err(DataError::Io { .. })));
        // An honest trailer is still the hint.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &[7u8; 5000]).unwrap();
        assert_eq!(gzip_capacity_hint(&enc.finish().unwrap()), 5000);
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = read_maybe_gz(Path::new("/nonexistent/file")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    }

    #[test]
    fn bad_utf8_reports_its_line() {
        let err = as_text(Path::new("f"), b"ok\nok\n\xff\n").unwrap_err();
        assert!(matches!(err, DataError::BadLine { line: 3, .. }), "{err:?}");
    }
}
