//! One incarnation of a consumer instance, run in a process of its own:
//! processes until the stop file appears, appending each side effect to its
//! sink file and each committed poll batch to its event file.

use std::convert::Infallible;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::message::{BorrowedMessage, Message};
use exactly::kafka::{
    Changelog, DedupContext, Delivery, GroupStore, IdempotentConsumer, KeySource,
};
use exactly::{Options, Store};

use crate::kafka_support::{client, consumer_config, GROUP, HEADER, TOPIC};
use crate::{Mode, MAX_BATCH};

/// What an instance that dies in a restore says first.
pub const DIED_IN_RESTORE: &str = "dying at the end of a restore";

pub fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

pub fn append(file: &mut File, line: &str) {
    // One write of a short line to a file opened for appending: it reaches
    // the page cache whole, and a SIGKILL after it cannot lose it.
    file.write_all(line.as_bytes()).expect("append");
}

/// What one incarnation of an instance is told, in `EXACTLY_INSTANCE`:
/// `mode|servers|store dir|sink dir|incarnation|die in restore (0/1)`.
pub struct Spec {
    pub mode: Mode,
    pub servers: String,
    pub store: PathBuf,
    pub sinks: PathBuf,
    pub instance: String,
    pub incarnation: String,
    pub die_in_restore: bool,
}

impl Spec {
    pub fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.mode.name(),
            self.servers,
            self.store.display(),
            self.sinks.display(),
            self.instance,
            self.incarnation,
            u8::from(self.die_in_restore)
        )
    }

    pub fn decode(s: &str) -> Self {
        let f: Vec<&str> = s.split('|').collect();
        assert_eq!(f.len(), 7, "bad instance spec {s}");
        Self {
            mode: Mode::parse(f[0]),
            servers: f[1].into(),
            store: f[2].into(),
            sinks: f[3].into(),
            instance: f[4].into(),
            incarnation: f[5].into(),
            die_in_restore: f[6] == "1",
        }
    }
}

/// Whether any incarnation applied `key`: the downstream lookup by key that
/// an in-doubt delivery calls for.
fn applied_anywhere(sinks: &Path, key: &str) -> bool {
    fs::read_dir(sinks).unwrap().any(|e| {
        let path = e.unwrap().path();
        path.extension().is_some_and(|x| x == "sink")
            && fs::read_to_string(&path)
                .unwrap()
                .lines()
                .any(|l| l.split(' ').next() == Some(key))
    })
}

/// The side effect: one line in this incarnation's sink file.
fn apply(sink: &mut File, m: &BorrowedMessage<'_>, key: &[u8]) {
    // Some work before the effect, so that a kill lands in handlers often.
    std::thread::sleep(Duration::from_millis(1));
    let key = std::str::from_utf8(key).unwrap();
    let line = format!("{key} {} {} {}\n", m.partition(), m.offset(), now_micros());
    append(sink, &line);
}

/// One incarnation of an instance: processes until the stop file appears,
/// then leaves the group and closes its store.
pub fn child(spec: Spec) {
    let store = Arc::new(Store::open(&spec.store, Options::default()).expect("open the store"));
    let group = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = consumer_config(&spec.servers)
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let mut consumer =
        IdempotentConsumer::new(consumer, KeySource::header(HEADER)).max_batch(MAX_BATCH);
    if spec.mode != Mode::Local {
        let mut changelog = Changelog::new(
            &client(&spec.servers),
            GROUP,
            &spec.instance,
            Duration::from_secs(8 * 24 * 3600),
            Duration::from_secs(10),
        )
        .expect("changelog");
        if spec.die_in_restore {
            // Dies once a restore has committed what it read, before the
            // partition is handed to the application (but not in the
            // clean stop at the end).
            let stop = spec.sinks.join("stop");
            changelog = changelog.on_restore_progress(move |p| {
                if p.records > 0 && !stop.exists() {
                    eprintln!("{DIED_IN_RESTORE}");
                    std::process::abort();
                }
            });
        }
        consumer = consumer.changelog(changelog);
    }
    let open = |ext: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.sinks.join(format!("{}.{ext}", spec.incarnation)))
            .unwrap()
    };
    let mut sink = open("sink");
    let mut events = open("events");
    let stop = spec.sinks.join("stop");
    while !stop.exists() {
        let result = match spec.mode {
            Mode::Claim => {
                consumer.poll_batch_claimed(Duration::from_millis(100), |m, key, delivery, _| {
                    let key = key.expect("keyed");
                    match delivery {
                        Delivery::New => apply(&mut sink, m, key),
                        Delivery::InDoubt { .. } => {
                            let text = std::str::from_utf8(key).unwrap();
                            append(&mut events, &format!("D {text}\n"));
                            if !applied_anywhere(&spec.sinks, text) {
                                apply(&mut sink, m, key);
                            }
                        }
                    }
                    Ok::<(), Infallible>(())
                })
            }
            _ => consumer.poll_batch(Duration::from_millis(100), |m, key| {
                apply(&mut sink, m, key.expect("keyed"));
                Ok::<(), Infallible>(())
            }),
        };
        match result {
            Ok(report) => {
                for (p, offset) in report.committed {
                    append(
                        &mut events,
                        &format!("C {} {offset} {}\n", p.partition(), now_micros()),
                    );
                }
                for (p, records) in report.restored {
                    append(&mut events, &format!("R {} {records}\n", p.partition()));
                }
            }
            // Fencing, a rebalance failure, a transaction that failed: the
            // loop goes on, as an application's would.
            Err(e) => append(&mut events, &format!("E {e}\n")),
        }
    }
    let consumer = consumer.into_inner();
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(200));
    drop(consumer);
    drop(group);
    match Arc::try_unwrap(store) {
        Ok(store) => store.close().expect("close"),
        Err(_) => panic!("the store is still shared"),
    }
    append(&mut events, "S\n");
}
