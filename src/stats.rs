//! Counters a store reports through [`crate::Store::stats`], and their
//! publication through the `metrics` facade.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

use crate::Partition;

/// A snapshot of the store's counters, per assigned partition.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Stats {
    /// One entry per assigned partition.
    pub partitions: BTreeMap<Partition, PartitionStats>,
}

/// Counters of one partition. Event counters start at zero when the
/// partition is assigned; `expired_dropped` counts since the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// RocksDB's estimate of the keys on disk, with the changes held in
    /// memory counted instead of their journal records (includes expired
    /// marks not yet compacted away).
    pub live_keys_estimate: u64,
    /// Keys and sequence numbers checked (by `check`, `check_and_mark`,
    /// `mark`, their sequence forms, and batches).
    pub checks: u64,
    /// Checks answered `Duplicate`.
    pub duplicates: u64,
    /// Checks answered `New` by the Bloom filter alone, without a disk read.
    pub bloom_negatives: u64,
    /// Bloom positives that RocksDB showed to be absent or expired.
    pub bloom_false_positives: u64,
    /// Expired marks (and idle sequence sources) removed by compaction.
    pub expired_dropped: u64,
    /// Bytes held by the partition's in-memory filter.
    pub filter_bytes: usize,
    /// The committed consumer offset.
    pub committed_offset: Option<i64>,
    /// Whether `assign` loaded the filter from the snapshot saved at the last
    /// clean close or revoke, instead of scanning the partition's marks.
    pub filter_from_snapshot: bool,
    /// Sequence sources the partition remembers (sequence mode).
    pub sources: u64,
    /// Changes (marks, claims, removals) held in memory until the table
    /// that writes them is ingested: the index of recent changes, at most
    /// about two tables' worth ([`crate::Options::table_bytes`]).
    pub pending_changes: u64,
}

/// Per-partition counters since the shard was assigned.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) checks: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) bloom_negatives: AtomicU64,
    pub(crate) bloom_false_positives: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A partition's handles on the `metrics` facade (see `docs/operations.md`,
/// Metrics), registered once when its shard is created, so that no
/// registry lookup happens after `assign`.
///
/// The shard's atomic [`Counters`] stay the source: they are published as
/// deltas at each batch commit, at [`Store::stats`](crate::Store::stats),
/// `compact` and revoke, never per key. Exported counters therefore count
/// since the process started (across reassignments), while
/// [`PartitionStats`] counts since the partition was assigned.
pub(crate) struct ShardMetrics {
    checks: Published,
    duplicates: Published,
    bloom_negatives: Published,
    bloom_false_positives: Published,
    expired_dropped: Counter,
    marks_live: Gauge,
    filter_bytes: Gauge,
    committed_offset: Gauge,
    commit_seconds: Histogram,
    /// When the shard was created; `refreshed_ms` counts from it.
    created: Instant,
    /// When a commit last refreshed the gauges, in ms since `created`.
    refreshed_ms: AtomicU64,
    /// What the gauges were last set from; held while they are set, so that
    /// a revoke and a racing `stats()` or commit set them in one order.
    gauges: parking_lot::Mutex<GaugeState>,
}

/// See [`ShardMetrics::gauges`].
#[derive(Default)]
struct GaugeState {
    /// Revoked: the gauges read zero and are set no more by this shard (a
    /// `stats()` that found the shard before it left the map comes late).
    revoked: bool,
    /// The highest committed offset the gauge was set to: a `stats()` that
    /// read the offset before a commit must not set it back.
    offset: Option<i64>,
}

/// A counter handle and the value of the source counter published so far.
struct Published {
    counter: Counter,
    published: AtomicU64,
}

impl Published {
    fn new(counter: Counter) -> Self {
        Self {
            counter,
            published: AtomicU64::new(0),
        }
    }

    fn publish(&self, source: &AtomicU64) {
        publish_delta(
            &self.counter,
            &self.published,
            source.load(Ordering::Relaxed),
        );
    }
}

/// Adds to `counter` what `now` (a monotonic source counter) gained since
/// `published`. A commit and `stats()` may publish at once: the highest
/// value wins, so each increment is published exactly once.
fn publish_delta(counter: &Counter, published: &AtomicU64, now: u64) {
    if published.load(Ordering::Relaxed) >= now {
        return;
    }
    let before = published.fetch_max(now, Ordering::Relaxed);
    if now > before {
        counter.increment(now - before);
    }
}

/// The least time between two refreshes of a partition's gauges by
/// commits. The refresh reads RocksDB's key estimate (a property read) and
/// the filter's size under its read lock: `stats()` of one partition, which
/// does the same, took 205–470 ns on the 2-core development machine. Nothing
/// beside a batch of 1 000 keys, but 5–10 % of a single-key call (4–7 µs),
/// which commits on its own.
const GAUGE_REFRESH_MS: u64 = 1_000;

impl ShardMetrics {
    /// Registers the partition's metrics with the installed recorder (no-op
    /// handles if none is installed yet).
    pub(crate) fn new(partition: &Partition) -> Self {
        describe();
        let topic = partition.topic().to_owned();
        let number = partition.partition().to_string();
        let labels = [("topic", topic), ("partition", number)];
        Self {
            checks: Published::new(counter!(CHECKS, &labels)),
            duplicates: Published::new(counter!(DUPLICATES, &labels)),
            bloom_negatives: Published::new(counter!(BLOOM_NEGATIVES, &labels)),
            bloom_false_positives: Published::new(counter!(BLOOM_FALSE_POSITIVES, &labels)),
            expired_dropped: counter!(EXPIRED_DROPPED, &labels),
            marks_live: gauge!(MARKS_LIVE, &labels),
            filter_bytes: gauge!(FILTER_BYTES, &labels),
            committed_offset: gauge!(COMMITTED_OFFSET, &labels),
            commit_seconds: histogram!(COMMIT_SECONDS, &labels),
            created: Instant::now(),
            refreshed_ms: AtomicU64::new(0),
            gauges: parking_lot::Mutex::new(GaugeState::default()),
        }
    }

    /// Sets the offset gauge to the partition's offset at assign (zero when
    /// it has none: deleted, or new).
    pub(crate) fn assigned(&self, offset: Option<i64>) {
        let mut state = self.gauges.lock();
        state.offset = offset;
        self.committed_offset.set(offset.unwrap_or(0) as f64);
    }

    /// Sets the offset gauge to `offset` unless it is lower than what the
    /// gauge shows, or the shard was revoked.
    fn set_offset(&self, state: &mut GaugeState, offset: Option<i64>) {
        let Some(offset) = offset else { return };
        if state.revoked || state.offset.is_some_and(|o| o > offset) {
            return;
        }
        state.offset = Some(offset);
        self.committed_offset.set(offset as f64);
    }

    /// Publishes the counters: the shard's, and `dropped`, the expired marks
    /// that the partition's compaction filter dropped, of which
    /// `dropped_published` are published (both live with the column family,
    /// which outlives the shard).
    pub(crate) fn publish_counters(
        &self,
        counters: &Counters,
        dropped: &AtomicU64,
        dropped_published: &AtomicU64,
    ) {
        self.checks.publish(&counters.checks);
        self.duplicates.publish(&counters.duplicates);
        self.bloom_negatives.publish(&counters.bloom_negatives);
        self.bloom_false_positives
            .publish(&counters.bloom_false_positives);
        publish_delta(
            &self.expired_dropped,
            dropped_published,
            dropped.load(Ordering::Relaxed),
        );
    }

    /// Records a commit that wrote, begun at `started`, with the offset it
    /// committed; returns whether the gauges are due for a refresh (at most
    /// once per [`GAUGE_REFRESH_MS`]). Call with the write lock held.
    pub(crate) fn committed(&self, started: Instant, offset: Option<i64>) -> bool {
        let now = Instant::now();
        self.commit_seconds.record(now.duration_since(started));
        self.set_offset(&mut self.gauges.lock(), offset);
        let ms = u64::try_from(now.duration_since(self.created).as_millis()).unwrap_or(u64::MAX);
        let due = ms.saturating_sub(self.refreshed_ms.load(Ordering::Relaxed)) >= GAUGE_REFRESH_MS;
        if due {
            self.refreshed_ms.store(ms, Ordering::Relaxed);
        }
        due
    }

    /// Sets the gauges of live marks, filter memory and committed offset.
    pub(crate) fn set_gauges(&self, live_keys: u64, filter_bytes: usize, offset: Option<i64>) {
        let mut state = self.gauges.lock();
        if state.revoked {
            return;
        }
        self.marks_live.set(live_keys as f64);
        self.filter_bytes.set(filter_bytes as f64);
        self.set_offset(&mut state, offset);
    }

    /// The partition was revoked: its filter is freed and nothing refreshes
    /// its gauges any more, so they read zero (the committed offset keeps
    /// its last value, which stays true on disk).
    pub(crate) fn revoked(&self) {
        let mut state = self.gauges.lock();
        state.revoked = true;
        self.marks_live.set(0.0);
        self.filter_bytes.set(0.0);
    }

    /// The partition was deleted: its offset gauge reads zero, as a new
    /// partition's does.
    pub(crate) fn deleted(&self) {
        let mut state = self.gauges.lock();
        state.revoked = true;
        state.offset = None;
        self.committed_offset.set(0.0);
    }
}

/// Keys checked (counter).
pub(crate) const CHECKS: &str = "exactly_checks_total";
/// Checks answered `Duplicate` (counter).
pub(crate) const DUPLICATES: &str = "exactly_duplicates_total";
/// Checks answered by the Bloom filter alone (counter).
pub(crate) const BLOOM_NEGATIVES: &str = "exactly_bloom_negatives_total";
/// Bloom positives found absent or expired on disk (counter).
pub(crate) const BLOOM_FALSE_POSITIVES: &str = "exactly_bloom_false_positives_total";
/// Expired marks dropped by compaction (counter).
pub(crate) const EXPIRED_DROPPED: &str = "exactly_expired_dropped_total";
/// RocksDB's estimate of the partition's keys (gauge).
pub(crate) const MARKS_LIVE: &str = "exactly_marks_live";
/// Bytes of the partition's Bloom front (gauge).
pub(crate) const FILTER_BYTES: &str = "exactly_filter_bytes";
/// The partition's committed offset (gauge).
pub(crate) const COMMITTED_OFFSET: &str = "exactly_committed_offset";
/// Latency of batch commits that wrote (histogram, seconds).
pub(crate) const COMMIT_SECONDS: &str = "exactly_commit_seconds";

/// Describes the store's metrics to the recorder: at every assign, which is
/// rare, so that a recorder installed after an earlier store still gets them.
fn describe() {
    describe_counter!(
        CHECKS,
        Unit::Count,
        "Keys checked (check, check_and_mark, mark, batches)."
    );
    describe_counter!(DUPLICATES, Unit::Count, "Checks answered Duplicate.");
    describe_counter!(
        BLOOM_NEGATIVES,
        Unit::Count,
        "Checks answered New by the Bloom filter alone, without a disk read."
    );
    describe_counter!(
        BLOOM_FALSE_POSITIVES,
        Unit::Count,
        "Bloom positives that RocksDB showed to be absent or expired."
    );
    describe_counter!(
        EXPIRED_DROPPED,
        Unit::Count,
        "Expired marks removed by compaction."
    );
    describe_gauge!(
        MARKS_LIVE,
        Unit::Count,
        "RocksDB's estimate of the partition's keys (expired marks not yet compacted included); 0 once revoked."
    );
    describe_gauge!(
        FILTER_BYTES,
        Unit::Bytes,
        "Bytes held by the partition's Bloom front; 0 once revoked."
    );
    describe_gauge!(
        COMMITTED_OFFSET,
        "The partition's committed consumer offset."
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Latency of batch commits that wrote: validation, the atomic write and what it publishes."
    );
}
