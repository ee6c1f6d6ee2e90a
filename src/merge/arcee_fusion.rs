//! Arcee Fusion (mergekit's `arcee_fusion`): keep the model's change to the base only where it
//! matters. Each element's importance is `|x - b|` times the KL divergence between the
//! softmaxes of its row in the model and in the base; changes whose importance reaches
//! `median + 1.5 * (q3 - q1)` of the tensor's importances are kept, the rest reset to the base.
//!
//! The per-row divergences and the three order statistics come from the statistics pass
//! (exact selection). mergekit samples 1e6 importances with replacement from larger tensors,
//! so there its quartiles are estimates; below that size both take the same elements.

use super::registry::{self, BasePolicy, MethodDef};
use super::select::{Threshold, magnitude_thresholds};
use super::stats::{TensorPass, TensorStats, map_chunks};
use super::{ChunkCtx, MergeMethod};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "arcee_fusion",
    summary: "keep the model's changes whose importance (|delta| x row KL divergence) is an upper outlier",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[],
    sums_weights: false,
    validate: registry::no_check,
    build: |_| Box::new(ArceeFusion),
};

pub struct ArceeFusion;

/// `sum p log(p / q)` over one row, `p` and `q` the softmaxes of the model's and the base's
/// row plus 1e-8 (mergekit's smoothing).
fn row_kl(x: &[f32], b: &[f32]) -> f32 {
    let softmax = |v: &[f32]| -> Vec<f64> {
        let m = v.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a)) as f64;
        let e: Vec<f64> = v.iter().map(|&a| (a as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|a| a / s + 1e-8).collect()
    };
    let (p, q) = (softmax(x), softmax(b));
    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() as f32
}

/// The per-row divergences of the whole tensor (chunks hold whole rows).
fn divergences(pass: &dyn TensorPass) -> Result<Vec<f32>> {
    let row = pass.row_len().max(1);
    let parts = map_chunks(pass, |_, base, experts| {
        base.chunks(row).zip(experts[0].chunks(row)).map(|(b, x)| row_kl(x, b)).collect::<Vec<f32>>()
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
    let ts: Vec<Threshold> = magnitude_thresholds(n, &ks, |offset, bufs| {
        let len = bufs[0].len();
        let mut base = vec![0f32; len];
        let mut experts = vec![vec![0f32; len]];
        pass.read(offset, &mut base, &mut experts)?;
        // The same values for each of the three streams (the last buffer is scratch).
        for buf in bufs.iter_mut().take(ks.len()) {
            for (i, o) in buf.iter_mut().enumerate() {
                *o = (experts[0][i] - base[i]).abs() * kl[(offset + i) / row];
            }
        }
        Ok(())
    })?;
    // k = n (position 0) leaves no threshold: the smallest importance.
    let min = || -> Result<f32> {
        let parts = map_chunks(pass, |offset, base, experts| {
            (0..base.len())
                .map(|i| (experts[0][i] - base[i]).abs() * kl[(offset + i) / row])
                .fold(f32::INFINITY, f32::min)
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
        let row = ctx.row_len.max(1);
        for (i, o) in out.iter_mut().enumerate() {
            let d = x[i] - b[i];
            let keep = d.abs() * kl[(ctx.offset + i) / row] as f32 >= t as f32;
            *o = if keep { b[i] + d } else { b[i] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{divergences, order_stats, row_kl};
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
        assert_eq!(kl, vec![row_kl(&expert, &base)]);
        assert!(kl[0] > 0.0);
        let v = order_stats(&pass, &kl, &[0, 1, 2]).unwrap_or_default();
        assert_eq!(v, vec![0.1 * kl[0], kl[0], kl[0]]);
    }
}
