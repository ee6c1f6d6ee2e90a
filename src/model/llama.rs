//! The Llama family (Llama, Mistral, Qwen2) as a chain of blocks: the token embedding, one block
//! per decoder layer, and the head (final RMSNorm + `lm_head`).
//!
//! Same contract as [`super::bert`]: every block has `forward(input) -> output` and
//! `backward(input, grad_out) -> (grad_input, grads)`, the backward recomputing the block's
//! internals from its input, so training keeps one activation per block. Parameters are keyed by
//! their Hugging Face names (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`).
//!
//! With tied embeddings the head's weight *is* `model.embed_tokens.weight` (see
//! [`super::causal`] for how the two copies are kept one).

use std::collections::BTreeMap;

use super::causal::{LmArch, LmBatch, LmModel, TiedHead, untie_head};
use super::chain::{EmbeddingPart, HeadPart, LayerName, LayerPart, Part, PartTensors, TableRows, param_buf};
use super::llama_config::LlamaConfig;
use super::{Param, Params};
use crate::backend::{AttnShape, Backend};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

fn need<T>(x: Option<T>, what: &str) -> Result<T> {
    x.ok_or_else(|| Error::Invalid(format!("backward returned no {what} gradient")))
}

/// The token embedding `model.embed_tokens`.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    pub vocab: usize,
    pub hidden: usize,
}

impl TokenEmbedding {
    pub const WEIGHT: &'static str = "model.embed_tokens.weight";
}

impl PartTensors for TokenEmbedding {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        vec![(Self::WEIGHT.into(), vec![self.vocab, self.hidden])]
    }
}

impl<B: Backend> EmbeddingPart<B> for TokenEmbedding {
    type Batch = LmBatch<B>;

    fn forward(&self, be: &B, p: &Params<B>, batch: &LmBatch<B>) -> Result<B::Buf> {
        be.embedding(param_buf(p, Self::WEIGHT)?, &batch.input_ids, self.hidden)
    }

    fn backward(&self, be: &B, _: &Params<B>, batch: &LmBatch<B>, dy: &B::Buf) -> Result<Params<B>> {
        let g = be.embedding_backward(&batch.input_ids, dy, self.vocab, self.hidden)?;
        let mut out = Params::new();
        out.insert(Self::WEIGHT.into(), Param { shape: vec![self.vocab, self.hidden], buf: g });
        Ok(out)
    }

    fn lookup_rows(&self, batch: &LmBatch<B>) -> Vec<TableRows> {
        vec![(Self::WEIGHT.into(), batch.embedding_rows.clone())]
    }
}

/// One pre-norm decoder layer: `x + attn(rmsnorm(x))`, then `+ mlp(rmsnorm(.))`, with causal
/// grouped-query attention on rotary-embedded queries and keys and a SwiGLU MLP.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope_theta: f32,
    pub rope_scale: f32,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
}

/// Everything the layer's forward computes that its backward needs.
struct LayerActs<Buf> {
    /// `rmsnorm(x)`, the projections' input.
    h: Buf,
    /// Queries and keys after the rotary embedding.
    qr: Buf,
    kr: Buf,
    v: Buf,
    ctx: Buf,
    /// `x + attention`, the MLP's residual input.
    r1: Buf,
    h2: Buf,
    gate: Buf,
    up: Buf,
    act: Buf,
}

/// A layer's forward internals, kept for a backward that then does not recompute them.
pub struct Internals<Buf>(LayerActs<Buf>);

impl DecoderLayer {
    /// Full name of a tensor of this layer, e.g. `self_attn.q_proj.weight`.
    pub fn name(&self, rel: &str) -> String {
        format!("model.layers.{}.{rel}", self.index)
    }

    /// `(relative name, fan_in, fan_out, has bias)` of the seven projections.
    fn projections(&self) -> [(&'static str, usize, usize, bool); 7] {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [
            ("self_attn.q_proj", h, q, self.qkv_bias),
            ("self_attn.k_proj", h, kv, self.qkv_bias),
            ("self_attn.v_proj", h, kv, self.qkv_bias),
            ("self_attn.o_proj", q, h, self.o_bias),
            ("mlp.gate_proj", h, i, self.mlp_bias),
            ("mlp.up_proj", h, i, self.mlp_bias),
            ("mlp.down_proj", i, h, self.mlp_bias),
        ]
    }

    fn attn_shape<B: Backend>(&self, batch: &LmBatch<B>) -> AttnShape {
        AttnShape {
            batch: batch.batch,
            seq_q: batch.seq,
            seq_k: batch.seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: true,
            // The attention output is packed: padded positions are never read.
            live_queries_only: true,
        }
    }

    fn linear<B: Backend>(&self, be: &B, p: &Params<B>, x: &B::Buf, k: usize, rows: usize) -> Result<B::Buf> {
        let (rel, fan_in, fan_out, bias) = self.projections()[k];
        let b = if bias { Some(param_buf(p, &self.name(&format!("{rel}.bias")))?) } else { None };
        be.linear(x, param_buf(p, &self.name(&format!("{rel}.weight")))?, b, rows, fan_in, fan_out)
    }

    fn run<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
    ) -> Result<(LayerActs<B::Buf>, B::Buf)> {
        let (rows, hd) = (batch.rows(), self.head_dim);
        let h = be.rmsnorm(x, param_buf(p, &self.name("input_layernorm.weight"))?, rows, self.hidden, self.eps)?;
        // Attention runs on the padded layout; the rotated queries and keys and the values are
        // kept there for its backward.
        let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
        let q = self.linear(be, p, &h, 0, rows)?;
        let qr =
            batch.padded(be, be.rope(&q, &batch.positions, self.heads, hd, self.rope_theta, self.rope_scale)?, qw)?;
        drop(q);
        let k = self.linear(be, p, &h, 1, rows)?;
        let kr = batch.padded(
            be,
            be.rope(&k, &batch.positions, self.kv_heads, hd, self.rope_theta, self.rope_scale)?,
            kw,
        )?;
        drop(k);
        let v = batch.padded(be, self.linear(be, p, &h, 2, rows)?, kw)?;
        let ctx = batch.packed(be, be.attention(&qr, &kr, &v, Some(&batch.mask), self.attn_shape(batch))?, qw)?;
        let a = self.linear(be, p, &ctx, 3, rows)?;
        let r1 = be.add(x, &a)?;
        drop(a);
        let h2 =
            be.rmsnorm(&r1, param_buf(p, &self.name("post_attention_layernorm.weight"))?, rows, self.hidden, self.eps)?;
        let gate = self.linear(be, p, &h2, 4, rows)?;
        let up = self.linear(be, p, &h2, 5, rows)?;
        let act = be.swiglu(&gate, &up)?;
        let m = self.linear(be, p, &act, 6, rows)?;
        let y = be.add(&r1, &m)?;
        Ok((LayerActs { h, qr, kr, v, ctx, r1, h2, gate, up, act }, y))
    }
}

impl PartTensors for DecoderLayer {
    /// Parameter names and shapes, in Hugging Face's order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![(self.name("input_layernorm.weight"), vec![self.hidden])];
        for (k, (rel, fan_in, fan_out, bias)) in self.projections().into_iter().enumerate() {
            if k == 4 {
                out.push((self.name("post_attention_layernorm.weight"), vec![self.hidden]));
            }
            out.push((self.name(&format!("{rel}.weight")), vec![fan_out, fan_in]));
            if bias {
                out.push((self.name(&format!("{rel}.bias")), vec![fan_out]));
            }
        }
        out
    }
}

impl LayerName for DecoderLayer {
    fn block_name(&self) -> String {
        format!("model.layers.{}", self.index)
    }
}

impl<B: Backend> LayerPart<B> for DecoderLayer {
    type Batch = LmBatch<B>;
    type Internals = Internals<B::Buf>;

    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &LmBatch<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Self::Internals)> {
        let (a, y) = self.run(be, p, batch, x)?;
        Ok((y, Internals(a)))
    }

    fn internals_len(be: &B, internals: &Self::Internals) -> usize {
        let a = &internals.0;
        [&a.h, &a.qr, &a.kr, &a.v, &a.ctx, &a.r1, &a.h2, &a.gate, &a.up, &a.act].iter().map(|b| be.len(b)).sum()
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
        let (rows, hd) = (batch.rows(), self.head_dim);
        let a = match kept {
            Some(Internals(a)) => a,
            None => self.run(be, p, batch, x)?.0,
        };
        let shapes: BTreeMap<String, Vec<usize>> = self.param_shapes().into_iter().collect();
        let mut g = Params::new();
        let mut put = |name: String, buf: B::Buf| -> Result<()> {
            let shape = shapes.get(&name).ok_or_else(|| Error::Invalid(format!("no shape for `{name}`")))?.clone();
            g.insert(name, Param { shape, buf });
            Ok(())
        };
        // Backward of projection k with input `inp`: stores the weight and bias gradients and
        // returns the input gradient.
        let mut proj = |k: usize, inp: &B::Buf, d: &B::Buf| -> Result<B::Buf> {
            let (rel, fan_in, fan_out, bias) = self.projections()[k];
            let w = param_buf(p, &self.name(&format!("{rel}.weight")))?;
            let lg = be.linear_backward(inp, w, d, rows, fan_in, fan_out, true, bias)?;
            put(self.name(&format!("{rel}.weight")), lg.dw)?;
            if let Some(db) = lg.db {
                put(self.name(&format!("{rel}.bias")), db)?;
            }
            need(lg.dx, "projection input")
        };

        // MLP: y = r1 + down(swiglu(gate(h2), up(h2))), h2 = rmsnorm(r1).
        let dact = proj(6, &a.act, dy)?;
        let (dgate, dup) = be.swiglu_backward(&a.gate, &a.up, &dact)?;
        drop(dact);
        let mut dh2 = proj(4, &a.h2, &dgate)?;
        be.add_assign(&mut dh2, &proj(5, &a.h2, &dup)?)?;
        drop((dgate, dup));
        let post_w = param_buf(p, &self.name("post_attention_layernorm.weight"))?;
        let (dr1_norm, dpost) = be.rmsnorm_backward(&a.r1, post_w, &dh2, rows, self.hidden, self.eps)?;
        drop(dh2);
        // r1 feeds the post-attention norm and the second residual.
        let mut dr1 = dr1_norm;
        be.add_assign(&mut dr1, dy)?;

        // Attention: r1 = x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = rmsnorm(x).
        let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
        let dctx = batch.padded(be, proj(3, &a.ctx, &dr1)?, qw)?;
        let att = be.attention_backward(&a.qr, &a.kr, &a.v, Some(&batch.mask), &dctx, self.attn_shape(batch))?;
        drop(dctx);
        let (dq, dk) = (batch.packed(be, att.dq, qw)?, batch.packed(be, att.dk, kw)?);
        let dq = be.rope_backward(&dq, &batch.positions, self.heads, hd, self.rope_theta, self.rope_scale)?;
        let dk = be.rope_backward(&dk, &batch.positions, self.kv_heads, hd, self.rope_theta, self.rope_scale)?;
        let mut dh = proj(0, &a.h, &dq)?;
        be.add_assign(&mut dh, &proj(1, &a.h, &dk)?)?;
        be.add_assign(&mut dh, &proj(2, &a.h, &batch.packed(be, att.dv, kw)?)?)?;
        let in_w = param_buf(p, &self.name("input_layernorm.weight"))?;
        let (dx_norm, din) = be.rmsnorm_backward(x, in_w, &dh, rows, self.hidden, self.eps)?;
        // x feeds the input norm and the first residual.
        let mut dx = dr1;
        be.add_assign(&mut dx, &dx_norm)?;
        put(self.name("post_attention_layernorm.weight"), dpost)?;
        put(self.name("input_layernorm.weight"), din)?;
        Ok((dx, g))
    }
}

/// The final RMSNorm and the vocabulary projection.
#[derive(Debug, Clone)]
pub struct LmHead {
    pub hidden: usize,
    pub vocab: usize,
    pub eps: f32,
    /// The projection is `model.embed_tokens.weight` (tied embeddings).
    pub tied: bool,
}

impl LmHead {
    pub const NORM: &'static str = "model.norm.weight";

    /// Name of the projection weight: `lm_head.weight`, or the embedding's when tied.
    pub fn weight_name(&self) -> &'static str {
        if self.tied { TokenEmbedding::WEIGHT } else { "lm_head.weight" }
    }
}

impl PartTensors for LmHead {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        vec![(Self::NORM.into(), vec![self.hidden]), (self.weight_name().into(), vec![self.vocab, self.hidden])]
    }
}

impl TiedHead for LmHead {
    fn untied(&self) -> Option<(Self, String, String)> {
        let own = LmHead { tied: false, ..self.clone() };
        self.tied.then(|| (own, self.weight_name().into(), "lm_head.weight".into()))
    }
}

impl<B: Backend> HeadPart<B> for LmHead {
    type Batch = LmBatch<B>;

    /// Logits `[rows, vocab]` from the last hidden states `[rows, hidden]`.
    fn forward(&self, be: &B, p: &Params<B>, batch: &LmBatch<B>, x: &B::Buf) -> Result<B::Buf> {
        let rows = batch.rows();
        let hn = be.rmsnorm(x, param_buf(p, Self::NORM)?, rows, self.hidden, self.eps)?;
        be.linear(&hn, param_buf(p, self.weight_name())?, None, rows, self.hidden, self.vocab)
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
        let norm_w = param_buf(p, Self::NORM)?;
        let hn = be.rmsnorm(x, norm_w, rows, h, self.eps)?;
        let lg = be.linear_backward(&hn, param_buf(p, self.weight_name())?, dlogits, rows, h, v, true, false)?;
        drop(hn);
        let (dx, dnorm) = be.rmsnorm_backward(x, norm_w, &need(lg.dx, "hidden state")?, rows, h, self.eps)?;
        let mut g = Params::new();
        g.insert(Self::NORM.into(), Param { shape: vec![h], buf: dnorm });
        g.insert(self.weight_name().into(), Param { shape: vec![v, h], buf: lg.dw });
        Ok((dx, g))
    }
}

/// One block of the chain: the token embedding, a decoder layer (`model.layers.N`) or the head.
pub type LlamaBlock = Part<TokenEmbedding, DecoderLayer, LmHead>;

/// A Llama-family causal LM, its weights on a backend.
pub type Llama<B> = LmModel<B, LlamaConfig>;

impl<B: Backend> LmArch<B> for LlamaConfig {
    type Block = LlamaBlock;

    fn chain(&self, ck: &Checkpoint) -> Result<Vec<LlamaBlock>> {
        let c = self;
        super::check_layer_count(ck, c.num_hidden_layers, "num_hidden_layers")?;
        let mut blocks = vec![LlamaBlock::Embedding(TokenEmbedding { vocab: c.vocab_size, hidden: c.hidden_size })];
        for index in 0..c.num_hidden_layers {
            blocks.push(LlamaBlock::Layer(DecoderLayer {
                index,
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                eps: c.rms_norm_eps,
                rope_theta: c.rope_theta,
                rope_scale: c.rope_scale,
                qkv_bias: c.qkv_bias,
                o_bias: c.o_bias,
                mlp_bias: c.mlp_bias,
            }));
        }
        blocks.push(LlamaBlock::Head(LmHead {
            hidden: c.hidden_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            tied: c.tie_word_embeddings,
        }));
        if !c.tie_word_embeddings && ck.resolve("lm_head.weight").is_none() {
            return Err(Error::Model {
                path: ck.path.clone(),
                reason: "tensor `lm_head.weight` is missing and the embeddings are not tied (config.json's \
                         tie_word_embeddings is false or absent)"
                    .into(),
            });
        }
        Ok(blocks)
    }

    fn untie(block: &LlamaBlock, params: &mut Params<B>) -> LlamaBlock {
        untie_head(block, params)
    }
}
