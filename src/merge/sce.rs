//! SCE (Wan et al., 2024, FuseChat): Select the `select_topk` fraction of elements where the
//! task vectors vary most, Calculate each model's weight from its selected task vector's mean
//! square, Erase entries whose sign disagrees with the summed sign; `base + sum_k w_k tau_k /
//! sum_k w_k` over the agreeing entries (mergekit's `sce`; no per-model weights).
//!
//! The selection is an exact whole-tensor top-k of the per-element variance over the experts
//! (ties by index), and the weights a sum over the tensor: both come from the pre-pass.

use super::registry::{BasePolicy, Fallback, INT8_MASK, Kind, MethodDef, ParamSpec};
use super::select::Threshold;
use super::stats::{TensorPass, TensorStats, map_chunks, sum_in_order, thresholds};
use super::{ChunkCtx, KernelForm, MergeMethod, TensorParams};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "sce",
    summary: "keep the top-variance fraction of elements, weight models by mean square, erase minority signs",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::global("select_topk", Kind::Number, Fallback::Number(1.0), "fraction of elements kept by variance")
            .within(0.0, 1.0),
        INT8_MASK,
    ],
    validate: |_: &TensorParams| Ok(()),
    build: |_| Box::new(Sce),
};

pub struct Sce;

/// Per-element variance (population) of the task vectors as torch's `var(dim=0, unbiased=False)`
/// computes it for mergekit: each task vector in f32, then Welford's update in f64, the result
/// rounded to f32. A plain f32 mean of three equal values is often not the value, which gave
/// elements whose task vectors all agree a variance of ~1e-18 instead of 0, so they were counted
/// and selected where mergekit leaves the base (fuzzing round 7).
fn variances<E: AsRef<[f32]>>(base: &[f32], experts: &[E], out: &mut [f32]) {
    for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        let (mut mean, mut m2) = (0.0f64, 0.0f64);
        for (n, e) in experts.iter().enumerate() {
            let x = f64::from(e.as_ref()[i] - b);
            let delta = x - mean;
            mean += delta / (n + 1) as f64;
            m2 += delta * (x - mean);
        }
        *o = (m2 / experts.len() as f64) as f32;
    }
}

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        let select = selection(pass)?;
        let kk = pass.experts();
        // Mean square of each selected task vector (over all elements, as mergekit's mean).
        let parts = map_chunks(pass, |offset, base, experts| {
            let mut var = vec![0f32; base.len()];
            variances(base, experts, &mut var);
            experts
                .iter()
                .map(|e| {
                    e.iter()
                        .zip(base)
                        .zip(&var)
                        .enumerate()
                        .filter(|(i, (_, v))| select.keep(**v, offset + i))
                        .map(|(_, ((&x, &b), _))| ((x - b) as f64).powi(2))
                        .sum::<f64>()
                })
                .collect()
        })?;
        let n = pass.len().max(1) as f64;
        let squares: Vec<f64> = sum_in_order(parts, kk).into_iter().map(|s| s / n).collect();
        let total: f64 = squares.iter().sum();
        let weights =
            if total.abs() < 1e-6 { vec![1.0 / kk as f64; kk] } else { squares.iter().map(|s| s / total).collect() };
        Ok(TensorStats { thresholds: vec![select], scalars: weights })
    }

    fn kernel_form(&self) -> Option<KernelForm<'_>> {
        Some(KernelForm::Sce)
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (Some(base), Some(&select)) = (base, ctx.thresholds.first()) else {
            out.fill(f32::NAN);
            return;
        };
        let n = out.len();
        scratch.resize(n, 0.0);
        variances(base, experts, scratch);
        for (i, o) in out.iter_mut().enumerate() {
            let keep = select.keep(scratch[i], ctx.offset + i);
            let taus = experts.iter().map(|e| if keep { e[i] - base[i] } else { 0.0 });
            let positive = taus.clone().fold(0.0f32, |s, t| s + t) >= 0.0;
            let (mut sum, mut div) = (0.0f32, 0.0f32);
            for (k, t) in taus.enumerate() {
                if (positive && t > 0.0) || (!positive && t < 0.0) {
                    let w = ctx.scalars.get(k).map_or(0.0, |&w| w as f32);
                    sum += t * w;
                    div += w;
                }
            }
            *o = base[i] + sum / div.max(1e-6);
        }
    }
}

/// The variance threshold keeping `select_topk * nonzero` elements, where `nonzero` counts the
/// elements whose variance is not 0 (mergekit's `sce_mask`). The product is torch's: an f32
/// multiply (of `nonzero` rounded to f32), truncated; in f64 it often came out one element short
/// (`480000 * 0.02` is 9599.9998 in f64, 9600 in f32; fuzzing round 7).
fn selection(pass: &dyn TensorPass) -> Result<Threshold> {
    let topk = pass.params().global("select_topk", 1.0);
    if topk >= 1.0 {
        return Ok(Threshold::KEEP_ALL);
    }
    if topk <= 0.0 {
        return Ok(Threshold::KEEP_NONE);
    }
    let counts = map_chunks(pass, |_, base, experts| {
        let mut var = vec![0f32; base.len()];
        variances(base, experts, &mut var);
        var.iter().filter(|&&v| v != 0.0).count()
    })?;
    let nonzero: usize = counts.into_iter().sum();
    let k = (nonzero as f32 * topk) as usize;
    let th = thresholds(pass, &[k], |base, experts, out| variances(base, experts, &mut out[0]))?;
    Ok(th[0])
}
