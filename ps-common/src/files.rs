//! Reading files whose size the reader does not control: run files, key
//! files, manifests, model files. A file is read whole, but never past a
//! cap the caller names, nor past the length a regular file states: a path
//! that names a device (`/dev/zero` states no length and never ends), a
//! file that grows while read, or a very large file is refused with an
//! error after reading at most one byte too many, instead of growing a
//! buffer until the process aborts.

use std::io::Read;
use std::path::Path;

/// Run and config files (TOML, JSON) are a few KiB; this is far over any.
pub const MAX_TEXT_FILE: u64 = 16 << 20;

/// The bytes of `path`, if it holds at most `cap` of them. A regular file
/// is read up to the length it states (one that grows meanwhile is
/// refused); a FIFO (`--config <(...)`) up to `cap`; anything else (a
/// device, a directory) is refused unread. Refusals are `InvalidData`
/// errors naming the reason; the path is the caller's to add, as with every
/// `std::fs` error.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let refuse = |what: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let bound = if meta.is_file() {
        if meta.len() > cap {
            return refuse(format!("{} bytes is over the limit of {cap}", meta.len()));
        }
        meta.len()
    } else if is_fifo(&meta) {
        cap
    } else {
        return refuse("not a regular file".to_string());
    };
    let mut bytes = Vec::with_capacity(usize::try_from(bound.min(1 << 20)).unwrap_or(0));
    file.take(bound.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > bound {
        return match meta.is_file() {
            true => refuse(format!("longer than the {bound} bytes it stated (growing while read)")),
            false => refuse(format!("over the limit of {cap} bytes")),
        };
    }
    Ok(bytes)
}

#[cfg(unix)]
fn is_fifo(meta: &std::fs::Metadata) -> bool {
    std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type())
}

#[cfg(not(unix))]
fn is_fifo(_: &std::fs::Metadata) -> bool {
    false
}

/// [`read_capped`] as UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    String::from_utf8(read_capped(path, cap)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_its_cap_is_refused_after_at_most_one_byte_more() {
        let dir = std::env::temp_dir().join(format!("ps-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_capped(&path, 10).unwrap(), b"0123456789");
        assert_eq!(read_text_capped(&path, 64).unwrap(), "0123456789");
        let err = read_capped(&path, 9).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("10 bytes is over the limit of 9"), "{err}");
        // A sparse file far larger than memory, and a device that never ends.
        let huge = dir.join("huge");
        std::fs::File::create(&huge).unwrap().set_len(64 << 30).unwrap();
        assert_eq!(read_capped(&huge, 1 << 20).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        if Path::new("/dev/zero").exists() {
            let err = read_text_capped(Path::new("/dev/zero"), MAX_TEXT_FILE).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(read_text_capped(&path, 64).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
