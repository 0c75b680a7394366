//! Writing a partition's logged changes to disk as sorted tables: from its
//! in-memory index (a flush, in the background or on revoke) or from the
//! journal records left on disk by a store that stopped (a settle, before a
//! partition is read). `docs/design.md`, "The write path", has the
//! invariants; in short:
//!
//! * a table is written from changes whose journal records are fsynced
//!   first, so what is ingested never outlives the records it came from;
//! * the records are deleted only after their table is ingested, so every
//!   change is in a record, in a table, or both;
//! * an ingested table sits above everything in the column family (RocksDB
//!   gives it a newer sequence number), and every change to a mark key of
//!   an assigned partition goes through a record: a table is never older
//!   than what it covers;
//! * a settle replays the remaining records in order and writes one table
//!   of their outcome, so a record ingested twice (a stop between the
//!   ingest and the delete) changes nothing.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{IngestExternalFileOptions, SstFileWriter, WriteBatch, WriteOptions};

use super::{Cf, Db};
use crate::error::{Error, Result};
use crate::journal::{self, journal_key, journal_seq};
use crate::layout::JOURNAL_PREFIX;
use crate::pending::Changes;
use crate::recovery::table_file_options;
use crate::shard::Shard;

/// Where tables are written before RocksDB takes them over.
pub(crate) const TABLE_DIR: &str = "ingest";

/// Journal records are numbered from 0, one per batch, so a partition
/// never reaches this many: a record found numbered at or above it is
/// damage. Numbering on from any number below it can neither overflow nor
/// reach it in practice.
const MAX_FOUND: u64 = 1 << 61;

/// What writing tables needs; shared with the background flusher.
pub(crate) struct Tables {
    db: Arc<Db>,
    dir: PathBuf,
    store_dir: PathBuf,
    write_options: WriteOptions,
    file_options: rocksdb::Options,
    next_file: AtomicU64,
}

impl Tables {
    /// Empties the table directory of `store_dir` (tables a stopped store
    /// had not handed over are worth nothing: their records are on disk).
    pub(crate) fn new(db: Arc<Db>, store_dir: PathBuf, sync: bool) -> Result<Self> {
        let dir = store_dir.join(TABLE_DIR);
        if dir.exists() {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        } else {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        Ok(Self {
            db,
            dir,
            store_dir,
            write_options,
            file_options: table_file_options(),
            next_file: AtomicU64::new(0),
        })
    }

    fn storage(&self, e: rocksdb::Error) -> Error {
        Error::storage(e, &self.store_dir)
    }

    /// Writes the frozen changes of `shard` (freezing its live ones first
    /// if none are frozen) as a table and deletes their records. Returns
    /// whether there was anything to write. Holds the shard's flush lock.
    ///
    /// A revoked shard has nothing to write: its revoke wrote its changes
    /// or, failing that, retired its index (`retire`), so a flush of it
    /// still queued for the background thread never lands above what the
    /// partition's next reader settled from their records.
    pub(crate) fn flush(&self, shard: &Shard) -> Result<bool> {
        let _flushing = shard.flush_lock();
        let Some(frozen) = shard.pending.write().freeze() else {
            return Ok(false);
        };
        let cf = self
            .db
            .cf_handle(&shard.cf_name)
            .ok_or_else(|| Error::NotAssigned(shard.partition.clone()))?;
        self.ingest(&cf, &frozen.changes)?;
        self.delete_records(&cf, frozen.from, frozen.to)?;
        shard.pending.write().thaw();
        Ok(true)
    }

    /// Retires a revoked shard's index, after its revoke tried to write it
    /// (`flush_all`): no flush of the shard writes anything afterwards (the
    /// background thread may still hold a request for it). If the write
    /// failed, the changes' journal records are still on disk and the
    /// partition's next reader writes them; the index keeps answering
    /// readers that still hold the old shard. Returns how many changes it
    /// holds.
    pub(crate) fn retire(&self, shard: &Shard) -> usize {
        let _flushing = shard.flush_lock();
        shard.pending.write().retire()
    }

    /// Flushes until every change `shard` held when called is in a table
    /// (the changes of its records below the next number then). Commits
    /// that land meanwhile (a `compact` holds no write lock) are left to
    /// later flushes, so this ends however busy the partition is.
    pub(crate) fn flush_all(&self, shard: &Shard) -> Result<()> {
        let target = shard.pending.read().next_seq();
        while shard.pending.read().holds_below(target) {
            if !self.flush(shard)? {
                break;
            }
        }
        Ok(())
    }

    /// Writes the changes of the journal records on disk in `cf` as one
    /// table and deletes the records. Call for a partition that has no
    /// shard (under membership). Returns the sequence number the
    /// partition's next record takes (0: none is left).
    ///
    /// Errors: [`Error::Corruption`] if a record is damaged (nothing is
    /// written then).
    pub(crate) fn settle(&self, cf: &Cf<'_>, cf_name: &str) -> Result<u64> {
        let mut changes = Changes::default();
        let mut found = Vec::new();
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek(JOURNAL_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(JOURNAL_PREFIX) {
                break;
            }
            let seq = journal_seq(k)
                .filter(|&seq| seq < MAX_FOUND)
                .ok_or_else(|| {
                    Error::Corruption(format!("malformed journal key {}", k.escape_ascii()))
                })?;
            journal::decode(seq, v, |key, entry| {
                changes.insert(key, entry);
            })?;
            found.push(seq);
            it.next();
        }
        it.status().map_err(|e| self.storage(e))?;
        if found.is_empty() {
            return Ok(0);
        }
        if !changes.is_empty() {
            self.ingest(cf, &changes)?;
        }
        // The records found, and only those: a gap in the numbers (damage)
        // must not become a delete per missing number.
        let mut write = WriteBatch::default();
        for &seq in &found {
            write.delete_cf(cf, journal_key(seq));
        }
        self.db
            .write_opt(write, &self.write_options)
            .map_err(|e| self.storage(e))?;
        tracing::info!(
            column_family = cf_name,
            records = found.len(),
            changes = changes.len(),
            "journal records left by a stop written to a table"
        );
        // Numbering starts again from 0: every record found is deleted, and
        // the deletes come before any new record in the log, so no stop can
        // leave an old record beside a new one of the same number.
        Ok(0)
    }

    /// Writes `changes` as a sorted table and ingests it into `cf`, above
    /// everything there. The write-ahead log is fsynced first: the records
    /// of these changes are durable before the table is.
    fn ingest(&self, cf: &Cf<'_>, changes: &Changes) -> Result<()> {
        // Sorted by the first eight bytes after the tag as a number first:
        // marks are random keys, so that almost always decides, and the
        // sort does one integer comparison where a byte comparison would
        // call memcmp (a quarter of the flush's time in a profile).
        let prefix = |k: &[u8]| -> u64 {
            let mut word = [0u8; 8];
            for (w, b) in word.iter_mut().zip(k.iter().skip(1)) {
                *w = *b;
            }
            u64::from_be_bytes(word)
        };
        // The entries and the keys' places are copied out in the map's
        // order: reading them through references in key order missed the
        // cache twice a key (95 % of the flusher's own time in a profile).
        let mut keys: Vec<(u64, &[u8], Option<crate::layout::Entry>)> =
            changes.iter().map(|(k, e)| (prefix(k), k, e)).collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n:06}.sst"));
        let result = self.write_and_ingest(cf, &keys, &path);
        // Moved into RocksDB on success (it removes our name); written in
        // part on failure.
        let _ = fs::remove_file(&path);
        result
    }

    fn write_and_ingest(
        &self,
        cf: &Cf<'_>,
        keys: &[(u64, &[u8], Option<crate::layout::Entry>)],
        path: &std::path::Path,
    ) -> Result<()> {
        let mut writer = SstFileWriter::create(&self.file_options);
        writer.open(path).map_err(|e| self.storage(e))?;
        let mut value = Vec::with_capacity(25);
        for (_, k, e) in keys {
            match e {
                Some(e) => {
                    value.clear();
                    e.encode_into(&mut value);
                    writer.put(k, &value)
                }
                None => writer.delete(k),
            }
            .map_err(|e| self.storage(e))?;
        }
        writer.finish().map_err(|e| self.storage(e))?;
        self.db.flush_wal(true).map_err(|e| self.storage(e))?;
        let mut options = IngestExternalFileOptions::default();
        options.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(cf, &options, vec![path])
            .map_err(|e| self.storage(e))
    }

    /// Deletes journal records `[from, to)` of `cf`, one point delete each
    /// (a batch's record per batch, so few): RocksDB's key estimate counts
    /// a point delete against its put, and a range delete against nothing.
    fn delete_records(&self, cf: &Cf<'_>, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let mut write = WriteBatch::default();
        for seq in from..to {
            write.delete_cf(cf, journal_key(seq));
        }
        self.db
            .write_opt(write, &self.write_options)
            .map_err(|e| self.storage(e))
    }
}
