//! `symerge merge --device cuda`: the streaming executor on the GPU.
//!
//! The stream of tensors is cut into *units* of at most a few hundred MB of input. Three
//! threads and three CUDA streams keep every stage busy at once:
//!
//! ```text
//!  filler thread   mmaps --memcpy--> pinned slot A | B            (host staging ring, 2 slots)
//!  copy stream     pinned slot --H2D--> device input  0 | 1        (waits: compute done with it)
//!  compute stream  thresholds, gta_merge --> device output 0 | 1   (waits: H2D done, D2H done)
//!  d2h stream      device output --D2H--> pinned out slot A | B    (waits: compute done)
//!  writer thread   pinned out slot --> ShardWriter                 (waits: D2H done)
//! ```
//!
//! Events order the streams; nothing but the active unit and the incoming one is on the device.
//! With a `--device-mem` budget large enough for every input, the inputs stay resident and a
//! later merge of the same checkpoints on the same engine skips the host side entirely.
//!
//! The math is the CPU's bit for bit (see `kernels/merge.cu`). A kernel that meets a non-finite
//! value raises a flag that travels back with the unit's output; the unit's tensors are then
//! re-run on the CPU, which reports the exact file, tensor and element.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice, result as cuda};
use rayon::prelude::*;
use serde::Serialize;

use super::device::{Gpu, cu};
use super::kernels::{MAX_INPUTS, MergeLaunch, addr};
use crate::checkpoint::ShardWriter;
use crate::error::{Error, Result};
use crate::merge::KernelForm;
use crate::merge::config::MergeConfig;
use crate::merge::executor::{MergeEngine, MergeJob, MergeOptions, MergeSummary, TensorJob, TensorWork, merge_with};
use crate::merge::gta::Sparsify;
use crate::merge::select::{CHUNK, Threshold, keep_count};
use crate::progress::Progress;

/// Input bytes per unit when the budget allows: large enough that per-unit costs (launches,
/// events, one host wakeup) vanish, small enough that filling and draining the pipeline is short.
pub const DEFAULT_UNIT_BYTES: u64 = 512 << 20;
/// Alignment of every tensor inside a staging buffer: 16-byte vector loads need 16; 256 matches
/// the allocator and keeps every tensor on its own cache lines.
const ALIGN: usize = 256;
/// Split points of a large tensor: a multiple of 8 (the kernel's vector width, and Philox's
/// 4-element blocks) and of the CPU's chunk size.
const SPLIT: usize = CHUNK;

/// Settings of the GPU executor.
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// Device memory the merge may use, in bytes (`--device-mem`); default: most of what is free.
    /// When it covers every input, inputs stay resident on the device.
    pub device_mem: Option<u64>,
    /// Input bytes per unit; default [`DEFAULT_UNIT_BYTES`] (smaller when the budget is small).
    pub unit_bytes: Option<u64>,
    /// Benchmarks only: run everything but hand nothing to the shard writer, so the rate
    /// measured is the pipeline's rather than the disk's. The output is then incomplete.
    pub discard_output: bool,
    /// Benchmarks only: stage every unit into pinned memory and stop there (no device work), to
    /// measure the host side's own ceiling. The output is then incomplete.
    pub staging_only: bool,
    /// Page-lock the checkpoints' file mappings in place (`cuMemHostRegister`, read-only) and
    /// copy to the device straight from them, skipping the staging copy through pinned buffers.
    /// Falls back to staging when the driver refuses.
    pub register_inputs: bool,
}

/// What the last run of the engine did, for the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    pub units: usize,
    pub unit_input_bytes: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Inputs were kept on the device (budget large enough).
    pub resident: bool,
    /// Inputs were already on the device from an earlier run: no host copy at all.
    pub reused_resident: bool,
    /// From the first copy to the last write.
    pub seconds: f64,
    /// Time the device side waited for the host to stage a unit: near `seconds` means the
    /// pipeline runs at the staging rate.
    pub fill_wait_seconds: f64,
}

/// Why the GPU engine cannot run `config`'s method at all, if it cannot: such a merge runs on
/// the CPU even under `--device cuda`.
pub fn no_kernel(config: &MergeConfig) -> Option<String> {
    if !config.slices.is_empty() {
        return Some("a `slices` config merges on the CPU engine only".into());
    }
    if let (Some(d), Some(o)) = (config.result_rounding(), config.out_dtype) {
        return Some(format!(
            "`dtype: {d}` with `out_dtype: {o}` (each result rounded to {d} first) merges on the CPU engine only"
        ));
    }
    let method = config.build_method();
    method.kernel_form().is_none().then(|| format!("method {} has no GPU kernel", method.name()))
}

/// Why the GPU engine cannot run `config`, if it cannot (`--device auto` then uses the CPU).
pub fn unsupported(config: &MergeConfig) -> Option<String> {
    if let Some(why) = no_kernel(config) {
        return Some(why);
    }
    let inputs = config.models.len();
    (inputs > MAX_INPUTS).then(|| format!("the GPU merge takes at most {MAX_INPUTS} models, the config has {inputs}"))
}

/// Merges on `gpu`: the CPU executor's plan and writer with [`CudaEngine`] for the blocks.
pub fn merge(config: &MergeConfig, opts: &MergeOptions, gpu: &Gpu, cuda_opts: CudaOptions) -> Result<MergeSummary> {
    merge_with(config, opts, &mut CudaEngine::new(gpu, cuda_opts))
}

/// The GPU engine; keeps resident inputs between runs when the budget allows.
pub struct CudaEngine<'g> {
    gpu: &'g Gpu,
    opts: CudaOptions,
    resident: Option<Resident>,
    pub last: Option<StreamStats>,
}

/// Inputs kept on the device, and which plan they belong to.
struct Resident {
    key: blake3::Hash,
    buf: CudaSlice<u8>,
}

/// One tensor's part in a unit.
#[derive(Debug, Clone)]
enum Piece {
    /// A non-float tensor, written from the reference's bytes.
    Raw { item: usize },
    /// Elements `start..start + len` of float tensor `item`: where each source sits in the
    /// unit's input buffer (base first when there is one) and where the output goes.
    Float { item: usize, start: usize, len: usize, inputs: Vec<usize>, out: usize },
    /// A float tensor the kernel does not take (DELLA rows longer than its shared-memory sort):
    /// merged by the CPU method on the writer thread, in stream order, nothing staged.
    Host { item: usize },
}

/// How [`plan_units`] may cut a method's tensors.
#[derive(Clone, Copy)]
struct Cut<'a> {
    /// Tensors may be split across units (not for device thresholds, which need the whole
    /// tensor in one unit).
    split: bool,
    /// Pieces hold whole rows of the last dimension (DELLA ranks within rows).
    rows: bool,
    /// Whether the kernel takes a tensor; the others become [`Piece::Host`].
    device: &'a dyn Fn(&TensorJob<'_>) -> bool,
}

impl<'a> Cut<'a> {
    fn of(method: &dyn crate::merge::MergeMethod, device: &'a dyn Fn(&TensorJob<'_>) -> bool) -> Self {
        Cut { split: !method.needs_thresholds(), rows: method.whole_rows(), device }
    }
}

#[derive(Debug, Clone, Default)]
struct Unit {
    pieces: Vec<Piece>,
    in_bytes: usize,
    out_bytes: usize,
    /// Offset of the unit in the resident buffer.
    resident_at: usize,
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// A pinned host buffer and the event that marks the last device copy touching it.
pub(super) struct HostSlot {
    pub(super) mem: PinnedHostSlice<u8>,
    pub(super) done: CudaEvent,
}

impl HostSlot {
    /// `bytes` of pinned memory: write-combined for `for_upload` (fast for the host to write
    /// and the device to read, very slow for the host to read), plain for downloads.
    pub(super) fn new(gpu: &Gpu, bytes: usize, for_upload: bool) -> Result<Self> {
        // SAFETY: the memory is only read after it has been written (by us or by a copy).
        let mem = if for_upload {
            unsafe { gpu.ctx.alloc_pinned::<u8>(bytes.max(1)) }
        } else {
            unsafe { gpu.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }
        };
        // Host threads wait on `done`: a blocking-sync event sleeps instead of spinning a core
        // that the parallel staging copy could use.
        let done = cu(
            "creating an event",
            gpu.ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC)),
        )?;
        Ok(HostSlot { mem: cu("allocating pinned host memory", mem)?, done })
    }
}

impl<'g> CudaEngine<'g> {
    pub fn new(gpu: &'g Gpu, opts: CudaOptions) -> Self {
        CudaEngine { gpu, opts, resident: None, last: None }
    }

    fn event(&self) -> Result<CudaEvent> {
        cu("creating an event", self.gpu.ctx.new_event(None))
    }

    fn stream(&self) -> Result<Arc<CudaStream>> {
        cu("creating a stream", self.gpu.ctx.new_stream())
    }

    fn host_slot(&self, bytes: usize, for_upload: bool) -> Result<HostSlot> {
        HostSlot::new(self.gpu, bytes, for_upload)
    }

    fn device_buf(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: every byte read from these buffers is first written by a copy or a kernel.
        cu(&format!("allocating {} MB on the device", bytes >> 20), unsafe {
            self.gpu.stream.alloc::<u8>(bytes.max(1))
        })
    }
}

/// Shard mappings page-locked in place for the length of a merge; unlocked on drop.
struct Registered {
    ptrs: Vec<usize>,
}

impl Registered {
    /// Page-locks every shard of `ckpts` (in parallel: the driver walks every page), or returns
    /// the driver's refusal.
    fn lock(gpu: &Gpu, ckpts: &[&crate::checkpoint::Checkpoint]) -> Result<Self> {
        let maps: Vec<&[u8]> =
            ckpts.iter().flat_map(|c| c.shards.iter().map(|s| s.mapped())).filter(|m| !m.is_empty()).collect();
        let results: Vec<(usize, Result<()>)> = maps
            .par_iter()
            .map(|m| {
                let ptr = m.as_ptr() as usize;
                // Registration needs the context current on this pool thread.
                if let Err(e) = cu("binding the context", gpu.ctx.bind_to_thread()) {
                    return (ptr, Err(e));
                }
                // The mapping covers whole pages; the tail of the last page is mapped too.
                let len = m.len().div_ceil(PAGE) * PAGE;
                // SAFETY: `ptr..ptr + len` is a live read-only mapping (page-aligned by mmap) that
                // outlives this registration: `Registered` is dropped before the checkpoints.
                let r = unsafe {
                    cudarc::driver::sys::cuMemHostRegister_v2(
                        ptr as *mut std::ffi::c_void,
                        len,
                        cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY,
                    )
                };
                (ptr, cu("page-locking a mapped shard", r.result()))
            })
            .collect();
        let mut locked = Registered { ptrs: Vec::new() };
        let mut first_err = None;
        for (ptr, r) in results {
            match r {
                Ok(()) => locked.ptrs.push(ptr),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(locked),
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for &ptr in &self.ptrs {
            // SAFETY: registered by `lock`; every copy from it finished (the engine synchronises
            // before dropping). A failure leaves the pages locked until exit: nothing to do.
            let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(ptr as *mut std::ffi::c_void) };
        }
    }
}

/// Host page size assumed for rounding registrations (x86-64 and most aarch64 kernels).
const PAGE: usize = 4096;

/// Every output tensor in stream order, resolved, with the name of its block.
fn resolve_items<'j>(job: &'j MergeJob<'_>) -> Result<(Vec<TensorWork<'j>>, Vec<&'j str>)> {
    let items = job
        .stream
        .blocks
        .iter()
        .enumerate()
        .flat_map(|(bi, b)| b.tensors.iter().map(move |t| (bi, b, t)))
        .map(|(bi, b, t)| job.tensor(b, t, job.position(bi)))
        .collect::<Result<_>>()?;
    let block_of = job.stream.blocks.iter().flat_map(|b| b.tensors.iter().map(move |_| b.spec.name.as_str())).collect();
    Ok((items, block_of))
}

/// Cuts the tensors into units of about `target` input bytes. Tensors that need whole-tensor
/// statistics (TIES thresholds) are never split; row-wise methods are split between rows.
fn plan_units(items: &[TensorWork<'_>], target: usize, cut: Cut<'_>) -> Vec<Unit> {
    let mut units = vec![Unit::default()];
    for (item, w) in items.iter().enumerate() {
        let TensorWork::Float(tj) = w else {
            units.last_mut().expect("one unit").pieces.push(Piece::Raw { item });
            continue;
        };
        if tj.n == 0 {
            continue;
        }
        if !(cut.device)(tj) {
            units.last_mut().expect("one unit").pieces.push(Piece::Host { item });
            continue;
        }
        let per_elem: usize = tj.base.iter().chain(&tj.experts).map(|s| s.dtype.size()).sum();
        let chunk = piece_len(tj, target / per_elem.max(1), cut);
        let mut start = 0;
        while start < tj.n {
            let len = chunk.min(tj.n - start);
            let need = len * per_elem + ALIGN * (tj.experts.len() + 1);
            let unit = units.last_mut().expect("one unit");
            let unit = if unit.in_bytes > 0 && unit.in_bytes + need > target {
                units.push(Unit::default());
                units.last_mut().expect("just pushed")
            } else {
                unit
            };
            let mut inputs = Vec::new();
            for s in tj.base.iter().chain(&tj.experts) {
                inputs.push(unit.in_bytes);
                unit.in_bytes = align(unit.in_bytes + len * s.dtype.size());
            }
            let out = unit.out_bytes;
            unit.out_bytes = align(unit.out_bytes + len * tj.out_dtype.size());
            unit.pieces.push(Piece::Float { item, start, len, inputs, out });
            start += len;
        }
    }
    let mut at = 0;
    for u in &mut units {
        u.resident_at = at;
        at += u.in_bytes;
    }
    units
}

/// Elements per piece of `tj` for about `elems` elements per unit: multiples of [`SPLIT`], or
/// of the row length for row-wise methods (Philox and the DELLA kernel take any row start).
fn piece_len(tj: &TensorJob<'_>, elems: usize, cut: Cut<'_>) -> usize {
    if !cut.split {
        tj.n
    } else if cut.rows && tj.row_len > 0 {
        (elems / tj.row_len).max(1) * tj.row_len
    } else {
        elems.max(SPLIT) / SPLIT * SPLIT
    }
}

/// Identifies a plan's inputs, so resident buffers are reused only for the same data layout.
fn plan_key(job: &MergeJob<'_>, items: &[TensorWork<'_>], units: &[Unit]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for c in std::iter::once(job.stream.reference).chain(job.stream.inputs.iter().copied()) {
        h.update(c.path.to_string_lossy().as_bytes());
        for s in &c.shards {
            let meta = std::fs::metadata(&s.path).ok();
            let stamp = meta.map(|m| (m.len(), m.modified().ok())).map(|x| format!("{x:?}")).unwrap_or_default();
            h.update(stamp.as_bytes());
        }
    }
    for u in units {
        for p in &u.pieces {
            if let Piece::Float { item, start, len, inputs, .. } = p
                && let TensorWork::Float(tj) = &items[*item]
            {
                h.update(format!("{}:{start}:{len}:{inputs:?};", tj.name).as_bytes());
            }
        }
    }
    h.finalize()
}

/// Copies a unit's inputs from the mmaps into `dst`, in parallel: a single thread cannot
/// keep up with a pinned upload.
fn fill_unit(items: &[TensorWork<'_>], unit: &Unit, dst: &mut [u8]) {
    const PART: usize = 4 << 20;
    let mut copies: Vec<(usize, &[u8])> = Vec::new();
    for p in &unit.pieces {
        if let Piece::Float { item, start, len, inputs, .. } = p
            && let TensorWork::Float(tj) = &items[*item]
        {
            for (s, &at) in tj.base.iter().chain(&tj.experts).zip(inputs) {
                let size = s.dtype.size();
                let src = &s.bytes()[start * size..(start + len) * size];
                for (i, part) in src.chunks(PART).enumerate() {
                    copies.push((at + i * PART, part));
                }
            }
        }
    }
    let base = dst.as_mut_ptr() as usize;
    let cap = dst.len();
    copies.par_iter().for_each(|&(at, src)| {
        assert!(at + src.len() <= cap, "unit layout exceeds its staging slot");
        // SAFETY: the ranges [at, at + len) of different copies are disjoint by construction of
        // the unit layout, and lie inside `dst` (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (base + at) as *mut u8, src.len()) };
    });
}

/// Advises the kernel to read a unit's input pages ahead, or drops them once copied.
fn advise(items: &[TensorWork<'_>], unit: &Unit, release: bool) {
    for p in &unit.pieces {
        if let Piece::Float { item, start, len, .. } = p
            && let TensorWork::Float(tj) = &items[*item]
        {
            let last = start + len == tj.n;
            for s in tj.base.iter().chain(&tj.experts) {
                if release && last {
                    s.ckpt.release(s.meta);
                } else if !release && *start == 0 {
                    s.ckpt.will_need(s.meta);
                }
            }
        }
    }
}

/// How a run cuts the stream and uses device memory ([`CudaEngine::layout`]).
struct Layout {
    /// Each float tensor's launch when it needs no statistics (else `None`).
    plans: Vec<Option<MergeLaunch>>,
    units: Vec<Unit>,
    total_in: usize,
    /// Largest unit's input and output bytes (the output with room for the flag).
    max_in: usize,
    max_out: usize,
    all_in: usize,
    /// Every input fits the `--device-mem` budget: kept on the device.
    resident: bool,
}

impl CudaEngine<'_> {
    /// Launch plans, units sized to the device-memory budget, and whether the inputs stay
    /// resident; an error when the largest unit does not fit double-buffered.
    fn layout(&self, job: &MergeJob<'_>, form: KernelForm<'_>, items: &[TensorWork<'_>]) -> Result<Layout> {
        let plans: Vec<Option<MergeLaunch>> = items
            .iter()
            .map(|w| match w {
                // The CPU pre-pass's statistics come tensor by tensor in the run's loop.
                TensorWork::Float(tj) if !form.cpu_stats() => {
                    let dtypes: Vec<_> = tj.experts.iter().map(|s| s.dtype).collect();
                    MergeLaunch::plan(form, &tj.params, &[], tj.name_hash, &dtypes).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let (free, _) = self.gpu.mem_info()?;
        let budget = self.opts.device_mem.unwrap_or((free as u64).saturating_sub(2 << 30)) as usize;
        let total_in: usize = items
            .iter()
            .map(|w| match w {
                TensorWork::Float(tj) => tj.input_bytes() as usize,
                TensorWork::Raw { .. } => 0,
            })
            .sum();
        let target = self.opts.unit_bytes.unwrap_or(DEFAULT_UNIT_BYTES).min((budget / 6).max(16 << 20) as u64) as usize;
        let della = matches!(form, KernelForm::Gta(g) if g.sparsify == Sparsify::MagPrune);
        let kernels = &self.gpu.kernels;
        let device = |tj: &TensorJob<'_>| !della || kernels.della_fits(tj.row_len, tj.experts.len());
        let units = plan_units(items, target, Cut::of(job.method(), &device));
        log_host_tensors(items, &units, job.method().name());
        let max_in = units.iter().map(|u| u.in_bytes).max().unwrap_or(0);
        let max_out = units.iter().map(|u| u.out_bytes).max().unwrap_or(0) + ALIGN;
        let all_in: usize = units.iter().map(|u| u.in_bytes).sum();
        let resident = self.opts.device_mem.is_some() && all_in + 2 * max_out + (1 << 30) <= budget;
        let streaming_need = 2 * max_in + 2 * max_out;
        if !resident && streaming_need > budget {
            return Err(Error::cuda(
                "planning the merge",
                format!(
                    "the largest unit needs {:.2} GB of device memory double-buffered, more than the {:.2} GB budget; \
                     raise --device-mem or use --device cpu",
                    streaming_need as f64 / 1e9,
                    budget as f64 / 1e9
                ),
            ));
        }
        Ok(Layout { plans, units, total_in, max_in, max_out, all_in, resident })
    }

    /// `staging_only`: every unit staged into one pinned slot and nothing more (the host side's
    /// own ceiling, for the benchmark).
    fn stage_only(&mut self, items: &[TensorWork<'_>], units: &[Unit], max_in: usize, total_in: usize) -> Result<()> {
        let mut slot = self.host_slot(max_in, true)?;
        let dst = cu("mapping a pinned slot", slot.mem.as_mut_slice())?;
        let start = Instant::now();
        for (j, unit) in units.iter().enumerate() {
            if let Some(next) = units.get(j + 1) {
                advise(items, next, false);
            }
            fill_unit(items, unit, &mut dst[..unit.in_bytes]);
            advise(items, unit, true);
        }
        let seconds = start.elapsed().as_secs_f64();
        self.last = Some(StreamStats {
            units: units.len(),
            unit_input_bytes: max_in as u64,
            input_bytes: total_in as u64,
            output_bytes: 0,
            resident: false,
            reused_resident: false,
            seconds,
            fill_wait_seconds: seconds,
        });
        Ok(())
    }

    /// `register_inputs`: every input shard page-locked in place, or `None` (with one line)
    /// when the driver refuses, and the run stages through pinned buffers instead.
    fn lock_inputs(&self, job: &MergeJob<'_>) -> Option<Registered> {
        let start = Instant::now();
        let ckpts: Vec<_> = std::iter::once(job.stream.reference).chain(job.stream.inputs.iter().copied()).collect();
        match Registered::lock(self.gpu, &ckpts) {
            Ok(r) => {
                tracing::info!("page-locked {} mapped shards in {:.2}s", r.ptrs.len(), start.elapsed().as_secs_f64());
                Some(r)
            }
            Err(e) => {
                tracing::warn!("copying through pinned staging buffers: {e}");
                None
            }
        }
    }
}

/// Copies each float piece of `unit` from the page-locked mappings to its place after `dst`
/// (one copy per source and piece), on `copy`.
///
/// # Safety
/// `dst` must be the unit's live device input buffer, and the mappings must stay page-locked
/// until the copies complete.
unsafe fn upload_direct(items: &[TensorWork<'_>], unit: &Unit, dst: u64, copy: &CudaStream) -> Result<()> {
    for piece in &unit.pieces {
        let Piece::Float { item, start, len, inputs, .. } = piece else { continue };
        let TensorWork::Float(tj) = &items[*item] else { continue };
        for (s, &at) in tj.base.iter().chain(&tj.experts).zip(inputs) {
            let size = s.dtype.size();
            let src = &s.bytes()[start * size..(start + len) * size];
            // SAFETY: the destination range lies in the unit's input buffer (unit layout), as
            // the caller guarantees; the source is locked until the copy completes.
            cu("copying to the device", unsafe { cuda::memcpy_htod_async(dst + at as u64, src, copy.cu_stream()) })?;
        }
    }
    Ok(())
}

/// What the merge kernels of every unit share.
struct Launches<'a, 'j> {
    gpu: &'a Gpu,
    job: &'a MergeJob<'j>,
    form: KernelForm<'a>,
    plans: &'a [Option<MergeLaunch>],
    items: &'a [TensorWork<'a>],
    stream: &'a CudaStream,
}

impl Launches<'_, '_> {
    /// Queues the merge kernel of every float piece of `unit`, reading at `inp` and writing at
    /// `outp`; a non-finite value sets the u32 at `flag`.
    ///
    /// # Safety
    /// `inp` must hold the unit's inputs (laid out by `plan_units`) once the stream gets there,
    /// `outp` room for its outputs, and `flag` a live u32.
    unsafe fn unit(
        &self,
        unit: &Unit,
        inp: u64,
        outp: u64,
        flag: u64,
        prepared: &mut Option<(usize, MergeLaunch)>,
    ) -> Result<()> {
        for piece in &unit.pieces {
            let Piece::Float { item, start, len, inputs, out } = piece else { continue };
            let TensorWork::Float(tj) = &self.items[*item] else { continue };
            let at = |k: usize| inp + inputs[k] as u64;
            let (base, first) = match tj.base {
                Some(b) => (Some((at(0), b.dtype)), 1),
                None => (None, 0),
            };
            let experts: Vec<u64> = (first..inputs.len()).map(at).collect();
            let plan = piece_launch(self.gpu, self.job, self.form, self.plans, prepared, *item, tj, base, &experts)?;
            let plan = plan.for_rows(tj.row_len);
            // SAFETY: every address lies in a live buffer laid out by `plan_units` (the caller's
            // guarantee).
            unsafe {
                self.gpu.kernels.merge(
                    self.stream,
                    &plan,
                    base,
                    &experts,
                    outp + *out as u64,
                    tj.out_dtype,
                    *len,
                    *start,
                    flag,
                )?
            };
        }
        Ok(())
    }
}

/// The launch for a piece of float tensor `item`: a statistics form's CPU pre-pass (once per
/// tensor: `prepared` keeps the last one for its later pieces), TIES thresholds from its device
/// copy, or the plan [`CudaEngine::layout`] made.
#[allow(clippy::too_many_arguments)]
fn piece_launch(
    gpu: &Gpu,
    job: &MergeJob<'_>,
    form: KernelForm<'_>,
    plans: &[Option<MergeLaunch>],
    prepared: &mut Option<(usize, MergeLaunch)>,
    item: usize,
    tj: &TensorJob<'_>,
    base: Option<(u64, crate::checkpoint::FloatDType)>,
    experts: &[u64],
) -> Result<MergeLaunch> {
    if form.cpu_stats() {
        if let Some((i, p)) = prepared.as_ref()
            && *i == item
        {
            return Ok(p.clone());
        }
        let p = prepared_launch(form, tj)?;
        *prepared = Some((item, p.clone()));
        return Ok(p);
    }
    if job.method().needs_thresholds() {
        let th = gpu_thresholds(gpu, tj, base, experts)?;
        let dtypes: Vec<_> = tj.experts.iter().map(|s| s.dtype).collect();
        return MergeLaunch::plan(form, &tj.params, &th, tj.name_hash, &dtypes);
    }
    plans[item].clone().ok_or_else(|| Error::Invalid("internal: tensor without a launch".into()))
}

impl MergeEngine for CudaEngine<'_> {
    fn device(&self) -> String {
        format!("cuda:{} ({})", self.gpu.info.ordinal, self.gpu.info.name)
    }

    fn run(&mut self, job: &MergeJob<'_>, mut owned: ShardWriter, progress: &mut Progress) -> Result<ShardWriter> {
        let writer = &mut owned;
        let Some(form) = job.method().kernel_form() else {
            return Err(Error::Invalid(format!("method {} has no GPU kernel; use --device cpu", job.method().name())));
        };
        if let Some(d) = job.round_inputs {
            // The kernels read the stored bits; rounding inputs to `dtype` first is the CPU's.
            tracing::warn!("dtype {d} is narrower than some inputs: merging on the CPU, which rounds them to it");
            return crate::merge::executor::CpuEngine.run(job, owned, progress);
        }
        let (items, block_of) = resolve_items(job)?;
        let Layout { plans, units, total_in, max_in, max_out, all_in, resident } = self.layout(job, form, &items)?;
        if self.opts.staging_only {
            self.stage_only(&items, &units, max_in, total_in)?;
            return Ok(owned);
        }
        let key = plan_key(job, &items, &units);
        let reuse = resident && self.resident.as_ref().is_some_and(|r| r.key == key);
        tracing::info!(
            "GPU merge: {} units of up to {:.0} MB, {:.2} GB in, {}",
            units.len(),
            max_in as f64 / 1e6,
            total_in as f64 / 1e9,
            if reuse {
                "inputs already resident"
            } else if resident {
                "inputs kept resident"
            } else {
                "streamed through 2 pinned slots"
            }
        );

        if resident && !reuse {
            self.resident = None;
            self.resident = Some(Resident { key, buf: self.device_buf(all_in)? });
        } else if !resident {
            self.resident = None;
        }
        let start = Instant::now();
        let registered = if self.opts.register_inputs && !reuse { self.lock_inputs(job) } else { None };
        let direct = registered.is_some();
        let ring_in = if resident { Vec::new() } else { vec![self.device_buf(max_in)?, self.device_buf(max_in)?] };
        let dev_out = [self.device_buf(max_out)?, self.device_buf(max_out)?];
        let host_in = if reuse || direct {
            Vec::new()
        } else {
            vec![self.host_slot(max_in, true)?, self.host_slot(max_in, true)?]
        };
        let host_out = [self.host_slot(max_out, false)?, self.host_slot(max_out, false)?];
        let copy = self.stream()?;
        let d2h = self.stream()?;
        let compute = self.gpu.stream.clone();
        cu("synchronising", self.gpu.ctx.synchronize())?;
        let in_ready = [self.event()?, self.event()?];
        let in_free = [self.event()?, self.event()?];
        let computed = [self.event()?, self.event()?];
        let out_free = [self.event()?, self.event()?];

        let resident_buf = self.resident.as_ref();
        let in_addr = |j: usize| -> u64 {
            match resident_buf {
                Some(r) => addr(&r.buf, &compute) + units[j].resident_at as u64,
                None => addr(&ring_in[j % 2], &compute),
            }
        };
        let out_addr = |j: usize| addr(&dev_out[j % 2], &compute);

        let discard = self.opts.discard_output;
        let models = 1 + job.stream.inputs.len();
        let gpu: &Gpu = self.gpu;
        let mut bad_unit: Option<usize> = None;
        let mut fill_wait = 0f64;
        // Upload slots the filler no longer takes back; freed after the final synchronise.
        let mut retired: Vec<HostSlot> = Vec::new();
        let result: Result<()> = std::thread::scope(|scope| {
            // Filler: mmaps -> pinned upload slots, one unit ahead of the copies.
            let (free_in_tx, free_in_rx) = bounded::<HostSlot>(2);
            let (full_tx, full_rx) = bounded::<(usize, HostSlot)>(2);
            for s in host_in {
                free_in_tx.send(s).expect("receiver alive");
            }
            let items_ref = &items;
            let units_ref = &units;
            let filler = (!reuse && !direct)
                .then(|| scope.spawn(move || fill_slots(gpu, items_ref, units_ref, free_in_rx, full_tx)));

            // Writer: pinned output slots -> shard writer, in unit order.
            let (out_tx, out_rx) = bounded::<(usize, HostSlot)>(2);
            let (free_out_tx, free_out_rx) = bounded::<HostSlot>(2);
            for s in host_out {
                free_out_tx.send(s).expect("receiver alive");
            }
            let sink = if discard { None } else { Some(&mut *writer) };
            let (block_of, progress) = (&block_of, &mut *progress);
            let writer_thread = scope.spawn(move || {
                let out = Outputs { job, items: items_ref, units: units_ref, block_of, models };
                drain_slots(gpu, &out, out_rx, free_out_tx, sink, progress)
            });

            // Main: H2D, kernels, D2H, in unit order, each on its stream.
            let main = (|| -> Result<()> {
                // The last tensor's launch from the CPU pre-pass: its later pieces reuse it.
                let mut prepared: Option<(usize, MergeLaunch)> = None;
                let launches = Launches { gpu, job, form, plans: &plans, items: &items, stream: &compute };
                for (j, unit) in units.iter().enumerate() {
                    let p = j % 2;
                    if direct {
                        // Straight from the page-locked mappings: one copy per tensor piece.
                        if !resident {
                            cu("ordering streams", copy.wait(&in_free[p]))?;
                        }
                        // SAFETY: `in_addr(j)` is the unit's input buffer; the mappings stay locked
                        // until the final synchronise.
                        unsafe { upload_direct(&items, unit, in_addr(j), &copy)? };
                        cu("recording an event", in_ready[p].record(&copy))?;
                        cu("ordering streams", compute.wait(&in_ready[p]))?;
                    } else if !reuse {
                        let waited = Instant::now();
                        let Ok((jj, slot)) = full_rx.recv() else { return Ok(()) };
                        fill_wait += waited.elapsed().as_secs_f64();
                        debug_assert_eq!(jj, j);
                        if !resident {
                            cu("ordering streams", copy.wait(&in_free[p]))?;
                        }
                        let src = cu("mapping a pinned slot", slot.mem.as_slice())?;
                        // SAFETY: the destination holds `in_bytes` bytes (unit layout); the pinned
                        // source stays alive and untouched until `slot.done` completes.
                        if unit.in_bytes > 0 {
                            cu("copying to the device", unsafe {
                                cuda::memcpy_htod_async(in_addr(j), &src[..unit.in_bytes], copy.cu_stream())
                            })?;
                        }
                        cu("recording an event", slot.done.record(&copy))?;
                        cu("recording an event", in_ready[p].record(&copy))?;
                        // The filler stops listening once it has staged the last unit; the slot
                        // then waits out its copy here instead of being recycled.
                        if let Err(back) = free_in_tx.send(slot) {
                            retired.push(back.into_inner());
                        }
                        cu("ordering streams", compute.wait(&in_ready[p]))?;
                    }
                    cu("ordering streams", compute.wait(&out_free[p]))?;
                    let flag = out_addr(j) + unit.out_bytes as u64;
                    // SAFETY: the output buffer has room for the flag after the unit's outputs.
                    cu("clearing a flag", unsafe { cuda::memset_d8_async(flag, 0, 4, compute.cu_stream()) })?;
                    // SAFETY: the unit's input is on the device once `in_ready` (waited above);
                    // its output buffer and flag are the live ones of slot `p`.
                    unsafe { launches.unit(unit, in_addr(j), out_addr(j), flag, &mut prepared)? };
                    cu("recording an event", computed[p].record(&compute))?;
                    cu("recording an event", in_free[p].record(&compute))?;
                    let Ok(mut slot) = free_out_rx.recv() else { return Ok(()) };
                    cu("ordering streams", d2h.wait(&computed[p]))?;
                    let dst = cu("mapping a pinned slot", slot.mem.as_mut_slice())?;
                    // SAFETY: the pinned slot holds `max_out` >= out_bytes + 4 bytes and is not
                    // read until `slot.done` completes.
                    cu("copying from the device", unsafe {
                        cuda::memcpy_dtoh_async(&mut dst[..unit.out_bytes + 4], out_addr(j), d2h.cu_stream())
                    })?;
                    cu("recording an event", slot.done.record(&d2h))?;
                    cu("recording an event", out_free[p].record(&d2h))?;
                    if out_tx.send((j, slot)).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            })();
            drop(out_tx);
            drop(free_in_tx);
            drop(full_rx);
            drop(free_out_rx);
            let written = writer_thread.join().map_err(|_| Error::Invalid("GPU writer thread panicked".into()))?;
            let filled = match filler {
                Some(f) => f.join().map_err(|_| Error::Invalid("GPU staging thread panicked".into()))?,
                None => Ok(()),
            };
            main?;
            filled?;
            bad_unit = written?;
            Ok(())
        });
        let sync = cu("synchronising", self.gpu.ctx.synchronize());
        drop(retired);
        drop(registered);
        result?;
        sync?;
        if let Some(j) = bad_unit {
            return Err(cpu_error(job, &items, &units[j]));
        }
        self.last = Some(StreamStats {
            units: units.len(),
            unit_input_bytes: max_in as u64,
            input_bytes: total_in as u64,
            output_bytes: units.iter().map(|u| u.out_bytes as u64).sum(),
            resident,
            reused_resident: reuse,
            seconds: start.elapsed().as_secs_f64(),
            fill_wait_seconds: fill_wait,
        });
        Ok(owned)
    }
}

/// The filler thread: stages each unit from the mmaps into a free pinned upload slot, one unit
/// ahead of the copies, and hands it on; stops when the main loop stops listening.
fn fill_slots(
    gpu: &Gpu,
    items: &[TensorWork<'_>],
    units: &[Unit],
    free: Receiver<HostSlot>,
    full: Sender<(usize, HostSlot)>,
) -> Result<()> {
    // Pinned memory is freed in whichever thread drops it last: bind the context.
    cu("binding the context", gpu.ctx.bind_to_thread())?;
    for (j, unit) in units.iter().enumerate() {
        if let Some(next) = units.get(j + 1) {
            advise(items, next, false);
        }
        let Ok(mut slot) = free.recv() else { return Ok(()) };
        cu("waiting for an upload slot", slot.done.synchronize())?;
        let dst = cu("mapping a pinned slot", slot.mem.as_mut_slice())?;
        fill_unit(items, unit, &mut dst[..unit.in_bytes]);
        advise(items, unit, true);
        if full.send((j, slot)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// What the writer thread needs to hand units to the shard writer.
struct Outputs<'a, 'j> {
    job: &'a MergeJob<'j>,
    items: &'a [TensorWork<'a>],
    units: &'a [Unit],
    block_of: &'a [&'a str],
    models: usize,
}

/// The writer thread: takes each downloaded unit in order, stops at the first whose non-finite
/// flag is set (returning its index), else writes it (`sink`: `None` discards) and gives the
/// slot back.
fn drain_slots(
    gpu: &Gpu,
    out: &Outputs<'_, '_>,
    full: Receiver<(usize, HostSlot)>,
    free: Sender<HostSlot>,
    mut sink: Option<&mut ShardWriter>,
    progress: &mut Progress,
) -> Result<Option<usize>> {
    cu("binding the context", gpu.ctx.bind_to_thread())?;
    for (j, slot) in full.iter() {
        let unit = &out.units[j];
        cu("waiting for a download", slot.done.synchronize())?;
        let bytes = cu("mapping a pinned slot", slot.mem.as_slice())?;
        let flag = u32::from_le_bytes(bytes[unit.out_bytes..unit.out_bytes + 4].try_into().expect("4"));
        if flag != 0 {
            return Ok(Some(j));
        }
        write_unit(out.job, out.items, unit, bytes, sink.as_deref_mut(), progress, out.block_of, out.models)?;
        // Once the main loop has queued its last download it takes no more slots; the units
        // still queued here must be written all the same.
        let _ = free.send(slot);
    }
    Ok(None)
}

/// Hands one unit's merged bytes (laid out by `plan_units`) to the shard writer in stream
/// order, raw tensors from the reference's bytes, host tensors merged by the CPU method here,
/// and advances the progress by input bytes.
#[allow(clippy::too_many_arguments)]
fn write_unit(
    job: &MergeJob<'_>,
    items: &[TensorWork<'_>],
    unit: &Unit,
    bytes: &[u8],
    mut writer: Option<&mut ShardWriter>,
    progress: &mut Progress,
    block_of: &[&str],
    models: usize,
) -> Result<()> {
    for p in &unit.pieces {
        match p {
            Piece::Raw { item } => {
                if let TensorWork::Raw { name, bytes } = &items[*item] {
                    if let Some(w) = writer.as_deref_mut() {
                        w.write(name, bytes)?;
                    }
                    progress.advance(block_of[*item], (bytes.len() * models) as u64);
                }
            }
            Piece::Host { item } => {
                if let TensorWork::Float(tj) = &items[*item] {
                    if let Some(w) = writer.as_deref_mut() {
                        job.merge_tensor_cpu(tj, Vec::new(), &mut |bytes| {
                            w.write(tj.name, &bytes)?;
                            Ok(bytes)
                        })?;
                    }
                    progress.advance(block_of[*item], tj.input_bytes());
                }
            }
            Piece::Float { item, len, out, .. } => {
                if let TensorWork::Float(tj) = &items[*item] {
                    let size = tj.out_dtype.size();
                    if let Some(w) = writer.as_deref_mut() {
                        w.write(tj.name, &bytes[*out..*out + len * size])?;
                    }
                    progress.advance(block_of[*item], tj.input_bytes() * *len as u64 / tj.n as u64);
                }
            }
        }
    }
    Ok(())
}

/// One log line when some tensors go to the host ([`Piece::Host`]): how many, and the longest
/// of their rows. Never silent: those tensors cost CPU time under `--device cuda`.
fn log_host_tensors(items: &[TensorWork<'_>], units: &[Unit], method: &str) {
    let host: Vec<&TensorJob<'_>> = units
        .iter()
        .flat_map(|u| &u.pieces)
        .filter_map(|p| match p {
            Piece::Host { item } => match &items[*item] {
                TensorWork::Float(tj) => Some(tj),
                TensorWork::Raw { .. } => None,
            },
            _ => None,
        })
        .collect();
    if let Some(longest) = host.iter().map(|tj| tj.row_len).max() {
        tracing::warn!(
            "{method}: {} tensors have rows longer than the GPU kernel's shared-memory sort takes \
             (longest {longest}): merging them on the CPU",
            host.len()
        );
    }
}

/// The launch of a [`KernelForm::cpu_stats`] form for one tensor: the method's own CPU
/// pre-pass over the mapped inputs (the CPU merge's statistics, bit for bit), then the plan.
/// First design: the pre-pass runs on the main thread before the tensor's first piece is
/// launched, so it overlaps only the copies and the writer, not the kernels before it.
fn prepared_launch(form: KernelForm<'_>, tj: &TensorJob<'_>) -> Result<MergeLaunch> {
    let stats = tj.cpu_stats()?;
    let dtypes: Vec<_> = tj.experts.iter().map(|s| s.dtype).collect();
    MergeLaunch::plan_stats(form, &tj.params, &stats, tj.name_hash, &dtypes)
}

/// TIES thresholds of one tensor from its device copy (the whole tensor is in one unit).
fn gpu_thresholds(
    gpu: &Gpu,
    tj: &TensorJob<'_>,
    base: Option<(u64, crate::checkpoint::FloatDType)>,
    experts: &[u64],
) -> Result<Vec<Threshold>> {
    let base = base.ok_or_else(|| Error::Invalid("threshold methods need a base model".into()))?;
    tj.experts
        .iter()
        .zip(experts)
        .zip(&tj.params.densities)
        .map(|((s, &e), &d)| gpu.magnitude_threshold_dev(base, (e, s.dtype), tj.n, keep_count(d, tj.n)))
        .collect()
}

/// The exact error for a unit the GPU flagged, from the CPU path over the same tensors.
fn cpu_error(job: &MergeJob<'_>, items: &[TensorWork<'_>], unit: &Unit) -> Error {
    for p in &unit.pieces {
        if let Piece::Float { item, .. } = p
            && let TensorWork::Float(tj) = &items[*item]
            && let Err(e) = job.merge_tensor_cpu(tj, Vec::new(), &mut Ok)
        {
            return e;
        }
    }
    Error::Invalid("the GPU flagged a non-finite value that the CPU path does not reproduce".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::bench::compare_outputs;
    use crate::checkpoint::FloatDType;
    use crate::checkpoint::dtype::{decode, encode_into};
    use crate::checkpoint::generate::{SyntheticSpec, write_family};
    use crate::merge::ChunkCtx;
    use crate::merge::executor::{Source, merge};
    use crate::merge::stats::TensorStats;

    /// The GPU engine's host side with the device replaced by the CPU method reading the staged
    /// bytes: checks unit planning, the staging layout and the output assembly without a GPU.
    struct Loopback {
        target: usize,
        units: usize,
        /// Tensors the plan left to the host.
        host: usize,
        /// Longest row the "device" takes (the others are host pieces).
        max_row: usize,
    }

    impl MergeEngine for Loopback {
        fn device(&self) -> String {
            "loopback".into()
        }

        fn run(&mut self, job: &MergeJob<'_>, mut owned: ShardWriter, progress: &mut Progress) -> Result<ShardWriter> {
            let writer = &mut owned;
            let (items, block_of) = resolve_items(job)?;
            let device = |tj: &TensorJob<'_>| tj.row_len <= self.max_row;
            let units = plan_units(&items, self.target, Cut::of(job.method(), &device));
            self.units = units.len();
            self.host = units.iter().flat_map(|u| &u.pieces).filter(|p| matches!(p, Piece::Host { .. })).count();
            let models = 1 + job.stream.inputs.len();
            for unit in &units {
                let mut staged = vec![0u8; unit.in_bytes];
                fill_unit(&items, unit, &mut staged);
                let mut out = vec![0xffu8; unit.out_bytes + 4];
                for p in &unit.pieces {
                    let Piece::Float { item, start, len, inputs, out: at } = p else { continue };
                    let TensorWork::Float(tj) = &items[*item] else { continue };
                    assert!(inputs.iter().chain([at]).all(|o| o % ALIGN == 0), "aligned");
                    if job.method().whole_rows() {
                        assert!(
                            start.is_multiple_of(tj.row_len) && len.is_multiple_of(tj.row_len),
                            "{}: whole rows",
                            tj.name
                        );
                    }
                    let sources: Vec<Source<'_>> = tj.base.iter().chain(&tj.experts).copied().collect();
                    let vals: Vec<Vec<f32>> = sources
                        .iter()
                        .zip(inputs)
                        .map(|(s, &o)| {
                            let mut v = vec![0f32; *len];
                            decode(s.dtype, &staged[o..o + len * s.dtype.size()], &mut v);
                            v
                        })
                        .collect();
                    // The statistics the GPU engine gives each form: device thresholds (here the
                    // CPU's), the CPU pre-pass's, or none.
                    let form = job.method().kernel_form().expect("a GPU form");
                    let stats = if form.cpu_stats() {
                        tj.cpu_stats()?
                    } else if job.method().needs_thresholds() {
                        TensorStats { thresholds: tj.cpu_thresholds()?, scalars: Vec::new() }
                    } else {
                        TensorStats::default()
                    };
                    let ctx = ChunkCtx {
                        offset: *start,
                        params: &tj.params,
                        thresholds: &stats.thresholds,
                        name_hash: tj.name_hash,
                        scalars: &stats.scalars,
                        row_len: tj.row_len,
                    };
                    let (base, experts) =
                        if tj.base.is_some() { (Some(vals[0].as_slice()), &vals[1..]) } else { (None, &vals[..]) };
                    let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
                    let mut o = vec![0f32; *len];
                    job.method().merge_chunk(&ctx, base, &views, &mut o, &mut Vec::new());
                    let osize = tj.out_dtype.size();
                    encode_into(tj.out_dtype, &o, &mut out[*at..*at + len * osize]);
                }
                write_unit(job, &items, unit, &out, Some(&mut *writer), progress, &block_of, models)?;
            }
            Ok(owned)
        }
    }

    #[test]
    fn units_stage_and_reassemble_every_method_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
        write_family(&spec, 3, 3, 0.01, tmp.path(), 150_000).unwrap();
        for (method, extra) in [
            ("task_arithmetic", "parameters: {lambda: 0.7}\n"),
            ("ties", ""),
            ("ties", "parameters: {rescale: true}\n"),
            ("dare_ties", "parameters: {seed: 5}\ndtype: float32\n"),
            ("linear", ""),
        ] {
            let mut y = format!("merge_method: {method}\n");
            if method != "linear" {
                y.push_str("base_model: base\n");
            }
            y.push_str("models:\n");
            let sparse = method == "ties" || method.starts_with("dare");
            for k in 1..=3 {
                let density = if sparse { format!(", density: 0.{}", k + 4) } else { String::new() };
                y.push_str(&format!("  - model: expert-{k}\n    parameters: {{weight: 0.{k}{density}}}\n"));
            }
            y.push_str(extra);
            loopback_matches_cpu(tmp.path(), method, &y);
        }
    }

    /// `yaml` merged by the CPU engine and by [`Loopback`] in tiny and in whole-tensor units
    /// must give the same bytes.
    fn loopback_matches_cpu(dir: &std::path::Path, method: &str, yaml: &str) {
        loopback_rows_match_cpu(dir, method, yaml, usize::MAX);
    }

    /// [`loopback_matches_cpu`] with the "device" taking rows up to `max_row` only.
    fn loopback_rows_match_cpu(dir: &std::path::Path, method: &str, yaml: &str, max_row: usize) {
        let path = dir.join(format!("{method}.yml"));
        std::fs::write(&path, yaml).unwrap();
        let cfg = MergeConfig::load(&path).unwrap();
        let opts = |name: &str| MergeOptions {
            max_shard_bytes: 100_000,
            force: true,
            progress: false,
            ..MergeOptions::new(dir.join(name))
        };
        merge(&cfg, &opts("cpu")).unwrap();
        for target in [20_000, 1 << 30] {
            let mut engine = Loopback { target, units: 0, host: 0, max_row };
            merge_with(&cfg, &opts("loop"), &mut engine).unwrap();
            assert_eq!(engine.host > 0, max_row < usize::MAX, "{method}: {} host tensors", engine.host);
            if target < 1 << 20 {
                assert!(engine.units > 10, "{method}: {} units", engine.units);
            }
            let (differing, worst) = compare_outputs(&dir.join("loop"), &dir.join("cpu")).unwrap();
            assert_eq!((differing, worst), (0, 0.0), "{method}, units of {target} bytes");
        }
    }

    /// The forms that take the CPU pre-pass's statistics, with tensors split across units: the
    /// whole-tensor statistics and the pieces' tensor offsets must give the CPU's bytes.
    #[test]
    fn units_reassemble_the_prepared_methods_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
        write_family(&spec, 4, 3, 0.01, tmp.path(), 150_000).unwrap();
        let slerp = "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: expert-1\nparameters: {t: 0.3}\n";
        loopback_matches_cpu(tmp.path(), "slerp", slerp);
        for method in ["breadcrumbs", "breadcrumbs_ties"] {
            let mut y = format!("merge_method: {method}\nbase_model: base\nmodels:\n");
            for k in 1..=3 {
                y += &format!(
                    "  - model: expert-{k}\n    parameters: {{weight: 0.{k}, density: 0.{}, gamma: 0.02}}\n",
                    k + 3
                );
            }
            loopback_matches_cpu(tmp.path(), method, &(y + "parameters: {rescale: true}\n"));
        }
        let sce = "merge_method: sce\nbase_model: base\nmodels:\n  - model: expert-1\n  - model: expert-2\n  - model: expert-3\nparameters: {select_topk: 0.4}\n";
        loopback_matches_cpu(tmp.path(), "sce", sce);
    }

    /// DELLA (`della` with TIES, `della_linear`, with and without the l1 rescale) through the
    /// unit planner: pieces cut between rows, the pre-pass's factors per tensor, and tensors
    /// whose rows the kernel does not take (here rows over 100: the MLP's 176) merged on the
    /// host in stream order, all giving the CPU's bytes.
    #[test]
    fn units_reassemble_della_by_rows_and_host_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
        write_family(&spec, 5, 3, 0.01, tmp.path(), 150_000).unwrap();
        for (method, rescale) in [("della", true), ("della_linear", true), ("della", false)] {
            let mut y = format!("merge_method: {method}\nbase_model: base\nmodels:\n");
            for (k, (d, e)) in [(0.5, 0.1), (0.3, 0.2), (1.0, 0.0)].iter().enumerate() {
                y += &format!(
                    "  - model: expert-{}\n    parameters: {{weight: 0.{}, density: {d}, epsilon: {e}}}\n",
                    k + 1,
                    k + 4
                );
            }
            y += &format!("parameters: {{rescale: {rescale}, seed: 11}}\n");
            loopback_rows_match_cpu(tmp.path(), method, &y, usize::MAX);
            loopback_rows_match_cpu(tmp.path(), method, &y, 100);
        }
    }
}
