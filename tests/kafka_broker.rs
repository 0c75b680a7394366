//! The changelog mode against a standalone broker process that no one here
//! wrote: nisshi 0.7.0 (the project formerly named tansu), a Kafka-compatible
//! broker, started on loopback with SQLite storage. A partition's marks move
//! with it to another instance (another store directory), whose restore
//! reads them from the broker's changelog topic, which the changelog mode
//! creates itself there (the mock cluster cannot).
//!
//! Without the broker binary the test says why and passes: see
//! `kafka_support/broker.rs` for where it is looked for and how to build it.

mod kafka_support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use exactly::kafka::changelog_topic;
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use kafka_support::broker::{nisshi, Broker, SKIPPED};
use kafka_support::*;

#[test]
fn a_partition_moves_to_another_instance_with_its_marks_on_a_standalone_broker() {
    let Some(binary) = nisshi() else {
        eprintln!("{SKIPPED}");
        return;
    };
    let broker = Broker::start(&binary);
    broker.create_input_topic();
    // B's store is empty: it restores every partition before processing.
    let (sink, restored) = move_and_resend(&broker.servers, true);
    assert_eq!(restored.len(), PARTITIONS as usize, "{restored:?}");
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    assert!(
        restored.iter().all(|(_, records)| *records >= 30),
        "{restored:?}"
    );
}

/// A transaction left open on the changelog (a paused or killed owner's)
/// hides from `read_committed` readers every record committed after it
/// began: the marks of the next owner's batches. A restore that stops at
/// the last stable offset hands the partition over without them, and the
/// resends of those keys are applied again. The restore waits for the open
/// transaction to end instead.
#[test]
fn a_restore_waits_for_a_transaction_left_open_on_the_changelog() {
    let Some(binary) = nisshi() else {
        eprintln!("{SKIPPED}");
        return;
    };
    let broker = Broker::start(&binary);
    broker.create_input_topic();
    let servers = &broker.servers;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(servers, 0..40, &mut ends);
    let mut a = Instance::start(servers, dirs.0.path(), "a", true);
    a.run_to(&ends, &sink);

    // An owner that began a transaction on every changelog partition and
    // stopped (its transaction stays open until it is aborted). It
    // publishes a record A published (the broker may show an aborted
    // transaction's records to `read_committed` readers).
    let stray: BaseProducer = client(servers)
        .set("transactional.id", "stray-owner")
        .create()
        .unwrap();
    stray.init_transactions(Duration::from_secs(10)).unwrap();
    stray.begin_transaction().unwrap();
    let changelog = changelog_topic(GROUP, TOPIC);
    for p in 0..PARTITIONS {
        let (key, payload) = read_all(servers, &changelog, p).swap_remove(0);
        let mut record = BaseRecord::to(&changelog).partition(p).key(&key);
        if let Some(payload) = &payload {
            record = record.payload(payload);
        }
        stray.send(record).map_err(|(e, _)| e).unwrap();
    }
    stray.flush(Duration::from_secs(10)).unwrap();

    // A's next batches commit behind the open transaction.
    produce(servers, 40..80, &mut ends);
    a.run_to(&ends, &sink);
    a.stop();

    // B (an empty store) takes the partitions over; the keys A processed
    // after the open transaction began are sent again.
    produce(servers, 40..80, &mut ends);
    let mut b = Instance::start(servers, dirs.1.path(), "b", true);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let _ = b.consumer.poll_batch(Duration::from_millis(100), |_, key| {
            sink.apply(key.expect("keyed"));
            Ok::<(), Infallible>(())
        });
    }
    assert_eq!(
        sink.twice(),
        Vec::<String>::new(),
        "keys applied again while a transaction was open on the changelog"
    );
    assert_eq!(sink.count(), 80);
    assert!(
        !b.reached(&ends),
        "B processed the resends with the changelog's end held back"
    );
    // A waiting restore holds no lock of its partition: a writer (a revoke,
    // in the rebalance callback) gets it at once.
    let assigned = b.store.assigned();
    assert!(!assigned.is_empty(), "B was assigned nothing");
    for p in &assigned {
        let asked = Instant::now();
        drop(b.store.batch(p).unwrap());
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{p}: the write lock took {:?}",
            asked.elapsed()
        );
    }

    // The stray transaction ends; B's restore completes and the resends
    // are skipped as duplicates.
    stray.abort_transaction(Duration::from_secs(10)).unwrap();
    let restored = b.run_to(&ends, &sink);
    b.stop();
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    assert_eq!(sink.count(), 80);
    assert!(
        restored.iter().map(|(_, records)| records).sum::<u64>() >= 80,
        "{restored:?}"
    );
}
