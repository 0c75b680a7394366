//! A batch's claims: claiming a key, and confirming or releasing a claim.

use std::time::Duration;

use super::Batch;
use crate::claim::{next_token, Claim, ClaimToken};
use crate::engine::ValidKey;
use crate::error::{Error, Result};
use crate::layout::Entry;
use crate::shard::Counters;
use crate::ttl::expiry;

/// What [`Batch::take_claim`] found.
#[cfg(feature = "kafka")]
#[derive(Debug)]
pub(crate) enum Taken {
    /// Marked and live, or claimed earlier in the same batch: skip it.
    Duplicate,
    /// Nobody marked or claimed it: claimed now.
    New(ClaimToken),
    /// Another processor's claim was live, and is now this one's.
    InDoubt {
        token: ClaimToken,
        /// The epoch the previous claim was made under.
        holder_epoch: u64,
    },
}

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
        self.stage_release(token.stored_key.clone(), token.token);
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
            None => Ok(Claim::Acquired(self.stage_claim(k, lease, now.clock))),
        }
    }
    /// Claims a validated key for the claim mode of the Kafka loop, which
    /// owns the partition and settles (confirms or releases) every claim it
    /// makes before it returns: a live claim it finds was made by a
    /// processor that stopped before settling it (another instance, or this
    /// one before a crash or a failed write), so the side effect may have
    /// happened. That claim is taken over, and the key reported in doubt.
    #[cfg(feature = "kafka")]
    pub(crate) fn take_claim(&mut self, key: &[u8], lease: Duration) -> Result<Taken> {
        let key = self.engine.validate_key(key)?;
        let k = self.engine.stored_key(key);
        Counters::bump(&self.shard.counters.checks);
        let now = self.times();
        let staged = self.staged.contains_key(&k);
        let holder = match self.current(&k, now)?.0 {
            // Marked, or claimed earlier in this batch (the same key twice in
            // one poll batch).
            Some(Entry::Done { .. }) | Some(Entry::Claimed { .. }) if staged => None,
            Some(Entry::Done { .. }) => None,
            Some(Entry::Claimed { epoch, .. }) => Some(Some(epoch)),
            None => Some(None),
        };
        let Some(holder) = holder else {
            Counters::bump(&self.shard.counters.duplicates);
            return Ok(Taken::Duplicate);
        };
        let token = self.stage_claim(k, lease, now.clock);
        Ok(match holder {
            None => Taken::New(token),
            Some(holder_epoch) => Taken::InDoubt {
                token,
                holder_epoch,
            },
        })
    }
    /// Stages a new claim on stored key `k` for `lease` from `clock_now`.
    fn stage_claim(&mut self, k: Vec<u8>, lease: Duration, clock_now: u64) -> ClaimToken {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let epoch = self.fence.unwrap_or_else(|| self.shard.epoch());
        let token = ClaimToken {
            partition: self.shard.partition.clone(),
            stored_key: k.clone(),
            epoch,
            token: next_token(),
            lease_until: expiry(clock_now, lease_ms),
        };
        let entry = Entry::Claimed {
            lease_until: token.lease_until,
            epoch,
            token: token.token,
        };
        self.stage(k, Some(entry), true);
        token
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
            tracing::warn!(
                partition = %shard.partition,
                current = current_epoch,
                attempted = token.epoch,
                "fenced: a claim made under another epoch was refused"
            );
            return Err(Error::Fenced {
                partition: shard.partition.clone(),
                current: current_epoch,
                attempted: token.epoch,
            });
        }
        let entry = match self.staged.get(&token.stored_key) {
            Some(staged) => staged.entry,
            None => self
                .engine
                .read_mark(&self.shard, &self.cf, &token.stored_key)?,
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
