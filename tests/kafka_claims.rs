//! Claim mode on librdkafka's in-process mock cluster: a consumer that dies
//! between a side effect and its confirm leaves a claim, and whoever gets the
//! partition next, another instance through the changelog or the same one
//! after a restart, hands that key to the application in doubt, never as
//! new. The same crash in the plain loop applies the side effect twice,
//! which shows that the scenario can fail.

mod kafka_support;

use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::message::Message;
use exactly::kafka::{ConsumeError, Delivery};

use kafka_support::*;

/// What the handlers saw.
#[derive(Default, Debug)]
struct Seen {
    /// Keys delivered in doubt.
    in_doubt: BTreeSet<String>,
    /// In-doubt deliveries, counting a retried one again.
    in_doubt_deliveries: usize,
    /// Keys delivered as new whose side effect had already been applied:
    /// the promise broken.
    new_but_applied: Vec<String>,
}

fn text(key: &[u8]) -> String {
    String::from_utf8(key.to_vec()).unwrap()
}

/// Polls in claim mode until the store's offsets reach `ends`. A new key's
/// side effect is applied; an in-doubt key's only if the sink has not seen
/// it, as an application would ask the downstream system by the key. With
/// `fail_in_doubt_once`, the first in-doubt lookup fails (the downstream
/// system did not answer), and the handler returns an error.
fn run_claimed(
    instance: &mut Instance,
    ends: &HashMap<i32, i64>,
    sink: &Sink,
    seen: &mut Seen,
    mut fail_in_doubt_once: bool,
) {
    let started = Instant::now();
    while !instance.reached(ends) {
        let result = instance.consumer.poll_batch_claimed(
            Duration::from_millis(100),
            |_, key, delivery, _| {
                let key = key.expect("keyed");
                match delivery {
                    Delivery::New => {
                        if sink.applied(key) > 0 {
                            seen.new_but_applied.push(text(key));
                        }
                        sink.apply(key);
                    }
                    Delivery::InDoubt { .. } => {
                        seen.in_doubt.insert(text(key));
                        seen.in_doubt_deliveries += 1;
                        if fail_in_doubt_once {
                            fail_in_doubt_once = false;
                            return Err("the downstream lookup timed out");
                        }
                        if sink.applied(key) == 0 {
                            sink.apply(key);
                        }
                    }
                }
                Ok(())
            },
        );
        match result {
            Ok(_) | Err(ConsumeError::Handler { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "did not reach {ends:?}: store offsets {:?}",
            instance.offsets()
        );
    }
}

/// Polls until a poll batch hands messages to the handler, which applies
/// `crash_after` side effects and then dies (a panic) before the batch
/// confirms anything; returns the keys it applied in that batch.
fn crash_in_a_handler(
    instance: &mut Instance,
    sink: &Sink,
    claimed: bool,
    crash_after: usize,
) -> Vec<String> {
    let mut applied = Vec::new();
    let started = Instant::now();
    loop {
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut handle = |key: Option<&[u8]>| {
                let key = key.expect("keyed");
                sink.apply(key);
                applied.push(text(key));
                assert!(applied.len() < crash_after, "the process dies here");
            };
            if claimed {
                instance
                    .consumer
                    .poll_batch_claimed(Duration::from_millis(100), |_, key, delivery, _| {
                        assert_eq!(delivery, Delivery::New);
                        handle(key);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .map(|_| ())
            } else {
                instance
                    .consumer
                    .poll_batch(Duration::from_millis(100), |_, key| {
                        handle(key);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .map(|_| ())
            }
        }));
        match result {
            Err(_) => return applied,
            Ok(r) => r.unwrap(),
        }
        assert!(started.elapsed() < DEADLINE, "no batch reached the handler");
    }
}

/// Instance A processes a first run of keys, then dies in a handler of the
/// next poll batch; the partitions then go to B (another store directory,
/// restored from the changelog) or back to A (restarted on its own store).
/// Returns the sink, what the last handlers saw, and the keys A applied in
/// the batch it died in.
fn die_then_resume(claimed: bool, changelog: bool, same_store: bool) -> (Sink, Seen, Vec<String>) {
    let (_cluster, servers) = cluster();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, 0..40, &mut ends);

    let mut a = Instance::start(&servers, dirs.0.path(), "a", changelog);
    let mut seen = Seen::default();
    if claimed {
        run_claimed(&mut a, &ends, &sink, &mut seen, false);
    } else {
        a.run_to(&ends, &sink);
    }
    produce(&servers, 40..80, &mut ends);
    let died = crash_in_a_handler(&mut a, &sink, claimed, 3);
    // The process is gone: no revocation, no clean close.
    drop(a);

    let dir = if same_store {
        dirs.0.path()
    } else {
        dirs.1.path()
    };
    let mut b = Instance::start(&servers, dir, if same_store { "a" } else { "b" }, changelog);
    let mut seen = Seen::default();
    if claimed {
        // The first in-doubt key's handler fails: its claim must stay, and
        // the key come back in doubt, never as new.
        run_claimed(&mut b, &ends, &sink, &mut seen, true);
    } else {
        b.run_to(&ends, &sink);
    }
    b.stop();
    assert_eq!(sink.count(), 80, "every key applied");
    (sink, seen, died)
}

fn assert_in_doubt_never_twice(sink: &Sink, seen: &Seen, died: &[String]) {
    assert_eq!(
        seen.new_but_applied,
        Vec::<String>::new(),
        "delivered as new after its side effect"
    );
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    assert_eq!(died.len(), 3);
    for key in died {
        assert!(
            seen.in_doubt.contains(key),
            "{key} was applied, then not reported in doubt: {seen:?}"
        );
    }
    assert!(
        seen.in_doubt_deliveries > seen.in_doubt.len(),
        "the key whose in-doubt handler failed was not delivered in doubt again: {seen:?}"
    );
}

#[test]
fn a_claim_left_by_an_instance_that_died_reaches_the_next_owner_in_doubt() {
    let (sink, seen, died) = die_then_resume(true, true, false);
    assert_in_doubt_never_twice(&sink, &seen, &died);
}

#[test]
fn a_claim_left_by_a_crash_reaches_the_restarted_instance_in_doubt() {
    // Local store only, no changelog: the claims are in the store.
    let (sink, seen, died) = die_then_resume(true, false, true);
    assert_in_doubt_never_twice(&sink, &seen, &died);
}

#[test]
fn the_plain_loop_applies_twice_what_a_dying_instance_applied() {
    // The control: the same death in the plain changelog loop. Its marks
    // were never written, so the next owner applies those keys again.
    let (sink, seen, died) = die_then_resume(false, true, false);
    assert!(seen.in_doubt.is_empty());
    let mut died = died;
    died.sort();
    assert_eq!(
        sink.twice(),
        died,
        "the control must apply the dying batch's keys twice"
    );
}

#[test]
fn a_failed_handler_releases_its_claims_and_a_key_twice_in_a_batch_is_handled_once() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::default();
    let mut ends = HashMap::new();
    // Key 0 twice in a row on partition 0, and key 8 after it.
    produce(&servers, [0, 0, 4, 8, 1, 2, 3], &mut ends);
    let mut a = Instance::start(&servers, dir.path(), "a", true);
    let mut failed_once = false;
    let mut deliveries: Vec<(String, Delivery)> = Vec::new();
    let mut in_this_poll: Vec<i32> = Vec::new();
    let started = Instant::now();
    while !a.reached(&ends) {
        let result =
            a.consumer
                .poll_batch_claimed(Duration::from_millis(100), |m, key, delivery, _| {
                    let key = key.expect("keyed");
                    deliveries.push((text(key), delivery));
                    in_this_poll.push(m.partition());
                    if text(key) == "order-4" && !failed_once {
                        failed_once = true;
                        return Err(format!(
                            "downstream refused {} at {}",
                            text(key),
                            m.offset()
                        ));
                    }
                    sink.apply(key);
                    Ok(())
                });
        match result {
            Ok(report) => assert_eq!(report.in_doubt, 0),
            Err(ConsumeError::Handler { source, .. }) => {
                assert!(source.contains("order-4"));
                // Partitions are handled in order; none after the failed
                // one is handled in the same poll.
                assert!(
                    in_this_poll.iter().all(|&p| p == 0),
                    "handled after the error: {in_this_poll:?}"
                );
            }
            Err(e) => panic!("{e}"),
        }
        in_this_poll.clear();
        assert!(started.elapsed() < DEADLINE, "did not reach {ends:?}");
    }
    a.stop();
    assert!(failed_once);
    assert_eq!(sink.twice(), Vec::<String>::new());
    assert_eq!(sink.count(), 6);
    // Released, not left in doubt: the failed key came again as new.
    let fours: Vec<Delivery> = deliveries
        .iter()
        .filter(|(k, _)| k == "order-4")
        .map(|(_, d)| *d)
        .collect();
    assert_eq!(fours, [Delivery::New, Delivery::New]);
    assert!(deliveries.iter().all(|(_, d)| *d == Delivery::New));
    assert_eq!(
        deliveries.iter().filter(|(k, _)| k == "order-0").count(),
        1,
        "{deliveries:?}"
    );
}

#[test]
fn a_claim_lease_too_short_to_outlast_the_handlers_is_refused() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Instance::start(&servers, dir.path(), "a", false);
    let Instance { consumer, store } = a;
    let mut consumer = consumer.claim_lease(Duration::from_millis(10));
    let result = consumer.poll_batch_claimed(Duration::ZERO, |_, _, _, _| {
        Ok::<(), std::convert::Infallible>(())
    });
    assert!(
        matches!(&result, Err(ConsumeError::Store(exactly::Error::InvalidOptions(m))) if m.contains("claim_lease")),
        "{result:?}"
    );
    drop(consumer);
    drop(store);
}
