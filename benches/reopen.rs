//! Reopen: time until a store holding N keys answers its first check, after a
//! clean close and after the process stopped without closing (the files as a
//! killed process leaves them: the write-ahead log not flushed to tables).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use exactly::{Options, Partition, Store, Verdict};

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k[8..].copy_from_slice(&i.to_le_bytes());
    k
}

fn options(n: u64) -> Options {
    Options::default()
        .ttl(Duration::from_secs(24 * 3600))
        .expected_keys_per_partition(n as usize)
}

fn fill(dir: &std::path::Path, n: u64) -> Store {
    let store = Store::open(dir, options(n)).unwrap();
    let p = Partition::new("bench", 0);
    store.assign(&p).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut b = store.batch(&p).unwrap();
        for &i in chunk {
            b.mark(&key(i)).unwrap();
        }
        b.commit().unwrap();
    }
    store
}

fn first_answer(dir: &std::path::Path, n: u64) {
    let store = Store::open(dir, options(n)).unwrap();
    let p = Partition::new("bench", 0);
    store.assign(&p).unwrap();
    assert_eq!(store.check(&p, &key(n / 2)).unwrap(), Verdict::Duplicate);
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("reopen");
    g.sample_size(10);
    for n in [100_000u64, 1_000_000] {
        let clean = tempfile::tempdir().unwrap();
        fill(clean.path(), n).close().unwrap();
        g.bench_function(format!("clean_close/{n}"), |b| {
            b.iter(|| first_answer(clean.path(), n))
        });
        g.bench_function(format!("unclean/{n}"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    drop(fill(dir.path(), n));
                    dir
                },
                |dir| {
                    first_answer(dir.path(), n);
                    dir
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
