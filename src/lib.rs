//! # exactly
//!
//! An embedded dedup store for exactly-once *processing* of Kafka messages.
//!
//! Exactly-once delivery ends at Kafka's boundary: a consumer that writes to a
//! database or calls an API and then crashes before committing its offset
//! will see the message again. The robust answer is consumer-side
//! idempotency: every message carries an idempotency key, and the consumer
//! asks "already processed?" before the side effect. This crate answers that
//! locally, in microseconds:
//!
//! - an in-memory **Bloom front** per partition answers most new keys without
//!   touching disk, and every positive is confirmed on disk, so a filter false
//!   positive never becomes a duplicate;
//! - **RocksDB** is the source of truth, with each mark's **TTL** enforced on
//!   read and by a compaction filter that drops expired marks;
//! - **shards per Kafka partition**, assigned and revoked with the consumer
//!   group, each with its own filter and its own **consumer offset**;
//! - a poll batch's marks and offset land in **one atomic write**.
//!
//! ```
//! use std::time::Duration;
//! use exactly::{Options, Partition, Store, Verdict};
//!
//! # fn main() -> exactly::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), Options::default().ttl(Duration::from_secs(7 * 24 * 3600)))?;
//! let p = Partition::new("orders", 3);
//! store.assign(&p)?;
//!
//! let polled: Vec<(i64, &[u8])> = vec![(10, b"k1"), (11, b"k2"), (12, b"k1")];
//! let mut processed = 0;
//! let mut batch = store.batch(&p)?;
//! for (_, key) in &polled {
//!     if batch.check_and_mark(key)? == Verdict::New {
//!         processed += 1; // apply the side effect here
//!     }
//! }
//! batch.set_offset(polled.last().map_or(0, |(o, _)| o + 1));
//! batch.commit()?;
//! assert_eq!(processed, 2);
//! assert_eq!(store.committed_offset(&p)?, Some(13));
//! # Ok(()) }
//! ```
//!
//! See `docs/design.md` for the on-disk format and the invariants.
//!
//! # Features
//!
//! - `kafka`: the [`kafka`][kafka-module] module, a rebalance-aware consumer
//!   context and an idempotent poll loop over rdkafka (librdkafka is built
//!   from source). Its documentation opens with a complete consumer.
//! - `tokio` (with `kafka`): `kafka::AsyncIdempotentConsumer`, the same
//!   poll loop with async handlers, on tokio's multi-threaded runtime.
//! - `cli`: the `exactly` command-line tool, for operating a store; it adds
//!   nothing to the library.
//!
//! ```text
//! cargo install exactly --features cli
//! exactly stats ./dedup                    # per partition: offset, epoch, live marks, filter, disk
//! exactly check ./dedup orders 3 order-17  # New, Duplicate or InFlight, with the expiry
//! exactly verify ./dedup                   # exit status 0 only when the store is healthy
//! ```
#![cfg_attr(feature = "kafka", doc = "[kafka-module]: crate::kafka")]
#![cfg_attr(
    not(feature = "kafka"),
    doc = "[kafka-module]: https://docs.rs/exactly/latest/exactly/kafka/"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(missing_docs, clippy::unwrap_used)]
// Bad input must give a typed error, never a panic: no unchecked indexing
// or slicing, and no silently truncating casts, outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::cast_possible_truncation)
)]

mod batch;
mod bloom;
mod claim;
mod clock;
mod config;
mod durable;
mod engine;
mod error;
mod inspect;
mod journal;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
mod layout;
mod ledger;
mod manifest;
mod membership;
mod outbox;
mod outbox_probe;
mod partition;
mod pending;
mod recovery;
mod sequence;
mod shard;
mod snapshot;
mod stats;
mod store;
mod transfer;
mod ttl;
mod verdict;
mod verify;
mod wal;

pub use batch::Batch;
pub use claim::{Claim, ClaimToken};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Durability, KeyMode, Options, TimeDomain, TtlRefresh, MAX_KEY_LEN_LIMIT};
pub use error::{Error, Result};
pub use outbox::OutboxRecord;
pub use partition::Partition;
pub use stats::{PartitionStats, Stats};
pub use store::Store;
pub use verdict::Verdict;

/// Internals exposed for the crate's own benchmarks and fuzz targets. Not part
/// of the stable API: anything here may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::bloom::ExpiringFilter;

    /// Looking inside a store without assigning its partitions (the
    /// `exactly` command-line tool).
    pub mod inspect {
        pub use crate::inspect::*;
    }

    /// Export and import of a partition (`exactly export`, `exactly import`).
    pub mod transfer {
        pub use crate::transfer::*;
    }

    /// The health check (`exactly verify`).
    pub mod verify {
        pub use crate::verify::*;
    }

    /// The local outbox driven without Kafka (fuzz targets, crash trials).
    pub mod outbox {
        pub use crate::outbox_probe::*;
    }

    /// The background writer of tables (fuzz targets that copy an open
    /// store's files, as a crash would leave them).
    pub mod tables {
        /// Waits until the background thread has written every table asked
        /// of it so far, so that the store's files change only through the
        /// caller's own calls (and RocksDB's own background work) while it
        /// copies them.
        pub fn wait_idle(store: &crate::Store) {
            store.engine().wait_tables();
        }
    }
}
