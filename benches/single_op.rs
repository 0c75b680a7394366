//! The single-operation path: `check` and `check_and_mark` of new keys and
//! of duplicates, on a store holding 1 M keys; and what durability costs per
//! write: `sync()` after a mark (one log fsync plus the durability ledger's
//! update) against a mark under `Durability::Sync` (one log fsync).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use exactly::{Durability, Options, Partition, Store};

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k[8..].copy_from_slice(&i.to_le_bytes());
    k
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let stored = 1_000_000u64;
    let store = Store::open(
        dir.path(),
        Options::default()
            .ttl(Duration::from_secs(24 * 3600))
            .expected_keys_per_partition(4 * stored as usize),
    )
    .unwrap();
    let p = Partition::new("bench", 0);
    store.assign(&p).unwrap();
    for chunk in (0..stored).collect::<Vec<_>>().chunks(10_000) {
        let mut b = store.batch(&p).unwrap();
        for &i in chunk {
            b.mark(&key(i)).unwrap();
        }
        b.commit().unwrap();
    }

    let mut g = c.benchmark_group("single_op");
    g.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    g.bench_function("check/new", |b| {
        b.iter(|| {
            n += 1;
            store.check(&p, &key(u64::MAX - n)).unwrap()
        })
    });
    let mut d = 0u64;
    g.bench_function("check/duplicate", |b| {
        b.iter(|| {
            d = (d + 7_919) % stored;
            store.check(&p, &key(d)).unwrap()
        })
    });
    let mut m = stored;
    g.bench_function("check_and_mark/new", |b| {
        b.iter(|| {
            m += 1;
            store.check_and_mark(&p, &key(m)).unwrap()
        })
    });
    g.bench_function("check_and_mark/duplicate", |b| {
        b.iter(|| {
            d = (d + 7_919) % stored;
            store.check_and_mark(&p, &key(d)).unwrap()
        })
    });
    let mut s = u64::MAX / 2;
    g.bench_function("check_and_mark+sync/new", |b| {
        b.iter(|| {
            s += 1;
            store.check_and_mark(&p, &key(s)).unwrap();
            store.sync().unwrap()
        })
    });
    g.finish();

    let sync_dir = tempfile::tempdir().unwrap();
    let synced = Store::open(
        sync_dir.path(),
        Options::default()
            .ttl(Duration::from_secs(24 * 3600))
            .durability(Durability::Sync),
    )
    .unwrap();
    synced.assign(&p).unwrap();
    let mut g = c.benchmark_group("single_op");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check_and_mark/new/durability_sync", |b| {
        b.iter(|| {
            s += 1;
            synced.check_and_mark(&p, &key(s)).unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
