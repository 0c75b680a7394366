//! Filter snapshots: a partition's Bloom front and claim table, saved when the
//! shard is closed cleanly, so a later `assign` need not scan every mark.
//!
//! A snapshot is only trusted when nothing was written to the partition since
//! it was taken: the snapshot carries a random id, and the same id is stored
//! in the partition's column family (`0x00 "filter_snapshot"`) after the file
//! is durable. The first batch committed after `assign` deletes that key in the
//! same atomic write as its marks, so after any later write (and any crash)
//! the ids no longer match and the filter is rebuilt from disk. A file whose
//! checksum does not match is never trusted either.
//!
//! A snapshot also records the times it was taken at (the store's clock and
//! the partition's time for marks). The filter has dropped the generations,
//! and the claim table the claims, that had expired by then; a store that
//! answers at an earlier time (its clock stepped back across a restart and
//! the ledger recorded less, or a larger `allowed_lateness`) would miss
//! them, so such a snapshot is not trusted: the filter is rebuilt from disk.
//!
//! File layout (`filters/<xxh3_128 of the column family name, hex>.snap`, a
//! fixed 37-byte name whatever the topic; integers little-endian):
//! `"EXSNAP02" ++ id: u64 ++ clock: u64 ++ partition_time: u64 ++ filter ++
//! claims: u64 ++ (key_len: u32 ++ key ++ value_len: u32 ++ value)* ++
//! xxh3_64 of everything before: u64`. Files of the first layout
//! (`EXSNAP01`, named after the partition) are never read: the partition is
//! rebuilt once.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::bloom::ExpiringFilter;
use crate::durable;
use crate::error::{Error, Result};
use crate::layout::Entry;

const MAGIC: &[u8; 8] = b"EXSNAP02";
/// Directory of snapshot files inside the store.
pub(crate) const SNAPSHOT_DIR: &str = "filters";

/// The snapshot file of the column family `cf_name`. Named by a hash: a
/// topic may be 249 characters, and a name derived from it could pass the
/// file system's 255-byte limit.
pub(crate) fn path(store_dir: &Path, cf_name: &str) -> PathBuf {
    store_dir
        .join(SNAPSHOT_DIR)
        .join(format!("{:032x}.snap", xxh3_128(cf_name.as_bytes())))
}

/// The file name builds before hashed names used, where it can exist.
fn legacy_path(store_dir: &Path, cf_name: &str) -> Option<PathBuf> {
    let name = format!("{}.snap", cf_name.replace('/', "~"));
    (name.len() <= 255).then(|| store_dir.join(SNAPSHOT_DIR).join(name))
}

/// The times a snapshot was taken at: nothing in it expired later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The store's clock (claims' leases).
    pub(crate) clock: u64,
    /// The partition's time for marks (the clock, or the watermark).
    pub(crate) partition: u64,
}

/// A snapshot read back.
pub(crate) struct Loaded {
    pub(crate) filter: ExpiringFilter,
    pub(crate) claims: HashMap<Vec<u8>, Entry>,
    pub(crate) taken: Taken,
}

/// Writes a snapshot durably (temporary file, fsync, rename, fsync).
pub(crate) fn write(
    store_dir: &Path,
    cf_name: &str,
    id: u64,
    taken: Taken,
    filter: &ExpiringFilter,
    claims: &HashMap<Vec<u8>, Entry>,
) -> Result<()> {
    let mut bytes = Vec::with_capacity(filter.memory_bytes() + 1024);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&taken.clock.to_le_bytes());
    bytes.extend_from_slice(&taken.partition.to_le_bytes());
    filter.encode(&mut bytes);
    bytes.extend_from_slice(&(claims.len() as u64).to_le_bytes());
    // Keys are at most `MAX_KEY_LEN_LIMIT` (64 KiB) plus a tag, entries 25
    // bytes: both lengths fit a u32.
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    for (k, e) in claims {
        let v = e.encode();
        bytes.extend_from_slice(&len32(k.len()));
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(&len32(v.len()));
        bytes.extend_from_slice(&v);
    }
    let sum = xxh3_64(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());

    let dir = store_dir.join(SNAPSHOT_DIR);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let target = path(store_dir, cf_name);
    durable::replace(&target, &target.with_extension("tmp"), &bytes)
}

/// Reads the snapshot with id `id`; `None` if it is missing, damaged, of
/// another id, or sized for other options.
pub(crate) fn read(
    store_dir: &Path,
    cf_name: &str,
    id: u64,
    expected_live_keys: usize,
    fp_rate: f64,
    ttl_ms: u64,
) -> Option<Loaded> {
    let bytes = fs::read(path(store_dir, cf_name)).ok()?;
    let (stored_id, loaded) = parse(&bytes, |b| {
        ExpiringFilter::decode(b, expected_live_keys, fp_rate, ttl_ms)
    })?;
    (stored_id == id).then_some(loaded)
}

/// The id and contents of the snapshot file of `cf_name`, with whatever
/// sizing it was written with (for the health check, which does not know
/// the consumer's options); `Ok(None)` if there is no file, an error
/// message if it is damaged.
pub(crate) fn read_any(
    store_dir: &Path,
    cf_name: &str,
) -> std::result::Result<Option<(u64, Loaded)>, String> {
    let file = path(store_dir, cf_name);
    match fs::read(&file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", file.display())),
        Ok(bytes) => parse(&bytes, ExpiringFilter::decode_any)
            .map(Some)
            .ok_or_else(|| format!("{} is damaged (checksum or layout)", file.display())),
    }
}

/// Parses a snapshot file's bytes into its id and contents.
fn parse(
    bytes: &[u8],
    decode_filter: impl FnOnce(&[u8]) -> Option<(ExpiringFilter, usize)>,
) -> Option<(u64, Loaded)> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
    if xxh3_64(body).to_le_bytes() != sum {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let (stored_id, rest) = rest.split_at_checked(8)?;
    let stored_id = u64::from_le_bytes(stored_id.try_into().ok()?);
    let (clock, rest) = rest.split_at_checked(8)?;
    let (partition, rest) = rest.split_at_checked(8)?;
    let taken = Taken {
        clock: u64::from_le_bytes(clock.try_into().ok()?),
        partition: u64::from_le_bytes(partition.try_into().ok()?),
    };
    let (filter, used) = decode_filter(rest)?;
    let mut rest = rest.get(used..)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let count = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut claims = HashMap::new();
    for _ in 0..count {
        let klen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let k = take(klen)?.to_vec();
        let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let entry = Entry::decode(take(vlen)?)?;
        claims.insert(k, entry);
    }
    if !rest.is_empty() {
        return None;
    }
    Some((
        stored_id,
        Loaded {
            filter,
            claims,
            taken,
        },
    ))
}

/// Removes the snapshot file a build before hashed names wrote for
/// `cf_name`, if any: it is never read again.
pub(crate) fn remove_legacy(store_dir: &Path, cf_name: &str) -> Result<()> {
    match legacy_path(store_dir, cf_name).map(|p| (fs::remove_file(&p), p)) {
        Some((Err(e), p)) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, e)),
        _ => Ok(()),
    }
}

/// Removes the snapshot file of `cf_name`, if any (and one of the legacy
/// name, which is never read again).
pub(crate) fn remove(store_dir: &Path, cf_name: &str) -> Result<()> {
    let remove = |p: PathBuf| match fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, e)),
        _ => Ok(()),
    };
    if let Some(legacy) = legacy_path(store_dir, cf_name) {
        remove(legacy)?;
    }
    remove(path(store_dir, cf_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAKEN: Taken = Taken {
        clock: 1_234,
        partition: 567,
    };

    #[test]
    fn names_fit_any_topic() {
        let dir = tempfile::tempdir().unwrap();
        let (f, claims) = sample();
        let cf = format!("p/{}/2147483647", "t".repeat(249));
        let file = path(dir.path(), &cf);
        assert_eq!(file.file_name().unwrap().len(), 37);
        assert_ne!(file, path(dir.path(), "p/t/0"));
        write(dir.path(), &cf, 9, TAKEN, &f, &claims).unwrap();
        assert!(read(dir.path(), &cf, 9, 100, 0.01, 1_000).is_some());
        remove(dir.path(), &cf).unwrap();
        assert!(!file.exists());
    }

    fn sample() -> (ExpiringFilter, HashMap<Vec<u8>, Entry>) {
        let mut f = ExpiringFilter::new(100, 0.01, 1_000);
        for i in 0..50u8 {
            f.insert(&[1, i], 500 + u64::from(i));
        }
        let mut claims = HashMap::new();
        claims.insert(
            vec![1, 200],
            Entry::Claimed {
                lease_until: 9,
                epoch: 2,
                token: 77,
            },
        );
        (f, claims)
    }

    #[test]
    fn round_trips_and_checks_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let (f, claims) = sample();
        write(dir.path(), "p/t/0", 42, TAKEN, &f, &claims).unwrap();
        let loaded = read(dir.path(), "p/t/0", 42, 100, 0.01, 1_000).unwrap();
        assert!((0..50u8).all(|i| loaded.filter.may_contain(&[1, i], 0)));
        assert_eq!(loaded.claims, claims);
        assert_eq!(loaded.taken, TAKEN);
        assert!(read(dir.path(), "p/t/0", 43, 100, 0.01, 1_000).is_none());
        assert!(read(dir.path(), "p/t/1", 42, 100, 0.01, 1_000).is_none());
        remove(dir.path(), "p/t/0").unwrap();
        assert!(read(dir.path(), "p/t/0", 42, 100, 0.01, 1_000).is_none());
        remove(dir.path(), "p/t/0").unwrap();
    }

    #[test]
    fn read_any_ignores_the_sizing_and_reports_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_any(dir.path(), "p/t/0").unwrap().map(|(id, _)| id),
            None
        );
        let (f, claims) = sample();
        write(dir.path(), "p/t/0", 5, TAKEN, &f, &claims).unwrap();
        let (id, loaded) = read_any(dir.path(), "p/t/0").unwrap().unwrap();
        assert_eq!(id, 5);
        assert_eq!(loaded.claims, claims);
        assert!(read(dir.path(), "p/t/0", 5, 999, 0.01, 1_000).is_none());
        let file = path(dir.path(), "p/t/0");
        let mut bad = fs::read(&file).unwrap();
        bad[20] ^= 1;
        fs::write(&file, &bad).unwrap();
        assert!(read_any(dir.path(), "p/t/0").is_err());
    }

    #[test]
    fn any_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (f, claims) = sample();
        write(dir.path(), "p/t/0", 1, TAKEN, &f, &claims).unwrap();
        let file = path(dir.path(), "p/t/0");
        let good = fs::read(&file).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            fs::write(&file, &bad).unwrap();
            assert!(
                read(dir.path(), "p/t/0", 1, 100, 0.01, 1_000).is_none(),
                "flip at {i}"
            );
        }
        for len in [0, 8, good.len() / 2, good.len() - 1] {
            fs::write(&file, &good[..len]).unwrap();
            assert!(
                read(dir.path(), "p/t/0", 1, 100, 0.01, 1_000).is_none(),
                "cut at {len}"
            );
        }
    }
}
