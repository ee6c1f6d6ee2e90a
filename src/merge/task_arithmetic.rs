//! Task arithmetic (Ilharco et al., 2023): `base + lambda * sum_k w_k (theta_k - base)`.
//!
//! The per-tensor coefficients may come from a Lambda table (`parameters.lambda_table`), the
//! layer-wise Lambda that `symerge adapt` learns; see [`super::config::LambdaTable`].

use super::MethodInfo;
use super::gta::{Gta, Sparsify};

pub const INFO: MethodInfo = MethodInfo {
    name: "task_arithmetic",
    summary: "base + lambda * sum_k weight_k * (expert_k - base); per-tensor Lambda from a table",
    needs_base: true,
    global_params: &["lambda", "normalize", "lambda_table", "int8_mask"],
    model_params: &["weight"],
};

/// mergekit's default: no normalisation.
pub const DEFAULT_NORMALIZE: bool = false;

pub fn method() -> Gta {
    Gta { name: INFO.name, sparsify: Sparsify::None, consensus: false, rescale: false, seed: 0 }
}
