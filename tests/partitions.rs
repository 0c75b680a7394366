//! Partitions: assign, revoke, delete, isolation, and threads.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::{open, orders};
use exactly::{Partition, Verdict};

#[test]
fn partitions_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let (a, b) = (orders(0), Partition::new("payments", 0));
    store.assign(&a).unwrap();
    store.assign(&b).unwrap();
    store.mark(&a, b"k").unwrap();
    assert_eq!(store.check(&a, b"k").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&b, b"k").unwrap(), Verdict::New);
    let mut batch = store.batch(&b).unwrap();
    batch.set_offset(7);
    batch.commit().unwrap();
    assert_eq!(store.committed_offset(&a).unwrap(), None);
    assert_eq!(store.committed_offset(&b).unwrap(), Some(7));
    assert_eq!(store.assigned(), vec![a, b]);
}

#[test]
fn revoke_keeps_data_for_a_later_assign() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(2);
    store.assign(&p).unwrap();
    store.assign(&p).unwrap(); // idempotent
    let mut batch = store.batch(&p).unwrap();
    batch.mark(b"x").unwrap();
    batch.set_offset(11);
    batch.commit().unwrap();
    store.revoke(&p).unwrap();
    assert!(store.assigned().is_empty());
    assert!(store.stats().partitions.is_empty());

    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"x").unwrap(), Verdict::Duplicate);
    assert_eq!(store.committed_offset(&p).unwrap(), Some(11));
}

#[test]
fn delete_partition_removes_marks_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(3);
    assert!(!store.delete_partition(&p).unwrap());
    store.assign(&p).unwrap();
    let mut batch = store.batch(&p).unwrap();
    batch.mark(b"x").unwrap();
    batch.set_offset(5);
    batch.commit().unwrap();
    assert!(store.delete_partition(&p).unwrap());
    assert!(store.assigned().is_empty());

    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"x").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), None);
    // An offset may start again from zero after a delete.
    let mut batch = store.batch(&p).unwrap();
    batch.set_offset(0);
    batch.commit().unwrap();

    // The deletion survives reopen.
    store.delete_partition(&p).unwrap();
    store.close().unwrap();
    let store = exactly::Store::open(dir.path(), common::options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.committed_offset(&p).unwrap(), None);
}

#[test]
fn threads_racing_on_one_key_see_exactly_one_new() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let store = Arc::new(store);
    let p = orders(0);
    store.assign(&p).unwrap();
    let threads = 4;
    let keys = 300;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (store, p, barrier) = (store.clone(), p.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut new = Vec::new();
                for i in 0..keys {
                    let key = format!("k-{i}");
                    // Half the threads use batches, half single operations.
                    let verdict = if t % 2 == 0 {
                        store.check_and_mark(&p, key.as_bytes()).unwrap()
                    } else {
                        let mut batch = store.batch(&p).unwrap();
                        let v = batch.check_and_mark(key.as_bytes()).unwrap();
                        batch.commit().unwrap();
                        v
                    };
                    if verdict == Verdict::New {
                        new.push(i);
                    }
                }
                new
            })
        })
        .collect();
    let mut all: Vec<usize> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..keys).collect::<Vec<_>>(),
        "each key New exactly once"
    );
}

#[test]
fn threads_on_different_partitions_work_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let store = Arc::new(store);
    let handles: Vec<_> = (0..4)
        .map(|n| {
            let store = store.clone();
            thread::spawn(move || {
                let p = orders(n);
                store.assign(&p).unwrap();
                for round in 0..20i64 {
                    let mut batch = store.batch(&p).unwrap();
                    for i in 0..50 {
                        let key = format!("{round}-{i}");
                        assert_eq!(batch.check_and_mark(key.as_bytes()).unwrap(), Verdict::New);
                    }
                    batch.set_offset((round + 1) * 50);
                    batch.commit().unwrap();
                }
                store.committed_offset(&p).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Some(1_000));
    }
    assert_eq!(store.assigned().len(), 4);
}

#[test]
fn a_batch_dropped_without_commit_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    {
        let mut batch = store.batch(&p).unwrap();
        assert_eq!(batch.check_and_mark(b"a").unwrap(), Verdict::New);
        assert_eq!(batch.check_and_mark(b"a").unwrap(), Verdict::Duplicate);
        assert_eq!(batch.len(), 1);
        batch.set_offset(9);
    }
    assert_eq!(store.check(&p, b"a").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), None);
    let s = &store.stats().partitions[&p];
    assert_eq!(s.duplicates, 1);
    assert!(s.checks >= 3);
}

#[test]
fn stats_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    for i in 0..100u32 {
        store.check_and_mark(&p, &i.to_be_bytes()).unwrap();
    }
    for i in 0..10u32 {
        assert_eq!(
            store.check(&p, &i.to_be_bytes()).unwrap(),
            Verdict::Duplicate
        );
    }
    assert!(store.unmark(&p, &0u32.to_be_bytes()).unwrap());
    assert!(!store.unmark(&p, &0u32.to_be_bytes()).unwrap());
    assert_eq!(store.check(&p, &0u32.to_be_bytes()).unwrap(), Verdict::New);
    let s = &store.stats().partitions[&p];
    assert_eq!(s.checks, 111);
    assert_eq!(s.duplicates, 10);
    // An unmarked key stays in the filter: its check is a confirmed-away positive.
    assert!(s.bloom_false_positives >= 1);
    assert!(s.bloom_negatives >= 90);
    assert!(s.filter_bytes > 0);
}

#[test]
fn the_longest_topic_kafka_allows_keeps_its_snapshot_and_deletes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    for len in [247, 248, 249] {
        let p = Partition::new("t".repeat(len), i32::MAX);
        store.assign(&p).unwrap();
        store.mark(&p, b"k").unwrap();
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
        assert!(store.stats().partitions[&p].filter_from_snapshot, "{len}");
        assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
        assert!(store.delete_partition(&p).unwrap(), "{len}");
        assert!(!store.delete_partition(&p).unwrap(), "{len}");
        store.assign(&p).unwrap();
        assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
    }
}

#[test]
fn a_batch_check_sees_its_own_marks_and_marks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    store.mark(&p, b"old").unwrap();
    let mut batch = store.batch(&p).unwrap();
    assert_eq!(batch.check(b"old").unwrap(), Verdict::Duplicate);
    assert_eq!(batch.check(b"new").unwrap(), Verdict::New);
    // A check marks nothing: still new, and the batch is empty.
    assert_eq!(batch.check(b"new").unwrap(), Verdict::New);
    assert!(batch.is_empty());
    batch.mark(b"new").unwrap();
    assert_eq!(batch.check(b"new").unwrap(), Verdict::Duplicate);
    assert!(matches!(batch.check(b""), Err(exactly::Error::EmptyKey)));
    // Dropped uncommitted: nothing was written.
    drop(batch);
    assert_eq!(store.check(&p, b"new").unwrap(), Verdict::New);
    // Each check counts once.
    assert_eq!(store.stats().partitions[&p].checks, 1 + 5 + 1);
}

#[test]
fn a_snapshot_under_the_old_file_name_is_removed_at_the_next_save() {
    let dir = tempfile::tempdir().unwrap();
    let p = orders(0);
    {
        let (store, _clock) = open(dir.path());
        store.assign(&p).unwrap();
        store.mark(&p, b"k").unwrap();
        store.close().unwrap();
    }
    // What a build before hashed names left.
    let legacy = dir.path().join("filters").join("p~orders~0.snap");
    std::fs::write(&legacy, b"an old snapshot").unwrap();
    let (store, _clock) = open(dir.path());
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    store.revoke(&p).unwrap();
    assert!(!legacy.exists(), "the old file outlived the new snapshot");
    store.assign(&p).unwrap();
    assert!(store.stats().partitions[&p].filter_from_snapshot);
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
}
