//! MNIST in its original IDX format.
//!
//! An IDX file is a big-endian header (magic `0x0000_08DD`: unsigned bytes, `DD`
//! dimensions; then one `u32` per dimension) followed by the raw bytes. Images are
//! `idx3` (count, rows, cols), labels `idx1` (count).

use std::path::{Path, PathBuf};

use ndarray::Array2;

use super::{DataError, DenseDataset, read_maybe_gz};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const NUM_CLASSES: usize = 10;

/// Which half of MNIST to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*`: 60,000 examples.
    Train,
    /// `t10k-*`: 10,000 examples.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Loads one split of MNIST from `dir`: `{train,t10k}-{images-idx3,labels-idx1}-ubyte`,
/// each gzipped (`.gz`) or, if no `.gz` exists, plain.
///
/// Features are the 784 pixels of each image, row by row, scaled to `[0, 1]`
/// (`byte / 255`); classes are the digits `0..10`.
pub fn load_mnist(dir: &Path, split: Split) -> Result<DenseDataset, DataError> {
    let prefix = split.prefix();
    let images_path = locate(dir, &format!("{prefix}-images-idx3-ubyte"));
    let labels_path = locate(dir, &format!("{prefix}-labels-idx1-ubyte"));

    let images = read_maybe_gz(&images_path)?;
    let (dims, pixels) = parse_idx(&images_path, &images, IMAGES_MAGIC)?;
    let &[num_images, rows, cols] = dims.as_slice() else { unreachable!("idx3 has 3 dims") };

    let labels = read_maybe_gz(&labels_path)?;
    let (dims, labels) = parse_idx(&labels_path, &labels, LABELS_MAGIC)?;
    let num_labels = dims[0];

    if num_images != num_labels {
        return Err(DataError::CountMismatch {
            images: images_path,
            num_images,
            labels: labels_path,
            num_labels,
        });
    }
    if let Some(index) = labels.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(DataError::BadLabel {
            path: labels_path,
            index,
            label: u32::from(labels[index]),
            num_classes: NUM_CLASSES,
        });
    }

    let x: Vec<f32> = pixels.iter().map(|&b| f32::from(b) / 255.0).collect();
    let x = Array2::from_shape_vec((num_images, rows * cols), x).expect("length checked by parse_idx");
    let y = labels.iter().map(|&l| u32::from(l)).collect();
    Ok(DenseDataset { x, y, num_classes: NUM_CLASSES })
}

/// `dir/name.gz` if it exists, else `dir/name`.
fn locate(dir: &Path, name: &str) -> PathBuf {
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() { gz } else { dir.join(name) }
}

/// Checks an IDX header with `expected` magic and returns its dimensions and payload,
/// whose length is checked to be exactly the product of the dimensions.
fn parse_idx<'a>(path: &Path, bytes: &'a [u8], expected: u32) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let num_dims = (expected & 0xff) as usize;
    let header_len = 4 + 4 * num_dims;
    let truncated = |expected: usize| DataError::Truncated {
        path: path.to_owned(),
        expected: expected as u64,
        found: bytes.len() as u64,
    };
    let be_u32 = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);

    if bytes.len() < 4 {
        return Err(truncated(header_len));
    }
    let magic = be_u32(0);
    if magic != expected {
        return Err(DataError::BadMagic { path: path.to_owned(), expected, found: magic });
    }
    if bytes.len() < header_len {
        return Err(truncated(header_len));
    }
    let dims: Vec<usize> = (0..num_dims).map(|i| be_u32(4 + 4 * i) as usize).collect();
    // The non-zero dimensions must multiply without overflow too (ndarray
    // refuses such a shape even with no elements): a count of 0 hid 2^32 x
    // 2^32 images, which panicked making the empty matrix.
    let overflow =
        || DataError::BadHeader { path: path.to_owned(), reason: format!("dimensions {dims:?} overflow") };
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(overflow)?;
    let payload_len = dims.iter().product::<usize>();
    let total = payload_len.checked_add(header_len).ok_or_else(overflow)?;
    if bytes.len() < total {
        return Err(truncated(total));
    }
    if bytes.len() > total {
        return Err(DataError::TrailingData {
            path: path.to_owned(),
            expected: total as u64,
            found: bytes.len() as u64,
        });
    }
    Ok((dims, &bytes[header_len..]))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{TempDir, manifest_path};
    use super::*;

    fn check_counts(split: Split, expected_len: usize, expected_counts: [usize; 10]) {
        let data = load_mnist(&manifest_path("../data/mnist"), split).unwrap();
        assert_eq!(data.len(), expected_len);
        assert_eq!(data.x.dim(), (expected_len, 784));
        assert_eq!(data.class_counts(), expected_counts);
        let (lo, hi) = data.x.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert_eq!((lo, hi), (0.0, 1.0));
    }

    #[test]
    fn train_split_has_the_known_class_counts() {
        check_counts(Split::Train, 60_000, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    }

    #[test]
    fn test_split_has_the_known_class_counts() {
        check_counts(Split::Test, 10_000, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    }

    /// An IDX file of unsigned bytes with the given dimensions and payload.
    fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    /// A 3-image set of 2x2 images, written plain.
    fn tiny(dir: &TempDir, images: &[u8], labels: &[u8]) {
        dir.write("t10k-images-idx3-ubyte", images);
        dir.write("t10k-labels-idx1-ubyte", labels);
    }

    fn good_images() -> Vec<u8> {
        idx(&[3, 2, 2], &[0, 255, 51, 102, 1, 2, 3, 4, 5, 6, 7, 8])
    }

    #[test]
    fn loads_plain_files_when_no_gz_exists() {
        let dir = TempDir::new("mnist-plain");
        tiny(&dir, &good_images(), &idx(&[3], &[7, 0, 9]));
        let data = load_mnist(&dir.0, Split::Test).unwrap();
        assert_eq!(data.x.dim(), (3, 4));
        assert_eq!(data.y, [7, 0, 9]);
        assert_eq!(data.x.row(0).to_vec(), [0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn prefers_the_gz_file() {
        let dir = TempDir::new("mnist-gz");
        tiny(&dir, b"garbage", b"garbage");
        dir.write_gz("t10k-images-idx3-ubyte.gz", &good_images());
        dir.write_gz("t10k-labels-idx1-ubyte.gz", &idx(&[3], &[1, 2, 3]));
        assert_eq!(load_mnist(&dir.0, Split::Test).unwrap().y, [1, 2, 3]);
    }

    fn load_err(images: &[u8], labels: &[u8]) -> DataError {
        let dir = TempDir::new("mnist-bad");
        tiny(&dir, images, labels);
        load_mnist(&dir.0, Split::Test).unwrap_err()
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut images = good_images();
        images[3] = 1;
        let err = load_err(&images, &idx(&[3], &[1, 2, 3]));
        assert!(matches!(err, DataError::BadMagic { found: 0x801, expected: 0x803, .. }), "{err:?}");
        // Labels and images swapped.
        let err = load_err(&idx(&[3], &[1, 2, 3]), &good_images());
        assert!(matches!(err, DataError::BadMagic { .. }), "{err:?}");
    }

    #[test]
    fn truncated_files_are_reported() {
        let labels = idx(&[3], &[1, 2, 3]);
        let images = good_images();
        for len in [0, 3, 4, 9, 15, images.len() - 1] {
            let err = load_err(&images[..len], &labels);
            assert!(matches!(err, DataError::Truncated { .. }), "len {len}: {err:?}");
        }
        let err = load_err(&images, &labels[..labels.len() - 1]);
        assert!(matches!(err, DataError::Truncated { expected: 11, found: 10, .. }), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut images = good_images();
        images.push(0);
        let err = load_err(&images, &idx(&[3], &[1, 2, 3]));
        assert!(matches!(err, DataError::TrailingData { .. }), "{err:?}");
    }

    #[test]
    fn huge_dimensions_do_not_allocate_or_panic() {
        let err = load_err(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), &idx(&[0], &[]));
        assert!(matches!(err, DataError::BadHeader { .. } | DataError::Truncated { .. }), "{err:?}");
    }

    /// No images, each of 2^32 - 1 by 2^32 - 1 pixels: nothing to read, but
    /// a row width no matrix can have (it panicked making the empty matrix).
    #[test]
    fn zero_images_of_an_impossible_size_are_a_bad_header() {
        let err = load_err(&idx(&[0, u32::MAX, u32::MAX], &[]), &idx(&[0], &[]));
        assert!(matches!(err, DataError::BadHeader { .. }), "{err:?}");
        let dir = TempDir::new("mnist-empty");
        tiny(&dir, &idx(&[0, 28, 28], &[]), &idx(&[0], &[]));
        assert_eq!(load_mnist(&dir.0, Split::Test).unwrap().x.dim(), (0, 784));
    }

    #[test]
    fn count_mismatch_and_bad_labels_are_reported() {
        let err = load_err(&good_images(), &idx(&[2], &[1, 2]));
        assert!(matches!(err, DataError::CountMismatch { num_images: 3, num_labels: 2, .. }), "{err:?}");
        let err = load_err(&good_images(), &idx(&[3], &[1, 10, 2]));
        assert!(matches!(err, DataError::BadLabel { index: 1, label: 10, .. }), "{err:?}");
    }

    #[test]
    fn missing_files_are_io_errors_naming_the_file() {
        let dir = TempDir::new("mnist-missing");
        let err = load_mnist(&dir.0, Split::Train).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
    }
}
