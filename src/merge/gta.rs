//! Generalized task arithmetic, the core that task_arithmetic, TIES and both DARE variants share
//! (as in mergekit): sparsify each task vector, weight it, optionally elect a sign per element
//! and keep only agreeing entries, sum, optionally normalise, scale by lambda, add to the base.
//!
//! Every loop runs over one expert's contiguous chunk at a time so it vectorises.

use super::philox::ElementStream;
use super::{ChunkCtx, KernelForm, MergeMethod};

/// How each task vector is thinned before mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `density` fraction of largest magnitudes (TIES "trim").
    Magnitude,
    /// Keep each entry with probability `density` (DARE "drop").
    Random,
}

/// A configured generalized-task-arithmetic method.
#[derive(Debug, Clone)]
pub struct Gta {
    pub name: &'static str,
    pub sparsify: Sparsify,
    /// TIES sign election by summed mass.
    pub consensus: bool,
    /// Divide kept entries by their density (DARE's rescale).
    pub rescale: bool,
    /// Seed of the DARE masks.
    pub seed: u64,
}

impl MergeMethod for Gta {
    fn name(&self) -> &'static str {
        self.name
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn needs_thresholds(&self) -> bool {
        self.sparsify == Sparsify::Magnitude
    }

    fn kernel_form(&self) -> Option<KernelForm<'_>> {
        Some(KernelForm::Gta(self))
    }

    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let base = base.expect("task-arithmetic methods are only run with a base model");
        let n = out.len();
        let k_count = experts.len();
        let p = ctx.params;
        scratch.resize((k_count + 2) * n, 0.0);
        let (deltas, rest) = scratch.split_at_mut(k_count * n);
        let (aux, div) = rest.split_at_mut(n);

        // Weighted, sparsified task vectors d_k = w_k * sparsify(theta_k - base).
        for (k, expert) in experts.iter().enumerate() {
            let d = &mut deltas[k * n..(k + 1) * n];
            let w = p.weights[k];
            let density = p.densities[k];
            let scale = if self.rescale && density > 0.0 && density < 1.0 { w / density } else { w };
            match self.sparsify {
                Sparsify::None => {
                    for ((d, &e), &b) in d.iter_mut().zip(*expert).zip(base) {
                        *d = w * (e - b);
                    }
                }
                Sparsify::Magnitude => {
                    let th = ctx.thresholds[k];
                    // Values tied at the threshold are kept below index `cutoff`: only a chunk
                    // that straddles it needs the index; elsewhere the test is one compare, and
                    // the loop is branch-free so it vectorises. Same decisions as `Threshold::keep`.
                    if th.cutoff > ctx.offset && th.cutoff < ctx.offset + n {
                        for (i, ((d, &e), &b)) in d.iter_mut().zip(*expert).zip(base).enumerate() {
                            let tau = e - b;
                            *d = if th.keep(tau, ctx.offset + i) { scale * tau } else { 0.0 };
                        }
                    } else {
                        let keep_ties = th.cutoff >= ctx.offset + n;
                        for ((d, &e), &b) in d.iter_mut().zip(*expert).zip(base) {
                            let tau = e - b;
                            let a = tau.abs();
                            let keep = (a > th.t) | (keep_ties & (a == th.t));
                            *d = if keep { scale * tau } else { 0.0 };
                        }
                    }
                }
                Sparsify::Random if density >= 1.0 => {
                    for ((d, &e), &b) in d.iter_mut().zip(*expert).zip(base) {
                        *d = w * (e - b);
                    }
                }
                Sparsify::Random => {
                    ElementStream::new(self.seed, ctx.name_hash, k as u32).fill_uniform(ctx.offset, aux);
                    for (((d, &e), &b), &u) in d.iter_mut().zip(*expert).zip(base).zip(aux.iter()) {
                        *d = if u < density { scale * (e - b) } else { 0.0 };
                    }
                }
            }
        }

        // Mixed delta into `out`, the matching sum of weights into `div`.
        out.fill(0.0);
        div.fill(0.0);
        if self.consensus {
            // Elected sign: that of the summed mass (>= 0 counts as positive).
            aux.fill(0.0);
            for k in 0..k_count {
                for (s, &d) in aux.iter_mut().zip(&deltas[k * n..(k + 1) * n]) {
                    *s += d;
                }
            }
            for k in 0..k_count {
                let w = p.weights[k];
                for (((o, dv), &d), &s) in
                    out.iter_mut().zip(div.iter_mut()).zip(&deltas[k * n..(k + 1) * n]).zip(aux.iter())
                {
                    // Non-short-circuit logic and selects instead of a branch: vectorises.
                    let agree = ((d > 0.0) & (s >= 0.0)) | ((d < 0.0) & (s < 0.0));
                    *o += if agree { d } else { 0.0 };
                    *dv += if agree { w } else { 0.0 };
                }
            }
            for dv in div.iter_mut() {
                if *dv == 0.0 {
                    *dv = 1.0;
                }
            }
        } else {
            for k in 0..k_count {
                for (o, &d) in out.iter_mut().zip(&deltas[k * n..(k + 1) * n]) {
                    *o += d;
                }
            }
            let wsum: f32 = p.weights.iter().sum();
            div.fill(if wsum.abs() < 1e-8 { 1.0 } else { wsum });
        }

        let lambda = p.lambda;
        if p.normalize {
            for ((o, &dv), &b) in out.iter_mut().zip(div.iter()).zip(base) {
                *o = b + lambda * (*o / dv);
            }
        } else {
            for (o, &b) in out.iter_mut().zip(base) {
                *o = b + lambda * *o;
            }
        }
    }
}
