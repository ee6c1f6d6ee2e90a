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

/// Per-element variance (population) of the task vectors, in f32 as mergekit computes it.
fn variances<E: AsRef<[f32]>>(base: &[f32], experts: &[E], out: &mut [f32]) {
    let k = experts.len() as f32;
    for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        let mean = experts.iter().fold(0.0f32, |s, e| s + (e.as_ref()[i] - b)) / k;
        *o = experts.iter().fold(0.0f32, |s, e| {
            let d = (e.as_ref()[i] - b) - mean;
            s + d * d
        }) / k;
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

/// The variance threshold keeping `floor(select_topk * nonzero)` elements, where `nonzero`
/// counts the elements whose variance is not 0 (mergekit's `sce_mask`).
fn selection(pass: &dyn TensorPass) -> Result<Threshold> {
    let topk = pass.params().global("select_topk", 1.0) as f64;
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
    let k = (nonzero as f64 * topk).floor() as usize;
    let th = thresholds(pass, &[k], |base, experts, out| variances(base, experts, &mut out[0]))?;
    Ok(th[0])
}
