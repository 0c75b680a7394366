//! The cost of each delivery mode, side by side in one run on the same
//! stream and the same broker (librdkafka's in-process mock cluster):
//!
//! * `at-least-once`: a plain consumer, no store (the handler runs for every
//!   message, redeliveries included), offsets committed after each poll;
//! * `local`: `IdempotentConsumer` with a local store (marks and offset in
//!   one write per partition and poll batch, offsets committed to Kafka
//!   asynchronously);
//! * `changelog`: the same plus the changelog, one Kafka transaction per
//!   poll batch (changelog records and the group's offsets);
//! * `claim`: changelog mode with claims committed before the handlers run
//!   (`poll_batch_claimed`): a second store write and transaction per batch.
//!
//! ```text
//! cargo run --release --features kafka --example kafka_modes -- [MESSAGES]
//! ```
//!
//! Per mode: messages per second once the group is joined (from the first
//! poll batch that handled messages to the last), and the p50 and p99
//! latency of a poll batch that handled messages (poll, handlers, store
//! writes, transactions). The mock cluster answers in-process, so these are
//! the client-side costs without network round trips: on a real broker each
//! transaction adds its round trips (`docs/kafka.md`).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use exactly::kafka::rdkafka::message::{Header, OwnedHeaders};
use exactly::kafka::rdkafka::mocking::MockCluster;
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{
    changelog_topic, Changelog, DedupContext, GroupStore, IdempotentConsumer, KeySource,
};
use exactly::{Options, Store};

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 4;
const HEADER: &str = "idempotency-key";
const MODES: [&str; 4] = ["at-least-once", "local", "changelog", "claim"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(TOPIC, PARTITIONS, 1)?;
    for mode in MODES {
        cluster.create_topic(&changelog_topic(mode, TOPIC), PARTITIONS, 1)?;
    }
    let servers = cluster.bootstrap_servers();
    let distinct = produce(&servers, messages)?;
    println!(
        "stream: {messages} messages, {distinct} distinct keys (1 % resends), {PARTITIONS} partitions, mock cluster"
    );
    println!(
        "{:<15} {:>10} {:>12} {:>12} {:>12} {:>9}",
        "mode", "msgs/s", "batch p50", "batch p99", "handled", "batches"
    );
    for mode in MODES {
        let run = run(&servers, mode, messages)?;
        println!(
            "{:<15} {:>10.0} {:>10.2}ms {:>10.2}ms {:>12} {:>9}",
            mode,
            messages as f64 / run.wall.as_secs_f64(),
            percentile(&run.batches, 0.5),
            percentile(&run.batches, 0.99),
            run.handled,
            run.batches.len()
        );
    }
    Ok(())
}

/// Produces `messages` messages, key `order-{id}` in a header, 1 % of them
/// resends of an earlier key; returns the number of distinct keys.
fn produce(servers: &str, messages: usize) -> Result<usize, Box<dyn std::error::Error>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "5")
        .create()?;
    let mut distinct = 0usize;
    let mut seed = 0x5eed_u64;
    for i in 0..messages {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let id = if i > 0 && (seed >> 33).is_multiple_of(100) {
            (seed >> 20) as usize % distinct
        } else {
            distinct += 1;
            distinct - 1
        };
        let key = format!("order-{id}");
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER,
            value: Some(key.as_bytes()),
        });
        let record = BaseRecord::to(TOPIC)
            .partition((id % PARTITIONS as usize) as i32)
            .key(key.as_bytes())
            .payload("payload")
            .headers(headers);
        if let Err((e, _)) = producer.send(record) {
            return Err(e.into());
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(distinct)
}

struct Run {
    /// From the start of the first poll batch that handled messages to the
    /// end of the last: the group join is left out.
    wall: Duration,
    /// Latency of each poll batch that handled messages, in ms.
    batches: Vec<f64>,
    handled: usize,
}

fn consumer_config(servers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    c
}

/// Consumes the whole stream in `mode`, in a group of its own.
fn run(servers: &str, mode: &str, messages: usize) -> Result<Run, Box<dyn std::error::Error>> {
    let mut run = Run {
        wall: Duration::ZERO,
        batches: Vec::new(),
        handled: 0,
    };
    let mut seen = 0usize;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let deadline = Duration::from_secs(600);
    if mode == "at-least-once" {
        let consumer: BaseConsumer = consumer_config(servers, mode).create()?;
        consumer.subscribe(&[TOPIC])?;
        while seen < messages && started.elapsed() < deadline {
            let t = Instant::now();
            let mut n = 0;
            while n < 500 {
                match consumer.poll(if n == 0 {
                    Duration::from_millis(100)
                } else {
                    Duration::ZERO
                }) {
                    Some(Ok(_)) => {
                        n += 1;
                        run.handled += 1;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => break,
                }
            }
            if n > 0 {
                first.get_or_insert(t);
                consumer.commit_consumer_state(CommitMode::Async)?;
                run.batches.push(t.elapsed().as_secs_f64() * 1e3);
                seen += n;
            }
        }
    } else {
        let dir = tempfile::tempdir()?;
        let store = std::sync::Arc::new(Store::open(dir.path(), Options::default())?);
        let group = GroupStore::new(store.clone());
        let consumer: BaseConsumer<DedupContext> =
            consumer_config(servers, mode).create_with_context(DedupContext::new(&group))?;
        consumer.subscribe(&[TOPIC])?;
        let mut consumer = IdempotentConsumer::new(consumer, KeySource::header(HEADER));
        if mode != "local" {
            let mut client = ClientConfig::new();
            client.set("bootstrap.servers", servers);
            let changelog = Changelog::new(
                &client,
                mode,
                "bench",
                Duration::from_secs(8 * 24 * 3600),
                Duration::from_secs(10),
            )?;
            consumer = consumer.changelog(changelog);
        }
        while seen < messages && started.elapsed() < deadline {
            let t = Instant::now();
            let mut handled = 0usize;
            let report = if mode == "claim" {
                consumer.poll_batch_claimed(Duration::from_millis(100), |_, _, _, _| {
                    handled += 1;
                    Ok::<(), Infallible>(())
                })?
            } else {
                consumer.poll_batch(Duration::from_millis(100), |_, _| {
                    handled += 1;
                    Ok::<(), Infallible>(())
                })?
            };
            if report.messages > 0 {
                first.get_or_insert(t);
                run.batches.push(t.elapsed().as_secs_f64() * 1e3);
                seen += report.messages;
                run.handled += handled;
            }
        }
    }
    run.wall = first.map_or(Duration::ZERO, |f| f.elapsed());
    assert!(
        seen >= messages,
        "{mode}: {seen} of {messages} in {deadline:?}"
    );
    Ok(run)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}
