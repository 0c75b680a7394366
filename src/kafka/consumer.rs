//! The idempotent poll loop.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use parking_lot::Mutex;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::Changelog;
use super::context::{DedupConsumer, DedupContext, RebalanceFailure};
use super::error::ConsumeError;
use super::keys::{KeySource, MissingKey};
use super::metrics::LoopMetrics;
use super::poll::{by_partition, first_offsets, PartitionResult, PollReport, DEFAULT_CLAIM_LEASE};
use super::publish::{ChangelogState, Restores, ToPublish};
use crate::batch::Batch;
use crate::Partition;

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

/// The idempotent poll loop over a consumer with a [`DedupContext`].
///
/// Per call of [`poll_batch`](Self::poll_batch): poll up to `max_batch`
/// messages; per partition, open one store batch, and for each message
/// extract its key, skip it if it is a duplicate, else call the handler and
/// mark the key; commit the marks with the offset after the last message in
/// one atomic store write; finally commit the offsets to Kafka, as
/// [`KafkaCommit`] says (asynchronously by default).
pub struct IdempotentConsumer {
    pub(super) consumer: DedupConsumer,
    pub(super) keys: KeySource,
    pub(super) missing: MissingKey,
    max_batch: usize,
    seek_timeout: Duration,
    kafka_commit: KafkaCommit,
    /// Positions a failed rewind left to seek: the next poll seeks them
    /// first, so that a seek error never skips messages.
    unrewound: Mutex<Vec<(Partition, i64)>>,
    /// Changelog mode, when set.
    pub(super) changelog: Option<ChangelogState>,
    /// The lease of the claims of the claim mode.
    pub(super) claim_lease: Duration,
    /// Metrics handles per partition (see `docs/operations.md`, Metrics).
    pub(super) metrics: LoopMetrics,
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
            unrewound: Mutex::new(Vec::new()),
            changelog: None,
            claim_lease: DEFAULT_CLAIM_LEASE,
            metrics: LoopMetrics::new(),
        }
    }

    /// Changelog mode: each poll batch's store changes (and the records its
    /// handler staged with [`Batch::send`]) are published to the partition's
    /// changelog in one Kafka transaction with the group's offsets; an
    /// assigned partition is restored from its changelog before its first
    /// message is handled; what a crash left in the local outbox is
    /// published (or given up, if someone processed it since) before the
    /// partition is processed further. Offsets go to Kafka only in those
    /// transactions: [`KafkaCommit`] and the handover commit do not apply.
    /// Read the input with `isolation.level=read_committed`. See
    /// `docs/kafka.md`, "Changelog mode".
    pub fn changelog(mut self, changelog: Changelog) -> Self {
        self.context().enable_restore();
        self.changelog = Some(ChangelogState::new(changelog));
        self
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
        self.poll_batch_outbox(timeout, |m, key, _| handler(m, key))
    }

    /// [`poll_batch`](Self::poll_batch) with a handler that also gets the
    /// partition's open store batch, to stage outgoing records with
    /// [`Batch::send`] (changelog mode): they are produced in the same
    /// Kafka transaction as the batch's marks and offsets. Records a
    /// failing handler staged are dropped with its message.
    pub fn poll_batch_outbox<E, H>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        let mut report = PollReport::default();
        self.before_poll(&mut report)?;
        let messages = self.poll_checked(timeout, &mut report)?;
        let grouped = by_partition(&messages);
        let firsts = first_offsets(&grouped);
        let handled = catch_unwind(AssertUnwindSafe(|| {
            let mut results = Vec::new();
            let mut failed = false;
            for (p, msgs) in &grouped {
                let result = if failed {
                    PartitionResult::not_run(msgs)
                } else {
                    self.process_partition(p, msgs, &mut handler, &mut report)
                };
                failed = failed || result.outcome.is_err();
                results.push((p.clone(), result));
            }
            results
        }));
        drop(grouped);
        drop(messages);
        match handled {
            Ok(results) => self.finish_poll(results, report),
            Err(panic) => {
                self.after_panic(&firsts);
                resume_unwind(panic)
            }
        }
    }

    /// After a handler panicked (the panic goes on to the caller): puts each
    /// partition of the poll batch back at the first message whose batch was
    /// not committed, so that a caller that catches the panic and polls
    /// again gets them again instead of skipping them, and makes the next
    /// poll publish what the committed batches left in the outbox.
    pub(super) fn after_panic(&self, firsts: &[(Partition, i64)]) {
        let store = self.context().store();
        let positions: Vec<(Partition, i64)> = firsts
            .iter()
            .map(|(p, first)| {
                let committed = store.committed_offset(p).ok().flatten();
                (p.clone(), committed.map_or(*first, |c| c.max(*first)))
            })
            .collect();
        // A failed seek is kept and retried by the next poll.
        let _ = self.rewind::<()>(&positions);
        if let Some(changelog) = &self.changelog {
            changelog.publish_later(positions.into_iter().map(|(p, _)| p));
        }
    }

    /// Before a poll: reports a rebalance failure, seeks what a failed
    /// rewind left, and takes the changelog step.
    pub(super) fn before_poll<E>(
        &mut self,
        report: &mut PollReport,
    ) -> Result<(), ConsumeError<E>> {
        self.check_rebalance()?;
        self.retry_rewind()?;
        self.changelog_step(report)
    }

    /// Polls a batch; if a rebalance callback failed meanwhile, nothing
    /// polled is kept and the error is returned.
    pub(super) fn poll_checked<E>(
        &self,
        timeout: Duration,
        report: &mut PollReport,
    ) -> Result<Vec<BorrowedMessage<'_>>, ConsumeError<E>> {
        let messages = self.poll_messages(timeout, report);
        if let Err(e) = self.check_rebalance() {
            // Nothing polled is processed: put the consumer back at the
            // first polled message of each partition, so that the next poll
            // delivers them again instead of skipping them.
            let positions: Vec<(Partition, i64)> = by_partition(&messages)
                .into_iter()
                .filter_map(|(p, msgs)| msgs.first().map(|m| (p, m.offset())))
                .collect();
            drop(messages);
            // The rebalance error is the one reported; a failed seek is
            // retried by the next poll before it polls.
            if let Err(seek) = self.rewind::<E>(&positions) {
                tracing::warn!(
                    error = %seek,
                    "rewind after a failed rebalance failed; retried before the next poll"
                );
            }
            return Err(e);
        }
        Ok(messages)
    }

    /// The end of a poll batch: publishes what the partitions' store
    /// batches committed (changelog mode) or commits their offsets to Kafka,
    /// and puts the consumer back at the first unprocessed message of each
    /// partition after an error.
    pub(super) fn finish_poll<E>(
        &mut self,
        results: Vec<(Partition, PartitionResult<E>)>,
        mut report: PollReport,
    ) -> Result<PollReport, ConsumeError<E>> {
        let mut to_kafka = TopicPartitionList::new();
        let mut outcome = Ok(());
        let mut unprocessed: Vec<(Partition, i64)> = Vec::new();
        let mut to_publish: Vec<ToPublish> = Vec::new();
        for (p, result) in results {
            if let Some((seq, entry)) = result.published {
                to_publish.push(ToPublish {
                    partition: p.clone(),
                    seq,
                    entry,
                });
            }
            if let Some(offset) = result.committed {
                report.committed.push((p.clone(), offset));
                if let Err(e) =
                    to_kafka.add_partition_offset(p.topic(), p.partition(), Offset::Offset(offset))
                {
                    report.kafka_errors.push(e);
                }
            }
            if !result.ran {
                unprocessed.push((p, result.resume_at));
            } else if let Err(e) = result.outcome {
                unprocessed.push((p, result.resume_at));
                outcome = Err(e);
            }
        }

        if let Some(changelog) = &mut self.changelog {
            if !to_publish.is_empty() {
                // The committed batches stay in the outbox if this fails, and
                // the next poll publishes them before anything else.
                if let Err(e) = changelog.publish(&self.consumer, to_publish) {
                    if outcome.is_err() {
                        self.rewind(&unprocessed)?;
                    }
                    return Err(ConsumeError::Kafka(e));
                }
            }
        }
        let mode = match self.kafka_commit {
            _ if self.changelog.is_some() => None,
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

    /// Changelog mode, before a poll: starts the restores of newly assigned
    /// partitions, resumes the restored ones, and publishes what a failed
    /// transaction left.
    fn changelog_step<E>(&mut self, report: &mut PollReport) -> Result<(), ConsumeError<E>> {
        let Some(changelog) = &mut self.changelog else {
            return Ok(());
        };
        changelog.start_restores(&self.consumer)?;
        let mut restores = Restores::default();
        changelog.finish_restores(&self.consumer, &mut restores)?;
        report.restored.extend(restores.done);
        changelog.publish_pending(&self.consumer)
    }

    /// Whether `p` is waiting for its restore (changelog mode).
    pub fn is_restoring(&self, p: &Partition) -> bool {
        self.changelog.as_ref().is_some_and(|c| c.is_restoring(p))
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
                let context = self.context();
                messages.retain(|m| {
                    context.owned_since(&Partition::new(m.topic(), m.partition()), rebalances)
                });
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
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        let start = msgs.first().map_or(0, |m| m.offset());
        let mut batch = match self.open_batch(p, start) {
            Ok(b) => b,
            Err(e) => return PartitionResult::failed(e.into(), start),
        };
        let mut next = start;
        let mut error = None;
        let (metrics, before) = self.metrics.start(p, report);
        let handler = &mut metrics.timed(handler);
        for m in msgs {
            if let Err(e) = self.handle(p, m, &mut batch, handler, report) {
                error = Some(e);
                break;
            }
            next = m.offset() + 1;
            report.messages += 1;
        }
        metrics.record(before, report, error.is_some());
        self.commit_partition(p, batch, start, next, error)
    }

    /// Opens `p`'s store batch for a poll batch starting at input offset
    /// `start`: fenced at the epoch the shard was assigned with (a consumer
    /// that lost the partition to a newer generation commits nothing), and
    /// recording its changes in changelog mode.
    pub(super) fn open_batch(&self, p: &Partition, start: i64) -> crate::Result<Batch<'_>> {
        let mut batch = self.context().store().batch(p)?;
        if let Some(epoch) = self.context().epoch(p) {
            batch.fence(epoch);
        }
        if self.changelog.is_some() {
            batch.record_changes(start);
        }
        Ok(batch)
    }

    /// Commits a partition's batch with the offset `next` (the message after
    /// the last one processed), or the store's, if later: another consumer
    /// of this store may have committed a later one, and everything before
    /// it is processed. `error` is what stopped the partition at `next`.
    pub(super) fn commit_partition<E>(
        &self,
        p: &Partition,
        mut batch: Batch<'_>,
        start: i64,
        next: i64,
        error: Option<ConsumeError<E>>,
    ) -> PartitionResult<E> {
        let committed = match self.context().store().committed_offset(p) {
            Ok(c) => c,
            Err(e) => return PartitionResult::failed(e.into(), start),
        };
        let offset = committed.map_or(next, |c| c.max(next));
        batch.set_offset(offset);
        let published = match batch.commit_published() {
            Ok(published) => published,
            Err(e) => return PartitionResult::failed(e.into(), start),
        };
        // The batch started at the consumer's position, which is at or past
        // the group's committed offset: so is the store's offset now.
        self.context().may_hand_over(p);
        PartitionResult {
            ran: true,
            committed: Some(offset),
            published,
            resume_at: offset,
            outcome: error.map_or(Ok(()), Err),
        }
    }

    /// Positions the consumer at the first unprocessed message of each
    /// partition, so that the next poll retries them. If the seek fails, the
    /// positions are kept and the next poll seeks them before polling.
    pub(super) fn rewind<E>(&self, positions: &[(Partition, i64)]) -> Result<(), ConsumeError<E>> {
        let result = self.seek(positions);
        if result.is_err() {
            self.unrewound.lock().extend_from_slice(positions);
        }
        result
    }

    /// Seeks what a failed rewind left, for the partitions still owned.
    fn retry_rewind<E>(&self) -> Result<(), ConsumeError<E>> {
        let pending = std::mem::take(&mut *self.unrewound.lock());
        let owned = self.context().owned();
        let pending: Vec<(Partition, i64)> = pending
            .into_iter()
            .filter(|(p, _)| owned.contains(p))
            .collect();
        self.rewind(&pending)
    }

    fn seek<E>(&self, positions: &[(Partition, i64)]) -> Result<(), ConsumeError<E>> {
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
