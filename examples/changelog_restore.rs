//! How long a partition with many marks takes to restore from its changelog
//! on another instance (an empty store), on librdkafka's mock cluster.
//!
//! ```text
//! cargo run --release --features kafka --example changelog_restore -- [MARKS [BROKERS]]
//! ```
//!
//! librdkafka's mock cluster keeps at most 5 MB (or 100 000 message sets)
//! per partition and drops the oldest beyond that, so the default, 140 000
//! marks, is about what one mock partition holds; a larger restore needs a
//! real broker: give its bootstrap servers as BROKERS (the topics are
//! created there, named after a group of this run's own).
//!
//! The changelog is written as the changelog loop writes it (a stored key
//! and a 9-byte entry per mark, and a progress record), straight to the
//! topic, so that only the restore is timed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::kafka::rdkafka::client::DefaultClientContext;
use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use exactly::kafka::rdkafka::mocking::MockCluster;
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{
    changelog_topic, Changelog, DedupContext, GroupStore, IdempotentConsumer, KeySource,
    PROGRESS_KEY,
};
use exactly::{Options, Partition, Store, Verdict};

const TOPIC: &str = "orders";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let marks: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(140_000);
    let brokers = std::env::args().nth(2);
    // On a real broker the topics outlive the run: a group of its own.
    let group = match &brokers {
        None => "restore-bench".to_string(),
        Some(_) => format!("restore-bench-{}-{}", std::process::id(), now_ms()),
    };
    let group = group.as_str();
    let changelog = changelog_topic(group, TOPIC);
    let mut client = ClientConfig::new();
    let _cluster = match &brokers {
        None => {
            let cluster = MockCluster::new(1)?;
            cluster.create_topic(TOPIC, 1, 1)?;
            cluster.create_topic(&changelog, 1, 1)?;
            client.set("bootstrap.servers", cluster.bootstrap_servers());
            Some(cluster)
        }
        Some(servers) => {
            client.set("bootstrap.servers", servers);
            let admin: AdminClient<DefaultClientContext> = client.create()?;
            let topics = [
                NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1)),
                NewTopic::new(&changelog, 1, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact"),
            ];
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            for result in pollster::block_on(admin.create_topics(&topics, &options))? {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, e)) => return Err(format!("creating {topic}: {e}").into()),
                }
            }
            None
        }
    };

    let expires_at = now_ms() + 7 * 24 * 3600 * 1000;
    let mut value = vec![1u8];
    value.extend_from_slice(&expires_at.to_be_bytes());
    let producer: BaseProducer = client
        .clone()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()?;
    let started = Instant::now();
    for i in 0..marks {
        let mut key = vec![1u8];
        key.extend_from_slice(format!("key-{i:012}").as_bytes());
        let mut record = BaseRecord::to(&changelog)
            .partition(0)
            .key(&key)
            .payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    producer
        .send(
            BaseRecord::to(&changelog)
                .partition(0)
                .key(PROGRESS_KEY)
                .payload(&0i64.to_be_bytes()[..]),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(60))?;
    println!(
        "changelog of {marks} marks written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path(), Options::default())?);
    let group_store = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = client
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create_with_context(DedupContext::new(&group_store))?;
    consumer.subscribe(&[TOPIC])?;
    let log = Changelog::new(
        &client,
        group,
        "restorer",
        Duration::from_secs(8 * 24 * 3600),
        Duration::from_secs(30),
    )?
    .on_restore_progress(|p| {
        if p.records % 50_000 == 0 || p.remaining == 0 {
            eprintln!(
                "  {} records, {} MB, {} left, {:.1} s",
                p.records,
                p.bytes >> 20,
                p.remaining,
                p.elapsed.as_secs_f64()
            );
        }
    });
    let mut consumer = IdempotentConsumer::new(consumer, KeySource::MessageKey).changelog(log);
    let started = Instant::now();
    let restored = loop {
        let report =
            consumer.poll_batch(Duration::from_millis(50), |_, _| Ok::<(), Infallible>(()))?;
        if let Some(r) = report.restored.first() {
            break r.1;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err("no restore within 10 minutes".into());
        }
    };
    let elapsed = started.elapsed();
    println!(
        "restored {restored} records in {:.2} s ({:.0} records/s), assignment included",
        elapsed.as_secs_f64(),
        restored as f64 / elapsed.as_secs_f64()
    );
    let p = Partition::new(TOPIC, 0);
    assert_eq!(
        store.check(&p, format!("key-{:012}", marks - 1).as_bytes())?,
        Verdict::Duplicate
    );
    assert_eq!(
        store.check(&p, b"key-000000000000")?,
        Verdict::Duplicate,
        "the broker dropped changelog records: fewer marks"
    );
    assert_eq!(store.check(&p, b"never-marked")?, Verdict::New);
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
