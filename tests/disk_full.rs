//! A full disk during batch commits: the failing batch reports an error and
//! leaves nothing behind, everything acknowledged before it stays, reads go
//! on, and once space is freed a reopened store has every acknowledged batch.
//!
//! The store lives on a small tmpfs mounted for the test, which needs root
//! (as CI has); elsewhere the test says so and does nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use exactly::{Error, Options, Partition, Store, Verdict};

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn key(b: u64, j: u64) -> Vec<u8> {
    // Incompressible keys, so the disk fills at a predictable pace.
    let x = (b * 1_000 + j).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut k = format!("{b}-{j}-").into_bytes();
    k.extend_from_slice(&x.to_le_bytes());
    k.extend_from_slice(&x.rotate_left(17).to_le_bytes());
    k.extend_from_slice(&[0x5a; 64]);
    k
}

const PER_BATCH: u64 = 200;

#[test]
fn a_full_disk_fails_the_batch_whole_and_loses_nothing_acknowledged() {
    let scratch = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(scratch.path(), "24m") else {
        eprintln!("disk_full: cannot mount a tmpfs here (needs root); not run");
        return;
    };
    // Freed before the reopen. Half the disk: recovery replays the logs
    // into a table before it deletes them, and a busy machine's RocksDB
    // may have flushed less before the disk filled; with 4 MB the reopened
    // store sometimes filled the disk again (seen once in CI, under load).
    let ballast = scratch.path().join("ballast");
    fs::write(&ballast, vec![0u8; 12 << 20]).unwrap();
    let dir = scratch.path().join("store");
    let options = || {
        Options::default()
            .ttl(Duration::from_secs(3600))
            .expected_keys_per_partition(100_000)
    };
    let store = Store::open(&dir, options()).unwrap();
    let p = Partition::new("orders", 0);
    store.assign(&p).unwrap();

    let mut acknowledged = 0u64;
    let failed_batch = loop {
        assert!(acknowledged < 10_000, "the disk never filled up");
        let mut batch = store.batch(&p).unwrap();
        for j in 0..PER_BATCH {
            batch.mark(&key(acknowledged, j)).unwrap();
        }
        batch.set_offset(((acknowledged + 1) * PER_BATCH) as i64);
        match batch.commit() {
            Ok(()) => acknowledged += 1,
            Err(e) => {
                assert!(matches!(e, Error::Storage(_)), "{e:?}");
                break acknowledged;
            }
        }
    };
    assert!(failed_batch > 0, "the first batch already failed");

    // Nothing of the failed batch is visible; everything before it is, and
    // reads still work on the full disk.
    for j in 0..PER_BATCH {
        assert_eq!(
            store.check(&p, &key(failed_batch, j)).unwrap(),
            Verdict::New
        );
    }
    assert_eq!(
        store.check(&p, &key(failed_batch - 1, 0)).unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(
        store.committed_offset(&p).unwrap(),
        Some((failed_batch * PER_BATCH) as i64)
    );
    // The store is poisoned: later writes fail too (even with space freed)
    // until it is reopened, instead of half-working.
    fs::remove_file(&ballast).unwrap();
    assert!(matches!(store.mark(&p, b"later"), Err(Error::Storage(_))));
    drop(store);

    // Reopen with space: every acknowledged batch is there, the failed one is not.
    let store = Store::open(&dir, options()).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(
        store.committed_offset(&p).unwrap(),
        Some((failed_batch * PER_BATCH) as i64)
    );
    for b in 0..failed_batch {
        for j in [0, PER_BATCH / 2, PER_BATCH - 1] {
            assert_eq!(
                store.check(&p, &key(b, j)).unwrap(),
                Verdict::Duplicate,
                "batch {b}"
            );
        }
    }
    for j in 0..PER_BATCH {
        assert_eq!(
            store.check(&p, &key(failed_batch, j)).unwrap(),
            Verdict::New
        );
    }
    // And it takes writes again.
    store.mark(&p, b"after-the-disk-was-freed").unwrap();
    store.close().unwrap();
}
