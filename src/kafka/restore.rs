//! Restore on assign: a shard whose store is behind its changelog catches up
//! from it before the partition's first message is handed to the
//! application.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, info_span, warn};

use super::changelog::{ProgressFn, RestoreProgress, PROGRESS_KEY, RELEASE_HEADER};
use crate::{Partition, Store};

/// Records applied per store batch: bounds the memory a restore holds.
const CHUNK: usize = 10_000;

/// The least time between two progress lines of a restore in the log (the
/// callback hears of every chunk): a long restore says how far it got a few
/// times a minute, a short one only that it started and finished.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// When a restore's progress is worth a log line: at most once per
/// [`LOG_EVERY`], at the chunk boundaries where progress is reported.
#[derive(Debug)]
struct LogPace {
    last: Instant,
    every: Duration,
}

impl LogPace {
    fn new(started: Instant, every: Duration) -> Self {
        Self {
            last: started,
            every,
        }
    }

    /// Whether a line is due at `now`; if so, the next is due `every` later.
    fn due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last) < self.every {
            return false;
        }
        self.last = now;
        true
    }
}

/// What a restore found.
#[derive(Debug, Clone, Default)]
pub(super) struct Restored {
    /// The latest input offset the changelog says was committed, if it
    /// said any in the part read.
    pub(super) progress: Option<i64>,
    /// Records read.
    pub(super) records: u64,
}

/// A restore's failure.
#[derive(Debug)]
pub(super) enum RestoreError {
    Store(crate::Error),
    Kafka(KafkaError),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(e) => write!(f, "{e}"),
            Self::Kafka(e) => write!(f, "{e}"),
        }
    }
}

impl From<crate::Error> for RestoreError {
    fn from(e: crate::Error) -> Self {
        Self::Store(e)
    }
}

impl From<KafkaError> for RestoreError {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(e)
    }
}

/// Brings `partition`'s shard up to the end of changelog topic `topic`
/// (its partition of the same number): reads from the shard's changelog
/// position (or the start) to the end the broker reports, applying each
/// record in changelog order, [`CHUNK`] records per store batch, each
/// batch moving the shard's changelog position with it, so that a restore
/// cut short resumes where it stopped.
///
/// Reads with `isolation.level=read_committed`: records of open or aborted
/// transactions are skipped on a broker that filters them. The end is the
/// log's end when the restore began, open transactions included: one left
/// open by a killed or paused owner hides the records committed after it
/// began, so the restore waits for it to end (committed, aborted when the
/// instance that owned it starts again with its transactional id, or by the
/// broker at the owner's transaction timeout) and fails the attempt at
/// `timeout` without a record (the partition stays paused and the next
/// poll tries again). While it waits it holds no lock of the partition. One that does
/// not (the changelog then holds the records of aborted transactions too)
/// cannot make the restore wrong: a mark reaches the changelog only after
/// its side effect happened (in its own transaction, aborted or not), and
/// a claim only before it; a restored claim is never taken for a mark.
///
/// Runs on a thread of its own: it logs its start, its progress (at most
/// every [`LOG_EVERY`]), its end and its failure, in a span naming the
/// partition.
pub(super) fn restore(
    store: &Store,
    client: &ClientConfig,
    topic: &str,
    partition: &Partition,
    timeout: Duration,
    progress: Option<&Arc<ProgressFn>>,
) -> Result<Restored, RestoreError> {
    let span = info_span!("restore", partition = %partition, changelog = %topic);
    let _entered = span.enter();
    let started = Instant::now();
    let result = restore_logged(store, client, topic, partition, timeout, progress, started);
    match &result {
        Ok(_) => {}
        // Revoked while it ran: the next owner restores it.
        Err(RestoreError::Store(crate::Error::NotAssigned(_))) => {
            info!(partition = %partition, "restore stopped: the partition was revoked");
        }
        Err(e) => error!(
            partition = %partition,
            error = %e,
            elapsed_ms = started.elapsed().as_millis(),
            "restore failed; the partition stays paused and its restore is tried again"
        ),
    }
    result
}

/// Ends a chunk of a restore: the changelog position it got to and the
/// progress it read go in the same write as its records.
fn end_chunk(
    batch: &mut crate::Batch<'_>,
    position: i64,
    progress: Option<i64>,
) -> crate::Result<()> {
    batch.set_changelog_next(position);
    if let Some(progress) = progress {
        batch.set_changelog_progress(progress)?;
    }
    Ok(())
}

/// [`restore`]'s work, logging its start, progress and end.
fn restore_logged(
    store: &Store,
    client: &ClientConfig,
    topic: &str,
    partition: &Partition,
    timeout: Duration,
    progress: Option<&Arc<ProgressFn>>,
    started: Instant,
) -> Result<Restored, RestoreError> {
    let from = store.changelog_offset(partition)?.unwrap_or(0);
    let mut config = client.clone();
    config
        .set("group.id", "exactly-restore")
        .set("enable.auto.commit", "false")
        // Where a `read_committed` reader's end is (the last stable offset):
        // compared with the high watermark to tell "caught up" from "held
        // back by an open transaction".
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config.create()?;
    let (low, high) = log_end(&config, topic, partition, timeout)?;
    // What earlier attempts learnt of where processing got to: an attempt
    // cut short after it read a progress record starts past it next time.
    let mut restored = Restored {
        progress: store.changelog_progress(partition)?,
        ..Restored::default()
    };
    if high <= from {
        info!(
            partition = %partition,
            position = from,
            end = high,
            "restore not needed: the store is at the changelog's end"
        );
        return Ok(restored);
    }
    let start = from.max(low);
    info!(
        partition = %partition,
        // The store's changelog position, and where reading starts (later
        // if the changelog's retention dropped the records before it).
        position = from,
        start,
        end = high,
        records = high.saturating_sub(start),
        "restore started"
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition.partition(), Offset::Offset(start))?;
    consumer.assign(&tpl)?;

    let mut pace = LogPace::new(started, LOG_EVERY);
    let mut report = |records: u64, bytes: u64, position: i64| {
        let now = RestoreProgress {
            partition: partition.clone(),
            records,
            bytes,
            remaining: u64::try_from(high.saturating_sub(position)).unwrap_or(0),
            elapsed: started.elapsed(),
        };
        if pace.due(Instant::now()) {
            info!(
                partition = %partition,
                records,
                bytes,
                remaining = now.remaining,
                time_left_ms = now.time_left().map(|t| t.as_millis()),
                elapsed_ms = now.elapsed.as_millis(),
                "restore progress"
            );
        }
        super::metrics::restore_progress(partition, records, now.remaining);
        if let Some(f) = progress {
            f(&now);
        }
    };
    let mut bytes = 0u64;
    let mut position = start;
    // The store batch of the records read and not yet committed, opened at
    // the first of them: the partition's write lock is held only while
    // records are applied, never while the restore waits for the broker (a
    // revoke, which takes that lock in the rebalance callback, would wait
    // for the whole timeout).
    let mut batch: Option<crate::Batch<'_>> = None;
    let mut in_batch = 0usize;
    let mut idle = Instant::now();
    // The end is the high watermark read above: a record past it was written
    // after this restore began, by an owner this instance has replaced.
    while position < high {
        // A broker that keeps the changelog's end behind an open transaction
        // (the previous owner's, until its instance restarts or the broker
        // aborts it) delivers nothing past it, nor does a slow one: give up
        // this attempt at the timeout, whatever the polls return meanwhile.
        if idle.elapsed() > timeout {
            // Not caught up: what is committed so far stays (the next
            // attempt resumes from it), but the partition is not handed to
            // the application with marks missing.
            let mut b = match batch.take() {
                Some(b) => b,
                None => store.batch(partition)?,
            };
            end_chunk(&mut b, position, restored.progress)?;
            b.commit()?;
            warn!(
                        partition = %partition,
                        position,
                        end = high,
                        records = restored.records,
                        idle_ms = idle.elapsed().as_millis(),
                        "restore timed out waiting for the changelog (an open transaction of the previous owner, or a slow broker); the next attempt resumes at the position"
            );
            return Err(RestoreError::Kafka(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                // Nothing came for a poll: what was read so far is
                // committed, and the write lock let go while the restore
                // waits (a broker may hold an open transaction's end back
                // without an end-of-partition event).
                if let Some(mut b) = batch.take() {
                    end_chunk(&mut b, position, restored.progress)?;
                    b.commit()?;
                    in_batch = 0;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // A `read_committed` reader's end is the last stable offset:
                // an open transaction (a killed or paused owner's) holds it
                // back, and with it every record committed after that
                // transaction began. Only a position at the log's end read
                // above (past the markers of the transactions, which the
                // consumer's position counts) is caught up; short of it the
                // restore waits for the open transaction to end.
                position = position.max(fetch_position(&consumer, topic, partition)?);
                if position >= high {
                    debug!(partition = %partition, position, "restore reached the changelog's end");
                    break;
                }
                // Waiting: what was read so far is committed, and the write
                // lock let go.
                if let Some(mut b) = batch.take() {
                    end_chunk(&mut b, position, restored.progress)?;
                    b.commit()?;
                    in_batch = 0;
                }
                debug!(
                    partition = %partition,
                    position,
                    end = high,
                    "restore waits for an open transaction of the changelog"
                );
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                idle = Instant::now();
                position = m.offset() + 1;
                restored.records += 1;
                let key = m.key().unwrap_or_default();
                bytes += (key.len() + m.payload().map_or(0, <[u8]>::len)) as u64;
                if key == PROGRESS_KEY {
                    if let Some(offset) = m
                        .payload()
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map(i64::from_be_bytes)
                        .filter(|&o| o >= 0)
                    {
                        restored.progress =
                            Some(restored.progress.map_or(offset, |p| p.max(offset)));
                    }
                } else {
                    // A release names the claim it ended (its token).
                    let release = m.headers().and_then(|h| {
                        h.iter()
                            .find(|header| header.key == RELEASE_HEADER)
                            .map(|header| {
                                header
                                    .value
                                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                                    .map(u64::from_be_bytes)
                            })
                    });
                    let release = match release {
                        None => None,
                        Some(Some(token)) => Some(token),
                        Some(None) => {
                            return Err(RestoreError::Store(crate::Error::BadChangelogRecord {
                                partition: partition.clone(),
                                reason: "a release without the token of its claim".into(),
                            }))
                        }
                    };
                    let b = match &mut batch {
                        Some(b) => b,
                        None => batch.insert(store.batch(partition)?),
                    };
                    b.restore(key, m.payload(), release)?;
                }
                in_batch += 1;
                if in_batch >= CHUNK {
                    let mut b = match batch.take() {
                        Some(b) => b,
                        None => store.batch(partition)?,
                    };
                    end_chunk(&mut b, position, restored.progress)?;
                    b.commit()?;
                    report(restored.records, bytes, position);
                    in_batch = 0;
                }
            }
        }
    }
    let mut b = match batch.take() {
        Some(b) => b,
        None => store.batch(partition)?,
    };
    end_chunk(&mut b, position, restored.progress)?;
    b.commit()?;
    report(restored.records, bytes, position);
    info!(
        partition = %partition,
        records = restored.records,
        bytes,
        position,
        progress = ?restored.progress,
        elapsed_ms = started.elapsed().as_millis(),
        "restore finished"
    );
    Ok(restored)
}

/// The end of `topic`'s partition of `partition`'s number: its high
/// watermark, records of open transactions included. A `read_committed`
/// client's watermark request answers the last stable offset instead, which
/// an open transaction holds back (with the records committed after it
/// began), so the request goes through a `read_uncommitted` client.
fn log_end(
    config: &ClientConfig,
    topic: &str,
    partition: &Partition,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    let mut config = config.clone();
    config.set("isolation.level", "read_uncommitted");
    let client: BaseConsumer = config.create()?;
    client.fetch_watermarks(topic, partition.partition(), timeout)
}

/// Where `consumer` reads `topic`'s partition next: past the records it
/// delivered and the transaction markers after them.
fn fetch_position(
    consumer: &BaseConsumer,
    topic: &str,
    partition: &Partition,
) -> Result<i64, KafkaError> {
    let positions = consumer.position()?;
    Ok(positions
        .find_partition(topic, partition.partition())
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_come_at_most_once_per_period() {
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        let mut pace = LogPace::new(t0, every);
        // Chunks reported within the first period: no line.
        assert!(!pace.due(t0));
        assert!(!pace.due(t0 + Duration::from_millis(4_999)));
        // The period is over: one line, then none until the next is over.
        assert!(pace.due(t0 + every));
        assert!(!pace.due(t0 + every + Duration::from_secs(1)));
        assert!(!pace.due(t0 + Duration::from_millis(9_999)));
        assert!(pace.due(t0 + 2 * every + Duration::from_millis(1)));
        // A clock reading before the last line (not monotonic across
        // threads' readings) is never due.
        assert!(!pace.due(t0));
    }
}
