//! End to end over librdkafka's in-process mock cluster: a producer writes
//! messages with producer retries and repeated idempotency keys; consumers
//! crash mid-batch, restart, join and leave (rebalances); a sink counts side
//! effects per idempotency key and must see each key exactly once.
//!
//! The same scenario through a plain at-least-once consumer must apply some
//! key twice, which shows that the scenario can fail.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use exactly::kafka::rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use exactly::kafka::rdkafka::mocking::MockCluster;
use exactly::kafka::rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer,
};
use exactly::kafka::rdkafka::{Offset, TopicPartitionList};
use exactly::kafka::{
    ConsumeError, DedupContext, GroupStore, IdempotentConsumer, KafkaCommit, KeySource, MissingKey,
};
use exactly::{Options, Partition, Store};

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 4;
const KEYS: usize = 240;
const HEADER: &str = "idempotency-key";
/// Give up (and fail) after this long.
const DEADLINE: Duration = Duration::from_secs(45);
/// Side-effect counts at which a consumer crashes.
const CRASHES: &[usize] = &[20, 60, 110, 170];
/// Side effects a scheduled crash waits for a batch with several partitions.
const CRASH_PATIENCE: usize = 25;

/// The messages to produce for keys `keys`, in order: `(partition,
/// idempotency key)`.
///
/// Every key once; every 7th key again right after (a producer retry
/// without idempotence); every 11th key, 32 keys into the range, also
/// repeats the key 32 places earlier (an upstream resend). A key always goes
/// to the same partition.
fn workload(keys: std::ops::Range<usize>) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let msg = |i: usize| ((i % PARTITIONS as usize) as i32, format!("order-{i}"));
    for i in keys.clone() {
        out.push(msg(i));
        if i % 7 == 0 {
            out.push(msg(i));
        }
        if i % 11 == 0 && i >= keys.start + 32 {
            out.push(msg(i - 32));
        }
    }
    out
}

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A mock cluster with the topic created. Returns it with its bootstrap
/// servers.
fn cluster() -> (Cluster, String) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let servers = cluster.bootstrap_servers();
    (cluster, servers)
}

/// Produces `messages`, adding them to the end offsets `ends`.
fn produce(servers: &str, messages: &[(i32, String)], ends: &mut HashMap<i32, i64>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("enable.idempotence", "false")
        // Small record batches, so that small fetches mix partitions.
        .set("batch.num.messages", "3")
        .create()
        .unwrap();
    for (partition, key) in messages {
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER,
            value: Some(key.as_bytes()),
        });
        let payload = format!("payload of {key}");
        producer
            .send(
                BaseRecord::to(TOPIC)
                    .partition(*partition)
                    .key(key.as_bytes())
                    .payload(payload.as_bytes())
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        *ends.entry(*partition).or_default() += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// A mock cluster with the whole workload produced, and its end offsets.
fn cluster_with_workload() -> (Cluster, String, HashMap<i32, i64>) {
    let (cluster, servers) = cluster();
    let mut ends = HashMap::new();
    produce(&servers, &workload(0..KEYS), &mut ends);
    (cluster, servers, ends)
}

fn consumer_config(servers: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "3000")
        .set("heartbeat.interval.ms", "200")
        .set("max.poll.interval.ms", "10000")
        // Small fetches, so that poll batches mix partitions.
        .set("max.partition.fetch.bytes", "600");
    config
}

/// The downstream system: counts side effects per idempotency key.
#[derive(Default)]
struct Sink {
    applied: Mutex<HashMap<String, u32>>,
    total: AtomicUsize,
}

impl Sink {
    fn apply(&self, key: &[u8]) {
        let key = String::from_utf8(key.to_vec()).unwrap();
        *self.applied.lock().unwrap().entry(key).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
    }

    fn counts(&self) -> HashMap<String, u32> {
        self.applied.lock().unwrap().clone()
    }
}

/// Shared state of one scenario run: the sink, the crash schedule and the
/// progress towards the end of every partition.
struct Run {
    sink: Sink,
    crashes_left: Mutex<Vec<usize>>,
    crashes: AtomicUsize,
    /// Per partition, the highest offset committed by any consumer.
    progress: Arc<Mutex<HashMap<i32, i64>>>,
    ends: Mutex<HashMap<i32, i64>>,
    started: Instant,
    second_joined: AtomicBool,
    /// Side effects per consumer thread.
    by_worker: [AtomicUsize; 2],
    /// Duplicates the store skipped.
    duplicates: AtomicUsize,
    /// Messages dropped unprocessed because a rebalance came mid-poll.
    discarded: AtomicUsize,
    /// Messages delivered again from behind the store's committed offset.
    replayed: Arc<AtomicUsize>,
    commit_failures: AtomicUsize,
}

impl Run {
    fn new(ends: HashMap<i32, i64>, crashes: &[usize]) -> Self {
        Self {
            sink: Sink::default(),
            crashes_left: Mutex::new(crashes.to_vec()),
            crashes: AtomicUsize::new(0),
            progress: Arc::default(),
            ends: Mutex::new(ends),
            started: Instant::now(),
            second_joined: AtomicBool::new(false),
            by_worker: Default::default(),
            duplicates: AtomicUsize::new(0),
            discarded: AtomicUsize::new(0),
            replayed: Arc::default(),
            commit_failures: AtomicUsize::new(0),
        }
    }

    /// Whether the side effect about to happen, the first of its partition
    /// in the poll batch, is a scheduled crash point. A crash waits for a
    /// partition other than the batch's first, unless such a batch has not
    /// come for a while.
    fn crash_now(&self, later_partition: bool) -> bool {
        let total = self.sink.total.load(Ordering::SeqCst);
        let mut left = self.crashes_left.lock().unwrap();
        match left.first() {
            Some(&at) if total >= at && (later_partition || total >= at + CRASH_PATIENCE) => {
                left.remove(0);
                self.crashes.fetch_add(1, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    fn advance(&self, partition: i32, next_offset: i64) {
        let mut progress = self.progress.lock().unwrap();
        let p = progress.entry(partition).or_default();
        *p = (*p).max(next_offset);
    }

    fn done(&self) -> bool {
        assert!(
            self.started.elapsed() < DEADLINE,
            "scenario did not finish in {DEADLINE:?}: progress {:?} of {:?}, {} side effects",
            self.progress.lock().unwrap(),
            self.ends.lock().unwrap(),
            self.sink.total.load(Ordering::SeqCst)
        );
        let progress = self.progress.lock().unwrap();
        self.ends
            .lock()
            .unwrap()
            .iter()
            .all(|(p, end)| progress.get(p).is_some_and(|o| o >= end))
    }

    /// The second consumer joins once some work is done, so that partitions
    /// move while messages are in flight.
    fn second_may_join(&self) -> bool {
        self.second_joined.load(Ordering::SeqCst) || self.sink.total.load(Ordering::SeqCst) >= 40
    }
}

/// A handler for one poll batch: applies the side effect, or crashes
/// (panics) at a scheduled point. A crash comes before the first side effect
/// of a partition in the batch, preferably not the batch's first partition:
/// then the batch's earlier partitions are committed to the store but not to
/// Kafka. No side effect of an uncommitted store batch has happened.
fn handler(
    run: &Run,
    worker: usize,
) -> impl FnMut(&BorrowedMessage<'_>, Option<&[u8]>) -> Result<(), Infallible> + '_ {
    let mut first_of_partition = HashSet::new();
    move |m, key| {
        if first_of_partition.insert(m.partition()) && run.crash_now(first_of_partition.len() > 1) {
            panic!("simulated crash before a side effect");
        }
        run.sink.apply(key.expect("every message has a key"));
        run.by_worker[worker].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One consumer thread of the shared-store deployment: consumes until the
/// end, and on a crash drops its consumer (no store commit, no Kafka
/// commit) and starts a new one, which rejoins the group.
fn store_worker(run: &Run, worker: usize, group: &GroupStore, servers: &str, assignor: &str) {
    while !run.done() {
        let consumer: BaseConsumer<DedupContext> = consumer_config(servers, "shared-store")
            .set("partition.assignment.strategy", assignor)
            // The shared store holds every mark and offset: no handover commit.
            .create_with_context(DedupContext::new(group).handover_commit(false))
            .unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        let mut consumer =
            IdempotentConsumer::new(consumer, replay_detecting_keys(group, &run.replayed))
                .max_batch(16);
        while !run.done() {
            let polled = catch_unwind(AssertUnwindSafe(|| {
                consumer.poll_batch(Duration::from_millis(100), handler(run, worker))
            }));
            let context = consumer.context();
            run.commit_failures
                .fetch_max(context.commit_failures() as usize, Ordering::SeqCst);
            // Progress is what the store committed, including the partitions
            // a crashed batch committed before the crash.
            for p in context.owned() {
                if let Some(offset) = group.store().committed_offset(&p).unwrap() {
                    run.advance(p.partition(), offset);
                }
            }
            match polled {
                Err(_crash) => break,
                Ok(result) => {
                    let report = result.unwrap();
                    run.duplicates
                        .fetch_add(report.duplicates, Ordering::SeqCst);
                    run.discarded.fetch_add(report.discarded, Ordering::SeqCst);
                }
            }
        }
    }
}

/// The `idempotency-key` header, read by a key extractor that also counts
/// messages delivered from behind the store's committed offset: messages
/// already processed and committed, replayed because a partition resumed at
/// the wrong point.
fn replay_detecting_keys(group: &GroupStore, replayed: &Arc<AtomicUsize>) -> KeySource {
    let (store, replayed) = (group.store().clone(), replayed.clone());
    KeySource::custom(move |m| {
        let p = Partition::new(m.topic(), m.partition());
        if store
            .committed_offset(&p)
            .unwrap()
            .is_some_and(|c| m.offset() < c)
        {
            replayed.fetch_add(1, Ordering::SeqCst);
        }
        header_key(m).map(Cow::Borrowed)
    })
}

fn header_key<'m>(m: &'m BorrowedMessage<'_>) -> Option<&'m [u8]> {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == HEADER))
        .and_then(|h| h.value)
}

/// A plain at-least-once consumer thread: handles every message, then
/// commits the batch's offsets to Kafka; the same crashes.
fn plain_worker(run: &Run, worker: usize, servers: &str, group_id: &str) {
    while !run.done() {
        let consumer: BaseConsumer = consumer_config(servers, group_id).create().unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        while !run.done() {
            let crashed = catch_unwind(AssertUnwindSafe(|| {
                let mut handle = handler(run, worker);
                let mut next: HashMap<i32, i64> = HashMap::new();
                let mut wait = Duration::from_millis(100);
                for _ in 0..16 {
                    match consumer.poll(wait) {
                        None => break,
                        Some(m) => {
                            let m = m.unwrap();
                            handle(&m, header_key(&m)).unwrap();
                            next.insert(m.partition(), m.offset() + 1);
                        }
                    }
                    wait = Duration::ZERO;
                }
                let mut tpl = TopicPartitionList::new();
                for (p, offset) in &next {
                    tpl.add_partition_offset(TOPIC, *p, Offset::Offset(*offset))
                        .unwrap();
                }
                if tpl.count() > 0 {
                    consumer.commit(&tpl, CommitMode::Async).unwrap();
                }
                next
            }));
            match crashed {
                Err(_crash) => break,
                Ok(next) => {
                    for (p, offset) in next {
                        run.advance(p, offset);
                    }
                }
            }
        }
    }
}

/// Runs two consumer threads; the second joins after some work is done.
fn two_consumers<F>(run: &Run, worker: F)
where
    F: Fn(usize) + Sync,
{
    thread::scope(|s| {
        s.spawn(|| worker(0));
        s.spawn(|| {
            while !run.second_may_join() {
                if run.done() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            run.second_joined.store(true, Ordering::SeqCst);
            worker(1)
        });
    });
}

fn open_store(path: &Path) -> Store {
    Store::open(path, Options::default().expected_keys_per_partition(1_000)).unwrap()
}

/// Silences the expected panics of simulated crashes; other panics still print.
fn quiet_simulated_crashes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let simulated = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|s| s.starts_with("simulated crash"));
        if !simulated {
            default(info);
        }
    }));
}

#[test]
fn shared_store_applies_each_key_exactly_once_across_crashes_and_rebalances() {
    shared_store_scenario("range");
}

#[test]
fn shared_store_with_cooperative_rebalances() {
    shared_store_scenario("cooperative-sticky");
}

fn shared_store_scenario(assignor: &str) {
    quiet_simulated_crashes();
    let (_cluster, servers, ends) = cluster_with_workload();
    let dir = tempfile::tempdir().unwrap();
    let group = GroupStore::new(Arc::new(open_store(dir.path())));
    let run = Run::new(ends, CRASHES);

    two_consumers(&run, |w| store_worker(&run, w, &group, &servers, assignor));

    let counts = run.sink.counts();
    eprintln!(
        "shared store, {assignor}: {} side effects by worker {:?}, {} duplicates skipped, {} replayed, {} discarded at rebalances, {} commit failures",
        run.sink.total.load(Ordering::SeqCst),
        run.by_worker.iter().map(|w| w.load(Ordering::SeqCst)).collect::<Vec<_>>(),
        run.duplicates.load(Ordering::SeqCst),
        run.replayed.load(Ordering::SeqCst),
        run.discarded.load(Ordering::SeqCst),
        run.commit_failures.load(Ordering::SeqCst),
    );
    assert_eq!(
        run.crashes.load(Ordering::SeqCst),
        CRASHES.len(),
        "every crash happened"
    );
    assert!(
        run.by_worker.iter().all(|w| w.load(Ordering::SeqCst) > 0),
        "both consumers applied side effects (partitions moved)"
    );
    assert_eq!(counts.len(), KEYS, "every key was applied");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "keys not applied exactly once: {twice:?}");
    // No partition was replayed from behind the store's offset after a
    // crash or a move, although the Kafka commits lagged behind the store
    // (the resume-point rule).
    assert_eq!(run.replayed.load(Ordering::SeqCst), 0, "messages replayed");
    assert!(
        run.duplicates.load(Ordering::SeqCst) > 0,
        "the store skipped the resends"
    );
}

#[test]
fn a_plain_consumer_applies_some_key_twice_in_the_same_scenario() {
    quiet_simulated_crashes();
    let (_cluster, servers, ends) = cluster_with_workload();
    let run = Run::new(ends, CRASHES);

    two_consumers(&run, |w| plain_worker(&run, w, &servers, "plain"));

    let counts = run.sink.counts();
    assert_eq!(counts.len(), KEYS, "every key was applied");
    assert!(
        counts.values().any(|n| *n > 1),
        "without the store some key must be applied twice"
    );
}

/// A key source for a consumer with its own store: the `idempotency-key`
/// header, counting messages delivered from behind the highest offset any
/// consumer committed (replays across a handover).
fn handover_checking_keys(run: &Run) -> KeySource {
    let (progress, replayed) = (run.progress.clone(), run.replayed.clone());
    KeySource::custom(move |m| {
        let committed = progress.lock().unwrap().get(&m.partition()).copied();
        if committed.is_some_and(|c| m.offset() < c) {
            replayed.fetch_add(1, Ordering::SeqCst);
        }
        header_key(m).map(Cow::Borrowed)
    })
}

/// One consumer instance with its own store directory.
fn own_store_consumer(
    run: &Run,
    servers: &str,
    dir: &Path,
    kafka_commit: KafkaCommit,
) -> IdempotentConsumer {
    let group = GroupStore::new(Arc::new(open_store(dir)));
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers, "own-stores")
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    IdempotentConsumer::new(consumer, handover_checking_keys(run))
        .max_batch(16)
        .kafka_commit(kafka_commit)
}

/// Polls the consumers in turn from this thread until `until` holds.
fn drive<U>(run: &Run, consumers: &mut [&mut IdempotentConsumer], until: U)
where
    U: Fn(&Run, &[&mut IdempotentConsumer]) -> bool,
{
    while !until(run, consumers) {
        for (worker, consumer) in consumers.iter_mut().enumerate() {
            let report = consumer
                .poll_batch(Duration::from_millis(20), handler(run, worker))
                .unwrap();
            run.duplicates
                .fetch_add(report.duplicates, Ordering::SeqCst);
            for (p, offset) in report.committed {
                run.advance(p.partition(), offset);
            }
        }
    }
}

fn all_consumed(run: &Run, _: &[&mut IdempotentConsumer]) -> bool {
    run.done()
}

/// Every partition is owned, and every consumer owns some.
fn settled(run: &Run, consumers: &[&mut IdempotentConsumer]) -> bool {
    let owned: Vec<usize> = consumers
        .iter()
        .map(|c| c.context().owned().len())
        .collect();
    assert!(
        run.started.elapsed() < DEADLINE,
        "no stable assignment: {owned:?}"
    );
    owned.iter().all(|n| *n > 0) && owned.iter().sum::<usize>() == PARTITIONS as usize
}

#[test]
fn consumers_with_their_own_stores_hand_partitions_over_cleanly() {
    let (_cluster, servers) = cluster();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let run = Run::new(HashMap::new(), &[]);
    // Each phase's messages are produced once the assignment is stable, so
    // that no key's resend straddles a move (see docs/kafka.md).
    let phase = |keys| produce(&servers, &workload(keys), &mut run.ends.lock().unwrap());
    let mut watch = GroupWatch::new(&servers, "own-stores");

    // One consumer alone.
    let mut a = own_store_consumer(&run, &servers, dirs[0].path(), KafkaCommit::Async);
    drive(&run, &mut [&mut a], settled);
    phase(0..KEYS / 3);
    drive(&run, &mut [&mut a], all_consumed);
    watch.check("one consumer");

    // A second one joins: the first hands part of the partitions over.
    // It commits to Kafka only when it hands partitions over.
    let mut b = own_store_consumer(&run, &servers, dirs[1].path(), KafkaCommit::OnRevoke);
    drive(&run, &mut [&mut a, &mut b], settled);
    watch.check("a second joined");
    phase(KEYS / 3..2 * KEYS / 3);
    drive(&run, &mut [&mut a, &mut b], all_consumed);
    watch.check("two consumers");

    // The second one leaves: the first gets those partitions back and
    // resumes them at the group's offsets, ahead of its own store's.
    let leaving = b.consumer().context().clone();
    drop(b); // closes the consumer: revocation with handover
    assert!(leaving.owned().is_empty());
    // It revoked before leaving the group, which was still up: its handover
    // commit, its only Kafka commit, went through.
    assert_eq!(leaving.handover_failures(), 0);
    drive(&run, &mut [&mut a], settled);
    watch.check("the second left");
    // Its store adopted the group's offsets of the partitions it got back.
    for p in a.context().owned() {
        let progress = run.progress.lock().unwrap()[&p.partition()];
        let stored = a.context().store().committed_offset(&p).unwrap();
        assert_eq!(stored, Some(progress), "{p}");
    }
    phase(2 * KEYS / 3..KEYS);
    drive(&run, &mut [&mut a], all_consumed);
    let first = a.consumer().context().clone();
    drop(a);
    watch.check("the first left");

    let counts = run.sink.counts();
    eprintln!(
        "own stores: {} side effects by consumer {:?}, {} duplicates skipped, {} replayed",
        run.sink.total.load(Ordering::SeqCst),
        run.by_worker
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect::<Vec<_>>(),
        run.duplicates.load(Ordering::SeqCst),
        run.replayed.load(Ordering::SeqCst),
    );
    assert_eq!(counts.len(), KEYS, "every key was applied");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "keys not applied exactly once: {twice:?}");
    assert_eq!(
        run.replayed.load(Ordering::SeqCst),
        0,
        "messages replayed after a handover"
    );
    assert!(
        run.by_worker[1].load(Ordering::SeqCst) > 0,
        "the second consumer got partitions"
    );
    // When a rebalance revokes the first consumer's partitions, the mock
    // cluster refuses offset commits because the group is joining (a broker
    // accepts them from the current generation until the group completes the
    // rebalance), so those handover commits fail here; the phases are drained
    // before partitions move, so the asynchronous commits have landed.
    eprintln!(
        "own stores: {} handover commits failed on rebalances",
        first.handover_failures(),
    );
}

/// Produces to partition 0: `order-0` .. `order-4`, a message without an
/// idempotency key, `order-5` .. `order-9`.
fn with_a_keyless_message(servers: &str) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .unwrap();
    for i in 0..11 {
        let key = format!("order-{}", if i < 5 { i } else { i - 1 });
        let mut record = BaseRecord::<[u8], [u8]>::to(TOPIC)
            .partition(0)
            .payload(b"payload");
        if i != 5 {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: HEADER,
                value: Some(key.as_bytes()),
            }));
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

fn single_consumer(
    servers: &str,
    group_id: &str,
    dir: &Path,
    missing: MissingKey,
) -> IdempotentConsumer {
    let group = GroupStore::new(Arc::new(open_store(dir)));
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers, group_id)
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    IdempotentConsumer::new(consumer, KeySource::header(HEADER))
        .max_batch(16)
        .missing_key(missing)
}

#[derive(Debug, PartialEq)]
struct HandlerFailed;

#[test]
fn a_failed_handler_commits_what_came_before_and_is_retried() {
    let (_cluster, servers) = cluster();
    with_a_keyless_message(&servers);
    let dir = tempfile::tempdir().unwrap();
    let mut consumer = single_consumer(&servers, "handler-errors", dir.path(), MissingKey::Skip);
    let p = Partition::new(TOPIC, 0);
    let started = Instant::now();
    let (mut applied, mut failed) = (Vec::new(), false);
    while applied.len() < 10 {
        assert!(started.elapsed() < DEADLINE, "applied only {applied:?}");
        let result = consumer.poll_batch(Duration::from_millis(100), |_, key| {
            // The keyless message is skipped: it never reaches the handler.
            let key = String::from_utf8(key.unwrap().to_vec()).unwrap();
            if key == "order-7" && !failed {
                failed = true;
                return Err(HandlerFailed);
            }
            applied.push(key);
            Ok(())
        });
        match result {
            Ok(_) => {}
            Err(ConsumeError::Handler {
                partition,
                offset,
                source,
            }) => {
                // order-7 is at offset 8: what came before it is committed.
                assert_eq!((partition, offset, source), (p.clone(), 8, HandlerFailed));
                assert_eq!(
                    consumer.context().store().committed_offset(&p).unwrap(),
                    Some(8)
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("order-{i}")).collect();
    assert_eq!(applied, expected, "each once, in order, order-7 retried");
    assert!(failed);
    assert_eq!(
        consumer.context().store().committed_offset(&p).unwrap(),
        Some(11)
    );
}

/// Polls a consumer under `MissingKey::Fail` whose partition `p` has an
/// unusable key at offset 5: records where it stopped.
fn poll_failing_at_5(fail: &mut IdempotentConsumer, p: &Partition, stopped_at: &mut Option<i64>) {
    match fail.poll_batch(Duration::from_millis(50), |_, _| Ok::<(), Infallible>(())) {
        Ok(_) => {}
        Err(ConsumeError::MissingKey { partition, offset }) => {
            assert_eq!((&partition, offset), (p, 5));
            *stopped_at = Some(offset);
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn keyless_messages_are_processed_or_stop_the_consumer_by_policy() {
    let (_cluster, servers) = cluster();
    with_a_keyless_message(&servers);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut process = single_consumer(
        &servers,
        "keyless-process",
        dirs[0].path(),
        MissingKey::Process,
    );
    let mut fail = single_consumer(&servers, "keyless-fail", dirs[1].path(), MissingKey::Fail);
    let p = Partition::new(TOPIC, 0);
    let started = Instant::now();

    let mut seen = Vec::new();
    let mut stopped_at = None;
    while seen.len() < 11 || stopped_at.is_none() {
        assert!(
            started.elapsed() < DEADLINE,
            "saw {seen:?}, stopped at {stopped_at:?}"
        );
        process
            .poll_batch(Duration::from_millis(50), |m, key| {
                seen.push((m.offset(), key.map(|k| k.to_vec())));
                Ok::<(), Infallible>(())
            })
            .unwrap();
        poll_failing_at_5(&mut fail, &p, &mut stopped_at);
    }
    assert_eq!(
        seen[5],
        (5, None),
        "the keyless message reached the handler without a key"
    );
    assert_eq!(seen.iter().filter(|(_, k)| k.is_some()).count(), 10);
    // Each keyed message was looked up once, in its batch.
    assert_eq!(process.context().store().stats().partitions[&p].checks, 10);
    assert_eq!(
        process.context().store().committed_offset(&p).unwrap(),
        Some(11)
    );
    // The failing consumer committed what came before and stays at the message.
    assert_eq!(
        fail.context().store().committed_offset(&p).unwrap(),
        Some(5)
    );
    let again = fail.poll_batch(Duration::from_secs(2), |_, _| Ok::<(), Infallible>(()));
    assert!(matches!(
        again,
        Err(ConsumeError::MissingKey { offset: 5, .. })
    ));
}

/// The window the store cannot close: a crash after a side effect and before
/// the batch's commit. The next consumer applies the effect again, unless the
/// downstream system gets the idempotency key and refuses a second use.
#[test]
fn the_residual_window_is_closed_by_passing_the_key_downstream() {
    quiet_simulated_crashes();
    let (_cluster, servers) = cluster();
    let keys: Vec<(i32, String)> = (0..10).map(|i| (0, format!("order-{i}"))).collect();
    produce(&servers, &keys, &mut HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let group = GroupStore::new(Arc::new(open_store(dir.path())));
    let consumer = || {
        let consumer: BaseConsumer<DedupContext> = consumer_config(&servers, "residual")
            .create_with_context(DedupContext::new(&group))
            .unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        IdempotentConsumer::new(consumer, KeySource::header(HEADER)).max_batch(16)
    };
    // Two downstream systems: one counts every effect, one is keyed by the
    // idempotency key and applies a key once.
    let plain = Sink::default();
    let keyed: Mutex<HashSet<Vec<u8>>> = Mutex::default();
    let keyed_sink = Sink::default();
    let apply = |key: &[u8]| {
        plain.apply(key);
        if keyed.lock().unwrap().insert(key.to_vec()) {
            keyed_sink.apply(key);
        }
    };
    let started = Instant::now();

    let mut first = consumer();
    let crashed = catch_unwind(AssertUnwindSafe(|| loop {
        assert!(started.elapsed() < DEADLINE);
        first
            .poll_batch(Duration::from_millis(100), |_, key| {
                let key = key.unwrap();
                apply(key);
                if key == b"order-3" {
                    panic!("simulated crash after a side effect");
                }
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }));
    assert!(crashed.is_err());
    drop(first);

    let mut second = consumer();
    while plain.counts().len() < 10 || keyed_sink.counts().len() < 10 {
        assert!(started.elapsed() < DEADLINE, "{:?}", plain.counts());
        second
            .poll_batch(Duration::from_millis(100), |_, key| {
                apply(key.unwrap());
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }

    let plain = plain.counts();
    assert_eq!(
        plain["order-3"], 2,
        "the effect of the crashed batch happened twice"
    );
    assert!(plain.values().all(|n| (1..=2).contains(n)));
    assert!(keyed_sink.counts().values().all(|n| *n == 1));
}

/// The group's committed offsets, read by a client that does not join the
/// group.
fn group_offsets(servers: &str, group: &str) -> HashMap<i32, i64> {
    let reader: BaseConsumer = consumer_config(servers, group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(20))
        .unwrap();
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Watches a group's committed offsets between phases: none may go back.
struct GroupWatch<'a> {
    servers: &'a str,
    group: &'a str,
    last: HashMap<i32, i64>,
}

impl<'a> GroupWatch<'a> {
    fn new(servers: &'a str, group: &'a str) -> Self {
        Self {
            servers,
            group,
            last: HashMap::new(),
        }
    }

    /// Reads the offsets, checks that none went back (or disappeared) since
    /// the last check, and returns them.
    fn check(&mut self, phase: &str) -> HashMap<i32, i64> {
        let now = group_offsets(self.servers, self.group);
        for (p, before) in &self.last {
            let after = now.get(p).copied();
            assert!(
                after.is_some_and(|a| a >= *before),
                "{phase}: the group's offset of partition {p} went from {before} to {after:?}"
            );
        }
        self.last = now.clone();
        now
    }
}

/// A consumer of group `group_id` on its own store, with its offsets
/// timeout.
fn timed_consumer(
    servers: &str,
    group_id: &str,
    store: &Arc<Store>,
    offsets_timeout: Duration,
) -> IdempotentConsumer {
    let group = GroupStore::new(store.clone());
    let context = DedupContext::new(&group).offsets_timeout(offsets_timeout);
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers, group_id)
        .create_with_context(context)
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    IdempotentConsumer::new(consumer, KeySource::header(HEADER))
        .max_batch(16)
        .kafka_commit(KafkaCommit::Sync)
}

/// Polls `consumer` until `done` holds, applying every new key to `sink`.
fn poll_until<D>(consumer: &mut IdempotentConsumer, sink: &Sink, what: &str, done: D)
where
    D: Fn(&IdempotentConsumer) -> bool,
{
    let started = Instant::now();
    while !done(consumer) {
        assert!(started.elapsed() < DEADLINE, "timed out waiting: {what}");
        consumer
            .poll_batch(Duration::from_millis(50), |_, key| {
                sink.apply(key.unwrap());
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }
}

/// Polls `consumer` `times` times, applying every new key to `sink`.
fn poll_times(consumer: &mut IdempotentConsumer, sink: &Sink, times: usize) {
    for _ in 0..times {
        consumer
            .poll_batch(Duration::from_millis(100), |_, key| {
                sink.apply(key.unwrap());
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }
}

/// Finding: a consumer whose store is behind the group (another instance
/// processed the partition since) is assigned the partition while the broker
/// is slower than its `offsets_timeout`, so it cannot read the group's
/// offset; its handover must not commit its store's older offset, or the
/// next owner redoes what the other instance did.
#[test]
fn a_consumer_that_cannot_read_the_group_offset_never_moves_it_back() {
    let (cluster, servers) = cluster();
    let group_id = "slow-broker";
    let mut watch = GroupWatch::new(&servers, group_id);
    let p = Partition::new(TOPIC, 0);
    let keys = |range: std::ops::Range<i32>| -> Vec<(i32, String)> {
        range.map(|i| (0, format!("order-{i}"))).collect()
    };
    produce(&servers, &keys(0..10), &mut HashMap::new());
    let sink = Sink::default();

    // A's store is at 3: an earlier life of A processed order-0 .. order-2.
    let dir_a = tempfile::tempdir().unwrap();
    let store_a = Arc::new(open_store(dir_a.path()));
    store_a.assign(&p).unwrap();
    let mut batch = store_a.batch(&p).unwrap();
    for i in 0..3 {
        batch.mark(format!("order-{i}").as_bytes()).unwrap();
        sink.apply(format!("order-{i}").as_bytes());
    }
    batch.set_offset(3);
    batch.commit().unwrap();
    store_a.revoke(&p).unwrap();

    // B, on its own store, processes everything from the start (the group
    // has no offset yet) and commits 10; closing it hands the partition over.
    let dir_b = tempfile::tempdir().unwrap();
    let store_b = Arc::new(open_store(dir_b.path()));
    let mut b = timed_consumer(&servers, group_id, &store_b, Duration::from_secs(10));
    let sink_b = Sink::default();
    poll_until(&mut b, &sink_b, "B processes 0..10", |c| {
        c.context().store().committed_offset(&p).ok().flatten() == Some(10)
    });
    drop(b);
    assert_eq!(watch.check("after B").get(&0), Some(&10));

    // The broker gets slower than A's offsets timeout: A cannot read the
    // group's offset at assignment and resumes from it without adopting it.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(400))
        .unwrap();
    let mut a = timed_consumer(&servers, group_id, &store_a, Duration::from_millis(50));
    poll_until(&mut a, &sink, "A owns the partition", |c| {
        c.context().owned().contains(&p)
    });
    poll_times(&mut a, &sink, 5);
    assert_eq!(
        store_a.committed_offset(&p).unwrap(),
        Some(3),
        "A processed nothing: the group was at the end"
    );
    drop(a); // revocation: A's store offset (3) may not be handed over
    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert_eq!(watch.check("after A's handover").get(&0), Some(&10));

    // Slow again, and new messages: A processes them from the group's
    // offset, and once it has committed a batch its handover may commit.
    produce(&servers, &keys(10..15), &mut HashMap::new());
    cluster
        .broker_round_trip_time(1, Duration::from_millis(400))
        .unwrap();
    let mut a = timed_consumer(&servers, group_id, &store_a, Duration::from_millis(50));
    poll_until(&mut a, &sink, "A processes 10..15", |c| {
        c.context().store().committed_offset(&p).ok().flatten() == Some(15)
    });
    drop(a);
    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert_eq!(watch.check("after A's second handover").get(&0), Some(&15));

    // The next owner, on a fresh store, has nothing to redo.
    let dir_c = tempfile::tempdir().unwrap();
    let store_c = Arc::new(open_store(dir_c.path()));
    let mut c = timed_consumer(&servers, group_id, &store_c, Duration::from_secs(10));
    poll_until(&mut c, &sink, "C owns the partition", |c| {
        c.context().owned().contains(&p)
    });
    poll_times(&mut c, &sink, 10);
    drop(c);
    watch.check("after C");

    // B applied order-0 .. order-9 (its store never had A's earlier marks);
    // A and C applied order-0 .. order-2 before and order-10 .. order-14:
    // none of B's work was redone.
    let once = |range: std::ops::Range<i32>| range.map(|i| (format!("order-{i}"), 1));
    let expected_b: HashMap<String, u32> = once(0..10).collect();
    let expected_rest: HashMap<String, u32> = once(0..3).chain(once(10..15)).collect();
    assert_eq!(sink_b.counts(), expected_b);
    assert_eq!(
        sink.counts(),
        expected_rest,
        "B's work redone after A's handover"
    );
}

/// A key the store cannot take (longer than `max_key_len`) follows the
/// missing-key policy instead of failing every retry in the same place.
#[test]
fn an_oversize_key_follows_the_missing_key_policy() {
    let (_cluster, servers) = cluster();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .unwrap();
    let oversize = vec![b'x'; 2_000];
    for i in 0..11 {
        let key = format!("order-{i}");
        let value: &[u8] = if i == 5 { &oversize } else { key.as_bytes() };
        let record = BaseRecord::<[u8], [u8]>::to(TOPIC)
            .partition(0)
            .payload(b"payload")
            .headers(OwnedHeaders::new().insert(Header {
                key: HEADER,
                value: Some(value),
            }));
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut skip = single_consumer(&servers, "oversize-skip", dirs[0].path(), MissingKey::Skip);
    let mut fail = single_consumer(&servers, "oversize-fail", dirs[1].path(), MissingKey::Fail);
    let p = Partition::new(TOPIC, 0);
    let started = Instant::now();
    let (mut seen, mut skipped, mut stopped_at) = (Vec::new(), 0, None);
    while seen.len() < 10 || stopped_at.is_none() {
        assert!(
            started.elapsed() < DEADLINE,
            "saw {seen:?}, stopped at {stopped_at:?}"
        );
        let report = skip
            .poll_batch(Duration::from_millis(50), |m, _| {
                seen.push(m.offset());
                Ok::<(), Infallible>(())
            })
            .unwrap();
        skipped += report.skipped;
        poll_failing_at_5(&mut fail, &p, &mut stopped_at);
    }
    let expected: Vec<i64> = (0..11).filter(|&o| o != 5).collect();
    assert_eq!(
        seen, expected,
        "the oversize key was skipped, the rest processed"
    );
    assert_eq!(skipped, 1);
    assert_eq!(
        skip.context().store().committed_offset(&p).unwrap(),
        Some(11)
    );
}
