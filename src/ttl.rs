//! Expiry: how a mark's value encodes when it expires, and the compaction
//! filter that drops expired marks from disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::ffi::CStr;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};

use crate::clock::TimeKeeper;
use crate::shard::MARK_TAG;

/// Tag of a processed mark's value: `[MARK_DONE, expires_at_ms: u64 BE]`.
pub(crate) const MARK_DONE: u8 = 1;
/// Length of an encoded mark value.
pub(crate) const MARK_VALUE_LEN: usize = 9;

/// Encodes a mark that expires at `expires_at` (ms since the Unix epoch).
pub(crate) fn encode_mark(expires_at: u64) -> [u8; MARK_VALUE_LEN] {
    let mut v = [0u8; MARK_VALUE_LEN];
    v[0] = MARK_DONE;
    v[1..].copy_from_slice(&expires_at.to_be_bytes());
    v
}

/// Decodes a mark value into its expiry time; `None` if it is malformed.
pub(crate) fn decode_mark(value: &[u8]) -> Option<u64> {
    match value {
        [MARK_DONE, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            Some(u64::from_be_bytes(b))
        }
        _ => None,
    }
}

/// A mark is live (its key is a duplicate) exactly while `now < expires_at`.
pub(crate) fn is_live(expires_at: u64, now: u64) -> bool {
    now < expires_at
}

/// The expiry of a mark made at `now` with time-to-live `ttl_ms`.
pub(crate) fn expiry(now: u64, ttl_ms: u64) -> u64 {
    now.saturating_add(ttl_ms)
}

/// Installs the expiry compaction filter on a partition's column family
/// options. It removes marks whose expiry has passed and counts them in
/// `dropped`; everything else (partition metadata, malformed values) is kept,
/// so a damaged value is reported on read rather than silently discarded.
///
/// It is installed as a factory, which RocksDB owns, so that it lives exactly
/// as long as the column family does.
pub(crate) fn install_compaction_filter(
    opts: &mut rocksdb::Options,
    time: Arc<TimeKeeper>,
    dropped: Arc<AtomicU64>,
) {
    opts.set_compaction_filter_factory(ExpiryFilterFactory { time, dropped });
}

struct ExpiryFilterFactory {
    time: Arc<TimeKeeper>,
    dropped: Arc<AtomicU64>,
}

impl CompactionFilterFactory for ExpiryFilterFactory {
    type Filter = ExpiryFilter;

    fn create(&mut self, _context: CompactionFilterContext) -> ExpiryFilter {
        ExpiryFilter {
            // One reading per compaction: every mark is judged at the same time.
            now: self.time.now(),
            dropped: self.dropped.clone(),
        }
    }

    fn name(&self) -> &CStr {
        c"exactly.expiry"
    }
}

struct ExpiryFilter {
    now: u64,
    dropped: Arc<AtomicU64>,
}

impl CompactionFilter for ExpiryFilter {
    fn filter(&mut self, _level: u32, key: &[u8], value: &[u8]) -> Decision {
        if key.first() != Some(&MARK_TAG) {
            return Decision::Keep;
        }
        match decode_mark(value) {
            Some(expires_at) if !is_live(expires_at, self.now) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
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
    fn mark_round_trips() {
        for t in [0, 1, 1_700_000_000_000, u64::MAX] {
            assert_eq!(decode_mark(&encode_mark(t)), Some(t));
        }
    }

    #[test]
    fn malformed_values_do_not_decode() {
        assert_eq!(decode_mark(&[]), None);
        assert_eq!(decode_mark(&[MARK_DONE, 1, 2]), None);
        assert_eq!(decode_mark(&[7, 0, 0, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(decode_mark(&[MARK_DONE, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn liveness_boundary_is_exclusive() {
        let e = expiry(1_000, 500);
        assert_eq!(e, 1_500);
        assert!(is_live(e, 1_499));
        assert!(!is_live(e, 1_500));
        assert_eq!(expiry(u64::MAX - 1, 10), u64::MAX);
    }
}
