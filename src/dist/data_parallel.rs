//! Data-parallel arithmetic: which examples a rank takes, how per-rank gradients combine into
//! the full-batch gradient, and a check that every rank holds the same parameters.

use std::ops::Range;

use crate::dist::collective::Collective;
use crate::error::{Error, Result};

/// The contiguous slice of a batch of `batch_len` examples that `rank` of `world_size` takes.
/// Shards differ in size by at most one (the first `batch_len % world_size` ranks take one
/// more) and may be empty when the batch is smaller than the world.
///
/// # Panics
/// If `rank >= world_size`: ranks come from a validated [`crate::dist::RankInfo`].
pub fn shard_range(batch_len: usize, rank: usize, world_size: usize) -> Range<usize> {
    assert!(rank < world_size, "rank {rank} is not below the world size {world_size}");
    let base = batch_len / world_size;
    let extra = batch_len % world_size;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Turns this rank's *mean* gradient over its `local_count` examples into the mean gradient
/// over all `global_count` examples, on every rank.
///
/// Each rank weights its mean by `local_count / global_count` before the sum, so uneven shards
/// count each example once; a plain average of per-rank means would over-weight small shards.
/// With `local_count == 0` the contents of `grad` are ignored (the mean of nothing is not
/// defined, and may hold NaN).
pub fn average_gradients(
    coll: &mut dyn Collective,
    grad: &mut [f32],
    local_count: usize,
    global_count: usize,
) -> Result<()> {
    if global_count == 0 || local_count > global_count {
        return Err(Error::Invalid(format!(
            "average_gradients: rank {} has {local_count} of {global_count} examples; the global count must be positive and at least the local one",
            coll.rank()
        )));
    }
    if local_count == 0 {
        grad.fill(0.0);
    } else {
        let w = (local_count as f64 / global_count as f64) as f32;
        grad.iter_mut().for_each(|g| *g *= w);
    }
    coll.all_reduce_sum_f32(grad)
}

/// FNV-1a (64 bit) over the values' bit patterns: equal hashes mean bit-identical parameters
/// (up to collisions), which is what data-parallel ranks must hold after each step.
pub fn param_hash(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Checks that every rank holds bit-identical `params`; returns their hash, or an error on every
/// rank if any differs (so all ranks stop together rather than training on diverged weights).
pub fn verify_identical(coll: &mut dyn Collective, params: &[f32]) -> Result<u64> {
    let mine = param_hash(params);
    // 16-bit pieces are exact in f32, so the hash survives a float collective.
    let mut root: Vec<f32> = (0..4).map(|i| ((mine >> (16 * i)) & 0xffff) as f32).collect();
    coll.broadcast_f32(&mut root, 0)?;
    let root_hash = root.iter().enumerate().fold(0u64, |h, (i, &p)| h | ((p as u64) << (16 * i)));
    let mut differing = [f32::from(u8::from(mine != root_hash))];
    coll.all_reduce_sum_f32(&mut differing)?;
    if differing[0] > 0.0 {
        return Err(Error::Collective {
            backend: coll.backend().into(),
            reason: format!(
                "parameters differ across ranks: {} rank(s) disagree with rank 0's hash {root_hash:016x}; rank {} holds {mine:016x}",
                differing[0],
                coll.rank()
            ),
        });
    }
    Ok(mine)
}

/// Checks that every rank computed the same `digest` of `what` (a BLAKE3 hash of its
/// parameters, say) and errors on every rank, naming the ranks that differ from rank 0, if not.
///
/// One all-reduce is an all-gather here: each rank writes its digest's bytes into its own slot
/// of a zeroed `[world, len]` buffer, and bytes are exact in f32, so every rank receives every
/// digest bit for bit.
pub fn verify_digest(coll: &mut dyn Collective, what: &str, digest: &[u8]) -> Result<()> {
    let (rank, world, len) = (coll.rank(), coll.world_size(), digest.len());
    // Digests of different lengths make buffers of different lengths, which the all-reduce refuses.
    let width = len;
    let mut all = vec![0f32; world * width];
    for (o, &b) in all[rank * width..(rank + 1) * width].iter_mut().zip(digest) {
        *o = f32::from(b);
    }
    coll.all_reduce_sum_f32(&mut all)?;
    let differing: Vec<usize> = (1..world).filter(|&r| all[r * width..(r + 1) * width] != all[..width]).collect();
    if differing.is_empty() {
        return Ok(());
    }
    let hex =
        |r: usize| -> String { all[r * width..(r + 1) * width].iter().map(|&b| format!("{:02x}", b as u8)).collect() };
    Err(Error::Collective {
        backend: coll.backend().into(),
        reason: format!(
            "{what} differs across ranks: rank(s) {} disagree with rank 0 ({}); rank {rank} holds {}",
            differing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            hex(0),
            hex(rank)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        for batch in 0..20 {
            for world in 1..7 {
                let shards: Vec<_> = (0..world).map(|r| shard_range(batch, r, world)).collect();
                assert_eq!(shards[0].start, 0);
                assert_eq!(shards[world - 1].end, batch);
                for w in shards.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = shards.iter().map(|s| s.len()).collect();
                let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(max - min <= 1, "batch {batch} world {world}: {lens:?}");
            }
        }
        assert_eq!(shard_range(2, 3, 4), 2..2);
        assert_eq!(shard_range(10, 0, 4), 0..3);
        assert_eq!(shard_range(10, 3, 4), 8..10);
    }

    #[test]
    fn hash_sees_every_bit() {
        let a = [1.0f32, 2.0, -0.0];
        assert_eq!(param_hash(&a), param_hash(&[1.0, 2.0, -0.0]));
        assert_ne!(param_hash(&a), param_hash(&[1.0, 2.0, 0.0]));
        assert_ne!(param_hash(&a), param_hash(&[2.0, 1.0, -0.0]));
        assert_ne!(param_hash(&[]), param_hash(&[0.0]));
    }
}
