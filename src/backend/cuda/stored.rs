//! Adaptation's ops on the CUDA backend: a checkpoint tensor's bytes are staged on the device in
//! their stored dtype, merged there by `gta_merge` (kernels/merge.cu) and, in the backward,
//! turned into Lambda gradients by `lambda_grad` (kernels/lambda_grad.cu) from the same device
//! bytes. The merged weights and their gradients never leave the device; only the K dot products
//! of each tensor come back, a block's at once (`*_many`: one wait for the device per block for
//! its merges' non-finite flags and one for its dot products, not one per tensor). Lookup tables (embeddings) are merged and reduced only over the rows
//! a batch reads (`merge_rows`, `lambda_grad_rows`). CPU twins: [`crate::backend::stored_ops`].

use cudarc::driver::{CudaSlice, result as cuda};
use rayon::prelude::*;

use super::device::cu;
use super::kernels::{Kernels, MergeLaunch, addr};
use super::ops::{Cuda, CudaBuf};
use super::stream_merge::HostSlot;
use crate::backend::stored_ops::{self, check_rows, check_stored};
use crate::backend::{StoredGrad, StoredMerge};
use crate::checkpoint::{FloatDType, StoredTensor};
use crate::error::{Error, Result};

/// Queued merges' non-finite flags (one u32 per job, on the device) and each job's host views.
pub struct CudaMergeChecks {
    bad: CudaSlice<u32>,
    jobs: Vec<QueuedMerge>,
}

/// What the CPU twin needs to redo a merge whose flag is set, for its exact error.
struct QueuedMerge {
    base: StoredTensor,
    experts: Vec<StoredTensor>,
    coefs: Vec<f32>,
    rows: Option<(Vec<u32>, usize)>,
}

/// Lambda dot products left on the device: K f64 per job, in job order.
pub struct CudaDots {
    out: CudaSlice<f64>,
    lens: Vec<usize>,
}

/// A tensor's stored bytes on the device, with the host view (for shapes, names and, when the
/// kernel flags a non-finite value, the CPU's exact error).
pub struct CudaStored {
    data: CudaSlice<u8>,
    host: StoredTensor,
}

impl CudaStored {
    pub fn bytes(&self) -> u64 {
        self.host.nbytes() as u64
    }
}

/// Bytes of each of the two pinned buffers of a [`StageRing`].
const RING_SLOT: usize = 64 << 20;
/// Piece of a pinned buffer one core fills from the mappings.
const FILL_PART: usize = 4 << 20;

/// Two pinned host buffers, each with the event of the last device copy out of it. A block's
/// tensors are copied from the mappings into one buffer on all cores while the other's copy to
/// the device runs: a pageable copy per tensor ran at 6 GB/s on an H200 (a streamed llama-1b
/// step), one core reading the mapping at a time, against 55 GB/s pinned.
pub(crate) struct StageRing {
    slots: [HostSlot; 2],
    next: usize,
}

impl StageRing {
    fn new(cuda: &Cuda) -> Result<Self> {
        let gpu = cuda.gpu();
        Ok(StageRing { slots: [HostSlot::new(gpu, RING_SLOT, true)?, HostSlot::new(gpu, RING_SLOT, true)?], next: 0 })
    }
}

impl Drop for StageRing {
    /// The last copies out of the buffers finish before the buffers are freed.
    fn drop(&mut self) {
        for HostSlot { done, .. } in &self.slots {
            if let Err(e) = done.synchronize() {
                tracing::warn!("waiting for a staging copy: {e:?}");
            }
        }
    }
}

impl Cuda {
    /// [`crate::backend::Backend::stage_many`]: every tensor's bytes through the pinned ring,
    /// the copies queued on the stream that the ops run on (no wait for the device, except for
    /// a buffer's previous copy before it is refilled).
    pub(super) fn stage_through_ring(&self, ts: &[&StoredTensor]) -> Result<Vec<CudaStored>> {
        let gpu = self.gpu();
        let s = &gpu.stream;
        let mut guard = self.staging().lock().map_err(|_| Error::cuda("staging", "a staging thread panicked"))?;
        let ring = match &mut *guard {
            Some(ring) => ring,
            empty => empty.insert(StageRing::new(self)?),
        };
        let mut out = Vec::with_capacity(ts.len());
        for t in ts {
            // SAFETY: every byte is written by the copies below before an op reads it.
            let data = cu("allocating on the device", unsafe { s.alloc::<u8>(t.nbytes().max(1)) })?;
            let dst = addr(&data, s);
            for (i, chunk) in t.bytes().chunks(RING_SLOT).enumerate() {
                let HostSlot { mem, done } = &mut ring.slots[ring.next];
                ring.next = (ring.next + 1) % 2;
                cu("waiting for a staging buffer", done.synchronize())?;
                let pinned = &mut cu("mapping a pinned buffer", mem.as_mut_slice())?[..chunk.len()];
                pinned
                    .par_chunks_mut(FILL_PART)
                    .zip(chunk.par_chunks(FILL_PART))
                    .for_each(|(d, c)| d.copy_from_slice(c));
                // SAFETY: the destination range lies inside `data` (a chunk of the tensor's
                // bytes); the pinned source lives in the ring and is not written again before
                // `done`, recorded after the copy, completes.
                cu("copying to the device", unsafe {
                    cuda::memcpy_htod_async(dst + (i * RING_SLOT) as u64, &*pinned, s.cu_stream())
                })?;
                cu("recording an event", done.record(s))?;
            }
            out.push(CudaStored { data, host: (*t).clone() });
        }
        Ok(out)
    }

    /// Copies a tensor's stored bytes to the device.
    pub(super) fn stage_stored(&self, t: &StoredTensor) -> Result<CudaStored> {
        let gpu = self.gpu();
        let data = if t.nbytes() == 0 { gpu.upload(&[0u8])? } else { gpu.upload(t.bytes())? };
        Ok(CudaStored { data, host: t.clone() })
    }

    pub(super) fn free_device_memory(&self) -> Option<u64> {
        self.gpu().mem_info().ok().map(|(free, _)| free as u64)
    }

    /// `base + sum_k coefs[k] (expert_k - base)` in f32 on the device.
    pub(super) fn merge_stored_dev(
        &self,
        base: &CudaStored,
        experts: &[&CudaStored],
        coefs: &[f32],
    ) -> Result<CudaBuf> {
        let job = StoredMerge { base, experts: experts.to_vec(), coefs, rows: None };
        Ok(self.merge_stored_many_dev(std::slice::from_ref(&job))?.remove(0))
    }

    /// Every job's merge launched, then one download of their non-finite flags: one wait for
    /// the device per block instead of one per tensor.
    pub(super) fn merge_stored_many_dev(&self, jobs: &[StoredMerge<'_, CudaStored>]) -> Result<Vec<CudaBuf>> {
        let (outs, checks) = self.queue_merges(jobs)?;
        self.check_queued_merges(checks)?;
        Ok(outs)
    }

    /// Every job's merge launched, their non-finite flags left on the device with what the
    /// CPU twin needs to name a failure ([`Self::check_queued_merges`]).
    pub(super) fn queue_merges(&self, jobs: &[StoredMerge<'_, CudaStored>]) -> Result<(Vec<CudaBuf>, CudaMergeChecks)> {
        // Every job's shapes first, so that a bad job is refused before any kernel runs (and a
        // non-finite value below is reported as it would be one tensor at a time).
        for job in jobs {
            let hosts: Vec<&StoredTensor> = job.experts.iter().map(|e| &e.host).collect();
            let op = if job.rows.is_some() { "merge_stored_rows" } else { "merge_stored" };
            check_stored(op, &job.base.host, &hosts, Some(job.coefs.len()))?;
            if let Some((rows, row_len)) = job.rows {
                check_rows(op, &job.base.host, rows, row_len)?;
            }
        }
        let gpu = self.gpu();
        let bad = cu("allocating", gpu.stream.alloc_zeros::<u32>(jobs.len().max(1)))?;
        let base_ptr = addr(&bad, &gpu.stream);
        let mut outs = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            let flag = base_ptr + 4 * i as u64;
            outs.push(match job.rows {
                Some((rows, row_len)) => {
                    self.launch_merge_rows(job.base, &job.experts, job.coefs, rows, row_len, flag)?
                }
                None => self.launch_merge(job.base, &job.experts, job.coefs, flag)?,
            });
        }
        let jobs = jobs
            .iter()
            .map(|j| QueuedMerge {
                base: j.base.host.clone(),
                experts: j.experts.iter().map(|e| e.host.clone()).collect(),
                coefs: j.coefs.to_vec(),
                rows: j.rows.map(|(r, len)| (r.to_vec(), len)),
            })
            .collect();
        Ok((outs, CudaMergeChecks { bad, jobs }))
    }

    /// The queued merges' flags (waits for the device); the first failed job's error comes from
    /// the CPU twin, which names the input and element (or the overflow).
    pub(super) fn check_queued_merges(&self, checks: CudaMergeChecks) -> Result<()> {
        let Some(i) = self.gpu().download(&checks.bad)?.iter().position(|&f| f != 0) else { return Ok(()) };
        let Some(job) = checks.jobs.get(i) else {
            return Err(Error::Invalid(format!("a merge flag {i} past the {} queued jobs", checks.jobs.len())));
        };
        let hosts: Vec<&StoredTensor> = job.experts.iter().collect();
        let cpu = match &job.rows {
            Some((rows, row_len)) => stored_ops::merge_stored_rows(&job.base, &hosts, &job.coefs, rows, *row_len).err(),
            None => stored_ops::merge_stored(&job.base, &hosts, &job.coefs).err(),
        };
        Err(cpu.unwrap_or_else(|| {
            Error::Invalid(format!("merging `{}` on the GPU gave a non-finite value", job.base.name))
        }))
    }

    /// Queues `base + sum_k coefs[k] (expert_k - base)`; a non-finite value sets the u32 at `bad`.
    /// The shapes were checked by [`Self::merge_stored_many_dev`], the only caller.
    fn launch_merge(&self, base: &CudaStored, experts: &[&CudaStored], coefs: &[f32], bad: u64) -> Result<CudaBuf> {
        let n = base.host.numel();
        let gpu = self.gpu();
        let s = &gpu.stream;
        let dtypes: Vec<FloatDType> = experts.iter().map(|e| e.host.dtype).collect();
        let plan = MergeLaunch::weighted_deltas(coefs, &dtypes)?;
        let out = self.alloc_buf(n)?;
        let ptrs: Vec<u64> = experts.iter().map(|e| addr(&e.data, s)).collect();
        let base_arg = Some((addr(&base.data, s), base.host.dtype));
        // SAFETY: every staged buffer holds the tensor's `n` elements in its dtype (the caller
        // checked the shapes), `out` holds `n` f32 and `bad` is the caller's live u32; all aligned.
        unsafe { gpu.kernels.merge(s, &plan, base_arg, &ptrs, self.buf_ptr(&out), FloatDType::F32, n, 0, bad)? };
        Ok(out)
    }

    /// `<grad, expert_k - base>` for every expert, f64 on the device; K values come back.
    pub(super) fn lambda_grad_stored_dev(
        &self,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
    ) -> Result<Vec<f64>> {
        let job = StoredGrad { grad, base, experts: experts.to_vec(), rows: None };
        Ok(self.lambda_grad_stored_many_dev(std::slice::from_ref(&job))?.remove(0))
    }

    /// Every job's dot products launched into one device buffer, then one download.
    pub(super) fn lambda_grad_stored_many_dev(
        &self,
        jobs: &[StoredGrad<'_, CudaStored, CudaBuf>],
    ) -> Result<Vec<Vec<f64>>> {
        let queued = self.queue_lambda_grads(jobs)?;
        self.read_queued_dots(queued)
    }

    /// Every job's dot products launched into one device buffer, nothing waited for.
    pub(super) fn queue_lambda_grads(&self, jobs: &[StoredGrad<'_, CudaStored, CudaBuf>]) -> Result<CudaDots> {
        let gpu = self.gpu();
        let total: usize = jobs.iter().map(|j| j.experts.len()).sum();
        let out = cu("allocating", gpu.stream.alloc_zeros::<f64>(total.max(1)))?;
        let mut at = addr(&out, &gpu.stream);
        for job in jobs {
            match job.rows {
                Some((rows, row_len)) => {
                    self.launch_lambda_grad_rows(job.grad, job.base, &job.experts, rows, row_len, at)?
                }
                None => self.launch_lambda_grad(job.grad, job.base, &job.experts, at)?,
            }
            at += 8 * job.experts.len() as u64;
        }
        Ok(CudaDots { out, lens: jobs.iter().map(|j| j.experts.len()).collect() })
    }

    /// The queued dot products, per job (waits for the device).
    pub(super) fn read_queued_dots(&self, queued: CudaDots) -> Result<Vec<Vec<f64>>> {
        let all = self.gpu().download(&queued.out)?;
        let mut from = 0;
        Ok(queued
            .lens
            .iter()
            .map(|&k| {
                from += k;
                all[from - k..from].to_vec()
            })
            .collect())
    }

    /// Queues `<grad, expert_k - base>` into the K f64 at `out`.
    fn launch_lambda_grad(&self, grad: &CudaBuf, base: &CudaStored, experts: &[&CudaStored], out: u64) -> Result<()> {
        self.check_lambda_grad("lambda_grad_stored", grad, base, experts)?;
        let n = base.host.numel();
        let k = experts.len();
        if k == 0 {
            return Ok(());
        }
        let gpu = self.gpu();
        let s = &gpu.stream;
        let partials = cu("allocating", s.alloc_zeros::<f32>(Kernels::lambda_grad_ctas(n) * k))?;
        let ptrs = staged_ptrs(experts, s);
        // SAFETY: `grad` holds `n` f32, each staged tensor `n` values of its dtype, `partials` one
        // row per CTA (freed in stream order after the kernels), `out` the caller's K live f64.
        unsafe {
            gpu.kernels.lambda_grad(
                s,
                self.buf_ptr(grad),
                &ptrs,
                Some((addr(&base.data, s), base.host.dtype)),
                n,
                addr(&partials, s),
                out,
            )?
        };
        Ok(())
    }

    /// [`Self::merge_stored_dev`] of only the rows `rows` (sorted, unique) of a table of
    /// `row_len` columns, in a full-size result whose other rows are zero.
    pub(super) fn merge_stored_rows_dev(
        &self,
        base: &CudaStored,
        experts: &[&CudaStored],
        coefs: &[f32],
        rows: &[u32],
        row_len: usize,
    ) -> Result<CudaBuf> {
        let job = StoredMerge { base, experts: experts.to_vec(), coefs, rows: Some((rows, row_len)) };
        Ok(self.merge_stored_many_dev(std::slice::from_ref(&job))?.remove(0))
    }

    /// Queues [`Self::merge_stored_rows_dev`]; a non-finite value sets the u32 at `bad`. The
    /// shapes and rows were checked by [`Self::merge_stored_many_dev`], the only caller.
    fn launch_merge_rows(
        &self,
        base: &CudaStored,
        experts: &[&CudaStored],
        coefs: &[f32],
        rows: &[u32],
        row_len: usize,
        bad: u64,
    ) -> Result<CudaBuf> {
        let gpu = self.gpu();
        let s = &gpu.stream;
        let dtypes: Vec<FloatDType> = experts.iter().map(|e| e.host.dtype).collect();
        let plan = MergeLaunch::weighted_deltas(coefs, &dtypes)?;
        let out = self.zeros_buf(base.host.numel())?;
        let rows_dev = self.upload_ids_dev(rows)?;
        let ptrs: Vec<u64> = experts.iter().map(|e| addr(&e.data, s)).collect();
        // SAFETY: every staged buffer holds the whole table in its dtype (the caller checked),
        // `rows` its `rows.len()` in-range ids (freed in stream order), `out` the table's f32,
        // `bad` the caller's live u32.
        unsafe {
            gpu.kernels.merge_rows(
                s,
                &plan,
                (addr(&base.data, s), base.host.dtype),
                &ptrs,
                (addr(&rows_dev, s), rows.len()),
                row_len,
                self.buf_ptr(&out),
                bad,
            )?
        };
        Ok(out)
    }

    /// [`Self::lambda_grad_stored_dev`] for a gradient that is zero outside `rows` (sorted,
    /// unique) of a table of `row_len` columns: only those rows are read.
    pub(super) fn lambda_grad_stored_rows_dev(
        &self,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Vec<f64>> {
        let job = StoredGrad { grad, base, experts: experts.to_vec(), rows: Some((rows, row_len)) };
        Ok(self.lambda_grad_stored_many_dev(std::slice::from_ref(&job))?.remove(0))
    }

    /// Queues [`Self::lambda_grad_stored_rows_dev`] into the K f64 at `out`.
    fn launch_lambda_grad_rows(
        &self,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
        rows: &[u32],
        row_len: usize,
        out: u64,
    ) -> Result<()> {
        let op = "lambda_grad_stored_rows";
        self.check_lambda_grad(op, grad, base, experts)?;
        check_rows(op, &base.host, rows, row_len)?;
        let k = experts.len();
        if k == 0 {
            return Ok(());
        }
        let gpu = self.gpu();
        let s = &gpu.stream;
        let partials = cu("allocating", s.alloc_zeros::<f64>(rows.len().max(1) * k))?;
        let rows_dev = self.upload_ids_dev(rows)?;
        let ptrs = staged_ptrs(experts, s);
        // SAFETY: `grad` and the staged tensors hold the whole table, `rows` its in-range ids,
        // `partials` one row of K per listed row (both freed in stream order after the kernels),
        // `out` the caller's K live f64.
        unsafe {
            gpu.kernels.lambda_grad_rows(
                s,
                self.buf_ptr(grad),
                &ptrs,
                (addr(&base.data, s), base.host.dtype),
                (addr(&rows_dev, s), rows.len()),
                row_len,
                addr(&partials, s),
                out,
            )?
        };
        Ok(())
    }

    /// The Lambda-gradient ops' checks: shapes and the gradient's length (each staged tensor is
    /// read in its own dtype).
    fn check_lambda_grad(
        &self,
        op: &'static str,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
    ) -> Result<()> {
        let hosts: Vec<&StoredTensor> = experts.iter().map(|e| &e.host).collect();
        check_stored(op, &base.host, &hosts, None)?;
        let n = base.host.numel();
        if self.buf_len(grad) != n {
            let reason = format!("the gradient has {} elements but `{}` has {n}", self.buf_len(grad), base.host.name);
            return Err(Error::Shape { op, reason });
        }
        Ok(())
    }
}

/// The staged experts' device addresses, each with the dtype the kernel reads it in.
fn staged_ptrs(experts: &[&CudaStored], s: &cudarc::driver::CudaStream) -> Vec<(u64, FloatDType)> {
    experts.iter().map(|e| (addr(&e.data, s), e.host.dtype)).collect()
}
