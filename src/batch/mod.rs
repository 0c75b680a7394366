//! A poll batch: marks, claims' outcomes and the consumer offset, written in
//! one atomic write. Every write operation of the store runs through a batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{TimeDomain, TtlRefresh, MAX_TTL};
use crate::engine::{Cf, Engine, ValidKey};
use crate::error::{Error, Result};
use crate::layout::Entry;
use crate::outbox::{OutboxEntry, OutboxRecord};
use crate::sequence::SourceState;
use crate::shard::{Counters, Shard, WriterGuard};
use crate::ttl::expiry;
use crate::verdict::Verdict;

mod changelog;
mod claims;
mod commit;
mod sequence;

#[cfg(feature = "kafka")]
pub(crate) use claims::Taken;

/// The time of one operation: the store's clock, and the partition's time
/// for marks (the same, or the event-time watermark).
#[derive(Debug, Clone, Copy)]
struct Now {
    clock: u64,
    partition: u64,
}

/// A key found new by [`Batch::check_for_mark`], in its stored form.
#[derive(Debug)]
// Marked only by the Kafka loop.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) struct Checked {
    stored_key: Vec<u8>,
}

/// A staged change to one key.
#[derive(Debug, Clone, Copy)]
struct Staged {
    /// The key's entry after the batch (`None`: deleted).
    entry: Option<Entry>,
    /// Whether a claim is made or ended, so the shard's claim table changes.
    claims: bool,
    /// The removal ends a claim (a release): the claim's token, for the
    /// changelog.
    release: Option<u64>,
}

/// An open batch on one partition; see [`Store::batch`](crate::Store::batch).
///
/// The batch holds the partition's write lock from `Store::batch` until it
/// is committed or dropped: other threads' writes to the same partition wait,
/// reads do not. Dropping it without [`commit`](Self::commit) writes nothing.
pub struct Batch<'s> {
    engine: &'s Engine,
    shard: Arc<Shard>,
    cf: Cf<'s>,
    // Released after `Drop::drop` has cleared the holder.
    _writer: WriterGuard,
    staged: HashMap<Vec<u8>, Staged, foldhash::quality::RandomState>,
    /// Sequence sources' states after the batch, by source.
    staged_sources: HashMap<Vec<u8>, SourceState, foldhash::quality::RandomState>,
    marks: usize,
    offset: Option<i64>,
    fence: Option<u64>,
    new_epoch: Option<u64>,
    max_event_time: Option<u64>,
    /// Set when the batch's changes go to the partition's changelog: the
    /// input offset of its first message, and the records staged with it,
    /// each with the input offset of the message that staged it.
    outbox: Option<(i64, Vec<(i64, OutboxRecord)>)>,
    /// The input offset of the message being handled (changelog loop).
    input: Option<i64>,
    /// The changelog position a restore batch moves to.
    changelog_next: Option<i64>,
    /// The changelog progress a restore batch records.
    changelog_progress: Option<i64>,
}

/// What a committed batch left in the outbox: its sequence number and entry.
pub(crate) type Published = (u64, OutboxEntry);

impl<'s> Batch<'s> {
    pub(crate) fn new(
        engine: &'s Engine,
        shard: Arc<Shard>,
        cf: Cf<'s>,
        writer: WriterGuard,
    ) -> Self {
        shard.set_holder();
        // Room for as many changes as the partition's last batch staged:
        // growing the map from a small size rehashed it four times in a
        // batch of 1 000 (6 % of a batch's time in a profile of `compare`).
        let room = shard.staged_hint().clamp(16, 1 << 16);
        Self {
            engine,
            shard,
            cf,
            _writer: writer,
            staged: HashMap::with_capacity_and_hasher(
                room,
                foldhash::quality::RandomState::default(),
            ),
            staged_sources: HashMap::with_hasher(foldhash::quality::RandomState::default()),
            marks: 0,
            offset: None,
            fence: None,
            new_epoch: None,
            max_event_time: None,
            outbox: None,
            input: None,
            changelog_next: None,
            changelog_progress: None,
        }
    }

    /// Checks `key` and, if it is new, marks it in this batch. A key seen
    /// twice in one batch is `New` the first time and `Duplicate` after. A
    /// key with a live claim is `Duplicate` (someone is processing it).
    pub fn check_and_mark(&mut self, key: &[u8]) -> Result<Verdict> {
        let key = self.engine.validate_key(key)?;
        self.check_and_mark_valid(key, None, None)
    }

    /// Whether `key` has a live mark or claim, as this batch sees it: its own
    /// staged changes first, then the store. Marks nothing. The batch holds
    /// the partition's write lock, so a `New` answer holds until the batch
    /// commits or is dropped: no other writer can mark the key meanwhile (a
    /// `Duplicate` may expire).
    pub fn check(&self, key: &[u8]) -> Result<Verdict> {
        Ok(match self.check_for_mark(key)? {
            Some(_) => Verdict::New,
            None => Verdict::Duplicate,
        })
    }

    /// Marks `key` as processed in this batch; see
    /// [`check_and_mark`](Self::check_and_mark). A key that already has a
    /// live mark keeps it (and its expiry); a key with a live claim is left
    /// to the claim's holder.
    pub fn mark(&mut self, key: &[u8]) -> Result<()> {
        self.check_and_mark(key).map(|_| ())
    }

    /// The first half of a check-and-mark split around a side effect: checks
    /// `key` once, and if it is new returns what
    /// [`mark_checked`](Self::mark_checked) needs to mark it without reading
    /// again. `None`: a duplicate.
    pub(crate) fn check_for_mark(&self, key: &[u8]) -> Result<Option<Checked>> {
        let key = self.engine.validate_key(key)?;
        let k = self.engine.stored_key(key);
        Counters::bump(&self.shard.counters.checks);
        match self.current(&k, self.times())?.0 {
            Some(_) => {
                Counters::bump(&self.shard.counters.duplicates);
                Ok(None)
            }
            None => Ok(Some(Checked { stored_key: k })),
        }
    }

    /// Marks a key [`check_for_mark`](Self::check_for_mark) found new. The
    /// batch has held the write lock since, so it is still new; its TTL
    /// starts now.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn mark_checked(&mut self, checked: Checked) {
        let expires_at = expiry(self.partition_now(), self.engine.ttl_millis());
        self.stage(checked.stored_key, Some(Entry::Done { expires_at }), false);
        self.marks += 1;
    }

    /// [`check_and_mark`](Self::check_and_mark) for a message with event
    /// time `event_time` (ms since the Unix epoch). Under
    /// [`TimeDomain::EventTime`] the mark expires `ttl` after `event_time`,
    /// and the partition's event time advances to it at commit; under
    /// processing time the event time is not used.
    pub fn check_and_mark_at(&mut self, key: &[u8], event_time: u64) -> Result<Verdict> {
        let key = self.engine.validate_key(key)?;
        self.check_and_mark_valid(key, Some(event_time), None)
    }

    /// [`mark`](Self::mark) with event time; see
    /// [`check_and_mark_at`](Self::check_and_mark_at).
    pub fn mark_at(&mut self, key: &[u8], event_time: u64) -> Result<()> {
        self.check_and_mark_at(key, event_time).map(|_| ())
    }

    /// [`mark`](Self::mark) with a TTL of its own instead of the store's, for
    /// keys that must be remembered longer (or shorter). From 1 ms to 100
    /// years. A key already live follows [`TtlRefresh`] like any mark.
    pub fn mark_with_ttl(&mut self, key: &[u8], ttl: Duration) -> Result<()> {
        let key = self.engine.validate_key(key)?;
        let ttl_ms = mark_ttl_millis(ttl)?;
        self.check_and_mark_valid(key, None, Some(ttl_ms))
            .map(|_| ())
    }

    /// Removes `key`'s mark or claim in this batch. Returns whether it had a
    /// live one.
    pub fn unmark(&mut self, key: &[u8]) -> Result<bool> {
        let key = self.engine.validate_key(key)?;
        self.unmark_valid(key)
    }

    /// [`unmark`](Self::unmark) of a validated key.
    pub(crate) fn unmark_valid(&mut self, key: ValidKey<'_>) -> Result<bool> {
        let k = self.engine.stored_key(key);
        let (current, had_claim) = self.current(&k, self.times())?;
        self.stage(k, None, had_claim);
        Ok(current.is_some())
    }

    /// Sets the consumer offset to commit with the marks: the offset of the
    /// next message to consume (Kafka's convention: last processed + 1).
    /// Checked at [`commit`](Self::commit): it must not be negative nor behind
    /// the partition's committed offset.
    pub fn set_offset(&mut self, offset: i64) {
        self.offset = Some(offset);
    }

    /// Writes this batch under `epoch`, the epoch under which the caller holds
    /// the partition (see
    /// [`Store::assign_with_epoch`](crate::Store::assign_with_epoch)). If the partition has
    /// been assigned under another epoch since, [`commit`](Self::commit) fails
    /// with [`Error::Fenced`] and writes nothing: a zombie consumer cannot
    /// write after a rebalance.
    pub fn fence(&mut self, epoch: u64) {
        self.fence = Some(epoch);
    }

    /// Keys (and sequence numbers) marked in this batch so far.
    pub fn len(&self) -> usize {
        self.marks
    }

    /// Whether the batch marks no key and no sequence number.
    pub fn is_empty(&self) -> bool {
        self.marks == 0
    }

    // ---- crate-internal ----

    /// Stages a new epoch for the partition; see
    /// [`Store::assign_with_epoch`](crate::Store::assign_with_epoch).
    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.new_epoch = Some(epoch);
    }

    /// Checks and marks a validated key, with an event time and a TTL of its
    /// own if given.
    pub(crate) fn check_and_mark_valid(
        &mut self,
        key: ValidKey<'_>,
        event_time: Option<u64>,
        ttl_ms: Option<u64>,
    ) -> Result<Verdict> {
        let k = self.engine.stored_key(key);
        Counters::bump(&self.shard.counters.checks);
        let now = self.times();
        let base = match (self.engine.time_domain(), event_time) {
            (TimeDomain::EventTime, Some(t)) => {
                self.max_event_time = Some(self.max_event_time.map_or(t, |m| m.max(t)));
                t
            }
            _ => now.partition,
        };
        let expires_at = expiry(base, ttl_ms.unwrap_or(self.engine.ttl_millis()));
        // A key not staged yet (the common case) costs one probe of the
        // staging map and one insert, not the three of `current` and
        // `stage`.
        let staged = self.staged.contains_key(&k);
        let current = if staged {
            self.current(&k, now)?.0
        } else {
            self.engine
                .lookup(&self.shard, Some(&self.cf), &k, now.partition, now.clock)?
        };
        match current {
            Some(current) => {
                Counters::bump(&self.shard.counters.duplicates);
                if let Entry::Done { expires_at: old } = current {
                    if self.engine.ttl_refresh() == TtlRefresh::OnDuplicate && expires_at > old {
                        self.stage(k, Some(Entry::Done { expires_at }), false);
                    }
                }
                Ok(Verdict::Duplicate)
            }
            None if !staged => {
                self.staged.insert(
                    k,
                    Staged {
                        entry: Some(Entry::Done { expires_at }),
                        claims: false,
                        release: None,
                    },
                );
                self.marks += 1;
                Ok(Verdict::New)
            }
            None => {
                self.stage(k, Some(Entry::Done { expires_at }), false);
                self.marks += 1;
                Ok(Verdict::New)
            }
        }
    }

    /// The live entry of stored key `k` as this batch sees it (staged changes
    /// first, then the store), and whether it is a claim.
    fn current(&self, k: &[u8], now: Now) -> Result<(Option<Entry>, bool)> {
        if let Some(staged) = self.staged.get(k) {
            // What this batch wrote counts for the rest of the batch, even if
            // the clock moved past its expiry meanwhile: a key seen twice in
            // one batch is `New`, then `Duplicate`.
            let entry = staged.entry;
            return Ok((entry, matches!(entry, Some(Entry::Claimed { .. }))));
        }
        let entry = self
            .engine
            .lookup(&self.shard, Some(&self.cf), k, now.partition, now.clock)?;
        Ok((entry, matches!(entry, Some(Entry::Claimed { .. }))))
    }

    fn stage(&mut self, k: Vec<u8>, entry: Option<Entry>, claims: bool) {
        let claims = claims || self.staged.get(&k).is_some_and(|s| s.claims);
        self.staged.insert(
            k,
            Staged {
                entry,
                claims,
                release: None,
            },
        );
    }

    /// Stages the removal of claim `token` (a release): to the changelog it
    /// is a removal that applies only over that claim (see
    /// [`Change::release`]).
    fn stage_release(&mut self, k: Vec<u8>, token: u64) {
        self.staged.insert(
            k,
            Staged {
                entry: None,
                claims: true,
                release: Some(token),
            },
        );
    }

    /// "Now" for marks: the clock, or the partition's watermark under event time.
    fn partition_now(&self) -> u64 {
        self.times().partition
    }

    /// One reading of the clock, and the partition's time derived from it.
    fn times(&self) -> Now {
        let clock = self.engine.now();
        let partition = self.shard.partition_now(self.engine.time_domain(), clock);
        Now { clock, partition }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.shard.clear_holder();
    }
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("partition", &self.shard.partition)
            .field("marks", &self.marks)
            .field("offset", &self.offset)
            .field("fence", &self.fence)
            .finish()
    }
}

/// A mark's own TTL in milliseconds, if it is in range (1 ms to 100 years).
pub(crate) fn mark_ttl_millis(ttl: Duration) -> Result<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ttl_ms == 0 || ttl > MAX_TTL {
        return Err(Error::InvalidOptions(format!(
            "a mark's ttl must be between 1 ms and 100 years, got {ttl:?}"
        )));
    }
    Ok(ttl_ms)
}
