//! Multi-SLERP (mergekit's `multislerp`): barycentric interpolation of any number of models
//! (of their task vectors when a `base_model` is given) on the hypersphere. Each vector is
//! scaled to unit length, the weighted mean of the units is projected onto the sphere, the
//! units' weighted tangent at that point is mapped back with the exponential map, and the
//! result is scaled by the weighted mean of the norms.
//!
//! Every step stays in the span of the input vectors, so the whole computation runs on their
//! Gram matrix from the statistics pass and yields one coefficient per model: each chunk is
//! then a weighted sum. (The tangent at the weighted Euclidean mean is zero in exact
//! arithmetic; mergekit's f32 rounding leaves a ~1e-7 relative residue, which is why parity
//! is at f32 level rather than bit-exact.)

use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, Vectors, gram};
use super::{ChunkCtx, MergeMethod};
use crate::error::{Error, Result};

pub const DEF: MethodDef = MethodDef {
    name: "multislerp",
    summary: "barycentric spherical interpolation of any number of models (of their task vectors with a base)",
    base: BasePolicy::Optional,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::per_model("weight", Fallback::Required, "weight of the model"),
        ParamSpec::global("normalize_weights", Kind::Bool, Fallback::Bool(true), "divide the weights by their sum"),
        ParamSpec::global("eps", Kind::Number, Fallback::Number(EPS), "added to norms before dividing by them"),
    ],
    validate: registry::no_check,
    build: |s| Box::new(MultiSlerp { base: s.has_base, normalize: s.flag("normalize_weights") }),
};

/// mergekit's default `eps`.
const EPS: f64 = 1e-8;

pub struct MultiSlerp {
    /// Interpolate task vectors (expert - base) and add the base back.
    pub base: bool,
    pub normalize: bool,
}

/// `x^T G y` for coefficient vectors over the inputs.
fn quad(g: &[f64], x: &[f64], y: &[f64]) -> f64 {
    let k = x.len();
    (0..k).map(|i| (0..k).map(|j| x[i] * g[i * k + j] * y[j]).sum::<f64>()).sum()
}

/// The models' coefficients from their Gram matrix `g` (`k x k`) and weights, step by step as
/// mergekit's `multislerp` (norms get `eps` added; the result is scaled by the weighted
/// norms). Errors when the weighted mean of the unit vectors vanishes for 3+ models.
pub fn coefficients(g: &[f64], weights: &[f64], eps: f64) -> std::result::Result<Vec<f64>, String> {
    let k = weights.len();
    let norms: Vec<f64> = (0..k).map(|i| g[i * k + i].max(0.0).sqrt()).collect();
    // The weighted mean of the units, as coefficients on the vectors.
    let mean: Vec<f64> = (0..k).map(|i| weights[i] / (norms[i] + eps)).collect();
    let mean_norm = quad(g, &mean, &mean).max(0.0).sqrt();
    if mean_norm < eps {
        if k == 2 {
            return Ok(weights.to_vec());
        }
        return Err("the weighted sum of the unit vectors is zero (antipodal models whose weights balance out); \
                    change the weights"
            .into());
    }
    let dir: Vec<f64> = mean.iter().map(|c| c / mean_norm).collect();
    // Tangent: sum_i w_i (u_i - (u_i . dir) dir).
    let projected: f64 = (0..k)
        .map(|i| {
            let unit: Vec<f64> = (0..k).map(|j| if j == i { 1.0 / (norms[i] + eps) } else { 0.0 }).collect();
            weights[i] * quad(g, &unit, &dir)
        })
        .sum();
    let tangent: Vec<f64> = (0..k).map(|i| mean[i] - projected * dir[i]).collect();
    let tangent_norm = quad(g, &tangent, &tangent).max(0.0).sqrt() + eps;
    let avg_norm: f64 = norms.iter().zip(weights).map(|(n, w)| n * w).sum();
    // sin(x)/x -> 1: with `eps: 0` and an exactly zero tangent mergekit divides 0 by 0.
    let s = if tangent_norm > 0.0 { tangent_norm.sin() / tangent_norm } else { 1.0 };
    let c = tangent_norm.cos();
    Ok((0..k).map(|i| avg_norm * (dir[i] * c + tangent[i] * s)).collect())
}

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        self.base
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        let p = pass.params();
        let k = pass.experts();
        if k < 2 {
            return Ok(TensorStats::default());
        }
        let mut weights: Vec<f64> = p.weights.iter().map(|&w| w as f64).collect();
        if self.normalize {
            let sum: f64 = weights.iter().sum();
            if sum.abs() < 1e-12 {
                return Err(Error::Invalid(format!(
                    "multislerp: the weights {:?} (`weight`) sum to 0, and `normalize_weights: true` divides by their sum",
                    p.weights
                )));
            }
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        let g = expert_gram(pass, self.base)?;
        let eps = p.global("eps", EPS as f32) as f64;
        let scalars = coefficients(&g, &weights, eps).map_err(|e| Error::Invalid(format!("multislerp: {e}")))?;
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
        combine(ctx.scalars, base.filter(|_| self.base), experts, out);
    }
}

/// The Gram matrix (`k x k`) of the experts' task vectors (with a base) or weights.
pub fn expert_gram(pass: &dyn TensorPass, task_vectors: bool) -> Result<Vec<f64>> {
    if task_vectors {
        return gram(pass, Vectors::TaskVectors);
    }
    let k = pass.experts();
    let full = gram(pass, Vectors::BaseAndExperts)?;
    Ok((0..k * k).map(|at| full[(at / k + 1) * (k + 1) + at % k + 1]).collect())
}

/// `base + sum_k c_k (x_k - base)` (or `sum_k c_k x_k` without a base); with one expert and
/// no coefficients, the expert itself (mergekit returns a lone input unchanged).
pub fn combine(coefs: &[f64], base: Option<&[f32]>, experts: &[&[f32]], out: &mut [f32]) {
    if coefs.is_empty() {
        match experts.first() {
            Some(e) if experts.len() == 1 => out.copy_from_slice(e),
            _ => out.fill(f32::NAN),
        }
        return;
    }
    let c: Vec<f32> = coefs.iter().map(|&c| c as f32).collect();
    for (i, o) in out.iter_mut().enumerate() {
        let b = base.map_or(0.0, |b| b[i]);
        *o = b + experts.iter().zip(&c).fold(0.0f32, |s, (e, &c)| s + c * (e[i] - b));
    }
}

#[cfg(test)]
mod tests {
    use super::coefficients;

    /// Two antipodal vectors with equal weights fall back to the linear mix (mergekit's
    /// two-model fallback); three whose units cancel are an error.
    #[test]
    fn cancelling_units() {
        let g2 = [1.0, -1.0, -1.0, 1.0];
        assert_eq!(coefficients(&g2, &[0.5, 0.5], 1e-8), Ok(vec![0.5, 0.5]));
        // Unit vectors at 120 degrees: their equal-weight mean is zero.
        let g3 = [1.0, -0.5, -0.5, -0.5, 1.0, -0.5, -0.5, -0.5, 1.0];
        let third = 1.0 / 3.0;
        assert!(coefficients(&g3, &[third; 3], 1e-8).is_err_and(|e| e.contains("weights")));
    }

    /// Orthogonal vectors of norms 3 and 4 at equal weights: the normalised mean of the units,
    /// scaled by the mean norm 3.5.
    #[test]
    fn orthogonal_pair() {
        let c = coefficients(&[9.0, 0.0, 0.0, 16.0], &[0.5, 0.5], 0.0).unwrap_or_default();
        let s = 3.5 / 2f64.sqrt();
        assert!((c[0] - s / 3.0).abs() < 1e-12 && (c[1] - s / 4.0).abs() < 1e-12, "{c:?}");
    }
}
