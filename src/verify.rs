//! The health check of an open store (`exactly verify`). Not part of the
//! stable API (re-exported from [`crate::internals`]).
//!
//! Opening the store already ran the checks that guard recovery (the
//! manifest's checksum, the ledger against RocksDB's `MANIFEST` and the
//! recovered sequence number, the write-ahead-log pre-flight); a store that
//! fails them does not open, and the tool reports that error. This module
//! checks what opening does not:
//!
//! * the manifest and ledger read back and decode, and the ledger's
//!   sequence is not ahead of RocksDB's;
//! * the write-ahead logs pass the pre-flight again (after recovery);
//! * per partition: every metadata value and every entry decodes (a full
//!   scan, which also verifies RocksDB's block checksums);
//! * per partition with a filter snapshot that `assign` would load: the
//!   file reads back (checksum, layout, id), and its filter answers "maybe"
//!   for every live mark and its claim table holds every live claim (no
//!   false negative);
//! * a filter rebuilt from the marks, as `assign` rebuilds it with this
//!   store's options, has no false negative either.

use std::collections::HashSet;
use std::path::Path;

use crate::bloom::ExpiringFilter;
use crate::error::{Error, Result};
use crate::inspect::{self, EntryState};
use crate::layout::{Entry, MARK_TAG};
use crate::ledger::Ledger;
use crate::manifest::Manifest;
use crate::snapshot;
use crate::{Partition, Store};

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked ("manifest", "orders/3 snapshot", ...).
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The checks' findings; healthy when every one passed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// In the order they ran.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether every check passed.
    pub fn healthy(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    fn push(&mut self, check: impl Into<String>, outcome: std::result::Result<String, String>) {
        let (ok, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.findings.push(Finding {
            check: check.into(),
            ok,
            detail,
        });
    }
}

/// Runs every check on an open store whose partitions are not assigned.
/// `progress` gets the entries scanned so far. Damage is reported in the
/// [`Report`]; the `Err` case is for failures to run the checks at all.
pub fn verify(store: &Store, progress: &mut dyn FnMut(u64)) -> Result<Report> {
    let mut report = Report::default();
    let engine = store.engine();
    let dir = engine.path();
    report.push(
        "manifest",
        match Manifest::read(dir) {
            Ok(Some(m)) => Ok(format!(
                "format {}, key mode {}, time domain {}",
                m.format_version,
                m.key_mode.as_str(),
                m.time_domain.as_str()
            )),
            Ok(None) => Err("missing".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    let recovered = engine.db().latest_sequence_number();
    report.push(
        "ledger",
        match Ledger::read(dir) {
            Ok(Some(l)) if l.sequence <= recovered => Ok(format!(
                "durable sequence {} (RocksDB at {recovered}), MANIFEST-{:06}",
                l.sequence, l.manifest
            )),
            Ok(Some(l)) => Err(format!(
                "durable sequence {} is ahead of RocksDB's {recovered}",
                l.sequence
            )),
            Ok(None) => Err("missing".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    report.push(
        "write-ahead logs",
        crate::wal::check_logs(dir)
            .map(|()| match engine.cut_at_open() {
                // A torn tail is what a power cut leaves: recovered, but said.
                Some(cut) => format!("pre-flight passed; {cut}"),
                None => "pre-flight passed".to_string(),
            })
            .map_err(|e| e.to_string()),
    );
    let kept = kept_tails(dir)?;
    if !kept.is_empty() {
        report.push(
            "torn tails kept",
            Ok(format!(
                "{} (bytes cut from write-ahead logs at earlier opens; remove them once \
                 they are not needed)",
                kept.join(", ")
            )),
        );
    }
    let mut scanned = 0u64;
    for partition in inspect::partitions(store) {
        check_partition(store, &partition, &mut report, &mut scanned, progress)?;
    }
    Ok(report)
}

/// The files in which opens kept the torn tails they cut.
fn kept_tails(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
        let name = name.to_string_lossy();
        if name.contains(".log.torn-") && !name.ends_with(".tmp") {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn check_partition(
    store: &Store,
    partition: &Partition,
    report: &mut Report,
    scanned: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let meta = match inspect::partition_meta(store, partition) {
        Ok(Some(meta)) => meta,
        Ok(None) => return Ok(()),
        Err(e @ Error::Corruption(_)) => {
            report.push(format!("{partition} metadata"), Err(e.to_string()));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if meta.changelog.is_some() || meta.changelog_progress.is_some() || meta.outbox_entries > 0 {
        report.push(
            format!("{partition} changelog"),
            Ok(format!(
                "position {:?}, progress read {:?}, {} outbox entries decode",
                meta.changelog, meta.changelog_progress, meta.outbox_entries
            )),
        );
    }
    let clock_now = inspect::now(store);
    let partition_now = inspect::partition_now(store, &meta);
    // Sequence sources: every state must decode (a damaged one makes
    // `assign` fail).
    match inspect::sources(store, partition, partition_now) {
        Ok(sources) if sources.is_empty() => {}
        Ok(sources) => report.push(
            format!("{partition} sources"),
            Ok(format!("{} live sequence sources decode", sources.len())),
        ),
        Err(e @ Error::Corruption(_)) => {
            report.push(format!("{partition} sources"), Err(e.to_string()))
        }
        Err(e) => return Err(e),
    }
    let options = store.engine().options();
    let mut rebuilt = ExpiringFilter::new(
        options.expected_keys_per_partition,
        options.bloom_fp_rate,
        store.engine().ttl_millis(),
    );
    let (mut live_marks, mut live_claims) = (Vec::new(), HashSet::new());
    let (mut marks, mut claims) = (0u64, 0u64);
    let scan = inspect::for_each_entry(store, partition, |e| {
        let mut k = Vec::with_capacity(1 + e.key.len());
        k.push(MARK_TAG);
        k.extend_from_slice(&e.key);
        let live = Entry::from(e.state).is_live(partition_now, clock_now);
        match e.state {
            EntryState::Done { expires_at } => {
                marks += 1;
                if live {
                    rebuilt.insert(&k, expires_at);
                    live_marks.push(k);
                }
            }
            EntryState::Claimed { .. } => {
                claims += 1;
                if live {
                    live_claims.insert(k);
                }
            }
        }
        *scanned += 1;
        if scanned.is_multiple_of(4_096) {
            progress(*scanned);
        }
        Ok(true)
    });
    progress(*scanned);
    match scan {
        Ok(n) => report.push(
            format!("{partition} entries"),
            Ok(format!(
                "{n} decode ({marks} marks, {claims} claims; live: {} marks, {} claims)",
                live_marks.len(),
                live_claims.len()
            )),
        ),
        Err(e @ (Error::Corruption(_) | Error::Storage(_))) => {
            report.push(format!("{partition} entries"), Err(e.to_string()));
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    rebuilt.expire(partition_now);
    let missed = live_marks
        .iter()
        .filter(|k| !rebuilt.may_contain(k, partition_now))
        .count();
    report.push(
        format!("{partition} rebuilt filter"),
        if missed == 0 {
            Ok(format!(
                "no false negative over {} live marks",
                live_marks.len()
            ))
        } else {
            Err(format!("{missed} live marks missing"))
        },
    );
    let Some(id) = meta.snapshot_id else {
        return Ok(());
    };
    let outcome = match snapshot::read_any(store.path(), &partition.cf_name()) {
        Err(why) => Err(why),
        Ok(None) => Err(format!(
            "the partition names snapshot {id:016x} but its file is missing"
        )),
        Ok(Some((file_id, _))) if file_id != id => Err(format!(
            "the file holds snapshot {file_id:016x}, the partition names {id:016x}"
        )),
        Ok(Some((_, loaded))) if loaded.taken.clock > clock_now => {
            Ok("taken later than the store's time; the next assign rescans instead".to_string())
        }
        Ok(Some((_, mut loaded))) => {
            loaded.filter.expire(partition_now);
            let missed_marks = live_marks
                .iter()
                .filter(|k| !loaded.filter.may_contain(k, partition_now))
                .count();
            let missed_claims = live_claims
                .iter()
                .filter(|k| !loaded.claims.contains_key(*k))
                .count();
            if missed_marks + missed_claims == 0 {
                Ok(format!(
                    "snapshot {id:016x}: no false negative over {} live marks and {} claims",
                    live_marks.len(),
                    live_claims.len()
                ))
            } else {
                Err(format!(
                    "snapshot {id:016x} misses {missed_marks} live marks and {missed_claims} \
                     claims: an assign would answer New for them"
                ))
            }
        }
    };
    report.push(format!("{partition} filter snapshot"), outcome);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CHANGELOG_PROGRESS_KEY, OUTBOX_PREFIX};
    use crate::outbox_probe as outbox;
    use crate::Options;

    fn finding<'r>(report: &'r Report, check: &str) -> &'r Finding {
        report
            .findings
            .iter()
            .find(|f| f.check == check)
            .unwrap_or_else(|| panic!("no {check} in {report:?}"))
    }

    /// Sequence sources are checked: a damaged state fails the check.
    #[test]
    fn sequence_sources_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let p = Partition::new("t", 0);
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.assign(&p).unwrap();
        store.mark_sequence(&p, b"relay", 1, 5).unwrap();
        store.revoke(&p).unwrap();
        let report = verify(&store, &mut |_| {}).unwrap();
        assert!(report.healthy(), "{report:?}");
        let f = finding(&report, "t/0 sources");
        assert!(f.detail.contains("1 live sequence sources"), "{f:?}");

        let db = store.engine().db();
        let cf = db.cf_handle(&p.cf_name()).unwrap();
        db.put_cf(&cf, crate::layout::source_key(b"relay"), [3u8, 1, 2])
            .unwrap();
        let report = verify(&store, &mut |_| {}).unwrap();
        assert!(!report.healthy(), "{report:?}");
        assert!(!finding(&report, "t/0 sources").ok, "{report:?}");
    }

    /// The changelog metadata and the outbox are checked: what decodes is
    /// reported, a damaged progress value or outbox entry fails the check.
    #[test]
    fn the_changelog_metadata_and_the_outbox_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let p = Partition::new("orders", 0);
        store.assign(&p).unwrap();
        let mut batch = store.batch(&p).unwrap();
        outbox::record_changes(&mut batch, 0);
        batch.check_and_mark(b"a").unwrap();
        batch.set_offset(1);
        let entry = outbox::commit(batch).unwrap().unwrap();
        let mut batch = store.batch(&p).unwrap();
        batch.set_changelog_progress(7).unwrap();
        batch.commit().unwrap();
        store.revoke(&p).unwrap();

        let report = verify(&store, &mut |_| {}).unwrap();
        assert!(report.healthy(), "{report:?}");
        let f = finding(&report, "orders/0 changelog");
        assert!(
            f.detail.contains("Some(7)") && f.detail.contains("1 outbox entries"),
            "{f:?}"
        );

        let db = store.engine().db();
        let cf = db.cf_handle(&p.cf_name()).unwrap();
        db.put_cf(&cf, CHANGELOG_PROGRESS_KEY, b"bad").unwrap();
        let report = verify(&store, &mut |_| {}).unwrap();
        assert!(!finding(&report, "orders/0 metadata").ok, "{report:?}");

        db.put_cf(&cf, CHANGELOG_PROGRESS_KEY, 7i64.to_be_bytes())
            .unwrap();
        let mut key = OUTBOX_PREFIX.to_vec();
        key.extend_from_slice(&entry.seq.to_be_bytes());
        db.put_cf(&cf, key, b"EXOB2 damaged").unwrap();
        let report = verify(&store, &mut |_| {}).unwrap();
        assert!(!finding(&report, "orders/0 metadata").ok, "{report:?}");
    }
}
