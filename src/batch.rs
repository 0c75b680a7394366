//! A poll batch: marks and the consumer offset, written in one atomic write.

use std::collections::HashMap;
use std::sync::Arc;

use rocksdb::{BoundColumnFamily, WriteBatch};

use crate::error::{Error, Result};
use crate::shard::{encode_offset, mark_key, Shard, Verdict, WriterGuard, OFFSET_KEY};
use crate::store::Store;
use crate::ttl::{encode_mark, expiry};

/// An open batch on one partition; see [`Store::batch`].
///
/// The batch holds the partition's write lock from [`Store::batch`] until it
/// is committed or dropped: other threads' writes to the same partition wait,
/// reads do not. Dropping it without [`commit`](Self::commit) writes nothing.
pub struct Batch<'s> {
    store: &'s Store,
    shard: Arc<Shard>,
    cf: Arc<BoundColumnFamily<'s>>,
    // Dropped after `Drop::drop` has cleared the holder.
    _writer: WriterGuard,
    write: WriteBatch,
    /// Stored keys marked in this batch, with their expiry.
    pending: HashMap<Vec<u8>, u64>,
    offset: Option<i64>,
}

impl<'s> Batch<'s> {
    pub(crate) fn new(
        store: &'s Store,
        shard: Arc<Shard>,
        cf: Arc<BoundColumnFamily<'s>>,
        writer: WriterGuard,
    ) -> Self {
        shard.set_holder();
        Self {
            store,
            shard,
            cf,
            _writer: writer,
            write: WriteBatch::default(),
            pending: HashMap::new(),
            offset: None,
        }
    }

    /// Checks `key` and, if it is new, marks it in this batch. A key seen
    /// twice in one batch is `New` the first time and `Duplicate` after.
    pub fn check_and_mark(&mut self, key: &[u8]) -> Result<Verdict> {
        self.store.validate_key(key)?;
        let k = mark_key(self.store.key_mode(), key);
        if self.pending.contains_key(&k) {
            self.shard.count_pending_duplicate();
            return Ok(Verdict::Duplicate);
        }
        let now = self.store.now();
        let verdict = self.store.lookup(&self.shard, &self.cf, &k, now)?;
        if verdict == Verdict::New {
            let expires_at = expiry(now, self.store.ttl_millis());
            self.write.put_cf(&self.cf, &k, encode_mark(expires_at));
            self.pending.insert(k, expires_at);
        }
        Ok(verdict)
    }

    /// Marks `key` as processed in this batch. A key with a live mark keeps
    /// its original expiry.
    pub fn mark(&mut self, key: &[u8]) -> Result<()> {
        self.check_and_mark(key).map(|_| ())
    }

    /// Sets the consumer offset to commit with the marks: the offset of the
    /// next message to consume (Kafka's convention: last processed + 1).
    /// Checked at [`commit`](Self::commit): it must not be negative nor behind
    /// the partition's committed offset.
    pub fn set_offset(&mut self, offset: i64) {
        self.offset = Some(offset);
    }

    /// Keys marked in this batch so far.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the batch marks no key.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Writes all marks and the offset in one atomic RocksDB write: after a
    /// crash either all of them are there or none. Returns when the write is
    /// as durable as [`crate::Durability`] promises. On error nothing of the
    /// batch is applied.
    pub fn commit(mut self) -> Result<()> {
        if let Some(offset) = self.offset {
            if offset < 0 {
                return Err(Error::InvalidOffset(offset));
            }
            if let Some(committed) = self.shard.committed_offset() {
                if offset < committed {
                    return Err(Error::OffsetRegression {
                        partition: self.shard.partition.clone(),
                        committed,
                        requested: offset,
                    });
                }
            }
            self.write
                .put_cf(&self.cf, OFFSET_KEY, encode_offset(offset));
        }
        if self.write.is_empty() {
            return Ok(());
        }
        {
            // Into the filter before the write: a reader between the two sees
            // a false positive (confirmed away on disk), never a false negative.
            let mut filter = self.shard.filter.write();
            filter.expire(self.store.now());
            for (k, expires_at) in &self.pending {
                filter.insert(k, *expires_at)?;
            }
        }
        let write = std::mem::take(&mut self.write);
        self.store.write(write)?;
        if let Some(offset) = self.offset {
            self.shard.set_committed_offset(offset);
        }
        Ok(())
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.shard.clear_holder();
    }
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("partition", &self.shard.partition)
            .field("marks", &self.pending.len())
            .field("offset", &self.offset)
            .finish()
    }
}
