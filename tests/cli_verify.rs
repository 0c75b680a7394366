//! `exactly verify` and `exactly compact` as real processes: verify passes
//! on a healthy store and fails, with a non-zero exit status, on one whose
//! filter snapshot or manifest the test damaged; compact reports the
//! expired marks it dropped.

mod cli_support;

use std::path::Path;
use std::time::Duration;

use exactly::Verdict;

use cli_support::{json, open_at, orders, path_str, run, stderr, stdout, FUTURE};

fn build(dir: &Path) {
    let (store, clock) = open_at(dir, FUTURE);
    for n in 0..2 {
        store.assign(&orders(n)).unwrap();
        for i in 0..200 {
            store.mark(&orders(n), format!("k{i}").as_bytes()).unwrap();
        }
        for i in 0..30 {
            store
                .mark_with_ttl(
                    &orders(n),
                    format!("short{i}").as_bytes(),
                    Duration::from_secs(5),
                )
                .unwrap();
        }
    }
    clock.advance(Duration::from_secs(10));
    store.close().unwrap();
}

fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn verify_passes_on_a_healthy_store() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let v = json(&["verify", path_str(dir.path())]);
    assert_eq!(v["healthy"], true);
    let findings = v["findings"].as_array().unwrap();
    assert!(findings.iter().all(|f| f["ok"] == true));
    // Both partitions' snapshots were checked against their marks.
    let snapshots = findings
        .iter()
        .filter(|f| f["check"].as_str().unwrap().ends_with("filter snapshot"))
        .count();
    assert_eq!(snapshots, 2);
    let o = run(&["verify", path_str(dir.path())]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("no false negative"), "{}", stdout(&o));
}

#[test]
fn verify_fails_on_a_damaged_filter_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let snaps: Vec<_> = std::fs::read_dir(dir.path().join("filters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(snaps.len(), 2);
    flip(&snaps[0], 100);
    let o = run(&["--json", "verify", path_str(dir.path())]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    let failed: Vec<_> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["check"]
        .as_str()
        .unwrap()
        .ends_with("filter snapshot"));
    assert!(stderr(&o).contains("unhealthy"));
    // The store itself still answers right: assign rescans.
    let (store, _) = open_at(dir.path(), FUTURE + 10_000);
    for n in 0..2 {
        store.assign(&orders(n)).unwrap();
        assert_eq!(store.check(&orders(n), b"k5").unwrap(), Verdict::Duplicate);
    }
}

#[test]
fn verify_fails_on_a_missing_snapshot_file() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let snap = std::fs::read_dir(dir.path().join("filters"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(snap).unwrap();
    let o = run(&["verify", path_str(dir.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("missing"), "{}", stdout(&o));
}

#[test]
fn verify_fails_on_a_damaged_manifest() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    flip(&dir.path().join("EXACTLY"), 20);
    let o = run(&["verify", path_str(dir.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unhealthy"), "{}", stderr(&o));
    assert!(stderr(&o).contains("manifest"), "{}", stderr(&o));
}

#[test]
fn compact_reports_the_expired_marks_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let d = path_str(dir.path());
    let v = json(&["compact", d, "orders", "1"]);
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["partition"], 1);
    assert_eq!(parts[0]["expired_before"], 30);
    assert_eq!(parts[0]["marks_dropped"], 30);
    assert_eq!(parts[0]["entries_after"], 200);
    // Then every partition; orders/1 has nothing left to drop.
    let v = json(&["compact", d]);
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["marks_dropped"], 30);
    assert_eq!(parts[1]["marks_dropped"], 0);
    let v = json(&["verify", d]);
    assert_eq!(v["healthy"], true);
    let (store, _) = open_at(dir.path(), FUTURE + 10_000);
    store.assign(&orders(0)).unwrap();
    assert_eq!(
        store.check(&orders(0), b"k199").unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(store.check(&orders(0), b"short3").unwrap(), Verdict::New);
}

#[test]
fn verify_reports_a_torn_tail_its_open_cut_and_the_bytes_kept() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let mut logs: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    logs.sort();
    let log = dir.path().join(logs.pop().expect("a log"));
    let mut bytes = std::fs::read(&log).unwrap();
    let len = bytes.len();
    // A header of a recycled-log type after the records: what a power cut
    // can leave in the unsynced tail.
    bytes.extend_from_slice(&[11, 11, 11, 11, 11, 11, 11, 11, 11, b's']);
    std::fs::write(&log, &bytes).unwrap();
    let v = json(&["verify", path_str(dir.path())]);
    assert_eq!(v["healthy"], true, "{v}");
    let detail = |check: &str| {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .map(|f| f["detail"].as_str().unwrap().to_owned())
    };
    let logs = detail("write-ahead logs").unwrap();
    assert!(logs.contains(&format!("cut at byte {len}")), "{logs}");
    let kept = detail("torn tails kept").unwrap();
    assert!(kept.contains(&format!(".log.torn-{len}")), "{kept}");
}
