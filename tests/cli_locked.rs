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
    // An export made elsewhere, to import into the held store.
    let other = tempfile::tempdir().unwrap();
    let export = path_str(&other.path().join("orders-0.export")).to_owned();
    let blocked = path_str(&other.path().join("held.export")).to_owned();
    {
        let source = other.path().join("source");
        let (s, _) = open_at(&source, FUTURE);
        s.assign(&orders(0)).unwrap();
        s.mark(&orders(0), b"from elsewhere").unwrap();
        s.close().unwrap();
        let o = run(&["export", path_str(&source), "orders", "0", &export]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for args in [
        vec!["stats", d],
        vec!["check", d, "orders", "0", "k"],
        vec!["verify", d],
        vec!["compact", d],
        vec!["inspect", d, "orders", "0"],
        vec!["export", d, "orders", "0", &blocked],
        vec!["import", d, &export],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("is locked"), "{args:?}: {e}");
        assert!(e.contains("another process"), "{args:?}: {e}");
    }
    // Nothing was imported, nor written where the export would have gone.
    assert!(!other.path().join("held.export").exists());
    assert_eq!(
        store.check(&orders(0), b"from elsewhere").unwrap(),
        exactly::Verdict::New
    );
    // Once the consumer stops, the same commands work.
    store.close().unwrap();
    let o = run(&["stats", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["import", d, &export]);
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
