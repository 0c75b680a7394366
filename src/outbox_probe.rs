//! The local outbox driven without Kafka, for the fuzz targets and the crash
//! trials: a batch records its changes as the changelog loop's do, commits
//! its outbox entry with its marks and offset, and entries are completed
//! (removed) as a published transaction removes them. What they check: an
//! acknowledged entry survives a crash and a reopen intact, a completed one
//! never comes back (nothing is published twice from the outbox), and
//! sequence numbers never repeat.

use crate::outbox::OutboxEntry;
use crate::{Batch, Partition, Result, Store};

/// What an outbox entry holds, as the checks compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The entry's sequence number in its partition.
    pub seq: u64,
    /// The input offset of the batch's first message.
    pub start: i64,
    /// The input offset the batch committed.
    pub next: i64,
    /// The stored keys the batch changed, in order.
    pub changed: Vec<Vec<u8>>,
    /// The outgoing records staged, by topic and value.
    pub records: Vec<(String, Option<Vec<u8>>)>,
}

impl Pending {
    fn new(seq: u64, entry: &OutboxEntry) -> Self {
        Self {
            seq,
            start: entry.start,
            next: entry.next,
            changed: entry.changes.iter().map(|c| c.key.clone()).collect(),
            records: entry
                .records
                .iter()
                .map(|(_, r)| (r.topic.clone(), r.value.clone()))
                .collect(),
        }
    }
}

/// Makes `batch` record its changes in the outbox, `start` being the input
/// offset of its first message (what the changelog loop does).
pub fn record_changes(batch: &mut Batch<'_>, start: i64) {
    batch.record_changes(start);
}

/// Commits `batch`; returns the outbox entry it wrote, if any.
pub fn commit(batch: Batch<'_>) -> Result<Option<Pending>> {
    Ok(batch
        .commit_published()?
        .map(|(seq, entry)| Pending::new(seq, &entry)))
}

/// The partition's outbox entries, by sequence number.
pub fn pending(store: &Store, partition: &Partition) -> Result<Vec<Pending>> {
    Ok(store
        .outbox(partition)?
        .iter()
        .map(|(seq, entry)| Pending::new(*seq, entry))
        .collect())
}

/// Removes the partition's entries up to `seq`, as a committed transaction
/// does.
pub fn complete(store: &Store, partition: &Partition, seq: u64) -> Result<()> {
    store.batch(partition)?.complete_outbox(seq, None)
}
