//! Reading what the instances left (sink and event files) and judging each
//! key against what the mode promises.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use crate::Mode;

/// What happened to an incarnation.
#[derive(Debug, Default, Clone)]
pub struct Fate {
    /// Died without a clean stop (SIGKILL, or its own abort in a restore).
    pub killed: bool,
    /// When it was stopped with SIGSTOP (µs since the epoch).
    pub stopped_at: Option<u128>,
}

/// One application of a side effect, from a sink file.
#[derive(Debug, Clone)]
struct Applied {
    incarnation: String,
    partition: i32,
    offset: i64,
    at: u128,
}

/// An incarnation's event file.
#[derive(Debug, Default)]
pub struct Events {
    /// Input offsets committed (store, and Kafka where the mode commits
    /// there), in order: partition, offset, when (µs since the epoch).
    pub committed: Vec<(i32, i64, u128)>,
    pub restored: usize,
    pub in_doubt: BTreeSet<String>,
    pub errors: Vec<String>,
    pub stopped_cleanly: bool,
}

fn files(dir: &Path, ext: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == ext) {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((stem, fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

pub fn read_events(sinks: &Path) -> BTreeMap<String, Events> {
    let mut out = BTreeMap::new();
    for (incarnation, text) in files(sinks, "events") {
        let mut e = Events::default();
        for line in text.lines() {
            let mut f = line.splitn(4, ' ');
            match f.next() {
                Some("C") => e.committed.push((
                    f.next().unwrap().parse().unwrap(),
                    f.next().unwrap().parse().unwrap(),
                    f.next().unwrap().parse().unwrap(),
                )),
                Some("R") => e.restored += 1,
                Some("D") => {
                    e.in_doubt.insert(f.next().unwrap().into());
                }
                Some("E") => e.errors.push(line[2..].into()),
                Some("S") => e.stopped_cleanly = true,
                _ => panic!("bad event line {line:?} of {incarnation}"),
            }
        }
        out.insert(incarnation, e);
    }
    out
}

fn read_sinks(sinks: &Path) -> HashMap<String, Vec<Applied>> {
    let mut out: HashMap<String, Vec<Applied>> = HashMap::new();
    for (incarnation, text) in files(sinks, "sink") {
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "torn sink line {line:?} of {incarnation}");
            out.entry(f[0].into()).or_default().push(Applied {
                incarnation: incarnation.clone(),
                partition: f[1].parse().unwrap(),
                offset: f[2].parse().unwrap(),
                at: f[3].parse().unwrap(),
            });
        }
    }
    for apps in out.values_mut() {
        apps.sort_by_key(|a| a.at);
    }
    out
}

/// What the run gave, judged.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub keys: usize,
    pub lost: Vec<String>,
    /// Keys applied twice where all but one application lie in a
    /// documented window (a killed instance's uncommitted batch).
    pub twice_killed_window: Vec<String>,
    /// ... where one lies in the zombie's resumed handler.
    pub twice_zombie: Vec<String>,
    /// Keys applied twice outside the windows: the promise broken.
    pub twice_outside: Vec<String>,
    pub in_doubt: usize,
    /// The most side effects a killed instance left uncommitted on one
    /// partition.
    pub widest_window: usize,
    pub restores: usize,
    pub errors: usize,
}

/// Judges every produced key by what the sinks and events in `sinks` say,
/// given what happened to each incarnation.
pub fn judge(
    mode: Mode,
    sinks: &Path,
    fates: &BTreeMap<String, Fate>,
    produced: &BTreeSet<usize>,
) -> Verdicts {
    let events = read_events(sinks);
    let applied = read_sinks(sinks);
    let mut v = Verdicts {
        keys: produced.len(),
        in_doubt: events.values().map(|e| e.in_doubt.len()).sum(),
        restores: events.values().map(|e| e.restored).sum(),
        errors: events.values().map(|e| e.errors.len()).sum(),
        ..Verdicts::default()
    };
    // Whether `a`'s incarnation committed past it (before `until`).
    let committed_past = |a: &Applied, until: u128| {
        events.get(&a.incarnation).is_some_and(|e| {
            e.committed
                .iter()
                .any(|&(p, o, at)| p == a.partition && o > a.offset && at < until)
        })
    };
    // The store's offset of a partition never goes back: neither does what
    // an incarnation commits.
    for (incarnation, e) in &events {
        let mut last: HashMap<i32, i64> = HashMap::new();
        for &(p, o, _) in &e.committed {
            let before = last.insert(p, o).unwrap_or(0);
            assert!(
                o >= before,
                "{incarnation} committed partition {p} back from {before} to {o}"
            );
        }
    }
    // The window is one poll batch: a killed instance leaves at most one
    // uncommitted batch of side effects per partition.
    let mut uncommitted: BTreeMap<(&str, i32), BTreeSet<i64>> = BTreeMap::new();
    for a in applied.values().flatten() {
        if fates[&a.incarnation].killed && !committed_past(a, u128::MAX) {
            uncommitted
                .entry((a.incarnation.as_str(), a.partition))
                .or_default()
                .insert(a.offset);
        }
    }
    v.widest_window = uncommitted.values().map(BTreeSet::len).max().unwrap_or(0);
    for i in produced {
        let key = format!("order-{i}");
        let Some(apps) = applied.get(&key) else {
            v.lost.push(key);
            continue;
        };
        if apps.len() < 2 {
            continue;
        }
        let mut zombie = false;
        let mut unexplained = 0;
        for a in apps {
            let fate = &fates[&a.incarnation];
            // In the zombie's window: applied after its pause began; or,
            // outside claim mode, applied before it and not committed
            // before it (for the group the pause is a crash between the
            // side effect and the Kafka commit; on a broker without fencing
            // its commit after the pause goes through).
            let zombie_window = fate
                .stopped_at
                .is_some_and(|s| a.at >= s || (mode != Mode::Claim && !committed_past(a, s)));
            if zombie_window {
                zombie = true;
            } else if !(fate.killed && !committed_past(a, u128::MAX) && mode != Mode::Claim) {
                unexplained += 1;
            }
        }
        if unexplained > 1 {
            v.twice_outside.push(format!("{key}: {apps:?}"));
        } else if zombie {
            v.twice_zombie.push(key);
        } else {
            v.twice_killed_window.push(key);
        }
    }
    v
}
