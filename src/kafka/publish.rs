//! Changelog mode of the poll loop: restores on assign, the local outbox
//! published in one Kafka transaction per poll batch with the group's
//! offsets, and what a restart left in the outbox.

use std::collections::BTreeSet;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use parking_lot::Mutex;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::changelog::Changelog;
use super::context::DedupConsumer;
use super::error::ConsumeError;
use super::restore::{restore, RestoreError, Restored};
use crate::layout::Entry;
use crate::outbox::{OutboxEntry, GIVEN_UP};
use crate::{Partition, Store};

/// A restore that finished, for the poll loop to act on.
struct RestoreDone {
    partition: Partition,
    since: u64,
    result: Result<Restored, RestoreError>,
}

/// A committed store batch whose outbox entry is to be published.
pub(super) struct ToPublish {
    pub(super) partition: Partition,
    pub(super) seq: u64,
    pub(super) entry: OutboxEntry,
}

/// The poll loop's changelog state.
pub(super) struct ChangelogState {
    changelog: Arc<Changelog>,
    done_tx: Sender<RestoreDone>,
    done_rx: Receiver<RestoreDone>,
    /// Partitions being restored.
    restoring: BTreeSet<Partition>,
    /// Partitions whose outbox holds entries a failed transaction left
    /// (behind a lock so that publishing needs only a shared reference: the
    /// claim mode publishes while the polled messages borrow the consumer).
    pending: Mutex<BTreeSet<Partition>>,
}

impl std::fmt::Debug for ChangelogState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogState")
            .field("changelog", &self.changelog)
            .field("restoring", &self.restoring)
            .field("pending", &self.pending)
            .finish()
    }
}

/// What the changelog mode did in one poll.
#[derive(Debug, Default)]
pub(super) struct Restores {
    /// Partitions restored and resumed, with the records read.
    pub(super) done: Vec<(Partition, u64)>,
}

impl ChangelogState {
    pub(super) fn new(changelog: Changelog) -> Self {
        let (done_tx, done_rx) = channel();
        Self {
            changelog: Arc::new(changelog),
            done_tx,
            done_rx,
            restoring: BTreeSet::new(),
            pending: Mutex::new(BTreeSet::new()),
        }
    }

    /// Starts a restore, in a thread of its own, for each partition the
    /// last rebalances assigned: other partitions go on processing
    /// meanwhile, and a restoring partition stays paused.
    pub(super) fn start_restores(&mut self, consumer: &DedupConsumer) -> Result<(), KafkaError> {
        let context = consumer.context();
        for (p, since) in context.take_to_restore() {
            if self.restoring.contains(&p) {
                // The restore of an earlier ownership (revoked and assigned
                // again since) still runs: this one starts once it has
                // ended, so that two restores never write the partition at
                // once, nor an old one after the new one's records.
                debug!(partition = %p, "restore waits for the previous ownership's to end");
                context.restore_again(p, since);
                continue;
            }
            if let Err(e) = self.ensure_topic(consumer, &p) {
                context.restore_again(p, since);
                return Err(e);
            }
            self.restoring.insert(p.clone());
            // Its restore settles what the outbox holds.
            self.pending.get_mut().remove(&p);
            let store: Arc<Store> = context.store().clone();
            let changelog = self.changelog.clone();
            let tx = self.done_tx.clone();
            std::thread::spawn(move || {
                let topic = changelog.topic(p.topic());
                let result = restore(
                    &store,
                    &changelog.client,
                    &topic,
                    &p,
                    changelog.timeout,
                    changelog.progress.as_ref(),
                );
                // The loop may be gone: nothing to report to then (the
                // restore logged its own end).
                if tx
                    .send(RestoreDone {
                        partition: p,
                        since,
                        result,
                    })
                    .is_err()
                {
                    debug!("restore done after its poll loop was dropped");
                }
            });
        }
        Ok(())
    }

    fn ensure_topic(&self, consumer: &DedupConsumer, p: &Partition) -> Result<(), KafkaError> {
        // Asked through the consumer, which does not create topics by asking.
        let name = self.changelog.topic(p.topic());
        let exists = consumer
            .fetch_metadata(Some(&name), self.changelog.timeout)?
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
        if exists {
            return Ok(());
        }
        let metadata = consumer.fetch_metadata(Some(p.topic()), self.changelog.timeout)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == p.topic())
            .map_or(0, |t| t.partitions().len());
        let partitions = i32::try_from(partitions)
            .unwrap_or(i32::MAX)
            .max(p.partition() + 1);
        self.changelog.ensure_topic(p.topic(), partitions)
    }

    /// Acts on the restores that finished: publishes or gives up what each
    /// partition's outbox holds, positions the partition where processing
    /// got to, and resumes it.
    pub(super) fn finish_restores<E>(
        &mut self,
        consumer: &DedupConsumer,
        report: &mut Restores,
    ) -> Result<(), ConsumeError<E>> {
        let context = consumer.context();
        while let Ok(done) = self.done_rx.try_recv() {
            self.restoring.remove(&done.partition);
            let p = done.partition;
            let Some((since, group_offset)) = context.ownership(&p) else {
                debug!(partition = %p, "restore done for a partition no longer owned");
                continue;
            };
            if since != done.since {
                // Revoked and assigned again since: a newer restore runs.
                debug!(partition = %p, "restore done for an earlier ownership; a newer one runs");
                continue;
            }
            let restored = match done.result {
                Ok(r) => r,
                Err(RestoreError::Store(crate::Error::NotAssigned(_))) => continue,
                Err(e) => {
                    // The restore thread logged the failure itself.
                    info!(
                        partition = %p,
                        "partition stays paused; its restore starts again at the next poll"
                    );
                    context.restore_again(p, since);
                    return Err(match e {
                        RestoreError::Store(e) => ConsumeError::Store(e),
                        RestoreError::Kafka(e) => ConsumeError::Kafka(e),
                    });
                }
            };
            // Where processing got to, by the changelog (its progress
            // records are in the transactions that committed the group's
            // offsets) or the group's offset read at assignment.
            let progress = match (restored.progress, group_offset) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let store_offset = context.store().committed_offset(&p).ok().flatten();
            if let Err(e) = self.resume_restored(consumer, &p, progress) {
                warn!(
                    partition = %p,
                    error = %e,
                    "restored partition not resumed; its restore starts again at the next poll"
                );
                context.restore_again(p, since);
                return Err(e);
            }
            info!(
                partition = %p,
                records = restored.records,
                store_offset = ?store_offset,
                changelog_progress = ?restored.progress,
                group_offset = ?group_offset,
                resume = ?resume_point(store_offset, progress),
                why = resume_reason(store_offset, restored.progress, group_offset),
                "partition restored and resumed"
            );
            report.done.push((p, restored.records));
        }
        Ok(())
    }

    /// Settles a restored partition's outbox, positions it where processing
    /// got to and resumes it.
    fn resume_restored<E>(
        &mut self,
        consumer: &DedupConsumer,
        p: &Partition,
        progress: Option<i64>,
    ) -> Result<(), ConsumeError<E>> {
        let store = consumer.context().store();
        {
            self.settle_outbox(consumer, p, progress)?;
            let committed = store.committed_offset(p)?;
            let resume = match (committed, progress) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if let Some(resume) = resume {
                if committed.is_none_or(|c| resume > c) {
                    let mut batch = store.batch(p)?;
                    batch.set_offset(resume);
                    batch.commit()?;
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(p.topic(), p.partition(), Offset::Offset(resume))?;
                let sought = consumer.seek_partitions(tpl, self.changelog.timeout)?;
                for e in sought.elements() {
                    e.error()?;
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(p.topic(), p.partition());
            consumer.resume(&tpl)?;
        }
        Ok(())
    }

    /// Whether a partition is still being restored (paused).
    pub(super) fn is_restoring(&self, p: &Partition) -> bool {
        self.restoring.contains(p)
    }

    /// What a restart (or a failed transaction) left in `p`'s outbox, once
    /// its restore says where processing got to (`progress`): an entry
    /// whose messages someone processed since, or that was published
    /// already (its progress record is in the changelog), is given up, but
    /// for its marks (each made after its side effect, so true whoever
    /// processed the messages again: publishing them only tells later
    /// owners more). An entry whose first messages only were processed
    /// since is published without the outgoing records of those messages
    /// (whoever processed them produced its own): the records of the rest
    /// were produced by no one else. The rest is published, in order, with
    /// its offsets and outgoing records.
    fn settle_outbox<E>(
        &mut self,
        consumer: &DedupConsumer,
        p: &Partition,
        progress: Option<i64>,
    ) -> Result<(), ConsumeError<E>> {
        let store = consumer.context().store();
        let entries = store.outbox(p)?;
        let Some(last_seq) = entries.last().map(|(seq, _)| *seq) else {
            return Ok(());
        };
        let given_up = entries
            .iter()
            .filter(|(_, e)| progress.is_some_and(|g| e.next <= g))
            .count();
        let partly = entries
            .iter()
            .filter(|(_, e)| progress.is_some_and(|g| e.start < g && g < e.next))
            .count();
        if partly > 0 {
            warn!(
                partition = %p,
                entries = partly,
                progress = ?progress,
                "outbox entries processed in part elsewhere since: published without the records of the messages processed again"
            );
        }
        if given_up > 0 {
            warn!(
                partition = %p,
                entries = given_up,
                progress = ?progress,
                "outbox entries given up at restart: published already or processed again elsewhere (their marks are still published)"
            );
        }
        if entries.len() > given_up {
            info!(
                partition = %p,
                entries = entries.len() - given_up,
                "outbox entries a restart left are published before the partition resumes"
            );
        }
        let batches: Vec<ToPublish> = entries
            .into_iter()
            .map(|(seq, mut entry)| {
                if let Some(g) = progress.filter(|&g| entry.start < g && g < entry.next) {
                    entry.records.retain(|(offset, _)| *offset >= g);
                } else if progress.is_some_and(|g| entry.next <= g) {
                    entry = OutboxEntry {
                        start: entry.start,
                        next: GIVEN_UP,
                        changes: entry
                            .changes
                            .into_iter()
                            // Marks and sources' numbers: their side
                            // effects happened.
                            .filter(|c| {
                                matches!(c.entry, Some(Entry::Done { .. })) || c.source.is_some()
                            })
                            .collect(),
                        records: Vec::new(),
                    };
                }
                ToPublish {
                    partition: p.clone(),
                    seq,
                    entry,
                }
            })
            .collect();
        if batches
            .iter()
            .all(|b| b.entry.changes.is_empty() && b.entry.next == GIVEN_UP)
        {
            store.batch(p)?.complete_outbox(last_seq, None)?;
            return Ok(());
        }
        self.publish(consumer, batches)?;
        Ok(())
    }

    /// Makes the next poll publish what `partitions`' outboxes hold (a
    /// handler panicked after some of them committed their batches).
    pub(super) fn publish_later(&self, partitions: impl IntoIterator<Item = Partition>) {
        self.pending.lock().extend(partitions);
    }

    /// Publishes the outbox entries a failed transaction left, before
    /// anything else is processed.
    pub(super) fn publish_pending<E>(
        &mut self,
        consumer: &DedupConsumer,
    ) -> Result<(), ConsumeError<E>> {
        let owned = consumer.context().owned();
        let pending: Vec<Partition> = std::mem::take(self.pending.get_mut())
            .into_iter()
            .filter(|p| owned.contains(p))
            .collect();
        let store = consumer.context().store();
        let mut all = Vec::new();
        for p in &pending {
            for (seq, entry) in store.outbox(p)? {
                all.push(ToPublish {
                    partition: p.clone(),
                    seq,
                    entry,
                });
            }
        }
        if all.is_empty() {
            return Ok(());
        }
        self.publish(consumer, all)?;
        Ok(())
    }

    /// Publishes `batches` (in order per partition) and their offsets in
    /// one transaction, then removes them from the outbox and records the
    /// changelog position their records reached. If the transaction fails,
    /// the entries stay in the outbox, and the next poll publishes them
    /// before it processes anything.
    pub(super) fn publish(
        &self,
        consumer: &DedupConsumer,
        batches: Vec<ToPublish>,
    ) -> Result<(), KafkaError> {
        let mut grouped: Vec<(Partition, Vec<&OutboxEntry>)> = Vec::new();
        let mut offsets = TopicPartitionList::new();
        for b in &batches {
            match grouped.last_mut() {
                Some((p, list)) if *p == b.partition => list.push(&b.entry),
                _ => grouped.push((b.partition.clone(), vec![&b.entry])),
            }
        }
        for (p, list) in &grouped {
            if let Some(last) = list.iter().rev().find(|e| e.next != GIVEN_UP) {
                offsets.add_partition_offset(
                    p.topic(),
                    p.partition(),
                    Offset::Offset(last.next),
                )?;
            }
        }
        // A consumer without a group (assigned by hand) has no offsets to
        // commit: its positions are the store's.
        let group = consumer.group_metadata();
        let result = self.changelog.publish(&grouped, &offsets, group.as_ref());
        let positions = match result {
            Ok(positions) => positions,
            Err(e) => {
                for (p, _) in &grouped {
                    self.pending.lock().insert(p.clone());
                }
                return Err(e);
            }
        };
        let store = consumer.context().store();
        for (p, _) in &grouped {
            let seq = batches
                .iter()
                .filter(|b| b.partition == *p)
                .map(|b| b.seq)
                .max();
            let position = positions.iter().find(|(q, _)| q == p).map(|(_, n)| *n);
            if let Some(seq) = seq {
                // Published: if this write is lost, the restore after a
                // restart finds the entry's progress record in the
                // changelog and gives it up instead of publishing it twice.
                // If the write fails, the entry stays until the partition's
                // next restore settles it that way; it is not published
                // again before.
                match store
                    .batch(p)
                    .and_then(|b| b.complete_outbox(seq, position))
                {
                    Ok(()) => {}
                    // Revoked meanwhile: the next owner's restore settles it.
                    Err(crate::Error::NotAssigned(_)) => {
                        debug!(partition = %p, "published outbox entries left to the next restore: partition revoked");
                    }
                    Err(e) => error!(
                        partition = %p,
                        error = %e,
                        "published outbox entries not removed; the partition's next restore gives them up"
                    ),
                }
            }
        }
        Ok(())
    }
}

/// Where a restored partition resumes: the later of the store's committed
/// offset and the processing progress the changelog (or the group) shows.
fn resume_point(store: Option<i64>, progress: Option<i64>) -> Option<i64> {
    match (store, progress) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Why a restored partition resumes where it does, for its log line.
fn resume_reason(store: Option<i64>, changelog: Option<i64>, group: Option<i64>) -> &'static str {
    let progress = resume_point(changelog, group);
    match (store, progress) {
        (None, None) => "nothing committed anywhere: the group's offset or auto.offset.reset",
        (Some(s), Some(p)) if s >= p => {
            "the store's offset, at or past the changelog's and the group's"
        }
        (_, Some(p)) if changelog == Some(p) => {
            "the changelog's progress (the store's offset is behind it or absent)"
        }
        (_, Some(_)) => "the group's offset (ahead of the store's and the changelog's)",
        (Some(_), None) => "the store's offset",
    }
}
