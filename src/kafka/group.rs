//! The store shared by the consumers of one consumer group in this
//! process, and which consumer owns which partition's shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::{Error, Partition, Store};

/// A [`Store`] shared by the consumers of one consumer group in this
/// process, with a record of which consumer owns which partition.
///
/// Cloning is cheap; every clone refers to the same store and record. A
/// consumer's revocation revokes a shard only if that consumer still owns
/// it, so a late revocation by a consumer that lost a partition to another
/// consumer of the same store does not close the new owner's shard.
#[derive(Clone, Debug)]
pub struct GroupStore {
    inner: Arc<GroupInner>,
}

#[derive(Debug)]
struct GroupInner {
    store: Arc<Store>,
    /// Partition → the member that assigned it last.
    owners: Mutex<HashMap<Partition, u64>>,
    next_member: AtomicU64,
}

impl GroupStore {
    /// Wraps `store` for the consumers of one consumer group.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            inner: Arc::new(GroupInner {
                store,
                owners: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(1),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub(super) fn new_member(&self) -> u64 {
        self.inner.next_member.fetch_add(1, Ordering::Relaxed)
    }

    /// Assigns the shard and records `member` as its owner.
    pub(super) fn acquire(
        &self,
        member: u64,
        partition: &Partition,
        epoch: Option<u64>,
    ) -> crate::Result<()> {
        let mut owners = self.inner.owners.lock();
        assign_partition(&self.inner.store, partition, epoch)?;
        owners.insert(partition.clone(), member);
        Ok(())
    }

    /// Revokes the shard if `member` still owns it.
    pub(super) fn release(&self, member: u64, partition: &Partition) -> crate::Result<()> {
        let mut owners = self.inner.owners.lock();
        if owners.get(partition) != Some(&member) {
            return Ok(());
        }
        owners.remove(partition);
        match self.inner.store.revoke(partition) {
            Ok(()) | Err(Error::NotAssigned(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Assigns `partition`'s shard, with the consumer group's generation as its
/// epoch when it is known.
fn assign_partition(store: &Store, partition: &Partition, epoch: Option<u64>) -> crate::Result<()> {
    // Fence the shard with the group generation when it is known; the same
    // generation again (another consumer thread of this process) is accepted.
    match epoch {
        Some(epoch) => store.assign_with_epoch(partition, epoch),
        None => store.assign(partition),
    }
}
