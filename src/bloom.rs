//! The in-memory Bloom front, made of generations that expire with the keys.
//!
//! Keys are filed by the time their mark expires: generation `i` holds the
//! keys whose expiry falls in `[i·W, (i+1)·W)`, with the window `W = ttl / 4`.
//! Once `now ≥ (i+1)·W` every key of generation `i` has expired, so the whole
//! generation is dropped: memory stays bounded by the live keys, and the
//! false-positive rate does not creep up as keys come and go. A lookup asks
//! every live generation (at most `4 + 1` for keys marked with the store's
//! TTL), each sized for a quarter of the expected live keys at `1/5` of the
//! target false-positive rate, so their union stays within the target.
//!
//! A generation that receives more keys than it was sized for grows another
//! filter of the same size instead of degrading; answers stay exact (the
//! filter is only ever a front: a positive is confirmed on disk).

use std::collections::btree_map::Entry;
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use fastbloom::BloomFilter;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// How many generation windows one TTL spans.
const WINDOWS_PER_TTL: u64 = 4;
/// [`WINDOWS_PER_TTL`] as a count of filters.
const WINDOWS: usize = 4;
const _: () = assert!(WINDOWS as u64 == WINDOWS_PER_TTL);

/// A Bloom filter whose keys expire.
pub struct ExpiringFilter {
    /// Seed of the one hash computed per key; every generation derives its
    /// probes from it.
    seed: u64,
    window_ms: u64,
    keys_per_filter: usize,
    fp_per_filter: f64,
    generations: BTreeMap<u64, Generation>,
}

struct Generation {
    filters: Vec<BloomFilter>,
    in_last: usize,
}

impl ExpiringFilter {
    /// A filter for about `expected_live_keys` live keys at once, each living
    /// `ttl_ms`, with a total false-positive rate of about `fp_rate`.
    pub fn new(expected_live_keys: usize, fp_rate: f64, ttl_ms: u64) -> Self {
        let per_window = expected_live_keys.div_ceil(WINDOWS);
        Self {
            seed: RandomState::new().build_hasher().finish(),
            window_ms: (ttl_ms / WINDOWS_PER_TTL).max(1),
            keys_per_filter: per_window.max(1),
            fp_per_filter: fp_rate / (WINDOWS_PER_TTL + 1) as f64,
            generations: BTreeMap::new(),
        }
    }

    /// Records `key`, whose mark expires at `expires_at` (ms).
    pub fn insert(&mut self, key: &[u8], expires_at: u64) {
        let hash = xxh3_64_with_seed(key, self.seed);
        let index = expires_at / self.window_ms;
        let (keys, fp) = (self.keys_per_filter, self.fp_per_filter);
        let generation = match self.generations.entry(index) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Generation {
                filters: vec![new_bloom(keys, fp)],
                in_last: 0,
            }),
        };
        if generation.in_last >= self.keys_per_filter {
            let bloom = new_bloom(keys, fp);
            generation.filters.push(bloom);
            generation.in_last = 0;
        }
        if let Some(last) = generation.filters.last_mut() {
            last.insert_hash(hash);
            generation.in_last += 1;
        }
    }

    /// `false` only if `key` has no live mark at `now` (ms): a definite "new".
    /// `true` means "maybe": confirm on disk.
    pub fn may_contain(&self, key: &[u8], now: u64) -> bool {
        let hash = xxh3_64_with_seed(key, self.seed);
        self.generations
            .range(now / self.window_ms..)
            .any(|(_, g)| g.filters.iter().any(|f| f.contains_hash(hash)))
    }

    /// Drops the generations whose keys have all expired at `now` (ms).
    pub fn expire(&mut self, now: u64) {
        let first_live = now / self.window_ms;
        if self
            .generations
            .first_key_value()
            .is_some_and(|(&i, _)| i < first_live)
        {
            self.generations = self.generations.split_off(&first_live);
        }
    }

    /// Appends the filter's serialized form to `out` (little-endian words).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut word = |w: u64| out.extend_from_slice(&w.to_le_bytes());
        word(self.seed);
        word(self.window_ms);
        word(self.keys_per_filter as u64);
        word(self.fp_per_filter.to_bits());
        word(self.generations.len() as u64);
        for (&index, g) in &self.generations {
            word(index);
            word(g.in_last as u64);
            word(g.filters.len() as u64);
            for f in &g.filters {
                word(u64::from(f.num_hashes()));
                word(f.as_slice().len() as u64);
                for &w in f.as_slice() {
                    word(w);
                }
            }
        }
    }

    /// Reads a filter written by [`encode`](Self::encode) for the same sizing
    /// parameters; `None` if the bytes are malformed or the parameters differ
    /// (the options changed: the filter must be rebuilt).
    pub(crate) fn decode(
        bytes: &[u8],
        expected_live_keys: usize,
        fp_rate: f64,
        ttl_ms: u64,
    ) -> Option<(Self, usize)> {
        let fresh = Self::new(expected_live_keys, fp_rate, ttl_ms);
        let (filter, used) = Self::decode_any(bytes)?;
        let same = filter.window_ms == fresh.window_ms
            && filter.keys_per_filter == fresh.keys_per_filter
            && filter.fp_per_filter.to_bits() == fresh.fp_per_filter.to_bits();
        same.then_some((filter, used))
    }

    /// Reads a filter written by [`encode`](Self::encode) with whatever
    /// sizing it was written with (for the health check, which does not
    /// know the consumer's options); `None` if the bytes are malformed.
    pub(crate) fn decode_any(bytes: &[u8]) -> Option<(Self, usize)> {
        let mut words = bytes.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        });
        let mut next = || words.next();
        let seed = next()?;
        let window_ms = next()?;
        let keys_per_filter = usize::try_from(next()?).ok()?;
        let fp_per_filter = f64::from_bits(next()?);
        // A zero window would divide by zero in every lookup.
        if window_ms == 0 || keys_per_filter == 0 || !(fp_per_filter > 0.0 && fp_per_filter < 1.0) {
            return None;
        }
        let mut generations = BTreeMap::new();
        let mut used = 5;
        for _ in 0..next()? {
            let index = next()?;
            let in_last = usize::try_from(next()?).ok()?;
            let count = next()?;
            used += 3;
            let mut filters = Vec::new();
            for _ in 0..count {
                let hashes = u32::try_from(next()?).ok()?;
                let len = usize::try_from(next()?).ok()?;
                used += 2 + len;
                if len == 0 || hashes == 0 || used * 8 > bytes.len() {
                    return None;
                }
                let bits: Vec<u64> = (0..len).map(|_| next()).collect::<Option<_>>()?;
                filters.push(BloomFilter::from_vec(bits).hashes(hashes));
            }
            if filters.is_empty() {
                return None;
            }
            generations.insert(index, Generation { filters, in_last });
        }
        let filter = Self {
            seed,
            window_ms,
            keys_per_filter,
            fp_per_filter,
            generations,
        };
        Some((filter, used * 8))
    }

    /// Bytes of filter bits held.
    pub fn memory_bytes(&self) -> usize {
        self.generations
            .values()
            .flat_map(|g| &g.filters)
            .map(|f| f.num_bits() / 8)
            .sum()
    }
}

fn new_bloom(keys: usize, fp: f64) -> BloomFilter {
    BloomFilter::with_false_pos(fp).expected_items(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> [u8; 8] {
        i.to_le_bytes()
    }

    #[test]
    fn never_a_false_negative_for_live_keys() {
        let ttl = 1_000;
        let mut f = ExpiringFilter::new(1_000, 0.01, ttl);
        for i in 0..2_000u64 {
            f.insert(&key(i), i + ttl);
        }
        let now = 1_500;
        f.expire(now);
        for i in 0..2_000u64 {
            if i + ttl > now {
                assert!(f.may_contain(&key(i), now), "live key {i} missing");
            }
        }
    }

    #[test]
    fn expired_generations_are_dropped_and_answer_no() {
        let ttl = 1_000;
        let mut f = ExpiringFilter::new(100, 0.01, ttl);
        f.insert(b"a", ttl);
        assert!(f.may_contain(b"a", 0));
        assert!(f.memory_bytes() > 0);
        // Expired by time even before the generation is dropped.
        assert!(!f.may_contain(b"a", 2 * ttl));
        f.expire(2 * ttl);
        assert_eq!(f.memory_bytes(), 0);
    }

    /// Steady traffic for ten TTLs: the false-positive rate stays within 2x of
    /// the target and memory does not grow.
    #[test]
    fn accuracy_and_memory_hold_over_ten_ttls() {
        let (n, fp, ttl) = (20_000usize, 0.01, 100_000u64);
        let step = ttl / n as u64; // n live keys at once
        let mut f = ExpiringFilter::new(n, fp, ttl);
        let mut now = 0;
        let mut next = 0u64;
        let mut memory_after_first_ttl = 0;
        while now < 10 * ttl {
            f.expire(now);
            f.insert(&key(next), now + ttl);
            next += 1;
            now += step;
            if now == 2 * ttl {
                memory_after_first_ttl = f.memory_bytes();
            }
        }
        let probes = 200_000u64;
        let positives = (0..probes)
            .filter(|i| f.may_contain(&key(u64::MAX - i), now))
            .count();
        let rate = positives as f64 / probes as f64;
        assert!(rate <= 2.0 * fp, "false-positive rate {rate} over 2x {fp}");
        assert!(memory_after_first_ttl > 0);
        assert!(
            f.memory_bytes() <= memory_after_first_ttl + memory_after_first_ttl / 4,
            "memory grew from {memory_after_first_ttl} to {}",
            f.memory_bytes()
        );
    }

    #[test]
    fn encode_decode_round_trips_and_refuses_other_parameters() {
        let mut f = ExpiringFilter::new(1_000, 0.01, 10_000);
        for i in 0..3_000u64 {
            f.insert(&key(i), 10_000 + i * 7);
        }
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        bytes.extend_from_slice(b"trailer");
        let (g, used) = ExpiringFilter::decode(&bytes, 1_000, 0.01, 10_000).unwrap();
        assert_eq!(used, bytes.len() - 7);
        assert_eq!(g.memory_bytes(), f.memory_bytes());
        assert!((0..3_000u64).all(|i| g.may_contain(&key(i), 0)));
        assert!(ExpiringFilter::decode(&bytes, 2_000, 0.01, 10_000).is_none());
        assert!(ExpiringFilter::decode(&bytes, 1_000, 0.01, 20_000).is_none());
        assert!(ExpiringFilter::decode(&bytes[..bytes.len() / 2], 1_000, 0.01, 10_000).is_none());
    }

    #[test]
    fn decode_any_reads_any_sizing_and_refuses_a_zero_window() {
        let mut f = ExpiringFilter::new(500, 0.02, 8_000);
        f.insert(b"k", 9_000);
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        let (g, used) = ExpiringFilter::decode_any(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert!(g.may_contain(b"k", 0));
        // The sizing-checked decode refuses what decode_any accepts.
        assert!(ExpiringFilter::decode(&bytes, 1_000, 0.01, 10_000).is_none());
        let mut zero = bytes.clone();
        zero[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert!(ExpiringFilter::decode_any(&zero).is_none());
    }

    #[test]
    fn overflowing_a_generation_adds_a_filter() {
        let mut f = ExpiringFilter::new(40, 0.01, 1_000);
        let before = {
            f.insert(&key(0), 500);
            f.memory_bytes()
        };
        for i in 1..100 {
            f.insert(&key(i), 500);
        }
        assert!(f.memory_bytes() > before);
        assert!((0..100).all(|i| f.may_contain(&key(i), 0)));
    }
}
