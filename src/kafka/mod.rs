//! Kafka integration (feature `kafka`): a rebalance-aware consumer context
//! and an idempotent poll loop over [`rdkafka`]'s synchronous `BaseConsumer`.
//!
//! * [`GroupStore`] wraps the [`Store`](crate::Store) shared by the consumers of one
//!   consumer group in this process (one or several consumer threads), and
//!   records which consumer owns which partition's shard.
//! * [`DedupContext`] is the consumer's rdkafka context. On assignment it
//!   assigns the partitions' shards and positions each partition at its
//!   resume point (see [`resume_offset`]); on revocation it hands the
//!   partitions over (the store's offsets are committed to Kafka,
//!   synchronously) and revokes the shards.
//! * [`IdempotentConsumer`] runs the poll loop: per poll batch and
//!   partition, it checks each message's idempotency key, calls the handler
//!   for new ones only, commits the marks and the offset in one store batch,
//!   and then commits the offsets to Kafka (asynchronously by default).
//!   Kafka commits always follow the store commit.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use exactly::kafka::{DedupContext, GroupStore, IdempotentConsumer, KeySource};
//! use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
//! use exactly::kafka::rdkafka::ClientConfig;
//! use exactly::{Options, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let group = GroupStore::new(Arc::new(Store::open("./dedup", Options::default())?));
//! let consumer: BaseConsumer<DedupContext> = ClientConfig::new()
//!     .set("bootstrap.servers", "localhost:9092")
//!     .set("group.id", "orders-service")
//!     .set("enable.auto.commit", "false")
//!     .create_with_context(DedupContext::new(&group))?;
//! consumer.subscribe(&["orders"])?;
//! let mut consumer = IdempotentConsumer::new(consumer, KeySource::header("idempotency-key"));
//! loop {
//!     consumer.poll_batch(Duration::from_secs(1), |_message, key| {
//!         // Apply the side effect; pass `key` downstream where possible.
//!         let _ = key;
//!         Ok::<(), std::io::Error>(())
//!     })?;
//! }
//! # }
//! ```
//!
//! See `docs/kafka.md` for the resume-point rule, rebalances, deployment
//! shapes and the remaining windows.
//!
//! One file per concept: `group` (the shared store and who owns which
//! shard), `context` (the rebalance callbacks and the resume rule), `keys`
//! (where a message's key comes from), `consumer` (the poll loop),
//! `async_loop` (the same loop with async handlers, feature `tokio`),
//! `claimed` (its claim mode), `poll` (what the two share), `publish`,
//! `restore` and `changelog` (changelog mode), `metrics` (what the loops
//! report to the `metrics` facade) and `error`. Dependencies
//! point one way: async_loop → claimed → consumer → publish → restore, changelog;
//! consumer → context → group; both loops → poll.

#[cfg(feature = "tokio")]
mod async_loop;
mod changelog;
mod claimed;
mod consumer;
mod context;
mod error;
mod group;
mod handle;
mod keys;
mod metrics;
mod poll;
mod publish;
mod restore;

/// The rdkafka crate this module is built against, so that applications use
/// the same version.
pub use rdkafka;

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use async_loop::AsyncIdempotentConsumer;
pub use changelog::{
    changelog_topic, Changelog, Deliveries, ProgressFn, RestoreProgress, PROGRESS_KEY,
    RELEASE_HEADER,
};
pub use claimed::Delivery;
pub use consumer::{IdempotentConsumer, KafkaCommit};
pub use context::{resume_offset, DedupConsumer, DedupContext};
pub use error::ConsumeError;
pub use group::GroupStore;
pub use keys::{KeyFn, KeySource, MissingKey, SequenceHeaders};
pub use poll::{PollReport, DEFAULT_CLAIM_LEASE, MIN_CLAIM_LEASE};
