//! The durability ledger: what the store last knew to be durable, checked
//! against what RocksDB recovers.
//!
//! RocksDB's recovery cannot tell damage to files at rest from a crash: a
//! `MANIFEST` cut at a record boundary reads as an older version of the
//! database, and a write-ahead log cut or garbled in the middle stops
//! point-in-time recovery early. Either way the store would open without an
//! error and answer `New` for marks that were acknowledged and synced. The
//! ledger closes that gap. At every point where the store knows its state is
//! durable (after `open`, at each `sync()` and at `close`) it records:
//!
//! * `sequence`: RocksDB's last sequence number, read *before* the log is
//!   fsynced, so every write up to it is durable (at `sync()` and `close`
//!   only: after `open` it stays as it was);
//! * `clock`: the store's time (ms). A restarted store's time starts there,
//!   and compaction never judges expiry later than it; see
//!   [`TimeKeeper`](crate::clock::TimeKeeper);
//! * `manifest`, `manifest_len` and `manifest_xxh3`: the number of the live
//!   `MANIFEST` file, its length and the XXH3-64 of those bytes, read and
//!   then fsynced.
//!
//! RocksDB only appends to a `MANIFEST` until it starts a new one with a
//! higher number, and recovery never goes below a durable sequence number.
//! So on open, before RocksDB reads anything, the `MANIFEST` named by
//! `CURRENT` must be newer than the ledger's, or the same file still starting
//! with the same bytes; and after recovery the sequence number must not be
//! lower. (RocksDB reads a `MANIFEST` whose last record is cut, or damaged so
//! that it looks cut, as a torn tail: silently, as an older store. The hash
//! catches that.) A
//! store that fails either check is damaged and [`Store::open`] reports
//! [`Error::Corruption`](crate::Error::Corruption).
//!
//! The file (`EXACTLY-LEDGER`) is text with an XXH3 checksum, written with a
//! temporary file, fsync and rename:
//!
//! ```text
//! exactly ledger
//! sequence = 1234
//! clock = 1767225600000
//! manifest = 22
//! manifest_len = 688
//! manifest_xxh3 = 0123456789abcdef
//! checksum = 0123456789abcdef
//! ```
//!
//! [`Store::open`]: crate::Store::open

use std::fs;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::durable::{self, seal, unseal};
use crate::error::{Error, Result};

/// File name of the ledger inside the store directory.
pub(crate) const LEDGER_FILE: &str = "EXACTLY-LEDGER";
const HEADER: &str = "exactly ledger";

/// What the ledger records; all zero for a new store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    pub(crate) sequence: u64,
    pub(crate) clock: u64,
    pub(crate) manifest: u64,
    pub(crate) manifest_len: u64,
    pub(crate) manifest_xxh3: u64,
}

impl Ledger {
    fn encode(&self) -> String {
        seal(&format!(
            "{HEADER}\nsequence = {}\nclock = {}\nmanifest = {}\nmanifest_len = {}\nmanifest_xxh3 = {:016x}\n",
            self.sequence, self.clock, self.manifest, self.manifest_len, self.manifest_xxh3
        ))
    }

    fn decode(text: &[u8]) -> Result<Self> {
        let corrupt = |what: &str| Error::Corruption(format!("{LEDGER_FILE}: {what}"));
        let body = unseal(text, LEDGER_FILE)?;
        if !body.starts_with(HEADER) {
            return Err(corrupt("not a ledger"));
        }
        let field = |name: &str, radix: u32| -> Result<u64> {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
                .and_then(|v| u64::from_str_radix(v, radix).ok())
                .ok_or_else(|| corrupt(&format!("no valid {name}")))
        };
        Ok(Self {
            sequence: field("sequence", 10)?,
            clock: field("clock", 10)?,
            manifest: field("manifest", 10)?,
            manifest_len: field("manifest_len", 10)?,
            manifest_xxh3: field("manifest_xxh3", 16)?,
        })
    }

    /// Reads the ledger of `dir`; `Ok(None)` if there is none.
    pub(crate) fn read(dir: &Path) -> Result<Option<Self>> {
        durable::read_if_exists(&dir.join(LEDGER_FILE))?
            .map(|text| Self::decode(&text))
            .transpose()
    }

    /// Writes the ledger durably (see [`durable::replace`]).
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        durable::replace(
            &dir.join(LEDGER_FILE),
            &dir.join(format!("{LEDGER_FILE}.tmp")),
            self.encode().as_bytes(),
        )
    }

    /// Checks the `MANIFEST` that `CURRENT` names against the ledger, before
    /// RocksDB reads it. A missing or unreadable `CURRENT` or `MANIFEST` is
    /// left for RocksDB to report.
    pub(crate) fn check_manifest(&self, dir: &Path) -> Result<()> {
        let Some((number, bytes)) = live_manifest(dir) else {
            return Ok(());
        };
        if number < self.manifest {
            return Err(Error::Corruption(format!(
                "CURRENT names MANIFEST-{number:06}, older than MANIFEST-{:06} that was \
                 live at the last sync: RocksDB's files were damaged or partly restored \
                 from an older copy. Restore the whole store directory from one copy",
                self.manifest
            )));
        }
        if number > self.manifest {
            return Ok(());
        }
        let durable = usize::try_from(self.manifest_len).unwrap_or(usize::MAX);
        let Some(synced) = bytes.get(..durable) else {
            return Err(Error::Corruption(format!(
                "MANIFEST-{number:06} holds {} bytes but held {durable} at the last sync: \
                 it was truncated, and RocksDB would open an older version of the store. \
                 Restore the store directory from a copy",
                bytes.len()
            )));
        };
        if xxh3_64(synced) != self.manifest_xxh3 {
            return Err(Error::Corruption(format!(
                "the first {durable} bytes of MANIFEST-{number:06} changed since the last \
                 sync: it was damaged, and RocksDB could open an older version of the \
                 store. Restore the store directory from a copy"
            )));
        }
        Ok(())
    }

    /// Checks the sequence number RocksDB recovered against the ledger.
    pub(crate) fn check_sequence(&self, recovered: u64) -> Result<()> {
        if recovered < self.sequence {
            return Err(Error::Corruption(format!(
                "RocksDB recovered writes up to sequence number {recovered}, but writes up \
                 to {} were durable at the last sync: a write-ahead log or table file was \
                 damaged or removed. Restore the store directory from a copy",
                self.sequence
            )));
        }
        Ok(())
    }

    /// What is durable now: `sequence` (read by the caller before it fsynced
    /// the log), the store's time `clock`, and the live `MANIFEST`, read and
    /// then fsynced. If the `MANIFEST` cannot be read (RocksDB may just have
    /// replaced it), the previous ledger's values are kept: they remain true.
    pub(crate) fn durable_now(&self, dir: &Path, sequence: u64, clock: u64) -> Self {
        let mut next = Self {
            sequence: sequence.max(self.sequence),
            clock: clock.max(self.clock),
            ..*self
        };
        // Read (and hash) the MANIFEST only when it grew since the last time.
        let grew = live_manifest_len(dir)
            .is_some_and(|(number, len)| (number, len) > (self.manifest, self.manifest_len));
        if let Some((number, bytes)) = live_manifest(dir).filter(|_| grew) {
            let len = bytes.len() as u64;
            let synced = fs::File::open(dir.join(manifest_name(number)))
                .and_then(|f| f.sync_all())
                .is_ok();
            if synced && (number, len) > (self.manifest, self.manifest_len) {
                next.manifest = number;
                next.manifest_len = len;
                next.manifest_xxh3 = xxh3_64(&bytes);
            }
        }
        next
    }
}

fn manifest_name(number: u64) -> String {
    format!("MANIFEST-{number:06}")
}

/// The number of the `MANIFEST` that `CURRENT` names.
fn live_manifest_number(dir: &Path) -> Option<u64> {
    let current = fs::read_to_string(dir.join("CURRENT")).ok()?;
    current.trim_end().strip_prefix("MANIFEST-")?.parse().ok()
}

/// The number and length of the `MANIFEST` that `CURRENT` names.
fn live_manifest_len(dir: &Path) -> Option<(u64, u64)> {
    let number = live_manifest_number(dir)?;
    let len = fs::metadata(dir.join(manifest_name(number))).ok()?.len();
    Some((number, len))
}

/// The number and contents of the `MANIFEST` that `CURRENT` names. RocksDB
/// starts a new one past `max_manifest_file_size` (a few MiB), so reading it
/// whole stays cheap.
fn live_manifest(dir: &Path) -> Option<(u64, Vec<u8>)> {
    let number = live_manifest_number(dir)?;
    let bytes = fs::read(dir.join(manifest_name(number))).ok()?;
    Some((number, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Ledger {
        Ledger {
            sequence: 1234,
            clock: 1_767_225_600_000,
            manifest: 22,
            manifest_len: 688,
            manifest_xxh3: xxh3_64(&[7u8; 688]),
        }
    }

    #[test]
    fn round_trips() {
        let l = ledger();
        assert_eq!(Ledger::decode(l.encode().as_bytes()).unwrap(), l);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let text = ledger().encode().into_bytes();
        for i in 0..text.len() {
            let mut damaged = text.clone();
            damaged[i] ^= 0x04;
            assert!(
                matches!(Ledger::decode(&damaged), Err(Error::Corruption(_))),
                "flip at byte {i} went unnoticed"
            );
        }
        for len in 0..text.len() - 1 {
            assert!(
                matches!(Ledger::decode(&text[..len]), Err(Error::Corruption(_))),
                "truncation to {len} bytes went unnoticed"
            );
        }
    }

    fn dir_with_manifest(number: u64, len: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("CURRENT"),
            format!("{}\n", manifest_name(number)),
        )
        .unwrap();
        fs::write(dir.path().join(manifest_name(number)), vec![7u8; len]).unwrap();
        dir
    }

    #[test]
    fn an_older_or_shorter_manifest_is_refused() {
        let l = ledger();
        assert!(l.check_manifest(dir_with_manifest(22, 688).path()).is_ok());
        assert!(l.check_manifest(dir_with_manifest(22, 700).path()).is_ok());
        assert!(l.check_manifest(dir_with_manifest(23, 10).path()).is_ok());
        assert!(matches!(
            l.check_manifest(dir_with_manifest(22, 687).path()),
            Err(Error::Corruption(_))
        ));
        assert!(matches!(
            l.check_manifest(dir_with_manifest(21, 5000).path()),
            Err(Error::Corruption(_))
        ));
        let damaged = dir_with_manifest(22, 700);
        let path = damaged.path().join(manifest_name(22));
        let mut bytes = fs::read(&path).unwrap();
        bytes[687] = 0;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            l.check_manifest(damaged.path()),
            Err(Error::Corruption(_))
        ));
        // No CURRENT: left for RocksDB to report.
        assert!(l
            .check_manifest(tempfile::tempdir().unwrap().path())
            .is_ok());
    }

    #[test]
    fn a_lower_recovered_sequence_is_refused() {
        let l = ledger();
        assert!(l.check_sequence(1234).is_ok());
        assert!(l.check_sequence(5000).is_ok());
        assert!(matches!(l.check_sequence(1233), Err(Error::Corruption(_))));
    }

    #[test]
    fn durable_now_only_moves_forward() {
        let l = ledger();
        let dir = dir_with_manifest(22, 900);
        let next = l.durable_now(dir.path(), 2000, 1_767_225_700_000);
        assert_eq!(
            (next.sequence, next.clock, next.manifest, next.manifest_len),
            (2000, 1_767_225_700_000, 22, 900)
        );
        assert_eq!(next.manifest_xxh3, xxh3_64(&[7u8; 900]));
        let back = next.durable_now(dir_with_manifest(21, 9000).path(), 10, 5);
        assert_eq!(
            back, next,
            "an older manifest, sequence or time never lowers the ledger"
        );
        let write_dir = tempfile::tempdir().unwrap();
        next.write(write_dir.path()).unwrap();
        assert_eq!(Ledger::read(write_dir.path()).unwrap(), Some(next));
    }
}
