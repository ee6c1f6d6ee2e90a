//! GPT-2 as a causal LM: the token and position embeddings, one block per layer, and the head
//! (final LayerNorm + the vocabulary projection, tied to the token table unless the config says
//! otherwise). A family of its own, not a Llama variant: LayerNorm with biases, learned positions
//! instead of rotary ones, a GELU MLP, and projections stored as `Conv1D` (`[in, out]`, the
//! transpose of `nn.Linear`) with the query, key and value projections fused into one.
//!
//! Tensor names are Hugging Face's `GPT2LMHeadModel` ones (`transformer.h.3.attn.c_attn.weight`);
//! a checkpoint of the bare `GPT2Model` (OpenAI's, `h.3.attn.c_attn.weight`) loads as well and is
//! saved under its own names.
//!
//! Everything runs on the backend's existing ops: a `Conv1D` is a GEMM on the stored layout
//! plus its bias broadcast to the rows as a one-row table lookup, and the fused projection's
//! output is split into queries, keys and values by row gathers (each token's row of `3 * hidden`
//! values read as three rows of `hidden`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::causal::{LmArch, LmBatch, LmConfig, LmModel, TiedHead, untie_head};
use super::chain::{EmbeddingPart, HeadPart, LayerName, LayerPart, Part, PartTensors, TableRows, param_buf};
use super::hf_config::{ModelKind, Positive, PositiveF64, parse};
use super::{Param, Params};
use crate::backend::{AttnShape, Backend, Gelu};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// The fields of a GPT-2 `config.json` the model needs.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Length of the learned position table: the longest sequence the model takes.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Width of the MLP (`n_inner`, default `4 * n_embd`).
    pub n_inner: usize,
    pub layer_norm_epsilon: f32,
    pub gelu: Gelu,
    /// The head reads `wte.weight` (GPT-2's default).
    pub tie_word_embeddings: bool,
}

/// `config.json` as written; the rules that join fields are in [`RawGpt2Config::validate`].
#[derive(Deserialize)]
struct RawGpt2Config {
    vocab_size: Positive,
    n_positions: Positive,
    n_embd: Positive,
    n_layer: Positive,
    n_head: Positive,
    n_inner: Option<Positive>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<PositiveF64>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

impl RawGpt2Config {
    fn validate(self) -> std::result::Result<Gpt2Config, String> {
        let (n_embd, n_head) = (self.n_embd.0, self.n_head.0);
        if n_embd % n_head != 0 {
            return Err(format!("field `n_embd`: {n_embd} is not a multiple of n_head ({n_head})"));
        }
        let gelu = match self.activation_function.as_deref().unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
            "gelu" => Gelu::Erf,
            other => {
                return Err(format!(
                    "field `activation_function`: `{other}` is not supported (gelu_new, gelu_pytorch_tanh, gelu_fast, gelu)"
                ));
            }
        };
        // Each flag below changes the math in a way the blocks do not implement.
        if self.scale_attn_weights == Some(false) {
            return Err("field `scale_attn_weights`: unscaled attention is not supported (true)".into());
        }
        if self.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err("field `scale_attn_by_inverse_layer_idx`: per-layer attention scaling is not supported".into());
        }
        if self.add_cross_attention == Some(true) {
            return Err("field `add_cross_attention`: cross-attention is not supported (a decoder-only model)".into());
        }
        Ok(Gpt2Config {
            vocab_size: self.vocab_size.0,
            n_positions: self.n_positions.0,
            n_embd,
            n_layer: self.n_layer.0,
            n_head,
            n_inner: self.n_inner.map_or(4 * n_embd, |n| n.0),
            layer_norm_epsilon: self.layer_norm_epsilon.map_or(1e-5, |e| e.0) as f32,
            gelu,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
        })
    }
}

impl Gpt2Config {
    fn of_kind(kind: &ModelKind) -> bool {
        match kind.model_type() {
            "gpt2" => true,
            "" => kind.has_arch(&["GPT2LMHeadModel", "GPT2Model"]),
            _ => false,
        }
    }
}

impl LmConfig for Gpt2Config {
    const FAMILY: &'static str = "GPT-2 (gpt2)";

    fn detects(config: &Value) -> bool {
        ModelKind::deserialize(config).is_ok_and(|k| Self::of_kind(&k))
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let kind: ModelKind = parse(v, path)?;
        if !Self::of_kind(&kind) {
            return Err(bad(format!(
                "model_type {} (architectures {}) is not GPT-2; the causal LMs this build runs: {}",
                v.get("model_type").unwrap_or(&Value::Null),
                v.get("architectures").unwrap_or(&Value::Null),
                super::LmKind::all()
            )));
        }
        let raw: RawGpt2Config = parse(v, path)?;
        raw.validate().map_err(bad)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn num_layers(&self) -> usize {
        self.n_layer
    }

    fn max_tokens(&self) -> Option<(usize, &'static str)> {
        Some((self.n_positions, "position table (n_positions)"))
    }

    fn tied(&self) -> bool {
        self.tie_word_embeddings
    }

    fn set_tied(&mut self, tied: bool) {
        self.tie_word_embeddings = tied;
    }

    fn describe(&self) -> String {
        format!("GPT-2, {} layers, hidden {}, {} heads", self.n_layer, self.n_embd, self.n_head)
    }
}

/// `x @ w + b` for `x` `[rows, inp]` and `w` stored `[inp, out]` (GPT-2's `Conv1D`): the bias
/// broadcast to every row (a lookup of row 0 of the one-row table `b`) and the GEMM added onto it.
fn conv1d<B: Backend>(
    be: &B,
    x: &B::Buf,
    w: &B::Buf,
    b: &B::Buf,
    zeros: &B::Ids,
    inp: usize,
    out: usize,
) -> Result<B::Buf> {
    let rows = be.ids_len(zeros);
    let mut y = be.embedding(b, zeros, out)?;
    be.gemm(false, false, rows, out, inp, 1.0, x, w, 1.0, &mut y)?;
    Ok(y)
}

/// Backward of [`conv1d`]: `(dx, dw, db)` with `dx = dy w^T`, `dw = x^T dy`, `db` the column sums
/// of `dy` (the lookup's scatter-add into the one-row table).
fn conv1d_backward<B: Backend>(
    be: &B,
    x: &B::Buf,
    w: &B::Buf,
    dy: &B::Buf,
    zeros: &B::Ids,
    inp: usize,
    out: usize,
) -> Result<(B::Buf, B::Buf, B::Buf)> {
    let rows = be.ids_len(zeros);
    let mut dx = be.zeros(rows * inp)?;
    be.gemm(false, true, rows, inp, out, 1.0, dy, w, 0.0, &mut dx)?;
    let mut dw = be.zeros(inp * out)?;
    be.gemm(true, false, inp, out, rows, 1.0, x, dy, 0.0, &mut dw)?;
    Ok((dx, dw, be.embedding_backward(zeros, dy, 1, out)?))
}

/// The row indices a layer's gathers use: row 0 for every token (bias broadcasts), and each
/// token's query, key and value rows in the fused projection's output read as `[3 * rows, hidden]`.
struct Gathers<I> {
    zeros: I,
    qkv: [I; 3],
}

impl<I> Gathers<I> {
    fn new<B: Backend<Ids = I>>(be: &B, rows: usize) -> Result<Self> {
        let part = |j: u32| be.upload_ids(&(0..rows as u32).map(|r| 3 * r + j).collect::<Vec<_>>());
        Ok(Gathers { zeros: be.upload_ids(&vec![0; rows])?, qkv: [part(0)?, part(1)?, part(2)?] })
    }
}

/// The token table `wte` plus the position table `wpe`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub prefix: String,
    pub vocab: usize,
    pub positions: usize,
    pub hidden: usize,
}

impl Embedding {
    fn wte(&self) -> String {
        format!("{}wte.weight", self.prefix)
    }

    fn wpe(&self) -> String {
        format!("{}wpe.weight", self.prefix)
    }
}

impl PartTensors for Embedding {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        vec![(self.wte(), vec![self.vocab, self.hidden]), (self.wpe(), vec![self.positions, self.hidden])]
    }
}

impl<B: Backend> EmbeddingPart<B> for Embedding {
    type Batch = LmBatch<B>;

    fn forward(&self, be: &B, p: &Params<B>, batch: &LmBatch<B>) -> Result<B::Buf> {
        let mut x = be.embedding(param_buf(p, &self.wte())?, &batch.input_ids, self.hidden)?;
        be.add_assign(&mut x, &be.embedding(param_buf(p, &self.wpe())?, &batch.positions, self.hidden)?)?;
        Ok(x)
    }

    fn backward(&self, be: &B, _: &Params<B>, batch: &LmBatch<B>, dy: &B::Buf) -> Result<Params<B>> {
        let mut g = Params::new();
        let dwte = be.embedding_backward(&batch.input_ids, dy, self.vocab, self.hidden)?;
        g.insert(self.wte(), Param { shape: vec![self.vocab, self.hidden], buf: dwte });
        let dwpe = be.embedding_backward(&batch.positions, dy, self.positions, self.hidden)?;
        g.insert(self.wpe(), Param { shape: vec![self.positions, self.hidden], buf: dwpe });
        Ok(g)
    }

    fn lookup_rows(&self, batch: &LmBatch<B>) -> Vec<TableRows> {
        vec![(self.wte(), batch.embedding_rows.clone()), (self.wpe(), batch.position_rows.clone())]
    }
}

/// One pre-LayerNorm block: `x + attn(ln_1(x))`, then `+ mlp(ln_2(.))`, with causal multi-head
/// attention and a GELU MLP.
#[derive(Debug, Clone)]
pub struct Layer {
    pub prefix: String,
    pub index: usize,
    pub hidden: usize,
    pub inner: usize,
    pub heads: usize,
    pub eps: f32,
    pub gelu: Gelu,
}

/// Everything the layer's forward computes that its backward needs.
pub struct Internals<Buf> {
    /// `ln_1(x)`, the fused projection's input.
    h: Buf,
    /// Queries, keys and values in the padded layout.
    q: Buf,
    k: Buf,
    v: Buf,
    /// The attention output, packed: the output projection's input.
    ctx: Buf,
    /// `x + attention`, the MLP's residual input.
    r1: Buf,
    h2: Buf,
    /// The MLP's first projection, before and after the GELU.
    fc: Buf,
    act: Buf,
}

impl Layer {
    /// Full name of a tensor of this layer, e.g. `attn.c_attn.weight`.
    fn name(&self, rel: &str) -> String {
        format!("{}h.{}.{rel}", self.prefix, self.index)
    }

    /// `(relative name, fan_in, fan_out)` of the four `Conv1D` projections.
    fn projections(&self) -> [(&'static str, usize, usize); 4] {
        let (h, i) = (self.hidden, self.inner);
        [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, i), ("mlp.c_proj", i, h)]
    }

    fn attn_shape<B: Backend>(&self, batch: &LmBatch<B>) -> AttnShape {
        let hd = self.hidden / self.heads;
        AttnShape {
            batch: batch.batch,
            seq_q: batch.seq,
            seq_k: batch.seq,
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: hd,
            causal: true,
            // The attention output is packed: padded positions are never read.
            live_queries_only: true,
        }
    }

    fn proj<B: Backend>(&self, be: &B, p: &Params<B>, x: &B::Buf, k: usize, g: &Gathers<B::Ids>) -> Result<B::Buf> {
        let (rel, fan_in, fan_out) = self.projections()[k];
        let (w, b) = (self.name(&format!("{rel}.weight")), self.name(&format!("{rel}.bias")));
        conv1d(be, x, param_buf(p, &w)?, param_buf(p, &b)?, &g.zeros, fan_in, fan_out)
    }

    fn layernorm<B: Backend>(&self, be: &B, p: &Params<B>, ln: &str, x: &B::Buf, rows: usize) -> Result<B::Buf> {
        let (w, b) = (self.name(&format!("{ln}.weight")), self.name(&format!("{ln}.bias")));
        be.layernorm(x, param_buf(p, &w)?, param_buf(p, &b)?, rows, self.hidden, self.eps)
    }

    fn run<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
        g: &Gathers<B::Ids>,
    ) -> Result<(Internals<B::Buf>, B::Buf)> {
        let (rows, h) = (batch.rows(), self.hidden);
        let hn = self.layernorm(be, p, "ln_1", x, rows)?;
        let qkv = self.proj(be, p, &hn, 0, g)?;
        let part = |j: usize| batch.padded(be, be.embedding(&qkv, &g.qkv[j], h)?, h);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        drop(qkv);
        let ctx = batch.packed(be, be.attention(&q, &k, &v, Some(&batch.mask), self.attn_shape(batch))?, h)?;
        let a = self.proj(be, p, &ctx, 1, g)?;
        let r1 = be.add(x, &a)?;
        drop(a);
        let h2 = self.layernorm(be, p, "ln_2", &r1, rows)?;
        let fc = self.proj(be, p, &h2, 2, g)?;
        let act = be.gelu(&fc, self.gelu)?;
        let m = self.proj(be, p, &act, 3, g)?;
        let y = be.add(&r1, &m)?;
        Ok((Internals { h: hn, q, k, v, ctx, r1, h2, fc, act }, y))
    }
}

impl PartTensors for Layer {
    /// Parameter names and shapes, in Hugging Face's order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let mut out = Vec::new();
        for (k, (rel, fan_in, fan_out)) in self.projections().into_iter().enumerate() {
            if k % 2 == 0 {
                let ln = if k == 0 { "ln_1" } else { "ln_2" };
                out.push((self.name(&format!("{ln}.weight")), vec![h]));
                out.push((self.name(&format!("{ln}.bias")), vec![h]));
            }
            out.push((self.name(&format!("{rel}.weight")), vec![fan_in, fan_out]));
            out.push((self.name(&format!("{rel}.bias")), vec![fan_out]));
        }
        out
    }
}

impl LayerName for Layer {
    /// `transformer.h.N` (`h.N` without the wrapper).
    fn block_name(&self) -> String {
        format!("{}h.{}", self.prefix, self.index)
    }
}

impl<B: Backend> LayerPart<B> for Layer {
    type Batch = LmBatch<B>;
    type Internals = Internals<B::Buf>;

    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Self::Internals)> {
        let (a, y) = self.run(be, p, batch, x, &Gathers::new(be, batch.rows())?)?;
        Ok((y, a))
    }

    fn internals_len(be: &B, a: &Self::Internals) -> usize {
        [&a.h, &a.q, &a.k, &a.v, &a.ctx, &a.r1, &a.h2, &a.fc, &a.act].iter().map(|b| be.len(b)).sum()
    }

    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
        kept: Option<Internals<B::Buf>>,
        dy: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)> {
        let (rows, h) = (batch.rows(), self.hidden);
        let gathers = Gathers::new(be, rows)?;
        let a = match kept {
            Some(a) => a,
            None => self.run(be, p, batch, x, &gathers)?.0,
        };
        let shapes: BTreeMap<String, Vec<usize>> = self.param_shapes().into_iter().collect();
        let mut grads = Params::new();
        let mut put = |name: String, buf: B::Buf| -> Result<()> {
            let shape = shapes.get(&name).ok_or_else(|| Error::Invalid(format!("no shape for `{name}`")))?.clone();
            grads.insert(name, Param { shape, buf });
            Ok(())
        };
        // Backward of projection k with input `inp`: stores the weight and bias gradients and
        // returns the input gradient.
        let mut proj = |k: usize, inp: &B::Buf, d: &B::Buf| -> Result<B::Buf> {
            let (rel, fan_in, fan_out) = self.projections()[k];
            let w = param_buf(p, &self.name(&format!("{rel}.weight")))?;
            let (dx, dw, db) = conv1d_backward(be, inp, w, d, &gathers.zeros, fan_in, fan_out)?;
            put(self.name(&format!("{rel}.weight")), dw)?;
            put(self.name(&format!("{rel}.bias")), db)?;
            Ok(dx)
        };
        // MLP: y = r1 + c_proj(gelu(c_fc(h2))), h2 = ln_2(r1).
        let dact = proj(3, &a.act, dy)?;
        let dfc = be.gelu_backward(&a.fc, &dact, self.gelu)?;
        drop(dact);
        let dh2 = proj(2, &a.h2, &dfc)?;
        drop(dfc);
        let ln2 = be.layernorm_backward(&a.r1, param_buf(p, &self.name("ln_2.weight"))?, &dh2, rows, h, self.eps)?;
        drop(dh2);
        // r1 feeds ln_2 and the second residual.
        let mut dr1 = ln2.dx;
        be.add_assign(&mut dr1, dy)?;

        // Attention: r1 = x + c_proj(attention(split(c_attn(h)))), h = ln_1(x).
        let dctx = batch.padded(be, proj(1, &a.ctx, &dr1)?, h)?;
        let att = be.attention_backward(&a.q, &a.k, &a.v, Some(&batch.mask), &dctx, self.attn_shape(batch))?;
        drop(dctx);
        // The split's backward: each of dq, dk, dv scattered back to its rows of the fused output.
        let mut dqkv = be.embedding_backward(&gathers.qkv[0], &batch.packed(be, att.dq, h)?, 3 * rows, h)?;
        for (ids, d) in gathers.qkv[1..].iter().zip([att.dk, att.dv]) {
            be.add_assign(&mut dqkv, &be.embedding_backward(ids, &batch.packed(be, d, h)?, 3 * rows, h)?)?;
        }
        let dh = proj(0, &a.h, &dqkv)?;
        drop(dqkv);
        let ln1 = be.layernorm_backward(x, param_buf(p, &self.name("ln_1.weight"))?, &dh, rows, h, self.eps)?;
        // x feeds ln_1 and the first residual.
        let mut dx = dr1;
        be.add_assign(&mut dx, &ln1.dx)?;
        put(self.name("ln_2.weight"), ln2.dgamma)?;
        put(self.name("ln_2.bias"), ln2.dbeta)?;
        put(self.name("ln_1.weight"), ln1.dgamma)?;
        put(self.name("ln_1.bias"), ln1.dbeta)?;
        Ok((dx, grads))
    }
}

/// The final LayerNorm `ln_f` and the vocabulary projection (no bias).
#[derive(Debug, Clone)]
pub struct Head {
    pub prefix: String,
    pub hidden: usize,
    pub vocab: usize,
    pub eps: f32,
    /// The projection is the token table `wte.weight`.
    pub tied: bool,
}

impl Head {
    fn norm(&self, what: &str) -> String {
        format!("{}ln_f.{what}", self.prefix)
    }

    /// Name of the projection weight: `lm_head.weight`, or the token table's when tied.
    pub fn weight_name(&self) -> String {
        if self.tied { format!("{}wte.weight", self.prefix) } else { "lm_head.weight".into() }
    }

    fn normed<B: Backend>(&self, be: &B, p: &Params<B>, rows: usize, x: &B::Buf) -> Result<B::Buf> {
        let (w, b) = (param_buf(p, &self.norm("weight"))?, param_buf(p, &self.norm("bias"))?);
        be.layernorm(x, w, b, rows, self.hidden, self.eps)
    }
}

impl PartTensors for Head {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        vec![(self.norm("weight"), vec![h]), (self.norm("bias"), vec![h]), (self.weight_name(), vec![self.vocab, h])]
    }
}

impl TiedHead for Head {
    fn untied(&self) -> Option<(Self, String, String)> {
        let own = Head { tied: false, ..self.clone() };
        self.tied.then(|| (own.clone(), self.weight_name(), own.weight_name()))
    }
}

impl<B: Backend> HeadPart<B> for Head {
    type Batch = LmBatch<B>;

    fn forward(&self, be: &B, p: &Params<B>, batch: &LmBatch<B>, x: &B::Buf) -> Result<B::Buf> {
        let rows = batch.rows();
        let hn = self.normed(be, p, rows, x)?;
        be.linear(&hn, param_buf(p, &self.weight_name())?, None, rows, self.hidden, self.vocab)
    }

    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
        dlogits: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)> {
        let (rows, h, v) = (batch.rows(), self.hidden, self.vocab);
        let hn = self.normed(be, p, rows, x)?;
        let lg = be.linear_backward(&hn, param_buf(p, &self.weight_name())?, dlogits, rows, h, v, true, false)?;
        drop(hn);
        let dhn = lg.dx.ok_or_else(|| Error::Invalid("backward returned no hidden-state gradient".into()))?;
        let ln = be.layernorm_backward(x, param_buf(p, &self.norm("weight"))?, &dhn, rows, h, self.eps)?;
        let mut g = Params::new();
        g.insert(self.norm("weight"), Param { shape: vec![h], buf: ln.dgamma });
        g.insert(self.norm("bias"), Param { shape: vec![h], buf: ln.dbeta });
        g.insert(self.weight_name(), Param { shape: vec![v, h], buf: lg.dw });
        Ok((ln.dx, g))
    }
}

/// One block of the chain: the embedding, a layer (`transformer.h.N`) or the head.
pub type Gpt2Block = Part<Embedding, Layer, Head>;

/// A GPT-2 causal LM, its weights on a backend.
pub type Gpt2<B> = LmModel<B, Gpt2Config>;

impl<B: Backend> LmArch<B> for Gpt2Config {
    type Block = Gpt2Block;

    fn chain(&self, ck: &Checkpoint) -> Result<Vec<Gpt2Block>> {
        let c = self;
        super::check_layer_count(ck, c.n_layer, "n_layer")?;
        // OpenAI's checkpoints are the bare `GPT2Model`: no `transformer.` wrapper.
        let prefix = if ck.get("wte.weight").is_some() { "" } else { "transformer." }.to_string();
        let mut blocks = vec![Part::Embedding(Embedding {
            prefix: prefix.clone(),
            vocab: c.vocab_size,
            positions: c.n_positions,
            hidden: c.n_embd,
        })];
        for index in 0..c.n_layer {
            blocks.push(Part::Layer(Layer {
                prefix: prefix.clone(),
                index,
                hidden: c.n_embd,
                inner: c.n_inner,
                heads: c.n_head,
                eps: c.layer_norm_epsilon,
                gelu: c.gelu,
            }));
        }
        if !c.tie_word_embeddings && ck.resolve("lm_head.weight").is_none() {
            return Err(Error::Model {
                path: ck.path.clone(),
                reason: "tensor `lm_head.weight` is missing and config.json sets tie_word_embeddings to false".into(),
            });
        }
        blocks.push(Part::Head(Head {
            prefix,
            hidden: c.n_embd,
            vocab: c.vocab_size,
            eps: c.layer_norm_epsilon,
            tied: c.tie_word_embeddings,
        }));
        Ok(blocks)
    }

    fn untie(block: &Gpt2Block, params: &mut Params<B>) -> Gpt2Block {
        untie_head(block, params)
    }
}
