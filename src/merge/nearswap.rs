//! NearSwap: take the other model's value where it is within `t` of the base's, and move
//! towards it by `t / |base - other|` elsewhere: `w = clamp(t / max(|a - b|, 1e-6), 0, 1)`,
//! `out = w b + (1 - w) a` (mergekit's `nearswap`). Element-wise, no statistics.

use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::{ChunkCtx, MergeMethod};

pub const DEF: MethodDef = MethodDef {
    name: "nearswap",
    summary: "take the other model's values where they are near the base's (distance t)",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::global("t", Kind::Number, Fallback::Required, "distance below which values are swapped")],
    validate: registry::no_check,
    build: |_| Box::new(NearSwap),
};

pub struct NearSwap;

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let (Some(base), Some(other)) = (base, experts.first()) else {
            out.fill(f32::NAN);
            return;
        };
        let t = ctx.params.global("t", 0.0);
        for ((o, &a), &b) in out.iter_mut().zip(base).zip(*other) {
            let w = (t / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
            *o = w * b + (1.0 - w) * a;
        }
    }
}
