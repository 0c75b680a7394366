//! Scale: what the batch path costs per message as the store fills up, and
//! how long a reopen takes after a clean close of everything.
//!
//! ```text
//! cargo run --release --example scale -- 100000000            # 100 M keys in a temporary store
//! cargo run --release --example scale -- 10000000 ./scale-store
//! ```
//!
//! One consumer thread feeds 8 partitions with poll batches of 1 000 random
//! 16-byte keys (1 % redeliveries of a recent key). Every 1 % of the run it
//! prints the cost of the last million messages (wall and process CPU per
//! message) against the number of keys stored. At the end it closes the
//! store, reopens it, assigns every partition and checks one key: the time to
//! that first answer is the reopen cost.

use std::time::{Duration, Instant};

use exactly::{Options, Partition, Store, Verdict};

mod common;
use common::{cpu_time, key, Rng};

const PARTITIONS: i32 = 8;
const POLL_BATCH: usize = 1_000;
const SEGMENT: u64 = 1_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (messages, path, _scratch) = common::messages_and_dir(10_000_000)?;
    let options = Options::default()
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .expected_keys_per_partition((messages / PARTITIONS as u64).max(1_000) as usize);
    let partitions: Vec<Partition> = (0..PARTITIONS)
        .map(|n| Partition::new("orders", n))
        .collect();

    let store = Store::open(&path, options.clone())?;
    for p in &partitions {
        store.assign(p)?;
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut next_id = 0u64;
    let mut offsets = [0i64; PARTITIONS as usize];
    let (mut sent, mut stored) = (0u64, 0u64);
    let report_every = (messages / 100).max(SEGMENT);
    println!(
        "{:>12} {:>12} {:>10} {:>10}",
        "messages", "keys stored", "ns/msg", "cpu ns/msg"
    );
    let (mut segment_start, mut segment_cpu) = (Instant::now(), cpu_time());
    let mut first_segment = None;
    let mut last_segment = None;
    while sent < messages {
        for (i, p) in partitions.iter().enumerate() {
            let mut batch = store.batch(p)?;
            for _ in 0..POLL_BATCH {
                let r = rng.next();
                let id = if r.is_multiple_of(100) && next_id > 10_000 {
                    next_id - 1 - (r >> 8) % 10_000
                } else {
                    next_id += 1;
                    next_id
                };
                if batch.check_and_mark(&key(id))? == Verdict::New {
                    stored += 1;
                }
            }
            offsets[i] += POLL_BATCH as i64;
            batch.set_offset(offsets[i]);
            batch.commit()?;
            sent += POLL_BATCH as u64;
            if sent.is_multiple_of(SEGMENT) {
                let wall = segment_start.elapsed().as_nanos() as f64 / SEGMENT as f64;
                let cpu = cpu_time().saturating_sub(segment_cpu).as_nanos() as f64 / SEGMENT as f64;
                if first_segment.is_none() && sent >= 2 * SEGMENT {
                    first_segment = Some((stored, wall, cpu));
                }
                last_segment = Some((stored, wall, cpu));
                if sent.is_multiple_of(report_every) || sent == 2 * SEGMENT {
                    println!("{sent:>12} {stored:>12} {wall:>10.0} {cpu:>10.0}");
                }
                (segment_start, segment_cpu) = (Instant::now(), cpu_time());
            }
        }
    }
    let filter_bytes: usize = store
        .stats()
        .partitions
        .values()
        .map(|s| s.filter_bytes)
        .sum();
    store.close()?;

    let started = Instant::now();
    let store = Store::open(&path, options)?;
    for p in &partitions {
        store.assign(p)?;
    }
    let verdict = store.check(&partitions[0], &key(1))?;
    let reopen = started.elapsed();
    let from_snapshot = store
        .stats()
        .partitions
        .values()
        .all(|s| s.filter_from_snapshot);
    store.close()?;

    println!();
    if let (Some(first), Some(last)) = (first_segment, last_segment) {
        println!(
            "million messages with {} M keys stored: {:.0} ns/msg ({:.0} CPU); with {} M: {:.0} ns/msg ({:.0} CPU); ratio {:.2}x",
            first.0 / 1_000_000,
            first.1,
            first.2,
            last.0 / 1_000_000,
            last.1,
            last.2,
            last.1 / first.1
        );
    }
    println!(
        "filter: {:.1} bits per stored key; reopen after a clean close of {stored} keys: \
         {reopen:?} to the first answer ({verdict:?}, filters from snapshots: {from_snapshot})",
        filter_bytes as f64 * 8.0 / stored as f64
    );
    Ok(())
}
