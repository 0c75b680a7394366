//! The write path under attack: journal records, the in-memory index of
//! each shard, and the tables the background flusher writes and ingests
//! (`src/journal.rs`, `src/pending.rs`, `src/engine/tables.rs`,
//! `src/engine/flusher.rs`).
//!
//! Most tests use a tiny `table_bytes`, so that nearly every commit asks
//! for a table, and check the store's promises while the flusher runs:
//! no `New` for an acknowledged live mark, no `Duplicate` for a key never
//! marked, one `New` among racing callers, offsets and epochs that never go
//! back, no deadlock, and all of it across reopens (clean, dropped, killed
//! with SIGKILL mid-flush) and changes of `table_bytes`. Every multi-thread
//! test runs under a watchdog, so a deadlock fails it instead of hanging.
//!
//! `child_process_for_the_sigkill_test` is not a test of its own: it is the
//! child process that `sigkill_while_tables_are_written_loses_nothing_acknowledged`
//! runs and kills, and does nothing when the suite runs it.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{orders, Rng, T0, TTL};
use exactly::internals::{inspect, tables, transfer, verify};
use exactly::{
    Claim, Durability, Error, KeyMode, ManualClock, Options, Partition, Store, TimeDomain, Verdict,
};

/// A test fails, rather than hangs, if its threads are not done by then.
const WATCHDOG: Duration = Duration::from_secs(30);

/// Runs `body` under the watchdog.
fn watched<F: FnOnce() + Send + 'static>(what: &str, body: F) {
    common::watched(what, WATCHDOG, body);
}

/// The common options (manual clock at `T0`, one-hour TTL) with
/// `table_bytes`.
fn opts(clock: &ManualClock, table_bytes: usize) -> Options {
    common::options(clock).table_bytes(table_bytes)
}

fn open_with(dir: &Path, clock: &ManualClock, table_bytes: usize) -> Store {
    Store::open(dir, opts(clock, table_bytes)).expect("open store")
}

/// A fresh store of `table_bytes`, shared between threads, with partition
/// `orders-0` assigned; the directory and clock live as long as the test
/// holds them.
fn assigned_store(table_bytes: usize) -> (tempfile::TempDir, ManualClock, Arc<Store>, Partition) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(open_with(dir.path(), &clock, table_bytes));
    let p = orders(0);
    store.assign(&p).unwrap();
    (dir, clock, store, p)
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

// ---------------------------------------------------------------------------
// Readers against the flusher
// ---------------------------------------------------------------------------

/// A writer marks keys one commit at a time (each asks for a table) while
/// readers check every acknowledged key and keys never marked: a reader
/// never finds an acknowledged key `New` (a moment where it is in neither
/// the index nor a table) nor a never-marked one `Duplicate`.
#[test]
fn acknowledged_marks_stay_duplicates_for_readers_while_tables_are_written() {
    watched("readers against the flusher", || {
        let (_dir, _clock, store, p) = assigned_store(1);
        const N: u64 = 600;
        // Keys below `acked` were acknowledged.
        let acked = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for r in 0..2u64 {
            let (store, acked, done, p) = (store.clone(), acked.clone(), done.clone(), p.clone());
            readers.push(thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + r);
                let mut checks = 0u64;
                // At least one round after the writer is done, however late
                // a loaded machine schedules this thread.
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let upto = acked.load(Ordering::Acquire);
                    if upto > 0 {
                        // The newest acknowledged key (most likely in the
                        // frozen set or being ingested), and one at random.
                        for i in [upto - 1, rng.below(upto)] {
                            assert_eq!(
                                store.check(&p, &key(i)).unwrap(),
                                Verdict::Duplicate,
                                "acknowledged key {i} read as New (acked up to {upto})"
                            );
                            checks += 1;
                        }
                    }
                    let never = format!("never-{}", rng.below(1 << 20));
                    assert_eq!(store.check(&p, never.as_bytes()).unwrap(), Verdict::New);
                    if finished {
                        break;
                    }
                }
                checks
            }));
        }
        for i in 0..N {
            let mut batch = store.batch(&p).unwrap();
            assert_eq!(batch.check_and_mark(&key(i)).unwrap(), Verdict::New);
            batch.set_offset(i as i64 + 1);
            batch.commit().unwrap();
            acked.store(i + 1, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let checks: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(checks > 0, "the readers checked something");
        tables::wait_idle(&store);
        for i in 0..N {
            assert_eq!(store.check(&p, &key(i)).unwrap(), Verdict::Duplicate);
        }
        assert_eq!(store.committed_offset(&p).unwrap(), Some(N as i64));
    });
}

/// Threads race `check_and_mark` on the same keys while every commit asks
/// for a table: exactly one of them gets `New` per key, and the index, the
/// tables and a reopen all agree afterwards.
#[test]
fn racing_callers_get_exactly_one_new_while_tables_are_written() {
    watched("racing callers", || {
        let (dir, clock, store, p) = assigned_store(1);
        const THREADS: u64 = 4;
        const KEYS: u64 = 401;
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, barrier, p) = (store.clone(), barrier.clone(), p.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let mut news = Vec::new();
                    for i in 0..KEYS {
                        // Each thread walks the keys in its own order.
                        let k = (i * (2 * t + 1) + t) % KEYS;
                        if store.check_and_mark(&p, &key(k)).unwrap() == Verdict::New {
                            news.push(k);
                        }
                    }
                    news
                })
            })
            .collect();
        let mut winners: HashMap<u64, u32> = HashMap::new();
        for h in handles {
            for k in h.join().unwrap() {
                *winners.entry(k).or_default() += 1;
            }
        }
        for k in 0..KEYS {
            assert_eq!(winners.get(&k), Some(&1), "key {k}: callers that saw New");
        }
        drop(Arc::into_inner(store).expect("the only handle"));
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        for k in 0..KEYS {
            assert_eq!(
                store.check_and_mark(&p, &key(k)).unwrap(),
                Verdict::Duplicate
            );
        }
    });
}

/// Threads race `claim` on the same keys while every commit asks for a
/// table, and each winner confirms or releases: exactly one claim per key
/// is acquired until it is released, a confirmed key stays done, and a
/// released one is acquired again by exactly one of the next racers.
#[test]
fn racing_claims_get_exactly_one_acquired_while_tables_are_written() {
    watched("racing claims", || {
        let (_dir, _clock, store, p) = assigned_store(1);
        const THREADS: u64 = 4;
        const KEYS: u64 = 101;
        let lease = Duration::from_secs(600);
        for round in 0..2u64 {
            let barrier = Arc::new(Barrier::new(THREADS as usize));
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (store, barrier, p) = (store.clone(), barrier.clone(), p.clone());
                    thread::spawn(move || {
                        barrier.wait();
                        let mut won = Vec::new();
                        for i in 0..KEYS {
                            let k = (i * (2 * t + 1) + t) % KEYS;
                            match store.claim(&p, &key(k), lease).unwrap() {
                                Claim::Acquired(token) => {
                                    // Odd keys are released in the first
                                    // round, the rest confirmed.
                                    if round == 0 && k % 2 == 1 {
                                        store.release(&token).unwrap();
                                    } else {
                                        store.confirm(&token).unwrap();
                                    }
                                    won.push(k);
                                }
                                Claim::InFlight { .. } | Claim::Done => {}
                            }
                        }
                        won
                    })
                })
                .collect();
            let mut winners: HashMap<u64, u32> = HashMap::new();
            for h in handles {
                for k in h.join().unwrap() {
                    *winners.entry(k).or_default() += 1;
                }
            }
            for k in 0..KEYS {
                let expected = match (round, k % 2) {
                    (0, 0) => Some(&1),
                    // Released at once: later racers may acquire it again,
                    // never two at a time (checked by confirm/release
                    // succeeding for every winner).
                    (0, _) => winners.get(&k).filter(|&&n| n >= 1),
                    (_, 0) => None,
                    // Released keys are acquired once more, then confirmed.
                    _ => Some(&1),
                };
                assert_eq!(winners.get(&k), expected, "round {round}, key {k}");
            }
        }
        tables::wait_idle(&store);
        for k in 0..KEYS {
            assert_eq!(store.check(&p, &key(k)).unwrap(), Verdict::Duplicate);
        }
    });
}

// ---------------------------------------------------------------------------
// Removals, claims, offsets and epochs through the index
// ---------------------------------------------------------------------------

/// `unmark`, `claim`, `confirm` and `release` go through the index: a
/// removal hides the mark in an older table, a claim is in flight for
/// everyone, and all of it holds once written as tables, after a drop
/// without close (left in journal records) and after a clean close.
#[test]
fn unmark_and_claims_go_through_the_index_and_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let lease = Duration::from_secs(60);
    {
        let store = open_with(dir.path(), &clock, 1);
        store.assign(&p).unwrap();
        store.mark(&p, b"gone").unwrap();
        tables::wait_idle(&store);
        // The mark is in a table now; the removal is in the index, then in
        // a newer table.
        assert!(store.unmark(&p, b"gone").unwrap());
        assert_eq!(store.check(&p, b"gone").unwrap(), Verdict::New);
        tables::wait_idle(&store);
        assert_eq!(store.check(&p, b"gone").unwrap(), Verdict::New);
        assert!(
            !store.unmark(&p, b"gone").unwrap(),
            "nothing live to remove"
        );

        let Claim::Acquired(confirmed) = store.claim(&p, b"confirmed", lease).unwrap() else {
            panic!("a fresh key is acquired")
        };
        let Claim::Acquired(released) = store.claim(&p, b"released", lease).unwrap() else {
            panic!("a fresh key is acquired")
        };
        let Claim::Acquired(_held) = store.claim(&p, b"held", lease).unwrap() else {
            panic!("a fresh key is acquired")
        };
        tables::wait_idle(&store);
        assert!(matches!(
            store.claim(&p, b"held", lease).unwrap(),
            Claim::InFlight { .. }
        ));
        assert_eq!(store.check(&p, b"held").unwrap(), Verdict::Duplicate);
        store.confirm(&confirmed).unwrap();
        store.release(&released).unwrap();
        assert!(matches!(
            store.confirm(&released),
            Err(Error::ClaimLost { .. })
        ));
        assert_eq!(store.check(&p, b"confirmed").unwrap(), Verdict::Duplicate);
        assert_eq!(store.check(&p, b"released").unwrap(), Verdict::New);
        // Left in the index and its journal records: a big table size and
        // a drop without close.
        drop(store);
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        store.mark(&p, b"late").unwrap();
        store.unmark(&p, b"confirmed").unwrap();
        let Claim::Acquired(late_claim) = store.claim(&p, b"late-claim", lease).unwrap() else {
            panic!("a fresh key is acquired")
        };
        drop(store);
        let store = open_with(dir.path(), &clock, 7);
        store.assign(&p).unwrap();
        assert_eq!(store.check(&p, b"gone").unwrap(), Verdict::New);
        assert_eq!(store.check(&p, b"late").unwrap(), Verdict::Duplicate);
        assert_eq!(store.check(&p, b"confirmed").unwrap(), Verdict::New);
        assert_eq!(store.check(&p, b"released").unwrap(), Verdict::New);
        assert!(matches!(
            store.claim(&p, b"held", lease).unwrap(),
            Claim::InFlight { .. }
        ));
        // A claim that only a journal record held is still the holder's.
        store.confirm(&late_claim).unwrap();
        assert_eq!(store.check(&p, b"late-claim").unwrap(), Verdict::Duplicate);
        store.close().unwrap();
    }
    // Past the lease, the claim that was never settled can be taken over.
    clock.advance(lease + Duration::from_millis(1));
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert!(matches!(
        store.claim(&p, b"held", lease).unwrap(),
        Claim::Acquired(_)
    ));
    assert_eq!(store.check(&p, b"late-claim").unwrap(), Verdict::Duplicate);
    store.close().unwrap();
}

/// Offsets and epochs move only forward, whether the last commit is in the
/// index, in a table, or in a journal record left by a drop.
#[test]
fn offsets_and_epochs_never_go_backwards_across_tables_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    for (round, table_bytes) in [1usize, 4 << 20, 50, 1].into_iter().enumerate() {
        let store = open_with(dir.path(), &clock, table_bytes);
        let round = round as u64;
        store.assign_with_epoch(&p, 10 + round).unwrap();
        assert!(matches!(
            store.assign_with_epoch(&p, 9 + round),
            Err(Error::Fenced { .. })
        ));
        assert_eq!(store.epoch(&p).unwrap(), 10 + round);
        let base = store.committed_offset(&p).unwrap().unwrap_or(0);
        assert_eq!(base, round as i64 * 100, "round {round} resumes");
        for i in 1..=100 {
            let mut batch = store.batch(&p).unwrap();
            batch.fence(10 + round);
            batch.mark(format!("r{round}-{i}").as_bytes()).unwrap();
            batch.set_offset(base + i);
            batch.commit().unwrap();
        }
        let mut batch = store.batch(&p).unwrap();
        batch.mark(b"never-committed").unwrap();
        batch.set_offset(base + 50);
        assert!(matches!(
            batch.commit(),
            Err(Error::OffsetRegression { .. })
        ));
        let mut batch = store.batch(&p).unwrap();
        batch.fence(9 + round);
        batch.mark(b"never-committed").unwrap();
        assert!(matches!(batch.commit(), Err(Error::Fenced { .. })));
        assert_eq!(store.check(&p, b"never-committed").unwrap(), Verdict::New);
        if round.is_multiple_of(2) {
            drop(store);
        } else {
            store.close().unwrap();
        }
    }
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert_eq!(store.committed_offset(&p).unwrap(), Some(400));
    assert_eq!(store.epoch(&p).unwrap(), 13);
    assert_eq!(store.check(&p, b"never-committed").unwrap(), Verdict::New);
    for round in 0..4 {
        for i in 1..=100 {
            assert_eq!(
                store.check(&p, format!("r{round}-{i}").as_bytes()).unwrap(),
                Verdict::Duplicate
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Reopens, drops, option changes
// ---------------------------------------------------------------------------

/// Sessions with a different `table_bytes` each, ending by close or by a
/// drop without close, mark and unmark keys on two partitions against a
/// model: every reopen answers exactly as the model says.
#[test]
fn sessions_with_changing_table_sizes_and_unclean_ends_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let parts = [orders(0), orders(1)];
    let mut model: Vec<HashSet<u64>> = vec![HashSet::new(), HashSet::new()];
    let mut rng = Rng(0x5eed_1234);
    let sizes = [1usize, 200, 4 << 20, 1, 37, 4 << 20, 120, 1];
    for (session, &table_bytes) in sizes.iter().enumerate() {
        let store = open_with(dir.path(), &clock, table_bytes);
        for (i, p) in parts.iter().enumerate() {
            store.assign(p).unwrap();
            for k in 0..60u64 {
                let expected = if model[i].contains(&k) {
                    Verdict::Duplicate
                } else {
                    Verdict::New
                };
                assert_eq!(
                    store.check(p, &key(k)).unwrap(),
                    expected,
                    "session {session} (table_bytes {table_bytes}), {p}, key {k}"
                );
            }
        }
        for _ in 0..40 {
            let i = rng.below(2) as usize;
            let p = &parts[i];
            let mut batch = store.batch(p).unwrap();
            for _ in 0..1 + rng.below(4) {
                let k = rng.below(60);
                if rng.below(3) == 0 {
                    assert_eq!(batch.unmark(&key(k)).unwrap(), model[i].contains(&k));
                    model[i].remove(&k);
                } else {
                    let v = batch.check_and_mark(&key(k)).unwrap();
                    assert_eq!(v == Verdict::Duplicate, model[i].contains(&k), "key {k}");
                    model[i].insert(k);
                }
            }
            batch.commit().unwrap();
            // Every key, while its changes are live, frozen, being written
            // or in tables.
            for k in 0..60u64 {
                assert_eq!(
                    store.check(p, &key(k)).unwrap() == Verdict::Duplicate,
                    model[i].contains(&k),
                    "session {session} (table_bytes {table_bytes}), {p}, key {k} after a commit"
                );
            }
        }
        match session % 3 {
            0 => drop(store),
            1 => store.close().unwrap(),
            _ => {
                // Revoke one partition (its changes go to a table), then drop.
                store.revoke(&parts[0]).unwrap();
                drop(store);
            }
        }
    }
}

/// A store dropped while the flusher writes a large table (no close) lets
/// go of its directory by the time the drop returns: a reopen in the same
/// process at once succeeds and finds every mark.
#[test]
fn a_store_dropped_mid_flush_reopens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    const N: u64 = 20_000;
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    let mut batch = store.batch(&p).unwrap();
    for i in 0..N {
        batch.mark(&key(i)).unwrap();
    }
    batch.set_offset(1);
    batch.commit().unwrap();
    // A second commit, so that the first table is being written while the
    // next one waits in the index.
    store.mark(&p, b"second").unwrap();
    drop(store);
    let store = Store::open(dir.path(), opts(&clock, 1)).expect("reopen at once after a drop");
    store.assign(&p).unwrap();
    for i in (0..N).step_by(97) {
        assert_eq!(store.check(&p, &key(i)).unwrap(), Verdict::Duplicate);
    }
    assert_eq!(store.check(&p, b"second").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&p, b"never").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), Some(1));
}

// ---------------------------------------------------------------------------
// SIGKILL mid-flush
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "EXACTLY_WRITE_PATH_CHILD";
const CHILD_KEYS: u64 = 8;

fn child_key(b: i64, j: u64) -> Vec<u8> {
    format!("b{b}-k{j}").into_bytes()
}

/// The child of `sigkill_while_tables_are_written_loses_nothing_acknowledged`:
/// continues from the committed offset, one batch per line it prints
/// (`ACK b`), with a table asked for at every commit. Batch `b` marks
/// `b{b}-k0..8` and unmarks `b{b-1}-k7`; a commit before it claims `c{b}`. Does nothing unless
/// the parent set `EXACTLY_WRITE_PATH_CHILD`.
#[test]
fn child_process_for_the_sigkill_test() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let table_bytes = match std::process::id() % 3 {
        0 => 1,
        1 => 64,
        _ => 300,
    };
    let store = open_with(Path::new(&dir), &clock, table_bytes);
    let p = orders(0);
    store.assign(&p).unwrap();
    let mut b = store.committed_offset(&p).unwrap().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    loop {
        // The claim is a commit of its own, before the batch (a process
        // killed in between leaves it: then it is in flight already).
        assert!(matches!(
            store
                .claim(&p, format!("c{b}").as_bytes(), Duration::from_secs(600))
                .unwrap(),
            Claim::Acquired(_) | Claim::InFlight { .. }
        ));
        let mut batch = store.batch(&p).unwrap();
        for j in 0..CHILD_KEYS {
            assert_eq!(
                batch.check_and_mark(&child_key(b, j)).unwrap(),
                Verdict::New,
                "batch {b} key {j}"
            );
        }
        if b > 0 {
            assert!(batch.unmark(&child_key(b - 1, 7)).unwrap());
        }
        batch.set_offset(b + 1);
        batch.commit().unwrap();
        writeln!(out, "ACK {b}").unwrap();
        out.flush().unwrap();
        b += 1;
    }
}

/// A child process commits batches (marks, a removal, a claim) with a table
/// asked for at every commit, and is killed with SIGKILL at a random moment
/// (often while the flusher writes, ingests, or deletes journal records).
/// After each kill every acknowledged batch is whole, the batch after the
/// offset left nothing, removals and claims hold, and a record ingested
/// twice (killed between the ingest and the delete) changes nothing.
#[test]
fn sigkill_while_tables_are_written_loses_nothing_acknowledged() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let seed = T0 ^ u64::from(std::process::id());
    let mut rng = Rng(seed | 1);
    let mut last_acked: i64 = -1;
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 4 || (rounds < 16 && started.elapsed() < Duration::from_secs(3)) {
        rounds += 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_for_the_sigkill_test",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = 1 + rng.below(120);
        let mut seen = 0;
        let mut record = |line: &str| {
            // The test harness may print its own words before an ack on
            // the same line.
            if let Some((_, b)) = line.split_once("ACK ") {
                let b: i64 = b.trim().parse().unwrap();
                assert_eq!(b, last_acked + 1, "acks are consecutive");
                last_acked = b;
                true
            } else {
                false
            }
        };
        while seen < kill_after {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("child ended early: {:?}", child.wait()))
                .unwrap();
            if record(&line) {
                seen += 1;
            }
        }
        // A random moment after the ack: mid-flush more often than not.
        thread::sleep(Duration::from_micros(rng.below(3_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        for line in lines {
            record(&line.unwrap());
        }

        let store = open_with(dir.path(), &clock, [1, 4 << 20, 90][rounds % 3]);
        store.assign(&p).unwrap();
        let committed = store.committed_offset(&p).unwrap().unwrap_or(0) - 1;
        assert!(
            committed == last_acked || committed == last_acked + 1,
            "round {rounds}: offset says batch {committed}, acked {last_acked} (seed {seed})"
        );
        for b in 0..=committed {
            for j in 0..CHILD_KEYS {
                let expected = if j == 7 && b < committed {
                    Verdict::New // unmarked by the next batch
                } else {
                    Verdict::Duplicate
                };
                assert_eq!(
                    store.check(&p, &child_key(b, j)).unwrap(),
                    expected,
                    "round {rounds}: batch {b} key {j} (committed {committed}, seed {seed})"
                );
            }
            assert_eq!(
                store.check(&p, format!("c{b}").as_bytes()).unwrap(),
                Verdict::Duplicate,
                "round {rounds}: the claim of batch {b} is in flight"
            );
        }
        for j in 0..CHILD_KEYS {
            assert_eq!(
                store.check(&p, &child_key(committed + 1, j)).unwrap(),
                Verdict::New,
                "round {rounds}: batch {} was never committed",
                committed + 1
            );
        }
        last_acked = committed;
        if rounds.is_multiple_of(2) {
            store.close().unwrap();
        } else {
            drop(store);
        }
    }
}

// ---------------------------------------------------------------------------
// The flusher against revoke, assign, delete_partition and compact
// ---------------------------------------------------------------------------

/// Writers commit (every commit asks for a table) while other threads
/// revoke and assign one partition, delete and re-create another, compact,
/// sync and read stats: no panic, no deadlock, no error but the ones a
/// race explains, and every acknowledged mark of the partition that was
/// never deleted is there at the end and after a reopen.
#[test]
fn the_flusher_races_revoke_assign_delete_compact_without_harm() {
    watched("flusher against revoke/assign/delete/compact", || {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let store = Arc::new(open_with(dir.path(), &clock, 1));
        let (kept, deleted) = (orders(0), orders(1));
        store.assign(&kept).unwrap();
        store.assign(&deleted).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acked_kept = Arc::new(AtomicI64::new(-1));
        let mut handles = Vec::new();
        // A writer per partition.
        for (p, acked) in [
            (kept.clone(), Some(acked_kept.clone())),
            (deleted.clone(), None),
        ] {
            let (store, stop) = (store.clone(), stop.clone());
            handles.push(thread::spawn(move || {
                let mut i = 0i64;
                while !stop.load(Ordering::Acquire) {
                    let result = store.batch(&p).and_then(|mut batch| {
                        batch.mark(format!("{p}-{i}").as_bytes())?;
                        batch.unmark(format!("{p}-{}", i - 1).as_bytes())?;
                        batch.mark(format!("{p}-{}", i - 1).as_bytes())?;
                        batch.commit()
                    });
                    match result {
                        Ok(()) => {
                            if let Some(acked) = &acked {
                                acked.store(i, Ordering::Release);
                            }
                            i += 1;
                        }
                        Err(Error::NotAssigned(_)) => thread::yield_now(),
                        Err(e) => panic!("writer on {p}: {e:?}"),
                    }
                }
            }));
        }
        // Revoke and assign the kept partition, checking what was acked.
        {
            let (store, stop, p, acked) = (
                store.clone(),
                stop.clone(),
                kept.clone(),
                acked_kept.clone(),
            );
            handles.push(thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match store.revoke(&p) {
                        Ok(()) | Err(Error::NotAssigned(_)) => {}
                        Err(e) => panic!("revoke: {e:?}"),
                    }
                    store.assign(&p).unwrap();
                    let upto = acked.load(Ordering::Acquire);
                    for i in [0, upto / 2, upto]
                        .into_iter()
                        .filter(|&i| (0..=upto).contains(&i))
                    {
                        assert_eq!(
                            store.check(&p, format!("{p}-{i}").as_bytes()).unwrap(),
                            Verdict::Duplicate,
                            "acknowledged {p}-{i} lost across a revoke (acked {upto})"
                        );
                    }
                }
            }));
        }
        // Delete and re-create the other partition.
        {
            let (store, stop, p) = (store.clone(), stop.clone(), deleted.clone());
            handles.push(thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    store.delete_partition(&p).unwrap();
                    store.assign(&p).unwrap();
                    thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        // Compact both, sync and read stats.
        {
            let (store, stop) = (store.clone(), stop.clone());
            let parts = [kept.clone(), deleted.clone()];
            handles.push(thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    match store.compact(&parts[n % 2]) {
                        Ok(()) | Err(Error::NotAssigned(_)) => {}
                        Err(e) => panic!("compact {}: {e:?}", parts[n % 2]),
                    }
                    store.sync().unwrap();
                    let _ = store.stats();
                    n += 1;
                }
            }));
        }
        // Two seconds of races, longer if a loaded machine held the writer
        // back (a revoke every few milliseconds sends it round again).
        let started = Instant::now();
        thread::sleep(Duration::from_millis(2_000));
        while acked_kept.load(Ordering::Acquire) <= 10
            && started.elapsed() < Duration::from_secs(20)
        {
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
        let upto = acked_kept.load(Ordering::Acquire);
        assert!(upto > 10, "the writer made progress: {upto}");
        let store = Arc::into_inner(store).expect("the only handle");
        if store.assigned().contains(&kept) {
            store.revoke(&kept).unwrap();
        }
        store.assign(&kept).unwrap();
        for i in 0..=upto {
            assert_eq!(
                store
                    .check(&kept, format!("{kept}-{i}").as_bytes())
                    .unwrap(),
                Verdict::Duplicate,
                "acknowledged {kept}-{i}"
            );
        }
        drop(store);
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&kept).unwrap();
        for i in 0..=upto {
            assert_eq!(
                store
                    .check(&kept, format!("{kept}-{i}").as_bytes())
                    .unwrap(),
                Verdict::Duplicate,
                "acknowledged {kept}-{i} after a reopen"
            );
        }
    });
}

/// `compact` of a partition that a `delete_partition` on another thread
/// drops meanwhile answers like every other call on a partition that is no
/// longer there, `Error::NotAssigned`, not a storage error (which tells an
/// operator the store's files are failing).
#[test]

fn compact_racing_delete_partition_is_not_a_storage_error() {
    watched("compact against delete_partition", || {
        let (_dir, _clock, store, p) = assigned_store(1);
        let stop = Arc::new(AtomicBool::new(false));
        let deleter = {
            let (store, stop, p) = (store.clone(), stop.clone(), p.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let _ = store.mark(&p, b"k");
                    store.delete_partition(&p).unwrap();
                    store.assign(&p).unwrap();
                }
            })
        };
        let started = Instant::now();
        let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
        while started.elapsed() < Duration::from_millis(1_500) {
            let outcome = match store.compact(&p) {
                Ok(()) => "ok".to_string(),
                Err(Error::NotAssigned(_)) => "not assigned".to_string(),
                Err(e) => format!("{e:?}"),
            };
            *outcomes.entry(outcome).or_default() += 1;
        }
        stop.store(true, Ordering::Release);
        deleter.join().unwrap();
        assert!(
            outcomes.keys().all(|o| o == "ok" || o == "not assigned"),
            "{outcomes:?}"
        );
    });
}

/// `compact` writes the partition's changes in memory first; while writers
/// keep committing (each commit asks for a table) it must still return,
/// not chase the writers forever.
#[test]
fn compact_returns_while_writers_keep_committing() {
    compact_under_load(1);
}

/// The same with the default table size: no writer ever writes a table, so
/// only `compact` does, and commits refill the index while it writes one.
/// It writes what the partition held when it started, and returns.
#[test]
fn compact_returns_while_writers_keep_committing_with_large_tables() {
    compact_under_load(4 << 20);
}

fn compact_under_load(table_bytes: usize) {
    watched("compact under load", move || {
        let (_dir, _clock, store, p) = assigned_store(table_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let (store, stop, p) = (store.clone(), stop.clone(), p.clone());
                thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        store.mark(&p, format!("w{t}-{i}").as_bytes()).unwrap();
                        i += 1;
                    }
                    i
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        let (done, finished) = mpsc::channel();
        let compactor = {
            let (store, p) = (store.clone(), p.clone());
            thread::spawn(move || {
                for _ in 0..3 {
                    store.compact(&p).unwrap();
                }
                let _ = done.send(());
            })
        };
        let returned = finished.recv_timeout(Duration::from_secs(10)).is_ok();
        stop.store(true, Ordering::Release);
        let marked: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        compactor.join().unwrap();
        assert!(
            returned,
            "compact did not return in 10 s while writers committed ({marked:?} marks)"
        );
        for (t, n) in marked.iter().enumerate() {
            for i in (0..*n).step_by(53) {
                assert_eq!(
                    store.check(&p, format!("w{t}-{i}").as_bytes()).unwrap(),
                    Verdict::Duplicate
                );
            }
        }
    });
}

/// Many threads on two partitions, with readers, single-key writers,
/// batches, claims, revoke/assign, compaction, stats and sync all running
/// while every commit asks for a table: nothing deadlocks.
#[test]
fn everything_at_once_does_not_deadlock() {
    watched("everything at once", || {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let store = Arc::new(open_with(dir.path(), &clock, 1));
        let parts = [orders(0), orders(1)];
        for p in &parts {
            store.assign(p).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..6u64)
            .map(|t| {
                let (store, stop, ops, parts) =
                    (store.clone(), stop.clone(), ops.clone(), parts.clone());
                thread::spawn(move || {
                    let mut rng = Rng(0xdead_beef + t);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let p = &parts[rng.below(2) as usize];
                        let k = format!("t{t}-{}", rng.below(200));
                        let r: exactly::Result<()> = match (t + i) % 6 {
                            0 => store.check(p, k.as_bytes()).map(|_| ()),
                            1 => store.check_and_mark(p, k.as_bytes()).map(|_| ()),
                            2 => store.unmark(p, k.as_bytes()).map(|_| ()),
                            3 => match store.claim(p, k.as_bytes(), Duration::from_secs(1)) {
                                Ok(Claim::Acquired(token)) => {
                                    if rng.below(2) == 0 {
                                        store.confirm(&token)
                                    } else {
                                        store.release(&token)
                                    }
                                }
                                Ok(_) => Ok(()),
                                Err(e) => Err(e),
                            },
                            4 => {
                                if rng.below(20) == 0 {
                                    store.revoke(p).and_then(|()| store.assign(p))
                                } else {
                                    let _ = store.stats();
                                    Ok(())
                                }
                            }
                            _ => {
                                if rng.below(30) == 0 {
                                    store.compact(p).and_then(|()| store.sync())
                                } else {
                                    store.batch(p).and_then(|mut b| {
                                        for j in 0..5 {
                                            b.mark(format!("{k}-{j}").as_bytes())?;
                                        }
                                        b.commit()
                                    })
                                }
                            }
                        };
                        match r {
                            // A revoke in between, or a claim lost to it.
                            Ok(()) | Err(Error::NotAssigned(_)) | Err(Error::ClaimLost { .. }) => {}
                            Err(e) => panic!("thread {t}: {e:?}"),
                        }
                        // Revoked by another thread: assign again.
                        if !store.assigned().contains(p) {
                            let _ = store.assign(p);
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(2_000));
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
        assert!(
            ops.load(Ordering::Relaxed) > 100,
            "the threads made progress"
        );
        let store = Arc::into_inner(store).expect("the only handle");
        store.close().unwrap();
    });
}

// ---------------------------------------------------------------------------
// Damaged journal records
// ---------------------------------------------------------------------------

const JOURNAL_PREFIX: &[u8] = b"\x00journal:";

fn journal_key(seq: u64) -> Vec<u8> {
    let mut k = JOURNAL_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A journal record as `src/journal.rs` encodes it, with a valid checksum.
fn journal_record(changes: &[(&[u8], Option<[u8; 9]>)]) -> Vec<u8> {
    let mut out = b"EXJ1".to_vec();
    out.extend_from_slice(&(changes.len() as u32).to_be_bytes());
    for (k, e) in changes {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        match e {
            None => out.push(0),
            Some(e) => {
                out.push(9);
                out.extend_from_slice(e);
            }
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A mark entry expiring at `t`.
fn done(t: u64) -> [u8; 9] {
    let mut e = [1u8; 9];
    e[1..].copy_from_slice(&t.to_be_bytes());
    e
}

/// Writes `(key, value)` into the partition's column family of the closed
/// store in `dir`, with RocksDB directly.
fn poke(dir: &Path, p: &Partition, writes: &[(Vec<u8>, Vec<u8>)]) {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(false);
    let names = rocksdb::DB::list_cf(&o, dir).unwrap();
    let db = rocksdb::DB::open_cf(&o, dir, &names).unwrap();
    let cf = db
        .cf_handle(&format!("p/{}/{}", p.topic(), p.partition()))
        .unwrap();
    for (k, v) in writes {
        db.put_cf(cf, k, v).unwrap();
    }
    db.flush_wal(true).unwrap();
}

/// A store whose partition holds journal records that were never written
/// as a table (a big table size and a drop without close), with marks
/// `key-0..5` in them.
fn store_with_records(dir: &Path, clock: &ManualClock, p: &Partition) {
    let store = open_with(dir, clock, 4 << 20);
    store.assign(p).unwrap();
    for i in 0..5 {
        store.mark(p, &key(i)).unwrap();
    }
    drop(store);
}

/// A damaged journal record (bad checksum, cut short, malformed key) is
/// `Error::Corruption` on assign and for every tool, never a panic nor an
/// answer from the rest; nothing of the damaged partition is written.
#[test]
fn a_damaged_journal_record_is_corruption_on_assign_and_for_the_tools() {
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let good = journal_record(&[(b"\x01x", Some(done(T0 + 1_000_000)))]);
    let mut flipped = good.clone();
    flipped[10] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("a flipped bit", journal_key(1_000), flipped),
        (
            "a cut record",
            journal_key(1_000),
            good[..good.len() - 3].to_vec(),
        ),
        ("an empty value", journal_key(1_000), Vec::new()),
        (
            "a malformed key",
            [JOURNAL_PREFIX, b"xyz"].concat(),
            good.clone(),
        ),
    ];
    for (what, k, v) in cases {
        let dir = tempfile::tempdir().unwrap();
        store_with_records(dir.path(), &clock, &p);
        poke(dir.path(), &p, &[(k, v)]);
        let store = open_with(dir.path(), &clock, 1);
        let r = store.assign(&p);
        assert!(matches!(r, Err(Error::Corruption(_))), "{what}: {r:?}");
        assert!(!store.assigned().contains(&p), "{what}");
        let r = inspect::partition_meta(&store, &p);
        assert!(matches!(r, Err(Error::Corruption(_))), "{what}: {r:?}");
        let r = inspect::for_each_entry(&store, &p, |_| Ok(true));
        assert!(matches!(r, Err(Error::Corruption(_))), "{what}: {r:?}");
        let export = dir.path().join("p.export");
        let r = transfer::export(&store, &p, &export, &mut |_| {});
        assert!(matches!(r, Err(Error::Corruption(_))), "{what}: {r:?}");
        let report = verify::verify(&store, &mut |_| {}).unwrap();
        assert!(!report.healthy(), "{what}: {report:?}");
        // Another partition is untouched by the damage.
        store.assign(&orders(1)).unwrap();
        store.mark(&orders(1), b"fine").unwrap();
        drop(store);
        // Still refused at the next open: the records were left alone.
        let store = open_with(dir.path(), &clock, 1);
        let r = store.assign(&p);
        assert!(
            matches!(r, Err(Error::Corruption(_))),
            "{what} again: {r:?}"
        );
        // The way out: deleting the partition, which reads nothing of it.
        assert!(store.delete_partition(&p).unwrap(), "{what}");
        store.assign(&p).unwrap();
        assert_eq!(store.check(&p, &key(0)).unwrap(), Verdict::New, "{what}");
    }
}

/// A journal record whose checksum matches but whose change is not a mark
/// (a metadata key, an empty key, a bare tag) is damage as well: on assign
/// it is `Error::Corruption`, never written over the partition's metadata
/// (here its offset) nor a storage error from a table out of order.
#[test]
fn a_journal_record_that_changes_no_mark_is_corruption() {
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let bad_keys: [&[u8]; 4] = [b"\x00offset", b"", b"\x01", b"\x02other-tag"];
    for bad in bad_keys {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_with(dir.path(), &clock, 4 << 20);
            store.assign(&p).unwrap();
            let mut batch = store.batch(&p).unwrap();
            batch.mark(b"a").unwrap();
            batch.set_offset(7);
            batch.commit().unwrap();
            drop(store);
        }
        let record = journal_record(&[(b"\x01b", Some(done(T0 + 1_000_000))), (bad, None)]);
        poke(dir.path(), &p, &[(journal_key(1_000), record)]);
        let store = open_with(dir.path(), &clock, 1);
        let r = store.assign(&p);
        assert!(
            matches!(r, Err(Error::Corruption(_))),
            "change of {:?}: {r:?}",
            bad.escape_ascii().to_string()
        );
    }
}

// ---------------------------------------------------------------------------
// Keys, key modes, event time
// ---------------------------------------------------------------------------

/// Keys that share their first eight bytes, are shorter than eight bytes,
/// hold zero or high bytes: each table is written in RocksDB's order (or
/// its write would fail) and every key reads back, raw and hashed.
#[test]
fn awkward_keys_are_written_in_order_raw_and_hashed() {
    let mut keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a\x00".to_vec(),
        b"a\x00\x00".to_vec(),
        b"a\x00\x00\x00\x00\x00\x00\x00".to_vec(),
        b"a\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(),
        b"a\x00\x00\x00\x00\x00\x00\x00\x01".to_vec(),
        b"ab".to_vec(),
        b"abcdefgh".to_vec(),
        b"abcdefgh\x00".to_vec(),
        b"abcdefghi".to_vec(),
        b"abcdefgh\xff".to_vec(),
        b"abcdefg\xff".to_vec(),
        b"\x00".to_vec(),
        b"\x00\x00".to_vec(),
        b"\xff".to_vec(),
        b"\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        b"\x7f\xff\xff\xff\xff\xff\xff\xff\x00".to_vec(),
        b"\x80".to_vec(),
        vec![b'z'; 1024],
        vec![b'z'; 1023],
    ];
    for i in 0..200u32 {
        keys.push(i.to_be_bytes().to_vec());
        keys.push(
            u64::from(i)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes()
                .to_vec(),
        );
    }
    for mode in [KeyMode::Raw, KeyMode::Hashed] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let p = orders(0);
        let open = |tb| Store::open(dir.path(), opts(&clock, tb).key_mode(mode)).unwrap();
        let store = open(1);
        store.assign(&p).unwrap();
        let mut batch = store.batch(&p).unwrap();
        for k in &keys {
            assert_eq!(batch.check_and_mark(k).unwrap(), Verdict::New, "{mode:?}");
        }
        batch.commit().unwrap();
        // Unmark half of them in a second table.
        let mut batch = store.batch(&p).unwrap();
        for k in keys.iter().step_by(2) {
            assert!(batch.unmark(k).unwrap());
        }
        batch.commit().unwrap();
        // Revoke writes what is left; a failed table would leave the
        // records for the assign, which would fail the same way.
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
        let check = |store: &Store| {
            for (i, k) in keys.iter().enumerate() {
                let expected = if i.is_multiple_of(2) {
                    Verdict::New
                } else {
                    Verdict::Duplicate
                };
                assert_eq!(
                    store.check(&p, k).unwrap(),
                    expected,
                    "{mode:?} key {:?}",
                    k.escape_ascii().to_string()
                );
            }
        };
        check(&store);
        store.revoke(&p).unwrap();
        // Read straight from the column family: the index is empty, so
        // this is what the tables hold.
        let mut seen = 0;
        inspect::for_each_entry(&store, &p, |_| {
            seen += 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, keys.len() / 2, "{mode:?}");
        drop(store);
        let store = open(4 << 20);
        store.assign(&p).unwrap();
        check(&store);
    }
}

/// Event-time marks in the index and in tables expire at the watermark,
/// the same before a flush, after it and after a drop without close.
#[test]
fn event_time_marks_expire_at_the_watermark_in_the_index_and_in_tables() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let ttl_ms = TTL.as_millis() as u64;
    let open = |tb| {
        Store::open(
            dir.path(),
            opts(&clock, tb).time_domain(TimeDomain::EventTime),
        )
        .unwrap()
    };
    let store = open(4 << 20);
    store.assign(&p).unwrap();
    let e0 = 1_000_000u64;
    store.mark_at(&p, b"early", e0).unwrap();
    store.mark_at(&p, b"late", e0 + ttl_ms / 2).unwrap();
    assert_eq!(store.check(&p, b"early").unwrap(), Verdict::Duplicate);
    // The watermark passes "early"'s expiry, not "late"'s.
    store.mark_at(&p, b"clock", e0 + ttl_ms).unwrap();
    assert_eq!(store.check(&p, b"early").unwrap(), Verdict::New, "index");
    assert_eq!(
        store.check(&p, b"late").unwrap(),
        Verdict::Duplicate,
        "index"
    );
    drop(store);
    let store = open(1);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"early").unwrap(), Verdict::New, "settled");
    assert_eq!(
        store.check(&p, b"late").unwrap(),
        Verdict::Duplicate,
        "settled"
    );
    // Re-marking the expired key at a fresh event time goes through a table.
    assert_eq!(
        store.check_and_mark_at(&p, b"early", e0 + ttl_ms).unwrap(),
        Verdict::New
    );
    tables::wait_idle(&store);
    assert_eq!(
        store.check(&p, b"early").unwrap(),
        Verdict::Duplicate,
        "table"
    );
    // Past "late"'s expiry (e0 + 1.5 TTL), before "early"'s new one.
    store
        .mark_at(&p, b"clock2", e0 + ttl_ms * 3 / 2 + 1)
        .unwrap();
    tables::wait_idle(&store);
    assert_eq!(store.check(&p, b"late").unwrap(), Verdict::New, "table");
    assert_eq!(store.check(&p, b"early").unwrap(), Verdict::Duplicate);
    store.close().unwrap();
    let store = open(200);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"late").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"early").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check(&p, b"clock2").unwrap(), Verdict::Duplicate);
}

// ---------------------------------------------------------------------------
// Tools after a drop without close
// ---------------------------------------------------------------------------

/// After a drop without close, the partition's marks are only in journal
/// records: inspect, read_stored, verify, export and import see every one
/// of them (settled first), and the imported copy answers like the
/// original.
#[test]
fn the_tools_see_marks_left_in_journal_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    {
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        let mut batch = store.batch(&p).unwrap();
        for i in 0..50 {
            batch.mark(&key(i)).unwrap();
        }
        batch.set_offset(50);
        batch.commit().unwrap();
        for i in 0..10 {
            store.unmark(&p, &key(i)).unwrap();
        }
        let Claim::Acquired(_) = store.claim(&p, b"claimed", TTL).unwrap() else {
            panic!("acquired")
        };
        drop(store);
    }
    let store = open_with(dir.path(), &clock, 4 << 20);
    let meta = inspect::partition_meta(&store, &p).unwrap().unwrap();
    assert_eq!(meta.offset, Some(50));
    let mut entries = BTreeMap::new();
    let n = inspect::for_each_entry(&store, &p, |e| {
        entries.insert(e.key, e.state);
        Ok(true)
    })
    .unwrap();
    assert_eq!(n, 41, "40 marks and a claim: {entries:?}");
    for i in 0..50 {
        let stored = inspect::stored_key(&store, &key(i)).unwrap();
        let state = inspect::read_stored(&store, &p, &stored).unwrap();
        assert_eq!(state.is_some(), i >= 10, "key {i}: {state:?}");
    }
    let report = verify::verify(&store, &mut |_| {}).unwrap();
    assert!(report.healthy(), "{report:?}");
    let file = dir.path().join("p0.export");
    let summary = transfer::export(&store, &p, &file, &mut |_| {}).unwrap();
    assert_eq!((summary.marks, summary.claims), (40, 1));
    drop(store);

    let other = tempfile::tempdir().unwrap();
    let copy = open_with(other.path(), &clock, 1);
    transfer::import(&copy, &file, None, &mut |_| {}).unwrap();
    copy.assign(&p).unwrap();
    for i in 0..50 {
        let expected = if i >= 10 {
            Verdict::Duplicate
        } else {
            Verdict::New
        };
        assert_eq!(copy.check(&p, &key(i)).unwrap(), expected, "key {i}");
    }
    assert!(matches!(
        copy.claim(&p, b"claimed", TTL).unwrap(),
        Claim::InFlight { .. }
    ));
    assert_eq!(copy.committed_offset(&p).unwrap(), Some(50));
    // The copy's own writes go through its index on top of the import.
    assert!(copy.unmark(&p, &key(20)).unwrap());
    assert_eq!(copy.check(&p, &key(20)).unwrap(), Verdict::New);
    copy.close().unwrap();
}

/// Import into a partition whose last session left journal records: the
/// records are settled first, so the import merges with them and a later
/// assign does not replay them over the imported entries.
#[test]
fn import_over_journal_records_is_not_undone_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    // An export holding "k" as a mark.
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("k.export");
    {
        let store = open_with(src.path(), &clock, 1);
        store.assign(&p).unwrap();
        store.mark(&p, b"k").unwrap();
        store.close().unwrap();
        let store = open_with(src.path(), &clock, 1);
        transfer::export(&store, &p, &file, &mut |_| {}).unwrap();
    }
    // The target's last session removed "k" in a journal record only.
    {
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        store.mark(&p, b"k").unwrap();
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
        assert!(store.unmark(&p, b"k").unwrap());
        drop(store);
    }
    let store = open_with(dir.path(), &clock, 4 << 20);
    let summary = transfer::import(&store, &file, None, &mut |_| {}).unwrap();
    assert_eq!(summary.written, 1, "{summary:?}");
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    drop(store);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
}

// ---------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------

/// The key estimate counts each mark about once, whether it is in the
/// index (with its journal record on disk) or in a table (with its journal
/// record deleted), as it did when every mark was a put.
#[test]

fn the_key_estimate_counts_each_mark_about_once() {
    const N: u64 = 400;
    for table_bytes in [4 << 20, 1] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let p = orders(0);
        let store = open_with(dir.path(), &clock, table_bytes);
        store.assign(&p).unwrap();
        for i in 0..N {
            store.mark(&p, &key(i)).unwrap();
        }
        tables::wait_idle(&store);
        let estimate = store.stats().partitions[&p].live_keys_estimate;
        store.compact(&p).unwrap();
        let compacted = store.stats().partitions[&p].live_keys_estimate;
        assert!(
            (N..=N + N / 4).contains(&compacted),
            "table_bytes {table_bytes}: {compacted} after a compaction"
        );
        assert!(
            (N..=N + N / 4).contains(&estimate),
            "table_bytes {table_bytes}: estimate {estimate} for {N} marks \
             ({compacted} after a compaction)"
        );
    }
}

/// A store of `Durability::Sync` writes its tables and deletes its records
/// with the same durability; everything survives a drop.
#[test]
fn sync_durability_tables_survive_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let store = Store::open(dir.path(), opts(&clock, 1).durability(Durability::Sync)).unwrap();
    store.assign(&p).unwrap();
    for i in 0..50 {
        store.mark(&p, &key(i)).unwrap();
    }
    drop(store);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    for i in 0..50 {
        assert_eq!(store.check(&p, &key(i)).unwrap(), Verdict::Duplicate);
    }
}

/// Replaces the store's table directory by a plain file, so that writing a
/// table fails, until the returned guard puts it back.
struct BrokenTables {
    dir: std::path::PathBuf,
}

impl BrokenTables {
    fn new(store_dir: &Path) -> Self {
        let dir = store_dir.join("ingest");
        std::fs::rename(&dir, store_dir.join("ingest.saved")).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        Self { dir }
    }

    fn repair(self) {}
}

impl Drop for BrokenTables {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.dir);
        let _ = std::fs::rename(self.dir.with_extension("saved"), &self.dir);
    }
}

/// A table that cannot be written (the table directory replaced by a
/// file): commits that must write one inline fail whole, a revoke goes on
/// and leaves the journal records, an assign fails until the directory is
/// back, and then every acknowledged change is there.
#[test]
fn a_failing_table_write_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    store.mark(&p, b"before").unwrap();
    tables::wait_idle(&store);
    let broken = BrokenTables::new(dir.path());
    let mut acked = vec![b"before".to_vec()];
    for i in 0..20 {
        match store.mark(&p, &key(i)) {
            Ok(()) => acked.push(key(i)),
            Err(Error::Storage(_)) => {
                assert_eq!(store.check(&p, &key(i)).unwrap(), Verdict::New, "key {i}")
            }
            Err(e) => panic!("key {i}: {e:?}"),
        }
    }
    assert!(store.unmark(&p, b"before").is_ok() || acked.len() < 21);
    let unmarked = store.check(&p, b"before").unwrap() == Verdict::New;
    for k in &acked[1..] {
        assert_eq!(store.check(&p, k).unwrap(), Verdict::Duplicate);
    }
    store.revoke(&p).unwrap();
    let r = store.assign(&p);
    assert!(matches!(r, Err(Error::Storage(_))), "{r:?}");
    broken.repair();
    store.assign(&p).unwrap();
    for k in &acked[1..] {
        assert_eq!(store.check(&p, k).unwrap(), Verdict::Duplicate);
    }
    let expected = if unmarked {
        Verdict::New
    } else {
        Verdict::Duplicate
    };
    assert_eq!(store.check(&p, b"before").unwrap(), expected);
    drop(store);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    for k in &acked[1..] {
        assert_eq!(store.check(&p, k).unwrap(), Verdict::Duplicate);
    }
    assert_eq!(store.check(&p, b"before").unwrap(), expected);
}

/// A revoke whose table write failed leaves the old shard's changes in
/// memory; the next assign writes them from their journal records and the
/// partition moves on (here: the key is unmarked and that written as a
/// table). A flush of the old shard that was still queued must not write
/// its stale changes over the newer ones afterwards.
#[test]
fn a_stale_flush_of_a_revoked_shard_does_not_undo_newer_changes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (p, busy) = (orders(0), orders(1));
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    store.assign(&busy).unwrap();
    // Keep the flusher busy with a large table.
    let mut batch = store.batch(&busy).unwrap();
    for i in 0..150_000 {
        batch.mark(&key(i)).unwrap();
    }
    batch.commit().unwrap();
    let started = Instant::now();
    let broken = BrokenTables::new(dir.path());
    // Asks for a flush of `p`, queued behind the large one.
    store.mark(&p, b"k").unwrap();
    store.revoke(&p).unwrap(); // its table write fails
    broken.repair();
    store.assign(&p).unwrap(); // writes "k" from its journal record
    assert!(store.unmark(&p, b"k").unwrap());
    store.revoke(&p).unwrap(); // writes the removal as a table
    let window = started.elapsed();
    store.assign(&p).unwrap();
    tables::wait_idle(&store); // the queued flush of the old shard runs
    eprintln!(
        "window {window:?}, flusher idle after {:?}",
        started.elapsed()
    );
    assert_eq!(
        store.check(&p, b"k").unwrap(),
        Verdict::New,
        "an unmarked key came back"
    );
    store.revoke(&p).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
}

/// As above, the other way round: the old shard's stale change is a
/// removal, and the new shard's acknowledged mark must not be undone by it
/// (a `New` for an acknowledged live mark).
#[test]
fn a_stale_removal_of_a_revoked_shard_does_not_undo_an_acknowledged_mark() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (p, busy) = (orders(0), orders(1));
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    store.assign(&busy).unwrap();
    store.mark(&p, b"k").unwrap();
    tables::wait_idle(&store);
    let mut batch = store.batch(&busy).unwrap();
    for i in 0..150_000 {
        batch.mark(&key(i)).unwrap();
    }
    batch.commit().unwrap();
    let broken = BrokenTables::new(dir.path());
    assert!(store.unmark(&p, b"k").unwrap()); // its flush is queued
    store.revoke(&p).unwrap(); // its table write fails
    broken.repair();
    store.assign(&p).unwrap(); // writes the removal from its record
    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::New);
    store.revoke(&p).unwrap(); // the acknowledged mark goes to a table
    store.assign(&p).unwrap();
    tables::wait_idle(&store); // the queued flush of the old shard runs
    assert_eq!(
        store.check(&p, b"k").unwrap(),
        Verdict::Duplicate,
        "an acknowledged mark was undone"
    );
    drop(store);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
}

/// A journal record numbered at the very end of the number space (only
/// damage can number one so: one record per batch from 0) is
/// `Error::Corruption` on assign, never an overflow panic; deleting the
/// partition clears it.
#[test]
fn a_journal_record_numbered_at_the_end_of_the_number_space_is_corruption() {
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let dir = tempfile::tempdir().unwrap();
    store_with_records(dir.path(), &clock, &p);
    let record = journal_record(&[(b"\x01far", Some(done(T0 + 1_000_000)))]);
    poke(dir.path(), &p, &[(journal_key(u64::MAX), record)]);
    let store = open_with(dir.path(), &clock, 1);
    let r = store.assign(&p);
    assert!(matches!(r, Err(Error::Corruption(_))), "{r:?}");
    assert!(store.delete_partition(&p).unwrap());
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, &key(0)).unwrap(), Verdict::New);
    store.mark(&p, b"after").unwrap();
    store.revoke(&p).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"after").unwrap(), Verdict::Duplicate);
}

/// A stop between a table's ingest and the delete of its records leaves
/// both: the next settle replays every record left, in order, above the
/// table, and each key ends at its newest state (the table here is built
/// as the flusher builds one, from the first two records).
#[test]
fn records_left_beside_their_ingested_table_are_replayed_to_the_same_state() {
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let dir = tempfile::tempdir().unwrap();
    let expiry = T0 + TTL.as_millis() as u64;
    {
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        let mut batch = store.batch(&p).unwrap(); // record 0
        batch.mark(b"a").unwrap();
        batch.mark(b"b").unwrap();
        batch.commit().unwrap();
        assert!(store.unmark(&p, b"a").unwrap()); // record 1
        store.mark(&p, b"c").unwrap(); // record 2
        assert!(store.unmark(&p, b"b").unwrap()); // record 3
        drop(store);
    }
    // The table of records 0 and 1, ingested; the records not deleted.
    {
        let o = rocksdb::Options::default();
        let names = rocksdb::DB::list_cf(&o, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&o, dir.path(), &names).unwrap();
        let cf = db.cf_handle("p/orders/0").unwrap();
        let path = dir.path().join("replayed.sst");
        let mut writer = rocksdb::SstFileWriter::create(&o);
        writer.open(&path).unwrap();
        writer.delete(b"\x01a").unwrap();
        writer.put(b"\x01b", done(expiry)).unwrap();
        writer.finish().unwrap();
        db.ingest_external_file_cf(cf, vec![&path]).unwrap();
        for seq in 0..4 {
            assert!(
                db.get_cf(cf, journal_key(seq)).unwrap().is_some(),
                "record {seq}"
            );
        }
    }
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"a").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"b").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"c").unwrap(), Verdict::Duplicate);
    store.mark(&p, b"d").unwrap();
    drop(store);
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    for (k, v) in [
        (&b"a"[..], Verdict::New),
        (b"b", Verdict::New),
        (b"c", Verdict::Duplicate),
        (b"d", Verdict::Duplicate),
    ] {
        assert_eq!(store.check(&p, k).unwrap(), v, "{:?}", k.escape_ascii());
    }
}

/// A settle deletes the records it wrote, and the partition's next shard
/// numbers its records from 0 again, under the numbers it deleted: the
/// new records are read back and replayed after a drop, none is hidden,
/// and the old ones do not come back.
#[test]
fn records_numbered_again_under_a_settled_range_are_replayed() {
    let clock = ManualClock::new(T0);
    let p = orders(0);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_with(dir.path(), &clock, 4 << 20);
        store.assign(&p).unwrap();
        for i in 0..5 {
            store.mark(&p, &key(i)).unwrap(); // records 0..5
        }
        drop(store);
    }
    {
        let store = open_with(dir.path(), &clock, 4 << 20);
        // A tool settles the records (deletes [0, 5)).
        assert!(inspect::partition_meta(&store, &p).unwrap().is_some());
        store.assign(&p).unwrap(); // finds no record: numbers from 0
        assert!(store.unmark(&p, &key(0)).unwrap()); // record 0 again
        store.mark(&p, b"new").unwrap(); // record 1
        drop(store);
    }
    let store = open_with(dir.path(), &clock, 4 << 20);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, &key(0)).unwrap(), Verdict::New);
    for i in 1..5 {
        assert_eq!(store.check(&p, &key(i)).unwrap(), Verdict::Duplicate);
    }
    assert_eq!(store.check(&p, b"new").unwrap(), Verdict::Duplicate);
    store.mark(&p, b"newer").unwrap();
    store.close().unwrap();
    let store = open_with(dir.path(), &clock, 1);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, &key(0)).unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"newer").unwrap(), Verdict::Duplicate);
}

/// The index of a partition stays within about two tables' worth of
/// changes (docs/design.md, "Back-pressure"), even while the background
/// thread is busy with another partition's large table and has not frozen
/// this one's yet. Observed through the stats' `pending_changes`.
#[test]

fn the_index_stays_within_two_tables_while_the_flusher_is_busy_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (p, busy) = (orders(0), orders(1));
    // About 40 marks of 10-byte keys per table.
    let store = open_with(dir.path(), &clock, 1_000);
    store.assign(&p).unwrap();
    store.assign(&busy).unwrap();
    let mut batch = store.batch(&busy).unwrap();
    for i in 0..300_000 {
        batch.mark(&key(i)).unwrap();
    }
    batch.commit().unwrap();
    let mut most = 0;
    for b in 0..100u64 {
        let mut batch = store.batch(&p).unwrap();
        for j in 0..20 {
            batch.mark(format!("b{b:04}-{j:03}").as_bytes()).unwrap();
        }
        batch.commit().unwrap();
        most = most.max(store.stats().partitions[&p].pending_changes);
    }
    // About two tables (80 marks) and a batch: far below the 2 000 marks
    // committed.
    assert!(most <= 140, "the index reached {most} changes");
    assert!(most >= 20, "the index held the batches: {most}");
}

/// A reader who sees a batch's offset sees its marks: the changes go to the
/// index before the commit publishes the offset (and the epoch, claims and
/// sources), so no reader finds the offset of a batch whose key is still
/// `New` to it.
#[test]
fn a_batchs_offset_is_never_visible_before_its_marks() {
    watched("offset before marks", || {
        let (_dir, _clock, store, p) = assigned_store(4 << 20);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, stop, p) = (store.clone(), stop.clone(), p.clone());
            thread::spawn(move || {
                let mut checked = 0u64;
                // At least one round after the writer is done, however late
                // a loaded machine schedules this thread.
                loop {
                    let finished = stop.load(Ordering::Acquire);
                    let Some(offset) = store.committed_offset(&p).unwrap() else {
                        continue;
                    };
                    // Batch `offset - 1` marked key `offset - 1`.
                    let k = key(u64::try_from(offset - 1).unwrap());
                    assert_eq!(
                        store.check(&p, &k).unwrap(),
                        Verdict::Duplicate,
                        "offset {offset} is visible, its batch's mark is not"
                    );
                    checked += 1;
                    if finished {
                        break;
                    }
                }
                checked
            })
        };
        for i in 0..3_000u64 {
            let mut batch = store.batch(&p).unwrap();
            batch.mark(&key(i)).unwrap();
            batch.set_offset(i64::try_from(i + 1).unwrap());
            batch.commit().unwrap();
        }
        stop.store(true, Ordering::Release);
        assert!(reader.join().unwrap() > 0, "the reader saw offsets");
    });
}
