//! A batch's part in the changelog: the outgoing records it stages, the
//! outbox entry it records, the changelog records a restore applies
//! through it, and completing the outbox once published.

use rocksdb::WriteBatch;

use super::Batch;
use crate::error::{Error, Result};
use crate::layout::{decode_entry, encode_offset, source_of, Entry, CHANGELOG_KEY, MARK_TAG};
use crate::outbox::{outbox_key, OutboxRecord};
use crate::sequence::SourceState;

impl Batch<'_> {
    /// Stages an outgoing Kafka record, written in this batch's atomic write
    /// and produced in the same Kafka transaction as its changelog records
    /// and offsets: the marks, the offset and the records all happen, or
    /// none does (the outbox pattern).
    ///
    /// Errors: [`Error::NoOutbox`] unless the batch belongs to the Kafka
    /// changelog loop (its handler's batch); nothing is staged.
    pub fn send(&mut self, record: OutboxRecord) -> Result<()> {
        match &mut self.outbox {
            Some((start, records)) => {
                records.push((self.input.unwrap_or(*start), record));
                Ok(())
            }
            None => Err(Error::NoOutbox(self.shard.partition.clone())),
        }
    }

    /// Makes the batch record its changes in the partition's outbox, for
    /// the changelog; `start` is the input offset of its first message.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn record_changes(&mut self, start: i64) {
        self.outbox.get_or_insert_with(|| (start, Vec::new()));
    }
    /// The input offset of the message whose handler runs next: the
    /// records it stages are kept with it, so that a restart publishes a
    /// record unless someone processed its message since.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn set_input(&mut self, offset: i64) {
        self.input = Some(offset);
    }

    /// Applies one changelog record (a restore): `key` a stored key, `value`
    /// a stored entry or `None` (removed; `release` the token of the claim
    /// the removal ended, if it was a release). Records are applied in
    /// changelog order and the later one wins, except where the record can
    /// only come from a processor that did not know the current entry
    /// (another instance's changelog may hold records of aborted
    /// transactions, of a zombie, and of an outbox published late, on a
    /// broker that does not filter or fence them). None of these rules reads
    /// a clock, so instances whose clocks disagree restore alike:
    ///
    /// - a mark never trades its expiry for an earlier one: the changelog of
    ///   another instance may miss a mark this store made (a batch whose
    ///   publication was given up), and a mark is only ever made after its
    ///   side effect;
    /// - a claim replaces a mark only if its lease ends at or after the
    ///   mark's expiry (a claim made after the mark expired always does): so
    ///   a zombie's claim never makes a key new before its mark would have
    ///   expired;
    /// - a claim over another processor's claim keeps both in doubt: the
    ///   key stays in flight until the later lease ends, under a fresh token
    ///   that no release names (either processor may have applied the side
    ///   effect, and a release by one says nothing of the other);
    /// - a release removes only the claim it names; an unmark removes
    ///   whatever is there;
    /// - a sequence source's state is merged with the store's (the later
    ///   epoch; under one epoch, every number marked in either): the order
    ///   of the records never matters. A source the store holds but that
    ///   expired counts as none, as a check counts it.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn restore(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        release: Option<u64>,
    ) -> Result<()> {
        let bad = |reason: &str| Error::BadChangelogRecord {
            partition: self.shard.partition.clone(),
            reason: reason.to_string(),
        };
        if let Some(source) = source_of(key) {
            if source.len() > self.engine.options().max_key_len {
                return Err(bad("the source is longer than this store's max_key_len"));
            }
            let Some(v) = value else {
                // Sources are never removed through the changelog (they
                // expire): a removal can only make numbers new again.
                return Ok(());
            };
            let state =
                SourceState::decode(v).ok_or_else(|| bad("the value is not a source's state"))?;
            self.restore_source(source, state);
            return Ok(());
        }
        if key.first() != Some(&MARK_TAG) {
            return Err(bad("the key is not a stored mark key"));
        }
        let expected = match self.engine.options().key_mode {
            crate::KeyMode::Hashed => key.len() == 17,
            crate::KeyMode::Raw => {
                key.len() >= 2 && key.len() <= self.engine.options().max_key_len + 1
            }
        };
        if !expected {
            return Err(bad(
                "the key does not fit this store's key mode and max_key_len",
            ));
        }
        let entry = match value {
            None => None,
            Some(v) => Some(decode_entry(v).map_err(|_| bad("the value is not a stored entry"))?),
        };
        let current = match self.staged.get(key) {
            Some(staged) => staged.entry,
            None => self.engine.read_mark(&self.shard, &self.cf, key)?,
        };
        let entry = match (current, entry) {
            (Some(Entry::Done { expires_at: c }), Some(Entry::Done { expires_at: e })) => {
                Some(Entry::Done {
                    expires_at: c.max(e),
                })
            }
            (Some(done @ Entry::Done { expires_at }), Some(Entry::Claimed { lease_until, .. }))
                if lease_until < expires_at =>
            {
                Some(done)
            }
            (
                Some(Entry::Claimed {
                    lease_until: l1,
                    epoch: e1,
                    token: t1,
                }),
                Some(Entry::Claimed {
                    lease_until: l2,
                    epoch: e2,
                    token: t2,
                }),
            ) if t1 != t2 => Some(Entry::Claimed {
                lease_until: l1.max(l2),
                epoch: e1.max(e2),
                token: crate::claim::next_token(),
            }),
            (current, None) if release.is_some() => match current {
                Some(Entry::Claimed { token, .. }) if Some(token) == release => None,
                other => other,
            },
            (_, e) => e,
        };
        if entry == current {
            return Ok(());
        }
        let claims = matches!(entry, Some(Entry::Claimed { .. }))
            || matches!(current, Some(Entry::Claimed { .. }));
        self.stage(key.to_vec(), entry, claims);
        Ok(())
    }
    /// Outgoing records staged so far.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn outbox_len(&self) -> usize {
        self.outbox.as_ref().map_or(0, |(_, r)| r.len())
    }
    /// Drops the outgoing records staged after the first `n`.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn truncate_outbox(&mut self, n: usize) {
        if let Some((_, records)) = &mut self.outbox {
            records.truncate(n);
        }
    }
    /// Moves the partition's changelog position to `next` at commit (never
    /// back).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn set_changelog_next(&mut self, next: i64) {
        self.changelog_next = Some(self.changelog_next.map_or(next, |n| n.max(next)));
    }
    /// Records the highest changelog progress a restore read, with this
    /// batch's records (see `CHANGELOG_PROGRESS_KEY`).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn set_changelog_progress(&mut self, progress: i64) -> Result<()> {
        // Never lowered: another consumer of this store may have restored
        // further meanwhile (the batch holds the partition's write lock, so
        // nothing writes it between this read and the commit).
        let stored = self
            .engine
            .read_offset_key(&self.cf, crate::layout::CHANGELOG_PROGRESS_KEY)?;
        self.changelog_progress = Some(stored.map_or(progress, |s| s.max(progress)));
        Ok(())
    }
    /// Removes the outbox entries up to `seq` (they are published) and moves
    /// the changelog position to `changelog_next` if given, in one write.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn complete_outbox(self, seq: u64, changelog_next: Option<i64>) -> Result<()> {
        let mut write = WriteBatch::default();
        write.delete_range_cf(&self.cf, outbox_key(0), outbox_key(seq.saturating_add(1)));
        let next = changelog_next.filter(|&n| self.shard.changelog_next().is_none_or(|c| n > c));
        if let Some(n) = next {
            write.put_cf(&self.cf, CHANGELOG_KEY, encode_offset(n));
        }
        self.engine.write(write)?;
        if let Some(n) = next {
            self.shard.advance_changelog(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::{Entry, MARK_TAG};
    use crate::{Error, Options, Partition, Store, Verdict};

    fn store() -> (tempfile::TempDir, Store, Partition) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let p = Partition::new("orders", 0);
        store.assign(&p).unwrap();
        (dir, store, p)
    }

    fn key(k: &[u8]) -> Vec<u8> {
        let mut v = vec![MARK_TAG];
        v.extend_from_slice(k);
        v
    }

    fn far() -> u64 {
        u64::MAX / 2
    }

    #[test]
    fn restored_marks_are_duplicates_and_never_trade_their_expiry_for_an_earlier_one() {
        let (_dir, store, p) = store();
        let later = Entry::Done { expires_at: far() }.encode();
        let earlier = Entry::Done { expires_at: 1 }.encode();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"a"), Some(&later), None).unwrap();
        batch.restore(&key(b"a"), Some(&earlier), None).unwrap();
        batch.set_changelog_next(7);
        batch.commit().unwrap();
        assert_eq!(store.check(&p, b"a").unwrap(), Verdict::Duplicate);
        assert_eq!(store.check(&p, b"b").unwrap(), Verdict::New);
        assert_eq!(store.changelog_offset(&p).unwrap(), Some(7));
        // The position never goes back, and survives a reassign.
        let mut batch = store.batch(&p).unwrap();
        batch.set_changelog_next(3);
        batch.commit().unwrap();
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
        assert_eq!(store.changelog_offset(&p).unwrap(), Some(7));
        assert_eq!(store.check(&p, b"a").unwrap(), Verdict::Duplicate);
    }

    /// The progress a restore read is stored with its chunk, and kept
    /// across a reopen: a restore cut short still knows it.
    #[test]
    fn the_changelog_progress_a_restore_read_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = Partition::new("orders", 0);
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.assign(&p).unwrap();
        assert_eq!(store.changelog_progress(&p).unwrap(), None);
        let mut batch = store.batch(&p).unwrap();
        batch.set_changelog_next(5);
        batch.set_changelog_progress(42).unwrap();
        batch.commit().unwrap();
        store.close().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.assign(&p).unwrap();
        assert_eq!(store.changelog_progress(&p).unwrap(), Some(42));
        assert_eq!(store.changelog_offset(&p).unwrap(), Some(5));
    }

    #[test]
    fn a_restored_removal_makes_the_key_new_again() {
        let (_dir, store, p) = store();
        store.mark(&p, b"a").unwrap();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"a"), None, None).unwrap();
        batch.commit().unwrap();
        assert_eq!(store.check(&p, b"a").unwrap(), Verdict::New);
    }

    /// Records only a processor that did not know the mark can have
    /// written (a zombie's, or an aborted transaction's on a broker that
    /// does not filter them) leave a live mark alone; an unmark removes it.
    #[test]
    fn a_live_mark_is_neither_replaced_by_a_claim_nor_removed_by_a_release() {
        let (_dir, store, p) = store();
        store.mark(&p, b"a").unwrap();
        store.mark(&p, b"b").unwrap();
        store.mark(&p, b"u").unwrap();
        let claim = Entry::Claimed {
            lease_until: 1,
            epoch: 3,
            token: 9,
        }
        .encode();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"a"), Some(&claim), None).unwrap();
        batch.restore(&key(b"b"), None, Some(9)).unwrap();
        batch.restore(&key(b"u"), None, None).unwrap();
        batch.commit().unwrap();
        assert_eq!(store.check(&p, b"a").unwrap(), Verdict::Duplicate);
        assert_eq!(store.check(&p, b"b").unwrap(), Verdict::Duplicate);
        assert_eq!(store.check(&p, b"u").unwrap(), Verdict::New);
    }

    /// A release ends the claim it follows; a claim replaces an expired
    /// mark (the key was new again when it was claimed).
    #[test]
    fn a_release_ends_a_claim_and_a_claim_replaces_an_expired_mark() {
        let (_dir, store, p) = store();
        let claim = Entry::Claimed {
            lease_until: far(),
            epoch: 3,
            token: 9,
        }
        .encode();
        let expired = Entry::Done { expires_at: 1 }.encode();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"c"), Some(&claim), None).unwrap();
        batch.restore(&key(b"c"), None, Some(9)).unwrap();
        batch.restore(&key(b"e"), Some(&expired), None).unwrap();
        batch.restore(&key(b"e"), Some(&claim), None).unwrap();
        batch.commit().unwrap();
        assert_eq!(store.check(&p, b"c").unwrap(), Verdict::New);
        assert!(matches!(
            store
                .claim(&p, b"e", std::time::Duration::from_secs(1))
                .unwrap(),
            crate::Claim::InFlight {
                holder_epoch: 3,
                ..
            }
        ));
    }

    fn claimed(lease_until: u64, epoch: u64, token: u64) -> Vec<u8> {
        Entry::Claimed {
            lease_until,
            epoch,
            token,
        }
        .encode()
    }

    fn in_flight(store: &Store, p: &Partition, k: &[u8]) -> Option<u64> {
        match store
            .claim(p, k, std::time::Duration::from_secs(1))
            .unwrap()
        {
            crate::Claim::InFlight { holder_epoch, .. } => Some(holder_epoch),
            _ => None,
        }
    }

    /// Two processors' claims on one key (an owner that died after its
    /// side effect, and a zombie or a late outbox): a release by either
    /// leaves the key in doubt, under the later lease.
    #[test]
    fn a_claim_over_another_processors_claim_stays_in_doubt_whatever_either_releases() {
        let (_dir, store, p) = store();
        let mut batch = store.batch(&p).unwrap();
        // Owner 5, then a zombie's claim with a short lease, then its release.
        batch
            .restore(&key(b"z"), Some(&claimed(far(), 5, 50)), None)
            .unwrap();
        batch
            .restore(&key(b"z"), Some(&claimed(1, 2, 20)), None)
            .unwrap();
        batch.restore(&key(b"z"), None, Some(20)).unwrap();
        // A takeover by the next owner, then the first owner's late release.
        batch
            .restore(&key(b"t"), Some(&claimed(far(), 5, 50)), None)
            .unwrap();
        batch
            .restore(&key(b"t"), Some(&claimed(far(), 6, 60)), None)
            .unwrap();
        batch.restore(&key(b"t"), None, Some(50)).unwrap();
        // One claim published twice (an outbox published again), released.
        batch
            .restore(&key(b"r"), Some(&claimed(far(), 5, 70)), None)
            .unwrap();
        batch
            .restore(&key(b"r"), Some(&claimed(far(), 5, 70)), None)
            .unwrap();
        batch.restore(&key(b"r"), None, Some(70)).unwrap();
        batch.commit().unwrap();
        assert_eq!(in_flight(&store, &p, b"z"), Some(5));
        assert_eq!(in_flight(&store, &p, b"t"), Some(6));
        assert_eq!(store.check(&p, b"r").unwrap(), Verdict::New);
    }

    /// A release removes the claim it names only; a claim whose lease
    /// outlasts a mark replaces it, whatever the restoring store's clock.
    #[test]
    fn a_release_names_its_claim_and_a_claim_outlasting_a_mark_replaces_it() {
        let (_dir, store, p) = store();
        store.mark(&p, b"m").unwrap();
        let mut batch = store.batch(&p).unwrap();
        batch
            .restore(&key(b"c"), Some(&claimed(far(), 3, 9)), None)
            .unwrap();
        batch.restore(&key(b"c"), None, Some(8)).unwrap();
        batch
            .restore(&key(b"m"), Some(&claimed(u64::MAX, 4, 11)), None)
            .unwrap();
        batch.commit().unwrap();
        assert_eq!(in_flight(&store, &p, b"c"), Some(3));
        assert_eq!(in_flight(&store, &p, b"m"), Some(4));
    }

    #[test]
    fn a_restored_claim_is_in_flight() {
        let (_dir, store, p) = store();
        let claim = Entry::Claimed {
            lease_until: far(),
            epoch: 3,
            token: 9,
        }
        .encode();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"c"), Some(&claim), None).unwrap();
        batch.commit().unwrap();
        assert!(matches!(
            store
                .claim(&p, b"c", std::time::Duration::from_secs(1))
                .unwrap(),
            crate::Claim::InFlight {
                holder_epoch: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_malformed_record_is_refused_and_nothing_of_its_batch_is_applied() {
        let (_dir, store, p) = store();
        let good = Entry::Done { expires_at: far() }.encode();
        let mut batch = store.batch(&p).unwrap();
        batch.restore(&key(b"ok"), Some(&good), None).unwrap();
        for (k, v) in [
            (b"\x00offset".to_vec(), Some(good.clone())),
            (vec![MARK_TAG], Some(good.clone())),
            (key(b"x"), Some(vec![7, 7])),
        ] {
            assert!(matches!(
                batch.restore(&k, v.as_deref(), None),
                Err(Error::BadChangelogRecord { .. })
            ));
        }
        drop(batch);
        assert_eq!(store.check(&p, b"ok").unwrap(), Verdict::New);
    }

    #[test]
    fn an_outbox_entry_is_written_with_the_marks_and_removed_when_completed() {
        let (_dir, store, p) = store();
        let mut batch = store.batch(&p).unwrap();
        batch.record_changes(10);
        assert_eq!(batch.check_and_mark(b"a").unwrap(), Verdict::New);
        batch
            .send(crate::OutboxRecord::new("events", "a", "v"))
            .unwrap();
        batch.set_offset(11);
        let (seq, entry) = batch.commit_published().unwrap().unwrap();
        assert_eq!((entry.start, entry.next), (10, 11));
        assert_eq!(entry.changes.len(), 1);
        assert_eq!(entry.records.len(), 1);
        // It survives a reopen, in order.
        store.revoke(&p).unwrap();
        store.assign(&p).unwrap();
        let pending = store.outbox(&p).unwrap();
        assert_eq!(pending, vec![(seq, entry)]);
        let mut batch = store.batch(&p).unwrap();
        batch.record_changes(11);
        batch.set_offset(12);
        let (next, _) = batch.commit_published().unwrap().unwrap();
        assert!(next > seq, "sequence numbers go up after a reassign");
        store
            .batch(&p)
            .unwrap()
            .complete_outbox(next, Some(40))
            .unwrap();
        assert!(store.outbox(&p).unwrap().is_empty());
        assert_eq!(store.changelog_offset(&p).unwrap(), Some(40));
    }

    #[test]
    fn a_handler_failure_drops_the_records_it_staged() {
        let (_dir, store, p) = store();
        let mut batch = store.batch(&p).unwrap();
        batch.record_changes(0);
        batch.send(crate::OutboxRecord::new("t", "1", "v")).unwrap();
        let n = batch.outbox_len();
        batch.send(crate::OutboxRecord::new("t", "2", "v")).unwrap();
        batch.truncate_outbox(n);
        batch.set_offset(1);
        let (_, entry) = batch.commit_published().unwrap().unwrap();
        assert_eq!(entry.records.len(), 1);
    }
}
