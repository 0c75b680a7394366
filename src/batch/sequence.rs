//! Sequence mode in a batch: a source's numbers checked and marked with the
//! batch's other changes, in its one write.

use crate::error::Result;
use crate::sequence::{SourceState, STAGED};
use crate::shard::Counters;
use crate::ttl::expiry;
use crate::verdict::Verdict;

use super::Batch;

impl Batch<'_> {
    /// Whether sequence number `seq` of `source` under `epoch` was marked,
    /// as this batch sees it (its own marks first); marks nothing.
    ///
    /// A number above the source's highest is new; within the window below
    /// it ([`Options::sequence_window`](crate::Options::sequence_window)),
    /// new exactly when it was never marked; further below, a duplicate. A
    /// newer epoch than the source's starts its numbers afresh; an expired
    /// source ([`Options::source_idle`](crate::Options::source_idle)) is
    /// forgotten. `source` is validated like a key.
    ///
    /// Errors: [`Error::SourceFenced`](crate::Error::SourceFenced) for an
    /// epoch older than the source's; [`Error::EmptyKey`](crate::Error::EmptyKey),
    /// [`Error::KeyTooLong`](crate::Error::KeyTooLong) for a bad source.
    pub fn check_sequence(&self, source: &[u8], epoch: u64, seq: u64) -> Result<Verdict> {
        self.engine.validate_key(source)?;
        let now = self.partition_now();
        Counters::bump(&self.shard.counters.checks);
        let verdict = self.seen(source, epoch, seq, now)?;
        if verdict == Verdict::Duplicate {
            Counters::bump(&self.shard.counters.duplicates);
        }
        Ok(verdict)
    }

    /// Checks sequence number `seq` of `source` under `epoch` and, if it
    /// is new, marks it in this batch; see
    /// [`check_sequence`](Self::check_sequence). Marking moves the source's
    /// expiry to [`source_idle`](crate::Options::source_idle) from now.
    pub fn check_and_mark_sequence(
        &mut self,
        source: &[u8],
        epoch: u64,
        seq: u64,
    ) -> Result<Verdict> {
        self.engine.validate_key(source)?;
        let now = self.partition_now();
        Counters::bump(&self.shard.counters.checks);
        let verdict = self.seen(source, epoch, seq, now)?;
        if verdict == Verdict::Duplicate {
            Counters::bump(&self.shard.counters.duplicates);
            return Ok(verdict);
        }
        let options = self.engine.options();
        let expires_at = expiry(now, options.source_idle_millis());
        let window = options.sequence_window;
        // The batch's own copy of the source's state, taken from the shard
        // once per batch and marked in place.
        match self.staged_sources.get_mut(source) {
            Some(state) => state.mark(epoch, seq, STAGED, expires_at, window),
            None => {
                let state = SourceState::marked(
                    self.shard.source(source).as_ref(),
                    epoch,
                    seq,
                    now,
                    expires_at,
                    window,
                );
                self.staged_sources.insert(source.to_vec(), state);
            }
        }
        self.marks += 1;
        Ok(verdict)
    }

    /// Marks sequence number `seq` of `source` under `epoch`; see
    /// [`check_and_mark_sequence`](Self::check_and_mark_sequence).
    pub fn mark_sequence(&mut self, source: &[u8], epoch: u64, seq: u64) -> Result<()> {
        self.check_and_mark_sequence(source, epoch, seq).map(|_| ())
    }

    /// Merges the state of `source` read from the changelog into what the
    /// batch sees; see [`Batch::restore`].
    pub(super) fn restore_source(&mut self, source: &[u8], state: SourceState) {
        let now = self.partition_now();
        let current = match self.staged_sources.get(source) {
            Some(s) => Some(s.clone()),
            None => self.shard.source(source),
        }
        .filter(|s| s.is_live(now));
        let merged = match &current {
            Some(c) => c.merge(&state),
            None => state,
        };
        // An expired state is none: staged, it would count for the rest of
        // the batch.
        if merged.is_live(now) && current.as_ref() != Some(&merged) {
            self.staged_sources.insert(source.to_vec(), merged);
        }
    }

    /// What `seq` of `epoch` is to `source`, as this batch sees it: its own
    /// marks first, then the shard's, without copying either.
    fn seen(&self, source: &[u8], epoch: u64, seq: u64, now: u64) -> Result<Verdict> {
        let seen = match self.staged_sources.get(source) {
            Some(s) => SourceState::seen(Some(s), epoch, seq, STAGED),
            None => self.shard.seen_source(source, epoch, seq, now),
        };
        seen.verdict(&self.shard.partition, source, epoch)
    }
}
