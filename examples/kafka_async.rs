//! The idempotent poll loop in an async service (feature `tokio`): each
//! message's side effect is an async call, made once per idempotency key
//! across redeliveries, restarts and rebalances.
//!
//! ```text
//! cargo run --release --features tokio --example kafka_async                # an in-process mock cluster
//! cargo run --release --features tokio --example kafka_async -- BROKERS TOPIC [GROUP] [STORE_DIR]
//! ```
//!
//! Without arguments it starts librdkafka's mock cluster, produces 20 000
//! messages (1 % of them resends of earlier keys) and consumes them; the
//! side effect is a request to a downstream task over a channel, answered
//! asynchronously. With a broker, it consumes TOPIC until interrupted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::config::ClientConfig;
use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::message::{Header, OwnedHeaders};
use exactly::kafka::rdkafka::mocking::MockCluster;
use exactly::kafka::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::kafka::{
    AsyncIdempotentConsumer, DedupContext, GroupStore, IdempotentConsumer, KeySource,
};
use exactly::{Options, Store};
use tokio::sync::{mpsc, oneshot};

const HEADER: &str = "idempotency-key";
const MESSAGES: usize = 20_000;

/// A request to the downstream system: the idempotency key, and where to
/// answer once it is applied.
type Request = (Vec<u8>, oneshot::Sender<()>);

/// A downstream system: applies each request once it is received, and
/// answers; returns how many it applied when the requests end.
fn downstream() -> (mpsc::Sender<Request>, tokio::task::JoinHandle<usize>) {
    let (tx, mut rx) = mpsc::channel::<Request>(64);
    let task = tokio::spawn(async move {
        let mut applied = 0;
        while let Some((_key, done)) = rx.recv().await {
            applied += 1;
            let _ = done.send(());
        }
        applied
    });
    (tx, task)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mock;
    let (brokers, topic) = match args.as_slice() {
        [] => {
            mock = MockCluster::new(1)?;
            mock.create_topic("orders", 4, 1)?;
            let brokers = mock.bootstrap_servers();
            produce(&brokers, "orders")?;
            (brokers, "orders".to_string())
        }
        [brokers, topic, ..] => (brokers.clone(), topic.clone()),
        _ => return Err("usage: kafka_async [BROKERS TOPIC [GROUP] [STORE_DIR]]".into()),
    };
    let group_id = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| format!("{topic}-exactly"));
    let dir = tempfile::tempdir()?;
    let store_dir = args
        .get(3)
        .map_or_else(|| dir.path().to_path_buf(), Into::into);

    let store = Arc::new(Store::open(&store_dir, Options::default())?);
    let group = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create_with_context(DedupContext::new(&group))?;
    consumer.subscribe(&[&topic])?;
    let mut consumer =
        AsyncIdempotentConsumer::new(IdempotentConsumer::new(consumer, KeySource::header(HEADER)));

    let (requests, applied) = downstream();
    let started = Instant::now();
    let (mut messages, mut duplicates) = (0, 0);
    while args.len() >= 2 || messages < MESSAGES {
        let report = consumer
            .poll_batch(Duration::from_millis(200), |_message, key| {
                let requests = requests.clone();
                async move {
                    let (done, answer) = oneshot::channel();
                    requests
                        .send((key.unwrap_or_default(), done))
                        .await
                        .map_err(|_| std::io::Error::other("downstream gone"))?;
                    answer.await.map_err(|_| std::io::Error::other("no answer"))
                }
            })
            .await?;
        messages += report.messages;
        duplicates += report.duplicates;
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the stream did not arrive in two minutes".into());
        }
    }
    drop(requests);
    let applied = applied.await?;
    println!(
        "{messages} messages in {:.2?}: {applied} side effects, {duplicates} duplicates skipped",
        started.elapsed()
    );
    Ok(())
}

/// Produces `MESSAGES` messages with 1 % resends of earlier keys.
fn produce(brokers: &str, topic: &str) -> Result<(), Box<dyn std::error::Error>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for i in 0..MESSAGES {
        let n = if i % 100 == 99 { i / 2 } else { i };
        let key = format!("order-{n}");
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER,
            value: Some(key.as_bytes()),
        });
        loop {
            let record = BaseRecord::to(topic)
                .key(key.as_bytes())
                .payload("payload")
                .headers(headers.clone());
            match producer.send(record) {
                Ok(()) => break,
                // The queue is full: let deliveries drain it.
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}
