//! The Bloom front alone: insert and check of new and present keys, at 1 M
//! and 100 M keys of capacity, and its bits per key.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use exactly::internals::ExpiringFilter;

const TTL_MS: u64 = 3_600_000;
const NOW: u64 = 1_000_000_000;

fn key(i: u64) -> [u8; 17] {
    let mut k = [1u8; 17];
    k[1..9].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k[9..].copy_from_slice(&i.to_le_bytes());
    k
}

fn filled(capacity: usize, fill: u64) -> ExpiringFilter {
    let mut f = ExpiringFilter::new(capacity, 0.01, TTL_MS);
    // Keys spread over one TTL of expiries, as steady traffic leaves them.
    for i in 0..fill {
        f.insert(&key(i), NOW + 1 + i % TTL_MS);
    }
    f
}

fn bench(c: &mut Criterion) {
    for (label, capacity, fill) in [
        ("1M", 1_000_000usize, 1_000_000u64),
        ("100M", 100_000_000, 2_000_000),
    ] {
        let f = filled(capacity, fill);
        eprintln!(
            "filter {label}: {} bytes, {:.1} bits per expected live key",
            f.memory_bytes(),
            f.memory_bytes() as f64 * 8.0 / capacity as f64
        );
        let mut g = c.benchmark_group(format!("filter/{label}"));
        g.throughput(Throughput::Elements(1));
        let mut i = 0u64;
        g.bench_function("check_new", |b| {
            b.iter(|| {
                i += 1;
                f.may_contain(&key(u64::MAX - i), NOW)
            })
        });
        let mut j = 0u64;
        g.bench_function("check_present", |b| {
            b.iter(|| {
                j = (j + 1) % fill;
                f.may_contain(&key(j), NOW)
            })
        });
        g.bench_function("insert", |b| {
            b.iter_batched_ref(
                || ExpiringFilter::new(capacity.min(1_000_000), 0.01, TTL_MS),
                |f| {
                    for n in 0..1_000u64 {
                        f.insert(&key(n), NOW + 1 + n);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
