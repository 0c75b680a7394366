//! Side-by-side comparison on one generated stream, in one run, on one
//! machine: exactly (batch and single-op APIs) against naive RocksDB, RocksDB
//! with write batches, the obvious design (a Bloom filter per partition in
//! front of RocksDB with write batches), an in-memory `HashSet`, and Redis
//! `SET NX EX` (when a `redis-server` binary is on the PATH).
//!
//! ```text
//! cargo run --release --example compare -- --messages 10000000 [--json out.json] [--only exactly-batch,naive-rocksdb]
//! ```
//!
//! The stream is Kafka-like: 8 partitions, 1% redeliveries drawn from the last
//! 100 000 keys, then a rebalance replay burst of 100 000 already-processed
//! messages (a twentieth of a stream shorter than 2 M). Keys are 16 bytes. Every row processes the same messages and must
//! find the same number of new keys; the sequence-mode row reads them as
//! numbered by their producers.
//!
//! The harness itself lives in `src/bin/exactly/compare.rs`, so that
//! `exactly bench` runs the same rows.

mod common;
#[path = "../src/bin/exactly/compare.rs"]
mod compare;
#[path = "../src/bin/exactly/compare_redis.rs"]
mod compare_redis;

fn main() {
    compare::run(std::env::args().skip(1).collect());
}
