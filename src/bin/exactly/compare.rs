//! Side-by-side comparison on one generated stream, in one run, on one
//! machine: exactly (batch and single-op APIs) against naive RocksDB, RocksDB
//! with write batches, the obvious design (a Bloom filter per partition in
//! front of RocksDB with write batches), an in-memory `HashSet`, and Redis
//! `SET NX EX` (when a `redis-server` binary is on the PATH).
//!
//! ```text
//! cargo run --release --example compare -- --messages 10000000 [--json out.json] [--only exactly-batch,naive-rocksdb]
//! ```
//!
//! The stream is Kafka-like: 8 partitions, 1% redeliveries drawn from the last
//! 100 000 keys, then a rebalance replay burst of 100 000 already-processed
//! messages. Keys are 16 bytes. Every row processes the same messages and must
//! find the same number of new keys. The sequence-mode row reads the same
//! messages as numbered by their producers (four per partition, each
//! numbering its own messages), with a producer's retries arriving swapped:
//! one state per producer instead of one mark per message.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use exactly::{Options, Partition, Store, Verdict};

use super::common::{cpu_time, key, Rng};
use super::compare_redis::Redis;

const PARTITIONS: usize = 8;
const BATCH: usize = 1_000;
const RECENT: usize = 100_000;
const REPLAY: usize = 100_000;

/// A poll batch: a partition and its messages' keys.
type PollBatch = (usize, Vec<[u8; 16]>);

/// Producers per partition in the sequence-mode row.
const PRODUCERS: u64 = 4;

/// The producer and sequence number of message `id` (of partition
/// `id % PARTITIONS`): its producers take turns, each numbering its own
/// messages from 0.
fn numbered(id: u64) -> (u64, u64) {
    let k = id / PARTITIONS as u64;
    (k % PRODUCERS, k / PRODUCERS)
}

/// The stream, already cut into per-partition poll batches, the message
/// ids of each batch, and the number of distinct keys in it.
fn stream(messages: usize) -> (Vec<PollBatch>, Vec<Vec<u64>>, usize) {
    let mut rng = Rng(0x5eed);
    let mut recent: Vec<u64> = Vec::with_capacity(RECENT);
    let mut pending: Vec<Vec<u64>> = (0..PARTITIONS).map(|_| Vec::with_capacity(BATCH)).collect();
    let mut batches: Vec<(usize, Vec<u64>)> = Vec::new();
    let mut unique = HashSet::new();
    // The replay burst is at most a twentieth of the stream, so that a short
    // stream is not all replay (at 2 M messages and more it is REPLAY).
    let live = messages - REPLAY.min(messages / 20);
    let push = |id: u64, pending: &mut Vec<Vec<u64>>, batches: &mut Vec<_>| {
        let p = (id % PARTITIONS as u64) as usize;
        pending[p].push(id);
        if pending[p].len() == BATCH {
            batches.push((
                p,
                std::mem::replace(&mut pending[p], Vec::with_capacity(BATCH)),
            ));
        }
    };
    let mut tail: std::collections::VecDeque<u64> =
        std::collections::VecDeque::with_capacity(REPLAY);
    for seq in 0..live as u64 {
        let id = if rng.next().is_multiple_of(100) && !recent.is_empty() {
            recent[(rng.next() % recent.len() as u64) as usize]
        } else {
            seq
        };
        unique.insert(id);
        if recent.len() < RECENT {
            recent.push(id);
        } else {
            recent[(seq as usize) % RECENT] = id;
        }
        if tail.len() == REPLAY {
            tail.pop_front();
        }
        tail.push_back(id);
        push(id, &mut pending, &mut batches);
    }
    // A rebalance: the new owner replays the last messages, already processed.
    for &id in tail.iter().take(messages - live) {
        push(id, &mut pending, &mut batches);
    }
    for (p, ids) in pending.into_iter().enumerate() {
        if !ids.is_empty() {
            batches.push((p, ids));
        }
    }
    let keyed = batches
        .iter()
        .map(|(p, ids)| (*p, ids.iter().map(|&id| key(id)).collect()))
        .collect();
    let ids = batches.into_iter().map(|(_, ids)| ids).collect();
    (keyed, ids, unique.len())
}

struct Row {
    name: &'static str,
    messages: usize,
    new: usize,
    wall: Duration,
    cpu: Duration,
    /// Per-message latencies in ns, sampled (batch rows: batch time / size).
    samples: Vec<u64>,
    rss_delta: i64,
    /// Bytes of its files once closed (rows that keep files).
    disk: Option<u64>,
    /// exactly's rows: the in-memory state it answers from (filters, and
    /// sources' states at their encoded size), from its stats.
    state: Option<u64>,
}

/// What an exactly row leaves: its in-memory state (filters, and the
/// sources' states at their encoded size: 29 bytes, the bitmap and the
/// source's name), then its bytes on disk once closed.
fn close_exactly(store: Store, dir: &std::path::Path, row: &mut Row) {
    let stats = store.stats();
    let window_bytes = 1024 / 8;
    let state = stats
        .partitions
        .values()
        .map(|s| s.filter_bytes as u64 + s.sources * (29 + window_bytes + 10))
        .sum();
    store.close().expect("close");
    row.state = Some(state);
    row.disk = Some(dir_bytes(dir));
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0)
        * 4096
}

fn measure(
    name: &'static str,
    batches: &[PollBatch],
    mut run_batch: impl FnMut(usize, &[[u8; 16]], &mut Vec<u64>) -> usize,
) -> Row {
    let (cpu0, rss0) = (cpu_time(), rss_bytes());
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut new = 0;
    let mut messages = 0;
    for (p, keys) in batches {
        new += run_batch(*p, keys, &mut samples);
        messages += keys.len();
    }
    let wall = started.elapsed();
    Row {
        name,
        messages,
        new,
        wall,
        cpu: cpu_time().saturating_sub(cpu0),
        samples,
        rss_delta: rss_bytes() - rss0,
        disk: None,
        state: None,
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

fn exactly_options(messages: usize) -> Options {
    Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition((messages / PARTITIONS).max(1_000))
}

fn exactly_store(dir: &std::path::Path, messages: usize) -> (Store, Vec<Partition>) {
    let store = Store::open(dir, exactly_options(messages)).expect("open");
    let parts: Vec<_> = (0..PARTITIONS as i32)
        .map(|n| Partition::new("bench", n))
        .collect();
    for p in &parts {
        store.assign(p).expect("assign");
    }
    (store, parts)
}

fn raw_rocksdb(dir: &std::path::Path) -> rocksdb::DB {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    rocksdb::DB::open(&o, dir).expect("open rocksdb")
}

/// The harness's command line.
fn usage() -> String {
    format!(
        "usage: compare [--messages N] [--json FILE] [--only ROW,ROW...]\n  \
         --messages N   messages in the generated stream (default 1 000 000)\n  \
         --json FILE    also write the rows as JSON\n  \
         --only ROWS    run only these rows (comma-separated): {}",
        ROWS.join(", ")
    )
}

/// The rows the harness can run, in the order it runs them (`--only`).
pub const ROWS: &[&str] = &[
    "naive-rocksdb",
    "exactly-batch",
    "exactly-sequence",
    "exactly-single",
    "rocksdb-writebatch",
    "bloom-rocksdb-writebatch",
    "hashset",
    "redis-pipelined",
    "redis",
];

/// Runs the harness with the command line `args` (without the program name).
pub fn run(args: Vec<String>) {
    let mut messages = 1_000_000usize;
    let mut json = None;
    let mut only: Option<Vec<String>> = None;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--messages" => {
                messages = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--messages N")
            }
            "--json" => json = args.next(),
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(String::from).collect())
            }
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{}", usage());
                std::process::exit(2);
            }
        }
    }
    for name in only.iter().flatten() {
        assert!(
            ROWS.contains(&name.as_str()),
            "unknown row {name:?}; the rows are {}",
            ROWS.join(", ")
        );
    }
    assert!(messages > 0, "--messages must be at least 1");
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let (batches, ids, unique) = stream(messages);
    let messages = batches.iter().map(|(_, k)| k.len()).sum::<usize>();
    println!("stream: {messages} messages, {unique} distinct keys, {PARTITIONS} partitions, batches of {BATCH}");
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<&str> = Vec::new();

    if wanted("naive-rocksdb") {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_rocksdb(dir.path());
        rows.push(measure("naive-rocksdb", &batches, |_, keys, samples| {
            let mut new = 0;
            for k in keys {
                let t = Instant::now();
                if db.get_pinned(k).expect("get").is_none() {
                    db.put(k, [1u8; 9]).expect("put");
                    new += 1;
                }
                if samples.len() < 1_000_000 {
                    samples.push(t.elapsed().as_nanos() as u64);
                }
            }
            new
        }));
    }
    if wanted("exactly-batch") {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, parts) = exactly_store(dir.path(), messages);
        rows.push(measure("exactly-batch", &batches, |p, keys, samples| {
            let t = Instant::now();
            let mut batch = store.batch(&parts[p]).expect("batch");
            let mut new = 0;
            for k in keys {
                if batch.check_and_mark(k).expect("mark") == Verdict::New {
                    new += 1;
                }
            }
            batch.commit().expect("commit");
            samples.push(t.elapsed().as_nanos() as u64 / keys.len() as u64);
            new
        }));
        close_exactly(store, dir.path(), rows.last_mut().expect("row"));
    }
    if wanted("exactly-sequence") {
        // The same messages, each checked by its producer's number: a
        // retry's pair of one producer's consecutive numbers arrives
        // swapped every 20 messages.
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, parts) = exactly_store(dir.path(), messages);
        let producers: Vec<Vec<u8>> = (0..PRODUCERS)
            .map(|s| format!("producer-{s}").into_bytes())
            .collect();
        let mut next = ids.iter();
        rows.push(measure("exactly-sequence", &batches, |p, _, samples| {
            let ids = next.next().expect("the batch's ids");
            let t = Instant::now();
            let mut order: Vec<u64> = ids.clone();
            for i in (0..order.len().saturating_sub(PRODUCERS as usize)).step_by(20) {
                order.swap(i, i + PRODUCERS as usize);
            }
            let mut batch = store.batch(&parts[p]).expect("batch");
            let mut new = 0;
            for id in order {
                let (producer, seq) = numbered(id);
                let source = &producers[producer as usize];
                if batch.check_and_mark_sequence(source, 0, seq).expect("mark") == Verdict::New {
                    new += 1;
                }
            }
            batch.commit().expect("commit");
            samples.push(t.elapsed().as_nanos() as u64 / ids.len() as u64);
            new
        }));
        close_exactly(store, dir.path(), rows.last_mut().expect("row"));
    }
    if wanted("exactly-single") {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, parts) = exactly_store(dir.path(), messages);
        rows.push(measure("exactly-single", &batches, |p, keys, samples| {
            let mut new = 0;
            for k in keys {
                let t = Instant::now();
                if store.check_and_mark(&parts[p], k).expect("mark") == Verdict::New {
                    new += 1;
                }
                if samples.len() < 1_000_000 {
                    samples.push(t.elapsed().as_nanos() as u64);
                }
            }
            new
        }));
    }
    if wanted("rocksdb-writebatch") {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_rocksdb(dir.path());
        rows.push(measure(
            "rocksdb-writebatch",
            &batches,
            |_, keys, samples| {
                let t = Instant::now();
                let mut wb = rocksdb::WriteBatch::default();
                let mut seen = HashSet::with_capacity(keys.len());
                let mut new = 0;
                for k in keys {
                    if db.get_pinned(k).expect("get").is_none() && seen.insert(*k) {
                        wb.put(k, [1u8; 9]);
                        new += 1;
                    }
                }
                db.write(wb).expect("write");
                samples.push(t.elapsed().as_nanos() as u64 / keys.len() as u64);
                new
            },
        ));
    }
    if wanted("bloom-rocksdb-writebatch") {
        // The obvious design: one Bloom filter per partition (sized like the
        // store's, 1 % false positives) in front of RocksDB, a get for every
        // filter positive, one `WriteBatch` per poll batch.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_rocksdb(dir.path());
        let per_partition = (messages / PARTITIONS).max(1_000);
        let mut filters: Vec<fastbloom::BloomFilter> = (0..PARTITIONS)
            .map(|_| fastbloom::BloomFilter::with_false_pos(0.01).expected_items(per_partition))
            .collect();
        rows.push(measure(
            "bloom-rocksdb-writebatch",
            &batches,
            |p, keys, samples| {
                let t = Instant::now();
                let filter = &mut filters[p];
                let mut wb = rocksdb::WriteBatch::default();
                let mut seen = HashSet::with_capacity(keys.len());
                let mut new = 0;
                for k in keys {
                    let maybe = filter.contains(k);
                    if (!maybe || db.get_pinned(k).expect("get").is_none()) && seen.insert(*k) {
                        wb.put(k, [1u8; 9]);
                        filter.insert(k);
                        new += 1;
                    }
                }
                db.write(wb).expect("write");
                samples.push(t.elapsed().as_nanos() as u64 / keys.len() as u64);
                new
            },
        ));
    }
    if wanted("hashset") {
        let mut set: HashSet<[u8; 16]> = HashSet::new();
        rows.push(measure("hashset", &batches, |_, keys, samples| {
            let t = Instant::now();
            let new = keys.iter().filter(|k| set.insert(**k)).count();
            samples.push(t.elapsed().as_nanos() as u64 / keys.len() as u64);
            new
        }));
    }
    for (name, pipelined) in [("redis-pipelined", true), ("redis", false)] {
        if !wanted(name) {
            continue;
        }
        let Some(mut redis) = Redis::start() else {
            skipped.push(name);
            continue;
        };
        let mut buf = Vec::new();
        rows.push(measure(name, &batches, |_, keys, samples| {
            let mut new = 0;
            if pipelined {
                let t = Instant::now();
                buf.clear();
                for k in keys {
                    Redis::set_nx(&mut buf, k);
                }
                new = redis.round_trip(&buf, keys.len());
                samples.push(t.elapsed().as_nanos() as u64 / keys.len() as u64);
            } else {
                for k in keys {
                    let t = Instant::now();
                    buf.clear();
                    Redis::set_nx(&mut buf, k);
                    new += redis.round_trip(&buf, 1);
                    if samples.len() < 1_000_000 {
                        samples.push(t.elapsed().as_nanos() as u64);
                    }
                }
            }
            new
        }));
    }

    let baseline = rows
        .iter()
        .find(|r| r.name == "naive-rocksdb")
        .map(|r| r.wall.as_nanos() as f64 / r.messages as f64);
    println!(
        "{:<24} {:>10} {:>12} {:>10} {:>9} {:>9} {:>10} {:>10} {:>11} {:>10}",
        "row",
        "ns/msg",
        "msgs/s",
        "cpu ns/msg",
        "p50 ns",
        "p99 ns",
        "rss MiB",
        "disk MiB",
        "vs naive",
        "new keys"
    );
    let mut out = String::from("{\n  \"messages\": ");
    out.push_str(&format!(
        "{messages},\n  \"distinct_keys\": {unique},\n  \"rows\": [\n"
    ));
    let count = rows.len();
    for (i, r) in rows.iter_mut().enumerate() {
        r.samples.sort_unstable();
        let ns = r.wall.as_nanos() as f64 / r.messages as f64;
        let cpu = r.cpu.as_nanos() as f64 / r.messages as f64;
        let (p50, p99) = (percentile(&r.samples, 0.5), percentile(&r.samples, 0.99));
        let ratio = baseline.map_or(f64::NAN, |b| b / ns);
        println!(
            "{:<24} {:>10.0} {:>12.0} {:>10.0} {:>9} {:>9} {:>10.1} {:>10} {:>10.2}x {:>10}",
            r.name,
            ns,
            1e9 / ns,
            cpu,
            p50,
            p99,
            r.rss_delta as f64 / (1 << 20) as f64,
            r.disk.map_or("-".into(), |d| format!(
                "{:.1}",
                d as f64 / (1 << 20) as f64
            )),
            ratio,
            r.new
        );
        out.push_str(&format!(
            "    {{\"row\": \"{}\", \"ns_per_msg\": {ns:.1}, \"msgs_per_s\": {:.0}, \"cpu_ns_per_msg\": {cpu:.1}, \"p50_ns\": {p50}, \"p99_ns\": {p99}, \"rss_delta_bytes\": {}, \"disk_bytes\": {}, \"speedup_vs_naive_rocksdb\": {}, \"new_keys\": {}}}{}\n",
            r.name,
            1e9 / ns,
            r.rss_delta,
            r.disk.map_or("null".into(), |d| d.to_string()),
            if ratio.is_finite() { format!("{ratio:.3}") } else { "null".into() },
            r.new,
            if i + 1 < count { "," } else { "" }
        ));
    }
    for name in &skipped {
        println!("{name:<24} skipped: no redis-server on the PATH");
    }
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(k), Some(s)) = (row("exactly-batch"), row("exactly-sequence")) {
        let per_million = |bytes: f64| bytes * 1e6 / messages as f64;
        let ns = |r: &Row| r.wall.as_nanos() as f64 / r.messages as f64;
        println!(
            "sequence mode against key mode, per million messages: {:.0} against {:.0} ns/msg \
             ({:.2}x), {:.0} against {:.0} bytes on disk, {:.0} against {:.0} bytes of state in \
             memory",
            ns(s),
            ns(k),
            ns(k) / ns(s),
            per_million(s.disk.unwrap_or(0) as f64),
            per_million(k.disk.unwrap_or(0) as f64),
            per_million(s.state.unwrap_or(0) as f64),
            per_million(k.state.unwrap_or(0) as f64),
        );
    }
    if let (Some(k), Some(o)) = (row("exactly-batch"), row("bloom-rocksdb-writebatch")) {
        let ns = |r: &Row| r.wall.as_nanos() as f64 / r.messages as f64;
        let cpu = |r: &Row| r.cpu.as_nanos() as f64 / r.messages as f64;
        println!(
            "exactly's batch path against the obvious design (Bloom + RocksDB WriteBatch): \
             {:.0} against {:.0} ns/msg ({:.2}x), {:.0} against {:.0} CPU ns/msg ({:.2}x)",
            ns(k),
            ns(o),
            ns(o) / ns(k),
            cpu(k),
            cpu(o),
            cpu(o) / cpu(k),
        );
    }
    out.push_str("  ],\n  \"skipped\": [");
    out.push_str(
        &skipped
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push_str("]\n}\n");
    if let Some(path) = json {
        std::fs::write(&path, out).expect("write json");
        println!("wrote {path}");
    }
    // Every row must agree on what is new: the comparison is only fair if so.
    for r in &rows {
        assert_eq!(
            r.new, unique,
            "{} found {} new keys, expected {unique}",
            r.name, r.new
        );
    }
}
