//! Assignment: opening a partition's shard (`assign`), closing it
//! (`revoke`), deleting a partition, and the tools' access to partitions that
//! are not assigned. The lock order is `docs/design.md`'s: a shard's write
//! lock, then membership, then the shard map.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, info_span};

use super::Store;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::membership::MembershipGuard;
use crate::shard::Shard;
use crate::Partition;

impl Store {
    /// Assigns a partition to this store (on a consumer-group rebalance):
    /// opens its shard, creating it if new, and rebuilds its Bloom front from
    /// the live marks on disk. Assigning an assigned partition does nothing.
    /// The partition keeps the epoch it had; see
    /// [`assign_with_epoch`](Self::assign_with_epoch).
    ///
    /// Errors: [`Error::InvalidPartition`] for a topic or number Kafka would
    /// not accept; [`Error::Corruption`] if the shard's data is damaged.
    pub fn assign(&self, partition: &Partition) -> Result<()> {
        self.assign_inner(partition, None)
    }

    /// Assigns a partition under `epoch`: the consumer-group generation, or
    /// any number the caller increases with every reassignment. The epoch is
    /// stored with the shard and never goes backwards; batches fenced with an
    /// older epoch ([`Batch::fence`](crate::Batch::fence)) and claims made under one are refused
    /// with [`Error::Fenced`]. Assigning an assigned partition with a newer
    /// epoch moves it to that epoch.
    ///
    /// Errors: as [`assign`](Self::assign), and [`Error::Fenced`] (nothing
    /// changed) if the partition's epoch is already higher.
    pub fn assign_with_epoch(&self, partition: &Partition, epoch: u64) -> Result<()> {
        self.assign_inner(partition, Some(epoch))
    }

    /// The partition's epoch (0 if it was never assigned with one).
    pub fn epoch(&self, partition: &Partition) -> Result<u64> {
        Ok(self.shard(partition)?.epoch())
    }

    fn assign_inner(&self, partition: &Partition, epoch: Option<u64>) -> Result<()> {
        partition.validate()?;
        loop {
            let membership = self.membership.lock();
            let existing = self.shards.read().get(partition).cloned();
            let Some(shard) = existing else {
                return self.open_shard(partition, epoch, &membership);
            };
            // Lock order: membership is never held while waiting for a
            // shard's write lock (another thread's batch may hold it and wait
            // for membership in turn, through `revoke`).
            drop(membership);
            let previous_epoch = shard.epoch();
            let Some(epoch) = epoch.filter(|&e| e != previous_epoch) else {
                return Ok(());
            };
            // The batch's commit checks the epoch again under the write lock,
            // so of two racing calls the lower epoch is refused.
            match self.batch(partition) {
                Ok(mut batch) => {
                    batch.set_epoch(epoch);
                    batch.commit()?;
                    info!(
                        partition = %partition,
                        epoch,
                        previous_epoch,
                        "assigned partition moved to a newer epoch"
                    );
                    return Ok(());
                }
                // Revoked (or revoked and assigned again) since it was looked
                // up: assign it afresh.
                Err(Error::NotAssigned(_)) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens an unassigned partition's shard and publishes it. Everything the
    /// shard starts with, the new epoch included, is on disk before any
    /// other thread can see the shard: no batch can slip in between, fenced
    /// with an older epoch.
    fn open_shard(
        &self,
        partition: &Partition,
        epoch: Option<u64>,
        _membership: &MembershipGuard<'_>,
    ) -> Result<()> {
        let started = Instant::now();
        // The snapshot load or rebuild logs inside this span.
        let span = info_span!("assign", partition = %partition);
        let _entered = span.enter();
        let (name, shared, init) = self.engine.load_partition(partition, epoch)?;
        let (resume, claims) = (init.offset, init.claims.len());
        let shard = Arc::new(Shard::new(partition.clone(), name, init, shared));
        shard.refresh_gauges(self.engine.keys_estimate(&shard));
        info!(
            partition = %partition,
            // Where the consumer resumes, as far as the store knows.
            resume = ?resume,
            why = if resume.is_some() {
                "the store's committed offset"
            } else {
                "no offset committed: the consumer's group offset or reset policy decides"
            },
            epoch = shard.epoch(),
            changelog = ?shard.changelog_next(),
            outbox = shard.outbox_next(),
            filter = if shard.from_snapshot { "snapshot" } else { "rebuilt" },
            claims,
            elapsed_ms = started.elapsed().as_millis(),
            "partition assigned"
        );
        self.shards.write().insert(partition.clone(), shard);
        Ok(())
    }

    /// Revokes a partition (on a consumer-group rebalance): closes its shard
    /// and frees its filter, keeping its marks and offset on disk for a later
    /// [`assign`](Self::assign). Waits for another thread's open batch on the
    /// partition to finish.
    ///
    /// Errors: [`Error::NotAssigned`]; [`Error::BatchInProgress`] if this
    /// thread holds an open batch on it.
    pub fn revoke(&self, partition: &Partition) -> Result<()> {
        let shard = self.shard(partition)?;
        self.revoke_shard(&shard)
    }

    /// Revokes `shard`. Lock order: its write lock first (waiting for an open
    /// batch), then membership.
    fn revoke_shard(&self, shard: &Arc<Shard>) -> Result<()> {
        let mut writer = shard.lock_writer()?;
        writer.revoked = true;
        shard.revoked_metrics();
        // The changes in memory go to a table now, so that the partition's
        // column family holds all of it while it is not assigned. If that
        // fails their journal records are still on disk, and the next
        // reader of the partition writes them (`Engine::settle`).
        if let Err(e) = self.engine.flush_all(shard) {
            tracing::error!(
                partition = %shard.partition,
                error = %e,
                "writing the partition's changes as a table on revoke failed; the next assign writes them"
            );
        }
        // Written or not, no flush of this shard writes anything from now
        // on: one still queued would otherwise land above what the next
        // reader of the partition writes from their records. (Its index
        // keeps answering readers that looked the shard up before.)
        self.engine.retire(shard);
        self.engine.save_snapshot(shard);
        info!(
            partition = %shard.partition,
            // Where the next assign of the partition resumes.
            resume = ?shard.committed_offset(),
            epoch = shard.epoch(),
            changelog = ?shard.changelog_next(),
            // Whether the next assign loads the filter instead of scanning.
            snapshot = shard.snapshot_key_live(),
            "partition revoked"
        );
        let _membership = self.membership.lock();
        let mut shards = self.shards.write();
        if shards
            .get(&shard.partition)
            .is_some_and(|current| Arc::ptr_eq(current, shard))
        {
            shards.remove(&shard.partition);
        }
        Ok(())
    }

    /// Deletes a partition's marks and offset, revoking it first if it is
    /// assigned. Returns whether there was anything to delete.
    ///
    /// Racing an [`assign`](Self::assign) of the same partition, either the
    /// assign comes first (and the partition is revoked and deleted) or the
    /// delete does (and the partition is assigned afresh, empty); never a
    /// shard without its data.
    pub fn delete_partition(&self, partition: &Partition) -> Result<bool> {
        partition.validate()?;
        loop {
            let existing = self.shards.read().get(partition).cloned();
            if let Some(shard) = existing {
                match self.revoke_shard(&shard) {
                    // Revoked by another thread meanwhile.
                    Ok(()) | Err(Error::NotAssigned(_)) => {}
                    Err(e) => return Err(e),
                }
                shard.deleted_metrics();
            }
            let membership = self.membership.lock();
            // Checked under membership, which every assign holds: if it was
            // assigned again since, revoke that shard too.
            if self.shards.read().contains_key(partition) {
                drop(membership);
                std::thread::yield_now();
                continue;
            }
            return self.engine.drop_partition(partition);
        }
    }

    /// The partitions assigned to this store, in order.
    pub fn assigned(&self) -> Vec<Partition> {
        let mut v: Vec<_> = self.shards.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// The engine, with membership held and `partition` not assigned: for
    /// the inspection and transfer tools (`src/inspect.rs`), which read and
    /// write a partition's column family directly. No shard of it can be
    /// assigned while the guard lives (every assign takes membership), so
    /// no filter goes stale under them.
    ///
    /// Errors: [`Error::Assigned`] if the partition is assigned.
    pub(crate) fn unassigned(
        &self,
        partition: &Partition,
    ) -> Result<(&Engine, MembershipGuard<'_>)> {
        partition.validate()?;
        let membership = self.membership.lock();
        if self.shards.read().contains_key(partition) {
            return Err(Error::Assigned(partition.clone()));
        }
        // Journal records a stop left go to a table first: the tools read
        // and write the column family alone.
        self.engine.settle(partition)?;
        Ok((&self.engine, membership))
    }
}
