//! Changelog and claim modes against what other processors leave in the
//! changelog: an instance that processed part of a batch again, and a
//! zombie (an instance that lost a partition without knowing it) whose
//! claims and releases reach the changelog after the new owner's marks.
//! Each test states the promise it checks; on the mock cluster, which
//! fences nothing (a broker that does not filter aborted transactions
//! shows the same records to a restore).

mod kafka_support;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use exactly::kafka::{
    changelog_topic, ConsumeError, DedupContext, GroupStore, IdempotentConsumer, KeySource,
    PollReport,
};
use exactly::{Options, OutboxRecord, Store};

use kafka_support::zombie::*;
use kafka_support::*;

const INVOICES: &str = "invoices";

/// A group member in changelog mode with its own store; `max_batch`
/// messages per poll batch, fetches large enough to fill one.
fn member(servers: &str, dir: &Path, name: &str, max_batch: usize) -> Instance {
    let store = Arc::new(Store::open(dir, Options::default()).unwrap());
    let group = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers)
        .set("max.partition.fetch.bytes", "1048576")
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let consumer = IdempotentConsumer::new(consumer, KeySource::header(HEADER))
        .max_batch(max_batch)
        .changelog(changelog(servers, name));
    Instance { consumer, store }
}

/// One poll batch whose handler applies each key and stages one invoice
/// for it.
fn poll_invoicing(
    instance: &mut Instance,
    sink: &Sink,
) -> Result<PollReport, ConsumeError<Infallible>> {
    instance
        .consumer
        .poll_batch_outbox(Duration::from_millis(100), |_, key, batch| {
            let key = key.expect("keyed");
            sink.apply(key);
            batch
                .send(OutboxRecord::new(INVOICES, key, "invoice"))
                .unwrap();
            Ok(())
        })
}

fn keys_of(records: &[(Vec<u8>, Option<Vec<u8>>)]) -> BTreeSet<String> {
    records
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect()
}

/// Promise: an outbox entry is dropped only when whoever processed its
/// messages again produced its own records ("its staged records are
/// dropped, since whoever processed the messages again produced its own").
///
/// A commits a poll batch of several messages (an invoice staged for
/// each) and dies before its transaction. B takes the partition and
/// processes only the first of them (a smaller poll batch), then leaves. A
/// restarts on its store: the changelog's progress (1) falls inside the
/// entry, so A publishes it without the invoice of the message B processed
/// again, and with the invoices of the messages only A processed (giving
/// the whole entry up would produce them nowhere).
#[test]
fn an_outbox_entry_that_another_instance_processed_only_in_part_keeps_the_records_of_the_rest() {
    let (cluster, servers) = cluster();
    cluster.create_topic(INVOICES, 1, 1).unwrap();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    // Ten messages, all on partition 0.
    produce(&servers, (0..10).map(|i| 4 * i), &mut ends);
    let all: BTreeSet<String> = (0..10).map(|i| format!("order-{}", 4 * i)).collect();

    // A: its poll batch commits locally; its transaction fails without a
    // record reaching the broker, and the process dies.
    let mut a = member(&servers, dirs.0.path(), "a", 10);
    let started = Instant::now();
    loop {
        // Produce requests fail from the first batch with messages on.
        if a.store.committed_offset(&p0()).ok().flatten().is_none()
            && !a.consumer.is_restoring(&p0())
            && a.consumer.context().owned().contains(&p0())
        {
            cluster.request_errors(
                RDKafkaApiKey::Produce,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
            );
        }
        match poll_invoicing(&mut a, &sink) {
            Ok(_) => {}
            Err(ConsumeError::Kafka(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < DEADLINE, "A never failed a transaction");
    }
    let a_offset = a.store.committed_offset(&p0()).unwrap().unwrap();
    let pending = exactly::internals::outbox::pending(&a.store, &p0()).unwrap();
    let staged: usize = pending.iter().map(|e| e.records.len()).sum();
    assert_eq!(
        staged as i64, a_offset,
        "A's outbox holds an invoice per message it committed: {pending:?}"
    );
    assert!(
        a_offset >= 2,
        "A's failed batch committed up to {a_offset} only"
    );
    drop(a);
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    assert!(
        read_all(&servers, &changelog_topic(GROUP, TOPIC), 0).is_empty(),
        "nothing of A's batch reached the changelog"
    );

    // B processes the first message again (the documented window),
    // publishes them with their invoices, and leaves.
    let mut b = member(&servers, dirs.1.path(), "b", 1);
    let started = Instant::now();
    while b.store.committed_offset(&p0()).ok().flatten().unwrap_or(0) == 0 {
        poll_invoicing(&mut b, &sink).unwrap();
        assert!(started.elapsed() < DEADLINE, "B processed nothing");
    }
    let b_offset = b.store.committed_offset(&p0()).unwrap().unwrap();
    assert!(b_offset < a_offset, "B stopped at {b_offset}");
    b.stop();

    // A restarts on its store; its restore and outbox settlement run.
    let mut a = member(&servers, dirs.0.path(), "a", 10);
    let started = Instant::now();
    let mut restored = false;
    while !restored || !a.reached(&ends) {
        let report = poll_invoicing(&mut a, &sink).unwrap();
        restored |= report.restored.iter().any(|(p, _)| *p == p0());
        assert!(started.elapsed() < DEADLINE, "A never restored");
    }
    a.stop();

    let invoiced = keys_of(&read_all(&servers, INVOICES, 0));
    let missing: Vec<&String> = all.difference(&invoiced).collect();
    for key in &missing {
        assert_eq!(sink.applied(key.as_bytes()), 1, "{key}");
    }
    assert!(
        missing.is_empty(),
        "processed (side effect applied, mark kept) but their invoices were never \
         produced: {missing:?}; B processed up to {b_offset}"
    );
}

/// Runs a group member in the plain changelog loop until its store's
/// offsets reach `ends`, applying each key.
fn run_member(instance: &mut Instance, ends: &HashMap<i32, i64>, sink: &Sink) {
    let started = Instant::now();
    while !instance.reached(ends) {
        poll_invoicing(instance, sink).unwrap();
        assert!(started.elapsed() < DEADLINE, "did not reach {ends:?}");
    }
}

/// Promise: a key whose mark was acknowledged (and published) is never
/// answered new before the mark expires; "an aborted phase-one
/// transaction that a broker still shows can only add claims", and records
/// of a zombie cannot make a restore wrong.
///
/// B processes `order-0` and publishes its mark. A zombie (claim mode,
/// whose store never saw B's mark) then claims `order-0`, its handler
/// fails, and it releases the claim: its changelog now ends with the claim
/// and a removal of the key. C, the next owner, restores the changelog: the
/// release names the zombie's claim, not B's mark, so the mark stays and
/// the resent key is a duplicate (applied once).
#[test]
fn a_zombie_release_published_after_a_mark_does_not_make_the_marked_key_new() {
    let (_cluster, servers) = cluster();
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, [0], &mut ends);

    let mut b = member(&servers, dirs[0].path(), "b", 10);
    run_member(&mut b, &ends, &sink);
    b.stop();
    assert_eq!(sink.applied(b"order-0"), 1);
    assert!(matches!(last_record_of(&servers, "order-0"), Some(Some(v)) if v[0] == 1));

    // The zombie's handler fails (its downstream call timed out): the
    // claim it made on a key it saw as new is released.
    zombie_claims_and_releases(&servers, dirs[1].path());
    assert_eq!(
        last_record_of(&servers, "order-0"),
        Some(None),
        "the changelog ends with the zombie's removal"
    );

    // The key is sent again; C restores and handles it.
    produce(&servers, [0], &mut ends);
    let mut c = member(&servers, dirs[2].path(), "c", 10);
    run_member(&mut c, &ends, &sink);
    c.stop();
    assert_eq!(
        sink.applied(b"order-0"),
        1,
        "a key with a live, published mark was handled as new after a restore"
    );
}

/// The same with a zombie that dies between its claim and its handler:
/// the changelog ends with its claim (the shortest lease, 1 s), which ends
/// before B's mark (a week's TTL) would: the restore keeps the mark, and
/// the key stays a duplicate after the lease.
#[test]
fn a_zombie_claim_published_after_a_mark_does_not_outlive_the_mark_by_its_lease_only() {
    let (_cluster, servers) = cluster();
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, [0], &mut ends);

    let mut b = member(&servers, dirs[0].path(), "b", 10);
    run_member(&mut b, &ends, &sink);
    b.stop();
    assert_eq!(sink.applied(b"order-0"), 1);

    // The zombie claims the key (phase one committed) and dies in its
    // handler, before any side effect.
    let mut z = zombie(&servers, dirs[1].path());
    let started = Instant::now();
    loop {
        let died = catch_unwind(AssertUnwindSafe(|| {
            z.consumer
                .poll_batch_claimed(
                    Duration::from_millis(100),
                    |_, _, _, _| -> Result<(), Infallible> { panic!("the zombie dies here") },
                )
                .map(|_| ())
        }));
        match died {
            Err(_) => break,
            Ok(r) => r.unwrap(),
        }
        assert!(started.elapsed() < DEADLINE, "the zombie handled nothing");
    }
    drop(z);
    assert!(
        matches!(last_record_of(&servers, "order-0"), Some(Some(v)) if v[0] == 2),
        "the changelog ends with the zombie's claim"
    );

    // Past the zombie's lease, the key is sent again.
    std::thread::sleep(Duration::from_millis(1500));
    produce(&servers, [0], &mut ends);
    let mut c = member(&servers, dirs[2].path(), "c", 10);
    run_member(&mut c, &ends, &sink);
    c.stop();
    assert_eq!(
        sink.applied(b"order-0"),
        1,
        "a key with a live, published mark was handled as new after a restore"
    );
}
