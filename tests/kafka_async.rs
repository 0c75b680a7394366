//! The async poll loop (feature `tokio`) on librdkafka's in-process mock
//! cluster: async handlers that await timers, two consumers sharing a store
//! while one joins mid-stream, resends of processed keys, and an instance
//! that dies in a handler: in claim mode the next owner gets its keys in
//! doubt and applies each once; the plain loop applies them twice (the
//! control, which shows the scenario can fail). On the current-thread
//! runtime the loop refuses with a typed error and consumes nothing.

mod kafka_support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::message::{Headers, Message, OwnedMessage};
use exactly::kafka::{
    AsyncIdempotentConsumer, ConsumeError, DedupContext, Delivery, GroupStore, IdempotentConsumer,
    KeySource,
};
use exactly::{Options, Partition, Store};

use kafka_support::*;

fn text(key: &[u8]) -> String {
    String::from_utf8(key.to_vec()).unwrap()
}

/// The idempotency key, read by the handler from the detached message's
/// headers: it matches the key the loop passes.
fn header_key(m: &OwnedMessage) -> Option<Vec<u8>> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == HEADER)
        .and_then(|h| h.value.map(<[u8]>::to_vec))
}

fn reached(store: &Store, ends: &HashMap<i32, i64>) -> bool {
    ends.iter().all(|(p, end)| {
        store
            .committed_offset(&Partition::new(TOPIC, *p))
            .ok()
            .flatten()
            .is_some_and(|o| o >= *end)
    })
}

/// A consumer of the shared store's group, in the async loop.
fn shared(servers: &str, group: &GroupStore) -> AsyncIdempotentConsumer {
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers)
        .create_with_context(DedupContext::new(group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    AsyncIdempotentConsumer::new(IdempotentConsumer::new(consumer, KeySource::header(HEADER)))
}

/// Leaves the group, serving the revocation, before the consumer goes.
fn leave(consumer: AsyncIdempotentConsumer) {
    let consumer = consumer.into_inner().into_inner();
    consumer.unsubscribe();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// Polls until the store's offsets reach `ends`; the handler awaits a timer
/// (`pause()` when it is called) before its side effect, and checks that the
/// key the loop passes is the message's. Returns the messages it handled.
async fn run(
    consumer: &mut AsyncIdempotentConsumer,
    store: &Store,
    ends: &HashMap<i32, i64>,
    sink: &Sink,
    pause: impl Fn() -> Duration,
) -> usize {
    let started = Instant::now();
    let mut handled = 0;
    while !reached(store, ends) {
        handled += consumer
            .poll_batch(Duration::from_millis(100), |m, key| {
                let pause = pause();
                async move {
                    tokio::time::sleep(pause).await;
                    let key = key.expect("keyed");
                    assert_eq!(header_key(&m).as_deref(), Some(key.as_slice()));
                    sink.apply(&key);
                    Ok::<(), std::convert::Infallible>(())
                }
            })
            .await
            .unwrap()
            .processed;
        assert!(started.elapsed() < DEADLINE, "did not reach {ends:?}");
    }
    handled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_handlers_apply_every_key_once_while_a_second_consumer_joins() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let group = GroupStore::new(store.clone());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    // New keys, resends of 40 of them, then more new keys.
    produce(&servers, (0..120).chain(0..40).chain(120..160), &mut ends);

    let mut a = shared(&servers, &group);
    // Until the second consumer has handled a message, the first takes
    // 200 ms a message (32 s for all of them): the second joins (a few
    // seconds on the mock cluster, more on a loaded machine) long before
    // the end. Then both take 20 ms.
    let joined = Arc::new(AtomicBool::new(false));
    let pace = {
        let joined = joined.clone();
        move || {
            if joined.load(Ordering::Relaxed) {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(200)
            }
        }
    };
    let task_a = {
        let (store, ends, sink) = (store.clone(), ends.clone(), sink.clone());
        tokio::spawn(async move {
            let handled = run(&mut a, &store, &ends, &sink, pace).await;
            (handled, a)
        })
    };
    // Once the first has processed some messages.
    let started = Instant::now();
    while sink.count() < 1 {
        assert!(
            started.elapsed() < DEADLINE,
            "the first consumer processed nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = shared(&servers, &group);
    let by_b = run(&mut b, &store, &ends, &sink, || {
        joined.store(true, Ordering::Relaxed);
        Duration::from_millis(20)
    })
    .await;
    let (by_a, a) = task_a.await.unwrap();
    // Both leave the group before they are dropped (librdkafka asserts on
    // a consumer destroyed while an assignment is in progress).
    leave(a);
    leave(b);

    assert_eq!(sink.count(), 160, "every key applied");
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    // Both took part (the join moved partitions to the second), and the
    // resends were skipped as duplicates.
    assert!(by_a > 0 && by_b > 0, "handled: {by_a} and {by_b}");
    assert_eq!(by_a + by_b, 160);
}

/// Instance A (changelog mode) processes keys 0..40, then dies in a handler
/// of its next poll batch after three side effects; instance B (another
/// store, restored from the changelog) processes the rest. Returns the sink,
/// the keys B got in doubt, the keys B got as new that were applied
/// already, and the keys A applied in the batch it died in.
async fn die_then_resume(claimed: bool) -> (Sink, BTreeSet<String>, Vec<String>, Vec<String>) {
    let (_cluster, servers) = cluster();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = Sink::default();
    let mut ends = HashMap::new();
    produce(&servers, 0..40, &mut ends);

    let Instance {
        consumer,
        store: store_a,
    } = Instance::start(&servers, dirs.0.path(), "a", true);
    let mut consumer = AsyncIdempotentConsumer::new(consumer);
    run(&mut consumer, &store_a, &ends, &sink, || Duration::ZERO).await;
    produce(&servers, 40..80, &mut ends);

    // The handler dies (a panic) after its third side effect: the task is
    // gone with the consumer, without a revocation or a clean close.
    let died = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dying = {
        let (sink, died) = (sink.clone(), died.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                let apply = |key: Option<Vec<u8>>| {
                    let key = key.expect("keyed");
                    sink.apply(&key);
                    let applied = {
                        let mut died = died.lock().unwrap();
                        died.push(text(&key));
                        died.len()
                    };
                    assert!(applied < 3, "the process dies here");
                };
                let result = if claimed {
                    consumer
                        .poll_batch_claimed(Duration::from_millis(100), |_, key, delivery| {
                            assert_eq!(delivery, Delivery::New);
                            apply(key);
                            async { Ok::<(), std::convert::Infallible>(()) }
                        })
                        .await
                } else {
                    consumer
                        .poll_batch(Duration::from_millis(100), |_, key| {
                            apply(key);
                            async { Ok::<(), std::convert::Infallible>(()) }
                        })
                        .await
                };
                result.unwrap();
                assert!(started.elapsed() < DEADLINE, "no batch reached the handler");
            }
        })
    };
    assert!(dying.await.unwrap_err().is_panic());
    drop(store_a);
    let died = died.lock().unwrap().clone();

    let Instance {
        consumer,
        store: store_b,
    } = Instance::start(&servers, dirs.1.path(), "b", true);
    let mut consumer = AsyncIdempotentConsumer::new(consumer);
    let mut in_doubt = BTreeSet::new();
    let mut new_but_applied = Vec::new();
    let started = Instant::now();
    while !reached(&store_b, &ends) {
        if claimed {
            consumer
                .poll_batch_claimed(Duration::from_millis(100), |_, key, delivery| {
                    let key = key.expect("keyed");
                    match delivery {
                        Delivery::New => {
                            if sink.applied(&key) > 0 {
                                new_but_applied.push(text(&key));
                            }
                            sink.apply(&key);
                        }
                        // Asks the downstream system by the key.
                        Delivery::InDoubt { .. } => {
                            in_doubt.insert(text(&key));
                            if sink.applied(&key) == 0 {
                                sink.apply(&key);
                            }
                        }
                    }
                    async { Ok::<(), std::convert::Infallible>(()) }
                })
                .await
                .unwrap();
        } else {
            run(&mut consumer, &store_b, &ends, &sink, || Duration::ZERO).await;
        }
        assert!(started.elapsed() < DEADLINE);
    }
    Instance {
        consumer: consumer.into_inner(),
        store: store_b,
    }
    .stop();
    assert_eq!(sink.count(), 80, "every key applied");
    (sink, in_doubt, new_but_applied, died)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_claim_mode_the_keys_of_a_handler_that_died_come_back_in_doubt_never_new() {
    let (sink, in_doubt, new_but_applied, died) = die_then_resume(true).await;
    assert_eq!(died.len(), 3);
    assert_eq!(
        new_but_applied,
        Vec::<String>::new(),
        "delivered as new after its side effect"
    );
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    for key in &died {
        assert!(
            in_doubt.contains(key),
            "{key} was applied, then not reported in doubt"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_async_loop_applies_twice_what_a_dying_handler_applied() {
    // The control: the same death in the plain loop. Its marks were never
    // written, so the next owner applies those keys again.
    let (sink, in_doubt, _, mut died) = die_then_resume(false).await;
    assert!(in_doubt.is_empty());
    died.sort();
    assert_eq!(
        sink.twice(),
        died,
        "the control must apply the dying batch's keys twice"
    );
}

/// The current-thread runtime cannot move its tasks off a worker blocked in
/// the loop: each call refuses, and nothing is consumed.
#[tokio::test(flavor = "current_thread")]
async fn the_current_thread_runtime_is_refused_and_nothing_is_consumed() {
    let (_cluster, servers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut ends = HashMap::new();
    produce(&servers, 0..8, &mut ends);
    let instance = Instance::start(&servers, dir.path(), "a", false);
    let store = instance.store.clone();
    let mut consumer = AsyncIdempotentConsumer::new(instance.consumer);
    let sink = Sink::default();
    for _ in 0..3 {
        let r = consumer
            .poll_batch(Duration::from_millis(100), |_, key| {
                sink.apply(&key.unwrap());
                async { Ok::<(), std::convert::Infallible>(()) }
            })
            .await;
        assert!(matches!(r, Err(ConsumeError::Runtime { .. })), "{r:?}");
    }
    assert_eq!(sink.count(), 0);
    // No poll ran, so no rebalance either: no partition was assigned.
    assert!(store.assigned().is_empty());
}
