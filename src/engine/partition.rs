//! A partition's state on disk: loading it for a new shard (offset, epoch,
//! event time, changelog position, outbox, filter from its snapshot or
//! rebuilt from its marks), saving the filter snapshot, dropping it, and
//! compacting it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::WriteBatch;
use tracing::{debug, info, warn};

use crate::bloom::ExpiringFilter;
use crate::claim::next_token;
use crate::config::TimeDomain;
use crate::error::{Error, Result};
use crate::layout::{
    decode_entry, decode_offset, decode_u64, source_of, Entry, CHANGELOG_KEY, EPOCH_KEY,
    EVENT_TIME_KEY, MARK_TAG, OFFSET_KEY, OUTBOX_PREFIX, SEQUENCE_PIN_KEY, SNAPSHOT_KEY,
    SOURCE_PREFIX, WATERMARK_KEY,
};
use crate::outbox::{outbox_seq, OutboxEntry};
use crate::recovery::partition_cf_options;
use crate::sequence::SourceState;
use crate::shard::{Shard, ShardInit};
use crate::snapshot::{self, Taken};
use crate::ttl::{partition_time, CfShared};
use crate::Partition;

use super::{refuse_older_epoch, Cf, Engine};

impl Engine {
    // ---- a partition's state on disk ----

    /// Reads an unassigned partition's state from disk (creating its column
    /// family if it has none) and writes the new epoch, if any, and the
    /// watermark this open starts from: everything a new shard starts with,
    /// on disk before the shard exists.
    ///
    /// Errors: [`Error::Fenced`] (nothing written) if the stored epoch is
    /// higher than `epoch`.
    pub(crate) fn load_partition(
        &self,
        partition: &Partition,
        epoch: Option<u64>,
    ) -> Result<(String, Arc<CfShared>, ShardInit)> {
        let name = partition.cf_name();
        if self.db.cf_handle(&name).is_none() {
            let shared = Arc::new(CfShared::default());
            let cf_options = partition_cf_options(
                self.time.clone(),
                &self.options,
                self.claim_grace_ms,
                shared.clone(),
                &name,
            );
            self.db
                .create_cf(&name, &cf_options)
                .map_err(|e| self.storage(e))?;
            self.cf_shared.lock().insert(name.clone(), shared);
        }
        let shared = self
            .cf_shared
            .lock()
            .get(&name)
            .cloned()
            .unwrap_or_default();
        let cf = self.cf_by_name(&name, partition)?;
        // Journal records a stop left go to a table before anything is
        // read: the filter rebuild and the claim table scan the marks.
        let journal_next = self.tables.settle(&cf, &name)?;
        let read_u64 = |key: &[u8], what: &str| -> Result<Option<u64>> {
            self.db
                .get_pinned_cf(&cf, key)
                .map_err(|e| self.storage(e))?
                .map(|v| decode_u64(&v, what))
                .transpose()
        };
        let stored_epoch = read_u64(EPOCH_KEY, "epoch")?.unwrap_or(0);
        if let Some(epoch) = epoch {
            refuse_older_epoch(partition, stored_epoch, epoch)?;
        }
        let event_time = read_u64(EVENT_TIME_KEY, "event time")?.unwrap_or(0);
        let stored_watermark = read_u64(WATERMARK_KEY, "watermark")?;
        let read_offset = |key: &[u8]| -> Result<Option<i64>> {
            self.db
                .get_pinned_cf(&cf, key)
                .map_err(|e| self.storage(e))?
                .map(|v| decode_offset(&v))
                .transpose()
        };
        let offset = read_offset(OFFSET_KEY)?;
        let changelog = read_offset(CHANGELOG_KEY)?;
        let outbox_next = self
            .outbox(&cf)?
            .last()
            .map_or(0, |(seq, _)| seq.saturating_add(1));
        // Never below the stored watermark, whatever lateness this open has:
        // compaction may have dropped marks that expired at it.
        let watermark = event_time
            .saturating_sub(self.options.lateness_millis())
            .max(stored_watermark.unwrap_or(0));
        let clock_now = self.now();
        let partition_now = partition_time(self.options.time_domain, clock_now, watermark);
        let snapshot_id = read_u64(SNAPSHOT_KEY, "filter snapshot id")?;
        let read = snapshot_id.and_then(|id| {
            snapshot::read(
                &self.path,
                &name,
                id,
                self.options.expected_keys_per_partition,
                self.options.bloom_fp_rate,
                self.ttl_millis,
            )
        });
        let read_back = read.is_some();
        // A snapshot taken at a later time than the store answers at now
        // has dropped marks and claims that are live again (the clock
        // stepped back across a restart the ledger did not see).
        let loaded =
            read.filter(|l| l.taken.clock <= clock_now && l.taken.partition <= partition_now);
        let from_snapshot = loaded.is_some();
        let (mut filter, claims) = match loaded {
            Some(l) => {
                debug!(
                    partition = %partition,
                    snapshot = snapshot_id.unwrap_or(0),
                    filter_bytes = l.filter.memory_bytes(),
                    claims = l.claims.len(),
                    "filter snapshot loaded"
                );
                (l.filter, l.claims)
            }
            None => {
                let why = match (snapshot_id, read_back) {
                    (None, _) => {
                        "no valid snapshot: a write since the last revoke or close, or none taken"
                    }
                    (Some(_), false) => {
                        "snapshot file missing, damaged, of another id or sized for other options"
                    }
                    (Some(_), true) => "snapshot taken later than the store's time now",
                };
                debug!(partition = %partition, why, "rebuilding the filter from disk");
                self.rebuild(&cf, partition, partition_now)?
            }
        };
        filter.expire(partition_now);

        let mut write = WriteBatch::default();
        let new_epoch = epoch.filter(|&e| e != stored_epoch);
        if let Some(e) = new_epoch {
            write.put_cf(&cf, EPOCH_KEY, e.to_be_bytes());
        }
        if self.options.time_domain == TimeDomain::EventTime
            && stored_watermark.is_none_or(|w| watermark > w)
        {
            write.put_cf(&cf, WATERMARK_KEY, watermark.to_be_bytes());
        }
        if !write.is_empty() {
            self.write(write)?;
        }
        let init = ShardInit {
            snapshot_key: snapshot_id.is_some(),
            from_snapshot,
            offset,
            epoch: new_epoch.unwrap_or(stored_epoch),
            event_time,
            watermark,
            filter,
            claims,
            outbox_next,
            changelog,
            sources: self.sources(&cf, partition_now)?,
            journal_next,
        };
        Ok((name, shared, init))
    }

    /// The partition's live sequence sources (sequence mode), by source.
    /// A source is one key (a producer), so there are few: read whole on
    /// every assign rather than kept in the filter snapshot.
    pub(crate) fn sources(
        &self,
        cf: &Cf<'_>,
        partition_now: u64,
    ) -> Result<HashMap<Vec<u8>, SourceState>> {
        let mut sources = HashMap::new();
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek(SOURCE_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(SOURCE_PREFIX) {
                break;
            }
            let state = SourceState::decode(v).ok_or_else(|| {
                Error::Corruption(format!(
                    "sequence source {} holds a malformed state of {} bytes",
                    k.escape_ascii(),
                    v.len()
                ))
            })?;
            if let Some(source) = source_of(k).filter(|_| state.is_live(partition_now)) {
                sources.insert(source.to_vec(), state);
            }
            it.next();
        }
        it.status().map_err(|e| self.storage(e))?;
        Ok(sources)
    }

    /// The partition's outbox entries not yet published, in order.
    pub(crate) fn outbox(&self, cf: &Cf<'_>) -> Result<Vec<(u64, OutboxEntry)>> {
        let mut entries = Vec::new();
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek(OUTBOX_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(seq) = outbox_seq(k) else { break };
            entries.push((seq, OutboxEntry::decode(v)?));
            it.next();
        }
        it.status().map_err(|e| self.storage(e))?;
        Ok(entries)
    }

    /// Builds a partition's Bloom front from its live marks on disk, and its
    /// table of claims.
    fn rebuild(
        &self,
        cf: &Cf<'_>,
        partition: &Partition,
        partition_now: u64,
    ) -> Result<(ExpiringFilter, HashMap<Vec<u8>, Entry>)> {
        let started = Instant::now();
        let (mut live, mut expired) = (0u64, 0u64);
        let clock_now = self.now();
        let mut filter = ExpiringFilter::new(
            self.options.expected_keys_per_partition,
            self.options.bloom_fp_rate,
            self.ttl_millis,
        );
        let mut claims = HashMap::new();
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek([MARK_TAG]);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let entry = decode_entry(v)?;
            match entry {
                Entry::Done { expires_at } if entry.is_live(partition_now, clock_now) => {
                    filter.insert(k, expires_at);
                    live += 1;
                }
                Entry::Claimed { .. } => {
                    claims.insert(k.to_vec(), entry);
                }
                Entry::Done { .. } => expired += 1,
            }
            it.next();
        }
        it.status().map_err(|e| self.storage(e))?;
        debug!(
            partition = %partition,
            live_marks = live,
            expired_marks = expired,
            claims = claims.len(),
            filter_bytes = filter.memory_bytes(),
            elapsed_ms = started.elapsed().as_millis(),
            "filter rebuilt from disk"
        );
        Ok((filter, claims))
    }

    /// Saves the shard's filter and claims, then records the snapshot's id in
    /// the partition; call with the write lock held, after the last write.
    /// Best effort: if it fails, the next `assign` rebuilds from disk.
    pub(crate) fn save_snapshot(&self, shard: &Shard) {
        let id = next_token();
        let clock = self.now();
        let taken = Taken {
            clock,
            partition: shard.partition_now(self.options.time_domain, clock),
        };
        let saved = {
            let filter = shard.filter.read();
            snapshot::write(
                &self.path,
                &shard.cf_name,
                id,
                taken,
                &filter,
                &shard.claims(),
            )
        };
        // Each failure below costs only a scan at the next assign: warned
        // about, not returned.
        if let Err(e) = saved {
            warn!(partition = %shard.partition, error = %e, "filter snapshot not saved; the next assign scans the partition");
            return;
        }
        let recorded = self.cf(shard).and_then(|cf| {
            let mut write = WriteBatch::default();
            write.put_cf(&cf, SNAPSHOT_KEY, id.to_be_bytes());
            self.write(write)
        });
        match recorded {
            Ok(()) => {
                shard.set_snapshot_key_live(true);
                debug!(partition = %shard.partition, snapshot = id, "filter snapshot saved");
                // Best effort, as the snapshot itself.
                if let Err(e) = snapshot::remove_legacy(&self.path, &shard.cf_name) {
                    warn!(partition = %shard.partition, error = %e, "old-layout filter snapshot not removed");
                }
            }
            Err(e) => {
                warn!(partition = %shard.partition, error = %e, "filter snapshot saved but its id not recorded; the next assign scans the partition");
            }
        }
    }

    /// Deletes an unassigned partition's data. Returns whether it had any.
    pub(crate) fn drop_partition(&self, partition: &Partition) -> Result<bool> {
        let name = partition.cf_name();
        if self.db.cf_handle(&name).is_none() {
            return Ok(false);
        }
        // The snapshot first: if the drop then fails, the data is still
        // there and the next assign rebuilds its filter, and a retry deletes
        // it; the other way round, an error would leave the data gone and
        // the call reporting failure.
        snapshot::remove(&self.path, &name)?;
        self.pin_sequence()?;
        self.db.drop_cf(&name).map_err(|e| self.storage(e))?;
        self.cf_shared.lock().remove(&name);
        info!(partition = %partition, "partition deleted");
        Ok(true)
    }

    /// Records RocksDB's current sequence number in its `MANIFEST`, by a
    /// one-key write to the default column family and a flush of it.
    ///
    /// Dropping a column family can make RocksDB forget sequence numbers: a
    /// drop is recorded without the last sequence number, and the log that
    /// held the dropped family's writes is then deleted, so recovery can end
    /// below a sequence number the ledger already recorded as durable, and
    /// the ledger's check would take a healthy store for a damaged one.
    /// Pinning the sequence before every drop keeps recovery at or above it.
    fn pin_sequence(&self) -> Result<()> {
        let sequence = self.db.latest_sequence_number();
        let mut write = WriteBatch::default();
        write.put(SEQUENCE_PIN_KEY, sequence.to_be_bytes());
        self.write(write)?;
        // `flush` is the default column family's.
        self.db.flush().map_err(|e| self.storage(e))
    }

    /// RocksDB's estimate of the keys in the shard's column family.
    pub(crate) fn keys_estimate(&self, shard: &Shard) -> u64 {
        let on_disk = self
            .db
            .cf_handle(&shard.cf_name)
            .and_then(|cf| {
                self.db
                    .property_int_value_cf(&cf, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        // The journal records of the changes in memory are keys on disk
        // too: counted as the changes instead. (Records already deleted
        // count until a compaction drops them, as expired marks do.)
        let pending = shard.pending.read();
        on_disk
            .saturating_sub(pending.records())
            .saturating_add(pending.len() as u64)
    }

    /// Runs a full compaction of the shard's column family now.
    pub(crate) fn compact(&self, shard: &Shard) -> Result<()> {
        let started = Instant::now();
        let dropped_before = shard.cf_shared.dropped.load(Ordering::Relaxed);
        let cf = self.cf(shard)?;
        // The changes in memory are compacted with the rest. Writing them
        // fsyncs the log; it is fsynced here in any case, so a compaction
        // always leaves every acknowledged write durable, whether or not
        // there was anything in memory.
        // A revoke (or a `delete_partition`, which drops the column family)
        // racing this one makes its errors `NotAssigned`, as if it had come
        // first.
        let revoked = |e: Error| {
            if shard.pending.read().is_retired() {
                Error::NotAssigned(shard.partition.clone())
            } else {
                e
            }
        };
        self.flush_all(shard).map_err(revoked)?;
        self.db
            .flush_wal(true)
            .map_err(|e| revoked(self.storage(e)))?;
        // Expiry is judged at the time the ledger records: record now first.
        self.record_time()?;
        self.db
            .flush_cf(&cf)
            .map_err(|e| revoked(self.storage(e)))?;
        self.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        shard.publish_metrics();
        info!(
            partition = %shard.partition,
            // Background compactions running meanwhile count here too.
            dropped = shard
                .cf_shared
                .dropped
                .load(Ordering::Relaxed)
                .saturating_sub(dropped_before),
            elapsed_ms = started.elapsed().as_millis(),
            "partition compacted"
        );
        Ok(())
    }
}
