//! Sequence dedup: a source's high-water mark and the window below it.
//!
//! A source (a producer id, a connector's name) numbers its messages; the
//! store keeps, per partition and source, one [`SourceState`]: the source's
//! epoch, the highest sequence number marked under it, a bitmap of which of
//! the `window` numbers up to it were marked, and when the source expires
//! if it marks nothing more. The state's key is in `layout.rs` (the source
//! prefix); its value, and the arithmetic, are here.
//!
//! A number above the high-water mark is new (the numbers it skips stay
//! open within the window); one inside the window is new exactly when its
//! bit is clear; one below the window is a duplicate: it is older than
//! anything a producer can still have in flight (a producer retries only
//! its last few unacknowledged sends, and the window is sized above that),
//! so it was either marked or given up by its producer.

use crate::config::MAX_SEQUENCE_WINDOW;
use crate::error::{Error, Result};
use crate::verdict::Verdict;
use crate::Partition;

/// What a sequence number is, against a source's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Never marked (or the source expired, or a newer epoch began).
    New,
    /// Marked, or below the window.
    Duplicate,
    /// From an epoch older than the source's: `current` is the source's.
    Fenced { current: u64 },
}

impl Seen {
    /// The answer to the caller: fenced numbers are an error.
    pub(crate) fn verdict(
        self,
        partition: &Partition,
        source: &[u8],
        epoch: u64,
    ) -> Result<Verdict> {
        match self {
            Seen::New => Ok(Verdict::New),
            Seen::Duplicate => Ok(Verdict::Duplicate),
            Seen::Fenced { current } => Err(Error::SourceFenced {
                partition: partition.clone(),
                source_id: source.to_vec(),
                current,
                attempted: epoch,
            }),
        }
    }
}

/// The time a batch judges the states it staged at: they count for the
/// rest of the batch whatever the clock does meanwhile, as its key marks do
/// (a state's expiry is always after the time it was marked at, so after
/// zero).
pub(crate) const STAGED: u64 = 0;

/// One source's sequence state in a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceState {
    /// The source's epoch: numbers of an older one are fenced.
    pub(crate) epoch: u64,
    /// The highest sequence number marked under `epoch`.
    pub(crate) high: u64,
    /// When the source expires (partition time, ms) unless it marks again.
    pub(crate) expires_at: u64,
    /// Bit `i` (of word `i / 64`, bit `i % 64`) set: `high - i` was marked
    /// (or is below what the window covered when it was narrower). Bit 0 is
    /// always set. Its length is the window the state was written with.
    bits: Vec<u64>,
    window: u32,
}

impl SourceState {
    /// A source whose first marked number is `seq`.
    pub(crate) fn first(epoch: u64, seq: u64, expires_at: u64, window: u32) -> Self {
        let mut s = Self {
            epoch,
            high: seq,
            expires_at,
            bits: vec![0; words(window)],
            window,
        };
        s.set(0);
        s
    }

    /// What `seq` of `epoch` is against this state, at partition time
    /// `now`: an expired source knows nothing.
    pub(crate) fn seen(state: Option<&Self>, epoch: u64, seq: u64, now: u64) -> Seen {
        let Some(s) = state.filter(|s| s.is_live(now)) else {
            return Seen::New;
        };
        if epoch < s.epoch {
            return Seen::Fenced { current: s.epoch };
        }
        if epoch > s.epoch || seq > s.high {
            return Seen::New;
        }
        let below = s.high - seq;
        if below >= u64::from(s.window) || s.get(below) {
            Seen::Duplicate
        } else {
            Seen::New
        }
    }

    /// The state after marking `seq` of `epoch` (which [`seen`](Self::seen)
    /// found new) with expiry `expires_at`, under window `window`; see
    /// [`mark`](Self::mark).
    pub(crate) fn marked(
        state: Option<&Self>,
        epoch: u64,
        seq: u64,
        now: u64,
        expires_at: u64,
        window: u32,
    ) -> Self {
        match state {
            Some(s) => {
                let mut s = s.clone();
                s.mark(epoch, seq, now, expires_at, window);
                s
            }
            None => Self::first(epoch, seq, expires_at, window),
        }
    }

    /// Marks `seq` of `epoch` (which [`seen`](Self::seen) found new) with
    /// expiry `expires_at`, under window `window`: a new epoch starts
    /// afresh, an expired source too; a fenced epoch changes nothing.
    pub(crate) fn mark(&mut self, epoch: u64, seq: u64, now: u64, expires_at: u64, window: u32) {
        if !self.is_live(now) || epoch > self.epoch {
            *self = Self::first(epoch, seq, expires_at, window);
            return;
        }
        if epoch < self.epoch {
            return;
        }
        if window != self.window {
            *self = self.resized(window);
        }
        self.expires_at = self.expires_at.max(expires_at);
        if seq > self.high {
            self.shift(seq - self.high);
            self.high = seq;
            self.set(0);
        } else if let Ok(i) = u32::try_from(self.high - seq) {
            if i < self.window {
                self.set(u64::from(i));
            }
        }
    }

    /// The union of two states of one source (a restore meeting what the
    /// store has): the later epoch wins; under one epoch a number marked in
    /// either is marked, and the later expiry stands. Commutative, so the
    /// order in which a changelog's records arrive never matters.
    pub(crate) fn merge(&self, other: &Self) -> Self {
        if self.epoch != other.epoch {
            let newer = if self.epoch > other.epoch {
                self
            } else {
                other
            };
            let mut s = newer.clone();
            s.expires_at = self.expires_at.max(other.expires_at);
            return s;
        }
        let window = self.window.max(other.window);
        let (hi, lo) = if self.high >= other.high {
            (self, other)
        } else {
            (other, self)
        };
        let mut s = hi.resized(window);
        let lo = lo.resized(window);
        let gap = hi.high - lo.high;
        for i in 0..u64::from(window) {
            if lo.get(i) {
                match i.checked_add(gap) {
                    Some(j) if j < u64::from(window) => s.set(j),
                    _ => break,
                }
            }
        }
        s.expires_at = self.expires_at.max(other.expires_at);
        s
    }

    /// Whether the source is live at partition time `now`.
    pub(crate) fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// This state under window `window`: a wider one counts the numbers it
    /// adds as marked (they were below the old window, so duplicates
    /// already: widening never makes one new); a narrower one forgets the
    /// bits it drops (they are below it now, duplicates still).
    fn resized(&self, window: u32) -> Self {
        if window == self.window {
            return self.clone();
        }
        let mut s = Self {
            bits: vec![0; words(window)],
            window,
            ..self.clone()
        };
        for i in 0..u64::from(window) {
            if i >= u64::from(self.window) || self.get(i) {
                s.set(i);
            }
        }
        s
    }

    /// Moves the window up by `by` numbers: bit `i` becomes bit `i + by`,
    /// a word at a time (a bit at a time cost a microsecond per new number
    /// at a window of 1024).
    fn shift(&mut self, by: u64) {
        let n = self.bits.len();
        let words = usize::try_from(by / 64).unwrap_or(usize::MAX);
        if by >= u64::from(self.window) || words >= n {
            self.bits.iter_mut().for_each(|w| *w = 0);
            return;
        }
        let bits = (by % 64) as u32;
        for j in (0..n).rev() {
            let word = |i: Option<usize>| i.and_then(|i| self.bits.get(i)).copied().unwrap_or(0);
            let src = j.checked_sub(words);
            let high = word(src) << bits;
            let low = if bits == 0 {
                0
            } else {
                word(src.and_then(|s| s.checked_sub(1))) >> (64 - bits)
            };
            if let Some(w) = self.bits.get_mut(j) {
                *w = high | low;
            }
        }
        // Bits shifted past the window are gone.
        let spare = (n as u64) * 64 - u64::from(self.window);
        if let Some(last) = self.bits.last_mut() {
            if spare > 0 {
                *last &= u64::MAX >> spare;
            }
        }
    }

    fn get(&self, i: u64) -> bool {
        bit(&self.bits, i)
    }

    fn set(&mut self, i: u64) {
        let (w, b) = (i / 64, i % 64);
        if let Some(word) = usize::try_from(w).ok().and_then(|w| self.bits.get_mut(w)) {
            *word |= 1 << b;
        }
    }

    /// The stored value: `tag ++ epoch ++ high ++ expires_at ++ window: u32
    /// ++ bitmap` (the bitmap as `ceil(window / 64)` u64 words, all
    /// big-endian).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(29 + 8 * self.bits.len());
        v.push(SOURCE_TAG);
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.high.to_be_bytes());
        v.extend_from_slice(&self.expires_at.to_be_bytes());
        v.extend_from_slice(&self.window.to_be_bytes());
        for w in &self.bits {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v
    }

    /// `None` if `value` is not a source state.
    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        let (&tag, rest) = value.split_first()?;
        if tag != SOURCE_TAG {
            return None;
        }
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(rest.get(i..i + 8)?.try_into().ok()?))
        };
        let window = u32::from_be_bytes(rest.get(24..28)?.try_into().ok()?);
        if !(1..=MAX_SEQUENCE_WINDOW).contains(&window) {
            return None;
        }
        let n = words(window);
        if rest.len() != 28 + 8 * n {
            return None;
        }
        let bits = (0..n)
            .map(|i| u64_at(28 + 8 * i))
            .collect::<Option<Vec<u64>>>()?;
        let s = Self {
            epoch: u64_at(0)?,
            high: u64_at(8)?,
            expires_at: u64_at(16)?,
            bits,
            window,
        };
        // Bit 0 is the high-water mark itself; bits past the window unset.
        let spare = (n as u64) * 64 - u64::from(window);
        let clean = spare == 0 || s.bits.last().is_some_and(|w| w >> (64 - spare) == 0);
        (s.get(0) && clean).then_some(s)
    }
}

/// The first byte of a stored source state.
const SOURCE_TAG: u8 = 3;

fn words(window: u32) -> usize {
    (window as usize).div_ceil(64)
}

fn bit(bits: &[u64], i: u64) -> bool {
    usize::try_from(i / 64)
        .ok()
        .and_then(|w| bits.get(w))
        .is_some_and(|w| w >> (i % 64) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The model: every number marked under the current epoch.
    fn model_seen(marked: &BTreeSet<u64>, window: u64, seq: u64) -> bool {
        let high = marked.last().copied().unwrap_or(0);
        marked.contains(&seq) || seq + window <= high
    }

    #[test]
    fn numbers_are_answered_like_the_set_of_marked_ones() {
        let window = 70u32;
        let mut state: Option<SourceState> = None;
        let mut marked = BTreeSet::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let high = marked.last().copied().unwrap_or(100);
            let seq = (high + x % 90).saturating_sub(80);
            let seen = SourceState::seen(state.as_ref(), 1, seq, 0);
            let expected = model_seen(&marked, u64::from(window), seq);
            assert_eq!(seen == Seen::Duplicate, expected, "seq {seq}, high {high}");
            if seen == Seen::New {
                state = Some(SourceState::marked(state.as_ref(), 1, seq, 0, 10, window));
                marked.insert(seq);
                let s = state.as_ref().unwrap();
                assert_eq!(SourceState::decode(&s.encode()).as_ref(), Some(s));
            }
        }
    }

    #[test]
    fn the_word_shift_moves_every_bit_like_a_bit_shift() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for window in [1u32, 63, 64, 65, 70, 128, 1024] {
            for _ in 0..200 {
                let mut s = SourceState::first(1, 10_000, 10, window);
                for i in 1..u64::from(window) {
                    if next() % 3 == 0 {
                        s.set(i);
                    }
                }
                let by = next() % (u64::from(window) + 70);
                let mut shifted = s.clone();
                shifted.shift(by);
                for i in 0..u64::from(window) {
                    let want = i >= by && s.get(i - by);
                    assert_eq!(shifted.get(i), want, "window {window}, by {by}, bit {i}");
                }
                let spare = shifted.bits.len() as u64 * 64 - u64::from(window);
                if spare > 0 {
                    assert_eq!(shifted.bits.last().unwrap() >> (64 - spare), 0);
                }
            }
        }
    }

    #[test]
    fn epochs_fence_older_ones_and_restart_the_sequence() {
        let s = SourceState::first(5, 100, 10, 64);
        assert_eq!(
            SourceState::seen(Some(&s), 4, 101, 0),
            Seen::Fenced { current: 5 }
        );
        assert_eq!(SourceState::seen(Some(&s), 6, 1, 0), Seen::New);
        let s = SourceState::marked(Some(&s), 6, 1, 0, 10, 64);
        assert_eq!((s.epoch, s.high), (6, 1));
        assert_eq!(SourceState::seen(Some(&s), 6, 1, 0), Seen::Duplicate);
        assert_eq!(SourceState::seen(Some(&s), 6, 0, 0), Seen::New);
    }

    #[test]
    fn an_expired_source_knows_nothing() {
        let s = SourceState::first(1, 100, 10, 64);
        assert_eq!(SourceState::seen(Some(&s), 1, 100, 9), Seen::Duplicate);
        assert_eq!(SourceState::seen(Some(&s), 1, 100, 10), Seen::New);
        assert_eq!(SourceState::seen(Some(&s), 0, 100, 10), Seen::New);
        let s = SourceState::marked(Some(&s), 0, 3, 10, 20, 64);
        assert_eq!((s.epoch, s.high, s.expires_at), (0, 3, 20));
    }

    #[test]
    fn resizing_never_makes_a_duplicate_new() {
        let mut s = SourceState::first(1, 1000, 10, 8);
        s = SourceState::marked(Some(&s), 1, 998, 0, 10, 8);
        for window in [1, 8, 64, 200] {
            let r = SourceState::marked(Some(&s), 1, 1001, 0, 10, window);
            for seq in 0..=1001 {
                let before =
                    seq == 1001 || SourceState::seen(Some(&s), 1, seq, 0) == Seen::Duplicate;
                if before {
                    assert_eq!(
                        SourceState::seen(Some(&r), 1, seq, 0),
                        Seen::Duplicate,
                        "window {window} seq {seq}"
                    );
                }
            }
        }
    }

    #[test]
    fn merge_is_the_union_whatever_the_order() {
        let a = SourceState::marked(Some(&SourceState::first(1, 50, 10, 64)), 1, 48, 0, 30, 64);
        let b = SourceState::marked(Some(&SourceState::first(1, 60, 20, 32)), 1, 20, 0, 20, 32);
        let ab = a.merge(&b);
        assert_eq!(ab, b.merge(&a));
        for seq in [20, 48, 50, 60] {
            assert_eq!(
                SourceState::seen(Some(&ab), 1, seq, 0),
                Seen::Duplicate,
                "{seq}"
            );
        }
        assert_eq!(SourceState::seen(Some(&ab), 1, 49, 0), Seen::New);
        assert_eq!(ab.expires_at, 30);
        let newer = SourceState::first(2, 3, 5, 64);
        assert_eq!(ab.merge(&newer).epoch, 2);
        assert_eq!(newer.merge(&ab).high, 3);
        assert_eq!(newer.merge(&ab).expires_at, 30);
    }

    #[test]
    fn malformed_values_do_not_decode() {
        let good = SourceState::first(1, 2, 3, 70).encode();
        assert!(SourceState::decode(&good).is_some());
        assert_eq!(SourceState::decode(&good[..good.len() - 1]), None);
        assert_eq!(SourceState::decode(&[]), None);
        let mut bad_tag = good.clone();
        bad_tag[0] = 1;
        assert_eq!(SourceState::decode(&bad_tag), None);
        let mut no_high = good.clone();
        no_high[29..37].fill(0);
        assert_eq!(SourceState::decode(&no_high), None);
        let mut zero_window = good;
        zero_window[25..29].fill(0);
        assert_eq!(SourceState::decode(&zero_window), None);
    }
}
