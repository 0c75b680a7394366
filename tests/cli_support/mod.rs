//! Helpers for the tests of the `exactly` binary: running it, and stores
//! built at a fixed time in the future.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use exactly::{ManualClock, Options, Partition, Store};

/// 2100-01-01T00:00:00Z in ms. Stores are built at this time by a manual
/// clock; the tool, on the system clock, resumes from the time their ledger
/// recorded, so it answers at the same time as the test.
pub const FUTURE: u64 = 4_102_444_800_000;
pub const TTL: Duration = Duration::from_secs(3600);

pub fn options(clock: &ManualClock) -> Options {
    Options::default()
        .ttl(TTL)
        .expected_keys_per_partition(10_000)
        .clock(clock.clone())
}

/// Opens (or creates) the store in `dir` with a manual clock at `at`.
pub fn open_at(dir: &Path, at: u64) -> (Store, ManualClock) {
    let clock = ManualClock::new(at);
    let store = Store::open(dir, options(&clock)).expect("open store");
    (store, clock)
}

pub fn orders(n: i32) -> Partition {
    Partition::new("orders", n)
}

/// Runs the tool with `args`.
pub fn run(args: &[&str]) -> Output {
    run_with_stdin(args, "")
}

/// Runs the tool with `args` and `stdin` on its standard input.
pub fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_exactly"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exactly");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for exactly")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the tool with `--json` and `args`, which must succeed, and parses
/// its output.
pub fn json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(
        o.status.success(),
        "exactly {args:?} failed: {}",
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("exactly {args:?}: not JSON ({e}): {}", stdout(&o)))
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
