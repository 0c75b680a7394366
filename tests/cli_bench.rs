//! `exactly bench` as a real process: it runs the comparison harness's rows
//! on a small stream and writes their figures, every row agreeing on what is
//! new; bad arguments are refused before anything runs.

mod cli_support;

use cli_support::{path_str, run, stderr, stdout};

#[test]
fn bench_runs_the_chosen_rows_and_writes_their_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = run(&[
        "bench",
        "--messages",
        "20000",
        "--only",
        "exactly-batch,bloom-rocksdb-writebatch",
        "--out",
        path_str(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("exactly-batch"), "{}", stdout(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let distinct = v["distinct_keys"].as_u64().unwrap();
    assert!(distinct > 0 && distinct <= v["messages"].as_u64().unwrap());
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["row"].as_str().unwrap()).collect();
    assert_eq!(names, ["exactly-batch", "bloom-rocksdb-writebatch"]);
    for r in rows {
        assert_eq!(r["new_keys"].as_u64(), Some(distinct), "{r}");
        assert!(r["ns_per_msg"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn bench_refuses_an_unknown_row_or_an_empty_stream_before_running() {
    for args in [
        vec!["bench", "--only", "exactly-batch,no-such-row"],
        vec!["bench", "--messages", "0"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(!stdout(&o).contains("stream:"), "{args:?} ran the stream");
    }
    let o = run(&["bench", "--only", "no-such-row"]);
    let e = stderr(&o);
    assert!(
        e.contains("no-such-row") && e.contains("exactly-batch"),
        "{e}"
    );
}
