//! Bad input gets a typed error and changes nothing.

mod common;

use std::fs;

use common::{open, options, orders};
use exactly::{Error, KeyMode, ManualClock, Options, Partition, Store, Verdict};

#[test]
fn empty_and_oversize_keys_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(common::T0);
    let store = Store::open(dir.path(), options(&clock).max_key_len(8)).unwrap();
    let p = orders(0);
    store.assign(&p).unwrap();

    assert!(matches!(store.check(&p, b""), Err(Error::EmptyKey)));
    assert!(matches!(
        store.check_and_mark(&p, b""),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(store.mark(&p, b""), Err(Error::EmptyKey)));
    assert!(matches!(store.unmark(&p, b""), Err(Error::EmptyKey)));
    assert!(matches!(
        store.check_and_mark(&p, b"123456789"),
        Err(Error::KeyTooLong { len: 9, max: 8 })
    ));
    let mut batch = store.batch(&p).unwrap();
    assert!(matches!(batch.check_and_mark(b""), Err(Error::EmptyKey)));
    assert!(matches!(
        batch.mark(b"123456789"),
        Err(Error::KeyTooLong { len: 9, max: 8 })
    ));
    assert_eq!(batch.check_and_mark(b"12345678").unwrap(), Verdict::New);
    batch.commit().unwrap();

    // Only the valid key was marked; a key of exactly max_key_len is fine.
    assert_eq!(store.check(&p, b"12345678").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&p, b"1234567").unwrap(), Verdict::New);
    let s = &store.stats().partitions[&p];
    assert!(s.live_keys_estimate >= 1);
}

#[test]
fn unassigned_partitions_are_not_assigned_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(1);
    assert!(matches!(store.check(&p, b"k"), Err(Error::NotAssigned(q)) if q == p));
    assert!(matches!(
        store.check_and_mark(&p, b"k"),
        Err(Error::NotAssigned(_))
    ));
    assert!(matches!(store.mark(&p, b"k"), Err(Error::NotAssigned(_))));
    assert!(matches!(store.unmark(&p, b"k"), Err(Error::NotAssigned(_))));
    assert!(matches!(store.batch(&p), Err(Error::NotAssigned(_))));
    assert!(matches!(
        store.committed_offset(&p),
        Err(Error::NotAssigned(_))
    ));
    assert!(matches!(store.revoke(&p), Err(Error::NotAssigned(_))));
    assert!(matches!(store.compact(&p), Err(Error::NotAssigned(_))));

    // After revoke, the same.
    store.assign(&p).unwrap();
    store.revoke(&p).unwrap();
    assert!(matches!(store.check(&p, b"k"), Err(Error::NotAssigned(_))));
    assert!(store.assigned().is_empty());
}

#[test]
fn invalid_partitions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    for p in [
        Partition::new("orders", -1),
        Partition::new("", 0),
        Partition::new("has space", 0),
        Partition::new("x".repeat(250), 0),
    ] {
        assert!(
            matches!(store.assign(&p), Err(Error::InvalidPartition { .. })),
            "{p}"
        );
        assert!(matches!(
            store.delete_partition(&p),
            Err(Error::InvalidPartition { .. })
        ));
    }
    assert!(store.assigned().is_empty());
}

#[test]
fn negative_and_backward_offsets_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();

    let mut batch = store.batch(&p).unwrap();
    batch.mark(b"a").unwrap();
    batch.set_offset(-1);
    assert!(matches!(batch.commit(), Err(Error::InvalidOffset(-1))));
    assert_eq!(store.check(&p, b"a").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), None);

    let mut batch = store.batch(&p).unwrap();
    batch.set_offset(100);
    batch.commit().unwrap();

    let mut batch = store.batch(&p).unwrap();
    batch.mark(b"b").unwrap();
    batch.set_offset(99);
    assert!(matches!(
        batch.commit(),
        Err(Error::OffsetRegression {
            committed: 100,
            requested: 99,
            ..
        })
    ));
    assert_eq!(store.check(&p, b"b").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), Some(100));

    // The same offset again is allowed (a batch of only duplicates).
    let mut batch = store.batch(&p).unwrap();
    batch.set_offset(100);
    batch.commit().unwrap();
}

#[test]
fn invalid_options_are_refused_before_touching_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let bad = Options::default().bloom_fp_rate(2.0);
    assert!(matches!(
        Store::open(&path, bad),
        Err(Error::InvalidOptions(_))
    ));
    assert!(!path.exists());
}

#[test]
fn a_directory_that_is_not_a_store_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::NotAStore { .. })
    ));
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["notes.txt"]);

    // A file is not a store either.
    let file = dir.path().join("notes.txt");
    assert!(matches!(
        Store::open(&file, Options::default()),
        Err(Error::NotAStore { .. })
    ));
}

#[test]
fn a_damaged_manifest_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), Options::default())
        .unwrap()
        .close()
        .unwrap();
    let manifest = dir.path().join("EXACTLY");
    let mut text = fs::read(&manifest).unwrap();
    let i = text.len() - 3;
    text[i] ^= 0x01;
    fs::write(&manifest, text).unwrap();
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::Corruption(_))
    ));
}

#[test]
fn missing_rocksdb_current_with_data_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    store.assign(&orders(0)).unwrap();
    store.mark(&orders(0), b"k").unwrap();
    store.close().unwrap();
    fs::remove_file(dir.path().join("CURRENT")).unwrap();
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::Corruption(_))
    ));
}

#[test]
fn a_newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = "exactly store\nformat_version = 3\nkey_mode = raw\n";
    let sum = xxhash_rust::xxh3::xxh3_64(body.as_bytes());
    fs::write(
        dir.path().join("EXACTLY"),
        format!("{body}checksum = {sum:016x}\n"),
    )
    .unwrap();
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::UnsupportedFormat {
            found: 3,
            supported: 2
        })
    ));
}

#[test]
fn an_option_fixed_at_creation_cannot_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Options::default().key_mode(KeyMode::Hashed)).unwrap();
    store.close().unwrap();
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::IncompatibleOptions {
            option: "key_mode",
            ..
        })
    ));
    // Options that may change on reopen do.
    let store = Store::open(
        dir.path(),
        Options::default()
            .key_mode(KeyMode::Hashed)
            .ttl(std::time::Duration::from_secs(60))
            .bloom_fp_rate(0.001)
            .max_key_len(16),
    )
    .unwrap();
    store.close().unwrap();
}

#[test]
fn a_second_open_in_the_same_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(Error::Locked { .. })
    ));
    store.close().unwrap();
    Store::open(dir.path(), Options::default()).unwrap();
}

#[test]
fn a_write_on_the_thread_that_holds_the_batch_is_refused_not_deadlocked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    let batch = store.batch(&p).unwrap();
    assert!(matches!(
        store.check_and_mark(&p, b"k"),
        Err(Error::BatchInProgress(_))
    ));
    assert!(matches!(store.batch(&p), Err(Error::BatchInProgress(_))));
    assert!(matches!(store.revoke(&p), Err(Error::BatchInProgress(_))));
    // Reads go on.
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
    drop(batch);
    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::New);
}

#[test]
fn bad_input_is_reported_before_the_partition_is_looked_at() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let unassigned = orders(7);
    // Key first, then the TTL, then the partition.
    assert!(matches!(
        store.mark_with_ttl(&unassigned, b"", Duration::ZERO),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.mark_with_ttl(&unassigned, b"k", Duration::ZERO),
        Err(Error::InvalidOptions(_))
    ));
    assert!(matches!(
        store.mark_with_ttl(&unassigned, b"k", Duration::from_secs(1)),
        Err(Error::NotAssigned(_))
    ));
    assert!(matches!(
        store.claim(&unassigned, b"", Duration::from_secs(1)),
        Err(Error::EmptyKey)
    ));
    // The same order in a batch.
    let p = orders(0);
    store.assign(&p).unwrap();
    let mut batch = store.batch(&p).unwrap();
    assert!(matches!(
        batch.mark_with_ttl(b"", Duration::ZERO),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        batch.mark_with_ttl(b"k", Duration::ZERO),
        Err(Error::InvalidOptions(_))
    ));
    assert!(batch.is_empty());
}
