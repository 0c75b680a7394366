//! The background thread that writes partitions' in-memory changes as
//! tables, so that a commit never waits for a table to be written (unless
//! the thread falls a whole table behind: see `Engine::after_commit`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::tables::Tables;
use crate::shard::Shard;

/// What the thread is asked.
enum Job {
    Flush(Arc<Shard>),
    /// Answer once every job sent before is done.
    Barrier(Sender<()>),
}

/// The flusher: a channel of jobs and the thread reading it.
pub(crate) struct Flusher {
    sender: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    pub(crate) fn start(tables: Arc<Tables>) -> std::io::Result<Self> {
        let (sender, receiver) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("exactly-tables".into())
            .spawn(move || {
                for job in receiver {
                    let shard = match job {
                        Job::Flush(shard) => shard,
                        Job::Barrier(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    shard.flush_requested.store(false, Ordering::Release);
                    if let Err(e) = tables.flush(&shard) {
                        // The changes stay in memory and in their records;
                        // the next request (or the revoke) tries again.
                        tracing::error!(
                            partition = %shard.partition,
                            error = %e,
                            "writing the partition's changes as a table failed"
                        );
                    }
                }
            })?;
        Ok(Self {
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for `shard` to be flushed, unless that is already asked.
    pub(crate) fn request(&self, shard: &Arc<Shard>) {
        if shard.flush_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(sender) = &*self.sender.lock() {
            // The thread ends only when the sender is gone.
            let _ = sender.send(Job::Flush(shard.clone()));
        }
    }

    /// Waits until every flush asked so far is done (tests and tools that
    /// copy a store's files while it is open).
    pub(crate) fn wait_idle(&self) {
        let (done, wait) = channel();
        let sent = match &*self.sender.lock() {
            Some(sender) => sender.send(Job::Barrier(done)).is_ok(),
            None => false,
        };
        if sent {
            let _ = wait.recv();
        }
    }

    /// Lets the thread finish what it was asked and waits for it.
    pub(crate) fn stop(&self) {
        self.sender.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}
