//! Options: a builder with documented defaults, validated once at open.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};

/// What a successful write promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The default. A write is in RocksDB's write-ahead log in the operating
    /// system's page cache when it returns: it survives the process being
    /// killed (panic, OOM kill, `SIGKILL`), but not a power cut or kernel crash
    /// unless [`crate::Store::sync`] ran after it.
    #[default]
    Buffered,
    /// Every write fsyncs the write-ahead log before it returns: it survives a
    /// power cut. Costs one fsync per write (per batch with the batch API).
    Sync,
}

/// How idempotency keys are stored. Fixed when the store is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyMode {
    /// The default: keys are stored as given. Exact.
    #[default]
    Raw,
    /// Keys are stored as their 128-bit XXH3 hash: fixed 16 bytes on disk
    /// whatever the key length. Two distinct keys collide with probability
    /// about `n² / 2¹²⁹` for `n` live keys (below 10⁻²⁰ for a billion keys);
    /// a collision would report a new key as a duplicate.
    Hashed,
}

impl KeyMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hashed => "hashed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "hashed" => Some(Self::Hashed),
            _ => None,
        }
    }
}

/// What happens to a live mark's expiry when its key is seen again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlRefresh {
    /// The default: a mark expires `ttl` after it was first made; seeing the
    /// key again changes nothing.
    #[default]
    FirstSeen,
    /// Every marking operation that finds the key a duplicate (`check_and_mark`,
    /// `mark`, and their batch forms) pushes its expiry to `ttl` from then, as
    /// long as the key keeps arriving. `check` never changes anything.
    OnDuplicate,
}

/// Which clock a mark's TTL runs on. Fixed when the store is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeDomain {
    /// The default: a key expires `ttl` after it was marked, by the injected
    /// [`Clock`].
    #[default]
    ProcessingTime,
    /// A key expires `ttl` after the event time of its message (given with the
    /// `*_at` operations); "now" is the partition's watermark, the highest
    /// event time committed minus [`Options::allowed_lateness`]. Replaying old
    /// data then dedups exactly as it did live. A mark made without an event
    /// time is taken to be at the watermark. Claims' leases still run on the
    /// clock.
    EventTime,
}

impl TimeDomain {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ProcessingTime => "processing",
            Self::EventTime => "event",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "processing" => Some(Self::ProcessingTime),
            "event" => Some(Self::EventTime),
            _ => None,
        }
    }
}

/// Largest accepted `max_key_len`.
pub const MAX_KEY_LEN_LIMIT: usize = 64 * 1024;
/// Longest accepted TTL: 100 years.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The widest sequence window ([`Options::sequence_window`]): 8 KiB of
/// bitmap per source.
pub(crate) const MAX_SEQUENCE_WINDOW: u32 = 65_536;

/// Bounds of [`Options::table_bytes`].
pub(crate) const TABLE_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1..=(1 << 30);

/// Options for [`crate::Store::open`].
///
/// | option | default | fixed at creation? |
/// |---|---|---|
/// | [`ttl`](Self::ttl) | 7 days | no: applies to marks made after reopen; the claim grace stays the TTL of creation |
/// | [`expected_keys_per_partition`](Self::expected_keys_per_partition) | 1 000 000 | no: sizes in-memory filters |
/// | [`bloom_fp_rate`](Self::bloom_fp_rate) | 0.01 | no: sizes in-memory filters |
/// | [`durability`](Self::durability) | [`Durability::Buffered`] | no |
/// | [`clock`](Self::clock) | [`SystemClock`] | no |
/// | [`max_key_len`](Self::max_key_len) | 1024 bytes | no: only checks input |
/// | [`key_mode`](Self::key_mode) | [`KeyMode::Raw`] | **yes** |
/// | [`ttl_refresh`](Self::ttl_refresh) | [`TtlRefresh::FirstSeen`] | no |
/// | [`time_domain`](Self::time_domain) | [`TimeDomain::ProcessingTime`] | **yes** |
/// | [`allowed_lateness`](Self::allowed_lateness) | 0 | no: applies to later commits; the watermark never goes back |
/// | [`sequence_window`](Self::sequence_window) | 1024 | no |
/// | [`source_idle`](Self::source_idle) | the TTL | no |
/// | [`table_bytes`](Self::table_bytes) | 4 MiB | no |
///
/// ```
/// use std::time::Duration;
/// use exactly::{Durability, Options};
///
/// let opts = Options::default()
///     .ttl(Duration::from_secs(24 * 3600))
///     .expected_keys_per_partition(5_000_000)
///     .durability(Durability::Sync);
/// assert_eq!(opts.get_ttl(), Duration::from_secs(24 * 3600));
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) ttl: Duration,
    pub(crate) expected_keys_per_partition: usize,
    pub(crate) bloom_fp_rate: f64,
    pub(crate) durability: Durability,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) max_key_len: usize,
    pub(crate) key_mode: KeyMode,
    pub(crate) ttl_refresh: TtlRefresh,
    pub(crate) time_domain: TimeDomain,
    pub(crate) allowed_lateness: Duration,
    pub(crate) sequence_window: u32,
    pub(crate) source_idle: Option<Duration>,
    pub(crate) table_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 24 * 3600),
            expected_keys_per_partition: 1_000_000,
            bloom_fp_rate: 0.01,
            durability: Durability::Buffered,
            clock: Arc::new(SystemClock),
            max_key_len: 1024,
            key_mode: KeyMode::Raw,
            ttl_refresh: TtlRefresh::FirstSeen,
            time_domain: TimeDomain::ProcessingTime,
            allowed_lateness: Duration::ZERO,
            sequence_window: 1024,
            source_idle: None,
            table_bytes: 4 << 20,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("ttl", &self.ttl)
            .field(
                "expected_keys_per_partition",
                &self.expected_keys_per_partition,
            )
            .field("bloom_fp_rate", &self.bloom_fp_rate)
            .field("durability", &self.durability)
            .field("clock", &self.clock)
            .field("max_key_len", &self.max_key_len)
            .field("key_mode", &self.key_mode)
            .field("ttl_refresh", &self.ttl_refresh)
            .field("time_domain", &self.time_domain)
            .field("allowed_lateness", &self.allowed_lateness)
            .field("sequence_window", &self.sequence_window)
            .field("source_idle", &self.source_idle)
            .field("table_bytes", &self.table_bytes)
            .finish()
    }
}

impl Options {
    /// How long a mark keeps its key a duplicate: a key marked at `t` is a
    /// duplicate while `now < t + ttl`. From 1 ms to 100 years, millisecond
    /// resolution. Default: 7 days.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How many live (unexpired) keys one partition is expected to hold at
    /// once; sizes the in-memory Bloom filters. More keys than this still give
    /// correct answers, with a higher false-positive rate (more disk reads).
    /// At least 1. Default: 1 000 000.
    #[must_use]
    pub fn expected_keys_per_partition(mut self, n: usize) -> Self {
        self.expected_keys_per_partition = n;
        self
    }

    /// Target false-positive rate of the in-memory filter, in (0, 0.5]. A false
    /// positive costs one RocksDB read, never a wrong answer. Default: 0.01.
    #[must_use]
    pub fn bloom_fp_rate(mut self, rate: f64) -> Self {
        self.bloom_fp_rate = rate;
        self
    }

    /// What a successful write promises; see [`Durability`]. Default: `Buffered`.
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The clock the store reads for TTLs. Default: [`SystemClock`].
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Longest accepted key, in bytes, from 1 to 65 536. Longer keys get
    /// [`Error::KeyTooLong`]. Default: 1024.
    #[must_use]
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.max_key_len = len;
        self
    }

    /// How keys are stored; fixed when the store is created. Default: `Raw`.
    #[must_use]
    pub fn key_mode(mut self, mode: KeyMode) -> Self {
        self.key_mode = mode;
        self
    }

    /// Whether seeing a live key again extends its expiry; see [`TtlRefresh`].
    /// Default: `FirstSeen`.
    #[must_use]
    pub fn ttl_refresh(mut self, refresh: TtlRefresh) -> Self {
        self.ttl_refresh = refresh;
        self
    }

    /// Which clock TTLs run on; fixed when the store is created. See
    /// [`TimeDomain`]. Default: `ProcessingTime`.
    #[must_use]
    pub fn time_domain(mut self, domain: TimeDomain) -> Self {
        self.time_domain = domain;
        self
    }

    /// Under [`TimeDomain::EventTime`], how far behind the highest committed
    /// event time the partition's watermark trails, so that late messages are
    /// still judged against marks that would otherwise have just expired.
    /// The watermark never goes backwards: reopening with a larger lateness
    /// holds it where it was until event time catches up, since marks that
    /// expired at it may already be compacted away. Default: zero.
    #[must_use]
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.allowed_lateness = lateness;
        self
    }

    /// Sequence mode: how many sequence numbers below a source's highest
    /// marked one are remembered one by one (a bitmap of `window` bits per
    /// source), so that a producer's retries arriving out of order are
    /// answered exactly. A number further below is a duplicate: it is older
    /// than anything the producer can still have in flight. From 1 to
    /// 65 536. Changing it on reopen is safe: a wider window counts the
    /// numbers it adds as marked, a narrower one answers the numbers it
    /// drops as below it. Default: 1024.
    #[must_use]
    pub fn sequence_window(mut self, window: u32) -> Self {
        self.sequence_window = window;
        self
    }

    /// Sequence mode: how long a source that marks nothing is remembered
    /// (a producer that was decommissioned). Each sequence number marked
    /// moves the source's expiry to `idle` from then; an expired source is
    /// forgotten (its numbers are new again) and the compaction filter
    /// removes it. From 1 ms to 100 years. Default: the [`ttl`](Self::ttl).
    #[must_use]
    pub fn source_idle(mut self, idle: Duration) -> Self {
        self.source_idle = Some(idle);
        self
    }

    /// The configured TTL.
    pub fn get_ttl(&self) -> Duration {
        self.ttl
    }

    /// The configured durability.
    pub fn get_durability(&self) -> Durability {
        self.durability
    }

    /// The TTL in whole milliseconds (validated to be at least 1).
    pub(crate) fn ttl_millis(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long an idle source is remembered, in ms.
    pub(crate) fn source_idle_millis(&self) -> u64 {
        let idle = self.source_idle.unwrap_or(self.ttl);
        u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn lateness_millis(&self) -> u64 {
        u64::try_from(self.allowed_lateness.as_millis()).unwrap_or(u64::MAX)
    }

    /// Checks every option's range. Called once by `Store::open`.
    /// How many bytes of changes (marks, claims, removals) a partition
    /// holds in its in-memory index before they are written to disk as one
    /// sorted table, in the background. A batch's changes are logged as one
    /// record of the write-ahead log and go to this index; the table is
    /// ingested into RocksDB whole, so no key pays for a memtable insert
    /// (`docs/design.md`, "The write path"). A larger value means fewer,
    /// larger tables and more memory (about 65 bytes per change of a 16-byte
    /// key, twice that while a table is written) and a longer replay after a
    /// crash. From 1 byte to 1 GiB. Default: 4 MiB.
    #[must_use]
    pub fn table_bytes(mut self, bytes: usize) -> Self {
        self.table_bytes = bytes;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !TABLE_BYTES_RANGE.contains(&self.table_bytes) {
            return Err(Error::InvalidOptions(format!(
                "table_bytes must be between 1 and 1 GiB, got {}",
                self.table_bytes
            )));
        }
        if self.ttl < Duration::from_millis(1) || self.ttl > MAX_TTL {
            return Err(Error::InvalidOptions(format!(
                "ttl must be between 1 ms and 100 years, got {:?}",
                self.ttl
            )));
        }
        if self.expected_keys_per_partition == 0 || self.expected_keys_per_partition > (1 << 34) {
            return Err(Error::InvalidOptions(format!(
                "expected_keys_per_partition must be between 1 and 2^34, got {}",
                self.expected_keys_per_partition
            )));
        }
        if !(self.bloom_fp_rate > 0.0 && self.bloom_fp_rate <= 0.5) {
            return Err(Error::InvalidOptions(format!(
                "bloom_fp_rate must be in (0, 0.5], got {}",
                self.bloom_fp_rate
            )));
        }
        if self.max_key_len == 0 || self.max_key_len > MAX_KEY_LEN_LIMIT {
            return Err(Error::InvalidOptions(format!(
                "max_key_len must be between 1 and {MAX_KEY_LEN_LIMIT}, got {}",
                self.max_key_len
            )));
        }
        if self.sequence_window == 0 || self.sequence_window > MAX_SEQUENCE_WINDOW {
            return Err(Error::InvalidOptions(format!(
                "sequence_window must be between 1 and {MAX_SEQUENCE_WINDOW}, got {}",
                self.sequence_window
            )));
        }
        if let Some(idle) = self.source_idle {
            if idle < Duration::from_millis(1) || idle > MAX_TTL {
                return Err(Error::InvalidOptions(format!(
                    "source_idle must be between 1 ms and 100 years, got {idle:?}"
                )));
            }
        }
        if self.allowed_lateness > MAX_TTL {
            return Err(Error::InvalidOptions(format!(
                "allowed_lateness must be at most 100 years, got {:?}",
                self.allowed_lateness
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Options::default().validate().is_ok());
    }

    #[test]
    fn out_of_range_options_are_rejected() {
        let bad = [
            Options::default().ttl(Duration::ZERO),
            Options::default().ttl(Duration::from_micros(999)),
            Options::default().ttl(MAX_TTL + Duration::from_secs(1)),
            Options::default().expected_keys_per_partition(0),
            Options::default().bloom_fp_rate(0.0),
            Options::default().bloom_fp_rate(0.6),
            Options::default().bloom_fp_rate(f64::NAN),
            Options::default().max_key_len(0),
            Options::default().max_key_len(MAX_KEY_LEN_LIMIT + 1),
            Options::default().allowed_lateness(MAX_TTL * 2),
        ];
        for opts in bad {
            assert!(
                matches!(opts.validate(), Err(Error::InvalidOptions(_))),
                "{opts:?} should be rejected"
            );
        }
    }

    #[test]
    fn key_mode_names_round_trip() {
        for m in [KeyMode::Raw, KeyMode::Hashed] {
            assert_eq!(KeyMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(KeyMode::parse("other"), None);
        for d in [TimeDomain::ProcessingTime, TimeDomain::EventTime] {
            assert_eq!(TimeDomain::parse(d.as_str()), Some(d));
        }
    }
}
