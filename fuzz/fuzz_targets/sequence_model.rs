//! Sequence mode against an in-memory model.
//!
//! The fuzzer picks a sequence of store operations over two partitions,
//! three sources, epochs 0 to 3 and a small range of sequence numbers (with
//! a few further up, so that the window moves by more than a word, and a
//! few near `u64::MAX`), with clock steps forward and back, compactions,
//! clean reopens and crashes. Every answer is checked against a model of
//! the rules (`docs/design.md`, Sequence mode):
//!
//! * against a live source of the same epoch, a number above the highest
//!   marked is `New`; one within the window, `New` exactly when it was
//!   never marked; one below it, `Duplicate`;
//! * a newer epoch is `New` and starts the numbering afresh once marked; an
//!   older one is `Error::SourceFenced` (with the source's epoch) and writes
//!   nothing;
//! * a source that marked nothing for `source_idle` (partition time) is
//!   forgotten: its numbers are `New`; a mark moves its expiry to
//!   `source_idle` from then, never back;
//! * a bad source (empty, longer than `max_key_len`) gives its typed error
//!   and changes nothing, assigned partition or not.
//!
//! Batches mix sequence checks and marks with key marks (the sources' names
//! are keys too: the two never meet) and an offset, and are committed or
//! dropped; the clock moves while a batch is open, and the store is asked
//! from the batch's own thread (a read sees only what was committed, a
//! write is refused).
//!
//! A clean reopen closes the store and opens it again; a crash copies the
//! store directory while the store is still open (every acknowledged write
//! is in the page cache), abandons the open store and opens the copy.
//! Either may change `sequence_window` (a state keeps the window it was
//! written with until its next mark; numbers below the old window stay
//! duplicates whatever the new one), `source_idle` (a source keeps the
//! expiry it was given) and the TTL, and may first try options that must be
//! refused. Across either, the clock may step back: a restarted store's time
//! starts at the later of the clock and the time its ledger recorded, so
//! the model's time does too, and sources that were idle past their expiry
//! in memory after that time are live again (the compaction filter never
//! judges past the recorded time).
//!
//! After every step, every assigned partition answers like the model for
//! every source: at the source's epoch for every number the run used (and
//! its neighbours, the small ones, and the window's edges), at the other
//! epochs for a few: nothing acknowledged (a commit that returned `Ok`) and
//! still live is `New`, nothing never marked inside a live window is
//! `Duplicate`, and older epochs are fenced. At the end, every partition is
//! compared again, before and after a compaction.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use exactly::{Clock, Durability, Error, ManualClock, Options, Store, Verdict};
use exactly_fuzz::sequence_input::*;
use exactly_fuzz::sequence_model::{Model, Seen};
use exactly_fuzz::{copy_dir, recorded_time, Dirs};
use libfuzzer_sys::fuzz_target;

/// The error a bad source or key must give, if it is bad.
fn bad_error(good: bool, empty: bool) -> Option<fn(&Error) -> bool> {
    if good {
        None
    } else if empty {
        Some(|e| matches!(e, Error::EmptyKey))
    } else {
        Some(|e| matches!(e, Error::KeyTooLong { .. }))
    }
}

fn src_error(s: Src) -> Option<fn(&Error) -> bool> {
    bad_error(matches!(s, Src::Good(_)), matches!(s, Src::Empty))
}

fn key_error(k: Key) -> Option<fn(&Error) -> bool> {
    bad_error(matches!(k, Key::Good(_)), matches!(k, Key::Empty))
}

fn expect_err<T: std::fmt::Debug>(r: exactly::Result<T>, ok: fn(&Error) -> bool, what: &str) {
    match r {
        Err(ref e) if ok(e) => {}
        other => panic!("{what}: expected a typed error, got {other:?}"),
    }
}

fn not_assigned(e: &Error) -> bool {
    matches!(e, Error::NotAssigned(_))
}

/// Compares an answer with the model's: `r` is `None` for a call that
/// answers no verdict (`mark_sequence`).
fn expect_seen(
    r: exactly::Result<Option<Verdict>>,
    want: Seen,
    p: u8,
    s: u8,
    epoch: u64,
    seq: u64,
    what: &str,
) {
    match want {
        Ok(dup) => {
            let want = if dup {
                Verdict::Duplicate
            } else {
                Verdict::New
            };
            match r {
                Ok(None) => {}
                Ok(Some(v)) => assert_eq!(
                    v, want,
                    "{what}: partition {p} source {s} epoch {epoch} number {seq}"
                ),
                Err(e) => panic!(
                    "{what}: partition {p} source {s} epoch {epoch} number {seq}: \
                     expected {want:?}, got {e:?}"
                ),
            }
        }
        Err(current) => match r {
            Err(Error::SourceFenced {
                partition,
                source_id,
                current: c,
                attempted,
            }) if c == current
                && attempted == epoch
                && partition == part(p)
                && source_id == source_bytes(Src::Good(s)) => {}
            other => panic!(
                "{what}: partition {p} source {s} epoch {epoch} number {seq}: \
                 expected fenced at {current}, got {other:?}"
            ),
        },
    }
}

fn options(clock: &ManualClock, o: Opened) -> Options {
    let mut opts = Options::default()
        .ttl(Duration::from_millis(o.ttl))
        .sequence_window(o.window)
        .expected_keys_per_partition(8)
        .durability(if o.sync {
            Durability::Sync
        } else {
            Durability::Buffered
        })
        .max_key_len(MAX_KEY_LEN)
        .clock(clock.clone());
    if let Some(idle) = o.idle {
        opts = opts.source_idle(Duration::from_millis(idle));
    }
    opts
}

fn open(path: &Path, clock: &ManualClock, o: Opened) -> Store {
    Store::open(path, options(clock, o)).expect("open")
}

/// Asks partition `p` about every source, at its epoch for every probe and
/// at the other epochs for a few numbers, and compares with the model.
fn compare(s: &Store, m: &Model, p: u8, what: &str) {
    for src in 0..SOURCES {
        let source = source_bytes(Src::Good(src));
        let probes = m.probes(p, src);
        let current = m.live(p, src).map_or(0, |x| x.epoch);
        for e in 0..u64::from(EPOCHS) {
            // Every probe at the source's epoch; a few at the others.
            let few = [0, SMALL - 1, u64::MAX];
            let numbers: Box<dyn Iterator<Item = u64>> = if e == current {
                Box::new(probes.iter().copied())
            } else {
                Box::new(few.into_iter())
            };
            for n in numbers {
                let r = s.check_sequence(&part(p), &source, e, n).map(Some);
                expect_seen(r, m.seen(p, src, e, n), p, src, e, n, what);
            }
        }
    }
}

fn run(input: Input) {
    let start = input.start.millis();
    let clock = ManualClock::new(start);
    let mut dirs = Dirs {
        root: tempfile::tempdir().expect("tempdir"),
        generation: 0,
    };
    let mut opened = Opened {
        ttl: input.ttl.millis(),
        idle: input.idle.millis(),
        window: input.window.size(),
        sync: false,
    };
    let mut store = Some(open(&dirs.current(), &clock, opened));
    let mut m = Model {
        now: start,
        ttl: opened.ttl,
        idle: opened.idle(),
        window: opened.window,
        sources: BTreeMap::new(),
        marks: BTreeMap::new(),
        offsets: BTreeMap::new(),
        assigned: BTreeSet::new(),
        used: BTreeSet::new(),
    };
    let mut reopens = 0;
    for (step, op) in input.ops.into_iter().take(MAX_OPS).enumerate() {
        let s = store.as_ref().expect("store");
        'op: {
            match op {
                Op::Assign(p) => {
                    let p = p % PARTITIONS;
                    s.assign(&part(p)).expect("assign");
                    m.assigned.insert(p);
                }
                Op::Revoke(p) => {
                    let p = p % PARTITIONS;
                    let r = s.revoke(&part(p));
                    if m.assigned.remove(&p) {
                        r.expect("revoke");
                    } else {
                        expect_err(r, not_assigned, "revoke unassigned");
                    }
                }
                Op::Delete(p) => {
                    let p = p % PARTITIONS;
                    s.delete_partition(&part(p)).expect("delete");
                    m.assigned.remove(&p);
                    m.sources.retain(|&(q, _), _| q != p);
                    m.marks.retain(|&(q, _), _| q != p);
                    m.offsets.remove(&p);
                }
                Op::Check(p, n) | Op::CheckAndMark(p, n) | Op::Mark(p, n) => {
                    let p = p % PARTITIONS;
                    let (epoch, seq) = (n.epoch(), n.num.value());
                    m.used.insert(seq);
                    let source = source_bytes(n.src);
                    let r = match op {
                        Op::Check(..) => s.check_sequence(&part(p), &source, epoch, seq).map(Some),
                        Op::CheckAndMark(..) => s
                            .check_and_mark_sequence(&part(p), &source, epoch, seq)
                            .map(Some),
                        _ => s
                            .mark_sequence(&part(p), &source, epoch, seq)
                            .map(|()| None),
                    };
                    if let Some(e) = src_error(n.src) {
                        expect_err(r, e, "sequence call with a bad source");
                        break 'op;
                    }
                    let Src::Good(src) = n.src else { break 'op };
                    let src = src % SOURCES;
                    if !m.assigned.contains(&p) {
                        expect_err(r, not_assigned, "sequence call unassigned");
                        break 'op;
                    }
                    let want = m.seen(p, src, epoch, seq);
                    expect_seen(r, want, p, src, epoch, seq, "store sequence call");
                    if want == Ok(false) && !matches!(op, Op::Check(..)) {
                        m.mark(p, src, epoch, seq);
                    }
                }
                Op::CheckKey(p, k) | Op::MarkKey(p, k) => {
                    let p = p % PARTITIONS;
                    let check = matches!(op, Op::CheckKey(..));
                    let r = if check {
                        s.check(&part(p), &key_bytes(k))
                    } else {
                        s.check_and_mark(&part(p), &key_bytes(k))
                    };
                    if let Some(e) = key_error(k) {
                        expect_err(r, e, "key call with a bad key");
                        break 'op;
                    }
                    let Key::Good(k) = k else { break 'op };
                    let k = k % KEYS;
                    if !m.assigned.contains(&p) {
                        expect_err(r, not_assigned, "key call unassigned");
                        break 'op;
                    }
                    let expected = m.key_verdict(p, k);
                    assert_eq!(r.expect("key call"), expected, "key {p} {k}");
                    if !check && expected == Verdict::New {
                        m.marks.insert((p, k), m.key_expiry());
                    }
                }
                Op::Batch {
                    p,
                    ops,
                    offset,
                    commit,
                } => {
                    let p = p % PARTITIONS;
                    let b = s.batch(&part(p));
                    if !m.assigned.contains(&p) {
                        expect_err(b, not_assigned, "batch unassigned");
                        break 'op;
                    }
                    let mut b = b.expect("batch");
                    // The model as the batch sees it; its key marks apart, as
                    // they count for the batch whatever the clock does.
                    let mut staged = m.clone();
                    let mut staged_keys = BTreeMap::new();
                    // Sources the batch marked: they count for the rest of
                    // the batch whatever the clock does, as its keys do.
                    let mut staged_sources = BTreeSet::new();
                    for bop in ops.into_iter().take(MAX_BATCH_OPS) {
                        match bop {
                            BatchOp::Check(n)
                            | BatchOp::CheckAndMark(n)
                            | BatchOp::Mark(n)
                            | BatchOp::StoreCheck(n) => {
                                let (epoch, seq) = (n.epoch(), n.num.value());
                                staged.used.insert(seq);
                                let source = source_bytes(n.src);
                                let r = match bop {
                                    BatchOp::Check(_) => {
                                        b.check_sequence(&source, epoch, seq).map(Some)
                                    }
                                    BatchOp::CheckAndMark(_) => {
                                        b.check_and_mark_sequence(&source, epoch, seq).map(Some)
                                    }
                                    BatchOp::Mark(_) => {
                                        b.mark_sequence(&source, epoch, seq).map(|()| None)
                                    }
                                    _ => s.check_sequence(&part(p), &source, epoch, seq).map(Some),
                                };
                                if let Some(e) = src_error(n.src) {
                                    expect_err(r, e, "batch sequence call with a bad source");
                                    continue;
                                }
                                let Src::Good(src) = n.src else { continue };
                                let src = src % SOURCES;
                                if let BatchOp::StoreCheck(_) = bop {
                                    // The committed state, at the current time.
                                    let want = m.seen(p, src, epoch, seq);
                                    expect_seen(
                                        r,
                                        want,
                                        p,
                                        src,
                                        epoch,
                                        seq,
                                        "store check in batch",
                                    );
                                    continue;
                                }
                                let own = staged_sources.contains(&src);
                                let want = staged.seen_in_batch(p, src, epoch, seq, own);
                                expect_seen(r, want, p, src, epoch, seq, "batch sequence call");
                                if want == Ok(false) && !matches!(bop, BatchOp::Check(_)) {
                                    staged.mark_in_batch(p, src, epoch, seq, own);
                                    staged_sources.insert(src);
                                }
                            }
                            BatchOp::StoreMark(n) => {
                                let source = source_bytes(n.src);
                                let (epoch, seq) = (n.epoch(), n.num.value());
                                let r = s.check_and_mark_sequence(&part(p), &source, epoch, seq);
                                if let Some(e) = src_error(n.src) {
                                    expect_err(r, e, "mark with a bad source");
                                } else {
                                    expect_err(
                                        r,
                                        |e| matches!(e, Error::BatchInProgress(_)),
                                        "sequence write during own batch",
                                    );
                                }
                            }
                            BatchOp::MarkKey(key) => {
                                let r = b.check_and_mark(&key_bytes(key));
                                if let Some(e) = key_error(key) {
                                    expect_err(r, e, "batch key mark with a bad key");
                                    continue;
                                }
                                let Key::Good(k) = key else { continue };
                                let k = k % KEYS;
                                let expected =
                                    if staged_keys.contains_key(&k) || staged.key_live(p, k) {
                                        Verdict::Duplicate
                                    } else {
                                        staged_keys.insert(k, staged.key_expiry());
                                        Verdict::New
                                    };
                                assert_eq!(
                                    r.expect("batch check_and_mark"),
                                    expected,
                                    "batch key {p} {k}"
                                );
                            }
                            BatchOp::Advance(ms) => {
                                clock.advance(Duration::from_millis(u64::from(ms % 1_500)));
                                // The store's time is the highest it has read:
                                // a read here makes it the model's, even if the
                                // clock steps back before the batch's next call
                                // (outside a batch, the checks after each step
                                // read it).
                                b.check_sequence(b"clock", 0, 0)
                                    .expect("a read of the time");
                                staged.now = staged.now.max(clock.now_millis());
                                m.now = staged.now;
                            }
                            BatchOp::StepBack(ms) => {
                                clock.set(clock.now_millis().saturating_sub(u64::from(ms % 3_000)));
                            }
                        }
                    }
                    m.now = staged.now;
                    m.used = staged.used.clone();
                    let current = m.offsets.get(&p).copied();
                    let offset = match offset {
                        OffsetChoice::None => None,
                        OffsetChoice::Delta(d) => Some(current.unwrap_or(0) + i64::from(d)),
                        OffsetChoice::Absolute(o) => Some(o),
                    };
                    if let Some(o) = offset {
                        b.set_offset(o);
                    }
                    if !commit {
                        drop(b);
                        break 'op;
                    }
                    let r = b.commit();
                    match offset {
                        Some(o) if o < 0 => expect_err(
                            r,
                            |e| matches!(e, Error::InvalidOffset(_)),
                            "negative offset",
                        ),
                        Some(o) if current.is_some_and(|c| o < c) => expect_err(
                            r,
                            |e| matches!(e, Error::OffsetRegression { .. }),
                            "backward offset",
                        ),
                        _ => {
                            r.expect("commit");
                            m.sources = staged.sources;
                            m.marks
                                .extend(staged_keys.into_iter().map(|(k, e)| ((p, k), e)));
                            if let Some(o) = offset {
                                m.offsets.insert(p, o);
                            }
                        }
                    }
                }
                Op::Advance(ms) => {
                    clock.advance(Duration::from_millis(u64::from(ms % 1_500)));
                    m.now = m.now.max(clock.now_millis());
                }
                Op::StepBack(ms) => {
                    clock.set(clock.now_millis().saturating_sub(u64::from(ms % 3_000)));
                }
                Op::Compact(p) => {
                    let p = p % PARTITIONS;
                    let r = s.compact(&part(p));
                    if m.assigned.contains(&p) {
                        r.expect("compact");
                    } else {
                        expect_err(r, not_assigned, "compact unassigned");
                    }
                }
                Op::Sync => s.sync().expect("sync"),
                Op::Stats => {
                    let stats = s.stats();
                    let listed: BTreeSet<_> = stats.partitions.keys().cloned().collect();
                    let expected: BTreeSet<_> = m.assigned.iter().map(|&p| part(p)).collect();
                    assert_eq!(listed, expected, "stats lists the assigned partitions");
                    for (partition, ps) in &stats.partitions {
                        let p = u8::try_from(partition.partition()).expect("small partition");
                        assert_eq!(ps.committed_offset, m.offsets.get(&p).copied());
                        assert!(ps.duplicates <= ps.checks);
                        let live = (0..SOURCES).filter(|&s| m.live(p, s).is_some()).count();
                        assert!(
                            ps.sources >= live as u64,
                            "partition {p} remembers {} sources, {live} live",
                            ps.sources
                        );
                    }
                }
                Op::Reopen(restart) | Op::Crash(restart) => {
                    if reopens == MAX_REOPENS {
                        break 'op;
                    }
                    reopens += 1;
                    let s = store.take().expect("store");
                    if matches!(op, Op::Reopen(_)) {
                        s.close().expect("close");
                    } else {
                        // The files as the OS has them while the process still
                        // runs; then the process state is lost.
                        let from = dirs.current();
                        dirs.generation += 1;
                        copy_dir(&from, &dirs.current()).expect("copy store");
                        drop(s);
                        std::fs::remove_dir_all(&from).expect("remove old store");
                    }
                    clock.set(m.now.saturating_sub(u64::from(restart.back % 3_000)));
                    opened = opened.after(restart);
                    if let Some(refused) = restart.refused {
                        let mut bad = options(&clock, opened);
                        bad = match refused {
                            Refused::WindowZero => bad.sequence_window(0),
                            Refused::WindowTooWide => bad.sequence_window(65_537),
                            Refused::IdleZero => bad.source_idle(Duration::ZERO),
                        };
                        expect_err(
                            Store::open(&dirs.current(), bad),
                            |e| matches!(e, Error::InvalidOptions(_)),
                            "open with refused options",
                        );
                    }
                    m.ttl = opened.ttl;
                    m.idle = opened.idle();
                    m.window = opened.window;
                    // The restarted store's time: never before what its ledger
                    // recorded, whatever the clock says.
                    m.now = clock.now_millis().max(recorded_time(&dirs.current()));
                    store = Some(open(&dirs.current(), &clock, opened));
                    m.assigned.clear();
                    if restart.assign {
                        let s = store.as_ref().expect("store");
                        for p in 0..PARTITIONS {
                            s.assign(&part(p)).expect("assign after restart");
                            m.assigned.insert(p);
                        }
                    }
                }
            }
        }
        // After every step: the assigned partitions, their offsets and
        // every source's numbers agree.
        let s = store.as_ref().expect("store");
        let assigned: Vec<_> = m.assigned.iter().map(|&p| part(p)).collect();
        assert_eq!(s.assigned(), assigned);
        for &p in &m.assigned {
            assert_eq!(
                s.committed_offset(&part(p)).expect("offset"),
                m.offsets.get(&p).copied(),
                "offset of {p}"
            );
            compare(s, &m, p, &format!("after step {step}"));
        }
    }
    // Finally every partition agrees, before and after a compaction (which
    // drops idle sources from disk).
    let s = store.as_ref().expect("store");
    for p in 0..PARTITIONS {
        s.assign(&part(p)).expect("final assign");
        for round in 0..2 {
            compare(s, &m, p, &format!("final (round {round})"));
            for k in 0..KEYS {
                assert_eq!(
                    s.check(&part(p), &key_bytes(Key::Good(k)))
                        .expect("final key check"),
                    m.key_verdict(p, k),
                    "final key {p} {k} (round {round})"
                );
            }
            assert_eq!(
                s.committed_offset(&part(p)).expect("final offset"),
                m.offsets.get(&p).copied()
            );
            s.compact(&part(p)).expect("final compact");
        }
    }
    drop(store);
    drop(dirs);
}

fuzz_target!(|input: Input| {
    run(input);
});
