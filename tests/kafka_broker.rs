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
