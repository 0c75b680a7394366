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

#[test]
fn reopen_after_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    fill(&store);
    store.close().unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    verify(&store);
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
