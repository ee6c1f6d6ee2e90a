//! The numeric ops the models need, each with its backward, behind one trait so the CPU reference
//! ([`cpu::Cpu`]) and the CUDA implementation ([`cuda::Cuda`]) run the same model code.
//!
//! Rules that keep the trait implementable on a device:
//! - storage is opaque ([`Backend::Buf`] for f32 data, [`Backend::Ids`] for token/row indices);
//!   only [`Backend::upload`], [`Backend::upload_ids`] and [`Backend::download`] touch host memory;
//! - shapes are explicit arguments (buffers are flat), all matrices are row-major;
//! - losses return a one-element buffer, and their backward takes the upstream gradient as a host
//!   scalar, so a training loop never has to download to take a step;
//! - backward ops take the forward's *inputs* and recompute what they need, so a block can keep
//!   only its input between forward and backward (the memory-lean mode the models use).
//!
//! All math is f32.

pub mod cpu;
pub mod cuda;
pub mod scratch;
pub mod stored_ops;
pub mod vmath;

use std::fmt;
use std::str::FromStr;

pub use cpu::Cpu;
pub use stored_ops::AdamStep;

use crate::checkpoint::StoredTensor;
use crate::dist::collective::Collective;
use crate::error::{Error, Result};

/// Which GELU: the exact erf form (`hidden_act: gelu`) or the tanh approximation (`gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    Erf,
    Tanh,
}

/// Shape of a scaled dot-product attention call.
///
/// Queries are `[batch * seq_q, heads * head_dim]` and keys/values `[batch * seq_k,
/// kv_heads * head_dim]`: exactly what the projections produce, so no transposes are needed.
/// `kv_heads < heads` is grouped-query attention (query head `h` reads kv head
/// `h / (heads / kv_heads)`); `causal` hides key `j` from query `i` when
/// `j > i + (seq_k - seq_q)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Self-attention over padded sequences (`seq_q == seq_k`, query `i` sits at key `i`) whose
    /// caller reads only the outputs at live positions, as every model family here does (it
    /// packs them): where a sequence's key mask is live keys then padding, a backend may leave
    /// the padded positions' output rows at zero, and their output gradient must be zero.
    pub live_queries_only: bool,
}

impl AttnShape {
    /// Plain bidirectional multi-head attention (BERT).
    pub fn bidirectional(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        AttnShape {
            batch,
            seq_q: seq,
            seq_k: seq,
            heads,
            kv_heads: heads,
            head_dim,
            causal: false,
            live_queries_only: false,
        }
    }

    /// This shape with [`AttnShape::live_queries_only`] set.
    pub fn live_queries_only(self) -> Self {
        AttnShape { live_queries_only: true, ..self }
    }

    /// The softmax temperature, 1 / sqrt(head_dim).
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    pub fn q_len(&self) -> usize {
        self.batch * self.seq_q * self.heads * self.head_dim
    }

    pub fn kv_len(&self) -> usize {
        self.batch * self.seq_k * self.kv_heads * self.head_dim
    }
}

/// Gradients of [`Backend::linear`].
pub struct LinearGrads<B> {
    /// `None` when the caller said it does not need it (e.g. the first block's input is ids).
    pub dx: Option<B>,
    pub dw: B,
    /// `None` when the forward had no bias.
    pub db: Option<B>,
}

/// Gradients of [`Backend::layernorm`].
pub struct NormGrads<B> {
    pub dx: B,
    pub dgamma: B,
    pub dbeta: B,
}

/// Gradients of [`Backend::attention`] wrt queries, keys and values.
pub struct AttnGrads<B> {
    pub dq: B,
    pub dk: B,
    pub dv: B,
}

/// One tensor of [`Backend::merge_stored_many`]: `base + sum_k coefs[k] (expert_k - base)`, on
/// `rows` of `row_len` columns only when given.
pub struct StoredMerge<'a, S> {
    pub base: &'a S,
    pub experts: Vec<&'a S>,
    pub coefs: &'a [f32],
    pub rows: Option<(&'a [u32], usize)>,
}

/// One tensor of [`Backend::lambda_grad_stored_many`]: `<grad, expert_k - base>`, over `rows`
/// of `row_len` columns only when given.
pub struct StoredGrad<'a, S, Buf> {
    pub grad: &'a Buf,
    pub base: &'a S,
    pub experts: Vec<&'a S>,
    pub rows: Option<(&'a [u32], usize)>,
}

/// The ops of a compute backend. See the module notes for the conventions.
pub trait Backend: Send + Sync {
    /// An f32 buffer in the backend's memory.
    type Buf: Send + Sync;
    /// A u32 index buffer (token ids, position ids, row indices).
    type Ids: Send + Sync;
    /// A checkpoint tensor's stored bytes, staged for [`Backend::merge_stored`] and
    /// [`Backend::lambda_grad_stored`].
    type Stored: Send + Sync;
    /// Lambda dot products queued by [`Backend::lambda_grad_stored_queue`], read by
    /// [`Backend::read_dots`].
    type Dots: Send;
    /// Non-finite checks of merges queued by [`Backend::merge_stored_queue`], run by
    /// [`Backend::check_merges`].
    type MergeChecks: Send;

    fn name(&self) -> &'static str;

    // --- memory ---
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A copy of `buf`, bit for bit, where it lives (a tied weight's second holder).
    fn copy(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// Number of f32 elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    fn ids_len(&self, ids: &Self::Ids) -> usize;

    // --- dense algebra ---
    /// `c = alpha * op(a) @ op(b) + beta * c` with `op(a)` `[m, k]` and `op(b)` `[k, n]`; `ta`/`tb`
    /// say `a`/`b` are stored transposed (`[k, m]` / `[n, k]`).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Self::Buf,
        b: &Self::Buf,
        beta: f32,
        c: &mut Self::Buf,
    ) -> Result<()>;

    /// `y[rows, out] = x[rows, inp] @ w[out, inp]^T + bias` (PyTorch's `nn.Linear` layout).
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf>;

    /// Backward of [`Backend::linear`]: `dx = dy @ w`, `dw = dy^T @ x`, `db = sum_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        inp: usize,
        out: usize,
        need_dx: bool,
        has_bias: bool,
    ) -> Result<LinearGrads<Self::Buf>>;

    /// Element-wise `a + b` (residual connections). Its backward is the identity for both inputs.
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// `a += b`: accumulates gradients where a value feeds two consumers.
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;

    // --- normalisation and activations ---
    /// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
    fn layernorm(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<Self::Buf>;
    fn layernorm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<NormGrads<Self::Buf>>;

    /// RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * gamma (Llama's; gamma multiplies after normalising).
    fn rmsnorm(&self, x: &Self::Buf, gamma: &Self::Buf, rows: usize, dim: usize, eps: f32) -> Result<Self::Buf>;
    /// Returns (dx, dgamma).
    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// Rotary embedding, Hugging Face's rotate_half convention, on x = `[rows, heads * head_dim]` where row r has position `positions[r]`;
    /// inv_freq_i = theta^(-2i/head_dim), angle = (position / scale) * inv_freq_i (scale = linear rope_scaling factor, 1.0 for none).
    fn rope(
        &self,
        x: &Self::Buf,
        positions: &Self::Ids,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<Self::Buf>;
    /// Backward of rope (the inverse rotation applied to dy).
    fn rope_backward(
        &self,
        dy: &Self::Buf,
        positions: &Self::Ids,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
    ) -> Result<Self::Buf>;

    /// SwiGLU: silu(gate) * up, element-wise.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf>;
    /// Returns (dgate, dup).
    fn swiglu_backward(&self, gate: &Self::Buf, up: &Self::Buf, dy: &Self::Buf) -> Result<(Self::Buf, Self::Buf)>;

    fn gelu(&self, x: &Self::Buf, kind: Gelu) -> Result<Self::Buf>;
    fn gelu_backward(&self, x: &Self::Buf, dy: &Self::Buf, kind: Gelu) -> Result<Self::Buf>;
    fn tanh(&self, x: &Self::Buf) -> Result<Self::Buf>;
    fn tanh_backward(&self, x: &Self::Buf, dy: &Self::Buf) -> Result<Self::Buf>;

    /// Row softmax of `x + mask`, where `mask` (optional) is additive, `[rows / group, cols]`, and
    /// row `r` of `x` uses mask row `r / group` (so one padding row can serve all heads).
    fn softmax(
        &self,
        x: &Self::Buf,
        mask: Option<&Self::Buf>,
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Result<Self::Buf>;
    /// Backward of [`Backend::softmax`] from its output `y`: `dx = y * (dy - sum(dy * y))`.
    fn softmax_backward(&self, y: &Self::Buf, dy: &Self::Buf, rows: usize, cols: usize) -> Result<Self::Buf>;

    /// Scaled dot-product attention, `softmax(q k^T / sqrt(d) + mask) v`, per head.
    /// `key_mask` is `[batch, seq_k]` with 1 for real tokens and 0 for padding; padded keys get
    /// zero weight (the additive mask is `f32::MIN`, as in Hugging Face).
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: Option<&Self::Buf>,
        shape: AttnShape,
    ) -> Result<Self::Buf>;
    /// Backward of [`Backend::attention`]; recomputes the probabilities from `q` and `k`.
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: Option<&Self::Buf>,
        dout: &Self::Buf,
        shape: AttnShape,
    ) -> Result<AttnGrads<Self::Buf>>;

    // --- gathers ---
    /// `out[i] = table[ids[i]]` for a `[vocab, dim]` table: embedding lookup, also used to pick
    /// rows (e.g. each sequence's `[CLS]` token).
    fn embedding(&self, table: &Self::Buf, ids: &Self::Ids, dim: usize) -> Result<Self::Buf>;
    /// Backward of [`Backend::embedding`]: scatter-add of `dy` rows into a zero `[vocab, dim]`.
    fn embedding_backward(&self, ids: &Self::Ids, dy: &Self::Buf, vocab: usize, dim: usize) -> Result<Self::Buf>;

    // --- losses (one-element results; backward scaled by the upstream gradient `scale`) ---
    /// Mean over rows of `-sum_j t_j log softmax(z)_j`; `targets` are probabilities (soft labels).
    fn soft_ce(&self, logits: &Self::Buf, targets: &Self::Buf, rows: usize, cols: usize) -> Result<Self::Buf>;
    fn soft_ce_backward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<Self::Buf>;
    /// Mean over rows of the cross-entropy against a top-k target with a catch-all bucket:
    /// `-sum_j t_j log p[ids_j] - rest * log(1 - sum_j p[ids_j])` with `p = softmax(z)`; `ids` and
    /// `targets` are `[rows, k]`, `rest` is `[rows]`. The bucket's log-probability is taken as the
    /// log-sum-exp of the logits outside `ids`, so it stays finite however small it is; a row
    /// whose `ids` cover every column has no bucket.
    #[allow(clippy::too_many_arguments)]
    fn topk_ce(
        &self,
        logits: &Self::Buf,
        ids: &Self::Ids,
        targets: &Self::Buf,
        rest: &Self::Buf,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<Self::Buf>;
    /// Gradient of [`Backend::topk_ce`] wrt the logits: `p (sum t + rest) - t` on `ids` and
    /// `p (sum t + rest) - rest p / p(bucket)` elsewhere (the bucket's mass spread over the other
    /// columns in proportion to the model's own probabilities), times `scale / rows`.
    #[allow(clippy::too_many_arguments)]
    fn topk_ce_backward(
        &self,
        logits: &Self::Buf,
        ids: &Self::Ids,
        targets: &Self::Buf,
        rest: &Self::Buf,
        rows: usize,
        cols: usize,
        k: usize,
        scale: f32,
    ) -> Result<Self::Buf>;
    /// Mean absolute difference `mean |x - t|` (`t = 0` when `target` is `None`).
    fn l1(&self, x: &Self::Buf, target: Option<&Self::Buf>) -> Result<Self::Buf>;
    /// Gradient wrt `x`: `sign(x - t) * scale / n` (0 where `x == t`).
    fn l1_backward(&self, x: &Self::Buf, target: Option<&Self::Buf>, scale: f32) -> Result<Self::Buf>;
    /// Mean over rows of the entropy `-sum p log p` of `softmax(logits)` (AdaMerging's objective).
    fn entropy(&self, logits: &Self::Buf, rows: usize, cols: usize) -> Result<Self::Buf>;
    fn entropy_backward(&self, logits: &Self::Buf, rows: usize, cols: usize, scale: f32) -> Result<Self::Buf>;

    // --- adaptation on stored weights (CPU twins in [`stored_ops`]) ---
    /// Bytes free for keeping staged weights resident (host memory on the CPU, device memory on
    /// a GPU); `None` when unknown.
    fn free_memory(&self) -> Option<u64>;
    /// Makes a checkpoint tensor's stored bytes (its own dtype) available to the ops below: the
    /// CPU reads the mapping in place, a GPU copies the bytes to the device.
    fn stage(&self, t: &StoredTensor) -> Result<Self::Stored>;
    /// [`Backend::stage`] of a block's tensors at once: a GPU copies them from the mappings into
    /// pinned buffers on all cores while the previous buffer's copy to the device runs.
    fn stage_many(&self, ts: &[&StoredTensor]) -> Result<Vec<Self::Stored>> {
        ts.iter().map(|t| self.stage(t)).collect()
    }
    /// Bytes a staged tensor holds in the backend's memory (0 when it reads the mapping).
    fn staged_bytes(&self, t: &Self::Stored) -> u64;
    /// The merged weights `base + sum_k coefs[k] (expert_k - base)` in f32 (the merge kernel).
    fn merge_stored(&self, base: &Self::Stored, experts: &[&Self::Stored], coefs: &[f32]) -> Result<Self::Buf>;
    /// `dL/dcoef_k = <grad, expert_k - base>` for every expert, in f64 (the lambda_grad kernel).
    fn lambda_grad_stored(&self, grad: &Self::Buf, base: &Self::Stored, experts: &[&Self::Stored]) -> Result<Vec<f64>>;
    /// [`Backend::merge_stored`] of only `rows` (sorted, unique) of a table of `row_len` columns,
    /// the other rows zero: a lookup table of which a batch reads a few rows.
    fn merge_stored_rows(
        &self,
        base: &Self::Stored,
        experts: &[&Self::Stored],
        coefs: &[f32],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Self::Buf>;
    /// [`Backend::lambda_grad_stored`] of a gradient that is zero outside `rows`.
    fn lambda_grad_stored_rows(
        &self,
        grad: &Self::Buf,
        base: &Self::Stored,
        experts: &[&Self::Stored],
        rows: &[u32],
        row_len: usize,
    ) -> Result<Vec<f64>>;
    /// [`Backend::merge_stored`] (or `_rows`) of every job, in order: a device backend waits
    /// for the device once for all of them (a block's tensors) instead of once each.
    fn merge_stored_many(&self, jobs: &[StoredMerge<'_, Self::Stored>]) -> Result<Vec<Self::Buf>> {
        jobs.iter()
            .map(|j| match j.rows {
                Some((rows, row_len)) => self.merge_stored_rows(j.base, &j.experts, j.coefs, rows, row_len),
                None => self.merge_stored(j.base, &j.experts, j.coefs),
            })
            .collect()
    }
    /// [`Backend::merge_stored_many`] whose non-finite check waits for [`Backend::check_merges`]:
    /// a GPU then need not wait for the device at every block of a forward sweep. The outputs
    /// can be used at once; a non-finite value becomes `check_merges`' error (the CPU's words,
    /// naming the input and element). The CPU checks at once.
    fn merge_stored_queue(&self, jobs: &[StoredMerge<'_, Self::Stored>])
    -> Result<(Vec<Self::Buf>, Self::MergeChecks)>;
    /// The first failed check of the queued merges, in queue order.
    fn check_merges(&self, checks: Vec<Self::MergeChecks>) -> Result<()>;
    /// [`Backend::lambda_grad_stored_many`] without waiting for the results: a GPU leaves the
    /// dot products on the device, so that a backward sweep waits for it once, in
    /// [`Backend::read_dots`], instead of once per block. The jobs' buffers may be dropped or
    /// recycled once this returns (a device orders their reuse after the queued work).
    fn lambda_grad_stored_queue(&self, jobs: &[StoredGrad<'_, Self::Stored, Self::Buf>]) -> Result<Self::Dots>;
    /// The dot products of each queued call, per job, in order.
    fn read_dots(&self, dots: Vec<Self::Dots>) -> Result<Vec<Vec<Vec<f64>>>>;
    /// [`Backend::lambda_grad_stored`] (or `_rows`) of every job, in order, likewise.
    fn lambda_grad_stored_many(&self, jobs: &[StoredGrad<'_, Self::Stored, Self::Buf>]) -> Result<Vec<Vec<f64>>> {
        jobs.iter()
            .map(|j| match j.rows {
                Some((rows, row_len)) => self.lambda_grad_stored_rows(j.grad, j.base, &j.experts, rows, row_len),
                None => self.lambda_grad_stored(j.grad, j.base, &j.experts),
            })
            .collect()
    }
    /// One fused Adam update of `params` with moments `m` and `v`, where they live.
    fn adam_step(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamStep,
    ) -> Result<()>;
    /// The sum of squares of each of `bufs`, in f64 (a global gradient norm for clipping): one
    /// wait for all of them on a device. The CPU sums each buffer in element order.
    fn sum_squares(&self, bufs: &[&Self::Buf]) -> Result<Vec<f64>>;
    /// Sums each of `bufs` element-wise over the ranks of `coll`, in place (every rank passes
    /// the same buffers in the same order). By default one flat all-reduce through host memory
    /// ([`all_reduce_via_host`]); CUDA with an NCCL group on its own GPU reduces device memory
    /// where it is.
    fn all_reduce_sum(&self, coll: &mut dyn Collective, bufs: &mut [&mut Self::Buf]) -> Result<()> {
        all_reduce_via_host(self, coll, bufs)
    }
    /// Takes back a buffer its owner is done with, so its memory can hold a later output (the
    /// CPU's [`scratch`] pool); by default it is dropped.
    fn recycle(&self, _buf: Self::Buf) {}
    /// Lets the backend keep up to `bytes` of recycled buffers; 0 releases them.
    fn scratch_limit(&self, _bytes: usize) {}
}

/// [`Backend::all_reduce_sum`] through host memory: the buffers go down into one flat vector,
/// one all-reduce (one message per rank, whatever the number of buffers), and back up.
pub fn all_reduce_via_host<B: Backend + ?Sized>(
    be: &B,
    coll: &mut dyn Collective,
    bufs: &mut [&mut B::Buf],
) -> Result<()> {
    let mut flat = Vec::new();
    for b in bufs.iter() {
        flat.extend(be.download(b)?);
    }
    coll.all_reduce_sum_f32(&mut flat)?;
    let mut at = 0;
    for b in bufs.iter_mut() {
        let n = be.len(b);
        **b = be.upload(&flat[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Evaluates `$body` with `$be` bound to the backend a [`Device`] names: [`Cpu`], or [`cuda::Cuda`]
/// on its CUDA device (see [`open_cuda`]: `auto` falls back to the CPU with one log line, an
/// explicit `cuda` fails with the reason). The body is compiled once per backend type, so it may
/// call any function generic over [`Backend`]; `?` inside it and on opening the device converts
/// into the caller's error type.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$be:ident| $body:expr) => {
        match $crate::backend::open_cuda($device)? {
            None => {
                let $be = $crate::backend::Cpu;
                $body
            }
            Some($be) => $body,
        }
    };
}

/// The CUDA backend a device asks for, or `None` for the CPU: `cpu` never touches CUDA, `cuda[:N]`
/// fails with the reason when the GPU cannot be opened, and `auto` opens the launcher's GPU when
/// it can and otherwise logs why it runs on the CPU.
pub fn open_cuda(device: Device) -> Result<Option<cuda::Cuda>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(ordinal) => cuda::Cuda::open(Device::cuda_ordinal(ordinal)).map(Some),
        Device::Auto => {
            let opened = cuda::probe()
                .map_err(|r| Error::cuda("device", r))
                .and_then(|_| cuda::Cuda::open(Device::cuda_ordinal(None)));
            match opened {
                Ok(be) => Ok(Some(be)),
                Err(e) => {
                    tracing::info!("--device auto: using the CPU ({})", e.reason());
                    Ok(None)
                }
            }
        }
    }
}

/// Where the math runs, as chosen on the command line (every command spells it the same way):
/// `auto` (the default: a usable GPU, else the CPU), `cpu`, `cuda` (under a launcher the GPU of
/// the rank's `LOCAL_RANK`, else GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda(Option<usize>),
}

impl Device {
    /// The GPU a `cuda` device means here: the given ordinal, else the launcher's local rank
    /// (as NCCL takes it), else 0.
    pub fn cuda_ordinal(ordinal: Option<usize>) -> usize {
        ordinal.unwrap_or_else(|| crate::dist::RankInfo::from_env().map_or(0, |r| r.local_rank))
    }
}

impl FromStr for Device {
    type Err = String;

    /// `auto`, `cpu`, `cuda`/`gpu` (the launcher's GPU), or `cuda:N`/`gpu:N`; any case.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => return Ok(Device::Auto),
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => return Ok(Device::Cuda(None)),
            _ => {}
        }
        match t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:")).map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(Some(n))),
            _ => Err(format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}
