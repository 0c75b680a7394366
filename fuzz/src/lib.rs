//! Helpers shared by the fuzz targets: copying a store directory and
//! looking at its files.

pub mod sequence_input;
pub mod sequence_model;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// Copies every regular file of directory `from` into a new directory `to`
/// as one consistent snapshot, as a power cut or a crash would leave it: if
/// RocksDB's background work (a flush or compaction installing or deleting
/// files) changed the directory while the copy ran, the copy is made again.
/// Subdirectories (the filter snapshots in `filters/`) are copied too: a
/// crash or power cut leaves them, and a restarted store must judge whether
/// to trust them.
pub fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    for _ in 0..100 {
        match copy_once(from, to) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // libFuzzer's timeout alarm can interrupt a copy: try again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(io::Error::other(
        "the store directory kept changing during the copy",
    ))
}

/// One attempt: whether the directory stayed the same while it was copied.
fn copy_once(from: &Path, to: &Path) -> io::Result<bool> {
    let before = tree_lengths(from)?;
    if to.exists() {
        fs::remove_dir_all(to)?;
    }
    fs::create_dir_all(to)?;
    for name in before.keys() {
        if let Some(parent) = to.join(name).parent() {
            fs::create_dir_all(parent)?;
        }
        match fs::copy(from.join(name), to.join(name)) {
            Ok(_) => {}
            // Deleted meanwhile: the listing below differs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(tree_lengths(from)? == before)
}

/// [`file_lengths`] of `dir` and of its subdirectories, by path relative to
/// `dir` (`filters/<name>.snap`).
fn tree_lengths(dir: &Path) -> io::Result<BTreeMap<String, u64>> {
    let mut lengths = file_lengths(dir)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = match entry.file_type() {
            Ok(t) => t.is_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if is_dir {
            let sub = entry.file_name().to_string_lossy().into_owned();
            let inner = match tree_lengths(&entry.path()) {
                Ok(inner) => inner,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for (name, len) in inner {
                lengths.insert(format!("{sub}/{name}"), len);
            }
        }
    }
    Ok(lengths)
}

/// The length of every regular file in `dir`, by name. A file RocksDB
/// deletes while the listing runs is left out, as if deleted just before.
pub fn file_lengths(dir: &Path) -> io::Result<BTreeMap<String, u64>> {
    let mut lengths = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if metadata.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            lengths.insert(name, metadata.len());
        }
    }
    Ok(lengths)
}

/// The number of a RocksDB write-ahead log file (`000012.log`), if `name`
/// is one.
pub fn wal_number(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

/// The name of the newest write-ahead log among `names`: the one RocksDB
/// still appends to. Older logs were synced by RocksDB when it switched to
/// a newer one (before the flush that made the switch is recorded).
pub fn newest_wal<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<&'a String> {
    names
        .into_iter()
        .filter_map(|n| wal_number(n).map(|w| (w, n)))
        .max()
        .map(|(_, n)| n)
}

/// The store's time recorded in the ledger of the store in `dir` (0 if it
/// has none yet): a restarted store's time starts there.
pub fn recorded_time(dir: &Path) -> u64 {
    let Ok(text) = fs::read_to_string(dir.join("EXACTLY-LEDGER")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("clock = "))
        .map(|v| v.parse().expect("ledger clock"))
        .expect("ledger has a clock")
}

/// The store directories of one run: a crash opens a copy, the next
/// generation.
pub struct Dirs {
    /// Where the generations live.
    pub root: tempfile::TempDir,
    /// The generation in use.
    pub generation: usize,
}

impl Dirs {
    /// The directory of the generation in use.
    pub fn current(&self) -> std::path::PathBuf {
        self.root.path().join(format!("store-{}", self.generation))
    }
}
