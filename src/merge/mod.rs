//! Training-free merge methods over streamed tensors, a registry by name, the YAML config and
//! the streaming executor that runs any method over a checkpoint.
//!
//! A method is a pure function from a chunk of the base and expert tensors (decoded to f32) to
//! the same chunk of the output; everything else (I/O, dtype conversion, threads, shards) is
//! the executor's. Chunks carry their element offset, so methods that need randomness (DARE)
//! or whole-tensor statistics (TIES thresholds, computed by the executor) stay exact under any
//! chunking.

pub mod config;
pub mod dare;
pub mod executor;
pub mod gta;
pub mod lambda_grad;
pub mod linear;
pub mod params;
pub mod philox;
pub mod select;
pub mod task_arithmetic;
pub mod ties;

use select::Threshold;

/// Per-tensor parameters, resolved from the config for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorParams {
    /// One weight per expert (per input model for `linear`).
    pub weights: Vec<f32>,
    /// Fraction of each task vector kept (TIES, DARE); 1 keeps all.
    pub densities: Vec<f32>,
    /// Scale of the mixed task vector.
    pub lambda: f32,
    /// Divide by the sum of (contributing) weights.
    pub normalize: bool,
}

/// Where a chunk sits and what it needs beyond its data.
#[derive(Debug, Clone, Copy)]
pub struct ChunkCtx<'a> {
    /// Element index of the chunk's first value within the tensor.
    pub offset: usize,
    pub params: &'a TensorParams,
    /// Per-expert magnitude thresholds (filled when [`MergeMethod::needs_thresholds`]).
    pub thresholds: &'a [Threshold],
    /// Identifies the tensor in the random stream (see [`philox::name_hash`]).
    pub name_hash: u32,
}

/// The form in which a method runs on the GPU merge kernel (`kernels/merge.cu`).
#[derive(Debug, Clone, Copy)]
pub enum KernelForm<'a> {
    Linear,
    Gta(&'a gta::Gta),
}

/// A training-free merge method.
pub trait MergeMethod: Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether the method works on task vectors and so needs `base_model`.
    fn needs_base(&self) -> bool;

    /// Whether the executor must compute exact per-expert magnitude thresholds at the
    /// configured densities before merging a tensor.
    fn needs_thresholds(&self) -> bool {
        false
    }

    /// How the GPU runs this method; `None` keeps it on the CPU.
    fn kernel_form(&self) -> Option<KernelForm<'_>> {
        None
    }

    /// Writes `out` (same length as each input) from `base` (present iff [`Self::needs_base`])
    /// and the experts' values. `scratch` is reusable per-thread memory.
    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<&[f32]>,
        experts: &[&[f32]],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    );
}

/// What the registry knows about a method: its name, what it needs, which parameters it takes.
#[derive(Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub needs_base: bool,
    /// Keys allowed under the config's top-level `parameters`.
    pub global_params: &'static [&'static str],
    /// Keys allowed under each model's `parameters` (also accepted globally as defaults).
    pub model_params: &'static [&'static str],
}

/// Every method, in the order the CLI lists them.
pub const METHODS: &[MethodInfo] =
    &[linear::INFO, task_arithmetic::INFO, ties::INFO, dare::INFO_LINEAR, dare::INFO_TIES];

/// Looks a method up by name.
pub fn method_info(name: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.name == name)
}

/// Names of all methods, comma separated (for error messages).
pub fn method_names() -> String {
    METHODS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}
