//! Model Breadcrumbs (Davari & Belilovsky, 2023): from each task vector drop the `gamma`
//! fraction of largest magnitudes (outliers) and then the smallest ones, keeping a `density`
//! fraction; mix linearly (`breadcrumbs`) or with TIES sign election (`breadcrumbs_ties`).
//! Deterministic: both cuts are exact whole-tensor thresholds from the pre-pass.
//!
//! When fewer than `gamma n` entries lie above the kept band, mergekit shrinks the outlier cut
//! so that `density` is still met; so does this. `rescale: true` restores each task vector's
//! l1 norm after the cut (mergekit 0.1.5).

use super::gta::{Gta, Sparsify};
use super::registry::{self, BasePolicy, DENSITY, Fallback, INT8_MASK, LAMBDA, MethodDef, ParamSpec, WEIGHT};

const PARAMS: &[ParamSpec] = &[
    LAMBDA,
    registry::normalize(false),
    registry::rescale(false, "scale kept entries to keep the task vector's l1 norm"),
    INT8_MASK,
    WEIGHT,
    DENSITY,
    ParamSpec::per_model("gamma", Fallback::Number(0.01), "fraction of largest magnitudes dropped").within(0.0, 1.0),
];

pub const DEF: MethodDef = MethodDef {
    name: "breadcrumbs",
    summary: "drop the gamma largest and the smallest magnitudes down to density, weighted sum, lambda",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
    validate: registry::no_check,
    build: |s| Box::new(method(false, s.flag("rescale"))),
};

pub const DEF_TIES: MethodDef = MethodDef {
    name: "breadcrumbs_ties",
    summary: "breadcrumbs' cut, then TIES sign election and disjoint sum, lambda",
    build: |s| Box::new(method(true, s.flag("rescale"))),
    ..DEF
};

pub fn method(ties: bool, rescale: bool) -> Gta {
    Gta {
        name: if ties { DEF_TIES.name } else { DEF.name },
        sparsify: Sparsify::Outliers,
        consensus: ties,
        rescale,
        seed: 0,
    }
}
