//! Sequence mode against a model: random sequences of numbers (reordered
//! inside and outside the window, with gaps), epochs, idle expiry, batches
//! committed or dropped, compactions, and reopens (clean or not) that change
//! the window.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use exactly::{Error, ManualClock, Options, Partition, Store, Verdict};
use proptest::prelude::*;

const IDLE_MS: u64 = 1_000;
const PARTITIONS: i32 = 2;
const SOURCES: u8 = 2;
const WINDOWS: [u32; 3] = [4, 8, 64];

#[derive(Debug, Clone)]
enum Op {
    Assign(i32),
    Revoke(i32),
    Check(i32, u8, u64, u64),
    CheckAndMark(i32, u8, u64, u64),
    Batch {
        p: i32,
        numbers: Vec<(u8, u64, u64)>,
        offset: bool,
        commit: bool,
    },
    Advance(u64),
    Compact(i32),
    Reopen {
        clean: bool,
        window: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PARTITIONS;
    let number = (
        0..SOURCES,
        prop_oneof![4 => Just(1u64), 1 => 0u64..3],
        0u64..40,
    );
    prop_oneof![
        3 => p.clone().prop_map(Op::Assign),
        1 => p.clone().prop_map(Op::Revoke),
        4 => (p.clone(), number.clone()).prop_map(|(p, (s, e, n))| Op::Check(p, s, e, n)),
        6 => (p.clone(), number.clone()).prop_map(|(p, (s, e, n))| Op::CheckAndMark(p, s, e, n)),
        4 => (
            p.clone(),
            proptest::collection::vec(number, 0..8),
            any::<bool>(),
            proptest::bool::weighted(0.8)
        )
            .prop_map(|(p, numbers, offset, commit)| Op::Batch { p, numbers, offset, commit }),
        2 => (0..IDLE_MS + 300).prop_map(Op::Advance),
        1 => p.prop_map(Op::Compact),
        2 => (any::<bool>(), 0..WINDOWS.len()).prop_map(|(clean, window)| Op::Reopen { clean, window }),
    ]
}

/// What the store must remember of a source.
#[derive(Debug, Clone)]
struct Source {
    epoch: u64,
    marked: BTreeSet<u64>,
    /// Every number at or below it is a duplicate: it fell below the window
    /// the state had when it was last written.
    floor: Option<u64>,
    /// The window of the stored state.
    window: u32,
    expires_at: u64,
}

impl Source {
    fn high(&self) -> u64 {
        *self.marked.last().unwrap()
    }

    fn duplicate(&self, seq: u64) -> bool {
        self.marked.contains(&seq)
            || seq + u64::from(self.window) <= self.high()
            || self.floor.is_some_and(|f| seq <= f)
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    now: u64,
    window: u32,
    sources: HashMap<(i32, u8), Source>,
}

impl Model {
    fn live(&self, p: i32, s: u8) -> Option<&Source> {
        self.sources
            .get(&(p, s))
            .filter(|src| self.now < src.expires_at)
    }

    /// `Ok(true)` for a duplicate, `Err(current epoch)` for a fenced one.
    fn seen(&self, p: i32, s: u8, epoch: u64, seq: u64) -> Result<bool, u64> {
        match self.live(p, s) {
            None => Ok(false),
            Some(src) if epoch < src.epoch => Err(src.epoch),
            Some(src) if epoch > src.epoch => Ok(false),
            Some(src) => Ok(src.duplicate(seq)),
        }
    }

    fn mark(&mut self, p: i32, s: u8, epoch: u64, seq: u64) {
        let expires_at = self.now + IDLE_MS;
        let window = self.window;
        let fresh = Source {
            epoch,
            marked: BTreeSet::from([seq]),
            floor: None,
            window,
            expires_at,
        };
        let next = match self.live(p, s).cloned() {
            Some(mut src) if src.epoch == epoch => {
                // Numbers below the window the state was written with stay
                // duplicates whatever the new window.
                let below = src.high().checked_sub(u64::from(src.window));
                src.floor = src.floor.max(below);
                src.window = window;
                src.marked.insert(seq);
                src.expires_at = src.expires_at.max(expires_at);
                src
            }
            _ => fresh,
        };
        self.sources.insert((p, s), next);
    }
}

fn part(p: i32) -> Partition {
    Partition::new("t", p)
}

fn source(s: u8) -> [u8; 5] {
    [b's', b'r', b'c', b'-', b'a' + s]
}

fn options(clock: &ManualClock, window: u32) -> Options {
    Options::default()
        .ttl(Duration::from_millis(IDLE_MS * 5))
        .source_idle(Duration::from_millis(IDLE_MS))
        .sequence_window(window)
        .expected_keys_per_partition(16)
        .clock(clock.clone())
}

fn expect(r: exactly::Result<Verdict>, want: Result<bool, u64>, what: &str) {
    match want {
        Ok(dup) => {
            let want = if dup {
                Verdict::Duplicate
            } else {
                Verdict::New
            };
            assert_eq!(r.unwrap(), want, "{what}");
        }
        Err(current) => assert!(
            matches!(r, Err(Error::SourceFenced { current: c, .. }) if c == current),
            "{what}: {r:?}, expected fenced at {current}"
        ),
    }
}

fn run(dir: &Path, ops: Vec<Op>) {
    let clock = ManualClock::new(common::T0);
    let mut m = Model {
        now: common::T0,
        window: WINDOWS[1],
        ..Model::default()
    };
    let mut store = Some(Store::open(dir, options(&clock, m.window)).unwrap());
    let mut assigned = BTreeSet::new();
    let mut offsets: HashMap<i32, i64> = HashMap::new();
    for op in ops {
        let s = store.as_ref().unwrap();
        match op {
            Op::Assign(p) => {
                s.assign(&part(p)).unwrap();
                assigned.insert(p);
            }
            Op::Revoke(p) => {
                if assigned.remove(&p) {
                    s.revoke(&part(p)).unwrap();
                }
            }
            Op::Check(p, src, e, n) if assigned.contains(&p) => {
                let r = s.check_sequence(&part(p), &source(src), e, n);
                expect(r, m.seen(p, src, e, n), &format!("check {p} {src} {e} {n}"));
            }
            Op::CheckAndMark(p, src, e, n) if assigned.contains(&p) => {
                let r = s.check_and_mark_sequence(&part(p), &source(src), e, n);
                let want = m.seen(p, src, e, n);
                expect(r, want, &format!("check_and_mark {p} {src} {e} {n}"));
                if want == Ok(false) {
                    m.mark(p, src, e, n);
                }
            }
            Op::Batch {
                p,
                numbers,
                offset,
                commit,
            } if assigned.contains(&p) => {
                let mut b = s.batch(&part(p)).unwrap();
                let mut staged = m.clone();
                for (src, e, n) in numbers {
                    let r = b.check_and_mark_sequence(&source(src), e, n);
                    let want = staged.seen(p, src, e, n);
                    expect(r, want, &format!("batch {p} {src} {e} {n}"));
                    if want == Ok(false) {
                        staged.mark(p, src, e, n);
                    }
                }
                let next = offsets.get(&p).copied().unwrap_or(0) + 1;
                if offset {
                    b.set_offset(next);
                }
                if commit {
                    b.commit().unwrap();
                    m = staged;
                    if offset {
                        offsets.insert(p, next);
                    }
                } else {
                    drop(b);
                }
            }
            Op::Check(..) | Op::CheckAndMark(..) | Op::Batch { .. } => {}
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(ms));
                m.now += ms;
            }
            Op::Compact(p) => {
                if assigned.contains(&p) {
                    s.compact(&part(p)).unwrap();
                }
            }
            Op::Reopen { clean, window } => {
                let s = store.take().unwrap();
                if clean {
                    s.close().unwrap();
                } else {
                    drop(s);
                }
                m.window = WINDOWS[window];
                store = Some(Store::open(dir, options(&clock, m.window)).unwrap());
                assigned.clear();
            }
        }
        let s = store.as_ref().unwrap();
        for &p in &assigned {
            assert_eq!(
                s.committed_offset(&part(p)).unwrap(),
                offsets.get(&p).copied()
            );
        }
    }
    // After a compaction, every number of every live source agrees.
    let s = store.as_ref().unwrap();
    for p in 0..PARTITIONS {
        s.assign(&part(p)).unwrap();
        s.compact(&part(p)).unwrap();
        for src in 0..SOURCES {
            let epoch = m.live(p, src).map_or(0, |x| x.epoch);
            for n in 0..45 {
                let r = s.check_sequence(&part(p), &source(src), epoch, n);
                expect(r, m.seen(p, src, epoch, n), &format!("final {p} {src} {n}"));
            }
        }
        let live = (0..SOURCES).filter(|&src| m.live(p, src).is_some()).count();
        assert_eq!(
            s.stats().partitions[&part(p)].sources,
            live as u64,
            "partition {p}: sources remembered"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sequences_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), ops);
    }
}
