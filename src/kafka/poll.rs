//! What both poll loops (the plain one and the claim mode) share: what a
//! poll batch did, its messages by partition, each partition's outcome, and
//! the claim mode's lease bounds.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};

use super::error::ConsumeError;
use crate::batch::Published;
use crate::Partition;

/// What one [`IdempotentConsumer::poll_batch`](super::IdempotentConsumer::poll_batch) did.
#[derive(Debug, Default)]
pub struct PollReport {
    /// Messages polled and handled or skipped.
    pub messages: usize,
    /// Messages whose handler ran (new keys, and keyless ones under
    /// [`MissingKey::Process`](super::MissingKey::Process)).
    pub processed: usize,
    /// Messages skipped as duplicates.
    pub duplicates: usize,
    /// Claim mode: messages handed to the handler in doubt (their key's
    /// earlier claim was never confirmed nor released).
    pub in_doubt: usize,
    /// Keyless messages skipped under [`MissingKey::Skip`](super::MissingKey::Skip).
    pub skipped: usize,
    /// Sequence mode: messages skipped because their source had moved to a
    /// newer epoch (a replaced producer's).
    pub fenced: usize,
    /// Messages polled before a rebalance and dropped unprocessed (they are
    /// delivered again from the resume point).
    pub discarded: usize,
    /// The offsets committed to the store (and then to Kafka), per partition.
    pub committed: Vec<(Partition, i64)>,
    /// Non-fatal Kafka errors: errors returned by poll (librdkafka recovers
    /// from them on its own) and a failed asynchronous commit request.
    pub kafka_errors: Vec<KafkaError>,
    /// Changelog mode: partitions whose restore finished in this call (they
    /// are processed from now on), with the changelog records read.
    pub restored: Vec<(Partition, u64)>,
}

/// The lease of the claims the claim mode makes, unless set with
/// [`IdempotentConsumer::claim_lease`](super::IdempotentConsumer::claim_lease):
/// a day. The loop settles every claim it makes before it returns, so the
/// lease only matters for a processor that stopped: until it runs out, the
/// key is delivered in doubt; after, as new.
pub const DEFAULT_CLAIM_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The shortest [`IdempotentConsumer::claim_lease`](super::IdempotentConsumer::claim_lease)
/// the claim mode takes.
pub const MIN_CLAIM_LEASE: Duration = Duration::from_secs(1);

/// The outcome of one partition's share of a poll batch.
pub(super) struct PartitionResult<E> {
    /// Whether its messages were processed at all (not after an earlier
    /// partition's error).
    pub(super) ran: bool,
    /// The offset committed to the store, if the batch was committed.
    pub(super) committed: Option<i64>,
    /// The outbox entry the commit left (changelog mode).
    pub(super) published: Option<Published>,
    /// Where the partition should resume when `outcome` is an error (or it
    /// did not run).
    pub(super) resume_at: i64,
    pub(super) outcome: Result<(), ConsumeError<E>>,
}

impl<E> PartitionResult<E> {
    /// A partition left for the next poll after an earlier one failed.
    pub(super) fn not_run(msgs: &[&BorrowedMessage<'_>]) -> Self {
        Self {
            ran: false,
            committed: None,
            published: None,
            resume_at: msgs.first().map_or(0, |m| m.offset()),
            outcome: Ok(()),
        }
    }

    /// A partition whose store batch could not be opened or committed.
    pub(super) fn failed(e: ConsumeError<E>, resume_at: i64) -> Self {
        Self {
            ran: true,
            committed: None,
            published: None,
            resume_at,
            outcome: Err(e),
        }
    }
}

/// A poll batch's messages by partition, in offset order.
/// The offset of each partition's first message in a poll batch grouped by
/// [`by_partition`]: where the partition starts again when nothing of the
/// batch was handled.
pub(super) fn first_offsets(
    grouped: &BTreeMap<Partition, Vec<&BorrowedMessage<'_>>>,
) -> Vec<(Partition, i64)> {
    grouped
        .iter()
        .filter_map(|(p, msgs)| msgs.first().map(|m| (p.clone(), m.offset())))
        .collect()
}

pub(super) fn by_partition<'a, 'm>(
    messages: &'a [BorrowedMessage<'m>],
) -> BTreeMap<Partition, Vec<&'a BorrowedMessage<'m>>> {
    let mut by_partition: BTreeMap<Partition, Vec<&BorrowedMessage<'m>>> = BTreeMap::new();
    for m in messages {
        by_partition
            .entry(Partition::new(m.topic(), m.partition()))
            .or_default()
            .push(m);
    }
    by_partition
}
