//! Sequence mode in a batch: a source's numbers checked and marked with the
//! batch's other changes, in its one write.

use crate::error::Result;
use crate::layout::source_key;
use crate::sequence::SourceState;
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
    /// Errors: [`Error::SourceFenced`] for an epoch older than the source's;
    /// [`Error::EmptyKey`], [`Error::KeyTooLong`] for a bad source.
    pub fn check_sequence(&self, source: &[u8], epoch: u64, seq: u64) -> Result<Verdict> {
        let k = self.source_key(source)?;
        let now = self.partition_now();
        Counters::bump(&self.shard.counters.checks);
        let verdict = self.seen(&k, source, epoch, seq, now)?;
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
        let k = self.source_key(source)?;
        let now = self.partition_now();
        Counters::bump(&self.shard.counters.checks);
        let verdict = self.seen(&k, source, epoch, seq, now)?;
        match verdict {
            Verdict::Duplicate => Counters::bump(&self.shard.counters.duplicates),
            Verdict::New => {
                let expires_at = expiry(now, self.engine.options().source_idle_millis());
                let window = self.engine.options().sequence_window;
                let state = SourceState::marked(
                    self.source(&k).as_ref(),
                    epoch,
                    seq,
                    now,
                    expires_at,
                    window,
                );
                self.staged_sources.insert(k, state);
                self.marks += 1;
            }
        }
        Ok(verdict)
    }

    /// Marks sequence number `seq` of `source` under `epoch`; see
    /// [`check_and_mark_sequence`](Self::check_and_mark_sequence).
    pub fn mark_sequence(&mut self, source: &[u8], epoch: u64, seq: u64) -> Result<()> {
        self.check_and_mark_sequence(source, epoch, seq).map(|_| ())
    }

    /// Merges a source's state read from the changelog into what the batch
    /// sees; see [`Batch::restore`].
    pub(super) fn restore_source(&mut self, k: &[u8], state: SourceState) {
        let now = self.partition_now();
        let current = self.source(k).filter(|s| s.is_live(now));
        let merged = match &current {
            Some(c) => c.merge(&state),
            None => state,
        };
        if current.as_ref() != Some(&merged) {
            self.staged_sources.insert(k.to_vec(), merged);
        }
    }

    /// The stored key of a validated source.
    fn source_key(&self, source: &[u8]) -> Result<Vec<u8>> {
        self.engine.validate_key(source)?;
        Ok(source_key(source))
    }

    /// Source `k`'s state as this batch sees it: staged, then the shard's.
    pub(super) fn source(&self, k: &[u8]) -> Option<SourceState> {
        match self.staged_sources.get(k) {
            Some(s) => Some(s.clone()),
            None => self.shard.source(k),
        }
    }

    fn seen(&self, k: &[u8], source: &[u8], epoch: u64, seq: u64, now: u64) -> Result<Verdict> {
        SourceState::seen(self.source(k).as_ref(), epoch, seq, now).verdict(
            &self.shard.partition,
            source,
            epoch,
        )
    }
}
