//! One partition's shard: its column family's key layout, its Bloom front,
//! its write lock and its counters.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};

use parking_lot::{ArcMutexGuard, Mutex, RawMutex, RwLock};
use xxhash_rust::xxh3::xxh3_128;

use crate::bloom::ExpiringFilter;
use crate::config::KeyMode;
use crate::error::{Error, Result};
use crate::Partition;

/// First byte of a partition's own metadata keys.
pub(crate) const META_TAG: u8 = 0;
/// First byte of a mark key: `[MARK_TAG] ++ key` (or `++ xxh3_128(key)`).
pub(crate) const MARK_TAG: u8 = 1;
/// The key of the partition's committed consumer offset (value: i64 BE).
pub(crate) const OFFSET_KEY: &[u8] = &[META_TAG, b'o', b'f', b'f', b's', b'e', b't'];

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

/// An assigned partition.
pub(crate) struct Shard {
    pub(crate) partition: Partition,
    pub(crate) cf_name: String,
    writer: Arc<Mutex<WriterState>>,
    /// The thread that holds an open batch, to refuse self-deadlock.
    holder: Mutex<Option<ThreadId>>,
    offset: AtomicI64,
    pub(crate) filter: RwLock<ExpiringFilter>,
    pub(crate) counters: Counters,
    pub(crate) dropped: Arc<AtomicU64>,
}

impl Shard {
    pub(crate) fn new(
        partition: Partition,
        cf_name: String,
        offset: Option<i64>,
        filter: ExpiringFilter,
        dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            partition,
            cf_name,
            writer: Arc::new(Mutex::new(WriterState { revoked: false })),
            holder: Mutex::new(None),
            offset: AtomicI64::new(offset.unwrap_or(NO_OFFSET)),
            filter: RwLock::new(filter),
            counters: Counters::default(),
            dropped,
        }
    }

    /// Takes the partition's write lock, waiting for another thread's batch.
    /// Refuses (rather than deadlocks) when this thread holds the open batch,
    /// and refuses writes through a revoked shard.
    pub(crate) fn lock_writer(&self) -> Result<WriterGuard> {
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

    /// Counts a key found again inside the same open batch.
    pub(crate) fn count_pending_duplicate(&self) {
        Counters::bump(&self.counters.checks);
        Counters::bump(&self.counters.duplicates);
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
