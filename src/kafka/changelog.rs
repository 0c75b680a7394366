//! The partition changelog: each committed store batch publishes what it
//! changed to a Kafka topic, in one Kafka transaction with the group's
//! offsets, so that a partition's marks follow it to its next owner.
//!
//! Record format (one Kafka record per change, on the changelog partition
//! with the input partition's number):
//!
//! | record | key | value |
//! |---|---|---|
//! | a mark or a claim | the stored key (`0x01 ++ key`, or `0x01 ++ xxh3_128(key)`) | the stored entry (9 bytes for a mark, 25 for a claim) |
//! | a removed mark or claim | the stored key | none (a tombstone) |
//! | a released claim | the stored key | none (a tombstone), with the header [`RELEASE_HEADER`]: the claim's token (u64 BE) |
//! | progress | [`PROGRESS_KEY`] | the input offset the batch committed (i64 BE) |
//!
//! Values are exactly what the store keeps, so a record never carries a
//! message's payload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::TopicPartitionList;

use crate::outbox::{OutboxEntry, GIVEN_UP};
use crate::Partition;

/// The key of a changelog's progress record: the input offset a batch
/// committed. Metadata keys start with `0x00`, stored mark keys with `0x01`.
pub const PROGRESS_KEY: &[u8] = b"\x00offset";

/// The header of a tombstone that ended a claim (a release), its value the
/// claim's token (u64 BE): a restore applies it over that claim only, never
/// over a mark or another processor's claim, which only a processor that
/// did not know them (a zombie, a late publication of an outbox) can have
/// released after them.
pub const RELEASE_HEADER: &str = "exactly-release";

/// Kafka's longest topic name.
const MAX_TOPIC_LEN: usize = 249;

/// The changelog topic of input topic `topic` for consumer group `group`:
/// `{group}.{topic}.exactly-changelog`, with characters Kafka does not allow
/// in a topic name replaced by `_`; a name longer than Kafka allows is cut
/// and ends with a hash of the whole, so that two long names never share a
/// changelog.
///
/// ```
/// use exactly::kafka::changelog_topic;
/// assert_eq!(changelog_topic("billing", "orders"), "billing.orders.exactly-changelog");
/// assert_eq!(changelog_topic("svc:a/b", "orders"), "svc_a_b.orders.exactly-changelog");
/// assert!(changelog_topic(&"g".repeat(300), "orders").len() <= 249);
/// ```
pub fn changelog_topic(group: &str, topic: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = format!("{}.{}.exactly-changelog", clean(group), clean(topic));
    if name.len() <= MAX_TOPIC_LEN {
        return name;
    }
    let hash = format!(
        "{:032x}",
        xxhash_rust::xxh3::xxh3_128(format!("{group}\0{topic}").as_bytes())
    );
    let keep = MAX_TOPIC_LEN - hash.len() - 1;
    // The name is ASCII after cleaning, so any byte index is a char boundary.
    format!("{}.{hash}", name.get(..keep).unwrap_or_default())
}

/// Records where each produced record landed, so that a shard can store the
/// changelog position its own records reached.
#[derive(Debug, Default)]
pub struct Deliveries {
    delivered: Mutex<HashMap<(String, i32), i64>>,
    failed: Mutex<Option<KafkaError>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut delivered = self.delivered.lock();
                let slot = delivered
                    .entry((m.topic().to_string(), m.partition()))
                    .or_insert(m.offset());
                *slot = (*slot).max(m.offset());
            }
            Err((e, _)) => {
                self.failed.lock().get_or_insert_with(|| e.clone());
            }
        }
    }
}

/// What a restore did, reported while it runs and when it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreProgress {
    /// The input partition being restored.
    pub partition: Partition,
    /// Changelog records read so far.
    pub records: u64,
    /// Bytes of keys and values read so far.
    pub bytes: u64,
    /// Records left to the changelog's end as it was when the restore
    /// started (an estimate: compaction leaves gaps).
    pub remaining: u64,
    /// Time since the restore started.
    pub elapsed: Duration,
}

impl RestoreProgress {
    /// The time left at the pace so far: `remaining` records at the rate
    /// `records` took in `elapsed`. `None` before the first record is read.
    /// An estimate, like `remaining`: compaction leaves gaps in the
    /// changelog's offsets, so it errs long.
    pub fn time_left(&self) -> Option<Duration> {
        if self.records == 0 {
            return None;
        }
        let per_record = self.elapsed.as_secs_f64() / self.records as f64;
        Some(Duration::from_secs_f64(per_record * self.remaining as f64))
    }
}

/// Whether a producer error says a newer producer with the same
/// `transactional.id` fenced this one.
fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

/// A callback for restore progress.
pub type ProgressFn = dyn Fn(&RestoreProgress) + Send + Sync;

/// The changelog of one consumer group: its transactional producer and how
/// to reach and create its topics. Give it to
/// [`IdempotentConsumer::changelog`](super::IdempotentConsumer::changelog).
pub struct Changelog {
    pub(super) producer: BaseProducer<Deliveries>,
    pub(super) client: ClientConfig,
    pub(super) group: String,
    pub(super) timeout: Duration,
    retention: Duration,
    replication: i32,
    pub(super) progress: Option<Arc<ProgressFn>>,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Changelog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changelog")
            .field("group", &self.group)
            .field("retention", &self.retention)
            .finish()
    }
}

impl Changelog {
    /// The changelog of consumer group `group`, for the consumer instance
    /// `instance` (a name stable across restarts of the instance, as
    /// `group.instance.id`: it makes the producer's `transactional.id`, so
    /// that a restarted instance fences its previous incarnation). `client`
    /// holds the connection settings (`bootstrap.servers`, security); the
    /// producer adds `transactional.id` and the restore consumer
    /// `isolation.level=read_committed`.
    ///
    /// `retention` is the changelog's `retention.ms`; make it at least the
    /// store's TTL (the longest `mark_with_ttl` included): see
    /// [`retention`](Self::retention).
    ///
    /// Errors: the producer cannot be created or its transactions
    /// initialised (the broker does not support transactions, or is not
    /// reachable within `timeout`).
    pub fn new(
        client: &ClientConfig,
        group: &str,
        instance: &str,
        retention: Duration,
        timeout: Duration,
    ) -> KafkaResult<Self> {
        let mut config = client.clone();
        config
            .set("transactional.id", format!("{group}.{instance}.exactly"))
            .set("enable.idempotence", "true");
        // A transaction's records are all queued before it waits for their
        // delivery, so lingering only delays the commit: no linger unless the
        // client sets one. Measured with `examples/kafka_modes` (40 000
        // messages, mock cluster, one run each): 51 504 against 40 462
        // msgs/s for the changelog mode, 31 617 against 20 475 for the
        // claim mode, with librdkafka's default of 5 ms.
        if config.get("linger.ms").is_none() && config.get("queue.buffering.max.ms").is_none() {
            config.set("linger.ms", "0");
        }
        let producer: BaseProducer<Deliveries> =
            config.create_with_context(Deliveries::default())?;
        producer.init_transactions(timeout)?;
        Ok(Self {
            producer,
            client: client.clone(),
            group: group.to_string(),
            timeout,
            retention,
            replication: -1,
            progress: None,
            created: Mutex::new(Vec::new()),
        })
    }

    /// The replication factor of changelog topics this creates (default:
    /// the broker's `default.replication.factor`).
    pub fn replication(mut self, factor: i32) -> Self {
        self.replication = factor;
        self
    }

    /// A callback for restore progress (called every 10 000 records and at
    /// the end of each restore). Progress is also logged through nothing
    /// else: the callback is the place to log it.
    pub fn on_restore_progress(
        mut self,
        f: impl Fn(&RestoreProgress) + Send + Sync + 'static,
    ) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// The changelog topic of input topic `topic`.
    pub fn topic(&self, topic: &str) -> String {
        changelog_topic(&self.group, topic)
    }

    /// The changelog's `retention.ms`.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Creates the changelog topic of `topic` if it is missing, with as many
    /// partitions as `partitions` and `cleanup.policy=compact,delete`.
    pub(super) fn ensure_topic(&self, topic: &str, partitions: i32) -> KafkaResult<()> {
        let name = self.topic(topic);
        if self.created.lock().contains(&name) {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self.client.create()?;
        let retention = self.retention.as_millis().to_string();
        let replication = match self.replication {
            r if r > 0 => TopicReplication::Fixed(r),
            _ => TopicReplication::Fixed(-1),
        };
        let new = NewTopic::new(&name, partitions, replication)
            // Compaction keeps a key's latest record (its latest mark,
            // claim or removal); deletion by age drops segments whose every
            // record is older than the retention, so expired marks do not
            // stay in the changelog for ever.
            .set("cleanup.policy", "compact,delete")
            .set("retention.ms", &retention);
        let options = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = pollster::block_on(admin.create_topics([&new], &options))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code)),
            }
        }
        self.created.lock().push(name);
        Ok(())
    }

    /// Publishes `entries` (per partition, in order) and commits `offsets`
    /// for the consumer group in one Kafka transaction. Returns, per input
    /// partition, the changelog position its records reached (the offset
    /// after the last one). On error the transaction is aborted (where it
    /// can be) and nothing of it is visible to `read_committed` readers.
    pub(super) fn publish(
        &self,
        entries: &[(Partition, Vec<&OutboxEntry>)],
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
    ) -> KafkaResult<Vec<(Partition, i64)>> {
        let started = Instant::now();
        // Reports of an earlier, aborted transaction are served first, so
        // that they do not fail this one.
        self.producer.poll(Duration::ZERO);
        self.producer.context().delivered.lock().clear();
        *self.producer.context().failed.lock() = None;
        self.producer.begin_transaction()?;
        let result = self.publish_in_transaction(entries, offsets, group, started);
        if let Err(e) = &result {
            let partitions: Vec<String> = entries.iter().map(|(p, _)| p.to_string()).collect();
            if is_fenced(e) {
                tracing::error!(
                    partitions = ?partitions,
                    error = %e,
                    "fenced: a newer instance with this transactional id took over; this producer publishes nothing more"
                );
            } else if matches!(e, KafkaError::Transaction(t) if t.is_fatal()) {
                tracing::error!(
                    partitions = ?partitions,
                    error = %e,
                    "fatal producer error; this producer publishes nothing more"
                );
            } else {
                tracing::warn!(
                    partitions = ?partitions,
                    error = %e,
                    "transaction aborted; its batches stay in the outbox and are published before the next poll"
                );
            }
            // Abortable or fatal: either way nothing of it is committed. A
            // fatal error (fenced by a newer instance) makes every later
            // call fail too, the abort included.
            if let Err(abort) = self.producer.abort_transaction(self.timeout) {
                tracing::warn!(error = %abort, "aborting the failed transaction failed");
            }
        }
        result?;
        let delivered = self.producer.context().delivered.lock().clone();
        Ok(entries
            .iter()
            .filter_map(|(p, _)| {
                delivered
                    .get(&(self.topic(p.topic()), p.partition()))
                    .map(|last| (p.clone(), last + 1))
            })
            .collect())
    }

    fn publish_in_transaction(
        &self,
        entries: &[(Partition, Vec<&OutboxEntry>)],
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
        started: Instant,
    ) -> KafkaResult<()> {
        for (p, list) in entries {
            let topic = self.topic(p.topic());
            for entry in list {
                for change in &entry.changes {
                    let value = change.value();
                    let token = change.release.map(u64::to_be_bytes);
                    let headers = token.as_ref().map(|token| {
                        OwnedHeaders::new().insert(Header {
                            key: RELEASE_HEADER,
                            value: Some(token.as_slice()),
                        })
                    });
                    self.send(
                        &topic,
                        Some(p.partition()),
                        Some(&change.key),
                        value.as_deref(),
                        headers,
                    )?;
                }
                if entry.next == GIVEN_UP {
                    continue;
                }
                let progress = entry.next.to_be_bytes();
                self.send(
                    &topic,
                    Some(p.partition()),
                    Some(PROGRESS_KEY),
                    Some(&progress),
                    None,
                )?;
                for (_, r) in &entry.records {
                    let headers = (!r.headers.is_empty()).then(|| {
                        r.headers
                            .iter()
                            .fold(OwnedHeaders::new(), |h, (name, value)| {
                                h.insert(Header {
                                    key: name,
                                    value: value.as_deref(),
                                })
                            })
                    });
                    self.send(
                        &r.topic,
                        None,
                        r.key.as_deref(),
                        r.value.as_deref(),
                        headers,
                    )?;
                }
            }
        }
        if let Some(group) = group.filter(|_| offsets.count() > 0) {
            let left = self.timeout.saturating_sub(started.elapsed());
            self.producer
                .send_offsets_to_transaction(offsets, group, left)?;
        }
        self.await_deliveries(started)?;
        if let Some(e) = self.producer.context().failed.lock().take() {
            return Err(e);
        }
        self.producer
            .commit_transaction(self.timeout.saturating_sub(started.elapsed()))
    }

    /// Waits until every record of the transaction is delivered and its
    /// report served (so that the positions and failures are known), or
    /// the changelog's timeout from `started` runs out.
    ///
    /// Not `flush`: rdkafka's `BaseProducer::flush` polls in steps of
    /// 100 ms that each wait out their whole step, so every transaction took
    /// at least 100 ms (measured with `examples/kafka_modes` on the mock
    /// cluster: 100.1 ms of a 105 ms poll batch, every batch).
    fn await_deliveries(&self, started: Instant) -> KafkaResult<()> {
        loop {
            // One queued delivery report per call: serve all that are there.
            while self.producer.in_flight_count() > 0 {
                let before = self.producer.in_flight_count();
                self.producer.poll(Duration::ZERO);
                if self.producer.in_flight_count() == before {
                    break;
                }
            }
            if self.producer.in_flight_count() == 0 {
                return Ok(());
            }
            if started.elapsed() >= self.timeout {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
            self.producer.poll(Duration::from_millis(1));
        }
    }

    /// Queues a record for `topic` (on `partition`, or the partitioner's
    /// choice).
    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> KafkaResult<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        self.enqueue(record)
    }

    /// Queues a record, serving delivery reports while the queue is full.
    fn enqueue<'a>(&self, mut record: BaseRecord<'a, [u8], [u8]>) -> KafkaResult<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_is_the_pace_so_far_times_what_is_left() {
        let mut p = RestoreProgress {
            partition: Partition::new("t", 0),
            records: 0,
            bytes: 0,
            remaining: 3_000,
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(p.time_left(), None);
        p.records = 1_000;
        assert_eq!(p.time_left(), Some(Duration::from_secs(6)));
        p.remaining = 0;
        assert_eq!(p.time_left(), Some(Duration::ZERO));
    }
}
