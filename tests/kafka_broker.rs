//! The changelog mode against a standalone broker process that no one here
//! wrote: nisshi 0.7.0 (the project formerly named tansu), a Kafka-compatible
//! broker, started on loopback with SQLite storage. A partition's marks move
//! with it to another instance (another store directory), whose restore
//! reads them from the broker's changelog topic, which the changelog mode
//! creates itself there (the mock cluster cannot).
//!
//! The broker is found at `EXACTLY_NISSHI` or `/var/tmp/nisshi/bin/nisshi`
//! (`cargo install nisshi --version 0.7.0 --locked --ignore-rust-version
//! --no-default-features --features dynostore,libsql --root /var/tmp/nisshi`,
//! 10 to 15 minutes); without it the test says why and passes.

mod kafka_support;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::kafka::rdkafka::client::DefaultClientContext;
use exactly::kafka::rdkafka::types::RDKafkaErrorCode;

use kafka_support::*;

fn nisshi() -> Option<PathBuf> {
    std::env::var_os("EXACTLY_NISSHI")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/var/tmp/nisshi/bin/nisshi")))
        .filter(|p| p.is_file())
}

/// A nisshi broker on a free loopback port, stopped when dropped.
struct Broker {
    child: Child,
    servers: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start(binary: &PathBuf) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(binary)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://nisshi.db?maintenance_interval=5s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nisshi");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < DEADLINE,
                "nisshi did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            servers: format!("127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn create_input_topic(&self) {
        let admin: AdminClient<DefaultClientContext> = client(&self.servers).create().unwrap();
        let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in pollster::block_on(admin.create_topics([&topic], &options)).unwrap() {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, e)) => panic!("creating {topic}: {e}"),
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_partition_moves_to_another_instance_with_its_marks_on_a_standalone_broker() {
    let Some(binary) = nisshi() else {
        eprintln!(
            "skipped: no nisshi binary at EXACTLY_NISSHI or /var/tmp/nisshi/bin/nisshi \
             (see this file's header to install one)"
        );
        return;
    };
    let broker = Broker::start(&binary);
    broker.create_input_topic();
    // B's store is empty: it restores every partition before processing.
    let (sink, restored) = move_and_resend(&broker.servers, true);
    assert_eq!(restored.len(), PARTITIONS as usize, "{restored:?}");
    assert_eq!(sink.twice(), Vec::<String>::new(), "keys applied twice");
    assert!(
        restored.iter().all(|(_, records)| *records >= 30),
        "{restored:?}"
    );
}
