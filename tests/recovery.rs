//! Reopening gives the same answers: after a clean close, and after the store
//! is dropped without one.

mod common;

use common::{open, options, orders};
use exactly::{Store, Verdict};

fn fill(store: &Store) {
    for n in 0..3 {
        let p = orders(n);
        store.assign(&p).unwrap();
        for round in 0..5i64 {
            let mut batch = store.batch(&p).unwrap();
            for i in 0..100 {
                batch.mark(format!("{n}-{round}-{i}").as_bytes()).unwrap();
            }
            batch.set_offset((round + 1) * 100);
            batch.commit().unwrap();
        }
    }
}

fn verify(store: &Store) {
    for n in 0..3 {
        let p = orders(n);
        store.assign(&p).unwrap();
        assert_eq!(store.committed_offset(&p).unwrap(), Some(500));
        for round in 0..5i64 {
            for i in 0..100 {
                let key = format!("{n}-{round}-{i}");
                assert_eq!(
                    store.check(&p, key.as_bytes()).unwrap(),
                    Verdict::Duplicate,
                    "{key}"
                );
            }
        }
        for i in 0..500 {
            let key = format!("never-{i}");
            assert_eq!(store.check(&p, key.as_bytes()).unwrap(), Verdict::New);
        }
    }
}

/// Whether each assigned partition's filter came from a snapshot.
fn from_snapshot(store: &Store) -> Vec<bool> {
    store
        .stats()
        .partitions
        .values()
        .map(|s| s.filter_from_snapshot)
        .collect()
}

#[test]
fn reopen_after_drop_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    fill(&store);
    drop(store);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    verify(&store);
    // Twice: a reopened store reopens again.
    drop(store);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    verify(&store);
}

#[test]
fn hashed_keys_reopen_with_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = exactly::ManualClock::new(common::T0);
    let opts = || options(&clock).key_mode(exactly::KeyMode::Hashed);
    let store = Store::open(dir.path(), opts()).unwrap();
    let p = orders(0);
    store.assign(&p).unwrap();
    let long = vec![b'x'; 1000];
    store.mark(&p, &long).unwrap();
    store.mark(&p, b"short").unwrap();
    store.close().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, &long).unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&p, b"short").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&p, b"shorT").unwrap(), Verdict::New);
}

#[test]
fn a_clean_close_saves_the_filter_and_reopen_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    fill(&store);
    store.close().unwrap();

    let store = Store::open(dir.path(), options(&clock)).unwrap();
    verify(&store);
    assert_eq!(from_snapshot(&store), vec![true; 3]);
}

#[test]
fn a_snapshot_is_not_trusted_after_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    fill(&store);
    store.close().unwrap();

    // Reopen from the snapshot, write more, then stop without closing.
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let p = orders(0);
    store.assign(&p).unwrap();
    assert_eq!(from_snapshot(&store), vec![true]);
    store.mark(&p, b"after-the-snapshot").unwrap();
    drop(store);

    let store = Store::open(dir.path(), options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(from_snapshot(&store), vec![false]);
    assert_eq!(
        store.check(&p, b"after-the-snapshot").unwrap(),
        Verdict::Duplicate
    );
    verify(&store);
}

#[test]
fn a_damaged_or_mismatched_snapshot_is_rebuilt_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    fill(&store);
    store.close().unwrap();

    // Damage every snapshot file.
    for entry in std::fs::read_dir(dir.path().join("filters")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    verify(&store);
    assert_eq!(from_snapshot(&store), vec![false; 3]);
    store.close().unwrap();

    // Other filter sizing: the snapshot does not fit and is rebuilt.
    let store = Store::open(
        dir.path(),
        options(&clock).expected_keys_per_partition(123_456),
    )
    .unwrap();
    verify(&store);
    assert_eq!(from_snapshot(&store), vec![false; 3]);
}
