//! The store's metrics in Prometheus: installs `metrics-exporter-prometheus`
//! with its HTTP listener on loopback, runs the demo's stream (Kafka-like
//! messages over 8 partitions, 1% redeliveries) through a store, and keeps
//! serving `/metrics` until the duration elapses or Ctrl-C.
//!
//! ```text
//! cargo run --release --example metrics                      # 1 000 000 messages, port 9000, 60 s
//! cargo run --release --example metrics -- 200000 0 600      # any free port, ten minutes
//! curl -s localhost:9000/metrics | grep '^exactly_'
//! ```
//!
//! The library only talks to the `metrics` facade; the application installs
//! the recorder, before it assigns partitions (each partition registers its
//! metrics when it is assigned). See `docs/operations.md`, "Metrics".

use std::net::TcpListener;
use std::time::{Duration, Instant};

use exactly::{Options, Partition, Store, Verdict};
use metrics_exporter_prometheus::PrometheusBuilder;

mod common;

const PARTITIONS: i32 = 8;
const POLL_BATCH: usize = 500;
const REDELIVERY_PERCENT: u64 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // [MESSAGES] [PORT] [SECONDS]: port 0 picks a free one.
    let mut args = std::env::args().skip(1);
    let messages: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let port: u16 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(9000);
    let serve = Duration::from_secs(args.next().map(|s| s.parse()).transpose()?.unwrap_or(60));
    let port = match port {
        0 => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        p => p,
    };
    PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], port))
        .install()?;
    println!("serving http://127.0.0.1:{port}/metrics");

    let scratch = tempfile::tempdir()?;
    let options = Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition((messages / PARTITIONS as u64).max(1_000) as usize);
    let store = Store::open(scratch.path().join("store"), options)?;
    let partitions: Vec<Partition> = (0..PARTITIONS)
        .map(|n| Partition::new("orders", n))
        .collect();
    for p in &partitions {
        store.assign(p)?;
    }

    // The demo's stream: each message has an idempotency key; 1% are
    // redeliveries of a recent key.
    let mut stream = common::Redeliveries::new(REDELIVERY_PERCENT);
    let mut polls: Vec<Vec<[u8; 16]>> = vec![Vec::new(); PARTITIONS as usize];
    let mut offsets = vec![0i64; PARTITIONS as usize];
    let (mut processed, mut duplicates) = (0u64, 0u64);
    let started = Instant::now();
    for id in stream.by_ref().take(usize::try_from(messages)?) {
        let n = (id % PARTITIONS as u64) as usize;
        polls[n].push(common::key(id));
        if polls[n].len() == POLL_BATCH {
            let poll = std::mem::take(&mut polls[n]);
            offsets[n] += poll.len() as i64;
            let (p, d) = process(&store, &partitions[n], &poll, offsets[n])?;
            processed += p;
            duplicates += d;
        }
    }
    for (n, poll) in polls
        .iter()
        .enumerate()
        .filter(|(_, poll)| !poll.is_empty())
    {
        offsets[n] += poll.len() as i64;
        let (p, d) = process(&store, &partitions[n], poll, offsets[n])?;
        processed += p;
        duplicates += d;
    }
    println!(
        "{messages} messages in {:.1?}: {processed} processed, {duplicates} duplicates caught",
        started.elapsed()
    );

    // Commits refresh the gauges at most once a second; `stats()` sets them
    // (and publishes the counters) whenever the application calls it.
    println!("serving for {serve:?} (Ctrl-C to stop)");
    let until = Instant::now() + serve;
    while Instant::now() < until {
        let stats = store.stats();
        let checks: u64 = stats.partitions.values().map(|s| s.checks).sum();
        let filter: usize = stats.partitions.values().map(|s| s.filter_bytes).sum();
        println!("  stats: {checks} checks, {filter} filter bytes over {PARTITIONS} partitions");
        std::thread::sleep(
            Duration::from_secs(10).min(until.saturating_duration_since(Instant::now())),
        );
    }
    store.close()?;
    Ok(())
}

/// One poll batch: process new keys, then commit marks and offset together.
fn process(
    store: &Store,
    p: &Partition,
    poll: &[[u8; 16]],
    next_offset: i64,
) -> exactly::Result<(u64, u64)> {
    let mut batch = store.batch(p)?;
    let (mut new, mut dup) = (0, 0);
    for key in poll {
        match batch.check_and_mark(key)? {
            Verdict::New => new += 1, // the side effect goes here
            Verdict::Duplicate => dup += 1,
        }
    }
    batch.set_offset(next_offset);
    batch.commit()?;
    Ok((new, dup))
}
