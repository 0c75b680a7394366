//! The model the sequence-mode fuzz target checks the store against: per
//! partition and source, the numbers marked under its epoch, the floor
//! below which every number is a duplicate, the window and the expiry
//! (`docs/design.md`, Sequence mode); and the key marks, offsets and
//! assignments beside them.

use std::collections::{BTreeMap, BTreeSet};

use exactly::Verdict;

use crate::sequence_input::SMALL;

/// What the store must remember of a source in a partition.
#[derive(Debug, Clone)]
pub struct Source {
    pub epoch: u64,
    /// Every number marked under `epoch` since the state began.
    pub marked: BTreeSet<u64>,
    /// Every number at or below it is a duplicate: it fell below the window
    /// the state had before a mark under a different window.
    pub floor: Option<u64>,
    /// The window the state was last written with.
    pub window: u32,
    pub expires_at: u64,
}

impl Source {
    pub fn high(&self) -> u64 {
        *self.marked.last().expect("a source has a marked number")
    }

    /// The lowest number inside the window, if any is below it.
    pub fn below_window(&self) -> Option<u64> {
        self.high().checked_sub(u64::from(self.window))
    }

    pub fn duplicate(&self, seq: u64) -> bool {
        self.marked.contains(&seq)
            || self.below_window().is_some_and(|b| seq <= b)
            || self.floor.is_some_and(|f| seq <= f)
    }
}

/// What a number is to the model: `Ok(true)` a duplicate, `Ok(false)` new,
/// `Err(current epoch)` fenced.
pub type Seen = Result<bool, u64>;

#[derive(Debug, Clone)]
pub struct Model {
    /// The store's time.
    pub now: u64,
    pub ttl: u64,
    pub idle: u64,
    pub window: u32,
    /// (partition, source) → state, live or not.
    pub sources: BTreeMap<(u8, u8), Source>,
    /// (partition, key) → expiry.
    pub marks: BTreeMap<(u8, u8), u64>,
    pub offsets: BTreeMap<u8, i64>,
    pub assigned: BTreeSet<u8>,
    /// Every number the run used, probed after each step.
    pub used: BTreeSet<u64>,
}

impl Model {
    pub fn live(&self, p: u8, s: u8) -> Option<&Source> {
        self.sources
            .get(&(p, s))
            .filter(|src| self.now < src.expires_at)
    }

    pub fn seen(&self, p: u8, s: u8, epoch: u64, seq: u64) -> Seen {
        self.seen_in_batch(p, s, epoch, seq, false)
    }

    /// `seen` as an open batch sees it: a source the batch marked
    /// (`staged`) counts for the rest of the batch whatever the clock does
    /// meanwhile, as the batch's key marks do (`docs/design.md`, Sequence
    /// mode).
    pub fn seen_in_batch(&self, p: u8, s: u8, epoch: u64, seq: u64, staged: bool) -> Seen {
        match self.current(p, s, staged) {
            None => Ok(false),
            Some(src) if epoch < src.epoch => Err(src.epoch),
            Some(src) if epoch > src.epoch => Ok(false),
            Some(src) => Ok(src.duplicate(seq)),
        }
    }

    fn current(&self, p: u8, s: u8, staged: bool) -> Option<&Source> {
        if staged {
            self.sources.get(&(p, s))
        } else {
            self.live(p, s)
        }
    }

    /// Marks a number `seen` found new.
    pub fn mark(&mut self, p: u8, s: u8, epoch: u64, seq: u64) {
        self.mark_in_batch(p, s, epoch, seq, false);
    }

    /// `mark` in an open batch; see [`Model::seen_in_batch`].
    pub fn mark_in_batch(&mut self, p: u8, s: u8, epoch: u64, seq: u64, staged: bool) {
        let expires_at = self.now.saturating_add(self.idle);
        let window = self.window;
        let next = match self.current(p, s, staged).cloned() {
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

    pub fn key_live(&self, p: u8, k: u8) -> bool {
        self.marks.get(&(p, k)).is_some_and(|&e| self.now < e)
    }

    pub fn key_verdict(&self, p: u8, k: u8) -> Verdict {
        if self.key_live(p, k) {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    pub fn key_expiry(&self) -> u64 {
        self.now.saturating_add(self.ttl)
    }

    /// The numbers to ask a source about: the small ones, every one the
    /// run used and its neighbours, the window's edges and the floor.
    pub fn probes(&self, p: u8, s: u8) -> BTreeSet<u64> {
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
