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
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbitrary::Arbitrary;
use exactly::{Clock, Durability, Error, ManualClock, Options, Partition, Store, Verdict};
use exactly_fuzz::copy_dir;
use libfuzzer_sys::fuzz_target;

const PARTITIONS: u8 = 2;
const SOURCES: u8 = 3;
const EPOCHS: u8 = 4;
const KEYS: u8 = 3;
/// Small numbers: `0..SMALL`, always probed.
const SMALL: u64 = 48;
const MAX_KEY_LEN: usize = 8;
const MAX_OPS: usize = 48;
const MAX_BATCH_OPS: usize = 8;
const MAX_REOPENS: usize = 4;

/// A source: one of a tiny set, or a bad one.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Src {
    Good(u8),
    Empty,
    TooLong,
}

/// A key mark's key: one of a tiny set (two of them spelt like sources), or
/// a bad one.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Key {
    Good(u8),
    Empty,
    TooLong,
}

/// A sequence number.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Num {
    /// `0..SMALL`.
    Small(u8),
    /// `SMALL..SMALL + 256`: past a window of 64 or 65.
    Far(u8),
    /// `u64::MAX - 3..=u64::MAX`.
    Huge(u8),
}

impl Num {
    fn value(self) -> u64 {
        match self {
            Self::Small(n) => u64::from(n) % SMALL,
            Self::Far(n) => SMALL + u64::from(n),
            Self::Huge(n) => u64::MAX - u64::from(n % 4),
        }
    }
}

/// One number of one source: (source, epoch (modulo 4), number).
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Number {
    src: Src,
    epoch: u8,
    num: Num,
}

impl Number {
    fn epoch(self) -> u64 {
        u64::from(self.epoch % EPOCHS)
    }
}

#[derive(Debug, Arbitrary)]
enum BatchOp {
    /// `Batch::check_sequence`: sees the batch's own marks.
    Check(Number),
    /// `Batch::check_and_mark_sequence`.
    CheckAndMark(Number),
    /// `Batch::mark_sequence`.
    Mark(Number),
    /// `Batch::check_and_mark` of a key.
    MarkKey(Key),
    /// `Store::check_sequence` while the batch is open: it sees only what
    /// was committed.
    StoreCheck(Number),
    /// `Store::check_and_mark_sequence` on the batch's partition from the
    /// thread that holds the batch: refused, never a deadlock.
    StoreMark(Number),
    /// The clock moves while the batch is open.
    Advance(u16),
    /// The clock steps back while the batch is open: the store's time
    /// stands still.
    StepBack(u16),
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
    Check(u8, Number),
    CheckAndMark(u8, Number),
    Mark(u8, Number),
    CheckKey(u8, Key),
    MarkKey(u8, Key),
    Batch {
        p: u8,
        ops: Vec<BatchOp>,
        offset: OffsetChoice,
        commit: bool,
    },
    Advance(u16),
    /// The clock steps back (modulo 3 000 ms): the store's time stands
    /// still until the clock passes it again.
    StepBack(u16),
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
    idle: Option<IdleChoice>,
    window: Option<WindowChoice>,
    sync: bool,
    /// Options that must be refused, tried first.
    refused: Option<Refused>,
    /// Assigns both partitions at once (so that they are compared with the
    /// model right after the restart).
    assign: bool,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Refused {
    WindowZero,
    WindowTooWide,
    IdleZero,
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
enum IdleChoice {
    /// Not set: the TTL.
    Ttl,
    OneMs,
    Short,
    Medium,
    Second,
}

impl IdleChoice {
    fn millis(self) -> Option<u64> {
        match self {
            Self::Ttl => None,
            Self::OneMs => Some(1),
            Self::Short => Some(7),
            Self::Medium => Some(300),
            Self::Second => Some(1_000),
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum WindowChoice {
    One,
    Three,
    Eight,
    SixtyFour,
    SixtyFive,
    Odd,
    Default,
    Widest,
}

impl WindowChoice {
    fn size(self) -> u32 {
        match self {
            Self::One => 1,
            Self::Three => 3,
            Self::Eight => 8,
            Self::SixtyFour => 64,
            Self::SixtyFive => 65,
            Self::Odd => 131,
            Self::Default => 1_024,
            Self::Widest => 65_536,
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

#[derive(Debug, Arbitrary)]
struct Input {
    ttl: TtlChoice,
    idle: IdleChoice,
    window: WindowChoice,
    start: StartChoice,
    ops: Vec<Op>,
}

/// The options of one open of the store.
#[derive(Debug, Clone, Copy)]
struct Opened {
    ttl: u64,
    idle: Option<u64>,
    window: u32,
    sync: bool,
}

impl Opened {
    fn after(self, r: Restart) -> Self {
        Self {
            ttl: r.ttl.map_or(self.ttl, TtlChoice::millis),
            idle: r.idle.map_or(self.idle, IdleChoice::millis),
            window: r.window.map_or(self.window, WindowChoice::size),
            sync: r.sync,
        }
    }

    /// How long a source that marks nothing is remembered.
    fn idle(self) -> u64 {
        self.idle.unwrap_or(self.ttl)
    }
}

/// What the store must remember of a source in a partition.
#[derive(Debug, Clone)]
struct Source {
    epoch: u64,
    /// Every number marked under `epoch` since the state began.
    marked: BTreeSet<u64>,
    /// Every number at or below it is a duplicate: it fell below the window
    /// the state had before a mark under a different window.
    floor: Option<u64>,
    /// The window the state was last written with.
    window: u32,
    expires_at: u64,
}

impl Source {
    fn high(&self) -> u64 {
        *self.marked.last().expect("a source has a marked number")
    }

    /// The lowest number inside the window, if any is below it.
    fn below_window(&self) -> Option<u64> {
        self.high().checked_sub(u64::from(self.window))
    }

    fn duplicate(&self, seq: u64) -> bool {
        self.marked.contains(&seq)
            || self.below_window().is_some_and(|b| seq <= b)
            || self.floor.is_some_and(|f| seq <= f)
    }
}

/// What a number is to the model: `Ok(true)` a duplicate, `Ok(false)` new,
/// `Err(current epoch)` fenced.
type Seen = Result<bool, u64>;

#[derive(Debug, Clone)]
struct Model {
    /// The store's time.
    now: u64,
    ttl: u64,
    idle: u64,
    window: u32,
    /// (partition, source) → state, live or not.
    sources: BTreeMap<(u8, u8), Source>,
    /// (partition, key) → expiry.
    marks: BTreeMap<(u8, u8), u64>,
    offsets: BTreeMap<u8, i64>,
    assigned: BTreeSet<u8>,
    /// Every number the run used, probed after each step.
    used: BTreeSet<u64>,
}

impl Model {
    fn live(&self, p: u8, s: u8) -> Option<&Source> {
        self.sources
            .get(&(p, s))
            .filter(|src| self.now < src.expires_at)
    }

    fn seen(&self, p: u8, s: u8, epoch: u64, seq: u64) -> Seen {
        match self.live(p, s) {
            None => Ok(false),
            Some(src) if epoch < src.epoch => Err(src.epoch),
            Some(src) if epoch > src.epoch => Ok(false),
            Some(src) => Ok(src.duplicate(seq)),
        }
    }

    /// Marks a number `seen` found new.
    fn mark(&mut self, p: u8, s: u8, epoch: u64, seq: u64) {
        let expires_at = self.now.saturating_add(self.idle);
        let window = self.window;
        let next = match self.live(p, s).cloned() {
            Some(mut src) if src.epoch == epoch => {
                if src.window != window {
                    src.floor = src.floor.max(src.below_window());
                    src.window = window;
                }
                src.marked.insert(seq);
                src.expires_at = src.expires_at.max(expires_at);
                src
            }
            Some(src) if src.epoch > epoch => panic!("model: marking a fenced number"),
            _ => Source {
                epoch,
                marked: BTreeSet::from([seq]),
                floor: None,
                window,
                expires_at,
            },
        };
        self.sources.insert((p, s), next);
    }

    fn key_live(&self, p: u8, k: u8) -> bool {
        self.marks.get(&(p, k)).is_some_and(|&e| self.now < e)
    }

    fn key_verdict(&self, p: u8, k: u8) -> Verdict {
        if self.key_live(p, k) {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    fn key_expiry(&self) -> u64 {
        self.now.saturating_add(self.ttl)
    }

    /// The numbers to ask a source about: the small ones, every one the
    /// run used and its neighbours, the window's edges and the floor.
    fn probes(&self, p: u8, s: u8) -> BTreeSet<u64> {
        let mut probes: BTreeSet<u64> = (0..=SMALL).collect();
        probes.extend([u64::MAX - 4, u64::MAX]);
        let mut around = |n: u64| {
            probes.extend([n.saturating_sub(1), n, n.saturating_add(1)]);
        };
        for &n in &self.used {
            around(n);
        }
        if let Some(src) = self.sources.get(&(p, s)) {
            around(src.high());
            if let Some(b) = src.below_window() {
                around(b);
            }
            if let Some(f) = src.floor {
                around(f);
            }
        }
        probes
    }
}

fn part(p: u8) -> Partition {
    Partition::new("t", i32::from(p % PARTITIONS))
}

fn source_bytes(s: Src) -> Vec<u8> {
    match s {
        Src::Good(s) => vec![b's', b'r', b'c', b'-', b'a' + s % SOURCES],
        Src::Empty => Vec::new(),
        Src::TooLong => vec![b's'; MAX_KEY_LEN + 1],
    }
}

fn key_bytes(k: Key) -> Vec<u8> {
    match k {
        // The first two are spelt like sources.
        Key::Good(k) => match k % KEYS {
            2 => b"key-c".to_vec(),
            k => source_bytes(Src::Good(k)),
        },
        Key::Empty => Vec::new(),
        Key::TooLong => vec![b'k'; MAX_KEY_LEN + 1],
    }
}

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

/// The store's time recorded in the ledger of the store in `dir` (0 if it
/// has none yet): a restarted store's time starts there.
fn recorded_time(dir: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(dir.join("EXACTLY-LEDGER")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("clock = "))
        .map(|v| v.parse().expect("ledger clock"))
        .expect("ledger has a clock")
}

struct Dirs {
    root: tempfile::TempDir,
    generation: usize,
}

impl Dirs {
    fn current(&self) -> PathBuf {
        self.root.path().join(format!("store-{}", self.generation))
    }
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
                                let want = staged.seen(p, src, epoch, seq);
                                expect_seen(r, want, p, src, epoch, seq, "batch sequence call");
                                if want == Ok(false) && !matches!(bop, BatchOp::Check(_)) {
                                    staged.mark(p, src, epoch, seq);
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
