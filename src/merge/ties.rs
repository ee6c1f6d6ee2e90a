//! TIES-merging (Yadav et al., 2023): trim each task vector to its largest `density` fraction by
//! magnitude, elect a sign per element by summed mass, average the agreeing entries (disjoint
//! mean), scale by lambda.

use super::gta::{Gta, Sparsify};
use super::registry::{self, BasePolicy, DENSITY, INT8_MASK, LAMBDA, MethodDef, WEIGHT};

pub const DEF: MethodDef = MethodDef {
    name: "ties",
    summary: "trim to density by magnitude, elect sign by mass, disjoint mean, lambda",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: &[
        LAMBDA,
        registry::normalize(DEFAULT_NORMALIZE),
        registry::rescale(DEFAULT_RESCALE, "scale kept entries back to the task vector's l1 norm"),
        INT8_MASK,
        WEIGHT,
        DENSITY,
    ],
    validate: registry::no_check,
    build: |s| Box::new(method(s.flag("rescale"))),
};

/// mergekit's defaults: normalise by contributing weights, no rescale.
pub const DEFAULT_NORMALIZE: bool = true;
pub const DEFAULT_RESCALE: bool = false;

pub fn method(rescale: bool) -> Gta {
    Gta { name: DEF.name, sparsify: Sparsify::Magnitude, consensus: true, rescale, seed: 0 }
}
