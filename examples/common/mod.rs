//! Helpers shared by the examples: a deterministic generator, message keys,
//! and the process's CPU time.
#![allow(dead_code)]

use std::time::Duration;

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The demo's stream of message ids: each message has an idempotency key;
/// `redelivery_percent` of them are redeliveries of one of the last 100 000
/// (a producer retry or a consumer replay).
pub struct Redeliveries {
    rng: Rng,
    recent: Vec<u64>,
    seq: u64,
    redelivery_percent: u64,
}

impl Redeliveries {
    pub fn new(redelivery_percent: u64) -> Self {
        Self {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            recent: Vec::new(),
            seq: 0,
            redelivery_percent,
        }
    }

    /// The ids kept for redelivery (at most the last 100 000).
    pub fn recent(&self) -> &[u64] {
        &self.recent
    }
}

impl Iterator for Redeliveries {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let seq = self.seq;
        self.seq += 1;
        let id = if self.rng.next() % 100 < self.redelivery_percent && !self.recent.is_empty() {
            self.recent[(self.rng.next() % self.recent.len() as u64) as usize]
        } else {
            seq
        };
        if self.recent.len() < 100_000 {
            self.recent.push(id);
        } else {
            self.recent[(seq % 100_000) as usize] = id;
        }
        Some(id)
    }
}

/// A 16-byte key for message id `id`, spread over the key space.
pub fn key(id: u64) -> [u8; 16] {
    let a = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (id >> 29);
    let b = a.rotate_left(31).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ id;
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_le_bytes());
    k[8..].copy_from_slice(&b.to_le_bytes());
    k
}

/// User plus system CPU time of the whole process (all threads), from
/// `/proc/self/stat` on Linux; zero where it cannot be read.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // The kernel's USER_HZ is 100 on every mainstream Linux configuration.
    Duration::from_millis(ticks * 10)
}

/// The command line `[MESSAGES] [DIR]`: the number of messages (`default`
/// if absent) and the store directory (a fresh temporary one if absent; keep
/// the returned guard alive while the store is used).
pub fn messages_and_dir(
    default: u64,
) -> Result<(u64, std::path::PathBuf, tempfile::TempDir), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let messages = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default);
    let scratch = tempfile::tempdir()?;
    let path = args
        .next()
        .map_or_else(|| scratch.path().join("store"), Into::into);
    Ok((messages, path, scratch))
}
