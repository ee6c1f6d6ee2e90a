//! Karcher mean (mergekit's `karcher`): the equally weighted Riemannian mean of the models'
//! weights on the unit hypersphere, found by at most `max_iter` gradient steps that stop once
//! the tangent is shorter than `tol`, then scaled by the mean of the models' norms. A
//! `base_model` is not subtracted: as in mergekit, it is one more averaged model (once, whether
//! or not `models` lists it too).
//!
//! Every iterate stays in the span of the models' unit vectors, so the iteration runs on their
//! Gram matrix from the statistics pass (in f64) and yields one coefficient per model. mergekit
//! iterates on the f32 tensors, so the two agree to f32 rounding of the dot products (which
//! `arccos` amplifies for nearly parallel models), not bit for bit.

use super::multislerp::{combine, expert_gram};
use super::registry::{self, BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, Vectors, gram};
use super::{ChunkCtx, MergeMethod};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "karcher",
    summary: "Riemannian (Karcher) mean of the models on the hypersphere, scaled by their mean norm",
    // Optional so that the config hands a given base over once; the method averages it.
    base: BasePolicy::Optional,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::global("max_iter", Kind::Count, Fallback::Number(10.0), "most gradient steps"),
        ParamSpec::global("tol", Kind::Number, Fallback::Number(TOL), "stop once the tangent is shorter than this"),
    ],
    validate: registry::no_check,
    build: |s| Box::new(Karcher { max_iter: s.count("max_iter"), base: s.has_base }),
};

/// mergekit's default `tol`.
const TOL: f64 = 1e-5;

pub struct Karcher {
    pub max_iter: u64,
    /// A `base_model` was given: it is averaged as the first model.
    pub base: bool,
}

/// Coefficient vectors over the models' unit vectors, with their Gram matrix.
struct Sphere<'a> {
    g: &'a [f64],
    k: usize,
}

impl Sphere<'_> {
    fn dot(&self, x: &[f64], y: &[f64]) -> f64 {
        let k = self.k;
        (0..k).map(|i| (0..k).map(|j| x[i] * self.g[i * k + j] * y[j]).sum::<f64>()).sum()
    }

    fn norm(&self, x: &[f64]) -> f64 {
        self.dot(x, x).max(0.0).sqrt()
    }

    fn unit(&self, i: usize) -> Vec<f64> {
        (0..self.k).map(|j| if j == i { 1.0 } else { 0.0 }).collect()
    }
}

/// The models' coefficients from the Gram matrix `g` (`k x k`) of their weights, as mergekit's
/// `karcher_merge_tensors` with equal weights: models whose norm is at most `tol` drop out of
/// the mean (but not of the norm scale), and all-zero models give zeros.
pub fn coefficients(g: &[f64], max_iter: u64, tol: f64) -> Vec<f64> {
    let k = (g.len() as f64).sqrt() as usize;
    let norms: Vec<f64> = (0..k).map(|i| g[i * k + i].max(0.0).sqrt()).collect();
    // Gram matrix of the unit vectors (zero vectors stay zero).
    let inv: Vec<f64> = norms.iter().map(|&n| if n == 0.0 { 0.0 } else { 1.0 / n }).collect();
    let gu: Vec<f64> = (0..k * k).map(|at| g[at] * inv[at / k] * inv[at % k]).collect();
    let s = Sphere { g: &gu, k };
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    let Some(&first) = valid.first() else {
        return vec![0.0; k];
    };
    let alpha = 1.0 / valid.len() as f64;
    let mut mean = vec![0.0; k];
    valid.iter().for_each(|&i| mean[i] = alpha);
    let mean_norm = s.norm(&mean);
    mean = if mean_norm < tol { s.unit(first) } else { mean.iter().map(|c| c / mean_norm).collect() };
    for _ in 0..max_iter {
        let Some(next) = step(&s, &mean, &valid, alpha, tol) else { break };
        mean = next;
    }
    // Scale: the mean norm over every model, valid or not.
    let scale = norms.iter().sum::<f64>() / k as f64;
    (0..k).map(|i| scale * mean[i] * inv[i]).collect()
}

/// One gradient step from `mean`; `None` once the tangent is shorter than `tol`.
fn step(s: &Sphere<'_>, mean: &[f64], valid: &[usize], alpha: f64, tol: f64) -> Option<Vec<f64>> {
    let mut tangent = vec![0.0; s.k];
    for &i in valid {
        let unit = s.unit(i);
        let dot = s.dot(mean, &unit).clamp(-1.0, 1.0);
        let theta = dot.acos();
        if theta < tol {
            continue;
        }
        let f = alpha * theta / theta.sin();
        tangent.iter_mut().zip(unit.iter().zip(mean)).for_each(|(t, (u, m))| *t += f * (u - dot * m));
    }
    // A tangent of exactly 0 (two models, stepping from their midpoint) has converged even at
    // `tol: 0`: mergekit's f32 tangent there is rounding noise and its step changes nothing,
    // where ours would divide 0 by 0.
    let tn = s.norm(&tangent);
    if tn < tol || tn == 0.0 {
        return None;
    }
    let next: Vec<f64> = mean.iter().zip(&tangent).map(|(m, t)| tn.cos() * m + tn.sin() * t / tn).collect();
    let un = s.norm(&next);
    Some(if un > tol { next.iter().map(|c| c / un).collect() } else { next })
}

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        self.base
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        if pass.experts() + usize::from(self.base) < 2 {
            return Ok(TensorStats::default());
        }
        let g = if self.base { gram(pass, Vectors::BaseAndExperts)? } else { expert_gram(pass, false)? };
        let tol = pass.params().global("tol", TOL as f32) as f64;
        Ok(TensorStats { thresholds: Vec::new(), scalars: coefficients(&g, self.max_iter, tol) })
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let models: Vec<&[f32]> = base.filter(|_| self.base).into_iter().chain(experts.iter().copied()).collect();
        combine(ctx.scalars, None, &models, out);
    }
}

#[cfg(test)]
mod tests {
    use super::coefficients;

    /// Three widely spread vectors of different norms: far from the regime where one step
    /// converges, so every step counts.
    const V: [[f64; 4]; 3] = [[3.0, 0.5, -1.0, 0.2], [-0.5, 2.0, 1.0, 0.1], [0.3, -1.0, 0.0, 4.0]];

    fn merged(max_iter: u64) -> Vec<f64> {
        let g: Vec<f64> = (0..9).map(|at| V[at / 3].iter().zip(&V[at % 3]).map(|(a, b)| a * b).sum()).collect();
        let c = coefficients(&g, max_iter, 1e-5);
        (0..4).map(|e| (0..3).map(|i| c[i] * V[i][e]).sum()).collect()
    }

    /// mergekit 0.1.5's `karcher_merge_tensors(V, [1/3] * 3, max_iter, tol=1e-5)` in float64,
    /// after 1, 2 and 10 steps.
    #[test]
    fn karcher_steps_match_mergekit_in_f64() {
        let want: [(u64, [f64; 4]); 3] = [
            (1, [1.5918964366688035, 1.6970620978439008, 0.29850725229742214, 2.1936581092058196]),
            (2, [1.5858255192014978, 1.7075927663000938, 0.30451327722423804, 2.1890528865011074]),
            (10, [1.5848644659269142, 1.7094913598074228, 0.3055292578793807, 2.18812529274295]),
        ];
        for (steps, w) in want {
            let got = merged(steps);
            for (g, w) in got.iter().zip(w) {
                assert!((g - w).abs() < 1e-12, "max_iter {steps}: {got:?} vs {w}");
            }
        }
    }

    /// Two models at `tol: 0`: the first step from their midpoint has a zero tangent, which
    /// stops the iteration instead of dividing 0 by 0.
    #[test]
    fn two_models_at_zero_tol_stay_finite() {
        let g = [4.0, 1.0, 1.0, 1.0];
        let c = coefficients(&g, 4, 0.0);
        assert!(c.iter().all(|x| x.is_finite()), "{c:?}");
    }

    /// All-zero models merge to zeros, as mergekit's constant-zero branch.
    #[test]
    fn zero_models_give_zeros() {
        assert_eq!(coefficients(&[0.0; 4], 10, 1e-5), vec![0.0, 0.0]);
    }
}
