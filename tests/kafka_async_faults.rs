//! The async loop and the store's metrics under faults and races: a
//! handler panic caught by the runtime, a runtime that cannot block, a
//! handler awaiting other tasks on one worker, a timeout around a batch, an
//! in-doubt key whose partition was not handled; checks, `stats()` and
//! commits racing revokes, reassigns and deletes, against a recorder that
//! keeps every counter and every gauge's history.

mod kafka_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::consumer::BaseConsumer;
use exactly::kafka::{
    AsyncIdempotentConsumer, ConsumeError, DedupContext, Delivery, GroupStore, IdempotentConsumer,
    KeySource,
};
use exactly::{Claim, Error, Options, Partition, Store};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};

use kafka_support::*;

// ---------------------------------------------------------------------------
// A recorder that keeps every counter's value and every gauge's history.

#[derive(Default)]
struct Cell(AtomicU64);
impl CounterFn for Cell {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::SeqCst);
    }
    fn absolute(&self, v: u64) {
        self.0.fetch_max(v, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct GaugeCell(Mutex<Vec<f64>>);
impl GaugeFn for GaugeCell {
    fn increment(&self, v: f64) {
        let mut h = self.0.lock().unwrap();
        let last = h.last().copied().unwrap_or(0.0);
        h.push(last + v);
    }
    fn decrement(&self, v: f64) {
        let mut h = self.0.lock().unwrap();
        let last = h.last().copied().unwrap_or(0.0);
        h.push(last - v);
    }
    fn set(&self, v: f64) {
        self.0.lock().unwrap().push(v);
    }
}

#[derive(Default)]
struct Rec {
    counters: Mutex<HashMap<String, Arc<Cell>>>,
    gauges: Mutex<HashMap<String, Arc<GaugeCell>>>,
}

fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

struct Global(&'static Rec);
impl Recorder for Global {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .0
            .counters
            .lock()
            .unwrap()
            .entry(id(key))
            .or_default()
            .clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let g = self
            .0
            .gauges
            .lock()
            .unwrap()
            .entry(id(key))
            .or_default()
            .clone();
        Gauge::from_arc(g)
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn rec() -> &'static Rec {
    static REC: OnceLock<&'static Rec> = OnceLock::new();
    REC.get_or_init(|| {
        let r: &'static Rec = Box::leak(Box::default());
        metrics::set_global_recorder(Global(r)).expect("one recorder");
        r
    })
}

fn counter(name: &str, p: &Partition) -> u64 {
    let id = format!("{name}{{partition={},topic={}}}", p.partition(), p.topic());
    rec()
        .counters
        .lock()
        .unwrap()
        .get(&id)
        .map_or(0, |c| c.0.load(Ordering::SeqCst))
}

fn gauge_history(name: &str, p: &Partition) -> Vec<f64> {
    let id = format!("{name}{{partition={},topic={}}}", p.partition(), p.topic());
    rec()
        .gauges
        .lock()
        .unwrap()
        .get(&id)
        .map(|g| g.0.lock().unwrap().clone())
        .unwrap_or_default()
}

fn gauge(name: &str, p: &Partition) -> Option<f64> {
    gauge_history(name, p).last().copied()
}

fn mark_keys(store: &Store, p: &Partition, n: usize) {
    let mut b = store.batch(p).unwrap();
    for i in 0..n {
        b.check_and_mark(format!("key-{i}").as_bytes()).unwrap();
    }
    b.commit().unwrap();
}

// ---------------------------------------------------------------------------
// Store metrics.

/// A read-only `check` that races a revoke may bump the old shard's
/// counters after the revoke published them: they are published when the
/// shard is dropped, so `exactly_checks_total` counts every check.
#[test]
fn checks_racing_a_revoke_are_all_exported() {
    rec();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let p = Partition::new("review-lost-checks", 0);
    store.assign(&p).unwrap();
    mark_keys(&store, &p, 2_000);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let checker = {
        let (store, p, stop, ok) = (store.clone(), p.clone(), stop.clone(), ok.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match store.check(&p, b"key-7") {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::NotAssigned(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        })
    };
    for _ in 0..200 {
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    checker.join().unwrap();
    // Publishes what the current shard counted.
    store.stats();
    let exported = counter("exactly_checks_total", &p);
    // 2 000 checks by the first batch's marks.
    let done = ok.load(Ordering::Relaxed) + 2_000;
    assert_eq!(exported, done, "checks done {done}, exported {exported}");
}

/// `stats()` snapshots the shard list, then sets each shard's gauges; a
/// revoke in between zeroes them first. A revoked shard sets its gauges no
/// more, so a revoked partition's gauges read zero, as documented.
#[test]
fn a_revoked_partitions_gauges_read_zero_whatever_stats_races_the_revoke() {
    rec();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let p = Partition::new("review-stale-gauges", 0);
    store.assign(&p).unwrap();
    mark_keys(&store, &p, 2_000);
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let reader = {
        let (store, stop, passes) = (store.clone(), stop.clone(), passes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.stats();
                passes.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut stale = 0;
    for _ in 0..200 {
        store.assign(&p).unwrap();
        store.revoke(&p).unwrap();
        // Wait for a stats() pass that began after the revoke returned: it
        // does not see the partition, so whatever the gauge says now stays.
        let n = passes.load(Ordering::SeqCst);
        while passes.load(Ordering::SeqCst) < n + 2 {
            std::thread::yield_now();
        }
        if gauge("exactly_filter_bytes", &p) != Some(0.0) {
            stale += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(
        stale, 0,
        "revoked partition with nonzero filter_bytes gauge"
    );
}

/// `delete_partition` drops the offset, and the offset gauge reads zero, as
/// after a fresh assign with no offset: never the deleted partition's.
#[test]
fn a_deleted_partitions_offset_gauge_reads_zero() {
    rec();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Options::default()).unwrap();
    let p = Partition::new("review-deleted", 0);
    store.assign(&p).unwrap();
    let mut b = store.batch(&p).unwrap();
    b.check_and_mark(b"a").unwrap();
    b.set_offset(100);
    b.commit().unwrap();
    assert_eq!(gauge("exactly_committed_offset", &p), Some(100.0));
    assert!(store.delete_partition(&p).unwrap());
    store.assign(&p).unwrap();
    let stats = store.stats();
    assert_eq!(stats.partitions[&p].committed_offset, None);
    assert_ne!(
        gauge("exactly_committed_offset", &p),
        Some(100.0),
        "gauge still shows the deleted partition's offset; stats() says None"
    );
}

/// `stats()` reads the committed offset without the write lock and sets
/// the gauge after: a commit in between may set a later offset first. The
/// gauge never goes back.
#[test]
fn the_offset_gauge_never_goes_back_when_stats_races_commits() {
    rec();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let p = Partition::new("review-offset-race", 0);
    store.assign(&p).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.stats();
            }
        })
    };
    let started = Instant::now();
    let mut offset = 0;
    while started.elapsed() < Duration::from_secs(4) {
        offset += 1;
        let mut b = store.batch(&p).unwrap();
        b.set_offset(offset);
        b.commit().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let history = gauge_history("exactly_committed_offset", &p);
    let backwards: Vec<(f64, f64)> = history
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        backwards.is_empty(),
        "{} regressions of the committed offset gauge over {offset} commits, e.g. {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(5)]
    );
}

// ---------------------------------------------------------------------------
// The async loop.

fn bogus_consumer() -> AsyncIdempotentConsumer {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    std::mem::forget(dir);
    let group = GroupStore::new(store);
    let consumer: BaseConsumer<DedupContext> = consumer_config("127.0.0.1:1")
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    AsyncIdempotentConsumer::new(IdempotentConsumer::new(consumer, KeySource::header(HEADER)))
}

/// Inside a current-thread runtime that entered a multi-threaded runtime's
/// handle (`Runtime::enter`), `Handle::try_current` is the multi-threaded
/// one, but `block_in_place` refuses the thread: a typed error, no panic.
#[test]
fn a_current_thread_runtime_behind_an_entered_multi_thread_handle_is_refused() {
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let ct = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut consumer = bogus_consumer();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ct.block_on(async {
            let _entered = mt.enter();
            consumer
                .poll_batch(Duration::from_millis(10), |_, _| async {
                    Ok::<(), std::convert::Infallible>(())
                })
                .await
        })
    }));
    match outcome {
        Ok(Err(ConsumeError::Runtime { .. })) => {}
        Ok(other) => panic!("expected a refusal, got {other:?}"),
        Err(p) => panic!(
            "poll_batch panicked instead of returning ConsumeError::Runtime: {:?}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or(p.downcast_ref::<&str>().copied())
        ),
    }
}

/// A handler panics once; the application restarts its loop task (the
/// consumer lives on behind a mutex, as a supervisor would keep it). The
/// panicking poll puts the consumer back at the first uncommitted message
/// of each partition: every key is handled, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_caught_by_the_runtime_loses_no_message() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut ends = HashMap::new();
    produce(&servers, 0..40, &mut ends);
    let instance = Instance::start(&servers, dir.path(), "a", false);
    let store = instance.store.clone();
    let consumer = Arc::new(tokio::sync::Mutex::new(AsyncIdempotentConsumer::new(
        instance.consumer.max_batch(4),
    )));
    let sink = Sink::default();
    let panicked = Arc::new(AtomicBool::new(false));
    let produced_more = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut panics = 0;
    let mut all_ends = ends.clone();
    loop {
        let task = {
            let (consumer, sink, panicked, store) = (
                consumer.clone(),
                sink.clone(),
                panicked.clone(),
                store.clone(),
            );
            let ends = all_ends.clone();
            tokio::spawn(async move {
                let mut consumer = consumer.lock().await;
                loop {
                    consumer
                        .poll_batch(Duration::from_millis(100), |_, key| {
                            let (sink, panicked) = (sink.clone(), panicked.clone());
                            async move {
                                let key = key.unwrap();
                                if key == b"order-5" && !panicked.swap(true, Ordering::SeqCst) {
                                    panic!("handler bug on order-5");
                                }
                                sink.apply(&key);
                                Ok::<(), std::convert::Infallible>(())
                            }
                        })
                        .await
                        .unwrap();
                    let done = ends.iter().all(|(p, end)| {
                        store
                            .committed_offset(&Partition::new(TOPIC, *p))
                            .ok()
                            .flatten()
                            .is_some_and(|o| o >= *end)
                    });
                    if done {
                        return;
                    }
                    if started.elapsed() > DEADLINE {
                        return;
                    }
                }
            })
        };
        match task.await {
            Ok(()) => break,
            Err(e) if e.is_panic() => {
                panics += 1;
                if !produced_more.swap(true, Ordering::SeqCst) {
                    // More traffic after the panic, so that later batches commit.
                    produce(&servers, 40..80, &mut all_ends);
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < DEADLINE);
    }
    assert_eq!(panics, 1);
    let missing: Vec<String> = (0..80)
        .map(|i| format!("order-{i}"))
        .filter(|k| sink.applied(k.as_bytes()) == 0)
        .collect();
    assert!(
        missing.is_empty(),
        "store offsets reached the end, but these keys were never handled: {missing:?}"
    );
}

/// A handler that awaits a downstream spawned as a task of its own
/// completes (a downstream driven by the calling task itself would never
/// run while the batch blocks that task: documented, not tested).
#[test]
fn a_handler_awaiting_a_spawned_downstream_task_completes() {
    sibling_or_spawned(true);
}

fn sibling_or_spawned(spawned: bool) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (_cluster, servers) = cluster();
            let dir = tempfile::tempdir().unwrap();
            let mut ends = HashMap::new();
            produce(&servers, 0..8, &mut ends);
            let instance = Instance::start(&servers, dir.path(), "a", false);
            let mut consumer = AsyncIdempotentConsumer::new(instance.consumer);
            let (req_tx, mut req_rx) =
                tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
            let handled = Arc::new(AtomicUsize::new(0));
            let consume = async {
                let started = Instant::now();
                while handled.load(Ordering::SeqCst) < 8 && started.elapsed() < DEADLINE {
                    consumer
                        .poll_batch(Duration::from_millis(100), |_, _| {
                            let (req_tx, handled) = (req_tx.clone(), handled.clone());
                            async move {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                req_tx.send(tx).unwrap();
                                rx.await.unwrap();
                                handled.fetch_add(1, Ordering::SeqCst);
                                Ok::<(), std::convert::Infallible>(())
                            }
                        })
                        .await
                        .unwrap();
                }
            };
            let downstream = async move {
                while let Some(tx) = req_rx.recv().await {
                    let _ = tx.send(());
                }
            };
            if spawned {
                let d = tokio::spawn(downstream);
                consume.await;
                d.abort();
            } else {
                tokio::select! {
                    () = consume => {}
                    () = downstream => {}
                }
            }
        });
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "deadlock: the handler waits for a sibling future its own task can no longer poll"
    );
}

/// `tokio::time::timeout` around `poll_batch` takes effect only once the
/// batch is done (the batch runs in the future's first poll): the handlers
/// all ran and their batch committed, nothing is left half-done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_around_poll_batch_takes_effect_once_the_batch_is_done() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut ends = HashMap::new();
    produce(&servers, 0..4, &mut ends);
    let instance = Instance::start(&servers, dir.path(), "a", false);
    let store = instance.store.clone();
    let mut consumer = AsyncIdempotentConsumer::new(instance.consumer);
    let started = Instant::now();
    loop {
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            consumer.poll_batch(Duration::from_millis(100), |_, _| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<(), std::convert::Infallible>(())
            }),
        )
        .await;
        let report = r.expect("the batch ran in the first poll").unwrap();
        if report.processed > 0 {
            assert!(t0.elapsed() >= Duration::from_millis(300) * report.processed as u32);
            for (p, offset) in &report.committed {
                assert_eq!(store.committed_offset(p).unwrap(), Some(*offset));
            }
            return;
        }
        assert!(started.elapsed() < DEADLINE);
    }
}

/// Control: with one worker thread the loop on a spawned task, its handler
/// awaiting tasks it spawns itself, completes (block_in_place hands the
/// worker's core to another thread).
#[test]
fn one_worker_handler_awaiting_spawned_tasks_completes() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (_cluster, servers) = cluster();
            let task = tokio::spawn(async move {
                let dir = tempfile::tempdir().unwrap();
                let mut ends = HashMap::new();
                produce(&servers, 0..8, &mut ends);
                let instance = Instance::start(&servers, dir.path(), "a", false);
                let mut consumer = AsyncIdempotentConsumer::new(instance.consumer);
                let mut handled = 0;
                let started = Instant::now();
                while handled < 8 && started.elapsed() < DEADLINE {
                    handled += consumer
                        .poll_batch(Duration::from_millis(100), |_, _| async {
                            let inner = tokio::spawn(async {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                tokio::task::block_in_place(|| ());
                            });
                            inner.await.unwrap();
                            tokio::task::block_in_place(|| ());
                            Ok::<(), std::convert::Infallible>(())
                        })
                        .await
                        .unwrap()
                        .processed;
                }
                handled
            });
            assert_eq!(task.await.unwrap(), 8);
        });
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(45)).is_ok(),
        "deadlock"
    );
}

// ---------------------------------------------------------------------------
// Kafka loop metrics.

/// A handler error on an earlier message of the partition leaves an
/// in-doubt message unhandled (its claim stays, it comes in doubt again):
/// the counter counts in-doubt messages when the handler gets them, once
/// here, as documented ("messages handed to the handler in doubt").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_doubt_counter_counts_only_messages_handed_to_the_handler() {
    rec();
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let p0 = Partition::new(TOPIC, 0);
    let instance = Instance::start(&servers, dir.path(), "a", false);
    let store = instance.store.clone();
    // An unsettled claim on order-4, as a dead processor leaves it.
    store.assign(&p0).unwrap();
    assert!(matches!(
        store
            .claim(&p0, b"order-4", Duration::from_secs(3600))
            .unwrap(),
        Claim::Acquired(_)
    ));
    store.revoke(&p0).unwrap();
    let before = counter("exactly_kafka_messages_in_doubt_total", &p0);
    let mut ends = HashMap::new();
    produce(&servers, [0, 4], &mut ends);
    let mut consumer = AsyncIdempotentConsumer::new(instance.consumer);
    let failed_once = Arc::new(AtomicBool::new(false));
    let seen_in_doubt = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    loop {
        let r = consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, key, delivery| {
                let (failed_once, seen_in_doubt) = (failed_once.clone(), seen_in_doubt.clone());
                async move {
                    if matches!(delivery, Delivery::InDoubt { .. }) {
                        seen_in_doubt.fetch_add(1, Ordering::SeqCst);
                    }
                    if key.as_deref() == Some(b"order-0".as_slice())
                        && !failed_once.swap(true, Ordering::SeqCst)
                    {
                        return Err("downstream unavailable");
                    }
                    Ok(())
                }
            })
            .await;
        if let Err(e) = &r {
            assert!(matches!(e, ConsumeError::Handler { .. }), "{e:?}");
        }
        if store.committed_offset(&p0).ok().flatten() >= Some(2) {
            break;
        }
        assert!(started.elapsed() < DEADLINE);
    }
    assert!(failed_once.load(Ordering::SeqCst));
    let exported = counter("exactly_kafka_messages_in_doubt_total", &p0) - before;
    assert_eq!(
        exported,
        seen_in_doubt.load(Ordering::SeqCst) as u64,
        "in-doubt deliveries the handler saw vs the exported counter"
    );
}
