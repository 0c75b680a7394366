//! Races between `assign`, `assign_with_epoch`, `revoke`, `delete_partition`,
//! batches (fenced and not), claims and single-key calls.
//!
//! First one test per race the review found, then a seeded stress test that
//! runs random interleavings of all of them from several threads and checks
//! the store's promises after every step and at the end. Every test runs
//! under a watchdog: a hang fails it instead of stalling the suite.
//!
//! The stress test's seed, rounds and length can be set for long runs:
//! `EXACTLY_STRESS_SEED`, `EXACTLY_STRESS_ROUNDS`, `EXACTLY_STRESS_SECONDS`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{open, options, orders};
use exactly::{Claim, Error, ManualClock, Partition, Store, Verdict};

/// A test fails, rather than hangs, if its threads are not done by then.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `body` under the watchdog.
fn watched<F: FnOnce() + Send + 'static>(what: &str, body: F) {
    common::watched(what, WATCHDOG, body);
}

/// A store to share between threads, in a fresh directory, and the
/// partition the race is about.
fn shared_store() -> (tempfile::TempDir, Arc<Store>, Partition) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = open(dir.path());
    (dir, Arc::new(store), orders(0))
}

/// Two `assign_with_epoch` calls racing while a batch holds the write lock:
/// the higher epoch wins (the lower one is refused when it comes second),
/// and a writer fenced at the lower epoch can no longer write.
#[test]
fn racing_epochs_never_go_backwards() {
    watched("racing epochs", || {
        let (dir, store, p) = shared_store();
        store.assign_with_epoch(&p, 1).unwrap();
        for round in 0..20u64 {
            let (high, low) = (10 * round + 11, 10 * round + 6);
            let holder = store.batch(&p).unwrap();
            let start = Arc::new(Barrier::new(3));
            let calls: Vec<_> = [high, low]
                .into_iter()
                .map(|epoch| {
                    let (store, p, start) = (store.clone(), p.clone(), start.clone());
                    thread::spawn(move || {
                        start.wait();
                        (epoch, store.assign_with_epoch(&p, epoch))
                    })
                })
                .collect();
            start.wait();
            // Both calls reach the write lock the batch holds.
            thread::sleep(Duration::from_millis(20));
            holder.commit().unwrap();
            let results: HashMap<u64, Result<(), Error>> =
                calls.into_iter().map(|c| c.join().unwrap()).collect();
            assert!(results[&high].is_ok(), "{results:?}");
            // The lower one either came first (and the higher one then moved
            // the partition on) or is refused; never does it win.
            let refused = matches!(
                results[&low],
                Err(Error::Fenced { current, attempted, .. }) if current == high && attempted == low
            );
            assert!(
                results[&low].is_ok() || refused,
                "round {round}: {results:?}"
            );
            assert_eq!(store.epoch(&p).unwrap(), high, "round {round}: {results:?}");
            // The zombie fenced at the lower epoch cannot write.
            let mut zombie = store.batch(&p).unwrap();
            zombie.fence(low);
            zombie.mark(b"zombie").unwrap();
            assert!(matches!(zombie.commit(), Err(Error::Fenced { .. })));
        }
        // And on disk.
        let store = Arc::into_inner(store).unwrap();
        store.close().unwrap();
        let (store, _clock) = open(dir.path());
        store.assign(&p).unwrap();
        assert_eq!(store.epoch(&p).unwrap(), 201);
    });
}

/// `assign_with_epoch` on a partition that other threads keep revoking and
/// assigning: nothing hangs, and the epoch never goes backwards.
#[test]
fn assign_with_epoch_racing_revoke_does_not_deadlock() {
    watched("assign_with_epoch against revoke", || {
        let (_dir, store, p) = shared_store();
        store.assign(&p).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let revokers: Vec<_> = (0..2)
            .map(|_| {
                let (store, p, stop) = (store.clone(), p.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match store.revoke(&p) {
                            Ok(()) | Err(Error::NotAssigned(_)) => {}
                            Err(e) => panic!("revoke: {e}"),
                        }
                        store.assign(&p).unwrap();
                        // A batch holding the write lock while others revoke.
                        if let Ok(mut b) = store.batch(&p) {
                            b.mark(b"k").unwrap();
                            match b.commit() {
                                Ok(()) | Err(Error::Fenced { .. }) => {}
                                Err(e) => panic!("commit: {e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        let mut last = 0;
        for epoch in 1..=300 {
            store.assign_with_epoch(&p, epoch).unwrap();
            // Revoked meanwhile is fine; assigned, it is at `epoch` or later.
            if let Ok(now) = store.epoch(&p) {
                assert!(now >= epoch && now >= last, "epoch {now} after {epoch}");
                last = now;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in revokers {
            r.join().unwrap();
        }
        store.assign(&p).unwrap();
        assert_eq!(store.epoch(&p).unwrap(), 300);
    });
}

/// `delete_partition` racing `assign`: an assigned partition always has its
/// data, so it is writable, and `assign` never leaves it otherwise.
#[test]
fn delete_racing_assign_never_leaves_a_shard_without_data() {
    watched("delete_partition against assign", || {
        let (_dir, store, p) = shared_store();
        for round in 0..200 {
            store.assign(&p).unwrap();
            store.mark(&p, b"k").unwrap();
            let start = Arc::new(Barrier::new(2));
            let deleter = {
                let (store, p, start) = (store.clone(), p.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    store.delete_partition(&p).unwrap();
                })
            };
            start.wait();
            // Assign again and again while the delete runs, so that some
            // assign lands between its revoke and its removal of the data.
            while !deleter.is_finished() {
                store.assign(&p).unwrap();
            }
            deleter.join().unwrap();
            // Whichever came first, the partition is assigned or not, and an
            // assigned one is writable.
            if store.assigned().contains(&p) {
                store
                    .mark(&p, b"after")
                    .unwrap_or_else(|e| panic!("round {round}: assigned but {e}"));
            }
            store.assign(&p).unwrap();
            store
                .mark(&p, b"again")
                .unwrap_or_else(|e| panic!("round {round}: assigned again but {e}"));
        }
    });
}

/// A small deterministic generator (splitmix64), so that a seed replays the
/// same choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A number from the environment, decimal or `0x` hexadecimal (as the
/// seeds are printed). A value that does not parse fails the test rather
/// than running with the default.
fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// Partitions whose epochs, offsets and marks are checked strictly; the
/// last one is also deleted now and then, which resets all three.
const STABLE: i32 = 2;
const PARTITIONS: i32 = STABLE + 1;
const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 150;
const KEYS: u64 = 24;

/// What the threads of one stress round agree on.
struct Shared {
    store: Store,
    /// Per stable partition: the highest epoch an `assign_with_epoch` was
    /// acknowledged with. The partition's epoch, read after, is never lower.
    epoch_floor: Vec<AtomicU64>,
    /// Per stable partition: the highest offset a batch was acknowledged
    /// with.
    offset_floor: Vec<AtomicU64>,
    /// Per (stable partition, key): the verdicts of acknowledged
    /// `check_and_mark` calls, and whether the key was acknowledged marked.
    verdicts: Mutex<HashMap<(i32, u64), Vec<Verdict>>>,
    /// Per (stable partition, claim key): claims acquired and confirmed.
    claims: Mutex<HashMap<(i32, u64), (u32, u32)>>,
}

impl Shared {
    fn floor(&self, p: i32) -> u64 {
        self.epoch_floor[p as usize].load(Ordering::SeqCst)
    }

    /// Reads the partition's epoch and offset and checks them against what
    /// was acknowledged before the read.
    fn check_floors(&self, p: &Partition, step: &str) {
        let i = p.partition();
        if i >= STABLE {
            return;
        }
        let epoch_floor = self.floor(i);
        let offset_floor = self.offset_floor[i as usize].load(Ordering::SeqCst);
        match self.store.epoch(p) {
            Ok(e) => assert!(e >= epoch_floor, "{step}: {p} at epoch {e} < {epoch_floor}"),
            Err(Error::NotAssigned(_)) => {}
            Err(e) => panic!("{step}: epoch of {p}: {e}"),
        }
        if offset_floor > 0 {
            match self.store.committed_offset(p) {
                Ok(o) => assert!(
                    o.is_some_and(|o| o as u64 >= offset_floor),
                    "{step}: {p} at offset {o:?} < {offset_floor}"
                ),
                Err(Error::NotAssigned(_)) => {}
                Err(e) => panic!("{step}: offset of {p}: {e}"),
            }
        }
    }

    fn acknowledge(&self, p: i32, key: u64, verdict: Verdict) {
        if p < STABLE {
            let mut v = self.verdicts.lock().unwrap();
            v.entry((p, key)).or_default().push(verdict);
        }
    }
}

fn key(k: u64) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn claim_key(k: u64) -> Vec<u8> {
    format!("claim-{k}").into_bytes()
}

/// A key no operation ever marks.
fn never_marked(k: u64) -> Vec<u8> {
    format!("never-{k}").into_bytes()
}

/// One worker's random walk through the store's operations.
fn worker(shared: &Shared, seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let store = &shared.store;
    for op in 0..ops {
        let pi = rng.below(PARTITIONS as u64) as i32;
        let p = orders(pi);
        let step = format!("seed {seed:#x} op {op}");
        match rng.below(100) {
            0..=9 => match store.assign(&p) {
                Ok(()) => {}
                Err(e) => panic!("{step}: assign: {e}"),
            },
            10..=19 => {
                // Around the current floor: some go forward, some are stale.
                let floor = if pi < STABLE { shared.floor(pi) } else { 0 };
                let epoch = (floor + rng.below(4)).saturating_sub(1);
                match store.assign_with_epoch(&p, epoch) {
                    Ok(()) => {
                        if pi < STABLE {
                            shared.epoch_floor[pi as usize].fetch_max(epoch, Ordering::SeqCst);
                        }
                    }
                    Err(Error::Fenced {
                        current, attempted, ..
                    }) => assert!(
                        current > attempted,
                        "{step}: fenced {attempted} at {current}"
                    ),
                    Err(e) => panic!("{step}: assign_with_epoch: {e}"),
                }
            }
            20..=27 => match store.revoke(&p) {
                Ok(()) | Err(Error::NotAssigned(_)) => {}
                Err(e) => panic!("{step}: revoke: {e}"),
            },
            28..=30 if pi >= STABLE => {
                store
                    .delete_partition(&p)
                    .unwrap_or_else(|e| panic!("{step}: delete: {e}"));
            }
            31..=60 => batch(shared, &mut rng, &p, &step),
            61..=75 => {
                let k = rng.below(KEYS);
                match store.check_and_mark(&p, &key(k)) {
                    Ok(v) => shared.acknowledge(pi, k, v),
                    Err(Error::NotAssigned(_)) => {}
                    Err(e) => panic!("{step}: check_and_mark: {e}"),
                }
            }
            76..=85 => {
                let k = rng.below(KEYS);
                match store.check(&p, &never_marked(k)) {
                    Ok(v) => assert_eq!(v, Verdict::New, "{step}: a key never marked"),
                    Err(Error::NotAssigned(_)) => {}
                    Err(e) => panic!("{step}: check: {e}"),
                }
            }
            _ => claim(shared, &mut rng, &p, &step),
        }
        shared.check_floors(&p, &step);
    }
}

/// A batch of check-and-marks and an offset, fenced at a recent epoch half
/// of the time.
fn batch(shared: &Shared, rng: &mut Rng, p: &Partition, step: &str) {
    let pi = p.partition();
    let store = &shared.store;
    let floor_before = if pi < STABLE { shared.floor(pi) } else { 0 };
    let mut batch = match store.batch(p) {
        Ok(b) => b,
        Err(Error::NotAssigned(_)) => return,
        Err(e) => panic!("{step}: batch: {e}"),
    };
    let fence = (rng.below(2) == 0).then(|| floor_before.saturating_sub(rng.below(2)));
    if let Some(f) = fence {
        batch.fence(f);
    }
    let mut staged = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let k = rng.below(KEYS);
        let v = batch
            .check_and_mark(&key(k))
            .unwrap_or_else(|e| panic!("{step}: batch check_and_mark: {e}"));
        staged.push((k, v));
    }
    // Offsets only go forward: one past the committed offset.
    let committed = store
        .committed_offset(p)
        .unwrap_or_else(|e| panic!("{step}: offset: {e}"))
        .unwrap_or(0);
    let offset = committed + 1 + rng.below(3) as i64;
    batch.set_offset(offset);
    match batch.commit() {
        Ok(()) => {
            if let Some(f) = fence {
                // A zombie fenced below an epoch acknowledged before its batch
                // opened must not write.
                assert!(
                    f >= floor_before,
                    "{step}: fenced at {f} under {floor_before}"
                );
            }
            for (k, v) in staged {
                shared.acknowledge(pi, k, v);
            }
            if pi < STABLE {
                shared.offset_floor[pi as usize].fetch_max(offset as u64, Ordering::SeqCst);
            }
        }
        Err(Error::Fenced {
            current, attempted, ..
        }) => assert!(
            current > attempted,
            "{step}: fenced {attempted} at {current}"
        ),
        Err(e) => panic!("{step}: commit: {e}"),
    }
}

/// Claims a key with a lease longer than the test and confirms it.
fn claim(shared: &Shared, rng: &mut Rng, p: &Partition, step: &str) {
    let pi = p.partition();
    let k = rng.below(KEYS);
    let token = match shared
        .store
        .claim(p, &claim_key(k), Duration::from_secs(3600))
    {
        Ok(Claim::Acquired(token)) => token,
        Ok(_) | Err(Error::NotAssigned(_)) => return,
        Err(e) => panic!("{step}: claim: {e}"),
    };
    let confirmed = match shared.store.confirm(&token) {
        Ok(()) => true,
        Err(Error::NotAssigned(_) | Error::Fenced { .. }) => false,
        Err(e) => panic!("{step}: confirm: {e}"),
    };
    if pi < STABLE {
        let mut claims = shared.claims.lock().unwrap();
        let entry = claims.entry((pi, k)).or_default();
        entry.0 += 1;
        entry.1 += u32::from(confirmed);
    }
}

/// Checks what a stress round acknowledged, on a quiet store.
fn check_round(shared: &Shared, seed: u64) {
    let store = &shared.store;
    for pi in 0..PARTITIONS {
        let p = orders(pi);
        store.assign(&p).unwrap();
        // Assigned means writable.
        let mut b = store
            .batch(&p)
            .unwrap_or_else(|e| panic!("seed {seed:#x}: {p} assigned: {e}"));
        b.mark(b"final").unwrap();
        b.commit()
            .unwrap_or_else(|e| panic!("seed {seed:#x}: {p} assigned but not writable: {e}"));
        shared.check_floors(&p, &format!("seed {seed:#x} end"));
    }
    for ((pi, k), verdicts) in shared.verdicts.lock().unwrap().iter() {
        let news = verdicts.iter().filter(|v| **v == Verdict::New).count();
        // Claims and marks use different keys, and nothing unmarks or
        // expires: of all acknowledged check-and-marks of a key, exactly one
        // saw it new.
        assert_eq!(news, 1, "seed {seed:#x}: {pi}/{k}: {verdicts:?}");
        assert_eq!(
            store.check(&orders(*pi), &key(*k)).unwrap(),
            Verdict::Duplicate,
            "seed {seed:#x}: {pi}/{k} acknowledged, then lost"
        );
    }
    for ((pi, k), (acquired, confirmed)) in shared.claims.lock().unwrap().iter() {
        // A lease longer than the test, never released: one holder at most.
        assert_eq!(
            *acquired, 1,
            "seed {seed:#x}: claim {pi}/{k} acquired twice"
        );
        if *confirmed == 1 {
            assert!(matches!(
                store.claim(&orders(*pi), &claim_key(*k), Duration::from_secs(1)),
                Ok(Claim::Done)
            ));
        }
    }
}

fn stress_round(dir: &std::path::Path, clock: &ManualClock, seed: u64) {
    let store = Store::open(dir, options(clock)).unwrap();
    let shared = Arc::new(Shared {
        store,
        epoch_floor: (0..STABLE).map(|_| AtomicU64::new(0)).collect(),
        offset_floor: (0..STABLE).map(|_| AtomicU64::new(0)).collect(),
        verdicts: Mutex::default(),
        claims: Mutex::default(),
    });
    // Epochs and offsets persist across rounds: start from what is there.
    for pi in 0..STABLE {
        let p = orders(pi);
        shared.store.assign(&p).unwrap();
        let e = shared.store.epoch(&p).unwrap();
        shared.epoch_floor[pi as usize].store(e, Ordering::SeqCst);
        let o = shared.store.committed_offset(&p).unwrap().unwrap_or(0);
        shared.offset_floor[pi as usize].store(o as u64, Ordering::SeqCst);
    }
    let workers: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let shared = shared.clone();
            thread::spawn(move || worker(&shared, seed ^ (t << 48), OPS_PER_THREAD))
        })
        .collect();
    for w in workers {
        if let Err(panic) = w.join() {
            std::panic::resume_unwind(panic);
        }
    }
    check_round(&shared, seed);
    // Every acknowledged mark is still there after a reopen.
    let shared = Arc::into_inner(shared).expect("workers are done");
    let verdicts = shared.verdicts.into_inner().unwrap();
    shared.store.close().unwrap();
    let store = Store::open(dir, options(clock)).unwrap();
    for (pi, k) in verdicts.keys() {
        let p = orders(*pi);
        store.assign(&p).unwrap();
        assert_eq!(
            store.check(&p, &key(*k)).unwrap(),
            Verdict::Duplicate,
            "seed {seed:#x}: {pi}/{k} lost on reopen"
        );
    }
    store.close().unwrap();
}

/// Random interleavings from several threads, a fresh store per round (the
/// keys' verdicts are per round), each round's seed derived from the
/// test's; each round under the watchdog.
#[test]
fn random_interleavings_keep_every_promise() {
    let seed = env_u64("EXACTLY_STRESS_SEED").unwrap_or(0x5EED_0010);
    let rounds = env_u64("EXACTLY_STRESS_ROUNDS").unwrap_or(12);
    let seconds = env_u64("EXACTLY_STRESS_SECONDS");
    let started = Instant::now();
    let mut round = 0u64;
    loop {
        let done = match seconds {
            Some(s) => started.elapsed() >= Duration::from_secs(s),
            None => round >= rounds,
        };
        if done {
            break;
        }
        let round_seed = Rng(seed ^ round).next();
        watched(
            &format!("stress round {round} (seed {round_seed:#x})"),
            move || {
                let dir = tempfile::tempdir().unwrap();
                let clock = ManualClock::new(common::T0);
                stress_round(dir.path(), &clock, round_seed);
            },
        );
        round += 1;
    }
    eprintln!(
        "stress: {round} rounds of {THREADS} threads x {OPS_PER_THREAD} ops in {:?} (seed {seed:#x})",
        started.elapsed()
    );
}
