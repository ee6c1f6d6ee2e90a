//! DARE (Yu et al., 2024): drop each task-vector entry with probability `1 - density` and
//! rescale the survivors by `1 / density`, then mix linearly (`dare_linear`) or with TIES sign
//! election (`dare_ties`). Masks come from Philox keyed by (seed, tensor name, expert), so a
//! seed reproduces the same merge on any machine, thread count or backend.
//!
//! mergekit 0.1.5 rescales by the l1 norm instead of `1 / density` (same expectation, other
//! values); symerge keeps the paper's rescale, which its GPU kernel implements.

use super::gta::{Gta, Sparsify};
use super::registry::{self, BasePolicy, DENSITY, INT8_MASK, LAMBDA, MethodDef, ParamSpec, SEED, WEIGHT};

const PARAMS: &[ParamSpec] = &[
    LAMBDA,
    registry::normalize(DEFAULT_NORMALIZE),
    registry::rescale(DEFAULT_RESCALE, "divide kept entries by density"),
    SEED,
    INT8_MASK,
    WEIGHT,
    DENSITY,
];

pub const DEF_LINEAR: MethodDef = MethodDef {
    name: "dare_linear",
    summary: "random drop to density with 1/density rescale, weighted sum, lambda (seeded)",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
    validate: registry::no_check,
    build: |s| Box::new(method(false, s.flag("rescale"), s.count("seed"))),
};

pub const DEF_TIES: MethodDef = MethodDef {
    name: "dare_ties",
    summary: "random drop to density with 1/density rescale, TIES sign election, lambda (seeded)",
    build: |s| Box::new(method(true, s.flag("rescale"), s.count("seed"))),
    ..DEF_LINEAR
};

/// mergekit's defaults for both variants.
pub const DEFAULT_NORMALIZE: bool = false;
pub const DEFAULT_RESCALE: bool = true;
/// Seed used when the config gives none.
pub const DEFAULT_SEED: u64 = 0;

pub fn method(ties: bool, rescale: bool, seed: u64) -> Gta {
    Gta {
        name: if ties { DEF_TIES.name } else { DEF_LINEAR.name },
        sparsify: Sparsify::Random,
        consensus: ties,
        rescale,
        seed,
    }
}
