//! DARE (Yu et al., 2024): drop each task-vector entry with probability `1 - density` and
//! rescale the survivors by `1 / density`, then mix linearly (`dare_linear`) or with TIES sign
//! election (`dare_ties`). Masks come from Philox keyed by (seed, tensor name, expert), so a
//! seed reproduces the same merge on any machine, thread count or backend.

use super::MethodInfo;
use super::gta::{Gta, Sparsify};

pub const INFO_LINEAR: MethodInfo = MethodInfo {
    name: "dare_linear",
    summary: "random drop to density with 1/density rescale, weighted sum, lambda (seeded)",
    needs_base: true,
    global_params: &["lambda", "normalize", "rescale", "seed", "int8_mask"],
    model_params: &["weight", "density"],
};

pub const INFO_TIES: MethodInfo = MethodInfo {
    name: "dare_ties",
    summary: "random drop to density with 1/density rescale, TIES sign election, lambda (seeded)",
    needs_base: true,
    global_params: &["lambda", "normalize", "rescale", "seed", "int8_mask"],
    model_params: &["weight", "density"],
};

/// mergekit's defaults for both variants.
pub const DEFAULT_NORMALIZE: bool = false;
pub const DEFAULT_RESCALE: bool = true;
/// Seed used when the config gives none.
pub const DEFAULT_SEED: u64 = 0;

pub fn method(ties: bool, rescale: bool, seed: u64) -> Gta {
    Gta {
        name: if ties { INFO_TIES.name } else { INFO_LINEAR.name },
        sparsify: Sparsify::Random,
        consensus: ties,
        rescale,
        seed,
    }
}
