//! Committing a batch, in steps: validate (fencing, epochs, the offset),
//! encode (one `WriteBatch`, and the outbox entry in it), write (the filter
//! first), publish (what readers trust without a disk read, after the
//! write).

use std::time::Instant;

use rocksdb::WriteBatch;

use super::{Batch, Published, Staged};
use crate::config::Durability;
use crate::engine::refuse_older_epoch;
use crate::error::{Error, Result};
use crate::layout::{
    encode_offset, source_key, Entry, CHANGELOG_KEY, CHANGELOG_PROGRESS_KEY, EPOCH_KEY,
    EVENT_TIME_KEY, OFFSET_KEY, SNAPSHOT_KEY, WATERMARK_KEY,
};
use crate::outbox::{outbox_key, Change, OutboxEntry};

/// A commit's RocksDB write, the outbox entry it holds, and its journal
/// record (sequence number, bytes of changes), if it has changes.
type Encoded = (WriteBatch, Option<Published>, Option<(u64, usize)>);

/// What validation worked out for a commit.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The higher event time the commit stores, and the watermark with it.
    event_time: Option<(u64, u64)>,
}

impl Batch<'_> {
    /// Writes all marks, claims' outcomes and the offset in one atomic
    /// RocksDB write: after a crash either all of them are there or none.
    /// Returns when the write is as durable as [`crate::Durability`] promises.
    /// On error nothing of the batch is applied.
    pub fn commit(self) -> Result<()> {
        self.commit_published().map(|_| ())
    }

    /// [`commit`](Self::commit), returning the outbox entry the write left
    /// (a batch that records its changes, see
    /// [`record_changes`](Self::record_changes)).
    pub(crate) fn commit_published(self) -> Result<Option<Published>> {
        let started = Instant::now();
        // Validation first, before anything is built; all of it under the
        // write lock, so the epoch and offset cannot change until this
        // returns.
        let plan = self.validate()?;
        if !self.staged.is_empty() {
            // Only a batch that adds changes to the index makes room in it:
            // a batch of duplicates, or one that only moves the epoch,
            // writes no table and cannot fail on one.
            self.engine.before_commit(&self.shard)?;
        }
        let Some((write, published, journal)) = self.encode(&plan) else {
            // A batch of duplicates writes nothing: its checks still count.
            self.shard.publish_metrics();
            return Ok(None);
        };
        self.write(write)?;
        if let Some((seq, bytes)) = journal {
            // The changes go to the in-memory index right after the write,
            // under the write lock and before anything else of the batch is
            // published: a reader who sees the batch's offset, epoch or
            // sources sees its marks too, and the next record takes the
            // next number whatever happens after this.
            self.shard.set_staged_hint(self.staged.len());
            self.shard.pending.write().apply(
                seq,
                bytes,
                self.staged
                    .iter()
                    .map(|(k, staged)| (k.as_slice(), staged.entry)),
            );
        }
        self.publish(&plan, published.as_ref().map(|(seq, _)| *seq));
        if journal.is_some() {
            self.engine.after_commit(&self.shard);
        }
        // The metrics once per commit, never per key: publishing the
        // counters and timing the commit cost a few atomics and two clock
        // reads (docs/performance.md, "Metrics compiled in").
        if self.shard.committed_metrics(started) {
            self.shard
                .refresh_gauges(self.engine.keys_estimate(&self.shard));
        }
        Ok(published)
    }

    /// Refuses a fenced batch, an epoch going backwards and a bad offset;
    /// works out the event time and watermark the commit moves to.
    fn validate(&self) -> Result<Plan> {
        let shard = &self.shard;
        let current = shard.epoch();
        if let Some(epoch) = self.fence {
            if epoch != current {
                tracing::warn!(
                    partition = %shard.partition,
                    current,
                    attempted = epoch,
                    "fenced: a batch of another epoch was refused"
                );
                return Err(Error::Fenced {
                    partition: shard.partition.clone(),
                    current,
                    attempted: epoch,
                });
            }
        }
        if let Some(epoch) = self.new_epoch {
            // Checked here, under the lock, and not only by the caller: two
            // `assign_with_epoch` racing must not both win.
            refuse_older_epoch(&shard.partition, current, epoch)?;
        }
        if let Some(offset) = self.offset {
            if offset < 0 {
                return Err(Error::InvalidOffset(offset));
            }
            if let Some(committed) = shard.committed_offset() {
                if offset < committed {
                    return Err(Error::OffsetRegression {
                        partition: shard.partition.clone(),
                        committed,
                        requested: offset,
                    });
                }
            }
        }
        let event_time = self
            .max_event_time
            .filter(|&t| t > shard.event_time())
            .map(|t| {
                let watermark = t
                    .saturating_sub(self.engine.lateness_millis())
                    .max(shard.watermark());
                (t, watermark)
            });
        Ok(Plan { event_time })
    }

    /// The RocksDB write of the batch, the outbox entry it holds and its
    /// journal record (sequence number, bytes of changes), or `None` if it
    /// changes nothing.
    fn encode(&self, plan: &Plan) -> Option<Encoded> {
        let shard = &self.shard;
        let mut write = WriteBatch::default();
        // The batch's changes to marks and claims are one journal record,
        // one value in the write-ahead log and the memtable, instead of a
        // memtable insert per key (docs/design.md, "The write path").
        let journal = (!self.staged.is_empty()).then(|| {
            let bytes = self
                .staged
                .iter()
                .map(|(k, s)| crate::journal::change_bytes(k, s.entry))
                .sum();
            let seq = shard.pending.read().next_seq();
            let record = crate::journal::encode(
                self.staged.len(),
                self.staged.iter().map(|(k, s)| (k.as_slice(), s.entry)),
                bytes,
            );
            write.put_cf(&self.cf, crate::journal::journal_key(seq), record);
            (seq, bytes)
        });
        for (source, state) in &self.staged_sources {
            write.put_cf(&self.cf, source_key(source), state.encode());
        }
        if let Some(offset) = self.offset {
            write.put_cf(&self.cf, OFFSET_KEY, encode_offset(offset));
        }
        if let Some(next) = self
            .changelog_next
            .filter(|&n| shard.changelog_next().is_none_or(|c| n > c))
        {
            write.put_cf(&self.cf, CHANGELOG_KEY, encode_offset(next));
        }
        if let Some(progress) = self.changelog_progress {
            write.put_cf(&self.cf, CHANGELOG_PROGRESS_KEY, encode_offset(progress));
        }
        // The outbox entry goes in the same write as the marks and offset it
        // publishes: the store never knows something the changelog cannot
        // get. An entry with no change still carries the offset.
        let published = self.outbox.as_ref().and_then(|(start, records)| {
            let mut keys: Vec<(&Vec<u8>, &Staged)> = self.staged.iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
            if keys.is_empty()
                && self.staged_sources.is_empty()
                && records.is_empty()
                && self.offset.is_none()
            {
                return None;
            }
            let entry = OutboxEntry {
                start: *start,
                next: self.offset.or(shard.committed_offset()).unwrap_or(*start),
                changes: keys
                    .iter()
                    .map(|(k, staged)| Change {
                        key: (*k).clone(),
                        entry: staged.entry,
                        release: staged.release,
                        source: None,
                    })
                    .chain(self.staged_sources.iter().map(|(source, state)| Change {
                        key: source_key(source),
                        entry: None,
                        release: None,
                        source: Some(state.clone()),
                    }))
                    .collect(),
                records: records.clone(),
            };
            let seq = shard.outbox_next();
            write.put_cf(&self.cf, outbox_key(seq), entry.encode());
            Some((seq, entry))
        });
        if let Some(epoch) = self.new_epoch {
            write.put_cf(&self.cf, EPOCH_KEY, epoch.to_be_bytes());
        }
        if let Some((t, w)) = plan.event_time {
            write.put_cf(&self.cf, EVENT_TIME_KEY, t.to_be_bytes());
            // The watermark is stored with the event time, in the same write:
            // it never goes backwards, whatever `allowed_lateness` a later
            // open is given.
            if w > shard.watermark() {
                write.put_cf(&self.cf, WATERMARK_KEY, w.to_be_bytes());
            }
        }
        if write.is_empty() {
            return None;
        }
        if shard.snapshot_key_live() {
            // From now on the saved filter is out of date.
            write.delete_cf(&self.cf, SNAPSHOT_KEY);
        }
        Some((write, published, journal))
    }

    /// Writes the batch. New marks go into the filter before the write: a
    /// reader in between sees a false positive (confirmed away on disk),
    /// never a false negative. The claim table, which readers trust without
    /// a disk read, changes only after the write (see `publish`).
    fn write(&self, write: WriteBatch) -> Result<()> {
        {
            let mut filter = self.shard.filter.write();
            filter.expire(self.partition_now());
            for (k, staged) in &self.staged {
                if let Some(Entry::Done { expires_at }) = staged.entry {
                    filter.insert(k, expires_at);
                }
            }
        }
        self.engine.write(write)
    }

    /// Publishes what the write made true: claims made and ended, the
    /// offset, the epoch, the event time and watermark. A reader sees a new
    /// claim only once it is on disk, so a failed write never leaves a key
    /// in flight that nobody claimed.
    fn publish(&self, plan: &Plan, outbox_seq: Option<u64>) {
        let shard = &self.shard;
        if let Some(seq) = outbox_seq {
            shard.set_outbox_next(seq + 1);
        }
        if let Some(next) = self.changelog_next {
            shard.advance_changelog(next);
        }
        if !self.staged_sources.is_empty() {
            shard.note_sources(&self.staged_sources, self.partition_now());
        }
        let mut claims_changed = false;
        for (k, staged) in &self.staged {
            if staged.claims {
                claims_changed = true;
                shard.note_claim(k, staged.entry);
            }
        }
        if claims_changed {
            shard.expire_claims(self.engine.now());
        }
        if shard.snapshot_key_live() {
            shard.set_snapshot_key_live(false);
        }
        if let Some(offset) = self.offset {
            shard.set_committed_offset(offset);
        }
        if let Some(epoch) = self.new_epoch {
            shard.set_epoch(epoch);
        }
        if let Some((t, w)) = plan.event_time {
            shard.advance_event_time(t, w);
            if self.engine.durability() == Durability::Sync {
                // This write was fsynced: compaction may judge at it.
                shard.make_watermark_durable(w);
            }
        }
        // Best effort: the batch is committed whatever this does. If the
        // ledger cannot be written, compaction keeps judging expiry at the
        // last recorded time, and the next commit tries again.
        if let Err(e) = self.engine.record_time_if_stale() {
            tracing::error!(
                partition = %shard.partition,
                error = %e,
                "the store's time could not be recorded in the ledger; compaction judges expiry at the last recorded time"
            );
        }
    }
}
