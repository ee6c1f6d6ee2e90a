//! Training-free merge methods over streamed tensors, a registry by name, the YAML config and
//! the streaming executor that runs any method over a checkpoint.
//!
//! A method is a pure function from a chunk of the base and expert tensors (decoded to f32) to
//! the same chunk of the output; everything else (I/O, dtype conversion, threads, shards) is
//! the executor's. Chunks carry their element offset, so methods that need randomness (DARE,
//! DELLA) stay exact under any chunking; whole-tensor statistics (thresholds, norms, dot
//! products) come from a pre-pass the method asks for in [`MergeMethod::prepare`], and methods
//! that work row by row get chunks of whole rows ([`MergeMethod::whole_rows`]).

pub mod arcee_fusion;
pub mod breadcrumbs;
pub mod card;
pub mod catalog;
pub mod config;
pub mod dare;
pub mod della;
pub mod engine;
pub mod executor;
pub mod gta;
pub mod inputs;
pub mod karcher;
pub mod lambda_grad;
pub mod linear;
pub mod magprune;
pub mod mergekit_flags;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod params;
pub mod passthrough;
pub mod philox;
pub mod ram;
pub mod registry;
pub mod sce;
pub mod select;
pub mod slerp;
pub mod slices;
pub mod stats;
pub mod table_models;
pub mod task_arithmetic;
pub mod tied;
pub mod ties;
pub mod tokenizer;
pub mod vocab;

use std::collections::BTreeMap;

pub use registry::{METHODS, MethodDef, method_def, method_names};
use select::Threshold;
use stats::{TensorPass, TensorStats};

use crate::error::Result;

/// Per-tensor parameters, resolved from the config for one tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorParams {
    /// One weight per expert (per input model for `linear`).
    pub weights: Vec<f32>,
    /// Fraction of each task vector kept (TIES, DARE); 1 keeps all.
    pub densities: Vec<f32>,
    /// Scale of the mixed task vector.
    pub lambda: f32,
    /// Divide by the sum of (contributing) weights.
    pub normalize: bool,
    /// Every other numeric parameter of the method's registry entry, by name: one value for
    /// a global parameter, one per expert for a per-model one.
    pub extra: BTreeMap<&'static str, Vec<f32>>,
}

impl TensorParams {
    /// A global numeric parameter, or `fallback` when the config leaves it unset.
    pub fn global(&self, name: &str, fallback: f32) -> f32 {
        self.extra.get(name).and_then(|v| v.first().copied()).unwrap_or(fallback)
    }

    /// A per-model numeric parameter for expert `k`, or `fallback` when unset.
    pub fn of_model(&self, name: &str, k: usize, fallback: f32) -> f32 {
        self.extra.get(name).and_then(|v| v.get(k).copied()).unwrap_or(fallback)
    }
}

/// Where a chunk sits and what it needs beyond its data.
#[derive(Debug, Clone, Copy)]
pub struct ChunkCtx<'a> {
    /// Element index of the chunk's first value within the tensor.
    pub offset: usize,
    pub params: &'a TensorParams,
    /// Magnitude thresholds from [`MergeMethod::prepare`] (TIES: one per expert).
    pub thresholds: &'a [Threshold],
    /// Identifies the tensor in the random stream (see [`philox::name_hash`]).
    pub name_hash: u32,
    /// Whole-tensor scalars from [`MergeMethod::prepare`].
    pub scalars: &'a [f64],
    /// Length of the tensor's last dimension; with [`MergeMethod::whole_rows`] the chunk
    /// starts on a row and holds whole rows.
    pub row_len: usize,
}

impl<'a> ChunkCtx<'a> {
    /// A context with no pre-pass scalars and rows as long as the chunk.
    pub fn new(offset: usize, params: &'a TensorParams, thresholds: &'a [Threshold], name_hash: u32) -> Self {
        ChunkCtx { offset, params, thresholds, name_hash, scalars: &[], row_len: usize::MAX }
    }
}

/// The form in which a method runs on the GPU merge kernel (`kernels/merge.cu`).
#[derive(Debug, Clone, Copy)]
pub enum KernelForm<'a> {
    Linear,
    Gta(&'a gta::Gta),
    /// `kernels/prepared.cu`'s `slerp_merge`.
    Slerp,
    /// `kernels/prepared.cu`'s `sce_merge`.
    Sce,
}

impl KernelForm<'_> {
    /// Whether the kernel takes the statistics of the CPU's own pre-pass
    /// ([`MergeMethod::prepare`] over the mapped inputs): exact whole-tensor reductions and
    /// selections are the CPU twin's bits that way, and the kernel only does the elementwise
    /// merge. TIES' thresholds are computed on the device instead (unless it rescales).
    pub fn cpu_stats(&self) -> bool {
        match self {
            KernelForm::Linear => false,
            KernelForm::Gta(g) => match g.sparsify {
                gta::Sparsify::Outliers => true,
                // TIES's l1 factors need the thresholds first: both from the pre-pass.
                gta::Sparsify::Magnitude => g.rescale,
                // DELLA's l1 factors; without rescale it has no statistics.
                gta::Sparsify::MagPrune => g.rescale,
                _ => false,
            },
            KernelForm::Slerp | KernelForm::Sce => true,
        }
    }
}

/// A training-free merge method.
pub trait MergeMethod: Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether the method works on task vectors and so needs `base_model`.
    fn needs_base(&self) -> bool;

    /// Whether the method's only statistics are exact per-expert magnitude thresholds at the
    /// configured densities (TIES): the GPU engine computes those on the device.
    fn needs_thresholds(&self) -> bool {
        false
    }

    /// Whether each chunk must hold whole rows (of the last dimension).
    fn whole_rows(&self) -> bool {
        false
    }

    /// Whole-tensor statistics every chunk needs, from a pass over the tensor's inputs.
    fn prepare(&self, pass: &dyn TensorPass) -> Result<TensorStats> {
        if self.needs_thresholds() {
            Ok(TensorStats { thresholds: density_thresholds(pass)?, scalars: Vec::new() })
        } else {
            Ok(TensorStats::default())
        }
    }

    /// Whether, with these parameters, the output is the one merged model's values unchanged
    /// (passthrough without a scale): the CPU engine then copies the stored bytes when the
    /// output dtype is theirs, which decoding and encoding again would reproduce bit for bit.
    fn copies_model(&self, _params: &TensorParams) -> bool {
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

/// Per-expert thresholds keeping each task vector's largest `density` fraction (TIES).
pub fn density_thresholds(pass: &dyn TensorPass) -> Result<Vec<Threshold>> {
    let n = pass.len();
    let ks: Vec<usize> = pass.params().densities.iter().map(|&d| select::keep_count(d, n)).collect();
    stats::thresholds(pass, &ks, |base, experts, out| {
        for (o, e) in out.iter_mut().zip(experts) {
            o.iter_mut().zip(e.iter().zip(base)).for_each(|(o, (x, b))| *o = x - b);
        }
    })
}
