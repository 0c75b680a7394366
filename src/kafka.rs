//! Kafka integration (feature `kafka`): a rebalance-aware consumer context
//! and an idempotent poll loop over [`rdkafka`]'s synchronous `BaseConsumer`.
//!
//! * [`GroupStore`] wraps the [`Store`] shared by the consumers of one
//!   consumer group in this process (one or several consumer threads), and
//!   records which consumer owns which partition's shard.
//! * [`DedupContext`] is the consumer's rdkafka context. On assignment it
//!   assigns the partitions' shards and positions each partition at its
//!   resume point (see [`resume_offset`]); on revocation it hands the
//!   partitions over (the store's offsets are committed to Kafka,
//!   synchronously) and revokes the shards.
//! * [`IdempotentConsumer`] runs the poll loop: per poll batch and
//!   partition, it checks each message's idempotency key, calls the handler
//!   for new ones only, commits the marks and the offset in one store batch,
//!   and then commits the offsets to Kafka (asynchronously by default).
//!   Kafka commits always follow the store commit.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use exactly::kafka::{DedupContext, GroupStore, IdempotentConsumer, KeySource};
//! use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
//! use exactly::kafka::rdkafka::ClientConfig;
//! use exactly::{Options, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let group = GroupStore::new(Arc::new(Store::open("./dedup", Options::default())?));
//! let consumer: BaseConsumer<DedupContext> = ClientConfig::new()
//!     .set("bootstrap.servers", "localhost:9092")
//!     .set("group.id", "orders-service")
//!     .set("enable.auto.commit", "false")
//!     .create_with_context(DedupContext::new(&group))?;
//! consumer.subscribe(&["orders"])?;
//! let mut consumer = IdempotentConsumer::new(consumer, KeySource::header("idempotency-key"));
//! loop {
//!     consumer.poll_batch(Duration::from_secs(1), |_message, key| {
//!         // Apply the side effect; pass `key` downstream where possible.
//!         let _ = key;
//!         Ok::<(), std::io::Error>(())
//!     })?;
//! }
//! # }
//! ```
//!
//! See `docs/kafka.md` for the resume-point rule, rebalances, deployment
//! shapes and the remaining windows.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::{Error, Partition, Store, Verdict};

/// The rdkafka crate this module is built against, so that applications use
/// the same version.
pub use rdkafka;

/// The consumer type the helpers of this module drive.
pub type DedupConsumer = BaseConsumer<DedupContext>;

/// A [`Store`] shared by the consumers of one consumer group in this
/// process, with a record of which consumer owns which partition.
///
/// Cloning is cheap; every clone refers to the same store and record. A
/// consumer's revocation revokes a shard only if that consumer still owns
/// it, so a late revocation by a consumer that lost a partition to another
/// consumer of the same store does not close the new owner's shard.
#[derive(Clone, Debug)]
pub struct GroupStore {
    inner: Arc<GroupInner>,
}

#[derive(Debug)]
struct GroupInner {
    store: Arc<Store>,
    /// Partition → the member that assigned it last.
    owners: Mutex<HashMap<Partition, u64>>,
    next_member: AtomicU64,
}

impl GroupStore {
    /// Wraps `store` for the consumers of one consumer group.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            inner: Arc::new(GroupInner {
                store,
                owners: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(1),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    fn new_member(&self) -> u64 {
        self.inner.next_member.fetch_add(1, Ordering::Relaxed)
    }

    /// Assigns the shard and records `member` as its owner.
    fn acquire(&self, member: u64, partition: &Partition, epoch: Option<u64>) -> crate::Result<()> {
        let mut owners = self.inner.owners.lock();
        assign_partition(&self.inner.store, partition, epoch)?;
        owners.insert(partition.clone(), member);
        Ok(())
    }

    /// Revokes the shard if `member` still owns it.
    fn release(&self, member: u64, partition: &Partition) -> crate::Result<()> {
        let mut owners = self.inner.owners.lock();
        if owners.get(partition) != Some(&member) {
            return Ok(());
        }
        owners.remove(partition);
        match self.inner.store.revoke(partition) {
            Ok(()) | Err(Error::NotAssigned(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Assigns `partition`'s shard, with the consumer group's generation as its
/// epoch when it is known.
fn assign_partition(store: &Store, partition: &Partition, epoch: Option<u64>) -> crate::Result<()> {
    // Fence the shard with the group generation when it is known; the same
    // generation again (another consumer thread of this process) is accepted.
    match epoch {
        Some(epoch) => store.assign_with_epoch(partition, epoch),
        None => store.assign(partition),
    }
}

/// The consumer group generation of the current assignment, used as the
/// shards' epoch (see `Store::assign_with_epoch`).
///
/// librdkafka knows it (`rd_kafka_consumer_group_metadata_generation_id`),
/// but rdkafka 0.39 does not expose it without `unsafe` code, which this
/// crate forbids; until it does, there is no epoch.
fn group_generation(_consumer: &DedupConsumer) -> Option<u64> {
    None
}

/// Where a newly assigned partition resumes: the later of the store's
/// committed offset and the consumer group's committed offset.
///
/// Kafka commits always follow the store commit, so the later of the two is
/// where processing got to: the store is ahead when the process died between
/// its store commit and its Kafka commit, the group is ahead when another
/// consumer (with another store) processed the partition since. `None`
/// leaves the position to the group's committed offset (or
/// `auto.offset.reset`), which is also the choice when the group's offset
/// could not be read (`group_known == false`): replaying from the group's
/// offset into a store that holds the marks is safe, skipping ahead is not.
///
/// ```
/// use exactly::kafka::resume_offset;
/// use exactly::kafka::rdkafka::Offset;
/// assert_eq!(resume_offset(Some(10), Offset::Offset(7), true), Some(10));
/// assert_eq!(resume_offset(Some(10), Offset::Offset(12), true), Some(12));
/// assert_eq!(resume_offset(Some(10), Offset::Invalid, true), Some(10));
/// assert_eq!(resume_offset(None, Offset::Offset(12), true), None);
/// assert_eq!(resume_offset(Some(10), Offset::Invalid, false), None);
/// ```
pub fn resume_offset(store: Option<i64>, group: Offset, group_known: bool) -> Option<i64> {
    if !group_known {
        return None;
    }
    match (store, group) {
        (Some(s), Offset::Offset(g)) => Some(s.max(g)),
        (Some(s), _) => Some(s),
        (None, _) => None,
    }
}

/// A failure inside a rebalance callback, reported by the next
/// [`IdempotentConsumer::poll_batch`].
#[derive(Debug)]
enum RebalanceFailure {
    Store(Error),
    Kafka(KafkaError),
}

/// The rdkafka consumer context that keeps the store's shards in step with
/// the consumer group's assignment.
///
/// Create one per consumer with [`DedupContext::new`] and pass it to
/// `ClientConfig::create_with_context`. Set `enable.auto.commit=false`:
/// offsets are committed by [`IdempotentConsumer`] after the store commit.
///
/// * **Assignment:** each partition's shard is assigned (with the group
///   generation as epoch once available), and the partition is positioned at
///   [`resume_offset`] of the store's and the group's committed offsets.
/// * **Revocation:** unless the assignment was lost, the store's committed
///   offsets of the revoked partitions are committed to Kafka synchronously
///   (the handover, see [`DedupContext::handover_commit`]); then the shards
///   are revoked. A store offset that may be behind the group's (the group's
///   could not be read at assignment and this consumer has committed no
///   batch of the partition since) is not committed, so a handover never
///   moves the group's offset back.
///
/// A store error during a rebalance cannot be returned from the callback;
/// the next [`IdempotentConsumer::poll_batch`] returns it before processing
/// anything.
#[derive(Debug)]
pub struct DedupContext {
    group: GroupStore,
    member: u64,
    handover_commit: bool,
    offsets_timeout: Duration,
    /// Owned partitions and the epoch each was assigned with.
    owned: Mutex<BTreeMap<Partition, Owned>>,
    rebalances: AtomicU64,
    handover_failures: AtomicU64,
    commit_failures: AtomicU64,
    failure: Mutex<Option<RebalanceFailure>>,
}

impl DedupContext {
    /// A context for one consumer of `group`'s store.
    pub fn new(group: &GroupStore) -> Self {
        Self {
            group: group.clone(),
            member: group.new_member(),
            handover_commit: true,
            offsets_timeout: Duration::from_secs(10),
            owned: Mutex::new(BTreeMap::new()),
            rebalances: AtomicU64::new(0),
            handover_failures: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    /// Whether a revocation commits the store's offsets to Kafka
    /// synchronously before the partitions are released (default `true`).
    ///
    /// The next owner of a partition starts at the group's committed offset
    /// when it has no later one in its own store, so with one store per
    /// consumer instance this handover keeps it from replaying messages this
    /// consumer processed. Consumers that share one store do not need it
    /// (the store holds every mark and offset) and may turn it off to make
    /// rebalances faster.
    pub fn handover_commit(mut self, enabled: bool) -> Self {
        self.handover_commit = enabled;
        self
    }

    /// How long an assignment waits for the group's committed offsets
    /// (default 10 s). On a timeout the partitions start at the group's
    /// committed offsets, which is safe but may replay messages.
    pub fn offsets_timeout(mut self, timeout: Duration) -> Self {
        self.offsets_timeout = timeout;
        self
    }

    /// The group store this context works on.
    pub fn group(&self) -> &GroupStore {
        &self.group
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        self.group.store()
    }

    /// The partitions currently assigned to this consumer, in order.
    pub fn owned(&self) -> Vec<Partition> {
        self.owned.lock().keys().cloned().collect()
    }

    /// Rebalance callbacks seen so far (assignments, revocations, errors).
    pub fn rebalances(&self) -> u64 {
        self.rebalances.load(Ordering::Acquire)
    }

    /// Handover commits that failed; each may make the partition's next
    /// owner replay messages this consumer processed.
    pub fn handover_failures(&self) -> u64 {
        self.handover_failures.load(Ordering::Relaxed)
    }

    /// Kafka commits (asynchronous or handover) that failed. A failed commit
    /// costs nothing as long as the store holds the offset: the resume point
    /// is the later of the two.
    pub fn commit_failures(&self) -> u64 {
        self.commit_failures.load(Ordering::Relaxed)
    }

    /// The epoch `partition` was assigned with, if any.
    fn epoch(&self, partition: &Partition) -> Option<u64> {
        self.owned.lock().get(partition).and_then(|o| o.epoch)
    }

    fn fail(&self, failure: RebalanceFailure) {
        let mut slot = self.failure.lock();
        if slot.is_none() {
            *slot = Some(failure);
        }
    }

    fn take_failure(&self) -> Option<RebalanceFailure> {
        self.failure.lock().take()
    }

    fn on_assign(&self, consumer: &DedupConsumer, tpl: &mut TopicPartitionList) {
        let epoch = group_generation(consumer);
        let mut store_offsets = Vec::new();
        for elem in tpl.elements() {
            let p = Partition::new(elem.topic(), elem.partition());
            if let Err(e) = self.group.acquire(self.member, &p, epoch) {
                self.fail(RebalanceFailure::Store(e));
                continue;
            }
            // The rebalance counter as it will read once this callback is done.
            let since = self.rebalances.load(Ordering::Acquire) + 1;
            let owned = Owned {
                epoch,
                since,
                handover: false,
            };
            self.owned.lock().insert(p.clone(), owned);
            match self.store().committed_offset(&p) {
                Ok(Some(offset)) => store_offsets.push((p, offset)),
                Ok(None) => {}
                Err(e) => self.fail(RebalanceFailure::Store(e)),
            }
        }
        if store_offsets.is_empty() {
            return;
        }
        let group = consumer.committed_offsets(tpl.clone(), self.offsets_timeout);
        let group_known = group.is_ok();
        for (p, offset) in store_offsets {
            let group_offset = group
                .as_ref()
                .ok()
                .and_then(|g| g.find_partition(p.topic(), p.partition()))
                .map_or(Offset::Invalid, |e| e.offset());
            // Unread, the group's offset may be ahead of the store's: the
            // store's offset may not be handed over until this consumer has
            // committed a batch of the partition (which starts at the group's
            // offset, so the store's is then at or past it).
            let Some(resume) = resume_offset(Some(offset), group_offset, group_known) else {
                continue;
            };
            let adopted = if resume > offset {
                // Adopt the group's later offset, so that the store's offset
                // (committed to Kafka on handover) never moves the group's back.
                self.adopt_offset(&p, resume)
            } else {
                Ok(())
            };
            match adopted {
                Ok(()) => self.may_hand_over(&p),
                Err(e) => self.fail(RebalanceFailure::Store(e)),
            }
            if let Err(e) =
                tpl.set_partition_offset(p.topic(), p.partition(), Offset::Offset(resume))
            {
                self.fail(RebalanceFailure::Kafka(e));
            }
        }
    }

    /// Records that `partition`'s offset in the store is at or past the
    /// group's committed offset, so that a handover may commit it.
    fn may_hand_over(&self, partition: &Partition) {
        if let Some(owned) = self.owned.lock().get_mut(partition) {
            owned.handover = true;
        }
    }

    /// Commits `offset` as the partition's offset in the store (no marks).
    fn adopt_offset(&self, partition: &Partition, offset: i64) -> crate::Result<()> {
        let mut batch = self.store().batch(partition)?;
        batch.set_offset(offset);
        batch.commit()
    }

    fn on_revoke(&self, consumer: &DedupConsumer, tpl: &TopicPartitionList) {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| Partition::new(e.topic(), e.partition()))
            .collect();
        if self.handover_commit && !consumer.assignment_lost() {
            let mut offsets = TopicPartitionList::new();
            let owned = self.owned.lock().clone();
            for p in &partitions {
                // Only an offset known to be at or past the group's: a store
                // whose offset is behind the group's (another instance
                // processed the partition since) would move the group's back,
                // and the next owner would redo what that instance did.
                if !owned.get(p).is_some_and(|o| o.handover) {
                    continue;
                }
                if let Ok(Some(offset)) = self.store().committed_offset(p) {
                    if offsets
                        .add_partition_offset(p.topic(), p.partition(), Offset::Offset(offset))
                        .is_err()
                    {
                        self.handover_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if offsets.count() > 0 && consumer.commit(&offsets, CommitMode::Sync).is_err() {
                self.handover_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        for p in &partitions {
            self.owned.lock().remove(p);
            if let Err(e) = self.group.release(self.member, p) {
                self.fail(RebalanceFailure::Store(e));
            }
        }
    }
}

/// A partition owned by a consumer.
#[derive(Debug, Clone, Copy)]
struct Owned {
    /// The epoch its shard was assigned with.
    epoch: Option<u64>,
    /// The consumer's rebalance count from which messages of the partition
    /// belong to this ownership.
    since: u64,
    /// Whether the store's offset of the partition is known to be at or past
    /// the group's committed offset: the group's offset was read (and
    /// adopted) at assignment, or this consumer committed a batch of the
    /// partition since. Only then does a handover commit it.
    handover: bool,
}

impl ClientContext for DedupContext {}

impl ConsumerContext for DedupContext {
    fn rebalance(
        &self,
        consumer: &DedupConsumer,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                // A failed rebalance: give everything up, as librdkafka's
                // default handler does.
                let owned: Vec<Partition> = std::mem::take(&mut *self.owned.lock())
                    .into_keys()
                    .collect();
                for p in &owned {
                    if let Err(e) = self.group.release(self.member, p) {
                        self.fail(RebalanceFailure::Store(e));
                    }
                }
                self.fail(RebalanceFailure::Kafka(KafkaError::Rebalance(other.into())));
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            self.fail(RebalanceFailure::Kafka(e));
        }
        self.rebalances.fetch_add(1, Ordering::AcqRel);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if result.is_err() {
            self.commit_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A closure that extracts a message's idempotency key.
pub type KeyFn = dyn for<'m> Fn(&'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> + Send;

/// Where a message's idempotency key comes from.
pub enum KeySource {
    /// The Kafka message key.
    MessageKey,
    /// The value of the first header with this name (e.g. `idempotency-key`).
    Header(String),
    /// A closure, e.g. a field of the payload.
    Custom(Box<KeyFn>),
}

impl KeySource {
    /// The value of the first header named `name`.
    pub fn header(name: impl Into<String>) -> Self {
        Self::Header(name.into())
    }

    /// The key computed by `f`; `None` means the message has no key.
    pub fn custom<F>(f: F) -> Self
    where
        F: for<'m> Fn(&'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> + Send + 'static,
    {
        Self::Custom(Box::new(f))
    }

    /// The key of `message`, or `None` if it has none (an empty key counts
    /// as none).
    pub fn extract<'m>(&self, message: &'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> {
        let key = match self {
            Self::MessageKey => message.key().map(Cow::Borrowed),
            Self::Header(name) => message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name.as_str())
                    .and_then(|h| h.value)
                    .map(Cow::Borrowed)
            }),
            Self::Custom(f) => f(message),
        };
        key.filter(|k| !k.is_empty())
    }
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MessageKey => f.write_str("MessageKey"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What to do with a message that has no idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Call the handler (with `None` as the key) without deduplication:
    /// such messages are processed at least once.
    Process,
    /// Skip the message without calling the handler.
    Skip,
    /// Stop with [`ConsumeError::MissingKey`] (the default). The messages
    /// before it are committed; the consumer is positioned at it.
    #[default]
    Fail,
}

/// When the poll loop commits offsets to Kafka. Kafka commits always follow
/// the store commit; the store's offsets are the resume points, and Kafka's
/// are the copy other consumer instances see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaCommit {
    /// After each poll batch, asynchronously (the default).
    #[default]
    Async,
    /// After each poll batch, waiting for the broker: the group's offsets
    /// never lag the store's by more than the batch in progress, which
    /// narrows what the next owner replays when a consumer with its own store
    /// dies, at the cost of a round trip per batch.
    Sync,
    /// Only on revocation (the handover, see
    /// [`DedupContext::handover_commit`]). Suits consumers that all share
    /// one store, which holds the offsets anyway; with one store per
    /// instance, a consumer that dies makes the next owner replay everything
    /// since its last handover.
    OnRevoke,
}

/// An error of the poll loop. After any error, the messages processed so
/// far are committed (store and Kafka) and the consumer is positioned at
/// the first message not processed, so calling
/// [`IdempotentConsumer::poll_batch`] again retries it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError<E> {
    /// The handler failed on a message.
    #[error("handler failed on {partition} at offset {offset}")]
    Handler {
        /// The message's partition.
        partition: Partition,
        /// The message's offset.
        offset: i64,
        /// The handler's error.
        #[source]
        source: E,
    },
    /// A message has no idempotency key and the policy is
    /// [`MissingKey::Fail`].
    #[error("message at {partition} offset {offset} has no idempotency key")]
    MissingKey {
        /// The message's partition.
        partition: Partition,
        /// The message's offset.
        offset: i64,
    },
    /// The store failed (in the poll loop or in a rebalance callback).
    #[error(transparent)]
    Store(#[from] Error),
    /// Kafka failed: a rebalance could not be applied, or the consumer could
    /// not be repositioned after another error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// What one [`IdempotentConsumer::poll_batch`] did.
#[derive(Debug, Default)]
pub struct PollReport {
    /// Messages polled and handled or skipped.
    pub messages: usize,
    /// Messages whose handler ran (new keys, and keyless ones under
    /// [`MissingKey::Process`]).
    pub processed: usize,
    /// Messages skipped as duplicates.
    pub duplicates: usize,
    /// Keyless messages skipped under [`MissingKey::Skip`].
    pub skipped: usize,
    /// Messages polled before a rebalance and dropped unprocessed (they are
    /// delivered again from the resume point).
    pub discarded: usize,
    /// The offsets committed to the store (and then to Kafka), per partition.
    pub committed: Vec<(Partition, i64)>,
    /// Non-fatal Kafka errors: errors returned by poll (librdkafka recovers
    /// from them on its own) and a failed asynchronous commit request.
    pub kafka_errors: Vec<KafkaError>,
}

/// The idempotent poll loop over a consumer with a [`DedupContext`].
///
/// Per call of [`poll_batch`](Self::poll_batch): poll up to `max_batch`
/// messages; per partition, open one store batch, and for each message
/// extract its key, skip it if it is a duplicate, else call the handler and
/// mark the key; commit the marks with the offset after the last message in
/// one atomic store write; finally commit the offsets to Kafka, as
/// [`KafkaCommit`] says (asynchronously by default).
pub struct IdempotentConsumer {
    consumer: DedupConsumer,
    keys: KeySource,
    missing: MissingKey,
    max_batch: usize,
    seek_timeout: Duration,
    kafka_commit: KafkaCommit,
}

impl std::fmt::Debug for IdempotentConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentConsumer")
            .field("keys", &self.keys)
            .field("missing", &self.missing)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

impl IdempotentConsumer {
    /// Runs the loop over `consumer` (already subscribed or assigned),
    /// taking each message's idempotency key from `keys`.
    pub fn new(consumer: DedupConsumer, keys: KeySource) -> Self {
        Self {
            consumer,
            keys,
            missing: MissingKey::default(),
            max_batch: 500,
            seek_timeout: Duration::from_secs(10),
            kafka_commit: KafkaCommit::default(),
        }
    }

    /// When offsets are committed to Kafka after the store commit (default
    /// [`KafkaCommit::Async`]).
    pub fn kafka_commit(mut self, when: KafkaCommit) -> Self {
        self.kafka_commit = when;
        self
    }

    /// The policy for messages without a key (default [`MissingKey::Fail`]).
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        self.missing = policy;
        self
    }

    /// The most messages per poll batch (default 500, at least 1).
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// The consumer.
    pub fn consumer(&self) -> &DedupConsumer {
        &self.consumer
    }

    /// The consumer's context.
    pub fn context(&self) -> &DedupContext {
        self.consumer.context()
    }

    /// Gives the consumer back.
    pub fn into_inner(self) -> DedupConsumer {
        self.consumer
    }

    /// Polls one batch (waiting up to `timeout` for its first message) and
    /// processes it; see [`IdempotentConsumer`]. `handler` gets each new
    /// message with its idempotency key (`None` only under
    /// [`MissingKey::Process`]); pass the key on to the side effect where
    /// the receiving system accepts one.
    pub fn poll_batch<E, H>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>) -> Result<(), E>,
    {
        self.check_rebalance()?;
        let mut report = PollReport::default();
        let messages = self.poll_messages(timeout, &mut report);
        self.check_rebalance()?;
        if messages.is_empty() {
            return Ok(report);
        }

        let mut by_partition: BTreeMap<Partition, Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
        for m in &messages {
            by_partition
                .entry(Partition::new(m.topic(), m.partition()))
                .or_default()
                .push(m);
        }

        let mut to_kafka = TopicPartitionList::new();
        let mut outcome = Ok(());
        let mut unprocessed: Vec<(Partition, i64)> = Vec::new();
        for (p, msgs) in &by_partition {
            if outcome.is_err() {
                if let Some(first) = msgs.first() {
                    unprocessed.push((p.clone(), first.offset()));
                }
                continue;
            }
            let result = self.process_partition(p, msgs, &mut handler, &mut report);
            if let Some(offset) = result.committed {
                report.committed.push((p.clone(), offset));
                if let Err(e) =
                    to_kafka.add_partition_offset(p.topic(), p.partition(), Offset::Offset(offset))
                {
                    report.kafka_errors.push(e);
                }
            }
            if let Err(e) = result.outcome {
                unprocessed.push((p.clone(), result.resume_at));
                outcome = Err(e);
            }
        }

        let mode = match self.kafka_commit {
            KafkaCommit::Async => Some(CommitMode::Async),
            KafkaCommit::Sync => Some(CommitMode::Sync),
            KafkaCommit::OnRevoke => None,
        };
        if let Some(mode) = mode.filter(|_| to_kafka.count() > 0) {
            if let Err(e) = self.consumer.commit(&to_kafka, mode) {
                report.kafka_errors.push(e);
            }
        }
        match outcome {
            Ok(()) => Ok(report),
            Err(e) => {
                self.rewind(&unprocessed)?;
                Err(e)
            }
        }
    }

    /// Runs [`poll_batch`](Self::poll_batch) until `stop` returns `true`
    /// (asked after each batch) or an error occurs.
    pub fn run<E, H, S>(&mut self, mut handler: H, mut stop: S) -> Result<(), ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>) -> Result<(), E>,
        S: FnMut(&PollReport) -> bool,
    {
        loop {
            let report = self.poll_batch(Duration::from_millis(100), &mut handler)?;
            if stop(&report) {
                return Ok(());
            }
        }
    }

    /// Reports a failure of a rebalance callback.
    fn check_rebalance<E>(&self) -> Result<(), ConsumeError<E>> {
        match self.context().take_failure() {
            None => Ok(()),
            Some(RebalanceFailure::Store(e)) => Err(ConsumeError::Store(e)),
            Some(RebalanceFailure::Kafka(e)) => Err(ConsumeError::Kafka(e)),
        }
    }

    /// Polls up to `max_batch` messages. When a rebalance happens during the
    /// poll, the messages polled before it are kept only for partitions this
    /// consumer has owned throughout (kept across a cooperative rebalance);
    /// the others may belong to another consumer now, or resume elsewhere.
    fn poll_messages(
        &self,
        timeout: Duration,
        report: &mut PollReport,
    ) -> Vec<BorrowedMessage<'_>> {
        let mut messages: Vec<BorrowedMessage<'_>> = Vec::new();
        let mut rebalances = self.context().rebalances();
        let mut wait = timeout;
        while messages.len() < self.max_batch {
            let polled = self.consumer.poll(wait);
            wait = Duration::ZERO;
            let now = self.context().rebalances();
            if now != rebalances {
                let before = messages.len();
                let owned = self.context().owned.lock();
                messages.retain(|m| {
                    owned
                        .get(&Partition::new(m.topic(), m.partition()))
                        .is_some_and(|o| o.since <= rebalances)
                });
                drop(owned);
                report.discarded += before - messages.len();
                rebalances = now;
            }
            match polled {
                None => break,
                Some(Err(e)) => {
                    report.kafka_errors.push(e);
                    break;
                }
                Some(Ok(m)) => messages.push(m),
            }
        }
        messages
    }

    /// Processes one partition's messages of a poll batch in one store batch.
    fn process_partition<E, H>(
        &self,
        p: &Partition,
        msgs: &[&BorrowedMessage<'_>],
        handler: &mut H,
        report: &mut PollReport,
    ) -> PartitionResult<E>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>) -> Result<(), E>,
    {
        let start = msgs.first().map_or(0, |m| m.offset());
        let fail = |e: ConsumeError<E>, resume_at: i64| PartitionResult {
            committed: None,
            resume_at,
            outcome: Err(e),
        };
        let store = self.context().store();
        let mut batch = match store.batch(p) {
            Ok(b) => b,
            Err(e) => return fail(e.into(), start),
        };
        // A consumer that lost the partition to a newer generation commits nothing.
        if let Some(epoch) = self.context().epoch(p) {
            batch.fence(epoch);
        }

        let mut marked: HashSet<Vec<u8>> = HashSet::new();
        let mut next = start;
        let mut error = None;
        for m in msgs {
            match self.handle(p, m, store, &mut marked, handler, report) {
                Ok(Some(key)) => {
                    if let Err(e) = batch.mark(&key) {
                        error = Some(ConsumeError::Store(e));
                        break;
                    }
                    marked.insert(key);
                }
                Ok(None) => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            next = m.offset() + 1;
            report.messages += 1;
        }

        // The offset only moves forward: another consumer of this store may
        // have committed a later one (everything before it is processed).
        let committed = match store.committed_offset(p) {
            Ok(c) => c,
            Err(e) => return fail(e.into(), start),
        };
        let offset = committed.map_or(next, |c| c.max(next));
        batch.set_offset(offset);
        if let Err(e) = batch.commit() {
            return fail(e.into(), start);
        }
        // The batch started at the consumer's position, which is at or past
        // the group's committed offset: so is the store's offset now.
        self.context().may_hand_over(p);
        PartitionResult {
            committed: Some(offset),
            resume_at: offset,
            outcome: error.map_or(Ok(()), Err),
        }
    }

    /// Handles one message: returns the key to mark when the handler ran on
    /// a new key.
    fn handle<E, H>(
        &self,
        p: &Partition,
        m: &BorrowedMessage<'_>,
        store: &Store,
        marked: &mut HashSet<Vec<u8>>,
        handler: &mut H,
        report: &mut PollReport,
    ) -> Result<Option<Vec<u8>>, ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>) -> Result<(), E>,
    {
        let handler_error = |source| ConsumeError::Handler {
            partition: p.clone(),
            offset: m.offset(),
            source,
        };
        let Some(key) = self.keys.extract(m) else {
            return match self.missing {
                MissingKey::Skip => {
                    report.skipped += 1;
                    Ok(None)
                }
                MissingKey::Process => {
                    handler(m, None).map_err(handler_error)?;
                    report.processed += 1;
                    Ok(None)
                }
                MissingKey::Fail => Err(ConsumeError::MissingKey {
                    partition: p.clone(),
                    offset: m.offset(),
                }),
            };
        };
        // The open batch holds the partition's write lock, so nobody marks
        // the key between this check and the batch's commit.
        if marked.contains(key.as_ref()) || store.check(p, &key)? == Verdict::Duplicate {
            report.duplicates += 1;
            return Ok(None);
        }
        handler(m, Some(&key)).map_err(handler_error)?;
        report.processed += 1;
        Ok(Some(key.into_owned()))
    }

    /// Positions the consumer at the first unprocessed message of each
    /// partition, so that the next poll retries them.
    fn rewind<E>(&self, positions: &[(Partition, i64)]) -> Result<(), ConsumeError<E>> {
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in positions {
            tpl.add_partition_offset(p.topic(), p.partition(), Offset::Offset(*offset))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let result = self.consumer.seek_partitions(tpl, self.seek_timeout)?;
        for elem in result.elements() {
            elem.error()?;
        }
        Ok(())
    }
}

/// The outcome of one partition's share of a poll batch.
struct PartitionResult<E> {
    /// The offset committed to the store, if the batch was committed.
    committed: Option<i64>,
    /// Where the partition should resume when `outcome` is an error.
    resume_at: i64,
    outcome: Result<(), ConsumeError<E>>,
}
