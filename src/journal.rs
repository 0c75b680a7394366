//! Journal records: a committed batch's changes to marks and claims, logged
//! as one value under `JOURNAL_PREFIX ++ seq` in the batch's own write, until
//! a table holding them is ingested (`docs/design.md`, "The write path").
//!
//! A record is `"EXJ1"`, the number of changes (`u32` BE), each change as
//! its stored key's length (`u32` BE), the key, the length of the entry
//! after the batch (`u8`: 0 for a removal, else 9 or 25) and the entry as
//! `layout.rs` encodes it, then a CRC32C (`u32` BE) of everything before it.
//! Keys are in no particular order; a record holds each key once. Every key
//! is a mark key (`MARK_TAG ++ key`, at least two bytes): a record changing
//! any other key does not decode.

use crate::error::{Error, Result};
use crate::layout::{Entry, JOURNAL_PREFIX, MARK_TAG};

const MAGIC: &[u8; 4] = b"EXJ1";

/// The key of journal record `seq`.
pub(crate) fn journal_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(JOURNAL_PREFIX.len() + 8);
    k.extend_from_slice(JOURNAL_PREFIX);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number of a journal record's key, if it is one.
pub(crate) fn journal_seq(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.strip_prefix(JOURNAL_PREFIX)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Encodes the changes `changes` (stored key, entry after the batch or
/// `None` for a removal) as one record; `bytes_hint` is their
/// [`change_bytes`].
pub(crate) fn encode<'a>(
    len: usize,
    changes: impl Iterator<Item = (&'a [u8], Option<Entry>)>,
    bytes_hint: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes_hint + 12);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&width(len).to_be_bytes());
    let mut n = 0;
    for (key, entry) in changes {
        out.extend_from_slice(&width(key.len()).to_be_bytes());
        out.extend_from_slice(key);
        match entry {
            None => out.push(0),
            Some(e @ Entry::Done { .. }) => {
                out.push(9);
                e.encode_into(&mut out);
            }
            Some(e @ Entry::Claimed { .. }) => {
                out.push(25);
                e.encode_into(&mut out);
            }
        }
        n += 1;
    }
    debug_assert_eq!(n, len, "a journal record's count matches its changes");
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A count or key length as the record stores it: keys are at most
/// `MAX_KEY_LEN_LIMIT + 1` bytes and a batch holds far fewer than 2^32
/// keys, so it always fits.
fn width(n: usize) -> u32 {
    u32::try_from(n).expect("journal counts and key lengths fit in 32 bits")
}

/// The bytes a change adds to a record, for sizing.
pub(crate) fn change_bytes(key: &[u8], entry: Option<Entry>) -> usize {
    4 + key.len()
        + 1
        + match entry {
            None => 0,
            Some(Entry::Done { .. }) => 9,
            Some(Entry::Claimed { .. }) => 25,
        }
}

/// Reads a record front to back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<usize> {
        let bytes: [u8; 4] = self.take(4)?.try_into().ok()?;
        usize::try_from(u32::from_be_bytes(bytes)).ok()
    }
}

/// Decodes a record, calling `f` with each change in the record's order.
///
/// Errors: [`Error::Corruption`] naming record `seq` if it is malformed or
/// its checksum does not match; `f` is then called for none of it.
pub(crate) fn decode(
    seq: u64,
    value: &[u8],
    mut f: impl FnMut(&[u8], Option<Entry>),
) -> Result<()> {
    let corrupt = |why: &str| Error::Corruption(format!("journal record {seq} is damaged: {why}"));
    let (body, crc) = value
        .split_at_checked(value.len().saturating_sub(4))
        .ok_or_else(|| corrupt("truncated"))?;
    let crc: [u8; 4] = crc.try_into().map_err(|_| corrupt("truncated"))?;
    if crc32c::crc32c(body) != u32::from_be_bytes(crc) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut cursor = Cursor(body);
    if cursor.take(4) != Some(MAGIC.as_slice()) {
        return Err(corrupt("not a journal record"));
    }
    let count = cursor.u32().ok_or_else(|| corrupt("truncated"))?;
    let mut changes = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = cursor.u32().ok_or_else(|| corrupt("truncated"))?;
        let key = cursor.take(len).ok_or_else(|| corrupt("truncated"))?;
        // Only marks and claims are journalled: a change of any other key
        // (metadata, an empty key, a bare tag) is damage, and written as a
        // table it would overwrite metadata or break the table's order.
        if key.len() < 2 || key.first() != Some(&MARK_TAG) {
            return Err(corrupt("a change of a key that is not a mark"));
        }
        let entry_len = cursor
            .take(1)
            .and_then(|b| b.first().copied())
            .ok_or_else(|| corrupt("truncated"))?;
        let entry = if entry_len == 0 {
            None
        } else {
            let v = cursor
                .take(usize::from(entry_len))
                .ok_or_else(|| corrupt("truncated"))?;
            Some(Entry::decode(v).ok_or_else(|| corrupt("malformed entry"))?)
        };
        changes.push((key, entry));
    }
    if !cursor.0.is_empty() {
        return Err(corrupt("bytes after its last change"));
    }
    for (key, entry) in changes {
        f(key, entry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(Vec<u8>, Option<Entry>)> {
        vec![
            (b"\x01a".to_vec(), Some(Entry::Done { expires_at: 7 })),
            (b"\x01bc".to_vec(), None),
            (
                b"\x01d".to_vec(),
                Some(Entry::Claimed {
                    lease_until: 1,
                    epoch: 2,
                    token: 3,
                }),
            ),
        ]
    }

    fn encoded() -> Vec<u8> {
        let changes = sample();
        let bytes = changes.iter().map(|(k, e)| change_bytes(k, *e)).sum();
        encode(
            changes.len(),
            changes.iter().map(|(k, e)| (k.as_slice(), *e)),
            bytes,
        )
    }

    #[test]
    fn records_round_trip_and_their_size_is_known() {
        let v = encoded();
        let changes = sample();
        let bytes: usize = changes.iter().map(|(k, e)| change_bytes(k, *e)).sum();
        assert_eq!(v.len(), bytes + 12);
        let mut back = Vec::new();
        decode(3, &v, |k, e| back.push((k.to_vec(), e))).unwrap();
        assert_eq!(back, changes);
    }

    #[test]
    fn every_damage_is_refused_whole() {
        let v = encoded();
        for i in 0..v.len() {
            for bit in [1u8, 0x80] {
                let mut d = v.clone();
                d[i] ^= bit;
                let mut seen = 0;
                let r = decode(9, &d, |_, _| seen += 1);
                assert!(
                    matches!(&r, Err(Error::Corruption(m)) if m.contains("journal record 9")),
                    "byte {i}: {r:?}"
                );
                assert_eq!(seen, 0);
            }
        }
        for cut in 0..v.len() {
            assert!(decode(1, &v[..cut], |_, _| {}).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_change_of_a_key_that_is_not_a_mark_is_refused() {
        for bad in [&b"\x00offset"[..], b"", b"\x01", b"\x02x"] {
            let changes = [
                (&b"\x01ok"[..], Some(Entry::Done { expires_at: 1 })),
                (bad, None),
            ];
            let bytes = changes.iter().map(|(k, e)| change_bytes(k, *e)).sum();
            let v = encode(changes.len(), changes.iter().copied(), bytes);
            let mut seen = 0;
            let r = decode(4, &v, |_, _| seen += 1);
            assert!(
                matches!(&r, Err(Error::Corruption(m)) if m.contains("not a mark")),
                "{bad:?}: {r:?}"
            );
            assert_eq!(seen, 0);
        }
    }

    #[test]
    fn keys_sort_by_sequence_and_parse_back() {
        assert!(journal_key(1) < journal_key(2));
        assert!(journal_key(255) < journal_key(256));
        assert_eq!(journal_seq(&journal_key(u64::MAX)), Some(u64::MAX));
        assert_eq!(journal_seq(b"\x00journal:x"), None);
        assert_eq!(journal_seq(b"\x00offset"), None);
    }
}
