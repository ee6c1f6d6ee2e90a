//! SLERP: spherical interpolation between the base model and one other model, tensor by
//! tensor, with `t` the other model's share (mergekit's `slerp`). The angle comes from the
//! whole tensors' norms and dot product (a pre-pass in f64), so every chunk uses the same two
//! coefficients; nearly parallel tensors (|cos| > 0.9995) are interpolated linearly.

use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, Vectors, gram};
use super::{ChunkCtx, KernelForm, MergeMethod};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "slerp",
    summary: "spherical interpolation from base_model (t = 0) to the one other model (t = 1)",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::global("t", Kind::Number, Fallback::Required, "share of the other model (0: base, 1: other)")],
    validate: registry::no_check,
    build: |_| Box::new(Slerp),
};

/// Below this a norm counts as zero (and is replaced by 1), as in mergekit.
const NORM_EPS: f64 = 1e-8;
/// Above this |cos| the tensors count as parallel and are interpolated linearly.
const DOT_THRESHOLD: f64 = 0.9995;

pub struct Slerp;

/// The coefficients of base and other for share `t`, from the Gram matrix of the two tensors.
pub fn coefficients(t: f64, aa: f64, ab: f64, bb: f64) -> (f64, f64) {
    let norm = |x: f64| if x.sqrt() > NORM_EPS { x.sqrt() } else { 1.0 };
    let dot = (ab / (norm(aa) * norm(bb))).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        let g = gram(pass, Vectors::BaseAndExperts)?;
        let t = pass.params().global("t", 0.5) as f64;
        let (a, b) = coefficients(t, g[0], g[1], g[3]);
        Ok(TensorStats { thresholds: Vec::new(), scalars: vec![a, b] })
    }

    fn kernel_form(&self) -> Option<KernelForm<'_>> {
        Some(KernelForm::Slerp)
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let (Some(base), Some(other), &[a, b]) = (base, experts.first(), ctx.scalars) else {
            out.fill(f32::NAN);
            return;
        };
        let (a, b) = (a as f32, b as f32);
        for ((o, &x), &y) in out.iter_mut().zip(base).zip(*other) {
            *o = a * x + b * y;
        }
    }
}
