//! Export and import of one partition's marks, claims and offset (the
//! `exactly export` and `exactly import` commands). Not part of the stable
//! API (re-exported from [`crate::internals`]).
//!
//! The export file (`docs/operations.md` documents it for operators;
//! integers big-endian):
//!
//! ```text
//! "EXEXPORT" ++ version: u16 (1, or 2 with sources) ++ key_mode: u8 (0 raw, 1 hashed)
//!   ++ time_domain: u8 (0 processing, 1 event)
//!   ++ topic_len: u16 ++ topic ++ partition: i32
//!   ++ offset: i64 (-1: none) ++ epoch: u64
//!   ++ present: u8 (bit 0: event_time, bit 1: watermark)
//!   ++ event_time: u64 ++ watermark: u64 ++ exported_at: u64
//! then per source (version 2): 0x02 ++ source_len: u32 ++ source
//!                               ++ value_len: u32 ++ value
//! then per entry: 0x01 ++ key_len: u32 ++ key ++ value_len: u8 ++ value
//! then the end:   0x00 ++ records: u64 ++ xxh3_64 of every byte before it: u64
//! ```
//!
//! `key` is the stored key without its tag (the user key, or its XXH3-128
//! in hashed stores) and `value` the entry as the store keeps it
//! (`docs/design.md`, "Keys and values"). Only entries that still count are
//! exported: live marks, and claims within the claim grace. A source's
//! `value` is its sequence state as the store keeps it (sequence mode);
//! only live sources are exported. An export without sources is written as
//! version 1, which builds that predate sources read.
//!
//! Import reads the whole file once and checks it (layout, count, checksum)
//! before it writes anything, so a damaged file changes nothing. Then it
//! merges: of a key present on both sides the later expiry stays (a live
//! processed mark always beats a claim), a source present on both sides
//! keeps every number marked on either side (the later epoch wins), and the offset, epoch, event time
//! and watermark only ever rise. The first write of an entry deletes the
//! partition's filter snapshot id in the same atomic batch (a snapshot
//! without the imported marks would answer `New` for them; an import that
//! writes no entry leaves a valid snapshot valid); the offset is written with the last entries, so
//! an import that stops half way leaves the partition resuming from its old
//! offset, and running it again completes it.

use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use rocksdb::WriteBatch;
use xxhash_rust::xxh3::Xxh3;

use crate::config::{KeyMode, TimeDomain};
use crate::durable::sync_dir;
use crate::error::{Error, Result};
use crate::inspect::{self, stored_form, EntryState};
use crate::layout::{
    encode_offset, source_key, Entry, EPOCH_KEY, EVENT_TIME_KEY, MARK_TAG, OFFSET_KEY,
    SNAPSHOT_KEY, WATERMARK_KEY,
};
use crate::sequence::SourceState;
use crate::ttl::is_live;
use crate::{Partition, Store};

mod file;

use file::{encode_header, read_file, HashingWriter, Record, TAG_END, TAG_ENTRY, TAG_SOURCE};

/// The export format this build writes (with sources; version 1 without)
/// and the newest it reads.
pub const EXPORT_VERSION: u16 = 2;
/// Entries per write batch on import.
const CHUNK: usize = 4_096;

/// What an export file's header records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportHeader {
    /// The export format version.
    pub version: u16,
    /// The partition exported.
    pub partition: Partition,
    /// The key mode of the store it came from.
    pub key_mode: KeyMode,
    /// The time domain of the store it came from.
    pub time_domain: TimeDomain,
    /// The partition's committed offset.
    pub offset: Option<i64>,
    /// The partition's epoch.
    pub epoch: u64,
    /// The highest committed event time.
    pub event_time: Option<u64>,
    /// The stored watermark.
    pub watermark: Option<u64>,
    /// The store's time at export (ms).
    pub exported_at: u64,
}

/// What an export wrote, or an import read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The file's header.
    pub header: ExportHeader,
    /// Entries in the file.
    pub entries: u64,
    /// Marks (Done entries) among them.
    pub marks: u64,
    /// Claims among them.
    pub claims: u64,
    /// Sequence sources in the file (not counted in `entries`).
    pub sources: u64,
    /// The file's size.
    pub bytes: u64,
}

/// What an import changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The file's contents.
    pub file: ExportSummary,
    /// The partition imported into.
    pub partition: Partition,
    /// Entries written (new keys, or a later expiry than the store had).
    pub written: u64,
    /// Entries where the store's own entry stayed (it expires later).
    pub kept: u64,
    /// Entries that no longer count at the store's time (not written).
    pub expired: u64,
    /// The partition's offset before and after.
    pub offset: (Option<i64>, Option<i64>),
    /// The partition's epoch before and after.
    pub epoch: (u64, u64),
}

/// Writes the partition's entries that still count, and its metadata, to
/// `file` (through a temporary file, fsynced and renamed, so a failed export
/// never leaves a partial file). `progress` gets the entries written so far.
///
/// Errors: [`Error::Assigned`]; [`Error::NotAssigned`] if the partition has
/// no data; [`Error::Io`] naming the file.
pub fn export(
    store: &Store,
    partition: &Partition,
    file: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary> {
    let meta = inspect::partition_meta(store, partition)?
        .ok_or_else(|| Error::NotAssigned(partition.clone()))?;
    let clock_now = inspect::now(store);
    let partition_now = inspect::partition_now(store, &meta);
    let options = store.engine().options();
    let sources = inspect::sources(store, partition, partition_now)?;
    let header = ExportHeader {
        version: if sources.is_empty() {
            1
        } else {
            EXPORT_VERSION
        },
        partition: partition.clone(),
        key_mode: options.key_mode,
        time_domain: options.time_domain,
        offset: meta.offset,
        epoch: meta.epoch,
        event_time: meta.event_time,
        watermark: meta.watermark,
        exported_at: clock_now,
    };
    let tmp = file.with_extension("tmp-export");
    let io = |e| Error::io(&tmp, e);
    let mut out = HashingWriter {
        inner: BufWriter::new(fs::File::create(&tmp).map_err(io)?),
        hash: Xxh3::new(),
        bytes: 0,
    };
    out.put(&encode_header(&header)).map_err(io)?;
    for (source, state) in &sources {
        let value = state.encode();
        let mut record = Vec::with_capacity(9 + source.len() + value.len());
        record.push(TAG_SOURCE);
        record.extend_from_slice(
            &u32::try_from(source.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        record.extend_from_slice(source);
        record.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
        record.extend_from_slice(&value);
        out.put(&record).map_err(io)?;
    }
    let (mut entries, mut marks, mut claims) = (0u64, 0u64, 0u64);
    inspect::for_each_entry(store, partition, |e| {
        if !inspect::is_retained(store, e.state, partition_now, clock_now) {
            return Ok(true);
        }
        let value = Entry::from(e.state).encode();
        let key_len = u32::try_from(e.key.len()).unwrap_or(u32::MAX);
        let value_len = u8::try_from(value.len()).unwrap_or(u8::MAX);
        let mut record = Vec::with_capacity(6 + e.key.len() + value.len());
        record.push(TAG_ENTRY);
        record.extend_from_slice(&key_len.to_be_bytes());
        record.extend_from_slice(&e.key);
        record.push(value_len);
        record.extend_from_slice(&value);
        out.put(&record).map_err(io)?;
        entries += 1;
        match e.state {
            EntryState::Done { .. } => marks += 1,
            EntryState::Claimed { .. } => claims += 1,
        }
        if entries.is_multiple_of(1_024) {
            progress(entries);
        }
        Ok(true)
    })?;
    let mut end = vec![TAG_END];
    end.extend_from_slice(&(entries + sources.len() as u64).to_be_bytes());
    out.put(&end).map_err(io)?;
    let sum = out.hash.digest();
    let bytes = out.bytes + 8;
    let mut inner = out.inner.into_inner().map_err(|e| io(e.into_error()))?;
    inner
        .write_all(&sum.to_be_bytes())
        .and_then(|()| inner.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, file).map_err(|e| Error::io(file, e))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir)?;
    }
    progress(entries);
    Ok(ExportSummary {
        header,
        entries,
        marks,
        claims,
        sources: sources.len() as u64,
        bytes,
    })
}

/// Reads and checks a whole export file (layout, entry count, checksum)
/// without changing anything. `progress` gets the bytes read so far.
///
/// Errors: [`Error::BadExport`] saying what is wrong; [`Error::Io`].
pub fn read_export(file: &Path, progress: &mut dyn FnMut(u64)) -> Result<ExportSummary> {
    read_file(file, progress, &mut |_| Ok(()))
}

/// Imports an export file into `to` (or the partition it was exported
/// from), merging as the module documentation says. The file is checked
/// whole before anything is written. `progress` gets the bytes read so far,
/// first while checking, then while applying.
///
/// Errors: [`Error::BadExport`] (nothing written); [`Error::IncompatibleOptions`]
/// for an export of another time domain, or of a hashed store into a raw
/// one; [`Error::Assigned`]; [`Error::Corruption`] for a damaged entry in
/// the store.
pub fn import(
    store: &Store,
    file: &Path,
    to: Option<&Partition>,
    progress: &mut dyn FnMut(u64),
) -> Result<ImportSummary> {
    let checked = read_export(file, progress)?;
    let header = &checked.header;
    let options = store.engine().options();
    if header.time_domain != options.time_domain {
        return Err(Error::IncompatibleOptions {
            option: "time_domain",
            stored: format!("{:?}", options.time_domain),
            requested: format!("{:?} (the export's)", header.time_domain),
        });
    }
    // Raw keys can be hashed into a hashed store; hashes cannot be undone.
    let rehash = match (header.key_mode, options.key_mode) {
        (a, b) if a == b => false,
        (KeyMode::Raw, KeyMode::Hashed) => true,
        (from, into) => {
            return Err(Error::IncompatibleOptions {
                option: "key_mode",
                stored: format!("{into:?}"),
                requested: format!("{from:?} (the export's)"),
            })
        }
    };
    let target = to.cloned().unwrap_or_else(|| header.partition.clone());
    let (engine, membership) = store.unassigned(&target)?;
    let name = target.cf_name();
    if engine.db().cf_handle(&name).is_none() {
        // Creates the column family with the store's options.
        engine.load_partition(&target, None)?;
    }
    drop(membership);
    let before = inspect::partition_meta(store, &target)?.ok_or_else(|| {
        Error::Storage(format!("column family of {target} vanished during import"))
    })?;
    let clock_now = inspect::now(store);
    let partition_now = inspect::partition_now(store, &before);
    let (engine, _membership) = store.unassigned(&target)?;
    let cf = engine
        .db()
        .cf_handle(&name)
        .ok_or_else(|| Error::NotAssigned(target.clone()))?;

    let (mut written, mut kept, mut expired) = (0u64, 0u64, 0u64);
    let mut batch = WriteBatch::default();
    let mut staged: HashMap<Vec<u8>, Entry> = HashMap::new();
    let mut staged_sources: HashMap<Vec<u8>, SourceState> = HashMap::new();
    let mut snapshot_dropped = false;
    read_file(file, progress, &mut |record| {
        let (key, entry) = match record {
            Record::Entry(key, entry) => (key, entry),
            Record::Source(source, state) => {
                let k = source_key(source);
                if !state.is_live(partition_now) {
                    expired += 1;
                    return Ok(());
                }
                let existing = match staged_sources.get(&k) {
                    Some(s) => Some(s.clone()),
                    None => engine
                        .db()
                        .get_pinned_cf(&cf, &k)
                        .map_err(|e| Error::storage(e, engine.path()))?
                        .map(|v| {
                            SourceState::decode(&v).ok_or_else(|| {
                                Error::Corruption(format!(
                                    "{target}: sequence source {} holds a malformed state",
                                    source.escape_ascii()
                                ))
                            })
                        })
                        .transpose()?,
                }
                .filter(|s| s.is_live(partition_now));
                let merged = existing.as_ref().map_or(state.clone(), |e| e.merge(&state));
                if Some(&merged) == existing.as_ref() {
                    kept += 1;
                } else {
                    batch.put_cf(&cf, &k, merged.encode());
                    staged_sources.insert(k, merged);
                    written += 1;
                }
                return Ok(());
            }
        };
        let stored = if rehash {
            stored_form(KeyMode::Hashed, key)
        } else {
            key.to_vec()
        };
        let mut k = Vec::with_capacity(1 + stored.len());
        k.push(MARK_TAG);
        k.extend_from_slice(&stored);
        let grace = engine.claim_grace_millis();
        if !entry.is_retained(partition_now, clock_now, grace) {
            expired += 1;
            return Ok(());
        }
        let existing = match staged.get(&k) {
            Some(e) => Some(*e),
            None => engine.read_entry(&cf, &k)?,
        };
        let merged = merge(existing, entry, partition_now, clock_now);
        if Some(merged) == existing {
            kept += 1;
        } else {
            if !snapshot_dropped {
                // With the first entry, in the same atomic write: a
                // snapshot without the imported entries would answer `New`.
                // (Sources are never in a snapshot: they are read on assign.)
                batch.delete_cf(&cf, SNAPSHOT_KEY);
                snapshot_dropped = true;
            }
            batch.put_cf(&cf, &k, merged.encode());
            staged.insert(k, merged);
            written += 1;
        }
        if staged.len() >= CHUNK {
            engine.write(std::mem::take(&mut batch))?;
            staged.clear();
        }
        Ok(())
    })?;
    // The metadata goes with the last entries: never an offset ahead of
    // marks that are not there yet.
    let offset = match (before.offset, header.offset) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if offset != before.offset {
        if let Some(o) = offset {
            batch.put_cf(&cf, OFFSET_KEY, encode_offset(o));
        }
    }
    let epoch = before.epoch.max(header.epoch);
    if epoch != before.epoch {
        batch.put_cf(&cf, EPOCH_KEY, epoch.to_be_bytes());
    }
    for (key, mine, theirs) in [
        (EVENT_TIME_KEY, before.event_time, header.event_time),
        (WATERMARK_KEY, before.watermark, header.watermark),
    ] {
        if let Some(t) = theirs.filter(|&t| mine.is_none_or(|m| t > m)) {
            batch.put_cf(&cf, key, t.to_be_bytes());
        }
    }
    engine.write(batch)?;
    Ok(ImportSummary {
        file: checked,
        partition: target,
        written,
        kept,
        expired,
        offset: (before.offset, offset),
        epoch: (before.epoch, epoch),
    })
}

/// Of a key's entry in the store (`existing`) and in an export
/// (`imported`), the one to keep: a live processed mark always stays (the
/// key was processed; a claim on it would only hold it back), two marks
/// keep the later expiry, otherwise the entry that counts longer.
fn merge(existing: Option<Entry>, imported: Entry, partition_now: u64, clock_now: u64) -> Entry {
    let Some(existing) = existing else {
        return imported;
    };
    let live_done =
        |e: &Entry| matches!(e, Entry::Done { expires_at } if is_live(*expires_at, partition_now));
    let until = |e: &Entry| match *e {
        Entry::Done { expires_at } => expires_at,
        Entry::Claimed { lease_until, .. } => lease_until,
    };
    if let (Entry::Done { expires_at: a }, Entry::Done { expires_at: b }) = (existing, imported) {
        return Entry::Done {
            expires_at: a.max(b),
        };
    }
    if live_done(&existing) {
        return existing;
    }
    if live_done(&imported) {
        return imported;
    }
    let live = |e: &Entry| e.is_live(partition_now, clock_now);
    if live(&existing) && !live(&imported) {
        return existing;
    }
    if until(&imported) > until(&existing) {
        imported
    } else {
        existing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;

    #[test]
    fn merge_keeps_the_later_expiry_and_live_marks() {
        let done = |t| Entry::Done { expires_at: t };
        let claim = |t| Entry::Claimed {
            lease_until: t,
            epoch: 1,
            token: 9,
        };
        assert_eq!(merge(None, done(5), NOW, NOW), done(5));
        assert_eq!(merge(Some(done(2_000)), done(3_000), NOW, NOW), done(3_000));
        assert_eq!(merge(Some(done(3_000)), done(2_000), NOW, NOW), done(3_000));
        // A live mark beats a claim on either side, whatever the lease.
        assert_eq!(
            merge(Some(done(2_000)), claim(9_000), NOW, NOW),
            done(2_000)
        );
        assert_eq!(
            merge(Some(claim(9_000)), done(2_000), NOW, NOW),
            done(2_000)
        );
        // An expired mark loses to a live claim.
        assert_eq!(merge(Some(done(500)), claim(2_000), NOW, NOW), claim(2_000));
        // Two claims: the later lease.
        assert_eq!(
            merge(Some(claim(2_000)), claim(3_000), NOW, NOW),
            claim(3_000)
        );
        assert_eq!(
            merge(Some(claim(3_000)), claim(2_000), NOW, NOW),
            claim(3_000)
        );
    }
}
