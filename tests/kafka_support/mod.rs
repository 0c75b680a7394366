//! Helpers for the changelog and claim-mode tests on librdkafka's mock
//! cluster: the cluster, a producer of keyed messages, a downstream sink
//! that counts side effects per key, and one consumer instance with its own
//! store directory.
#![allow(dead_code)]

pub mod broker;
pub mod zombie;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::error::KafkaError;
use exactly::kafka::rdkafka::message::{Header, Message, OwnedHeaders};
use exactly::kafka::rdkafka::mocking::MockCluster;
use exactly::kafka::rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer,
};
use exactly::kafka::rdkafka::{Offset, TopicPartitionList};
use exactly::kafka::{
    changelog_topic, Changelog, DedupContext, GroupStore, IdempotentConsumer, KeySource,
};
use exactly::{Options, Partition, Store};

pub const TOPIC: &str = "orders";
pub const PARTITIONS: i32 = 4;
pub const GROUP: &str = "billing";
pub const HEADER: &str = "idempotency-key";
pub const DEADLINE: Duration = Duration::from_secs(40);

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A mock cluster with the input topic and its changelog topic (the mock
/// cluster does not implement CreateTopics).
pub fn cluster() -> (Cluster, String) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    cluster
        .create_topic(&changelog_topic(GROUP, TOPIC), PARTITIONS, 1)
        .unwrap();
    let servers = cluster.bootstrap_servers();
    (cluster, servers)
}

/// Produces one message per key (key `order-{i}` on partition `i % 4`),
/// adding to the end offsets `ends`.
pub fn produce(servers: &str, keys: impl IntoIterator<Item = usize>, ends: &mut HashMap<i32, i64>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("batch.num.messages", "3")
        .create()
        .unwrap();
    send(&producer, keys, ends);
}

/// Sends one message per key through `producer` (key `order-{i}` on
/// partition `i % 4`, as a keyed producer would place it), adding to the
/// end offsets `ends`, and waits for their delivery.
pub fn send(
    producer: &BaseProducer,
    keys: impl IntoIterator<Item = usize>,
    ends: &mut HashMap<i32, i64>,
) {
    for i in keys {
        let partition = (i % PARTITIONS as usize) as i32;
        let key = format!("order-{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER,
            value: Some(key.as_bytes()),
        });
        producer
            .send(
                BaseRecord::to(TOPIC)
                    .partition(partition)
                    .key(key.as_bytes())
                    .payload("payload")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        *ends.entry(partition).or_default() += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

pub fn client(servers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", servers);
    c
}

pub fn consumer_config(servers: &str) -> ClientConfig {
    let mut config = client(servers);
    config
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "3000")
        .set("heartbeat.interval.ms", "200")
        .set("max.partition.fetch.bytes", "600");
    config
}

/// The downstream system: side effects per idempotency key.
#[derive(Default, Clone)]
pub struct Sink(Arc<Mutex<HashMap<String, u32>>>);

impl Sink {
    pub fn apply(&self, key: &[u8]) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(String::from_utf8(key.to_vec()).unwrap())
            .or_default() += 1;
    }

    pub fn twice(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// How often the side effect of `key` was applied.
    pub fn applied(&self, key: &[u8]) -> u32 {
        let key = String::from_utf8(key.to_vec()).unwrap();
        self.0.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// One consumer instance with its own store directory.
pub struct Instance {
    pub consumer: IdempotentConsumer,
    pub store: Arc<Store>,
}

impl Instance {
    pub fn start(servers: &str, dir: &Path, name: &str, changelog: bool) -> Self {
        Self::with(
            servers,
            dir,
            name,
            changelog,
            KeySource::header(HEADER),
            Options::default(),
        )
    }

    /// [`start`](Self::start) with the keys from `keys` and a store opened
    /// with `options`.
    pub fn with(
        servers: &str,
        dir: &Path,
        name: &str,
        changelog: bool,
        keys: KeySource,
        options: Options,
    ) -> Self {
        let store = Arc::new(Store::open(dir, options).unwrap());
        let group = GroupStore::new(store.clone());
        let consumer: BaseConsumer<DedupContext> = consumer_config(servers)
            .create_with_context(DedupContext::new(&group))
            .unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        let mut consumer = IdempotentConsumer::new(consumer, keys);
        if changelog {
            let c = Changelog::new(
                &client(servers),
                GROUP,
                name,
                Duration::from_secs(8 * 24 * 3600),
                Duration::from_secs(10),
            )
            .unwrap();
            consumer = consumer.changelog(c);
        }
        Self { consumer, store }
    }

    /// Consumes until the store's offsets reach `ends`; returns the
    /// partitions restored on the way.
    pub fn run_to(&mut self, ends: &HashMap<i32, i64>, sink: &Sink) -> Vec<(Partition, u64)> {
        let started = Instant::now();
        let mut restored = Vec::new();
        loop {
            let report = self
                .consumer
                .poll_batch(Duration::from_millis(100), |_, key| {
                    sink.apply(key.expect("keyed"));
                    Ok::<(), Infallible>(())
                })
                .unwrap();
            restored.extend(report.restored);
            if self.reached(ends) {
                return restored;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "did not reach {ends:?}: store offsets {:?}",
                self.offsets()
            );
        }
    }

    pub fn reached(&self, ends: &HashMap<i32, i64>) -> bool {
        let offsets = self.offsets();
        ends.iter()
            .all(|(p, end)| offsets.get(p).is_some_and(|o| o >= end))
    }

    pub fn offsets(&self) -> HashMap<i32, i64> {
        (0..PARTITIONS)
            .filter_map(|p| {
                self.store
                    .committed_offset(&Partition::new(TOPIC, p))
                    .ok()
                    .flatten()
                    .map(|o| (p, o))
            })
            .collect()
    }

    /// Leaves the group and closes the store.
    pub fn stop(self) {
        let Self { consumer, store } = self;
        let consumer = consumer.into_inner();
        consumer.unsubscribe();
        // Serve the revocation.
        let _ = consumer.poll(Duration::from_millis(200));
        drop(consumer);
        Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    }
}

/// Reads every record of `topic`'s partition `partition` (read_committed).
pub fn read_all(servers: &str, topic: &str, partition: i32) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let consumer: BaseConsumer = client(servers)
        .set("group.id", "reader")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().map(<[u8]>::to_vec),
            )),
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            // A transient error (a busy machine, a broker connection being
            // set up): librdkafka retries on its own.
            Some(Err(_)) | None => {}
        }
    }
    out
}

/// Instance A processes keys 0..120 and stops; then come resends of 40 keys
/// A processed and 40 new ones, and instance B (another store directory)
/// processes them, restoring A's marks first in changelog mode. Returns the
/// sink and the partitions B restored, with the records read.
pub fn move_and_resend(servers: &str, changelog: bool) -> (Sink, Vec<(Partition, u64)>) {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(servers, 0..120, &mut ends);

    let mut a = Instance::start(servers, dirs.0.path(), "a", changelog);
    a.run_to(&ends, &sink);
    a.stop();

    produce(servers, (0..40).chain(120..160), &mut ends);
    let mut b = Instance::start(servers, dirs.1.path(), "b", changelog);
    let restored = b.run_to(&ends, &sink);
    b.stop();
    assert_eq!(sink.count(), 160);
    (sink, restored)
}
