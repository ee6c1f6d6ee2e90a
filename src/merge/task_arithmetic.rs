//! Task arithmetic (Ilharco et al., 2023): `base + lambda * sum_k w_k (theta_k - base)`.
//!
//! The per-tensor coefficients may come from a Lambda table (`parameters.lambda_table`), the
//! layer-wise Lambda that `symerge adapt` learns; see [`super::config::LambdaTable`].

use super::gta::{Gta, Sparsify};
use super::registry::{self, BasePolicy, Fallback, INT8_MASK, Kind, LAMBDA, MethodDef, ParamSpec, WEIGHT};

pub const DEF: MethodDef = MethodDef {
    name: "task_arithmetic",
    summary: "base + lambda * sum_k weight_k * (expert_k - base); per-tensor Lambda from a table",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: &[
        LAMBDA,
        registry::normalize(DEFAULT_NORMALIZE),
        ParamSpec::global(
            "lambda_table",
            Kind::Path,
            Fallback::Unset,
            "JSON of per-tensor coefficients (symerge adapt)",
        ),
        INT8_MASK,
        WEIGHT,
        // mergekit's task_arithmetic is its generalized task arithmetic without sparsification:
        // it takes these two (and ignores them), so symerge does too.
        ParamSpec::per_model("density", Fallback::Number(1.0), "taken as mergekit takes it; nothing is dropped"),
        registry::rescale(false, "taken as mergekit takes it; nothing is dropped, so nothing is rescaled"),
    ],
    validate: registry::no_check,
    build: |_| Box::new(method()),
};

/// mergekit's default: no normalisation.
pub const DEFAULT_NORMALIZE: bool = false;

pub fn method() -> Gta {
    Gta { name: DEF.name, sparsify: Sparsify::None, consensus: false, rescale: false, seed: 0 }
}
