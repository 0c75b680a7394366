//! A pre-flight check of RocksDB's write-ahead logs (and of its `MANIFEST`,
//! which is written in the same format), run before RocksDB reads them.
//!
//! RocksDB's log reader (11.x) loops forever on one kind of damage: in a log
//! that was not recycled, a physical record whose type byte is one of the
//! recyclable types, at a record boundary after the first complete record.
//! The reader reports the record as bad without consuming it and is asked for
//! the same record again, so `DB::open` never returns. Garbage appended to a
//! log, or a flipped type byte, is enough.
//!
//! [`walk`] walks a log's physical records exactly as RocksDB's
//! `log::Reader` consumes them (32 KiB blocks, 7- or 11-byte headers,
//! masked CRC32C over type and payload, the rest of a block dropped after a
//! bad length or checksum) and returns the offset of the first record that
//! would trap the reader, so that `Store::open` can refuse the log with
//! [`Error::Corruption`](crate::Error::Corruption) instead of hanging.

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};

const BLOCK_SIZE: usize = 32 * 1024;
const HEADER_SIZE: usize = 7;
const RECYCLABLE_HEADER_SIZE: usize = 11;

const ZERO_TYPE: u8 = 0;
const FULL_TYPE: u8 = 1;
const FIRST_TYPE: u8 = 2;
const LAST_TYPE: u8 = 4;
const RECYCLABLE_FULL_TYPE: u8 = 5;
const RECYCLABLE_FIRST_TYPE: u8 = 6;
const RECYCLABLE_LAST_TYPE: u8 = 8;
const RECYCLABLE_TIMESTAMP_SIZE_TYPE: u8 = 11;
const RECYCLABLE_PREDECESSOR_TYPE: u8 = 131;

const CRC_MASK_DELTA: u32 = 0xa282_ead8;

fn is_recyclable(t: u8) -> bool {
    (RECYCLABLE_FULL_TYPE..=RECYCLABLE_LAST_TYPE).contains(&t)
        || t == RECYCLABLE_TIMESTAMP_SIZE_TYPE
        || t == RECYCLABLE_PREDECESSOR_TYPE
}

fn unmask(masked: u32) -> u32 {
    masked.wrapping_sub(CRC_MASK_DELTA).rotate_right(17)
}

/// The byte offset of the first record in `log` on which RocksDB's reader
/// would loop forever, or `None` if it reads the whole log (whatever damage
/// it reports along the way).
#[cfg(test)]
pub(crate) fn find_reader_loop(log: &[u8]) -> Option<usize> {
    walk(log).trap
}

/// What [`walk`] found in a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Walk {
    /// Where the first record that traps the reader starts.
    pub(crate) trap: Option<usize>,
    /// The last sequence number of the complete write batches read before
    /// it (or in the whole log): what recovery replays from this log.
    pub(crate) last_sequence: Option<u64>,
}

/// The first sequence number and the count of a write batch, from the
/// start of its payload (RocksDB's 12-byte batch header: fixed64 sequence,
/// fixed32 count, little-endian).
fn batch_sequences(payload: &[u8]) -> Option<u64> {
    let sequence = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let count = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?);
    Some(sequence.saturating_add(u64::from(count)).saturating_sub(1))
}

/// Walks `log`'s physical records as RocksDB's reader consumes them; see
/// the module documentation.
pub(crate) fn walk(log: &[u8]) -> Walk {
    let mut found = Walk::default();
    let mut first_record_read = false;
    let mut recycled = false;
    let mut in_fragment = false;
    // The last sequence of a batch whose first fragment was read.
    let mut pending: Option<u64> = None;
    for (index, block) in log.chunks(BLOCK_SIZE).enumerate() {
        let base = index * BLOCK_SIZE;
        let mut pos = 0;
        // Fewer bytes than a header left: RocksDB skips them (a block
        // trailer) or, at the end of the file, stops.
        while let Some(&[c0, c1, c2, c3, l0, l1, kind]) = block.get(pos..pos + HEADER_SIZE) {
            let header = block.get(pos..).unwrap_or_default();
            let length = usize::from(u16::from_le_bytes([l0, l1]));
            let mut header_size = HEADER_SIZE;
            if is_recyclable(kind) {
                if first_record_read && !recycled {
                    found.trap = Some(base + pos);
                    return found;
                }
                recycled = true;
                header_size = RECYCLABLE_HEADER_SIZE;
                if block.len() - pos < header_size {
                    break;
                }
            }
            // A length past the block, a zero record or a bad checksum drops
            // the rest of the block.
            if header_size + length > block.len() - pos || (kind == ZERO_TYPE && length == 0) {
                break;
            }
            let expected = unmask(u32::from_le_bytes([c0, c1, c2, c3]));
            let covered = header.get(6..header_size + length).unwrap_or_default();
            if crc32c::crc32c(covered) != expected {
                break;
            }
            let payload = header
                .get(header_size..header_size + length)
                .unwrap_or_default();
            pos += header_size + length;
            match kind {
                FULL_TYPE | RECYCLABLE_FULL_TYPE => {
                    first_record_read = true;
                    in_fragment = false;
                    found.last_sequence = batch_sequences(payload).or(found.last_sequence);
                }
                FIRST_TYPE | RECYCLABLE_FIRST_TYPE => {
                    in_fragment = true;
                    pending = batch_sequences(payload);
                }
                LAST_TYPE | RECYCLABLE_LAST_TYPE if in_fragment => {
                    first_record_read = true;
                    in_fragment = false;
                    found.last_sequence = pending.take().or(found.last_sequence);
                }
                _ => {}
            }
        }
    }
    found
}

/// A record that would trap RocksDB's log reader, found by the pre-flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trap {
    /// The file's name in the store directory.
    pub(crate) name: String,
    /// Where the trapping record starts.
    pub(crate) at: usize,
    /// The file's length.
    pub(crate) len: usize,
    /// Whether the file is the newest write-ahead log: the only one of
    /// RocksDB's files that may end in bytes that were never synced.
    pub(crate) newest_log: bool,
    /// The last sequence number recovery would replay from the file if it
    /// were cut at the trap.
    pub(crate) last_sequence: Option<u64>,
}

impl Trap {
    fn corruption(&self) -> Error {
        Error::Corruption(format!(
            "{} is damaged at byte {} of {}: a record of a recycled-log type in a \
             log that was not recycled, which RocksDB's recovery cannot get past. \
             Restore the store from a copy, or, if the damage is a torn tail after a \
             power cut, truncate the file to {} bytes and open again (what was \
             written after that point is lost)",
            self.name, self.at, self.len, self.at
        ))
    }
}

/// The tail cut from the newest write-ahead log before recovery; see
/// [`cut_torn_tail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CutTail {
    pub(crate) log: String,
    pub(crate) at: usize,
    /// The file, beside the log, that keeps the bytes cut.
    pub(crate) kept: String,
}

impl std::fmt::Display for CutTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "before recovery, {} was cut at byte {}, where a record RocksDB's log reader \
             cannot get past began; the bytes cut are kept in {}",
            self.log, self.at, self.kept
        )
    }
}

/// Every record that would trap RocksDB's reader in the store directory's
/// write-ahead logs (`*.log`) and in the `MANIFEST` that `CURRENT` names (it
/// is written in the same log format and read by the same reader); see the
/// module documentation.
pub(crate) fn find_traps(dir: &Path) -> Result<Vec<Trap>> {
    let mut logs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(number) = log_number(&name) {
            if entry.path().is_file() {
                logs.push((number, name));
            }
        }
    }
    let newest = logs.iter().map(|(number, _)| *number).max();
    let mut names: Vec<(String, bool)> = logs
        .into_iter()
        .map(|(number, name)| (name, Some(number) == newest))
        .collect();
    if let Ok(current) = fs::read_to_string(dir.join("CURRENT")) {
        let manifest = current.trim_end();
        if manifest.starts_with("MANIFEST-") && !manifest.contains('/') {
            names.push((manifest.to_owned(), false));
        }
    }
    let mut traps = Vec::new();
    for (name, newest_log) in names {
        let path = dir.join(&name);
        let log = match fs::read(&path) {
            Ok(log) => log,
            // A missing file is RocksDB's to report.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        let found = walk(&log);
        if let Some(at) = found.trap {
            traps.push(Trap {
                name,
                at,
                len: log.len(),
                newest_log,
                last_sequence: found.last_sequence,
            });
        }
    }
    Ok(traps)
}

/// The number of a write-ahead log file (`000012.log`).
fn log_number(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

/// Checks every write-ahead log and the live `MANIFEST` (see [`find_traps`]);
/// the first trap found is [`Error::Corruption`]. For a health check: `open`
/// uses [`cut_torn_tail`].
pub(crate) fn check_logs(dir: &Path) -> Result<()> {
    match find_traps(dir)?.first() {
        Some(trap) => Err(trap.corruption()),
        None => Ok(()),
    }
}

/// Runs before RocksDB reads the store's logs. A trap in the `MANIFEST` or
/// in an older write-ahead log is refused with [`Error::Corruption`]: the
/// `MANIFEST` is synced before RocksDB relies on it, and an older log before
/// the flush that retires it. (A power cut between a memtable switch and
/// that flush can leave an older log's tail unsynced; that case stays
/// refused, since cutting it would need the later logs set aside too.)
///
/// A trap in the newest write-ahead log is what a power cut leaves when the
/// unsynced tail of the log holds stale or torn bytes. Under point-in-time
/// recovery RocksDB stops replaying at the first bad record of that log, so
/// the log is cut where the trap begins: recovery then ends exactly where it
/// would have ended had the reader not looped. The bytes cut are first kept
/// in `<log>.torn-<offset>` beside it (RocksDB ignores the name). Unless
/// the batches before the trap end below `durable_sequence` (the ledger's):
/// then the trap is in synced bytes, and the log is refused untouched. The
/// ledger still judges what recovery read back; the caller adds the
/// returned [`CutTail`] to its error.
pub(crate) fn cut_torn_tail(dir: &Path, durable_sequence: u64) -> Result<Option<CutTail>> {
    let traps = find_traps(dir)?;
    if let Some(trap) = traps.iter().find(|t| !t.newest_log) {
        return Err(trap.corruption());
    }
    let Some(trap) = traps.into_iter().next() else {
        return Ok(None);
    };
    // The newest log holds every write since it was created, in sequence
    // order: if what precedes the trap ends below the durable sequence, the
    // durable writes are after it, so the trap sits in synced bytes. That
    // is damage, not a torn tail: refused before anything is changed.
    if trap.last_sequence.unwrap_or(0) < durable_sequence {
        return Err(trap.corruption());
    }
    let path = dir.join(&trap.name);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let tail = bytes.get(trap.at..).unwrap_or_default();
    let kept = format!("{}.torn-{}", trap.name, trap.at);
    let kept_path = dir.join(&kept);
    let tmp = dir.join(format!("{kept}.tmp"));
    crate::durable::replace(&kept_path, &tmp, tail)?;
    let log = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    log.set_len(trap.at as u64)
        .and_then(|()| log.sync_all())
        .map_err(|e| Error::io(&path, e))?;
    tracing::warn!(
        log = %trap.name,
        at = trap.at,
        cut_bytes = tail.len(),
        kept = %kept,
        "cut the torn tail of the newest write-ahead log before recovery"
    );
    Ok(Some(CutTail {
        log: trap.name,
        at: trap.at,
        kept,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A physical record as RocksDB's log writer lays it out.
    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut crc_input = vec![kind];
        crc_input.extend_from_slice(payload);
        let crc = crc32c::crc32c(&crc_input);
        let masked = crc.rotate_right(15).wrapping_add(CRC_MASK_DELTA);
        let mut r = masked.to_le_bytes().to_vec();
        r.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_le_bytes());
        r.push(kind);
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn mask_round_trips() {
        for crc in [0, 1, 0xdead_beef, u32::MAX] {
            let masked = crc.rotate_right(15).wrapping_add(CRC_MASK_DELTA);
            assert_eq!(unmask(masked), crc);
        }
    }

    #[test]
    fn a_healthy_log_reads_through() {
        let mut log = record(FULL_TYPE, b"first batch");
        log.extend(record(FIRST_TYPE, b"a batch in"));
        log.extend(record(3, b"three"));
        log.extend(record(LAST_TYPE, b"fragments"));
        assert_eq!(find_reader_loop(&log), None);
        assert_eq!(find_reader_loop(&[]), None);
    }

    #[test]
    fn a_recyclable_header_after_a_record_traps_the_reader() {
        let mut log = record(FULL_TYPE, b"first batch");
        let at = log.len();
        // The bytes the fuzzer appended: a header of type 11.
        log.extend_from_slice(&[11, 11, 11, 11, 11, 11, 11, 11, 11, b's']);
        assert_eq!(find_reader_loop(&log), Some(at));
    }

    #[test]
    fn a_recyclable_header_before_any_record_is_a_recycled_log() {
        let mut log = vec![11; 10];
        log.extend(record(FULL_TYPE, b"batch"));
        assert_eq!(find_reader_loop(&log), None);
    }

    #[test]
    fn a_bad_checksum_drops_the_rest_of_its_block() {
        let mut log = record(FULL_TYPE, b"first batch");
        let mut bad = record(FULL_TYPE, b"second");
        bad[0] ^= 1;
        log.extend(bad);
        // Unreachable: RocksDB skips to the next block.
        log.extend_from_slice(&[11; 12]);
        assert_eq!(find_reader_loop(&log), None);
        // In the next block it is reached again.
        log.resize(BLOCK_SIZE, 0);
        log.extend_from_slice(&[11; 12]);
        assert_eq!(find_reader_loop(&log), Some(BLOCK_SIZE));
    }

    #[test]
    fn a_fragment_counts_once_its_last_piece_is_read() {
        let mut log = record(FIRST_TYPE, b"half");
        let at = log.len();
        log.extend_from_slice(&[11; 12]);
        assert_eq!(find_reader_loop(&log), None, "no complete record yet");
        let mut log = record(FIRST_TYPE, b"half");
        log.extend(record(LAST_TYPE, b"other half"));
        let at2 = log.len();
        log.extend_from_slice(&[11; 12]);
        assert_eq!(find_reader_loop(&log), Some(at2));
        assert!(at < at2);
    }

    /// A store directory with the given files.
    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    fn trapped_log() -> (Vec<u8>, usize) {
        let mut log = record(FULL_TYPE, b"first batch");
        let at = log.len();
        log.extend_from_slice(&[11; 12]);
        (log, at)
    }

    #[test]
    fn the_newest_logs_torn_tail_is_cut_and_kept() {
        let (log, at) = trapped_log();
        let healthy = record(FULL_TYPE, b"older");
        let dir = dir_with(&[("000007.log", &healthy), ("000009.log", &log)]);
        let cut = cut_torn_tail(dir.path(), 0).unwrap().expect("a cut");
        assert_eq!(cut.log, "000009.log");
        assert_eq!(cut.at, at);
        let kept = fs::read(dir.path().join(&cut.kept)).unwrap();
        assert_eq!(kept, log[at..]);
        assert_eq!(fs::read(dir.path().join("000009.log")).unwrap(), log[..at]);
        assert_eq!(fs::read(dir.path().join("000007.log")).unwrap(), healthy);
        // Nothing left to cut, and the health check agrees.
        assert_eq!(cut_torn_tail(dir.path(), 0).unwrap(), None);
        check_logs(dir.path()).unwrap();
    }

    #[test]
    fn a_trap_in_an_older_log_or_the_manifest_is_corruption_and_nothing_is_cut() {
        let (log, at) = trapped_log();
        let healthy = record(FULL_TYPE, b"newer");
        let dir = dir_with(&[("000007.log", &log), ("000009.log", &healthy)]);
        let e = cut_torn_tail(dir.path(), 0).unwrap_err();
        assert!(
            matches!(&e, Error::Corruption(m) if m.contains("000007.log") && m.contains(&format!("byte {at}"))),
            "{e:?}"
        );
        assert_eq!(fs::read(dir.path().join("000007.log")).unwrap(), log);

        let dir = dir_with(&[
            ("CURRENT", b"MANIFEST-000005\n"),
            ("MANIFEST-000005", &log),
            ("000009.log", &healthy),
        ]);
        let e = cut_torn_tail(dir.path(), 0).unwrap_err();
        assert!(
            matches!(&e, Error::Corruption(m) if m.contains("MANIFEST-000005")),
            "{e:?}"
        );
        assert_eq!(fs::read(dir.path().join("MANIFEST-000005")).unwrap(), log);
        // The health check reports a trap wherever it is.
        let dir = dir_with(&[("000009.log", &log)]);
        assert!(matches!(check_logs(dir.path()), Err(Error::Corruption(_))));
    }

    /// A write batch's payload: its header (first sequence, count) and a body.
    fn batch(sequence: u64, count: u32) -> Vec<u8> {
        let mut v = sequence.to_le_bytes().to_vec();
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(b"entries");
        v
    }

    #[test]
    fn the_walk_knows_the_last_sequence_replayed_before_the_trap() {
        let mut log = record(FULL_TYPE, &batch(1, 3));
        log.extend(record(FIRST_TYPE, &batch(4, 5)));
        log.extend(record(LAST_TYPE, b"rest of the batch"));
        let at = log.len();
        // A batch whose last fragment never came does not count.
        log.extend(record(FIRST_TYPE, &batch(9, 2)));
        let whole = walk(&log);
        assert_eq!(
            whole,
            Walk {
                trap: None,
                last_sequence: Some(8)
            }
        );
        log.truncate(at);
        log.extend_from_slice(&[11; 12]);
        assert_eq!(
            walk(&log),
            Walk {
                trap: Some(at),
                last_sequence: Some(8)
            }
        );
    }

    #[test]
    fn a_trap_before_durable_writes_is_refused_and_nothing_is_cut() {
        let mut log = record(FULL_TYPE, &batch(10, 2));
        log.extend_from_slice(&[11; 12]);
        let dir = dir_with(&[("000009.log", &log)]);
        // Writes up to 12 were durable: they lie past the trap.
        let e = cut_torn_tail(dir.path(), 12).unwrap_err();
        assert!(
            matches!(&e, Error::Corruption(m) if m.contains("000009.log")),
            "{e:?}"
        );
        assert_eq!(fs::read(dir.path().join("000009.log")).unwrap(), log);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing kept aside"
        );
        // Up to 11: everything durable precedes the trap.
        assert!(cut_torn_tail(dir.path(), 11).unwrap().is_some());
    }
}
