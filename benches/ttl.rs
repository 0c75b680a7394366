//! TTL: the cost of expiry (a compaction that drops expired marks through the
//! compaction filter), and the filter's measured false-positive rate after ten
//! TTLs of steady traffic (printed).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use exactly::{ManualClock, Options, Partition, Store, Verdict};

const T0: u64 = 1_767_225_600_000;
const TTL: Duration = Duration::from_secs(3600);

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k[8..].copy_from_slice(&i.to_le_bytes());
    k
}

fn open(dir: &std::path::Path, clock: &ManualClock, expected: usize) -> (Store, Partition) {
    let store = Store::open(
        dir,
        Options::default()
            .ttl(TTL)
            .expected_keys_per_partition(expected)
            .clock(clock.clone()),
    )
    .unwrap();
    let p = Partition::new("bench", 0);
    store.assign(&p).unwrap();
    (store, p)
}

fn false_positive_rate_after_ten_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let live = 100_000u64;
    let (store, p) = open(dir.path(), &clock, live as usize);
    let step = TTL / (live as u32 / 1_000);
    let mut next = 0u64;
    for _ in 0..10 * live / 1_000 {
        let mut b = store.batch(&p).unwrap();
        for _ in 0..1_000 {
            b.mark(&key(next)).unwrap();
            next += 1;
        }
        b.commit().unwrap();
        clock.advance(step);
    }
    let before = store.stats().partitions[&p].clone();
    let probes = 200_000u64;
    for i in 0..probes {
        assert_eq!(store.check(&p, &key(u64::MAX - i)).unwrap(), Verdict::New);
    }
    let after = store.stats().partitions[&p].clone();
    let fp = (after.bloom_false_positives - before.bloom_false_positives) as f64 / probes as f64;
    eprintln!(
        "ttl: after 10 TTLs of steady traffic ({live} live keys): false-positive rate {:.4} (target 0.01), filter {} bytes = {:.1} bits per live key",
        fp,
        after.filter_bytes,
        after.filter_bytes as f64 * 8.0 / live as f64
    );
}

fn bench(c: &mut Criterion) {
    false_positive_rate_after_ten_ttls();
    let mut g = c.benchmark_group("ttl");
    let n = 200_000u64;
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("compaction_drops_200k_expired", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let clock = ManualClock::new(T0);
                let (store, p) = open(dir.path(), &clock, n as usize);
                for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
                    let mut b = store.batch(&p).unwrap();
                    for &i in chunk {
                        b.mark(&key(i)).unwrap();
                    }
                    b.commit().unwrap();
                }
                clock.advance(TTL);
                (dir, store, p)
            },
            |(dir, store, p)| {
                store.compact(&p).unwrap();
                assert_eq!(store.stats().partitions[&p].expired_dropped, n);
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
