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
//! [`find_reader_loop`] walks a log's physical records exactly as RocksDB's
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
pub(crate) fn find_reader_loop(log: &[u8]) -> Option<usize> {
    let mut first_record_read = false;
    let mut recycled = false;
    let mut in_fragment = false;
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
                    return Some(base + pos);
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
            pos += header_size + length;
            match kind {
                FULL_TYPE | RECYCLABLE_FULL_TYPE => {
                    first_record_read = true;
                    in_fragment = false;
                }
                FIRST_TYPE | RECYCLABLE_FIRST_TYPE => in_fragment = true,
                LAST_TYPE | RECYCLABLE_LAST_TYPE if in_fragment => {
                    first_record_read = true;
                    in_fragment = false;
                }
                _ => {}
            }
        }
    }
    None
}

/// Checks every write-ahead log (`*.log`) in the store directory, and the
/// `MANIFEST` that `CURRENT` names (it is written in the same log format and
/// read by the same reader); see the module documentation.
pub(crate) fn check_logs(dir: &Path) -> Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") && entry.path().is_file() {
            names.push(name);
        }
    }
    if let Ok(current) = fs::read_to_string(dir.join("CURRENT")) {
        let manifest = current.trim_end();
        if manifest.starts_with("MANIFEST-") && !manifest.contains('/') {
            names.push(manifest.to_owned());
        }
    }
    for name in names {
        let path = dir.join(&name);
        let log = match fs::read(&path) {
            Ok(log) => log,
            // A missing file is RocksDB's to report.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        if let Some(at) = find_reader_loop(&log) {
            return Err(Error::Corruption(format!(
                "{name} is damaged at byte {at} of {}: a record of a recycled-log type in a \
                 log that was not recycled, which RocksDB's recovery cannot get past. \
                 Restore the store from a copy, or, if the damage is a torn tail after a \
                 power cut, truncate the file to {at} bytes and open again (what was \
                 written after that point is lost)",
                log.len()
            )));
        }
    }
    Ok(())
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
}
