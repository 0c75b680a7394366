//! Opening a store directory: creating or checking its manifest, locking it,
//! and checking RocksDB's files before and after RocksDB recovers them (the
//! write-ahead log pre-flight in [`crate::wal`] and the durability ledger in
//! [`crate::ledger`]); and the RocksDB options the store runs with.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, DBCompressionType, DBRecoveryMode};
use tracing::{info, warn};

use crate::clock::TimeKeeper;
use crate::config::Options;
use crate::durable::sync_dir;
use crate::error::{Error, Result};
use crate::ledger::{Ledger, LEDGER_FILE};
use crate::manifest::{Manifest, FORMAT_VERSION, MANIFEST_FILE};
use crate::ttl::{install_compaction_filter, CfShared};
use crate::wal::CutTail;

/// An open, locked store directory whose manifest matches the options.
pub(crate) struct Prepared {
    pub(crate) manifest: Manifest,
    /// Held (`flock`) for as long as the store is open.
    pub(crate) lock: fs::File,
}

/// Makes sure `path` is a store directory with a manifest, creating both if
/// the directory is missing or empty; locks it; and checks the manifest
/// against the options.
pub(crate) fn prepare_dir(path: &Path, options: &Options) -> Result<Prepared> {
    let not_a_store = || Error::NotAStore {
        path: path.to_path_buf(),
    };
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Err(e) => return Err(Error::io(path, e)),
        Ok(m) if !m.is_dir() => return Err(not_a_store()),
        Ok(_) => {}
    }
    let lock = lock_dir(path)?;
    let manifest = match Manifest::read(path)? {
        Some(m) => {
            if m.key_mode != options.key_mode {
                return Err(Error::IncompatibleOptions {
                    option: "key_mode",
                    stored: format!("{:?}", m.key_mode),
                    requested: format!("{:?}", options.key_mode),
                });
            }
            if m.time_domain != options.time_domain {
                return Err(Error::IncompatibleOptions {
                    option: "time_domain",
                    stored: format!("{:?}", m.time_domain),
                    requested: format!("{:?}", options.time_domain),
                });
            }
            m
        }
        None => {
            // Empty, or left by a creation that stopped before its manifest.
            let mut leftovers = Vec::new();
            for entry in fs::read_dir(path).map_err(|e| Error::io(path, e))? {
                let name = entry.map_err(|e| Error::io(path, e))?.file_name();
                let name = name.to_string_lossy();
                let ledger_tmp = format!("{LEDGER_FILE}.tmp");
                let manifest_tmp = format!("{MANIFEST_FILE}.tmp");
                if ![LEDGER_FILE, &ledger_tmp, &manifest_tmp].contains(&name.as_ref()) {
                    return Err(not_a_store());
                }
                leftovers.push(name.into_owned());
            }
            if leftovers.is_empty() {
                info!("creating a new store");
            } else {
                warn!(
                    leftovers = ?leftovers,
                    "completing a creation that stopped before its manifest"
                );
            }
            // The ledger first: a manifest that requires it is never alone.
            Ledger::default().write(path)?;
            let m = Manifest {
                format_version: FORMAT_VERSION,
                key_mode: options.key_mode,
                time_domain: options.time_domain,
                ledger_required: true,
                claim_grace_ms: Some(options.ttl_millis()),
            };
            m.write(path)?;
            m
        }
    };
    Ok(Prepared { manifest, lock })
}

/// Takes an exclusive `flock` on the directory itself, so a second `Store`,
/// in this process or another, is refused before it reads anything. Where
/// the platform or file system has no such lock, RocksDB's `LOCK` file still
/// refuses a second writer, at `DB::open`.
fn lock_dir(path: &Path) -> Result<fs::File> {
    let dir = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => Ok(dir),
        Err(fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

/// Checks RocksDB's files before it opens them: the `MANIFEST` against the
/// ledger, and every write-ahead log for damage that would hang recovery
/// (cutting a torn tail of the newest log: [`crate::wal::cut_torn_tail`]).
/// Returns the ledger (a default one for a store from before ledgers) and
/// the tail cut, if any.
pub(crate) fn check_before_open(
    path: &Path,
    manifest: &Manifest,
) -> Result<(Ledger, Option<CutTail>)> {
    let ledger = match Ledger::read(path)? {
        Some(ledger) => ledger,
        None if manifest.ledger_required => {
            return Err(Error::Corruption(format!(
                "{LEDGER_FILE} is missing; without it damage to RocksDB's files cannot be \
                 told from a clean state. Restore the store directory from a copy"
            )))
        }
        None => Ledger::default(),
    };
    ledger.check_manifest(path)?;
    let cut = crate::wal::cut_torn_tail(path, ledger.sequence)?;
    Ok((ledger, cut))
}

/// Checks what RocksDB recovered against the ledger (naming the tail that
/// [`check_before_open`] cut, if the check fails), then records the
/// recovered state as durable (and upgrades the manifest of a store from
/// before ledgers, claim graces or journal records: it requires a ledger
/// from now on, keeps `claim_grace_ms`, the grace in force until now, and
/// takes the current format version, which builds that do not know journal
/// records refuse).
pub(crate) fn check_after_open(
    path: &Path,
    manifest: &Manifest,
    ledger: Ledger,
    cut: Option<&CutTail>,
    recovered_sequence: u64,
    clock: u64,
    claim_grace_ms: u64,
) -> Result<Ledger> {
    ledger
        .check_sequence(recovered_sequence)
        .map_err(|e| match (e, cut) {
            (Error::Corruption(message), Some(cut)) => {
                Error::Corruption(format!("{message} ({cut})"))
            }
            (e, _) => e,
        })?;
    // The sequence floor only rises at `sync()` and `close()`, after a log
    // fsync: what recovery replayed may have come from logs the previous
    // process never fsynced. The new MANIFEST is recorded now.
    let next = ledger.durable_now(path, ledger.sequence, clock);
    if next != ledger || !manifest.ledger_required {
        next.write(path)?;
    }
    if !manifest.ledger_required
        || manifest.claim_grace_ms.is_none()
        || manifest.format_version < FORMAT_VERSION
    {
        info!(
            ledger_added = !manifest.ledger_required,
            claim_grace_ms,
            from_format = manifest.format_version,
            format = FORMAT_VERSION,
            "manifest upgraded: a ledger is required, the claim grace recorded, the format the current one"
        );
        Manifest {
            format_version: FORMAT_VERSION,
            ledger_required: true,
            claim_grace_ms: Some(claim_grace_ms),
            ..*manifest
        }
        .write(path)?;
    }
    Ok(next)
}

/// Whether the directory holds RocksDB data files (tables or logs).
pub(crate) fn has_rocksdb_data(path: &Path) -> Result<bool> {
    for entry in fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let name = entry.map_err(|e| Error::io(path, e))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".sst") || name.ends_with(".log") {
            return Ok(true);
        }
    }
    Ok(false)
}

pub(crate) fn db_options() -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    o.set_paranoid_checks(true);
    o.set_keep_log_file_num(4);
    o.set_max_total_wal_size(256 << 20);
    // The durability ledger hashes the live MANIFEST at every sync: keep it
    // small (RocksDB starts a new one, a snapshot of the current state, past
    // this size; the default is 1 GiB).
    o.set_max_manifest_file_size(4 << 20);
    o.increase_parallelism(2);
    o
}

/// How a partition's table files are built: LZ4 blocks and a whole-key
/// Bloom filter per file. Shared by the column families and the tables
/// the store writes itself (`src/engine/tables.rs`), so both read alike.
pub(crate) fn table_file_options() -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.set_compression_type(DBCompressionType::Lz4);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    o.set_block_based_table_factory(&table);
    o
}

pub(crate) fn partition_cf_options(
    time: Arc<TimeKeeper>,
    options: &Options,
    claim_grace_ms: u64,
    shared: Arc<CfShared>,
    cf_name: &str,
) -> rocksdb::Options {
    let mut o = table_file_options();
    // Small memtables: a mark is a random key, and the skiplist insert is most
    // of a batch's cost; its depth grows with the memtable. Measured with the
    // comparison harness (2 M messages): 64 MiB ~2 000 ns/msg, 4 MiB ~1 400.
    o.set_write_buffer_size(4 << 20);
    // Universal compaction: marks are random keys with no locality, so
    // leveled compaction rewrites each one once per level as the store
    // grows. Measured with `examples/scale` (100 M keys, one consumer, run
    // by run on the same machine): the million messages at 100 M keys stored
    // cost 1.64x those at 1 M (1 630 against 997 ns/msg) against 1.89x for
    // leveled (1 851 against 979), with 14 % less CPU. Expired marks are
    // still dropped: universal compaction merges every sorted run once the
    // size amplification passes its bound, and `compact` is a full merge.
    o.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
    install_compaction_filter(
        &mut o,
        time,
        options.time_domain,
        claim_grace_ms,
        shared,
        cf_name,
    );
    o
}
