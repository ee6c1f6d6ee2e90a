//! The CPU reference backend: plain `Vec<f32>` buffers, matrix products through the `gemm` crate
//! (packed SIMD kernels chosen at run time, AVX-512 included; any strides, so transposes are free), rows and heads spread over rayon
//! threads. Every op checks its buffers against its shape arguments, so a caller's shape bug is an
//! error naming the op instead of a wrong answer.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{AdamStep, AttnGrads, AttnShape, Backend, Gelu, LinearGrads, NormGrads, scratch, stored_ops, vmath};
use crate::checkpoint::StoredTensor;
use crate::error::{Error, Result};
use crate::logits::logsumexp;

/// The CPU backend. Stateless: threads come from rayon's global pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Below this many multiply-adds a product runs on one thread: splitting costs more than it saves.
const PAR_GEMM_FLOPS: usize = 1 << 18;
/// Element-wise ops hand rayon at least this many elements per task.
const MIN_PAR: usize = 1 << 14;

/// Rows per task in column reductions (bias and LayerNorm gradients). The blocks are fixed and
/// their partial sums are added in order, so results do not depend on thread scheduling: the
/// same training run gives bit-identical weights.
const REDUCE_ROWS: usize = 32;

/// Element-wise sum of `parts` (each `len` long), in order.
fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    for p in parts {
        out.iter_mut().zip(&p).for_each(|(a, &v)| *a += v);
    }
    out
}

/// A shape error naming the op (shared with the CUDA backend, so both report the same words).
pub(crate) fn err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Shape { op, reason: reason.into() }
}

pub(crate) fn expect_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want { Ok(()) } else { Err(err(op, format!("{what} has {got} elements, expected {want}"))) }
}

/// A read-only strided matrix view: element (i, j) is `data[off + i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix, or its transpose when `t` (then stored `[cols, rows]`).
    fn dense(data: &'a [f32], rows: usize, cols: usize, t: bool) -> Self {
        if t { View { data, off: 0, rs: 1, cs: rows } } else { View { data, off: 0, rs: cols, cs: 1 } }
    }

    /// Whether a `[rows, cols]` window fits in the data.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.off + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[off..] = alpha * a @ b + beta * c` for `a` `[m, k]`, `b` `[k, n]`, `c` with row stride `rsc`
/// (unit column stride), on `threads` workers of rayon's pool (1: the calling thread). Bounds are
/// checked before the unsafe call, which is what makes this wrapper sound.
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    c_off: usize,
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c_off + (m - 1) * rsc + n <= c.len(), "gemm output out of bounds");
    if k == 0 {
        for i in 0..m {
            let row = &mut c[c_off + i * rsc..c_off + i * rsc + n];
            // As BLAS: `beta == 0` never reads `c` (a recycled buffer may hold anything).
            if beta == 0.0 { row.fill(0.0) } else { row.iter_mut().for_each(|v| *v *= beta) }
        }
        return;
    }
    // SAFETY: the assert above shows every element the product writes lies inside `c`, which is
    // borrowed mutably, so nothing else aliases it.
    unsafe { gemm_into(threads, m, n, k, alpha, a, b, beta, c.as_mut_ptr().add(c_off), rsc) }
}

/// The product of [`gemm_on`] into a fresh `[m, n]` vector whose elements it writes without
/// zeroing them first (the product overwrites every one).
fn gemm_new(m: usize, n: usize, k: usize, alpha: f32, a: View<'_>, b: View<'_>) -> Vec<f32> {
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![0f32; len];
    }
    let threads = gemm_threads(m, n, k);
    let mut c = Vec::with_capacity(len);
    // SAFETY: `c` has room for the `[m, n]` output at row stride `n`; with `beta == 0` the
    // product never reads it and writes each of its `m * n` elements, so all are initialised.
    unsafe {
        gemm_into(threads, m, n, k, alpha, a, b, 0.0, c.as_mut_ptr(), n);
        c.set_len(len);
    }
    c
}

/// `c = alpha * a @ b + beta * c` through the `gemm` crate, `c` an `[m, n]` window at row stride
/// `rsc` (unit column stride); `m`, `n` and `k` are positive.
///
/// # Safety
/// `c` must be valid for writes (and, when `beta != 0`, reads) of every element of that window,
/// and nothing else may access it during the call. The operands' bounds are checked here.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: *mut f32,
    rsc: usize,
) {
    assert!(a.fits(m, k) && b.fits(k, n), "gemm operand out of bounds");
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert shows every element the product reads from `a` and `b` lies inside its
    // slice; the caller vouches for `c`. The crate computes `dst = alpha * dst + beta * lhs @ rhs`,
    // reading `dst` only when asked (so `beta == 0` here ignores whatever `c` held, NaN or
    // uninitialised memory included, as BLAS does).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            rsc as isize,
            beta != 0.0,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// [`gemm_on`] on the calling thread: products inside an already parallel loop (attention heads).
#[allow(clippy::too_many_arguments)]
fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    c_off: usize,
    rsc: usize,
) {
    gemm_on(1, m, n, k, alpha, a, b, beta, c, c_off, rsc);
}

/// Sizes rayon's global pool once, before any work (`threads`, default all cores); the products
/// run on it too. Call it first thing in `main`.
pub fn set_worker_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        // Every worker spins for work: thousands of them on a few cores spend minutes
        // contending instead of merging.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if t > 4 * cores {
            return Err(Error::Invalid(format!(
                "--threads {t}: at most {} (4 per core; this machine has {cores})",
                4 * cores
            )));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| Error::Invalid(format!("cannot start {t} worker threads: {e}")))?;
    }
    Ok(())
}

/// [`gemm_on`] for a contiguous `c` `[m, n]` over the whole pool when the product is big enough to
/// pay for it. The crate splits the output into blocks, never the sum over `k`, so every element
/// is summed in the same order and results do not depend on the thread count (tested). They do
/// depend, in the last bits, on the product's shape (the crate sizes its `k` blocks by `m`, `n`
/// and `k`), as BLAS results do: a text's logits may differ by an ulp between batch sizes.
#[allow(clippy::too_many_arguments)]
fn gemm_par(m: usize, n: usize, k: usize, alpha: f32, a: View<'_>, b: View<'_>, beta: f32, c: &mut [f32]) {
    gemm_on(gemm_threads(m, n, k), m, n, k, alpha, a, b, beta, c, 0, n);
}

/// Workers for an `[m, n]` product over `k`: the whole pool when it is big enough to pay for it.
fn gemm_threads(m: usize, n: usize, k: usize) -> usize {
    let big = m.saturating_mul(n).saturating_mul(k) >= PAR_GEMM_FLOPS;
    if big { rayon::current_num_threads() } else { 1 }
}

/// `f` of every element, in chunks of plain loops (which the compiler vectorises when `f` is
/// branch-free arithmetic).
#[inline(always)]
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    // SAFETY: output and input chunks have equal lengths, and each output element is written.
    unsafe {
        filled(x.len(), |out| {
            out.par_chunks_mut(MIN_PAR).zip(x.par_chunks(MIN_PAR)).for_each(|(o, x)| {
                o.iter_mut().zip(x).for_each(|(o, &v)| {
                    o.write(f(v));
                });
            })
        })
    }
}

/// A vector of `n` elements written by `fill`, without zeroing them first: outputs that are
/// overwritten whole. Zeroing them was about 5% of an adaptation step.
///
/// # Safety
/// `fill` must write every element of the slice it gets (a panic inside it is fine: the
/// vector is then dropped empty).
#[inline(always)]
unsafe fn filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's promise: the first `n` elements were written.
    unsafe { v.set_len(n) };
    v
}

#[inline(always)]
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "map2 over slices of different lengths");
    // SAFETY: the three slices have equal lengths, so the chunks do, and each output element is
    // written.
    unsafe {
        filled(a.len(), |out| {
            out.par_chunks_mut(MIN_PAR).zip(a.par_chunks(MIN_PAR).zip(b.par_chunks(MIN_PAR))).for_each(|(o, (a, b))| {
                o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| {
                    o.write(f(x, y));
                });
            })
        })
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

#[inline(always)]
fn gelu_f(x: f32, kind: Gelu) -> f32 {
    match kind {
        Gelu::Erf => 0.5 * x * (1.0 + vmath::erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Gelu::Tanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_A * x * x * x)).tanh()),
    }
}

#[inline(always)]
fn gelu_grad(x: f32, kind: Gelu) -> f32 {
    match kind {
        Gelu::Erf => {
            let cdf = 0.5 * (1.0 + vmath::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf =
                vmath::exp(-0.5 * x * x) * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
            cdf + x * pdf
        }
        Gelu::Tanh => {
            let t = (SQRT_2_OVER_PI * (x + GELU_A * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * x * x)
        }
    }
}

/// [`Backend::embedding_backward`] for strictly increasing ids (a batch's packed rows put back
/// in the padded layout, every layer): no two rows add, so the table is written once, in
/// parallel, each row either copied from `dy` or zeroed.
fn scatter_sorted(ids: &[u32], dy: &[f32], vocab: usize, dim: usize) -> Vec<f32> {
    const ROWS: usize = 64;
    let d = dim.max(1);
    // SAFETY: the chunks cover the table and every row of each chunk is written (copied or
    // zeroed); `dy` holds `ids.len()` rows of `dim` (checked by the caller).
    unsafe {
        filled(vocab * dim, |out| {
            out.par_chunks_mut(d * ROWS).enumerate().for_each(|(c, chunk)| {
                let first = c * ROWS;
                let mut i = ids.partition_point(|&id| (id as usize) < first);
                for (r, row) in chunk.chunks_mut(d).enumerate() {
                    if ids.get(i).is_some_and(|&id| id as usize == first + r) {
                        row.iter_mut().zip(&dy[i * dim..(i + 1) * dim]).for_each(|(o, &v)| {
                            o.write(v);
                        });
                        i += 1;
                    } else {
                        row.iter_mut().for_each(|o| {
                            o.write(0.0);
                        });
                    }
                }
            })
        })
    }
}

/// In-place softmax of one row; entries of `mask_row` are added first.
fn softmax_row(row: &mut [f32], mask_row: Option<&[f32]>) {
    if let Some(m) = mask_row {
        for (v, &a) in row.iter_mut().zip(m) {
            *v += a;
        }
    }
    let max = row_max(row);
    // The exponentials in a loop of their own (it vectorises), then the sum in order, in f64:
    // over a vocabulary an f32 running sum near 1 drops every weight below half its ulp
    // (e^-16.6), tens of thousands of them, and its normaliser came out up to ~1e-3 low (the
    // real SmolLM2's gradients were 20x PyTorch's float32 error). Below e^-87 the weight is
    // flushed to zero: masked scores (f32::MIN) get exactly 0, without libm's underflow path.
    for v in row.iter_mut() {
        let d = *v - max;
        *v = if d < -87.0 { 0.0 } else { vmath::exp(d) };
    }
    let inv = (1.0 / sum_f64(row, |v| v)) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The largest value of `row` (NaNs ignored; `-inf` when empty), in eight independent lanes:
/// `f32::max` in one chain keeps the loop scalar, one dependent compare per element, which was a
/// fifth of the attention probabilities' time on rows of a few dozen keys.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let pick = |a: f32, v: f32| if v > a { v } else { a };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = pick(*l, v);
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| pick(a, v));
    lanes.into_iter().fold(tail, pick)
}

/// The sum of `f` over `row` in f64, in eight independent lanes: a single chain waits on each
/// add (four cycles), which kept softmax and the norms' moments scalar and latency-bound.
#[inline(always)]
fn sum_f64(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(f64::from(v));
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Checks an attention call's shape and buffer lengths (`mask` is the key mask's length).
pub(crate) fn check_attn(
    op: &'static str,
    q: usize,
    k: usize,
    v: usize,
    mask: Option<usize>,
    s: &AttnShape,
) -> Result<()> {
    if s.heads == 0 || s.kv_heads == 0 || s.head_dim == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(err(op, format!("{} heads cannot be grouped over {} kv heads", s.heads, s.kv_heads)));
    }
    if s.causal && s.seq_q > s.seq_k {
        return Err(err(op, format!("causal attention needs seq_q ({}) <= seq_k ({})", s.seq_q, s.seq_k)));
    }
    expect_len(op, "q", q, s.q_len())?;
    expect_len(op, "k", k, s.kv_len())?;
    expect_len(op, "v", v, s.kv_len())?;
    if let Some(m) = mask {
        expect_len(op, "key mask", m, s.batch * s.seq_k)?;
    }
    Ok(())
}

impl Cpu {
    fn check_attn(
        op: &'static str,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&Vec<f32>>,
        s: &AttnShape,
    ) -> Result<()> {
        check_attn(op, q.len(), k.len(), v.len(), key_mask.map(Vec::len), s)
    }

    /// Keys of sequence `b` that can get weight: all of them without a mask, the live prefix
    /// when the mask is live keys followed by padding (how batches are padded), else `None`.
    /// Padded keys get probability exactly 0, so leaving them out of the products changes no
    /// result and saves the padding's share of the attention work.
    fn live_keys(key_mask: Option<&[f32]>, s: &AttnShape, b: usize) -> Option<usize> {
        let Some(m) = key_mask else { return Some(s.seq_k) };
        let row = &m[b * s.seq_k..(b + 1) * s.seq_k];
        let n = row.iter().position(|&v| v == 0.0).unwrap_or(s.seq_k);
        (n > 0 && row[n..].iter().all(|&v| v == 0.0)).then_some(n)
    }

    /// Query rows of a sequence whose keys' live prefix is `live` that are computed: all, or
    /// with [`AttnShape::live_queries_only`] the live ones (the rest of the output stays zero).
    fn live_queries(s: &AttnShape, live: Option<usize>) -> usize {
        match live {
            Some(n) if s.live_queries_only && s.seq_q == s.seq_k => n,
            _ => s.seq_q,
        }
    }

    /// Probabilities `[nq, seq_k]` of query head `h` in sequence `b` for its first `nq` queries
    /// ([`Cpu::live_queries`]), and `nk`: columns from `nk` on are exactly 0 (padded keys), so
    /// products may stop there.
    fn attn_probs(
        q: &[f32],
        k: &[f32],
        key_mask: Option<&[f32]>,
        s: &AttnShape,
        b: usize,
        h: usize,
    ) -> (Vec<f32>, usize, usize) {
        let (qs, ks) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let g = h / (s.heads / s.kv_heads);
        let live = Cpu::live_keys(key_mask, s, b);
        let (nq, nk) = (Cpu::live_queries(s, live), live.unwrap_or(s.seq_k));
        let qv = View { data: q, off: b * s.seq_q * qs + h * s.head_dim, rs: qs, cs: 1 };
        let kt = View { data: k, off: b * s.seq_k * ks + g * s.head_dim, rs: 1, cs: ks };
        let mut p = vec![0f32; nq * s.seq_k];
        gemm_serial(nq, nk, s.head_dim, s.scale(), qv, kt, 0.0, &mut p, 0, s.seq_k);
        let shift = s.seq_k - s.seq_q.min(s.seq_k);
        for (i, row) in p.chunks_mut(s.seq_k).enumerate() {
            let row = &mut row[..nk];
            // Hugging Face adds finfo(f32).min; |score| is far below its ulp, so setting it is
            // the same number, and it cannot overflow when two masks meet.
            if live.is_none() {
                let mask = key_mask.map(|m| &m[b * s.seq_k..(b + 1) * s.seq_k]);
                for (v, &m) in row.iter_mut().zip(mask.into_iter().flatten()) {
                    if m == 0.0 {
                        *v = f32::MIN;
                    }
                }
            }
            if s.causal && i + shift + 1 < nk {
                row[i + shift + 1..].fill(f32::MIN);
            }
            softmax_row(row, None);
        }
        (p, nq, nk)
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Stored = StoredTensor;
    /// Computed when queued: the CPU has nothing to wait for.
    type Dots = Vec<Vec<f64>>;
    /// Checked when queued.
    type MergeChecks = ();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    /// Zeros written to every page, not `calloc`'s lazily mapped ones: every caller then reads
    /// and writes the whole buffer (Adam's moments, gradients), and a first write to a page still
    /// mapped to the shared zero page flushes the TLB of every core. On llama-1b's adapted heads
    /// that was a tenth of a streamed step.
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok((0..len).into_par_iter().map(|_| 0.0).collect())
    }

    fn copy(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn ids_len(&self, ids: &Vec<u32>) -> usize {
        ids.len()
    }

    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Vec<f32>,
        b: &Vec<f32>,
        beta: f32,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        expect_len("gemm", "a", a.len(), m * k)?;
        expect_len("gemm", "b", b.len(), k * n)?;
        expect_len("gemm", "c", c.len(), m * n)?;
        gemm_par(m, n, k, alpha, View::dense(a, m, k, ta), View::dense(b, k, n, tb), beta, c);
        Ok(())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Vec<f32>> {
        expect_len("linear", "x", x.len(), rows * inp)?;
        expect_len("linear", "weight", w.len(), out * inp)?;
        let (xv, wv) = (View::dense(x, rows, inp, false), View::dense(w, inp, out, true));
        let Some(b) = bias else { return Ok(gemm_new(rows, out, inp, 1.0, xv, wv)) };
        expect_len("linear", "bias", b.len(), out)?;
        // The product, then the bias in a pass of its own: the `gemm` crate's read-the-output
        // path (bias preloaded, beta 1) made the forward products about 11% slower.
        let mut y = gemm_new(rows, out, inp, 1.0, xv, wv);
        y.par_chunks_mut(out.max(1) * 64).for_each(|blk| {
            for r in blk.chunks_mut(out.max(1)) {
                r.iter_mut().zip(b).for_each(|(v, &c)| *v += c);
            }
        });
        Ok(y)
    }

    fn linear_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        inp: usize,
        out: usize,
        need_dx: bool,
        has_bias: bool,
    ) -> Result<LinearGrads<Vec<f32>>> {
        expect_len("linear_backward", "x", x.len(), rows * inp)?;
        expect_len("linear_backward", "weight", w.len(), out * inp)?;
        expect_len("linear_backward", "dy", dy.len(), rows * out)?;
        let dx = need_dx
            .then(|| gemm_new(rows, inp, out, 1.0, View::dense(dy, rows, out, false), View::dense(w, out, inp, false)));
        let mut dw = scratch::take(out * inp);
        gemm_par(out, inp, rows, 1.0, View::dense(dy, out, rows, true), View::dense(x, rows, inp, false), 0.0, &mut dw);
        let db = has_bias.then(|| {
            let partials: Vec<Vec<f32>> = dy
                .par_chunks(out.max(1) * REDUCE_ROWS)
                .map(|block| {
                    let mut acc = vec![0f32; out];
                    for r in block.chunks(out.max(1)) {
                        acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect();
            sum_in_order(partials, out)
        });
        Ok(LinearGrads { dx, dw, db })
    }

    fn add(&self, a: &Vec<f32>, b: &Vec<f32>) -> Result<Vec<f32>> {
        expect_len("add", "b", b.len(), a.len())?;
        Ok(map2(a, b, |x, y| x + y))
    }

    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        expect_len("add_assign", "b", b.len(), a.len())?;
        a.par_iter_mut().zip(b.par_iter()).with_min_len(MIN_PAR).for_each(|(x, &y)| *x += y);
        Ok(())
    }

    fn layernorm(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        expect_len("layernorm", "x", x.len(), rows * dim)?;
        expect_len("layernorm", "gamma", gamma.len(), dim)?;
        expect_len("layernorm", "beta", beta.len(), dim)?;
        // SAFETY: `x` has `rows * dim` elements, so each output row meets an input row of `dim`
        // elements and each of its elements is written.
        Ok(unsafe {
            filled(rows * dim, |y| {
                y.par_chunks_mut(dim.max(1)).zip(x.par_chunks(dim.max(1))).for_each(|(yr, xr)| {
                    let (mean, rstd) = moments(xr, eps);
                    for j in 0..dim {
                        yr[j].write((xr[j] - mean) * rstd * gamma[j] + beta[j]);
                    }
                })
            })
        })
    }

    fn layernorm_backward(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<NormGrads<Vec<f32>>> {
        expect_len("layernorm_backward", "x", x.len(), rows * dim)?;
        expect_len("layernorm_backward", "gamma", gamma.len(), dim)?;
        expect_len("layernorm_backward", "dy", dy.len(), rows * dim)?;
        let d = dim.max(1);
        let mut dx = vec![0f32; rows * dim];
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * REDUCE_ROWS)
            .zip(x.par_chunks(d * REDUCE_ROWS).zip(dy.par_chunks(d * REDUCE_ROWS)))
            .map(|(dxb, (xb, dyb))| {
                let (mut dg, mut db) = (vec![0f32; dim], vec![0f32; dim]);
                for (dxr, (xr, dyr)) in dxb.chunks_mut(d).zip(xb.chunks(d).zip(dyb.chunks(d))) {
                    let (mean, rstd) = moments(xr, eps);
                    for j in 0..dim {
                        dg[j] += dyr[j] * ((xr[j] - mean) * rstd);
                        db[j] += dyr[j];
                    }
                    let (s1, s2) = norm_sums(xr, dyr, gamma, mean, rstd);
                    let (m1, m2) = (s1 / dim as f32, s2 / dim as f32);
                    for j in 0..dim {
                        let xhat = (xr[j] - mean) * rstd;
                        dxr[j] = rstd * (dyr[j] * gamma[j] - m1 - xhat * m2);
                    }
                }
                (dg, db)
            })
            .collect();
        let (dg, db): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().unzip();
        let (dgamma, dbeta) = (sum_in_order(dg, dim), sum_in_order(db, dim));
        Ok(NormGrads { dx, dgamma, dbeta })
    }

    fn rmsnorm(&self, x: &Vec<f32>, gamma: &Vec<f32>, rows: usize, dim: usize, eps: f32) -> Result<Vec<f32>> {
        expect_len("rmsnorm", "x", x.len(), rows * dim)?;
        expect_len("rmsnorm", "gamma", gamma.len(), dim)?;
        let mut y = vec![0f32; rows * dim];
        y.par_chunks_mut(dim.max(1)).zip(x.par_chunks(dim.max(1))).for_each(|(yr, xr)| {
            let r = rms_rstd(xr, eps);
            // Hugging Face's order: normalise, then scale by the weight.
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(gamma) {
                *o = g * (v * r);
            }
        });
        Ok(y)
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        expect_len("rmsnorm_backward", "x", x.len(), rows * dim)?;
        expect_len("rmsnorm_backward", "gamma", gamma.len(), dim)?;
        expect_len("rmsnorm_backward", "dy", dy.len(), rows * dim)?;
        let d = dim.max(1);
        let mut dx = vec![0f32; rows * dim];
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * REDUCE_ROWS)
            .zip(x.par_chunks(d * REDUCE_ROWS).zip(dy.par_chunks(d * REDUCE_ROWS)))
            .map(|(dxb, (xb, dyb))| {
                let mut dg = vec![0f32; dim];
                for (dxr, (xr, dyr)) in dxb.chunks_mut(d).zip(xb.chunks(d).zip(dyb.chunks(d))) {
                    let r = rms_rstd(xr, eps);
                    // y_j = g_j x_j r with r = (mean(x^2) + eps)^(-1/2), so
                    // dx_j = r g_j dy_j - x_j r^3 / dim * sum_k dy_k g_k x_k.
                    let mut s = 0f64;
                    for j in 0..dim {
                        s += dyr[j] as f64 * gamma[j] as f64 * xr[j] as f64;
                        dg[j] += dyr[j] * xr[j] * r;
                    }
                    let c = (s * (r as f64).powi(3) / dim as f64) as f32;
                    for j in 0..dim {
                        dxr[j] = r * gamma[j] * dyr[j] - xr[j] * c;
                    }
                }
                dg
            })
            .collect();
        Ok((dx, sum_in_order(partials, dim)))
    }

    fn rope(
        &self,
        x: &Vec<f32>,
        positions: &Vec<u32>,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<Vec<f32>> {
        rotate("rope", x, positions, heads, head_dim, theta, scale, 1.0)
    }

    fn rope_backward(
        &self,
        dy: &Vec<f32>,
        positions: &Vec<u32>,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<Vec<f32>> {
        rotate("rope_backward", dy, positions, heads, head_dim, theta, scale, -1.0)
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        expect_len("swiglu", "up", up.len(), gate.len())?;
        Ok(map2(gate, up, |g, u| g * sigmoid(g) * u))
    }

    fn swiglu_backward(&self, gate: &Vec<f32>, up: &Vec<f32>, dy: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        expect_len("swiglu_backward", "up", up.len(), gate.len())?;
        expect_len("swiglu_backward", "dy", dy.len(), gate.len())?;
        let (dgate, dup): (Vec<f32>, Vec<f32>) = gate
            .par_iter()
            .zip(up.par_iter().zip(dy.par_iter()))
            .with_min_len(MIN_PAR)
            .map(|(&g, (&u, &d))| {
                let s = sigmoid(g);
                // silu'(g) = s (1 + g (1 - s))
                (d * u * s * (1.0 + g * (1.0 - s)), d * g * s)
            })
            .unzip();
        Ok((dgate, dup))
    }

    fn gelu(&self, x: &Vec<f32>, kind: Gelu) -> Result<Vec<f32>> {
        // One loop per kind: a branch inside would keep the loop from vectorising.
        Ok(match kind {
            Gelu::Erf => map1(x, |v| gelu_f(v, Gelu::Erf)),
            Gelu::Tanh => map1(x, |v| gelu_f(v, Gelu::Tanh)),
        })
    }

    fn gelu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, kind: Gelu) -> Result<Vec<f32>> {
        expect_len("gelu_backward", "dy", dy.len(), x.len())?;
        Ok(match kind {
            Gelu::Erf => map2(x, dy, |v, g| g * gelu_grad(v, Gelu::Erf)),
            Gelu::Tanh => map2(x, dy, |v, g| g * gelu_grad(v, Gelu::Tanh)),
        })
    }

    fn tanh(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(map1(x, f32::tanh))
    }

    fn tanh_backward(&self, x: &Vec<f32>, dy: &Vec<f32>) -> Result<Vec<f32>> {
        expect_len("tanh_backward", "dy", dy.len(), x.len())?;
        Ok(map2(x, dy, |v, g| {
            let t = v.tanh();
            g * (1.0 - t * t)
        }))
    }

    fn softmax(
        &self,
        x: &Vec<f32>,
        mask: Option<&Vec<f32>>,
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Result<Vec<f32>> {
        expect_len("softmax", "x", x.len(), rows * cols)?;
        if let Some(m) = mask {
            if group == 0 || !rows.is_multiple_of(group) {
                return Err(err("softmax", format!("{rows} rows cannot share mask rows in groups of {group}")));
            }
            expect_len("softmax", "mask", m.len(), rows / group * cols)?;
        }
        let mut y = x.clone();
        y.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
            softmax_row(row, mask.map(|m| &m[r / group * cols..(r / group + 1) * cols]));
        });
        Ok(y)
    }

    fn softmax_backward(&self, y: &Vec<f32>, dy: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        expect_len("softmax_backward", "y", y.len(), rows * cols)?;
        expect_len("softmax_backward", "dy", dy.len(), rows * cols)?;
        let mut dx = vec![0f32; rows * cols];
        dx.par_chunks_mut(cols.max(1)).zip(y.par_chunks(cols.max(1)).zip(dy.par_chunks(cols.max(1)))).for_each(
            |(dxr, (yr, dyr))| {
                let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                for j in 0..cols {
                    dxr[j] = yr[j] * (dyr[j] - dot);
                }
            },
        );
        Ok(dx)
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        key_mask: Option<&Vec<f32>>,
        s: AttnShape,
    ) -> Result<Vec<f32>> {
        Cpu::check_attn("attention", q, k, v, key_mask, &s)?;
        let (qs, ks, hd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim);
        let tiles: Vec<Vec<f32>> = (0..s.batch * s.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / s.heads, bh % s.heads);
                let g = h / (s.heads / s.kv_heads);
                let (p, nq, nk) = Cpu::attn_probs(q, k, key_mask.map(Vec::as_slice), &s, b, h);
                let vv = View { data: v, off: b * s.seq_k * ks + g * hd, rs: ks, cs: 1 };
                let mut o = vec![0f32; nq * hd];
                let pv = View::dense(&p, nq, s.seq_k, false);
                gemm_serial(nq, hd, nk, 1.0, pv, vv, 0.0, &mut o, 0, hd);
                o
            })
            .collect();
        let mut out = vec![0f32; s.q_len()];
        for (bh, tile) in tiles.iter().enumerate() {
            let (b, h) = (bh / s.heads, bh % s.heads);
            for (i, row) in tile.chunks(hd).enumerate() {
                let dst = (b * s.seq_q + i) * qs + h * hd;
                out[dst..dst + hd].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        key_mask: Option<&Vec<f32>>,
        dout: &Vec<f32>,
        s: AttnShape,
    ) -> Result<AttnGrads<Vec<f32>>> {
        Cpu::check_attn("attention_backward", q, k, v, key_mask, &s)?;
        expect_len("attention_backward", "dout", dout.len(), s.q_len())?;
        let (qs, ks, hd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim);
        let group = s.heads / s.kv_heads;
        let scale = s.scale();
        // One task per (sequence, kv head): the query heads sharing a kv head add into the same
        // dk/dv, so they run in one task and need no synchronisation.
        let tiles: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.kv_heads)
            .into_par_iter()
            .map(|bg| {
                let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
                let mut dq = vec![0f32; group * s.seq_q * hd];
                let mut dk = vec![0f32; s.seq_k * hd];
                let mut dv = vec![0f32; s.seq_k * hd];
                let kview = View { data: k, off: b * s.seq_k * ks + g * hd, rs: ks, cs: 1 };
                let vt = View { data: v, off: b * s.seq_k * ks + g * hd, rs: 1, cs: ks };
                for hh in 0..group {
                    let h = g * group + hh;
                    // Keys from nk on have probability 0: their dv, dk rows and ds columns are 0.
                    // Queries from nq on (padding the caller does not read) have zero output
                    // gradient: their rows of ds and dq are 0.
                    let (p, nq, nk) = Cpu::attn_probs(q, k, key_mask.map(Vec::as_slice), &s, b, h);
                    let pt = View::dense(&p, s.seq_k, nq, true);
                    let dov = View { data: dout, off: b * s.seq_q * qs + h * hd, rs: qs, cs: 1 };
                    let qv = View { data: q, off: b * s.seq_q * qs + h * hd, rs: qs, cs: 1 };
                    // dv += p^T do
                    gemm_serial(nk, hd, nq, 1.0, pt, dov, 1.0, &mut dv, 0, hd);
                    // dp = do v^T, then ds = p * (dp - rowsum(dp * p))
                    let mut ds = vec![0f32; nq * s.seq_k];
                    gemm_serial(nq, nk, hd, 1.0, dov, vt, 0.0, &mut ds, 0, s.seq_k);
                    for (dsr, pr) in ds.chunks_mut(s.seq_k).zip(p.chunks(s.seq_k)) {
                        let (dsr, pr) = (&mut dsr[..nk], &pr[..nk]);
                        let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (d, &pp) in dsr.iter_mut().zip(pr) {
                            *d = pp * (*d - dot);
                        }
                    }
                    let dsv = View::dense(&ds, nq, s.seq_k, false);
                    let dst = View::dense(&ds, s.seq_k, nq, true);
                    // dq = scale ds k ; dk += scale ds^T q
                    gemm_serial(nq, hd, nk, scale, dsv, kview, 0.0, &mut dq, hh * s.seq_q * hd, hd);
                    gemm_serial(nk, hd, nq, scale, dst, qv, 1.0, &mut dk, 0, hd);
                }
                (dq, dk, dv)
            })
            .collect();
        let mut dq = vec![0f32; s.q_len()];
        let mut dk = vec![0f32; s.kv_len()];
        let mut dv = vec![0f32; s.kv_len()];
        for (bg, (tq, tk, tv)) in tiles.iter().enumerate() {
            let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
            for hh in 0..group {
                let h = g * group + hh;
                for i in 0..s.seq_q {
                    let dst = (b * s.seq_q + i) * qs + h * hd;
                    let src = (hh * s.seq_q + i) * hd;
                    dq[dst..dst + hd].copy_from_slice(&tq[src..src + hd]);
                }
            }
            for j in 0..s.seq_k {
                let dst = (b * s.seq_k + j) * ks + g * hd;
                dk[dst..dst + hd].copy_from_slice(&tk[j * hd..(j + 1) * hd]);
                dv[dst..dst + hd].copy_from_slice(&tv[j * hd..(j + 1) * hd]);
            }
        }
        Ok(AttnGrads { dq, dk, dv })
    }

    fn embedding(&self, table: &Vec<f32>, ids: &Vec<u32>, dim: usize) -> Result<Vec<f32>> {
        if dim == 0 || !table.len().is_multiple_of(dim) {
            return Err(err("embedding", format!("table of {} elements is not a [rows, {dim}] matrix", table.len())));
        }
        let vocab = table.len() / dim;
        if let Some((pos, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(err("embedding", format!("id {id} at position {pos} is outside the table ({vocab} rows)")));
        }
        // SAFETY: `ids.len()` rows of `dim`, each written whole from its (checked) table row.
        Ok(unsafe {
            filled(ids.len() * dim, |out| {
                out.par_chunks_mut(dim.max(1)).zip(ids.par_iter()).with_min_len(64).for_each(|(o, &id)| {
                    o.iter_mut().zip(&table[id as usize * dim..(id as usize + 1) * dim]).for_each(|(o, &v)| {
                        o.write(v);
                    });
                })
            })
        })
    }

    fn embedding_backward(&self, ids: &Vec<u32>, dy: &Vec<f32>, vocab: usize, dim: usize) -> Result<Vec<f32>> {
        expect_len("embedding_backward", "dy", dy.len(), ids.len() * dim)?;
        if let Some((pos, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(err(
                "embedding_backward",
                format!("id {id} at position {pos} is outside the table ({vocab} rows)"),
            ));
        }
        if ids.windows(2).all(|w| w[0] < w[1]) {
            return Ok(scatter_sorted(ids, dy, vocab, dim));
        }
        let mut table = vec![0f32; vocab * dim];
        // Serial: repeated ids add into the same row, and the rows touched are few next to the
        // table that has to be zeroed anyway.
        for (r, &id) in dy.chunks(dim.max(1)).zip(ids) {
            let dst = &mut table[id as usize * dim..(id as usize + 1) * dim];
            for (d, &g) in dst.iter_mut().zip(r) {
                *d += g;
            }
        }
        Ok(table)
    }

    fn soft_ce(&self, logits: &Vec<f32>, targets: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        expect_len("soft_ce", "logits", logits.len(), rows * cols)?;
        expect_len("soft_ce", "targets", targets.len(), rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err("soft_ce", "needs at least one row and one class"));
        }
        let total: f64 = logits
            .par_chunks(cols)
            .zip(targets.par_chunks(cols))
            .map(|(z, t)| {
                let lse = logsumexp(z);
                z.iter().zip(t).map(|(&zj, &tj)| tj as f64 * (lse - zj as f64)).sum::<f64>()
            })
            .sum();
        Ok(vec![(total / rows as f64) as f32])
    }

    fn soft_ce_backward(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<f32>,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        expect_len("soft_ce_backward", "logits", logits.len(), rows * cols)?;
        expect_len("soft_ce_backward", "targets", targets.len(), rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err("soft_ce_backward", "needs at least one row and one class"));
        }
        let s = scale / rows as f32;
        let mut g = logits.clone();
        g.par_chunks_mut(cols).zip(targets.par_chunks(cols)).for_each(|(gr, t)| {
            let tsum: f32 = t.iter().sum();
            softmax_row(gr, None);
            for (v, &tj) in gr.iter_mut().zip(t) {
                *v = (*v * tsum - tj) * s;
            }
        });
        Ok(g)
    }

    fn topk_ce(
        &self,
        logits: &Vec<f32>,
        ids: &Vec<u32>,
        targets: &Vec<f32>,
        rest: &Vec<f32>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<Vec<f32>> {
        check_topk("topk_ce", [logits.len(), targets.len(), rest.len()], ids, [rows, cols, k])?;
        let total: f64 = (0..rows)
            .into_par_iter()
            .map(|r| {
                let z = &logits[r * cols..(r + 1) * cols];
                let (ids, t) = (&ids[r * k..(r + 1) * k], &targets[r * k..(r + 1) * k]);
                let (lse, lse_out) = topk_lses(z, ids);
                let inside: f64 = ids.iter().zip(t).map(|(&i, &tj)| tj as f64 * (lse - z[i as usize] as f64)).sum();
                let bucket = match lse_out {
                    Some(lo) if rest[r] != 0.0 => rest[r] as f64 * (lse - lo),
                    _ => 0.0,
                };
                inside + bucket
            })
            .sum();
        Ok(vec![(total / rows as f64) as f32])
    }

    fn topk_ce_backward(
        &self,
        logits: &Vec<f32>,
        ids: &Vec<u32>,
        targets: &Vec<f32>,
        rest: &Vec<f32>,
        rows: usize,
        cols: usize,
        k: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        check_topk("topk_ce_backward", [logits.len(), targets.len(), rest.len()], ids, [rows, cols, k])?;
        let s = scale as f64 / rows as f64;
        let mut g = vec![0f32; rows * cols];
        g.par_chunks_mut(cols).enumerate().for_each(|(r, gr)| {
            let z = &logits[r * cols..(r + 1) * cols];
            let (ids, t) = (&ids[r * k..(r + 1) * k], &targets[r * k..(r + 1) * k]);
            let (lse, lse_out) = topk_lses(z, ids);
            let bucket = lse_out.filter(|_| rest[r] != 0.0).map(|lo| (rest[r] as f64, lo));
            let mass = t.iter().map(|&v| v as f64).sum::<f64>() + bucket.map_or(0.0, |(r, _)| r);
            for (gj, &zj) in gr.iter_mut().zip(z) {
                *gj = ((zj as f64 - lse).exp() * mass * s) as f32;
            }
            // Columns outside the top k share the bucket's target in proportion to the model's
            // probabilities among them.
            let mut inside = vec![false; cols];
            for (&i, &tj) in ids.iter().zip(t) {
                inside[i as usize] = true;
                gr[i as usize] -= (tj as f64 * s) as f32;
            }
            if let Some((rm, lo)) = bucket {
                for ((gj, &zj), _) in gr.iter_mut().zip(z).zip(&inside).filter(|(_, inn)| !**inn) {
                    *gj -= (rm * (zj as f64 - lo).exp() * s) as f32;
                }
            }
        });
        Ok(g)
    }

    fn l1(&self, x: &Vec<f32>, target: Option<&Vec<f32>>) -> Result<Vec<f32>> {
        if x.is_empty() {
            return Err(err("l1", "needs at least one element"));
        }
        let total: f64 = match target {
            Some(t) => {
                expect_len("l1", "target", t.len(), x.len())?;
                x.par_iter().zip(t.par_iter()).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum()
            }
            None => x.par_iter().map(|&a| (a as f64).abs()).sum(),
        };
        Ok(vec![(total / x.len() as f64) as f32])
    }

    fn l1_backward(&self, x: &Vec<f32>, target: Option<&Vec<f32>>, scale: f32) -> Result<Vec<f32>> {
        if x.is_empty() {
            return Err(err("l1_backward", "needs at least one element"));
        }
        let s = scale / x.len() as f32;
        let sign = move |d: f32| {
            if d > 0.0 {
                s
            } else if d < 0.0 {
                -s
            } else {
                0.0
            }
        };
        match target {
            Some(t) => {
                expect_len("l1_backward", "target", t.len(), x.len())?;
                Ok(map2(x, t, |a, b| sign(a - b)))
            }
            None => Ok(map1(x, sign)),
        }
    }

    fn entropy(&self, logits: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        expect_len("entropy", "logits", logits.len(), rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err("entropy", "needs at least one row and one class"));
        }
        let total: f64 = logits.par_chunks(cols).map(row_entropy).sum();
        Ok(vec![(total / rows as f64) as f32])
    }

    fn entropy_backward(&self, logits: &Vec<f32>, rows: usize, cols: usize, scale: f32) -> Result<Vec<f32>> {
        expect_len("entropy_backward", "logits", logits.len(), rows * cols)?;
        if rows == 0 || cols == 0 {
            return Err(err("entropy_backward", "needs at least one row and one class"));
        }
        let s = scale / rows as f32;
        let mut g = vec![0f32; rows * cols];
        g.par_chunks_mut(cols).zip(logits.par_chunks(cols)).for_each(|(gr, z)| {
            // dH/dz_j = -p_j (log p_j + H)
            let lse = logsumexp(z);
            let h = row_entropy(z);
            for (gj, &zj) in gr.iter_mut().zip(z) {
                let logp = zj as f64 - lse;
                *gj = (-(logp.exp()) * (logp + h)) as f32 * s;
            }
        });
        Ok(g)
    }

    fn free_memory(&self) -> Option<u64> {
        crate::sysinfo::available_memory_bytes()
    }

    fn stage(&self, t: &StoredTensor) -> Result<StoredTensor> {
        Ok(t.clone())
    }

    fn staged_bytes(&self, _t: &StoredTensor) -> u64 {
        0
    }

    fn lambda_grad_stored_queue(
        &self,
        jobs: &[super::StoredGrad<'_, StoredTensor, Vec<f32>>],
    ) -> Result<Vec<Vec<f64>>> {
        self.lambda_grad_stored_many(jobs)
    }

    fn read_dots(&self, dots: Vec<Vec<Vec<f64>>>) -> Result<Vec<Vec<Vec<f64>>>> {
        Ok(dots)
    }

    fn merge_stored_queue(&self, jobs: &[super::StoredMerge<'_, StoredTensor>]) -> Result<(Vec<Vec<f32>>, ())> {
        Ok((self.merge_stored_many(jobs)?, ()))
    }

    fn check_merges(&self, _checks: Vec<()>) -> Result<()> {
        Ok(())
    }

    fn merge_stored(&self, base: &StoredTensor, experts: &[&StoredTensor], coefs: &[f32]) -> Result<Vec<f32>> {
        stored_ops::merge_stored(base, experts, coefs)
    }

    fn lambda_grad_stored(&self, grad: &Vec<f32>, base: &StoredTensor, experts: &[&StoredTensor]) -> Result<Vec<f64>> {
        stored_ops::lambda_grad_stored(grad, base, experts)
    }

    fn merge_stored_rows(
        &self,
        base: &StoredTensor,
        experts: &[&StoredTensor],
        coefs: &[f32],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Vec<f32>> {
        stored_ops::merge_stored_rows(base, experts, coefs, rows, row_len)
    }

    fn lambda_grad_stored_rows(
        &self,
        grad: &Vec<f32>,
        base: &StoredTensor,
        experts: &[&StoredTensor],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Vec<f64>> {
        stored_ops::lambda_grad_stored_rows(grad, base, experts, rows, row_len)
    }

    fn recycle(&self, buf: Vec<f32>) {
        scratch::give(buf);
    }

    fn scratch_limit(&self, bytes: usize) {
        scratch::set_limit(bytes);
    }

    fn adam_step(
        &self,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        step: &AdamStep,
    ) -> Result<()> {
        let n = params.len();
        if grads.len() != n || m.len() != n || v.len() != n {
            return Err(err(
                "adam_step",
                format!("params {n}, grads {}, moments {} and {} elements", grads.len(), m.len(), v.len()),
            ));
        }
        stored_ops::adam_update(params, grads, m, v, step);
        Ok(())
    }

    fn sum_squares(&self, bufs: &[&Vec<f32>]) -> Result<Vec<f64>> {
        Ok(bufs.par_iter().map(|b| b.iter().map(|&x| x as f64 * x as f64).sum()).collect())
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of a row, the sum of squares in f64.
fn rms_rstd(xr: &[f32], eps: f32) -> f32 {
    let ms = sum_f64(xr, |v| v * v) / xr.len().max(1) as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The rotary embedding's `head_dim / 2` inverse frequencies in f32, Hugging Face's way (also
/// the CUDA backend's, so both rotate by the same angles), after checking the op's parameters.
pub(crate) fn rope_inv_freq(op: &'static str, head_dim: usize, theta: f32, scale: f32) -> Result<Vec<f32>> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(err(op, format!("head_dim {head_dim} must be even and positive")));
    }
    if !(theta > 0.0 && theta.is_finite() && scale > 0.0 && scale.is_finite()) {
        return Err(err(op, format!("theta ({theta}) and scale ({scale}) must be positive and finite")));
    }
    Ok((0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32) / scale).collect())
}

/// Rotary embedding of every head of every row by its position's angles; `sign` -1 rotates back
/// (the backward: a rotation's transpose is its inverse). The angles are computed in f32 the way
/// Hugging Face does: `inv_freq = 1 / theta^(2i / head_dim)`, divided by the linear scaling factor,
/// then `position * inv_freq`, so cos and sin agree with transformers to the last bit or two.
#[allow(clippy::too_many_arguments)]
fn rotate(
    op: &'static str,
    x: &[f32],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f32,
    scale: f32,
    sign: f32,
) -> Result<Vec<f32>> {
    let inv_freq = rope_inv_freq(op, head_dim, theta, scale)?;
    let width = heads * head_dim;
    expect_len(op, "x", x.len(), positions.len() * width)?;
    let half = head_dim / 2;
    let mut out = vec![0f32; x.len()];
    if width == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(width).zip(x.par_chunks(width)).zip(positions.par_iter()).with_min_len(16).for_each(
        |((o, xr), &pos)| {
            let (sin, cos): (Vec<f32>, Vec<f32>) =
                inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).map(|(s, c)| (sign * s, c)).unzip();
            for (oh, xh) in o.chunks_mut(head_dim).zip(xr.chunks(head_dim)) {
                for i in 0..half {
                    let (x1, x2) = (xh[i], xh[i + half]);
                    oh[i] = x1 * cos[i] - x2 * sin[i];
                    oh[i + half] = x2 * cos[i] + x1 * sin[i];
                }
            }
        },
    );
    Ok(out)
}

/// LayerNorm backward's row sums `sum_j dy_j gamma_j` and `sum_j dy_j gamma_j xhat_j`, in eight
/// f32 lanes each (one chain of adds would keep the row loop scalar).
#[inline(always)]
fn norm_sums(xr: &[f32], dyr: &[f32], gamma: &[f32], mean: f32, rstd: f32) -> (f32, f32) {
    let (mut l1, mut l2) = ([0f32; 8], [0f32; 8]);
    let n = xr.len().min(dyr.len()).min(gamma.len());
    let whole = n / 8 * 8;
    for c in (0..whole).step_by(8) {
        for t in 0..8 {
            let g = dyr[c + t] * gamma[c + t];
            l1[t] += g;
            l2[t] += g * ((xr[c + t] - mean) * rstd);
        }
    }
    let (mut s1, mut s2) = (l1.iter().sum::<f32>(), l2.iter().sum::<f32>());
    for j in whole..n {
        let g = dyr[j] * gamma[j];
        s1 += g;
        s2 += g * ((xr[j] - mean) * rstd);
    }
    (s1, s2)
}

/// Mean and 1/std of a row (statistics in f64: LayerNorm's variance of large activations loses
/// digits in f32).
fn moments(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len().max(1) as f64;
    let mean = sum_f64(xr, |v| v) / n;
    let var = sum_f64(xr, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// Shapes and ids of a top-k cross-entropy call (`lens`: of the logits, targets and rest; shared
/// with the CUDA backend, whose buffers live on the device).
pub(crate) fn check_topk(
    op: &'static str,
    [logits, targets, rest]: [usize; 3],
    ids: &[u32],
    [rows, cols, k]: [usize; 3],
) -> Result<()> {
    if rows == 0 || cols == 0 || k == 0 {
        return Err(err(op, "needs at least one row, one column and k of at least 1"));
    }
    expect_len(op, "logits", logits, rows * cols)?;
    expect_len(op, "ids", ids.len(), rows * k)?;
    expect_len(op, "targets", targets, rows * k)?;
    expect_len(op, "rest", rest, rows)?;
    if let Some((at, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= cols) {
        return Err(err(op, format!("id {id} (row {}, entry {}) is outside the {cols} columns", at / k, at % k)));
    }
    Ok(())
}

/// Log-sum-exp of a row, and of its entries outside `ids` (`None` when `ids` cover the row), in f64.
fn topk_lses(z: &[f32], ids: &[u32]) -> (f64, Option<f64>) {
    let lse = logsumexp(z);
    let mut inside = vec![false; z.len()];
    ids.iter().for_each(|&i| inside[i as usize] = true);
    let out = || z.iter().zip(&inside).filter(|(_, inn)| !**inn).map(|(&v, _)| v);
    let max = out().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return (lse, None);
    }
    let max = max as f64;
    (lse, Some(max + out().map(|v| (v as f64 - max).exp()).sum::<f64>().ln()))
}

/// `-sum p log p` of `softmax(z)`, in f64.
fn row_entropy(z: &[f32]) -> f64 {
    let lse = logsumexp(z);
    -z.iter()
        .map(|&zj| {
            let logp = zj as f64 - lse;
            logp.exp() * logp
        })
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strided gemm against a naive f64 product, for every transpose combination and sizes
    /// that cross the threading threshold.
    #[test]
    fn gemm_matches_naive_product() {
        let cpu = Cpu;
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (130, 70, 65), (33, 1, 9), (2, 2, 0)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                    let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
                    let mut c: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
                    let c0 = c.clone();
                    cpu.gemm(ta, tb, m, n, k, 0.5, &a, &b, 2.0, &mut c).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = 0f64;
                            for p in 0..k {
                                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                                s += av as f64 * bv as f64;
                            }
                            let want = 0.5 * s + 2.0 * c0[i * n + j] as f64;
                            let got = c[i * n + j] as f64;
                            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{m}x{n}x{k} {ta} {tb}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_ignores_output_when_beta_is_zero() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let mut c = [f32::NAN; 4];
        gemm_serial(2, 2, 2, 1.0, View::dense(&a, 2, 2, false), View::dense(&a, 2, 2, false), 0.0, &mut c, 0, 2);
        assert_eq!(c, [7.0, 10.0, 15.0, 22.0]);
    }

    #[test]
    fn gemm_bits_do_not_depend_on_threads() {
        let (m, n, k) = (257, 301, 1031);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 * 1e-3 - 0.5).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729 % 997) as f32 * 1e-3 - 0.5).cos()).collect();
        let run = |threads: usize| {
            let mut c = vec![0f32; m * n];
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                gemm_par(m, n, k, 1.0, View::dense(&a, m, k, false), View::dense(&b, k, n, true), 0.0, &mut c)
            });
            c
        };
        let one = run(1);
        for t in [2, 3, 4] {
            assert!(one.iter().zip(run(t)).all(|(x, y)| x.to_bits() == y.to_bits()), "{t} threads");
        }
    }

    #[test]
    fn shape_errors_name_the_op() {
        let cpu = Cpu;
        let e = cpu.linear(&vec![0.0; 5], &vec![0.0; 6], None, 2, 3, 2).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("x has 5 elements, expected 6"), "{e}");
        let e = cpu.embedding(&vec![0.0; 6], &vec![0, 3], 2).unwrap_err().to_string();
        assert!(e.contains("id 3 at position 1 is outside the table (3 rows)"), "{e}");
    }
}
