//! Claim mode: a message whose processing may have been cut short is handed
//! to the application as in doubt, never as new.
//!
//! A poll batch runs in two phases. First, per partition, every new key is
//! claimed in one store write (and, in changelog mode, the claims reach the
//! changelog in one committed Kafka transaction) before any handler runs.
//! Then the handlers run, and per partition one store write confirms the
//! claims (or releases those whose handler failed) with the offset, which
//! changelog mode publishes with the group's offsets, as the plain loop
//! does. A claim that is still there when its key comes again was made by a
//! processor that stopped between the phases: its side effect may have
//! happened, so the key is delivered as [`Delivery::InDoubt`].

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Message};

use super::consumer::IdempotentConsumer;
use super::error::ConsumeError;
use super::keys::MissingKey;
use super::poll::{by_partition, first_offsets, PartitionResult, PollReport, MIN_CLAIM_LEASE};
use super::publish::ToPublish;
use crate::batch::{Batch, Taken};
use crate::{ClaimToken, Error, Partition};

/// How a message reaches the handler of
/// [`IdempotentConsumer::poll_batch_claimed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Nobody processed or claimed the key: apply the side effect. (Also
    /// how a message without a usable key arrives under
    /// [`MissingKey::Process`]: no claim covers it.)
    New,
    /// A processor claimed the key and stopped before it confirmed or
    /// released the claim (another instance that crashed or lost the
    /// partition, or this one before a restart): the side effect may or may
    /// not have happened. Ask the downstream system by the idempotency key,
    /// apply the effect only if it did not happen, and return `Ok(())` once
    /// it has happened exactly once.
    InDoubt {
        /// The partition epoch the earlier claim was made under.
        holder_epoch: u64,
    },
}

/// A message that passed the first phase: claimed, or keyless and to be
/// processed under [`MissingKey::Process`].
struct Item<'a, 'm> {
    message: &'a BorrowedMessage<'m>,
    claim: Option<(Vec<u8>, ClaimToken, Delivery)>,
}

impl Item<'_, '_> {
    /// The claim made on a key nobody had claimed: released when the
    /// message is not handled. A claim taken over from a processor that
    /// stopped is never released: its side effect may have happened, so the
    /// key stays in doubt until a handler settles it.
    fn new_claim(&self) -> Option<&ClaimToken> {
        match &self.claim {
            Some((_, token, Delivery::New)) => Some(token),
            _ => None,
        }
    }
}

/// One partition's first phase.
struct Claimed<'a, 'm, E> {
    items: Vec<Item<'a, 'm>>,
    /// The offset after the last message the phase covered.
    end: i64,
    /// The error the phase stopped at (at offset `end`).
    error: Option<ConsumeError<E>>,
}

impl IdempotentConsumer {
    /// The lease of the claims [`poll_batch_claimed`](Self::poll_batch_claimed)
    /// makes (default [`DEFAULT_CLAIM_LEASE`](super::DEFAULT_CLAIM_LEASE)): how long a key whose
    /// processor stopped between claim and confirm is delivered in doubt.
    /// Give it at least the longest a poll batch's handlers run plus the
    /// time a partition takes to move to another instance and restore; at
    /// least [`MIN_CLAIM_LEASE`].
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// Claim mode: as [`poll_batch_outbox`](Self::poll_batch_outbox), but
    /// each new key is claimed (and, in changelog mode, the claim committed
    /// to the changelog) before its handler runs, and confirmed after. A key
    /// whose claim is found still standing, because its processor stopped in
    /// between, reaches `handler` as [`Delivery::InDoubt`] instead of as
    /// new; the same key twice in one poll batch reaches it once.
    ///
    /// The cost: one more store write per partition and poll batch, and in
    /// changelog mode one more Kafka transaction per poll batch. Claims
    /// survive a process crash; to survive a power cut as well, open the
    /// store with `Durability::Sync`. See `docs/kafka.md`, "Claim mode".
    ///
    /// A handler error releases the claims made in this poll on its message
    /// and on the messages after it in the partition (and in the partitions
    /// not handled after it), which are delivered again as new; a claim
    /// taken over in doubt stays, and its message is delivered in doubt
    /// again. The handler must not mark or claim the message's own key in
    /// `batch` (the loop confirms it): that fails the partition's batch
    /// with [`Error::ClaimLost`].
    ///
    /// Errors: [`Error::InvalidOptions`] (as [`ConsumeError::Store`]) if
    /// the claim lease is shorter than [`MIN_CLAIM_LEASE`]; otherwise as
    /// [`poll_batch`](Self::poll_batch).
    pub fn poll_batch_claimed<E, H>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, Delivery, &mut Batch<'_>) -> Result<(), E>,
    {
        if self.claim_lease < MIN_CLAIM_LEASE {
            return Err(ConsumeError::Store(Error::InvalidOptions(format!(
                "claim_lease {:?} is shorter than {MIN_CLAIM_LEASE:?}: a claim must outlast \
                 the handlers of its poll batch, or a processor that dies after a side \
                 effect leaves its key new instead of in doubt",
                self.claim_lease
            ))));
        }
        let mut report = PollReport::default();
        self.before_poll(&mut report)?;
        let messages = self.poll_checked(timeout, &mut report)?;
        let grouped = by_partition(&messages);

        // Phase one: claim, per partition in one store write.
        let mut claimed = Vec::new();
        let mut to_publish = Vec::new();
        let mut failed: Option<ConsumeError<E>> = None;
        let mut results: Vec<(Partition, PartitionResult<E>)> = Vec::new();
        for (p, msgs) in &grouped {
            if failed.is_some() {
                results.push((p.clone(), PartitionResult::not_run(msgs)));
                continue;
            }
            match self.claim_partition(p, msgs, &mut report) {
                Ok((c, published)) => {
                    if let Some((seq, entry)) = published {
                        to_publish.push(ToPublish {
                            partition: p.clone(),
                            seq,
                            entry,
                        });
                    }
                    claimed.push((p.clone(), msgs, c));
                }
                Err(e) => {
                    results.push((p.clone(), PartitionResult::not_run(msgs)));
                    failed = Some(e);
                }
            }
        }
        // The claims reach the changelog before any side effect.
        let published = match &self.changelog {
            Some(changelog) if !to_publish.is_empty() => changelog
                .publish(&self.consumer, to_publish)
                .map_err(ConsumeError::Kafka),
            _ => Ok(()),
        };
        if let Some(e) = failed.or(published.err()) {
            // Nothing was handled: every partition starts again at its first
            // message (claims already written are delivered in doubt).
            let positions = first_offsets(&grouped);
            drop(claimed);
            drop(grouped);
            drop(messages);
            self.rewind(&positions)?;
            return Err(e);
        }

        // Phase two: handle, then confirm with the offset. A handler that
        // panics leaves its claims standing (delivered in doubt again).
        let firsts = first_offsets(&grouped);
        let handled = catch_unwind(AssertUnwindSafe(|| {
            let mut stop = false;
            for (p, msgs, c) in claimed {
                let result = if stop {
                    // Not handled after an earlier partition's error: its
                    // claims are released, and its messages come again as new.
                    self.release_partition(&p, msgs, c)
                } else {
                    self.confirm_partition(&p, msgs, c, &mut handler, &mut report)
                };
                stop = stop || result.outcome.is_err();
                results.push((p, result));
            }
        }));
        drop(grouped);
        drop(messages);
        match handled {
            Ok(()) => self.finish_poll(results, report),
            Err(panic) => {
                self.after_panic(&firsts);
                resume_unwind(panic)
            }
        }
    }

    /// Phase one for one partition: claims each message's key in one store
    /// write; returns what the write left to publish.
    #[allow(clippy::type_complexity)]
    fn claim_partition<'a, 'm, E>(
        &self,
        p: &Partition,
        msgs: &[&'a BorrowedMessage<'m>],
        report: &mut PollReport,
    ) -> Result<(Claimed<'a, 'm, E>, Option<crate::batch::Published>), ConsumeError<E>> {
        let start = msgs.first().map_or(0, |m| m.offset());
        let mut batch = self.open_batch(p, start)?;
        let (metrics, before) = self.metrics.start(p, report);
        let mut claimed = Claimed {
            items: Vec::new(),
            end: start,
            error: None,
        };
        for &m in msgs {
            // A key the store cannot take (empty, or longer than
            // `max_key_len`) counts as missing, as in the plain loop.
            let taken = match self.keys.extract(m) {
                None => None,
                Some(key) => match batch.take_claim(&key, self.claim_lease) {
                    Ok(taken) => Some((key.into_owned(), taken)),
                    Err(Error::EmptyKey | Error::KeyTooLong { .. }) => None,
                    Err(e) => {
                        claimed.error = Some(e.into());
                        break;
                    }
                },
            };
            let claim = match taken {
                None => match self.missing {
                    MissingKey::Skip => {
                        report.skipped += 1;
                        None
                    }
                    MissingKey::Process => Some(None),
                    MissingKey::Fail => {
                        claimed.error = Some(ConsumeError::MissingKey {
                            partition: p.clone(),
                            offset: m.offset(),
                        });
                        break;
                    }
                },
                Some((_, Taken::Duplicate)) => {
                    report.duplicates += 1;
                    None
                }
                Some((key, Taken::New(token))) => Some(Some((key, token, Delivery::New))),
                Some((
                    key,
                    Taken::InDoubt {
                        token,
                        holder_epoch,
                    },
                )) => Some(Some((key, token, Delivery::InDoubt { holder_epoch }))),
            };
            if let Some(claim) = claim {
                claimed.items.push(Item { message: m, claim });
            }
            claimed.end = m.offset() + 1;
        }
        // Failures count in phase two, which carries `claimed.error` on.
        metrics.record(before, report, false);
        let published = batch.commit_published()?;
        Ok((claimed, published))
    }

    /// Phase two for a partition that is not handled in this poll: releases
    /// its claims in one store write, leaving its offset where it was.
    fn release_partition<E>(
        &self,
        p: &Partition,
        msgs: &[&BorrowedMessage<'_>],
        claimed: Claimed<'_, '_, E>,
    ) -> PartitionResult<E> {
        let start = msgs.first().map_or(0, |m| m.offset());
        let released = (|| -> crate::Result<Option<crate::batch::Published>> {
            let mut batch = self.open_batch(p, start)?;
            for token in claimed.items.iter().filter_map(Item::new_claim) {
                batch.release(token)?;
            }
            batch.commit_published()
        })();
        let mut result = PartitionResult::not_run(msgs);
        match released {
            Ok(published) => result.published = published,
            // Left standing: delivered in doubt by the next poll.
            Err(e) => return PartitionResult::failed(e.into(), start),
        }
        result
    }

    /// Phase two for one partition: runs the handler on each claimed (or
    /// keyless) message, and confirms the claims with the offset in one
    /// store write. A handler error releases the claims from its message on.
    fn confirm_partition<E, H>(
        &self,
        p: &Partition,
        msgs: &[&BorrowedMessage<'_>],
        claimed: Claimed<'_, '_, E>,
        handler: &mut H,
        report: &mut PollReport,
    ) -> PartitionResult<E>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, Delivery, &mut Batch<'_>) -> Result<(), E>,
    {
        let start = msgs.first().map_or(0, |m| m.offset());
        let mut batch = match self.open_batch(p, start) {
            Ok(b) => b,
            Err(e) => return PartitionResult::failed(e.into(), start),
        };
        let (metrics, before) = self.metrics.start(p, report);
        let Claimed {
            items,
            mut end,
            mut error,
        } = claimed;
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            let m = item.message;
            batch.set_input(m.offset());
            let staged = batch.outbox_len();
            let (key, delivery) = match &item.claim {
                Some((key, _, delivery)) => (Some(key.as_slice()), *delivery),
                None => (None, Delivery::New),
            };
            // Counted when handed to the handler: a partition not handled
            // in this poll delivers its in-doubt keys again in the next.
            if matches!(delivery, Delivery::InDoubt { .. }) {
                report.in_doubt += 1;
            }
            if let Err(source) = metrics.time(|| handler(m, key, delivery, &mut batch)) {
                batch.truncate_outbox(staged);
                // Not applied: this message and the ones after it are
                // delivered again, as new.
                let rest: Vec<Item<'_, '_>> = items.by_ref().collect();
                let release = std::iter::once(&item)
                    .chain(rest.iter())
                    .filter_map(Item::new_claim)
                    .try_for_each(|token| batch.release(token));
                if let Err(e) = release {
                    return PartitionResult::failed(e.into(), start);
                }
                end = m.offset();
                error = Some(ConsumeError::Handler {
                    partition: p.clone(),
                    offset: m.offset(),
                    source,
                });
                break;
            }
            if let Some((_, token, _)) = &item.claim {
                // Lost only to a newer owner of the partition, which took the
                // claim over and delivers the key in doubt: nothing of this
                // batch may commit.
                if let Err(e) = batch.confirm(token) {
                    return PartitionResult::failed(e.into(), start);
                }
            }
            report.processed += 1;
        }
        report.messages += msgs.iter().take_while(|m| m.offset() < end).count();
        metrics.record(before, report, error.is_some());
        self.commit_partition(p, batch, start, end, error)
    }
}
