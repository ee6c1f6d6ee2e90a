//! Generalized task arithmetic, the core that task_arithmetic, TIES and both DARE variants share
//! (as in mergekit): sparsify each task vector, weight it, optionally elect a sign per element
//! and keep only agreeing entries, sum, optionally normalise, scale by lambda, add to the base.
//!
//! Every loop runs over one expert's contiguous chunk at a time so it vectorises.
//!
//! Breadcrumbs and DELLA sparsify through the same core ([`Sparsify::Outliers`],
//! [`Sparsify::MagPrune`]); their `rescale` is mergekit 0.1.5's l1 rescale (the kept entries
//! are scaled so the task vector keeps its l1 norm), whereas DARE's `rescale` stays the
//! DARE paper's `1 / density`, which the GPU kernel implements.

use std::cell::RefCell;

use super::magprune::RowPruner;
use super::philox::ElementStream;
use super::select::{self, Threshold};
use super::stats::{TensorPass, TensorStats, map_chunks, sum_in_order, thresholds};
use super::{ChunkCtx, KernelForm, MergeMethod, density_thresholds};
use crate::error::Result;

thread_local! {
    /// MagPrune's scratch, kept per thread: merge chunks hold only a row or two.
    static PRUNER: RefCell<RowPruner> = RefCell::new(RowPruner::default());
}

/// How each task vector is thinned before mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `density` fraction of largest magnitudes (TIES "trim").
    Magnitude,
    /// Keep each entry with probability `density` (DARE "drop").
    Random,
    /// Drop the `gamma` fraction of largest magnitudes and the smallest ones, keeping a
    /// `density` fraction (Model Breadcrumbs).
    Outliers,
    /// Keep each entry with a probability that grows with its magnitude rank in its row,
    /// from `density - epsilon` to `density + epsilon` (DELLA's MagPrune).
    MagPrune,
}

/// A configured generalized-task-arithmetic method.
#[derive(Debug, Clone)]
pub struct Gta {
    pub name: &'static str,
    pub sparsify: Sparsify,
    /// TIES sign election by summed mass.
    pub consensus: bool,
    /// Rescale what sparsification keeps: by 1/density for DARE's random drop (the paper's),
    /// to the task vector's l1 norm for the others (mergekit's).
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

    fn whole_rows(&self) -> bool {
        self.sparsify == Sparsify::MagPrune
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        let thresholds = match self.sparsify {
            Sparsify::Magnitude => density_thresholds(pass)?,
            Sparsify::Outliers => outlier_thresholds(pass)?,
            _ => Vec::new(),
        };
        let l1 = self.rescale && matches!(self.sparsify, Sparsify::Magnitude | Sparsify::Outliers | Sparsify::MagPrune);
        let scalars = if l1 { self.l1_factors(pass, &thresholds)? } else { Vec::new() };
        Ok(TensorStats { thresholds, scalars })
    }

    /// Every sparsification has a kernel: `gta_merge` (merge.cu), DELLA's `della_merge` (della.cu).
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
        if n == 0 {
            return;
        }
        let p = ctx.params;
        scratch.resize((experts.len() + 2) * n, 0.0);
        let (deltas, rest) = scratch.split_at_mut(experts.len() * n);
        let (aux, div) = rest.split_at_mut(n);
        for (k, (expert, d)) in experts.iter().zip(deltas.chunks_exact_mut(n)).enumerate() {
            self.weighted_delta(ctx, k, expert, base, d, aux);
        }
        // Mixed delta into `out`, the matching sum of weights into `div`.
        if self.consensus {
            consensus_mix(&p.weights, deltas, out, div, aux);
        } else {
            out.fill(0.0);
            for d in deltas.chunks_exact(n) {
                for (o, &d) in out.iter_mut().zip(d) {
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

/// TIES's disjoint mix: each element's elected sign is that of the summed mass (>= 0 counts as
/// positive); `out` sums the deltas that agree with it and `div` their weights (1 where none
/// does). `aux` is scratch as long as `out`.
fn consensus_mix(weights: &[f32], deltas: &[f32], out: &mut [f32], div: &mut [f32], aux: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    out.fill(0.0);
    div.fill(0.0);
    aux.fill(0.0);
    for d in deltas.chunks_exact(n) {
        for (s, &d) in aux.iter_mut().zip(d) {
            *s += d;
        }
    }
    for (d, &w) in deltas.chunks_exact(n).zip(weights) {
        for (((o, dv), &d), &s) in out.iter_mut().zip(div.iter_mut()).zip(d).zip(aux.iter()) {
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
}

impl Gta {
    /// Expert `k`'s weighted, sparsified task vector over the chunk:
    /// `d = w_k * sparsify(expert - base)`. `aux` is scratch as long as `d`.
    fn weighted_delta(
        &self,
        ctx: &ChunkCtx<'_>,
        k: usize,
        expert: &[f32],
        base: &[f32],
        d: &mut [f32],
        aux: &mut [f32],
    ) {
        let n = d.len();
        let p = ctx.params;
        let w = p.weights[k];
        let density = p.densities[k];
        let scale = if self.rescale && density > 0.0 && density < 1.0 { w / density } else { w };
        match self.sparsify {
            Sparsify::None => {
                for ((d, &e), &b) in d.iter_mut().zip(expert).zip(base) {
                    *d = w * (e - b);
                }
            }
            Sparsify::Magnitude if !self.rescale => {
                let th = ctx.thresholds[k];
                // Values tied at the threshold are kept below index `cutoff`: only a chunk
                // that straddles it needs the index; elsewhere the test is one compare, and
                // the loop is branch-free so it vectorises. Same decisions as `Threshold::keep`.
                if th.cutoff > ctx.offset && th.cutoff < ctx.offset + n {
                    for (i, ((d, &e), &b)) in d.iter_mut().zip(expert).zip(base).enumerate() {
                        let tau = e - b;
                        *d = if th.keep(tau, ctx.offset + i) { scale * tau } else { 0.0 };
                    }
                } else {
                    let keep_ties = th.cutoff >= ctx.offset + n;
                    for ((d, &e), &b) in d.iter_mut().zip(expert).zip(base) {
                        let tau = e - b;
                        let a = tau.abs();
                        let keep = (a > th.t) | (keep_ties & (a == th.t));
                        *d = if keep { scale * tau } else { 0.0 };
                    }
                }
            }
            Sparsify::Random if density >= 1.0 => {
                for ((d, &e), &b) in d.iter_mut().zip(expert).zip(base) {
                    *d = w * (e - b);
                }
            }
            Sparsify::Random => {
                ElementStream::new(self.seed, ctx.name_hash, k as u32).fill_uniform(ctx.offset, aux);
                for (((d, &e), &b), &u) in d.iter_mut().zip(expert).zip(base).zip(aux.iter()) {
                    *d = if u < density { scale * (e - b) } else { 0.0 };
                }
            }
            // Masked, then scaled back to the task vector's l1 norm with rescale (mergekit's
            // `rescaled_masked_tensor`; TIES's trim too), then weighted.
            Sparsify::Magnitude | Sparsify::Outliers | Sparsify::MagPrune => {
                for ((d, &e), &b) in d.iter_mut().zip(expert).zip(base) {
                    *d = e - b;
                }
                self.mask(ctx, k, d, aux);
                let factor = if self.rescale { ctx.scalars.get(k).map_or(1.0, |&f| f as f32) } else { 1.0 };
                d.iter_mut().for_each(|x| *x = (*x * factor) * w);
            }
        }
    }

    /// Zeroes the entries of expert `k`'s task vector chunk `tau` that Magnitude, Outliers or
    /// MagPrune drop. `aux` is scratch as long as `tau`.
    fn mask(&self, ctx: &ChunkCtx<'_>, k: usize, tau: &mut [f32], aux: &mut [f32]) {
        let density = ctx.params.densities[k];
        if density >= 1.0 {
            return;
        }
        match self.sparsify {
            Sparsify::Magnitude => {
                let th = ctx.thresholds[k];
                for (i, x) in tau.iter_mut().enumerate() {
                    if !th.keep(*x, ctx.offset + i) {
                        *x = 0.0;
                    }
                }
            }
            Sparsify::Outliers => {
                let half = ctx.thresholds.len() / 2;
                let (keep, top) = (ctx.thresholds[k], ctx.thresholds[half + k]);
                for (i, x) in tau.iter_mut().enumerate() {
                    let at = ctx.offset + i;
                    if !keep.keep(*x, at) || top.keep(*x, at) {
                        *x = 0.0;
                    }
                }
            }
            Sparsify::MagPrune if density <= 0.0 => tau.fill(0.0),
            Sparsify::MagPrune => {
                let epsilon = ctx.params.of_model("epsilon", k, 0.0);
                ElementStream::new(self.seed, ctx.name_hash, k as u32).fill_uniform(ctx.offset, aux);
                let row = ctx.row_len.clamp(1, tau.len().max(1));
                PRUNER.with_borrow_mut(|pruner| {
                    for (r, u) in tau.chunks_mut(row).zip(aux.chunks(row)) {
                        pruner.prune(r, u, density, epsilon);
                    }
                });
            }
            Sparsify::None | Sparsify::Random => {}
        }
    }

    /// Per expert, the factor that restores the task vector's l1 norm after masking
    /// (mergekit's `rescaled_masked_tensor` with the l1 norm; 1 when either norm is below 1e-7).
    fn l1_factors(&self, pass: &dyn TensorPass, thresholds: &[Threshold]) -> Result<Vec<f64>> {
        let kk = pass.experts();
        let params = pass.params();
        let parts = map_chunks(pass, |offset, base, experts| {
            let n = base.len();
            let mut taus = vec![0f32; kk * n];
            let mut aux = vec![0f32; n];
            let ctx = ChunkCtx {
                offset,
                params,
                thresholds,
                name_hash: pass.name_hash(),
                scalars: &[],
                row_len: pass.row_len(),
            };
            for (tau, e) in taus.chunks_mut(n.max(1)).zip(experts) {
                tau.iter_mut().zip(e.iter().zip(base)).for_each(|(t, (x, b))| *t = x - b);
            }
            let mut sums = abs_sums(&taus, kk, n);
            for (k, tau) in taus.chunks_mut(n.max(1)).enumerate() {
                self.mask(&ctx, k, tau, &mut aux);
            }
            sums.extend(abs_sums(&taus, kk, n));
            sums
        })?;
        let sums = sum_in_order(parts, 2 * kk);
        Ok((0..kk)
            .map(|k| {
                let (before, after) = (sums[k], sums[kk + k]);
                if before < 1e-7 || after < 1e-7 { 1.0 } else { before / after }
            })
            .collect())
    }
}

/// Per run of `n` in `taus` (`runs` of them), the f64 sum of its magnitudes, added in element order from zero
/// (so the same bits as summing each run on its own). One run's sum is a chain of dependent
/// additions, four cycles each; the runs advance together, a block at a time, so that their
/// chains overlap.
fn abs_sums(taus: &[f32], runs: usize, n: usize) -> Vec<f64> {
    const BLOCK: usize = 16;
    let mut acc = vec![0f64; runs];
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        for (k, a) in acc.iter_mut().enumerate() {
            for &x in &taus[k * n + start..k * n + end] {
                *a += x.abs() as f64;
            }
        }
    }
    acc
}

/// Breadcrumbs' two thresholds per expert: `[keep_0..keep_K, top_0..top_K]`. An entry is kept
/// when it is among the `n - n_bot` largest magnitudes but not among the `n - n_bot - target`
/// largest, where `target = floor(density n)` and `n_bot = max(0, n - target - floor(gamma n))`
/// (mergekit's `magnitude_outliers`; ties broken by index).
fn outlier_thresholds(pass: &dyn TensorPass) -> Result<Vec<Threshold>> {
    let n = pass.len();
    let p = pass.params();
    let kk = pass.experts();
    let mut ks = vec![0usize; 2 * kk];
    for k in 0..kk {
        let density = p.densities[k];
        if density >= 1.0 {
            ks[k] = n;
            continue;
        }
        let target = select::floor_fraction(density, n).min(n);
        let top = select::floor_fraction(p.of_model("gamma", k, 0.0), n);
        let bottom = n.saturating_sub(target + top);
        ks[k] = n - bottom;
        ks[kk + k] = n - bottom - target;
    }
    thresholds(pass, &ks, |base, experts, out| {
        let (keep, top) = out.split_at_mut(kk);
        for (e, (a, b)) in experts.iter().zip(keep.iter_mut().zip(top.iter_mut())) {
            a.iter_mut().zip(e.iter().zip(base)).for_each(|(o, (x, y))| *o = x - y);
            b.copy_from_slice(a);
        }
    })
}
