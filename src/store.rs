//! The store: opening a directory, assigning partitions, and the single-key
//! operations.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rocksdb::{
    BoundColumnFamily, ColumnFamilyDescriptor, DBWithThreadMode, MultiThreaded, WriteBatch,
    WriteOptions,
};

use crate::batch::Batch;
use crate::bloom::ExpiringFilter;
use crate::claim::{next_token, Claim, ClaimToken};
use crate::clock::TimeKeeper;
use crate::config::{Durability, KeyMode, Options, TimeDomain, TtlRefresh};
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::membership::{Membership, MembershipGuard};
use crate::recovery::{
    check_after_open, check_before_open, db_options, has_rocksdb_data, partition_cf_options,
    prepare_dir, Prepared,
};
use crate::shard::{
    decode_offset, decode_u64, mark_key, Counters, Shard, ShardInit, Verdict, EPOCH_KEY,
    EVENT_TIME_KEY, MARK_TAG, OFFSET_KEY, WATERMARK_KEY,
};
use crate::snapshot::{self, Taken, SNAPSHOT_KEY};
use crate::stats::{PartitionStats, Stats};
use crate::ttl::{CfShared, Entry};
use crate::Partition;

/// Key in the default column family holding the sequence number last pinned
/// by [`Store::pin_sequence`]; nothing reads it back.
const SEQUENCE_PIN_KEY: &[u8] = b"\x00sequence_pin";

type Db = DBWithThreadMode<MultiThreaded>;

/// An embedded dedup store: answers "already processed?" for idempotency
/// keys, per Kafka partition, and keeps each partition's consumer offset.
///
/// `Store` is `Send + Sync`: share it (e.g. in an `Arc`) between consumer
/// threads. Threads may work on different partitions at once; on one
/// partition, writes are serialised, so of two threads marking the same key
/// exactly one sees [`Verdict::New`].
///
/// ```
/// use std::time::Duration;
/// use exactly::{Options, Partition, Store, Verdict};
///
/// # fn main() -> exactly::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let store = Store::open(dir.path(), Options::default().ttl(Duration::from_secs(3600)))?;
/// let p = Partition::new("orders", 3);
/// store.assign(&p)?;
///
/// // One message at a time:
/// assert_eq!(store.check_and_mark(&p, b"order-1")?, Verdict::New);
/// assert_eq!(store.check_and_mark(&p, b"order-1")?, Verdict::Duplicate);
///
/// // Or per poll batch: all marks and the offset in one atomic write.
/// let mut batch = store.batch(&p)?;
/// assert_eq!(batch.check_and_mark(b"order-2")?, Verdict::New);
/// assert_eq!(batch.check_and_mark(b"order-1")?, Verdict::Duplicate);
/// batch.set_offset(42);
/// batch.commit()?;
/// assert_eq!(store.committed_offset(&p)?, Some(42));
///
/// store.revoke(&p)?;
/// store.close()?;
/// # Ok(()) }
/// ```
pub struct Store {
    db: Db,
    /// The directory lock; declared after `db` so it is released after
    /// RocksDB has closed.
    _lock: fs::File,
    /// What was last recorded as durable; see [`crate::ledger`].
    ledger: Mutex<Ledger>,
    path: PathBuf,
    options: Options,
    ttl_millis: u64,
    /// See [`Store::claim_grace_millis`].
    claim_grace_ms: u64,
    time: Arc<TimeKeeper>,
    write_options: WriteOptions,
    shards: RwLock<HashMap<Partition, Arc<Shard>>>,
    /// Serialises assign, revoke and delete; see [`crate::membership`].
    membership: Membership,
    /// State shared with each partition column family's compaction filter.
    cf_shared: Mutex<HashMap<String, Arc<CfShared>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("assigned", &self.assigned())
            .finish()
    }
}

impl Store {
    /// Opens the store in directory `path`, creating it if the directory is
    /// missing or empty.
    ///
    /// Errors: [`Error::InvalidOptions`] for options out of range;
    /// [`Error::NotAStore`] for a non-empty directory that is not a store;
    /// [`Error::UnsupportedFormat`] for a store of a newer format;
    /// [`Error::IncompatibleOptions`] when an option fixed at creation differs;
    /// [`Error::Corruption`] for damaged files; [`Error::Locked`] when another
    /// process (or another `Store` in this one) has it open.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Self> {
        options.validate()?;
        let path = path.as_ref().to_path_buf();
        let Prepared { manifest, lock } = prepare_dir(&path, &options)?;
        let claim_grace_ms = manifest.claim_grace_ms.unwrap_or(options.ttl_millis());
        let ledger = check_before_open(&path, &manifest)?;
        let time = Arc::new(TimeKeeper::new(options.clock.clone()));
        time.start_at(ledger.clock);
        let mut db_options = db_options();
        let has_current = path.join("CURRENT").exists();
        let existing = if has_current {
            Db::list_cf(&db_options, &path).map_err(|e| Error::storage(e, &path))?
        } else if has_rocksdb_data(&path)? {
            return Err(Error::Corruption(
                "RocksDB's CURRENT file is missing but data files are present".into(),
            ));
        } else {
            db_options.create_if_missing(true);
            Vec::new()
        };

        let mut cf_shared = HashMap::new();
        let mut descriptors = Vec::new();
        for name in existing {
            if name == rocksdb::DEFAULT_COLUMN_FAMILY_NAME {
                continue;
            }
            if Partition::from_cf_name(&name).is_none() {
                return Err(Error::Corruption(format!(
                    "unexpected column family {name:?}"
                )));
            }
            let shared = Arc::new(CfShared::default());
            let cf_options =
                partition_cf_options(time.clone(), &options, claim_grace_ms, shared.clone());
            cf_shared.insert(name.clone(), shared);
            descriptors.push(ColumnFamilyDescriptor::new(name, cf_options));
        }
        let db = Db::open_cf_descriptors(&db_options, &path, descriptors)
            .map_err(|e| Error::storage(e, &path))?;
        let ledger = check_after_open(
            &path,
            &manifest,
            ledger,
            db.latest_sequence_number(),
            time.now(),
            claim_grace_ms,
        )?;
        time.set_durable(ledger.clock);
        if options.time_domain == TimeDomain::EventTime {
            // What recovery read back is durable (RocksDB writes recovered
            // logs to tables before it opens), so compaction may judge at
            // each partition's stored watermark from the start.
            for (name, shared) in &cf_shared {
                let stored = match db.cf_handle(name) {
                    Some(cf) => db.get_pinned_cf(&cf, WATERMARK_KEY),
                    None => Ok(None),
                };
                if let Some(v) = stored.map_err(|e| Error::storage(e, &path))? {
                    shared
                        .watermark
                        .fetch_max(decode_u64(&v, "watermark")?, Ordering::AcqRel);
                }
            }
        }

        let mut write_options = WriteOptions::default();
        write_options.set_sync(options.durability == Durability::Sync);
        Ok(Self {
            db,
            _lock: lock,
            ledger: Mutex::new(ledger),
            path,
            ttl_millis: options.ttl_millis(),
            claim_grace_ms,
            options,
            time,
            write_options,
            shards: RwLock::new(HashMap::new()),
            membership: Membership::default(),
            cf_shared: Mutex::new(cf_shared),
        })
    }

    /// Assigns a partition to this store (on a consumer-group rebalance):
    /// opens its shard, creating it if new, and rebuilds its Bloom front from
    /// the live marks on disk. Assigning an assigned partition does nothing.
    /// The partition keeps the epoch it had; see
    /// [`assign_with_epoch`](Self::assign_with_epoch).
    ///
    /// Errors: [`Error::InvalidPartition`] for a topic or number Kafka would
    /// not accept; [`Error::Corruption`] if the shard's data is damaged.
    pub fn assign(&self, partition: &Partition) -> Result<()> {
        self.assign_inner(partition, None)
    }

    /// Assigns a partition under `epoch`: the consumer-group generation, or
    /// any number the caller increases with every reassignment. The epoch is
    /// stored with the shard and never goes backwards; batches fenced with an
    /// older epoch ([`Batch::fence`]) and claims made under one are refused
    /// with [`Error::Fenced`]. Assigning an assigned partition with a newer
    /// epoch moves it to that epoch.
    ///
    /// Errors: as [`assign`](Self::assign), and [`Error::Fenced`] (nothing
    /// changed) if the partition's epoch is already higher.
    pub fn assign_with_epoch(&self, partition: &Partition, epoch: u64) -> Result<()> {
        self.assign_inner(partition, Some(epoch))
    }

    /// The partition's epoch (0 if it was never assigned with one).
    pub fn epoch(&self, partition: &Partition) -> Result<u64> {
        Ok(self.shard(partition)?.epoch())
    }

    fn assign_inner(&self, partition: &Partition, epoch: Option<u64>) -> Result<()> {
        partition.validate()?;
        loop {
            let membership = self.membership.lock();
            let existing = self.shards.read().get(partition).cloned();
            let Some(shard) = existing else {
                return self.open_shard(partition, epoch, &membership);
            };
            // Lock order: membership is never held while waiting for a
            // shard's write lock (another thread's batch may hold it and wait
            // for membership in turn, through `revoke`).
            drop(membership);
            let Some(epoch) = epoch.filter(|&e| e != shard.epoch()) else {
                return Ok(());
            };
            // The batch's commit checks the epoch again under the write lock,
            // so of two racing calls the lower epoch is refused.
            match self.batch(partition) {
                Ok(mut batch) => {
                    batch.set_epoch(epoch);
                    return batch.commit();
                }
                // Revoked (or revoked and assigned again) since it was looked
                // up: assign it afresh.
                Err(Error::NotAssigned(_)) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens an unassigned partition's shard and publishes it. Everything the
    /// shard starts with, the new epoch included, is on disk before any
    /// other thread can see the shard: no batch can slip in between, fenced
    /// with an older epoch.
    fn open_shard(
        &self,
        partition: &Partition,
        epoch: Option<u64>,
        _membership: &MembershipGuard<'_>,
    ) -> Result<()> {
        let name = partition.cf_name();
        if self.db.cf_handle(&name).is_none() {
            let shared = Arc::new(CfShared::default());
            let cf_options = partition_cf_options(
                self.time.clone(),
                &self.options,
                self.claim_grace_ms,
                shared.clone(),
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
        let read_u64 = |key: &[u8], what: &str| -> Result<Option<u64>> {
            self.db
                .get_pinned_cf(&cf, key)
                .map_err(|e| self.storage(e))?
                .map(|v| decode_u64(&v, what))
                .transpose()
        };
        let stored_epoch = read_u64(EPOCH_KEY, "epoch")?.unwrap_or(0);
        if let Some(epoch) = epoch {
            self.fence_check(partition, stored_epoch, epoch)?;
        }
        let event_time = read_u64(EVENT_TIME_KEY, "event time")?.unwrap_or(0);
        let stored_watermark = read_u64(WATERMARK_KEY, "watermark")?;
        let offset = self
            .db
            .get_pinned_cf(&cf, OFFSET_KEY)
            .map_err(|e| self.storage(e))?
            .map(|v| decode_offset(&v))
            .transpose()?;
        // Never below the stored watermark, whatever lateness this open has:
        // compaction may have dropped marks that expired at it.
        let watermark = event_time
            .saturating_sub(self.options.lateness_millis())
            .max(stored_watermark.unwrap_or(0));
        let clock_now = self.now();
        let partition_now = match self.options.time_domain {
            TimeDomain::ProcessingTime => clock_now,
            TimeDomain::EventTime => watermark,
        };
        let snapshot_id = read_u64(SNAPSHOT_KEY, "filter snapshot id")?;
        let loaded = snapshot_id
            .and_then(|id| {
                snapshot::read(
                    &self.path,
                    &name,
                    id,
                    self.options.expected_keys_per_partition,
                    self.options.bloom_fp_rate,
                    self.ttl_millis,
                )
            })
            // A snapshot taken at a later time than the store answers at now
            // has dropped marks and claims that are live again (the clock
            // stepped back across a restart the ledger did not see).
            .filter(|l| l.taken.clock <= clock_now && l.taken.partition <= partition_now);
        let from_snapshot = loaded.is_some();
        let (mut filter, claims) = match loaded {
            Some(l) => (l.filter, l.claims),
            None => self.rebuild(&cf, partition_now)?,
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
        };
        drop(cf);
        let shard = Arc::new(Shard::new(partition.clone(), name, init, shared));
        self.shards.write().insert(partition.clone(), shard);
        Ok(())
    }

    fn fence_check(&self, partition: &Partition, current: u64, attempted: u64) -> Result<()> {
        if attempted < current {
            return Err(Error::Fenced {
                partition: partition.clone(),
                current,
                attempted,
            });
        }
        Ok(())
    }

    /// Revokes a partition (on a consumer-group rebalance): closes its shard
    /// and frees its filter, keeping its marks and offset on disk for a later
    /// [`assign`](Self::assign). Waits for another thread's open batch on the
    /// partition to finish.
    ///
    /// Errors: [`Error::NotAssigned`]; [`Error::BatchInProgress`] if this
    /// thread holds an open batch on it.
    pub fn revoke(&self, partition: &Partition) -> Result<()> {
        let shard = self.shard(partition)?;
        self.revoke_shard(&shard)
    }

    /// Revokes `shard`. Lock order: its write lock first (waiting for an open
    /// batch), then membership.
    fn revoke_shard(&self, shard: &Arc<Shard>) -> Result<()> {
        let mut writer = shard.lock_writer()?;
        writer.revoked = true;
        self.save_snapshot(shard);
        let _membership = self.membership.lock();
        let mut shards = self.shards.write();
        if shards
            .get(&shard.partition)
            .is_some_and(|current| Arc::ptr_eq(current, shard))
        {
            shards.remove(&shard.partition);
        }
        Ok(())
    }

    /// Deletes a partition's marks and offset, revoking it first if it is
    /// assigned. Returns whether there was anything to delete.
    ///
    /// Racing an [`assign`](Self::assign) of the same partition, either the
    /// assign comes first (and the partition is revoked and deleted) or the
    /// delete does (and the partition is assigned afresh, empty); never a
    /// shard without its data.
    pub fn delete_partition(&self, partition: &Partition) -> Result<bool> {
        partition.validate()?;
        loop {
            let existing = self.shards.read().get(partition).cloned();
            if let Some(shard) = existing {
                match self.revoke_shard(&shard) {
                    // Revoked by another thread meanwhile.
                    Ok(()) | Err(Error::NotAssigned(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let _membership = self.membership.lock();
            // Checked under membership, which every assign holds: if it was
            // assigned again since, revoke that shard too.
            if self.shards.read().contains_key(partition) {
                drop(_membership);
                std::thread::yield_now();
                continue;
            }
            let name = partition.cf_name();
            if self.db.cf_handle(&name).is_none() {
                return Ok(false);
            }
            // The snapshot first: if the drop then fails, the data is still
            // there and the next assign rebuilds its filter, and a retry
            // deletes it; the other way round, an error would leave the data
            // gone and the call reporting failure.
            snapshot::remove(&self.path, &name)?;
            self.pin_sequence()?;
            self.db.drop_cf(&name).map_err(|e| self.storage(e))?;
            self.cf_shared.lock().remove(&name);
            return Ok(true);
        }
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

    /// The partitions assigned to this store, in order.
    pub fn assigned(&self) -> Vec<Partition> {
        let mut v: Vec<_> = self.shards.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether `key` has a live mark (or a live claim), without marking it.
    pub fn check(&self, partition: &Partition, key: &[u8]) -> Result<Verdict> {
        self.validate_key(key)?;
        let shard = self.shard(partition)?;
        let k = mark_key(self.key_mode(), key);
        Counters::bump(&shard.counters.checks);
        let clock_now = self.now();
        let partition_now = shard.partition_now(self.options.time_domain, clock_now);
        match self.lookup(&shard, None, &k, partition_now, clock_now)? {
            Some(_) => {
                Counters::bump(&shard.counters.duplicates);
                Ok(Verdict::Duplicate)
            }
            None => Ok(Verdict::New),
        }
    }

    /// Checks `key` and marks it if it is new, atomically: of several callers
    /// racing on one key, exactly one gets [`Verdict::New`]. A key with a live
    /// mark keeps its original expiry (unless [`TtlRefresh::OnDuplicate`]);
    /// a key with a live claim is a duplicate.
    pub fn check_and_mark(&self, partition: &Partition, key: &[u8]) -> Result<Verdict> {
        // Bad input is reported before the partition is looked at.
        self.validate_key(key)?;
        self.single(partition, |b| b.check_and_mark(key))
    }

    /// Marks `key` as processed; see [`check_and_mark`](Self::check_and_mark).
    pub fn mark(&self, partition: &Partition, key: &[u8]) -> Result<()> {
        self.check_and_mark(partition, key).map(|_| ())
    }

    /// [`check_and_mark`](Self::check_and_mark) for a message with event
    /// time `event_time` (ms since the Unix epoch); see
    /// [`Batch::check_and_mark_at`].
    pub fn check_and_mark_at(
        &self,
        partition: &Partition,
        key: &[u8],
        event_time: u64,
    ) -> Result<Verdict> {
        // Bad input is reported before the partition is looked at.
        self.validate_key(key)?;
        self.single(partition, |b| b.check_and_mark_at(key, event_time))
    }

    /// [`mark`](Self::mark) with event time; see [`Batch::check_and_mark_at`].
    pub fn mark_at(&self, partition: &Partition, key: &[u8], event_time: u64) -> Result<()> {
        self.check_and_mark_at(partition, key, event_time)
            .map(|_| ())
    }

    /// [`mark`](Self::mark) with a TTL of its own, for keys that must be
    /// remembered longer (or shorter) than the store's TTL.
    pub fn mark_with_ttl(&self, partition: &Partition, key: &[u8], ttl: Duration) -> Result<()> {
        // Bad input is reported before the partition is looked at.
        self.validate_key(key)?;
        self.single(partition, |b| b.mark_with_ttl(key, ttl))
    }

    /// Removes `key`'s mark (or claim), so it checks as new again (e.g. the
    /// side effect was rolled back). Returns whether it had a live one.
    pub fn unmark(&self, partition: &Partition, key: &[u8]) -> Result<bool> {
        // Bad input is reported before the partition is looked at.
        self.validate_key(key)?;
        self.single(partition, |b| b.unmark(key))
    }

    /// Claims `key` for processing for `lease`, written at once so that
    /// other threads and, after a crash, a restarted process see it in
    /// flight. See [`Claim`] for the answers, and [`confirm`](Self::confirm)
    /// and [`release`](Self::release) (or their [`Batch`] forms) for what
    /// follows. A crashed processor's claim can be taken over once its lease
    /// runs out.
    pub fn claim(&self, partition: &Partition, key: &[u8], lease: Duration) -> Result<Claim> {
        // Bad input is reported before the partition is looked at.
        self.validate_key(key)?;
        self.single(partition, |b| b.claim(key, lease))
    }

    /// Turns a claim into a processed mark; see [`Batch::confirm`].
    pub fn confirm(&self, token: &ClaimToken) -> Result<()> {
        self.single(&token.partition, |b| b.confirm(token))
    }

    /// Removes a claim so the key can be processed again; see
    /// [`Batch::release`].
    pub fn release(&self, token: &ClaimToken) -> Result<()> {
        self.single(&token.partition, |b| b.release(token))
    }

    /// Runs one operation in a batch of its own and commits it.
    fn single<T>(
        &self,
        partition: &Partition,
        op: impl FnOnce(&mut Batch<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut batch = self.batch(partition)?;
        let out = op(&mut batch)?;
        batch.commit()?;
        Ok(out)
    }

    /// Opens a batch on the partition: marks and an offset, committed in one
    /// atomic write. The batch holds the partition's write lock until it is
    /// committed or dropped; see [`Batch`].
    ///
    /// Errors: [`Error::NotAssigned`]; [`Error::BatchInProgress`] if this
    /// thread already holds a batch on the partition.
    pub fn batch(&self, partition: &Partition) -> Result<Batch<'_>> {
        let shard = self.shard(partition)?;
        let writer = shard.lock_writer()?;
        let cf = self.cf(&shard)?;
        Ok(Batch::new(self, shard, cf, writer))
    }

    /// The partition's committed consumer offset: where to resume after a
    /// restart. `None` if no batch with an offset was ever committed.
    pub fn committed_offset(&self, partition: &Partition) -> Result<Option<i64>> {
        Ok(self.shard(partition)?.committed_offset())
    }

    /// Makes every write acknowledged so far survive a power cut (fsyncs the
    /// write-ahead log), and records that state in the store's durability
    /// ledger, so that a later `open` refuses files damaged below it instead
    /// of answering from an older store.
    ///
    /// A checkpoint, not a per-batch call: it costs a few fsyncs (about
    /// 650 µs against 200 µs for one log fsync on the disk of
    /// `docs/performance.md`). For power-cut safety of every batch, open the
    /// store with [`Durability::Sync`](crate::Durability::Sync) instead.
    pub fn sync(&self) -> Result<()> {
        // Read before the fsync: every write up to them is then durable.
        let sequence = self.db.latest_sequence_number();
        let watermarks: Vec<(Arc<Shard>, u64)> = match self.options.time_domain {
            TimeDomain::ProcessingTime => Vec::new(),
            TimeDomain::EventTime => self
                .shards
                .read()
                .values()
                .map(|s| (s.clone(), s.watermark()))
                .collect(),
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
    fn record_time(&self) -> Result<()> {
        let sequence = self.ledger.lock().sequence;
        self.record(sequence)
    }

    /// Runs a full compaction of the partition now, dropping its expired
    /// marks from disk. Compaction also runs on its own in the background;
    /// this is for tests and maintenance windows.
    pub fn compact(&self, partition: &Partition) -> Result<()> {
        let shard = self.shard(partition)?;
        let cf = self.cf(&shard)?;
        // Expiry is judged at the time the ledger records: record now first.
        self.record_time()?;
        self.db.flush_cf(&cf).map_err(|e| self.storage(e))?;
        self.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Counters per assigned partition.
    pub fn stats(&self) -> Stats {
        let shards: Vec<_> = self.shards.read().values().cloned().collect();
        let mut stats = Stats::default();
        for shard in shards {
            let live_keys_estimate = self
                .db
                .cf_handle(&shard.cf_name)
                .and_then(|cf| {
                    self.db
                        .property_int_value_cf(&cf, "rocksdb.estimate-num-keys")
                        .ok()
                        .flatten()
                })
                .unwrap_or(0);
            let c = &shard.counters;
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            stats.partitions.insert(
                shard.partition.clone(),
                PartitionStats {
                    live_keys_estimate,
                    checks: load(&c.checks),
                    duplicates: load(&c.duplicates),
                    bloom_negatives: load(&c.bloom_negatives),
                    bloom_false_positives: load(&c.bloom_false_positives),
                    expired_dropped: load(&shard.cf_shared.dropped),
                    filter_bytes: shard.filter.read().memory_bytes(),
                    committed_offset: shard.committed_offset(),
                    filter_from_snapshot: shard.from_snapshot,
                },
            );
        }
        stats
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the store: fsyncs the write-ahead log, so everything
    /// acknowledged survives a power cut, and releases the directory lock.
    /// Dropping a store without `close` is safe too; it only skips the fsync.
    pub fn close(self) -> Result<()> {
        for partition in self.assigned() {
            self.revoke(&partition)?;
        }
        self.sync()
    }

    /// Saves the shard's filter and claims, then records the snapshot's id in
    /// the partition; call with the write lock held, after the last write.
    /// Best effort: if it fails, the next `assign` rebuilds from disk.
    fn save_snapshot(&self, shard: &Shard) {
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
        if saved.is_ok() {
            if let Ok(cf) = self.cf(shard) {
                let mut write = WriteBatch::default();
                write.put_cf(&cf, SNAPSHOT_KEY, id.to_be_bytes());
                if self.write(write).is_ok() {
                    shard.set_snapshot_key_live(true);
                }
            }
        }
    }

    // ---- crate-internal helpers used by `Batch` ----

    pub(crate) fn now(&self) -> u64 {
        self.time.now()
    }

    pub(crate) fn ttl_millis(&self) -> u64 {
        self.ttl_millis
    }

    /// How long past its lease a claim can still be confirmed (fixed at
    /// creation; see `Manifest::claim_grace_ms`).
    pub(crate) fn claim_grace_millis(&self) -> u64 {
        self.claim_grace_ms
    }

    pub(crate) fn durability(&self) -> Durability {
        self.options.durability
    }

    pub(crate) fn key_mode(&self) -> KeyMode {
        self.options.key_mode
    }

    pub(crate) fn validate_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.options.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max: self.options.max_key_len,
            });
        }
        Ok(())
    }

    pub(crate) fn time_domain(&self) -> TimeDomain {
        self.options.time_domain
    }

    pub(crate) fn ttl_refresh(&self) -> TtlRefresh {
        self.options.ttl_refresh
    }

    pub(crate) fn lateness_millis(&self) -> u64 {
        self.options.lateness_millis()
    }

    /// "Already processed?" for a stored key: its live entry, if any. Claims
    /// are known exactly in memory; marks go through the Bloom front, and
    /// RocksDB confirms every positive (through `cf`, or the shard's column
    /// family looked up only then).
    pub(crate) fn lookup(
        &self,
        shard: &Shard,
        cf: Option<&Arc<BoundColumnFamily<'_>>>,
        k: &[u8],
        partition_now: u64,
        clock_now: u64,
    ) -> Result<Option<Entry>> {
        if let Some(claim) = shard.live_claim(k, clock_now) {
            return Ok(Some(claim));
        }
        if !shard.filter.read().may_contain(k, partition_now) {
            Counters::bump(&shard.counters.bloom_negatives);
            return Ok(None);
        }
        let stored = match cf {
            Some(cf) => self.read_entry(cf, k)?,
            None => self.read_entry(&self.cf(shard)?, k)?,
        };
        match stored {
            Some(e) if e.is_live(partition_now, clock_now) => Ok(Some(e)),
            _ => {
                Counters::bump(&shard.counters.bloom_false_positives);
                Ok(None)
            }
        }
    }

    /// The stored entry of `k`, live or not.
    pub(crate) fn read_entry(
        &self,
        cf: &Arc<BoundColumnFamily<'_>>,
        k: &[u8],
    ) -> Result<Option<Entry>> {
        match self.db.get_pinned_cf(cf, k).map_err(|e| self.storage(e))? {
            None => Ok(None),
            Some(v) => Entry::decode(&v).map(Some).ok_or_else(|| {
                Error::Corruption(format!("entry value of {} bytes is malformed", v.len()))
            }),
        }
    }

    pub(crate) fn write(&self, batch: WriteBatch) -> Result<()> {
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.storage(e))
    }

    fn shard(&self, partition: &Partition) -> Result<Arc<Shard>> {
        self.shards
            .read()
            .get(partition)
            .cloned()
            .ok_or_else(|| Error::NotAssigned(partition.clone()))
    }

    fn cf(&self, shard: &Shard) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.cf_by_name(&shard.cf_name, &shard.partition)
    }

    fn cf_by_name(&self, name: &str, partition: &Partition) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::NotAssigned(partition.clone()))
    }

    /// Builds a partition's Bloom front from its live marks on disk, and its
    /// table of claims.
    fn rebuild(
        &self,
        cf: &Arc<BoundColumnFamily<'_>>,
        partition_now: u64,
    ) -> Result<(ExpiringFilter, HashMap<Vec<u8>, Entry>)> {
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
            let entry = Entry::decode(v).ok_or_else(|| {
                Error::Corruption(format!("entry value of {} bytes is malformed", v.len()))
            })?;
            match entry {
                Entry::Done { expires_at } if entry.is_live(partition_now, clock_now) => {
                    filter.insert(k, expires_at);
                }
                Entry::Claimed { .. } => {
                    claims.insert(k.to_vec(), entry);
                }
                Entry::Done { .. } => {}
            }
            it.next();
        }
        it.status().map_err(|e| self.storage(e))?;
        Ok((filter, claims))
    }

    fn storage(&self, e: rocksdb::Error) -> Error {
        Error::storage(e, &self.path)
    }
}
