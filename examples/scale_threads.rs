//! Throughput across cores: one store, 16 partitions, T consumer threads,
//! each owning 16/T of the partitions (as a consumer host runs one consumer
//! thread per group of partitions), every thread running the batch path on
//! its partitions' poll batches. Aggregate throughput at T threads against
//! T times that of one thread says how far the store lets cores add up.
//!
//! ```text
//! cargo run --release --example scale_threads -- --messages 4000000 --threads 1,2,4,8,16
//! ```
//!
//! The stream is `compare`'s: 1 % redeliveries drawn from the last 100 000
//! keys, 16-byte keys, poll batches of 1 000 per partition; every thread
//! count runs on a fresh store, the same messages, and must find the same
//! number of new keys. The obvious design (a Bloom filter per partition in
//! front of one RocksDB, one `WriteBatch` per poll batch) runs beside it
//! with `--obvious`, for its scaling on the same machine.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_time, key, Redeliveries};
use exactly::{Options, Partition, Store, Verdict};

const PARTITIONS: usize = 16;
const BATCH: usize = 1_000;

/// A poll batch: a partition and its messages' keys.
type PollBatch = (usize, Vec<[u8; 16]>);

/// The stream cut into poll batches per partition, and its distinct keys.
fn stream(messages: usize) -> (Vec<PollBatch>, usize) {
    let mut pending: Vec<Vec<[u8; 16]>> =
        (0..PARTITIONS).map(|_| Vec::with_capacity(BATCH)).collect();
    let mut batches = Vec::new();
    let mut unique = HashSet::new();
    for id in Redeliveries::new(1).take(messages) {
        unique.insert(id);
        let p = (id % PARTITIONS as u64) as usize;
        pending[p].push(key(id));
        if pending[p].len() == BATCH {
            batches.push((
                p,
                std::mem::replace(&mut pending[p], Vec::with_capacity(BATCH)),
            ));
        }
    }
    for (p, keys) in pending.into_iter().enumerate() {
        if !keys.is_empty() {
            batches.push((p, keys));
        }
    }
    (batches, unique.len())
}

/// A design's run over the stream's batches (messages) at a thread count.
type Design = fn(&[PollBatch], usize, usize) -> Run;

/// One thread count's result.
struct Run {
    threads: usize,
    wall: Duration,
    cpu: Duration,
    new: usize,
}

/// Runs `work` on `threads` threads, thread `t` getting the batches of the
/// partitions `p` with `p % threads == t`, in stream order; all start
/// together. Returns the wall time and the new keys found.
fn run_threads<W>(batches: &[PollBatch], threads: usize, work: W) -> Run
where
    W: Fn(usize, &[[u8; 16]]) -> usize + Sync,
{
    let barrier = Barrier::new(threads + 1);
    let new = Mutex::new(0usize);
    // Set once every thread has its batches, as they all start; the scope
    // ends when the last one is done.
    let (started, cpu0) = std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, new, work) = (&barrier, &new, &work);
            s.spawn(move || {
                let mine: Vec<&PollBatch> =
                    batches.iter().filter(|(p, _)| p % threads == t).collect();
                barrier.wait();
                let found: usize = mine.iter().map(|(p, keys)| work(*p, keys)).sum();
                *new.lock().unwrap() += found;
            });
        }
        let cpu0 = cpu_time();
        barrier.wait();
        (Instant::now(), cpu0)
    });
    Run {
        threads,
        wall: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu0),
        new: new.into_inner().unwrap(),
    }
}

fn exactly_run(batches: &[PollBatch], messages: usize, threads: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition((messages / PARTITIONS).max(1_000));
    let store = Arc::new(Store::open(dir.path(), options).expect("open"));
    let parts: Vec<Partition> = (0..PARTITIONS as i32)
        .map(|n| Partition::new("bench", n))
        .collect();
    for p in &parts {
        store.assign(p).expect("assign");
    }
    run_threads(batches, threads, |p, keys| {
        let mut batch = store.batch(&parts[p]).expect("batch");
        let mut new = 0;
        for k in keys {
            if batch.check_and_mark(k).expect("mark") == Verdict::New {
                new += 1;
            }
        }
        batch.commit().expect("commit");
        new
    })
}

fn obvious_run(batches: &[PollBatch], messages: usize, threads: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    let db = rocksdb::DB::open(&o, dir.path()).expect("open rocksdb");
    let per_partition = (messages / PARTITIONS).max(1_000);
    let filters: Vec<Mutex<fastbloom::BloomFilter>> = (0..PARTITIONS)
        .map(|_| {
            Mutex::new(fastbloom::BloomFilter::with_false_pos(0.01).expected_items(per_partition))
        })
        .collect();
    run_threads(batches, threads, |p, keys| {
        // One thread owns each partition: its filter's lock is uncontended.
        let mut filter = filters[p].lock().unwrap();
        let mut wb = rocksdb::WriteBatch::default();
        let mut seen = HashSet::with_capacity(keys.len());
        let mut new = 0;
        for k in keys {
            let mut stored = [0u8; 17];
            stored[0] = p as u8;
            stored[1..].copy_from_slice(k);
            let maybe = filter.contains(&stored);
            if (!maybe || db.get_pinned(stored).expect("get").is_none()) && seen.insert(stored) {
                wb.put(stored, [1u8; 9]);
                filter.insert(&stored);
                new += 1;
            }
        }
        db.write(wb).expect("write");
        new
    })
}

fn main() {
    let mut messages = 2_000_000usize;
    let mut threads = vec![1usize, 2];
    let mut obvious = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--messages" => {
                messages = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--messages N")
            }
            "--threads" => {
                threads = args
                    .next()
                    .map(|s| {
                        s.split(',')
                            .map(|t| t.parse().expect("a thread count"))
                            .collect()
                    })
                    .expect("--threads T,T,...")
            }
            "--obvious" => obvious = true,
            "-h" | "--help" => {
                println!(
                    "usage: scale_threads [--messages N] [--threads 1,2,...] [--obvious]\n  \
                     thread counts must divide {PARTITIONS}"
                );
                return;
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    for &t in &threads {
        assert!(
            t > 0 && PARTITIONS.is_multiple_of(t),
            "thread counts must divide {PARTITIONS}, got {t}"
        );
    }
    let (batches, unique) = stream(messages);
    println!(
        "stream: {messages} messages, {unique} distinct keys, {PARTITIONS} partitions, \
         batches of {BATCH}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut designs: Vec<(&str, Design)> = vec![("exactly-batch", exactly_run)];
    if obvious {
        designs.push(("bloom-rocksdb-writebatch", obvious_run));
    }
    println!(
        "{:<26} {:>7} {:>12} {:>10} {:>12} {:>14}",
        "design", "threads", "msgs/s", "ns/msg", "cpu ns/msg", "vs T x 1 thread"
    );
    for (name, run) in designs {
        let mut one = None;
        for &t in &threads {
            let r = run(&batches, messages, t);
            assert_eq!(
                r.new, unique,
                "{name} at {t} threads found {} new keys",
                r.new
            );
            let rate = messages as f64 / r.wall.as_secs_f64();
            let base = *one.get_or_insert(if r.threads == 1 { rate } else { f64::NAN });
            println!(
                "{:<26} {:>7} {:>12.0} {:>10.0} {:>12.0} {:>13.2}x",
                name,
                r.threads,
                rate,
                r.wall.as_nanos() as f64 / messages as f64,
                r.cpu.as_nanos() as f64 / messages as f64,
                rate / (base * r.threads as f64)
            );
        }
    }
}
