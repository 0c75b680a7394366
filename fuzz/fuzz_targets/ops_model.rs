//! Operation sequences against an in-memory model.
//!
//! The fuzzer picks a sequence of store operations over two partitions and a
//! tiny key space (so keys collide), with clock steps, compactions, clean
//! reopens and crashes. Every answer is checked against a model that keeps
//! everything acknowledged:
//!
//! * a clean reopen closes the store and opens it again;
//! * a crash copies the store directory while the store is still open (the
//!   files exactly as the operating system has them at that instant: every
//!   acknowledged write is in the page cache), abandons the open store
//!   without closing it, and opens the copy. Nothing acknowledged may be lost.
//!
//! Across either, the clock may step back (a host whose clock was wrong, or
//! a store moved to another host), and the options that may change on
//! reopen change: the TTL (marks keep the expiry they were given; new marks
//! get the new TTL), the filters' sizing and the durability mode. A
//! restarted store's time starts at the time its ledger recorded, so the
//! model's time after a reopen is the later of the clock and that recorded
//! time, read from the ledger file (`docs/design.md`); marks that expired
//! in memory after it are live again, and must be answered so (whatever
//! the filter snapshot saved at revoke or close dropped).
//!
//! Batches may record their changes in the partition's local outbox (as
//! the Kafka changelog loop's do) and stage outgoing records; entries are
//! published (completed) in turns. Every acknowledged entry must be there,
//! intact, after a crash or a reopen; a completed one must never come back
//! (nothing is published twice from the outbox); sequence numbers grow
//! (after a restart, from past the last entry left).
//!
//! Bad inputs (empty or oversize keys, negative or backward offsets, writes
//! during an open batch, unassigned partitions) must give their typed error
//! and change nothing.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use arbitrary::Arbitrary;
use exactly::internals::outbox::{self, Pending};
use exactly::internals::tables;
use exactly::{
    Clock, Durability, Error, ManualClock, Options, OutboxRecord, Partition, Store, Verdict,
};
use exactly_fuzz::{copy_dir, recorded_time, Dirs};
use libfuzzer_sys::fuzz_target;

const PARTITIONS: u8 = 2;
const KEYS: u8 = 5;
const MAX_KEY_LEN: usize = 8;
const MAX_OPS: usize = 48;
const MAX_REOPENS: usize = 4;

/// A key: one of a tiny set, or a bad one.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Key {
    Good(u8),
    Empty,
    TooLong,
}

#[derive(Debug, Arbitrary)]
enum BatchOp {
    CheckAndMark(Key),
    Mark(Key),
    /// A read through the store while the batch is open: it does not see
    /// the batch's staged marks.
    StoreCheck(Key),
    /// A write through the store on the batch's partition from the thread
    /// that holds the batch: refused, never a deadlock.
    StoreMark(Key),
    /// The clock moves while the batch is open: staged marks keep the expiry
    /// they got when staged.
    Advance(u16),
}

#[derive(Debug, Arbitrary)]
enum OffsetChoice {
    None,
    /// The committed offset (or 0) plus a small delta, possibly negative.
    Delta(i8),
    /// Any value, e.g. negative.
    Absolute(i64),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Assign(u8),
    Revoke(u8),
    Delete(u8),
    Check(u8, Key),
    CheckAndMark(u8, Key),
    Mark(u8, Key),
    Unmark(u8, Key),
    Batch {
        p: u8,
        ops: Vec<BatchOp>,
        offset: OffsetChoice,
        commit: bool,
        /// Records its changes in the outbox, with this many outgoing
        /// records (modulo 3).
        outbox: Option<u8>,
    },
    /// Publishes the partition's outbox: its entries are removed.
    Publish(u8),
    Advance(u16),
    Compact(u8),
    Sync,
    Stats,
    Reopen(Restart),
    Crash(Restart),
}

/// How the store comes back after a reopen or a crash.
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Restart {
    /// Milliseconds the clock steps back (modulo 3 000).
    back: u16,
    ttl: Option<TtlChoice>,
    /// Filter sizing: expected keys (1 + n % 16) and false-positive rate.
    expected_keys: u8,
    fp_rate: FpChoice,
    sync: bool,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum FpChoice {
    Half,
    Tenth,
    Tiny,
}

/// The options of one open of the store.
#[derive(Debug, Clone, Copy)]
struct Opened {
    ttl: u64,
    expected_keys: usize,
    fp_rate: f64,
    sync: bool,
    /// `Options::table_bytes`: a table per change or two, every few
    /// batches, or the default (changes stay in journal records until a
    /// revoke, compaction or reopen).
    table_bytes: usize,
}

impl Opened {
    fn first(ttl: u64) -> Self {
        Self {
            ttl,
            expected_keys: 4,
            // Many false positives: every one must be confirmed away on disk.
            fp_rate: 0.5,
            sync: false,
            table_bytes: 64,
        }
    }

    fn after(self, r: Restart) -> Self {
        Self {
            ttl: r.ttl.map_or(self.ttl, TtlChoice::millis),
            expected_keys: 1 + usize::from(r.expected_keys % 16),
            fp_rate: match r.fp_rate {
                FpChoice::Half => 0.5,
                FpChoice::Tenth => 0.1,
                FpChoice::Tiny => 0.0001,
            },
            sync: r.sync,
            // The high bits of the filter sizing byte (its low four pick the
            // expected keys), so that the inputs of the corpus keep their
            // meaning.
            table_bytes: match r.expected_keys >> 4 & 3 {
                0 => 1,
                1 => 64,
                2 => 512,
                _ => 4 << 20,
            },
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    ttl: TtlChoice,
    start: StartChoice,
    ops: Vec<Op>,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum TtlChoice {
    OneMs,
    Short,
    Second,
}

impl TtlChoice {
    fn millis(self) -> u64 {
        match self {
            Self::OneMs => 1,
            Self::Short => 7,
            Self::Second => 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum StartChoice {
    /// 2026-01-01T00:00:00Z.
    Now,
    /// Near the end of time: expiry times saturate.
    EndOfTime,
}

impl StartChoice {
    fn millis(self) -> u64 {
        match self {
            Self::Now => 1_767_225_600_000,
            Self::EndOfTime => u64::MAX - 3_000,
        }
    }
}

/// What the store must hold: everything acknowledged.
struct Model {
    now: u64,
    ttl: u64,
    /// (partition, key) → expiry.
    marks: BTreeMap<(u8, u8), u64>,
    offsets: BTreeMap<u8, i64>,
    assigned: BTreeSet<u8>,
    /// Outbox entries committed and not yet published.
    pending: BTreeMap<u8, Vec<Pending>>,
    /// The last outbox sequence number a partition used since the store
    /// was opened.
    last_seq: BTreeMap<u8, u64>,
}

impl Model {
    fn live(&self, p: u8, k: u8) -> bool {
        self.marks.get(&(p, k)).is_some_and(|&e| self.now < e)
    }

    fn verdict(&self, p: u8, k: u8) -> Verdict {
        if self.live(p, k) {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    fn expiry(&self) -> u64 {
        self.now.saturating_add(self.ttl)
    }
}

fn part(p: u8) -> Partition {
    Partition::new("t", i32::from(p % PARTITIONS))
}

fn key_bytes(k: Key) -> Vec<u8> {
    match k {
        Key::Good(k) => vec![b'k', b'a' + k % KEYS],
        Key::Empty => Vec::new(),
        Key::TooLong => vec![b'x'; MAX_KEY_LEN + 1],
    }
}

/// The error a bad key must give, if it is bad.
fn key_error(k: Key) -> Option<fn(&Error) -> bool> {
    match k {
        Key::Good(_) => None,
        Key::Empty => Some(|e| matches!(e, Error::EmptyKey)),
        Key::TooLong => Some(|e| matches!(e, Error::KeyTooLong { .. })),
    }
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

fn options(clock: &ManualClock, o: Opened) -> Options {
    Options::default()
        .ttl(Duration::from_millis(o.ttl))
        .expected_keys_per_partition(o.expected_keys)
        .bloom_fp_rate(o.fp_rate)
        .durability(if o.sync {
            Durability::Sync
        } else {
            Durability::Buffered
        })
        .max_key_len(MAX_KEY_LEN)
        .clock(clock.clone())
        .table_bytes(o.table_bytes)
}

fn open(path: &Path, clock: &ManualClock, o: Opened) -> Store {
    Store::open(path, options(clock, o)).expect("open")
}

fn run(input: Input) {
    let ttl = input.ttl.millis();
    let start = input.start.millis();
    let clock = ManualClock::new(start);
    let mut dirs = Dirs {
        root: tempfile::tempdir().expect("tempdir"),
        generation: 0,
    };
    let mut opened = Opened::first(ttl);
    let mut store = Some(open(&dirs.current(), &clock, opened));
    let mut m = Model {
        now: start,
        ttl,
        marks: BTreeMap::new(),
        offsets: BTreeMap::new(),
        assigned: BTreeSet::new(),
        pending: BTreeMap::new(),
        last_seq: BTreeMap::new(),
    };
    let mut reopens = 0;
    for op in input.ops.into_iter().take(MAX_OPS) {
        let s = store.as_ref().expect("store");
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
                m.marks.retain(|&(q, _), _| q != p);
                m.offsets.remove(&p);
                m.pending.remove(&p);
                m.last_seq.remove(&p);
            }
            Op::Publish(p) => {
                let p = p % PARTITIONS;
                let r = outbox::pending(s, &part(p));
                if !m.assigned.contains(&p) {
                    expect_err(r, not_assigned, "outbox of an unassigned partition");
                    continue;
                }
                // The after-step check compared the entries already.
                if let Some(last) = r.expect("outbox").last() {
                    outbox::complete(s, &part(p), last.seq).expect("complete the outbox");
                }
                m.pending.remove(&p);
            }
            Op::Check(p, k) => {
                let p = p % PARTITIONS;
                let r = s.check(&part(p), &key_bytes(k));
                if let Some(e) = key_error(k) {
                    expect_err(r, e, "check with a bad key");
                } else if let Key::Good(k) = k {
                    let k = k % KEYS;
                    if m.assigned.contains(&p) {
                        assert_eq!(r.expect("check"), m.verdict(p, k), "check {p} {k}");
                    } else {
                        expect_err(r, not_assigned, "check unassigned");
                    }
                }
            }
            Op::CheckAndMark(p, k) | Op::Mark(p, k) => {
                let p = p % PARTITIONS;
                let r = s.check_and_mark(&part(p), &key_bytes(k));
                if let Some(e) = key_error(k) {
                    expect_err(r, e, "check_and_mark with a bad key");
                } else if let Key::Good(k) = k {
                    let k = k % KEYS;
                    if m.assigned.contains(&p) {
                        let expected = m.verdict(p, k);
                        if expected == Verdict::New {
                            m.marks.insert((p, k), m.expiry());
                        }
                        assert_eq!(r.expect("check_and_mark"), expected, "mark {p} {k}");
                    } else {
                        expect_err(r, not_assigned, "check_and_mark unassigned");
                    }
                }
            }
            Op::Unmark(p, k) => {
                let p = p % PARTITIONS;
                let r = s.unmark(&part(p), &key_bytes(k));
                if let Some(e) = key_error(k) {
                    expect_err(r, e, "unmark with a bad key");
                } else if let Key::Good(k) = k {
                    let k = k % KEYS;
                    if m.assigned.contains(&p) {
                        assert_eq!(r.expect("unmark"), m.live(p, k), "unmark {p} {k}");
                        m.marks.remove(&(p, k));
                    } else {
                        expect_err(r, not_assigned, "unmark unassigned");
                    }
                }
            }
            Op::Batch {
                p,
                ops,
                offset,
                commit,
                outbox: records,
            } => {
                let p = p % PARTITIONS;
                let b = s.batch(&part(p));
                if !m.assigned.contains(&p) {
                    expect_err(b, not_assigned, "batch unassigned");
                    continue;
                }
                let mut b = b.expect("batch");
                let mut staged = BTreeMap::new();
                if let Some(n) = records {
                    outbox::record_changes(&mut b, m.offsets.get(&p).copied().unwrap_or(0));
                    for i in 0..n % 3 {
                        b.send(OutboxRecord::new("out", [i], [p, i]))
                            .expect("stage a record");
                    }
                }
                for bop in ops.into_iter().take(8) {
                    match bop {
                        BatchOp::CheckAndMark(key) | BatchOp::Mark(key) => {
                            let is_mark = matches!(bop, BatchOp::Mark(_));
                            let r = if is_mark {
                                b.mark(&key_bytes(key)).map(|()| None)
                            } else {
                                b.check_and_mark(&key_bytes(key)).map(Some)
                            };
                            if let Some(e) = key_error(key) {
                                expect_err(r, e, "batch mark with a bad key");
                                continue;
                            }
                            let Key::Good(k) = key else { continue };
                            let k = k % KEYS;
                            let expected = if staged.contains_key(&k) || m.live(p, k) {
                                Verdict::Duplicate
                            } else {
                                staged.insert(k, m.expiry());
                                Verdict::New
                            };
                            if let Some(v) = r.expect("batch check_and_mark") {
                                assert_eq!(v, expected, "batch check_and_mark {p} {k}");
                            }
                        }
                        BatchOp::StoreCheck(key) => {
                            let r = s.check(&part(p), &key_bytes(key));
                            if let Some(e) = key_error(key) {
                                expect_err(r, e, "check with a bad key");
                            } else if let Key::Good(k) = key {
                                let k = k % KEYS;
                                assert_eq!(r.expect("check in batch"), m.verdict(p, k));
                            }
                        }
                        BatchOp::Advance(ms) => {
                            let ms = u64::from(ms % 1_500);
                            clock.advance(Duration::from_millis(ms));
                            m.now = m.now.max(clock.now_millis());
                        }
                        BatchOp::StoreMark(key) => {
                            let r = s.check_and_mark(&part(p), &key_bytes(key));
                            if let Some(e) = key_error(key) {
                                expect_err(r, e, "mark with a bad key");
                            } else {
                                expect_err(
                                    r,
                                    |e| matches!(e, Error::BatchInProgress(_)),
                                    "write during own batch",
                                );
                            }
                        }
                    }
                }
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
                    continue;
                }
                let r = outbox::commit(b);
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
                        let entry = r.expect("commit");
                        // An entry when the batch records its changes and
                        // has something to publish (a change, a record or
                        // an offset; re-marking a live key is a change the
                        // model does not track).
                        let empty = staged.is_empty()
                            && records.is_some_and(|n| n % 3 == 0)
                            && offset.is_none();
                        assert!(
                            entry.is_some() == records.is_some() || (entry.is_none() && empty),
                            "outbox entry {entry:?} for a batch recording {records:?}"
                        );
                        if let Some(e) = &entry {
                            assert!(e.changed.len() >= staged.len(), "changes of {e:?}");
                        }
                        if let Some(entry) = entry {
                            let last = m.pending.get(&p).and_then(|v| v.last()).map(|e| e.seq);
                            let last = last.max(m.last_seq.get(&p).copied());
                            assert!(
                                last.is_none_or(|l| entry.seq > l),
                                "outbox seq {} after {last:?}",
                                entry.seq
                            );
                            assert_eq!(entry.records.len(), usize::from(records.unwrap_or(0) % 3));
                            m.last_seq.insert(p, entry.seq);
                            m.pending.entry(p).or_default().push(entry);
                        }
                        m.marks.extend(staged.into_iter().map(|(k, e)| ((p, k), e)));
                        if let Some(o) = offset {
                            m.offsets.insert(p, o);
                        }
                    }
                }
            }
            Op::Advance(ms) => {
                let ms = u64::from(ms % 1_500);
                clock.advance(Duration::from_millis(ms));
                m.now = m.now.max(clock.now_millis());
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
                }
            }
            Op::Reopen(restart) | Op::Crash(restart) => {
                if reopens == MAX_REOPENS {
                    continue;
                }
                reopens += 1;
                let s = store.take().expect("store");
                if matches!(op, Op::Reopen(_)) {
                    s.close().expect("close");
                } else {
                    // The files as the OS has them while the process still
                    // runs; then the process state is lost. The background
                    // table writer is let finish first: a copy is not an
                    // instant, and a table ingested halfway through it would
                    // leave a copy no crash can (the SIGKILL trials kill
                    // the writer mid-table).
                    tables::wait_idle(&s);
                    let from = dirs.current();
                    dirs.generation += 1;
                    copy_dir(&from, &dirs.current()).expect("copy store");
                    drop(s);
                    std::fs::remove_dir_all(&from).expect("remove old store");
                }
                clock.set(m.now.saturating_sub(u64::from(restart.back % 3_000)));
                opened = opened.after(restart);
                m.ttl = opened.ttl;
                // The restarted store's time: never before what its ledger
                // recorded, whatever the clock says.
                m.now = clock.now_millis().max(recorded_time(&dirs.current()));
                store = Some(open(&dirs.current(), &clock, opened));
                m.assigned.clear();
                m.last_seq.clear();
            }
        }
        // After every step: the assigned partitions and offsets agree.
        let s = store.as_ref().expect("store");
        let assigned: Vec<_> = m.assigned.iter().map(|&p| part(p)).collect();
        assert_eq!(s.assigned(), assigned);
        for &p in &m.assigned {
            assert_eq!(
                s.committed_offset(&part(p)).expect("offset"),
                m.offsets.get(&p).copied(),
                "offset of {p}"
            );
            // Every acknowledged outbox entry, intact; none published before.
            assert_eq!(
                outbox::pending(s, &part(p)).expect("outbox"),
                m.pending.get(&p).cloned().unwrap_or_default(),
                "outbox of {p}"
            );
        }
    }
    // Finally every key of every partition agrees, before and after a
    // compaction (which drops expired marks from disk).
    let s = store.as_ref().expect("store");
    for p in 0..PARTITIONS {
        s.assign(&part(p)).expect("final assign");
        for round in 0..2 {
            for k in 0..KEYS {
                assert_eq!(
                    s.check(&part(p), &key_bytes(Key::Good(k)))
                        .expect("final check"),
                    m.verdict(p, k),
                    "final {p} {k} (round {round})"
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
