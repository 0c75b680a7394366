//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use exactly::{ManualClock, Options, Partition, Store};

/// 2026-01-01T00:00:00Z in milliseconds.
pub const T0: u64 = 1_767_225_600_000;
pub const TTL: Duration = Duration::from_secs(3600);

/// Options with a manual clock at `T0`, a one-hour TTL and small filters.
pub fn options(clock: &ManualClock) -> Options {
    Options::default()
        .ttl(TTL)
        .expected_keys_per_partition(10_000)
        .clock(clock.clone())
}

/// A store in `dir` with a manual clock, and that clock.
pub fn open(dir: &Path) -> (Store, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Store::open(dir, options(&clock)).expect("open store");
    (store, clock)
}

pub fn orders(n: i32) -> Partition {
    Partition::new("orders", n)
}
