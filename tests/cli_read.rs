//! `exactly stats`, `check` and `inspect` as real processes on a store the
//! test built: every answer is checked against the store's own API.

mod cli_support;

use std::time::Duration;

use exactly::{Claim, KeyMode, Store, Verdict};

use cli_support::{
    json, open_at, options, orders, path_str, run, run_with_stdin, stdout, FUTURE, TTL,
};

const KEYS: usize = 20;

fn key(i: usize) -> String {
    format!("order-{i}")
}

/// Two partitions: orders/0 with KEYS marks, one expired short-lived
/// mark, one live claim, offset 42 and epoch 3; orders/1 with one mark.
/// Returns the API's verdicts for orders/0 before close, at the time the
/// store closed.
fn build(dir: &std::path::Path) -> Vec<(String, Verdict)> {
    let (store, clock) = open_at(dir, FUTURE);
    let p = orders(0);
    store.assign_with_epoch(&p, 3).unwrap();
    store.assign(&orders(1)).unwrap();
    let mut batch = store.batch(&p).unwrap();
    for i in 0..KEYS {
        batch.mark(key(i).as_bytes()).unwrap();
    }
    batch.set_offset(42);
    batch.commit().unwrap();
    store
        .mark_with_ttl(&p, b"short", Duration::from_secs(1))
        .unwrap();
    store.mark(&orders(1), b"other").unwrap();
    store.mark(&orders(1), &[0x00, 0xff, 0x0a]).unwrap();
    clock.advance(Duration::from_secs(2));
    assert!(matches!(
        store
            .claim(&p, b"claimed", Duration::from_secs(60))
            .unwrap(),
        Claim::Acquired(_)
    ));
    let mut names: Vec<String> = (0..KEYS).map(key).collect();
    names.extend(["short", "claimed", "never"].map(String::from));
    let verdicts = names
        .into_iter()
        .map(|k| {
            let v = store.check(&p, k.as_bytes()).unwrap();
            (k, v)
        })
        .collect();
    store.close().unwrap();
    verdicts
}

#[test]
fn check_answers_as_the_store_does() {
    let dir = tempfile::tempdir().unwrap();
    let verdicts = build(dir.path());
    let d = path_str(dir.path());
    for (k, expected) in &verdicts {
        let v = json(&["check", d, "orders", "0", k]);
        let answer = &v["keys"][0];
        let verdict = answer["verdict"].as_str().unwrap();
        match expected {
            Verdict::New => assert_eq!(verdict, "new", "{k}"),
            Verdict::Duplicate => assert!(
                verdict == "duplicate" || verdict == "in_flight",
                "{k}: {verdict}"
            ),
        }
        if k.starts_with("order-") {
            let ttl = u64::try_from(TTL.as_millis()).unwrap();
            assert_eq!(answer["expires_at_ms"].as_u64(), Some(FUTURE + ttl), "{k}");
        }
    }
    let claimed = json(&["check", d, "orders", "0", "claimed"]);
    assert_eq!(claimed["keys"][0]["verdict"], "in_flight");
    assert_eq!(claimed["keys"][0]["epoch"], 3);
    assert_eq!(
        claimed["keys"][0]["expires_at_ms"].as_u64(),
        Some(FUTURE + 2_000 + 60_000)
    );

    // Many keys on standard input, one answer each, in order.
    let input: String = verdicts.iter().map(|(k, _)| format!("{k}\n")).collect();
    let o = run_with_stdin(&["--json", "check", d, "orders", "0", "--stdin"], &input);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let answers = v["keys"].as_array().unwrap();
    assert_eq!(answers.len(), verdicts.len());
    for ((k, expected), a) in verdicts.iter().zip(answers) {
        assert_eq!(a["key"].as_str(), Some(k.as_str()));
        assert_eq!(a["verdict"] == "new", *expected == Verdict::New, "{k}");
    }

    // The table for people says the same.
    let o = run(&["check", d, "orders", "0", "order-1"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("Duplicate"), "{}", stdout(&o));
    let o = run(&["check", d, "orders", "0", "never"]);
    assert!(stdout(&o).contains("New"), "{}", stdout(&o));

    // A key that is not text: shown as hex by inspect, checked as hex.
    let v = json(&["inspect", d, "orders", "1"]);
    let binary = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .find(|k| k.starts_with("hex:"))
        .unwrap();
    assert_eq!(binary, "hex:00ff0a");
    let v = json(&["check", d, "orders", "1", &binary]);
    assert_eq!(v["keys"][0]["verdict"], "duplicate");
    let v = json(&["check", d, "orders", "1", "hex:00ff0b"]);
    assert_eq!(v["keys"][0]["verdict"], "new");
    assert!(!run(&["check", d, "orders", "1", "hex:0"]).status.success());

    // A key the store would refuse is refused the same way.
    let o = run(&["check", d, "orders", "0", ""]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"));
}

#[test]
fn stats_and_inspect_match_the_store() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let d = path_str(dir.path());
    let v = json(&["stats", d, "--exact"]);
    assert_eq!(v["store"]["format_version"], 2);
    assert_eq!(v["store"]["key_mode"], "raw");
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["topic"], "orders");
    assert_eq!(parts[0]["partition"], 0);
    assert_eq!(parts[0]["committed_offset"], 42);
    assert_eq!(parts[0]["epoch"], 3);
    // The expired short-lived mark is not counted; the claim is.
    assert_eq!(parts[0]["live_marks"].as_u64(), Some(KEYS as u64));
    assert_eq!(parts[0]["claims"], 1);
    assert_eq!(parts[1]["live_marks"], 2);
    assert!(parts[1]["committed_offset"].is_null());
    // Closed cleanly: each partition has a filter snapshot, so a size per key.
    assert!(parts[0]["filter_bits_per_key"].as_f64().unwrap() > 0.0);

    let v = json(&["inspect", d, "orders", "0", "--limit", "5"]);
    assert_eq!(v["entries_total"].as_u64(), Some(KEYS as u64 + 2));
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    let all = json(&["inspect", d, "orders", "0", "--limit", "1000"]);
    let all = all["entries"].as_array().unwrap();
    let short = all.iter().find(|e| e["key"] == "short").unwrap();
    assert_eq!(short["live"], false);
    let claimed = all.iter().find(|e| e["key"] == "claimed").unwrap();
    assert_eq!(claimed["state"], "claimed");
    assert_eq!(claimed["live"], true);

    // The tables for people.
    let o = run(&["stats", d]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("orders/0"), "{}", stdout(&o));
    let o = run(&["inspect", d, "orders", "0"]);
    assert!(stdout(&o).contains("order-3"), "{}", stdout(&o));
    assert!(stdout(&o).contains("expired"), "{}", stdout(&o));

    // Looking did not change what the store answers, nor its snapshots.
    let (store, _) = open_at(dir.path(), FUTURE + 2_000);
    store.assign(&orders(0)).unwrap();
    assert_eq!(
        store.check(&orders(0), b"order-1").unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(store.committed_offset(&orders(0)).unwrap(), Some(42));
    assert!(store.stats().partitions[&orders(0)].filter_from_snapshot);
}

#[test]
fn hashed_stores_are_checked_by_key_or_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = exactly::ManualClock::new(FUTURE);
    let store = Store::open(dir.path(), options(&clock).key_mode(KeyMode::Hashed)).unwrap();
    store.assign(&orders(0)).unwrap();
    store.mark(&orders(0), b"secret-key").unwrap();
    store.close().unwrap();
    let d = path_str(dir.path());
    let v = json(&["check", d, "orders", "0", "secret-key"]);
    assert_eq!(v["keys"][0]["verdict"], "duplicate");
    let v = json(&["inspect", d, "orders", "0"]);
    let hash = v["entries"][0]["key"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 32);
    let v = json(&["check", d, "orders", "0", "--hashed", &hash]);
    assert_eq!(v["keys"][0]["verdict"], "duplicate");
    let v = json(&["check", d, "orders", "0", "--hashed", &"0".repeat(32)]);
    assert_eq!(v["keys"][0]["verdict"], "new");
    let o = run(&["check", d, "orders", "0", "--hashed", "xyz"]);
    assert!(!o.status.success());
}
