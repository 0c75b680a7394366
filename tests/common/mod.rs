//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::mpsc;
use std::thread;
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

/// Runs `body` on a thread and waits for it for `watchdog`: a test fails,
/// rather than hangs, if its threads deadlock. A panic in `body` is the
/// test's.
pub fn watched<F: FnOnce() + Send + 'static>(what: &str, watchdog: Duration, body: F) {
    let (done, finished) = mpsc::channel();
    let handle = thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(watchdog) {
        Ok(()) => handle.join().unwrap(),
        // The body panicked: report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: not done after {watchdog:?} (deadlock?)")
        }
    }
}

/// A small xorshift generator: the tests are reproducible from their seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
