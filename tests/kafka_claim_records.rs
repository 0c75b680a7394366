//! Claims and releases from other processors in a restore: a zombie's
//! claim and release after the owner's in-doubt claim, an outbox release
//! published after the next owner's takeover, and a claim made after a mark
//! expired, restored by an instance whose clock is behind. Each test states
//! the promise it checks; on the mock cluster.

mod kafka_support;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{
    changelog_topic, DedupContext, Delivery, GroupStore, IdempotentConsumer, KeySource,
};
use exactly::{ManualClock, Options, Store};

use kafka_support::zombie::*;
use kafka_support::*;

fn member_with(servers: &str, dir: &Path, name: &str, options: Options) -> Instance {
    let store = Arc::new(Store::open(dir, options).unwrap());
    let group = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers)
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let consumer = IdempotentConsumer::new(consumer, KeySource::header(HEADER))
        .max_batch(10)
        .changelog(changelog(servers, name));
    Instance { consumer, store }
}

fn member(servers: &str, dir: &Path, name: &str) -> Instance {
    member_with(servers, dir, name, Options::default())
}

/// Claim mode until the store's offsets reach `ends`: a new key is applied,
/// an in-doubt key only if the sink lacks it (the downstream lookup).
/// Returns the deliveries seen, by key.
fn run_claimed(
    instance: &mut Instance,
    ends: &HashMap<i32, i64>,
    sink: &Sink,
) -> Vec<(String, Delivery)> {
    let mut seen = Vec::new();
    let started = Instant::now();
    while !instance.reached(ends) {
        instance
            .consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, key, delivery, _| {
                let key = key.expect("keyed");
                seen.push((String::from_utf8(key.to_vec()).unwrap(), delivery));
                match delivery {
                    Delivery::New => sink.apply(key),
                    Delivery::InDoubt { .. } => {
                        if sink.applied(key) == 0 {
                            sink.apply(key);
                        }
                    }
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        assert!(started.elapsed() < DEADLINE, "did not reach {ends:?}");
    }
    seen
}

/// Promise (docs/kafka.md, claim mode): a key is never delivered as new
/// after a side effect that a claim covered; a release ends only the claim
/// it names (docs/kafka.md, records of processors that did not know the
/// current entry).
///
/// B, the owner, claims `order-0` (phase one published), applies its side
/// effect and dies before confirming: its claim in the changelog is what
/// makes the key in doubt. A zombie (whose store never saw B's claim)
/// claims the same key, its handler fails, and it releases *its own* claim:
/// the changelog now reads B's claim, Z's claim, Z's release. C restores:
/// two processors' claims keep the key in doubt under a token no release
/// names, so Z's release leaves it; `order-0` reaches C in doubt, and is
/// applied once.
#[test]
fn a_zombie_release_does_not_end_the_owners_in_doubt_claim() {
    let (_cluster, servers) = cluster();
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, [0], &mut ends);

    // B claims, applies and dies in its handler before the confirm.
    let mut b = member(&servers, dirs[0].path(), "b");
    let started = Instant::now();
    loop {
        let died = catch_unwind(AssertUnwindSafe(|| {
            b.consumer
                .poll_batch_claimed(
                    Duration::from_millis(100),
                    |_, key, _, _| -> Result<(), std::convert::Infallible> {
                        sink.apply(key.expect("keyed"));
                        panic!("B dies after its side effect")
                    },
                )
                .map(|_| ())
        }));
        match died {
            Err(_) => break,
            Ok(r) => r.unwrap(),
        }
        assert!(started.elapsed() < DEADLINE, "B handled nothing");
    }
    drop(b);
    assert_eq!(sink.applied(b"order-0"), 1);
    assert!(
        matches!(last_record_of(&servers, "order-0"), Some(Some(v)) if v[0] == 2),
        "the changelog ends with B's claim"
    );

    // The zombie's handler fails; it releases the claim it made.
    zombie_claims_and_releases(&servers, dirs[1].path());
    assert_eq!(
        last_record_of(&servers, "order-0"),
        Some(None),
        "the changelog ends with the zombie's release"
    );

    // C restores and gets the message B's claim covered.
    let mut c = member(&servers, dirs[2].path(), "c");
    let seen = run_claimed(&mut c, &ends, &sink);
    c.stop();
    assert_eq!(
        sink.applied(b"order-0"),
        1,
        "a key whose side effect B's published claim covered was delivered to C as {seen:?}"
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes records to partition 0 of the changelog, exactly as the store's
/// changelog writes them (key `0x01 ++ key`; a mark `[1, expires_at]`, a
/// claim `[2, lease_until, epoch, token]`).
fn write_changelog(servers: &str, records: &[(&[u8], Vec<u8>)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .unwrap();
    for (key, value) in records {
        producer
            .send(
                BaseRecord::to(&changelog_topic(GROUP, TOPIC))
                    .partition(0)
                    .key(*key)
                    .payload(value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

fn mark(expires_at: u64) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(&expires_at.to_be_bytes());
    v
}

fn claim(lease_until: u64, epoch: u64, token: u64) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(&lease_until.to_be_bytes());
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&token.to_be_bytes());
    v
}

/// Promise (claim mode): a key is never delivered as new after a side
/// effect that a claim covered, whatever the restorer's clock.
///
/// `order-0` was marked with an expiry of T0 + 1 s. B, whose clock reads
/// T0 + 1.5 s, finds the mark expired, claims the key with a day's lease
/// (published in phase one), applies its side effect and dies. C restores
/// with its clock at `restorer_at`: B's claim outlasts the mark, so it
/// replaces it whatever C's clock says (a rule judging the mark live at
/// C's time would drop the claim when C is behind, and deliver the key as
/// new once the mark expired). Two seconds later the key comes again and
/// reaches C in doubt; it is applied once.
fn a_claim_made_after_a_mark_expired(restorer_at: u64) {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::default();
    let t0 = now_ms();
    let key: &[u8] = b"\x01order-0";
    write_changelog(
        &servers,
        &[
            (key, mark(t0 + 1_000)),
            (key, claim(t0 + 1_500 + 86_400_000, 7, 42)),
        ],
    );
    // B applied the side effect its claim covers.
    sink.apply(b"order-0");

    let clock = ManualClock::new(t0 + restorer_at);
    let mut c = member_with(
        &servers,
        dir.path(),
        "c",
        Options::default().clock(clock.clone()),
    );
    // Restore (the input partition is empty yet).
    let started = Instant::now();
    let mut restored = false;
    while !restored {
        let report = c
            .consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, _, _, _| {
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        restored |= report.restored.iter().any(|(p, _)| *p == p0());
        assert!(started.elapsed() < DEADLINE, "C never restored");
    }
    clock.advance(Duration::from_secs(2));
    let mut ends = HashMap::new();
    produce(&servers, [0], &mut ends);
    let seen = run_claimed(&mut c, &ends, &sink);
    c.stop();
    assert_eq!(
        seen,
        [("order-0".to_string(), Delivery::InDoubt { holder_epoch: 7 })],
        "restored at T0 + {restorer_at} ms"
    );
    assert_eq!(sink.applied(b"order-0"), 1);
}

#[test]
fn a_claim_made_after_a_mark_expired_survives_a_restorer_whose_clock_is_behind() {
    a_claim_made_after_a_mark_expired(0);
}

#[test]
fn a_claim_made_after_a_mark_expired_survives_a_restorer_whose_clock_agrees() {
    a_claim_made_after_a_mark_expired(1_500);
}

/// Promise (claim mode): a key is never delivered as new after a side
/// effect that a claim covered; a release ends only the claim it names.
/// No zombie and no unfenced broker needed: the release is a legitimate,
/// late publication from A's outbox.
///
/// A's poll batch: phase one claims `j` (offset 0) and `k` (offset 1) and
/// publishes the claims; phase two confirms `j`, its handler fails on `k`,
/// so `k`'s claim is released; the store commits [0, 1) with the confirm
/// and the release in its outbox entry, and A dies before the transaction.
/// B takes the partition, restores A's claims, takes `j` and `k` over in
/// doubt (its phase one published), applies their side effects and dies
/// before confirming: the changelog's progress is still 0. A restarts on
/// its store: the entry's start (0) is at the progress, so it is published
/// in full, its release of `k` after B's takeover claim. The release names
/// A's claim, not B's: a later restore (C) keeps B's in-doubt claim.
#[test]
fn an_outbox_release_published_after_the_next_owners_takeover_does_not_end_its_claim() {
    use exactly::Claim;
    let (_cluster, servers) = cluster();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let lease = Duration::from_secs(86_400);
    let t = now_ms();
    {
        let store = Store::open(dirs[0].path(), Options::default()).unwrap();
        store.assign(&p0()).unwrap();
        let Claim::Acquired(tj) = store.claim(&p0(), b"j", lease).unwrap() else {
            panic!("j")
        };
        let Claim::Acquired(tk) = store.claim(&p0(), b"k", lease).unwrap() else {
            panic!("k")
        };
        let mut batch = store.batch(&p0()).unwrap();
        exactly::internals::outbox::record_changes(&mut batch, 0);
        batch.confirm(&tj).unwrap();
        batch.release(&tk).unwrap();
        batch.set_offset(1);
        exactly::internals::outbox::commit(batch).unwrap().unwrap();
        store.close().unwrap();
    }
    let progress: &[u8] = b"\x00offset";
    write_changelog(
        &servers,
        &[
            // A's phase one.
            (b"\x01j", claim(t + 86_400_000, 0, 1)),
            (b"\x01k", claim(t + 86_400_000, 0, 2)),
            (progress, 0i64.to_be_bytes().to_vec()),
            // B's phase one: both taken over in doubt.
            (b"\x01j", claim(t + 86_400_000, 5, 77)),
            (b"\x01k", claim(t + 86_400_000, 5, 78)),
            (progress, 0i64.to_be_bytes().to_vec()),
        ],
    );

    // A restarts on its store: restore, then its outbox is settled.
    let mut a = member(&servers, dirs[0].path(), "a");
    let started = Instant::now();
    let mut restored = false;
    while !restored {
        let report = a
            .consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, _, _, _| {
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        restored |= report.restored.iter().any(|(p, _)| *p == p0());
        assert!(started.elapsed() < DEADLINE, "A never restored");
    }
    a.stop();
    assert_eq!(
        last_record_of(&servers, "k"),
        Some(None),
        "A's release follows B's takeover claim"
    );

    // C restores.
    let mut c = member(&servers, dirs[1].path(), "c");
    let started = Instant::now();
    let mut restored = false;
    while !restored {
        let report = c
            .consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, _, _, _| {
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        restored |= report.restored.iter().any(|(p, _)| *p == p0());
        assert!(started.elapsed() < DEADLINE, "C never restored");
    }
    let answer = c.store.claim(&p0(), b"k", Duration::from_secs(1)).unwrap();
    assert!(
        matches!(
            answer,
            Claim::InFlight {
                holder_epoch: 5,
                ..
            }
        ),
        "B's in-doubt claim on k, taken over after A's claim, is gone after a restore: {answer:?}"
    );
}
