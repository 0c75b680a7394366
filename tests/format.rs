//! On-disk format fixtures: stores written by format versions 1 and 2 must
//! keep opening with the same answers. A change that breaks the format fails
//! here.
//!
//! `EXACTLY_WRITE_FIXTURES=1 cargo test --test format` rewrites the fixture
//! of the current version (only when the format version is bumped on
//! purpose); older fixtures are never rewritten.

use std::fs;
use std::path::Path;
use std::time::Duration;

use exactly::{ManualClock, Options, Partition, Store, Verdict};

/// The clock the fixture was written at: 2026-01-01T00:00:00Z.
const FIXTURE_T: u64 = 1_767_225_600_000;
/// Written by a build of format version 1, as the v2 fixture is written now
/// but closed (partition 0 flushed and compacted into a table file,
/// partition 1 only in the write-ahead log); no later build can write it.
const FIXTURE_V1: &str = "tests/fixtures/v1";
const FIXTURE_V2: &str = "tests/fixtures/v2";

fn options(clock: &ManualClock) -> Options {
    Options::default()
        .ttl(Duration::from_secs(3600))
        .expected_keys_per_partition(1_000)
        .clock(clock.clone())
}

/// Version 2: partition 0's marks are in a table the store wrote and
/// ingested (a compaction writes its changes first); partition 1's are only
/// in a journal record in the write-ahead log, as a store dropped without
/// `close` leaves them (its next open must write them as a table).
fn write_fixture_v2(dir: &Path) {
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
    store.compact(&Partition::new("orders", 0)).unwrap();
    store.sync().unwrap();
    drop(store);
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
    fixture_opens_with_the_same_answers(FIXTURE_V1);
}

#[test]
fn format_v2_fixture_opens_with_the_same_answers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE_V2);
    if std::env::var_os("EXACTLY_WRITE_FIXTURES").is_some() {
        let scratch = tempfile::tempdir().unwrap();
        write_fixture_v2(scratch.path());
        let _ = fs::remove_dir_all(&root);
        copy_store(scratch.path(), &root);
    }
    // The fixture holds a journal record: the format it is about.
    let logs: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    assert!(
        logs.iter()
            .any(|l| fs::read(l).unwrap().windows(8).any(|w| w == b"journal:")),
        "the v2 fixture has a journal record in its logs"
    );
    fixture_opens_with_the_same_answers(FIXTURE_V2);
}

fn fixture_opens_with_the_same_answers(fixture: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture);
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
    // The store was upgraded to the current format, which older builds
    // refuse.
    drop(store);
    let manifest = fs::read_to_string(dir.join("EXACTLY")).unwrap();
    assert!(manifest.contains("format_version = 2"), "{manifest}");
}
