//! Linear merge ("model soup"): the weighted average of the models' weights, normalised by the
//! sum of weights unless `normalize: false`. No base model is needed.

use super::{ChunkCtx, KernelForm, MergeMethod, MethodInfo};

pub const INFO: MethodInfo = MethodInfo {
    name: "linear",
    summary: "weighted average of the models' weights",
    needs_base: false,
    global_params: &["normalize"],
    model_params: &["weight"],
};

pub const DEFAULT_NORMALIZE: bool = true;

pub struct Linear;

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn kernel_form(&self) -> Option<KernelForm<'_>> {
        Some(KernelForm::Linear)
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        _base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let p = ctx.params;
        let wsum: f32 = p.weights.iter().sum();
        let div = if p.normalize && wsum.abs() >= 1e-8 { wsum } else { 1.0 };
        out.fill(0.0);
        for (k, expert) in experts.iter().enumerate() {
            let c = p.weights[k] / div;
            for (o, &x) in out.iter_mut().zip(*expert) {
                *o += c * x;
            }
        }
    }
}
