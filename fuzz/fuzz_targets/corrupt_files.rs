//! Damaged files: a small closed store with fuzzer-chosen bytes flipped,
//! overwritten, truncated, appended or a file deleted.
//!
//! Three template stores are built once per process, each closed cleanly
//! (so everything in them is synced): marks and offsets only in the
//! write-ahead log; in tables and the log; only in tables. Each run copies a
//! template, damages it, opens it, assigns both partitions and checks every
//! key that was marked and some that never were.
//!
//! What must hold, whatever the damage:
//!
//! * no panic and no hang, and every error is one of the variants for a
//!   damaged store (`Corruption`, `NotAStore`, `UnsupportedFormat`,
//!   `IncompatibleOptions`, `Storage`, `Io`);
//! * never `Duplicate` for a key that was never marked, and no offset that
//!   was never committed;
//! * every synced mark and offset is reported exactly, or the call reports
//!   an error: whichever file is damaged, RocksDB's `MANIFEST` and
//!   write-ahead logs included. A damaged store never opens as an older
//!   version of itself (the durability ledger catches the rollback), and no
//!   damage hangs `open` (the write-ahead log pre-flight catches the record
//!   that traps RocksDB's log reader).
#![no_main]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use exactly::{Error, ManualClock, Options, Partition, Store, Verdict};
use libfuzzer_sys::fuzz_target;

const PARTITIONS: i32 = 2;
const BATCHES: i64 = 3;
const KEYS_PER_BATCH: i64 = 3;
const OFFSET_STEP: i64 = 10;
const MAX_MUTATIONS: usize = 4;

/// A template store: file names and contents.
type Files = Vec<(String, Vec<u8>)>;

#[derive(Debug, Arbitrary)]
enum Damage {
    /// XOR one byte with a non-zero mask.
    Flip { at: u32, mask: u8 },
    /// Overwrite bytes from an offset.
    Overwrite { at: u32, bytes: Vec<u8> },
    /// Cut the file to a length.
    Truncate { at: u32 },
    /// Add bytes at the end.
    Append(Vec<u8>),
    /// Remove the file.
    Delete,
}

#[derive(Debug, Arbitrary)]
struct Mutation {
    /// Index into the template's files, sorted by name.
    file: u8,
    damage: Damage,
}

#[derive(Debug, Arbitrary)]
struct Input {
    template: u8,
    mutations: Vec<Mutation>,
}

fn part(p: i32) -> Partition {
    Partition::new("t", p)
}

/// Key `j` of batch `b` (1-based) of partition `p`. Batches past `BATCHES`
/// were never written.
fn key(p: i32, b: i64, j: i64) -> Vec<u8> {
    format!("p{p}-b{b}-k{j}").into_bytes()
}

fn options() -> Options {
    Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition(16)
        .bloom_fp_rate(0.5)
        .clock(ManualClock::new(1_767_225_600_000))
}

fn write_batch(store: &Store, p: i32, b: i64) {
    let mut batch = store.batch(&part(p)).expect("batch");
    for j in 0..KEYS_PER_BATCH {
        assert_eq!(
            batch.check_and_mark(&key(p, b, j)).expect("mark"),
            Verdict::New
        );
    }
    if b > 1 {
        // A redelivery: no new mark.
        assert_eq!(
            batch.check_and_mark(&key(p, b - 1, 0)).expect("mark"),
            Verdict::Duplicate
        );
    }
    batch.set_offset(b * OFFSET_STEP);
    batch.commit().expect("commit");
}

fn read_files(dir: &Path) -> Files {
    // The store's files, and those one directory down (filter snapshots), by
    // path relative to the store.
    let mut files: Files = Vec::new();
    for e in fs::read_dir(dir).expect("read template") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            for f in fs::read_dir(e.path()).expect("read subdirectory") {
                let f = f.expect("entry");
                let sub = f.file_name().to_string_lossy().into_owned();
                files.push((
                    format!("{name}/{sub}"),
                    fs::read(f.path()).expect("read file"),
                ));
            }
        } else {
            files.push((name, fs::read(e.path()).expect("read file")));
        }
    }
    files.sort();
    files
}

/// Builds the three templates: log only, tables and log, tables only.
fn templates() -> &'static [Files; 3] {
    static TEMPLATES: OnceLock<[Files; 3]> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let build = |compact_after: Option<i64>, reopen: bool| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path(), options()).expect("open template");
            for p in 0..PARTITIONS {
                store.assign(&part(p)).expect("assign");
            }
            for b in 1..=BATCHES {
                for p in 0..PARTITIONS {
                    write_batch(&store, p, b);
                }
                if compact_after == Some(b) {
                    for p in 0..PARTITIONS {
                        store.compact(&part(p)).expect("compact");
                    }
                }
            }
            store.close().expect("close template");
            if reopen {
                // Recovery moves the log's contents into tables.
                Store::open(dir.path(), options())
                    .expect("reopen template")
                    .close()
                    .expect("close template");
            }
            read_files(dir.path())
        };
        [
            build(None, false),
            build(Some(2), false),
            build(Some(2), true),
        ]
    })
}

fn damaged_store_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Corruption(_)
            | Error::NotAStore { .. }
            | Error::UnsupportedFormat { .. }
            | Error::IncompatibleOptions { .. }
            | Error::Storage(_)
            | Error::Io { .. }
    )
}

fn ok_or_typed<T: std::fmt::Debug>(r: exactly::Result<T>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(damaged_store_error(&e), "{what}: unexpected error {e:?}");
            None
        }
    }
}

/// Applies the damage to one file; `None` deletes it.
fn damage(mut bytes: Vec<u8>, d: &Damage) -> Option<Vec<u8>> {
    let len = bytes.len();
    match d {
        Damage::Flip { at, mask } => {
            if len > 0 {
                bytes[*at as usize % len] ^= (*mask).max(1);
            }
        }
        Damage::Overwrite { at, bytes: new } => {
            if len > 0 {
                let at = *at as usize % len;
                let n = new.len().min(len - at);
                bytes[at..at + n].copy_from_slice(&new[..n]);
            }
        }
        Damage::Truncate { at } => bytes.truncate(*at as usize % (len + 1)),
        Damage::Append(more) => bytes.extend_from_slice(more),
        Damage::Delete => return None,
    }
    Some(bytes)
}

fn run(input: &Input) {
    let template = &templates()[usize::from(input.template) % 3];
    let mut files: Vec<(String, Option<Vec<u8>>)> = template
        .iter()
        .map(|(n, b)| (n.clone(), Some(b.clone())))
        .collect();
    let mut damaged = Vec::new();
    for m in input.mutations.iter().take(MAX_MUTATIONS) {
        let i = usize::from(m.file) % files.len();
        let (name, bytes) = &mut files[i];
        if let Some(b) = bytes.take() {
            damaged.push(format!("{name} ({} bytes): {:?}", b.len(), m.damage));
            *bytes = damage(b, &m.damage);
        }
    }
    if std::env::var_os("EXACTLY_FUZZ_DEBUG").is_some() {
        eprintln!("template {}, damaged: {damaged:#?}", input.template % 3);
    }
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("store");
    fs::create_dir(&dir).expect("mkdir");
    for (name, bytes) in &files {
        if let Some(b) = bytes {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(path, b).expect("write file");
        }
    }

    let Some(store) = ok_or_typed(Store::open(&dir, options()), "open") else {
        return;
    };
    for p in 0..PARTITIONS {
        if ok_or_typed(store.assign(&part(p)), "assign").is_none() {
            continue;
        }
        let offset = store
            .committed_offset(&part(p))
            .expect("offset of an assigned partition");
        let survived = offset.map_or(0, |o| o / OFFSET_STEP);
        if let Some(o) = offset {
            assert!(
                o % OFFSET_STEP == 0 && (1..=BATCHES).contains(&survived),
                "partition {p}: offset {o} was never committed"
            );
        }
        assert_eq!(
            survived, BATCHES,
            "partition {p}: a synced offset was lost; damaged: {damaged:?}"
        );
        let marked: BTreeSet<Vec<u8>> = (1..=survived)
            .flat_map(|b| (0..KEYS_PER_BATCH).map(move |j| key(p, b, j)))
            .collect();
        for b in 1..=BATCHES + 1 {
            for j in 0..KEYS_PER_BATCH {
                let k = key(p, b, j);
                let Some(v) = ok_or_typed(store.check(&part(p), &k), "check") else {
                    continue;
                };
                let expected = if marked.contains(&k) {
                    Verdict::Duplicate
                } else {
                    Verdict::New
                };
                assert_eq!(
                    v,
                    expected,
                    "partition {p}, {} with offset {offset:?}; damaged: {damaged:?}",
                    String::from_utf8_lossy(&k)
                );
            }
        }
    }
    drop(store);
}

fuzz_target!(|input: Input| {
    run(&input);
});
