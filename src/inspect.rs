//! Looking inside a store without assigning its partitions: what the
//! `exactly` command-line tool shows (`exactly stats`, `check`, `inspect`,
//! `compact`). Not part of the stable API (re-exported from
//! [`crate::internals`]).
//!
//! Everything here reads a partition's column family directly, through
//! [`Store::unassigned`], so it never loads a filter, never rewrites a
//! filter snapshot sized with other options than the consumer's, and never
//! moves an epoch. Metadata keys (`0x00 …`) this build does not know are
//! skipped, as are keys of tags other than marks: a newer build may add
//! both.

use std::path::Path;

use crate::config::{KeyMode, Options, TimeDomain};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::layout::{
    decode_entry, decode_offset, decode_u64, mark_key, Entry, CHANGELOG_KEY,
    CHANGELOG_PROGRESS_KEY, EPOCH_KEY, EVENT_TIME_KEY, MARK_TAG, OFFSET_KEY, SNAPSHOT_KEY,
    WATERMARK_KEY,
};
use crate::ledger::Ledger;
use crate::manifest::Manifest;
use crate::sequence::SourceState;
use crate::ttl::partition_time;
use crate::{Partition, Store};

/// What a store's manifest and ledger say, read without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// The on-disk format version.
    pub format_version: u32,
    /// How keys are stored (fixed at creation).
    pub key_mode: KeyMode,
    /// What expiries mean (fixed at creation).
    pub time_domain: TimeDomain,
    /// How long past its lease a claim can still be confirmed (fixed at
    /// creation; absent in stores no build since has opened).
    pub claim_grace_ms: Option<u64>,
    /// The durability ledger, if the store has one.
    pub ledger: Option<LedgerState>,
}

/// What the durability ledger recorded as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerState {
    /// RocksDB's sequence number at the last `sync()` or `close()`.
    pub sequence: u64,
    /// The store's time then (ms since the Unix epoch).
    pub clock: u64,
    /// The number of the `MANIFEST` file it names.
    pub manifest: u64,
}

/// Reads the manifest and ledger of the store in `dir` without opening it
/// (and without its lock).
///
/// Errors: [`Error::NotAStore`] if `dir` has no manifest, so a tool never
/// creates a store by mistake; [`Error::Corruption`] or
/// [`Error::UnsupportedFormat`] for a damaged or newer manifest or ledger.
pub fn store_info(dir: &Path) -> Result<StoreInfo> {
    let manifest = Manifest::read(dir)?.ok_or_else(|| Error::NotAStore {
        path: dir.to_path_buf(),
    })?;
    let ledger = Ledger::read(dir)?.map(|l| LedgerState {
        sequence: l.sequence,
        clock: l.clock,
        manifest: l.manifest,
    });
    Ok(StoreInfo {
        format_version: manifest.format_version,
        key_mode: manifest.key_mode,
        time_domain: manifest.time_domain,
        claim_grace_ms: manifest.claim_grace_ms,
        ledger,
    })
}

/// Opens the existing store in `dir` with `options`, taking the options
/// fixed at creation (key mode, time domain) from its manifest. Never
/// creates a store: a directory without a manifest is [`Error::NotAStore`].
pub fn open_existing(dir: &Path, options: Options) -> Result<(Store, StoreInfo)> {
    let info = store_info(dir)?;
    let options = options
        .key_mode(info.key_mode)
        .time_domain(info.time_domain);
    Ok((Store::open(dir, options)?, info))
}

/// A key's entry, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Processed; a duplicate while the partition's time is below
    /// `expires_at` (ms).
    Done {
        /// When the mark expires.
        expires_at: u64,
    },
    /// Claimed by a processor, in flight until `lease_until` (ms).
    Claimed {
        /// When the lease runs out.
        lease_until: u64,
        /// The epoch the claim was made under.
        epoch: u64,
        /// The claim's token number.
        token: u64,
    },
}

impl From<Entry> for EntryState {
    fn from(e: Entry) -> Self {
        match e {
            Entry::Done { expires_at } => Self::Done { expires_at },
            Entry::Claimed {
                lease_until,
                epoch,
                token,
            } => Self::Claimed {
                lease_until,
                epoch,
                token,
            },
        }
    }
}

impl From<EntryState> for Entry {
    fn from(e: EntryState) -> Self {
        match e {
            EntryState::Done { expires_at } => Self::Done { expires_at },
            EntryState::Claimed {
                lease_until,
                epoch,
                token,
            } => Self::Claimed {
                lease_until,
                epoch,
                token,
            },
        }
    }
}

/// One stored key and its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The key as stored, without its tag: the user key (raw stores) or its
    /// 16-byte XXH3-128 (hashed stores).
    pub key: Vec<u8>,
    /// Its entry.
    pub state: EntryState,
}

/// A partition's metadata, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMeta {
    /// The partition.
    pub partition: Partition,
    /// The committed consumer offset.
    pub offset: Option<i64>,
    /// The epoch (0 if never assigned with one).
    pub epoch: u64,
    /// The highest committed event time (event-time stores).
    pub event_time: Option<u64>,
    /// The stored watermark (event-time stores).
    pub watermark: Option<u64>,
    /// The id of the partition's valid filter snapshot, if any.
    pub snapshot_id: Option<u64>,
    /// The changelog position (Kafka changelog mode), if any.
    pub changelog: Option<i64>,
    /// The highest changelog progress its restores read, if any.
    pub changelog_progress: Option<i64>,
    /// Outbox entries not yet published (each decoded).
    pub outbox_entries: usize,
    /// RocksDB's estimate of the keys in the partition (expired ones too).
    pub keys_estimate: u64,
    /// Bytes on disk (table files) and in memory tables.
    pub disk_bytes: u64,
}

/// The answer for one stored key at the store's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No live mark or claim.
    New,
    /// A live mark, until `expires_at`.
    Duplicate {
        /// When the mark expires.
        expires_at: u64,
    },
    /// A live claim, until `lease_until`.
    InFlight {
        /// When the lease runs out.
        lease_until: u64,
        /// The epoch the holder claimed it under.
        epoch: u64,
    },
}

/// The partitions that have data in the store, assigned or not, in order.
pub fn partitions(store: &Store) -> Vec<Partition> {
    let mut v: Vec<Partition> = store
        .engine()
        .cf_names()
        .iter()
        .filter_map(|name| Partition::from_cf_name(name))
        .collect();
    v.sort();
    v
}

/// The store's time now (ms since the Unix epoch): never below the time
/// the ledger recorded.
pub fn now(store: &Store) -> u64 {
    store.engine().now()
}

/// The stored form of a user key (without its tag), after the same checks
/// as every store call.
pub fn stored_key(store: &Store, key: &[u8]) -> Result<Vec<u8>> {
    let engine = store.engine();
    let valid = engine.validate_key(key)?;
    let mut k = engine.stored_key(valid);
    k.remove(0);
    Ok(k)
}

/// The stored form of `key` in a store of `mode` (without its tag).
pub(crate) fn stored_form(mode: KeyMode, key: &[u8]) -> Vec<u8> {
    let mut k = mark_key(mode, key);
    k.remove(0);
    k
}

fn read_u64(
    engine: &Engine,
    cf: &crate::engine::Cf<'_>,
    key: &[u8],
    what: &str,
) -> Result<Option<u64>> {
    engine
        .db()
        .get_pinned_cf(cf, key)
        .map_err(|e| Error::storage(e, engine.path()))?
        .map(|v| decode_u64(&v, what))
        .transpose()
}

/// The metadata of an unassigned partition; `None` if it has no data.
///
/// Errors: [`Error::Assigned`]; [`Error::Corruption`] for a value that does
/// not decode.
pub fn partition_meta(store: &Store, partition: &Partition) -> Result<Option<PartitionMeta>> {
    let (engine, _membership) = store.unassigned(partition)?;
    let name = partition.cf_name();
    let Some(cf) = engine.db().cf_handle(&name) else {
        return Ok(None);
    };
    let db = engine.db();
    let offset = db
        .get_pinned_cf(&cf, OFFSET_KEY)
        .map_err(|e| Error::storage(e, engine.path()))?
        .map(|v| decode_offset(&v))
        .transpose()?;
    let changelog = engine.read_offset_key(&cf, CHANGELOG_KEY)?;
    let changelog_progress = engine.read_offset_key(&cf, CHANGELOG_PROGRESS_KEY)?;
    let outbox_entries = engine.outbox(&cf)?.len();
    let property = |name: &str| {
        db.property_int_value_cf(&cf, name)
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    Ok(Some(PartitionMeta {
        partition: partition.clone(),
        offset,
        epoch: read_u64(engine, &cf, EPOCH_KEY, "epoch")?.unwrap_or(0),
        event_time: read_u64(engine, &cf, EVENT_TIME_KEY, "event time")?,
        watermark: read_u64(engine, &cf, WATERMARK_KEY, "watermark")?,
        snapshot_id: read_u64(engine, &cf, SNAPSHOT_KEY, "filter snapshot id")?,
        changelog,
        changelog_progress,
        outbox_entries,
        keys_estimate: property("rocksdb.estimate-num-keys"),
        disk_bytes: property("rocksdb.total-sst-files-size")
            .saturating_add(property("rocksdb.cur-size-all-mem-tables")),
    }))
}

/// "Now" for a partition's marks: the store's time, or under event time
/// its watermark as an `assign` with this store's options would start from.
pub fn partition_now(store: &Store, meta: &PartitionMeta) -> u64 {
    let engine = store.engine();
    let watermark = meta
        .event_time
        .unwrap_or(0)
        .saturating_sub(engine.lateness_millis())
        .max(meta.watermark.unwrap_or(0));
    partition_time(engine.time_domain(), engine.now(), watermark)
}

/// The live sequence sources of an unassigned partition (sequence mode),
/// by source, at partition time `partition_now`.
pub(crate) fn sources(
    store: &Store,
    partition: &Partition,
    partition_now: u64,
) -> Result<Vec<(Vec<u8>, SourceState)>> {
    let (engine, _membership) = store.unassigned(partition)?;
    let Some(cf) = engine.db().cf_handle(&partition.cf_name()) else {
        return Ok(Vec::new());
    };
    let mut sources: Vec<(Vec<u8>, SourceState)> =
        engine.sources(&cf, partition_now)?.into_iter().collect();
    sources.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(sources)
}

/// Calls `f` with every stored entry of an unassigned partition, in key
/// order, until it returns `false`. Returns how many entries it was given.
///
/// Errors: [`Error::Assigned`]; [`Error::Corruption`] naming the key of a
/// value that does not decode.
pub fn for_each_entry(
    store: &Store,
    partition: &Partition,
    mut f: impl FnMut(StoredEntry) -> Result<bool>,
) -> Result<u64> {
    let (engine, _membership) = store.unassigned(partition)?;
    let Some(cf) = engine.db().cf_handle(&partition.cf_name()) else {
        return Ok(0);
    };
    let mut it = engine.db().raw_iterator_cf(&cf);
    it.seek([MARK_TAG]);
    let mut seen = 0;
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let Some((&MARK_TAG, key)) = k.split_first() else {
            // Keys of tags this build does not know (sorted after marks).
            break;
        };
        let entry = decode_entry(v).map_err(|e| match e {
            Error::Corruption(m) => {
                Error::Corruption(format!("{partition}, key {}: {m}", key.escape_ascii()))
            }
            other => other,
        })?;
        seen += 1;
        let go_on = f(StoredEntry {
            key: key.to_vec(),
            state: entry.into(),
        })?;
        if !go_on {
            return Ok(seen);
        }
        it.next();
    }
    it.status().map_err(|e| Error::storage(e, engine.path()))?;
    Ok(seen)
}

/// The stored entry of `stored` (a key as [`stored_key`] gives it) in an
/// unassigned partition, live or not.
pub fn read_stored(
    store: &Store,
    partition: &Partition,
    stored: &[u8],
) -> Result<Option<EntryState>> {
    let (engine, _membership) = store.unassigned(partition)?;
    let Some(cf) = engine.db().cf_handle(&partition.cf_name()) else {
        return Ok(None);
    };
    let mut k = Vec::with_capacity(1 + stored.len());
    k.push(MARK_TAG);
    k.extend_from_slice(stored);
    Ok(engine.read_entry(&cf, &k)?.map(Into::into))
}

/// What the store answers for `state` at partition time `partition_now`
/// and store time `clock_now`: the same rule as every lookup.
pub fn judge(state: Option<EntryState>, partition_now: u64, clock_now: u64) -> Lookup {
    match state.map(Entry::from) {
        Some(e @ Entry::Done { expires_at }) if e.is_live(partition_now, clock_now) => {
            Lookup::Duplicate { expires_at }
        }
        Some(
            e @ Entry::Claimed {
                lease_until, epoch, ..
            },
        ) if e.is_live(partition_now, clock_now) => Lookup::InFlight { lease_until, epoch },
        _ => Lookup::New,
    }
}

/// Whether `state` must stay on disk at these times (live marks; claims
/// within the store's claim grace past their lease).
pub fn is_retained(store: &Store, state: EntryState, partition_now: u64, clock_now: u64) -> bool {
    Entry::from(state).is_retained(
        partition_now,
        clock_now,
        store.engine().claim_grace_millis(),
    )
}

/// Compacts an unassigned partition now: drops its expired marks, and
/// claims past the claim grace, from disk (judged at the store's time,
/// recorded in the ledger first).
pub fn compact(store: &Store, partition: &Partition) -> Result<()> {
    let (engine, _membership) = store.unassigned(partition)?;
    let Some(cf) = engine.db().cf_handle(&partition.cf_name()) else {
        return Ok(());
    };
    // Expiry is judged at the time the ledger records: record now first.
    engine.record_time()?;
    let storage = |e| Error::storage(e, engine.path());
    engine.db().flush_cf(&cf).map_err(storage)?;
    engine
        .db()
        .compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
    Ok(())
}

/// The filter bytes of the partition's valid filter snapshot (the filter
/// an `assign` with the same sizing options would load), if it has one.
pub fn snapshot_filter_bytes(store: &Store, meta: &PartitionMeta) -> Option<usize> {
    let id = meta.snapshot_id?;
    match crate::snapshot::read_any(store.path(), &meta.partition.cf_name()) {
        Ok(Some((file_id, loaded))) if file_id == id => Some(loaded.filter.memory_bytes()),
        _ => None,
    }
}
