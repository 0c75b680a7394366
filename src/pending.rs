//! A partition's changes that are logged in journal records but not yet in
//! a table: an exact in-memory index, checked after the Bloom front and
//! before RocksDB (`docs/design.md`, "The write path").
//!
//! Commits add their changes to the `live` set, under the partition's write
//! lock and after their write. A flush freezes the live set (readers go on
//! seeing it), writes it as a table, ingests the table and only then drops
//! the frozen set, so every change is always in memory, on disk, or both.
//! A lookup asks the live set, then the frozen one: the newest change of a
//! key wins.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::layout::Entry;

/// Changes by stored key: the entry after them, or `None` for a removal.
///
/// The keys are copied back to back into one buffer and the table holds
/// their places: a set of 100 000 changes is three allocations, not one per
/// key. Freeing a key at a time on the background thread, after the
/// commits had allocated them on the consumer's, was a fifth of the
/// flusher's time (`free` in a profile of `compare`), and a key's own
/// allocation cost the commit as much again.
pub(crate) struct Changes {
    keys: Vec<u8>,
    table: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
}

/// A key's place in [`Changes::keys`], and its newest change.
#[derive(Clone, Copy)]
struct Slot {
    at: usize,
    len: usize,
    entry: Option<Entry>,
}

impl Default for Changes {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Changes {
    /// Room for `changes` changes of `bytes` bytes of keys in all.
    pub(crate) fn with_capacity(changes: usize, bytes: usize) -> Self {
        Self {
            keys: Vec::with_capacity(bytes),
            table: HashTable::with_capacity(changes),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn key(&self, slot: &Slot) -> &[u8] {
        self.keys
            .get(slot.at..slot.at + slot.len)
            .unwrap_or_default()
    }

    /// The newest change of `key`, if it has one here.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<Entry>> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |slot| self.key(slot) == key)
            .map(|slot| slot.entry)
    }

    /// Records `entry` as `key`'s newest change.
    pub(crate) fn insert(&mut self, key: &[u8], entry: Option<Entry>) {
        let hash = self.hasher.hash_one(key);
        let (keys, hasher) = (&self.keys, &self.hasher);
        let found = self.table.find_mut(hash, |slot| {
            keys.get(slot.at..slot.at + slot.len) == Some(key)
        });
        if let Some(slot) = found {
            slot.entry = entry;
            return;
        }
        let slot = Slot {
            at: self.keys.len(),
            len: key.len(),
            entry,
        };
        self.keys.extend_from_slice(key);
        let keys = &self.keys;
        self.table.insert_unique(hash, slot, |s| {
            hasher.hash_one(keys.get(s.at..s.at + s.len).unwrap_or_default())
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Bytes of keys held.
    fn key_bytes(&self) -> usize {
        self.keys.len()
    }

    /// Every key and its newest change, in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], Option<Entry>)> {
        self.table.iter().map(|slot| (self.key(slot), slot.entry))
    }
}

/// Changes being written as a table, and the journal records they came from.
#[derive(Debug, Clone)]
pub(crate) struct Frozen {
    pub(crate) changes: Arc<Changes>,
    /// The journal records `[from, to)` whose changes these are.
    pub(crate) from: u64,
    pub(crate) to: u64,
}

/// One partition's index; see the module documentation.
#[derive(Debug)]
pub(crate) struct Pending {
    live: Changes,
    /// Journal bytes of the live changes (an upper bound: a key changed
    /// twice counts twice).
    live_bytes: usize,
    /// The first journal record whose changes are in `live`.
    live_from: u64,
    /// The next journal record's sequence number.
    next: u64,
    frozen: Option<Frozen>,
    /// Set by `retire`: the shard was revoked.
    retired: bool,
}

impl Pending {
    /// An empty index whose next journal record is `next`.
    pub(crate) fn new(next: u64) -> Self {
        Self {
            live: Changes::default(),
            live_bytes: 0,
            live_from: next,
            next,
            frozen: None,
            retired: false,
        }
    }

    /// The newest change of `key`, if it has one here: `Some(None)` is a
    /// removal, which hides whatever the disk holds.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<Entry>> {
        if let Some(e) = self.live.get(key) {
            return Some(e);
        }
        self.frozen.as_ref()?.changes.get(key)
    }

    /// The sequence number the next journal record takes.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next
    }

    /// Adds the changes of journal record `seq`, which a commit just wrote.
    pub(crate) fn apply<'a>(
        &mut self,
        seq: u64,
        bytes: usize,
        changes: impl IntoIterator<Item = (&'a [u8], Option<Entry>)>,
    ) {
        debug_assert_eq!(seq, self.next, "journal records are applied in order");
        for (key, entry) in changes {
            self.live.insert(key, entry);
        }
        self.live_bytes += bytes;
        self.next = seq + 1;
    }

    /// Journal bytes held by the live set.
    pub(crate) fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// Changes held (live and frozen; a key in both counts twice).
    pub(crate) fn len(&self) -> usize {
        self.live.len() + self.frozen.as_ref().map_or(0, |f| f.changes.len())
    }

    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// The frozen set, freezing the live one first if none is frozen.
    /// `None` if there is nothing to write.
    pub(crate) fn freeze(&mut self) -> Option<Frozen> {
        if self.retired {
            return None;
        }
        if self.frozen.is_none() {
            if self.live.is_empty() {
                return None;
            }
            // The next live set starts with room for as many changes as
            // this one took: growing a map of 100 000 keys by doubling was
            // a third of a commit's time (profile of `compare`).
            let room = Changes::with_capacity(self.live.len(), self.live.key_bytes());
            let changes = std::mem::replace(&mut self.live, room);
            self.frozen = Some(Frozen {
                changes: Arc::new(changes),
                from: self.live_from,
                to: self.next,
            });
            self.live_from = self.next;
            self.live_bytes = 0;
        }
        self.frozen.clone()
    }

    /// Drops the frozen set once its table is ingested and its records
    /// deleted.
    pub(crate) fn thaw(&mut self) {
        self.frozen = None;
    }

    /// Retires the index of a revoked shard (`Tables::retire`), whose
    /// changes are in a table or in journal records the partition's next
    /// reader writes: nothing is frozen again, so no flush of it writes
    /// anything. Its changes stay readable: a reader that looked the shard
    /// up before the revoke removed it must still find them (if the
    /// revoke's write failed, they are on disk only in records). Returns
    /// how many changes it holds.
    pub(crate) fn retire(&mut self) -> usize {
        self.retired = true;
        self.len()
    }

    /// Whether changes of records numbered below `target` are still held.
    pub(crate) fn holds_below(&self, target: u64) -> bool {
        let oldest = self.frozen.as_ref().map_or(self.live_from, |f| f.from);
        !self.retired && oldest < target && self.len() > 0
    }

    /// Whether the shard was retired (revoked).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired
    }

    /// How many of the shard's journal records are still on disk, as far
    /// as the shard knows (those of its frozen and live changes).
    pub(crate) fn records(&self) -> u64 {
        let from = self.frozen.as_ref().map_or(self.live_from, |f| f.from);
        self.next - from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(t: u64) -> Option<Entry> {
        Some(Entry::Done { expires_at: t })
    }

    #[test]
    fn the_newest_change_wins_and_a_removal_hides_the_disk() {
        let mut p = Pending::new(5);
        assert_eq!(p.get(b"a"), None);
        p.apply(5, 10, [(&b"a"[..], done(1)), (&b"b"[..], done(2))]);
        let frozen = p.freeze().unwrap();
        assert_eq!((frozen.from, frozen.to), (5, 6));
        assert_eq!(p.live_bytes(), 0);
        p.apply(6, 10, [(&b"a"[..], None)]);
        assert_eq!(p.get(b"a"), Some(None), "live over frozen");
        assert_eq!(p.get(b"b"), Some(done(2)), "frozen still answers");
        // A second freeze while one is frozen returns the same set.
        let again = p.freeze().unwrap();
        assert_eq!((again.from, again.to), (5, 6));
        p.thaw();
        assert_eq!(p.get(b"b"), None);
        let next = p.freeze().unwrap();
        assert_eq!((next.from, next.to), (6, 7));
        assert_eq!(p.next_seq(), 7);
        p.thaw();
        assert!(p.freeze().is_none(), "nothing left to write");
    }

    #[test]
    fn a_retired_index_answers_but_is_never_frozen_again() {
        let mut p = Pending::new(0);
        p.apply(0, 10, [(&b"a"[..], done(1))]);
        assert!(p.freeze().is_some());
        p.apply(1, 10, [(&b"b"[..], done(2))]);
        assert!(p.holds_below(2));
        assert_eq!(p.retire(), 2);
        // A reader that still holds the revoked shard finds its changes:
        // if the revoke's table failed, they are on disk only in records.
        assert_eq!(p.get(b"a"), Some(done(1)));
        assert_eq!(p.get(b"b"), Some(done(2)));
        // No flush of it writes anything, frozen set included.
        assert!(p.freeze().is_none());
        assert!(!p.holds_below(2));
    }

    #[test]
    fn holds_below_tells_the_changes_of_older_records_from_newer_ones() {
        let mut p = Pending::new(3);
        assert!(!p.holds_below(10), "nothing held");
        p.apply(3, 10, [(&b"a"[..], done(1))]);
        assert!(p.holds_below(4));
        assert!(!p.holds_below(3), "record 3 is not below 3");
        p.freeze().unwrap();
        p.apply(4, 10, [(&b"b"[..], done(1))]);
        assert!(p.holds_below(4), "the frozen record 3");
        p.thaw();
        assert!(!p.holds_below(4), "only record 4 is left");
        assert!(p.holds_below(5));
    }
}
