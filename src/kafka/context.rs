//! The rdkafka consumer context: assigns and revokes the store's shards with
//! the consumer group's rebalances, positions assigned partitions at their
//! resume point, and hands revoked ones over.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::group::GroupStore;
use crate::{Error, Partition, Store};

/// The consumer type the helpers of this module drive.
pub type DedupConsumer = BaseConsumer<DedupContext>;

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
pub(super) enum RebalanceFailure {
    Store(Error),
    Kafka(KafkaError),
}

/// The rdkafka consumer context that keeps the store's shards in step with
/// the consumer group's assignment.
///
/// Create one per consumer with [`DedupContext::new`] and pass it to
/// `ClientConfig::create_with_context`. Set `enable.auto.commit=false`:
/// offsets are committed by [`IdempotentConsumer`](super::IdempotentConsumer) after the store commit.
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
/// the next [`IdempotentConsumer::poll_batch`](super::IdempotentConsumer::poll_batch) returns it before processing
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
    /// Changelog mode: assigned partitions are paused until restored, and
    /// offsets go to Kafka only in the changelog's transactions.
    restore: AtomicBool,
    /// Partitions assigned in changelog mode and not yet restored, with
    /// the rebalance count of their ownership.
    to_restore: Mutex<Vec<(Partition, u64)>>,
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
            restore: AtomicBool::new(false),
            to_restore: Mutex::new(Vec::new()),
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

    /// Whether this consumer has owned `partition` since rebalance count
    /// `rebalances` or earlier (without losing it since).
    pub(super) fn owned_since(&self, partition: &Partition, rebalances: u64) -> bool {
        self.owned
            .lock()
            .get(partition)
            .is_some_and(|o| o.since <= rebalances)
    }

    /// Turns changelog mode on (see `IdempotentConsumer::changelog`).
    pub(super) fn enable_restore(&self) {
        self.restore.store(true, Ordering::Release);
    }

    fn restore_mode(&self) -> bool {
        self.restore.load(Ordering::Acquire)
    }

    /// The partitions waiting for a restore, with their ownership's
    /// rebalance count.
    pub(super) fn take_to_restore(&self) -> Vec<(Partition, u64)> {
        std::mem::take(&mut *self.to_restore.lock())
    }

    /// Puts a partition back in the restore queue (its restore failed).
    pub(super) fn restore_again(&self, partition: Partition, since: u64) {
        self.to_restore.lock().push((partition, since));
    }

    /// The rebalance count `partition`'s current ownership began at, and
    /// the group's committed offset read then (if it was).
    pub(super) fn ownership(&self, partition: &Partition) -> Option<(u64, Option<i64>)> {
        self.owned
            .lock()
            .get(partition)
            .map(|o| (o.since, o.group_offset))
    }

    /// The epoch `partition` was assigned with, if any.
    pub(super) fn epoch(&self, partition: &Partition) -> Option<u64> {
        self.owned.lock().get(partition).and_then(|o| o.epoch)
    }

    fn fail(&self, failure: RebalanceFailure) {
        // Logged here: only the first failure reaches the next poll.
        match &failure {
            RebalanceFailure::Store(e) => {
                error!(error = %e, "rebalance callback failed (store); the next poll returns it");
            }
            RebalanceFailure::Kafka(e) => {
                error!(error = %e, "rebalance callback failed (Kafka); the next poll returns it");
            }
        }
        let mut slot = self.failure.lock();
        if slot.is_none() {
            *slot = Some(failure);
        }
    }

    pub(super) fn take_failure(&self) -> Option<RebalanceFailure> {
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
                group_offset: None,
            };
            self.owned.lock().insert(p.clone(), owned);
            if self.restore_mode() {
                info!(
                    partition = %p,
                    "partition paused until its changelog is restored"
                );
                self.to_restore.lock().push((p.clone(), since));
            }
            match self.store().committed_offset(&p) {
                Ok(Some(offset)) => store_offsets.push((p, offset)),
                Ok(None) => info!(
                    partition = %p,
                    epoch = ?epoch,
                    store_offset = ?None::<i64>,
                    resume = ?None::<i64>,
                    why = "no offset in the store: the group's committed offset (or auto.offset.reset)",
                    "partition assigned by the group"
                ),
                Err(e) => self.fail(RebalanceFailure::Store(e)),
            }
        }
        if store_offsets.is_empty() {
            return;
        }
        let group = consumer.committed_offsets(tpl.clone(), self.offsets_timeout);
        for (p, offset) in store_offsets {
            // Known only if the partition's own entry came back without an
            // error: an error there is not "no offset".
            let entry = group
                .as_ref()
                .ok()
                .and_then(|g| g.find_partition(p.topic(), p.partition()));
            let group_known = entry.as_ref().is_some_and(|e| e.error().is_ok());
            let group_offset = entry.map_or(Offset::Invalid, |e| e.offset());
            if let (true, Offset::Offset(g)) = (group_known, group_offset) {
                if let Some(owned) = self.owned.lock().get_mut(&p) {
                    owned.group_offset = Some(g);
                }
            }
            // Unread, the group's offset may be ahead of the store's: the
            // store's offset may not be handed over until this consumer has
            // committed a batch of the partition (which starts at the group's
            // offset, so the store's is then at or past it).
            let Some(resume) = resume_offset(Some(offset), group_offset, group_known) else {
                info!(
                    partition = %p,
                    epoch = ?epoch,
                    store_offset = ?Some(offset),
                    resume = ?None::<i64>,
                    why = "the group's offset could not be read: resuming at it may replay, skipping ahead could lose",
                    "partition assigned by the group"
                );
                continue;
            };
            info!(
                partition = %p,
                epoch = ?epoch,
                store_offset = ?Some(offset),
                group_offset = ?match group_offset {
                    Offset::Offset(g) => Some(g),
                    _ => None,
                },
                resume = ?Some(resume),
                why = if resume > offset {
                    "the group's offset is ahead (another instance processed the partition since): the store adopts it"
                } else {
                    "the store's offset, at or past the group's"
                },
                "partition assigned by the group"
            );
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
            super::metrics::resume_offset(&p, resume);
        }
    }

    /// Records that `partition`'s offset in the store is at or past the
    /// group's committed offset, so that a handover may commit it.
    pub(super) fn may_hand_over(&self, partition: &Partition) {
        if let Some(owned) = self.owned.lock().get_mut(partition) {
            owned.handover = true;
        }
    }

    /// Commits `offset` as the partition's offset in the store (no marks).
    fn adopt_offset(&self, partition: &Partition, offset: i64) -> crate::Result<()> {
        let mut batch = self.store().batch(partition)?;
        // Another consumer of this store may have committed a later offset
        // since it was read: never move it back.
        let committed = self.store().committed_offset(partition)?;
        batch.set_offset(committed.map_or(offset, |c| c.max(offset)));
        batch.commit()
    }

    fn on_revoke(&self, consumer: &DedupConsumer, tpl: &TopicPartitionList) {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| Partition::new(e.topic(), e.partition()))
            .collect();
        // In changelog mode offsets reach Kafka only in the changelog's
        // transactions: a plain commit could move the group's offset past a
        // batch whose changelog records are not published yet.
        let lost = consumer.assignment_lost();
        let no_handover = if !self.handover_commit {
            Some("handover commit turned off")
        } else if self.restore_mode() {
            Some("changelog mode: offsets reach Kafka in the changelog's transactions")
        } else if lost {
            Some("assignment lost: another consumer may own the partitions already")
        } else {
            None
        };
        if let Some(why) = no_handover {
            for p in &partitions {
                info!(partition = %p, handover = ?None::<i64>, why, "partition revoked by the group");
            }
        }
        if no_handover.is_none() {
            let mut offsets = TopicPartitionList::new();
            let owned = self.owned.lock().clone();
            for p in &partitions {
                // Only an offset known to be at or past the group's: a store
                // whose offset is behind the group's (another instance
                // processed the partition since) would move the group's back,
                // and the next owner would redo what that instance did.
                if !owned.get(p).is_some_and(|o| o.handover) {
                    info!(
                        partition = %p,
                        handover = ?None::<i64>,
                        why = "the store's offset may be behind the group's",
                        "partition revoked by the group"
                    );
                    continue;
                }
                match self.store().committed_offset(p) {
                    Ok(Some(offset)) => {
                        if let Err(e) = offsets.add_partition_offset(
                            p.topic(),
                            p.partition(),
                            Offset::Offset(offset),
                        ) {
                            error!(partition = %p, error = %e, "handover commit failed; the next owner may replay");
                            self.handover_failures.fetch_add(1, Ordering::Relaxed);
                        } else {
                            info!(
                                partition = %p,
                                handover = ?Some(offset),
                                why = "the store's offset, at or past the group's",
                                "partition revoked by the group"
                            );
                        }
                    }
                    Ok(None) => info!(
                        partition = %p,
                        handover = ?None::<i64>,
                        why = "no offset in the store",
                        "partition revoked by the group"
                    ),
                    Err(e) => error!(
                        partition = %p,
                        error = %e,
                        "handover commit failed; the next owner may replay"
                    ),
                }
            }
            if offsets.count() > 0 {
                if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                    error!(
                        partitions = ?names(&partitions),
                        error = %e,
                        "handover commit failed; the next owner may replay"
                    );
                    self.handover_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.to_restore
            .lock()
            .retain(|(p, _)| !partitions.contains(p));
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
    /// The group's committed offset, when it was read at assignment.
    group_offset: Option<i64>,
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
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // Changelog mode: nothing of a partition is fetched until its
                // restore is done (the poll loop resumes it then).
                if assigned.is_ok() && self.restore_mode() {
                    consumer.pause(tpl)
                } else {
                    assigned
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
                warn!(
                    error = ?other,
                    partitions = ?names(&owned),
                    "rebalance failed; every partition given up"
                );
                self.to_restore.lock().clear();
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
        super::metrics::rebalance(err);
        self.rebalances.fetch_add(1, Ordering::AcqRel);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            error!(
                error = %e,
                "offset commit to Kafka failed; the store's offset still holds the resume point"
            );
            self.commit_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Partitions as their events name them (`topic/partition`).
fn names(partitions: &[Partition]) -> Vec<String> {
    partitions.iter().map(ToString::to_string).collect()
}
