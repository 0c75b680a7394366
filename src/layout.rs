//! The on-disk layout: every key and value the store writes to RocksDB, and
//! their encoding. `docs/design.md` ("On-disk format") describes this file.
//!
//! Each partition is one column family. Its metadata keys start with `0x00`,
//! its marks and claims with [`MARK_TAG`]; a mark's or claim's value is an
//! [`Entry`]. Numbers are big-endian. The default column family holds only
//! [`SEQUENCE_PIN_KEY`].

use xxhash_rust::xxh3::xxh3_128;

use crate::config::KeyMode;
use crate::error::{Error, Result};

/// First byte of a mark key: `[MARK_TAG] ++ key` (or `++ xxh3_128(key)`).
pub(crate) const MARK_TAG: u8 = 1;
// A partition's own metadata keys start with 0x00, mark keys with MARK_TAG.

/// The key of the partition's committed consumer offset (value: i64 BE).
pub(crate) const OFFSET_KEY: &[u8] = b"\x00offset";
/// The key of the partition's epoch (value: u64 BE).
pub(crate) const EPOCH_KEY: &[u8] = b"\x00epoch";
/// The key of the partition's highest committed event time (value: u64 BE).
pub(crate) const EVENT_TIME_KEY: &[u8] = b"\x00event_time";
/// The key of the partition's watermark (event-time stores; value: u64 BE):
/// the highest `event_time - allowed_lateness` ever committed. Kept so that
/// the watermark never goes backwards, even when a reopen raises
/// `allowed_lateness`: compaction may already have dropped marks that
/// expired at it. Absent in stores written before it existed.
pub(crate) const WATERMARK_KEY: &[u8] = b"\x00watermark";

/// The stored form of a user key.
pub(crate) fn mark_key(mode: KeyMode, key: &[u8]) -> Vec<u8> {
    match mode {
        KeyMode::Raw => {
            let mut k = Vec::with_capacity(1 + key.len());
            k.push(MARK_TAG);
            k.extend_from_slice(key);
            k
        }
        KeyMode::Hashed => {
            let mut k = Vec::with_capacity(17);
            k.push(MARK_TAG);
            k.extend_from_slice(&xxh3_128(key).to_be_bytes());
            k
        }
    }
}

pub(crate) fn encode_offset(offset: i64) -> [u8; 8] {
    offset.to_be_bytes()
}

pub(crate) fn decode_u64(value: &[u8], what: &str) -> Result<u64> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        Error::Corruption(format!(
            "stored {what} is {} bytes, expected 8",
            value.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn decode_offset(value: &[u8]) -> Result<i64> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        Error::Corruption(format!(
            "stored offset is {} bytes, expected 8",
            value.len()
        ))
    })?;
    let offset = i64::from_be_bytes(bytes);
    if offset < 0 {
        return Err(Error::Corruption(format!(
            "stored offset {offset} is negative"
        )));
    }
    Ok(offset)
}

/// The key of the partition's changelog position (value: i64 BE): every
/// record of the partition's Kafka changelog below it is reflected in this
/// column family, so a restore reads from it. Absent until a changelog was
/// used.
pub(crate) const CHANGELOG_KEY: &[u8] = b"\x00changelog";
/// The key of the highest progress record (value: i64 BE, an input offset)
/// that the partition's restores read from its changelog, written with
/// each restore chunk: a restore cut short keeps what it learnt of where
/// processing got to, although the next attempt starts past the record.
pub(crate) const CHANGELOG_PROGRESS_KEY: &[u8] = b"\x00changelog_progress";
/// The prefix of the partition's outbox entries: `OUTBOX_PREFIX ++ seq: u64
/// BE`; the value is described in `outbox.rs`.
pub(crate) const OUTBOX_PREFIX: &[u8] = b"\x00outbox:";

/// The prefix of the partition's sequence sources: `SOURCE_PREFIX ++
/// source`; the value is a source's sequence state, described in
/// `sequence.rs`. Metadata (`0x00`): builds that predate sequence mode keep
/// these keys and never read them.
pub(crate) const SOURCE_PREFIX: &[u8] = b"\x00source:";

/// The stored key of sequence source `source`.
pub(crate) fn source_key(source: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(SOURCE_PREFIX.len() + source.len());
    k.extend_from_slice(SOURCE_PREFIX);
    k.extend_from_slice(source);
    k
}

/// The source named by a stored source key, if it is one.
pub(crate) fn source_of(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(SOURCE_PREFIX).filter(|s| !s.is_empty())
}

/// The prefix of the partition's journal records: `JOURNAL_PREFIX ++ seq:
/// u64 BE`; the value (a batch's changes to marks and claims, not yet in a
/// table) is described in `journal.rs`.
pub(crate) const JOURNAL_PREFIX: &[u8] = b"\x00journal:";

/// The key holding the id of the partition's valid filter snapshot (value:
/// u64 BE); the snapshot files are described in `snapshot.rs`.
pub(crate) const SNAPSHOT_KEY: &[u8] = b"\x00filter_snapshot";

/// Key in the default column family holding the sequence number last pinned
/// before a column family is dropped (value: u64 BE); nothing reads it back.
pub(crate) const SEQUENCE_PIN_KEY: &[u8] = b"\x00sequence_pin";

/// Tag of a processed mark: `[TAG_DONE, expires_at: u64 BE]`.
const TAG_DONE: u8 = 1;
/// Tag of an in-flight claim:
/// `[TAG_CLAIM, lease_until: u64 BE, epoch: u64 BE, token: u64 BE]`.
const TAG_CLAIM: u8 = 2;

/// What the store records for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Processed; a duplicate while the partition's time is below `expires_at`
    /// (processing time, or the partition's watermark under event time).
    Done { expires_at: u64 },
    /// Claimed by a processor; in flight while processing time is below
    /// `lease_until`.
    Claimed {
        lease_until: u64,
        epoch: u64,
        token: u64,
    },
}

impl Entry {
    /// Appends the encoded entry to `out` (9 or 25 bytes).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Done { expires_at } => {
                out.push(TAG_DONE);
                out.extend_from_slice(&expires_at.to_be_bytes());
            }
            Self::Claimed {
                lease_until,
                epoch,
                token,
            } => {
                out.push(TAG_CLAIM);
                out.extend_from_slice(&lease_until.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&token.to_be_bytes());
            }
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        match *self {
            Self::Done { expires_at } => {
                let mut v = Vec::with_capacity(9);
                v.push(TAG_DONE);
                v.extend_from_slice(&expires_at.to_be_bytes());
                v
            }
            Self::Claimed {
                lease_until,
                epoch,
                token,
            } => {
                let mut v = Vec::with_capacity(25);
                v.push(TAG_CLAIM);
                v.extend_from_slice(&lease_until.to_be_bytes());
                v.extend_from_slice(&epoch.to_be_bytes());
                v.extend_from_slice(&token.to_be_bytes());
                v
            }
        }
    }

    /// `None` if the value is malformed.
    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u64> {
            let bytes: [u8; 8] = value.get(i..i + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        };
        match (value.first(), value.len()) {
            (Some(&TAG_DONE), 9) => Some(Self::Done {
                expires_at: word(1)?,
            }),
            (Some(&TAG_CLAIM), 25) => Some(Self::Claimed {
                lease_until: word(1)?,
                epoch: word(9)?,
                token: word(17)?,
            }),
            _ => None,
        }
    }
}

/// The entry stored as `value`, or [`Error::Corruption`] if it is malformed.
pub(crate) fn decode_entry(value: &[u8]) -> Result<Entry> {
    Entry::decode(value).ok_or_else(|| {
        Error::Corruption(format!("entry value of {} bytes is malformed", value.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        for e in [
            Entry::Done { expires_at: 0 },
            Entry::Done {
                expires_at: u64::MAX,
            },
            Entry::Claimed {
                lease_until: 5,
                epoch: 7,
                token: u64::MAX,
            },
        ] {
            assert_eq!(Entry::decode(&e.encode()), Some(e));
        }
    }

    #[test]
    fn malformed_values_do_not_decode() {
        assert_eq!(Entry::decode(&[]), None);
        assert_eq!(Entry::decode(&[TAG_DONE, 1, 2]), None);
        assert_eq!(Entry::decode(&[7, 0, 0, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(Entry::decode(&[TAG_DONE; 10]), None);
        assert_eq!(Entry::decode(&[TAG_CLAIM; 9]), None);
    }

    #[test]
    fn mark_keys_never_collide_with_metadata() {
        for mode in [KeyMode::Raw, KeyMode::Hashed] {
            let k = mark_key(mode, b"offset");
            assert_eq!(k[0], MARK_TAG);
            assert_ne!(k.as_slice(), OFFSET_KEY);
        }
        assert_eq!(mark_key(KeyMode::Hashed, &[7; 1000]).len(), 17);
        assert_eq!(
            mark_key(KeyMode::Raw, b"abc"),
            vec![MARK_TAG, b'a', b'b', b'c']
        );
    }

    #[test]
    fn offsets_round_trip_and_bad_ones_are_corruption() {
        assert_eq!(decode_offset(&encode_offset(42)).unwrap(), 42);
        assert!(matches!(decode_offset(&[1, 2]), Err(Error::Corruption(_))));
        assert!(matches!(
            decode_offset(&encode_offset(-5)),
            Err(Error::Corruption(_))
        ));
    }

    #[test]
    fn malformed_entries_are_corruption() {
        assert!(matches!(decode_entry(&[9]), Err(Error::Corruption(_))));
    }
}
