//! Power cuts: what survives when the page cache is lost.
//!
//! The fuzzer picks a run of batches (marks plus an offset) on two
//! partitions, with `sync()` points and compactions, and then one or more
//! power cuts. At every point the harness knows which bytes are durable:
//!
//! * at each `sync()` and compaction (which writes the partition's changes
//!   held in memory as a table and fsyncs the log), and with
//!   `Durability::Sync` after each commit, it records the length of every
//!   file of the store;
//! * RocksDB fsyncs its own table files, `MANIFEST`, `OPTIONS` and `CURRENT`
//!   before it relies on them, and syncs a write-ahead log it has switched
//!   away from before the flush that made the switch is recorded; so only the
//!   newest write-ahead log (`*.log`) holds bytes that may not be durable.
//!
//! A cut copies the directory while the store is open (the files as the page
//! cache has them), abandons the store, and truncates the newest log of the
//! copy to a fuzzer-chosen length between its synced length and its current
//! length, optionally garbling the unsynced bytes that remain (garbage that
//! would trap RocksDB's log reader included: `open` cuts the log there). Then
//! the copy must open, and:
//!
//! * every batch acknowledged before the last sync point is there (marks and
//!   offset);
//! * the store holds exactly the marks of the batches up to its offset: no
//!   half-applied batch, and no `Duplicate` for a key that no surviving batch
//!   marked;
//! * the local outbox (each batch records its changes there, as the Kafka
//!   changelog loop's do, and some batches publish the outbox after their
//!   commit) holds, intact, the surviving batches from the first one not
//!   published: a surviving batch's entry is never lost, and a publication
//!   made before the last sync point never comes back (one after it may:
//!   the loop then gives the entries up, as the changelog already has them).
//!
//! The run then goes on from the survivor, which may be cut again.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use arbitrary::Arbitrary;
use exactly::internals::outbox;
use exactly::{Durability, ManualClock, Options, Partition, Store, Verdict};
use exactly_fuzz::{copy_dir, file_lengths, newest_wal};
use libfuzzer_sys::fuzz_target;

const PARTITIONS: u8 = 2;
const KEYS: u8 = 8;
const MAX_STEPS: usize = 40;
const MAX_CUTS: usize = 3;
const MAX_BATCH: usize = 6;

#[derive(Debug, Arbitrary)]
enum Step {
    /// A batch; with `publish`, the outbox is published after it.
    Batch {
        p: u8,
        keys: Vec<u8>,
        publish: bool,
    },
    Sync,
    Compact(u8),
    Cut(Cut),
}

/// How the unsynced tail of the newest log ends up after the cut.
#[derive(Debug, Clone, Arbitrary)]
struct Cut {
    /// Where to cut between the synced length (0) and the current length
    /// (`u16::MAX`).
    keep: u16,
    /// Bytes written over the kept unsynced tail, at an offset into it.
    garble: Option<(u16, Vec<u8>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// `Durability::Sync` instead of `Buffered`: every commit is a sync point.
    sync_every_write: bool,
    steps: Vec<Step>,
    last_cut: Cut,
}

fn part(p: u8) -> Partition {
    Partition::new("t", i32::from(p))
}

fn key(k: u8) -> [u8; 2] {
    [b'k', b'a' + k]
}

struct Run {
    root: tempfile::TempDir,
    generation: usize,
    clock: ManualClock,
    durability: Durability,
    store: Option<Store>,
    /// Per partition, the keys of each committed batch; batch `i` (0-based)
    /// committed offset `i + 1`.
    batches: BTreeMap<u8, Vec<BTreeSet<u8>>>,
    /// Per partition, how many batches were acknowledged before the last sync
    /// point: these must survive any cut.
    durable: BTreeMap<u8, usize>,
    /// Per partition, how many batches' outbox entries were published, and
    /// how many before the last sync point.
    published: BTreeMap<u8, usize>,
    durable_published: BTreeMap<u8, usize>,
    /// File lengths at the last sync point.
    synced: BTreeMap<String, u64>,
}

impl Run {
    fn dir(&self) -> PathBuf {
        self.root.path().join(format!("store-{}", self.generation))
    }

    fn options(&self) -> Options {
        Options::default()
            .ttl(Duration::from_secs(24 * 3600))
            .expected_keys_per_partition(4)
            .bloom_fp_rate(0.5)
            .durability(self.durability)
            .clock(self.clock.clone())
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store")
    }

    fn marked(&self, p: u8) -> BTreeSet<u8> {
        self.batches[&p].iter().flatten().copied().collect()
    }

    /// Records the current file lengths as durable, and every batch so far.
    fn sync_point(&mut self) {
        self.synced = file_lengths(&self.dir()).expect("file lengths");
        for (p, b) in &self.batches {
            self.durable.insert(*p, b.len());
        }
        self.durable_published = self.published.clone();
    }

    fn open(&mut self) {
        let store = Store::open(self.dir(), self.options()).expect("open after a power cut");
        for p in 0..PARTITIONS {
            store.assign(&part(p)).expect("assign after a power cut");
        }
        self.store = Some(store);
        // A freshly opened store appends to a new log; nothing of it is
        // known to be durable yet.
        self.synced = BTreeMap::new();
    }

    fn batch(&mut self, p: u8, keys: &[u8], publish: bool) {
        let p = p % PARTITIONS;
        let marked = self.marked(p);
        let offset = i64::try_from(self.batches[&p].len() + 1).expect("offset");
        let mut staged = BTreeSet::new();
        let mut b = self.store().batch(&part(p)).expect("batch");
        outbox::record_changes(&mut b, offset - 1);
        for &k in keys.iter().take(MAX_BATCH) {
            let k = k % KEYS;
            let expected = if marked.contains(&k) || !staged.insert(k) {
                Verdict::Duplicate
            } else {
                Verdict::New
            };
            assert_eq!(b.check_and_mark(&key(k)).expect("mark"), expected);
        }
        b.set_offset(offset);
        let entry = outbox::commit(b).expect("commit").expect("an outbox entry");
        assert_eq!((entry.start, entry.next), (offset - 1, offset), "{entry:?}");
        assert_eq!(entry.changed.len(), staged.len(), "{entry:?}");
        self.batches.get_mut(&p).expect("partition").push(staged);
        if publish {
            outbox::complete(self.store(), &part(p), entry.seq).expect("publish");
            self.published.insert(p, self.batches[&p].len());
        }
        if self.durability == Durability::Sync {
            self.sync_point();
        }
    }

    fn cut(&mut self, cut: &Cut) {
        let from = self.dir();
        self.generation += 1;
        let to = self.dir();
        // The files as the page cache holds them; then the power goes.
        copy_dir(&from, &to).expect("copy store");
        drop(self.store.take());
        std::fs::remove_dir_all(&from).expect("remove old store");

        let lengths = file_lengths(&to).expect("file lengths");
        if let Some(wal) = newest_wal(lengths.keys()) {
            let current = lengths[wal];
            let synced = self.synced.get(wal).copied().unwrap_or(0);
            assert!(current >= synced, "{wal} shrank below its synced length");
            let unsynced = current - synced;
            let keep = unsynced * u64::from(cut.keep) / u64::from(u16::MAX);
            let mut f = OpenOptions::new()
                .write(true)
                .open(to.join(wal))
                .expect("open log");
            f.set_len(synced + keep).expect("truncate log");
            if let Some((at, bytes)) = &cut.garble {
                if keep > 0 && !bytes.is_empty() {
                    let at = u64::from(*at) % keep;
                    let n = usize::try_from((keep - at).min(bytes.len() as u64)).expect("len");
                    f.seek(SeekFrom::Start(synced + at)).expect("seek");
                    f.write_all(&bytes[..n]).expect("garble");
                }
            }
        }

        self.open();
        self.verify();
    }

    /// After a cut: the durable batches are there, and the store holds exactly
    /// the batches up to its offset.
    fn verify(&mut self) {
        for p in 0..PARTITIONS {
            let s = self.store();
            let offset = s.committed_offset(&part(p)).expect("offset").unwrap_or(0);
            let survived = usize::try_from(offset).expect("offset");
            let durable = self.durable[&p];
            let committed = self.batches[&p].len();
            assert!(
                survived >= durable,
                "partition {p}: {durable} batches were synced, only {survived} survived"
            );
            assert!(
                survived <= committed,
                "partition {p}: offset {survived} beyond the {committed} committed batches"
            );
            self.batches
                .get_mut(&p)
                .expect("partition")
                .truncate(survived);
            let marked = self.marked(p);
            let s = self.store();
            for k in 0..KEYS {
                let expected = if marked.contains(&k) {
                    Verdict::Duplicate
                } else {
                    Verdict::New
                };
                assert_eq!(
                    s.check(&part(p), &key(k)).expect("check"),
                    expected,
                    "partition {p} key {k} after a cut to {survived} batches"
                );
            }
            let pending = outbox::pending(s, &part(p)).expect("outbox");
            let first = pending
                .first()
                .map_or(survived, |e| usize::try_from(e.start).expect("start"));
            let published = self.published[&p];
            assert!(
                first >= self.durable_published[&p],
                "partition {p}: the outbox is back to batch {first}, but {} batches \
                 were published before the last sync point",
                self.durable_published[&p]
            );
            assert!(
                first <= published || first == survived && survived <= published,
                "partition {p}: the outbox starts at batch {first}, {published} published, \
                 {survived} survived: an entry was lost"
            );
            let indices: Vec<usize> = pending
                .iter()
                .map(|e| usize::try_from(e.start).expect("start"))
                .collect();
            assert_eq!(
                indices,
                (first..survived).collect::<Vec<_>>(),
                "partition {p}"
            );
            for e in &pending {
                let i = usize::try_from(e.start).expect("start");
                assert_eq!(e.next, e.start + 1, "{e:?}");
                assert_eq!(e.changed.len(), self.batches[&p][i].len(), "{e:?}");
            }
            self.published.insert(p, first);
        }
    }
}

fn run(input: Input) {
    let mut run = Run {
        root: tempfile::tempdir().expect("tempdir"),
        generation: 0,
        clock: ManualClock::new(1_767_225_600_000),
        durability: if input.sync_every_write {
            Durability::Sync
        } else {
            Durability::Buffered
        },
        store: None,
        batches: (0..PARTITIONS).map(|p| (p, Vec::new())).collect(),
        durable: (0..PARTITIONS).map(|p| (p, 0)).collect(),
        published: (0..PARTITIONS).map(|p| (p, 0)).collect(),
        durable_published: (0..PARTITIONS).map(|p| (p, 0)).collect(),
        synced: BTreeMap::new(),
    };
    run.open();
    let mut cuts = 0;
    for step in input.steps.into_iter().take(MAX_STEPS) {
        match step {
            Step::Batch { p, keys, publish } => run.batch(p, &keys, publish),
            Step::Sync => {
                run.store().sync().expect("sync");
                run.sync_point();
            }
            Step::Compact(p) => {
                // A compaction writes the partition's changes in memory as a
                // table, fsyncing the log first, and fsyncs it in any case:
                // a sync point (a cut below it could lose journal records
                // whose table survived).
                run.store().compact(&part(p % PARTITIONS)).expect("compact");
                run.sync_point();
            }
            Step::Cut(cut) => {
                if cuts < MAX_CUTS {
                    cuts += 1;
                    run.cut(&cut);
                }
            }
        }
    }
    run.cut(&input.last_cut);
    drop(run.store.take());
}

fuzz_target!(|input: Input| {
    run(input);
});
