//! The tool on a store a running consumer holds, and on a directory that
//! is not a store: plain-words errors, and nothing created or changed.

mod cli_support;

use cli_support::{open_at, orders, path_str, run, stderr, FUTURE};

#[test]
fn a_store_held_by_a_consumer_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_at(dir.path(), FUTURE);
    store.assign(&orders(0)).unwrap();
    store.mark(&orders(0), b"k").unwrap();
    let d = path_str(dir.path());
    for args in [
        vec!["stats", d],
        vec!["check", d, "orders", "0", "k"],
        vec!["verify", d],
        vec!["compact", d],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("is locked"), "{args:?}: {e}");
        assert!(e.contains("another process"), "{args:?}: {e}");
    }
    // Once the consumer stops, the same command works.
    store.close().unwrap();
    let o = run(&["stats", d]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_directory_that_is_not_a_store_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let o = run(&["stats", path_str(&missing)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not an exactly store"),
        "{}",
        stderr(&o)
    );
    assert!(!missing.exists());
    let o = run(&["verify", path_str(dir.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
