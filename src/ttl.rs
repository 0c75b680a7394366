//! Expiry: when a key's entry ([`Entry`], encoded in [`crate::layout`])
//! stops counting, and the compaction filter that drops expired entries from
//! disk.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};

use crate::clock::TimeKeeper;
use crate::config::TimeDomain;
use crate::layout::{Entry, MARK_TAG, SOURCE_PREFIX};
use crate::sequence::SourceState;
use crate::Partition;

impl Entry {
    /// Whether the entry must stay on disk: marks while live; claims for
    /// `grace_ms` (the store's claim grace, fixed at creation) past their
    /// lease, so that a processor whose lease ran out can still confirm while
    /// nobody took the key over (see `Batch::confirm`).
    pub(crate) fn is_retained(&self, partition_now: u64, clock_now: u64, grace_ms: u64) -> bool {
        match *self {
            Self::Done { .. } => self.is_live(partition_now, clock_now),
            Self::Claimed { lease_until, .. } => is_live(expiry(lease_until, grace_ms), clock_now),
        }
    }

    /// Whether the entry still counts at partition time `partition_now`
    /// (marks) and processing time `clock_now` (claims' leases).
    pub(crate) fn is_live(&self, partition_now: u64, clock_now: u64) -> bool {
        match *self {
            Self::Done { expires_at } => is_live(expires_at, partition_now),
            Self::Claimed { lease_until, .. } => is_live(lease_until, clock_now),
        }
    }
}

/// "Now" for marks at clock time `clock`: the clock under processing time,
/// the partition's `watermark` under event time. The one place that decides
/// it (reads, commits, rebuilds, snapshots and the compaction filter).
pub(crate) fn partition_time(domain: TimeDomain, clock: u64, watermark: u64) -> u64 {
    match domain {
        TimeDomain::ProcessingTime => clock,
        TimeDomain::EventTime => watermark,
    }
}

/// A deadline `at` is still ahead exactly while `now < at`.
pub(crate) fn is_live(at: u64, now: u64) -> bool {
    now < at
}

/// The expiry of a mark made at `now` with time-to-live `ttl_ms`.
pub(crate) fn expiry(now: u64, ttl_ms: u64) -> u64 {
    now.saturating_add(ttl_ms)
}

/// What a partition's compaction filter needs to know, shared with the shard.
#[derive(Debug, Default)]
pub(crate) struct CfShared {
    /// Expired entries removed by compaction since the store was opened.
    pub(crate) dropped: AtomicU64,
    /// How much of `dropped` has been published to the `metrics` facade
    /// (see `ShardMetrics`): kept here, with the count, because the column
    /// family outlives the shards of its partition's assignments.
    pub(crate) dropped_published: AtomicU64,
    /// The partition's event-time watermark as far as it is durable
    /// (event-time stores only): raised only once a log fsync made a write
    /// of it durable (`Store::sync`, `close`, commits under
    /// `Durability::Sync`), or from what `assign` reads back from disk. Zero
    /// until the partition is assigned, so nothing is dropped by event time
    /// before the real watermark is known.
    pub(crate) watermark: AtomicU64,
}

/// Installs the expiry compaction filter on a partition's column family
/// options. It removes marks and claims that no longer count and counts them
/// in `shared.dropped`; everything else (partition metadata, malformed
/// values) is kept, so a damaged value is reported on read rather than
/// silently discarded.
///
/// It is installed as a factory, which RocksDB owns, so that it lives exactly
/// as long as the column family does. `cf_name` names the partition in the
/// event each compaction logs at its end.
pub(crate) fn install_compaction_filter(
    opts: &mut rocksdb::Options,
    time: Arc<TimeKeeper>,
    domain: TimeDomain,
    grace_ms: u64,
    shared: Arc<CfShared>,
    cf_name: &str,
) {
    let partition =
        Partition::from_cf_name(cf_name).map_or_else(|| cf_name.into(), |p| p.to_string().into());
    opts.set_compaction_filter_factory(ExpiryFilterFactory {
        time,
        domain,
        grace_ms,
        shared,
        partition,
    });
}

struct ExpiryFilterFactory {
    time: Arc<TimeKeeper>,
    domain: TimeDomain,
    /// The claim grace, fixed at creation: the same on every run, so that
    /// whether compaction ran never changes what `confirm` answers.
    grace_ms: u64,
    shared: Arc<CfShared>,
    /// The partition, as its events name it.
    partition: Arc<str>,
}

impl CompactionFilterFactory for ExpiryFilterFactory {
    type Filter = ExpiryFilter;

    fn create(&mut self, context: CompactionFilterContext) -> ExpiryFilter {
        // One reading per compaction: every entry is judged at the same time,
        // never later than the time the ledger recorded durably, nor past the
        // durable watermark.
        let clock_now = self.time.compaction_now();
        let watermark = self.shared.watermark.load(Ordering::Acquire);
        let partition_now = partition_time(self.domain, clock_now, watermark);
        ExpiryFilter {
            partition_now,
            clock_now,
            grace_ms: self.grace_ms,
            shared: self.shared.clone(),
            partition: self.partition.clone(),
            full: context.is_full_compaction,
            manual: context.is_manual_compaction,
            entries: 0,
            dropped: 0,
        }
    }

    fn name(&self) -> &CStr {
        c"exactly.expiry"
    }
}

/// The filter of one compaction: RocksDB drops it when the compaction ends,
/// which is when its result is logged.
struct ExpiryFilter {
    partition_now: u64,
    clock_now: u64,
    grace_ms: u64,
    shared: Arc<CfShared>,
    partition: Arc<str>,
    full: bool,
    manual: bool,
    /// Marks and claims this compaction judged, and those it removed.
    entries: u64,
    dropped: u64,
}

impl Drop for ExpiryFilter {
    fn drop(&mut self) {
        // On RocksDB's background thread; once per compaction, not per key.
        tracing::debug!(
            partition = %self.partition,
            entries = self.entries,
            dropped = self.dropped,
            full = self.full,
            manual = self.manual,
            partition_now = self.partition_now,
            "compaction filtered the partition's marks"
        );
    }
}

impl CompactionFilter for ExpiryFilter {
    fn filter(&mut self, _level: u32, key: &[u8], value: &[u8]) -> Decision {
        if key.starts_with(SOURCE_PREFIX) {
            // A sequence source idle past its expiry, judged like a mark.
            self.entries += 1;
            return match SourceState::decode(value) {
                Some(s) if !s.is_live(self.partition_now) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.dropped += 1;
                    Decision::Remove
                }
                _ => Decision::Keep,
            };
        }
        if key.first() != Some(&MARK_TAG) {
            return Decision::Keep;
        }
        self.entries += 1;
        match Entry::decode(value) {
            Some(entry)
                if !entry.is_retained(self.partition_now, self.clock_now, self.grace_ms) =>
            {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped += 1;
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }

    fn name(&self) -> &CStr {
        c"exactly.expiry"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_boundary_is_exclusive() {
        let e = expiry(1_000, 500);
        assert_eq!(e, 1_500);
        assert!(is_live(e, 1_499));
        assert!(!is_live(e, 1_500));
        assert_eq!(expiry(u64::MAX - 1, 10), u64::MAX);
    }

    #[test]
    fn claims_live_by_the_clock_marks_by_partition_time() {
        let claim = Entry::Claimed {
            lease_until: 100,
            epoch: 0,
            token: 1,
        };
        assert!(claim.is_live(1_000, 99));
        assert!(!claim.is_live(0, 100));
        let done = Entry::Done { expires_at: 100 };
        assert!(done.is_live(99, 1_000));
        assert!(!done.is_live(100, 0));
    }
}
