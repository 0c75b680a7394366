//! The engine's durability: fsyncing the log and recording the durable
//! state in the ledger.

use std::sync::Arc;

use super::Engine;
use crate::config::TimeDomain;
use crate::error::Result;
use crate::shard::Shard;

impl Engine {
    /// Fsyncs the write-ahead log and records the durable state in the
    /// ledger; then lets compaction judge each of `shards` at the watermark
    /// it had before the fsync (event-time stores).
    pub(crate) fn sync(&self, shards: &[Arc<Shard>]) -> Result<()> {
        // Read before the fsync: every write up to them is then durable.
        let sequence = self.db.latest_sequence_number();
        let watermarks: Vec<(&Arc<Shard>, u64)> = match self.options.time_domain {
            TimeDomain::ProcessingTime => Vec::new(),
            TimeDomain::EventTime => shards.iter().map(|s| (s, s.watermark())).collect(),
        };
        self.db.flush_wal(true).map_err(|e| self.storage(e))?;
        for (shard, watermark) in watermarks {
            shard.make_watermark_durable(watermark);
        }
        self.record(sequence)
    }

    /// Writes the ledger if anything in it grew: `sequence` (durable, read
    /// before a log fsync) and the store's time now; then lets compaction
    /// use that time.
    fn record(&self, sequence: u64) -> Result<()> {
        let mut ledger = self.ledger.lock();
        let next = ledger.durable_now(&self.path, sequence, self.now());
        if next != *ledger {
            next.write(&self.path)?;
            *ledger = next;
        }
        self.time.set_durable(next.clock);
        Ok(())
    }

    /// Records the store's time in the ledger once it is more than a quarter
    /// TTL (and at least a second) past the recorded one, so that compaction,
    /// which never judges expiry past the recorded time, keeps dropping
    /// expired marks in a store that is never synced. Called after writes.
    pub(crate) fn record_time_if_stale(&self) -> Result<()> {
        let lag = (self.ttl_millis / 4).max(1_000);
        if self.now() > self.time.durable().saturating_add(lag) {
            self.record_time()?;
        }
        Ok(())
    }

    /// Records the store's time in the ledger, leaving its sequence floor
    /// (raised only after a log fsync) as it is.
    pub(crate) fn record_time(&self) -> Result<()> {
        let sequence = self.ledger.lock().sequence;
        self.record(sequence)
    }
}
