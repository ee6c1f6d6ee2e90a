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

use super::device::{Gpu, Resolved, cu, resolve};
use super::kernels::addr;
use super::nvrtc;
use super::stored::CudaStored;
use crate::backend::Device;
use crate::backend::cpu::{check_attn, check_topk, err, expect_len, rope_inv_freq};
use crate::backend::{
    AdamStep, AttnGrads, AttnShape, Backend, Gelu, LinearGrads, NormGrads, StoredGrad, StoredMerge, all_reduce_via_host,
};
use crate::checkpoint::StoredTensor;
use crate::dist::collective::Collective;
use crate::error::{Error, Result};

/// Threads of the 1-D launches (`OPS_THREADS` in the kernels: the row reductions assume it).
const THREADS: u32 = 256;
/// Column-sum CTAs (`COL_X` x `COL_Y` in the kernels).
const COL_X: u32 = 32;
const COL_Y: u32 = 16;
/// Elements per CTA of the L1 partial sums (`L1_TILE`).
const L1_TILE: usize = 4096;
/// Elements per CTA of the sums of squares (`SUMSQ_TILE`).
const SUMSQ_TILE: usize = 65536;
/// Most CTAs of a grid-stride launch.
const MAX_BLOCKS: usize = 1 << 16;
/// Bytes of the top-k kernels' column bitmap: with their 3 KB of static shared memory, within
/// the 48 KB a CTA gets without opting in (vocabularies up to 360K tokens).
const TOPK_BITMAP_MAX: usize = 45 * 1024;

macro_rules! kernel_table {
    ($($name:ident),* $(,)?) => {
        /// The names of the functions of `kernels/ops.cu` this backend launches (the compile
        /// test checks that each is exported).
        pub const OPS_ENTRIES: &[&str] = &[$(stringify!($name)),*];

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
    adam_step,
    sumsq_partial,
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
    rmsnorm_fwd,
    rmsnorm_bwd_dx,
    rmsnorm_bwd_params,
    rope_rotate,
    swiglu_fwd,
    swiglu_bwd,
    topk_ce_rows,
    topk_ce_grad,
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
    /// Pinned buffers that stage checkpoint bytes to the device, made at the first use.
    staging: std::sync::Mutex<Option<super::stored::StageRing>>,
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
#[derive(Debug, Clone, Copy)]
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

/// One column-major cuBLAS sgemm, `c = alpha op(a) op(b) + beta c` with `op(a)` `[m, k]`
/// (strided-batched when `batch > 1`); `beta = 0` never reads `c`. The products are planned as
/// lists of these (pure functions of shapes and addresses), so the unit tests can replay a plan
/// on the host and compare it with the CPU backend.
#[derive(Debug, Clone, Copy)]
struct BlasCall {
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: Mat,
    batch: usize,
}

impl BlasCall {
    /// Row-major `c = alpha op(a) op(b) + beta c` (`op(a)` `[m, k]`, `op(b)` `[k, n]`), each
    /// operand advancing by its own stride over `batch` entries: column-major cuBLAS computes
    /// `c^T = op(b)^T op(a)^T`, reading each row-major operand as its transpose for free.
    #[allow(clippy::too_many_arguments)]
    fn row_major(m: usize, n: usize, k: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: Mat, batch: usize) -> Self {
        BlasCall { m: n, n: m, k, alpha, a: b, b: a, beta, c, batch }
    }
}

/// [`Backend::gemm`] on dense row-major buffers (`ta`/`tb`: stored transposed).
#[allow(clippy::too_many_arguments)]
fn dense_plan(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
) -> BlasCall {
    let am = Mat { ptr: a, ld: if ta { m } else { k }, t: ta, stride: 0 };
    let bm = Mat { ptr: b, ld: if tb { k } else { n }, t: tb, stride: 0 };
    BlasCall::row_major(m, n, k, alpha, am, bm, beta, Mat::new(c, n), 1)
}

/// Where one attention call's operands live (device addresses; unused ones 0).
#[derive(Debug, Clone, Copy, Default)]
struct AttnPtrs {
    q: u64,
    k: u64,
    v: u64,
    /// Probabilities `[batch * heads * seq_q, seq_k]`, row `(b * heads + h) * seq_q + i`.
    p: u64,
    /// Their gradient, same layout.
    ds: u64,
    dout: u64,
    /// The output (forward) or dq (backward), laid out like q.
    out: u64,
    dk: u64,
    dv: u64,
}

/// Operand builders of one attention call: query head `h = g * group + hh` reads kv head `g`, so
/// each product is one cuBLAS call per (sequence `b`, `hh`), batched over the kv heads `g`.
struct AttnPlan {
    s: AttnShape,
    group: usize,
    qs: usize,
    ks: usize,
}

impl AttnPlan {
    fn new(s: &AttnShape) -> Self {
        AttnPlan { s: *s, group: s.heads / s.kv_heads, qs: s.heads * s.head_dim, ks: s.kv_heads * s.head_dim }
    }

    /// `[seq_q, head_dim]` of query heads `g * group + hh` of sequence `b` in a q-shaped buffer.
    fn head(&self, ptr: u64, b: usize, hh: usize) -> Mat {
        let s = &self.s;
        Mat::new(ptr, self.qs).at(b * s.seq_q * self.qs + hh * s.head_dim).batch_stride(self.group * s.head_dim)
    }

    /// `[seq_k, head_dim]` of kv heads `g` of sequence `b` in a k-shaped buffer.
    fn kv(&self, ptr: u64, b: usize) -> Mat {
        let s = &self.s;
        Mat::new(ptr, self.ks).at(b * s.seq_k * self.ks).batch_stride(s.head_dim)
    }

    /// `[seq_q, seq_k]` probabilities of query heads `g * group + hh` of sequence `b`.
    fn probs(&self, ptr: u64, b: usize, hh: usize) -> Mat {
        let s = &self.s;
        let tile = s.seq_q * s.seq_k;
        Mat::new(ptr, s.seq_k).at((b * s.heads + hh) * tile).batch_stride(self.group * tile)
    }

    fn each(&self, mut f: impl FnMut(usize, usize, f32) -> [Option<BlasCall>; 2]) -> Vec<BlasCall> {
        let mut calls = Vec::new();
        for b in 0..self.s.batch {
            for hh in 0..self.group {
                // The query heads sharing a kv head add into its dk and dv, in order of hh.
                let acc = if hh == 0 { 0.0 } else { 1.0 };
                calls.extend(f(b, hh, acc).into_iter().flatten());
            }
        }
        calls
    }

    /// `p = scale q k^T` (before the masked softmax).
    fn scores(&self, x: &AttnPtrs) -> Vec<BlasCall> {
        let s = self.s;
        self.each(|b, hh, _| {
            let call = BlasCall::row_major(
                s.seq_q,
                s.seq_k,
                s.head_dim,
                s.scale(),
                self.head(x.q, b, hh),
                self.kv(x.k, b).t(),
                0.0,
                self.probs(x.p, b, hh),
                s.kv_heads,
            );
            [Some(call), None]
        })
    }

    /// `out = p v`.
    fn context(&self, x: &AttnPtrs) -> Vec<BlasCall> {
        let s = self.s;
        self.each(|b, hh, _| {
            let call = BlasCall::row_major(
                s.seq_q,
                s.head_dim,
                s.seq_k,
                1.0,
                self.probs(x.p, b, hh),
                self.kv(x.v, b),
                0.0,
                self.head(x.out, b, hh),
                s.kv_heads,
            );
            [Some(call), None]
        })
    }

    /// `dv += p^T dout` and `ds = dout v^T` (the gradient of p, before the softmax backward).
    fn grad_values(&self, x: &AttnPtrs) -> Vec<BlasCall> {
        let s = self.s;
        let (sq, sk, hd) = (s.seq_q, s.seq_k, s.head_dim);
        self.each(|b, hh, acc| {
            let dv = BlasCall::row_major(
                sk,
                hd,
                sq,
                1.0,
                self.probs(x.p, b, hh).t(),
                self.head(x.dout, b, hh),
                acc,
                self.kv(x.dv, b),
                s.kv_heads,
            );
            let dp = BlasCall::row_major(
                sq,
                sk,
                hd,
                1.0,
                self.head(x.dout, b, hh),
                self.kv(x.v, b).t(),
                0.0,
                self.probs(x.ds, b, hh),
                s.kv_heads,
            );
            [Some(dv), Some(dp)]
        })
    }

    /// `dq = scale ds k` and `dk += scale ds^T q`.
    fn grad_qk(&self, x: &AttnPtrs) -> Vec<BlasCall> {
        let s = self.s;
        let (sq, sk, hd, scale) = (s.seq_q, s.seq_k, s.head_dim, s.scale());
        self.each(|b, hh, acc| {
            let dq = BlasCall::row_major(
                sq,
                hd,
                sk,
                scale,
                self.probs(x.ds, b, hh),
                self.kv(x.k, b),
                0.0,
                self.head(x.out, b, hh),
                s.kv_heads,
            );
            let dk = BlasCall::row_major(
                sk,
                hd,
                sq,
                scale,
                self.probs(x.ds, b, hh).t(),
                self.head(x.q, b, hh),
                acc,
                self.kv(x.dk, b),
                s.kv_heads,
            );
            [Some(dq), Some(dk)]
        })
    }
}

/// `y [rows, out] = x [rows, inp] @ w [out, inp]^T + beta y`.
fn linear_plan(rows: usize, inp: usize, out: usize, x: u64, w: u64, beta: f32, y: u64) -> BlasCall {
    BlasCall::row_major(rows, out, inp, 1.0, Mat::new(x, inp), Mat::new(w, inp).t(), beta, Mat::new(y, out), 1)
}

/// `dx [rows, inp] = dy [rows, out] @ w [out, inp]`.
fn linear_dx_plan(rows: usize, inp: usize, out: usize, dy: u64, w: u64, dx: u64) -> BlasCall {
    BlasCall::row_major(rows, inp, out, 1.0, Mat::new(dy, out), Mat::new(w, inp), 0.0, Mat::new(dx, inp), 1)
}

/// `dw [out, inp] = dy [rows, out]^T @ x [rows, inp]`.
fn linear_dw_plan(rows: usize, inp: usize, out: usize, dy: u64, x: u64, dw: u64) -> BlasCall {
    BlasCall::row_major(out, inp, rows, 1.0, Mat::new(dy, out).t(), Mat::new(x, inp), 0.0, Mat::new(dw, inp), 1)
}

fn elems_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One CTA per row.
fn rows_cfg(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(rows)
        .ok()
        .filter(|&b| b > 0 && b <= i32::MAX as u32)
        .ok_or_else(|| err(op, format!("{rows} rows: a grid needs 1 to 2^31 - 1 blocks")))?;
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
        Ok(Cuda { inner: Arc::new(Inner { blas, fns, gpu, staging: Default::default() }) })
    }

    /// Opens device `ordinal` (a clear error, ending in "use --device cpu", when there is none).
    pub fn open(ordinal: usize) -> Result<Self> {
        match resolve(Device::Cuda(Some(ordinal)))? {
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

    pub(super) fn staging(&self) -> &std::sync::Mutex<Option<super::stored::StageRing>> {
        &self.inner.staging
    }

    fn ptr(&self, b: &CudaBuf) -> u64 {
        addr(&b.data, &self.inner.gpu.stream)
    }

    /// A buffer's device address (for the sibling modules' launches).
    pub(super) fn buf_ptr(&self, b: &CudaBuf) -> u64 {
        self.ptr(b)
    }

    pub(super) fn buf_len(&self, b: &CudaBuf) -> usize {
        b.len
    }

    /// An uninitialised buffer of `len` f32 that the caller's kernel fills.
    pub(super) fn alloc_buf(&self, len: usize) -> Result<CudaBuf> {
        self.alloc(len)
    }

    pub(super) fn zeros_buf(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_zeros(len)
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

    /// Ids as a device u32 buffer, for the sibling modules' launches.
    pub(super) fn upload_ids_dev(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        self.upload_u32(v)
    }

    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        let s = &self.inner.gpu.stream;
        if v.is_empty() {
            // SAFETY: never read: its logical length is zero.
            return cu("allocating", unsafe { s.alloc::<u32>(1) });
        }
        cu("copying to the device", s.clone_htod(v))
    }

    /// Runs one cuBLAS call on the stream.
    fn blas(&self, c: &BlasCall) -> Result<()> {
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let (m, n, k) = (int(c.m)?, int(c.n)?, int(c.k)?);
        let (lda, ldb, ldc) = (int(c.a.ld.max(1))?, int(c.b.ld.max(1))?, int(c.c.ld.max(1))?);
        let inner = &*self.inner;
        cu("binding the context", inner.gpu.ctx.bind_to_thread())?;
        let handle = *inner.blas.handle();
        let r = if c.batch == 1 {
            // SAFETY: the callers check every operand's extent against its buffer; alpha and beta
            // are host scalars (the handle's default pointer mode).
            unsafe {
                cudarc::cublas::result::sgemm(
                    handle,
                    op(c.a.t),
                    op(c.b.t),
                    m,
                    n,
                    k,
                    &c.alpha,
                    c.a.ptr as *const f32,
                    lda,
                    c.b.ptr as *const f32,
                    ldb,
                    &c.beta,
                    c.c.ptr as *mut f32,
                    ldc,
                )
            }
        } else {
            // SAFETY: as above, for every batch entry; the outputs of the entries are disjoint.
            unsafe {
                cudarc::cublas::result::sgemm_strided_batched(
                    handle,
                    op(c.a.t),
                    op(c.b.t),
                    m,
                    n,
                    k,
                    &c.alpha,
                    c.a.ptr as *const f32,
                    lda,
                    c.a.stride as i64,
                    c.b.ptr as *const f32,
                    ldb,
                    c.b.stride as i64,
                    &c.beta,
                    c.c.ptr as *mut f32,
                    ldc,
                    c.c.stride as i64,
                    int(c.batch)?,
                )
            }
        };
        r.map_err(|e| {
            Error::cuda(format!("cuBLAS sgemm {}x{}x{} (batch {})", c.m, c.n, c.k, c.batch), format!("{e:?}"))
        })
    }

    fn blas_all(&self, calls: &[BlasCall]) -> Result<()> {
        calls.iter().try_for_each(|c| self.blas(c))
    }

    /// Scores `scale q k^T`, masked and softmaxed: `[batch * heads * seq_q, seq_k]`, row
    /// `(b * heads + h) * seq_q + i`. Needs `seq_q, seq_k > 0`.
    fn attn_probs(&self, q: &CudaBuf, k: &CudaBuf, key_mask: Option<&CudaBuf>, s: &AttnShape) -> Result<CudaBuf> {
        let (sq, sk) = (s.seq_q, s.seq_k);
        let p = self.alloc(s.batch * s.heads * sq * sk)?;
        let x = AttnPtrs { q: self.ptr(q), k: self.ptr(k), p: self.ptr(&p), ..Default::default() };
        self.blas_all(&AttnPlan::new(s).scores(&x))?;
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

    /// Rotary embedding of every head of every row (`sign` -1: the backward), with the CPU's
    /// checks and its f32 inverse frequencies.
    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &self,
        op: &'static str,
        x: &CudaBuf,
        positions: &CudaIds,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
        sign: f32,
    ) -> Result<CudaBuf> {
        let inv_freq = rope_inv_freq(op, head_dim, theta, scale)?;
        let rows = positions.host.len();
        expect_len(op, "x", x.len, rows * heads * head_dim)?;
        let out = self.alloc(x.len)?;
        if x.len > 0 {
            let freq = self.upload(&inv_freq)?;
            let (xp, pp, fp, op_) = (self.ptr(x), self.ids_ptr(positions), self.ptr(&freq), self.ptr(&out));
            let (rows64, h32, hd32) = (rows as u64, u32_dim(op, "heads", heads)?, u32_dim(op, "head_dim", head_dim)?);
            launch!(self, rope_rotate, elems_cfg(x.len / 2); xp, pp, fp, rows64, h32, hd32, sign, op_)?;
        }
        Ok(out)
    }

    /// Checks a top-k cross-entropy call as the CPU does and sizes its launch: one CTA per row
    /// with a shared bitmap of the row's columns.
    fn topk_cfg(
        &self,
        op: &'static str,
        logits: &CudaBuf,
        ids: &CudaIds,
        targets: &CudaBuf,
        rest: &CudaBuf,
        [rows, cols, k]: [usize; 3],
    ) -> Result<LaunchConfig> {
        check_topk(op, [logits.len, targets.len, rest.len], &ids.host, [rows, cols, k])?;
        let (_, _) = (u32_dim(op, "cols", cols)?, u32_dim(op, "k", k)?);
        let bitmap = cols.div_ceil(32) * 4;
        if bitmap > TOPK_BITMAP_MAX {
            return Err(err(
                op,
                format!("{cols} columns exceed the kernel's {} (shared-memory bitmap)", TOPK_BITMAP_MAX * 8),
            ));
        }
        let mut cfg = rows_cfg(op, rows)?;
        cfg.shared_mem_bytes = bitmap as u32;
        Ok(cfg)
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Stored = CudaStored;
    type Dots = super::stored::CudaDots;
    type MergeChecks = super::stored::CudaMergeChecks;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn rmsnorm(&self, x: &CudaBuf, gamma: &CudaBuf, rows: usize, dim: usize, eps: f32) -> Result<CudaBuf> {
        let op = "rmsnorm";
        expect_len(op, "x", x.len, rows * dim)?;
        expect_len(op, "gamma", gamma.len, dim)?;
        let y = self.alloc(rows * dim)?;
        if rows * dim > 0 {
            let (xp, gp, yp, dim32) = (self.ptr(x), self.ptr(gamma), self.ptr(&y), u32_dim(op, "dim", dim)?);
            launch!(self, rmsnorm_fwd, rows_cfg(op, rows)?; xp, gp, dim32, eps, yp)?;
        }
        Ok(y)
    }

    fn rmsnorm_backward(
        &self,
        x: &CudaBuf,
        gamma: &CudaBuf,
        dy: &CudaBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(CudaBuf, CudaBuf)> {
        let op = "rmsnorm_backward";
        expect_len(op, "x", x.len, rows * dim)?;
        expect_len(op, "gamma", gamma.len, dim)?;
        expect_len(op, "dy", dy.len, rows * dim)?;
        if rows == 0 || dim == 0 {
            return Ok((self.alloc(0)?, self.alloc_zeros(dim)?));
        }
        let (dx, rstd, dgamma) = (self.alloc(rows * dim)?, self.alloc(rows)?, self.alloc(dim)?);
        let (xp, gp, dyp, dxp, rp, dim32) =
            (self.ptr(x), self.ptr(gamma), self.ptr(dy), self.ptr(&dx), self.ptr(&rstd), u32_dim(op, "dim", dim)?);
        launch!(self, rmsnorm_bwd_dx, rows_cfg(op, rows)?; xp, gp, dyp, dim32, eps, dxp, rp)?;
        let (rows64, dgp) = (rows as u64, self.ptr(&dgamma));
        launch!(self, rmsnorm_bwd_params, cols_cfg(dim); xp, dyp, rp, rows64, dim32, dgp)?;
        Ok((dx, dgamma))
    }

    fn rope(
        &self,
        x: &CudaBuf,
        positions: &CudaIds,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<CudaBuf> {
        self.rotate("rope", x, positions, heads, head_dim, theta, scale, 1.0)
    }

    fn rope_backward(
        &self,
        dy: &CudaBuf,
        positions: &CudaIds,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<CudaBuf> {
        self.rotate("rope_backward", dy, positions, heads, head_dim, theta, scale, -1.0)
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf) -> Result<CudaBuf> {
        self.elementwise_ok("swiglu", gate, up, "up")?;
        let y = self.alloc(gate.len)?;
        if gate.len > 0 {
            let (gp, up_, n, yp) = (self.ptr(gate), self.ptr(up), gate.len as u64, self.ptr(&y));
            launch!(self, swiglu_fwd, elems_cfg(gate.len); gp, up_, n, yp)?;
        }
        Ok(y)
    }

    fn swiglu_backward(&self, gate: &CudaBuf, up: &CudaBuf, dy: &CudaBuf) -> Result<(CudaBuf, CudaBuf)> {
        self.elementwise_ok("swiglu_backward", gate, up, "up")?;
        self.elementwise_ok("swiglu_backward", gate, dy, "dy")?;
        let (dg, du) = (self.alloc(gate.len)?, self.alloc(gate.len)?);
        if gate.len > 0 {
            let (gp, up_, dyp, n) = (self.ptr(gate), self.ptr(up), self.ptr(dy), gate.len as u64);
            let (dgp, dup) = (self.ptr(&dg), self.ptr(&du));
            launch!(self, swiglu_bwd, elems_cfg(gate.len); gp, up_, dyp, n, dgp, dup)?;
        }
        Ok((dg, du))
    }

    fn topk_ce(
        &self,
        logits: &CudaBuf,
        ids: &CudaIds,
        targets: &CudaBuf,
        rest: &CudaBuf,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<CudaBuf> {
        let op = "topk_ce";
        let cfg = self.topk_cfg(op, logits, ids, targets, rest, [rows, cols, k])?;
        let s = &self.inner.gpu.stream;
        // SAFETY: topk_ce_rows writes every row's loss.
        let row_loss = cu("allocating", unsafe { s.alloc::<f64>(rows) })?;
        let out = self.alloc(1)?;
        let (lp, ip, tp, rp) = (self.ptr(logits), self.ids_ptr(ids), self.ptr(targets), self.ptr(rest));
        let (cols32, k32, lossp) = (cols as u32, k as u32, addr(&row_loss, s));
        launch!(self, topk_ce_rows, cfg; lp, ip, tp, rp, cols32, k32, lossp)?;
        let (rows32, rows64, outp) = (u32_dim(op, "rows", rows)?, rows as u64, self.ptr(&out));
        launch!(self, l1_finish, single_cta(); lossp, rows32, rows64, outp)?;
        drop(row_loss);
        Ok(out)
    }

    fn topk_ce_backward(
        &self,
        logits: &CudaBuf,
        ids: &CudaIds,
        targets: &CudaBuf,
        rest: &CudaBuf,
        rows: usize,
        cols: usize,
        k: usize,
        scale: f32,
    ) -> Result<CudaBuf> {
        let cfg = self.topk_cfg("topk_ce_backward", logits, ids, targets, rest, [rows, cols, k])?;
        let g = self.alloc(rows * cols)?;
        let (lp, ip, tp, rp, gp) =
            (self.ptr(logits), self.ids_ptr(ids), self.ptr(targets), self.ptr(rest), self.ptr(&g));
        let (cols32, k32, s) = (cols as u32, k as u32, scale as f64 / rows as f64);
        launch!(self, topk_ce_grad, cfg; lp, ip, tp, rp, cols32, k32, s, gp)?;
        Ok(g)
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

    fn copy(&self, buf: &CudaBuf) -> Result<CudaBuf> {
        let data = cu("copying on the device", self.inner.gpu.stream.clone_dtod(&buf.data))?;
        Ok(CudaBuf { data, len: buf.len })
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
            // beta * c, except that beta 0 clears c (NaN or garbage times 0 is not 0), as on the CPU.
            if beta == 0.0 {
                return cu("clearing a product", self.inner.gpu.stream.memset_zeros(&mut c.data));
            }
            let (cp, len) = (self.ptr(c), (m * n) as u64);
            return launch!(self, scale_f32, elems_cfg(m * n); cp, len, beta);
        }
        self.blas(&dense_plan(ta, tb, m, n, k, alpha, self.ptr(a), self.ptr(b), beta, self.ptr(c)))
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
            self.blas(&linear_plan(rows, inp, out, self.ptr(x), self.ptr(w), beta, self.ptr(&y)))?;
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
        let dx = if need_dx {
            // dx [rows, inp] = dy [rows, out] @ w [out, inp]
            if rows * inp > 0 && out > 0 {
                let dx = self.alloc(rows * inp)?;
                self.blas(&linear_dx_plan(rows, inp, out, self.ptr(dy), self.ptr(w), self.ptr(&dx)))?;
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
            self.blas(&linear_dw_plan(rows, inp, out, self.ptr(dy), self.ptr(x), self.ptr(&dw)))?;
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
        let p = self.attn_probs(q, k, key_mask, &s)?;
        let out = self.alloc(s.q_len())?;
        let x = AttnPtrs { p: self.ptr(&p), v: self.ptr(v), out: self.ptr(&out), ..Default::default() };
        self.blas_all(&AttnPlan::new(&s).context(&x))?;
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
        let p = self.attn_probs(q, k, key_mask, &s)?;
        let ds = self.alloc(p.len)?;
        let (dq, dk, dv) = (self.alloc(s.q_len())?, self.alloc(s.kv_len())?, self.alloc(s.kv_len())?);
        let x = AttnPtrs {
            q: self.ptr(q),
            k: self.ptr(k),
            v: self.ptr(v),
            p: self.ptr(&p),
            ds: self.ptr(&ds),
            dout: self.ptr(dout),
            out: self.ptr(&dq),
            dk: self.ptr(&dk),
            dv: self.ptr(&dv),
        };
        let plan = AttnPlan::new(&s);
        self.blas_all(&plan.grad_values(&x))?;
        // ds = p * (dp - rowsum(dp * p)), in place.
        let (pp, dsp, sk32) = (x.p, x.ds, u32_dim(op, "seq_k", s.seq_k)?);
        launch!(self, softmax_bwd_rows, rows_cfg(op, s.batch * s.heads * s.seq_q)?; pp, dsp, sk32, dsp)?;
        self.blas_all(&plan.grad_qk(&x))?;
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

    fn free_memory(&self) -> Option<u64> {
        self.free_device_memory()
    }

    fn stage(&self, t: &StoredTensor) -> Result<CudaStored> {
        self.stage_stored(t)
    }

    fn stage_many(&self, ts: &[&StoredTensor]) -> Result<Vec<CudaStored>> {
        self.stage_through_ring(ts)
    }

    fn staged_bytes(&self, t: &CudaStored) -> u64 {
        t.bytes()
    }

    fn merge_stored(&self, base: &CudaStored, experts: &[&CudaStored], coefs: &[f32]) -> Result<CudaBuf> {
        self.merge_stored_dev(base, experts, coefs)
    }

    fn lambda_grad_stored(&self, grad: &CudaBuf, base: &CudaStored, experts: &[&CudaStored]) -> Result<Vec<f64>> {
        self.lambda_grad_stored_dev(grad, base, experts)
    }

    fn merge_stored_rows(
        &self,
        base: &CudaStored,
        experts: &[&CudaStored],
        coefs: &[f32],
        rows: &[u32],
        row_len: usize,
    ) -> Result<CudaBuf> {
        self.merge_stored_rows_dev(base, experts, coefs, rows, row_len)
    }

    fn lambda_grad_stored_rows(
        &self,
        grad: &CudaBuf,
        base: &CudaStored,
        experts: &[&CudaStored],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Vec<f64>> {
        self.lambda_grad_stored_rows_dev(grad, base, experts, rows, row_len)
    }

    fn merge_stored_many(&self, jobs: &[StoredMerge<'_, CudaStored>]) -> Result<Vec<CudaBuf>> {
        self.merge_stored_many_dev(jobs)
    }

    fn lambda_grad_stored_many(&self, jobs: &[StoredGrad<'_, CudaStored, CudaBuf>]) -> Result<Vec<Vec<f64>>> {
        self.lambda_grad_stored_many_dev(jobs)
    }

    fn merge_stored_queue(
        &self,
        jobs: &[StoredMerge<'_, CudaStored>],
    ) -> Result<(Vec<CudaBuf>, super::stored::CudaMergeChecks)> {
        self.queue_merges(jobs)
    }

    fn check_merges(&self, checks: Vec<super::stored::CudaMergeChecks>) -> Result<()> {
        checks.into_iter().try_for_each(|c| self.check_queued_merges(c))
    }

    fn lambda_grad_stored_queue(
        &self,
        jobs: &[StoredGrad<'_, CudaStored, CudaBuf>],
    ) -> Result<super::stored::CudaDots> {
        self.queue_lambda_grads(jobs)
    }

    fn read_dots(&self, dots: Vec<super::stored::CudaDots>) -> Result<Vec<Vec<Vec<f64>>>> {
        dots.into_iter().map(|d| self.read_queued_dots(d)).collect()
    }

    fn adam_step(
        &self,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        step: &AdamStep,
    ) -> Result<()> {
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n {
            return Err(err(
                "adam_step",
                format!("params {n}, grads {}, moments {} and {} elements", grads.len, m.len, v.len),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (pp, gp, mp, vp, n64) = (self.ptr(params), self.ptr(grads), self.ptr(m), self.ptr(v), n as u64);
        let AdamStep { beta1, beta2, eps, step_size, c2_sqrt, grad_scale } = *step;
        let (one_b1, one_b2) = (1.0 - beta1, 1.0 - beta2);
        launch!(self, adam_step, elems_cfg(n); pp, gp, mp, vp, n64, beta1, beta2, one_b1, one_b2, step_size, c2_sqrt, eps, grad_scale)
    }

    /// Every buffer's partial sums go into one allocation and come back in one copy; the host
    /// adds each buffer's partials in order, so the result does not depend on the device.
    fn sum_squares(&self, bufs: &[&CudaBuf]) -> Result<Vec<f64>> {
        let op = "sum_squares";
        let tiles: Vec<usize> = bufs.iter().map(|b| b.len.div_ceil(SUMSQ_TILE)).collect();
        let total: usize = tiles.iter().sum();
        if total == 0 {
            return Ok(vec![0.0; bufs.len()]);
        }
        let s = &self.inner.gpu.stream;
        // SAFETY: sumsq_partial writes every partial of every non-empty buffer, and empty
        // buffers own no partials.
        let partials = cu("allocating", unsafe { s.alloc::<f64>(total) })?;
        let base = addr(&partials, s);
        let mut offset = 0usize;
        for (b, &t) in bufs.iter().zip(&tiles) {
            if t > 0 {
                let (xp, n64, pp) = (self.ptr(b), b.len as u64, base + (offset * size_of::<f64>()) as u64);
                let cfg = LaunchConfig {
                    grid_dim: (u32_dim(op, "tiles", t)?, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(self, sumsq_partial, cfg; xp, n64, pp)?;
            }
            offset += t;
        }
        let host = cu("copying from the device", s.clone_dtoh(&partials))?;
        cu("synchronising", s.synchronize())?;
        let mut sums = Vec::with_capacity(bufs.len());
        let mut rest = host.as_slice();
        for &t in &tiles {
            let (mine, tail) = rest.split_at(t);
            sums.push(mine.iter().sum());
            rest = tail;
        }
        Ok(sums)
    }

    /// With an NCCL group on this GPU the buffers are reduced where they are; a group on another
    /// GPU is an error (the launcher and `--device` disagree); a host collective (file, local)
    /// goes through host memory, said once in the log.
    fn all_reduce_sum(&self, coll: &mut dyn Collective, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        let ordinal = self.inner.gpu.info.ordinal;
        if let Some(group) = coll.nccl() {
            if group.ordinal() != ordinal {
                return Err(err(
                    "all_reduce_sum",
                    format!("the NCCL group runs on cuda:{}, the backend on cuda:{ordinal}", group.ordinal()),
                ));
            }
            let mut views: Vec<_> = bufs.iter_mut().map(|b| b.data.slice_mut(0..b.len)).collect();
            return group.all_reduce_device(&mut views, &self.inner.gpu.stream);
        }
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!("a {} collective on --device cuda: gradients are summed through host memory", coll.backend())
        });
        all_reduce_via_host(self, coll, bufs)
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

    /// Host memory standing in for the device: buffers at fake addresses with gaps between them;
    /// replaying a plan asserts that every element a product touches lies inside the buffer its
    /// operand starts in.
    struct Arena {
        data: Vec<f32>,
        regions: Vec<(usize, usize)>,
    }

    const BASE: u64 = 1 << 40;

    impl Arena {
        fn new() -> Self {
            Arena { data: vec![f32::NAN; 16], regions: Vec::new() }
        }

        fn put(&mut self, v: &[f32]) -> u64 {
            let at = self.data.len();
            self.data.extend_from_slice(v);
            self.regions.push((at, v.len()));
            self.data.extend([f32::NAN; 16]);
            BASE + (at * 4) as u64
        }

        /// An output buffer: NaN, so a product with beta = 0 that read it would show.
        fn out(&mut self, n: usize) -> u64 {
            self.put(&vec![f32::NAN; n])
        }

        fn index(ptr: u64) -> usize {
            assert!(ptr >= BASE && (ptr - BASE).is_multiple_of(4), "bad address {ptr:#x}");
            ((ptr - BASE) / 4) as usize
        }

        fn end_of(&self, ptr: u64) -> usize {
            let i = Self::index(ptr);
            let (s, l) = self.regions.iter().copied().find(|&(s, l)| i >= s && i < s + l).expect("operand in a buffer");
            s + l
        }

        fn get(&self, ptr: u64, n: usize) -> Vec<f32> {
            let i = Self::index(ptr);
            self.data[i..i + n].to_vec()
        }

        /// The column-major product cuBLAS computes (in f64), element by element.
        fn run(&mut self, c: &BlasCall) {
            // cuBLAS refuses leading dimensions below the stored operands' row counts.
            let rows_a = if c.a.t { c.k } else { c.m };
            let rows_b = if c.b.t { c.n } else { c.k };
            assert!(c.a.ld >= rows_a.max(1) && c.b.ld >= rows_b.max(1) && c.c.ld >= c.m.max(1), "bad ld: {c:?}");
            let (ea, eb, ec) = (self.end_of(c.a.ptr), self.end_of(c.b.ptr), self.end_of(c.c.ptr));
            for e in 0..c.batch {
                let a0 = Self::index(c.a.ptr) + e * c.a.stride;
                let b0 = Self::index(c.b.ptr) + e * c.b.stride;
                let c0 = Self::index(c.c.ptr) + e * c.c.stride;
                for j in 0..c.n {
                    for i in 0..c.m {
                        let mut acc = 0f64;
                        for l in 0..c.k {
                            let ai = a0 + if c.a.t { l + i * c.a.ld } else { i + l * c.a.ld };
                            let bi = b0 + if c.b.t { j + l * c.b.ld } else { l + j * c.b.ld };
                            assert!(ai < ea && bi < eb, "operand read out of its buffer: {c:?}");
                            acc += self.data[ai] as f64 * self.data[bi] as f64;
                        }
                        let ci = c0 + i + j * c.c.ld;
                        assert!(ci < ec, "output written out of its buffer: {c:?}");
                        let old = if c.beta == 0.0 { 0.0 } else { c.beta as f64 * self.data[ci] as f64 };
                        self.data[ci] = (c.alpha as f64 * acc + old) as f32;
                    }
                }
            }
        }

        fn run_all(&mut self, calls: &[BlasCall]) {
            calls.iter().for_each(|c| self.run(c));
        }

        fn slice_mut(&mut self, ptr: u64, n: usize) -> &mut [f32] {
            let i = Self::index(ptr);
            &mut self.data[i..i + n]
        }
    }

    fn values(seed: u32, n: usize) -> Vec<f32> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed.into());
        (0..n).map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0)).collect()
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let (num, den) = a
            .iter()
            .zip(b)
            .fold((0f64, 0f64), |(n, d), (&x, &y)| (n + (x as f64 - y as f64).powi(2), d + (y as f64).powi(2)));
        (num / den.max(1e-30)).sqrt()
    }

    /// What `attn_softmax` does, on the host, in the layout the plan assumes.
    fn attn_softmax_host(p: &mut [f32], mask: Option<&[f32]>, s: &AttnShape) {
        let shift = s.seq_k - s.seq_q.min(s.seq_k);
        for (r, row) in p.chunks_mut(s.seq_k).enumerate() {
            let (b, i) = (r / (s.heads * s.seq_q), r % s.seq_q);
            for (j, v) in row.iter_mut().enumerate() {
                if mask.is_some_and(|m| m[b * s.seq_k + j] == 0.0) || (s.causal && j > i + shift) {
                    *v = f32::MIN;
                }
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|v| *v = (*v - max).exp());
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
    }

    /// The CUDA attention's products and softmax kernels replayed on the host, against the CPU
    /// backend: checks every address, stride and leading dimension of the plan.
    #[test]
    fn attention_plan_replayed_on_the_host_matches_cpu() {
        use crate::backend::{Backend, Cpu};
        let shape = |batch, seq_q, seq_k, heads, kv_heads, head_dim, causal| AttnShape {
            batch,
            seq_q,
            seq_k,
            heads,
            kv_heads,
            head_dim,
            causal,
            live_queries_only: false,
        };
        let mask_of = |seq_k: usize, real: &[usize]| -> Vec<f32> {
            real.iter().flat_map(|&n| (0..seq_k).map(move |j| if j < n { 1.0 } else { 0.0 })).collect()
        };
        let cases = [
            (AttnShape::bidirectional(3, 13, 4, 6), Some(mask_of(13, &[12, 8, 13]))),
            (shape(2, 7, 11, 6, 2, 5, true), Some(mask_of(11, &[11, 6]))),
            (shape(1, 9, 9, 8, 4, 4, false), None),
            (shape(4, 5, 5, 3, 1, 7, true), Some(mask_of(5, &[5, 0, 2, 4]))),
            (shape(2, 3, 17, 2, 2, 3, false), None),
        ];
        for (i, (s, mask)) in cases.into_iter().enumerate() {
            let seed = 10 * i as u32;
            let (q, k, v, dout) = (
                values(seed, s.q_len()),
                values(seed + 1, s.kv_len()),
                values(seed + 2, s.kv_len()),
                values(seed + 3, s.q_len()),
            );
            let rows = s.batch * s.heads * s.seq_q;
            let mut m = Arena::new();
            let mut x = AttnPtrs {
                q: m.put(&q),
                k: m.put(&k),
                v: m.put(&v),
                p: m.out(rows * s.seq_k),
                ds: m.out(rows * s.seq_k),
                dout: m.put(&dout),
                out: m.out(s.q_len()),
                dk: m.out(s.kv_len()),
                dv: m.out(s.kv_len()),
            };
            let plan = AttnPlan::new(&s);
            m.run_all(&plan.scores(&x));
            attn_softmax_host(m.slice_mut(x.p, rows * s.seq_k), mask.as_deref(), &s);
            m.run_all(&plan.context(&x));
            let want = Cpu.attention(&q, &k, &v, mask.as_ref(), s).unwrap();
            let e = rel_err(&m.get(x.out, s.q_len()), &want);
            assert!(e < 1e-5, "case {i} {s:?}: forward rel err {e:e}");

            x.out = m.out(s.q_len());
            m.run_all(&plan.grad_values(&x));
            let p = m.get(x.p, rows * s.seq_k);
            for (ds, pr) in m.slice_mut(x.ds, rows * s.seq_k).chunks_mut(s.seq_k).zip(p.chunks(s.seq_k)) {
                let dot: f32 = ds.iter().zip(pr).map(|(a, b)| a * b).sum();
                ds.iter_mut().zip(pr).for_each(|(d, &pp)| *d = pp * (*d - dot));
            }
            m.run_all(&plan.grad_qk(&x));
            let g = Cpu.attention_backward(&q, &k, &v, mask.as_ref(), &dout, s).unwrap();
            for (name, got, want) in [
                ("dq", m.get(x.out, s.q_len()), g.dq),
                ("dk", m.get(x.dk, s.kv_len()), g.dk),
                ("dv", m.get(x.dv, s.kv_len()), g.dv),
            ] {
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "case {i} {s:?}: {name} rel err {e:e}");
            }
        }
    }

    /// The dense and linear products' plans replayed on the host, against the CPU backend.
    #[test]
    fn dense_and_linear_plans_replayed_on_the_host_match_cpu() {
        use crate::backend::{Backend, Cpu};
        for &(mm, nn, kk) in &[(5, 7, 3), (1, 9, 4), (6, 1, 2)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let (a, b, c) = (values(1, mm * kk), values(2, kk * nn), values(3, mm * nn));
                    let mut m = Arena::new();
                    let (ap, bp, cp) = (m.put(&a), m.put(&b), m.put(&c));
                    m.run(&dense_plan(ta, tb, mm, nn, kk, 0.5, ap, bp, 1.5, cp));
                    let mut want = c.clone();
                    Cpu.gemm(ta, tb, mm, nn, kk, 0.5, &a, &b, 1.5, &mut want).unwrap();
                    let e = rel_err(&m.get(cp, mm * nn), &want);
                    assert!(e < 1e-6, "gemm {mm}x{nn}x{kk} ta={ta} tb={tb}: rel err {e:e}");
                }
            }
        }
        let (rows, inp, out) = (5, 7, 3);
        let (x, w, dy) = (values(4, rows * inp), values(5, out * inp), values(6, rows * out));
        let mut m = Arena::new();
        let (xp, wp, dyp) = (m.put(&x), m.put(&w), m.put(&dy));
        let (yp, dxp, dwp) = (m.out(rows * out), m.out(rows * inp), m.out(out * inp));
        m.run(&linear_plan(rows, inp, out, xp, wp, 0.0, yp));
        m.run(&linear_dx_plan(rows, inp, out, dyp, wp, dxp));
        m.run(&linear_dw_plan(rows, inp, out, dyp, xp, dwp));
        let y = Cpu.linear(&x, &w, None, rows, inp, out).unwrap();
        let g = Cpu.linear_backward(&x, &w, &dy, rows, inp, out, true, false).unwrap();
        assert!(rel_err(&m.get(yp, rows * out), &y) < 1e-6, "linear");
        assert!(rel_err(&m.get(dxp, rows * inp), &g.dx.unwrap()) < 1e-6, "linear dx");
        assert!(rel_err(&m.get(dwp, out * inp), &g.dw) < 1e-6, "linear dw");
    }

    #[test]
    fn operands_advance_in_bytes() {
        let m = Mat::new(1000, 7).at(3).t().batch_stride(5);
        assert_eq!((m.ptr, m.ld, m.t, m.stride), (1012, 7, true, 5));
    }
}
