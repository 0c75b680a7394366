//! Sequence mode, attacked scenario by scenario: numbers never marked,
//! numbers acknowledged, racing callers, epochs, idle expiry and
//! compaction, clocks that step back, bad input, batches, sources beside
//! keys, and numbers at the edges of `u64`. Each scenario runs through
//! reopen, crash (a store dropped without `close`) and options changed on
//! reopen where that can break it. Time is a `ManualClock`: no sleeping.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::T0;
use exactly::{
    Durability, Error, KeyMode, ManualClock, Options, Partition, Store, TimeDomain, Verdict,
};

const IDLE: Duration = Duration::from_secs(60);
const SRC: &[u8] = b"relay-1";

fn p0() -> Partition {
    Partition::new("seq", 0)
}

fn opts(clock: &ManualClock, window: u32) -> Options {
    Options::default()
        .ttl(Duration::from_secs(3600))
        .expected_keys_per_partition(10_000)
        .clock(clock.clone())
        .sequence_window(window)
        .source_idle(IDLE)
}

fn open(dir: &Path, clock: &ManualClock, window: u32) -> Store {
    let store = Store::open(dir, opts(clock, window)).expect("open store");
    store.assign(&p0()).expect("assign");
    store
}

fn check(store: &Store, source: &[u8], epoch: u64, seq: u64) -> Verdict {
    store
        .check_sequence(&p0(), source, epoch, seq)
        .expect("check_sequence")
}

fn mark(store: &Store, source: &[u8], epoch: u64, seq: u64) -> Verdict {
    store
        .check_and_mark_sequence(&p0(), source, epoch, seq)
        .expect("check_and_mark_sequence")
}

/// Asserts every number in `dup` is a duplicate and every one in `new` new.
fn expect(store: &Store, epoch: u64, dup: &[u64], new: &[u64], what: &str) {
    for &n in dup {
        assert_eq!(
            check(store, SRC, epoch, n),
            Verdict::Duplicate,
            "{what}: {n} marked"
        );
    }
    for &n in new {
        assert_eq!(
            check(store, SRC, epoch, n),
            Verdict::New,
            "{what}: {n} never marked"
        );
    }
}

// ---- 1. never `Duplicate` for a number never marked ----

#[test]
fn numbers_never_marked_stay_new_among_marked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 1024);
    // Out of order, with holes: the evens from 0 to 400, highest first.
    for n in (0..=400u64).rev().filter(|n| n % 2 == 0) {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New, "{n}");
    }
    let evens: Vec<u64> = (0..=400).filter(|n| n % 2 == 0).collect();
    let odds: Vec<u64> = (0..400).filter(|n| n % 2 == 1).collect();
    expect(&store, 1, &evens, &odds, "live");
    // Checking marks nothing: still new, twice.
    assert_eq!(check(&store, SRC, 1, 401), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 401), Verdict::New);
    // The holes fill one by one, each new once.
    for &n in &odds {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New, "{n}");
        assert_eq!(mark(&store, SRC, 1, n), Verdict::Duplicate, "{n}");
    }
    drop(store);
    let store = open(dir.path(), &clock, 1024);
    assert_eq!(check(&store, SRC, 1, 401), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 399), Verdict::Duplicate);
}

#[test]
fn mark_sequence_marks_and_check_sequence_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(check(&store, SRC, 1, 7), Verdict::New);
    store.mark_sequence(&p0(), SRC, 1, 7).unwrap();
    assert_eq!(check(&store, SRC, 1, 7), Verdict::Duplicate);
    // Marking a duplicate again is fine and changes nothing.
    store.mark_sequence(&p0(), SRC, 1, 7).unwrap();
    assert_eq!(check(&store, SRC, 1, 6), Verdict::New);
    let mut batch = store.batch(&p0()).unwrap();
    assert_eq!(batch.check_sequence(SRC, 1, 6).unwrap(), Verdict::New);
    assert_eq!(batch.check_sequence(SRC, 1, 6).unwrap(), Verdict::New);
    batch.mark_sequence(SRC, 1, 6).unwrap();
    assert_eq!(batch.check_sequence(SRC, 1, 6).unwrap(), Verdict::Duplicate);
    batch.commit().unwrap();
    assert_eq!(check(&store, SRC, 1, 6), Verdict::Duplicate);
}

// ---- 2. never `New` for an acknowledged number of a live source ----

#[test]
fn acknowledged_numbers_stay_duplicates_across_close_crash_compaction_and_reassign() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 128);
    let marked = [0u64, 3, 50, 127, 128, 200, 199, 150];
    for &n in &marked {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
    }
    let never = [198u64, 197, 100, 151, 201, 10_000];
    expect(&store, 1, &marked, &never, "live");

    store.close().unwrap();
    let store = open(dir.path(), &clock, 128);
    expect(&store, 1, &marked, &never, "after close");

    drop(store);
    let store = open(dir.path(), &clock, 128);
    expect(&store, 1, &marked, &never, "after crash");

    store.compact(&p0()).unwrap();
    expect(&store, 1, &marked, &never, "after compaction");
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 0);

    store.revoke(&p0()).unwrap();
    store.assign(&p0()).unwrap();
    expect(&store, 1, &marked, &never, "after revoke and assign");

    drop(store);
    let store = open(dir.path(), &clock, 128);
    store.compact(&p0()).unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 128);
    expect(&store, 1, &marked, &never, "after compaction and crash");
}

#[test]
fn durable_sync_marks_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(dir.path(), opts(&clock, 64).durability(Durability::Sync)).unwrap();
    store.assign(&p0()).unwrap();
    for n in [5u64, 1, 9] {
        assert_eq!(mark(&store, SRC, 4, n), Verdict::New);
    }
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(&store, 4, &[5, 1, 9], &[2, 8, 10], "after crash");
}

#[test]
fn numbers_below_the_window_are_duplicates_never_new() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 8);
    assert_eq!(mark(&store, SRC, 1, 100), Verdict::New);
    // 93..=99 are inside the window (new), 92 and below are below it.
    for n in 93..100u64 {
        assert_eq!(check(&store, SRC, 1, n), Verdict::New, "{n}");
    }
    for n in [92u64, 91, 50, 1, 0] {
        assert_eq!(check(&store, SRC, 1, n), Verdict::Duplicate, "{n}");
        assert_eq!(mark(&store, SRC, 1, n), Verdict::Duplicate, "{n}");
    }
    // Marks that slide the window turn the numbers it passes into duplicates,
    // marked or not.
    assert_eq!(mark(&store, SRC, 1, 95), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 104), Verdict::New);
    // The window is 97..=104: 95 (marked), 96 and 93 (not) below it.
    assert_eq!(check(&store, SRC, 1, 95), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 96), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 93), Verdict::Duplicate);
    for n in [97u64, 98, 99, 101, 102, 103] {
        assert_eq!(check(&store, SRC, 1, n), Verdict::New, "{n}");
    }
    assert_eq!(check(&store, SRC, 1, 100), Verdict::Duplicate);
}

#[test]
fn a_narrower_window_on_reopen_keeps_every_acknowledged_number_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let marked = [1000u64, 999, 990, 980, 960, 950, 940, 937];
    for &n in &marked {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
    }
    drop(store);
    let store = open(dir.path(), &clock, 8);
    // Before any new mark, the state written with the wide window answers.
    expect(&store, 1, &marked, &[998, 995, 991, 970, 938], "narrowed");
    // A mark rewrites it under the narrow window: marked numbers stay
    // duplicates; the unmarked ones inside the narrow window stay new.
    assert_eq!(mark(&store, SRC, 1, 1001), Verdict::New);
    expect(
        &store,
        1,
        &marked,
        &[998, 997, 996, 995, 994],
        "narrowed and marked",
    );
    assert_eq!(check(&store, SRC, 1, 993), Verdict::Duplicate, "below 8");
    store.close().unwrap();
    let store = open(dir.path(), &clock, 64);
    // And widened back: nothing acknowledged comes back as new.
    expect(&store, 1, &marked, &[998, 994], "widened back");
    assert_eq!(mark(&store, SRC, 1, 1002), Verdict::New);
    expect(&store, 1, &marked, &[998, 994], "widened back and marked");
    assert_eq!(check(&store, SRC, 1, 1001), Verdict::Duplicate);
}

#[test]
fn a_wider_window_on_reopen_keeps_every_acknowledged_number_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 8);
    for n in [100u64, 98, 95] {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
    }
    store.close().unwrap();
    let store = open(dir.path(), &clock, 1024);
    // 92 and below were below the 8-wide window: duplicates, also once the
    // state is rewritten under the wide one.
    expect(
        &store,
        1,
        &[100, 98, 95, 92, 50],
        &[99, 97, 96, 94, 93],
        "widened",
    );
    assert_eq!(mark(&store, SRC, 1, 101), Verdict::New);
    expect(
        &store,
        1,
        &[101, 100, 98, 95, 92, 50, 0],
        &[99, 97, 96, 94, 93],
        "widened and marked",
    );
    assert_eq!(mark(&store, SRC, 1, 1000), Verdict::New);
    // 1000 - 1024 < 0: the whole range is inside the new window, and the
    // numbers the old window dropped still count as marked.
    expect(
        &store,
        1,
        &[1000, 101, 100, 98, 95, 92, 0],
        &[999, 500, 102, 99, 93],
        "slid",
    );
}

// ---- 3. racing callers: exactly one `New` ----

#[test]
fn of_threads_racing_on_one_number_exactly_one_sees_new() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(open(dir.path(), &clock, 64));
    const THREADS: usize = 6;
    const NUMBERS: u64 = 150;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut news = Vec::new();
                for i in 0..NUMBERS {
                    // Numbers go up and down (inside the window) so that
                    // some races are on numbers below the current high.
                    let n = if i % 3 == 0 { i + 20 } else { i };
                    if i % 25 == 0 {
                        barrier.wait();
                    }
                    let v = store
                        .check_and_mark_sequence(&p0(), SRC, 1, n)
                        .unwrap_or_else(|e| panic!("thread {t}, number {n}: {e}"));
                    if v == Verdict::New {
                        news.push(n);
                    }
                }
                news
            })
        })
        .collect();
    let mut counts = std::collections::HashMap::<u64, usize>::new();
    for h in handles {
        for n in h.join().unwrap() {
            *counts.entry(n).or_default() += 1;
        }
    }
    let numbers: std::collections::BTreeSet<u64> = (0..NUMBERS)
        .map(|i| if i % 3 == 0 { i + 20 } else { i })
        .collect();
    for n in &numbers {
        assert_eq!(counts.get(n), Some(&1), "number {n}: {counts:?}");
    }
    assert_eq!(counts.len(), numbers.len());
    for &n in &numbers {
        assert_eq!(check(&store, SRC, 1, n), Verdict::Duplicate, "{n}");
    }
}

#[test]
fn threads_marking_their_own_numbers_of_one_source_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(open(dir.path(), &clock, 1024));
    const THREADS: u64 = 4;
    const EACH: u64 = 100;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                for i in 0..EACH {
                    let n = i * THREADS + t;
                    if i % 2 == 0 {
                        assert_eq!(
                            store.check_and_mark_sequence(&p0(), SRC, 1, n).unwrap(),
                            Verdict::New,
                            "{n}"
                        );
                    } else {
                        // The same through a batch with a key mark beside it.
                        let mut b = store.batch(&p0()).unwrap();
                        assert_eq!(b.check_and_mark_sequence(SRC, 1, n).unwrap(), Verdict::New);
                        b.mark(format!("key-{n}").as_bytes()).unwrap();
                        b.commit().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let all: Vec<u64> = (0..THREADS * EACH).collect();
    expect(&store, 1, &all, &[THREADS * EACH], "after the race");
    drop(store);
    let store = open(dir.path(), &clock, 1024);
    expect(&store, 1, &all, &[THREADS * EACH], "after a crash");
}

#[test]
fn racing_marks_through_revoke_and_assign_keep_exactly_one_new_per_number() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(open(dir.path(), &clock, 256));
    const THREADS: usize = 3;
    const NUMBERS: u64 = 120;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let store = store.clone();
        let stop = stop.clone();
        thread::spawn(move || {
            let mut rounds = 0u32;
            loop {
                match store.revoke(&p0()) {
                    Ok(()) | Err(Error::NotAssigned(_)) => {}
                    Err(e) => panic!("revoke: {e}"),
                }
                store.assign(&p0()).unwrap();
                rounds += 1;
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break rounds;
                }
                thread::yield_now();
            }
        })
    };
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let store = store.clone();
            thread::spawn(move || {
                let mut news = Vec::new();
                for n in 0..NUMBERS {
                    // Retried until the partition is assigned when it runs.
                    loop {
                        match store.check_and_mark_sequence(&p0(), SRC, 1, n) {
                            Ok(Verdict::New) => {
                                news.push(n);
                                break;
                            }
                            Ok(Verdict::Duplicate) => break,
                            Err(Error::NotAssigned(_)) => thread::yield_now(),
                            Err(e) => panic!("number {n}: {e}"),
                        }
                    }
                }
                news
            })
        })
        .collect();
    let mut counts = vec![0usize; NUMBERS as usize];
    for h in handles {
        for n in h.join().unwrap() {
            counts[n as usize] += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(churn.join().unwrap() > 0);
    for (n, c) in counts.iter().enumerate() {
        assert_eq!(*c, 1, "number {n} was new {c} times");
    }
    let all: Vec<u64> = (0..NUMBERS).collect();
    expect(&store, 1, &all, &[NUMBERS], "after the churn");
}

// ---- 4. older epochs are fenced and write nothing ----

#[test]
fn an_older_epoch_is_fenced_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 5, 10), Verdict::New);
    assert_eq!(mark(&store, SRC, 5, 8), Verdict::New);
    for (epoch, seq) in [(4u64, 11u64), (4, 10), (0, 0), (4, 9)] {
        let r = store.check_and_mark_sequence(&p0(), SRC, epoch, seq);
        assert!(
            matches!(
                &r,
                Err(Error::SourceFenced { partition, source_id, current: 5, attempted })
                    if *partition == p0() && source_id == SRC && *attempted == epoch
            ),
            "{r:?}"
        );
        assert!(matches!(
            store.check_sequence(&p0(), SRC, epoch, seq),
            Err(Error::SourceFenced { current: 5, .. })
        ));
        assert!(matches!(
            store.mark_sequence(&p0(), SRC, epoch, seq),
            Err(Error::SourceFenced { current: 5, .. })
        ));
    }
    // Nothing moved: not the high-water mark, not the bitmap.
    expect(&store, 5, &[10, 8], &[9, 11, 7], "after fenced attempts");
    // Fenced attempts do not refresh the idle expiry either.
    clock.advance(IDLE - Duration::from_millis(1));
    assert!(matches!(
        store.check_and_mark_sequence(&p0(), SRC, 4, 12),
        Err(Error::SourceFenced { .. })
    ));
    assert_eq!(check(&store, SRC, 5, 10), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 5, 10), Verdict::New, "expired on time");
    // Forgotten, the source takes any epoch again, the old one included.
    assert_eq!(mark(&store, SRC, 4, 12), Verdict::New);
    assert_eq!(check(&store, SRC, 4, 12), Verdict::Duplicate);
}

#[test]
fn a_fenced_number_in_a_batch_leaves_the_rest_of_the_batch_committable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 3, 100), Verdict::New);
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(
        b.check_and_mark_sequence(b"other", 1, 1).unwrap(),
        Verdict::New
    );
    let fenced = b.check_and_mark_sequence(SRC, 2, 101);
    assert!(
        matches!(
            fenced,
            Err(Error::SourceFenced {
                current: 3,
                attempted: 2,
                ..
            })
        ),
        "{fenced:?}"
    );
    assert!(matches!(
        b.mark_sequence(SRC, 2, 50),
        Err(Error::SourceFenced { .. })
    ));
    assert_eq!(
        b.check_and_mark_sequence(SRC, 3, 101).unwrap(),
        Verdict::New
    );
    b.mark(b"k").unwrap();
    b.set_offset(7);
    assert_eq!(b.len(), 3);
    b.commit().unwrap();
    assert_eq!(store.committed_offset(&p0()).unwrap(), Some(7));
    assert_eq!(store.check(&p0(), b"k").unwrap(), Verdict::Duplicate);
    assert_eq!(check(&store, b"other", 1, 1), Verdict::Duplicate);
    expect(&store, 3, &[100, 101], &[99, 102], "after the batch");
    // The fenced epoch left no trace, also on disk.
    drop(store);
    let store = open(dir.path(), &clock, 64);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, 2, 101),
        Err(Error::SourceFenced { current: 3, .. })
    ));
    expect(&store, 3, &[100, 101], &[99, 102], "after a crash");
}

#[test]
fn a_batch_fenced_by_a_newer_epoch_in_itself_refuses_older_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 500), Verdict::New);
    let mut b = store.batch(&p0()).unwrap();
    // The batch moves the source to epoch 2: epoch 1 is fenced in it.
    assert_eq!(b.check_and_mark_sequence(SRC, 2, 0).unwrap(), Verdict::New);
    assert!(matches!(
        b.check_and_mark_sequence(SRC, 1, 501),
        Err(Error::SourceFenced {
            current: 2,
            attempted: 1,
            ..
        })
    ));
    // Dropped: the store still is at epoch 1.
    drop(b);
    assert_eq!(mark(&store, SRC, 1, 501), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 500), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 2, 0), Verdict::New);
}

// ---- 5. a newer epoch restarts numbering ----

#[test]
fn a_newer_epoch_restarts_numbering_and_fences_the_old_one_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 1024);
    for n in 0..=1000u64 {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
    }
    assert_eq!(check(&store, SRC, 2, 0), Verdict::New);
    assert_eq!(mark(&store, SRC, 2, 0), Verdict::New);
    assert_eq!(mark(&store, SRC, 2, 0), Verdict::Duplicate);
    // Epoch 2's numbers start afresh: nothing of epoch 1 carries over.
    for n in [1u64, 2, 500, 999, 1000, 1001] {
        assert_eq!(check(&store, SRC, 2, n), Verdict::New, "{n}");
    }
    assert!(matches!(
        store.check_and_mark_sequence(&p0(), SRC, 1, 1001),
        Err(Error::SourceFenced {
            current: 2,
            attempted: 1,
            ..
        })
    ));
    // A jump of several epochs restarts again.
    assert_eq!(mark(&store, SRC, 2, 3), Verdict::New);
    drop(store);
    let store = open(dir.path(), &clock, 1024);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, 1, 0),
        Err(Error::SourceFenced { current: 2, .. })
    ));
    expect(&store, 2, &[0, 3], &[1, 2, 4, 1000], "epoch 2 after crash");
    assert_eq!(mark(&store, SRC, 9, 3), Verdict::New);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, 2, 4),
        Err(Error::SourceFenced { current: 9, .. })
    ));
}

// ---- 6. idle expiry ----

#[test]
fn an_idle_source_is_forgotten_exactly_at_its_expiry_and_a_mark_refreshes_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    clock.advance(IDLE / 2);
    // A new mark moves the expiry to IDLE from now.
    assert_eq!(mark(&store, SRC, 1, 11), Verdict::New);
    clock.advance(IDLE / 2);
    expect(&store, 1, &[10, 11], &[9], "refreshed");
    // A duplicate marks nothing and so refreshes nothing.
    assert_eq!(mark(&store, SRC, 1, 11), Verdict::Duplicate);
    clock.advance(IDLE / 2 - Duration::from_millis(1));
    expect(&store, 1, &[10, 11], &[9], "one ms before expiry");
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(&store, 1, &[10, 11], &[9], "one ms before expiry, reopened");
    clock.advance(Duration::from_millis(1));
    expect(&store, 1, &[], &[10, 11, 9, 0], "expired");
    // Forgotten: numbering starts again wherever the source is.
    assert_eq!(mark(&store, SRC, 1, 3), Verdict::New);
    expect(&store, 1, &[3], &[10, 11, 2], "marked again");
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(&store, 1, &[3], &[10, 11, 2], "marked again, reopened");
}

#[test]
fn a_source_idle_changed_on_reopen_applies_to_later_marks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    store.close().unwrap();
    // A shorter idle does not cut short the expiry already written.
    let short = Duration::from_secs(1);
    let store = Store::open(dir.path(), opts(&clock, 64).source_idle(short)).unwrap();
    store.assign(&p0()).unwrap();
    clock.advance(short);
    expect(&store, 1, &[10], &[9], "short idle, old expiry");
    assert_eq!(mark(&store, SRC, 1, 11), Verdict::New);
    clock.advance(IDLE - short - Duration::from_millis(1));
    expect(&store, 1, &[10, 11], &[9], "the later expiry stands");
    clock.advance(Duration::from_millis(1));
    expect(&store, 1, &[], &[10, 11], "expired");
}

#[test]
fn compaction_drops_an_idle_source_and_keeps_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, b"idle", 1, 10), Verdict::New);
    clock.advance(IDLE / 2);
    assert_eq!(mark(&store, b"busy", 1, 20), Verdict::New);
    assert_eq!(store.stats().partitions[&p0()].sources, 2);
    clock.advance(IDLE / 2);
    let before = store.stats().partitions[&p0()].expired_dropped;
    store.compact(&p0()).unwrap();
    let after = store.stats().partitions[&p0()].expired_dropped;
    assert_eq!(after, before + 1, "the idle source, and only it");
    assert_eq!(check(&store, b"idle", 1, 10), Verdict::New);
    assert_eq!(check(&store, b"busy", 1, 20), Verdict::Duplicate);
    assert_eq!(check(&store, b"busy", 1, 19), Verdict::New);
    // After a crash, the compacted store knows the same.
    drop(store);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(store.stats().partitions[&p0()].sources, 1);
    assert_eq!(check(&store, b"idle", 1, 10), Verdict::New);
    assert_eq!(check(&store, b"busy", 1, 20), Verdict::Duplicate);
    // Compacting again drops nothing more; the busy source expires on time.
    store.compact(&p0()).unwrap();
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 0);
    clock.advance(IDLE / 2);
    store.compact(&p0()).unwrap();
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 1);
    assert_eq!(check(&store, b"busy", 1, 20), Verdict::New);
}

/// Compaction drops an idle source from disk, and the stats stop counting
/// it: a forgotten source is not remembered.
#[test]
fn compaction_of_an_idle_source_drops_it_from_the_stats() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    assert_eq!(store.stats().partitions[&p0()].sources, 1);
    clock.advance(IDLE);
    store.compact(&p0()).unwrap();
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 1);
    assert_eq!(store.stats().partitions[&p0()].sources, 0);
}

#[test]
fn a_clock_stepping_back_never_makes_an_acknowledged_live_number_new() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    // Marked with the clock ahead, then the clock steps back: the store's
    // time holds, so the source is live until IDLE past the ahead time.
    clock.set(T0 + 10_000);
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    clock.set(T0);
    assert_eq!(mark(&store, SRC, 1, 11), Verdict::New);
    expect(&store, 1, &[10, 11], &[9], "clock stepped back");
    store.compact(&p0()).unwrap();
    expect(&store, 1, &[10, 11], &[9], "compacted with the clock back");
    // A crash, and the clock further back than anything the store saw.
    drop(store);
    clock.set(T0 - 1_000_000);
    let store = open(dir.path(), &clock, 64);
    expect(&store, 1, &[10, 11], &[9], "reopened with the clock back");
    store.compact(&p0()).unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(
        &store,
        1,
        &[10, 11],
        &[9],
        "compacted and reopened with the clock back",
    );
    // The store's time passes the expiry: forgotten, and no step back of
    // the clock brings the source back to make a number new that a later
    // mark acknowledged.
    clock.set(T0 + 10_000 + IDLE.as_millis() as u64);
    assert_eq!(check(&store, SRC, 1, 10), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 5), Verdict::New);
    store.compact(&p0()).unwrap();
    clock.set(T0);
    expect(
        &store,
        1,
        &[5],
        &[10, 11, 4],
        "forgotten, marked again, clock back",
    );
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(
        &store,
        1,
        &[5],
        &[10, 11, 4],
        "forgotten, marked again, crash, clock back",
    );
    // The new life expires IDLE after its mark, at the store's time.
    clock.set(T0 + 10_000 + 2 * IDLE.as_millis() as u64 - 1);
    assert_eq!(check(&store, SRC, 1, 5), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 1, 5), Verdict::New);
}

#[test]
fn a_source_dropped_by_compaction_stays_forgotten_when_the_clock_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 7, 100), Verdict::New);
    clock.advance(IDLE * 3);
    store.compact(&p0()).unwrap();
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 1);
    drop(store);
    clock.set(T0);
    let store = open(dir.path(), &clock, 64);
    // The source is gone: an older epoch is not fenced, old numbers are new.
    assert_eq!(check(&store, SRC, 1, 100), Verdict::New);
    assert_eq!(check(&store, SRC, 7, 100), Verdict::New);
    assert_eq!(store.stats().partitions[&p0()].sources, 0);
}

// ---- 7. bad input: typed errors, nothing lost ----

#[test]
fn bad_sources_get_typed_errors_and_the_batch_keeps_its_marks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(dir.path(), opts(&clock, 64).max_key_len(16)).unwrap();
    let p = p0();
    let long = [b'x'; 17];
    let longest = [b'y'; 16];
    // Bad input first, before the partition is looked at.
    assert!(matches!(
        store.check_sequence(&p, b"", 1, 1),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.check_and_mark_sequence(&p, b"", 1, 1),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.check_sequence(&p, &long, 1, 1),
        Err(Error::KeyTooLong { len: 17, max: 16 })
    ));
    assert!(matches!(
        store.check_sequence(&p, SRC, 1, 1),
        Err(Error::NotAssigned(_))
    ));
    store.assign(&p).unwrap();
    assert!(matches!(
        store.check_sequence(&p, b"", 1, 1),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.check_and_mark_sequence(&p, b"", 1, 1),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.mark_sequence(&p, b"", 1, 1),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        store.check_and_mark_sequence(&p, &long, 1, 1),
        Err(Error::KeyTooLong { len: 17, max: 16 })
    ));
    assert!(matches!(
        store.mark_sequence(&p, &long, 1, 1),
        Err(Error::KeyTooLong { len: 17, max: 16 })
    ));
    assert_eq!(
        store.check_and_mark_sequence(&p, &longest, 1, 1).unwrap(),
        Verdict::New
    );

    let mut b = store.batch(&p).unwrap();
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 1).unwrap(), Verdict::New);
    b.mark(b"key").unwrap();
    assert!(matches!(b.check_sequence(b"", 1, 2), Err(Error::EmptyKey)));
    assert!(matches!(
        b.check_and_mark_sequence(b"", 1, 2),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        b.mark_sequence(&long, 1, 2),
        Err(Error::KeyTooLong { .. })
    ));
    assert!(matches!(
        b.check_sequence(&long, 1, 2),
        Err(Error::KeyTooLong { .. })
    ));
    // This thread holds the batch: a single call would wait for itself.
    assert!(matches!(
        store.check_and_mark_sequence(&p, SRC, 1, 2),
        Err(Error::BatchInProgress(_))
    ));
    assert_eq!(b.len(), 2);
    b.set_offset(3);
    b.commit().unwrap();
    assert_eq!(check(&store, SRC, 1, 1), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 2), Verdict::New);
    assert_eq!(store.check(&p, b"key").unwrap(), Verdict::Duplicate);
    assert_eq!(store.committed_offset(&p).unwrap(), Some(3));
    assert_eq!(store.stats().partitions[&p].sources, 2);
}

#[test]
fn invalid_sequence_options_are_refused_at_open() {
    let clock = ManualClock::new(T0);
    for (options, what) in [
        (opts(&clock, 64).sequence_window(0), "window 0"),
        (opts(&clock, 64).sequence_window(65_537), "window 65537"),
        (
            opts(&clock, 64).sequence_window(u32::MAX),
            "window u32::MAX",
        ),
        (opts(&clock, 64).source_idle(Duration::ZERO), "idle 0"),
        (
            opts(&clock, 64).source_idle(Duration::from_micros(999)),
            "idle under 1 ms",
        ),
        (
            opts(&clock, 64).source_idle(Duration::from_secs(101 * 365 * 24 * 3600)),
            "idle over 100 years",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let r = Store::open(dir.path(), options);
        assert!(matches!(r, Err(Error::InvalidOptions(_))), "{what}: {r:?}");
    }
    // The bounds themselves are accepted, also on reopen of one store.
    let dir = tempfile::tempdir().unwrap();
    for options in [
        opts(&clock, 1).source_idle(Duration::from_millis(1)),
        opts(&clock, 65_536).source_idle(Duration::from_secs(100 * 365 * 24 * 3600)),
    ] {
        let store = Store::open(dir.path(), options).unwrap();
        store.assign(&p0()).unwrap();
        store.close().unwrap();
    }
    // A refused reopen leaves the store as it was.
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 1), Verdict::New);
    store.close().unwrap();
    assert!(matches!(
        Store::open(dir.path(), opts(&clock, 0)),
        Err(Error::InvalidOptions(_))
    ));
    let store = open(dir.path(), &clock, 64);
    assert_eq!(check(&store, SRC, 1, 1), Verdict::Duplicate);
}

// ---- 8. batches ----

#[test]
fn a_batch_dropped_without_commit_writes_no_sequence_marks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    {
        let mut b = store.batch(&p0()).unwrap();
        assert_eq!(b.check_and_mark_sequence(SRC, 1, 11).unwrap(), Verdict::New);
        assert_eq!(b.check_and_mark_sequence(SRC, 2, 0).unwrap(), Verdict::New);
        assert_eq!(
            b.check_and_mark_sequence(b"fresh", 1, 0).unwrap(),
            Verdict::New
        );
        b.mark(b"k").unwrap();
        b.set_offset(5);
        // Not visible outside the batch before commit.
        assert_eq!(check(&store, SRC, 2, 0), Verdict::New);
        assert_eq!(check(&store, b"fresh", 1, 0), Verdict::New);
    }
    expect(&store, 1, &[10], &[11, 9], "dropped batch");
    assert_eq!(check(&store, b"fresh", 1, 0), Verdict::New);
    assert_eq!(store.check(&p0(), b"k").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p0()).unwrap(), None);
    assert_eq!(store.stats().partitions[&p0()].sources, 1);
    drop(store);
    let store = open(dir.path(), &clock, 64);
    expect(&store, 1, &[10], &[11, 9], "dropped batch, reopened");
    assert_eq!(check(&store, b"fresh", 1, 0), Verdict::New);
}

#[test]
fn a_batch_of_keys_sequence_numbers_and_an_offset_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let mut b = store.batch(&p0()).unwrap();
    b.mark(b"a").unwrap();
    b.set_offset(10);
    b.commit().unwrap();

    // Refused at commit (offset going back): none of it is applied.
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 1).unwrap(), Verdict::New);
    assert_eq!(
        b.check_and_mark_sequence(b"two", 9, 9).unwrap(),
        Verdict::New
    );
    b.mark(b"b").unwrap();
    b.set_offset(9);
    assert!(matches!(
        b.commit(),
        Err(Error::OffsetRegression {
            committed: 10,
            requested: 9,
            ..
        })
    ));
    assert_eq!(check(&store, SRC, 1, 1), Verdict::New);
    assert_eq!(check(&store, b"two", 9, 9), Verdict::New);
    assert_eq!(store.check(&p0(), b"b").unwrap(), Verdict::New);
    assert_eq!(store.stats().partitions[&p0()].sources, 0);

    // Refused at commit (a zombie's epoch): none of it is applied.
    store.assign_with_epoch(&p0(), 3).unwrap();
    let mut b = store.batch(&p0()).unwrap();
    b.fence(2);
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 1).unwrap(), Verdict::New);
    b.mark(b"b").unwrap();
    b.set_offset(11);
    assert!(matches!(
        b.commit(),
        Err(Error::Fenced {
            current: 3,
            attempted: 2,
            ..
        })
    ));
    assert_eq!(check(&store, SRC, 1, 1), Verdict::New);
    assert_eq!(store.check(&p0(), b"b").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p0()).unwrap(), Some(10));

    // Committed: all of it, also after a crash.
    let mut b = store.batch(&p0()).unwrap();
    b.fence(3);
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 1).unwrap(), Verdict::New);
    assert_eq!(
        b.check_and_mark_sequence(b"two", 9, 9).unwrap(),
        Verdict::New
    );
    b.mark(b"b").unwrap();
    b.set_offset(11);
    b.commit().unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(check(&store, SRC, 1, 1), Verdict::Duplicate);
    assert_eq!(check(&store, b"two", 9, 9), Verdict::Duplicate);
    assert_eq!(store.check(&p0(), b"b").unwrap(), Verdict::Duplicate);
    assert_eq!(store.committed_offset(&p0()).unwrap(), Some(11));
    assert_eq!(store.stats().partitions[&p0()].sources, 2);
}

#[test]
fn numbers_of_one_source_in_one_batch_are_answered_exactly_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 16);
    assert_eq!(mark(&store, SRC, 1, 100), Verdict::New);
    let mut b = store.batch(&p0()).unwrap();
    // Reordered, repeated, sliding the window within the batch.
    let steps: [(u64, Verdict); 10] = [
        (105, Verdict::New),
        (103, Verdict::New),
        (105, Verdict::Duplicate),
        (100, Verdict::Duplicate),
        (101, Verdict::New),
        (120, Verdict::New),
        // The window is now 105..=120: 104 and 103 below it.
        (104, Verdict::Duplicate),
        (106, Verdict::New),
        (103, Verdict::Duplicate),
        (119, Verdict::New),
    ];
    for (n, want) in steps {
        assert_eq!(b.check_and_mark_sequence(SRC, 1, n).unwrap(), want, "{n}");
    }
    assert_eq!(b.len(), 6);
    assert!(!b.is_empty());
    b.commit().unwrap();
    expect(
        &store,
        1,
        &[120, 119, 106, 105, 104, 103, 101, 100],
        &[118, 107, 110],
        "committed",
    );
    // A batch of duplicates only marks nothing.
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(
        b.check_and_mark_sequence(SRC, 1, 120).unwrap(),
        Verdict::Duplicate
    );
    assert!(b.is_empty());
    b.commit().unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 16);
    expect(
        &store,
        1,
        &[120, 119, 106, 105],
        &[118, 107, 110],
        "reopened",
    );
}

/// A batch that stays open while the clock passes the idle expiry of a
/// source state it staged keeps every number it marked: its own marks count
/// for the rest of the batch, as its key marks do, and an acknowledged
/// number of a live source is a duplicate.
#[test]
fn a_batch_open_past_the_idle_expiry_keeps_every_number_it_marked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(
        dir.path(),
        opts(&clock, 64).source_idle(Duration::from_millis(1)),
    )
    .unwrap();
    store.assign(&p0()).unwrap();
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 10).unwrap(), Verdict::New);
    clock.advance(Duration::from_millis(1));
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 8).unwrap(), Verdict::New);
    b.commit().unwrap();
    assert_eq!(check(&store, SRC, 1, 8), Verdict::Duplicate);
    assert_eq!(
        check(&store, SRC, 1, 10),
        Verdict::Duplicate,
        "acknowledged, live"
    );
}

/// One number marked twice in one batch is new once, whatever the clock
/// does in between.
#[test]
fn a_number_marked_twice_in_one_batch_is_new_once_whatever_the_clock_does() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(
        dir.path(),
        opts(&clock, 64).source_idle(Duration::from_millis(1)),
    )
    .unwrap();
    store.assign(&p0()).unwrap();
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 10).unwrap(), Verdict::New);
    assert_eq!(
        b.check_and_mark_sequence(SRC, 1, 10).unwrap(),
        Verdict::Duplicate
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        b.check_and_mark_sequence(SRC, 1, 10).unwrap(),
        Verdict::Duplicate
    );
    b.commit().unwrap();
    // Committed, the source idled out at T0 + 1 (its only new number came
    // at T0; a duplicate does not refresh it), as a key marked at T0 would
    // have expired: its numbers are new again.
    assert_eq!(check(&store, SRC, 1, 10), Verdict::New);
}

// ---- 9. sources beside keys ----

#[test]
fn keys_and_sources_of_the_same_name_do_not_interfere() {
    for mode in [KeyMode::Raw, KeyMode::Hashed] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let store = Store::open(dir.path(), opts(&clock, 64).key_mode(mode)).unwrap();
        store.assign(&p0()).unwrap();
        let names: [&[u8]; 5] = [
            SRC,
            b"\x00source:relay-1",
            b"source:relay-1",
            b"\x00offset",
            b"\x01",
        ];
        for name in names {
            assert_eq!(
                store.check_and_mark(&p0(), name).unwrap(),
                Verdict::New,
                "{mode:?}"
            );
        }
        // Every name a source, untouched by the keys.
        for name in names {
            assert_eq!(
                store.check_sequence(&p0(), name, 1, 0).unwrap(),
                Verdict::New
            );
            assert_eq!(
                store.check_and_mark_sequence(&p0(), name, 1, 5).unwrap(),
                Verdict::New
            );
        }
        // And keys untouched by the sources.
        assert_eq!(store.check(&p0(), b"relay-2").unwrap(), Verdict::New);
        for name in names {
            assert_eq!(store.check(&p0(), name).unwrap(), Verdict::Duplicate);
        }
        assert_eq!(store.stats().partitions[&p0()].sources, names.len() as u64);
        // A crash: the filter is rebuilt from disk, sources and all, and
        // neither kind is taken for the other.
        drop(store);
        let store = Store::open(dir.path(), opts(&clock, 64).key_mode(mode)).unwrap();
        store.assign(&p0()).unwrap();
        assert!(!store.stats().partitions[&p0()].filter_from_snapshot);
        for name in names {
            assert_eq!(
                store.check(&p0(), name).unwrap(),
                Verdict::Duplicate,
                "{mode:?}"
            );
            assert_eq!(
                store.check_sequence(&p0(), name, 1, 5).unwrap(),
                Verdict::Duplicate
            );
            assert_eq!(
                store.check_sequence(&p0(), name, 1, 4).unwrap(),
                Verdict::New
            );
        }
        assert_eq!(store.stats().partitions[&p0()].sources, names.len() as u64);
        // A clean revoke and assign (the filter from its snapshot) too.
        store.revoke(&p0()).unwrap();
        store.assign(&p0()).unwrap();
        for name in names {
            assert_eq!(store.check(&p0(), name).unwrap(), Verdict::Duplicate);
            assert_eq!(
                store.check_sequence(&p0(), name, 1, 5).unwrap(),
                Verdict::Duplicate
            );
        }
        // Unmarking a key leaves the source of its name alone.
        assert!(store.unmark(&p0(), SRC).unwrap());
        assert_eq!(store.check(&p0(), SRC).unwrap(), Verdict::New);
        assert_eq!(
            store.check_sequence(&p0(), SRC, 1, 5).unwrap(),
            Verdict::Duplicate
        );
    }
}

#[test]
fn sources_whose_names_prefix_each_other_are_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let names: [&[u8]; 4] = [b"a", b"a\x00", b"ab", b"\xff"];
    for (i, name) in names.iter().enumerate() {
        let epoch = i as u64 + 1;
        assert_eq!(mark(&store, name, epoch, 100 + i as u64), Verdict::New);
    }
    drop(store);
    let store = open(dir.path(), &clock, 64);
    for (i, name) in names.iter().enumerate() {
        let epoch = i as u64 + 1;
        assert_eq!(
            check(&store, name, epoch, 100 + i as u64),
            Verdict::Duplicate
        );
        for (j, _) in names.iter().enumerate().filter(|&(j, _)| j != i) {
            assert_eq!(
                check(&store, name, epoch, 100 + j as u64),
                Verdict::New,
                "{i} {j}"
            );
        }
        if epoch > 1 {
            assert!(matches!(
                store.check_sequence(&p0(), name, epoch - 1, 0),
                Err(Error::SourceFenced { .. })
            ));
        }
    }
}

#[test]
fn sources_belong_to_their_partition_and_go_with_its_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let p1 = Partition::new("seq", 1);
    store.assign(&p1).unwrap();
    assert_eq!(mark(&store, SRC, 2, 10), Verdict::New);
    assert_eq!(store.check_sequence(&p1, SRC, 2, 10).unwrap(), Verdict::New);
    assert_eq!(store.check_sequence(&p1, SRC, 1, 10).unwrap(), Verdict::New);
    assert_eq!(
        store.check_and_mark_sequence(&p1, SRC, 1, 10).unwrap(),
        Verdict::New
    );
    assert!(store.delete_partition(&p0()).unwrap());
    store.assign(&p0()).unwrap();
    assert_eq!(check(&store, SRC, 1, 10), Verdict::New);
    assert_eq!(store.stats().partitions[&p0()].sources, 0);
    assert_eq!(
        store.check_sequence(&p1, SRC, 1, 10).unwrap(),
        Verdict::Duplicate
    );
    assert!(matches!(
        store.check_sequence(&p1, SRC, 0, 10),
        Err(Error::SourceFenced { current: 1, .. })
    ));
}

// ---- 10. the edges of `u64` ----

#[test]
fn numbers_and_epochs_at_the_edges_of_u64_are_answered_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 1024);
    let max = u64::MAX;
    // Number 0 first, then u64::MAX: a gap wider than any window.
    assert_eq!(mark(&store, SRC, 1, 0), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 0), Verdict::Duplicate);
    assert_eq!(mark(&store, SRC, 1, max), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, max), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, max - 1), Verdict::New);
    assert_eq!(check(&store, SRC, 1, max - 1023), Verdict::New);
    assert_eq!(check(&store, SRC, 1, max - 1024), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 0), Verdict::Duplicate);
    assert_eq!(mark(&store, SRC, 1, max - 1023), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, max - 1023), Verdict::Duplicate);
    // Epoch u64::MAX: the last one; every other is fenced.
    assert_eq!(mark(&store, SRC, max, max), Verdict::New);
    assert_eq!(
        mark(&store, SRC, max, 0),
        Verdict::Duplicate,
        "below the window"
    );
    assert_eq!(check(&store, SRC, max, max - 1), Verdict::New);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, max - 1, max),
        Err(Error::SourceFenced { current, attempted, .. }) if current == max && attempted == max - 1
    ));
    drop(store);
    let store = open(dir.path(), &clock, 1024);
    assert_eq!(check(&store, SRC, max, max), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, max, max - 1), Verdict::New);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, 0, 0),
        Err(Error::SourceFenced { .. })
    ));
}

#[test]
fn a_gap_wider_than_the_window_leaves_the_skipped_numbers_inside_it_new() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 1024);
    for n in 0..10u64 {
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
    }
    assert_eq!(mark(&store, SRC, 1, 5_000), Verdict::New);
    // 5000 - 1024 = 3976: 3977..5000 inside the window, never marked.
    for n in [3_977u64, 4_000, 4_999] {
        assert_eq!(check(&store, SRC, 1, n), Verdict::New, "{n}");
    }
    for n in [3_976u64, 3_000, 10, 9, 0] {
        assert_eq!(check(&store, SRC, 1, n), Verdict::Duplicate, "{n}");
    }
    assert_eq!(mark(&store, SRC, 1, 3_977), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 3_977), Verdict::Duplicate);
    // An exact window's step: the old high lands just below the window.
    assert_eq!(mark(&store, SRC, 1, 6_024), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 5_000), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 5_001), Verdict::New);
}

#[test]
fn a_window_of_one_remembers_only_the_highest_number() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 1);
    assert_eq!(mark(&store, SRC, 1, 5), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 5), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 4), Verdict::Duplicate);
    assert_eq!(mark(&store, SRC, 1, 7), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 6), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 8), Verdict::New);
    drop(store);
    // Widened to 64 on reopen: 6 (never marked, below the old window)
    // stays a duplicate.
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 9), Verdict::New);
    expect(&store, 1, &[9, 7, 6, 5, 0], &[8, 10], "widened from 1");
}

// ---- event time: sources idle by the watermark ----

#[test]
fn under_event_time_a_source_idles_by_the_watermark_not_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(
        dir.path(),
        opts(&clock, 64).time_domain(TimeDomain::EventTime),
    )
    .unwrap();
    store.assign(&p0()).unwrap();
    let mut b = store.batch(&p0()).unwrap();
    b.mark_at(b"e0", T0).unwrap();
    b.commit().unwrap();
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    // The clock running on expires nothing under event time.
    clock.advance(IDLE * 10);
    assert_eq!(check(&store, SRC, 1, 10), Verdict::Duplicate);
    let idle = IDLE.as_millis() as u64;
    let mut b = store.batch(&p0()).unwrap();
    b.mark_at(b"e1", T0 + idle - 1).unwrap();
    b.commit().unwrap();
    assert_eq!(check(&store, SRC, 1, 10), Verdict::Duplicate);
    drop(store);
    let store = Store::open(
        dir.path(),
        opts(&clock, 64).time_domain(TimeDomain::EventTime),
    )
    .unwrap();
    store.assign(&p0()).unwrap();
    assert_eq!(check(&store, SRC, 1, 10), Verdict::Duplicate);
    let mut b = store.batch(&p0()).unwrap();
    b.mark_at(b"e2", T0 + idle).unwrap();
    b.commit().unwrap();
    assert_eq!(check(&store, SRC, 1, 10), Verdict::New);
}

// ---- more: defaults, options changed on reopen, readers racing writers ----

#[test]
fn source_idle_defaults_to_the_ttl_of_each_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let ttl = Duration::from_secs(100);
    let plain = |ttl: Duration| {
        Options::default()
            .ttl(ttl)
            .expected_keys_per_partition(10_000)
            .clock(clock.clone())
    };
    let store = Store::open(dir.path(), plain(ttl)).unwrap();
    store.assign(&p0()).unwrap();
    assert_eq!(mark(&store, SRC, 1, 1), Verdict::New);
    clock.advance(ttl - Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 1, 1), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 1, 1), Verdict::New);
    store.close().unwrap();
    // Reopened with a longer TTL: later marks idle by it.
    let store = Store::open(dir.path(), plain(ttl * 3)).unwrap();
    store.assign(&p0()).unwrap();
    assert_eq!(mark(&store, SRC, 1, 2), Verdict::New);
    clock.advance(ttl * 3 - Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 1, 2), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert_eq!(check(&store, SRC, 1, 2), Verdict::New);
}

#[test]
fn a_lower_max_key_len_on_reopen_refuses_a_long_source_but_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let long = [b's'; 40];
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, &long, 1, 9), Verdict::New);
    store.close().unwrap();
    let store = Store::open(dir.path(), opts(&clock, 64).max_key_len(20)).unwrap();
    store.assign(&p0()).unwrap();
    assert!(matches!(
        store.check_sequence(&p0(), &long, 1, 9),
        Err(Error::KeyTooLong { len: 40, max: 20 })
    ));
    assert!(matches!(
        store.check_and_mark_sequence(&p0(), &long, 1, 8),
        Err(Error::KeyTooLong { len: 40, max: 20 })
    ));
    // The source is still there, and survives a compaction meanwhile.
    assert_eq!(store.stats().partitions[&p0()].sources, 1);
    store.compact(&p0()).unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(check(&store, &long, 1, 9), Verdict::Duplicate);
    assert_eq!(check(&store, &long, 1, 8), Verdict::New);
}

#[test]
fn readers_racing_a_writer_never_see_an_acknowledged_number_new() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(open(dir.path(), &clock, 1024));
    const NUMBERS: u64 = 400;
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (store, acked, done) = (store.clone(), acked.clone(), done.clone());
            thread::spawn(move || {
                let mut checked = 0u64;
                loop {
                    // Read before the numbers: a last pass after the writer.
                    let last = done.load(Ordering::SeqCst);
                    let a = acked.load(Ordering::SeqCst);
                    for n in a.saturating_sub(8)..a {
                        let v = if r == 0 {
                            store.check_sequence(&p0(), SRC, 1, n).unwrap()
                        } else {
                            let b = store.batch(&p0()).unwrap();
                            b.check_sequence(SRC, 1, n).unwrap()
                        };
                        assert_eq!(v, Verdict::Duplicate, "reader {r}: {n} of {a} acked");
                        checked += 1;
                    }
                    if last {
                        break checked;
                    }
                }
            })
        })
        .collect();
    for n in 0..NUMBERS {
        // Every other number marked from the top down in pairs: n+1 first.
        let n = if n % 2 == 0 { n + 1 } else { n - 1 };
        assert_eq!(mark(&store, SRC, 1, n), Verdict::New);
        if n % 2 == 0 {
            acked.store(n + 2, Ordering::SeqCst);
        }
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}

#[test]
fn sequence_checks_count_in_the_partition_stats() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let stats = |s: &Store| {
        let p = &s.stats().partitions[&p0()];
        (p.checks, p.duplicates)
    };
    let (c0, d0) = stats(&store);
    assert_eq!(mark(&store, SRC, 1, 1), Verdict::New);
    assert_eq!(mark(&store, SRC, 1, 1), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 1), Verdict::Duplicate);
    assert_eq!(check(&store, SRC, 1, 2), Verdict::New);
    let mut b = store.batch(&p0()).unwrap();
    assert_eq!(b.check_sequence(SRC, 1, 1).unwrap(), Verdict::Duplicate);
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 2).unwrap(), Verdict::New);
    b.commit().unwrap();
    let (c1, d1) = stats(&store);
    assert_eq!(c1 - c0, 6);
    assert_eq!(d1 - d0, 3);
}

#[test]
fn sources_outlive_a_new_partition_epoch_and_a_zombie_cannot_write_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    store.revoke(&p0()).unwrap();
    store.assign_with_epoch(&p0(), 1).unwrap();
    let mut b = store.batch(&p0()).unwrap();
    b.fence(1);
    assert_eq!(b.check_and_mark_sequence(SRC, 1, 50).unwrap(), Verdict::New);
    b.commit().unwrap();
    // A rebalance: the new owner sees the source as it was.
    store.assign_with_epoch(&p0(), 2).unwrap();
    assert_eq!(check(&store, SRC, 1, 50), Verdict::Duplicate);
    // The zombie's batch (fenced with the old epoch) writes nothing.
    let mut zombie = store.batch(&p0()).unwrap();
    zombie.fence(1);
    assert_eq!(
        zombie.check_and_mark_sequence(SRC, 1, 51).unwrap(),
        Verdict::New
    );
    assert_eq!(
        zombie.check_and_mark_sequence(SRC, 2, 0).unwrap(),
        Verdict::New
    );
    assert!(matches!(
        zombie.commit(),
        Err(Error::Fenced { current: 2, .. })
    ));
    expect(&store, 1, &[50], &[51, 49], "after the zombie");
    drop(store);
    let store = Store::open(dir.path(), opts(&clock, 64)).unwrap();
    store.assign_with_epoch(&p0(), 3).unwrap();
    expect(&store, 1, &[50], &[51, 49], "after a crash and a rebalance");
}

#[test]
fn exported_sources_import_as_the_union_with_what_the_store_has() {
    use exactly::internals::transfer::{export, import};
    let clock = ManualClock::new(T0);
    let from = tempfile::tempdir().unwrap();
    let store = open(from.path(), &clock, 64);
    for n in [100u64, 98, 96] {
        assert_eq!(mark(&store, SRC, 2, n), Verdict::New);
    }
    assert_eq!(mark(&store, b"old-epoch", 1, 5), Verdict::New);
    assert_eq!(mark(&store, b"gone", 1, 1), Verdict::New);
    store.revoke(&p0()).unwrap();
    let file = from.path().join("p0.export");
    export(&store, &p0(), &file, &mut |_| {}).unwrap();
    drop(store);

    let into = tempfile::tempdir().unwrap();
    let store = open(into.path(), &clock, 64);
    // The same source under the same epoch with other numbers marked, and
    // one under a newer epoch than the export's.
    for n in [99u64, 97, 101] {
        assert_eq!(mark(&store, SRC, 2, n), Verdict::New);
    }
    assert_eq!(mark(&store, b"old-epoch", 3, 0), Verdict::New);
    store.revoke(&p0()).unwrap();
    import(&store, &file, None, &mut |_| {}).unwrap();
    store.assign(&p0()).unwrap();
    expect(&store, 2, &[101, 100, 99, 98, 97, 96], &[95, 102], "union");
    assert_eq!(check(&store, b"gone", 1, 1), Verdict::Duplicate);
    assert_eq!(check(&store, b"old-epoch", 3, 0), Verdict::Duplicate);
    assert!(matches!(
        store.check_sequence(&p0(), b"old-epoch", 1, 6),
        Err(Error::SourceFenced { current: 3, .. })
    ));
    // Importing again changes nothing.
    store.revoke(&p0()).unwrap();
    import(&store, &file, None, &mut |_| {}).unwrap();
    store.assign(&p0()).unwrap();
    expect(
        &store,
        2,
        &[101, 100, 99, 98, 97, 96],
        &[95, 102],
        "imported twice",
    );
    assert_eq!(check(&store, b"old-epoch", 3, 1), Verdict::New);
}

#[test]
fn verify_finds_a_store_with_sources_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    assert_eq!(mark(&store, SRC, 1, 1), Verdict::New);
    store.mark(&p0(), b"k").unwrap();
    store.revoke(&p0()).unwrap();
    let report = exactly::internals::verify::verify(&store, &mut |_| {}).unwrap();
    assert!(report.healthy(), "{report:?}");
}

/// A deterministic xorshift generator for the randomized scenarios.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn windows_of_odd_widths_answer_like_the_set_of_marked_numbers() {
    for window in [1u32, 2, 63, 64, 65, 100, 127, 128, 129, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let mut store = open(dir.path(), &clock, window);
        let w = u64::from(window);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ w);
        let mut marked = std::collections::BTreeSet::new();
        let mut high = 0u64;
        let dup = |marked: &std::collections::BTreeSet<u64>, high: u64, n: u64| {
            marked.contains(&n) || n + w <= high
        };
        for round in 0..300 {
            let mut b = store.batch(&p0()).unwrap();
            let mut in_batch = marked.clone();
            let mut batch_high = high;
            for _ in 0..(rng.next() % 4 + 1) {
                // Mostly near the top, sometimes jumps of exactly a word,
                // exactly the window, or past it.
                let r = rng.next();
                let n = match r % 8 {
                    0 => batch_high + 64,
                    1 => batch_high + w,
                    2 => batch_high + w - 1,
                    3 => batch_high + (r >> 8) % (3 * w + 130),
                    _ => (batch_high + 3).saturating_sub((r >> 8) % (w + 5)),
                };
                let want = if dup(&in_batch, batch_high, n) {
                    Verdict::Duplicate
                } else {
                    Verdict::New
                };
                let got = b.check_and_mark_sequence(SRC, 1, n).unwrap();
                assert_eq!(
                    got, want,
                    "window {window}, round {round}, number {n}, high {batch_high}"
                );
                if got == Verdict::New {
                    in_batch.insert(n);
                    batch_high = batch_high.max(n);
                }
            }
            if rng.next().is_multiple_of(5) {
                drop(b);
            } else {
                b.commit().unwrap();
                marked = in_batch;
                high = batch_high;
            }
            if round % 50 == 49 {
                // A crash every 50 rounds: the whole window answers the same.
                drop(store);
                store = open(dir.path(), &clock, window);
                for n in high.saturating_sub(w + 3)..=high + 2 {
                    let want = if dup(&marked, high, n) {
                        Verdict::Duplicate
                    } else {
                        Verdict::New
                    };
                    assert_eq!(
                        check(&store, SRC, 1, n),
                        want,
                        "window {window}, reopened, {n}"
                    );
                }
            }
        }
    }
}

#[test]
fn windows_changed_on_every_reopen_answer_like_the_model_and_never_unmark() {
    const WINDOWS: [u32; 7] = [1, 3, 64, 65, 130, 200, 1024];
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut options_window = 64u32;
    let mut store = open(dir.path(), &clock, options_window);
    // The model: numbers counted as marked, the high-water mark, and the
    // window the stored state was written with.
    let mut marked = std::collections::BTreeSet::<u64>::new();
    let mut high: Option<u64> = None;
    let mut state_window = options_window;
    let dup = |marked: &std::collections::BTreeSet<u64>, high: Option<u64>, w: u32, n: u64| {
        high.is_some_and(|h| marked.contains(&n) || (n <= h && h - n >= u64::from(w)))
    };
    let mut ever_dup = std::collections::BTreeSet::<u64>::new();
    for round in 0..400 {
        let r = rng.next();
        let top = high.unwrap_or(2_000);
        let n = match r % 6 {
            0 => top + 1 + (r >> 8) % 300,
            1 => top + 1,
            _ => top.saturating_sub((r >> 8) % 1_100),
        };
        let want = dup(&marked, high, state_window, n);
        let got = mark(&store, SRC, 1, n);
        assert_eq!(
            got == Verdict::Duplicate,
            want,
            "round {round}, number {n}, high {high:?}, state window {state_window}, options {options_window}"
        );
        assert!(
            !(got == Verdict::New && ever_dup.contains(&n)),
            "round {round}: {n} was a duplicate before and is new now"
        );
        if got == Verdict::New {
            // The state is rewritten under the options' window: numbers a
            // wider one adds count as marked.
            if let Some(h) = high {
                for d in u64::from(state_window)..u64::from(options_window) {
                    if let Some(m) = h.checked_sub(d) {
                        marked.insert(m);
                    }
                }
            }
            state_window = options_window;
            marked.insert(n);
            high = Some(high.map_or(n, |h| h.max(n)));
        }
        if got == Verdict::Duplicate || got == Verdict::New {
            ever_dup.insert(n);
        }
        if round % 25 == 24 {
            options_window = WINDOWS[(rng.next() % WINDOWS.len() as u64) as usize];
            if rng.next().is_multiple_of(2) {
                store.close().unwrap();
            } else {
                drop(store);
            }
            store = open(dir.path(), &clock, options_window);
            let h = high.unwrap();
            for m in h.saturating_sub(1_100)..=h + 1 {
                let want = dup(&marked, high, state_window, m);
                assert_eq!(
                    check(&store, SRC, 1, m) == Verdict::Duplicate,
                    want,
                    "reopened with window {options_window}: {m}, high {h}, state window {state_window}"
                );
            }
        }
    }
}

#[test]
fn filling_a_hole_or_starting_an_epoch_refreshes_the_idle_expiry_and_another_source_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, 64);
    let half = IDLE / 2;
    assert_eq!(mark(&store, SRC, 1, 10), Verdict::New);
    assert_eq!(mark(&store, b"other", 1, 10), Verdict::New);
    clock.advance(half);
    // A hole below the high-water mark: a mark all the same.
    assert_eq!(mark(&store, SRC, 1, 9), Verdict::New);
    clock.advance(half);
    // At the first expiry: the refreshed source is live, compaction keeps it.
    store.compact(&p0()).unwrap();
    assert_eq!(store.stats().partitions[&p0()].expired_dropped, 1, "other");
    assert_eq!(check(&store, b"other", 1, 10), Verdict::New);
    expect(&store, 1, &[10, 9], &[8], "refreshed by a hole");
    // A new epoch refreshes it too (and restarts its numbers).
    clock.advance(half - Duration::from_millis(1));
    assert_eq!(mark(&store, SRC, 2, 0), Verdict::New);
    clock.advance(half);
    drop(store);
    let store = open(dir.path(), &clock, 64);
    store.compact(&p0()).unwrap();
    assert_eq!(check(&store, SRC, 2, 0), Verdict::Duplicate);
    assert!(matches!(
        store.check_sequence(&p0(), SRC, 1, 11),
        Err(Error::SourceFenced { current: 2, .. })
    ));
    clock.advance(half);
    assert_eq!(check(&store, SRC, 2, 0), Verdict::New);
    assert_eq!(check(&store, SRC, 1, 11), Verdict::New);
}
