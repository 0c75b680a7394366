//! The poll loop's error.

use rdkafka::error::KafkaError;

use crate::{Error, Partition};

/// An error of the poll loop. After any error, the messages processed so
/// far are committed (store and Kafka) and the consumer is positioned at
/// the first message not processed, so calling
/// [`IdempotentConsumer::poll_batch`](super::IdempotentConsumer::poll_batch) again retries it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError<E> {
    /// The handler failed on a message.
    #[error("handler failed on {partition} at offset {offset}")]
    Handler {
        /// The message's partition.
        partition: Partition,
        /// The message's offset.
        offset: i64,
        /// The handler's error.
        #[source]
        source: E,
    },
    /// A message has no idempotency key the store can take (none, empty, or
    /// longer than the store's `max_key_len`) and the policy is
    /// [`MissingKey::Fail`](super::MissingKey::Fail).
    #[error(
        "message at {partition} offset {offset} has no usable idempotency key \
         (none, empty, or longer than the store's max_key_len)"
    )]
    MissingKey {
        /// The message's partition.
        partition: Partition,
        /// The message's offset.
        offset: i64,
    },
    /// The store failed (in the poll loop or in a rebalance callback).
    #[error(transparent)]
    Store(#[from] Error),
    /// Kafka failed: a rebalance could not be applied, or the consumer could
    /// not be repositioned after another error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The async loop (feature `tokio`) was called where it cannot run:
    /// outside a tokio runtime, or on the current-thread runtime. Nothing
    /// was polled; run it on the multi-threaded runtime.
    #[error("the async poll loop {reason}")]
    Runtime {
        /// What is wrong with the runtime.
        reason: &'static str,
    },
}
