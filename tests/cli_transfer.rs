//! `exactly export` and `exactly import` as real processes: a round trip
//! into a fresh store answers the same for every key (a property test), an
//! import into a store that has data merges without lowering anything, an
//! import invalidates the partition's filter snapshot, and a damaged export
//! is refused whole.

mod cli_support;

use std::path::Path;
use std::time::Duration;

use exactly::{Claim, Clock, Verdict};
use proptest::prelude::*;

use cli_support::{json, open_at, orders, path_str, run, stderr, FUTURE};

#[derive(Debug, Clone)]
enum Op {
    Mark(u8),
    MarkWithTtl(u8, u64),
    Claim(u8, u64),
    Unmark(u8),
    Advance(u64),
    Offset(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(|k| Op::Mark(k % 40)),
        2 => (any::<u8>(), 1u64..7_200).prop_map(|(k, s)| Op::MarkWithTtl(k % 40, s)),
        1 => (any::<u8>(), 1u64..600).prop_map(|(k, s)| Op::Claim(k % 40, s)),
        1 => any::<u8>().prop_map(|k| Op::Unmark(k % 40)),
        1 => (1u64..1_800).prop_map(Op::Advance),
        1 => (0i64..1_000).prop_map(Op::Offset),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

/// Applies `ops` to orders/0 of a new store in `dir`; returns the time it
/// closed at.
fn build(dir: &Path, ops: &[Op], epoch: u64) -> u64 {
    let (store, clock) = open_at(dir, FUTURE);
    let p = orders(0);
    store.assign_with_epoch(&p, epoch).unwrap();
    let mut offset = 0;
    for op in ops {
        match *op {
            Op::Mark(k) => store.mark(&p, &key(k)).unwrap(),
            Op::MarkWithTtl(k, s) => store
                .mark_with_ttl(&p, &key(k), Duration::from_secs(s))
                .unwrap(),
            Op::Claim(k, s) => {
                store.claim(&p, &key(k), Duration::from_secs(s)).unwrap();
            }
            Op::Unmark(k) => {
                store.unmark(&p, &key(k)).unwrap();
            }
            Op::Advance(s) => clock.advance(Duration::from_secs(s)),
            Op::Offset(o) => {
                offset = offset.max(o);
                let mut b = store.batch(&p).unwrap();
                b.set_offset(offset);
                b.commit().unwrap();
            }
        }
    }
    let now = clock.now_millis();
    store.close().unwrap();
    now
}

/// Every key's verdict, offset and epoch of orders/0, at `at`.
fn answers(dir: &Path, at: u64) -> (Vec<Verdict>, Option<i64>, u64) {
    let (store, _) = open_at(dir, at);
    let p = orders(0);
    store.assign(&p).unwrap();
    let verdicts = (0..40).map(|k| store.check(&p, &key(k)).unwrap()).collect();
    let out = (
        verdicts,
        store.committed_offset(&p).unwrap(),
        store.epoch(&p).unwrap(),
    );
    store.close().unwrap();
    out
}

/// Claims answer alike too (in flight, or free to take).
fn claims(dir: &Path, at: u64) -> Vec<bool> {
    let (store, _) = open_at(dir, at);
    let p = orders(0);
    store.assign(&p).unwrap();
    (0..40)
        .map(|k| {
            matches!(
                store.claim(&p, &key(k), Duration::from_secs(1)).unwrap(),
                Claim::InFlight { .. }
            )
        })
        .collect()
}

/// The entries `exactly inspect` shows that are live after `at`: key,
/// state, expiry (or lease end) and claim epoch.
fn live_entries(dir: &Path, at: u64) -> Vec<(String, String, u64, Option<u64>)> {
    let v = json(&["inspect", path_str(dir), "orders", "0", "--limit", "1000"]);
    let mut out: Vec<_> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["key"].as_str().expect("key").to_owned(),
                e["state"].as_str().expect("state").to_owned(),
                e["expires_at_ms"].as_u64().expect("expiry"),
                e["epoch"].as_u64(),
            )
        })
        .filter(|e| e.2 > at)
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn export_then_import_into_a_fresh_store_answers_the_same(
        ops in prop::collection::vec(op(), 1..60),
        epoch in 0u64..5,
    ) {
        let source = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let file = source.path().join("orders-0.export");
        let at = build(&source.path().join("s"), &ops, epoch);
        let s = source.path().join("s");
        let t = target.path().join("t");
        let exported = json(&["export", path_str(&s), "orders", "0", path_str(&file)]);
        let imported = json(&["import", path_str(&t), path_str(&file)]);
        prop_assert_eq!(&exported["entries"], &imported["entries"]);
        // The same expiries, key by key, and so the same answers later on.
        prop_assert_eq!(live_entries(&s, at), live_entries(&t, at));
        for later in [0, 20 * 60_000, 90 * 60_000, 3 * 3_600_000] {
            prop_assert_eq!(answers(&s, at + later), answers(&t, at + later), "{} ms later", later);
        }
        let end = at + 3 * 3_600_000;
        prop_assert_eq!(claims(&s, end), claims(&t, end));
    }
}

#[test]
fn import_merges_without_lowering_anything() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let file = work.path().join("a.export");
    let p = orders(0);
    // Source: offset 10, epoch 2, "both" marked at FUTURE (expires FUTURE + 1h).
    let (store, _) = open_at(&a, FUTURE);
    store.assign_with_epoch(&p, 2).unwrap();
    store.mark(&p, b"both").unwrap();
    store.mark(&p, b"only-a").unwrap();
    let mut batch = store.batch(&p).unwrap();
    batch.set_offset(10);
    batch.commit().unwrap();
    store.close().unwrap();
    // Target: offset 50, epoch 7, "both" marked 30 min later (expires later).
    let (store, clock) = open_at(&b, FUTURE);
    store.assign_with_epoch(&p, 7).unwrap();
    clock.advance(Duration::from_secs(1_800));
    store.mark(&p, b"both").unwrap();
    store.mark(&p, b"only-b").unwrap();
    let mut batch = store.batch(&p).unwrap();
    batch.set_offset(50);
    batch.commit().unwrap();
    store.close().unwrap();

    json(&["export", path_str(&a), "orders", "0", path_str(&file)]);
    let v = json(&["import", path_str(&b), path_str(&file)]);
    assert_eq!(v["offset_after"], 50);
    assert_eq!(v["epoch_after"], 7);
    assert_eq!(
        v["written"], 1,
        "only-a is new; both keeps the target's later expiry"
    );
    assert_eq!(v["kept"], 1);

    let later = json(&["check", path_str(&b), "orders", "0", "both"]);
    assert_eq!(
        later["keys"][0]["expires_at_ms"].as_u64(),
        Some(FUTURE + 1_800_000 + 3_600_000)
    );
    // The other way round the later expiry wins too, and the offset rises.
    let back = work.path().join("b.export");
    json(&["export", path_str(&b), "orders", "0", path_str(&back)]);
    let v = json(&["import", path_str(&a), path_str(&back)]);
    assert_eq!(v["offset_before"], 10);
    assert_eq!(v["offset_after"], 50);
    assert_eq!(v["epoch_after"], 7);
    let both = json(&["check", path_str(&a), "orders", "0", "both"]);
    assert_eq!(
        both["keys"][0]["expires_at_ms"],
        later["keys"][0]["expires_at_ms"]
    );
    for k in ["only-a", "only-b", "both"] {
        let v = json(&["check", path_str(&a), "orders", "0", k]);
        assert_eq!(v["keys"][0]["verdict"], "duplicate", "{k}");
    }
}

#[test]
fn import_invalidates_the_filter_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let file = work.path().join("a.export");
    let p = orders(0);
    let (store, _) = open_at(&a, FUTURE);
    store.assign(&p).unwrap();
    for i in 0..100 {
        store.mark(&p, format!("imported-{i}").as_bytes()).unwrap();
    }
    store.close().unwrap();
    // The target closed cleanly: its partition has a valid snapshot that
    // knows nothing of the imported keys.
    let (store, _) = open_at(&b, FUTURE);
    store.assign(&p).unwrap();
    store.mark(&p, b"local").unwrap();
    store.close().unwrap();

    json(&["export", path_str(&a), "orders", "0", path_str(&file)]);
    json(&["import", path_str(&b), path_str(&file)]);

    let (store, _) = open_at(&b, FUTURE);
    store.assign(&p).unwrap();
    assert!(!store.stats().partitions[&p].filter_from_snapshot);
    for i in 0..100 {
        assert_eq!(
            store.check(&p, format!("imported-{i}").as_bytes()).unwrap(),
            Verdict::Duplicate,
            "imported-{i}"
        );
    }
    assert_eq!(store.check(&p, b"local").unwrap(), Verdict::Duplicate);
    store.close().unwrap();

    // Importing the same file again changes no entry: the snapshot that
    // close just wrote stays valid.
    let v = json(&["import", path_str(&b), path_str(&file)]);
    assert_eq!(v["written"], 0);
    assert_eq!(v["kept"], 100);
    let (store, _) = open_at(&b, FUTURE);
    store.assign(&p).unwrap();
    assert!(store.stats().partitions[&p].filter_from_snapshot);
    assert_eq!(store.check(&p, b"imported-7").unwrap(), Verdict::Duplicate);
}

/// Sequence sources travel with an export (format version 2) and merge on
/// import: every number marked on either side stays marked, the later epoch
/// wins, and an export without sources stays version 1.
#[test]
fn sources_travel_with_an_export_and_merge_on_import() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let file = work.path().join("a.export");
    let p = orders(0);
    let (store, _) = open_at(&a, FUTURE);
    store.assign(&p).unwrap();
    store.mark(&p, b"key").unwrap();
    store.close().unwrap();
    let v = json(&["export", path_str(&a), "orders", "0", path_str(&file)]);
    assert_eq!(v["format_version"], 1, "{v}");
    assert_eq!(v["sources"], 0, "{v}");

    let (store, _) = open_at(&a, FUTURE);
    store.assign(&p).unwrap();
    for seq in [10, 12, 20] {
        store.mark_sequence(&p, b"relay", 1, seq).unwrap();
    }
    store.mark_sequence(&p, b"cdc", 4, 7).unwrap();
    store.close().unwrap();
    // The target knows the relay at the same epoch with other numbers, and
    // the connector at an older epoch.
    let (store, _) = open_at(&b, FUTURE);
    store.assign(&p).unwrap();
    for seq in [11, 25] {
        store.mark_sequence(&p, b"relay", 1, seq).unwrap();
    }
    store.mark_sequence(&p, b"cdc", 3, 100).unwrap();
    store.close().unwrap();

    let v = json(&["export", path_str(&a), "orders", "0", path_str(&file)]);
    assert_eq!(v["format_version"], 2, "{v}");
    assert_eq!(v["sources"], 2, "{v}");
    let v = json(&["import", path_str(&b), path_str(&file)]);
    assert_eq!(v["sources"], 2, "{v}");

    let (store, _) = open_at(&b, FUTURE);
    store.assign(&p).unwrap();
    for seq in [10, 11, 12, 20, 25] {
        assert_eq!(
            store.check_sequence(&p, b"relay", 1, seq).unwrap(),
            Verdict::Duplicate,
            "relay {seq}"
        );
    }
    for seq in [13, 19, 21, 24, 26] {
        assert_eq!(
            store.check_sequence(&p, b"relay", 1, seq).unwrap(),
            Verdict::New,
            "relay {seq}"
        );
    }
    assert_eq!(
        store.check_sequence(&p, b"cdc", 4, 7).unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(
        store.check_sequence(&p, b"cdc", 4, 8).unwrap(),
        Verdict::New
    );
    assert!(matches!(
        store.check_sequence(&p, b"cdc", 3, 101),
        Err(exactly::Error::SourceFenced { current: 4, .. })
    ));
    assert_eq!(store.check(&p, b"key").unwrap(), Verdict::Duplicate);
    store.close().unwrap();

    // Again: nothing changes.
    let v = json(&["import", path_str(&b), path_str(&file)]);
    assert_eq!(v["written"], 0, "{v}");
}

#[test]
fn a_damaged_export_is_refused_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let file = work.path().join("a.export");
    let (store, _) = open_at(&a, FUTURE);
    store.assign(&orders(0)).unwrap();
    for i in 0..50 {
        store.mark(&orders(0), format!("k{i}").as_bytes()).unwrap();
    }
    store.close().unwrap();
    json(&["export", path_str(&a), "orders", "0", path_str(&file)]);
    let good = std::fs::read(&file).unwrap();

    let damaged = work.path().join("damaged.export");
    let fresh = work.path().join("fresh");
    for (what, bytes) in [
        ("a flipped byte", {
            let mut v = good.clone();
            let mid = v.len() / 2;
            v[mid] ^= 0x20;
            v
        }),
        ("a cut", good[..good.len() - 5].to_vec()),
        ("no checksum", good[..good.len() - 8].to_vec()),
        (
            "not an export",
            b"hello world, this is not an export".to_vec(),
        ),
        ("trailing bytes", [good.clone(), vec![0]].concat()),
    ] {
        std::fs::write(&damaged, &bytes).unwrap();
        let o = run(&["import", path_str(&fresh), path_str(&damaged)]);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(
            stderr(&o).contains("is not a valid export"),
            "{what}: {}",
            stderr(&o)
        );
        assert!(!fresh.exists(), "{what}: a store was created");
        // Into an existing store: nothing of it lands.
        let o = run(&["import", path_str(&a), path_str(&damaged)]);
        assert!(!o.status.success(), "{what}: accepted");
    }
    let o = run(&["import", path_str(&b), path_str(&damaged)]);
    assert!(!o.status.success());
    // The good file still imports, and a store it was refused into is intact.
    json(&["import", path_str(&b), path_str(&file)]);
    let v = json(&["check", path_str(&b), "orders", "0", "k7"]);
    assert_eq!(v["keys"][0]["verdict"], "duplicate");
    let (store, _) = open_at(&a, FUTURE);
    store.assign(&orders(0)).unwrap();
    assert_eq!(store.check(&orders(0), b"k7").unwrap(), Verdict::Duplicate);
}
