//! Sequence mode in the Kafka loop, on librdkafka's mock cluster: two
//! producers number their messages per partition and retry (resends right
//! away, pairs arriving swapped, late resends of old numbers); instance A
//! processes the first half and stops, instance B (another store) takes
//! the partitions over. With the changelog, B restores the sources' states
//! and applies every number once; with local stores (the control) it
//! applies A's numbers again. A replaced producer's epoch is skipped.

mod kafka_support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::message::{Header, OwnedHeaders};
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{KeySource, PollReport, SequenceHeaders};
use exactly::Options;
use kafka_support::*;

const SOURCES: [&str; 2] = ["relay-a", "relay-b"];
const PER_PARTITION: u64 = 30;

/// One numbered message: source, epoch, sequence number, partition.
type Numbered = (&'static str, u64, u64, i32);

/// Sends `messages` with their numbers in headers, adding to `ends`.
fn send_numbered(servers: &str, messages: &[Numbered], ends: &mut HashMap<i32, i64>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .unwrap();
    for &(source, epoch, seq, partition) in messages {
        let (epoch, seq) = (epoch.to_string(), seq.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "producer-id",
                value: Some(source),
            })
            .insert(Header {
                key: "producer-epoch",
                value: Some(&epoch),
            })
            .insert(Header {
                key: "sequence",
                value: Some(&seq),
            });
        producer
            .send(
                BaseRecord::<(), _>::to(TOPIC)
                    .partition(partition)
                    .payload("payload")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        *ends.entry(partition).or_default() += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Numbers `from..to` of every source on every partition, as a retrying
/// producer delivers them: every 7th sent twice in a row, and every 5th
/// pair swapped.
fn numbered(from: u64, to: u64) -> Vec<Numbered> {
    let mut out = Vec::new();
    for source in SOURCES {
        for p in 0..PARTITIONS {
            let mut seqs: Vec<u64> = (from..to).collect();
            for i in (0..seqs.len().saturating_sub(1)).step_by(5) {
                seqs.swap(i, i + 1);
            }
            for seq in seqs {
                out.push((source, 1, seq, p));
                if seq % 7 == 0 {
                    out.push((source, 1, seq, p));
                }
            }
        }
    }
    out
}

/// Side effects per (partition, handler key).
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<HashMap<(i32, String), u32>>>);

impl Applied {
    fn twice(&self) -> Vec<(i32, String)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn has(&self, p: i32, key: &str) -> bool {
        self.0.lock().unwrap().contains_key(&(p, key.to_string()))
    }
}

fn instance(servers: &str, dir: &Path, name: &str, changelog: bool) -> Instance {
    let keys = KeySource::sequence(
        SequenceHeaders::new("producer-id", "sequence").epoch("producer-epoch"),
    );
    let options = Options::default().sequence_window(8);
    Instance::with(servers, dir, name, changelog, keys, options)
}

/// Runs `i` until its store reaches `ends`; returns what its poll batches
/// reported, summed.
fn run_to(i: &mut Instance, ends: &HashMap<i32, i64>, applied: &Applied) -> PollReport {
    let started = Instant::now();
    let mut total = PollReport::default();
    while !i.reached(ends) {
        let report = i
            .consumer
            .poll_batch(Duration::from_millis(100), |m, key| {
                use exactly::kafka::rdkafka::message::Message;
                let key = String::from_utf8(key.expect("numbered").to_vec()).unwrap();
                *applied
                    .0
                    .lock()
                    .unwrap()
                    .entry((m.partition(), key))
                    .or_default() += 1;
                Ok::<(), Infallible>(())
            })
            .unwrap();
        total.processed += report.processed;
        total.duplicates += report.duplicates;
        total.fenced += report.fenced;
        total.restored.extend(report.restored);
        assert!(
            started.elapsed() < DEADLINE,
            "did not reach {ends:?}: {:?}",
            i.offsets()
        );
    }
    total
}

/// The scenario; returns the side effects and B's report.
fn move_sources(changelog: bool) -> (Applied, PollReport) {
    let (_cluster, servers) = cluster();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let applied = Applied::default();
    let mut ends = HashMap::new();
    send_numbered(&servers, &numbered(0, PER_PARTITION / 2), &mut ends);
    let mut a = instance(&servers, dirs.0.path(), "a", changelog);
    let first = run_to(&mut a, &ends, &applied);
    a.stop();
    assert_eq!(first.fenced, 0);
    assert!(first.duplicates > 0, "the resends right away were skipped");

    // Late resends of A's numbers (below A's window of 8, and inside it),
    // the rest with a late resend of one of them, then a restarted producer
    // (epoch 2) followed by a message of its replaced instance (epoch 1).
    let resends = |seqs: &[u64]| {
        let mut v = Vec::new();
        for source in SOURCES {
            for p in 0..PARTITIONS {
                v.extend(seqs.iter().map(|&seq| (source, 1, seq, p)));
            }
        }
        v
    };
    let mut rest = resends(&[3, 13, 14]);
    rest.extend(numbered(PER_PARTITION / 2, PER_PARTITION));
    rest.extend(resends(&[PER_PARTITION - 3]));
    rest.extend([
        ("relay-a", 2, 0, 0),
        ("relay-a", 2, 1, 0),
        ("relay-a", 1, PER_PARTITION, 0),
    ]);
    send_numbered(&servers, &rest, &mut ends);
    let mut b = instance(&servers, dirs.1.path(), "b", changelog);
    let report = run_to(&mut b, &ends, &applied);
    b.stop();
    (applied, report)
}

#[test]
fn sources_move_with_their_partitions_through_the_changelog() {
    let (applied, b) = move_sources(true);
    assert_eq!(
        applied.twice(),
        Vec::<(i32, String)>::new(),
        "applied twice"
    );
    // Every number of every source on every partition, and epoch 2's two.
    assert_eq!(
        applied.count(),
        SOURCES.len() * PARTITIONS as usize * PER_PARTITION as usize + 2
    );
    assert!(applied.has(0, "relay-a/2/0") && applied.has(0, "relay-a/2/1"));
    assert!(
        !applied.has(0, &format!("relay-a/1/{PER_PARTITION}")),
        "the replaced producer's message was applied"
    );
    assert_eq!(b.fenced, 1, "the replaced producer's message is counted");
    assert!(
        b.restored.iter().map(|(_, n)| n).sum::<u64>() > 0,
        "B restored nothing: {:?}",
        b.restored
    );
}

#[test]
fn without_the_changelog_the_next_owner_applies_the_numbers_again() {
    let (applied, b) = move_sources(false);
    // The control: B's store never saw A's numbers, so their late resends
    // are new to it.
    let twice = applied.twice();
    assert_eq!(
        twice.len(),
        SOURCES.len() * PARTITIONS as usize * 3,
        "{twice:?}"
    );
    assert_eq!(b.fenced, 1);
}
