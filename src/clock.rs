//! Injected time: the store never reads the system clock directly.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, in milliseconds since the Unix epoch.
///
/// The store reads time only through this trait, so TTL behaviour can be
/// tested without sleeping (see [`ManualClock`]). The store never lets time
/// go backwards: if the clock steps back, the store treats time as standing
/// still until the clock passes the highest reading seen since the store was
/// opened.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The default clock: the operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to. Clones share the same time, so a
/// test keeps one clone and hands another to [`crate::Options::clock`].
///
/// ```
/// use std::time::Duration;
/// use exactly::{Clock, ManualClock};
///
/// let clock = ManualClock::new(1_000);
/// let shared = clock.clone();
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(shared.now_millis(), 2_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock that reads `start_millis` (milliseconds since the Unix epoch).
    pub fn new(start_millis: u64) -> Self {
        Self {
            millis: Arc::new(AtomicU64::new(start_millis)),
        }
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .millis
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                Some(m.saturating_add(by))
            });
    }

    /// Sets the clock to `millis`, forwards or backwards.
    pub fn set(&self, millis: u64) {
        self.millis.store(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.millis.load(Ordering::SeqCst)
    }
}

/// The store's view of time: the injected clock, made monotonic, also across
/// restarts.
///
/// Reads judge expiry at [`now`](Self::now). Compaction, which deletes, judges
/// it at [`compaction_now`](Self::compaction_now): never later than the time
/// last recorded in the durability ledger. After a restart the keeper starts
/// at that recorded time, so a clock that steps back across a restart never
/// finds a mark deleted "in its future" while marks of the same age survive.
#[derive(Debug)]
pub(crate) struct TimeKeeper {
    clock: Arc<dyn Clock>,
    high_water: AtomicU64,
    durable: AtomicU64,
}

impl TimeKeeper {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            high_water: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        }
    }

    /// The current time in milliseconds; never less than an earlier answer.
    pub(crate) fn now(&self) -> u64 {
        let reading = self.clock.now_millis();
        let previous = self.high_water.fetch_max(reading, Ordering::AcqRel);
        previous.max(reading)
    }

    /// Starts from a time recorded durably by an earlier run: `now` never
    /// answers less.
    pub(crate) fn start_at(&self, recorded: u64) {
        self.high_water.fetch_max(recorded, Ordering::AcqRel);
        self.durable.fetch_max(recorded, Ordering::AcqRel);
    }

    /// The time last recorded durably.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Call once `recorded` is durable.
    pub(crate) fn set_durable(&self, recorded: u64) {
        self.durable.fetch_max(recorded, Ordering::AcqRel);
    }

    /// The time compaction judges expiry at: now, but never past the time
    /// recorded durably.
    pub(crate) fn compaction_now(&self) -> u64 {
        self.now().min(self.durable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keeper_never_goes_backwards() {
        let clock = ManualClock::new(10_000);
        let keeper = TimeKeeper::new(Arc::new(clock.clone()));
        assert_eq!(keeper.now(), 10_000);
        clock.set(5_000);
        assert_eq!(keeper.now(), 10_000);
        clock.advance(Duration::from_millis(6_000));
        assert_eq!(keeper.now(), 11_000);
    }

    #[test]
    fn compaction_never_runs_ahead_of_the_recorded_time() {
        let clock = ManualClock::new(10_000);
        let keeper = TimeKeeper::new(Arc::new(clock.clone()));
        assert_eq!(keeper.compaction_now(), 0, "nothing recorded yet");
        keeper.set_durable(keeper.now());
        clock.advance(Duration::from_millis(5_000));
        assert_eq!((keeper.now(), keeper.compaction_now()), (15_000, 10_000));
        keeper.set_durable(keeper.now());
        assert_eq!(keeper.compaction_now(), 15_000);
    }

    #[test]
    fn a_restarted_keeper_starts_at_the_recorded_time() {
        let clock = ManualClock::new(5_000);
        let keeper = TimeKeeper::new(Arc::new(clock.clone()));
        keeper.start_at(20_000);
        assert_eq!((keeper.now(), keeper.compaction_now()), (20_000, 20_000));
        clock.set(30_000);
        assert_eq!((keeper.now(), keeper.compaction_now()), (30_000, 20_000));
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_millis() > 1_577_836_800_000);
    }
}
