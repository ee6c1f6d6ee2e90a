//! NuSLERP: spherical interpolation between two models, or between their task vectors when a
//! `base_model` is given, with `t = w_2 / (w_1 + w_2)` from their weights (mergekit's
//! `nuslerp`). By default each tensor is one vector (`nuslerp_flatten`); otherwise each row
//! (the last dimension), or each column with `nuslerp_row_wise`, is interpolated on its own.
//! Whole-tensor and per-column dot products come from the pre-pass; rows are whole in a chunk.

use super::registry::{BasePolicy, Fallback, Kind, MethodDef, ParamSpec};
use super::stats::{TensorPass, TensorStats, Vectors, gram, map_chunks, sum_in_order};
use super::{ChunkCtx, MergeMethod, TensorParams};
use crate::error::Result;

pub const DEF: MethodDef = MethodDef {
    name: "nuslerp",
    summary: "spherical interpolation of two models (of their task vectors with a base) by their weights",
    base: BasePolicy::Optional,
    min_models: 2,
    max_models: Some(2),
    params: &[
        ParamSpec::per_model("weight", Fallback::Required, "weight of the model; t = w_2 / (w_1 + w_2)"),
        ParamSpec::global("nuslerp_row_wise", Kind::Bool, Fallback::Bool(false), "interpolate each column on its own"),
        ParamSpec::global("nuslerp_flatten", Kind::Bool, Fallback::Bool(true), "interpolate each tensor as one vector"),
    ],
    validate: |_: &TensorParams| Ok(()),
    build: |s| {
        let mode = match (s.flag("nuslerp_flatten"), s.flag("nuslerp_row_wise")) {
            (true, _) => Mode::Tensor,
            (false, false) => Mode::Rows,
            (false, true) => Mode::Columns,
        };
        Box::new(NuSlerp { mode, base: s.has_base })
    },
};

/// Which vectors are interpolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tensor,
    Rows,
    Columns,
}

pub struct NuSlerp {
    pub mode: Mode,
    /// Interpolate task vectors (expert - base) and add the base back.
    pub base: bool,
}

/// The two models' coefficients for share `t` from their Gram matrix entries (mergekit's
/// `nuslerp`: norms floored at 1e-7, linear only when exactly collinear).
pub fn coefficients(t: f64, aa: f64, ab: f64, bb: f64) -> (f64, f64) {
    let cos = (ab / (aa.sqrt().max(1e-7) * bb.sqrt().max(1e-7))).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return (1.0 - t, t);
    }
    let theta = cos.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

fn share(p: &TensorParams) -> f64 {
    let (a, b) = (p.weights.first().copied().unwrap_or(1.0) as f64, p.weights.get(1).copied().unwrap_or(1.0) as f64);
    if (a + b).abs() < 1e-6 { 0.5 } else { b / (a + b) }
}

impl NuSlerp {
    /// The two interpolated values at element `i`: task vectors or weights.
    #[inline]
    fn pair(&self, base: Option<&[f32]>, experts: &[&[f32]], i: usize) -> (f32, f32) {
        match (self.base, base) {
            (true, Some(b)) => (experts[0][i] - b[i], experts[1][i] - b[i]),
            _ => (experts[0][i], experts[1][i]),
        }
    }

    /// Per column `c`, `[aa, ab, bb]` summed over the tensor's rows.
    fn column_grams(&self, pass: &dyn TensorPass) -> Result<Vec<f64>> {
        let cols = pass.row_len().max(1);
        let parts = map_chunks(pass, |offset, base, experts| {
            let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
            let mut g = vec![0f64; 3 * cols];
            for i in 0..base.len() {
                let (x, y) = self.pair(Some(base), &views, i);
                let c = (offset + i) % cols;
                g[3 * c] += x as f64 * x as f64;
                g[3 * c + 1] += x as f64 * y as f64;
                g[3 * c + 2] += y as f64 * y as f64;
            }
            g
        })?;
        Ok(sum_in_order(parts, 3 * cols))
    }
}

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        DEF.name
    }

    fn needs_base(&self) -> bool {
        self.base
    }

    fn whole_rows(&self) -> bool {
        self.mode == Mode::Rows
    }

    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        let t = share(pass.params());
        let vectors = if self.base { Vectors::TaskVectors } else { Vectors::BaseAndExperts };
        // A 1-D tensor is one vector whichever way it is cut (mergekit's transpose is a no-op).
        let mode = if pass.row_len() >= pass.len() { Mode::Tensor } else { self.mode };
        let scalars = match mode {
            Mode::Rows => Vec::new(),
            Mode::Tensor => {
                let g = gram(pass, vectors)?;
                let m = if self.base { 2 } else { 3 };
                let o = m - 2;
                let (a, b) = coefficients(t, g[o * m + o], g[o * m + o + 1], g[(o + 1) * m + o + 1]);
                vec![a, b]
            }
            Mode::Columns => self
                .column_grams(pass)?
                .chunks(3)
                .flat_map(|g| {
                    let (a, b) = coefficients(t, g[0], g[1], g[2]);
                    [a, b]
                })
                .collect(),
        };
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
        if experts.len() != 2 || (self.base && base.is_none()) {
            out.fill(f32::NAN);
            return;
        }
        let row = ctx.row_len.clamp(1, out.len().max(1));
        let coef = |i: usize| -> (f32, f32) {
            let s = ctx.scalars;
            let at = if s.len() > 2 { 2 * ((ctx.offset + i) % (s.len() / 2)) } else { 0 };
            (s[at] as f32, s[at + 1] as f32)
        };
        if ctx.scalars.is_empty() {
            let t = share(ctx.params);
            for r in (0..out.len()).step_by(row) {
                let (mut aa, mut ab, mut bb) = (0f64, 0f64, 0f64);
                for i in r..r + row {
                    let (x, y) = self.pair(base, experts, i);
                    aa += x as f64 * x as f64;
                    ab += x as f64 * y as f64;
                    bb += y as f64 * y as f64;
                }
                let (a, b) = coefficients(t, aa, ab, bb);
                for i in r..r + row {
                    let (x, y) = self.pair(base, experts, i);
                    out[i] = base.filter(|_| self.base).map_or(0.0, |b| b[i]) + (a as f32 * x + b as f32 * y);
                }
            }
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            let (x, y) = self.pair(base, experts, i);
            let (a, b) = coef(i);
            *o = base.filter(|_| self.base).map_or(0.0, |b| b[i]) + (a * x + b * y);
        }
    }
}
