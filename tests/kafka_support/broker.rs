//! A nisshi 0.7.0 broker process (the project formerly named tansu), a
//! Kafka-compatible broker that no one here wrote, started on loopback with
//! SQLite storage.
//!
//! The broker is found at `EXACTLY_NISSHI` or `/var/tmp/nisshi/bin/nisshi`
//! (`cargo install nisshi --version 0.7.0 --locked --ignore-rust-version
//! --no-default-features --features dynostore,libsql --root /var/tmp/nisshi`,
//! 10 to 15 minutes); without it the tests that need it say why and pass.

use std::io::BufRead;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::kafka::rdkafka::client::DefaultClientContext;
use exactly::kafka::rdkafka::types::RDKafkaErrorCode;

use super::{client, cluster, DEADLINE, PARTITIONS, TOPIC};

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

/// librdkafka's mock cluster in a process of its own (this binary, run
/// with `EXACTLY_MOCK_BROKER`), so that an abort of the mock ends only it
/// (a test that uses it is a `harness = false` binary).
pub struct MockBroker {
    child: Child,
    pub servers: String,
}

impl MockBroker {
    /// Starts it; the test binary must call [`MockBroker::serve`] when
    /// `EXACTLY_MOCK_BROKER` is set.
    pub fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("EXACTLY_MOCK_BROKER", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the mock cluster");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Self {
            child,
            servers: line.trim().to_string(),
        }
    }

    /// Whether its process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The mock broker's process: the cluster with the topics, until its
    /// standard input closes.
    pub fn serve() {
        let (_cluster, servers) = cluster();
        println!("{servers}");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
