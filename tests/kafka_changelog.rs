//! Changelog mode on librdkafka's in-process mock cluster: a partition's
//! marks follow it to another instance with another store directory, a
//! batch whose transaction failed is published from the local outbox after
//! a restart, and records staged with a batch are produced with it.
//!
//! The same move with local-only stores applies resent keys twice, which
//! shows that the scenario can fail. The first test probes what the mock
//! cluster implements of transactions (`docs/kafka.md` records it).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use exactly::kafka::rdkafka::{Offset, TopicPartitionList};
use exactly::kafka::{changelog_topic, ConsumeError, PROGRESS_KEY};
use exactly::{Options, OutboxRecord, Partition, Store};

mod kafka_support;

use kafka_support::*;

#[test]
fn the_mock_cluster_implements_transactions_but_not_their_offsets_isolation_or_fencing() {
    let (_cluster, servers) = cluster();
    // A member of the group, for its metadata.
    let member: BaseConsumer = consumer_config(&servers)
        .set("group.id", "probe")
        .create()
        .unwrap();
    member.subscribe(&[TOPIC]).unwrap();
    let started = Instant::now();
    while member.assignment().unwrap().count() == 0 {
        let _ = member.poll(Duration::from_millis(100));
        assert!(started.elapsed() < DEADLINE, "never assigned");
    }
    let group = member.group_metadata().unwrap();
    let producer = |id: &str| -> BaseProducer {
        let p: BaseProducer = client(&servers)
            .set("transactional.id", id)
            .create()
            .unwrap();
        p.init_transactions(Duration::from_secs(10)).unwrap();
        p
    };
    let first = producer("probe");
    let send = |p: &BaseProducer, value: &str| {
        p.send(
            BaseRecord::to("probe-out")
                .partition(0)
                .key("k")
                .payload(value),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    };

    // InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit
    // and EndTxn all answer: a transaction commits.
    first.begin_transaction().unwrap();
    send(&first, "committed");
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(TOPIC, 0, Offset::Offset(5))
        .unwrap();
    first
        .send_offsets_to_transaction(&offsets, &group, Duration::from_secs(10))
        .unwrap();
    first.commit_transaction(Duration::from_secs(10)).unwrap();

    // But the offsets sent to it are not stored: the group has none.
    let committed = member
        .committed_offsets(offsets.clone(), Duration::from_secs(10))
        .unwrap();
    let stored = committed.find_partition(TOPIC, 0).unwrap().offset();
    assert!(
        matches!(stored, Offset::Invalid),
        "the mock cluster now stores transactional offsets ({stored:?}): update docs/kafka.md"
    );

    // An aborted transaction's records stay visible to read_committed.
    first.begin_transaction().unwrap();
    send(&first, "aborted");
    first.flush(Duration::from_secs(10)).unwrap();
    first.abort_transaction(Duration::from_secs(10)).unwrap();
    let values: Vec<Option<Vec<u8>>> = read_all(&servers, "probe-out", 0)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        values,
        vec![Some(b"committed".to_vec()), Some(b"aborted".to_vec())],
        "the mock cluster's read_committed changed: update docs/kafka.md"
    );

    // A second producer with the same transactional.id does not fence the
    // first: the mock gives it a producer id of its own.
    let _second = producer("probe");
    first.begin_transaction().unwrap();
    send(&first, "zombie");
    assert!(
        first.commit_transaction(Duration::from_secs(10)).is_ok(),
        "the mock cluster now fences by transactional.id: update docs/kafka.md"
    );
}

/// The move scenario on the mock cluster.
fn move_and_resend(changelog: bool) -> (Sink, Vec<(Partition, u64)>) {
    let (_cluster, servers) = cluster();
    kafka_support::move_and_resend(&servers, changelog)
}

#[test]
fn a_partition_moves_to_another_instance_with_its_marks() {
    let (sink, restored) = move_and_resend(true);
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    let mut partitions: Vec<i32> = restored.iter().map(|(p, _)| p.partition()).collect();
    partitions.sort();
    assert_eq!(
        partitions,
        vec![0, 1, 2, 3],
        "every partition is restored once"
    );
    // 30 marks and 1..n progress records per partition.
    assert!(
        restored.iter().all(|(_, records)| *records > 30),
        "{restored:?}"
    );
}

#[test]
fn local_only_stores_apply_resent_keys_twice_after_a_move() {
    let (sink, restored) = move_and_resend(false);
    assert!(restored.is_empty());
    assert_eq!(
        sink.twice().len(),
        40,
        "the control must apply every resent key twice"
    );
}

#[test]
fn a_batch_whose_transaction_failed_is_published_from_the_outbox_after_a_restart() {
    let (cluster, servers) = cluster();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, 0..20, &mut ends);

    // The first batches are published; then a transaction fails at its
    // end: its batches are committed to the local store (marks, offset,
    // outbox), never to Kafka, and the instance stops processing.
    let mut a = Instance::start(&servers, dirs.0.path(), "a", true);
    a.run_to(&ends, &sink);
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 8],
    );
    produce(&servers, 20..40, &mut ends);
    let started = Instant::now();
    let failure = loop {
        match a.consumer.poll_batch(Duration::from_millis(100), |_, key| {
            sink.apply(key.expect("keyed"));
            Ok::<(), Infallible>(())
        }) {
            Ok(_) => {}
            Err(ConsumeError::Kafka(e)) => break e,
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < DEADLINE, "no transaction failed");
    };
    let in_outbox = sink.count() - 20;
    assert!(in_outbox > 0, "{in_outbox} processed; {failure}");
    let pending: usize = (0..PARTITIONS)
        .map(|p| read_all(&servers, &changelog_topic(GROUP, TOPIC), p).len())
        .sum();
    // A crash: the instance goes away without publishing.
    drop(a);
    cluster.clear_request_errors(RDKafkaApiKey::EndTxn);

    // The restarted instance publishes what its outbox holds before it
    // processes anything, and processes nothing twice. Its store's offsets
    // are at the ends already: poll until every partition was assigned and
    // restored (the outbox is settled right after).
    let mut a = Instance::start(&servers, dirs.0.path(), "a", true);
    let started = Instant::now();
    let mut restored = a.run_to(&ends, &sink);
    while restored.len() < PARTITIONS as usize {
        restored.extend(a.run_to(&ends, &sink));
        assert!(started.elapsed() < DEADLINE, "restored only {restored:?}");
    }
    let published: usize = (0..PARTITIONS)
        .map(|p| read_all(&servers, &changelog_topic(GROUP, TOPIC), p).len())
        .sum();
    assert!(
        published > pending,
        "outbox not published: {pending} → {published} records"
    );
    a.stop();

    // Another instance restores all of it: resends are caught.
    produce(&servers, 0..40, &mut ends);
    let mut b = Instance::start(&servers, dirs.1.path(), "b", true);
    b.run_to(&ends, &sink);
    b.stop();
    assert_eq!(sink.count(), 40);
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
}

#[test]
fn records_staged_with_a_batch_are_produced_with_its_marks_and_the_changelog_holds_no_payload() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut ends = HashMap::new();
    produce(&servers, 0..20, &mut ends);
    let mut a = Instance::start(&servers, dir.path(), "a", true);
    let started = Instant::now();
    while !a.reached(&ends) {
        a.consumer
            .poll_batch_outbox(Duration::from_millis(100), |m, key, batch| {
                let key = key.expect("keyed");
                batch
                    .send(OutboxRecord::new("invoices", key, "invoice").header("from", TOPIC))
                    .map(|_| ())
                    .map_err(|e| e.to_string())?;
                let _ = m;
                Ok::<(), String>(())
            })
            .unwrap();
        assert!(started.elapsed() < DEADLINE);
    }
    let invoices: usize = (0..4)
        .map(|p| read_all(&servers, "invoices", p).len())
        .sum();
    assert_eq!(invoices, 20, "one outgoing record per processed message");
    for p in 0..PARTITIONS {
        let records = read_all(&servers, &changelog_topic(GROUP, TOPIC), p);
        let marks = records
            .iter()
            .filter(|(k, _)| k.first() == Some(&1))
            .count();
        assert_eq!(marks, 5, "partition {p}: {records:?}");
        for (k, v) in &records {
            if k.as_slice() == PROGRESS_KEY {
                assert_eq!(v.as_ref().map(Vec::len), Some(8));
            } else {
                // The stored key and entry only: a mark's value is 9 bytes.
                assert_eq!(v.as_ref().map(Vec::len), Some(9), "{k:?}");
                assert!(!v.as_ref().unwrap().windows(7).any(|w| w == b"payload"));
            }
        }
    }
    a.stop();
}

#[test]
fn staging_a_record_outside_the_changelog_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Options::default()).unwrap();
    let p = Partition::new(TOPIC, 0);
    store.assign(&p).unwrap();
    let mut batch = store.batch(&p).unwrap();
    assert!(matches!(
        batch.send(OutboxRecord::new("t", "k", "v")),
        Err(exactly::Error::NoOutbox(_))
    ));
}
