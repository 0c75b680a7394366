//! The Bloom front's memory and false positives in steady state: bits per
//! live key and the false-positive rate at the worst moment, for the crate's
//! `ExpiringFilter` and for variants of its generation scheme built here on
//! the same fastbloom 0.17.
//!
//! ```text
//! cargo run --release --example filter_bits                    # 1 M live keys, 1 M probes a moment
//! cargo run --release --example filter_bits -- 10000000 2000000
//! ```
//!
//! Simulation: traffic inserts one key every 24 ms (or a Poisson(1) number
//! of keys, for the rows marked so) with expiry `now + ttl`, `ttl` being
//! `24 × live_keys` ms, and calls `expire(now)` before each insert, so that
//! `live_keys` marks are live at once. After two TTLs of warm-up it measures
//! one TTL: at the middle of and just before the end of each generation
//! window (the worst moment: every live generation is full, the oldest one
//! almost entirely expired) it records the filter's total bits over the live
//! keys and the share of never-inserted keys it answers "maybe" for
//! (`probes` keys a moment), and checks a sample of live keys for false
//! negatives. Insert and check costs are the mean wall time of the measured
//! TTL's inserts and of every probe, key construction and hashing included.
//!
//! Rows (target 1 % false positives unless the row fixes the bits):
//! * `crate`: `exactly::internals::ExpiringFilter` itself (W = 4 windows a
//!   TTL, each generation sized for a quarter of the live keys at 1 %/5).
//! * `W=w fp/(w+1)`: the same scheme with `w` windows a TTL.
//! * `12 bits, W=w`: generations sized so that memory is 12 bits per live key
//!   when `w + 1` generations exist (the most there are), best hash count.
//! * `k=h`: the crate's sizing with `h` hashes instead of fastbloom's choice.
//! * `unequal`: fp budgets that differ by generation (index mod 5), any five
//!   consecutive generations summing to 1 %.
//! * `chunks`: a generation grows by filters of a sixteenth of the live keys
//!   (sized by what it receives) instead of allocating a quarter at once.
//! * `overflow 1/8`: a generation that receives more keys than it was sized
//!   for grows by a filter an eighth of the size instead of a full one
//!   (only matters under uneven traffic: the Poisson rows).
//! * `one filter, no expiry`: a single fastbloom filter holding the live keys
//!   once at 1 %, never expiring: the floor for any Bloom layout.
//!
//! What it showed (1 M live keys, 2-core VM): no row reaches 12 bits per live
//! key at 1 %. At the worst moment all `W + 1` generations are full (the
//! newest has just received its last key, the oldest is not yet dropped), so
//! the union's rate is the sum of `W + 1` full filters' rates and memory is
//! `(1 + 1/W)` times the live keys' worth: the model
//! `(1 + 1/W) · 1.44 · log2((W + 1) / fp)` matches the equal-budget rows under
//! even traffic to 0.01 bit, with a best of 15.9 (W = 6 to 8). Unequal budgets cost bits (convexity), other
//! hash counts cost false positives, and fastbloom 0.17 is an unblocked
//! filter (the `one filter` row meets the textbook 9.59 bits at 1 %), so there
//! is no layout overhead to win back. At 12 bits the best worst-moment rate is
//! about 4.9 % (W = 4). Under Poisson traffic at the expected load, half the
//! generations receive a few more keys than they were sized for, and the
//! crate's full-size overflow filters raise the worst moment to 25.9 bits per
//! live key (17.4 with overflow filters an eighth of the size).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use exactly::internals::ExpiringFilter;
use fastbloom::BloomFilter;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const FP: f64 = 0.01;
/// Milliseconds between inserts: a multiple of every window count tried, so
/// that each window is exactly `ttl / W`.
const STEP: u64 = 24;
/// Ids of probe keys start here; inserted keys count up from 0.
const PROBE_BASE: u64 = 1 << 62;

/// 17-byte keys, as in `benches/filter.rs`.
fn key(i: u64) -> [u8; 17] {
    let mut k = [1u8; 17];
    k[1..9].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k[9..].copy_from_slice(&i.to_le_bytes());
    k
}

trait Front {
    fn insert(&mut self, key: &[u8], expires_at: u64);
    fn may_contain(&self, key: &[u8], now: u64) -> bool;
    fn expire(&mut self, now: u64);
    fn bits(&self) -> usize;
}

impl Front for ExpiringFilter {
    fn insert(&mut self, key: &[u8], expires_at: u64) {
        ExpiringFilter::insert(self, key, expires_at)
    }
    fn may_contain(&self, key: &[u8], now: u64) -> bool {
        ExpiringFilter::may_contain(self, key, now)
    }
    fn expire(&mut self, now: u64) {
        ExpiringFilter::expire(self, now)
    }
    fn bits(&self) -> usize {
        self.memory_bytes() * 8
    }
}

/// How one filter of a generation is sized.
#[derive(Clone, Copy)]
enum Size {
    /// fastbloom's own sizing for a false-positive rate (what the crate does).
    Fp(f64),
    /// A number of bits per key it is sized for, and the hash count
    /// (fastbloom's choice for that size when `None`).
    Bits(f64, Option<u32>),
}

impl Size {
    fn bloom(self, keys: usize) -> BloomFilter {
        match self {
            Size::Fp(fp) => BloomFilter::with_false_pos(fp).expected_items(keys),
            Size::Bits(per_key, hashes) => {
                let bits =
                    BloomFilter::with_num_bits(((per_key * keys as f64).ceil() as usize).max(64));
                match hashes {
                    Some(h) => bits.hashes(h),
                    None => bits.expected_items(keys),
                }
            }
        }
    }
}

/// The crate's generation scheme with its parameters open.
struct Gens {
    seed: u64,
    window: u64,
    /// Keys the first `chunks` filters of a generation are sized for.
    keys_per_filter: usize,
    chunks: usize,
    /// Filters past the first `chunks` are sized for
    /// `keys_per_filter / overflow_div` keys.
    overflow_div: usize,
    /// Sizing of generation `i` is `sizes[i % sizes.len()]`.
    sizes: Vec<Size>,
    gens: BTreeMap<u64, Gen>,
}

struct Gen {
    filters: Vec<BloomFilter>,
    in_last: usize,
    cap_last: usize,
}

impl Gens {
    fn new(live_keys: usize, ttl: u64, windows: u64, chunks: usize, sizes: Vec<Size>) -> Self {
        Self {
            seed: 0x5eed,
            window: (ttl / windows).max(1),
            keys_per_filter: live_keys.div_ceil(windows as usize).div_ceil(chunks).max(1),
            chunks,
            overflow_div: 1,
            sizes,
            gens: BTreeMap::new(),
        }
    }

    fn overflow_div(mut self, div: usize) -> Self {
        self.overflow_div = div;
        self
    }
}

impl Front for Gens {
    fn insert(&mut self, key: &[u8], expires_at: u64) {
        let hash = xxh3_64_with_seed(key, self.seed);
        let index = expires_at / self.window;
        let size = self.sizes[(index % self.sizes.len() as u64) as usize];
        let (base, chunks, div) = (self.keys_per_filter, self.chunks, self.overflow_div);
        let g = self.gens.entry(index).or_insert_with(|| Gen {
            filters: vec![size.bloom(base)],
            in_last: 0,
            cap_last: base,
        });
        if g.in_last >= g.cap_last {
            let cap = if g.filters.len() < chunks {
                base
            } else {
                (base / div).max(1)
            };
            g.filters.push(size.bloom(cap));
            g.in_last = 0;
            g.cap_last = cap;
        }
        if let Some(last) = g.filters.last_mut() {
            last.insert_hash(hash);
            g.in_last += 1;
        }
    }

    fn may_contain(&self, key: &[u8], now: u64) -> bool {
        let hash = xxh3_64_with_seed(key, self.seed);
        self.gens
            .range(now / self.window..)
            .any(|(_, g)| g.filters.iter().any(|f| f.contains_hash(hash)))
    }

    fn expire(&mut self, now: u64) {
        let first_live = now / self.window;
        if self
            .gens
            .first_key_value()
            .is_some_and(|(&i, _)| i < first_live)
        {
            self.gens = self.gens.split_off(&first_live);
        }
    }

    fn bits(&self) -> usize {
        self.gens
            .values()
            .flat_map(|g| &g.filters)
            .map(|f| f.num_bits())
            .sum()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Traffic {
    /// One key a millisecond.
    Even,
    /// A Poisson(1) number of keys a millisecond.
    Poisson,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn poisson1(&mut self) -> u32 {
        let limit = (-1.0f64).exp();
        let (mut k, mut p) = (0, 1.0);
        loop {
            p *= (self.next() >> 11) as f64 / (1u64 << 53) as f64;
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
}

struct Outcome {
    /// Bits per live key, the largest over the moments.
    bits_max: f64,
    /// False-positive rate: the worst moment's and the mean over the moments.
    fp_worst: f64,
    fp_mean: f64,
    insert_ns: f64,
    check_ns: f64,
}

/// Runs steady traffic through `front` (windows of `window` ms) and measures.
fn simulate(
    front: &mut dyn Front,
    live_keys: u64,
    window: u64,
    traffic: Traffic,
    probes: u64,
) -> Outcome {
    let ttl = live_keys * STEP;
    // Moments (as step numbers): the middle and the last step of a few
    // windows of the measured TTL (2·ttl..3·ttl).
    let boundaries: Vec<u64> = (1..)
        .map(|j| j * window)
        .skip_while(|&b| b < 2 * ttl + window)
        .take_while(|&b| b <= 3 * ttl)
        .collect();
    let stride = boundaries.len().div_ceil(6).max(1);
    let mut moments: Vec<u64> = boundaries
        .iter()
        .step_by(stride)
        .flat_map(|&b| [(b - window / 2) / STEP, (b - 1) / STEP])
        .collect();
    moments.sort_unstable();
    moments.dedup();

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // first_id[s]: the id of the first key inserted at step s.
    let mut first_id = Vec::with_capacity(3 * live_keys as usize + 2);
    let mut next_id = 0u64;
    let mut moment = moments.iter().copied().peekable();
    let (mut bits_max, mut fp_worst, mut fp_sum) = (0f64, 0f64, 0f64);
    let (mut insert_time, mut inserted) = (0f64, 0u64);
    let (mut check_time, mut checked) = (0f64, 0u64);
    let mut started = Instant::now();
    for step in 0..=3 * live_keys {
        let now = step * STEP;
        if step == 2 * live_keys {
            started = Instant::now();
        }
        front.expire(now);
        let count = match traffic {
            Traffic::Even => 1,
            Traffic::Poisson => rng.poisson1(),
        };
        first_id.push(next_id);
        for _ in 0..count {
            front.insert(&key(next_id), now + ttl);
            next_id += 1;
        }
        if step >= 2 * live_keys {
            inserted += u64::from(count);
        }
        if moment.next_if_eq(&step).is_none() {
            continue;
        }
        insert_time += started.elapsed().as_secs_f64();
        // Live: inserted after now - ttl.
        let first_live = first_id[(step + 1 - live_keys) as usize];
        let live = next_id - first_live;
        let stride = (live / 10_000).max(1);
        let missing = (first_live..next_id)
            .step_by(stride as usize)
            .filter(|&i| !front.may_contain(&key(i), now))
            .count();
        assert_eq!(missing, 0, "false negatives at {now}");
        let base = PROBE_BASE + step * probes;
        let t = Instant::now();
        let positives = (base..base + probes)
            .filter(|&i| black_box(front.may_contain(&key(i), now)))
            .count();
        check_time += t.elapsed().as_secs_f64();
        checked += probes;
        let fp = positives as f64 / probes as f64;
        let bits = front.bits() as f64 / live as f64;
        bits_max = bits_max.max(bits);
        fp_worst = fp_worst.max(fp);
        fp_sum += fp;
        started = Instant::now();
    }
    insert_time += started.elapsed().as_secs_f64();
    Outcome {
        bits_max,
        fp_worst,
        fp_mean: fp_sum / moments.len() as f64,
        insert_ns: insert_time * 1e9 / inserted as f64,
        check_ns: check_time * 1e9 / checked as f64,
    }
}

/// The hash count fastbloom would choose for `bits_per_key`.
fn best_hashes(bits_per_key: f64) -> u32 {
    ((bits_per_key * std::f64::consts::LN_2).round() as u32).max(1)
}

/// The model: bits per live key of `w + 1` generations of `1/w` of the live
/// keys each, at `fp / (w + 1)`.
fn model_bits(w: u64) -> f64 {
    (1.0 + 1.0 / w as f64) * (-(FP / (w + 1) as f64).ln()) / std::f64::consts::LN_2.powi(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let live_keys: u64 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("live keys"));
    let probes: u64 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("probes"));
    let n = live_keys as usize;
    let ttl = live_keys * STEP;
    println!(
        "{live_keys} live keys, {probes} probes a moment, target {}% (fastbloom 0.17)",
        FP * 100.0
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "scheme", "bits/live", "model", "fp worst", "fp mean", "insert ns", "check ns"
    );
    let row = |name: &str, model: Option<f64>, o: Outcome| {
        println!(
            "{:<34} {:>10.2} {:>9} {:>8.3}% {:>9.3}% {:>10.1} {:>10.1}",
            name,
            o.bits_max,
            model.map_or("".into(), |m| format!("{m:.2}")),
            o.fp_worst * 100.0,
            o.fp_mean * 100.0,
            o.insert_ns,
            o.check_ns
        );
    };

    // The floor: one filter of the live keys, never expiring.
    {
        let mut f = BloomFilter::with_false_pos(FP).expected_items(n);
        let t = Instant::now();
        for i in 0..live_keys {
            f.insert_hash(xxh3_64_with_seed(&key(i), 1));
        }
        let insert_ns = t.elapsed().as_secs_f64() * 1e9 / live_keys as f64;
        let t = Instant::now();
        let positives = (PROBE_BASE..PROBE_BASE + probes)
            .filter(|&i| black_box(f.contains_hash(xxh3_64_with_seed(&key(i), 1))))
            .count();
        let check_ns = t.elapsed().as_secs_f64() * 1e9 / probes as f64;
        let fp = positives as f64 / probes as f64;
        let o = Outcome {
            bits_max: f.num_bits() as f64 / live_keys as f64,
            fp_worst: fp,
            fp_mean: fp,
            insert_ns,
            check_ns,
        };
        row(
            &format!("one filter, no expiry (k={})", f.num_hashes()),
            Some(-FP.ln() / std::f64::consts::LN_2.powi(2)),
            o,
        );
    }

    for traffic in [Traffic::Even, Traffic::Poisson] {
        let tag = if traffic == Traffic::Poisson {
            ", Poisson"
        } else {
            ""
        };
        let mut crate_filter = ExpiringFilter::new(n, FP, ttl);
        let o = simulate(&mut crate_filter, live_keys, ttl / 4, traffic, probes);
        row(&format!("crate (W=4, fp/5){tag}"), Some(model_bits(4)), o);
        if traffic == Traffic::Poisson {
            let sizes = vec![Size::Fp(FP / 5.0)];
            let mut g = Gens::new(n, ttl, 4, 1, sizes).overflow_div(8);
            let o = simulate(&mut g, live_keys, ttl / 4, traffic, probes);
            row(
                &format!("W=4 fp/5, overflow 1/8{tag}"),
                Some(model_bits(4)),
                o,
            );
            continue;
        }
        for w in [2u64, 3, 4, 6, 8, 12] {
            let sizes = vec![Size::Fp(FP / (w + 1) as f64)];
            let mut g = Gens::new(n, ttl, w, 1, sizes);
            let o = simulate(&mut g, live_keys, ttl / w, traffic, probes);
            row(&format!("W={w} fp/{}", w + 1), Some(model_bits(w)), o);
        }
        // The union's real rate, not the sum of the budgets: 1 - (1-q)^(w+1) = fp.
        for w in [6u64, 8] {
            let q = 1.0 - (1.0 - FP).powf(1.0 / (w + 1) as f64);
            let mut g = Gens::new(n, ttl, w, 1, vec![Size::Fp(q)]);
            let o = simulate(&mut g, live_keys, ttl / w, traffic, probes);
            row(&format!("W={w} exact union budget"), None, o);
        }
        for w in [2u64, 3, 4, 6, 8] {
            // Memory of w + 1 generations of n / w keys = 12 bits per live key.
            let per_key = 12.0 * w as f64 / (w + 1) as f64;
            let k = best_hashes(per_key);
            let mut g = Gens::new(n, ttl, w, 1, vec![Size::Bits(per_key, Some(k))]);
            let o = simulate(&mut g, live_keys, ttl / w, traffic, probes);
            row(&format!("12 bits, W={w} (k={k})"), None, o);
        }
        // The crate's sizing (W=4, fp/5: 12.93 bits a key) with other hash counts.
        let per_key = -(FP / 5.0).ln() / std::f64::consts::LN_2.powi(2);
        for k in [4u32, 6, 8, 9, 11] {
            let mut g = Gens::new(n, ttl, 4, 1, vec![Size::Bits(per_key, Some(k))]);
            let o = simulate(&mut g, live_keys, ttl / 4, traffic, probes);
            row(&format!("W=4 fp/5 bits, k={k}"), None, o);
        }
        // Unequal budgets: any 5 consecutive generations sum to 1 %.
        for (name, budgets) in [
            (
                "unequal 0.4%,0.15%x4",
                [0.004, 0.0015, 0.0015, 0.0015, 0.0015],
            ),
            ("unequal 0.6%,0.1%x4", [0.006, 0.001, 0.001, 0.001, 0.001]),
        ] {
            let sizes = budgets.iter().map(|&q| Size::Fp(q)).collect();
            let mut g = Gens::new(n, ttl, 4, 1, sizes);
            let o = simulate(&mut g, live_keys, ttl / 4, traffic, probes);
            row(&format!("W=4 {name}"), None, o);
        }
        // Sized by what it receives: a generation grows 4 filters of n/16,
        // so up to 20 filters answer at once: each at fp/20.
        let mut g = Gens::new(n, ttl, 4, 4, vec![Size::Fp(FP / 20.0)]);
        let o = simulate(&mut g, live_keys, ttl / 4, traffic, probes);
        row("W=4 chunks of n/16, fp/20", None, o);
    }
}
