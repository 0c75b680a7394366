//! Three consumer instances, each a process of its own with its own store
//! directory, share one consumer group while a producer keeps sending new
//! keys and resends of old ones. The test kills instances with SIGKILL at
//! random moments (in a handler, between the local commit and the Kafka
//! transaction, at the end of a restore) and restarts them on their store,
//! so that partitions move on every kill, and stops one with SIGSTOP past
//! the session timeout before resuming it (a zombie). Every side effect is
//! appended to a sink file outside the instances, with the incarnation that
//! applied it and the input offset; every committed poll batch to an event
//! file. The parent then judges each key against what each mode promises
//! (`docs/kafka.md`, "Failures and what each mode gives"):
//!
//! - claim mode: every key applied, none twice except by a zombie resumed
//!   inside its handler (documented as not covered); keys whose claim was
//!   left by a killed instance come back in doubt, and the handler applies
//!   them only if the sink lacks them;
//! - changelog mode: every key applied; a key applied twice only when one
//!   of the applications is in the documented window (its instance was
//!   killed before its batch's transaction committed, or it was the zombie,
//!   after its pause or in the batch it was paused in before its commit:
//!   for the group a pause is a crash between the side effect and the
//!   Kafka commit);
//! - local stores only, the control: the same judgement must find keys
//!   applied twice outside those windows (resends after a partition moved),
//!   which shows the scenario can fail.
//!
//! It runs on librdkafka's mock cluster, hosted by a process of its own (its
//! brokers listen on loopback, so the instances join it from theirs), and,
//! where the binary is there, on a nisshi broker process. The mock cluster
//! now and then aborts on an assertion of its group coordinator (a member's
//! second JoinGroup while its first is pending, seen twice in some twenty
//! runs): a fault of the harness, after which the mode runs again on a
//! fresh cluster, at most twice.
//!
//! `EXACTLY_INSTANCES_SEED` replays a run's schedule (the seed is printed);
//! `EXACTLY_INSTANCES_STEPS` sets the number of production steps (default 18).

#[path = "kafka_instances/child.rs"]
mod child;
#[path = "kafka_instances/judge.rs"]
mod judge;
mod kafka_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::producer::BaseProducer;

use child::{child, now_micros, Spec, DIED_IN_RESTORE};
use judge::{judge, read_events, Fate, Verdicts};
use kafka_support::broker::{nisshi, Broker, MockBroker, SKIPPED};
use kafka_support::{client, send};

const INSTANCES: [&str; 3] = ["a", "b", "c"];
/// New keys per production step, and resends of old keys among them.
const NEW_PER_STEP: usize = 60;
const RESENDS_PER_STEP: usize = 6;
/// Messages per poll batch.
pub const MAX_BATCH: usize = 20;
/// Resends of old keys after the last kill, when partitions have moved.
const FINAL_RESENDS: usize = 120;
/// Longer than the consumers' session timeout (3 s): the group moves the
/// stopped instance's partitions on.
const PAUSE: Duration = Duration::from_secs(6);
/// How long the group may take to process everything after the last step.
const DRAIN: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Local,
    Changelog,
    Claim,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Changelog => "changelog",
            Mode::Claim => "claim",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "local" => Mode::Local,
            "changelog" => Mode::Changelog,
            "claim" => Mode::Claim,
            other => panic!("unknown mode {other}"),
        }
    }
}

/// A small deterministic generator (xorshift64*), so that a seed replays
/// the schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Running {
    instance: &'static str,
    incarnation: String,
    child: Child,
    /// Told to die at the end of a restore that reads something.
    dies_in_restore: bool,
}

struct Scenario {
    mode: Mode,
    servers: String,
    dir: tempfile::TempDir,
    sinks: PathBuf,
    running: Vec<Running>,
    fates: BTreeMap<String, Fate>,
    generations: HashMap<&'static str, u32>,
    /// The next incarnation started dies at the end of its first restore.
    die_next: bool,
    /// Incarnations that died so.
    died_in_restore: usize,
    kills: usize,
}

impl Scenario {
    fn new(mode: Mode, servers: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sinks = dir.path().join("sinks");
        fs::create_dir(&sinks).unwrap();
        Self {
            mode,
            servers: servers.into(),
            dir,
            sinks,
            running: Vec::new(),
            fates: BTreeMap::new(),
            generations: HashMap::new(),
            die_next: false,
            died_in_restore: 0,
            kills: 0,
        }
    }

    fn start(&mut self, instance: &'static str) {
        let n = self.generations.entry(instance).or_default();
        let incarnation = format!("{instance}{n}");
        *n += 1;
        let dies_in_restore = std::mem::take(&mut self.die_next);
        let spec = Spec {
            mode: self.mode,
            servers: self.servers.clone(),
            store: self.dir.path().join(instance),
            sinks: self.sinks.clone(),
            instance: instance.into(),
            incarnation: incarnation.clone(),
            die_in_restore: dies_in_restore,
        };
        let stderr = File::create(self.sinks.join(format!("{incarnation}.stderr"))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .env("EXACTLY_INSTANCE", spec.encode())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start an instance");
        self.fates.insert(incarnation.clone(), Fate::default());
        self.running.push(Running {
            instance,
            incarnation,
            child,
            dies_in_restore,
        });
    }

    /// Restarts the instances that died on their own (an abort in a
    /// restore): they count as killed.
    fn restart_exited(&mut self) {
        let mut exited = Vec::new();
        self.running
            .retain_mut(|r| match r.child.try_wait().unwrap() {
                Some(status) => {
                    exited.push((r.instance, r.incarnation.clone(), status));
                    false
                }
                None => true,
            });
        for (instance, incarnation, status) in exited {
            // Only an abort in a restore ends an instance on its own.
            assert!(
                self.stderr(&incarnation).contains(DIED_IN_RESTORE),
                "{incarnation} ended with {status}: {}",
                self.stderr(&incarnation)
            );
            self.fates.get_mut(&incarnation).unwrap().killed = true;
            self.died_in_restore += 1;
            self.start(instance);
        }
    }

    fn kill(&mut self, i: usize) -> &'static str {
        let mut r = self.running.remove(i);
        r.child.kill().unwrap();
        r.child.wait().unwrap();
        self.fates.get_mut(&r.incarnation).unwrap().killed = true;
        self.kills += 1;
        r.instance
    }

    fn signal(&self, incarnation: &str, signal: &str) {
        let r = self
            .running
            .iter()
            .find(|r| r.incarnation == incarnation)
            .expect("a stopped instance stays running");
        let status = Command::new("kill")
            .args([signal, &r.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    /// Waits (up to 5 s) for a running instance that is not stopped to
    /// commit past `before` on some partition, and returns its index: it is
    /// processing the last wave.
    fn active(&self, before: &HashMap<i32, i64>, stopped: Option<&str>) -> Option<usize> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let events = read_events(&self.sinks);
            let found = self.running.iter().position(|r| {
                Some(r.incarnation.as_str()) != stopped
                    && events.get(&r.incarnation).is_some_and(|e| {
                        e.committed
                            .iter()
                            .any(|(p, o, _)| before.get(p).is_none_or(|b| o > b))
                    })
            });
            if found.is_some() {
                return found;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// Waits (up to 15 s) until every running instance has committed past
    /// `before`: the group is stable, each member processing the last
    /// wave. (A member paused while its join request is pending makes
    /// librdkafka's mock cluster abort on an assertion when it rejoins.)
    fn all_active(&self, before: &HashMap<i32, i64>) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let events = read_events(&self.sinks);
            if self.running.iter().all(|r| {
                events.get(&r.incarnation).is_some_and(|e| {
                    e.committed
                        .iter()
                        .any(|(p, o, _)| before.get(p).is_none_or(|b| o > b))
                })
            }) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The highest input offset committed per partition, by anyone.
    fn committed(&self) -> HashMap<i32, i64> {
        let mut out: HashMap<i32, i64> = HashMap::new();
        for (p, offset, _) in read_events(&self.sinks)
            .values()
            .flat_map(|e| e.committed.iter())
        {
            let o = out.entry(*p).or_default();
            *o = (*o).max(*offset);
        }
        out
    }

    /// Stops every instance through the stop file and waits for them.
    fn stop_all(&mut self) {
        File::create(self.sinks.join("stop")).unwrap();
        let started = Instant::now();
        for mut r in std::mem::take(&mut self.running) {
            loop {
                if let Some(status) = r.child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "{} ended with {status}: {}",
                        r.incarnation,
                        self.stderr(&r.incarnation)
                    );
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{} did not stop: {}",
                    r.incarnation,
                    self.stderr(&r.incarnation)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn stderr(&self, incarnation: &str) -> String {
        let text = fs::read_to_string(self.sinks.join(format!("{incarnation}.stderr")))
            .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = Command::new("kill")
                .args(["-CONT", &r.child.id().to_string()])
                .status();
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// Runs the scenario of this file's header in `mode` against `servers`.
fn run(
    mode: Mode,
    servers: &str,
    seed: u64,
    steps: usize,
    alive: &mut dyn FnMut() -> bool,
) -> Verdicts {
    let mut rng = Rng(seed | 1);
    let mut s = Scenario::new(mode, servers);
    let producer: BaseProducer = client(servers)
        .set("message.send.max.retries", "10")
        .set("retry.backoff.ms", "50")
        .create()
        .unwrap();
    let mut ends = HashMap::new();
    let mut produced = BTreeSet::new();
    let mut next = 0usize;
    for instance in INSTANCES {
        s.start(instance);
    }
    let mut resume: Option<(String, Instant)> = None;
    // Once, from half way, in a step without a kill, once the group is
    // stable.
    let pause_at = steps / 2;
    let mut paused = false;
    for step in 0..steps {
        let mut keys: Vec<usize> = (next..next + NEW_PER_STEP).collect();
        next += NEW_PER_STEP;
        if step > 0 {
            for _ in 0..RESENDS_PER_STEP {
                keys.push(rng.below(next as u64 - NEW_PER_STEP as u64) as usize);
            }
        }
        produced.extend(keys.iter().copied());
        assert!(alive(), "{}: the broker process ended", mode.name());
        let before = s.committed();
        send(&producer, keys.iter().copied(), &mut ends);
        s.restart_exited();
        if let Some((incarnation, at)) = &resume {
            if *at <= Instant::now() {
                s.signal(incarnation, "-CONT");
                resume = None;
            }
        }
        // Never one told to die in a restore: it could end between the
        // choice and the signal, and a zombie is one that comes back.
        let pausable: Vec<usize> = (0..s.running.len())
            .filter(|&i| !s.running[i].dies_in_restore)
            .collect();
        if step >= pause_at
            && !paused
            && step % 3 != 2
            && !pausable.is_empty()
            && s.all_active(&before)
        {
            paused = true;
            let i = pausable[rng.below(pausable.len() as u64) as usize];
            let incarnation = s.running[i].incarnation.clone();
            s.fates.get_mut(&incarnation).unwrap().stopped_at = Some(now_micros());
            s.signal(&incarnation, "-STOP");
            resume = Some((incarnation, Instant::now() + PAUSE));
        } else if step % 3 == 2 && step + 1 < steps {
            // An instance handling the wave (about 1 ms a message, poll
            // batches of 20): killed a few ms after its first commit of the
            // wave, it is in a handler, a store commit or a transaction.
            // Never the stopped one.
            let stopped = resume.as_ref().map(|(r, _)| r.clone());
            let i = s.active(&before, stopped.as_deref()).unwrap_or_else(|| {
                let candidates: Vec<usize> = (0..s.running.len())
                    .filter(|&i| stopped.as_deref() != Some(s.running[i].incarnation.as_str()))
                    .collect();
                candidates[rng.below(candidates.len() as u64) as usize]
            });
            std::thread::sleep(Duration::from_millis(rng.below(30)));
            let instance = s.kill(i);
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            // From the second kill on, restarts in the changelog modes die
            // at the end of their first restore that reads something, until
            // one has.
            s.die_next = mode != Mode::Local && s.kills >= 2 && s.died_in_restore == 0;
            s.start(instance);
        }
        std::thread::sleep(Duration::from_millis(150 + rng.below(400)));
    }
    if let Some((incarnation, at)) = resume.take() {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        s.signal(&incarnation, "-CONT");
    }
    // Resends of old keys now that partitions have moved.
    let keys: Vec<usize> = (0..FINAL_RESENDS)
        .map(|_| rng.below(next as u64) as usize)
        .collect();
    send(&producer, keys.iter().copied(), &mut ends);

    let started = Instant::now();
    loop {
        assert!(alive(), "{}: the broker process ended", mode.name());
        s.restart_exited();
        let committed = s.committed();
        if ends
            .iter()
            .all(|(p, end)| committed.get(p).is_some_and(|c| c >= end))
        {
            break;
        }
        if started.elapsed() > DRAIN {
            let stderr: Vec<String> = s
                .running
                .iter()
                .map(|r| format!("{}: {}", r.incarnation, s.stderr(&r.incarnation)))
                .collect();
            panic!(
                "{}: not drained: committed {committed:?}, ends {ends:?}\n{}",
                mode.name(),
                stderr.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    s.stop_all();
    assert!(
        paused,
        "{}: the group was never stable long enough to pause a member",
        mode.name()
    );
    let v = judge(mode, &s.sinks, &s.fates, &produced);
    println!(
        "{}: {} keys, {} messages, {} kills, {} died in a restore, {} incarnations, 1 zombie; \
         restores {}, \
         in doubt {}, widest window {}, loop errors {}; twice: {} in a killed instance's window, {} by the \
         zombie, {} outside the windows; lost {}",
        mode.name(),
        v.keys,
        ends.values().sum::<i64>(),
        s.kills,
        s.died_in_restore,
        s.fates.len(),
        v.restores,
        v.in_doubt,
        v.widest_window,
        v.errors,
        v.twice_killed_window.len(),
        v.twice_zombie.len(),
        v.twice_outside.len(),
        v.lost.len()
    );
    v
}

fn check(mode: Mode, v: &Verdicts) {
    assert!(
        v.lost.is_empty(),
        "{}: keys lost: {:?}",
        mode.name(),
        v.lost
    );
    match mode {
        Mode::Claim | Mode::Changelog => {
            assert!(
                v.twice_outside.is_empty(),
                "{}: keys applied twice outside the documented windows:\n{}",
                mode.name(),
                v.twice_outside.join("\n")
            );
            assert!(v.restores > 0, "{}: no partition was restored", mode.name());
            assert!(
                v.widest_window <= MAX_BATCH,
                "{}: a killed instance left {} side effects of a partition uncommitted, \
                 more than a poll batch",
                mode.name(),
                v.widest_window
            );
        }
        Mode::Local => assert!(
            !v.twice_outside.is_empty(),
            "local stores: no key applied twice outside the windows; the scenario \
             cannot tell the modes apart"
        ),
    }
}

fn main() {
    if let Ok(spec) = std::env::var("EXACTLY_INSTANCE") {
        child(Spec::decode(&spec));
        return;
    }
    if std::env::var_os("EXACTLY_MOCK_BROKER").is_some() {
        MockBroker::serve();
        return;
    }
    let seed: u64 = std::env::var("EXACTLY_INSTANCES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_micros() as u64);
    let steps: usize = std::env::var("EXACTLY_INSTANCES_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(18);
    println!("three instances in processes of their own: seed {seed}, {steps} steps");
    for mode in [Mode::Claim, Mode::Changelog, Mode::Local] {
        for attempt in 0.. {
            let mut mock = MockBroker::start();
            print!("mock cluster, ");
            let servers = mock.servers.clone();
            let result = catch_unwind(AssertUnwindSafe(|| {
                run(mode, &servers, seed + attempt, steps, &mut || mock.alive())
            }));
            match result {
                Ok(v) => {
                    check(mode, &v);
                    break;
                }
                // librdkafka's mock cluster aborts, now and then, on an
                // assertion of its group coordinator (a member's second
                // JoinGroup while its first is pending): a harness fault,
                // not the store's; the mode runs again on a fresh cluster.
                Err(_) if !mock.alive() && attempt < 2 => {
                    println!("{}: the mock cluster aborted; running again", mode.name());
                }
                Err(panic) => resume_unwind(panic),
            }
        }
    }
    match nisshi() {
        None => println!("standalone broker: {SKIPPED}"),
        Some(binary) => {
            for mode in [Mode::Claim, Mode::Changelog] {
                let broker = Broker::start(&binary);
                broker.create_input_topic();
                print!("standalone broker, ");
                let v = run(mode, &broker.servers, seed, steps, &mut || true);
                check(mode, &v);
            }
        }
    }
}
