//! Exact top-k magnitude thresholds over a tensor that is streamed in chunks (TIES trimming).
//!
//! For non-negative floats the bit pattern orders like the value, so the k-th largest |x| is
//! found by a two-level radix select: a histogram of the high 16 bits picks the bucket, a
//! histogram of the low 16 bits inside it picks the value. Two passes over the data, 512 KiB of
//! counters, no sort and no copy of the tensor: the same algorithm runs on the GPU. Ties at the
//! threshold are broken by element index (the first ones are kept), so exactly k survive and
//! every backend keeps the same ones.

use rayon::prelude::*;

use crate::error::Result;

/// Which elements of a tensor survive magnitude trimming.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// Magnitudes strictly above this are kept.
    pub t: f32,
    /// Elements with magnitude exactly `t` are kept when their index is below this.
    pub cutoff: usize,
}

impl Threshold {
    pub const KEEP_ALL: Threshold = Threshold { t: -1.0, cutoff: 0 };
    pub const KEEP_NONE: Threshold = Threshold { t: f32::INFINITY, cutoff: 0 };

    #[inline]
    pub fn keep(&self, x: f32, index: usize) -> bool {
        let a = x.abs();
        a > self.t || (a == self.t && index < self.cutoff)
    }
}

/// How many elements a density keeps: `floor(density * n)`, as mergekit does.
pub fn keep_count(density: f64, n: usize) -> usize {
    if density >= 1.0 {
        n
    } else if density <= 0.0 {
        0
    } else {
        ((density * n as f64).floor() as usize).min(n)
    }
}

/// Elements per chunk handed to `fill`.
pub const CHUNK: usize = 1 << 16;

/// Finds the threshold keeping the `k` largest magnitudes among `n` values. `fill(offset, out)`
/// must write values `offset .. offset + out.len()`; it is called from several threads.
pub fn magnitude_threshold<F>(n: usize, k: usize, fill: F) -> Result<Threshold>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync,
{
    if k >= n {
        return Ok(Threshold::KEEP_ALL);
    }
    if k == 0 {
        return Ok(Threshold::KEEP_NONE);
    }
    let hi = histogram(n, &fill, |bits| Some((bits >> 16) as usize))?;
    let (bucket, above_bucket) = walk_down(&hi, k, 0);
    let lo = histogram(n, &fill, |bits| ((bits >> 16) as usize == bucket).then_some((bits & 0xffff) as usize))?;
    let (low, above) = walk_down(&lo, k, above_bucket);
    let t_bits = ((bucket as u32) << 16) | low as u32;
    let t = f32::from_bits(t_bits);
    let equal = lo[low] as usize;
    let need = k - above;
    if need == equal {
        return Ok(Threshold { t, cutoff: n });
    }
    // More values tie at the threshold than may be kept: find the index of the need-th one.
    let mut seen = 0usize;
    let mut buf = vec![0f32; CHUNK.min(n)];
    let mut offset = 0;
    while offset < n {
        let len = CHUNK.min(n - offset);
        fill(offset, &mut buf[..len])?;
        for (i, &x) in buf[..len].iter().enumerate() {
            if x.abs().to_bits() == t_bits {
                seen += 1;
                if seen == need {
                    return Ok(Threshold { t, cutoff: offset + i + 1 });
                }
            }
        }
        offset += len;
    }
    Err(crate::error::Error::Invalid(format!(
        "tensor data changed while merging: {equal} values tied at the threshold, a rescan found {seen}"
    )))
}

/// From the top bin down, the bin holding the k-th largest and how many lie above it.
/// Callers guarantee `k` does not exceed the counted values, so the walk always stops inside.
/// Public so the GPU threshold (whose histograms come from the device) walks identically.
pub fn walk_down(hist: &[u64], k: usize, mut above: usize) -> (usize, usize) {
    for b in (1..hist.len()).rev() {
        let c = hist[b] as usize;
        if above + c >= k {
            return (b, above);
        }
        above += c;
    }
    (0, above)
}

fn histogram<F, B>(n: usize, fill: &F, bin: B) -> Result<Vec<u64>>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync,
    B: Fn(u32) -> Option<usize> + Sync,
{
    let chunks = n.div_ceil(CHUNK);
    (0..chunks)
        .into_par_iter()
        .try_fold(
            || (vec![0u64; 1 << 16], vec![0f32; CHUNK]),
            |(mut hist, mut buf), c| {
                let offset = c * CHUNK;
                let len = CHUNK.min(n - offset);
                fill(offset, &mut buf[..len])?;
                for &x in &buf[..len] {
                    if let Some(b) = bin(x.abs().to_bits()) {
                        hist[b] += 1;
                    }
                }
                Ok((hist, buf))
            },
        )
        .map(|r| r.map(|(h, _)| h))
        .try_reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                Ok(a)
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(values: &[f32], k: usize) {
        let th = magnitude_threshold(values.len(), k, |off, out| {
            out.copy_from_slice(&values[off..off + out.len()]);
            Ok(())
        })
        .unwrap();
        let kept: Vec<usize> = (0..values.len()).filter(|&i| th.keep(values[i], i)).collect();
        assert_eq!(kept.len(), k, "exactly k kept");
        // Reference: stable sort by descending magnitude, ties by index.
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        let mut want: Vec<usize> = idx[..k].to_vec();
        want.sort();
        assert_eq!(kept, want);
    }

    #[test]
    fn exact_on_random_and_tied_values() {
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let rnd: Vec<f32> = (0..200_003).map(|_| next()).collect();
        for k in [1, 17, 100_000, 200_002] {
            check(&rnd, k);
        }
        // Heavy ties, spanning several chunks: values from a tiny set, as bf16 deltas are.
        let tied: Vec<f32> = (0..150_000).map(|i| [0.5, -0.5, 0.25, 0.0, -1.0][i % 5] * ((i % 3) as f32)).collect();
        for k in [1, 29_999, 30_000, 30_001, 77_777, 149_999] {
            check(&tied, k);
        }
        check(&[0.0; 10], 3);
    }
}
