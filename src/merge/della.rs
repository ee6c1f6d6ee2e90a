//! DELLA (Deep et al., 2024): MagPrune keeps each task-vector entry with a probability that
//! rises linearly with its magnitude rank in its row, from `density - epsilon` (smallest) to
//! `density + epsilon` (largest); `rescale` (default on) restores each task vector's l1 norm;
//! then TIES sign election (`della`) or a plain weighted sum (`della_linear`).
//!
//! The draws come from Philox keyed by (seed, tensor name, expert) as DARE's do, so a seed
//! gives the same merge anywhere. mergekit draws from torch's global generator, which no
//! seed in its config controls: its masks cannot be reproduced, only their distribution.
//! Ranks run along the last dimension (mergekit's dim 1 for the 1-D and 2-D tensors of
//! transformers); ties are ranked by index.

use super::TensorParams;
use super::gta::{Gta, Sparsify};
use super::registry::{self, BasePolicy, DENSITY, Fallback, INT8_MASK, LAMBDA, MethodDef, ParamSpec, SEED, WEIGHT};

const PARAMS: &[ParamSpec] = &[
    LAMBDA,
    registry::normalize(true),
    registry::rescale(true, "scale kept entries to keep the task vector's l1 norm"),
    SEED,
    INT8_MASK,
    WEIGHT,
    DENSITY,
    ParamSpec::per_model("epsilon", Fallback::Number(0.15), "half-width of the keep probabilities around density")
        .within(0.0, 1.0),
];

pub const DEF: MethodDef = MethodDef {
    name: "della",
    summary: "magnitude-ranked random drop (density +- epsilon), l1 rescale, TIES sign election (seeded)",
    base: BasePolicy::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
    validate: check_epsilon,
    build: |s| Box::new(method(true, s.flag("rescale"), s.count("seed"))),
};

pub const DEF_LINEAR: MethodDef = MethodDef {
    name: "della_linear",
    summary: "magnitude-ranked random drop (density +- epsilon), l1 rescale, weighted sum (seeded)",
    params: &[
        LAMBDA,
        registry::normalize(false),
        registry::rescale(true, "scale kept entries to keep the task vector's l1 norm"),
        SEED,
        INT8_MASK,
        WEIGHT,
        DENSITY,
        ParamSpec::per_model("epsilon", Fallback::Number(0.15), "half-width of the keep probabilities around density")
            .within(0.0, 1.0),
    ],
    build: |s| Box::new(method(false, s.flag("rescale"), s.count("seed"))),
    ..DEF
};

pub fn method(ties: bool, rescale: bool, seed: u64) -> Gta {
    Gta {
        name: if ties { DEF.name } else { DEF_LINEAR.name },
        sparsify: Sparsify::MagPrune,
        consensus: ties,
        rescale,
        seed,
    }
}

/// Keep probabilities must stay inside (0, 1) wherever the task vector is pruned.
fn check_epsilon(p: &TensorParams) -> Result<(), String> {
    for (k, &d) in p.densities.iter().enumerate() {
        let e = p.of_model("epsilon", k, 0.0);
        if d > 0.0 && d < 1.0 && (d - e <= 0.0 || d + e >= 1.0) {
            return Err(format!(
                "epsilon {e} with density {d}: density - epsilon and density + epsilon must lie in (0, 1)"
            ));
        }
    }
    Ok(())
}
