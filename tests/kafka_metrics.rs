//! The Kafka poll loop's metrics, scraped over HTTP from the Prometheus
//! exporter on librdkafka's mock cluster, agree partition by partition with
//! what the test produced and with the summed `PollReport`s: messages
//! processed, skipped as duplicates or for want of a key (under
//! `MissingKey::Skip`), failed, the handler's latency count, the
//! rebalances, the offset a reassigned partition resumes at; and the
//! store's metrics of those partitions with `Store::stats()`.
//!
//! Two instances share one store directory in turn: the first consumes a
//! stream with resent keys and keyless messages; the second, after more
//! resends, new keys and keyless messages, resumes at the store's offsets
//! and meets a handler that fails once.
//!
//! A process has one global recorder: this file holds one test.

mod kafka_support;
mod metrics_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{ConsumeError, MissingKey, PollReport};
use exactly::{Partition, PartitionStats};
use metrics_exporter_prometheus::PrometheusBuilder;

use kafka_support::*;
use metrics_support::{free_port, scrape, Scraped};

/// The key whose handler fails once, in the second run (partition 1).
const FAILING: &[u8] = b"order-85";

#[test]
fn loop_metrics_agree_with_what_was_produced_and_reported() {
    // The exporter first: the loop registers its handles at a partition's
    // first poll batch, the store at assignment.
    let port = free_port();
    PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], port))
        .install()
        .expect("install the Prometheus exporter");

    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let partitions: Vec<Partition> = (0..PARTITIONS).map(|p| Partition::new(TOPIC, p)).collect();
    let mut model = Model::default();
    let mut ends: HashMap<i32, i64> = HashMap::new();

    // First run: 80 keys over the 4 partitions, resends of 30 of them (some
    // in the batch that first carries the key, some later), and keyless
    // messages on three partitions, a different number on each.
    model.produce(&servers, 0..40, &mut ends);
    model.produce_keyless(&servers, &[(0, 3), (1, 1), (3, 2)], &mut ends);
    model.produce(&servers, (0..20).chain(60..64), &mut ends);
    model.produce(&servers, 40..80, &mut ends);
    model.produce(&servers, 70..76, &mut ends);
    let first_ends = ends.clone();

    let mut a = start(&servers, dir.path(), 500);
    let run_a = run_to(&mut a, &ends, |_| false);
    assert_eq!(run_a.failures, 0);
    let scraped = scrape(port);
    let stats_a = a.store.stats().partitions;
    for p in &partitions {
        model.assert_loop(&scraped, p);
        assert_store(&scraped, p, &stats_a[p], None);
        // The store had no offset at assignment: the group's offset (here
        // `auto.offset.reset`) decided, and nothing was set.
        assert_eq!(scraped.get(RESUME, &labels(p)), None, "{p}: resume offset");
    }
    run_a.assert_sums(&model);
    assert_eq!(scraped.get(REBALANCES, &[("kind", "assign")]), Some(1.0));
    assert_eq!(
        scraped.sum(REBALANCES),
        a.consumer.context().rebalances() as f64,
        "every rebalance callback counted once"
    );
    a.stop();
    let after_a = model.clone();

    // Second run, same store directory: resends of keys the first run
    // processed (duplicates found in the store), 20 new keys of which one
    // fails once, keyless messages on partition 2. One message per poll
    // batch, so that the batch the handler error ends (it returns no
    // report) holds only the failing message.
    model.produce(&servers, (10..30).chain(80..100), &mut ends);
    model.produce_keyless(&servers, &[(2, 2)], &mut ends);
    model.produce(&servers, [60, 61, 99], &mut ends);
    model.fail_once(FAILING);

    let mut b = start(&servers, dir.path(), 1);
    let run_b = run_to(&mut b, &ends, |key| key == FAILING);
    assert_eq!(run_b.failures, 1, "the handler failed once");
    let scraped = scrape(port);
    let stats_b = b.store.stats().partitions;
    for p in &partitions {
        model.assert_loop(&scraped, p);
        assert_store(&scraped, p, &stats_b[p], Some(&stats_a[p]));
        assert_eq!(
            scraped.get(RESUME, &labels(p)),
            Some(first_ends[&p.partition()] as f64),
            "{p}: resumed at the store's offset after the first run"
        );
        assert_eq!(
            scraped.get("exactly_committed_offset", &labels(p)),
            Some(ends[&p.partition()] as f64),
            "{p}: committed offset"
        );
    }
    run_b.assert_sums(&model.since(&after_a));
    assert_eq!(
        scraped.get(FAILED, &labels(&Partition::new(TOPIC, 1))),
        Some(1.0),
        "one handler error, on partition 1"
    );
    assert_eq!(scraped.get(REBALANCES, &[("kind", "assign")]), Some(2.0));
    assert_eq!(scraped.get(REBALANCES, &[("kind", "revoke")]), Some(1.0));
    assert_eq!(scraped.get(REBALANCES, &[("kind", "error")]), None);
    b.stop();
}

const PROCESSED: &str = "exactly_kafka_messages_processed_total";
const SKIPPED: &str = "exactly_kafka_messages_skipped_total";
const IN_DOUBT: &str = "exactly_kafka_messages_in_doubt_total";
const FAILED: &str = "exactly_kafka_messages_failed_total";
const HANDLER_COUNT: &str = "exactly_kafka_handler_seconds_count";
const REBALANCES: &str = "exactly_kafka_rebalances_total";
const RESUME: &str = "exactly_kafka_resume_offset";

/// An instance on `dir` that skips keyless messages, with at most `batch`
/// messages per poll batch.
fn start(servers: &str, dir: &std::path::Path, batch: usize) -> Instance {
    let Instance { consumer, store } = Instance::start(servers, dir, "metrics", false);
    Instance {
        consumer: consumer.missing_key(MissingKey::Skip).max_batch(batch),
        store,
    }
}

/// What one instance's poll batches reported, summed, and the handler
/// errors they returned.
#[derive(Debug, Default)]
struct Run {
    messages: usize,
    processed: usize,
    duplicates: usize,
    skipped: usize,
    in_doubt: usize,
    failures: usize,
}

impl Run {
    fn add(&mut self, r: &PollReport) {
        assert_eq!(r.discarded, 0, "no rebalance during a poll: {r:?}");
        self.messages += r.messages;
        self.processed += r.processed;
        self.duplicates += r.duplicates;
        self.skipped += r.skipped;
        self.in_doubt += r.in_doubt;
    }

    /// The sums equal what `model` expects of the run.
    fn assert_sums(&self, model: &Model) {
        let total = |f: fn(&Counts) -> u64| model.0.values().map(f).sum::<u64>() as usize;
        assert_eq!(self.processed, total(|c| c.processed), "{self:?}");
        assert_eq!(self.duplicates, total(|c| c.duplicates), "{self:?}");
        assert_eq!(self.skipped, total(|c| c.no_key), "{self:?}");
        assert_eq!(self.in_doubt, 0, "{self:?}");
        assert_eq!(
            self.messages,
            total(|c| c.processed + c.duplicates + c.no_key),
            "{self:?}"
        );
    }
}

/// Consumes until the store's offsets reach `ends`; the handler fails the
/// first time `fails(key)` holds for a key.
fn run_to(inst: &mut Instance, ends: &HashMap<i32, i64>, fails: impl Fn(&[u8]) -> bool) -> Run {
    let started = Instant::now();
    let mut run = Run::default();
    let mut failed: HashSet<Vec<u8>> = HashSet::new();
    while !inst.reached(ends) {
        let polled = inst
            .consumer
            .poll_batch(Duration::from_millis(100), |_, key| {
                let key = key.expect("keyless messages are skipped");
                if fails(key) && failed.insert(key.to_vec()) {
                    return Err("the handler failed");
                }
                Ok(())
            });
        match polled {
            Ok(report) => run.add(&report),
            Err(ConsumeError::Handler { partition, .. }) => {
                assert_eq!(partition, Partition::new(TOPIC, 1));
                run.failures += 1;
            }
            Err(e) => panic!("poll: {e}"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "did not reach {ends:?}: store offsets {:?}",
            inst.offsets()
        );
    }
    run
}

/// What the loop should count per partition.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    processed: u64,
    duplicates: u64,
    no_key: u64,
    failed: u64,
}

/// The messages produced so far, as the loop should count them: per
/// partition, the counts, and the keys seen.
#[derive(Debug, Default, Clone)]
struct Model(BTreeMap<i32, Counts>, HashSet<usize>);

impl Model {
    /// Produces key `order-{i}` on partition `i % 4` for each `i`.
    fn produce(
        &mut self,
        servers: &str,
        keys: impl IntoIterator<Item = usize>,
        ends: &mut HashMap<i32, i64>,
    ) {
        let keys: Vec<usize> = keys.into_iter().collect();
        produce(servers, keys.iter().copied(), ends);
        for i in keys {
            let counts = self.0.entry((i % PARTITIONS as usize) as i32).or_default();
            if self.1.insert(i) {
                counts.processed += 1;
            } else {
                counts.duplicates += 1;
            }
        }
    }

    /// Produces `n` messages without the key header on each `(partition, n)`.
    fn produce_keyless(&mut self, servers: &str, per: &[(i32, u64)], ends: &mut HashMap<i32, i64>) {
        let producer: BaseProducer = client(servers).create().unwrap();
        for &(partition, n) in per {
            for _ in 0..n {
                producer
                    .send(
                        BaseRecord::<(), _>::to(TOPIC)
                            .partition(partition)
                            .payload("no key"),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap();
                producer.poll(Duration::ZERO);
            }
            *ends.entry(partition).or_default() += n as i64;
            self.0.entry(partition).or_default().no_key += n;
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// The handler fails once on `key` (`order-{i}`).
    fn fail_once(&mut self, key: &[u8]) {
        let i: usize = std::str::from_utf8(key).unwrap()["order-".len()..]
            .parse()
            .unwrap();
        self.0
            .entry((i % PARTITIONS as usize) as i32)
            .or_default()
            .failed += 1;
    }

    /// What this model counts beyond `earlier`.
    fn since(&self, earlier: &Model) -> Model {
        let counts = self
            .0
            .iter()
            .map(|(&p, c)| {
                let e = earlier.0.get(&p).copied().unwrap_or_default();
                let c = Counts {
                    processed: c.processed - e.processed,
                    duplicates: c.duplicates - e.duplicates,
                    no_key: c.no_key - e.no_key,
                    failed: c.failed - e.failed,
                };
                (p, c)
            })
            .collect();
        Model(counts, HashSet::new())
    }

    /// The loop's metrics of `p` in `scraped` equal the counts.
    fn assert_loop(&self, scraped: &Scraped, p: &Partition) {
        let c = self.0[&p.partition()];
        assert!(c.processed > 0 && c.duplicates > 0, "{p}: {c:?}");
        let base = labels(p);
        let reason = |r: &'static str| {
            let mut l = base.clone();
            l.push(("reason", r));
            l
        };
        let got = |name: &str, labels: &[(&str, &str)]| scraped.get(name, labels).unwrap_or(0.0);
        let scraped_counts = Counts {
            processed: got(PROCESSED, &base) as u64,
            duplicates: got(SKIPPED, &reason("duplicate")) as u64,
            no_key: got(SKIPPED, &reason("no_key")) as u64,
            failed: got(FAILED, &base) as u64,
        };
        assert_eq!(scraped_counts, c, "{p}: loop counters");
        assert_eq!(got(IN_DOUBT, &base), 0.0, "{p}: in doubt");
        // One latency per handler call: each new key once, a failing one
        // once more.
        assert_eq!(
            scraped.get(HANDLER_COUNT, &base),
            Some((c.processed + c.failed) as f64),
            "{p}: handler latencies"
        );
    }
}

/// The store's counters of `p` in `scraped` equal those of `stats`, plus
/// those of an earlier store instance on the same directory.
fn assert_store(
    scraped: &Scraped,
    p: &Partition,
    stats: &PartitionStats,
    earlier: Option<&PartitionStats>,
) {
    let e = |f: fn(&PartitionStats) -> u64| earlier.map_or(0, f);
    for (name, value) in [
        ("exactly_checks_total", stats.checks + e(|s| s.checks)),
        (
            "exactly_duplicates_total",
            stats.duplicates + e(|s| s.duplicates),
        ),
        (
            "exactly_bloom_negatives_total",
            stats.bloom_negatives + e(|s| s.bloom_negatives),
        ),
        (
            "exactly_bloom_false_positives_total",
            stats.bloom_false_positives + e(|s| s.bloom_false_positives),
        ),
        (
            "exactly_expired_dropped_total",
            stats.expired_dropped + e(|s| s.expired_dropped),
        ),
    ] {
        assert_eq!(
            scraped.get(name, &labels(p)),
            Some(value as f64),
            "{p}: {name}"
        );
    }
}

fn labels(p: &Partition) -> Vec<(&'static str, &str)> {
    let number = match p.partition() {
        0 => "0",
        1 => "1",
        2 => "2",
        3 => "3",
        n => panic!("partition {n}"),
    };
    vec![("topic", TOPIC), ("partition", number)]
}
