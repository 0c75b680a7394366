//! Crash recovery against real process death: a child process writes batches
//! and reports each acknowledged commit on a pipe; the parent kills it with
//! SIGKILL at a random moment, reopens the store and checks that every
//! acknowledged batch (marks and offset) is there, that no batch is
//! half-applied and that no never-marked key is a duplicate.
//!
//! Each batch also records its changes in the partition's local outbox, as
//! the Kafka changelog loop's do, and every third batch the child publishes
//! (completes) the outbox. After each kill the outbox must hold exactly the
//! committed batches not yet published: none acknowledged lost, none
//! published coming back.
//!
//! Each batch also marks sequence numbers of the partition's source
//! (sequence mode), reordered within the batch, and a redelivery of the
//! previous batch's last number: after each kill every acknowledged number
//! is a duplicate and none of the batch after the offset is.
//!
//! Each process writes its changes as tables at its own pace (see
//! `options`), so kills also land while a table is written, ingested, or
//! its journal records deleted.
//!
//! `EXACTLY_CRASH_TRIALS` sets the number of trials (default 6),
//! `EXACTLY_CRASH_SEED` replays a run.

use std::collections::HashMap;
use std::env;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;
use common::Rng;
use exactly::internals::outbox;
use exactly::{Error, Options, Partition, Store, Verdict};

const PARTITIONS: i32 = 3;
const KEYS_PER_BATCH: i64 = 20;
const ROUNDS_PER_TRIAL: usize = 3;
/// Sequence numbers of the partition's source marked per batch.
const NUMBERS_PER_BATCH: u64 = 4;

fn part(p: i32) -> Partition {
    Partition::new("events", p)
}

fn key(p: i32, batch: i64, j: i64) -> String {
    format!("{p}-{batch}-{j}")
}

fn source(p: i32) -> String {
    format!("source-{p}")
}

/// The sequence numbers batch `b` marks, in the order it marks them (pairs
/// swapped, as a producer's retries arrive).
fn numbers(b: i64) -> [u64; 4] {
    let first = b as u64 * NUMBERS_PER_BATCH;
    [first + 1, first, first + 3, first + 2]
}

/// Each process picks its `table_bytes` by its pid, so that reopens change
/// it: a table per batch (kills land while the background flusher writes
/// and ingests one), one every few batches, or the default (the changes
/// stay in journal records until the next open writes them).
fn options() -> Options {
    let table_bytes = match std::process::id() % 3 {
        0 => 1,
        1 => 1_500,
        _ => 4 << 20,
    };
    Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition(100_000)
        .table_bytes(table_bytes)
}

/// The child: continues each partition from its committed offset, writing
/// batches until it is killed. Prints `p b` after batch `b` of partition `p`
/// is committed, and `P p b` after the outbox entries up to batch `b` are
/// published.
fn child(dir: &Path) {
    let store = Store::open(dir, options()).expect("child open");
    let mut next = HashMap::new();
    for p in 0..PARTITIONS {
        store.assign(&part(p)).expect("assign");
        let offset = store.committed_offset(&part(p)).expect("offset");
        next.insert(p, offset.unwrap_or(0) / KEYS_PER_BATCH);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for i in 0.. {
        let p = i % PARTITIONS;
        let b = next[&p];
        let mut batch = store.batch(&part(p)).expect("batch");
        outbox::record_changes(&mut batch, b * KEYS_PER_BATCH);
        for j in 0..KEYS_PER_BATCH {
            let v = batch.check_and_mark(key(p, b, j).as_bytes()).expect("mark");
            assert_eq!(v, Verdict::New, "fresh key {}", key(p, b, j));
        }
        if b > 0 {
            // A redelivery of the previous batch's first message.
            let v = batch
                .check_and_mark(key(p, b - 1, 0).as_bytes())
                .expect("redelivery");
            assert_eq!(v, Verdict::Duplicate, "redelivered {}", key(p, b - 1, 0));
        }
        for seq in numbers(b) {
            let v = batch
                .check_and_mark_sequence(source(p).as_bytes(), 1, seq)
                .expect("mark a number");
            assert_eq!(v, Verdict::New, "fresh number {seq} of {}", source(p));
        }
        if b > 0 {
            let last = numbers(b - 1)[2];
            let v = batch
                .check_and_mark_sequence(source(p).as_bytes(), 1, last)
                .expect("redelivered number");
            assert_eq!(v, Verdict::Duplicate, "redelivered number {last}");
        }
        batch.set_offset((b + 1) * KEYS_PER_BATCH);
        let entry = outbox::commit(batch)
            .expect("commit")
            .expect("an outbox entry");
        writeln!(out, "{p} {b}").expect("ack");
        out.flush().expect("flush ack");
        if b % 3 == 2 {
            outbox::complete(&store, &part(p), entry.seq).expect("publish the outbox");
            writeln!(out, "P {p} {b}").expect("ack");
            out.flush().expect("flush ack");
        }
        next.insert(p, b + 1);
    }
}

/// A child that holds the store open until its stdin closes.
fn hold(dir: &Path) {
    let store = Store::open(dir, options()).expect("hold open");
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(store);
}

fn spawn(var: &str, dir: &Path) -> std::process::Child {
    Command::new(env::current_exe().expect("current exe"))
        .env(var, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// What the parent was told, per partition: the last batch committed, and
/// the last one whose outbox entries were published.
#[derive(Default)]
struct Acked {
    committed: HashMap<i32, i64>,
    published: HashMap<i32, i64>,
}

/// One round: run a child, kill it after `kill_after` acks, verify.
fn round(dir: &Path, kill_after: u64, acked: &mut Acked) {
    let mut child = spawn("EXACTLY_CRASH_CHILD", dir);
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = 0;
    let record = |line: String, acked: &mut Acked| {
        let (published, rest) = match line.strip_prefix("P ") {
            Some(rest) => (true, rest),
            None => (false, line.as_str()),
        };
        let (p, b) = rest.split_once(' ').expect("ack line");
        let (p, b): (i32, i64) = (p.parse().expect("p"), b.parse().expect("b"));
        let last = acked.committed.entry(p).or_insert(-1);
        if published {
            assert_eq!(b, *last, "partition {p} publishes its last batch");
            acked.published.insert(p, b);
        } else {
            assert_eq!(b, *last + 1, "acks of partition {p} are consecutive");
            *last = b;
        }
    };
    while seen < kill_after {
        match lines.next() {
            Some(line) => {
                record(line.expect("read ack"), acked);
                seen += 1;
            }
            None => panic!("child exited before it was killed: {:?}", child.wait()),
        }
    }
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("wait child");
    assert!(!status.success(), "child was killed");
    // Acks written before death are acknowledged too.
    for line in lines {
        record(line.expect("read ack"), acked);
    }

    let store = Store::open(dir, options()).expect("reopen after kill");
    for p in 0..PARTITIONS {
        store.assign(&part(p)).expect("assign");
        let last_acked = acked.committed.get(&p).copied().unwrap_or(-1);
        let offset = store
            .committed_offset(&part(p))
            .expect("offset")
            .unwrap_or(0);
        assert_eq!(
            offset % KEYS_PER_BATCH,
            0,
            "offset {offset} on a batch boundary"
        );
        let committed = offset / KEYS_PER_BATCH - 1;
        assert!(
            committed >= last_acked,
            "partition {p}: batch {last_acked} was acknowledged, offset says {committed}"
        );
        // A commit that landed without its ack reaching us is fine (at most one).
        assert!(
            committed <= last_acked + 1,
            "partition {p}: offset ahead of writes"
        );
        for b in 0..=committed {
            for j in 0..KEYS_PER_BATCH {
                assert_eq!(
                    store
                        .check(&part(p), key(p, b, j).as_bytes())
                        .expect("check"),
                    Verdict::Duplicate,
                    "acknowledged {} lost",
                    key(p, b, j)
                );
            }
        }
        for b in 0..=committed {
            for seq in numbers(b) {
                assert_eq!(
                    store
                        .check_sequence(&part(p), source(p).as_bytes(), 1, seq)
                        .expect("check a number"),
                    Verdict::Duplicate,
                    "acknowledged number {seq} of partition {p} lost"
                );
            }
        }
        for seq in numbers(committed + 1) {
            assert_eq!(
                store
                    .check_sequence(&part(p), source(p).as_bytes(), 1, seq)
                    .expect("check a number"),
                Verdict::New,
                "uncommitted number {seq} of partition {p} is a duplicate"
            );
        }
        // The batch after the offset left nothing behind: no half-applied batch.
        for j in 0..KEYS_PER_BATCH {
            assert_eq!(
                store
                    .check(&part(p), key(p, committed + 1, j).as_bytes())
                    .expect("check"),
                Verdict::New,
                "uncommitted {} is a duplicate",
                key(p, committed + 1, j)
            );
        }
        // The outbox holds the committed batches not yet published, each
        // intact: from the one after the last publication acknowledged, or
        // after the last batch if its publication landed unacknowledged.
        let pending = outbox::pending(&store, &part(p)).expect("outbox");
        let published = acked.published.get(&p).copied().unwrap_or(-1);
        let first = pending
            .first()
            .map_or(committed + 1, |e| e.start / KEYS_PER_BATCH);
        assert!(
            first == published + 1 || (first == last_acked + 1 && last_acked % 3 == 2),
            "partition {p}: outbox starts at batch {first}, published up to {published}, \
             committed {committed}"
        );
        let batches: Vec<i64> = pending.iter().map(|e| e.start / KEYS_PER_BATCH).collect();
        assert_eq!(
            batches,
            (first..=committed).collect::<Vec<_>>(),
            "partition {p}: outbox entries"
        );
        for e in &pending {
            assert_eq!(e.start % KEYS_PER_BATCH, 0, "{e:?}");
            assert_eq!(e.next, e.start + KEYS_PER_BATCH, "{e:?}");
            // The batch's keys, and its source's state.
            assert_eq!(e.changed.len(), KEYS_PER_BATCH as usize + 1, "{e:?}");
        }
        acked.published.insert(p, first - 1);
        acked.committed.insert(p, committed);
    }
    store.close().expect("close");
}

fn lock_is_refused_across_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn("EXACTLY_HOLD_CHILD", dir.path());
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("ready line").expect("read"), "ready");
    let r = Store::open(dir.path(), options());
    assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
    drop(child.stdin.take()); // the child closes its store and exits
    assert!(child.wait().expect("wait").success());
    Store::open(dir.path(), options()).expect("open after the holder exits");
}

fn main() {
    if let Some(dir) = env::var_os("EXACTLY_CRASH_CHILD") {
        return child(Path::new(&dir));
    }
    if let Some(dir) = env::var_os("EXACTLY_HOLD_CHILD") {
        return hold(Path::new(&dir));
    }
    if env::args().any(|a| a == "--list") {
        println!("crash: test");
        return;
    }
    let trials: u64 = env::var("EXACTLY_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed: u64 = env::var("EXACTLY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("crash: seed {seed}, {trials} trials of {ROUNDS_PER_TRIAL} kills");
    lock_is_refused_across_processes();
    let mut rng = Rng(seed);
    for _ in 0..trials {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut acked = Acked::default();
        for _ in 0..ROUNDS_PER_TRIAL {
            round(dir.path(), 1 + rng.below(150), &mut acked);
        }
    }
    println!("crash: {} passed, 0 failed", trials + 1);
}
