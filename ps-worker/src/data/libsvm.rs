//! The LIBSVM / svmlight text format for sparse binary classification.
//!
//! One example per line: `label index:value index:value ...`, indices 1-based and
//! strictly ascending, fields separated by spaces or tabs. A `#` starts a comment that
//! runs to the end of the line; blank lines are skipped; `qid:` fields are not supported.

use std::path::Path;

use super::{DataError, as_text, read_maybe_gz, shard_range};

/// Sparse rows in compressed sparse row (CSR) form with binary targets.
///
/// Row `i` has the non-zeros `indices[indptr[i]..indptr[i + 1]]` (0-based, strictly
/// ascending, each `< num_features`) with `values` at the same positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseDataset {
    /// `len() + 1` offsets into `indices` and `values`, starting at 0.
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
    /// One target per row: `1.0` for a positive example (`+1`/`1` in the file), `0.0`
    /// for a negative one (`-1` or `0`).
    pub labels: Vec<f32>,
    pub num_features: usize,
}

impl SparseDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `i` as `(indices, values)`.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let range = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[range.clone()], &self.values[range])
    }

    /// The contiguous block of rows worker `worker_index` of `num_workers` owns (see
    /// [`shard_range`]), copied.
    pub fn shard(&self, worker_index: usize, num_workers: usize) -> Result<Self, DataError> {
        let rows = shard_range(self.len(), worker_index, num_workers)?;
        let (lo, hi) = (self.indptr[rows.start], self.indptr[rows.end]);
        Ok(Self {
            indptr: self.indptr[rows.start..=rows.end].iter().map(|&p| p - lo).collect(),
            indices: self.indices[lo..hi].to_vec(),
            values: self.values[lo..hi].to_vec(),
            labels: self.labels[rows].to_vec(),
            num_features: self.num_features,
        })
    }
}

/// Loads a LIBSVM file, gzipped or plain.
///
/// With `num_features: Some(d)`, an index above `d` is an error; with `None` the number
/// of features is the largest index in the file. Pass it for a test set, whose largest
/// index may be smaller than the training set's (a9a: 123 features, `a9a.t` uses 122).
pub fn load_libsvm(path: &Path, num_features: Option<usize>) -> Result<SparseDataset, DataError> {
    let bytes = read_maybe_gz(path)?;
    let text = as_text(path, &bytes)?;
    parse(path, text, num_features)
}

fn parse(path: &Path, text: &str, num_features: Option<usize>) -> Result<SparseDataset, DataError> {
    let mut data = SparseDataset {
        indptr: vec![0],
        indices: Vec::new(),
        values: Vec::new(),
        labels: Vec::new(),
        num_features: num_features.unwrap_or(0),
    };
    // Indices are stored as `u32`, so no index may exceed 2^32.
    const MAX_INDEX: u64 = u32::MAX as u64 + 1;
    let limit = num_features.map_or(MAX_INDEX, |d| (d as u64).min(MAX_INDEX));
    let mut max_index = 0u64;

    for (line_no, line) in text.lines().enumerate() {
        let line_no = line_no + 1;
        let bad = |reason: String| DataError::BadLine { path: path.to_owned(), line: line_no, reason };
        let line = line.split_once('#').map_or(line, |(content, _comment)| content);
        let mut fields = line.split_ascii_whitespace();
        let Some(label) = fields.next() else { continue };

        let label = match label.parse::<f32>() {
            Ok(1.0) => 1.0,
            Ok(-1.0 | 0.0) => 0.0,
            _ => return Err(bad(format!("label {label:?} is not one of +1, -1, 0"))),
        };

        let mut prev = 0u64;
        for field in fields {
            let (index, value) =
                field.split_once(':').ok_or_else(|| bad(format!("feature {field:?} is not index:value")))?;
            let index: u64 = index
                .parse()
                .map_err(|_| bad(format!("feature index {index:?} is not a positive integer")))?;
            if index == 0 || index > limit {
                return Err(DataError::IndexOutOfRange {
                    path: path.to_owned(),
                    line: line_no,
                    index,
                    num_features: limit as usize,
                });
            }
            if index <= prev {
                return Err(bad(format!("feature index {index} follows {prev}: indices must ascend")));
            }
            let value: f32 =
                value.parse().map_err(|_| bad(format!("feature value {value:?} is not a number")))?;
            if !value.is_finite() {
                return Err(bad(format!("feature value {value} is not finite")));
            }
            prev = index;
            data.indices.push((index - 1) as u32);
            data.values.push(value);
        }
        max_index = max_index.max(prev);
        data.labels.push(label);
        data.indptr.push(data.indices.len());
    }

    if num_features.is_none() {
        data.num_features = max_index as usize;
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::test_util::{TempDir, assert_bad_line, manifest_path};
    use super::*;

    fn check_real(file: &str, rows: usize, nnz: Option<usize>, positives: usize, max_index: u32) {
        let data = load_libsvm(&manifest_path(file), Some(123)).unwrap();
        assert_eq!(data.len(), rows);
        if let Some(nnz) = nnz {
            assert_eq!(data.nnz(), nnz);
        }
        assert_eq!(data.labels.iter().filter(|&&l| l == 1.0).count(), positives);
        assert_eq!(data.indptr.len(), rows + 1);
        assert_eq!(data.indices.iter().max().copied(), Some(max_index - 1));
        assert_eq!(data.num_features, 123);
    }

    #[test]
    fn a9a_has_the_known_counts() {
        check_real("../data/a9a/a9a.gz", 32_561, Some(451_592), 7_841, 123);
    }

    #[test]
    fn a9a_test_has_the_known_counts() {
        check_real("../data/a9a/a9a.t.gz", 16_281, None, 3_846, 122);
        let inferred = load_libsvm(&manifest_path("../data/a9a/a9a.t.gz"), None).unwrap();
        assert_eq!(inferred.num_features, 122);
    }

    fn parse_str(text: &str, num_features: Option<usize>) -> Result<SparseDataset, DataError> {
        parse(&PathBuf::from("mem.svm"), text, num_features)
    }

    #[test]
    fn parses_csr_with_comments_blank_lines_and_trailing_space() {
        let data = parse_str("+1 1:0.5 3:2 \n\n-1\t2:1e-3  # note\n# only a comment\n0 4:1\n", None).unwrap();
        assert_eq!(data.indptr, [0, 2, 3, 4]);
        assert_eq!(data.indices, [0, 2, 1, 3]);
        assert_eq!(data.values, [0.5, 2.0, 1e-3, 1.0]);
        assert_eq!(data.labels, [1.0, 0.0, 0.0]);
        assert_eq!(data.num_features, 4);
        assert_eq!(data.row(1), (&[1u32][..], &[1e-3f32][..]));
    }

    #[test]
    fn reads_plain_files_too() {
        let dir = TempDir::new("svm-plain");
        let path = dir.write("x.svm", b"1 2:1\n-1 1:1\n");
        let data = load_libsvm(&path, Some(2)).unwrap();
        assert_eq!((data.len(), data.nnz(), data.num_features), (2, 2, 2));
    }

    fn check_bad_line(text: &str, line: usize, reason_part: &str) {
        assert_bad_line(parse_str(text, Some(10)), text, line, reason_part);
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        check_bad_line("1 1:1\n2 1:1\n", 2, "label");
        check_bad_line("abc 1:1\n", 1, "label");
        check_bad_line("1 1:1\n1 3\n", 2, "index:value");
        check_bad_line("1 x:1\n", 1, "positive integer");
        check_bad_line("1 -1:1\n", 1, "positive integer");
        check_bad_line("1 1:abc\n", 1, "not a number");
        check_bad_line("1 1:nan\n", 1, "not finite");
        check_bad_line("1 2:1 2:1\n", 1, "ascend");
        check_bad_line("1 3:1 2:1\n", 1, "ascend");
    }

    #[test]
    fn out_of_range_indices_are_reported() {
        let err = parse_str("1 1:1\n1 0:1\n", Some(10)).unwrap_err();
        assert!(matches!(err, DataError::IndexOutOfRange { line: 2, index: 0, .. }), "{err:?}");
        let err = parse_str("1 11:1\n", Some(10)).unwrap_err();
        assert!(matches!(err, DataError::IndexOutOfRange { index: 11, num_features: 10, .. }), "{err:?}");
        let err = parse_str("1 99999999999:1\n", None).unwrap_err();
        assert!(matches!(err, DataError::IndexOutOfRange { .. }), "{err:?}");
    }

    #[test]
    fn shards_keep_rows_intact() {
        let data = parse_str("1 1:1\n-1 2:1 3:1\n1\n-1 4:1\n1 5:1\n", None).unwrap();
        let a = data.shard(0, 2).unwrap();
        let b = data.shard(1, 2).unwrap();
        assert_eq!((a.len(), b.len()), (3, 2));
        assert_eq!(a.indptr, [0, 1, 3, 3]);
        assert_eq!(b.indptr, [0, 1, 2]);
        assert_eq!(b.indices, [3, 4]);
        assert_eq!(b.labels, [0.0, 1.0]);
    }
}
