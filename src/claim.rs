//! Claims: the processing lifecycle around a side effect.
//!
//! ```text
//!            claim                 confirm               ttl runs out
//!   New ─────────────► InFlight ─────────────► Done ─────────────────► New
//!    ▲                   │  │
//!    │      release      │  │ lease runs out (crashed processor)
//!    └───────────────────┘  └──────────────────────────────────────────► New
//! ```

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::Partition;

/// The answer to [`crate::Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody processed the key or holds it: process it, then
    /// [`confirm`](crate::Store::confirm) or [`release`](crate::Store::release)
    /// with this token.
    Acquired(ClaimToken),
    /// Another processor holds the key and its lease has not run out.
    InFlight {
        /// The partition epoch under which the holder claimed it.
        holder_epoch: u64,
        /// When the holder's lease runs out (ms since the Unix epoch, by the
        /// store's clock); then the key can be claimed again.
        expires_at: u64,
    },
    /// The key was processed and its mark has not expired: skip it.
    Done,
}

/// Proof of an acquired claim, for [`crate::Store::confirm`] and
/// [`crate::Store::release`] (or their [`crate::Batch`] forms).
///
/// A token is refused with [`crate::Error::ClaimLost`] once its lease ran out
/// and another processor claimed the key, and with [`crate::Error::Fenced`]
/// once the partition was assigned under a newer epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken {
    pub(crate) partition: Partition,
    pub(crate) stored_key: Vec<u8>,
    pub(crate) epoch: u64,
    pub(crate) token: u64,
    pub(crate) lease_until: u64,
}

impl ClaimToken {
    /// The partition the claim is on.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// The partition epoch the claim was made under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the lease runs out (ms since the Unix epoch, by the store's clock).
    pub fn lease_until(&self) -> u64 {
        self.lease_until
    }
}

/// Token numbers: a random start per process, then counting.
pub(crate) fn next_token() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| RandomState::new().build_hasher().finish());
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            assert!(seen.insert(next_token()));
        }
    }
}
