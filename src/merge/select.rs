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

/// How many elements a density keeps: `floor(density * n)`, but at least one of a non-empty
/// tensor when the density is positive, as mergekit 0.1.5's `magnitude` does.
pub fn keep_count(density: f32, n: usize) -> usize {
    if density >= 1.0 {
        n
    } else if density <= 0.0 {
        0
    } else {
        floor_fraction(density, n).clamp(n.min(1), n)
    }
}

/// `floor(fraction * n)` for a fraction from the config (a density, gamma), as mergekit computes
/// it from the f64 the YAML holds. Parameters are kept as f32, and `0.9f32 * 800` is 719.99998,
/// one short of mergekit's 720; the shortest decimal that round-trips to the f32 is the number
/// as written (up to 6 significant digits), so the product is taken of that decimal as f64.
pub fn floor_fraction(fraction: f32, n: usize) -> usize {
    let written: f64 = fraction.to_string().parse().unwrap_or(f64::from(fraction));
    (written * n as f64).floor() as usize
}

/// Elements per chunk handed to `fill`.
pub const CHUNK: usize = 1 << 16;

/// Finds the threshold keeping the `k` largest magnitudes among `n` values. `fill(offset, out)`
/// must write values `offset .. offset + out.len()`; it is called from several threads.
pub fn magnitude_threshold<F>(n: usize, k: usize, fill: F) -> Result<Threshold>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync,
{
    let th = magnitude_thresholds(n, &[k], |offset, bufs| {
        let (first, _) = bufs.split_at_mut(1);
        let len = first[0].len();
        fill(offset, &mut first[0][..len])
    })?;
    Ok(th[0])
}

/// Thresholds of several value streams over the same `n` indices at once (TIES: one task
/// vector per expert), the `s`-th keeping its `ks[s]` largest magnitudes. Each level of the
/// radix select is one pass that reads every stream once, so data shared by the streams (the
/// base weights) is decoded once per pass instead of once per stream.
///
/// `fill(offset, bufs)` gets `ks.len() + 1` buffers, each `len` long (the chunk at `offset`):
/// it must write stream `s`'s values into `bufs[s]`; the last buffer is scratch for its own use.
pub fn magnitude_thresholds<F>(n: usize, ks: &[usize], fill: F) -> Result<Vec<Threshold>>
where
    F: Fn(usize, &mut [Vec<f32>]) -> Result<()> + Sync,
{
    let stream_of: Vec<usize> = (0..ks.len()).collect();
    magnitude_thresholds_of(n, ks, &stream_of, fill)
}

/// [`magnitude_thresholds`] where threshold `i` keeps the `ks[i]` largest magnitudes of stream
/// `stream_of[i]`: several counts on one stream (order statistics such as quartiles) share its
/// buffer and its high-bits histogram. `fill` gets one buffer per stream, plus scratch.
pub fn magnitude_thresholds_of<F>(n: usize, ks: &[usize], stream_of: &[usize], fill: F) -> Result<Vec<Threshold>>
where
    F: Fn(usize, &mut [Vec<f32>]) -> Result<()> + Sync,
{
    let mut out: Vec<Option<Threshold>> = ks
        .iter()
        .map(|&k| {
            if k >= n {
                Some(Threshold::KEEP_ALL)
            } else if k == 0 {
                Some(Threshold::KEEP_NONE)
            } else {
                None
            }
        })
        .collect();
    let open: Vec<usize> = (0..ks.len()).filter(|&s| out[s].is_none()).collect();
    if open.is_empty() {
        return Ok(out.into_iter().map(|t| t.expect("all decided")).collect());
    }
    let streams = stream_of.iter().max().map_or(0, |&m| m + 1);
    let mut hi_streams: Vec<usize> = open.iter().map(|&s| stream_of[s]).collect();
    hi_streams.sort_unstable();
    hi_streams.dedup();
    let hi_reads: Vec<(usize, usize)> = hi_streams.iter().map(|&b| (b, b)).collect();
    let hi = histograms(n, streams, &hi_reads, &fill, |_, bits| Some((bits >> 16) as usize))?;
    let hist_of = |s: usize| &hi[hi_streams.binary_search(&stream_of[s]).expect("an open stream")];
    let buckets: Vec<(usize, usize)> = open.iter().map(|&s| walk_down(hist_of(s), ks[s], 0)).collect();
    let mut bucket_of = vec![usize::MAX; ks.len()];
    for (&s, &(b, _)) in open.iter().zip(&buckets) {
        bucket_of[s] = b;
    }
    let lo_reads: Vec<(usize, usize)> = open.iter().map(|&s| (s, stream_of[s])).collect();
    let lo = histograms(n, streams, &lo_reads, &fill, |s, bits| {
        ((bits >> 16) as usize == bucket_of[s]).then_some((bits & 0xffff) as usize)
    })?;
    // Thresholds where more values tie than may be kept: (threshold, bits, need, seen).
    let mut ties = Vec::new();
    for (i, &s) in open.iter().enumerate() {
        let (bucket, above_bucket) = buckets[i];
        let (low, above) = walk_down(&lo[i], ks[s], above_bucket);
        let t_bits = ((bucket as u32) << 16) | low as u32;
        let (equal, need) = (lo[i][low] as usize, ks[s] - above);
        out[s] = Some(Threshold { t: f32::from_bits(t_bits), cutoff: n });
        if need < equal {
            ties.push((s, t_bits, need, 0usize));
        }
    }
    // The index of each such threshold's need-th tied value, in one ordered scan.
    let mut bufs = vec![vec![0f32; CHUNK.min(n)]; streams + 1];
    let mut offset = 0;
    while offset < n && ties.iter().any(|t| t.3 < t.2) {
        let len = CHUNK.min(n - offset);
        bufs.iter_mut().for_each(|b| b.resize(len, 0.0));
        fill(offset, &mut bufs)?;
        for (s, t_bits, need, seen) in ties.iter_mut() {
            if *seen == *need {
                continue;
            }
            for (i, &x) in bufs[stream_of[*s]].iter().enumerate() {
                if x.abs().to_bits() == *t_bits {
                    *seen += 1;
                    if *seen == *need {
                        out[*s] = Some(Threshold { t: f32::from_bits(*t_bits), cutoff: offset + i + 1 });
                        break;
                    }
                }
            }
        }
        offset += len;
    }
    if let Some((_, _, need, seen)) = ties.iter().find(|t| t.3 < t.2) {
        return Err(crate::error::Error::Invalid(format!(
            "tensor data changed while merging: {need} values tied at the threshold were expected, a rescan found {seen}"
        )));
    }
    Ok(out.into_iter().map(|t| t.expect("every stream decided")).collect())
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

/// One 2^16-bin histogram per `(id, stream)` in `reads`, of `bin(id, bits)` over stream's `n`
/// values (chunks in parallel, counts summed in a fixed order, so the result does not depend
/// on threads).
fn histograms<F, B>(n: usize, streams: usize, reads: &[(usize, usize)], fill: &F, bin: B) -> Result<Vec<Vec<u64>>>
where
    F: Fn(usize, &mut [Vec<f32>]) -> Result<()> + Sync,
    B: Fn(usize, u32) -> Option<usize> + Sync,
{
    let chunks = n.div_ceil(CHUNK);
    let zero = || vec![vec![0u64; 1 << 16]; reads.len()];
    (0..chunks)
        .into_par_iter()
        .try_fold(
            || (zero(), vec![Vec::<f32>::with_capacity(CHUNK); streams + 1]),
            |(mut hist, mut bufs), c| {
                let offset = c * CHUNK;
                let len = CHUNK.min(n - offset);
                bufs.iter_mut().for_each(|b| b.resize(len, 0.0));
                fill(offset, &mut bufs)?;
                for (h, &(id, s)) in hist.iter_mut().zip(reads) {
                    for &x in &bufs[s] {
                        if let Some(b) = bin(id, x.abs().to_bits()) {
                            h[b] += 1;
                        }
                    }
                }
                Ok((hist, bufs))
            },
        )
        .map(|r| r.map(|(h, _)| h))
        .try_reduce(zero, |mut a, b| {
            for (x, y) in a.iter_mut().zip(&b) {
                x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
            }
            Ok(a)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count mergekit takes: floor of the written density times n in f64, not of the f32.
    #[test]
    fn keep_counts_use_the_density_as_written() {
        assert_eq!(0.9f32 as f64 * 800.0, 719.9999809265137, "the f32 falls short");
        assert_eq!(keep_count(0.9, 800), 720);
        assert_eq!(keep_count(0.2, 800), 160);
        assert_eq!(keep_count(0.3, 10), 3);
        assert_eq!(keep_count(0.7, 1000), 700);
        assert_eq!(
            (keep_count(0.001, 10), keep_count(0.0, 10), keep_count(1.0, 10), keep_count(0.5, 0)),
            (1, 0, 10, 0)
        );
        assert_eq!((floor_fraction(0.999_999, 1_000_000), floor_fraction(-0.1, 10)), (999_999, 0));
    }

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
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
        let rnd: Vec<f32> = (0..200_003).map(|_| rand::Rng::random::<f32>(&mut rng) - 0.5).collect();
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

    #[test]
    fn several_streams_at_once_equal_one_at_a_time() {
        let n = 150_001;
        let streams: Vec<Vec<f32>> = (0..4)
            .map(|s| {
                (0..n)
                    .map(|i| {
                        let h = ((i as u64 + 1) * 0x9E37_79B9_7F4A_7C15).rotate_left(17 + s) >> 40;
                        // Stream 2 is heavily tied (few distinct values), as bf16 deltas are.
                        if s == 2 { [0.5, -0.25, 0.0, 1.0][(h % 4) as usize] } else { h as f32 / 1e6 - 8.0 }
                    })
                    .collect()
            })
            .collect();
        let alone = |k: usize, s: usize| {
            magnitude_threshold(n, k, |off, out| {
                out.copy_from_slice(&streams[s][off..off + out.len()]);
                Ok(())
            })
            .unwrap()
        };
        let ks = [1, 0, 37_501, n, 150_000];
        let idx = [0, 1, 2, 3, 0];
        let got = magnitude_thresholds(n, &ks, |off, bufs| {
            for (b, &s) in bufs.iter_mut().zip(&idx) {
                let len = b.len();
                b.copy_from_slice(&streams[s][off..off + len]);
            }
            Ok(())
        })
        .unwrap();
        for (j, (&k, &s)) in ks.iter().zip(&idx).enumerate() {
            assert_eq!(got[j], alone(k, s), "stream {j}");
            assert_eq!((0..n).filter(|&i| got[j].keep(streams[s][i], i)).count(), k, "stream {j} keeps k");
        }
        // Several counts on one stream (order statistics), with ties on stream 2: each
        // threshold is the one selected alone, and `fill` sees one buffer per stream.
        let (ks, idx) = ([1, 37_501, 75_000, n, 0, 150_000, 80_000], [0, 0, 0, 2, 2, 2, 2]);
        let shared = magnitude_thresholds_of(n, &ks, &idx, |off, bufs| {
            assert_eq!(bufs.len(), 4, "streams 0 to 2 and scratch");
            for s in [0, 2] {
                let len = bufs[s].len();
                bufs[s].copy_from_slice(&streams[s][off..off + len]);
            }
            Ok(())
        })
        .unwrap();
        for (j, (&k, &s)) in ks.iter().zip(&idx).enumerate() {
            assert_eq!(shared[j], alone(k, s), "count {k} of stream {s}");
        }
    }
}
