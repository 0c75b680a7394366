//! The engine: the bottom of the data path, under [`crate::Store`] and
//! [`crate::Batch`], which both use it and which it never uses.
//!
//! It owns the RocksDB handle and everything that goes with it: the column
//! families and their compaction filters' shared state, the options, the
//! store's time, the durability ledger and the write options. It reads a
//! partition's state from disk (to open a shard), looks keys up, writes, and
//! saves and drops what belongs to a partition. It knows nothing of which
//! partitions are assigned: that is the store's.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rocksdb::{
    BoundColumnFamily, ColumnFamilyDescriptor, DBWithThreadMode, MultiThreaded, WriteBatch,
    WriteOptions,
};
use tracing::{info, info_span, warn};

use crate::clock::TimeKeeper;
use crate::config::{Durability, KeyMode, Options, TimeDomain, TtlRefresh};
use crate::error::{Error, Result};
use crate::layout::{decode_entry, decode_offset, decode_u64, mark_key, Entry, WATERMARK_KEY};
use crate::ledger::Ledger;
use crate::recovery::{
    check_after_open, check_before_open, db_options, has_rocksdb_data, partition_cf_options,
    prepare_dir, Prepared,
};
use crate::shard::{Counters, Shard};
use crate::ttl::CfShared;
use crate::Partition;
use flusher::Flusher;
use tables::Tables;

mod durability;
mod flusher;
mod partition;
mod tables;

pub(crate) type Db = DBWithThreadMode<MultiThreaded>;

/// A column family handle, borrowed from the engine.
pub(crate) type Cf<'e> = Arc<BoundColumnFamily<'e>>;

/// A user key that passed validation (not empty, not too long): the one
/// check every call makes, once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ValidKey<'k>(&'k [u8]);

/// The store's RocksDB and what goes with it; see the module documentation.
pub(crate) struct Engine {
    db: Arc<Db>,
    /// Writes partitions' changes as tables; holds `db` too.
    tables: Arc<Tables>,
    /// The background thread that runs `tables`' flushes; stopped first
    /// when the engine drops, so that `db` closes here.
    flusher: Flusher,
    /// The directory lock; declared after `db` and `tables` so it is
    /// released after RocksDB has closed.
    _lock: fs::File,
    /// What was last recorded as durable; see [`crate::ledger`].
    ledger: Mutex<Ledger>,
    path: PathBuf,
    options: Options,
    ttl_millis: u64,
    /// See [`Engine::claim_grace_millis`].
    claim_grace_ms: u64,
    time: Arc<TimeKeeper>,
    write_options: WriteOptions,
    /// State shared with each partition column family's compaction filter.
    cf_shared: Mutex<HashMap<String, Arc<CfShared>>>,
    /// The torn tail the open cut from the newest write-ahead log, if any.
    cut: Option<crate::wal::CutTail>,
}

impl Engine {
    /// Opens (or creates) the store's files in `path`; see
    /// [`crate::Store::open`] for the errors.
    pub(crate) fn open(path: &Path, options: Options) -> Result<Self> {
        options.validate()?;
        let started = Instant::now();
        // Every event of the open (the checks, the repairs) carries the path.
        let span = info_span!("open", path = %path.display());
        let _entered = span.enter();
        let path = path.to_path_buf();
        let Prepared { manifest, lock } = prepare_dir(&path, &options)?;
        let claim_grace_ms = manifest.claim_grace_ms.unwrap_or(options.ttl_millis());
        let (ledger, cut) = check_before_open(&path, &manifest)?;
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
            let cf_options = partition_cf_options(
                time.clone(),
                &options,
                claim_grace_ms,
                shared.clone(),
                &name,
            );
            cf_shared.insert(name.clone(), shared);
            descriptors.push(ColumnFamilyDescriptor::new(name, cf_options));
        }
        let db = Arc::new(
            Db::open_cf_descriptors(&db_options, &path, descriptors)
                .map_err(|e| Error::storage(e, &path))?,
        );
        let ledger = check_after_open(
            &path,
            &manifest,
            ledger,
            cut.as_ref(),
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
        let tables = Arc::new(Tables::new(
            db.clone(),
            path.clone(),
            options.durability == Durability::Sync,
        )?);
        let flusher = Flusher::start(tables.clone()).map_err(|e| Error::io(&path, e))?;
        info!(
            created = !has_current,
            partitions = cf_shared.len(),
            // Above `durable_sequence`: writes recovery replayed from logs
            // not yet recorded as synced (a stop without `close`, or writes
            // since the last `sync`).
            sequence = db.latest_sequence_number(),
            durable_sequence = ledger.sequence,
            torn_tail_cut = cut.is_some(),
            elapsed_ms = started.elapsed().as_millis(),
            "store opened"
        );
        Ok(Self {
            db,
            tables,
            flusher,
            _lock: lock,
            ledger: Mutex::new(ledger),
            path,
            ttl_millis: options.ttl_millis(),
            claim_grace_ms,
            options,
            time,
            write_options,
            cf_shared: Mutex::new(cf_shared),
            cut,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the partitions' column families.
    pub(crate) fn cf_names(&self) -> Vec<String> {
        self.cf_shared.lock().keys().cloned().collect()
    }

    /// The RocksDB handle, for the inspection and transfer tools
    /// (`src/inspect.rs`), which read and write partitions that are not
    /// assigned.
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    // ---- time and options ----

    /// The store's time (ms); never goes backwards.
    pub(crate) fn now(&self) -> u64 {
        self.time.now()
    }

    pub(crate) fn ttl_millis(&self) -> u64 {
        self.ttl_millis
    }

    /// How long past its lease a claim can still be confirmed: the TTL of
    /// the store's creation (`Manifest::claim_grace_ms`), whatever `ttl` this
    /// open has, because the compaction filter keeps claims that long.
    pub(crate) fn claim_grace_millis(&self) -> u64 {
        self.claim_grace_ms
    }

    pub(crate) fn durability(&self) -> Durability {
        self.options.durability
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

    /// Checks a user key against the options.
    pub(crate) fn validate_key<'k>(&self, key: &'k [u8]) -> Result<ValidKey<'k>> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.options.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max: self.options.max_key_len,
            });
        }
        Ok(ValidKey(key))
    }

    /// The stored form of a valid key.
    pub(crate) fn stored_key(&self, key: ValidKey<'_>) -> Vec<u8> {
        mark_key(self.key_mode(), key.0)
    }

    fn key_mode(&self) -> KeyMode {
        self.options.key_mode
    }

    // ---- column families, reads and writes ----

    pub(crate) fn cf(&self, shard: &Shard) -> Result<Cf<'_>> {
        self.cf_by_name(&shard.cf_name, &shard.partition)
    }

    fn cf_by_name(&self, name: &str, partition: &Partition) -> Result<Cf<'_>> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::NotAssigned(partition.clone()))
    }

    /// "Already processed?" for a stored key: its live entry, if any. Claims
    /// are known exactly in memory; marks go through the Bloom front, and
    /// RocksDB confirms every positive (through `cf`, or the shard's column
    /// family looked up only then).
    pub(crate) fn lookup(
        &self,
        shard: &Shard,
        cf: Option<&Cf<'_>>,
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
        let pending = shard.pending.read().get(k);
        let stored = match (pending, cf) {
            (Some(changed), _) => changed,
            (None, Some(cf)) => self.read_entry(cf, k)?,
            (None, None) => self.read_entry(&self.cf(shard)?, k)?,
        };
        match stored {
            Some(e) if e.is_live(partition_now, clock_now) => Ok(Some(e)),
            _ => {
                Counters::bump(&shard.counters.bloom_false_positives);
                Ok(None)
            }
        }
    }

    /// The torn tail this open cut from the newest write-ahead log, if any
    /// (see [`crate::wal::cut_torn_tail`]).
    pub(crate) fn cut_at_open(&self) -> Option<&crate::wal::CutTail> {
        self.cut.as_ref()
    }

    /// An offset stored under metadata key `key` of the partition.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn read_offset_key(&self, cf: &Cf<'_>, key: &[u8]) -> Result<Option<i64>> {
        self.db
            .get_pinned_cf(cf, key)
            .map_err(|e| self.storage(e))?
            .map(|v| decode_offset(&v))
            .transpose()
    }

    /// The entry of `k` in an assigned partition, live or not: its newest
    /// change in memory, else what `cf` holds.
    pub(crate) fn read_mark(&self, shard: &Shard, cf: &Cf<'_>, k: &[u8]) -> Result<Option<Entry>> {
        // The index's lock is let go before the disk read.
        let changed = shard.pending.read().get(k);
        match changed {
            Some(changed) => Ok(changed),
            None => self.read_entry(cf, k),
        }
    }

    // ---- tables ----

    /// Before a commit of `shard` (write lock held): if the flusher is a
    /// whole table behind, writes the table here, so memory stays bounded
    /// by about two tables' worth of changes (and a batch's). Nothing of the commit is written
    /// yet, so an error leaves it unapplied.
    pub(crate) fn before_commit(&self, shard: &Shard) -> Result<()> {
        // Behind: a table's worth waits while one is written, or two wait
        // while the thread serves other partitions.
        let behind = {
            let pending = shard.pending.read();
            let live = pending.live_bytes();
            live >= self.options.table_bytes.saturating_mul(2)
                || (pending.is_frozen() && live >= self.options.table_bytes)
        };
        if behind {
            // Waits for the flush under way, then writes the live changes.
            while self.tables.flush(shard)? {
                if shard.pending.read().live_bytes() < self.options.table_bytes {
                    break;
                }
            }
        }
        Ok(())
    }

    /// After a commit of `shard` added its changes: asks the flusher to
    /// write them as a table once they reach `table_bytes`.
    pub(crate) fn after_commit(&self, shard: &Arc<Shard>) {
        if shard.pending.read().live_bytes() >= self.options.table_bytes {
            self.flusher.request(shard);
        }
    }

    /// Waits until the background flusher is idle.
    pub(crate) fn wait_tables(&self) {
        self.flusher.wait_idle();
    }

    /// Writes every change `shard` holds in memory as tables (revoke,
    /// compact).
    pub(crate) fn flush_all(&self, shard: &Shard) -> Result<()> {
        self.tables.flush_all(shard)
    }

    /// Retires a revoked shard's index (see `Tables::retire`).
    pub(crate) fn retire(&self, shard: &Shard) -> usize {
        self.tables.retire(shard)
    }

    /// Writes the journal records left on disk in the column family of a
    /// partition that has no shard as a table (call under membership).
    /// Returns the sequence number of the partition's next record.
    pub(crate) fn settle(&self, partition: &Partition) -> Result<u64> {
        let name = partition.cf_name();
        match self.db.cf_handle(&name) {
            Some(cf) => self.tables.settle(&cf, &name),
            None => Ok(0),
        }
    }

    /// The stored entry of `k`, live or not.
    pub(crate) fn read_entry(&self, cf: &Cf<'_>, k: &[u8]) -> Result<Option<Entry>> {
        match self.db.get_pinned_cf(cf, k).map_err(|e| self.storage(e))? {
            None => Ok(None),
            Some(v) => decode_entry(&v).map(Some),
        }
    }

    /// Writes `batch` atomically, as durable as the options promise.
    pub(crate) fn write(&self, batch: WriteBatch) -> Result<()> {
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.storage(e))
    }

    fn storage(&self, e: rocksdb::Error) -> Error {
        Error::storage(e, &self.path)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The flusher holds the database too: it ends first, so that
        // RocksDB closes when the engine's fields drop, before the directory
        // lock is released.
        self.flusher.stop();
    }
}

/// [`Error::Fenced`] if `attempted` is older than the partition's `current`
/// epoch: epochs never go backwards.
pub(crate) fn refuse_older_epoch(
    partition: &Partition,
    current: u64,
    attempted: u64,
) -> Result<()> {
    if attempted < current {
        warn!(
            partition = %partition,
            current,
            attempted,
            "fenced: an epoch older than the partition's was refused"
        );
        return Err(Error::Fenced {
            partition: partition.clone(),
            current,
            attempted,
        });
    }
    Ok(())
}
