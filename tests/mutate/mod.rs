//! The mutator behind tests/robustness.rs: it makes valid safetensors files, sharded checkpoints
//! and label caches, then damages them the way a broken download or a hostile file would
//! (truncations, flipped bytes, header fields that lie with their lengths and checksums
//! recomputed, so that the lie and not a checksum is what the reader meets). Everything is
//! derived from one `u64` seed, so a failing case reproduces from its seed alone.

pub mod cache;
pub mod index;
pub mod safetensors;

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The mutator's choices, from a seeded ChaCha8 (the same stream on every platform).
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.0.random_range(0..n) }
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.fill_bytes(&mut b);
        b
    }

    /// A small finite float in [-2, 2).
    pub fn small_float(&mut self) -> f32 {
        self.0.random_range(-2.0..2.0)
    }
}

/// A value a lying size or count field might hold instead of `honest`: off by one, zero, or near
/// the boundaries where `usize` arithmetic overflows (2^61 times 8 is 2^64).
pub fn lying_number(rng: &mut Rng, honest: u64) -> u64 {
    match rng.below(9) {
        0 => 0,
        1 => honest.wrapping_add(1),
        2 => honest.saturating_sub(1),
        3 => 1 << 61,
        4 => (1 << 62) + rng.below(3) as u64,
        5 => u64::MAX - rng.below(3) as u64,
        6 => (1 << 63) + rng.below(16) as u64,
        7 => honest.wrapping_mul(2).wrapping_add(8),
        _ => rng.next() >> rng.below(64),
    }
}

/// A JSON value that is not the non-negative integer a field should hold.
pub fn wrong_json_number(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(7) {
        0 => json!(-1),
        1 => json!(1.5),
        2 => json!("12"),
        3 => json!(null),
        4 => json!([3]),
        5 => json!(i64::MIN),
        _ => json!(1e300),
    }
}

/// Damages raw bytes: truncation, flipped bits, a random overwrite, a byte inserted or dropped,
/// junk appended. Returns what it did.
pub fn damage_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let len = bytes.len();
    match rng.below(6) {
        0 => {
            let at = if rng.chance(1, 2) { rng.below(len.min(64) + 1) } else { rng.below(len + 1) };
            bytes.truncate(at);
            format!("truncated to {at} of {len} bytes")
        }
        1 if len > 0 => {
            let n = 1 + rng.below(8);
            let at: Vec<usize> = (0..n).map(|_| rng.below(len)).collect();
            at.iter().for_each(|&i| bytes[i] ^= 1 << rng.below(8));
            format!("flipped bits at {at:?}")
        }
        2 if len > 0 => {
            let at = rng.below(len);
            let n = (1 + rng.below(16)).min(len - at);
            let junk = rng.bytes(n);
            bytes[at..at + n].copy_from_slice(&junk);
            format!("overwrote {n} bytes at {at}")
        }
        3 => {
            let at = rng.below(len + 1);
            let b = rng.next() as u8;
            bytes.insert(at, b);
            format!("inserted byte {b:#04x} at {at}")
        }
        4 if len > 0 => {
            let at = rng.below(len);
            bytes.remove(at);
            format!("removed byte {at}")
        }
        _ => {
            let n = 1 + rng.below(64);
            bytes.extend(rng.bytes(n));
            format!("appended {n} junk bytes")
        }
    }
}
