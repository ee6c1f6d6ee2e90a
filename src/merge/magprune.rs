//! DELLA's MagPrune on one row without sorting it.
//!
//! The entry of ascending magnitude rank `r` among `c` (ties by index) is kept when its
//! uniform draw `u` is below `p(r) = density - epsilon + 2 epsilon r / (c - 1)`. Sorting every
//! row to learn each rank dominated DELLA's time, yet few entries need their exact rank: `p` is
//! non-decreasing in `r` (every float operation in it rounds monotonically), so once an entry is
//! known to rank in `lo ..= hi`, `u < p(lo)` keeps it and `u >= p(hi)` drops it whatever its
//! exact rank. One histogram of the magnitudes over at most `c` buckets bounds every rank that
//! way; only the few entries (about 0.5% on fine-tuning deltas) whose draw falls between the
//! bounds of their bucket are ranked exactly. The decisions, and so the merged bytes, are those
//! of the sort.
//!
//! Magnitudes are compared as the bits of `|x|`: for floats with the sign bit clear, the bits
//! order as `f32::total_cmp` orders the values (NaNs above infinity), so ties, zeros and NaNs
//! rank as they did under the sort.

/// Buckets up to this size are ranked within by counting; larger ones are sorted once more
/// than a few of their entries need exact ranks.
const SCAN_LIMIT: usize = 64;

/// Scratch buffers for [`RowPruner::prune`], reused across rows so that pruning allocates only
/// when a row is longer than any before it.
#[derive(Debug, Default)]
pub struct RowPruner {
    /// The magnitude bits of each entry.
    keys: Vec<u32>,
    /// Per bucket, the rank of its first entry (an exclusive prefix sum of the histogram),
    /// then the row length.
    starts: Vec<u32>,
    /// Per bucket, the keep probabilities of its first and last rank (may run past the last
    /// bucket; never cleared).
    bounds: Vec<[f32; 2]>,
    /// Indices of the entries the bounds leave undecided, at its start (one spare slot for
    /// branch-free appends; longer than the list, never cleared).
    undecided: Vec<u32>,
    /// Entry indices grouped by bucket, in index order within a bucket.
    members: Vec<u32>,
    /// Per bucket, where its next member goes while `members` is filled.
    cursor: Vec<u32>,
    /// (bucket, index) of each undecided entry, to take them bucket by bucket.
    pending: Vec<(u32, u32)>,
}

/// The keep probability of rank `rank` among `span + 1` entries, as the sort computed it.
#[inline(always)]
fn keep_probability(rank: usize, span: f32, density: f32, epsilon: f32) -> f32 {
    // Through i64: the same value as `rank as f32`, in one signed conversion.
    (density - epsilon) + (rank as i64 as f32 / span).clamp(0.0, 1.0) * 2.0 * epsilon
}

/// The bucket layout of one row: exact zeros in bucket 0, nonzero key `k` in bucket
/// `1 + (k - min) >> shift`, `min` the smallest nonzero key.
///
/// Zeros are common in deltas of bf16 weights (an update below half a unit in the last place
/// rounds away), often a large share of a row. Apart, they are a bucket of ties already in
/// index order, ranked without sorting, and they do not stretch the nonzero buckets over the
/// empty exponents below the data (which made them 8 times coarser on llama-1b rows).
#[derive(Debug, Clone, Copy)]
struct Buckets {
    min: u32,
    shift: u32,
    count: usize,
    /// All keys are equal.
    tied: bool,
}

impl Buckets {
    /// At most `1 + keys.len() / 2` buckets, the nonzero ones spanning the keys evenly.
    fn for_keys(keys: &[u32]) -> Self {
        // Zero wraps to the largest key, out of the running for the smallest nonzero one.
        let (below_min, least, max) = keys
            .iter()
            .fold((u32::MAX, u32::MAX, 0u32), |(nz, lo, hi), &k| (nz.min(k.wrapping_sub(1)), lo.min(k), hi.max(k)));
        let min = below_min.wrapping_add(1).min(max);
        let range_bits = u32::BITS - (max - min).leading_zeros();
        let bucket_bits = (usize::BITS - keys.len().leading_zeros()).saturating_sub(1);
        let shift = range_bits.saturating_sub(bucket_bits);
        Buckets { min, shift, count: ((max - min) >> shift) as usize + 2, tied: least == max }
    }

    /// Branch-free: zero's term is multiplied away.
    #[inline(always)]
    fn of(&self, key: u32) -> usize {
        usize::from(key != 0) * (1 + (key.wrapping_sub(self.min) >> self.shift) as usize)
    }
}

impl RowPruner {
    /// Zeroes the entries of `row` that MagPrune drops, given each entry's uniform draw in
    /// `uniforms` (as long as `row`).
    pub fn prune(&mut self, row: &mut [f32], uniforms: &[f32], density: f32, epsilon: f32) {
        let c = row.len();
        if c == 0 {
            return;
        }
        debug_assert_eq!(uniforms.len(), c);
        let span = (c.max(2) - 1) as f32;
        self.keys.clear();
        self.keys.extend(row.iter().map(|x| x.abs().to_bits()));
        let buckets = Buckets::for_keys(&self.keys);
        if buckets.tied {
            // All magnitudes tie (an untouched row of zeros, say): ranks are the indices.
            for (i, (x, &u)) in row.iter_mut().zip(uniforms).enumerate() {
                let kept = u < keep_probability(i, span, density, epsilon);
                *x = if kept { *x } else { 0.0 };
            }
            return;
        }
        self.histogram(buckets);
        self.bucket_bounds(span, density, epsilon);
        let undecided = self.decide_bounded(buckets, row, uniforms);
        if undecided > 0 {
            self.group_members(buckets);
            self.decide_grouped(buckets, undecided, row, uniforms, span, density, epsilon);
        }
    }

    /// `starts`: per bucket, the rank of its first entry; `c` at index `buckets.count`.
    fn histogram(&mut self, buckets: Buckets) {
        self.starts.clear();
        self.starts.resize(buckets.count + 1, 0);
        for &k in &self.keys {
            self.starts[buckets.of(k)] += 1;
        }
        let mut total = 0u32;
        for s in self.starts.iter_mut() {
            let n = *s;
            *s = total;
            total += n;
        }
    }

    /// Per bucket, the keep probabilities of its lowest and highest rank (nonsense for empty
    /// buckets, which no entry reads).
    fn bucket_bounds(&mut self, span: f32, d: f32, e: f32) {
        let count = self.starts.len() - 1;
        let bounds = at_least(&mut self.bounds, count);
        let (firsts, nexts) = (&self.starts[..count], &self.starts[1..]);
        for ((p, &first), &next) in bounds.iter_mut().zip(firsts).zip(nexts) {
            let last = next.saturating_sub(1);
            *p = [keep_probability(first as usize, span, d, e), keep_probability(last as usize, span, d, e)];
        }
    }

    /// Decides every entry whose bucket's rank bounds decide it and lists the others at the
    /// start of `undecided`; returns how many. Branch-free (the draws make every outcome
    /// unpredictable): a dropped entry's bits are masked off, and every index is written with
    /// only the undecided ones advancing.
    fn decide_bounded(&mut self, buckets: Buckets, row: &mut [f32], uniforms: &[f32]) -> usize {
        at_least(&mut self.undecided, row.len() + 1);
        let mut n = 0;
        for (i, ((x, &u), &k)) in row.iter_mut().zip(uniforms).zip(&self.keys).enumerate() {
            let [p_lo, p_hi] = self.bounds[buckets.of(k)];
            let (kept, undecided) = (u < p_hi, (u >= p_lo) & (u < p_hi));
            *x = f32::from_bits(x.to_bits() & u32::from(kept).wrapping_neg());
            self.undecided[n] = i as u32;
            n += usize::from(undecided);
        }
        n
    }

    /// `members`: entry indices grouped by bucket, in index order within each bucket.
    fn group_members(&mut self, buckets: Buckets) {
        at_least(&mut self.members, self.keys.len());
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.starts);
        for (i, &k) in self.keys.iter().enumerate() {
            let b = buckets.of(k);
            self.members[self.cursor[b] as usize] = i as u32;
            self.cursor[b] += 1;
        }
    }

    /// Decides the undecided entries by their exact ranks, bucket by bucket: the bucket's
    /// first rank plus the rank within it, by counting in small buckets or busy ones sorted.
    #[allow(clippy::too_many_arguments)]
    fn decide_grouped(
        &mut self,
        buckets: Buckets,
        undecided: usize,
        row: &mut [f32],
        uniforms: &[f32],
        span: f32,
        d: f32,
        e: f32,
    ) {
        self.pending.clear();
        self.pending.extend(self.undecided[..undecided].iter().map(|&i| (buckets.of(self.keys[i as usize]) as u32, i)));
        self.pending.sort_unstable();
        let keys = &self.keys;
        let packed = |j: u32| (u64::from(keys[j as usize]) << 32) | u64::from(j);
        for group in self.pending.chunk_by(|a, b| a.0 == b.0) {
            let b = group[0].0 as usize;
            let (start, end) = (self.starts[b] as usize, self.starts[b + 1] as usize);
            let members = &mut self.members[start..end];
            // The zeros' bucket is in index order, which is their order.
            let sorted = b == 0 || (members.len() > SCAN_LIMIT && group.len() > 4);
            if sorted && b != 0 {
                members.sort_unstable_by_key(|&j| packed(j));
            }
            for &(_, i) in group {
                let own = packed(i);
                let within = if sorted {
                    members.partition_point(|&j| packed(j) < own)
                } else {
                    members.iter().filter(|&&j| packed(j) < own).count()
                };
                if uniforms[i as usize] >= keep_probability(start + within, span, d, e) {
                    row[i as usize] = 0.0;
                }
            }
        }
    }
}

/// `v` grown to at least `len` entries (never cleared: callers overwrite what they read), as
/// a slice of `len`.
fn at_least<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// MagPrune by a full sort of the row, as symerge did it before [`RowPruner`]: the definition
/// the pruner must match bit for bit.
#[cfg(test)]
pub fn prune_by_sort(row: &mut [f32], uniforms: &[f32], density: f32, epsilon: f32) {
    let c = row.len();
    let mut order: Vec<u32> = (0..c as u32).collect();
    order.sort_by(|&a, &b| row[a as usize].abs().total_cmp(&row[b as usize].abs()).then(a.cmp(&b)));
    let span = (c.max(2) - 1) as f32;
    let mut keep = vec![false; c];
    for (rank, &i) in order.iter().enumerate() {
        let p = (density - epsilon) + (rank as f32 / span).clamp(0.0, 1.0) * 2.0 * epsilon;
        keep[i as usize] = uniforms[i as usize] < p;
    }
    for (x, k) in row.iter_mut().zip(keep) {
        if !k {
            *x = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::philox::ElementStream;

    /// `n` uniform draws of stream `task`.
    fn draws(task: u32, n: usize) -> Vec<f32> {
        let mut u = vec![0f32; n];
        ElementStream::new(7, 11, task).fill_uniform(0, &mut u);
        u
    }

    /// Rows of `row_len` shaped like fine-tuning deltas: differences of bf16-rounded values,
    /// so magnitudes repeat and some are exactly zero.
    fn deltas(n: usize, task: u32) -> Vec<f32> {
        let bf16 = |x: f32| f32::from_bits(x.to_bits() & 0xFFFF_0000);
        let (a, b) = (draws(task, n), draws(task + 1000, n));
        a.iter().zip(&b).map(|(&x, &y)| bf16(x - 0.5 + 0.02 * (y - 0.5)) - bf16(x - 0.5)).collect()
    }

    /// Prunes `values` in rows of `row_len` both ways and asserts identical bits.
    fn check(name: &str, values: &[f32], row_len: usize) {
        let uniforms = draws(99, values.len());
        let mut pruner = RowPruner::default();
        for (d, e) in [(0.5, 0.1), (0.4, 0.2), (0.7, 0.0), (0.1, 0.09), (0.9, 0.05)] {
            let (mut fast, mut slow) = (values.to_vec(), values.to_vec());
            for ((f, s), u) in fast.chunks_mut(row_len).zip(slow.chunks_mut(row_len)).zip(uniforms.chunks(row_len)) {
                pruner.prune(f, u, d, e);
                prune_by_sort(s, u, d, e);
            }
            let same = fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}, density {d}, epsilon {e}: pruner and sort disagree");
            let kept = fast.iter().filter(|x| **x != 0.0).count();
            assert!(kept > 0 || values.iter().all(|x| *x == 0.0) || values.len() < 8, "{name}: nothing kept");
        }
    }

    #[test]
    fn matches_the_sort_on_delta_rows() {
        check("2048-rows", &deltas(4 * 2048, 1), 2048);
        check("5632-rows", &deltas(2 * 5632, 2), 5632);
        check("odd rows", &deltas(3 * 1001, 3), 1001);
    }

    #[test]
    fn matches_the_sort_on_ties_and_extremes() {
        let n = 4096;
        let u = draws(5, n);
        check("all equal", &vec![0.25; n], 2048);
        check("all zero", &vec![0.0; n], 2048);
        let half_zero: Vec<f32> =
            deltas(n, 6).iter().enumerate().map(|(i, &x)| if i % 2 == 0 { 0.0 } else { x }).collect();
        check("half zero", &half_zero, 2048);
        let outlier: Vec<f32> =
            deltas(n, 7).iter().enumerate().map(|(i, &x)| if i % 2048 == 5 { 1e30 } else { x }).collect();
        check("one outlier", &outlier, 2048);
        let few = [0.5f32, -0.5, 0.25, 1.0, -0.0, f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40];
        let picked: Vec<f32> = u.iter().map(|&x| few[(x * few.len() as f32) as usize % few.len()]).collect();
        check("few values with nan and inf", &picked, 2048);
        let signs: Vec<f32> = u.iter().map(|&x| if x < 0.5 { 0.125 } else { -0.125 }).collect();
        check("one magnitude, both signs", &signs, 2048);
    }

    #[test]
    fn matches_the_sort_on_short_rows() {
        let v = deltas(210, 8);
        for row_len in [1, 2, 3, 7, 64, 70] {
            check(&format!("rows of {row_len}"), &v[..v.len() / row_len * row_len], row_len);
        }
    }
}
