//! Adaptation's ops on the CUDA backend: a checkpoint tensor's bytes are staged on the device in
//! their stored dtype, merged there by `gta_merge` (kernels/merge.cu) and, in the backward,
//! turned into Lambda gradients by `lambda_grad` (kernels/lambda_grad.cu) from the same device
//! bytes. The merged weights and their gradients never leave the device; only the K dot products
//! of each tensor come back, a block's at once (`*_many`: one wait for the device per block for
//! its merges' non-finite flags and one for its dot products, not one per tensor). Lookup tables (embeddings) are merged and reduced only over the rows
//! a batch reads (`merge_rows`, `lambda_grad_rows`). CPU twins: [`crate::backend::stored_ops`].

use cudarc::driver::CudaSlice;

use super::device::cu;
use super::kernels::{Kernels, MergeLaunch, addr};
use super::ops::{Cuda, CudaBuf};
use crate::backend::stored_ops::{self, check_rows, check_stored};
use crate::backend::{StoredGrad, StoredMerge};
use crate::checkpoint::{FloatDType, StoredTensor};
use crate::error::{Error, Result};

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

impl Cuda {
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
        if let Some(i) = gpu.download(&bad)?.iter().position(|&f| f != 0) {
            // The CPU twin names the input and element (or the overflow).
            let job = &jobs[i];
            let hosts: Vec<&StoredTensor> = job.experts.iter().map(|e| &e.host).collect();
            let cpu = match job.rows {
                Some((rows, row_len)) => {
                    stored_ops::merge_stored_rows(&job.base.host, &hosts, job.coefs, rows, row_len).err()
                }
                None => stored_ops::merge_stored(&job.base.host, &hosts, job.coefs).err(),
            };
            return Err(cpu.unwrap_or_else(|| {
                Error::Invalid(format!("merging `{}` on the GPU gave a non-finite value", job.base.host.name))
            }));
        }
        Ok(outs)
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
        let all = gpu.download(&out)?;
        let mut from = 0;
        Ok(jobs
            .iter()
            .map(|j| {
                let k = j.experts.len();
                from += k;
                all[from - k..from].to_vec()
            })
            .collect())
    }

    /// Queues `<grad, expert_k - base>` into the K f64 at `out`.
    fn launch_lambda_grad(&self, grad: &CudaBuf, base: &CudaStored, experts: &[&CudaStored], out: u64) -> Result<()> {
        let dtype = self.check_lambda_grad("lambda_grad_stored", grad, base, experts)?;
        let n = base.host.numel();
        let k = experts.len();
        if k == 0 {
            return Ok(());
        }
        let gpu = self.gpu();
        let s = &gpu.stream;
        let partials = cu("allocating", s.alloc_zeros::<f32>(Kernels::lambda_grad_ctas(n) * k))?;
        let ptrs: Vec<u64> = experts.iter().map(|e| addr(&e.data, s)).collect();
        // SAFETY: `grad` holds `n` f32, the staged tensors `n` values of `dtype`, `partials` one
        // row per CTA (freed in stream order after the kernels), `out` the caller's K live f64.
        unsafe {
            gpu.kernels.lambda_grad(
                s,
                self.buf_ptr(grad),
                &ptrs,
                Some(addr(&base.data, s)),
                dtype,
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
        let dtype = self.check_lambda_grad(op, grad, base, experts)?;
        check_rows(op, &base.host, rows, row_len)?;
        let k = experts.len();
        if k == 0 {
            return Ok(());
        }
        let gpu = self.gpu();
        let s = &gpu.stream;
        let partials = cu("allocating", s.alloc_zeros::<f64>(rows.len().max(1) * k))?;
        let rows_dev = self.upload_ids_dev(rows)?;
        let ptrs: Vec<u64> = experts.iter().map(|e| addr(&e.data, s)).collect();
        // SAFETY: `grad` and the staged tensors hold the whole table, `rows` its in-range ids,
        // `partials` one row of K per listed row (both freed in stream order after the kernels),
        // `out` the caller's K live f64.
        unsafe {
            gpu.kernels.lambda_grad_rows(
                s,
                self.buf_ptr(grad),
                &ptrs,
                (addr(&base.data, s), dtype),
                (addr(&rows_dev, s), rows.len()),
                row_len,
                addr(&partials, s),
                out,
            )?
        };
        Ok(())
    }

    /// The Lambda-gradient ops' checks (shapes, the gradient's length, one stored dtype for the
    /// kernel); returns that dtype.
    fn check_lambda_grad(
        &self,
        op: &'static str,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
    ) -> Result<FloatDType> {
        let hosts: Vec<&StoredTensor> = experts.iter().map(|e| &e.host).collect();
        check_stored(op, &base.host, &hosts, None)?;
        let n = base.host.numel();
        if self.buf_len(grad) != n {
            let reason = format!("the gradient has {} elements but `{}` has {n}", self.buf_len(grad), base.host.name);
            return Err(Error::Shape { op, reason });
        }
        let dtype = base.host.dtype;
        if let Some(h) = hosts.iter().find(|h| h.dtype != dtype) {
            return Err(Error::Invalid(format!(
                "lambda_grad on the GPU reads one dtype: `{}` is {} in {} but {dtype} in the base; convert the \
                 experts to the base's dtype or use --device cpu",
                h.name,
                h.dtype,
                h.file.display()
            )));
        }
        Ok(dtype)
    }
}
