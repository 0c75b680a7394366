//! Counters a store reports through [`crate::Store::stats`].

use std::collections::BTreeMap;

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
    /// RocksDB's estimate of the keys on disk (includes expired marks not yet
    /// compacted away).
    pub live_keys_estimate: u64,
    /// Keys checked (by `check`, `check_and_mark`, `mark` and batches).
    pub checks: u64,
    /// Checks answered `Duplicate`.
    pub duplicates: u64,
    /// Checks answered `New` by the Bloom filter alone, without a disk read.
    pub bloom_negatives: u64,
    /// Bloom positives that RocksDB showed to be absent or expired.
    pub bloom_false_positives: u64,
    /// Expired marks removed by compaction.
    pub expired_dropped: u64,
    /// Bytes held by the partition's in-memory filter.
    pub filter_bytes: usize,
    /// The committed consumer offset.
    pub committed_offset: Option<i64>,
    /// Whether `assign` loaded the filter from the snapshot saved at the last
    /// clean close or revoke, instead of scanning the partition's marks.
    pub filter_from_snapshot: bool,
}
