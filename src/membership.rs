//! The membership lock: serialises `assign`, `revoke` and `delete_partition`,
//! and enforces the store's lock order.
//!
//! The order (`docs/design.md`, "Lock order"): a shard's write lock, then
//! membership, then the shard map. So a thread that holds membership must
//! never wait for a shard's write lock: `revoke` takes the write lock first
//! and membership after it, and `assign` writes a new shard's metadata before
//! the shard is published, without any write lock. Holding membership is
//! tracked per thread, and a shard's `lock_writer` asserts it is not held (in debug builds, which the tests run), so a path that breaks the
//! order fails every time it runs, not only when the race that would
//! deadlock it happens.

use std::cell::Cell;

use parking_lot::{Mutex, MutexGuard};

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// The store's membership lock.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    lock: Mutex<()>,
}

/// Proof that this thread holds the membership lock.
pub(crate) struct MembershipGuard<'a> {
    _guard: MutexGuard<'a, ()>,
}

impl Membership {
    pub(crate) fn lock(&self) -> MembershipGuard<'_> {
        debug_assert!(!held(), "membership is not reentrant");
        let guard = self.lock.lock();
        HELD.with(|h| h.set(true));
        MembershipGuard { _guard: guard }
    }
}

impl Drop for MembershipGuard<'_> {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

/// Whether this thread holds the membership lock.
pub(crate) fn held() -> bool {
    HELD.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_the_holder_per_thread() {
        let m = Membership::default();
        assert!(!held());
        {
            let _g = m.lock();
            assert!(held());
            std::thread::scope(|s| {
                s.spawn(|| assert!(!held()));
            });
        }
        assert!(!held());
    }
}
