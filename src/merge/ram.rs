//! Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`): a task-vector entry counts as
//! a model's contribution when its magnitude exceeds `epsilon`; entries only one model
//! contributes are kept whole, entries several contribute to are averaged over those models.
//! `ramplus_tl` scales each model's unique entries by `1 + r * min(rho, alpha)`, `rho` being
//! the model's shared-to-unique contribution ratio over the tensor (from the statistics pass).

use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, map_chunks, sum_in_order};
use super::{ChunkCtx, MergeMethod};
use crate::error::Result;

const EPSILON: ParamSpec = ParamSpec::global(
    "epsilon",
    Kind::Number,
    Fallback::Number(1e-5),
    "task-vector magnitudes above this count as a contribution",
);

pub const DEF: MethodDef = MethodDef {
    name: "ram",
    summary: "keep entries one model changes, average entries several models change",
    base: BasePolicy::Required,
    min_models: 1,
    // Contributors are a 64-bit mask per element.
    max_models: Some(64),
    params: &[EPSILON],
    validate: registry::no_check,
    build: |_| Box::new(Ram { plus: false }),
};

pub const DEF_PLUS: MethodDef = MethodDef {
    name: "ramplus_tl",
    summary: "ram, with each model's unique entries scaled up by its shared-to-unique ratio in the tensor",
    base: BasePolicy::Required,
    min_models: 1,
    // Contributors are a 64-bit mask per element.
    max_models: Some(64),
    params: &[
        ParamSpec::global("r", Kind::Number, Fallback::Number(0.1), "gain on the shared-to-unique ratio"),
        ParamSpec::global("alpha", Kind::Number, Fallback::Number(0.2), "cap on the shared-to-unique ratio"),
        EPSILON,
    ],
    validate: registry::no_check,
    build: |_| Box::new(Ram { plus: true }),
};

pub struct Ram {
    /// `ramplus_tl`: unique entries scaled per model.
    pub plus: bool,
}

/// Which models contribute at element `i` (bit `k`), and how many.
#[inline]
fn contributors(base: &[f32], experts: &[&[f32]], i: usize, eps: f32) -> (u64, u32) {
    let mut mask = 0u64;
    for (k, e) in experts.iter().enumerate() {
        if (e[i] - base[i]).abs() > eps {
            mask |= 1 << k;
        }
    }
    (mask, mask.count_ones())
}

impl Ram {
    /// Per model `1 + r * clamp(shared / max(unique, epsilon), 0, alpha)`.
    fn gains(&self, pass: &dyn TensorPass) -> Result<Vec<f64>> {
        let p = pass.params();
        let eps = p.global("epsilon", 1e-5);
        let k = pass.experts();
        let parts = map_chunks(pass, |_, base, experts| {
            let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
            // [shared_0, unique_0, shared_1, ...]
            let mut c = vec![0f64; 2 * k];
            for i in 0..base.len() {
                let (mask, n) = contributors(base, &views, i, eps);
                (0..k).filter(|&m| mask >> m & 1 == 1).for_each(|m| c[2 * m + usize::from(n == 1)] += 1.0);
            }
            c
        })?;
        let c = sum_in_order(parts, 2 * k);
        let (r, alpha) = (p.global("r", 0.1), p.global("alpha", 0.2));
        Ok((0..k)
            .map(|m| {
                let rho = c[2 * m] as f32 / (c[2 * m + 1] as f32).max(eps);
                (1.0 + r * rho.clamp(0.0, alpha)) as f64
            })
            .collect())
    }
}

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        if self.plus { DEF_PLUS.name } else { DEF.name }
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        if !self.plus || pass.experts() > 64 {
            return Ok(TensorStats::default());
        }
        Ok(TensorStats { thresholds: Vec::new(), scalars: self.gains(pass)? })
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let Some(base) = base.filter(|_| experts.len() <= 64) else {
            out.fill(f32::NAN);
            return;
        };
        let eps = ctx.params.global("epsilon", 1e-5);
        let gain = |k: usize| ctx.scalars.get(k).map_or(1.0, |&g| g as f32);
        for (i, o) in out.iter_mut().enumerate() {
            let (mask, n) = contributors(base, experts, i, eps);
            let mut sum = 0f32;
            for (k, e) in experts.iter().enumerate().filter(|(k, _)| mask >> k & 1 == 1) {
                let tv = e[i] - base[i];
                sum += if n == 1 { tv * gain(k) } else { tv / n as f32 };
            }
            *o = base[i] + sum;
        }
    }
}
