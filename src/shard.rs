//! One partition's shard: its column family's key layout, its Bloom front,
//! its write lock and its counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};

use parking_lot::{ArcMutexGuard, Mutex, RawMutex, RwLock};
use xxhash_rust::xxh3::xxh3_128;

use crate::bloom::ExpiringFilter;
use crate::config::{KeyMode, TimeDomain};
use crate::error::{Error, Result};
use crate::ttl::{CfShared, Entry};
use crate::Partition;

/// First byte of a mark key: `[MARK_TAG] ++ key` (or `++ xxh3_128(key)`).
pub(crate) const MARK_TAG: u8 = 1;
// A partition's own metadata keys start with 0x00, mark keys with MARK_TAG.

/// The key of the partition's committed consumer offset (value: i64 BE).
pub(crate) const OFFSET_KEY: &[u8] = b"\x00offset";
/// The key of the partition's epoch (value: u64 BE).
pub(crate) const EPOCH_KEY: &[u8] = b"\x00epoch";
/// The key of the partition's highest committed event time (value: u64 BE).
pub(crate) const EVENT_TIME_KEY: &[u8] = b"\x00event_time";
/// The key of the partition's watermark (event-time stores; value: u64 BE):
/// the highest `event_time - allowed_lateness` ever committed. Kept so that
/// the watermark never goes backwards, even when a reopen raises
/// `allowed_lateness`: compaction may already have dropped marks that
/// expired at it. Absent in stores written before it existed.
pub(crate) const WATERMARK_KEY: &[u8] = b"\x00watermark";

/// The answer to "already processed?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The key has no live mark: process the message.
    New,
    /// The key was marked and its mark has not expired: skip the message.
    Duplicate,
}

/// The stored form of a user key.
pub(crate) fn mark_key(mode: KeyMode, key: &[u8]) -> Vec<u8> {
    match mode {
        KeyMode::Raw => {
            let mut k = Vec::with_capacity(1 + key.len());
            k.push(MARK_TAG);
            k.extend_from_slice(key);
            k
        }
        KeyMode::Hashed => {
            let mut k = Vec::with_capacity(17);
            k.push(MARK_TAG);
            k.extend_from_slice(&xxh3_128(key).to_be_bytes());
            k
        }
    }
}

pub(crate) fn encode_offset(offset: i64) -> [u8; 8] {
    offset.to_be_bytes()
}

pub(crate) fn decode_u64(value: &[u8], what: &str) -> Result<u64> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        Error::Corruption(format!(
            "stored {what} is {} bytes, expected 8",
            value.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn decode_offset(value: &[u8]) -> Result<i64> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        Error::Corruption(format!(
            "stored offset is {} bytes, expected 8",
            value.len()
        ))
    })?;
    let offset = i64::from_be_bytes(bytes);
    if offset < 0 {
        return Err(Error::Corruption(format!(
            "stored offset {offset} is negative"
        )));
    }
    Ok(offset)
}

/// Per-partition counters since the shard was assigned.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) checks: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) bloom_negatives: AtomicU64,
    pub(crate) bloom_false_positives: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

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
    pub(crate) cf_shared: Arc<CfShared>,
    snapshot_key: AtomicBool,
    pub(crate) from_snapshot: bool,
}

impl Shard {
    pub(crate) fn new(
        partition: Partition,
        cf_name: String,
        init: ShardInit,
        cf_shared: Arc<CfShared>,
    ) -> Self {
        Self {
            partition,
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
            cf_shared,
            snapshot_key: AtomicBool::new(init.snapshot_key),
            from_snapshot: init.from_snapshot,
        }
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

    /// "Now" for marks at clock time `clock`: the clock under processing
    /// time, the partition's watermark under event time. The one place that
    /// computes it.
    pub(crate) fn partition_now(&self, domain: TimeDomain, clock: u64) -> u64 {
        match domain {
            TimeDomain::ProcessingTime => clock,
            TimeDomain::EventTime => self.watermark(),
        }
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

    /// Publishes a committed offset; call with the write lock held.
    pub(crate) fn set_committed_offset(&self, offset: i64) {
        self.offset.store(offset, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_keys_never_collide_with_metadata() {
        for mode in [KeyMode::Raw, KeyMode::Hashed] {
            let k = mark_key(mode, b"offset");
            assert_eq!(k[0], MARK_TAG);
            assert_ne!(k.as_slice(), OFFSET_KEY);
        }
        assert_eq!(mark_key(KeyMode::Hashed, &[7; 1000]).len(), 17);
        assert_eq!(
            mark_key(KeyMode::Raw, b"abc"),
            vec![MARK_TAG, b'a', b'b', b'c']
        );
    }

    #[test]
    fn offsets_round_trip_and_bad_ones_are_corruption() {
        assert_eq!(decode_offset(&encode_offset(42)).unwrap(), 42);
        assert!(matches!(decode_offset(&[1, 2]), Err(Error::Corruption(_))));
        assert!(matches!(
            decode_offset(&encode_offset(-5)),
            Err(Error::Corruption(_))
        ));
    }
}
