//! Deterministic train/validation/test assignment from a stable hash of the text.
//!
//! Hashing the text (rather than shuffling with a seed) keeps a text in the same split whatever
//! else is in the data set, across runs, machines and package versions, so test texts never leak
//! into training when a source file grows.

use std::fmt;

use serde::Serialize;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seed for the per-class cap order, so which texts a cap keeps is independent of their split.
const CAP_SEED: u64 = 0x5bd1_e995_c0ff_ee00;

/// 64-bit FNV-1a of `bytes`, starting from `seed` (the standard offset basis for plain FNV-1a).
pub fn fnv1a64_seeded(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Plain 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_seeded(FNV_OFFSET, bytes)
}

/// MurmurHash3's 64-bit finaliser. FNV-1a's low bits are poorly mixed (bit 0 is the parity of the
/// bytes' low bits), and the split takes the hash modulo 100, so every bit must depend on all.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The stable hash of a (normalised) text: decides its split and its row order in the files.
pub fn stable_hash(text: &str) -> u64 {
    fmix64(fnv1a64(text.as_bytes()))
}

/// The order in which a per-class cap keeps texts (smallest first): a second, independent hash,
/// so that capping a class does not skew its split fractions.
pub fn cap_order(text: &str) -> u64 {
    fmix64(fnv1a64_seeded(CAP_SEED, text.as_bytes()))
}

/// A data split. Texts go 80% / 10% / 10% to train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// The split `text` belongs to.
    pub fn of(text: &str) -> Split {
        match stable_hash(text) % 100 {
            0..80 => Split::Train,
            80..90 => Split::Validation,
            _ => Split::Test,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_reference_values() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn split_fractions_are_near_80_10_10() {
        let mut counts = [0usize; 3];
        let n = 100_000;
        for i in 0..n {
            counts[Split::of(&format!("text {i}")) as usize] += 1;
        }
        let frac = |c: usize| c as f64 / n as f64;
        assert!((frac(counts[0]) - 0.8).abs() < 0.01, "{counts:?}");
        assert!((frac(counts[1]) - 0.1).abs() < 0.01, "{counts:?}");
        assert!((frac(counts[2]) - 0.1).abs() < 0.01, "{counts:?}");
    }
}
