//! The batch path: batches of 1 000 with 1 % redeliveries, 16-byte and
//! 36-byte (UUID text) keys.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use exactly::{Options, Partition, Store};

fn key16(i: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k.extend_from_slice(&i.to_le_bytes());
    k
}

fn key36(i: u64) -> Vec<u8> {
    let a = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = a.rotate_left(29) ^ i;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_1000");
    g.throughput(Throughput::Elements(1_000));
    for (label, make) in [("16B", key16 as fn(u64) -> Vec<u8>), ("36B", key36)] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            Options::default()
                .ttl(Duration::from_secs(24 * 3600))
                .expected_keys_per_partition(10_000_000),
        )
        .unwrap();
        let p = Partition::new("bench", 0);
        store.assign(&p).unwrap();
        let mut next = 0u64;
        let mut offset = 0i64;
        g.bench_function(label, |b| {
            b.iter(|| {
                let mut batch = store.batch(&p).unwrap();
                for j in 0..1_000u64 {
                    // 1 % redeliveries of a recent key.
                    let id = if j % 100 == 0 && next > 1_000 {
                        next - 500
                    } else {
                        next
                    };
                    next += 1;
                    batch.check_and_mark(&make(id)).unwrap();
                }
                offset += 1_000;
                batch.set_offset(offset);
                batch.commit().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
