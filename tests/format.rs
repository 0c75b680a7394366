//! On-disk format fixtures: a store written by format version 1 must keep
//! opening with the same answers. A change that breaks the format fails here.
//!
//! `EXACTLY_WRITE_FIXTURES=1 cargo test --test format` rewrites the fixture
//! (only when the format version is bumped on purpose).

use std::fs;
use std::path::Path;
use std::time::Duration;

use exactly::{ManualClock, Options, Partition, Store, Verdict};

/// The clock the fixture was written at: 2026-01-01T00:00:00Z.
const FIXTURE_T: u64 = 1_767_225_600_000;
const FIXTURE: &str = "tests/fixtures/v1";

fn options(clock: &ManualClock) -> Options {
    Options::default()
        .ttl(Duration::from_secs(3600))
        .expected_keys_per_partition(1_000)
        .clock(clock.clone())
}

/// Partition 0 is flushed and compacted into a table file; partition 1 lives
/// only in the write-ahead log.
fn write_fixture(dir: &Path) {
    let clock = ManualClock::new(FIXTURE_T);
    let store = Store::open(dir, options(&clock)).unwrap();
    for n in 0..2 {
        let p = Partition::new("orders", n);
        store.assign(&p).unwrap();
        let mut batch = store.batch(&p).unwrap();
        for i in 0..50 {
            batch.mark(format!("key-{n}-{i}").as_bytes()).unwrap();
        }
        batch.set_offset(50 + i64::from(n));
        batch.commit().unwrap();
    }
    let p = Partition::new("orders", 0);
    store.compact(&p).unwrap();
    store.close().unwrap();
}

fn copy_store(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Info logs and the lock file are not part of the format; filter
        // snapshots are an optimisation (without one, assign rebuilds).
        if name.starts_with("LOG") || name == "LOCK" || entry.path().is_dir() {
            continue;
        }
        fs::copy(entry.path(), to.join(&*name)).unwrap();
    }
}

#[test]
fn format_v1_fixture_opens_with_the_same_answers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    if std::env::var_os("EXACTLY_WRITE_FIXTURES").is_some() {
        let scratch = tempfile::tempdir().unwrap();
        write_fixture(scratch.path());
        let _ = fs::remove_dir_all(&root);
        copy_store(scratch.path(), &root);
    }
    // Work on a copy: opening a store writes to it.
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("store");
    copy_store(&root, &dir);

    let clock = ManualClock::new(FIXTURE_T + 1_000);
    let store = Store::open(&dir, options(&clock)).unwrap();
    for n in 0..2 {
        let p = Partition::new("orders", n);
        store.assign(&p).unwrap();
        assert_eq!(store.committed_offset(&p).unwrap(), Some(50 + i64::from(n)));
        for i in 0..50 {
            let key = format!("key-{n}-{i}");
            assert_eq!(
                store.check(&p, key.as_bytes()).unwrap(),
                Verdict::Duplicate,
                "{key}"
            );
        }
        assert_eq!(store.check(&p, b"key-9-9").unwrap(), Verdict::New);
    }
    // The TTL stored in each mark still applies.
    clock.advance(Duration::from_secs(3600));
    let p = Partition::new("orders", 1);
    assert_eq!(store.check(&p, b"key-1-0").unwrap(), Verdict::New);
}
