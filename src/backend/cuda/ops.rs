//! The CUDA implementation of [`Backend`]: f32 buffers on one device stream, matrix products
//! through cuBLAS in plain FP32 (pedantic math mode: never TF32, so results match the CPU to
//! rounding), attention as cuBLAS strided-batched products around a masked-softmax kernel, and
//! every other op a kernel of `kernels/ops.cu`.
//!
//! Work is queued on the stream and only [`Backend::download`] waits for it. Every result is
//! deterministic (no float atomics anywhere; cuBLAS on one stream gives the same bits each run),
//! so a training run on the GPU repeats exactly, as it does on the CPU. Shape errors use the CPU
//! backend's checks and words.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{DeviceSpec, Gpu, Resolved, cu, resolve};
use super::kernels::addr;
use super::nvrtc;
use crate::backend::cpu::{check_attn, err, expect_len};
use crate::backend::{AttnGrads, AttnShape, Backend, Gelu, LinearGrads, NormGrads};
use crate::error::{Error, Result};

/// Threads of the 1-D launches (`OPS_THREADS` in the kernels: the row reductions assume it).
const THREADS: u32 = 256;
/// Column-sum CTAs (`COL_X` x `COL_Y` in the kernels).
const COL_X: u32 = 32;
const COL_Y: u32 = 16;
/// Elements per CTA of the L1 partial sums (`L1_TILE`).
const L1_TILE: usize = 4096;
/// Most CTAs of a grid-stride launch.
const MAX_BLOCKS: usize = 1 << 16;

macro_rules! kernel_table {
    ($($name:ident),* $(,)?) => {
        /// The functions of `kernels/ops.cu`, looked up once.
        struct Fns {
            $($name: CudaFunction,)*
        }

        impl Fns {
            fn load(gpu: &Gpu) -> Result<Self> {
                Ok(Fns { $($name: gpu.kernels.function(&nvrtc::OPS, stringify!($name))?,)* })
            }
        }
    };
}

kernel_table!(
    fill_rows,
    add_f32,
    scale_f32,
    gelu_fwd,
    gelu_bwd,
    tanh_fwd,
    tanh_bwd,
    softmax_rows,
    softmax_bwd_rows,
    attn_softmax,
    layernorm_fwd,
    layernorm_bwd_dx,
    layernorm_bwd_params,
    col_sum,
    gather_rows,
    scatter_rows,
    soft_ce_loss,
    soft_ce_grad,
    entropy_loss,
    entropy_grad,
    l1_partial,
    l1_finish,
    l1_grad,
);

/// Launches kernel `$f` of `$be` with `$cfg`; the arguments are local variables (the launch
/// keeps pointers to them until it is submitted).
macro_rules! launch {
    ($be:expr, $f:ident, $cfg:expr; $($arg:ident),* $(,)?) => {{
        let inner = &*$be.inner;
        let mut b = inner.gpu.stream.launch_builder(&inner.fns.$f);
        $(b.arg(&$arg);)*
        // SAFETY: the arguments match the kernel's parameters in type and order (see
        // kernels/ops.cu), and every address is a live allocation of the size the caller checked.
        cu(concat!("launching ", stringify!($f)), unsafe { b.launch($cfg) }).map(|_| ())
    }};
}

struct Inner {
    blas: CudaBlas,
    fns: Fns,
    gpu: Gpu,
}

/// The CUDA backend: one device, one stream, one cuBLAS handle. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

/// An f32 buffer on the device. Allocations hold at least one element (the driver refuses
/// empty ones); `len` is the logical length.
pub struct CudaBuf {
    data: CudaSlice<f32>,
    len: usize,
}

/// A u32 index buffer on the device, with its host copy: ids are range-checked on the host
/// (the CPU's errors) and the embedding backward groups positions by id there.
pub struct CudaIds {
    data: CudaSlice<u32>,
    host: Vec<u32>,
}

/// A row-major matrix operand of a (batched) product: device address, row stride in elements,
/// whether it is stored transposed, and the distance between consecutive batch entries.
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    ld: usize,
    t: bool,
    stride: usize,
}

impl Mat {
    fn new(ptr: u64, ld: usize) -> Self {
        Mat { ptr, ld, t: false, stride: 0 }
    }

    /// The same storage read transposed.
    fn t(self) -> Self {
        Mat { t: true, ..self }
    }

    /// The operand `elems` f32 further on.
    fn at(self, elems: usize) -> Self {
        Mat { ptr: self.ptr + (elems * 4) as u64, ..self }
    }

    fn batch_stride(self, stride: usize) -> Self {
        Mat { stride, ..self }
    }
}

fn elems_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One CTA per row.
fn rows_cfg(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(rows)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| err(op, format!("{rows} rows exceed one CUDA grid")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

fn cols_cfg(cols: usize) -> LaunchConfig {
    let blocks = cols.div_ceil(COL_X as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (COL_X, COL_Y, 1), shared_mem_bytes: 0 }
}

fn single_cta() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A dimension the kernels take as u32.
fn u32_dim(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| err(op, format!("{what} = {v} does not fit the kernels' 32-bit index")))
}

/// A dimension cuBLAS takes as a C int.
fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::cuda("cuBLAS", format!("dimension {v} exceeds a 32-bit int")))
}

/// Positions of `ids` grouped by id: `order` lists positions sorted by id (stable, so each id's
/// positions stay increasing), id `uniq[u]` owns `order[starts[u]..starts[u + 1]]`.
fn group_by_id(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&p| ids[p as usize]);
    let mut uniq = Vec::new();
    let mut starts = Vec::new();
    for (i, &p) in order.iter().enumerate() {
        let id = ids[p as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            starts.push(i as u32);
        }
    }
    starts.push(order.len() as u32);
    (order, starts, uniq)
}

impl Cuda {
    /// The backend on an opened device: loads the op kernels (compiling them on first use) and
    /// creates the cuBLAS handle on the device's stream.
    pub fn new(gpu: Gpu) -> Result<Self> {
        let fns = catch_unwind(AssertUnwindSafe(|| Fns::load(&gpu)))
            .map_err(|_| Error::cuda("loading kernels/ops.cu", "cudarc panicked (NVRTC library incomplete?)"))??;
        // SAFETY: only tries to dlopen the library by its candidate names.
        if !unsafe { blas::is_culib_present() } {
            return Err(Error::cuda(
                "loading cuBLAS",
                "libcublas.so.13 not found on the loader path (add the CUDA 13 toolkit's lib64, or the lib \
                 directory of the nvidia-cublas wheel, to LD_LIBRARY_PATH)",
            ));
        }
        let blas = catch_unwind(AssertUnwindSafe(|| CudaBlas::new(gpu.stream.clone())))
            .map_err(|_| Error::cuda("creating the cuBLAS handle", "the cuBLAS library lacks a needed symbol"))?
            .map_err(|e| Error::cuda("creating the cuBLAS handle", format!("{e:?}")))?;
        // Pedantic: FP32 products computed in FP32 (never TF32, even under NVIDIA_TF32_OVERRIDE).
        // SAFETY: the handle is live.
        unsafe { blas::cublasSetMathMode(*blas.handle(), blas::cublasMath_t::CUBLAS_PEDANTIC_MATH) }
            .result()
            .map_err(|e| Error::cuda("setting the cuBLAS math mode", format!("{e:?}")))?;
        tracing::debug!("CUDA backend on {} ({})", gpu.info.name, gpu.info.arch);
        Ok(Cuda { inner: Arc::new(Inner { blas, fns, gpu }) })
    }

    /// Opens device `ordinal` (a clear error, ending in "use --device cpu", when there is none).
    pub fn open(ordinal: usize) -> Result<Self> {
        match resolve(DeviceSpec::Cuda(ordinal))? {
            Resolved::Cuda(gpu) => Cuda::new(*gpu),
            Resolved::Cpu { reason } => {
                Err(Error::cuda("device", reason.unwrap_or_else(|| "not a CUDA device".into())))
            }
        }
    }

    /// The device this backend runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    fn ptr(&self, b: &CudaBuf) -> u64 {
        addr(&b.data, &self.inner.gpu.stream)
    }

    fn ids_ptr(&self, b: &CudaIds) -> u64 {
        addr(&b.data, &self.inner.gpu.stream)
    }

    /// An uninitialised buffer: for outputs every element of which the op writes.
    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        // SAFETY: the caller writes every element before anything reads it.
        let data = unsafe { self.inner.gpu.stream.alloc::<f32>(len.max(1)) };
        let data = cu(&format!("allocating {:.1} MB", (len * 4) as f64 / 1e6), data)?;
        Ok(CudaBuf { data, len })
    }

    fn alloc_zeros(&self, len: usize) -> Result<CudaBuf> {
        let data = self.inner.gpu.stream.alloc_zeros::<f32>(len.max(1));
        let data = cu(&format!("allocating {:.1} MB", (len * 4) as f64 / 1e6), data)?;
        Ok(CudaBuf { data, len })
    }

    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        let s = &self.inner.gpu.stream;
        if v.is_empty() {
            // SAFETY: never read: its logical length is zero.
            return cu("allocating", unsafe { s.alloc::<u32>(1) });
        }
        cu("copying to the device", s.clone_htod(v))
    }

    /// Row-major `c = alpha op(a) op(b) + beta c` (`op(a)` `[m, k]`, `op(b)` `[k, n]`) for `batch`
    /// entries, each operand advancing by its own stride; through column-major cuBLAS as
    /// `c^T = op(b)^T op(a)^T`, which reads each row-major operand as its transpose for free.
    /// `beta = 0` never reads `c`. Needs `m, n, k > 0`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        c: Mat,
        batch: usize,
    ) -> Result<()> {
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let (mi, ni, ki) = (int(m)?, int(n)?, int(k)?);
        let (lda, ldb, ldc) = (int(a.ld.max(1))?, int(b.ld.max(1))?, int(c.ld.max(1))?);
        let inner = &*self.inner;
        cu("binding the context", inner.gpu.ctx.bind_to_thread())?;
        let handle = *inner.blas.handle();
        let r = if batch == 1 {
            // SAFETY: the callers check every operand's extent against its buffer; alpha and beta
            // are host scalars (the handle's default pointer mode).
            unsafe {
                cudarc::cublas::result::sgemm(
                    handle,
                    op(b.t),
                    op(a.t),
                    ni,
                    mi,
                    ki,
                    &alpha,
                    b.ptr as *const f32,
                    ldb,
                    a.ptr as *const f32,
                    lda,
                    &beta,
                    c.ptr as *mut f32,
                    ldc,
                )
            }
        } else {
            // SAFETY: as above, for every batch entry; the outputs of the entries are disjoint.
            unsafe {
                cudarc::cublas::result::sgemm_strided_batched(
                    handle,
                    op(b.t),
                    op(a.t),
                    ni,
                    mi,
                    ki,
                    &alpha,
                    b.ptr as *const f32,
                    ldb,
                    b.stride as i64,
                    a.ptr as *const f32,
                    lda,
                    a.stride as i64,
                    &beta,
                    c.ptr as *mut f32,
                    ldc,
                    c.stride as i64,
                    int(batch)?,
                )
            }
        };
        r.map_err(|e| Error::cuda(format!("cuBLAS sgemm {m}x{n}x{k} (batch {batch})"), format!("{e:?}")))
    }

    /// Scores `scale q k^T`, masked and softmaxed: `[batch * heads * seq_q, seq_k]`, row
    /// `(b * heads + h) * seq_q + i`. Needs `seq_q, seq_k > 0`.
    fn attn_probs(&self, q: &CudaBuf, k: &CudaBuf, key_mask: Option<&CudaBuf>, s: &AttnShape) -> Result<CudaBuf> {
        let (sq, sk, hd, group) = (s.seq_q, s.seq_k, s.head_dim, s.heads / s.kv_heads);
        let (qs, ks) = (s.heads * hd, s.kv_heads * hd);
        let p = self.alloc(s.batch * s.heads * sq * sk)?;
        let (qm, km, pm) = (Mat::new(self.ptr(q), qs), Mat::new(self.ptr(k), ks), Mat::new(self.ptr(&p), sk));
        // Query head h = g * group + hh reads kv head g: one call per (sequence, hh), batched over g.
        for b in 0..s.batch {
            for hh in 0..group {
                self.gemm_raw(
                    sq,
                    sk,
                    hd,
                    s.scale(),
                    qm.at(b * sq * qs + hh * hd).batch_stride(group * hd),
                    km.at(b * sk * ks).t().batch_stride(hd),
                    0.0,
                    pm.at((b * s.heads + hh) * sq * sk).batch_stride(group * sq * sk),
                    s.kv_heads,
                )?;
            }
        }
        let op = "attention";
        let rows = s.batch * s.heads * sq;
        let (pp, mask) = (self.ptr(&p), key_mask.map_or(0, |m| self.ptr(m)));
        let (sq32, sk32, heads) =
            (u32_dim(op, "seq_q", sq)?, u32_dim(op, "seq_k", sk)?, u32_dim(op, "heads", s.heads)?);
        let causal = u32::from(s.causal);
        let shift = u32_dim(op, "seq_k - seq_q", sk - sq.min(sk))?;
        launch!(self, attn_softmax, rows_cfg(op, rows)?; pp, mask, sq32, sk32, heads, causal, shift)?;
        Ok(p)
    }

    fn elementwise_ok(&self, op: &'static str, a: &CudaBuf, b: &CudaBuf, what: &str) -> Result<()> {
        expect_len(op, what, b.len, a.len)
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        if data.is_empty() {
            return self.alloc(0);
        }
        let data_dev = cu("copying to the device", self.inner.gpu.stream.clone_htod(data))?;
        Ok(CudaBuf { data: data_dev, len: data.len() })
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaIds> {
        Ok(CudaIds { data: self.upload_u32(ids)?, host: ids.to_vec() })
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        let s = &self.inner.gpu.stream;
        let v = cu("copying from the device", s.clone_dtoh(&buf.data.slice(..buf.len)))?;
        cu("synchronising", s.synchronize())?;
        Ok(v)
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_zeros(len)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.host.len()
    }

    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &CudaBuf,
        b: &CudaBuf,
        beta: f32,
        c: &mut CudaBuf,
    ) -> Result<()> {
        expect_len("gemm", "a", a.len, m * k)?;
        expect_len("gemm", "b", b.len, k * n)?;
        expect_len("gemm", "c", c.len, m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            let (cp, len) = (self.ptr(c), (m * n) as u64);
            return launch!(self, scale_f32, elems_cfg(m * n); cp, len, beta);
        }
        let am = Mat { ptr: self.ptr(a), ld: if ta { m } else { k }, t: ta, stride: 0 };
        let bm = Mat { ptr: self.ptr(b), ld: if tb { k } else { n }, t: tb, stride: 0 };
        self.gemm_raw(m, n, k, alpha, am, bm, beta, Mat::new(self.ptr(c), n), 1)
    }

    fn linear(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<CudaBuf> {
        expect_len("linear", "x", x.len, rows * inp)?;
        expect_len("linear", "weight", w.len, out * inp)?;
        let n = rows * out;
        let (y, beta) = match bias {
            Some(b) => {
                expect_len("linear", "bias", b.len, out)?;
                let y = self.alloc(n)?;
                if n > 0 {
                    let (bp, yp, rows64, out32) =
                        (self.ptr(b), self.ptr(&y), rows as u64, u32_dim("linear", "out", out)?);
                    launch!(self, fill_rows, elems_cfg(n); bp, rows64, out32, yp)?;
                }
                (y, 1.0)
            }
            None if inp == 0 => (self.alloc_zeros(n)?, 0.0),
            None => (self.alloc(n)?, 0.0),
        };
        if n > 0 && inp > 0 {
            let (xm, wm) = (Mat::new(self.ptr(x), inp), Mat::new(self.ptr(w), inp).t());
            self.gemm_raw(rows, out, inp, 1.0, xm, wm, beta, Mat::new(self.ptr(&y), out), 1)?;
        }
        Ok(y)
    }

    fn linear_backward(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        dy: &CudaBuf,
        rows: usize,
        inp: usize,
        out: usize,
        need_dx: bool,
        has_bias: bool,
    ) -> Result<LinearGrads<CudaBuf>> {
        let op = "linear_backward";
        expect_len(op, "x", x.len, rows * inp)?;
        expect_len(op, "weight", w.len, out * inp)?;
        expect_len(op, "dy", dy.len, rows * out)?;
        let dym = Mat::new(self.ptr(dy), out);
        let dx = if need_dx {
            // dx [rows, inp] = dy [rows, out] @ w [out, inp]
            if rows * inp > 0 && out > 0 {
                let dx = self.alloc(rows * inp)?;
                let wm = Mat::new(self.ptr(w), inp);
                self.gemm_raw(rows, inp, out, 1.0, dym, wm, 0.0, Mat::new(self.ptr(&dx), inp), 1)?;
                Some(dx)
            } else {
                Some(self.alloc_zeros(rows * inp)?)
            }
        } else {
            None
        };
        // dw [out, inp] = dy^T [out, rows] @ x [rows, inp]
        let dw = if out * inp > 0 && rows > 0 {
            let dw = self.alloc(out * inp)?;
            let xm = Mat::new(self.ptr(x), inp);
            self.gemm_raw(out, inp, rows, 1.0, dym.t(), xm, 0.0, Mat::new(self.ptr(&dw), inp), 1)?;
            dw
        } else {
            self.alloc_zeros(out * inp)?
        };
        let db = if has_bias {
            let db = self.alloc(out)?;
            if out > 0 {
                let (dyp, dbp, rows64, out32) = (self.ptr(dy), self.ptr(&db), rows as u64, u32_dim(op, "out", out)?);
                launch!(self, col_sum, cols_cfg(out); dyp, rows64, out32, dbp)?;
            }
            Some(db)
        } else {
            None
        };
        Ok(LinearGrads { dx, dw, db })
    }

    fn add(&self, a: &CudaBuf, b: &CudaBuf) -> Result<CudaBuf> {
        self.elementwise_ok("add", a, b, "b")?;
        let y = self.alloc(a.len)?;
        if a.len > 0 {
            let (ap, bp, n, yp) = (self.ptr(a), self.ptr(b), a.len as u64, self.ptr(&y));
            launch!(self, add_f32, elems_cfg(a.len); ap, bp, n, yp)?;
        }
        Ok(y)
    }

    fn add_assign(&self, a: &mut CudaBuf, b: &CudaBuf) -> Result<()> {
        self.elementwise_ok("add_assign", a, b, "b")?;
        if a.len > 0 {
            let (ap, bp, n) = (self.ptr(a), self.ptr(b), a.len as u64);
            launch!(self, add_f32, elems_cfg(a.len); ap, bp, n, ap)?;
        }
        Ok(())
    }

    fn layernorm(
        &self,
        x: &CudaBuf,
        gamma: &CudaBuf,
        beta: &CudaBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<CudaBuf> {
        let op = "layernorm";
        expect_len(op, "x", x.len, rows * dim)?;
        expect_len(op, "gamma", gamma.len, dim)?;
        expect_len(op, "beta", beta.len, dim)?;
        let y = self.alloc(rows * dim)?;
        if rows * dim > 0 {
            let (xp, gp, bp, yp, dim32) =
                (self.ptr(x), self.ptr(gamma), self.ptr(beta), self.ptr(&y), u32_dim(op, "dim", dim)?);
            launch!(self, layernorm_fwd, rows_cfg(op, rows)?; xp, gp, bp, dim32, eps, yp)?;
        }
        Ok(y)
    }

    fn layernorm_backward(
        &self,
        x: &CudaBuf,
        gamma: &CudaBuf,
        dy: &CudaBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<NormGrads<CudaBuf>> {
        let op = "layernorm_backward";
        expect_len(op, "x", x.len, rows * dim)?;
        expect_len(op, "gamma", gamma.len, dim)?;
        expect_len(op, "dy", dy.len, rows * dim)?;
        if rows == 0 || dim == 0 {
            return Ok(NormGrads { dx: self.alloc(0)?, dgamma: self.alloc_zeros(dim)?, dbeta: self.alloc_zeros(dim)? });
        }
        let dx = self.alloc(rows * dim)?;
        let stats = self.alloc(2 * rows)?;
        let (dgamma, dbeta) = (self.alloc(dim)?, self.alloc(dim)?);
        let (xp, gp, dyp, dxp, sp, dim32) =
            (self.ptr(x), self.ptr(gamma), self.ptr(dy), self.ptr(&dx), self.ptr(&stats), u32_dim(op, "dim", dim)?);
        launch!(self, layernorm_bwd_dx, rows_cfg(op, rows)?; xp, gp, dyp, dim32, eps, dxp, sp)?;
        let (rows64, dgp, dbp) = (rows as u64, self.ptr(&dgamma), self.ptr(&dbeta));
        launch!(self, layernorm_bwd_params, cols_cfg(dim); xp, dyp, sp, rows64, dim32, dgp, dbp)?;
        Ok(NormGrads { dx, dgamma, dbeta })
    }

    fn gelu(&self, x: &CudaBuf, kind: Gelu) -> Result<CudaBuf> {
        let y = self.alloc(x.len)?;
        if x.len > 0 {
            let (xp, n, k, yp) = (self.ptr(x), x.len as u64, gelu_code(kind), self.ptr(&y));
            launch!(self, gelu_fwd, elems_cfg(x.len); xp, n, k, yp)?;
        }
        Ok(y)
    }

    fn gelu_backward(&self, x: &CudaBuf, dy: &CudaBuf, kind: Gelu) -> Result<CudaBuf> {
        self.elementwise_ok("gelu_backward", x, dy, "dy")?;
        let dx = self.alloc(x.len)?;
        if x.len > 0 {
            let (xp, dyp, n, k, dxp) = (self.ptr(x), self.ptr(dy), x.len as u64, gelu_code(kind), self.ptr(&dx));
            launch!(self, gelu_bwd, elems_cfg(x.len); xp, dyp, n, k, dxp)?;
        }
        Ok(dx)
    }

    fn tanh(&self, x: &CudaBuf) -> Result<CudaBuf> {
        let y = self.alloc(x.len)?;
        if x.len > 0 {
            let (xp, n, yp) = (self.ptr(x), x.len as u64, self.ptr(&y));
            launch!(self, tanh_fwd, elems_cfg(x.len); xp, n, yp)?;
        }
        Ok(y)
    }

    fn tanh_backward(&self, x: &CudaBuf, dy: &CudaBuf) -> Result<CudaBuf> {
        self.elementwise_ok("tanh_backward", x, dy, "dy")?;
        let dx = self.alloc(x.len)?;
        if x.len > 0 {
            let (xp, dyp, n, dxp) = (self.ptr(x), self.ptr(dy), x.len as u64, self.ptr(&dx));
            launch!(self, tanh_bwd, elems_cfg(x.len); xp, dyp, n, dxp)?;
        }
        Ok(dx)
    }

    fn softmax(&self, x: &CudaBuf, mask: Option<&CudaBuf>, rows: usize, cols: usize, group: usize) -> Result<CudaBuf> {
        let op = "softmax";
        expect_len(op, "x", x.len, rows * cols)?;
        if let Some(m) = mask {
            if group == 0 || !rows.is_multiple_of(group) {
                return Err(err(op, format!("{rows} rows cannot share mask rows in groups of {group}")));
            }
            expect_len(op, "mask", m.len, rows / group * cols)?;
        }
        let y = self.alloc(rows * cols)?;
        if rows * cols > 0 {
            let (xp, mp, yp) = (self.ptr(x), mask.map_or(0, |m| self.ptr(m)), self.ptr(&y));
            let (cols32, group32) = (u32_dim(op, "cols", cols)?, u32_dim(op, "group", group.max(1))?);
            launch!(self, softmax_rows, rows_cfg(op, rows)?; xp, mp, cols32, group32, yp)?;
        }
        Ok(y)
    }

    fn softmax_backward(&self, y: &CudaBuf, dy: &CudaBuf, rows: usize, cols: usize) -> Result<CudaBuf> {
        let op = "softmax_backward";
        expect_len(op, "y", y.len, rows * cols)?;
        expect_len(op, "dy", dy.len, rows * cols)?;
        let dx = self.alloc(rows * cols)?;
        if rows * cols > 0 {
            let (yp, dyp, dxp, cols32) = (self.ptr(y), self.ptr(dy), self.ptr(&dx), u32_dim(op, "cols", cols)?);
            launch!(self, softmax_bwd_rows, rows_cfg(op, rows)?; yp, dyp, cols32, dxp)?;
        }
        Ok(dx)
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        s: AttnShape,
    ) -> Result<CudaBuf> {
        check_attn("attention", q.len, k.len, v.len, key_mask.map(|m| m.len), &s)?;
        if s.q_len() == 0 || s.seq_k == 0 {
            return self.alloc_zeros(s.q_len());
        }
        let (sq, sk, hd, group) = (s.seq_q, s.seq_k, s.head_dim, s.heads / s.kv_heads);
        let (qs, ks) = (s.heads * hd, s.kv_heads * hd);
        let p = self.attn_probs(q, k, key_mask, &s)?;
        let out = self.alloc(s.q_len())?;
        let (pm, vm, om) = (Mat::new(self.ptr(&p), sk), Mat::new(self.ptr(v), ks), Mat::new(self.ptr(&out), qs));
        for b in 0..s.batch {
            for hh in 0..group {
                // out_bh [seq_q, hd] = p_bh [seq_q, seq_k] @ v_bg [seq_k, hd], written in place.
                self.gemm_raw(
                    sq,
                    hd,
                    sk,
                    1.0,
                    pm.at((b * s.heads + hh) * sq * sk).batch_stride(group * sq * sk),
                    vm.at(b * sk * ks).batch_stride(hd),
                    0.0,
                    om.at(b * sq * qs + hh * hd).batch_stride(group * hd),
                    s.kv_heads,
                )?;
            }
        }
        Ok(out)
    }

    fn attention_backward(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        dout: &CudaBuf,
        s: AttnShape,
    ) -> Result<AttnGrads<CudaBuf>> {
        let op = "attention_backward";
        check_attn(op, q.len, k.len, v.len, key_mask.map(|m| m.len), &s)?;
        expect_len(op, "dout", dout.len, s.q_len())?;
        if s.q_len() == 0 || s.seq_k == 0 {
            let (dq, dk, dv) =
                (self.alloc_zeros(s.q_len())?, self.alloc_zeros(s.kv_len())?, self.alloc_zeros(s.kv_len())?);
            return Ok(AttnGrads { dq, dk, dv });
        }
        let (sq, sk, hd, group) = (s.seq_q, s.seq_k, s.head_dim, s.heads / s.kv_heads);
        let (qs, ks) = (s.heads * hd, s.kv_heads * hd);
        let scale = s.scale();
        let p = self.attn_probs(q, k, key_mask, &s)?;
        let ds = self.alloc(p.len)?;
        let (dq, dk, dv) = (self.alloc(s.q_len())?, self.alloc(s.kv_len())?, self.alloc(s.kv_len())?);
        let pm = Mat::new(self.ptr(&p), sk);
        let dsm = Mat::new(self.ptr(&ds), sk);
        let (qm, dom, dqm) = (Mat::new(self.ptr(q), qs), Mat::new(self.ptr(dout), qs), Mat::new(self.ptr(&dq), qs));
        let (km, vm) = (Mat::new(self.ptr(k), ks), Mat::new(self.ptr(v), ks));
        let (dkm, dvm) = (Mat::new(self.ptr(&dk), ks), Mat::new(self.ptr(&dv), ks));
        // Operands of query heads g * group + hh (batched over g) in sequence b.
        let head = |m: Mat, b: usize, hh: usize| m.at(b * sq * qs + hh * hd).batch_stride(group * hd);
        let kv = |m: Mat, b: usize| m.at(b * sk * ks).batch_stride(hd);
        let probs = |m: Mat, b: usize, hh: usize| m.at((b * s.heads + hh) * sq * sk).batch_stride(group * sq * sk);
        for b in 0..s.batch {
            for hh in 0..group {
                // The query heads sharing a kv head add into its dk and dv, in order of hh.
                let acc = if hh == 0 { 0.0 } else { 1.0 };
                // dv_bg [seq_k, hd] += p_bh^T @ do_bh
                self.gemm_raw(sk, hd, sq, 1.0, probs(pm, b, hh).t(), head(dom, b, hh), acc, kv(dvm, b), s.kv_heads)?;
                // dp_bh [seq_q, seq_k] = do_bh @ v_bg^T
                self.gemm_raw(sq, sk, hd, 1.0, head(dom, b, hh), kv(vm, b).t(), 0.0, probs(dsm, b, hh), s.kv_heads)?;
            }
        }
        // ds = p * (dp - rowsum(dp * p)), in place.
        let (pp, dsp, sk32) = (self.ptr(&p), self.ptr(&ds), u32_dim(op, "seq_k", sk)?);
        launch!(self, softmax_bwd_rows, rows_cfg(op, s.batch * s.heads * sq)?; pp, dsp, sk32, dsp)?;
        for b in 0..s.batch {
            for hh in 0..group {
                let acc = if hh == 0 { 0.0 } else { 1.0 };
                // dq_bh = scale ds_bh @ k_bg ; dk_bg += scale ds_bh^T @ q_bh
                self.gemm_raw(sq, hd, sk, scale, probs(dsm, b, hh), kv(km, b), 0.0, head(dqm, b, hh), s.kv_heads)?;
                self.gemm_raw(sk, hd, sq, scale, probs(dsm, b, hh).t(), head(qm, b, hh), acc, kv(dkm, b), s.kv_heads)?;
            }
        }
        Ok(AttnGrads { dq, dk, dv })
    }

    fn embedding(&self, table: &CudaBuf, ids: &CudaIds, dim: usize) -> Result<CudaBuf> {
        let op = "embedding";
        if dim == 0 || !table.len.is_multiple_of(dim) {
            return Err(err(op, format!("table of {} elements is not a [rows, {dim}] matrix", table.len)));
        }
        let vocab = table.len / dim;
        if let Some((pos, &id)) = ids.host.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(err(op, format!("id {id} at position {pos} is outside the table ({vocab} rows)")));
        }
        let n = ids.host.len();
        let out = self.alloc(n * dim)?;
        if n > 0 {
            let (tp, ip, n64, dim32, op_) =
                (self.ptr(table), self.ids_ptr(ids), n as u64, u32_dim(op, "dim", dim)?, self.ptr(&out));
            launch!(self, gather_rows, elems_cfg(n * dim); tp, ip, n64, dim32, op_)?;
        }
        Ok(out)
    }

    fn embedding_backward(&self, ids: &CudaIds, dy: &CudaBuf, vocab: usize, dim: usize) -> Result<CudaBuf> {
        let op = "embedding_backward";
        let n = ids.host.len();
        expect_len(op, "dy", dy.len, n * dim)?;
        if let Some((pos, &id)) = ids.host.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(err(op, format!("id {id} at position {pos} is outside the table ({vocab} rows)")));
        }
        let table = self.alloc_zeros(vocab * dim)?;
        if n == 0 || dim == 0 {
            return Ok(table);
        }
        u32_dim(op, "ids", n)?;
        let (order, starts, uniq) = group_by_id(&ids.host);
        let (order_d, starts_d, uniq_d) =
            (self.upload_u32(&order)?, self.upload_u32(&starts)?, self.upload_u32(&uniq)?);
        let s = &self.inner.gpu.stream;
        let (dyp, orp, stp, unp) = (self.ptr(dy), addr(&order_d, s), addr(&starts_d, s), addr(&uniq_d, s));
        let (dim32, tp) = (u32_dim(op, "dim", dim)?, self.ptr(&table));
        launch!(self, scatter_rows, rows_cfg(op, uniq.len())?; dyp, orp, stp, unp, dim32, tp)?;
        // The index buffers are freed in stream order, after the kernel.
        drop((order_d, starts_d, uniq_d));
        Ok(table)
    }

    fn soft_ce(&self, logits: &CudaBuf, targets: &CudaBuf, rows: usize, cols: usize) -> Result<CudaBuf> {
        let op = "soft_ce";
        expect_len(op, "logits", logits.len, rows * cols)?;
        expect_len(op, "targets", targets.len, rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err(op, "needs at least one row and one class"));
        }
        let out = self.alloc(1)?;
        let (lp, tp, rows64, cols32, outp) =
            (self.ptr(logits), self.ptr(targets), rows as u64, u32_dim(op, "cols", cols)?, self.ptr(&out));
        launch!(self, soft_ce_loss, single_cta(); lp, tp, rows64, cols32, outp)?;
        Ok(out)
    }

    fn soft_ce_backward(
        &self,
        logits: &CudaBuf,
        targets: &CudaBuf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<CudaBuf> {
        let op = "soft_ce_backward";
        expect_len(op, "logits", logits.len, rows * cols)?;
        expect_len(op, "targets", targets.len, rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err(op, "needs at least one row and one class"));
        }
        let s = scale / rows as f32;
        let g = self.alloc(rows * cols)?;
        let (lp, tp, rows64, cols32, gp) =
            (self.ptr(logits), self.ptr(targets), rows as u64, u32_dim(op, "cols", cols)?, self.ptr(&g));
        launch!(self, soft_ce_grad, elems_cfg(rows); lp, tp, rows64, cols32, s, gp)?;
        Ok(g)
    }

    fn l1(&self, x: &CudaBuf, target: Option<&CudaBuf>) -> Result<CudaBuf> {
        let op = "l1";
        if x.len == 0 {
            return Err(err(op, "needs at least one element"));
        }
        if let Some(t) = target {
            expect_len(op, "target", t.len, x.len)?;
        }
        let tiles = x.len.div_ceil(L1_TILE);
        let s = &self.inner.gpu.stream;
        // SAFETY: l1_partial writes every one of the `tiles` partial sums.
        let partials = cu("allocating", unsafe { s.alloc::<f64>(tiles) })?;
        let out = self.alloc(1)?;
        let (xp, tp, n64, pp) = (self.ptr(x), target.map_or(0, |t| self.ptr(t)), x.len as u64, addr(&partials, s));
        let tiles32 = u32_dim(op, "tiles", tiles)?;
        let cfg = LaunchConfig { grid_dim: (tiles32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, l1_partial, cfg; xp, tp, n64, pp)?;
        let outp = self.ptr(&out);
        launch!(self, l1_finish, single_cta(); pp, tiles32, n64, outp)?;
        drop(partials);
        Ok(out)
    }

    fn l1_backward(&self, x: &CudaBuf, target: Option<&CudaBuf>, scale: f32) -> Result<CudaBuf> {
        let op = "l1_backward";
        if x.len == 0 {
            return Err(err(op, "needs at least one element"));
        }
        if let Some(t) = target {
            expect_len(op, "target", t.len, x.len)?;
        }
        let s = scale / x.len as f32;
        let g = self.alloc(x.len)?;
        let (xp, tp, n64, gp) = (self.ptr(x), target.map_or(0, |t| self.ptr(t)), x.len as u64, self.ptr(&g));
        launch!(self, l1_grad, elems_cfg(x.len); xp, tp, n64, s, gp)?;
        Ok(g)
    }

    fn entropy(&self, logits: &CudaBuf, rows: usize, cols: usize) -> Result<CudaBuf> {
        let op = "entropy";
        expect_len(op, "logits", logits.len, rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err(op, "needs at least one row and one class"));
        }
        let out = self.alloc(1)?;
        let (lp, rows64, cols32, outp) = (self.ptr(logits), rows as u64, u32_dim(op, "cols", cols)?, self.ptr(&out));
        launch!(self, entropy_loss, single_cta(); lp, rows64, cols32, outp)?;
        Ok(out)
    }

    fn entropy_backward(&self, logits: &CudaBuf, rows: usize, cols: usize, scale: f32) -> Result<CudaBuf> {
        let op = "entropy_backward";
        expect_len(op, "logits", logits.len, rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err(op, "needs at least one row and one class"));
        }
        let s = scale / rows as f32;
        let g = self.alloc(rows * cols)?;
        let (lp, rows64, cols32, gp) = (self.ptr(logits), rows as u64, u32_dim(op, "cols", cols)?, self.ptr(&g));
        launch!(self, entropy_grad, elems_cfg(rows); lp, rows64, cols32, s, gp)?;
        Ok(g)
    }
}

fn gelu_code(kind: Gelu) -> u32 {
    match kind {
        Gelu::Erf => 0,
        Gelu::Tanh => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_group_in_position_order() {
        let (order, starts, uniq) = group_by_id(&[2, 0, 2, 5, 2, 0]);
        assert_eq!(uniq, [0, 2, 5]);
        assert_eq!(starts, [0, 2, 5, 6]);
        assert_eq!(order, [1, 5, 0, 2, 4, 3], "each id's positions stay increasing");
        let (order, starts, uniq) = group_by_id(&[]);
        assert!(order.is_empty() && uniq.is_empty());
        assert_eq!(starts, [0]);
    }

    #[test]
    fn operands_advance_in_bytes() {
        let m = Mat::new(1000, 7).at(3).t().batch_stride(5);
        assert_eq!((m.ptr, m.ld, m.t, m.stride), (1012, 7, true, 5));
    }
}
