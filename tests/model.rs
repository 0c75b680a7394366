//! A model test: random operation sequences, with reopens, against a simple
//! in-memory model. A tiny key space makes keys collide.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use exactly::{Error, ManualClock, Options, Partition, Store, Verdict};
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
        commit: bool,
    },
    Advance(u64),
    Compact(i32),
    Reopen {
        clean: bool,
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
            proptest::bool::weighted(0.85)
        )
            .prop_map(|(p, ops, offset_delta, commit)| Op::Batch {
                p,
                ops,
                offset_delta,
                commit
            }),
        3 => (0..TTL_MS + 300).prop_map(Op::Advance),
        2 => p.prop_map(Op::Compact),
        2 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

#[derive(Default)]
struct Model {
    now: u64,
    marks: HashMap<(i32, u8), u64>,
    offsets: HashMap<i32, i64>,
    assigned: BTreeSet<i32>,
}

impl Model {
    fn live(&self, p: i32, k: u8) -> bool {
        self.marks.get(&(p, k)).is_some_and(|&e| self.now < e)
    }

    fn verdict(&self, p: i32, k: u8) -> Verdict {
        if self.live(p, k) {
            Verdict::Duplicate
        } else {
            Verdict::New
        }
    }

    fn check_and_mark(&mut self, p: i32, k: u8) -> Verdict {
        let v = self.verdict(p, k);
        if v == Verdict::New {
            self.marks.insert((p, k), self.now + TTL_MS);
        }
        v
    }
}

fn part(p: i32) -> Partition {
    Partition::new("t", p)
}

fn key(k: u8) -> [u8; 3] {
    [b'k', b'-', b'a' + k]
}

fn options(clock: &ManualClock) -> Options {
    Options::default()
        .ttl(Duration::from_millis(TTL_MS))
        .expected_keys_per_partition(16)
        .bloom_fp_rate(0.3) // many false positives: they must all be confirmed away
        .clock(clock.clone())
}

fn not_assigned<T: std::fmt::Debug>(r: exactly::Result<T>) {
    assert!(matches!(r, Err(Error::NotAssigned(_))), "{r:?}");
}

fn run(dir: &Path, ops: Vec<Op>) {
    let clock = ManualClock::new(common::T0);
    let mut store = Some(Store::open(dir, options(&clock)).unwrap());
    let mut m = Model {
        now: common::T0,
        ..Model::default()
    };
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
                commit,
            } => {
                let b = s.batch(&part(p));
                if !m.assigned.contains(&p) {
                    not_assigned(b);
                    continue;
                }
                let mut b = b.unwrap();
                let mut staged = HashMap::new();
                for bop in ops {
                    let k = match bop {
                        BatchOp::CheckAndMark(k) | BatchOp::Mark(k) => k,
                    };
                    let expected = if staged.contains_key(&k) || m.live(p, k) {
                        Verdict::Duplicate
                    } else {
                        staged.insert(k, m.now + TTL_MS);
                        Verdict::New
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
            Op::Reopen { clean } => {
                let s = store.take().unwrap();
                if clean {
                    s.close().unwrap();
                } else {
                    drop(s);
                }
                store = Some(Store::open(dir, options(&clock)).unwrap());
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
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), ops);
    }
}
