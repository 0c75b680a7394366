//! A model test: random operation sequences, with reopens, against a simple
//! in-memory model. A tiny key space makes keys collide.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use exactly::{
    Claim, ClaimToken, Error, ManualClock, Options, Partition, Store, TtlRefresh, Verdict,
};
use proptest::prelude::*;

const TTL_MS: u64 = 1_000;
const PARTITIONS: i32 = 2;
const KEYS: u8 = 6;

#[derive(Debug, Clone)]
enum BatchOp {
    CheckAndMark(u8),
    Mark(u8),
}

#[derive(Debug, Clone)]
enum Op {
    Assign(i32),
    Revoke(i32),
    Delete(i32),
    Check(i32, u8),
    CheckAndMark(i32, u8),
    Mark(i32, u8),
    Unmark(i32, u8),
    Batch {
        p: i32,
        ops: Vec<BatchOp>,
        offset_delta: Option<i64>,
        fence: Option<u64>,
        commit: bool,
    },
    Claim(i32, u8, u64),
    Confirm(usize),
    Release(usize),
    AssignEpoch(i32, u64),
    Advance(u64),
    Compact(i32),
    Reopen {
        clean: bool,
        /// `Options::table_bytes` of the new open.
        table_bytes: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PARTITIONS;
    let k = 0..KEYS;
    let batch_op = prop_oneof![
        k.clone().prop_map(BatchOp::CheckAndMark),
        k.clone().prop_map(BatchOp::Mark),
    ];
    prop_oneof![
        3 => p.clone().prop_map(Op::Assign),
        1 => p.clone().prop_map(Op::Revoke),
        1 => p.clone().prop_map(Op::Delete),
        4 => (p.clone(), k.clone()).prop_map(|(p, k)| Op::Check(p, k)),
        4 => (p.clone(), k.clone()).prop_map(|(p, k)| Op::CheckAndMark(p, k)),
        2 => (p.clone(), k.clone()).prop_map(|(p, k)| Op::Mark(p, k)),
        2 => (p.clone(), k.clone()).prop_map(|(p, k)| Op::Unmark(p, k)),
        4 => (
            p.clone(),
            proptest::collection::vec(batch_op, 0..6),
            proptest::option::of(-2i64..5),
            proptest::option::weighted(0.3, 0u64..4),
            proptest::bool::weighted(0.85)
        )
            .prop_map(|(p, ops, offset_delta, fence, commit)| Op::Batch {
                p,
                ops,
                offset_delta,
                fence,
                commit
            }),
        3 => (p.clone(), k.clone(), prop_oneof![Just(300u64), Just(1_500u64)])
            .prop_map(|(p, k, lease)| Op::Claim(p, k, lease)),
        2 => any::<usize>().prop_map(Op::Confirm),
        1 => any::<usize>().prop_map(Op::Release),
        1 => (p.clone(), 0u64..4).prop_map(|(p, e)| Op::AssignEpoch(p, e)),
        3 => (0..TTL_MS + 300).prop_map(Op::Advance),
        2 => p.prop_map(Op::Compact),
        2 => (any::<bool>(), table_bytes()).prop_map(|(clean, table_bytes)| Op::Reopen { clean, table_bytes }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    Done(u64),
    /// Lease end, epoch, and the model's id of the claim.
    Claimed(u64, u64, u64),
}

#[derive(Default)]
struct Model {
    now: u64,
    refresh_on_duplicate: bool,
    marks: HashMap<(i32, u8), Entry>,
    offsets: HashMap<i32, i64>,
    epochs: HashMap<i32, u64>,
    assigned: BTreeSet<i32>,
    next_claim: u64,
}

impl Model {
    fn live_entry(&self, p: i32, k: u8) -> Option<Entry> {
        self.marks.get(&(p, k)).copied().filter(|e| match *e {
            Entry::Done(exp) | Entry::Claimed(exp, ..) => self.now < exp,
        })
    }

    fn live(&self, p: i32, k: u8) -> bool {
        self.live_entry(p, k).is_some()
    }

    fn verdict(&self, p: i32, k: u8) -> Verdict {
        if self.live(p, k) {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    fn check_and_mark(&mut self, p: i32, k: u8) -> Verdict {
        match self.live_entry(p, k) {
            Some(Entry::Done(exp)) => {
                if self.refresh_on_duplicate && self.now + TTL_MS > exp {
                    self.marks.insert((p, k), Entry::Done(self.now + TTL_MS));
                }
                Verdict::Duplicate
            }
            Some(Entry::Claimed(..)) => Verdict::Duplicate,
            None => {
                self.marks.insert((p, k), Entry::Done(self.now + TTL_MS));
                Verdict::New
            }
        }
    }

    fn epoch(&self, p: i32) -> u64 {
        self.epochs.get(&p).copied().unwrap_or(0)
    }
}

fn part(p: i32) -> Partition {
    Partition::new("t", p)
}

fn key(k: u8) -> [u8; 3] {
    [b'k', b'-', b'a' + k]
}

/// `Options::table_bytes`: from a table per change or two (the background
/// flusher and the inline flush of a commit that finds it behind race every
/// other operation) to the default (changes stay in memory and in journal
/// records until a revoke, a compaction or a reopen).
fn table_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 1usize..200, Just(4 << 20)]
}

fn options(clock: &ManualClock, refresh_on_duplicate: bool, table_bytes: usize) -> Options {
    let refresh = if refresh_on_duplicate {
        TtlRefresh::OnDuplicate
    } else {
        TtlRefresh::FirstSeen
    };
    Options::default()
        .ttl_refresh(refresh)
        .ttl(Duration::from_millis(TTL_MS))
        .expected_keys_per_partition(16)
        .bloom_fp_rate(0.3) // many false positives: they must all be confirmed away
        .clock(clock.clone())
        .table_bytes(table_bytes)
}

fn not_assigned<T: std::fmt::Debug>(r: exactly::Result<T>) {
    assert!(matches!(r, Err(Error::NotAssigned(_))), "{r:?}");
}

#[expect(
    clippy::map_entry,
    reason = "the model reads like the store: look in the batch, then in the store"
)]
fn run(dir: &Path, ops: Vec<Op>, refresh_on_duplicate: bool, table_bytes: usize) {
    let clock = ManualClock::new(common::T0);
    let opts = |table_bytes| options(&clock, refresh_on_duplicate, table_bytes);
    let mut store = Some(Store::open(dir, opts(table_bytes)).unwrap());
    let mut m = Model {
        now: common::T0,
        refresh_on_duplicate,
        ..Model::default()
    };
    // Tokens held by the test, with the model's id of each claim.
    let mut tokens: Vec<(ClaimToken, i32, u8, u64)> = Vec::new();
    for op in ops {
        let s = store.as_ref().unwrap();
        match op {
            Op::Assign(p) => {
                s.assign(&part(p)).unwrap();
                m.assigned.insert(p);
            }
            Op::Revoke(p) => {
                let r = s.revoke(&part(p));
                if m.assigned.remove(&p) {
                    r.unwrap();
                } else {
                    not_assigned(r);
                }
            }
            Op::Delete(p) => {
                s.delete_partition(&part(p)).unwrap();
                m.assigned.remove(&p);
                m.marks.retain(|&(q, _), _| q != p);
                m.offsets.remove(&p);
                m.epochs.remove(&p);
            }
            Op::Check(p, k) => {
                let r = s.check(&part(p), &key(k));
                if m.assigned.contains(&p) {
                    assert_eq!(r.unwrap(), m.verdict(p, k), "check {p} {k}");
                } else {
                    not_assigned(r);
                }
            }
            Op::CheckAndMark(p, k) | Op::Mark(p, k) => {
                let r = s.check_and_mark(&part(p), &key(k));
                if m.assigned.contains(&p) {
                    assert_eq!(r.unwrap(), m.check_and_mark(p, k), "check_and_mark {p} {k}");
                } else {
                    not_assigned(r);
                }
            }
            Op::Unmark(p, k) => {
                let r = s.unmark(&part(p), &key(k));
                if m.assigned.contains(&p) {
                    assert_eq!(r.unwrap(), m.live(p, k));
                    m.marks.remove(&(p, k));
                } else {
                    not_assigned(r);
                }
            }
            Op::Batch {
                p,
                ops,
                offset_delta,
                fence,
                commit,
            } => {
                let b = s.batch(&part(p));
                if !m.assigned.contains(&p) {
                    not_assigned(b);
                    continue;
                }
                let mut b = b.unwrap();
                if let Some(f) = fence {
                    b.fence(f);
                }
                let mut staged = HashMap::new();
                for bop in ops {
                    let k = match bop {
                        BatchOp::CheckAndMark(k) | BatchOp::Mark(k) => k,
                    };
                    let expected = if staged.contains_key(&k) {
                        Verdict::Duplicate
                    } else {
                        match m.live_entry(p, k) {
                            Some(Entry::Done(exp)) => {
                                if m.refresh_on_duplicate && m.now + TTL_MS > exp {
                                    staged.insert(k, Entry::Done(m.now + TTL_MS));
                                }
                                Verdict::Duplicate
                            }
                            Some(Entry::Claimed(..)) => Verdict::Duplicate,
                            None => {
                                staged.insert(k, Entry::Done(m.now + TTL_MS));
                                Verdict::New
                            }
                        }
                    };
                    match bop {
                        BatchOp::CheckAndMark(k) => {
                            assert_eq!(b.check_and_mark(&key(k)).unwrap(), expected)
                        }
                        BatchOp::Mark(k) => b.mark(&key(k)).unwrap(),
                    }
                }
                let current = m.offsets.get(&p).copied();
                let offset = offset_delta.map(|d| current.unwrap_or(0) + d);
                if let Some(o) = offset {
                    b.set_offset(o);
                }
                if !commit {
                    drop(b);
                    continue;
                }
                let r = b.commit();
                match offset {
                    _ if fence.is_some_and(|f| f != m.epoch(p)) => {
                        assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}")
                    }
                    Some(o) if o < 0 => {
                        assert!(matches!(r, Err(Error::InvalidOffset(_))), "{r:?}")
                    }
                    Some(o) if current.is_some_and(|c| o < c) => {
                        assert!(matches!(r, Err(Error::OffsetRegression { .. })), "{r:?}")
                    }
                    _ => {
                        r.unwrap();
                        for (k, e) in staged {
                            m.marks.insert((p, k), e);
                        }
                        if let Some(o) = offset {
                            m.offsets.insert(p, o);
                        }
                    }
                }
            }
            Op::Claim(p, k, lease) => {
                let r = s.claim(&part(p), &key(k), Duration::from_millis(lease));
                if !m.assigned.contains(&p) {
                    not_assigned(r);
                    continue;
                }
                match (r.unwrap(), m.live_entry(p, k)) {
                    (Claim::Done, Some(Entry::Done(_))) => {}
                    (
                        Claim::InFlight {
                            holder_epoch,
                            expires_at,
                        },
                        Some(Entry::Claimed(lease_until, epoch, _)),
                    ) => {
                        assert_eq!((holder_epoch, expires_at), (epoch, lease_until));
                    }
                    (Claim::Acquired(token), None) => {
                        assert_eq!(token.epoch(), m.epoch(p));
                        m.next_claim += 1;
                        let entry = Entry::Claimed(m.now + lease, m.epoch(p), m.next_claim);
                        m.marks.insert((p, k), entry);
                        tokens.push((token, p, k, m.next_claim));
                    }
                    (got, want) => panic!("claim {p} {k}: got {got:?}, model has {want:?}"),
                }
            }
            Op::Confirm(i) | Op::Release(i) => {
                if tokens.is_empty() {
                    continue;
                }
                let (token, p, k, id) = tokens[i % tokens.len()].clone();
                let confirm = matches!(op, Op::Confirm(_));
                let r = if confirm {
                    s.confirm(&token)
                } else {
                    s.release(&token)
                };
                if !m.assigned.contains(&p) {
                    not_assigned(r);
                } else if token.epoch() != m.epoch(p) {
                    assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
                } else if matches!(
                    m.marks.get(&(p, k)),
                    Some(Entry::Claimed(lease, _, c)) if *c == id && m.now < lease + TTL_MS
                ) {
                    r.unwrap();
                    if confirm {
                        m.marks.insert((p, k), Entry::Done(m.now + TTL_MS));
                    } else {
                        m.marks.remove(&(p, k));
                    }
                } else {
                    assert!(matches!(r, Err(Error::ClaimLost { .. })), "{r:?}");
                }
            }
            Op::AssignEpoch(p, e) => {
                let r = s.assign_with_epoch(&part(p), e);
                if e < m.epoch(p) {
                    assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    m.epochs.insert(p, e);
                    m.assigned.insert(p);
                }
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(ms));
                m.now += ms;
            }
            Op::Compact(p) => {
                let r = s.compact(&part(p));
                if m.assigned.contains(&p) {
                    r.unwrap();
                } else {
                    not_assigned(r);
                }
            }
            Op::Reopen { clean, table_bytes } => {
                let s = store.take().unwrap();
                if clean {
                    s.close().unwrap();
                } else {
                    drop(s);
                }
                store = Some(Store::open(dir, opts(table_bytes)).unwrap());
                m.assigned.clear();
            }
        }
        // Offsets always agree.
        let s = store.as_ref().unwrap();
        for &p in &m.assigned {
            assert_eq!(
                s.committed_offset(&part(p)).unwrap(),
                m.offsets.get(&p).copied()
            );
            assert_eq!(s.epoch(&part(p)).unwrap(), m.epoch(p));
        }
    }
    // Finally, after a compaction, every key of every partition agrees.
    let s = store.as_ref().unwrap();
    for p in 0..PARTITIONS {
        s.assign(&part(p)).unwrap();
        s.compact(&part(p)).unwrap();
        for k in 0..KEYS {
            assert_eq!(
                s.check(&part(p), &key(k)).unwrap(),
                m.verdict(p, k),
                "final {p} {k}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        ops in proptest::collection::vec(op(), 1..60),
        refresh_on_duplicate in any::<bool>(),
        table_bytes in table_bytes(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), ops, refresh_on_duplicate, table_bytes);
    }
}
