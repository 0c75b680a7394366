//! TTL behaviour under a manual clock: no sleeping.

mod common;

use std::time::Duration;

use common::{open, options, orders, T0, TTL};
use exactly::{ManualClock, Store, Verdict};

#[test]
fn a_key_is_a_duplicate_exactly_until_its_ttl_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();

    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::New);
    clock.advance(TTL - Duration::from_millis(1));
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
    // An expired key can be marked again, with a fresh TTL.
    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::New);
    clock.advance(TTL - Duration::from_millis(1));
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
}

#[test]
fn marking_a_live_key_again_does_not_extend_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();

    store.mark(&p, b"k").unwrap();
    clock.advance(TTL / 2);
    store.mark(&p, b"k").unwrap();
    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::Duplicate);
    let mut batch = store.batch(&p).unwrap();
    assert_eq!(batch.check_and_mark(b"k").unwrap(), Verdict::Duplicate);
    batch.commit().unwrap();
    clock.advance(TTL / 2);
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
}

#[test]
fn expiry_holds_across_reopen_without_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    store.mark(&p, b"old").unwrap();
    clock.advance(TTL / 2);
    store.mark(&p, b"young").unwrap();
    store.close().unwrap();

    clock.advance(TTL / 2);
    let store = exactly::Store::open(dir.path(), common::options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"old").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"young").unwrap(), Verdict::Duplicate);
}

#[test]
fn compaction_drops_expired_marks_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    let mut batch = store.batch(&p).unwrap();
    for i in 0..1_000u32 {
        batch.mark(format!("old-{i}").as_bytes()).unwrap();
    }
    batch.set_offset(1_000);
    batch.commit().unwrap();
    clock.advance(TTL / 2);
    for i in 0..10u32 {
        store.mark(&p, format!("young-{i}").as_bytes()).unwrap();
    }
    clock.advance(TTL / 2);

    store.compact(&p).unwrap();
    let stats = &store.stats().partitions[&p];
    assert_eq!(stats.expired_dropped, 1_000);
    // 10 live marks and the offset remain.
    assert!(
        stats.live_keys_estimate <= 11,
        "{} keys left",
        stats.live_keys_estimate
    );
    for i in 0..10u32 {
        assert_eq!(
            store.check(&p, format!("young-{i}").as_bytes()).unwrap(),
            Verdict::Duplicate
        );
    }
    assert_eq!(store.check(&p, b"old-7").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), Some(1_000));

    // And after reopen, the offset (metadata) survived the compaction filter.
    store.close().unwrap();
    let store = exactly::Store::open(dir.path(), common::options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.committed_offset(&p).unwrap(), Some(1_000));
    assert_eq!(store.check(&p, b"young-3").unwrap(), Verdict::Duplicate);
}

#[test]
fn a_clock_stepping_back_does_not_revive_expired_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    store.mark(&p, b"k").unwrap();
    clock.advance(TTL);
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
    clock.set(common::T0);
    // The store's time stands still at its high-water mark.
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
}

#[test]
fn the_filter_stays_accurate_over_ten_ttls_of_steady_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let clock = exactly::ManualClock::new(common::T0);
    let n = 2_000usize;
    let store = exactly::Store::open(
        dir.path(),
        common::options(&clock).expected_keys_per_partition(n),
    )
    .unwrap();
    let p = orders(0);
    store.assign(&p).unwrap();
    let step = TTL / n as u32;
    let mut memory_after_two_ttls = 0;
    for i in 0..10 * n {
        let mut batch = store.batch(&p).unwrap();
        assert_eq!(
            batch.check_and_mark(format!("m-{i}").as_bytes()).unwrap(),
            Verdict::New
        );
        batch.commit().unwrap();
        clock.advance(step);
        if i == 2 * n {
            memory_after_two_ttls = store.stats().partitions[&p].filter_bytes;
        }
    }
    let before = store.stats().partitions[&p].clone();
    let probes = 20_000u64;
    for i in 0..probes {
        assert_eq!(
            store.check(&p, format!("never-{i}").as_bytes()).unwrap(),
            Verdict::New
        );
    }
    let after = store.stats().partitions[&p].clone();
    let false_positives = after.bloom_false_positives - before.bloom_false_positives;
    let rate = false_positives as f64 / probes as f64;
    assert!(rate <= 0.02, "false-positive rate {rate} over 2x 0.01");
    assert!(after.filter_bytes <= memory_after_two_ttls + memory_after_two_ttls / 4);
    // Recent keys are still duplicates.
    let last = 10 * n - 1;
    assert_eq!(
        store.check(&p, format!("m-{last}").as_bytes()).unwrap(),
        Verdict::Duplicate
    );
}

#[test]
fn a_clock_stepping_back_across_a_restart_keeps_answers_consistent() {
    // Two marks of the same age in two partitions; only one partition is
    // compacted after they expire. A clock that steps back across a restart
    // must not see one as expired (its mark compacted away) and the other as
    // live: the store's time resumes where it was recorded.
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let (compacted, kept) = (orders(0), orders(1));
    store.assign(&compacted).unwrap();
    store.assign(&kept).unwrap();
    store.mark(&compacted, b"a").unwrap();
    store.mark(&kept, b"c").unwrap();
    clock.advance(2 * TTL);
    store.compact(&compacted).unwrap();
    assert!(store.stats().partitions[&compacted].expired_dropped >= 1);
    store.close().unwrap();

    let stepped_back = ManualClock::new(T0 + TTL.as_millis() as u64 / 2);
    let store = Store::open(dir.path(), options(&stepped_back)).unwrap();
    store.assign(&compacted).unwrap();
    store.assign(&kept).unwrap();
    assert_eq!(store.check(&compacted, b"a").unwrap(), Verdict::New);
    assert_eq!(
        store.check(&kept, b"c").unwrap(),
        Verdict::New,
        "the kept mark expired by the store's recorded time"
    );
    // A key marked now lives a full TTL from the store's time, not the
    // clock's: it is still a duplicate when the clock catches up.
    store.mark(&kept, b"d").unwrap();
    stepped_back.set(T0 + 2 * TTL.as_millis() as u64 + TTL.as_millis() as u64 - 1);
    assert_eq!(store.check(&kept, b"d").unwrap(), Verdict::Duplicate);
}

#[test]
fn a_snapshot_taken_later_than_a_restart_resumes_at_is_not_trusted() {
    // The filter drops a generation once every key in it has expired, and a
    // snapshot saved at revoke keeps only what is left. After a crash the
    // store resumes at the time its ledger recorded, which may be before
    // that: with the clock stepped back, a mark the snapshot no longer holds
    // is live again, and must still be a duplicate (and a claim the snapshot
    // dropped still in flight).
    let window = TTL.as_millis() as u64 / 4;
    let at = |quarters: u64| T0 + quarters * window / 10;
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    // Expires at 4.5 windows: its generation is dropped from 5 windows on.
    clock.set(at(5));
    store.mark(&p, b"k").unwrap();
    // A claim whose lease runs from 4.2 to 4.6 windows; the commit records
    // the store's time (4.2 windows) in the ledger, more than a window after
    // the last record.
    clock.set(at(42));
    let claimed = store.claim(&p, b"c", Duration::from_millis(4 * window / 10));
    assert!(matches!(claimed, Ok(exactly::Claim::Acquired(_))));
    // At 5 windows a commit drops k's generation, and a new claim makes the
    // table forget c's lapsed lease; the ledger is not written again (less
    // than a window since the last record).
    clock.set(at(50));
    store.mark(&p, b"k2").unwrap();
    assert!(matches!(
        store.claim(&p, b"c2", Duration::from_secs(1)),
        Ok(exactly::Claim::Acquired(_))
    ));
    store.revoke(&p).unwrap();
    // A crash: no close, so the ledger keeps 4.2 windows.
    drop(store);

    let stepped_back = ManualClock::new(at(43));
    let store = Store::open(dir.path(), options(&stepped_back)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    assert!(matches!(
        store.claim(&p, b"c", Duration::from_secs(1)),
        Ok(exactly::Claim::InFlight { .. })
    ));
    // The snapshot was set aside: the filter was rebuilt from disk.
    assert!(!store.stats().partitions[&p].filter_from_snapshot);
}

#[test]
fn a_larger_allowed_lateness_on_reopen_answers_the_same_whether_compaction_ran() {
    // Under event time, two identical marks in two partitions expire at the
    // watermark; one partition is compacted. Reopened with a larger
    // allowed_lateness, the watermark stays where it was (it never goes
    // back), so both marks are expired, not one gone and one live.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let event = || options(&clock).time_domain(exactly::TimeDomain::EventTime);
    let store = Store::open(dir.path(), event()).unwrap();
    let (compacted, kept) = (orders(0), orders(1));
    let ttl = TTL.as_millis() as u64;
    for p in [&compacted, &kept] {
        store.assign(p).unwrap();
        store.mark_at(p, b"old", T0).unwrap();
        // The watermark passes old's expiry.
        store.mark_at(p, b"new", T0 + 2 * ttl).unwrap();
        assert_eq!(store.check(p, b"old").unwrap(), Verdict::New);
    }
    // Compaction judges at the durable watermark: sync first.
    store.sync().unwrap();
    store.compact(&compacted).unwrap();
    assert_eq!(store.stats().partitions[&compacted].expired_dropped, 1);
    store.close().unwrap();

    let later = event().allowed_lateness(Duration::from_millis(3 * ttl / 2));
    let store = Store::open(dir.path(), later).unwrap();
    for p in [&compacted, &kept] {
        store.assign(p).unwrap();
        assert_eq!(store.check(p, b"old").unwrap(), Verdict::New, "{p}");
        assert_eq!(store.check(p, b"new").unwrap(), Verdict::Duplicate, "{p}");
    }
}

#[test]
fn compaction_never_judges_at_a_watermark_that_is_not_durable() {
    // Under Buffered durability a commit that raised the watermark can be
    // lost to a power cut; compaction must not drop marks on its word until
    // a log fsync made it durable.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = options(&clock).time_domain(exactly::TimeDomain::EventTime);
    let store = Store::open(dir.path(), opts).unwrap();
    let p = orders(0);
    let ttl = TTL.as_millis() as u64;
    store.assign(&p).unwrap();
    store.mark_at(&p, b"old", T0).unwrap();
    store.sync().unwrap();
    store.mark_at(&p, b"new", T0 + 2 * ttl).unwrap();
    assert_eq!(store.check(&p, b"old").unwrap(), Verdict::New);
    store.compact(&p).unwrap();
    assert_eq!(store.stats().partitions[&p].expired_dropped, 0);
    store.sync().unwrap();
    store.compact(&p).unwrap();
    assert_eq!(store.stats().partitions[&p].expired_dropped, 1);
}

#[test]
fn a_larger_ttl_on_reopen_does_not_revive_claims_compaction_may_have_dropped() {
    // Two identical claims whose lease and grace ran out, in two
    // partitions; one is compacted away. Reopened with a larger TTL, both
    // are lost: the claim grace is the TTL the store was created with.
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let (compacted, kept) = (orders(0), orders(1));
    let mut tokens = Vec::new();
    for p in [&compacted, &kept] {
        store.assign(p).unwrap();
        match store.claim(p, b"c", Duration::from_secs(1)).unwrap() {
            exactly::Claim::Acquired(t) => tokens.push(t),
            other => panic!("{other:?}"),
        }
    }
    clock.advance(TTL + Duration::from_secs(2));
    store.compact(&compacted).unwrap();
    assert_eq!(store.stats().partitions[&compacted].expired_dropped, 1);
    store.close().unwrap();

    let store = Store::open(dir.path(), options(&clock).ttl(4 * TTL)).unwrap();
    for (p, token) in [&compacted, &kept].into_iter().zip(&tokens) {
        store.assign(p).unwrap();
        assert!(
            matches!(store.confirm(token), Err(exactly::Error::ClaimLost { .. })),
            "{p}"
        );
    }
}
