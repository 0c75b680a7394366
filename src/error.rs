//! The one error type of the crate.

use std::path::PathBuf;

use crate::Partition;

/// Everything that can go wrong in a store operation.
///
/// Every variant says what went wrong and what to do about it. An operation
/// that returns an error has changed nothing, unless the variant says otherwise
/// (only [`Error::Storage`] and [`Error::Io`] can leave a write's outcome unknown,
/// and even then a batch is either wholly applied or not at all).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option is out of its allowed range. Fix the value named in the message.
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// The store was created with a different value of an option that is fixed
    /// at creation. Open it with the stored value, or create a new store.
    #[error("option `{option}` is fixed at creation: the store has {stored}, the options ask for {requested}")]
    IncompatibleOptions {
        /// The option's name.
        option: &'static str,
        /// The value the store was created with.
        stored: String,
        /// The value the caller asked for.
        requested: String,
    },

    /// The directory exists and holds files, but it is not a store of this crate.
    /// Point the store at an empty or missing directory, or at an existing store.
    #[error("{} is not an exactly store (no valid store manifest in a non-empty directory)", path.display())]
    NotAStore {
        /// The directory that was given.
        path: PathBuf,
    },

    /// The store was written by a newer on-disk format than this version of the
    /// crate understands. Upgrade the crate.
    #[error("store format version {found} is newer than the supported version {supported}; upgrade exactly")]
    UnsupportedFormat {
        /// The version found on disk.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// Files of the store are damaged. Restore the directory from a backup or
    /// delete it; the message names what was found.
    #[error("store is corrupt: {0}")]
    Corruption(String),

    /// Another process (or another `Store` in this process) holds the store open.
    /// Close that one first; two writers on one store are never allowed.
    #[error("store at {} is already open in another process or another Store handle", path.display())]
    Locked {
        /// The store's directory.
        path: PathBuf,
    },

    /// The partition is not assigned to this store. Call `Store::assign` first
    /// (the consumer group assigns partitions on rebalance).
    #[error("partition {0} is not assigned")]
    NotAssigned(Partition),

    /// The partition's topic name or number is not valid for Kafka.
    #[error("invalid partition {partition}: {reason}")]
    InvalidPartition {
        /// The partition as given.
        partition: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An empty key cannot identify a message.
    #[error("key is empty; every message needs a non-empty idempotency key")]
    EmptyKey,

    /// The key is longer than `Options::max_key_len`. Raise the limit or use a
    /// shorter idempotency key (or `KeyMode::Hashed`).
    #[error("key is {len} bytes, longer than max_key_len = {max}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The configured limit.
        max: usize,
    },

    /// A consumer offset must be zero or positive.
    #[error("offset {0} is negative; Kafka offsets start at 0")]
    InvalidOffset(i64),

    /// The batch's offset is lower than the partition's committed offset.
    /// Offsets only move forward; to rewind on purpose, delete the partition.
    #[error("offset {requested} is behind the committed offset {committed} of {partition}")]
    OffsetRegression {
        /// The partition.
        partition: Partition,
        /// The offset already committed.
        committed: i64,
        /// The offset the batch tried to commit.
        requested: i64,
    },

    /// This thread holds an open `Batch` on the partition, and the call would
    /// wait for that batch forever. Commit or drop the batch first.
    #[error("this thread holds an open batch on {0}; commit or drop it first")]
    BatchInProgress(Partition),

    /// The write comes from an epoch other than the partition's current one:
    /// the partition was reassigned (a newer consumer-group generation) and
    /// this writer is a zombie. Nothing was written; stop processing the
    /// partition.
    #[error("{partition} is at epoch {current}; a write under epoch {attempted} is fenced off")]
    Fenced {
        /// The partition.
        partition: Partition,
        /// The partition's epoch.
        current: u64,
        /// The epoch the write was made under.
        attempted: u64,
    },

    /// A sequence number of an epoch older than its source's (sequence
    /// mode): it comes from a producer instance that a newer one replaced
    /// (Kafka's broker refuses such a write with `INVALID_PRODUCER_EPOCH`).
    /// Nothing was written; skip the message, or raise the source's epoch
    /// if the producer really restarted with a lower one.
    #[error("sequence source {} on {partition} is at epoch {current}; a number of epoch {attempted} is fenced", source_id.escape_ascii())]
    SourceFenced {
        /// The partition.
        partition: Partition,
        /// The source.
        source_id: Vec<u8>,
        /// The source's epoch.
        current: u64,
        /// The epoch of the refused number.
        attempted: u64,
    },

    /// The claim is no longer held: it was released, or its lease ran out and
    /// another processor claimed the key. Nothing was written; the other
    /// processor owns the key now.
    #[error("claim on {partition} was lost (released, or taken over after its lease ran out)")]
    ClaimLost {
        /// The partition.
        partition: Partition,
    },

    /// An outgoing record was staged in a batch that publishes nothing: only
    /// the Kafka changelog loop's batches have an outbox. Nothing was staged.
    #[error("a batch on {0} has no outbox: records can be staged only in a batch the Kafka changelog loop publishes")]
    NoOutbox(Partition),

    /// A changelog record cannot be applied: it is not something this crate
    /// wrote, or it was written by a store with another key mode. Nothing of
    /// the restore batch was applied.
    #[error("changelog record of {partition} is malformed: {reason}")]
    BadChangelogRecord {
        /// The partition being restored.
        partition: Partition,
        /// What is wrong with it.
        reason: String,
    },

    /// The partition is assigned to this store, and the operation (an
    /// import, an inspection tool's write) needs it unassigned. Revoke it
    /// first; nothing was changed.
    #[error("partition {0} is assigned; revoke it first")]
    Assigned(Partition),

    /// A file given to import is not a valid export: damaged, cut short, of
    /// a newer export format, or not an export at all. Nothing was imported.
    #[error("{} is not a valid export: {reason}", path.display())]
    BadExport {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// RocksDB reported an error. The operation may not have been applied; a
    /// batch is never half-applied.
    #[error("storage error: {0}")]
    Storage(String),

    /// A file-system operation on the store's own files failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Classifies a RocksDB error: corruption and lock errors get their own variants.
    pub(crate) fn storage(err: rocksdb::Error, path: &std::path::Path) -> Self {
        let message = err.into_string();
        if message.starts_with("Corruption") {
            Self::Corruption(message)
        } else if message.contains("/LOCK") || message.contains("lock hold by current process") {
            Self::Locked {
                path: path.to_path_buf(),
            }
        } else {
            Self::Storage(message)
        }
    }
}
