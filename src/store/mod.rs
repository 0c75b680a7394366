//! The store: the engine and the shards of the assigned partitions; the
//! single-key operations run through a batch of their own. Assignment
//! (assign, revoke, delete, and the tools' access to unassigned
//! partitions) is `assignment.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tracing::info;

use crate::batch::{mark_ttl_millis, Batch};
use crate::claim::{Claim, ClaimToken};
use crate::config::Options;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::membership::Membership;
use crate::outbox::OutboxEntry;
use crate::shard::{Counters, Shard};
use crate::stats::Stats;
use crate::verdict::Verdict;
use crate::Partition;

mod assignment;

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
    engine: Engine,
    shards: RwLock<HashMap<Partition, Arc<Shard>>>,
    /// Serialises assign, revoke and delete; see [`crate::membership`].
    membership: Membership,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.engine.path())
            .field("options", self.engine.options())
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
        Ok(Self {
            engine: Engine::open(path.as_ref(), options)?,
            shards: RwLock::new(HashMap::new()),
            membership: Membership::default(),
        })
    }

    /// Whether `key` has a live mark (or a live claim), without marking it.
    pub fn check(&self, partition: &Partition, key: &[u8]) -> Result<Verdict> {
        let key = self.engine.validate_key(key)?;
        let shard = self.shard(partition)?;
        let k = self.engine.stored_key(key);
        Counters::bump(&shard.counters.checks);
        let clock_now = self.engine.now();
        let partition_now = shard.partition_now(self.engine.time_domain(), clock_now);
        match self
            .engine
            .lookup(&shard, None, &k, partition_now, clock_now)?
        {
            Some(_) => {
                Counters::bump(&shard.counters.duplicates);
                Ok(Verdict::Duplicate)
            }
            None => Ok(Verdict::New),
        }
    }

    /// Checks `key` and marks it if it is new, atomically: of several callers
    /// racing on one key, exactly one gets [`Verdict::New`]. A key with a live
    /// mark keeps its original expiry (unless [`TtlRefresh::OnDuplicate`](crate::TtlRefresh::OnDuplicate));
    /// a key with a live claim is a duplicate.
    pub fn check_and_mark(&self, partition: &Partition, key: &[u8]) -> Result<Verdict> {
        // Bad input is reported before the partition is looked at.
        let key = self.engine.validate_key(key)?;
        self.single(partition, |b| b.check_and_mark_valid(key, None, None))
    }

    /// Marks `key` as processed; see [`check_and_mark`](Self::check_and_mark).
    /// A key that already has a live mark keeps it (and its expiry); a key
    /// with a live claim is left to the claim's holder, whose
    /// [`confirm`](Self::confirm) or [`release`](Self::release) decides.
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
        let key = self.engine.validate_key(key)?;
        self.single(partition, |b| {
            b.check_and_mark_valid(key, Some(event_time), None)
        })
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
        let key = self.engine.validate_key(key)?;
        let ttl_ms = mark_ttl_millis(ttl)?;
        self.single(partition, |b| {
            b.check_and_mark_valid(key, None, Some(ttl_ms)).map(|_| ())
        })
    }

    /// Removes `key`'s mark (or claim), so it checks as new again (e.g. the
    /// side effect was rolled back). Returns whether it had a live one.
    pub fn unmark(&self, partition: &Partition, key: &[u8]) -> Result<bool> {
        // Bad input is reported before the partition is looked at.
        let key = self.engine.validate_key(key)?;
        self.single(partition, |b| b.unmark_valid(key))
    }

    /// Whether sequence number `seq` of `source` under `epoch` was marked
    /// (sequence mode: one state per source instead of one mark per
    /// message); marks nothing. Answered from memory, never from disk. See
    /// [`Batch::check_sequence`] for the rules and errors.
    ///
    /// ```
    /// use exactly::{Error, Options, Partition, Store, Verdict};
    ///
    /// # fn main() -> exactly::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::open(dir.path(), Options::default().sequence_window(64))?;
    /// let p = Partition::new("orders", 0);
    /// store.assign(&p)?;
    /// // Producer "relay-1", epoch 1, numbers its messages.
    /// assert_eq!(store.check_and_mark_sequence(&p, b"relay-1", 1, 10)?, Verdict::New);
    /// assert_eq!(store.check_and_mark_sequence(&p, b"relay-1", 1, 12)?, Verdict::New);
    /// // A retry of 10, and 11 arriving late: answered exactly.
    /// assert_eq!(store.check_sequence(&p, b"relay-1", 1, 10)?, Verdict::Duplicate);
    /// assert_eq!(store.check_and_mark_sequence(&p, b"relay-1", 1, 11)?, Verdict::New);
    /// // The producer restarted with epoch 2: its numbers start afresh, and
    /// // epoch 1 is fenced.
    /// assert_eq!(store.check_and_mark_sequence(&p, b"relay-1", 2, 0)?, Verdict::New);
    /// assert!(matches!(
    ///     store.check_sequence(&p, b"relay-1", 1, 13),
    ///     Err(Error::SourceFenced { current: 2, .. })
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn check_sequence(
        &self,
        partition: &Partition,
        source: &[u8],
        epoch: u64,
        seq: u64,
    ) -> Result<Verdict> {
        // Bad input is reported before the partition is looked at.
        self.engine.validate_key(source)?;
        let shard = self.shard(partition)?;
        Counters::bump(&shard.counters.checks);
        let now = shard.partition_now(self.engine.time_domain(), self.engine.now());
        let verdict = shard
            .seen_source(source, epoch, seq, now)
            .verdict(partition, source, epoch)?;
        if verdict == Verdict::Duplicate {
            Counters::bump(&shard.counters.duplicates);
        }
        Ok(verdict)
    }

    /// Checks sequence number `seq` of `source` under `epoch` and marks it
    /// if it is new, atomically: of several callers racing on one number,
    /// exactly one gets [`Verdict::New`]. See [`Batch::check_sequence`].
    pub fn check_and_mark_sequence(
        &self,
        partition: &Partition,
        source: &[u8],
        epoch: u64,
        seq: u64,
    ) -> Result<Verdict> {
        self.engine.validate_key(source)?;
        self.single(partition, |b| b.check_and_mark_sequence(source, epoch, seq))
    }

    /// Marks sequence number `seq` of `source` under `epoch`; see
    /// [`check_and_mark_sequence`](Self::check_and_mark_sequence).
    pub fn mark_sequence(
        &self,
        partition: &Partition,
        source: &[u8],
        epoch: u64,
        seq: u64,
    ) -> Result<()> {
        self.check_and_mark_sequence(partition, source, epoch, seq)
            .map(|_| ())
    }

    /// Claims `key` for processing for `lease`, written at once so that
    /// other threads and, after a crash, a restarted process see it in
    /// flight. See [`Claim`] for the answers, and [`confirm`](Self::confirm)
    /// and [`release`](Self::release) (or their [`Batch`] forms) for what
    /// follows. A crashed processor's claim can be taken over once its lease
    /// runs out.
    pub fn claim(&self, partition: &Partition, key: &[u8], lease: Duration) -> Result<Claim> {
        // Bad input is reported before the partition is looked at.
        let key = self.engine.validate_key(key)?;
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
        let cf = self.engine.cf(&shard)?;
        Ok(Batch::new(&self.engine, shard, cf, writer))
    }

    /// The partition's committed consumer offset: where to resume after a
    /// restart. `None` if no batch with an offset was ever committed.
    pub fn committed_offset(&self, partition: &Partition) -> Result<Option<i64>> {
        Ok(self.shard(partition)?.committed_offset())
    }

    /// The partition's changelog position (Kafka changelog mode): every
    /// record of its changelog below this offset is reflected in the store.
    /// `None` if no changelog was ever used for it.
    pub fn changelog_offset(&self, partition: &Partition) -> Result<Option<i64>> {
        Ok(self.shard(partition)?.changelog_next())
    }

    /// The highest changelog progress record the partition's restores read
    /// (see `CHANGELOG_PROGRESS_KEY`).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn changelog_progress(&self, partition: &Partition) -> Result<Option<i64>> {
        let shard = self.shard(partition)?;
        let cf = self.engine.cf(&shard)?;
        self.engine
            .read_offset_key(&cf, crate::layout::CHANGELOG_PROGRESS_KEY)
    }

    /// The partition's outbox entries not yet published, in order.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn outbox(&self, partition: &Partition) -> Result<Vec<(u64, OutboxEntry)>> {
        let shard = self.shard(partition)?;
        let cf = self.engine.cf(&shard)?;
        self.engine.outbox(&cf)
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
        let shards: Vec<Arc<Shard>> = self.shards.read().values().cloned().collect();
        self.engine.sync(&shards)
    }

    /// Runs a full compaction of the partition now, dropping its expired
    /// marks from disk. Compaction also runs on its own in the background;
    /// this is for tests and maintenance windows. It first writes the
    /// partition's changes held in memory as a table, and fsyncs the
    /// write-ahead log: everything acknowledged before it survives a power
    /// cut.
    pub fn compact(&self, partition: &Partition) -> Result<()> {
        let shard = self.shard(partition)?;
        self.engine.compact(&shard)
    }

    /// Counters per assigned partition.
    pub fn stats(&self) -> Stats {
        let shards: Vec<_> = self.shards.read().values().cloned().collect();
        let mut stats = Stats::default();
        for shard in shards {
            let estimate = self.engine.keys_estimate(&shard);
            let now = shard.partition_now(self.engine.time_domain(), self.engine.now());
            stats
                .partitions
                .insert(shard.partition.clone(), shard.stats(estimate, now));
        }
        stats
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        self.engine.path()
    }

    /// Closes the store: fsyncs the write-ahead log, so everything
    /// acknowledged survives a power cut, and releases the directory lock.
    /// Dropping a store without `close` is safe too; it only skips the fsync.
    pub fn close(self) -> Result<()> {
        let partitions = self.assigned();
        for partition in &partitions {
            self.revoke(partition)?;
        }
        self.sync()?;
        info!(path = %self.path().display(), partitions = partitions.len(), "store closed");
        Ok(())
    }

    /// The engine, for read-only inspection of any partition.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    fn shard(&self, partition: &Partition) -> Result<Arc<Shard>> {
        self.shards
            .read()
            .get(partition)
            .cloned()
            .ok_or_else(|| Error::NotAssigned(partition.clone()))
    }
}
