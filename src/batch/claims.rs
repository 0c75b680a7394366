//! A batch's claims: claiming a key, and confirming or releasing a claim.

use std::time::Duration;

use super::Batch;
use crate::claim::{next_token, Claim, ClaimToken};
use crate::engine::ValidKey;
use crate::error::{Error, Result};
use crate::layout::Entry;
use crate::shard::Counters;
use crate::ttl::expiry;

impl Batch<'_> {
    /// Turns an acquired claim into a processed mark (its TTL starts now).
    ///
    /// A claim whose lease ran out can still be confirmed while nobody else
    /// claimed the key, for up to the claim grace after the lease: the TTL
    /// the store was created with (fixed, whatever `ttl` later opens use).
    ///
    /// Errors: [`Error::Fenced`] if the partition has a newer epoch than the
    /// claim's; [`Error::ClaimLost`] if the claim was released, or its lease
    /// ran out and another processor claimed the key (or a TTL passed).
    pub fn confirm(&mut self, token: &ClaimToken) -> Result<()> {
        self.own_claim(token)?;
        let expires_at = expiry(self.partition_now(), self.engine.ttl_millis());
        self.stage(
            token.stored_key.clone(),
            Some(Entry::Done { expires_at }),
            true,
        );
        self.marks += 1;
        Ok(())
    }
    /// Removes an acquired claim so the key can be processed again (the side
    /// effect failed). Errors as for [`confirm`](Self::confirm).
    pub fn release(&mut self, token: &ClaimToken) -> Result<()> {
        self.own_claim(token)?;
        self.stage(token.stored_key.clone(), None, true);
        Ok(())
    }
    /// Claims a validated key for `lease`; see
    /// [`Store::claim`](crate::Store::claim).
    pub(crate) fn claim(&mut self, key: ValidKey<'_>, lease: Duration) -> Result<Claim> {
        let k = self.engine.stored_key(key);
        Counters::bump(&self.shard.counters.checks);
        let now = self.times();
        match self.current(&k, now)?.0 {
            Some(Entry::Done { .. }) => {
                Counters::bump(&self.shard.counters.duplicates);
                Ok(Claim::Done)
            }
            Some(Entry::Claimed {
                lease_until, epoch, ..
            }) => Ok(Claim::InFlight {
                holder_epoch: epoch,
                expires_at: lease_until,
            }),
            None => {
                let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                let epoch = self.fence.unwrap_or_else(|| self.shard.epoch());
                let token = ClaimToken {
                    partition: self.shard.partition.clone(),
                    stored_key: k.clone(),
                    epoch,
                    token: next_token(),
                    lease_until: expiry(now.clock, lease_ms),
                };
                let entry = Entry::Claimed {
                    lease_until: token.lease_until,
                    epoch,
                    token: token.token,
                };
                self.stage(k, Some(entry), true);
                Ok(Claim::Acquired(token))
            }
        }
    }
    /// Checks that `token` still holds its claim.
    pub(super) fn own_claim(&self, token: &ClaimToken) -> Result<()> {
        let shard = &self.shard;
        let lost = || Error::ClaimLost {
            partition: shard.partition.clone(),
        };
        if token.partition != shard.partition {
            return Err(lost());
        }
        let current_epoch = self.fence.unwrap_or_else(|| shard.epoch());
        if token.epoch != current_epoch {
            return Err(Error::Fenced {
                partition: shard.partition.clone(),
                current: current_epoch,
                attempted: token.epoch,
            });
        }
        let entry = match self.staged.get(&token.stored_key) {
            Some(staged) => staged.entry,
            None => self.engine.read_entry(&self.cf, &token.stored_key)?,
        };
        let grace_ms = self.engine.claim_grace_millis();
        match entry {
            // Still ours, even if the lease ran out, while nobody took it over
            // and for the claim grace after the lease (then compaction may
            // drop it).
            Some(e @ Entry::Claimed { token: t, .. })
                if t == token.token && e.is_retained(0, self.engine.now(), grace_ms) =>
            {
                Ok(())
            }
            _ => Err(lost()),
        }
    }
}
