//! What the Kafka loops report through the `metrics` facade (see
//! `docs/operations.md`, Metrics): per partition, the messages processed,
//! skipped, delivered in doubt and failed, and the handler's latency; the
//! rebalances; the offset each assigned partition resumes at; a restore's
//! progress. Small functions, so that the loops call each in a line.
//!
//! Nothing here registers a metric per message: the loops' handles are
//! registered at a partition's first poll batch and kept, counters are added
//! once per partition and poll batch, and only the handler's latency is
//! recorded per call (a message's side effect is what it measures).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use parking_lot::Mutex;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;

use super::poll::PollReport;
use crate::batch::Batch;
use crate::Partition;

/// Messages whose handler ran and succeeded (counter).
const PROCESSED: &str = "exactly_kafka_messages_processed_total";
/// Messages skipped: `reason` is `duplicate`, `no_key` or `fenced`
/// (counter).
const SKIPPED: &str = "exactly_kafka_messages_skipped_total";
/// Claim mode: messages handed to the handler in doubt (counter).
const IN_DOUBT: &str = "exactly_kafka_messages_in_doubt_total";
/// Messages whose handling failed (counter).
const FAILED: &str = "exactly_kafka_messages_failed_total";
/// The handler's latency per message (histogram, seconds).
const HANDLER_SECONDS: &str = "exactly_kafka_handler_seconds";
/// Rebalance callbacks, by `kind` (counter).
const REBALANCES: &str = "exactly_kafka_rebalances_total";
/// The offset an assigned partition resumes at (gauge).
const RESUME_OFFSET: &str = "exactly_kafka_resume_offset";
/// Changelog records a partition's restore has read (gauge).
const RESTORE_RECORDS: &str = "exactly_restore_records";
/// Changelog records left to a partition's restore (gauge).
const RESTORE_REMAINING: &str = "exactly_restore_remaining";

/// A poll loop's metrics handles per partition. Registering a handle costs a
/// registry lookup and the labels' allocations: done once per partition,
/// not once per poll batch.
pub(super) struct LoopMetrics(Mutex<HashMap<Partition, Arc<PartitionMetrics>>>);

impl LoopMetrics {
    /// No handles yet; describes the metrics to the installed recorder.
    pub(super) fn new() -> Self {
        describe();
        Self(Mutex::new(HashMap::new()))
    }

    /// `p`'s handles, and what `report` counts so far: pass both to
    /// [`PartitionMetrics::record`] at the end of `p`'s share of the poll.
    pub(super) fn start(
        &self,
        p: &Partition,
        report: &PollReport,
    ) -> (Arc<PartitionMetrics>, Tally) {
        let mut handles = self.0.lock();
        let metrics = match handles.get(p) {
            Some(m) => m.clone(),
            None => {
                let m = Arc::new(PartitionMetrics::new(p));
                handles.insert(p.clone(), m.clone());
                m
            }
        };
        (metrics, Tally::of(report))
    }
}

/// What a [`PollReport`] had counted when a partition's share began.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tally {
    processed: usize,
    duplicates: usize,
    skipped: usize,
    fenced: usize,
    in_doubt: usize,
}

impl Tally {
    fn of(report: &PollReport) -> Self {
        Self {
            processed: report.processed,
            duplicates: report.duplicates,
            skipped: report.skipped,
            fenced: report.fenced,
            in_doubt: report.in_doubt,
        }
    }
}

/// One partition's handles.
pub(super) struct PartitionMetrics {
    processed: Counter,
    duplicates: Counter,
    no_key: Counter,
    fenced: Counter,
    in_doubt: Counter,
    failed: Counter,
    handler: Histogram,
}

impl PartitionMetrics {
    fn new(p: &Partition) -> Self {
        let (topic, number) = (p.topic().to_owned(), p.partition().to_string());
        let labels = [("topic", topic.clone()), ("partition", number.clone())];
        let skipped = |reason: &'static str| {
            let labels = [
                ("topic", topic.clone()),
                ("partition", number.clone()),
                ("reason", reason.to_owned()),
            ];
            counter!(SKIPPED, &labels)
        };
        Self {
            processed: counter!(PROCESSED, &labels),
            duplicates: skipped("duplicate"),
            no_key: skipped("no_key"),
            fenced: skipped("fenced"),
            in_doubt: counter!(IN_DOUBT, &labels),
            failed: counter!(FAILED, &labels),
            handler: histogram!(HANDLER_SECONDS, &labels),
        }
    }

    /// Adds what `report` counted since `before` to the partition's
    /// counters, and the message that stopped it if `failed`.
    pub(super) fn record(&self, before: Tally, report: &PollReport, failed: bool) {
        let now = Tally::of(report);
        let add = |counter: &Counter, now: usize, before: usize| {
            let n = now.saturating_sub(before) as u64;
            if n > 0 {
                counter.increment(n);
            }
        };
        add(&self.processed, now.processed, before.processed);
        add(&self.duplicates, now.duplicates, before.duplicates);
        add(&self.no_key, now.skipped, before.skipped);
        add(&self.fenced, now.fenced, before.fenced);
        add(&self.in_doubt, now.in_doubt, before.in_doubt);
        if failed {
            self.failed.increment(1);
        }
    }

    /// Runs `handler`, recording how long it took.
    pub(super) fn time<R>(&self, handler: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let out = handler();
        self.handler.record(started.elapsed());
        out
    }

    /// The plain loop's `handler`, timed by [`time`](Self::time).
    pub(super) fn timed<'a, E: 'a, H>(
        &'a self,
        handler: &'a mut H,
    ) -> impl FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E> + 'a
    where
        H: FnMut(&BorrowedMessage<'_>, Option<&[u8]>, &mut Batch<'_>) -> Result<(), E>,
    {
        move |m, key, batch| self.time(|| handler(m, key, batch))
    }
}

/// Counts a rebalance callback: `assign`, `revoke` or `error`.
pub(super) fn rebalance(err: RDKafkaRespErr) {
    let kind = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => "assign",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => "revoke",
        _ => "error",
    };
    counter!(REBALANCES, "kind" => kind).increment(1);
}

/// Sets the offset at which an assigned partition resumes.
pub(super) fn resume_offset(p: &Partition, offset: i64) {
    gauge!(RESUME_OFFSET, &labels(p)).set(offset as f64);
}

/// Sets a restore's progress: records read, and records left.
pub(super) fn restore_progress(p: &Partition, records: u64, remaining: u64) {
    let labels = labels(p);
    gauge!(RESTORE_RECORDS, &labels).set(records as f64);
    gauge!(RESTORE_REMAINING, &labels).set(remaining as f64);
}

fn labels(p: &Partition) -> [(&'static str, String); 2] {
    [
        ("topic", p.topic().to_owned()),
        ("partition", p.partition().to_string()),
    ]
}

fn describe() {
    describe_counter!(
        PROCESSED,
        Unit::Count,
        "Messages whose handler ran and succeeded."
    );
    describe_counter!(
        SKIPPED,
        Unit::Count,
        "Messages skipped without their handler: reason=duplicate (the key was processed), no_key (no idempotency key, under MissingKey::Skip) or fenced (sequence mode: an older epoch of the message's source)."
    );
    describe_counter!(
        IN_DOUBT,
        Unit::Count,
        "Claim mode: messages handed to the handler in doubt (an earlier claim on the key was never settled)."
    );
    describe_counter!(
        FAILED,
        Unit::Count,
        "Messages whose handling failed (handler error, missing key under MissingKey::Fail, store error on the key): the partition stops there and the message is delivered again."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        Unit::Seconds,
        "The handler's latency per message."
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "Rebalance callbacks of the consumer group, by kind: assign, revoke, error."
    );
    describe_gauge!(
        RESUME_OFFSET,
        "The offset an assigned partition resumes at, decided on assignment from the store's and the group's offsets."
    );
    describe_gauge!(
        RESTORE_RECORDS,
        Unit::Count,
        "Changelog mode: records the partition's latest restore has read."
    );
    describe_gauge!(
        RESTORE_REMAINING,
        Unit::Count,
        "Changelog mode: records left to the changelog's end in the partition's latest restore (0 when done)."
    );
}
