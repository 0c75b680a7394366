//! One partition's shard in memory: its Bloom front, its claims, its write
//! lock, its epoch, offset and event time, and its counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::Instant;

use crate::bloom::ExpiringFilter;
use crate::config::TimeDomain;
use crate::error::{Error, Result};
use crate::layout::Entry;
use crate::pending::Pending;
use crate::sequence::{Seen, SourceState};
pub(crate) use crate::stats::Counters;
use crate::stats::{PartitionStats, ShardMetrics};
use crate::ttl::{partition_time, CfShared};
use crate::Partition;
use parking_lot::{ArcMutexGuard, Mutex, RawMutex, RwLock};

/// State guarded by the shard's write lock.
#[derive(Debug)]
pub(crate) struct WriterState {
    /// Set by `revoke`: no write may go through this shard afterwards.
    pub(crate) revoked: bool,
}

pub(crate) type WriterGuard = ArcMutexGuard<RawMutex, WriterState>;

/// No committed offset yet.
const NO_OFFSET: i64 = -1;

/// What a shard starts with, read from disk by `assign`.
pub(crate) struct ShardInit {
    /// Whether the column family holds a snapshot id that the first commit
    /// must delete.
    pub(crate) snapshot_key: bool,
    /// Whether the filter was loaded from a snapshot rather than rebuilt.
    pub(crate) from_snapshot: bool,
    pub(crate) offset: Option<i64>,
    pub(crate) epoch: u64,
    pub(crate) event_time: u64,
    /// The watermark to start from: the stored one, or higher if the
    /// options' lateness makes it so.
    pub(crate) watermark: u64,
    pub(crate) filter: ExpiringFilter,
    pub(crate) claims: HashMap<Vec<u8>, Entry>,
    /// The sequence number of the next outbox entry.
    pub(crate) outbox_next: u64,
    /// The changelog position, if a changelog was used.
    pub(crate) changelog: Option<i64>,
    /// Sequence sources on disk, by source.
    pub(crate) sources: HashMap<Vec<u8>, SourceState>,
    /// The sequence number of the next journal record.
    pub(crate) journal_next: u64,
}

/// An assigned partition.
pub(crate) struct Shard {
    pub(crate) partition: Partition,
    pub(crate) cf_name: String,
    writer: Arc<Mutex<WriterState>>,
    /// The thread that holds an open batch, to refuse self-deadlock.
    holder: Mutex<Option<ThreadId>>,
    offset: AtomicI64,
    epoch: AtomicU64,
    /// Highest committed event time (event-time stores).
    event_time: AtomicU64,
    /// The partition's watermark (event-time stores): never goes backwards.
    watermark: AtomicU64,
    /// Marks: the Bloom front.
    pub(crate) filter: RwLock<ExpiringFilter>,
    /// Claims on disk, known exactly (there are few at a time).
    claims: Mutex<HashMap<Vec<u8>, Entry>>,
    /// `claims.len()`, readable without the lock: most lookups find none.
    claim_count: AtomicUsize,
    pub(crate) counters: Counters,
    /// The partition's metrics handles, registered once here.
    metrics: ShardMetrics,
    pub(crate) cf_shared: Arc<CfShared>,
    snapshot_key: AtomicBool,
    pub(crate) from_snapshot: bool,
    /// The sequence number of the next outbox entry.
    outbox_next: AtomicU64,
    /// The changelog position (`NO_OFFSET`: none).
    changelog: AtomicI64,
    /// Sequence sources, by source: all of them on disk (one entry per
    /// live source, so few), read on assign, so a sequence check never
    /// reads the disk. Changed after a write, under the write lock.
    sources: Mutex<HashMap<Vec<u8>, SourceState>>,
    /// Changes logged in journal records and not yet in a table: checked
    /// after the filter, before RocksDB. Added to after a write, under the
    /// write lock; frozen and thawed by flushes, under the flush lock.
    pub(crate) pending: RwLock<Pending>,
    /// Held while a table of the partition's changes is written: one flush
    /// at a time, and a revoke waits for the one under way.
    flush: Mutex<()>,
    /// Whether the background flusher was asked to flush this shard and
    /// has not started yet.
    pub(crate) flush_requested: AtomicBool,
    /// How many changes the last committed batch staged: the next batch's
    /// map starts that large.
    staged_hint: AtomicUsize,
}

impl Shard {
    pub(crate) fn new(
        partition: Partition,
        cf_name: String,
        init: ShardInit,
        cf_shared: Arc<CfShared>,
    ) -> Self {
        let metrics = ShardMetrics::new(&partition);
        metrics.assigned(init.offset);
        Self {
            cf_name,
            writer: Arc::new(Mutex::new(WriterState { revoked: false })),
            holder: Mutex::new(None),
            offset: AtomicI64::new(init.offset.unwrap_or(NO_OFFSET)),
            epoch: AtomicU64::new(init.epoch),
            event_time: AtomicU64::new(init.event_time),
            watermark: AtomicU64::new(init.watermark),
            filter: RwLock::new(init.filter),
            claim_count: AtomicUsize::new(init.claims.len()),
            claims: Mutex::new(init.claims),
            counters: Counters::default(),
            metrics,
            cf_shared,
            snapshot_key: AtomicBool::new(init.snapshot_key),
            from_snapshot: init.from_snapshot,
            outbox_next: AtomicU64::new(init.outbox_next),
            changelog: AtomicI64::new(init.changelog.unwrap_or(NO_OFFSET)),
            sources: Mutex::new(init.sources),
            pending: RwLock::new(Pending::new(init.journal_next)),
            flush: Mutex::new(()),
            flush_requested: AtomicBool::new(false),
            staged_hint: AtomicUsize::new(0),
            partition,
        }
    }

    /// How many changes the last committed batch staged.
    pub(crate) fn staged_hint(&self) -> usize {
        self.staged_hint.load(Ordering::Relaxed)
    }

    pub(crate) fn set_staged_hint(&self, n: usize) {
        self.staged_hint.store(n, Ordering::Relaxed);
    }

    /// The flush lock (see the field); taken after the write lock, never
    /// before it.
    pub(crate) fn flush_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.flush.lock()
    }

    /// Whether the next commit must delete the snapshot id (see `snapshot`).
    pub(crate) fn snapshot_key_live(&self) -> bool {
        self.snapshot_key.load(Ordering::Acquire)
    }

    /// Records that the snapshot id is gone (`false`) or was written (`true`);
    /// call with the write lock held.
    pub(crate) fn set_snapshot_key_live(&self, live: bool) {
        self.snapshot_key.store(live, Ordering::Release);
    }

    /// A copy of the claim table, for a snapshot.
    pub(crate) fn claims(&self) -> HashMap<Vec<u8>, Entry> {
        self.claims.lock().clone()
    }

    /// Sequence source `source`'s state, if it is on disk.
    pub(crate) fn source(&self, source: &[u8]) -> Option<SourceState> {
        self.sources.lock().get(source).cloned()
    }

    /// What `seq` of `epoch` is to `source`, judged under the table's lock
    /// (no copy of the state).
    pub(crate) fn seen_source(&self, source: &[u8], epoch: u64, seq: u64, now: u64) -> Seen {
        SourceState::seen(self.sources.lock().get(source), epoch, seq, now)
    }

    /// Records what a write put on disk for sources (source, state);
    /// call with the write lock held, after the write. Expired sources
    /// leave the table as `now` (partition time) passes their expiry.
    pub(crate) fn note_sources<'a>(
        &self,
        written: impl IntoIterator<Item = (&'a Vec<u8>, &'a SourceState)>,
        now: u64,
    ) {
        let mut sources = self.sources.lock();
        for (k, state) in written {
            sources.insert(k.clone(), state.clone());
        }
        sources.retain(|_, s| s.is_live(now));
    }

    /// How many sources the partition remembers at partition time `now`:
    /// the table drops expired ones on the way.
    pub(crate) fn source_count(&self, now: u64) -> usize {
        let mut sources = self.sources.lock();
        sources.retain(|_, s| s.is_live(now));
        sources.len()
    }

    /// The partition's epoch (0 if it was never assigned with one).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Publishes a new epoch; call with the write lock held.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    pub(crate) fn event_time(&self) -> u64 {
        self.event_time.load(Ordering::Acquire)
    }

    /// The partition's watermark (event-time stores).
    pub(crate) fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// "Now" for marks at clock time `clock`; see [`partition_time`].
    pub(crate) fn partition_now(&self, domain: TimeDomain, clock: u64) -> u64 {
        partition_time(domain, clock, self.watermark())
    }

    /// The shard's counters, with RocksDB's estimate of its keys; publishes
    /// them and the gauges to the `metrics` facade.
    /// `now`: partition time, for the sources still remembered.
    pub(crate) fn stats(&self, live_keys_estimate: u64, now: u64) -> PartitionStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.publish_metrics();
        let stats = PartitionStats {
            live_keys_estimate,
            checks: load(&c.checks),
            duplicates: load(&c.duplicates),
            bloom_negatives: load(&c.bloom_negatives),
            bloom_false_positives: load(&c.bloom_false_positives),
            expired_dropped: load(&self.cf_shared.dropped),
            filter_bytes: self.filter.read().memory_bytes(),
            committed_offset: self.committed_offset(),
            filter_from_snapshot: self.from_snapshot,
            sources: self.source_count(now) as u64,
            pending_changes: self.pending.read().len() as u64,
        };
        self.metrics.set_gauges(
            stats.live_keys_estimate,
            stats.filter_bytes,
            stats.committed_offset,
        );
        stats
    }

    /// Publishes the counters to the `metrics` facade (deltas since the last
    /// publication).
    pub(crate) fn publish_metrics(&self) {
        let cf = &self.cf_shared;
        self.metrics
            .publish_counters(&self.counters, &cf.dropped, &cf.dropped_published);
    }

    /// Sets the gauges: `live_keys_estimate` (RocksDB's), the filter's bytes
    /// and the committed offset.
    pub(crate) fn refresh_gauges(&self, live_keys_estimate: u64) {
        let filter_bytes = self.filter.read().memory_bytes();
        self.metrics
            .set_gauges(live_keys_estimate, filter_bytes, self.committed_offset());
    }

    /// Records a commit that wrote (begun at `started`) in the metrics, and
    /// publishes the counters; returns whether the gauges are due for a
    /// refresh (see [`refresh_gauges`](Self::refresh_gauges)). Call with the
    /// write lock held.
    pub(crate) fn committed_metrics(&self, started: Instant) -> bool {
        self.publish_metrics();
        self.metrics.committed(started, self.committed_offset())
    }

    /// Publishes the counters of a revoked shard and zeroes its gauges.
    /// Checks that found the shard before it left the store's map may still
    /// count: they are published when the shard is dropped.
    pub(crate) fn revoked_metrics(&self) {
        self.publish_metrics();
        self.metrics.revoked();
    }

    /// Sets the offset gauge of a deleted partition to zero.
    pub(crate) fn deleted_metrics(&self) {
        self.metrics.deleted();
    }

    /// Publishes a higher committed event time and watermark; call with the
    /// write lock held, after the write that stored them. The compaction
    /// filter does not see the watermark until it is durable (see
    /// [`make_watermark_durable`](Self::make_watermark_durable)).
    pub(crate) fn advance_event_time(&self, event_time: u64, watermark: u64) {
        self.event_time.fetch_max(event_time, Ordering::AcqRel);
        self.watermark.fetch_max(watermark, Ordering::AcqRel);
    }

    /// Lets compaction judge expiry at `watermark`, a watermark that a log
    /// fsync has made durable (read before the fsync): compaction never drops
    /// a mark at a watermark a power cut could take back.
    pub(crate) fn make_watermark_durable(&self, watermark: u64) {
        self.cf_shared
            .watermark
            .fetch_max(watermark, Ordering::AcqRel);
    }

    /// The live claim on `k`, if any.
    pub(crate) fn live_claim(&self, k: &[u8], clock_now: u64) -> Option<Entry> {
        if self.claim_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.claims
            .lock()
            .get(k)
            .copied()
            .filter(|e| e.is_live(0, clock_now))
    }

    /// Records what a commit wrote for `k`; call with the write lock held.
    pub(crate) fn note_claim(&self, k: &[u8], entry: Option<Entry>) {
        let mut claims = self.claims.lock();
        match entry {
            Some(e @ Entry::Claimed { .. }) => {
                claims.insert(k.to_vec(), e);
            }
            _ => {
                claims.remove(k);
            }
        }
        self.claim_count.store(claims.len(), Ordering::Release);
    }

    /// Forgets claims whose lease ran out.
    pub(crate) fn expire_claims(&self, clock_now: u64) {
        let mut claims = self.claims.lock();
        claims.retain(|_, e| e.is_live(0, clock_now));
        self.claim_count.store(claims.len(), Ordering::Release);
    }

    /// Takes the partition's write lock, waiting for another thread's batch.
    /// Refuses (rather than deadlocks) when this thread holds the open batch,
    /// and refuses writes through a revoked shard.
    pub(crate) fn lock_writer(&self) -> Result<WriterGuard> {
        debug_assert!(
            !crate::membership::held(),
            "lock order: a shard's write lock is never awaited while membership is held"
        );
        if *self.holder.lock() == Some(thread::current().id()) {
            return Err(Error::BatchInProgress(self.partition.clone()));
        }
        let guard = self.writer.lock_arc();
        if guard.revoked {
            return Err(Error::NotAssigned(self.partition.clone()));
        }
        Ok(guard)
    }

    /// Records that this thread holds the write lock for a batch.
    pub(crate) fn set_holder(&self) {
        *self.holder.lock() = Some(thread::current().id());
    }

    pub(crate) fn clear_holder(&self) {
        *self.holder.lock() = None;
    }

    pub(crate) fn committed_offset(&self) -> Option<i64> {
        let o = self.offset.load(Ordering::Acquire);
        (o != NO_OFFSET).then_some(o)
    }

    /// The sequence number the next outbox entry gets.
    pub(crate) fn outbox_next(&self) -> u64 {
        self.outbox_next.load(Ordering::Acquire)
    }

    /// Publishes the next outbox sequence number; call with the write lock
    /// held, after the write.
    pub(crate) fn set_outbox_next(&self, next: u64) {
        self.outbox_next.store(next, Ordering::Release);
    }

    /// The partition's changelog position, if a changelog was used.
    pub(crate) fn changelog_next(&self) -> Option<i64> {
        let o = self.changelog.load(Ordering::Acquire);
        (o != NO_OFFSET).then_some(o)
    }

    /// Publishes a later changelog position; call after the write.
    pub(crate) fn advance_changelog(&self, next: i64) {
        self.changelog.fetch_max(next, Ordering::AcqRel);
    }

    /// Publishes a committed offset; call with the write lock held.
    pub(crate) fn set_committed_offset(&self, offset: i64) {
        self.offset.store(offset, Ordering::Release);
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // What was counted after the revoke published (by checks that found
        // the shard before it left the store's map).
        self.publish_metrics();
    }
}
