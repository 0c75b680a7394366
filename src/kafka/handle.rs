//! The poll loop's step for one message: check it (by key, or by its
//! source's sequence), run the handler on a new one, then mark it in the
//! partition's batch.

use rdkafka::message::{BorrowedMessage, Message};
use tracing::warn;

use super::consumer::IdempotentConsumer;
use super::error::ConsumeError;
use super::keys::{KeySource, MissingKey, SequenceHeaders};
use super::poll::PollReport;
use crate::batch::Batch;
use crate::{Error, Partition, Verdict};

impl IdempotentConsumer {
    /// Handles one message: checks its key in the partition's batch, runs
    /// the handler on a new one and then marks it in the batch.
    pub(super) fn handle<E, H>(
        &self,
        p: &Partition,
        m: &BorrowedMessage<'_>,
        batch: &mut Batch<'_>,
        handler: &mut H,
        report: &mut PollReport,
    ) -> Result<(), ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        batch.set_input(m.offset());
        if let KeySource::Sequence(headers) = &self.keys {
            return self.handle_sequenced(headers, p, m, batch, handler, report);
        }
        let key = self.keys.extract(m);
        // One read: the batch sees the keys it marked itself, and it holds
        // the partition's write lock, so nobody marks the key between this
        // check and the mark after the handler. A key the store cannot take
        // (empty, or longer than `max_key_len`) counts as missing: retrying
        // it could never succeed.
        let checked = match key.as_deref().map(|k| batch.check_for_mark(k)) {
            None | Some(Err(Error::EmptyKey | Error::KeyTooLong { .. })) => None,
            Some(Ok(None)) => {
                report.duplicates += 1;
                return Ok(());
            }
            Some(Ok(Some(checked))) => Some(checked),
            Some(Err(e)) => return Err(e.into()),
        };
        let (Some(key), Some(checked)) = (key, checked) else {
            return self.handle_keyless(p, m, batch, handler, report);
        };
        run(p, m, Some(&key), batch, handler)?;
        report.processed += 1;
        batch.mark_checked(checked);
        Ok(())
    }

    /// [`handle`](Self::handle) in sequence mode: the message's number is
    /// checked against its source's state, and marked after the handler.
    fn handle_sequenced<E, H>(
        &self,
        headers: &SequenceHeaders,
        p: &Partition,
        m: &BorrowedMessage<'_>,
        batch: &mut Batch<'_>,
        handler: &mut H,
        report: &mut PollReport,
    ) -> Result<(), ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        let Some(id) = headers.read(m) else {
            return self.handle_keyless(p, m, batch, handler, report);
        };
        // The batch holds the partition's write lock: the number stays new
        // until it is marked after the handler.
        match batch.check_sequence(id.source, id.epoch, id.seq) {
            Ok(Verdict::New) => {}
            Ok(Verdict::Duplicate) => {
                report.duplicates += 1;
                return Ok(());
            }
            Err(Error::SourceFenced { current, .. }) => {
                warn!(
                    partition = %p,
                    offset = m.offset(),
                    source = %id.source.escape_ascii(),
                    epoch = id.epoch,
                    current,
                    "skipped a message of a fenced producer epoch"
                );
                report.fenced += 1;
                return Ok(());
            }
            // A source id the store cannot take: retrying could never
            // succeed.
            Err(Error::EmptyKey | Error::KeyTooLong { .. }) => {
                return self.handle_keyless(p, m, batch, handler, report);
            }
            Err(e) => return Err(e.into()),
        }
        run(p, m, Some(&id.key()), batch, handler)?;
        // The side effect happened: the number is marked whatever else the
        // handler did to the batch. Only a handler that moved this source to
        // a newer epoch through the batch makes the mark fenced; then the
        // number is not recorded, and a redelivery of it is fenced too.
        match batch.mark_sequence(id.source, id.epoch, id.seq) {
            Ok(()) | Err(Error::SourceFenced { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        report.processed += 1;
        Ok(())
    }

    /// A message without a key the store can take: the [`MissingKey`]
    /// policy decides.
    fn handle_keyless<E, H>(
        &self,
        p: &Partition,
        m: &BorrowedMessage<'_>,
        batch: &mut Batch<'_>,
        handler: &mut H,
        report: &mut PollReport,
    ) -> Result<(), ConsumeError<E>>
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        match self.missing {
            MissingKey::Skip => {
                report.skipped += 1;
                Ok(())
            }
            MissingKey::Process => {
                run(p, m, None, batch, handler)?;
                report.processed += 1;
                Ok(())
            }
            MissingKey::Fail => Err(ConsumeError::MissingKey {
                partition: p.clone(),
                offset: m.offset(),
            }),
        }
    }
}

/// Runs the handler; on its error, the records it staged are dropped.
fn run<E, H>(
    p: &Partition,
    m: &BorrowedMessage<'_>,
    key: Option<&[u8]>,
    batch: &mut Batch<'_>,
    handler: &mut H,
) -> Result<(), ConsumeError<E>>
where
    H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
{
    let staged = batch.outbox_len();
    handler(m, key, batch).map_err(|source| {
        batch.truncate_outbox(staged);
        ConsumeError::Handler {
            partition: p.clone(),
            offset: m.offset(),
            source,
        }
    })
}
