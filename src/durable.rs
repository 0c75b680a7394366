//! Small files the store owns (manifest, ledger, filter snapshots): replaced
//! atomically and durably, and, for the text ones, sealed with a checksum
//! line so that damage is detected rather than misread.

use std::fs;
use std::io::Write;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};

/// Replaces `target` with `bytes` so that a crash or power cut leaves either
/// the old file or the new one: write `tmp`, fsync it, rename it over
/// `target`, fsync the directory.
pub(crate) fn replace(target: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    fs::rename(tmp, target).map_err(|e| Error::io(target, e))?;
    match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// The contents of `path`; `Ok(None)` if there is no such file.
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Fsyncs a directory so that a rename or create in it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// `body` (lines ending in `\n`) followed by `checksum = <XXH3-64 of body>`.
pub(crate) fn seal(body: &str) -> String {
    format!("{body}checksum = {:016x}\n", xxh3_64(body.as_bytes()))
}

/// The body of a text sealed by [`seal`]; `Error::Corruption` naming `what`
/// if it is not UTF-8, has no checksum line, or the checksum does not match.
pub(crate) fn unseal(text: &[u8], what: &str) -> Result<String> {
    let corrupt = |why: &str| Error::Corruption(format!("{what}: {why}"));
    let text = std::str::from_utf8(text).map_err(|_| corrupt("not UTF-8"))?;
    let (body, checksum_line) = text
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .ok_or_else(|| corrupt("truncated"))?;
    let body = format!("{body}\n");
    let stored = checksum_line
        .strip_prefix("checksum = ")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| corrupt("missing checksum"))?;
    if stored != xxh3_64(body.as_bytes()) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_text_round_trips_and_damage_is_caught() {
        let text = seal("a = 1\nb = 2\n");
        assert_eq!(unseal(text.as_bytes(), "t").unwrap(), "a = 1\nb = 2\n");
        let mut damaged = text.into_bytes();
        damaged[2] ^= 1;
        assert!(matches!(unseal(&damaged, "t"), Err(Error::Corruption(_))));
    }

    #[test]
    fn replace_swaps_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let tmp = dir.path().join("f.tmp");
        replace(&target, &tmp, b"one").unwrap();
        replace(&target, &tmp, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert!(!tmp.exists());
    }
}
