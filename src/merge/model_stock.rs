//! Model Stock (Jang et al., 2024): average the fine-tuned models and move from the base
//! towards that average by `t = K cos / (1 + (K - 1) cos)`, where `cos` is the mean cosine
//! between the task vectors (mergekit's `model_stock`). Per tensor the cosines come from a
//! Gram-matrix pre-pass; with `filter_wise: true` they are taken per row instead, and each
//! chunk holds whole rows. Where `1 + (K - 1) cos` vanishes the base is kept.

use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, Vectors, gram};
use super::{ChunkCtx, MergeMethod};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "model_stock",
    summary: "move from the base to the models' average by a ratio set by their task vectors' cosines",
    base: BasePolicy::Required,
    min_models: 2,
    max_models: None,
    params: &[ParamSpec::global("filter_wise", Kind::Bool, Fallback::Bool(false), "one ratio per row, not per tensor")],
    validate: registry::no_check,
    build: |s| Box::new(ModelStock { filter_wise: s.flag("filter_wise") }),
};

pub struct ModelStock {
    pub filter_wise: bool,
}

/// The interpolation ratio from the task vectors' Gram matrix (`k x k`, row-major).
pub fn ratio(g: &[f64], k: usize) -> f64 {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..k {
        for j in i + 1..k {
            let norms = (g[i * k + i].sqrt() * g[j * k + j].sqrt()).max(1e-6);
            sum += (g[i * k + j] / norms).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let cos = sum / pairs.max(1) as f64;
    let den = 1.0 + (k as f64 - 1.0) * cos;
    if den.abs() < 1e-6 { 0.0 } else { k as f64 * cos / den }
}

/// `t * mean(experts) + (1 - t) * base` over one stretch of elements. The sum runs expert by
/// expert over the stretch (each element still adds its experts in order from zero), so the
/// loops vectorise.
fn blend(t: f32, base: &[f32], experts: &[&[f32]], out: &mut [f32]) {
    let count = experts.len() as f32;
    out.fill(0.0);
    for e in experts {
        out.iter_mut().zip(*e).for_each(|(o, &x)| *o += x);
    }
    for (o, &b) in out.iter_mut().zip(base) {
        *o = t * (*o / count) + (1.0 - t) * b;
    }
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn whole_rows(&self) -> bool {
        self.filter_wise
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        if self.filter_wise {
            return Ok(TensorStats::default());
        }
        let g = gram(pass, Vectors::TaskVectors)?;
        Ok(TensorStats { thresholds: Vec::new(), scalars: vec![ratio(&g, pass.experts())] })
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let Some(base) = base else {
            out.fill(f32::NAN);
            return;
        };
        if !self.filter_wise {
            blend(ctx.scalars.first().map_or(0.0, |&t| t as f32), base, experts, out);
            return;
        }
        let row = ctx.row_len.clamp(1, out.len().max(1));
        let k = experts.len();
        for (r, (o, b)) in out.chunks_mut(row).zip(base.chunks(row)).enumerate() {
            let range = r * row..r * row + o.len();
            let rows: Vec<&[f32]> = experts.iter().map(|e| &e[range.clone()]).collect();
            let mut g = vec![0f64; k * k];
            for i in 0..k {
                for j in i..k {
                    let d: f64 =
                        rows[i].iter().zip(rows[j]).zip(b).map(|((&x, &y), &z)| (x - z) as f64 * (y - z) as f64).sum();
                    g[i * k + j] = d;
                    g[j * k + i] = d;
                }
            }
            blend(ratio(&g, k) as f32, b, &rows, o);
        }
    }
}
