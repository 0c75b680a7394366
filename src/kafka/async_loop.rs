//! The idempotent poll loop for async applications (feature `tokio`): the
//! same loop, with async handlers.
//!
//! Why not a second loop over rdkafka's `StreamConsumer`: the loop's
//! guarantees come from holding a partition's store batch (its write lock)
//! from a message's check through its handler to its mark, and from the
//! rebalance callbacks, which assign and revoke shards (reading marks from
//! disk to rebuild a filter, saving a snapshot: seconds for millions of
//! marks). A `StreamConsumer` serves those callbacks in whichever task polls
//! it, on a runtime worker, and a batch held across an `.await` would tie
//! the lock to a task the runtime may move or park. So each poll batch runs
//! the synchronous loop inside [`tokio::task::block_in_place`] (the worker
//! hands its other tasks to the runtime's other workers first, so nothing
//! else waits on the disk or the broker), and each handler future is driven
//! to completion there with [`Handle::block_on`]: its I/O and timers use
//! the runtime's drivers. Every mode of the synchronous loop (local,
//! changelog, claim, outbox records) is the same code, so every guarantee
//! is the same.

use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::consumer::IdempotentConsumer;
use super::error::ConsumeError;
use super::poll::PollReport;
use super::Delivery;
use crate::Batch;

/// [`IdempotentConsumer`] for async applications: the same poll loop (every
/// mode, every guarantee), with a handler that returns a future.
///
/// Needs tokio's multi-threaded runtime (the default of `#[tokio::main]`):
/// a poll batch runs in [`tokio::task::block_in_place`], which the
/// current-thread runtime does not allow; there each call returns
/// [`ConsumeError::Runtime`] and touches nothing. Handlers run one at a
/// time, in message order, as in the synchronous loop.
///
/// What running the batch in `block_in_place` means for the caller:
///
/// - **The calling task is blocked for the whole batch.** A handler must
///   not wait for something that only the calling task drives: a future
///   joined or selected with `poll_batch` in the same task never runs, and
///   the handler waits forever. Spawn such work as a task of its own.
/// - **The future cannot be cancelled.** The batch runs in its first poll,
///   so `tokio::time::timeout` or `select!` around `poll_batch` take effect
///   only once the batch is done (nothing is left half-done either). Put
///   deadlines inside the handler.
/// - **A handler that panics** unwinds through `poll_batch`; the consumer
///   is first put back at the first message of each partition whose batch
///   was not committed, so a caller that catches the panic (a task's
///   `JoinError`) and polls again loses nothing.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use exactly::kafka::{AsyncIdempotentConsumer, DedupContext, GroupStore, IdempotentConsumer, KeySource};
/// use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
/// use exactly::kafka::rdkafka::message::Message;
/// use exactly::kafka::rdkafka::ClientConfig;
/// use exactly::{Options, Store};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let group = GroupStore::new(Arc::new(Store::open("./dedup", Options::default())?));
/// let consumer: BaseConsumer<DedupContext> = ClientConfig::new()
///     .set("bootstrap.servers", "localhost:9092")
///     .set("group.id", "orders-service")
///     .set("enable.auto.commit", "false")
///     .create_with_context(DedupContext::new(&group))?;
/// consumer.subscribe(&["orders"])?;
/// let mut consumer = AsyncIdempotentConsumer::new(IdempotentConsumer::new(
///     consumer,
///     KeySource::header("idempotency-key"),
/// ));
/// loop {
///     consumer
///         .poll_batch(Duration::from_secs(1), |message, key| async move {
///             // Apply the side effect (an HTTP call, a database write),
///             // passing `key` downstream where possible.
///             let _ = (message.payload(), key);
///             Ok::<(), std::io::Error>(())
///         })
///         .await?;
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct AsyncIdempotentConsumer {
    inner: IdempotentConsumer,
}

impl AsyncIdempotentConsumer {
    /// Runs `consumer` (configured as for the synchronous loop: changelog,
    /// claim lease, batch size, key policy) with async handlers.
    pub fn new(consumer: IdempotentConsumer) -> Self {
        Self { inner: consumer }
    }

    /// The synchronous loop underneath (its consumer, its context).
    pub fn inner(&self) -> &IdempotentConsumer {
        &self.inner
    }

    /// Gives the synchronous loop back.
    pub fn into_inner(self) -> IdempotentConsumer {
        self.inner
    }

    /// [`IdempotentConsumer::poll_batch`] with an async handler: it gets
    /// each new message (detached from the consumer) and its idempotency
    /// key, and its future is run to completion before the message is
    /// marked.
    pub async fn poll_batch<E, H, F>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        H: FnMut(OwnedMessage, Option<Vec<u8>>) -> F,
        F: Future<Output = Result<(), E>>,
    {
        let handle = runtime()?;
        let inner = &mut self.inner;
        blocking(|| {
            inner.poll_batch(timeout, |m, key| {
                handle.block_on(handler(m.detach(), key.map(<[u8]>::to_vec)))
            })
        })
    }

    /// [`IdempotentConsumer::poll_batch_outbox`] with an async handler: the
    /// records its future returns are staged with the message's batch
    /// ([`Batch::send`]), produced in the same Kafka transaction as the
    /// batch's marks and offsets (changelog mode). A handler that fails
    /// stages nothing; outside changelog mode, returning a record fails the
    /// message with [`crate::Error::NoOutbox`] (converted into `E`).
    pub async fn poll_batch_outbox<E, H, F>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        E: From<crate::Error>,
        H: FnMut(OwnedMessage, Option<Vec<u8>>) -> F,
        F: Future<Output = Result<Vec<crate::OutboxRecord>, E>>,
    {
        let handle = runtime()?;
        let inner = &mut self.inner;
        blocking(|| {
            inner.poll_batch_outbox(timeout, |m, key, batch: &mut Batch<'_>| {
                let records = handle.block_on(handler(m.detach(), key.map(<[u8]>::to_vec)))?;
                for record in records {
                    batch.send(record)?;
                }
                Ok(())
            })
        })
    }

    /// [`IdempotentConsumer::poll_batch_claimed`] with an async handler:
    /// claim mode, each message delivered [`Delivery::New`] or
    /// [`Delivery::InDoubt`].
    pub async fn poll_batch_claimed<E, H, F>(
        &mut self,
        timeout: Duration,
        mut handler: H,
    ) -> Result<PollReport, ConsumeError<E>>
    where
        H: FnMut(OwnedMessage, Option<Vec<u8>>, Delivery) -> F,
        F: Future<Output = Result<(), E>>,
    {
        let handle = runtime()?;
        let inner = &mut self.inner;
        blocking(|| {
            inner.poll_batch_claimed(timeout, |m, key, delivery, _| {
                handle.block_on(handler(m.detach(), key.map(<[u8]>::to_vec), delivery))
            })
        })
    }
}

/// Runs `f` (a poll batch of the synchronous loop) in `block_in_place`. A
/// refusal by `block_in_place` itself, before `f` runs (a current-thread
/// runtime whose context a multi-threaded runtime's entered handle hides
/// from [`runtime`]), is [`ConsumeError::Runtime`]; a panic in `f` (a
/// handler's) goes on to the caller.
fn blocking<T, E>(f: impl FnOnce() -> Result<T, ConsumeError<E>>) -> Result<T, ConsumeError<E>> {
    let mut entered = false;
    let result = catch_unwind(AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| {
            entered = true;
            f()
        })
    }));
    match result {
        Ok(r) => r,
        Err(_) if !entered => Err(ConsumeError::Runtime {
            reason: "runs on a current-thread runtime (a multi-threaded runtime's handle is \
                     entered, but this thread is not one of its workers)",
        }),
        Err(panic) => resume_unwind(panic),
    }
}

/// The current runtime, if it allows `block_in_place`.
fn runtime<E>() -> Result<Handle, ConsumeError<E>> {
    let handle = Handle::try_current().map_err(|_| ConsumeError::Runtime {
        reason: "called outside a tokio runtime",
    })?;
    match handle.runtime_flavor() {
        RuntimeFlavor::MultiThread => Ok(handle),
        _ => Err(ConsumeError::Runtime {
            reason: "needs tokio's multi-threaded runtime (the current-thread runtime cannot \
                     move its tasks off a worker that waits on the disk or the broker)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_runtime_the_loop_refuses_with_a_typed_error() {
        assert!(matches!(runtime::<()>(), Err(ConsumeError::Runtime { .. })));
    }

    #[test]
    fn a_current_thread_runtime_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(runtime::<()>(), Err(ConsumeError::Runtime { .. })));
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async { assert!(runtime::<()>().is_ok()) });
    }
}
