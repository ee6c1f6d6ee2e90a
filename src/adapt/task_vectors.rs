//! The shared part of the merged model during adaptation: for each tensor of the shared blocks,
//! the pretrained values and every task's vector `tau_k = theta_k - theta_pre`.
//!
//! Training never holds a merged model: [`TaskVectors::merged_block`] builds one block's weights
//! `theta_pre + sum_k lambda_k tau_k` when the forward (or the recomputing backward) reaches it,
//! and [`TaskVectors::lambda_grad`] turns that block's weight gradients into Lambda gradients,
//! `dL/dlambda_k = <dL/dtheta, tau_k>` (with [`crate::merge::lambda_grad`], the CPU twin of the
//! `lambda_grad` kernel), before the block is dropped.

use rayon::prelude::*;

use super::lambda::Lambda;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::merge::lambda_grad::lambda_grad;
use crate::model::{Param, Params};

/// Elements per parallel piece of a merge.
const MERGE_CHUNK: usize = 1 << 14;

/// One shared tensor.
pub struct SharedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Its Lambda row.
    pub row: usize,
    pub base: Vec<f32>,
    /// One task vector per task, in Lambda's model order.
    pub taus: Vec<Vec<f32>>,
}

/// The shared tensors, grouped by block (aligned with the shared blocks of the model).
pub struct TaskVectors {
    pub blocks: Vec<Vec<SharedTensor>>,
}

impl TaskVectors {
    /// Task vectors of the first `blocks.len()` blocks. `base[b]` and `experts[k][b]` are block
    /// `b`'s parameters of the pretrained model and of expert `k`; `block_names[b]` names it for
    /// block-granularity Lambda.
    pub fn new<B: Backend>(
        be: &B,
        base: &[&Params<B>],
        experts: &[Vec<&Params<B>>],
        block_names: &[String],
        lambda: &Lambda,
    ) -> Result<Self> {
        let mut blocks = Vec::with_capacity(base.len());
        for (b, params) in base.iter().enumerate() {
            let mut tensors = Vec::with_capacity(params.len());
            for (name, p) in params.iter() {
                let row = lambda.row_of(name, &block_names[b]).ok_or_else(|| {
                    Error::Invalid(format!("internal: shared tensor `{name}` has no Lambda coefficients"))
                })?;
                let base_v = be.download(&p.buf)?;
                let mut taus = Vec::with_capacity(experts.len());
                for (k, e) in experts.iter().enumerate() {
                    let ep = e[b].get(name).ok_or_else(|| {
                        Error::Invalid(format!("expert {} has no tensor `{name}` in block `{}`", k + 1, block_names[b]))
                    })?;
                    if ep.shape != p.shape {
                        return Err(Error::Invalid(format!(
                            "expert {}: tensor `{name}` has shape {:?}, the base model {:?}",
                            k + 1,
                            ep.shape,
                            p.shape
                        )));
                    }
                    let mut tau = be.download(&ep.buf)?;
                    tau.iter_mut().zip(&base_v).for_each(|(t, b)| *t -= b);
                    taus.push(tau);
                }
                tensors.push(SharedTensor { name: name.clone(), shape: p.shape.clone(), row, base: base_v, taus });
            }
            blocks.push(tensors);
        }
        Ok(TaskVectors { blocks })
    }

    /// Block `b`'s merged weights, `base + sum_k lambda_k tau_k`, on the backend.
    pub fn merged_block<B: Backend>(&self, be: &B, b: usize, lambda: &Lambda) -> Result<Params<B>> {
        let mut out = Params::new();
        for t in &self.blocks[b] {
            let values = merge_tensor(&t.base, &t.taus, lambda.row(t.row));
            out.insert(t.name.clone(), Param { shape: t.shape.clone(), buf: be.upload(&values)? });
        }
        Ok(out)
    }

    /// Adds block `b`'s Lambda gradients to `out` (`[rows, K]`, like Lambda's values) from the
    /// gradients of its merged weights.
    pub fn lambda_grad<B: Backend>(&self, be: &B, b: usize, grads: &Params<B>, out: &mut [f64]) -> Result<()> {
        for t in &self.blocks[b] {
            let g = grads
                .get(&t.name)
                .ok_or_else(|| Error::Invalid(format!("internal: no gradient for shared tensor `{}`", t.name)))?;
            let g = be.download(&g.buf)?;
            let k = t.taus.len();
            let taus: Vec<&[f32]> = t.taus.iter().map(Vec::as_slice).collect();
            for (j, dot) in lambda_grad(&g, None, &taus)?.into_iter().enumerate() {
                out[t.row * k + j] += dot;
            }
        }
        Ok(())
    }
}

/// `base + sum_k lambda_k tau_k`, accumulated in f32 in task order.
pub fn merge_tensor(base: &[f32], taus: &[Vec<f32>], lambda: &[f32]) -> Vec<f32> {
    let mut out = base.to_vec();
    out.par_chunks_mut(MERGE_CHUNK).enumerate().for_each(|(c, o)| {
        let (start, len) = (c * MERGE_CHUNK, o.len());
        for (tau, &l) in taus.iter().zip(lambda) {
            for (v, &t) in o.iter_mut().zip(&tau[start..start + len]) {
                *v += l * t;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_grad_match_naive_sums() {
        let n = 3 * MERGE_CHUNK + 17;
        let wave = |s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
        let base = wave(0.37);
        let taus = vec![wave(1.1), wave(2.3), wave(0.7)];
        let lambda = [0.3f32, -0.2, 0.9];
        let merged = merge_tensor(&base, &taus, &lambda);
        for i in [0, 5, MERGE_CHUNK, n - 1] {
            let want = base[i] + lambda.iter().zip(&taus).map(|(l, t)| l * t[i]).sum::<f32>();
            assert!((merged[i] - want).abs() < 1e-6);
        }
        let g = wave(0.05);
        let views: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
        let dots = lambda_grad(&g, None, &views).unwrap();
        for (j, tau) in taus.iter().enumerate() {
            let naive: f64 = g.iter().zip(tau).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((dots[j] - naive).abs() <= 1e-9 * naive.abs().max(1.0), "{} vs {naive}", dots[j]);
        }
        assert_eq!(dots, lambda_grad(&g, None, &views).unwrap(), "deterministic");
    }
}
