//! The input of the sequence-mode fuzz target (`fuzz_targets/sequence_model.rs`):
//! operations over two partitions and three sources, the numbers they use,
//! and the options a restart may bring.

use arbitrary::Arbitrary;
use exactly::Partition;

pub const PARTITIONS: u8 = 2;
pub const SOURCES: u8 = 3;
pub const EPOCHS: u8 = 4;
pub const KEYS: u8 = 3;
/// Small numbers: `0..SMALL`, always probed.
pub const SMALL: u64 = 48;
pub const MAX_KEY_LEN: usize = 8;
pub const MAX_OPS: usize = 48;
pub const MAX_BATCH_OPS: usize = 8;
pub const MAX_REOPENS: usize = 4;

/// A source: one of a tiny set, or a bad one.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Src {
    Good(u8),
    Empty,
    TooLong,
}

/// A key mark's key: one of a tiny set (two of them spelt like sources), or
/// a bad one.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Key {
    Good(u8),
    Empty,
    TooLong,
}

/// A sequence number.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Num {
    /// `0..SMALL`.
    Small(u8),
    /// `SMALL..SMALL + 256`: past a window of 64 or 65.
    Far(u8),
    /// `u64::MAX - 3..=u64::MAX`.
    Huge(u8),
}

impl Num {
    pub fn value(self) -> u64 {
        match self {
            Self::Small(n) => u64::from(n) % SMALL,
            Self::Far(n) => SMALL + u64::from(n),
            Self::Huge(n) => u64::MAX - u64::from(n % 4),
        }
    }
}

/// One number of one source: (source, epoch (modulo 4), number).
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct Number {
    pub src: Src,
    pub epoch: u8,
    pub num: Num,
}

impl Number {
    pub fn epoch(self) -> u64 {
        u64::from(self.epoch % EPOCHS)
    }
}

#[derive(Debug, Arbitrary)]
pub enum BatchOp {
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
pub enum OffsetChoice {
    None,
    /// The committed offset (or 0) plus a small delta, possibly negative.
    Delta(i8),
    /// Any value, e.g. negative.
    Absolute(i64),
}

#[derive(Debug, Arbitrary)]
pub enum Op {
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
pub struct Restart {
    /// Milliseconds the clock steps back (modulo 3 000).
    pub back: u16,
    pub ttl: Option<TtlChoice>,
    pub idle: Option<IdleChoice>,
    pub window: Option<WindowChoice>,
    pub sync: bool,
    /// Options that must be refused, tried first.
    pub refused: Option<Refused>,
    /// Assigns both partitions at once (so that they are compared with the
    /// model right after the restart).
    pub assign: bool,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Refused {
    WindowZero,
    WindowTooWide,
    IdleZero,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum TtlChoice {
    OneMs,
    Short,
    Second,
}

impl TtlChoice {
    pub fn millis(self) -> u64 {
        match self {
            Self::OneMs => 1,
            Self::Short => 7,
            Self::Second => 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum IdleChoice {
    /// Not set: the TTL.
    Ttl,
    OneMs,
    Short,
    Medium,
    Second,
}

impl IdleChoice {
    pub fn millis(self) -> Option<u64> {
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
pub enum WindowChoice {
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
    pub fn size(self) -> u32 {
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
pub enum StartChoice {
    /// 2026-01-01T00:00:00Z.
    Now,
    /// Near the end of time: expiry times saturate.
    EndOfTime,
}

impl StartChoice {
    pub fn millis(self) -> u64 {
        match self {
            Self::Now => 1_767_225_600_000,
            Self::EndOfTime => u64::MAX - 3_000,
        }
    }
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub ttl: TtlChoice,
    pub idle: IdleChoice,
    pub window: WindowChoice,
    pub start: StartChoice,
    pub ops: Vec<Op>,
}

/// The options of one open of the store.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub ttl: u64,
    pub idle: Option<u64>,
    pub window: u32,
    pub sync: bool,
}

impl Opened {
    pub fn after(self, r: Restart) -> Self {
        Self {
            ttl: r.ttl.map_or(self.ttl, TtlChoice::millis),
            idle: r.idle.map_or(self.idle, IdleChoice::millis),
            window: r.window.map_or(self.window, WindowChoice::size),
            sync: r.sync,
        }
    }

    /// How long a source that marks nothing is remembered.
    pub fn idle(self) -> u64 {
        self.idle.unwrap_or(self.ttl)
    }
}

/// The partition an input names.
pub fn part(p: u8) -> Partition {
    Partition::new("t", i32::from(p % PARTITIONS))
}

/// The bytes of an input's source.
pub fn source_bytes(s: Src) -> Vec<u8> {
    match s {
        Src::Good(s) => vec![b's', b'r', b'c', b'-', b'a' + s % SOURCES],
        Src::Empty => Vec::new(),
        Src::TooLong => vec![b's'; MAX_KEY_LEN + 1],
    }
}

/// The bytes of an input's key.
pub fn key_bytes(k: Key) -> Vec<u8> {
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
