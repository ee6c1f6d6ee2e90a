//! Linear merge ("model soup"): the weighted average of the models' weights, normalised by the
//! sum of weights unless `normalize: false`. No base model is needed.

use super::registry::{self, BasePolicy, MethodDef, WEIGHT};
use super::{ChunkCtx, KernelForm, MergeMethod};

pub const DEF: MethodDef = MethodDef {
    name: "linear",
    summary: "weighted average of the models' weights",
    base: BasePolicy::Unused,
    min_models: 1,
    max_models: None,
    params: &[registry::normalize(DEFAULT_NORMALIZE), WEIGHT],
    validate: registry::no_check,
    build: |_| Box::new(Linear),
};

pub const DEFAULT_NORMALIZE: bool = true;

pub struct Linear;

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        DEF.name
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
        // mergekit's linear divides by any non-zero sum (the 1e-8 cut is its task-vector methods').
        let div = if p.normalize && wsum != 0.0 { wsum } else { 1.0 };
        out.fill(0.0);
        for (k, expert) in experts.iter().enumerate() {
            let c = p.weights[k] / div;
            for (o, &x) in out.iter_mut().zip(*expert) {
                *o += c * x;
            }
        }
    }
}
