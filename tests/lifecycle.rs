//! The processing lifecycle: claims with leases, confirm and release, epoch
//! fencing, TTL refresh policies, per-key TTLs and event time.

mod common;

use std::time::Duration;

use common::{open, options, orders, T0, TTL};
use exactly::{Claim, Error, ManualClock, Store, TimeDomain, TtlRefresh, Verdict};

const LEASE: Duration = Duration::from_secs(30);

fn acquired(c: Claim) -> exactly::ClaimToken {
    match c {
        Claim::Acquired(t) => t,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[test]
fn claim_confirm_release_walk_the_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();

    let token = acquired(store.claim(&p, b"k", LEASE).unwrap());
    // In flight: another claim sees the holder, and marking treats it as taken.
    assert!(matches!(
        store.claim(&p, b"k", LEASE).unwrap(),
        Claim::InFlight { holder_epoch: 0, expires_at } if expires_at == T0 + 30_000
    ));
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::Duplicate);

    // Release: the key can be processed again.
    store.release(&token).unwrap();
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New);
    assert!(matches!(
        store.release(&token),
        Err(Error::ClaimLost { .. })
    ));

    // Claim again and confirm: done, for the TTL from the confirmation.
    let token = acquired(store.claim(&p, b"k", LEASE).unwrap());
    clock.advance(Duration::from_secs(10));
    store.confirm(&token).unwrap();
    assert!(matches!(store.claim(&p, b"k", LEASE).unwrap(), Claim::Done));
    assert!(matches!(
        store.confirm(&token),
        Err(Error::ClaimLost { .. })
    ));
    clock.advance(TTL - Duration::from_millis(1));
    assert_eq!(store.check(&p, b"k").unwrap(), Verdict::Duplicate);
    clock.advance(Duration::from_millis(1));
    assert!(matches!(
        store.claim(&p, b"k", LEASE).unwrap(),
        Claim::Acquired(_)
    ));
}

#[test]
fn a_crashed_processors_claim_is_taken_over_after_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    let stale = acquired(store.claim(&p, b"order-7", LEASE).unwrap());
    drop(store); // the processor dies mid side effect

    let store = Store::open(dir.path(), options(&clock)).unwrap();
    store.assign(&p).unwrap();
    // The restarted process sees the claim in flight until the lease runs out.
    assert!(matches!(
        store.claim(&p, b"order-7", LEASE).unwrap(),
        Claim::InFlight { .. }
    ));
    assert_eq!(
        store.check_and_mark(&p, b"order-7").unwrap(),
        Verdict::Duplicate
    );
    clock.advance(LEASE);
    let fresh = acquired(store.claim(&p, b"order-7", LEASE).unwrap());
    // The old token is refused; the new one confirms.
    assert!(matches!(
        store.confirm(&stale),
        Err(Error::ClaimLost { .. })
    ));
    assert!(matches!(
        store.release(&stale),
        Err(Error::ClaimLost { .. })
    ));
    store.confirm(&fresh).unwrap();
    assert_eq!(store.check(&p, b"order-7").unwrap(), Verdict::Duplicate);
}

#[test]
fn an_expired_claim_nobody_took_over_can_still_be_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    let token = acquired(store.claim(&p, b"slow", LEASE).unwrap());
    clock.advance(LEASE * 2);
    assert_eq!(store.check(&p, b"slow").unwrap(), Verdict::New);
    store.confirm(&token).unwrap();
    assert_eq!(store.check(&p, b"slow").unwrap(), Verdict::Duplicate);
}

#[test]
fn a_batch_confirms_claims_and_commits_the_offset_in_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    let tokens: Vec<_> = (0..5)
        .map(|i| acquired(store.claim(&p, format!("m{i}").as_bytes(), LEASE).unwrap()))
        .collect();
    let mut batch = store.batch(&p).unwrap();
    for t in &tokens[..4] {
        batch.confirm(t).unwrap();
    }
    batch.release(&tokens[4]).unwrap();
    batch.set_offset(5);
    batch.commit().unwrap();
    drop(store);

    let store = Store::open(dir.path(), options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.committed_offset(&p).unwrap(), Some(5));
    for i in 0..4 {
        assert_eq!(
            store.check(&p, format!("m{i}").as_bytes()).unwrap(),
            Verdict::Duplicate
        );
    }
    assert_eq!(store.check(&p, b"m4").unwrap(), Verdict::New);

    // A batch dropped without commit confirms nothing.
    let t = acquired(store.claim(&p, b"m9", LEASE).unwrap());
    {
        let mut batch = store.batch(&p).unwrap();
        batch.confirm(&t).unwrap();
    }
    assert!(matches!(
        store.claim(&p, b"m9", LEASE).unwrap(),
        Claim::InFlight { .. }
    ));
}

#[test]
fn a_zombies_batch_is_refused_after_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign_with_epoch(&p, 1).unwrap();
    assert_eq!(store.epoch(&p).unwrap(), 1);
    let zombie_claim = acquired(store.claim(&p, b"z", LEASE).unwrap());
    assert_eq!(zombie_claim.epoch(), 1);

    // Rebalance: the partition moves to generation 2 (in this process).
    store.assign_with_epoch(&p, 2).unwrap();
    let mut zombie = store.batch(&p).unwrap();
    zombie.fence(1);
    assert_eq!(zombie.check_and_mark(b"a").unwrap(), Verdict::New);
    zombie.set_offset(10);
    assert!(matches!(
        zombie.commit(),
        Err(Error::Fenced {
            current: 2,
            attempted: 1,
            ..
        })
    ));
    assert!(matches!(
        store.confirm(&zombie_claim),
        Err(Error::Fenced { .. })
    ));
    assert_eq!(store.check(&p, b"a").unwrap(), Verdict::New);
    assert_eq!(store.committed_offset(&p).unwrap(), None);

    // The current owner writes.
    let mut owner = store.batch(&p).unwrap();
    owner.fence(2);
    owner.mark(b"a").unwrap();
    owner.set_offset(10);
    owner.commit().unwrap();

    // The epoch never goes backwards, across revoke and reopen too.
    assert!(matches!(
        store.assign_with_epoch(&p, 1),
        Err(Error::Fenced {
            current: 2,
            attempted: 1,
            ..
        })
    ));
    store.revoke(&p).unwrap();
    assert!(matches!(
        store.assign_with_epoch(&p, 1),
        Err(Error::Fenced { .. })
    ));
    assert!(store.assigned().is_empty());
    store.close().unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.epoch(&p).unwrap(), 2);
    store.assign_with_epoch(&p, 3).unwrap();
    assert_eq!(store.epoch(&p).unwrap(), 3);
}

#[test]
fn ttl_refresh_on_duplicate_extends_expiry_first_seen_does_not() {
    for (refresh, alive_at_end) in [
        (TtlRefresh::FirstSeen, false),
        (TtlRefresh::OnDuplicate, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let store = Store::open(dir.path(), options(&clock).ttl_refresh(refresh)).unwrap();
        let p = orders(0);
        store.assign(&p).unwrap();
        store.mark(&p, b"k").unwrap();
        clock.advance(TTL / 2);
        assert_eq!(store.check_and_mark(&p, b"k").unwrap(), Verdict::Duplicate);
        clock.advance(TTL / 2);
        let expected = if alive_at_end {
            Verdict::Duplicate
        } else {
            Verdict::New
        };
        assert_eq!(store.check(&p, b"k").unwrap(), expected, "{refresh:?}");
        // `check` never extends anything.
        clock.advance(TTL / 2);
        assert_eq!(store.check(&p, b"k").unwrap(), Verdict::New, "{refresh:?}");
    }
}

#[test]
fn a_per_key_ttl_overrides_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open(dir.path());
    let p = orders(0);
    store.assign(&p).unwrap();
    store.mark_with_ttl(&p, b"long", TTL * 10).unwrap();
    store.mark(&p, b"short").unwrap();
    assert!(matches!(
        store.mark_with_ttl(&p, b"x", Duration::ZERO),
        Err(Error::InvalidOptions(_))
    ));
    clock.advance(TTL * 5);
    assert_eq!(store.check(&p, b"short").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"long").unwrap(), Verdict::Duplicate);
    // It survives reopen (the expiry is in the value) and compaction.
    store.compact(&p).unwrap();
    store.close().unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"long").unwrap(), Verdict::Duplicate);
    clock.advance(TTL * 5);
    assert_eq!(store.check(&p, b"long").unwrap(), Verdict::New);
}

/// A stream of (event time, key) with duplicates spread over time.
fn stream() -> Vec<(u64, String)> {
    let ttl_ms = TTL.as_millis() as u64;
    (0..400u64)
        .map(|i| {
            let t = T0 + i * ttl_ms / 50; // 8 TTLs of event time
                                          // Every 7th message repeats a key from 3 messages ago (well inside
                                          // the TTL); every 11th repeats one from 100 messages ago (outside).
            let id = if i % 7 == 0 && i >= 3 {
                i - 3
            } else if i % 11 == 0 && i >= 100 {
                i - 100
            } else {
                i
            };
            (t, format!("key-{id}"))
        })
        .collect()
}

fn run_event_time(store: &Store, p: &exactly::Partition) -> Vec<Verdict> {
    stream()
        .into_iter()
        .map(|(t, key)| {
            let mut batch = store.batch(p).unwrap();
            let v = batch.check_and_mark_at(key.as_bytes(), t).unwrap();
            batch.commit().unwrap();
            v
        })
        .collect()
}

#[test]
fn event_time_dedup_of_a_replayed_backlog_matches_the_live_run() {
    let event_opts = |clock: &ManualClock| options(clock).time_domain(TimeDomain::EventTime);
    // Live: processing time moves with the events.
    let live_dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let live = Store::open(live_dir.path(), event_opts(&clock)).unwrap();
    let p = orders(0);
    live.assign(&p).unwrap();
    let live_verdicts = run_event_time(&live, &p);

    // Replay: the same backlog a year later, all at once.
    let replay_dir = tempfile::tempdir().unwrap();
    let late = ManualClock::new(T0 + 365 * 24 * 3600 * 1000);
    let replay = Store::open(replay_dir.path(), event_opts(&late)).unwrap();
    replay.assign(&p).unwrap();
    let replay_verdicts = run_event_time(&replay, &p);
    assert_eq!(live_verdicts, replay_verdicts);

    // And the verdicts are the right ones, by a model: a key is a duplicate
    // while the watermark (the highest event time committed before it) is
    // below its first mark's event time plus the TTL.
    let ttl_ms = TTL.as_millis() as u64;
    let mut marked = std::collections::HashMap::new();
    let mut watermark = 0;
    let expected: Vec<Verdict> = stream()
        .into_iter()
        .map(|(t, key)| {
            let live = marked
                .get(&key)
                .is_some_and(|&m: &u64| watermark < m + ttl_ms);
            if !live {
                marked.insert(key, t);
            }
            watermark = watermark.max(t);
            if live {
                Verdict::Duplicate
            } else {
                Verdict::New
            }
        })
        .collect();
    assert_eq!(live_verdicts, expected);
    assert!(
        expected
            .iter()
            .filter(|v| **v == Verdict::Duplicate)
            .count()
            > 40
    );

    // Processing time does not expire event-time marks.
    late.advance(TTL * 100);
    let (_, last_key) = stream().pop().unwrap();
    assert_eq!(
        replay.check(&p, last_key.as_bytes()).unwrap(),
        Verdict::Duplicate
    );
}

#[test]
fn event_time_watermark_survives_reopen_and_drives_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = || {
        options(&clock)
            .time_domain(TimeDomain::EventTime)
            .allowed_lateness(Duration::from_secs(60))
    };
    let store = Store::open(dir.path(), opts()).unwrap();
    let p = orders(0);
    store.assign(&p).unwrap();
    store.mark_at(&p, b"old", T0).unwrap();
    let ttl_ms = TTL.as_millis() as u64;
    // The watermark trails the highest event time by the allowed lateness.
    store.mark_at(&p, b"new", T0 + ttl_ms + 30_000).unwrap();
    assert_eq!(store.check(&p, b"old").unwrap(), Verdict::Duplicate);
    store.mark_at(&p, b"newer", T0 + ttl_ms + 60_000).unwrap();
    assert_eq!(store.check(&p, b"old").unwrap(), Verdict::New);
    store.close().unwrap();

    let store = Store::open(dir.path(), opts()).unwrap();
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, b"old").unwrap(), Verdict::New);
    assert_eq!(store.check(&p, b"new").unwrap(), Verdict::Duplicate);
    store.compact(&p).unwrap();
    assert_eq!(store.stats().partitions[&p].expired_dropped, 1);
    assert_eq!(store.check(&p, b"new").unwrap(), Verdict::Duplicate);

    // The time domain is fixed at creation.
    store.close().unwrap();
    assert!(matches!(
        Store::open(dir.path(), options(&clock)),
        Err(Error::IncompatibleOptions {
            option: "time_domain",
            ..
        })
    ));
}
