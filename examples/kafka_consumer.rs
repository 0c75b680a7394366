//! An idempotent Kafka consumer: every message's side effect happens once per
//! idempotency key, across redeliveries, restarts and rebalances.
//!
//! ```text
//! cargo run --features kafka --example kafka_consumer -- BROKERS TOPIC [GROUP] [STORE_DIR]
//! cargo run --features kafka --example kafka_consumer -- localhost:9092 orders
//! ```
//!
//! The idempotency key is the `idempotency-key` header, or else the message
//! key; messages with neither are skipped. The side effect here is a line on
//! standard output. Run several instances with the same GROUP and different
//! STORE_DIRs: each instance owns its store directory, and partitions move
//! between them on rebalances (see `docs/kafka.md`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::Consumer;
use exactly::kafka::rdkafka::message::{Headers, Message};
use exactly::kafka::{
    DedupConsumer, DedupContext, GroupStore, IdempotentConsumer, KeySource, MissingKey,
};
use exactly::{Options, Store};

const HEADER: &str = "idempotency-key";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: kafka_consumer BROKERS TOPIC [GROUP] [STORE_DIR]";
    let brokers = args.next().ok_or(usage)?;
    let topic = args.next().ok_or(usage)?;
    let group_id = args.next().unwrap_or_else(|| format!("{topic}-exactly"));
    let store_dir = args.next().unwrap_or_else(|| format!("./dedup-{group_id}"));

    let store = Store::open(
        &store_dir,
        Options::default().ttl(Duration::from_secs(7 * 24 * 3600)),
    )?;
    let group = GroupStore::new(Arc::new(store));
    let consumer: DedupConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group_id)
        // Offsets are committed after the store commit, never automatically.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create_with_context(DedupContext::new(&group))?;
    consumer.subscribe(&[topic.as_str()])?;

    let keys = KeySource::custom(|m| {
        let header = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == HEADER))
            .and_then(|h| h.value);
        header.or_else(|| m.key()).map(Cow::Borrowed)
    });
    let mut consumer = IdempotentConsumer::new(consumer, keys)
        .missing_key(MissingKey::Skip)
        .max_batch(500);
    eprintln!("consuming {topic} on {brokers} as group {group_id}, store in {store_dir}");

    loop {
        let report = consumer.poll_batch(Duration::from_secs(1), |message, key| {
            // The side effect. A real consumer passes `key` on to the system it
            // writes to, where that system accepts one (see docs/kafka.md).
            let key = String::from_utf8_lossy(key.unwrap_or_default());
            let payload = message.payload().map_or(0, <[u8]>::len);
            println!(
                "{}/{}@{} key={key} ({payload} bytes)",
                message.topic(),
                message.partition(),
                message.offset()
            );
            Ok::<(), std::io::Error>(())
        })?;
        for e in &report.kafka_errors {
            eprintln!("kafka: {e}");
        }
        if report.messages > 0 {
            eprintln!(
                "batch: {} messages, {} processed, {} duplicates, {} without key; committed {:?}",
                report.messages,
                report.processed,
                report.duplicates,
                report.skipped,
                report.committed
            );
        }
    }
}
