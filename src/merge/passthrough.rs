//! Passthrough: one model's tensors, optionally multiplied by a per-model `scale` (mergekit's
//! `passthrough`, used to rescale or re-export a model, and to stack layers with `slices`).
//! Without a scale each tensor's stored bytes are copied when the output keeps their dtype.

use super::registry::{self, BasePolicy, Fallback, MethodDef, ParamSpec};
use super::{ChunkCtx, MergeMethod, TensorParams};

pub const DEF: MethodDef = MethodDef {
    name: "passthrough",
    summary: "one model's weights, optionally times scale",
    base: BasePolicy::Unused,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::per_model("scale", Fallback::Unset, "factor applied to every tensor (default: none)")],
    validate: registry::no_check,
    build: |_| Box::new(Passthrough),
};

pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn copies_model(&self, params: &TensorParams) -> bool {
        !params.extra.contains_key("scale")
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        _base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let Some(x) = experts.first() else {
            out.fill(f32::NAN);
            return;
        };
        match ctx.params.extra.get("scale").and_then(|v| v.first()) {
            Some(&s) => out.iter_mut().zip(*x).for_each(|(o, &v)| *o = v * s),
            None => out.copy_from_slice(x),
        }
    }
}
