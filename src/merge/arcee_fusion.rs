//! Arcee Fusion (mergekit's `arcee_fusion`): keep the model's change to the base only where it
//! matters. Each element's importance is `|x - b|` times the KL divergence between the
//! softmaxes of its row in the model and in the base; changes whose importance reaches
//! `median + 1.5 * (q3 - q1)` of the tensor's importances are kept, the rest reset to the base.
//!
//! The per-row divergences and the three order statistics come from the statistics pass
//! (exact selection). mergekit samples 1e6 importances with replacement from larger tensors,
//! so there its quartiles are estimates; below that size both take the same elements.

use super::lambda_grad::LANES;
use super::registry::{self, BasePolicy, MethodDef};
use super::select::{Threshold, magnitude_thresholds_of};
use super::stats::{TensorPass, TensorStats, map_chunks};
use super::{ChunkCtx, MergeMethod};
use crate::backend::vmath;
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "arcee_fusion",
    summary: "keep the model's changes whose importance (|delta| x row KL divergence) is an upper outlier",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[],
    validate: registry::no_check,
    build: |_| Box::new(ArceeFusion),
};

pub struct ArceeFusion;

/// `sum p log(p / q)` over one row, `p` and `q` the softmaxes of the model's and the base's
/// row plus 1e-8 (mergekit's smoothing), in f64. `scratch` holds the exponentials between the
/// passes. Every loop is element-wise or a sum in [`LANES`] lanes, with [`vmath`]'s `exp64` and
/// `ln64` (within 2 ulp of libm's), so it compiles to vector code. The terms cancel (a
/// divergence is about 1e-3 of the sum of their magnitudes), so the f32 result is that of libm
/// and a sequential sum but in one row of a few hundred, where it is the neighbouring f32.
fn row_kl(x: &[f32], b: &[f32], scratch: &mut Vec<f64>) -> f32 {
    let n = x.len();
    scratch.resize(2 * n, 0.0);
    let (ex, eb) = scratch.split_at_mut(n);
    let max = |v: &[f32]| v.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a)) as f64;
    let (mx, mb) = (max(x), max(b));
    ex.iter_mut().zip(x).for_each(|(e, &a)| *e = vmath::exp64(a as f64 - mx));
    eb.iter_mut().zip(b).for_each(|(e, &a)| *e = vmath::exp64(a as f64 - mb));
    // Reciprocals: a division per element would cost as much as the exponentials.
    let (ix, ib) = (1.0 / sum_lanes(ex), 1.0 / sum_lanes(eb));
    ex.iter_mut().zip(eb.iter()).for_each(|(e, &f)| {
        let (p, q) = (*e * ix + 1e-8, f * ib + 1e-8);
        *e = p * vmath::ln64(p / q);
    });
    sum_lanes(ex) as f32
}

/// `sum v` with element `i` added into lane `i % LANES` (8 f64 accumulators, two AVX2
/// registers, as the Lambda dot products use), the lanes summed at the end.
fn sum_lanes(v: &[f64]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (a, &r) in acc.iter_mut().zip(chunks.remainder()) {
        *a += r;
    }
    acc.iter().sum()
}

/// The stretches of `len` elements from tensor index `offset` on that lie in one row each:
/// `(range within the stretch, row)`, so a row's divergence is looked up once.
fn row_spans(offset: usize, row: usize, len: usize) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        (i < len).then(|| {
            let r = (offset + i) / row;
            let end = ((r + 1) * row - offset).min(len);
            let span = (i..end, r);
            i = end;
            span
        })
    })
}

/// Writes the importances `|x - b| * kl[row]` of the elements from tensor index `offset` on.
fn importances(offset: usize, row: usize, x: &[f32], b: &[f32], kl: &[f32], out: &mut [f32]) {
    for (s, r) in row_spans(offset, row, out.len()) {
        let k = kl[r];
        out[s.clone()].iter_mut().zip(&x[s.clone()]).zip(&b[s]).for_each(|((o, &x), &b)| *o = (x - b).abs() * k);
    }
}

/// The per-row divergences of the whole tensor (chunks hold whole rows).
fn divergences(pass: &dyn TensorPass) -> Result<Vec<f32>> {
    let row = pass.row_len().max(1);
    let parts = map_chunks(pass, |_, base, experts| {
        let mut scratch = Vec::new();
        base.chunks(row).zip(experts[0].chunks(row)).map(|(b, x)| row_kl(x, b, &mut scratch)).collect::<Vec<f32>>()
    })?;
    Ok(parts.concat())
}

/// The importances' values at ascending sorted positions `idx` (torch's
/// `sorted[(q * (n - 1)).long()]`), by exact selection.
fn order_stats(pass: &dyn TensorPass, kl: &[f32], idx: &[usize]) -> Result<Vec<f32>> {
    let n = pass.len();
    let row = pass.row_len().max(1);
    // The i-th smallest is the (n - i)-th largest; importances are >= 0, so magnitudes.
    let ks: Vec<usize> = idx.iter().map(|&i| n - i).collect();
    // One stream of importances; every order statistic selects in it.
    let ts: Vec<Threshold> = magnitude_thresholds_of(n, &ks, &vec![0; ks.len()], |offset, bufs| {
        let len = bufs[0].len();
        let mut base = vec![0f32; len];
        let mut experts = vec![vec![0f32; len]];
        pass.read(offset, &mut base, &mut experts)?;
        importances(offset, row, &experts[0], &base, kl, &mut bufs[0]);
        Ok(())
    })?;
    // k = n (position 0) leaves no threshold: the smallest importance.
    let min = || -> Result<f32> {
        let parts = map_chunks(pass, |offset, base, experts| {
            let mut v = vec![0f32; base.len()];
            importances(offset, row, &experts[0], base, kl, &mut v);
            v.into_iter().fold(f32::INFINITY, f32::min)
        })?;
        Ok(parts.into_iter().fold(f32::INFINITY, f32::min))
    };
    ts.iter().zip(&ks).map(|(t, &k)| if k >= n { min() } else { Ok(t.t) }).collect()
}

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn whole_rows(&self) -> bool {
        true
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        if pass.is_empty() || pass.experts() != 1 {
            return Ok(TensorStats::default());
        }
        let kl = divergences(pass)?;
        let span = (pass.len() - 1) as f32;
        let idx: Vec<usize> = [0.25f32, 0.5, 0.75].iter().map(|q| (q * span) as usize).collect();
        let v = order_stats(pass, &kl, &idx)?;
        let threshold = v[1] + 1.5 * (v[2] - v[0]);
        let scalars = std::iter::once(threshold).chain(kl).map(f64::from).collect();
        Ok(TensorStats { thresholds: Vec::new(), scalars })
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let (Some(b), [x], Some((&t, kl))) = (base, experts, ctx.scalars.split_first()) else {
            out.fill(f32::NAN);
            return;
        };
        let (row, t) = (ctx.row_len.max(1), t as f32);
        for (s, r) in row_spans(ctx.offset, row, out.len()) {
            let k = kl[r] as f32;
            for ((o, &x), &b) in out[s.clone()].iter_mut().zip(&x[s.clone()]).zip(&b[s]) {
                let d = x - b;
                *o = if d.abs() * k >= t { b + d } else { b };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{divergences, order_stats, row_kl};
    use rand::{Rng, SeedableRng};

    /// The divergence as first written: libm's `exp` and `ln`, sums in element order.
    fn row_kl_libm(x: &[f32], b: &[f32]) -> f32 {
        let max = |v: &[f32]| v.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a)) as f64;
        let (mx, mb) = (max(x), max(b));
        let ex: Vec<f64> = x.iter().map(|&a| (a as f64 - mx).exp()).collect();
        let eb: Vec<f64> = b.iter().map(|&a| (a as f64 - mb).exp()).collect();
        let (sx, sb): (f64, f64) = (ex.iter().sum(), eb.iter().sum());
        let kl: f64 = ex
            .iter()
            .zip(&eb)
            .map(|(&e, &f)| {
                let (p, q) = (e / sx + 1e-8, f / sb + 1e-8);
                p * (p / q).ln()
            })
            .sum();
        kl as f32
    }

    /// The vectorised divergence gives libm's f32 result on rows like a model's (weights of
    /// about 0.02, fine-tuning changes of about 0.002, a few large entries), of lengths that
    /// are and are not multiples of the lanes, and on rows of larger spread.
    #[test]
    fn vectorised_divergence_equals_libms() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut same, mut total) = (0, 0);
        let mut scratch = Vec::new();
        for (len, spread) in [(1, 1.0), (7, 1.0), (64, 0.02), (1000, 0.02), (2048, 0.02), (2051, 3.0), (8192, 0.05)] {
            for _ in 0..200 {
                let b: Vec<f32> = (0..len).map(|_| (rng.random::<f32>() - 0.5) * spread).collect();
                let x: Vec<f32> = b
                    .iter()
                    .map(|&v| {
                        v + (rng.random::<f32>() - 0.5) * spread * if rng.random::<f32>() < 0.01 { 5.0 } else { 0.1 }
                    })
                    .collect();
                let (fast, libm) = (row_kl(&x, &b, &mut scratch), row_kl_libm(&x, &b));
                let ulps = (fast.to_bits() as i64 - libm.to_bits() as i64).abs();
                assert!(ulps <= 1, "length {len}: {fast:e} vs libm's {libm:e}");
                same += usize::from(ulps == 0);
                total += 1;
            }
        }
        // A divergence sums terms a thousand times its size (p ln(p/q) of both signs), so
        // either order of summation is accurate to about 1e-11 relative, not to the last f32
        // bit: a row rounds to the neighbouring f32 now and then.
        eprintln!("{} of {total} rows differ from libm's by one f32 ulp", total - same);
        assert!(same * 100 >= total * 99, "{} of {total} rows differ from libm's by one f32 ulp", total - same);
    }
    use crate::merge::TensorParams;
    use crate::merge::stats::InMemory;

    /// Four elements (one row): torch's first quartile is position 0, the smallest importance,
    /// which the exact selection cannot give as a threshold.
    #[test]
    fn quartiles_of_a_tiny_tensor() {
        let base = [0.0f32; 4];
        let expert = [0.1f32, 1.0, 1.0, 2.0];
        let params = TensorParams::default();
        let pass = InMemory {
            base: Some(&base),
            experts: vec![&expert],
            row_len: 4,
            chunk_len: 4,
            params: &params,
            name_hash: 0,
        };
        let kl = divergences(&pass).unwrap_or_default();
        assert_eq!(kl, vec![row_kl(&expert, &base, &mut Vec::new())]);
        assert!(kl[0] > 0.0);
        let v = order_stats(&pass, &kl, &[0, 1, 2]).unwrap_or_default();
        assert_eq!(v, vec![0.1 * kl[0], kl[0], kl[0]]);
    }
}
