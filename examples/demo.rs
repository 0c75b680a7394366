//! The main job on an embedded default: stream Kafka-like messages with
//! redeliveries through a store, process each idempotency key once, then
//! "crash", restart and replay the tail, which the store catches.
//!
//! ```text
//! cargo run --release --example demo                 # 1 000 000 messages in a temporary store
//! cargo run --release --example demo -- 5000000 ./dedup-demo
//! RUST_LOG=exactly=info cargo run --release --example demo   # with the store's log lines
//! ```
//!
//! The store logs through `tracing` and installs no subscriber: the demo
//! installs one that prints to stderr what `RUST_LOG` asks for (warnings
//! and errors when it is unset). See `docs/operations.md`, "Logs".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use exactly::{Options, Partition, Store, Verdict};

mod common;

const PARTITIONS: i32 = 8;
const POLL_BATCH: usize = 500;
const REDELIVERY_PERCENT: u64 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (messages, path, _scratch) = common::messages_and_dir(1_000_000)?;

    let options = Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition((messages / PARTITIONS as u64).max(1_000) as usize);
    let store = Store::open(&path, options.clone())?;
    let partitions: Vec<Partition> = (0..PARTITIONS)
        .map(|n| Partition::new("orders", n))
        .collect();
    for p in &partitions {
        store.assign(p)?;
    }

    // The stream: each message has an idempotency key; 1% are redeliveries
    // of a recent key (a producer retry or a consumer replay).
    let mut stream = common::Redeliveries::new(REDELIVERY_PERCENT);
    let mut offsets: HashMap<i32, i64> = HashMap::new();
    let mut polls: HashMap<i32, Vec<(i64, [u8; 16])>> = HashMap::new();
    let (mut processed, mut duplicates) = (0u64, 0u64);
    let started = Instant::now();
    for id in stream.by_ref().take(usize::try_from(messages)?) {
        let n = (id % PARTITIONS as u64) as i32;
        let offset = offsets.entry(n).or_insert(0);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&id.to_be_bytes());
        key[8..].copy_from_slice(&(id.wrapping_mul(0x9e37_79b9)).to_le_bytes());
        let poll = polls.entry(n).or_default();
        poll.push((*offset, key));
        *offset += 1;
        if poll.len() == POLL_BATCH {
            let poll = std::mem::take(poll);
            let (p, d) = process(&store, &partitions[n as usize], &poll)?;
            processed += p;
            duplicates += d;
        }
    }
    for (n, poll) in polls.drain() {
        if !poll.is_empty() {
            let (p, d) = process(&store, &partitions[n as usize], &poll)?;
            processed += p;
            duplicates += d;
        }
    }
    let elapsed = started.elapsed();
    println!("exactly demo: {messages} messages over {PARTITIONS} partitions, poll batches of {POLL_BATCH}");
    println!("  processed once:   {processed}");
    println!("  duplicates caught: {duplicates}");
    println!(
        "  throughput:        {:.0} msgs/s ({:.0} ns/msg)",
        messages as f64 / elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / messages as f64
    );
    let stats = store.stats();
    let negatives: u64 = stats.partitions.values().map(|s| s.bloom_negatives).sum();
    let checks: u64 = stats.partitions.values().map(|s| s.checks).sum();
    println!(
        "  answered by the Bloom front alone: {:.1}%",
        100.0 * negatives as f64 / checks.max(1) as f64
    );

    // A crash: the process dies without closing the store. On restart the
    // consumer resumes from the store's offsets; Kafka redelivers the last
    // messages it had not committed, and the store recognises all of them.
    drop(store);
    let reopen = Instant::now();
    let store = Store::open(&path, options)?;
    let mut replayed = 0u64;
    let mut caught = 0u64;
    for p in &partitions {
        store.assign(p)?;
    }
    println!(
        "  reopened and reassigned {PARTITIONS} partitions in {:?}",
        reopen.elapsed()
    );
    let recent = stream.recent();
    let tail = recent.len().min(10_000);
    for &id in &recent[recent.len() - tail..] {
        let n = (id % PARTITIONS as u64) as i32;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&id.to_be_bytes());
        key[8..].copy_from_slice(&(id.wrapping_mul(0x9e37_79b9)).to_le_bytes());
        replayed += 1;
        if store.check(&partitions[n as usize], &key)? == Verdict::Duplicate {
            caught += 1;
        }
    }
    println!(
        "  after the restart: {caught} of {replayed} replayed messages recognised as processed"
    );
    for p in &partitions {
        println!(
            "  {p}: resume at offset {}",
            store
                .committed_offset(p)?
                .map_or("-".into(), |o| o.to_string())
        );
    }
    store.close()?;
    if caught != replayed {
        return Err("a replayed message was not recognised".into());
    }
    Ok(())
}

/// One poll batch: process new keys, then commit marks and offset together.
fn process(store: &Store, p: &Partition, poll: &[(i64, [u8; 16])]) -> exactly::Result<(u64, u64)> {
    let mut batch = store.batch(p)?;
    let (mut new, mut dup) = (0, 0);
    for (_, key) in poll {
        match batch.check_and_mark(key)? {
            Verdict::New => new += 1, // the side effect goes here
            Verdict::Duplicate => dup += 1,
        }
    }
    if let Some((last, _)) = poll.last() {
        batch.set_offset(last + 1);
    }
    batch.commit()?;
    Ok((new, dup))
}
