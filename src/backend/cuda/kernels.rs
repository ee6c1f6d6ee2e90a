//! Typed launches of the NVRTC kernels, on raw device addresses (the streaming executor packs
//! many tensors into one buffer), plus host-buffer conveniences on [`Gpu`] that upload, poison
//! the output, launch, check and download: what the parity tests and the benchmark call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    sys,
};

use super::device::{Gpu, cu};
use super::nvrtc;
use crate::checkpoint::FloatDType;
use crate::checkpoint::dtype::decode;
use crate::error::{Error, Result};
use crate::merge::gta::{Gta, Sparsify};
use crate::merge::select::{CHUNK, Threshold, walk_down};
use crate::merge::stats::TensorStats;
use crate::merge::{KernelForm, TensorParams};

/// Most experts one merge launch takes (the by-value parameter block holds this many).
pub const MAX_INPUTS: usize = 64;
/// Most tasks one lambda_grad launch takes.
pub const LG_MAX_TASKS: usize = 32;
/// Elements per CTA of lambda_grad: the same tiles as the CPU twin.
pub const LG_TILE: usize = crate::merge::lambda_grad::TILE;
const THREADS: u32 = 256;
const VEC: usize = 8;

const MODE_ALL: u32 = 0;
const MODE_MAGNITUDE: u32 = 1;
const MODE_RANDOM: u32 = 2;
const MODE_OUTLIERS: u32 = 3;
/// DELLA's MagPrune: planned as a [`MergeInput`], launched as `della_merge`'s [`DellaInput`].
const MODE_MAGPRUNE: u32 = 4;
const FLAG_CONSENSUS: u32 = 1;
const FLAG_NORMALIZE: u32 = 2;
const FLAG_HAS_BASE: u32 = 4;

/// The kernels' dtype code.
pub fn dtype_code(d: FloatDType) -> u32 {
    match d {
        FloatDType::F32 => 0,
        FloatDType::F16 => 1,
        FloatDType::BF16 => 2,
    }
}

/// One expert of a merge launch; layout of `struct MergeInput` in `kernels/merge.cu`. A DELLA
/// plan (`MODE_MAGPRUNE`) carries its epsilon in `thresh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MergeInput {
    pub ptr: u64,
    pub cutoff: u64,
    pub cutoff2: u64,
    pub coef: f32,
    pub weight: f32,
    pub thresh: f32,
    pub density: f32,
    pub thresh2: f32,
    pub factor: f32,
    pub mode: u32,
    pub dtype: u32,
}

/// One expert of an SCE launch; layout of `struct SceInput` in `kernels/prepared.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SceInput {
    ptr: u64,
    weight: f32,
    dtype: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SceInputs {
    inputs: [SceInput; MAX_INPUTS],
}

/// One expert of a DELLA launch; layout of `struct DellaInput` in `kernels/della.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DellaInput {
    ptr: u64,
    weight: f32,
    density: f32,
    epsilon: f32,
    factor: f32,
    dtype: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DellaInputs {
    inputs: [DellaInput; MAX_INPUTS],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MergeInputs {
    inputs: [MergeInput; MAX_INPUTS],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TaskPtrs {
    p: [u64; LG_MAX_TASKS],
    dt: [u32; LG_MAX_TASKS],
}

impl TaskPtrs {
    /// Up to [`LG_MAX_TASKS`] (address, dtype) pairs, each task read in its own dtype.
    fn new(tasks: &[(u64, FloatDType)]) -> Result<Self> {
        let k = tasks.len();
        if k == 0 || k > LG_MAX_TASKS {
            return Err(Error::Invalid(format!("lambda_grad takes 1 to {LG_MAX_TASKS} tasks, got {k}")));
        }
        let mut ptrs = TaskPtrs { p: [0; LG_MAX_TASKS], dt: [0; LG_MAX_TASKS] };
        for (i, &(p, dt)) in tasks.iter().enumerate() {
            (ptrs.p[i], ptrs.dt[i]) = (p, dtype_code(dt));
        }
        Ok(ptrs)
    }
}

// SAFETY: plain `repr(C)` data whose layout matches the kernels' parameter structs.
unsafe impl DeviceRepr for MergeInput {}
// SAFETY: as above.
unsafe impl DeviceRepr for MergeInputs {}
// SAFETY: as above.
unsafe impl DeviceRepr for TaskPtrs {}
// SAFETY: as above.
unsafe impl DeviceRepr for SceInputs {}
// SAFETY: as above.
unsafe impl DeviceRepr for DellaInputs {}

/// Which kernel a [`MergeLaunch`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LaunchKernel {
    /// `gta_merge` (`kernels/merge.cu`): linear, task arithmetic, TIES, DARE, Breadcrumbs.
    Gta,
    /// `slerp_merge`: `a * base + b * other`, the coefficients from the CPU's Gram pre-pass.
    Slerp { a: f32, b: f32 },
    /// `sce_merge`: the CPU pre-pass's variance threshold; the weights are the inputs' `weight`.
    Sce { select: Threshold },
    /// `della_merge` (`kernels/della.cu`): MagPrune within rows of `row_len` (set by
    /// [`MergeLaunch::for_rows`]; 0 until then), the l1 factors from the CPU pre-pass.
    Della { row_len: usize },
}

/// Dynamic shared memory `della_merge` needs for rows of `row_len` with `k` experts: the sort
/// buffer (u64 keys, a power of two) and one keep bit per element and expert.
pub fn della_shared_bytes(row_len: usize, k: usize) -> usize {
    8 * row_len.next_power_of_two() + 4 * k * row_len.div_ceil(32)
}

/// Everything a merge launch needs for one tensor except the addresses: the CPU method's
/// per-tensor arithmetic, resolved to per-expert modes and coefficients exactly as
/// `Gta::merge_chunk` / `Linear::merge_chunk` compute them (same f32 expressions).
#[derive(Debug, Clone)]
pub struct MergeLaunch {
    pub kernel: LaunchKernel,
    pub inputs: Vec<MergeInput>,
    pub flags: u32,
    pub lambda: f32,
    pub div_all: f32,
    pub seed: u64,
    pub name_hash: u32,
}

impl MergeLaunch {
    /// Adaptation's merge: `base + sum_k coefs[k] (theta_k - base)`, every entry kept, the outer
    /// lambda 1 (the plan `task_arithmetic` with weights `coefs` gets), so the kernel computes
    /// exactly what `stored_ops::merge_stored` does.
    pub fn weighted_deltas(coefs: &[f32], dtypes: &[FloatDType]) -> Result<Self> {
        if dtypes.len() > MAX_INPUTS || coefs.len() != dtypes.len() {
            return Err(Error::Invalid(format!(
                "the GPU merge takes at most {MAX_INPUTS} models with one coefficient each, got {} and {}",
                dtypes.len(),
                coefs.len()
            )));
        }
        let inputs = coefs
            .iter()
            .zip(dtypes)
            .map(|(&coef, &dt)| MergeInput {
                coef,
                weight: coef,
                mode: MODE_ALL,
                dtype: dtype_code(dt),
                ..Default::default()
            })
            .collect();
        Ok(MergeLaunch {
            kernel: LaunchKernel::Gta,
            inputs,
            flags: FLAG_HAS_BASE,
            lambda: 1.0,
            div_all: 1.0,
            seed: 0,
            name_hash: 0,
        })
    }

    /// The launch for a form whose only statistics are device thresholds (TIES) or none.
    pub fn plan(
        form: KernelForm<'_>,
        params: &TensorParams,
        thresholds: &[Threshold],
        name_hash: u32,
        dtypes: &[FloatDType],
    ) -> Result<Self> {
        let stats = TensorStats { thresholds: thresholds.to_vec(), scalars: Vec::new() };
        Self::plan_stats(form, params, &stats, name_hash, dtypes)
    }

    /// The launch for any form, with the method's whole-tensor statistics (the CPU pre-pass's
    /// for [`KernelForm::cpu_stats`] forms).
    pub fn plan_stats(
        form: KernelForm<'_>,
        params: &TensorParams,
        stats: &TensorStats,
        name_hash: u32,
        dtypes: &[FloatDType],
    ) -> Result<Self> {
        let thresholds = stats.thresholds.as_slice();
        if dtypes.len() > MAX_INPUTS {
            return Err(Error::Invalid(format!(
                "the GPU merge takes at most {MAX_INPUTS} models, got {}; use --device cpu",
                dtypes.len()
            )));
        }
        let p = params;
        match form {
            KernelForm::Linear => {
                let wsum: f32 = p.weights.iter().sum();
                let div = if p.normalize && wsum != 0.0 { wsum } else { 1.0 };
                let inputs = dtypes
                    .iter()
                    .enumerate()
                    .map(|(k, &dt)| MergeInput {
                        coef: p.weights[k] / div,
                        weight: p.weights[k],
                        dtype: dtype_code(dt),
                        ..Default::default()
                    })
                    .collect();
                Ok(MergeLaunch {
                    kernel: LaunchKernel::Gta,
                    inputs,
                    flags: 0,
                    lambda: 1.0,
                    div_all: 1.0,
                    seed: 0,
                    name_hash,
                })
            }
            KernelForm::Slerp => Self::slerp(stats, dtypes),
            KernelForm::Sce => Self::sce(stats, dtypes),
            KernelForm::Gta(g) if g.sparsify == Sparsify::MagPrune => Ok(Self::della(g, p, stats, name_hash, dtypes)),
            KernelForm::Gta(g) => {
                let inputs = dtypes
                    .iter()
                    .enumerate()
                    .map(|(k, &dt)| {
                        let w = p.weights[k];
                        let density = p.densities[k];
                        let scale = if g.rescale && density > 0.0 && density < 1.0 { w / density } else { w };
                        let mut m = MergeInput { weight: w, dtype: dtype_code(dt), ..Default::default() };
                        match g.sparsify {
                            Sparsify::None => {
                                m.mode = MODE_ALL;
                                m.coef = w;
                            }
                            Sparsify::Random if density >= 1.0 => {
                                m.mode = MODE_ALL;
                                m.coef = w;
                            }
                            Sparsify::Random => {
                                m.mode = MODE_RANDOM;
                                m.coef = scale;
                                m.density = density;
                            }
                            // Planned by `Self::della` above.
                            Sparsify::MagPrune => {}
                            Sparsify::Outliers => outliers(&mut m, g.rescale, density, stats, k),
                            // TIES's l1 rescale: the outliers band with nothing cut at the top,
                            // `(tau * factor) * w` as `Gta::merge_chunk` computes it.
                            Sparsify::Magnitude if g.rescale => {
                                let keep = thresholds.get(k).copied().unwrap_or(Threshold::KEEP_ALL);
                                m.mode = MODE_OUTLIERS;
                                m.coef = w;
                                m.thresh = keep.t;
                                m.cutoff = keep.cutoff as u64;
                                m.thresh2 = Threshold::KEEP_NONE.t;
                                m.cutoff2 = Threshold::KEEP_NONE.cutoff as u64;
                                m.factor = stats.scalars.get(k).map_or(1.0, |&f| f as f32);
                            }
                            Sparsify::Magnitude => {
                                let th = thresholds.get(k).copied().unwrap_or(Threshold::KEEP_ALL);
                                m.mode = MODE_MAGNITUDE;
                                m.coef = scale;
                                m.thresh = th.t;
                                m.cutoff = th.cutoff as u64;
                            }
                        }
                        m
                    })
                    .collect();
                let (flags, div_all) = gta_mix(g, p);
                Ok(MergeLaunch {
                    kernel: LaunchKernel::Gta,
                    inputs,
                    flags,
                    lambda: p.lambda,
                    div_all,
                    seed: g.seed,
                    name_hash,
                })
            }
        }
    }

    /// DELLA: per expert its weight, density, epsilon and l1 factor, as `Gta::merge_chunk` and
    /// `Gta::mask` read them; the mix as the other task-arithmetic forms. Rows come from
    /// [`Self::for_rows`].
    fn della(g: &Gta, p: &TensorParams, stats: &TensorStats, name_hash: u32, dtypes: &[FloatDType]) -> Self {
        let inputs = dtypes
            .iter()
            .enumerate()
            .map(|(k, &dt)| MergeInput {
                coef: p.weights[k],
                weight: p.weights[k],
                density: p.densities[k],
                thresh: p.of_model("epsilon", k, 0.0),
                factor: if g.rescale { stats.scalars.get(k).map_or(1.0, |&f| f as f32) } else { 1.0 },
                mode: MODE_MAGPRUNE,
                dtype: dtype_code(dt),
                ..Default::default()
            })
            .collect();
        let (flags, div_all) = gta_mix(g, p);
        let kernel = LaunchKernel::Della { row_len: 0 };
        MergeLaunch { kernel, inputs, flags, lambda: p.lambda, div_all, seed: g.seed, name_hash }
    }

    /// The row length of a DELLA launch (every launched range must hold whole rows of it);
    /// other launches are returned unchanged.
    pub fn for_rows(mut self, row_len: usize) -> Self {
        if let LaunchKernel::Della { row_len: r } = &mut self.kernel {
            *r = row_len;
        }
        self
    }

    /// Whether the launch ranks entries within rows (DELLA), so its ranges must hold whole rows.
    pub fn by_rows(&self) -> bool {
        matches!(self.kernel, LaunchKernel::Della { .. })
    }

    pub fn has_base(&self) -> bool {
        self.flags & FLAG_HAS_BASE != 0
    }

    /// SLERP: the base's and the other model's coefficients, as `Slerp::merge_chunk` rounds them.
    fn slerp(stats: &TensorStats, dtypes: &[FloatDType]) -> Result<Self> {
        let (&[a, b], &[dt]) = (stats.scalars.as_slice(), dtypes) else {
            return Err(Error::Invalid("internal: slerp launch without its two coefficients and one model".into()));
        };
        let inputs = vec![MergeInput { coef: b as f32, dtype: dtype_code(dt), ..Default::default() }];
        let kernel = LaunchKernel::Slerp { a: a as f32, b: b as f32 };
        Ok(MergeLaunch { kernel, inputs, flags: FLAG_HAS_BASE, lambda: 1.0, div_all: 1.0, seed: 0, name_hash: 0 })
    }

    /// SCE: the variance threshold and the per-model weights, as `Sce::merge_chunk` reads them.
    fn sce(stats: &TensorStats, dtypes: &[FloatDType]) -> Result<Self> {
        let Some(&select) = stats.thresholds.first() else {
            return Err(Error::Invalid("internal: sce launch without its selection threshold".into()));
        };
        let weight = |k: usize| stats.scalars.get(k).map_or(0.0, |&w| w as f32);
        let inputs = dtypes
            .iter()
            .enumerate()
            .map(|(k, &dt)| MergeInput {
                weight: weight(k),
                coef: weight(k),
                dtype: dtype_code(dt),
                ..Default::default()
            })
            .collect();
        let kernel = LaunchKernel::Sce { select };
        Ok(MergeLaunch { kernel, inputs, flags: FLAG_HAS_BASE, lambda: 1.0, div_all: 1.0, seed: 0, name_hash: 0 })
    }
}

/// Breadcrumbs' band for expert `k` of `stats` (`[keep_0..keep_K, top_0..top_K]` and the l1
/// factors), as `Gta::mask` applies it: no cut at density 1, `(tau * factor) * w` after it.
fn outliers(m: &mut MergeInput, rescale: bool, density: f32, stats: &TensorStats, k: usize) {
    let half = stats.thresholds.len() / 2;
    let (keep, top) = match (stats.thresholds.get(k), stats.thresholds.get(half + k)) {
        (Some(&keep), Some(&top)) if density < 1.0 => (keep, top),
        _ => (Threshold::KEEP_ALL, Threshold::KEEP_NONE),
    };
    m.mode = MODE_OUTLIERS;
    m.coef = m.weight;
    m.thresh = keep.t;
    m.cutoff = keep.cutoff as u64;
    m.thresh2 = top.t;
    m.cutoff2 = top.cutoff as u64;
    m.factor = if rescale { stats.scalars.get(k).map_or(1.0, |&f| f as f32) } else { 1.0 };
}

/// The kernel functions, each unit compiled and loaded on first use: a merge never pays for
/// compiling lambda_grad, and the unrolled lambda_grad unit is the largest.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    /// Dynamic shared memory a CTA may opt into (bytes): bounds DELLA's row sort.
    max_shared: usize,
    arch: String,
    modules: [OnceLock<Arc<CudaModule>>; nvrtc::MODULES.len()],
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// `della_merge` with its dynamic shared memory limit raised to [`Self::max_shared`], once:
    /// raising it per launch to that launch's need could lower it under another thread's launch.
    della: OnceLock<CudaFunction>,
}

fn grid(groups: usize) -> Result<LaunchConfig> {
    let blocks = groups.div_ceil(THREADS as usize).max(1);
    let blocks =
        u32::try_from(blocks).map_err(|_| Error::Invalid(format!("{groups} thread groups overflow a grid")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

impl Kernels {
    /// Prepares lazy loading for `arch` and loads the merge unit now, so that a missing or broken
    /// NVRTC is reported when the device is opened (and `--device auto` can fall back).
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self> {
        let optin = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let k = Kernels {
            ctx: ctx.clone(),
            max_shared: cu("reading the shared memory limit", ctx.attribute(optin))?.max(0) as usize,
            arch: arch.to_string(),
            modules: Default::default(),
            functions: Mutex::new(HashMap::new()),
            della: OnceLock::new(),
        };
        k.function(&nvrtc::MERGE, "gta_merge")?;
        Ok(k)
    }

    /// Whether `della_merge` takes rows of `row_len` with `k` experts (its sort fits in shared
    /// memory); the engine merges the tensors it does not take on the host.
    pub fn della_fits(&self, row_len: usize, k: usize) -> bool {
        row_len > 0 && row_len < 1 << 30 && della_shared_bytes(row_len, k) <= self.max_shared
    }

    /// `della_merge`, allowed all the dynamic shared memory a CTA may opt into.
    fn della_merge(&self) -> Result<CudaFunction> {
        if let Some(f) = self.della.get() {
            return Ok(f.clone());
        }
        let f = self.function(&nvrtc::DELLA, "della_merge")?;
        let max_dynamic = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let limit = i32::try_from(self.max_shared).unwrap_or(i32::MAX);
        cu("raising della_merge's shared memory", f.set_attribute(max_dynamic, limit))?;
        Ok(self.della.get_or_init(|| f).clone())
    }

    /// Compiles every unit now (the compile test and the benchmark want all of them up front).
    pub fn load_all(&self) -> Result<()> {
        for unit in nvrtc::MODULES {
            self.module(unit)?;
        }
        Ok(())
    }

    fn module(&self, unit: &nvrtc::KernelSource) -> Result<Arc<CudaModule>> {
        let slot = nvrtc::MODULES.iter().position(|u| u.name == unit.name).expect("a listed unit");
        if let Some(m) = self.modules[slot].get() {
            return Ok(m.clone());
        }
        let ptx = nvrtc::compile(unit, &self.arch)?;
        let m = cu(
            &format!("loading kernels/{}.cu", unit.name),
            self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str())),
        )?;
        // Two threads may race to load the same unit; either module works, one is kept.
        Ok(self.modules[slot].get_or_init(|| m).clone())
    }

    pub(crate) fn function(&self, unit: &nvrtc::KernelSource, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().map_err(|_| Error::cuda("kernel table", "poisoned"))?.get(name) {
            return Ok(f.clone());
        }
        let f = cu(&format!("finding kernel {name}"), self.module(unit)?.load_function(name))?;
        self.functions.lock().map_err(|_| Error::cuda("kernel table", "poisoned"))?.insert(name, f.clone());
        Ok(f)
    }

    /// Merges `n` elements (the tensor's elements `offset..offset + n`) into `out`.
    ///
    /// # Safety
    /// Every address must be a live device allocation of this context holding `n` elements of
    /// its dtype, 16-byte aligned; `bad` a live `u32`. `offset` should be a multiple of 8 for
    /// the vectorised Philox path (any value is correct).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn merge(
        &self,
        stream: &CudaStream,
        plan: &MergeLaunch,
        base: Option<(u64, FloatDType)>,
        experts: &[u64],
        out: u64,
        out_dtype: FloatDType,
        n: usize,
        offset: usize,
        bad: u64,
    ) -> Result<()> {
        if experts.len() != plan.inputs.len() || base.is_some() != plan.has_base() {
            return Err(Error::Invalid(format!(
                "internal: merge planned for {} inputs (base: {}), launched with {} (base: {})",
                plan.inputs.len(),
                plan.has_base(),
                experts.len(),
                base.is_some()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (base_ptr, base_dt) = base.map_or((0u64, 0u32), |(p, d)| (p, dtype_code(d)));
        let (out_dt, n64, off64) = (dtype_code(out_dtype), n as u64, offset as u64);
        match plan.kernel {
            LaunchKernel::Gta => {}
            LaunchKernel::Slerp { a, b } => {
                let (other, other_dt) = (experts[0], plan.inputs[0].dtype);
                let f = self.function(&nvrtc::PREPARED, "slerp_merge")?;
                let mut l = stream.launch_builder(&f);
                l.arg(&base_ptr).arg(&base_dt).arg(&other).arg(&other_dt).arg(&out).arg(&out_dt).arg(&n64);
                l.arg(&a).arg(&b).arg(&bad);
                // SAFETY: argument types and order match `slerp_merge`; addresses are the caller's.
                return cu("launching slerp_merge", unsafe { l.launch(grid(n.div_ceil(VEC))?) }).map(|_| ());
            }
            LaunchKernel::Della { row_len } => {
                let base = base.ok_or_else(|| Error::Invalid("internal: della launch without a base".into()))?;
                // SAFETY: the caller's promise for `merge` covers the same buffers.
                return unsafe { self.della(stream, plan, row_len, base, experts, (out, out_dtype), n, offset, bad) };
            }
            LaunchKernel::Sce { select } => {
                let mut ins = SceInputs { inputs: [SceInput::default(); MAX_INPUTS] };
                for ((slot, m), &ptr) in ins.inputs.iter_mut().zip(&plan.inputs).zip(experts) {
                    *slot = SceInput { ptr, weight: m.weight, dtype: m.dtype };
                }
                let (k, cutoff) = (plan.inputs.len() as u32, select.cutoff as u64);
                let f = self.function(&nvrtc::PREPARED, "sce_merge")?;
                let mut l = stream.launch_builder(&f);
                l.arg(&base_ptr).arg(&base_dt).arg(&ins).arg(&k).arg(&out).arg(&out_dt).arg(&n64).arg(&off64);
                l.arg(&select.t).arg(&cutoff).arg(&bad);
                // SAFETY: argument types and order match `sce_merge`; addresses are the caller's.
                return cu("launching sce_merge", unsafe { l.launch(grid(n.div_ceil(VEC))?) }).map(|_| ());
            }
        }
        let mut ins = MergeInputs { inputs: [MergeInput::default(); MAX_INPUTS] };
        for ((slot, m), &ptr) in ins.inputs.iter_mut().zip(&plan.inputs).zip(experts) {
            *slot = MergeInput { ptr, ..*m };
        }
        let k = plan.inputs.len() as u32;
        let f = self.function(&nvrtc::MERGE, "gta_merge")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&base_ptr).arg(&base_dt).arg(&ins).arg(&k).arg(&out).arg(&out_dt).arg(&n64).arg(&off64);
        b.arg(&plan.flags).arg(&plan.lambda).arg(&plan.div_all).arg(&plan.seed).arg(&plan.name_hash).arg(&bad);
        // SAFETY: argument types and order match `gta_merge`; addresses are the caller's promise.
        cu("launching gta_merge", unsafe { b.launch(grid(n.div_ceil(VEC))?) }).map(|_| ())
    }

    /// `della_merge` over whole rows of `row_len`: one CTA per row (grid-stride past 2^31 rows),
    /// dynamic shared memory for the row sort and the keep bits.
    ///
    /// # Safety
    /// As [`Self::merge`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn della(
        &self,
        stream: &CudaStream,
        plan: &MergeLaunch,
        row_len: usize,
        base: (u64, FloatDType),
        experts: &[u64],
        out: (u64, FloatDType),
        n: usize,
        offset: usize,
        bad: u64,
    ) -> Result<()> {
        let k = plan.inputs.len();
        if row_len == 0 || !n.is_multiple_of(row_len) {
            return Err(Error::Invalid(format!("internal: della launch of {n} elements in rows of {row_len}")));
        }
        if !self.della_fits(row_len, k) {
            return Err(Error::Invalid(format!(
                "internal: della rows of {row_len} with {k} models need {} bytes of shared memory, the device has {}",
                della_shared_bytes(row_len, k),
                self.max_shared
            )));
        }
        let mut ins = DellaInputs { inputs: [DellaInput::default(); MAX_INPUTS] };
        for ((slot, m), &ptr) in ins.inputs.iter_mut().zip(&plan.inputs).zip(experts) {
            let (weight, density, epsilon, factor, dtype) = (m.weight, m.density, m.thresh, m.factor, m.dtype);
            *slot = DellaInput { ptr, weight, density, epsilon, factor, dtype, pad: 0 };
        }
        let shared = della_shared_bytes(row_len, k);
        let sort_len = row_len.next_power_of_two() as u32;
        let threads = (sort_len / 2).clamp(32, 1024);
        let blocks = (n / row_len).clamp(1, i32::MAX as usize) as u32;
        let f = self.della_merge()?;
        let (base_ptr, base_dt, k32, out_ptr, out_dt) =
            (base.0, dtype_code(base.1), k as u32, out.0, dtype_code(out.1));
        let (n64, off64, row32) = (n as u64, offset as u64, row_len as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&base_ptr).arg(&base_dt).arg(&ins).arg(&k32).arg(&out_ptr).arg(&out_dt).arg(&n64).arg(&off64);
        b.arg(&row32).arg(&sort_len).arg(&plan.flags).arg(&plan.lambda).arg(&plan.div_all).arg(&plan.seed);
        b.arg(&plan.name_hash).arg(&bad);
        let cfg =
            LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 };
        // SAFETY: argument types and order match `della_merge`; addresses are the caller's promise.
        cu("launching della_merge", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// [`Self::merge`]'s weighted deltas over only the `nrows` rows listed at `rows` (device u32,
    /// sorted, unique, in range) of a table of `row_len` columns, into the full-size f32 `out`
    /// (other rows untouched).
    ///
    /// # Safety
    /// The base and every expert hold the whole table in their dtypes, `rows` `nrows` u32, `out`
    /// the table's element count of f32, `bad` one u32; all live.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn merge_rows(
        &self,
        stream: &CudaStream,
        plan: &MergeLaunch,
        base: (u64, FloatDType),
        experts: &[u64],
        rows: (u64, usize),
        row_len: usize,
        out: u64,
        bad: u64,
    ) -> Result<()> {
        if experts.len() != plan.inputs.len() {
            return Err(Error::Invalid(format!(
                "internal: row merge planned for {} inputs, launched with {}",
                plan.inputs.len(),
                experts.len()
            )));
        }
        let total = rows.1 * row_len;
        if total == 0 {
            return Ok(());
        }
        let mut ins = MergeInputs { inputs: [MergeInput::default(); MAX_INPUTS] };
        for ((slot, m), &ptr) in ins.inputs.iter_mut().zip(&plan.inputs).zip(experts) {
            *slot = MergeInput { ptr, ..*m };
        }
        let (base_ptr, base_dt, k) = (base.0, dtype_code(base.1), plan.inputs.len() as u32);
        let (rows_ptr, nrows, len32) = (rows.0, rows.1 as u64, u32::try_from(row_len).map_err(|_| too_long(row_len))?);
        let f = self.function(&nvrtc::MERGE, "merge_rows")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&base_ptr).arg(&base_dt).arg(&ins).arg(&k).arg(&rows_ptr).arg(&nrows).arg(&len32).arg(&out).arg(&bad);
        let blocks = total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types and order match `merge_rows`; addresses are the caller's promise.
        cu("launching merge_rows", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// [`Self::lambda_grad`] of a gradient that is zero outside the `nrows` rows listed at `rows`
    /// (device u32) of a table of `row_len` columns: only those rows are read.
    ///
    /// # Safety
    /// `grad` and the tables hold the whole table, `rows` `nrows` u32, `partials` `nrows * K`
    /// f64 and `out` K f64; all live.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn lambda_grad_rows(
        &self,
        stream: &CudaStream,
        grad: u64,
        tasks: &[(u64, FloatDType)],
        base: (u64, FloatDType),
        rows: (u64, usize),
        row_len: usize,
        partials: u64,
        out: u64,
    ) -> Result<()> {
        let ptrs = TaskPtrs::new(tasks)?;
        let k = tasks.len();
        let nrows = u32::try_from(rows.1).map_err(|_| too_long(rows.1))?;
        let (base_ptr, dt, k32, rows_ptr) = (base.0, dtype_code(base.1), k as u32, rows.0);
        let len32 = u32::try_from(row_len).map_err(|_| too_long(row_len))?;
        if nrows > 0 {
            let cfg = LaunchConfig { grid_dim: (nrows, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let f = self.function(&nvrtc::LAMBDA_GRAD, "lambda_grad_rows")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&grad).arg(&ptrs).arg(&base_ptr).arg(&dt).arg(&k32).arg(&rows_ptr).arg(&len32).arg(&partials);
            // SAFETY: matches `lambda_grad_rows`; addresses are the caller's promise.
            cu("launching lambda_grad_rows", unsafe { b.launch(cfg) })?;
        }
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (LG_MAX_TASKS as u32, 1, 1), shared_mem_bytes: 0 };
        let f = self.function(&nvrtc::LAMBDA_GRAD, "lambda_grad_rows_finish")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&partials).arg(&nrows).arg(&k32).arg(&out);
        // SAFETY: matches `lambda_grad_rows_finish`.
        cu("launching lambda_grad_rows_finish", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// CTAs (and partials rows) a lambda_grad over `n` elements uses.
    pub fn lambda_grad_ctas(n: usize) -> usize {
        n.div_ceil(LG_TILE).max(1)
    }

    /// `out[k] = sum_i grad_i * (tau_k,i - base_i)` in f64 (base optional), each input read in
    /// the dtype paired with its address.
    ///
    /// # Safety
    /// `grad` holds `n` f32, each task and the base `n` values of its dtype, `partials` at least
    /// `lambda_grad_ctas(n) * K` f32 and `out` K f64, all live and 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn lambda_grad(
        &self,
        stream: &CudaStream,
        grad: u64,
        tasks: &[(u64, FloatDType)],
        base: Option<(u64, FloatDType)>,
        n: usize,
        partials: u64,
        out: u64,
    ) -> Result<()> {
        let ptrs = TaskPtrs::new(tasks)?;
        let k = tasks.len();
        let which = match k {
            1..=4 => 0,
            5..=8 => 1,
            9..=16 => 2,
            _ => 3,
        };
        let ctas = Self::lambda_grad_ctas(n) as u32;
        let (base_ptr, dt) = base.map_or((0, 0), |(p, d)| (p, dtype_code(d)));
        let (k32, n64) = (k as u32, n as u64);
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let f = self.function(
            &nvrtc::LAMBDA_GRAD,
            ["lambda_grad_k4", "lambda_grad_k8", "lambda_grad_k16", "lambda_grad_k32"][which],
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(&grad).arg(&ptrs).arg(&base_ptr).arg(&dt).arg(&k32).arg(&n64).arg(&partials);
        // SAFETY: matches `lambda_grad_kN`; addresses are the caller's promise.
        cu("launching lambda_grad", unsafe { b.launch(cfg) })?;
        let cfg = LaunchConfig { grid_dim: (k32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let f = self.function(&nvrtc::LAMBDA_GRAD, "lambda_grad_finish")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&partials).arg(&ctas).arg(&k32).arg(&out);
        // SAFETY: matches `lambda_grad_finish`.
        cu("launching lambda_grad_finish", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// Histogram of |expert - base| bits: high 16 bits (`bucket == None`) or the low 16 bits of
    /// the values in `bucket`, added into `hist` (65536 u32).
    ///
    /// # Safety
    /// Addresses live, of `n` values of their dtype; `hist` 65536 u32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn abs_histogram(
        &self,
        stream: &CudaStream,
        base: (u64, FloatDType),
        expert: (u64, FloatDType),
        n: usize,
        bucket: Option<u32>,
        hist: u64,
        max_ctas: u32,
    ) -> Result<()> {
        let ctas = (n.div_ceil(THREADS as usize) as u64).clamp(1, max_ctas.max(1) as u64) as u32;
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (bd, ed, n64, bk) = (dtype_code(base.1), dtype_code(expert.1), n as u64, bucket.unwrap_or(u32::MAX));
        let f = self.function(&nvrtc::TIES, "abs_histogram")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&base.0).arg(&bd).arg(&expert.0).arg(&ed).arg(&n64).arg(&bk).arg(&hist);
        // SAFETY: matches `abs_histogram`.
        cu("launching abs_histogram", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// Per-tile counts of values whose |expert - base| has bits `t_bits`.
    ///
    /// # Safety
    /// As [`Self::abs_histogram`]; `counts` holds `n.div_ceil(tile)` u32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn count_equal(
        &self,
        stream: &CudaStream,
        base: (u64, FloatDType),
        expert: (u64, FloatDType),
        n: usize,
        t_bits: u32,
        tile: usize,
        counts: u64,
    ) -> Result<()> {
        let tiles = n.div_ceil(tile).max(1) as u32;
        let cfg = LaunchConfig { grid_dim: (tiles, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (bd, ed, n64, t64) = (dtype_code(base.1), dtype_code(expert.1), n as u64, tile as u64);
        let f = self.function(&nvrtc::TIES, "count_equal")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&base.0).arg(&bd).arg(&expert.0).arg(&ed).arg(&n64).arg(&t_bits).arg(&t64).arg(&counts);
        // SAFETY: matches `count_equal`.
        cu("launching count_equal", unsafe { b.launch(cfg) }).map(|_| ())
    }
}

/// A host tensor handed to the conveniences: raw little-endian bytes and their dtype.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    pub bytes: &'a [u8],
    pub dtype: FloatDType,
}

impl HostTensor<'_> {
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Output bytes of a merge and whether the kernel saw a non-finite input or output.
#[derive(Debug, Clone)]
pub struct MergeOutput {
    pub bytes: Vec<u8>,
    pub bad: bool,
}

/// Device address of a buffer (event tracking is off, so no synchronisation is implied).
pub fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl Gpu {
    /// Copies bytes to a new device buffer (allocations are 256-byte aligned).
    pub fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        cu("copying to the device", self.stream.clone_htod(bytes))
    }

    /// Copies a device buffer back, after the stream's work.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = cu("copying from the device", self.stream.clone_dtoh(s))?;
        cu("synchronising", self.stream.synchronize())?;
        Ok(v)
    }

    fn poisoned(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.upload(&vec![0xffu8; bytes.max(1)])
    }

    /// Runs the merge kernel on host tensors (each `n` elements, tensor elements
    /// `offset..offset + n`), output poisoned with NaN bits before the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_host(
        &self,
        form: KernelForm<'_>,
        params: &TensorParams,
        thresholds: &[Threshold],
        name_hash: u32,
        base: Option<HostTensor<'_>>,
        experts: &[HostTensor<'_>],
        out_dtype: FloatDType,
        offset: usize,
    ) -> Result<MergeOutput> {
        let stats = TensorStats { thresholds: thresholds.to_vec(), scalars: Vec::new() };
        self.merge_host_stats(form, params, &stats, name_hash, base, experts, out_dtype, offset)
    }

    /// [`Self::merge_host`] with the method's whole-tensor statistics (the CPU pre-pass's, for
    /// the forms that take them).
    #[allow(clippy::too_many_arguments)]
    pub fn merge_host_stats(
        &self,
        form: KernelForm<'_>,
        params: &TensorParams,
        stats: &TensorStats,
        name_hash: u32,
        base: Option<HostTensor<'_>>,
        experts: &[HostTensor<'_>],
        out_dtype: FloatDType,
        offset: usize,
    ) -> Result<MergeOutput> {
        let dtypes: Vec<FloatDType> = experts.iter().map(|e| e.dtype).collect();
        let plan = MergeLaunch::plan_stats(form, params, stats, name_hash, &dtypes)?;
        self.merge_host_plan(&plan, base, experts, out_dtype, offset)
    }

    /// [`Self::merge_host`] with a ready plan (DELLA's with its rows: [`MergeLaunch::for_rows`]).
    pub fn merge_host_plan(
        &self,
        plan: &MergeLaunch,
        base: Option<HostTensor<'_>>,
        experts: &[HostTensor<'_>],
        out_dtype: FloatDType,
        offset: usize,
    ) -> Result<MergeOutput> {
        let n = experts.first().map_or(0, HostTensor::len);
        let base_dev = base.map(|b| self.upload(b.bytes)).transpose()?;
        let experts_dev = experts.iter().map(|e| self.upload(e.bytes)).collect::<Result<Vec<_>>>()?;
        let out = self.poisoned(n * out_dtype.size())?;
        let bad = cu("allocating", self.stream.alloc_zeros::<u32>(1))?;
        let s = &self.stream;
        let base_arg = base_dev.as_ref().zip(base).map(|(d, b)| (addr(d, s), b.dtype));
        let ptrs: Vec<u64> = experts_dev.iter().map(|d| addr(d, s)).collect();
        // SAFETY: every buffer above is live and holds `n` elements of its dtype.
        unsafe { self.kernels.merge(s, plan, base_arg, &ptrs, addr(&out, s), out_dtype, n, offset, addr(&bad, s))? };
        let mut bytes = self.download(&out)?;
        bytes.truncate(n * out_dtype.size());
        Ok(MergeOutput { bytes, bad: self.download(&bad)?[0] != 0 })
    }

    /// lambda_grad on host data: f32 gradient, tasks (or expert weights with `base`) each in its dtype.
    pub fn lambda_grad_host(
        &self,
        grad: &[f32],
        base: Option<HostTensor<'_>>,
        tasks: &[HostTensor<'_>],
    ) -> Result<Vec<f64>> {
        let n = grad.len();
        if tasks.iter().any(|t| t.len() != n) || base.is_some_and(|b| b.len() != n) {
            return Err(Error::Shape { op: "lambda_grad", reason: "inputs differ in length".into() });
        }
        let s = &self.stream;
        let grad_dev = cu("copying to the device", s.clone_htod(grad))?;
        let base_dev = base.map(|b| self.upload(b.bytes)).transpose()?;
        let tasks_dev = tasks.iter().map(|t| self.upload(t.bytes)).collect::<Result<Vec<_>>>()?;
        let k = tasks.len();
        let partials = cu("allocating", s.clone_htod(&vec![f32::NAN; Kernels::lambda_grad_ctas(n) * k.max(1)]))?;
        let out = cu("allocating", s.clone_htod(&vec![f64::NAN; k.max(1)]))?;
        let ptrs: Vec<(u64, FloatDType)> = tasks_dev.iter().zip(tasks).map(|(d, t)| (addr(d, s), t.dtype)).collect();
        let base_arg = base_dev.as_ref().zip(base).map(|(d, b)| (addr(d, s), b.dtype));
        // SAFETY: buffers sized as the launch requires, all live until the download below.
        unsafe {
            self.kernels.lambda_grad(s, addr(&grad_dev, s), &ptrs, base_arg, n, addr(&partials, s), addr(&out, s))?
        };
        let mut v = self.download(&out)?;
        v.truncate(k);
        Ok(v)
    }

    /// The exact TIES threshold keeping the `k` largest |expert - base| of `n` device values,
    /// identical to `select::magnitude_threshold` on the same data.
    pub fn magnitude_threshold_dev(
        &self,
        base: (u64, FloatDType),
        expert: (u64, FloatDType),
        n: usize,
        k: usize,
    ) -> Result<Threshold> {
        if k >= n {
            return Ok(Threshold::KEEP_ALL);
        }
        if k == 0 {
            return Ok(Threshold::KEEP_NONE);
        }
        let s = &self.stream;
        let max_ctas = self.info.multiprocessors * 8;
        let mut hist = cu("allocating", s.alloc_zeros::<u32>(1 << 16))?;
        // SAFETY: `hist` holds 65536 u32; the inputs are the caller's live buffers.
        unsafe { self.kernels.abs_histogram(s, base, expert, n, None, addr(&hist, s), max_ctas)? };
        let hi: Vec<u64> = self.download(&hist)?.into_iter().map(u64::from).collect();
        let (bucket, above_bucket) = walk_down(&hi, k, 0);
        cu("clearing", s.memset_zeros(&mut hist))?;
        // SAFETY: as above.
        unsafe { self.kernels.abs_histogram(s, base, expert, n, Some(bucket as u32), addr(&hist, s), max_ctas)? };
        let lo: Vec<u64> = self.download(&hist)?.into_iter().map(u64::from).collect();
        let (low, above) = walk_down(&lo, k, above_bucket);
        let t_bits = ((bucket as u32) << 16) | low as u32;
        let t = f32::from_bits(t_bits);
        let equal = lo[low] as usize;
        let need = k - above;
        if need == equal {
            return Ok(Threshold { t, cutoff: n });
        }
        // Ties at the threshold: count per tile on the device, then scan the one tile that holds
        // the need-th tied value on the host.
        let tiles = n.div_ceil(CHUNK);
        let counts = cu("allocating", s.alloc_zeros::<u32>(tiles))?;
        // SAFETY: `counts` holds one u32 per tile.
        unsafe { self.kernels.count_equal(s, base, expert, n, t_bits, CHUNK, addr(&counts, s))? };
        let counts = self.download(&counts)?;
        let mut seen = 0usize;
        for (tile, &c) in counts.iter().enumerate() {
            if seen + c as usize >= need {
                let start = tile * CHUNK;
                let len = CHUNK.min(n - start);
                let b = self.read_range(base, start, len)?;
                let e = self.read_range(expert, start, len)?;
                for (i, (x, y)) in e.iter().zip(&b).enumerate() {
                    if (x - y).abs().to_bits() == t_bits {
                        seen += 1;
                        if seen == need {
                            return Ok(Threshold { t, cutoff: start + i + 1 });
                        }
                    }
                }
                break;
            }
            seen += c as usize;
        }
        Err(Error::Invalid(format!("GPU threshold: {equal} values tied at the threshold, the tile scan found {seen}")))
    }

    /// Elements `start..start + len` of a device tensor, decoded to f32.
    fn read_range(&self, t: (u64, FloatDType), start: usize, len: usize) -> Result<Vec<f32>> {
        let size = t.1.size();
        let mut bytes = vec![0u8; len * size];
        // On the compute stream, after the kernels that wrote the tensor (a plain synchronous
        // copy runs on the legacy stream, which does not wait for cudarc's streams).
        // SAFETY: the range lies inside the caller's live tensor, and `bytes` outlives the copy:
        // the stream is synchronised before it is read.
        cu("copying from the device", unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut bytes, t.0 + (start * size) as u64, self.stream.cu_stream())
        })?;
        cu("waiting for the copy", self.stream.synchronize())?;
        let mut out = vec![0f32; len];
        decode(t.1, &bytes, &mut out);
        Ok(out)
    }

    /// [`Self::magnitude_threshold_dev`] on host tensors.
    pub fn magnitude_threshold_host(
        &self,
        base: HostTensor<'_>,
        expert: HostTensor<'_>,
        k: usize,
    ) -> Result<Threshold> {
        let b = self.upload(base.bytes)?;
        let e = self.upload(expert.bytes)?;
        let s = &self.stream;
        self.magnitude_threshold_dev((addr(&b, s), base.dtype), (addr(&e, s), expert.dtype), expert.len(), k)
    }

    /// The Philox uniforms of stream (seed, tensor, task) for elements `offset..offset + n`.
    pub fn dare_uniform_host(&self, seed: u64, tensor: u32, task: u32, offset: usize, n: usize) -> Result<Vec<f32>> {
        let s = &self.stream;
        let out = cu("allocating", s.clone_htod(&vec![f32::NAN; n.max(1)]))?;
        let (o, n64, ptr) = (offset as u64, n as u64, addr(&out, s));
        let f = self.kernels.function(&nvrtc::DARE, "dare_uniform")?;
        let mut b = s.launch_builder(&f);
        b.arg(&seed).arg(&tensor).arg(&task).arg(&o).arg(&n64).arg(&ptr);
        // SAFETY: matches `dare_uniform`; `out` holds n f32.
        cu("launching dare_uniform", unsafe { b.launch(grid(n.div_ceil(VEC))?) })?;
        let mut v = self.download(&out)?;
        v.truncate(n);
        Ok(v)
    }

    /// DARE drop-and-rescale of one task vector, in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn dare_sparsify_host(
        &self,
        base: HostTensor<'_>,
        expert: HostTensor<'_>,
        offset: usize,
        seed: u64,
        tensor: u32,
        task: u32,
        density: f32,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let n = expert.len();
        let s = &self.stream;
        let b = self.upload(base.bytes)?;
        let e = self.upload(expert.bytes)?;
        let out = cu("allocating", s.clone_htod(&vec![f32::NAN; n.max(1)]))?;
        let (bp, bd, ep, ed) = (addr(&b, s), dtype_code(base.dtype), addr(&e, s), dtype_code(expert.dtype));
        let (n64, o64, op) = (n as u64, offset as u64, addr(&out, s));
        let f = self.kernels.function(&nvrtc::DARE, "dare_sparsify")?;
        let mut l = s.launch_builder(&f);
        l.arg(&bp).arg(&bd).arg(&ep).arg(&ed).arg(&n64).arg(&o64).arg(&seed).arg(&tensor).arg(&task);
        l.arg(&density).arg(&scale).arg(&op);
        // SAFETY: matches `dare_sparsify`; buffers hold n values.
        cu("launching dare_sparsify", unsafe { l.launch(grid(n)?) })?;
        let mut v = self.download(&out)?;
        v.truncate(n);
        Ok(v)
    }
}

/// The mix flags and plain divisor of a task-arithmetic form, as `Gta::merge_chunk` mixes.
fn gta_mix(g: &Gta, p: &TensorParams) -> (u32, f32) {
    let mut flags = FLAG_HAS_BASE;
    if g.consensus {
        flags |= FLAG_CONSENSUS;
    }
    if p.normalize {
        flags |= FLAG_NORMALIZE;
    }
    let wsum: f32 = p.weights.iter().sum();
    (flags, if wsum.abs() < 1e-8 { 1.0 } else { wsum })
}

/// A count the row kernels take as u32 that does not fit.
fn too_long(n: usize) -> Error {
    Error::Invalid(format!("{n} exceeds the row kernels' 32-bit index"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{MergeMethod, breadcrumbs, della, sce::Sce, slerp::Slerp, ties};

    const BF: FloatDType = FloatDType::BF16;

    fn params(k: usize, densities: &[f32]) -> TensorParams {
        TensorParams {
            weights: (0..k).map(|i| 0.5 + i as f32).collect(),
            densities: densities.to_vec(),
            lambda: 1.0,
            ..Default::default()
        }
    }

    /// `struct MergeInput` in merge.cu: 3 u64, 6 f32, 2 u32, no padding.
    #[test]
    fn merge_input_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<MergeInput>(), 56);
        assert_eq!(std::mem::size_of::<SceInput>(), 16);
        assert!(std::mem::size_of::<MergeInputs>() <= 4096 - 128, "kernel parameter space");
    }

    /// Breadcrumbs' band and l1 factor per expert, as `Gta::mask` applies them; no cut at
    /// density 1 whatever the thresholds say.
    #[test]
    fn breadcrumbs_plan_takes_the_cpu_band_and_factors() {
        let keep = |t: f32, cutoff| Threshold { t, cutoff };
        let stats = TensorStats {
            thresholds: vec![keep(0.1, 7), keep(0.2, 0), keep(0.9, 3), keep(0.8, 0)],
            scalars: vec![1.5, 2.5],
        };
        let p = params(2, &[0.5, 1.0]);
        for rescale in [false, true] {
            let m = breadcrumbs::method(true, rescale);
            let form = m.kernel_form().unwrap();
            assert!(form.cpu_stats());
            let plan = MergeLaunch::plan_stats(form, &p, &stats, 9, &[BF, BF]).unwrap();
            let [a, b] = [plan.inputs[0], plan.inputs[1]];
            assert_eq!((a.mode, a.thresh, a.cutoff, a.thresh2, a.cutoff2), (MODE_OUTLIERS, 0.1, 7, 0.9, 3));
            assert_eq!((a.coef, a.factor), (0.5, if rescale { 1.5 } else { 1.0 }));
            assert_eq!((b.thresh, b.thresh2, b.cutoff2), (Threshold::KEEP_ALL.t, f32::INFINITY, 0));
            assert_eq!(plan.flags & FLAG_CONSENSUS, FLAG_CONSENSUS);
        }
    }

    /// TIES with rescale: its trim as the outliers band with nothing cut at the top, and the
    /// pre-pass's l1 factor; without rescale, the device-threshold form with the plain weight.
    #[test]
    fn ties_rescale_plans_the_trim_with_its_l1_factor() {
        let stats = TensorStats { thresholds: vec![Threshold { t: 0.3, cutoff: 5 }], scalars: vec![1.75] };
        let p = params(1, &[0.4]);
        for rescale in [false, true] {
            let m = ties::method(rescale);
            let form = m.kernel_form().unwrap();
            assert_eq!(form.cpu_stats(), rescale);
            let a = MergeLaunch::plan_stats(form, &p, &stats, 0, &[BF]).unwrap().inputs[0];
            assert_eq!((a.thresh, a.cutoff, a.coef), (0.3, 5, 0.5), "the weight, not weight / density");
            if rescale {
                assert_eq!((a.mode, a.factor, a.thresh2, a.cutoff2), (MODE_OUTLIERS, 1.75, f32::INFINITY, 0));
            } else {
                assert_eq!(a.mode, MODE_MAGNITUDE);
            }
        }
    }

    #[test]
    fn slerp_and_sce_plans_round_the_cpu_statistics_as_the_cpu_does() {
        let stats = TensorStats { thresholds: Vec::new(), scalars: vec![0.7000000001, 0.3] };
        let plan = MergeLaunch::plan_stats(Slerp.kernel_form().unwrap(), &params(1, &[1.0]), &stats, 0, &[BF]).unwrap();
        assert_eq!(plan.kernel, LaunchKernel::Slerp { a: 0.7000000001f64 as f32, b: 0.3f64 as f32 });
        assert!(
            MergeLaunch::plan_stats(
                Slerp.kernel_form().unwrap(),
                &params(1, &[1.0]),
                &TensorStats::default(),
                0,
                &[BF]
            )
            .is_err()
        );
        let select = Threshold { t: 0.25, cutoff: 11 };
        let stats = TensorStats { thresholds: vec![select], scalars: vec![0.25, 0.75] };
        let plan =
            MergeLaunch::plan_stats(Sce.kernel_form().unwrap(), &params(2, &[1.0; 2]), &stats, 0, &[BF, BF]).unwrap();
        assert_eq!(plan.kernel, LaunchKernel::Sce { select });
        assert_eq!((plan.inputs[0].weight, plan.inputs[1].weight), (0.25, 0.75));
        assert!(
            MergeLaunch::plan_stats(
                Sce.kernel_form().unwrap(),
                &params(2, &[1.0; 2]),
                &TensorStats::default(),
                0,
                &[BF, BF]
            )
            .is_err()
        );
    }

    /// DELLA's plan: per expert the weight, density, epsilon (in `thresh`) and, with rescale, the
    /// CPU pre-pass's l1 factor rounded as `Gta::merge_chunk` rounds it; the TIES mix only for
    /// `della`; rows set afterwards.
    #[test]
    fn della_plan_takes_epsilons_and_l1_factors() {
        let mut p = params(2, &[0.5, 1.0]);
        p.extra.insert("epsilon", vec![0.1, 0.2]);
        p.normalize = true;
        let stats = TensorStats { thresholds: Vec::new(), scalars: vec![1.2500000001, 3.0] };
        for (ties, rescale) in [(true, true), (false, true), (true, false)] {
            let m = della::method(ties, rescale, 7);
            let form = m.kernel_form().expect("della has a GPU form");
            assert_eq!(form.cpu_stats(), rescale, "the pre-pass only for the l1 factors");
            let plan = MergeLaunch::plan_stats(form, &p, &stats, 9, &[BF, BF]).unwrap();
            assert_eq!(plan.kernel, LaunchKernel::Della { row_len: 0 });
            assert!(plan.by_rows());
            let [a, b] = [plan.inputs[0], plan.inputs[1]];
            assert_eq!((a.mode, a.weight, a.density, a.thresh), (MODE_MAGPRUNE, 0.5, 0.5, 0.1));
            assert_eq!((b.weight, b.density, b.thresh), (1.5, 1.0, 0.2));
            let factors = if rescale { (1.2500000001f64 as f32, 3.0) } else { (1.0, 1.0) };
            assert_eq!((a.factor, b.factor), factors);
            assert_eq!(plan.flags & FLAG_CONSENSUS != 0, ties);
            assert_eq!(
                (plan.flags & FLAG_NORMALIZE, plan.div_all, plan.seed, plan.name_hash),
                (FLAG_NORMALIZE, 2.0, 7, 9)
            );
            assert_eq!(plan.for_rows(96).kernel, LaunchKernel::Della { row_len: 96 });
        }
        // Other launches ignore rows.
        let ta = crate::merge::task_arithmetic::method();
        let plan = MergeLaunch::plan(ta.kernel_form().unwrap(), &p, &[], 0, &[BF, BF]).unwrap().for_rows(5);
        assert_eq!(plan.kernel, LaunchKernel::Gta);
    }

    /// `struct DellaInput` in della.cu, and the shared memory of the sort plus keep bits: the
    /// H100/H200 opt-in limit (227 KB) takes rows up to 16384 with K = 3, not 16385.
    #[test]
    fn della_input_layout_and_shared_memory() {
        assert_eq!(std::mem::size_of::<DellaInput>(), 32);
        assert!(std::mem::size_of::<DellaInputs>() <= 4096 - 128, "kernel parameter space");
        assert_eq!(della_shared_bytes(1, 1), 8 + 4);
        assert_eq!(della_shared_bytes(33, 3), 8 * 64 + 4 * 3 * 2);
        let h100 = 227 * 1024;
        assert!(della_shared_bytes(16384, 3) <= h100);
        assert!(della_shared_bytes(16385, 3) > h100);
        assert!(della_shared_bytes(8192, 64) <= h100 && della_shared_bytes(16384, 64) > h100, "K shrinks the rows");
    }
}
