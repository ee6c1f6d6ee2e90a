//! TIES-merging (Yadav et al., 2023): trim each task vector to its largest `density` fraction by
//! magnitude, elect a sign per element by summed mass, average the agreeing entries (disjoint
//! mean), scale by lambda.

use super::MethodInfo;
use super::gta::{Gta, Sparsify};

pub const INFO: MethodInfo = MethodInfo {
    name: "ties",
    summary: "trim to density by magnitude, elect sign by mass, disjoint mean, lambda",
    needs_base: true,
    global_params: &["lambda", "normalize", "rescale", "int8_mask"],
    model_params: &["weight", "density"],
};

/// mergekit's defaults: normalise by contributing weights, no rescale.
pub const DEFAULT_NORMALIZE: bool = true;
pub const DEFAULT_RESCALE: bool = false;

pub fn method(rescale: bool) -> Gta {
    Gta { name: INFO.name, sparsify: Sparsify::Magnitude, consensus: true, rescale, seed: 0 }
}
