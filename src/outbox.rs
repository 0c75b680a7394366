//! The local outbox: what a committed batch must still publish to the
//! partition's changelog (the changes it made, and the outgoing records the
//! application staged with it), written in the batch's own atomic write and
//! removed once it is published.
//!
//! An outbox entry is stored under [`outbox_key`]`(seq)` in the partition's
//! column family, `seq` counting up per partition. Its value:
//!
//! ```text
//! "EXOB2"                       magic and version
//! start: i64 BE                 the input offset of the batch's first message
//! next:  i64 BE                 the input offset the batch committed
//! changes: u32 BE, then each:   key: bytes, entry: 0 (deleted) | 1 ++ bytes,
//!                               kind: u8 (0 a change; 1 a claim released,
//!                               then the claim's token: u64 BE)
//! records: u32 BE, then each:   offset: i64 BE (the input message that staged it),
//!                               topic: bytes, key: opt, value: opt,
//!                               headers: u32 BE, then each: name: bytes, value: opt
//! crc32c: u32 BE                of everything before it
//! ```
//!
//! Version 1 (`"EXOB1"`, written before releases and record offsets were
//! kept) is read too: its changes are plain changes and its records count
//! as staged by the batch's first message.
//!
//! `bytes` is a u32 BE length and the bytes; `opt` is `0` (none) or `1 ++ bytes`.
//! A change's key is the stored key (`MARK_TAG ++ key`, or its hash, or a
//! sequence source's key) and its entry the stored value (an entry, or a
//! source's state), exactly as in the column family: the changelog carries
//! what the store keeps, never a message's payload.

use crate::error::{Error, Result};
use crate::layout::{Entry, OUTBOX_PREFIX, SOURCE_PREFIX};
use crate::sequence::SourceState;

const MAGIC: &[u8; 5] = b"EXOB2";
const MAGIC_V1: &[u8; 5] = b"EXOB1";

/// The RocksDB key of outbox entry `seq`.
pub(crate) fn outbox_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(OUTBOX_PREFIX.len() + 8);
    k.extend_from_slice(OUTBOX_PREFIX);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number of an outbox key, if it is one.
pub(crate) fn outbox_seq(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(OUTBOX_PREFIX)?;
    let bytes: [u8; 8] = rest.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The `next` of an entry given up after a restart (someone processed its
/// messages since): it publishes its marks only, with no progress record,
/// offsets or outgoing records.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) const GIVEN_UP: i64 = -1;

/// One change a batch made to a key: its entry after the batch, or `None`
/// when the key's mark or claim was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The stored key.
    pub(crate) key: Vec<u8>,
    pub(crate) entry: Option<Entry>,
    /// The removal ended a claim (a release): that claim's token. It
    /// applies only over that claim: a processor that did not know a key's
    /// mark or claim (a zombie), or a late publication of an outbox, may
    /// release its own claim after another owner's mark or claim reached
    /// the changelog. An unmark removes whatever is there.
    pub(crate) release: Option<u64>,
    /// A sequence source's state after the batch (the key is a source key,
    /// and `entry` is `None`).
    pub(crate) source: Option<SourceState>,
}

impl Change {
    /// The stored value the change leaves: the entry, the source's state,
    /// or none (a removal).
    pub(crate) fn value(&self) -> Option<Vec<u8>> {
        match &self.source {
            Some(state) => Some(state.encode()),
            None => self.entry.map(|e| e.encode()),
        }
    }
}

/// An outgoing record staged with a batch ([`crate::Batch::send`]): produced
/// in the same Kafka transaction as the batch's changelog records and
/// offsets, so that either the marks, the offset and the records all happen
/// or none does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxRecord {
    /// The topic to produce to.
    pub topic: String,
    /// The record's key (partitioned by the producer's partitioner).
    pub key: Option<Vec<u8>>,
    /// The record's value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// The record's headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl OutboxRecord {
    /// A record for `topic` with `key` and `value`.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            topic: topic.into(),
            key: Some(key.into()),
            value: Some(value.into()),
            headers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }
}

/// What one committed batch has to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct OutboxEntry {
    /// The input offset of the batch's first message.
    pub(crate) start: i64,
    /// The input offset the batch committed (its last message + 1).
    pub(crate) next: i64,
    pub(crate) changes: Vec<Change>,
    /// The outgoing records, each with the input offset of the message
    /// whose handler staged it.
    pub(crate) records: Vec<(i64, OutboxRecord)>,
}

impl OutboxEntry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.changes.len() * 32);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.start.to_be_bytes());
        v.extend_from_slice(&self.next.to_be_bytes());
        put_len(&mut v, self.changes.len());
        for c in &self.changes {
            put_bytes(&mut v, &c.key);
            put_opt(&mut v, c.value().as_deref());
            match c.release {
                None => v.push(0),
                Some(token) => {
                    v.push(1);
                    v.extend_from_slice(&token.to_be_bytes());
                }
            }
        }
        put_len(&mut v, self.records.len());
        for (offset, r) in &self.records {
            v.extend_from_slice(&offset.to_be_bytes());
            put_bytes(&mut v, r.topic.as_bytes());
            put_opt(&mut v, r.key.as_deref());
            put_opt(&mut v, r.value.as_deref());
            put_len(&mut v, r.headers.len());
            for (name, value) in &r.headers {
                put_bytes(&mut v, name.as_bytes());
                put_opt(&mut v, value.as_deref());
            }
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_be_bytes());
        v
    }

    /// Decodes an entry; [`Error::Corruption`] if it is damaged.
    pub(crate) fn decode(value: &[u8]) -> Result<Self> {
        let bad = |what: &str| Error::Corruption(format!("outbox entry: {what}"));
        let split = value.len().checked_sub(4).ok_or_else(|| bad("too short"))?;
        let (body, crc) = value.split_at(split);
        let crc: [u8; 4] = crc.try_into().map_err(|_| bad("too short"))?;
        if crc32c::crc32c(body) != u32::from_be_bytes(crc) {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader { rest: body };
        let v2 = match r.take(MAGIC.len())? {
            m if m == MAGIC => true,
            m if m == MAGIC_V1 => false,
            _ => return Err(bad("unknown format")),
        };
        let start = r.i64()?;
        let next = r.i64()?;
        let n = r.len()?;
        let mut changes = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let key = r.bytes()?.to_vec();
            // A source key's value is a source state (sequence mode), any
            // other key's an entry.
            let (entry, source) = match r.opt()? {
                None => (None, None),
                Some(v) if key.starts_with(SOURCE_PREFIX) => (
                    None,
                    Some(SourceState::decode(v).ok_or_else(|| bad("malformed source state"))?),
                ),
                Some(e) => (
                    Some(Entry::decode(e).ok_or_else(|| bad("malformed entry"))?),
                    None,
                ),
            };
            let release = match v2.then(|| r.take(1)).transpose()? {
                None | Some([0]) => None,
                Some([1]) if entry.is_none() && source.is_none() => Some(r.u64()?),
                Some(_) => return Err(bad("bad change kind")),
            };
            changes.push(Change {
                key,
                entry,
                release,
                source,
            });
        }
        let n = r.len()?;
        let mut records = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let offset = if v2 { r.i64()? } else { start };
            let topic = r.string()?;
            let key = r.opt()?.map(<[u8]>::to_vec);
            let value = r.opt()?.map(<[u8]>::to_vec);
            let h = r.len()?;
            let mut headers = Vec::with_capacity(h.min(1 << 10));
            for _ in 0..h {
                headers.push((r.string()?, r.opt()?.map(<[u8]>::to_vec)));
            }
            records.push((
                offset,
                OutboxRecord {
                    topic,
                    key,
                    value,
                    headers,
                },
            ));
        }
        if !r.rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            start,
            next,
            changes,
            records,
        })
    }
}

fn put_len(v: &mut Vec<u8>, n: usize) {
    // Lengths come from keys (at most 64 KiB), record fields and counts of
    // one batch: far below 4 GiB.
    v.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    put_len(v, b.len());
    v.extend_from_slice(b);
}

fn put_opt(v: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => v.push(0),
        Some(b) => {
            v.push(1);
            put_bytes(v, b);
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.rest.len() {
            return Err(Error::Corruption("outbox entry: truncated".into()));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32> {
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| Error::Corruption("outbox entry: truncated".into()))?;
        Ok(u32::from_be_bytes(b))
    }

    fn len(&mut self) -> Result<usize> {
        usize::try_from(self.u32()?)
            .map_err(|_| Error::Corruption("outbox entry: length out of range".into()))
    }

    fn u64(&mut self) -> Result<u64> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| Error::Corruption("outbox entry: truncated".into()))?;
        Ok(u64::from_be_bytes(b))
    }

    fn i64(&mut self) -> Result<i64> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| Error::Corruption("outbox entry: truncated".into()))?;
        Ok(i64::from_be_bytes(b))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::Corruption("outbox entry: a name is not UTF-8".into()))
    }

    fn opt(&mut self) -> Result<Option<&'a [u8]>> {
        match self.take(1)? {
            [0] => Ok(None),
            [1] => self.bytes().map(Some),
            _ => Err(Error::Corruption("outbox entry: bad option tag".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OutboxEntry {
        OutboxEntry {
            start: 10,
            next: 13,
            changes: vec![
                Change {
                    key: vec![1, b'a'],
                    entry: Some(Entry::Done { expires_at: 99 }),
                    release: None,
                    source: None,
                },
                Change {
                    key: vec![1, b'b'],
                    entry: None,
                    release: None,
                    source: None,
                },
                Change {
                    key: vec![1, b'c'],
                    entry: Some(Entry::Claimed {
                        lease_until: 5,
                        epoch: 2,
                        token: 7,
                    }),
                    release: None,
                    source: None,
                },
                Change {
                    key: vec![1, b'd'],
                    entry: None,
                    release: Some(7),
                    source: None,
                },
                Change {
                    key: crate::layout::source_key(b"relay"),
                    entry: None,
                    release: None,
                    source: Some(SourceState::first(3, 40, 99, 70)),
                },
            ],
            records: vec![
                (10, OutboxRecord::new("events", "k", "v").header("h", "x")),
                (
                    12,
                    OutboxRecord {
                        topic: "t".into(),
                        key: None,
                        value: None,
                        headers: vec![("n".into(), None)],
                    },
                ),
            ],
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = sample();
        assert_eq!(OutboxEntry::decode(&e.encode()).unwrap(), e);
        let empty = OutboxEntry::default();
        assert_eq!(OutboxEntry::decode(&empty.encode()).unwrap(), empty);
    }

    /// An entry as version 1 wrote it: no change kinds, no record offsets.
    #[test]
    fn version_1_entries_are_read_as_plain_changes_with_records_at_the_start() {
        let mut v = b"EXOB1".to_vec();
        v.extend_from_slice(&10i64.to_be_bytes());
        v.extend_from_slice(&13i64.to_be_bytes());
        put_len(&mut v, 2);
        put_bytes(&mut v, &[1, b'a']);
        put_opt(&mut v, Some(&Entry::Done { expires_at: 99 }.encode()));
        put_bytes(&mut v, &[1, b'b']);
        put_opt(&mut v, None);
        put_len(&mut v, 1);
        put_bytes(&mut v, b"events");
        put_opt(&mut v, Some(b"k"));
        put_opt(&mut v, Some(b"v"));
        put_len(&mut v, 0);
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_be_bytes());
        let e = OutboxEntry::decode(&v).unwrap();
        assert_eq!((e.start, e.next), (10, 13));
        assert_eq!(e.changes.len(), 2);
        assert!(e.changes.iter().all(|c| c.release.is_none()));
        assert_eq!(e.records, vec![(10, OutboxRecord::new("events", "k", "v"))]);
    }

    #[test]
    fn a_release_that_carries_an_entry_is_corruption() {
        let mut e = sample();
        e.changes[0].release = Some(3);
        assert!(matches!(
            OutboxEntry::decode(&e.encode()),
            Err(Error::Corruption(_))
        ));
    }

    #[test]
    fn every_damage_is_corruption_never_a_panic() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(matches!(
                OutboxEntry::decode(&bytes[..cut]),
                Err(Error::Corruption(_))
            ));
        }
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(matches!(
                OutboxEntry::decode(&damaged),
                Err(Error::Corruption(_))
            ));
        }
    }

    #[test]
    fn outbox_keys_sort_by_sequence_and_parse_back() {
        assert!(outbox_key(1) < outbox_key(2));
        assert!(outbox_key(255) < outbox_key(256));
        assert_eq!(outbox_seq(&outbox_key(42)), Some(42));
        assert_eq!(outbox_seq(b"\x00offset"), None);
        assert_eq!(outbox_seq(&[1, 2, 3]), None);
    }
}
