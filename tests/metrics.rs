//! The store's metrics, scraped over HTTP from the Prometheus exporter,
//! agree partition by partition with `Store::stats()`: the counters as
//! batch commits publish them (before any `stats()` call), the expired
//! marks once `compact` ran, the gauges once `stats()` set them, and a
//! revoked partition's gauges at zero.
//!
//! A process has one global recorder: this file holds one test.

mod common;
mod metrics_support;

use std::collections::HashMap;
use std::time::Duration;

use exactly::{Partition, PartitionStats, Verdict};
use metrics_exporter_prometheus::PrometheusBuilder;

use metrics_support::{free_port, scrape, Scraped};

const ROUNDS: u64 = 4;
const PER_BATCH: u64 = 200;

#[test]
fn scraped_metrics_agree_with_stats() {
    // The exporter first: the store registers its metrics when it assigns.
    let port = free_port();
    PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], port))
        .install()
        .expect("install the Prometheus exporter");

    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = common::open(dir.path());
    let partitions: Vec<Partition> = (0..3).map(common::orders).collect();
    for p in &partitions {
        store.assign(p).unwrap();
    }

    // A stream with redeliveries: every tenth message repeats an earlier key
    // (of this batch or of an earlier round).
    let mut commits: HashMap<Partition, u64> = HashMap::new();
    for round in 0..ROUNDS {
        for (n, p) in partitions.iter().enumerate() {
            let mut batch = store.batch(p).unwrap();
            for i in 0..PER_BATCH {
                let id = if i % 10 == 0 {
                    i / 2
                } else {
                    round * 1_000 + i
                };
                batch
                    .check_and_mark(format!("k-{n}-{id}").as_bytes())
                    .unwrap();
            }
            batch.set_offset(((round + 1) * PER_BATCH) as i64);
            batch.commit().unwrap();
            *commits.entry(p.clone()).or_default() += 1;
        }
    }
    // A read-only check counts at the partition's next commit; a single
    // operation commits on its own.
    let p0 = &partitions[0];
    assert_eq!(store.check(p0, b"k-0-1").unwrap(), Verdict::Duplicate);
    assert_eq!(store.check_and_mark(p0, b"single").unwrap(), Verdict::New);
    *commits.entry(p0.clone()).or_default() += 1;

    // Published by the commits alone: no `stats()` call yet.
    let scraped = scrape(port);
    let stats = store.stats().partitions;
    for p in &partitions {
        let s = &stats[p];
        assert!(s.duplicates > 0 && s.bloom_negatives > 0, "{p}: {s:?}");
        assert_counters(&scraped, p, s);
        assert_eq!(
            scraped.partition("exactly_commit_seconds_count", p),
            Some(commits[p] as f64),
            "{p}: one commit latency per commit"
        );
        assert_eq!(
            scraped.partition("exactly_committed_offset", p),
            s.committed_offset.map(|o| o as f64),
            "{p}: committed offset"
        );
    }

    // Every mark of partition 1 expires; compaction drops them.
    clock.advance(common::TTL + Duration::from_secs(1));
    let p1 = &partitions[1];
    store.compact(p1).unwrap();
    let scraped = scrape(port);
    let stats = store.stats().partitions;
    assert!(stats[p1].expired_dropped > 0, "{:?}", stats[p1]);
    for p in &partitions {
        assert_counters(&scraped, p, &stats[p]);
    }

    // The gauges, as `stats()` just set them.
    let stats = store.stats().partitions;
    let scraped = scrape(port);
    for p in &partitions {
        let s = &stats[p];
        assert!(s.filter_bytes > 0, "{p}: {s:?}");
        assert_eq!(
            scraped.partition("exactly_marks_live", p),
            Some(s.live_keys_estimate as f64),
            "{p}: marks live"
        );
        assert_eq!(
            scraped.partition("exactly_filter_bytes", p),
            Some(s.filter_bytes as f64),
            "{p}: filter bytes"
        );
    }

    // A revoked partition's filter is freed; its counters stay.
    let p2 = &partitions[2];
    store.revoke(p2).unwrap();
    let scraped = scrape(port);
    assert_eq!(scraped.partition("exactly_filter_bytes", p2), Some(0.0));
    assert_eq!(scraped.partition("exactly_marks_live", p2), Some(0.0));
    assert_counters(&scraped, p2, &stats[p2]);
    store.close().unwrap();
}

/// The counters of `p` in `scraped` equal those of `stats`.
fn assert_counters(scraped: &Scraped, p: &Partition, stats: &PartitionStats) {
    for (name, value) in [
        ("exactly_checks_total", stats.checks),
        ("exactly_duplicates_total", stats.duplicates),
        ("exactly_bloom_negatives_total", stats.bloom_negatives),
        (
            "exactly_bloom_false_positives_total",
            stats.bloom_false_positives,
        ),
        ("exactly_expired_dropped_total", stats.expired_dropped),
    ] {
        assert_eq!(
            scraped.partition(name, p),
            Some(value as f64),
            "{p}: {name}"
        );
    }
}
