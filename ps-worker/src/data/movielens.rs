//! MovieLens 100k ratings (`u.data`, `u1.base`, ...): `user\titem\trating\ttimestamp`.

use std::path::Path;

use super::{DataError, as_text, read_maybe_gz};

/// One rating, with user and item ids as in the file (1-based in ml-100k).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rating {
    pub user: u32,
    pub item: u32,
    pub rating: f32,
}

/// Loads a tab-separated ratings file, gzipped or plain. Blank lines are skipped; the
/// timestamp must be present and an integer but is not kept.
pub fn load_ratings(path: &Path) -> Result<Vec<Rating>, DataError> {
    let bytes = read_maybe_gz(path)?;
    let text = as_text(path, &bytes)?;
    parse(path, text)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Rating>, DataError> {
    let mut out = Vec::with_capacity(text.len() / 20);
    for (line_no, line) in text.lines().enumerate() {
        let bad = |reason: String| DataError::BadLine { path: path.to_owned(), line: line_no + 1, reason };
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split('\t');
        let mut next = |what: &str| {
            fields
                .next()
                .ok_or_else(|| bad(format!("missing {what}: expected user, item, rating, timestamp")))
        };
        let (user, item, rating, ts) = (next("user")?, next("item")?, next("rating")?, next("timestamp")?);
        if fields.next().is_some() {
            return Err(bad("more than 4 tab-separated fields".into()));
        }
        let user = user.parse().map_err(|_| bad(format!("user id {user:?} is not an integer")))?;
        let item = item.parse().map_err(|_| bad(format!("item id {item:?} is not an integer")))?;
        let rating: f32 = rating.parse().map_err(|_| bad(format!("rating {rating:?} is not a number")))?;
        if !rating.is_finite() {
            return Err(bad(format!("rating {rating} is not finite")));
        }
        ts.parse::<u64>().map_err(|_| bad(format!("timestamp {ts:?} is not an integer")))?;
        out.push(Rating { user, item, rating });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::test_util::{TempDir, assert_bad_line, manifest_path};
    use super::*;

    /// MovieLens may not be copied into the project: it is read from the shared data
    /// folder next to the checkout, and these tests skip when it is absent.
    fn shared(file: &str) -> Option<PathBuf> {
        let path = manifest_path("../../shared/data/ml-100k").join(file);
        if path.exists() {
            Some(path)
        } else {
            eprintln!("skipping: {} not found (MovieLens is not part of the project)", path.display());
            None
        }
    }

    #[test]
    fn u1_split_has_the_known_counts() {
        for (file, rows) in [("u1.base.gz", 80_000), ("u1.test.gz", 20_000)] {
            let Some(path) = shared(file) else { return };
            let ratings = load_ratings(&path).unwrap();
            assert_eq!(ratings.len(), rows, "{file}");
            assert!(ratings.iter().all(|r| (1.0..=5.0).contains(&r.rating)));
            assert!(ratings.iter().all(|r| (1..=943).contains(&r.user) && (1..=1682).contains(&r.item)));
        }
    }

    #[test]
    fn parses_plain_files_and_skips_blank_lines() {
        let dir = TempDir::new("ml-plain");
        let path = dir.write("u.data", b"196\t242\t3\t881250949\n\n186\t302\t3.5\t891717742\r\n");
        let ratings = load_ratings(&path).unwrap();
        assert_eq!(
            ratings,
            [Rating { user: 196, item: 242, rating: 3.0 }, Rating { user: 186, item: 302, rating: 3.5 }]
        );
    }

    fn check_bad_line(text: &str, line: usize, reason_part: &str) {
        assert_bad_line(parse(&PathBuf::from("u.data"), text), text, line, reason_part);
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        check_bad_line("1\t2\t3\t4\n1\t2\t3\n", 2, "missing timestamp");
        check_bad_line("1 2 3 4\n", 1, "missing item");
        check_bad_line("1\t2\t3\t4\t5\n", 1, "more than 4");
        check_bad_line("x\t2\t3\t4\n", 1, "user id");
        check_bad_line("1\t-2\t3\t4\n", 1, "item id");
        check_bad_line("1\t2\tgood\t4\n", 1, "rating");
        check_bad_line("1\t2\tinf\t4\n", 1, "not finite");
        check_bad_line("1\t2\t3\tyesterday\n", 1, "timestamp");
    }
}
