//! The BERT family (BERT, MiniLM, RoBERTa) as a chain of blocks: embeddings, one block per
//! encoder layer, and the classification head (pooler + classifier).
//!
//! Every block has `forward(input) -> output` and `backward(input, grad_out) -> (grad_input,
//! grads)`; the backward recomputes the block's internals from its input, so training keeps only
//! one activation per block alive (the memory-lean mode the streamed adaptation loop needs).
//! Parameters and gradients are maps keyed by Hugging Face tensor names without the wrapper
//! prefix (`encoder.layer.3.attention.self.query.weight`, `classifier.weight`), which is what
//! the per-tensor merge coefficients are defined over. Dropout is off (eval mode).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::chain::{
    self, EmbeddingPart, HeadPart, LayerName, LayerPart, Part, PartTensors, Saved, TableRows, load_tensor, param_buf,
};
use super::config::{BertConfig, BertFamily};
use super::tokenize::Encoded;
use super::{Param, Params};
use crate::backend::{AttnShape, Backend};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merge::philox::{ElementStream, name_hash};

/// One batch on the device, packed: the chain's activations hold real tokens only (`tokens`
/// rows, sequence after sequence), so padding costs no work in the projections, the MLP and the
/// norms. Only attention sees the padded `[batch, seq]` layout: it scatters its inputs there and
/// gathers its output back (skipped when no token is padding).
pub struct Batch<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    /// Number of real tokens: the activations' row count.
    pub tokens: usize,
    /// Per real token, in packed order.
    pub input_ids: B::Ids,
    pub token_type_ids: B::Ids,
    pub position_ids: B::Ids,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding.
    pub mask: B::Buf,
    /// Each real token's row in the padded `[batch * seq]` layout; `None` when nothing is padded
    /// (packed and padded layouts are then the same).
    pub padded_rows: Option<B::Ids>,
    /// Each sequence's `[CLS]` row in the packed layout.
    pub cls_rows: B::Ids,
    /// The rows of the embedding tables the batch reads (table name, sorted unique rows).
    pub lookups: Vec<(String, Vec<u32>)>,
}

impl<B: Backend> Batch<B> {
    /// Number of activation rows: the real tokens.
    pub fn rows(&self) -> usize {
        self.tokens
    }

    /// Packed rows `x` (`[tokens, width]`) in the padded layout, padding rows zero.
    pub fn padded(&self, be: &B, x: B::Buf, width: usize) -> Result<B::Buf> {
        super::to_padded(be, self.padded_rows.as_ref(), self.batch * self.seq, x, width)
    }

    /// Padded rows `x` (`[batch * seq, width]`) packed: the real tokens' rows only.
    pub fn packed(&self, be: &B, x: B::Buf, width: usize) -> Result<B::Buf> {
        super::to_packed(be, self.padded_rows.as_ref(), x, width)
    }
}

fn grad<B: Backend>(out: &mut Params<B>, name: String, shape: &[usize], buf: Option<B::Buf>) {
    if let Some(buf) = buf {
        out.insert(name, Param { shape: shape.to_vec(), buf });
    }
}

/// The embedding block: word + position + token-type embeddings, then LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vocab: usize,
    pub positions: usize,
    pub types: usize,
    pub hidden: usize,
    pub eps: f32,
}

impl Embeddings {
    const WORD: &'static str = "embeddings.word_embeddings.weight";
    const POS: &'static str = "embeddings.position_embeddings.weight";
    const TYPE: &'static str = "embeddings.token_type_embeddings.weight";
    const LN_W: &'static str = "embeddings.LayerNorm.weight";
    const LN_B: &'static str = "embeddings.LayerNorm.bias";

    /// The sum before LayerNorm (recomputed by the backward).
    fn summed<B: Backend>(&self, be: &B, p: &Params<B>, batch: &Batch<B>) -> Result<B::Buf> {
        let h = self.hidden;
        let mut x = be.embedding(param_buf(p, Self::WORD)?, &batch.input_ids, h)?;
        be.add_assign(&mut x, &be.embedding(param_buf(p, Self::POS)?, &batch.position_ids, h)?)?;
        be.add_assign(&mut x, &be.embedding(param_buf(p, Self::TYPE)?, &batch.token_type_ids, h)?)?;
        Ok(x)
    }
}

impl PartTensors for Embeddings {
    /// Parameter names and shapes.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        vec![
            (Self::WORD.into(), vec![self.vocab, self.hidden]),
            (Self::POS.into(), vec![self.positions, self.hidden]),
            (Self::TYPE.into(), vec![self.types, self.hidden]),
            (Self::LN_W.into(), vec![self.hidden]),
            (Self::LN_B.into(), vec![self.hidden]),
        ]
    }
}

impl<B: Backend> EmbeddingPart<B> for Embeddings {
    type Batch = Batch<B>;

    fn forward(&self, be: &B, p: &Params<B>, batch: &Batch<B>) -> Result<B::Buf> {
        let x = self.summed(be, p, batch)?;
        be.layernorm(&x, param_buf(p, Self::LN_W)?, param_buf(p, Self::LN_B)?, batch.rows(), self.hidden, self.eps)
    }

    /// Gradients of the five tensors (the input is discrete ids: there is no input gradient).
    fn backward(&self, be: &B, p: &Params<B>, batch: &Batch<B>, dy: &B::Buf) -> Result<Params<B>> {
        let h = self.hidden;
        let x = self.summed(be, p, batch)?;
        let ln = be.layernorm_backward(&x, param_buf(p, Self::LN_W)?, dy, batch.rows(), h, self.eps)?;
        drop(x);
        let shapes = self.param_shapes();
        let mut g = Params::new();
        let word = be.embedding_backward(&batch.input_ids, &ln.dx, self.vocab, h)?;
        grad::<B>(&mut g, Self::WORD.into(), &shapes[0].1, Some(word));
        let pos = be.embedding_backward(&batch.position_ids, &ln.dx, self.positions, h)?;
        grad::<B>(&mut g, Self::POS.into(), &shapes[1].1, Some(pos));
        let typ = be.embedding_backward(&batch.token_type_ids, &ln.dx, self.types, h)?;
        grad::<B>(&mut g, Self::TYPE.into(), &shapes[2].1, Some(typ));
        grad::<B>(&mut g, Self::LN_W.into(), &shapes[3].1, Some(ln.dgamma));
        grad::<B>(&mut g, Self::LN_B.into(), &shapes[4].1, Some(ln.dbeta));
        Ok(g)
    }

    fn lookup_rows(&self, batch: &Batch<B>) -> Vec<TableRows> {
        batch.lookups.clone()
    }
}

/// One post-LayerNorm encoder layer: self-attention + residual + LayerNorm, then the GELU MLP +
/// residual + LayerNorm.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub index: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub act: crate::backend::Gelu,
    pub eps: f32,
}

/// Everything the layer's forward computes that its backward needs.
struct LayerActs<Buf> {
    q: Buf,
    k: Buf,
    v: Buf,
    ctx: Buf,
    r1: Buf,
    h1: Buf,
    u: Buf,
    act: Buf,
    r2: Buf,
}

/// A layer's forward internals, kept for a backward that then does not recompute them (the
/// trade of memory for a quarter of the step's work that adaptation makes when its budget allows).
pub struct Internals<Buf>(LayerActs<Buf>);

impl EncoderLayer {
    /// Tensor names relative to `encoder.layer.N.`, in checkpoint order.
    pub const TENSORS: [&'static str; 16] = [
        "attention.self.query.weight",
        "attention.self.query.bias",
        "attention.self.key.weight",
        "attention.self.key.bias",
        "attention.self.value.weight",
        "attention.self.value.bias",
        "attention.output.dense.weight",
        "attention.output.dense.bias",
        "attention.output.LayerNorm.weight",
        "attention.output.LayerNorm.bias",
        "intermediate.dense.weight",
        "intermediate.dense.bias",
        "output.dense.weight",
        "output.dense.bias",
        "output.LayerNorm.weight",
        "output.LayerNorm.bias",
    ];

    /// Full name of one of [`Self::TENSORS`].
    pub fn name(&self, rel: &str) -> String {
        format!("encoder.layer.{}.{rel}", self.index)
    }

    fn attn_shape<B: Backend>(&self, batch: &Batch<B>) -> AttnShape {
        // The attention output is packed: padded positions are never read.
        AttnShape::bidirectional(batch.batch, batch.seq, self.heads, self.hidden / self.heads).live_queries_only()
    }

    fn run<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Batch<B>,
        x: &B::Buf,
    ) -> Result<(LayerActs<B::Buf>, B::Buf)> {
        let (rows, h, i) = (batch.rows(), self.hidden, self.intermediate);
        let w = |rel: &str| param_buf(p, &self.name(rel));
        let lin = |inp: &B::Buf, name: &str, fan_in: usize, fan_out: usize| -> Result<B::Buf> {
            be.linear(inp, w(&format!("{name}.weight"))?, Some(w(&format!("{name}.bias"))?), rows, fan_in, fan_out)
        };
        // Attention runs on the padded layout; q, k and v are kept there for its backward.
        let q = batch.padded(be, lin(x, "attention.self.query", h, h)?, h)?;
        let k = batch.padded(be, lin(x, "attention.self.key", h, h)?, h)?;
        let v = batch.padded(be, lin(x, "attention.self.value", h, h)?, h)?;
        let ctx = batch.packed(be, be.attention(&q, &k, &v, Some(&batch.mask), self.attn_shape(batch))?, h)?;
        let a = lin(&ctx, "attention.output.dense", h, h)?;
        let r1 = be.add(&a, x)?;
        drop(a);
        let h1 = be.layernorm(
            &r1,
            w("attention.output.LayerNorm.weight")?,
            w("attention.output.LayerNorm.bias")?,
            rows,
            h,
            self.eps,
        )?;
        let u = lin(&h1, "intermediate.dense", h, i)?;
        let act = be.gelu(&u, self.act)?;
        let o = lin(&act, "output.dense", i, h)?;
        let r2 = be.add(&o, &h1)?;
        drop(o);
        let y = be.layernorm(&r2, w("output.LayerNorm.weight")?, w("output.LayerNorm.bias")?, rows, h, self.eps)?;
        Ok((LayerActs { q, k, v, ctx, r1, h1, u, act, r2 }, y))
    }
}

impl PartTensors for EncoderLayer {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let shapes: [Vec<usize>; 16] = [
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h],
            vec![h],
            vec![i, h],
            vec![i],
            vec![h, i],
            vec![h],
            vec![h],
            vec![h],
        ];
        Self::TENSORS.iter().zip(shapes).map(|(n, s)| (self.name(n), s)).collect()
    }
}

impl LayerName for EncoderLayer {
    fn block_name(&self) -> String {
        format!("encoder.layer.{}", self.index)
    }
}

impl<B: Backend> LayerPart<B> for EncoderLayer {
    type Batch = Batch<B>;
    type Internals = Internals<B::Buf>;

    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Batch<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Self::Internals)> {
        let (a, y) = self.run(be, p, batch, x)?;
        Ok((y, Internals(a)))
    }

    fn internals_len(be: &B, internals: &Self::Internals) -> usize {
        let a = &internals.0;
        [&a.q, &a.k, &a.v, &a.ctx, &a.r1, &a.h1, &a.u, &a.act, &a.r2].iter().map(|b| be.len(b)).sum()
    }

    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Batch<B>,
        x: &B::Buf,
        kept: Option<Internals<B::Buf>>,
        dy: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)> {
        let (rows, h, i) = (batch.rows(), self.hidden, self.intermediate);
        let w = |rel: &str| param_buf(p, &self.name(rel));
        let a = match kept {
            Some(Internals(a)) => a,
            None => self.run(be, p, batch, x)?.0,
        };
        let shapes: BTreeMap<String, Vec<usize>> = self.param_shapes().into_iter().collect();
        let mut g = Params::new();
        let mut put = |rel: &str, buf: Option<B::Buf>| {
            let name = self.name(rel);
            let shape = shapes[&name].clone();
            grad::<B>(&mut g, name, &shape, buf);
        };

        let ln2 = be.layernorm_backward(&a.r2, w("output.LayerNorm.weight")?, dy, rows, h, self.eps)?;
        put("output.LayerNorm.weight", Some(ln2.dgamma));
        put("output.LayerNorm.bias", Some(ln2.dbeta));
        let dr2 = ln2.dx;
        let out = be.linear_backward(&a.act, w("output.dense.weight")?, &dr2, rows, i, h, true, true)?;
        put("output.dense.weight", Some(out.dw));
        put("output.dense.bias", out.db);
        let dact = out.dx.ok_or_else(|| Error::Invalid("linear_backward returned no input gradient".into()))?;
        let du = be.gelu_backward(&a.u, &dact, self.act)?;
        drop(dact);
        let inter = be.linear_backward(&a.h1, w("intermediate.dense.weight")?, &du, rows, h, i, true, true)?;
        drop(du);
        put("intermediate.dense.weight", Some(inter.dw));
        put("intermediate.dense.bias", inter.db);
        // h1 feeds both the MLP and the second residual.
        let mut dh1 = dr2;
        be.add_assign(&mut dh1, &inter.dx.ok_or_else(|| Error::Invalid("missing MLP input gradient".into()))?)?;
        let ln1 = be.layernorm_backward(&a.r1, w("attention.output.LayerNorm.weight")?, &dh1, rows, h, self.eps)?;
        drop(dh1);
        put("attention.output.LayerNorm.weight", Some(ln1.dgamma));
        put("attention.output.LayerNorm.bias", Some(ln1.dbeta));
        let dr1 = ln1.dx;
        let ao = be.linear_backward(&a.ctx, w("attention.output.dense.weight")?, &dr1, rows, h, h, true, true)?;
        put("attention.output.dense.weight", Some(ao.dw));
        put("attention.output.dense.bias", ao.db);
        let dctx = ao.dx.ok_or_else(|| Error::Invalid("missing attention output gradient".into()))?;
        let dctx = batch.padded(be, dctx, h)?;
        let att = be.attention_backward(&a.q, &a.k, &a.v, Some(&batch.mask), &dctx, self.attn_shape(batch))?;
        drop(dctx);
        // x feeds the three projections and the first residual.
        let mut dx = dr1;
        for (name, d) in
            [("attention.self.query", att.dq), ("attention.self.key", att.dk), ("attention.self.value", att.dv)]
        {
            let d = batch.packed(be, d, h)?;
            let lg = be.linear_backward(x, w(&format!("{name}.weight"))?, &d, rows, h, h, true, true)?;
            put(&format!("{name}.weight"), Some(lg.dw));
            put(&format!("{name}.bias"), lg.db);
            be.add_assign(&mut dx, &lg.dx.ok_or_else(|| Error::Invalid("missing projection input gradient".into()))?)?;
        }
        Ok((dx, g))
    }
}

/// Where a classification head's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadStyle {
    /// `BertForSequenceClassification`: `pooler.dense` (tanh) then `classifier`.
    Bert,
    /// `RobertaForSequenceClassification`: `classifier.dense` (tanh) then `classifier.out_proj`.
    Roberta,
}

/// The head's intermediate values: the [CLS] rows, the pooler before and after tanh, the logits.
struct HeadActs<Buf> {
    cls: Buf,
    pre: Buf,
    pooled: Buf,
    logits: Buf,
}

/// Pooler + classifier: `logits = W_c tanh(W_p h_[CLS] + b_p) + b_c`.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    pub style: HeadStyle,
    pub hidden: usize,
    pub num_labels: usize,
}

impl ClassifierHead {
    /// (dense weight, dense bias, output weight, output bias) names.
    pub fn names(&self) -> [&'static str; 4] {
        match self.style {
            HeadStyle::Bert => ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"],
            HeadStyle::Roberta => [
                "classifier.dense.weight",
                "classifier.dense.bias",
                "classifier.out_proj.weight",
                "classifier.out_proj.bias",
            ],
        }
    }

    fn run<B: Backend>(&self, be: &B, p: &Params<B>, batch: &Batch<B>, hidden: &B::Buf) -> Result<HeadActs<B::Buf>> {
        let [dw, db, ow, ob] = self.names();
        let h = self.hidden;
        let cls = be.embedding(hidden, &batch.cls_rows, h)?;
        let pre = be.linear(&cls, param_buf(p, dw)?, Some(param_buf(p, db)?), batch.batch, h, h)?;
        let pooled = be.tanh(&pre)?;
        let logits = be.linear(&pooled, param_buf(p, ow)?, Some(param_buf(p, ob)?), batch.batch, h, self.num_labels)?;
        Ok(HeadActs { cls, pre, pooled, logits })
    }
}

impl PartTensors for ClassifierHead {
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let [dw, db, ow, ob] = self.names();
        let (h, n) = (self.hidden, self.num_labels);
        vec![(dw.into(), vec![h, h]), (db.into(), vec![h]), (ow.into(), vec![n, h]), (ob.into(), vec![n])]
    }
}

impl<B: Backend> HeadPart<B> for ClassifierHead {
    type Batch = Batch<B>;

    /// Logits `[batch, num_labels]` from the last hidden states of the real tokens (packed).
    fn forward(&self, be: &B, p: &Params<B>, batch: &Batch<B>, hidden: &B::Buf) -> Result<B::Buf> {
        Ok(self.run(be, p, batch, hidden)?.logits)
    }

    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Batch<B>,
        hidden: &B::Buf,
        dlogits: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)> {
        let [dw, db, ow, ob] = self.names();
        let (h, n, rows) = (self.hidden, self.num_labels, batch.batch);
        let HeadActs { cls, pre, pooled, .. } = self.run(be, p, batch, hidden)?;
        let shapes = self.param_shapes();
        let mut g = Params::new();
        let out = be.linear_backward(&pooled, param_buf(p, ow)?, dlogits, rows, h, n, true, true)?;
        grad::<B>(&mut g, ow.into(), &shapes[2].1, Some(out.dw));
        grad::<B>(&mut g, ob.into(), &shapes[3].1, out.db);
        let dpooled = out.dx.ok_or_else(|| Error::Invalid("missing pooled gradient".into()))?;
        let dpre = be.tanh_backward(&pre, &dpooled)?;
        let dense = be.linear_backward(&cls, param_buf(p, dw)?, &dpre, rows, h, h, true, true)?;
        grad::<B>(&mut g, dw.into(), &shapes[0].1, Some(dense.dw));
        grad::<B>(&mut g, db.into(), &shapes[1].1, dense.db);
        let dcls = dense.dx.ok_or_else(|| Error::Invalid("missing [CLS] gradient".into()))?;
        let dhidden = be.embedding_backward(&batch.cls_rows, &dcls, batch.rows(), h)?;
        Ok((dhidden, g))
    }
}

/// One block of the chain: the embeddings, an encoder layer (`encoder.layer.N`) or the head.
pub type Block = Part<Embeddings, EncoderLayer, ClassifierHead>;

/// The embeddings and every encoder layer `config` describes, without a head.
fn encoder_blocks(config: &BertConfig) -> Vec<Block> {
    let mut blocks = vec![Block::Embedding(Embeddings {
        vocab: config.vocab_size,
        positions: config.max_position_embeddings,
        types: config.type_vocab_size,
        hidden: config.hidden_size,
        eps: config.layer_norm_eps,
    })];
    blocks.extend((0..config.num_hidden_layers).map(|index| {
        Block::Layer(EncoderLayer {
            index,
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            act: config.hidden_act,
            eps: config.layer_norm_eps,
        })
    }));
    blocks
}

/// A seeded random classifier in the family's style; a BERT checkpoint's pooler is kept.
fn new_head<B: Backend>(
    backend: &B,
    ck: &Checkpoint,
    config: &BertConfig,
    nh: NewHead,
) -> Result<(ClassifierHead, Params<B>)> {
    if nh.num_labels == 0 || nh.num_labels > MAX_CLASSES {
        return Err(Error::Invalid(format!(
            "a new classification head needs 1 to {MAX_CLASSES} labels, not {}",
            nh.num_labels
        )));
    }
    let style = match config.family {
        BertFamily::Bert => HeadStyle::Bert,
        BertFamily::Roberta => HeadStyle::Roberta,
    };
    let head = ClassifierHead { style, hidden: config.hidden_size, num_labels: nh.num_labels };
    let mut p = Params::new();
    let [dense_w, ..] = head.names();
    let keep_pooler = style == HeadStyle::Bert && ck.resolve(dense_w).is_some();
    for (i, (name, shape)) in head.param_shapes().into_iter().enumerate() {
        let buf = if i < 2 && keep_pooler {
            load_tensor(backend, ck, &name, &shape)?
        } else {
            backend.upload(&init_values(&name, &shape, nh.seed, config.initializer_range))?
        };
        p.insert(name, Param { shape, buf });
    }
    tracing::info!(
        "new {}-label classification head (seed {}, pooler {})",
        nh.num_labels,
        nh.seed,
        if keep_pooler { "from the checkpoint" } else { "new" }
    );
    Ok((head, p))
}

/// The checkpoint's own classifier (BERT or RoBERTa style), checked against config.json's
/// labels; none for a bare encoder.
fn stored_head<B: Backend>(
    backend: &B,
    ck: &Checkpoint,
    config: &BertConfig,
) -> Result<Option<(ClassifierHead, Params<B>)>> {
    let style = if ck.resolve("classifier.out_proj.weight").is_some() {
        HeadStyle::Roberta
    } else if ck.resolve("classifier.weight").is_some() {
        HeadStyle::Bert
    } else {
        return Ok(None);
    };
    let [_, _, out_w, _] = ClassifierHead { style, hidden: 0, num_labels: 0 }.names();
    let meta = ck.resolve(out_w).ok_or_else(|| Error::Invalid(format!("`{out_w}` vanished")))?;
    let num_labels = match meta.shape.as_slice() {
        [n, h] if *h == config.hidden_size && *n > 0 => *n,
        other => {
            return Err(Error::Model {
                path: ck.file_of(meta).to_path_buf(),
                reason: format!(
                    "tensor `{}` has shape {other:?}, expected [num_labels, {}]",
                    meta.name, config.hidden_size
                ),
            });
        }
    };
    check_problem_type(ck, config, &meta.name, num_labels)?;
    if let Some(names) = config.label2id.as_ref().filter(|m| m.len() != num_labels) {
        return Err(Error::Model {
            path: ck.dir.join("config.json"),
            reason: format!(
                "label2id names {} classes, but the classifier `{}` has {num_labels}",
                names.len(),
                meta.name
            ),
        });
    }
    let head = ClassifierHead { style, hidden: config.hidden_size, num_labels };
    let mut p = Params::new();
    for (name, shape) in head.param_shapes() {
        let buf = load_tensor(backend, ck, &name, &shape)?;
        p.insert(name, Param { shape, buf });
    }
    Ok(Some((head, p)))
}

/// Heads are scored as single-label classifiers (softmax, argmax): a regression head (what
/// transformers makes of one output) or a multi-label one (sigmoids) would be scored wrongly
/// without a word (fuzzing round 8), so they are refused.
fn check_problem_type(ck: &Checkpoint, config: &BertConfig, head: &str, num_labels: usize) -> Result<()> {
    let reason = match config.problem_type.as_deref() {
        None | Some("single_label_classification") if num_labels > 1 => return Ok(()),
        None | Some("single_label_classification") => format!(
            "the classifier `{head}` has one output, which transformers reads as a regression head; only \
             single-label classifiers (two or more classes) are supported"
        ),
        Some(p @ ("regression" | "multi_label_classification")) => {
            format!("field `problem_type`: `{p}` heads are not supported (single_label_classification)")
        }
        Some(p) => format!("field `problem_type`: unknown `{p}` (single_label_classification)"),
    };
    Err(Error::Model { path: ck.dir.join("config.json"), reason })
}

/// Most labels a classification head may have: far beyond any real task, far below what a
/// typo or a stray id (`label: 4000000000`) would make the head allocate.
pub const MAX_CLASSES: usize = 1 << 20;

/// A freshly initialised classification head, for fine-tuning from a bare encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewHead {
    pub num_labels: usize,
    pub seed: u64,
}

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Replace (or add) the classifier with a seeded random one. The pooler is kept when the
    /// checkpoint has one (a pretrained `BertModel` does).
    pub new_head: Option<NewHead>,
}

/// A BERT-family encoder with an optional classification head, its weights on a backend.
pub struct Bert<B: Backend> {
    pub config: BertConfig,
    /// The checkpoint this came from (for messages).
    pub path: PathBuf,
    pub blocks: Vec<Block>,
    /// One parameter map per block, aligned with `blocks`.
    pub params: Vec<Params<B>>,
    pub backend: B,
}

impl<B: Backend> Bert<B> {
    /// Loads `config.json` and the weights of a `BertModel`, `BertForSequenceClassification` or the
    /// RoBERTa equivalents from a model directory (or safetensors file).
    pub fn load(backend: B, path: &Path, opts: LoadOptions) -> Result<Self> {
        Self::load_partial(backend, path, opts, 0)
    }

    /// [`Bert::load`] leaving the parameters of the first `skip_blocks` encoder blocks unloaded
    /// (empty maps): for adaptation, which streams those from the checkpoints itself.
    pub fn load_partial(backend: B, path: &Path, opts: LoadOptions, skip_blocks: usize) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let config_path = ck.dir.join("config.json");
        let cfg_json = ck.config.as_ref().ok_or_else(|| Error::Model {
            path: config_path.clone(),
            reason: "config.json is missing (needed for the architecture)".into(),
        })?;
        let config = BertConfig::from_json(cfg_json, &config_path)?;
        super::check_layer_count(&ck, config.num_hidden_layers, "num_hidden_layers")?;
        let mut blocks = encoder_blocks(&config);
        let mut params = chain::load_params(&backend, &ck, &blocks, skip_blocks)?;
        let head = match opts.new_head {
            Some(nh) => Some(new_head(&backend, &ck, &config, nh)?),
            None => stored_head(&backend, &ck, &config)?,
        };
        if let Some((head, p)) = head {
            blocks.push(Block::Head(head));
            params.push(p);
        }
        // A head replaced by a new one (--new-head) is unread on purpose, and so is the pooler of
        // an encoder loaded without a head (a bare base model: its heads come from the experts).
        let has_head = matches!(blocks.last(), Some(Block::Head(_)));
        let dropped_on_purpose = |n: &str| {
            (opts.new_head.is_some() && n.starts_with("classifier."))
                || (!has_head && (n.starts_with("pooler.") || n.contains(".pooler.")))
        };
        let names = blocks.iter().flat_map(|b| b.param_shapes()).map(|(n, _)| n);
        chain::warn_unread(&ck, names, dropped_on_purpose, &format!("a {:?}-family encoder", config.family));
        tracing::debug!(
            "loaded {:?}-family model: {} layers, hidden {}, {} blocks, from {}",
            config.family,
            config.num_hidden_layers,
            config.hidden_size,
            blocks.len(),
            ck.path.display()
        );
        Ok(Bert { config, path: ck.path.clone(), blocks, params, backend })
    }

    /// The classification head, if the model has one.
    pub fn head(&self) -> Option<&ClassifierHead> {
        match self.blocks.last() {
            Some(Block::Head(h)) => Some(h),
            _ => None,
        }
    }

    pub fn num_labels(&self) -> Option<usize> {
        self.head().map(|h| h.num_labels)
    }

    /// A parameter by name, from whichever block holds it.
    pub fn param(&self, name: &str) -> Option<&Param<B>> {
        chain::param(&self.params, name)
    }

    /// Replaces a parameter's values (same shape), e.g. to install given head weights.
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<()> {
        chain::set_param(&self.backend, &mut self.params, name, values)
    }

    /// Puts `other`'s classification head (pooler and classifier, and its label names) on this
    /// encoder: how every merge method is evaluated, each task with its own head on the merged
    /// encoder. The hidden sizes must agree.
    pub fn use_head_of(&mut self, other: Bert<B>) -> Result<()> {
        let Bert { config, path, mut blocks, mut params, .. } = other;
        let (Some(Block::Head(head)), Some(head_params)) = (blocks.pop(), params.pop()) else {
            return Err(Error::Model { path, reason: "no classification head to take".into() });
        };
        if head.hidden != self.config.hidden_size {
            return Err(Error::Model {
                path,
                reason: format!(
                    "head of hidden size {} cannot sit on an encoder of {}",
                    head.hidden, self.config.hidden_size
                ),
            });
        }
        if self.head().is_some() {
            self.blocks.pop();
            self.params.pop();
        }
        self.blocks.push(Block::Head(head));
        self.params.push(head_params);
        self.config.label2id = config.label2id;
        Ok(())
    }

    /// Uploads a tokenized batch, with the family's position ids.
    pub fn batch(&self, enc: &Encoded) -> Result<Batch<B>> {
        let be = &self.backend;
        let (n, s) = (enc.batch, enc.seq);
        if enc.input_ids.len() != n * s || enc.token_type_ids.len() != n * s || enc.attention_mask.len() != n * s {
            return Err(Error::Invalid(format!("encoded batch arrays do not match its shape [{n}, {s}]")));
        }
        if s > self.config.max_seq_len() {
            return Err(Error::Invalid(format!(
                "sequences of {s} tokens exceed the model's {} positions; use a smaller maximum length",
                self.config.max_seq_len()
            )));
        }
        if let Some(&t) = enc.token_type_ids.iter().find(|&&t| t as usize >= self.config.type_vocab_size) {
            return Err(Error::Invalid(format!(
                "token type {t} is outside the model's {} token types",
                self.config.type_vocab_size
            )));
        }
        let positions = self.position_ids(enc);
        let real = |i: usize| enc.attention_mask[i] != 0;
        let padded_rows: Vec<u32> = (0..n * s).filter(|&i| real(i)).map(|i| i as u32).collect();
        let mut cls = Vec::with_capacity(n);
        for b in 0..n {
            // Fuzzing round 8: an empty text under a tokenizer that adds no [CLS] indexed past
            // an empty batch (a panic) or was called left padding.
            if !(0..s).any(|t| real(b * s + t)) {
                return Err(Error::Invalid(
                    "a text has no tokens (it is empty, or holds only what the tokenizer drops, and the \
                     tokenizer adds no [CLS]): a classifier needs at least one token per text"
                        .into(),
                ));
            }
            // Packed index of the sequence's first token, which must be real ([CLS]).
            if !real(b * s) {
                return Err(Error::Invalid(format!("sequence {b} of the batch starts with padding (left padding)")));
            }
            cls.push(padded_rows.partition_point(|&r| (r as usize) < b * s) as u32);
        }
        let pick = |v: &[u32]| -> Vec<u32> { padded_rows.iter().map(|&r| v[r as usize]).collect() };
        let mask: Vec<f32> = enc.attention_mask.iter().map(|&m| if m != 0 { 1.0 } else { 0.0 }).collect();
        let tokens = padded_rows.len();
        let (ids, types, positions) = (pick(&enc.input_ids), pick(&enc.token_type_ids), pick(&positions));
        let lookups = [(Embeddings::WORD, &ids), (Embeddings::POS, &positions), (Embeddings::TYPE, &types)]
            .iter()
            .map(|(name, v)| (name.to_string(), super::distinct_rows(v)))
            .collect();
        Ok(Batch {
            batch: n,
            seq: s,
            tokens,
            input_ids: be.upload_ids(&ids)?,
            token_type_ids: be.upload_ids(&types)?,
            position_ids: be.upload_ids(&positions)?,
            mask: be.upload(&mask)?,
            padded_rows: if tokens == n * s { None } else { Some(be.upload_ids(&padded_rows)?) },
            cls_rows: be.upload_ids(&cls)?,
            lookups,
        })
    }

    /// Position ids of every padded slot, as the family numbers them.
    fn position_ids(&self, enc: &Encoded) -> Vec<u32> {
        let (n, s) = (enc.batch, enc.seq);
        let offset = self.config.position_offset() as u32;
        let mut positions = vec![0u32; n * s];
        for (prow, mrow) in positions.chunks_mut(s.max(1)).zip(enc.attention_mask.chunks(s.max(1))) {
            match self.config.family {
                BertFamily::Bert => prow.iter_mut().enumerate().for_each(|(i, p)| *p = i as u32),
                // Hugging Face's create_position_ids_from_input_ids: real tokens count up from
                // pad + 1, padding sits at pad.
                BertFamily::Roberta => {
                    let mut c = 0;
                    for (p, &m) in prow.iter_mut().zip(mrow) {
                        if m != 0 {
                            c += 1;
                            *p = offset - 1 + c;
                        } else {
                            *p = offset - 1;
                        }
                    }
                }
            }
        }
        positions
    }

    /// Last hidden states `[batch * seq, hidden]` (no head), padding rows zero.
    pub fn hidden_states(&self, batch: &Batch<B>) -> Result<B::Buf> {
        let packed = self.packed_hidden_states(batch)?;
        batch.padded(&self.backend, packed, self.config.hidden_size)
    }

    /// Last hidden states of the real tokens, `[batch.tokens, hidden]`.
    fn packed_hidden_states(&self, batch: &Batch<B>) -> Result<B::Buf> {
        let encoder = self.blocks.iter().take_while(|b| !matches!(b, Block::Head(_))).count();
        chain::forward(&self.backend, &self.blocks[..encoder], &self.params, batch)
    }

    fn no_head(&self) -> Error {
        Error::Model {
            path: self.path.clone(),
            reason: "no classification head (classifier.weight); load it with a new head to add one".into(),
        }
    }

    /// Logits `[batch, num_labels]` (inference: nothing is kept).
    pub fn logits(&self, batch: &Batch<B>) -> Result<B::Buf> {
        let head = self.head().ok_or_else(|| self.no_head())?;
        let hidden = self.packed_hidden_states(batch)?;
        let last = self.params.len() - 1;
        head.forward(&self.backend, &self.params[last], batch, &hidden)
    }

    /// Logits plus each block's input, for [`Bert::backward`].
    pub fn forward_saving(&self, batch: &Batch<B>) -> Result<(B::Buf, Saved<B>)> {
        if self.head().is_none() {
            return Err(self.no_head());
        }
        chain::forward_saving(&self.backend, &self.blocks, &self.params, batch)
    }

    /// Gradients of every block's parameters (aligned with `blocks`) given `dL/dlogits`
    /// ([`chain::backward`]).
    pub fn backward(&self, batch: &Batch<B>, saved: Saved<B>, dlogits: &B::Buf) -> Result<Vec<Params<B>>> {
        chain::backward(&self.backend, &self.blocks, &self.params, batch, saved, dlogits)
    }

    /// Mean soft-label cross-entropy of the batch against `targets` (`[batch, num_labels]`
    /// probabilities) and its gradient for every block.
    pub fn soft_ce_grads(&self, batch: &Batch<B>, targets: &B::Buf) -> Result<(f32, Vec<Params<B>>)> {
        let n = self.num_labels().ok_or_else(|| self.no_head())?;
        let be = &self.backend;
        let (logits, saved) = self.forward_saving(batch)?;
        let loss = be.download(&be.soft_ce(&logits, targets, batch.batch, n)?)?;
        let dlogits = be.soft_ce_backward(&logits, targets, batch.batch, n, 1.0)?;
        drop(logits);
        let grads = self.backward(batch, saved, &dlogits)?;
        Ok((loss.first().copied().unwrap_or(f32::NAN), grads))
    }
}

/// Hugging Face's init for a new head: weights ~ N(0, std), biases 0. Seeded per tensor name
/// (counter-based Philox), so the same seed gives the same head on any machine.
fn init_values(name: &str, shape: &[usize], seed: u64, std: f32) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    let mut u = vec![0f32; 2 * n];
    ElementStream::new(seed, name_hash(name), 0).fill_uniform(0, &mut u);
    // Box-Muller; 1 - u lies in (0, 1], so the log is finite.
    u.chunks(2)
        .map(|c| {
            let r = (-2.0 * (1.0 - c[0] as f64).ln()).sqrt();
            (r * (std::f64::consts::TAU * c[1] as f64).cos()) as f32 * std
        })
        .collect()
}
