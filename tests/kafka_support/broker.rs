//! A nisshi 0.7.0 broker process (the project formerly named tansu), a
//! Kafka-compatible broker that no one here wrote, started on loopback with
//! SQLite storage.
//!
//! The broker is found at `EXACTLY_NISSHI` or `/var/tmp/nisshi/bin/nisshi`
//! (`cargo install nisshi --version 0.7.0 --locked --ignore-rust-version
//! --no-default-features --features dynostore,libsql --root /var/tmp/nisshi`,
//! 10 to 15 minutes); without it the tests that need it say why and pass.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::kafka::rdkafka::client::DefaultClientContext;
use exactly::kafka::rdkafka::types::RDKafkaErrorCode;

use super::{client, DEADLINE, PARTITIONS, TOPIC};

/// The broker binary, if there is one.
pub fn nisshi() -> Option<PathBuf> {
    std::env::var_os("EXACTLY_NISSHI")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/var/tmp/nisshi/bin/nisshi")))
        .filter(|p| p.is_file())
}

/// A nisshi broker on a free loopback port, stopped when dropped.
pub struct Broker {
    child: Child,
    pub servers: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start(binary: &PathBuf) -> Self {
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

    pub fn create_input_topic(&self) {
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

/// Why a test that needs the broker did not run.
pub const SKIPPED: &str =
    "skipped: no nisshi binary at EXACTLY_NISSHI or /var/tmp/nisshi/bin/nisshi \
     (see tests/kafka_support/broker.rs to install one)";
