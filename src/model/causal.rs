//! What every causal-LM family shares: the family trait ([`LmArch`]), the model ([`LmModel`]: a
//! chain of the family's blocks with its config), the batch of next-token targets ([`LmBatch`]),
//! the expert's top-k targets, and the registry that picks a family from `config.json`.
//!
//! A new causal-LM family is one model file (its config reader, its blocks, `impl LmArch`) and
//! one line in each of [`LmKind`], [`LmKind::of`] and [`crate::with_lm_arch!`]: evaluation, label
//! caching, fine-tuning, adaptation and saving are written once over [`LmArch`].
//!
//! With tied embeddings the head's weight *is* the token table: the embedding block and the head
//! each hold a copy under that name and each report a gradient for it; the gradient of the tensor
//! is their sum ([`LmModel::total_grads`]), and [`LmModel::set_param`] updates both copies.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chain::{self, ChainBlock, Part, Saved};
use super::tokenize::Encoded;
use super::{Param, Params};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::labels::TopKLabels;

/// A causal-LM family's `config.json`: what the shared code needs to know of it.
pub trait LmConfig: Clone + Debug + Send + Sync + Sized + 'static {
    /// The family in messages, with the `model_type`s it takes: "Llama family (llama, mistral, qwen2)".
    const FAMILY: &'static str;
    /// Whether `config` (a `config.json` value) is one of this family's.
    fn detects(config: &Value) -> bool;
    /// Parses `config.json`; `path` is for messages. Fields that would change the math in a way
    /// the blocks do not implement are errors naming the field.
    fn from_json(v: &Value, path: &Path) -> Result<Self>;
    fn vocab_size(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// The longest sequence the model runs exactly, and what sets it (a sliding attention window
    /// that is not implemented, a learned position table's length); `None` for no limit.
    fn max_tokens(&self) -> Option<(usize, &'static str)>;
    /// Whether the head reads the token embedding's table.
    fn tied(&self) -> bool;
    fn set_tied(&mut self, tied: bool);
    /// A short description for logs: "Qwen2, 24 layers, hidden 896".
    fn describe(&self) -> String;
}

/// A causal-LM family on a backend: its chain of blocks.
pub trait LmArch<B: Backend>: LmConfig {
    type Block: ChainBlock<B, Batch = LmBatch<B>> + Debug + Send + Sync;
    /// The chain (the embedding, one block per layer, the head) of a model with this config,
    /// stored in `ck`; an error when `ck` lacks what the config implies (an untied head's weight).
    fn chain(&self, ck: &Checkpoint) -> Result<Vec<Self::Block>>;
    /// `block` reading its own head weight when it is a head tied to the embedding, that weight
    /// moved in `params` to its untied name; other blocks as they are.
    fn untie(block: &Self::Block, params: &mut Params<B>) -> Self::Block;
}

/// A causal LM's head that can read the token table as its projection (tied embeddings).
pub trait TiedHead: Sized {
    /// When the head reads the token table: the same head reading its own weight, the table's
    /// name and the own weight's name.
    fn untied(&self) -> Option<(Self, String, String)>;
}

/// [`LmArch::untie`] for a chain of [`Part`]s: a tied head untied, its weight moved in `params`
/// to the untied name; other blocks as they are.
pub fn untie_head<B: Backend, E: Clone, L: Clone, H: TiedHead + Clone>(
    block: &Part<E, L, H>,
    params: &mut Params<B>,
) -> Part<E, L, H> {
    let Part::Head(head) = block else { return block.clone() };
    let Some((own, tied, untied)) = head.untied() else { return block.clone() };
    if let Some(w) = params.remove(&tied) {
        params.insert(untied, w);
    }
    Part::Head(own)
}

/// The causal-LM families we run: the registry [`crate::with_lm_arch!`] dispatches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmKind {
    Llama,
    Gpt2,
}

impl LmKind {
    /// The family of a `config.json` value; `None` when it is not a causal LM we run.
    pub fn of(config: &Value) -> Option<Self> {
        if super::LlamaConfig::detects(config) {
            Some(LmKind::Llama)
        } else if super::Gpt2Config::detects(config) {
            Some(LmKind::Gpt2)
        } else {
            None
        }
    }

    /// The family of the model directory (or safetensors file) at `path`, from its `config.json`
    /// alone; `None` when there is none or it is not a causal LM we run.
    pub fn of_dir(path: &Path) -> Result<Option<Self>> {
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        let cfg = dir.join("config.json");
        if !cfg.is_file() {
            return Ok(None);
        }
        let text = crate::input_file::read_to_string(&cfg)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model { path: cfg.clone(), reason: format!("not valid JSON: {e}") })?;
        Ok(Self::of(&v))
    }

    /// Every family, for messages: "Llama family (llama, mistral, qwen2) or GPT-2 (gpt2)".
    pub fn all() -> String {
        format!("{} or {}", super::LlamaConfig::FAMILY, super::Gpt2Config::FAMILY)
    }
}

/// Runs `$body` with `$A` the [`LmArch`] type of a [`LmKind`] (the registry's dispatch: one arm
/// per family).
#[macro_export]
macro_rules! with_lm_arch {
    ($kind:expr, $A:ident => $body:expr) => {
        match $kind {
            $crate::model::LmKind::Llama => {
                type $A = $crate::model::LlamaConfig;
                $body
            }
            $crate::model::LmKind::Gpt2 => {
                type $A = $crate::model::Gpt2Config;
                $body
            }
        }
    };
}

/// An expert's top-k labels for a batch's next-token positions, on the device.
pub struct TopKTargets<B: Backend> {
    pub positions: usize,
    pub k: usize,
    pub ids: B::Ids,
    pub probs: B::Buf,
    pub rest: B::Buf,
}

impl<B: Backend> TopKTargets<B> {
    /// Uploads `labels`, which must hold one position per next-token target of `batch`.
    pub fn upload(be: &B, batch: &LmBatch<B>, labels: &TopKLabels) -> Result<Self> {
        if labels.positions() != batch.labels.len() {
            return Err(Error::Invalid(format!(
                "the top-k labels hold {} positions but the batch has {} next-token targets (were they cached with \
                 another tokenizer or maximum length?)",
                labels.positions(),
                batch.labels.len()
            )));
        }
        if labels.positions() == 0 {
            return Err(Error::Invalid("no next-token targets: every sequence has fewer than two tokens".into()));
        }
        Ok(TopKTargets {
            positions: labels.positions(),
            k: labels.k,
            ids: be.upload_ids(&labels.ids)?,
            probs: be.upload(&labels.probs)?,
            rest: be.upload(&labels.rest)?,
        })
    }

    /// The mean loss over the positions of `picked` (`[positions, vocab]` logits).
    pub fn loss(&self, be: &B, picked: &B::Buf, vocab: usize) -> Result<f32> {
        let l =
            be.download(&be.topk_ce(picked, &self.ids, &self.probs, &self.rest, self.positions, vocab, self.k)?)?;
        l.first().copied().ok_or_else(|| Error::Invalid("the loss op returned nothing".into()))
    }

    /// Gradient of [`TopKTargets::loss`] wrt `picked`, times `scale`.
    pub fn backward(&self, be: &B, picked: &B::Buf, vocab: usize, scale: f32) -> Result<B::Buf> {
        be.topk_ce_backward(picked, &self.ids, &self.probs, &self.rest, self.positions, vocab, self.k, scale)
    }
}

/// One batch of right-padded sequences on the device, packed as BERT's are (see
/// [`super::bert::Batch`]): activations hold the real tokens only, sequence after sequence, and
/// only attention sees the padded `[batch, seq]` layout. With the next-token targets of the loss.
pub struct LmBatch<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    /// Number of real tokens: the activations' row count.
    pub tokens: usize,
    /// Per real token, in packed order.
    pub input_ids: B::Ids,
    /// Each real token's position in its sequence (right padding leaves them as if alone).
    pub positions: B::Ids,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding.
    pub mask: B::Buf,
    /// Each real token's row in the padded layout; `None` when nothing is padded.
    pub padded_rows: Option<B::Ids>,
    /// Packed rows of the tokens whose next token is real: where the loss is taken.
    pub label_rows: B::Ids,
    /// The next token of each of `label_rows`, on the host.
    pub labels: Vec<u32>,
    /// The rows of the token embedding the batch reads (sorted, unique).
    pub embedding_rows: Vec<u32>,
    /// The rows of a learned position table the batch reads (sorted, unique).
    pub position_rows: Vec<u32>,
}

impl<B: Backend> LmBatch<B> {
    /// Uploads a right-padded tokenized batch and its next-token targets, checking its ids against
    /// a vocabulary of `vocab` and its length against `max_tokens` (see [`LmConfig::max_tokens`]).
    pub fn upload(be: &B, enc: &Encoded, vocab: usize, max_tokens: Option<(usize, &str)>) -> Result<Self> {
        let (n, s) = (enc.batch, enc.seq);
        if enc.input_ids.len() != n * s || enc.attention_mask.len() != n * s {
            return Err(Error::Invalid(format!("encoded batch arrays do not match its shape [{n}, {s}]")));
        }
        if let Some((w, what)) = max_tokens
            && s > w
        {
            return Err(Error::Invalid(format!(
                "sequences of {s} tokens exceed the model's {what} of {w} tokens; use a maximum length of at most {w}"
            )));
        }
        if let Some((i, &id)) = enc.input_ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {id} (sequence {}, position {}) is outside the model's vocabulary of {vocab}",
                i / s,
                i % s
            )));
        }
        let (mut label_rows, mut labels, mut padded_rows) = (Vec::new(), Vec::new(), Vec::new());
        for (b, m) in enc.attention_mask.chunks(s.max(1)).enumerate() {
            let len = m.iter().take_while(|&&v| v != 0).count();
            if m[len..].iter().any(|&v| v != 0) {
                return Err(Error::Invalid(format!(
                    "sequence {b} is not right-padded (its attention mask has a real token after padding)"
                )));
            }
            for t in 0..len.saturating_sub(1) {
                label_rows.push((padded_rows.len() + t) as u32);
                labels.push(enc.input_ids[b * s + t + 1]);
            }
            padded_rows.extend((b * s..b * s + len).map(|r| r as u32));
        }
        let ids: Vec<u32> = padded_rows.iter().map(|&r| enc.input_ids[r as usize]).collect();
        let positions: Vec<u32> = padded_rows.iter().map(|&r| r % s.max(1) as u32).collect();
        let mask: Vec<f32> = enc.attention_mask.iter().map(|&m| if m != 0 { 1.0 } else { 0.0 }).collect();
        let tokens = padded_rows.len();
        Ok(LmBatch {
            batch: n,
            seq: s,
            tokens,
            input_ids: be.upload_ids(&ids)?,
            embedding_rows: super::distinct_rows(&ids),
            position_rows: super::distinct_rows(&positions),
            positions: be.upload_ids(&positions)?,
            mask: be.upload(&mask)?,
            padded_rows: if tokens == n * s { None } else { Some(be.upload_ids(&padded_rows)?) },
            label_rows: be.upload_ids(&label_rows)?,
            labels,
        })
    }

    /// Number of activation rows: the real tokens.
    pub fn rows(&self) -> usize {
        self.tokens
    }

    /// Packed rows `x` (`[tokens, width]`) in the padded layout, padding rows zero.
    pub fn padded(&self, be: &B, x: B::Buf, width: usize) -> Result<B::Buf> {
        super::to_padded(be, self.padded_rows.as_ref(), self.batch * self.seq, x, width)
    }

    /// Padded rows `x` packed: the real tokens' rows only.
    pub fn packed(&self, be: &B, x: B::Buf, width: usize) -> Result<B::Buf> {
        super::to_packed(be, self.padded_rows.as_ref(), x, width)
    }
}

/// Whether `ck` stores an `lm_head.weight` other than the token table its tied head reads
/// (`blocks`, the chain of a tied config): transformers 5 then loads the stored head and unties
/// ("both are present ... we will NOT tie them"), and so do we, or eval, adapt and finetune would
/// run another model than it (merges of a tied base with untied experts are such checkpoints).
/// The table is the one weight both the first block and the head read.
fn stored_head_differs<B: Backend, C: ChainBlock<B>>(ck: &Checkpoint, blocks: &[C]) -> bool {
    let Some(head) = ck.resolve("lm_head.weight") else { return false };
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else { return true };
    let table_names = first.param_shapes();
    let table = last.param_shapes().into_iter().find(|(n, _)| table_names.iter().any(|(m, _)| m == n));
    match table.and_then(|(n, _)| ck.resolve(&n)) {
        Some(t) => t.dtype != head.dtype || t.shape != head.shape || ck.bytes(t) != ck.bytes(head),
        None => true,
    }
}

/// A causal LM of family `A`, its weights on a backend.
pub struct LmModel<B: Backend, A: LmArch<B>> {
    pub config: A,
    /// The checkpoint this came from (for messages).
    pub path: PathBuf,
    pub blocks: Vec<A::Block>,
    /// One parameter map per block, aligned with `blocks`.
    pub params: Vec<Params<B>>,
    pub backend: B,
}

/// A checkpoint whose `architectures` names only another head (`LlamaForSequenceClassification`
/// and the like) is not a causal LM: with tied embeddings it ran as one, its `score` head
/// dropped without a word (fuzzing round 8).
fn check_lm_head(cfg: &serde_json::Value, config_path: &Path) -> Result<()> {
    const OTHER_HEADS: [&str; 4] =
        ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice"];
    let archs: Vec<&str> =
        cfg.get("architectures").and_then(|a| a.as_array()).into_iter().flatten().filter_map(|a| a.as_str()).collect();
    let lm = |a: &&str| a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel") || a.ends_with("Model");
    match archs.iter().find(|a| OTHER_HEADS.iter().any(|h| a.ends_with(h))) {
        Some(other) if !archs.iter().any(lm) => Err(Error::Model {
            path: config_path.to_path_buf(),
            reason: format!(
                "field `architectures`: `{other}` is not a causal LM (its own head is not supported here); \
                 a causal LM's config names a `...ForCausalLM` architecture"
            ),
        }),
        _ => Ok(()),
    }
}

impl<B: Backend, A: LmArch<B>> LmModel<B, A> {
    /// Loads `config.json` and the weights of a model directory (or safetensors file).
    pub fn load(backend: B, path: &Path) -> Result<Self> {
        Self::load_partial(backend, path, 0)
    }

    /// [`LmModel::load`] leaving the parameters of the first `skip_blocks` blocks unloaded (empty
    /// maps): for adaptation, which streams those from the checkpoints itself.
    pub fn load_partial(backend: B, path: &Path, skip_blocks: usize) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let config_path = ck.dir.join("config.json");
        let cfg_json = ck.config.as_ref().ok_or_else(|| Error::Model {
            path: config_path.clone(),
            reason: "config.json is missing (needed for the architecture)".into(),
        })?;
        check_lm_head(cfg_json, &config_path)?;
        let mut config = A::from_json(cfg_json, &config_path)?;
        let mut blocks = config.chain(&ck)?;
        if config.tied() && stored_head_differs(&ck, &blocks) {
            tracing::info!(
                "{}: config.json sets tie_word_embeddings but the checkpoint stores its own `lm_head.weight`; \
                 using the stored head, as transformers does",
                ck.path.display()
            );
            config.set_tied(false);
            blocks = config.chain(&ck)?;
        }
        let params = chain::load_params(&backend, &ck, &blocks, skip_blocks)?;
        // A tied model may store its head too (equal to the embedding): not an unread weight.
        let tied_head = |n: &str| config.tied() && n.ends_with("lm_head.weight");
        let names = blocks.iter().flat_map(|b| b.param_shapes()).map(|(n, _)| n);
        chain::warn_unread(&ck, names, tied_head, &format!("a causal LM ({})", config.describe()));
        tracing::debug!("loaded causal LM ({}) from {}", config.describe(), ck.path.display());
        Ok(LmModel { config, path: ck.path.clone(), blocks, params, backend })
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.config.vocab_size()
    }

    /// A parameter by name, from the first block that holds it.
    pub fn param(&self, name: &str) -> Option<&Param<B>> {
        chain::param(&self.params, name)
    }

    /// Replaces a parameter's values (same shape) in every block that holds it (both copies of a
    /// tied embedding).
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<()> {
        chain::set_param(&self.backend, &mut self.params, name, values)
    }

    /// Uploads a right-padded tokenized batch and its next-token targets.
    pub fn batch(&self, enc: &Encoded) -> Result<LmBatch<B>> {
        LmBatch::upload(&self.backend, enc, self.vocab(), self.config.max_tokens())
    }

    /// Logits `[batch.tokens, vocab]` of the real tokens, sequence after sequence (the packed
    /// layout; inference: nothing is kept).
    pub fn logits(&self, batch: &LmBatch<B>) -> Result<B::Buf> {
        chain::forward(&self.backend, &self.blocks, &self.params, batch)
    }

    /// Logits plus each block's input, for [`LmModel::backward`].
    pub fn forward_saving(&self, batch: &LmBatch<B>) -> Result<(B::Buf, Saved<B>)> {
        chain::forward_saving(&self.backend, &self.blocks, &self.params, batch)
    }

    /// Gradients of every block's parameters (aligned with `blocks`) given `dL/dlogits`
    /// ([`chain::backward`]).
    pub fn backward(&self, batch: &LmBatch<B>, saved: Saved<B>, dlogits: &B::Buf) -> Result<Vec<Params<B>>> {
        chain::backward(&self.backend, &self.blocks, &self.params, batch, saved, dlogits)
    }

    /// The rows of `logits` the loss reads, and one-hot targets for them: the loss runs on the
    /// backend's existing row gather and soft-label cross-entropy, at the cost of a `[targets,
    /// vocab]` host-built buffer the size of the picked logits (a sparse-label op would avoid it).
    fn picked(&self, batch: &LmBatch<B>, logits: &B::Buf) -> Result<(B::Buf, B::Buf)> {
        let (n, vocab) = (batch.labels.len(), self.vocab());
        if n == 0 {
            return Err(Error::Invalid("no next-token targets: every sequence has fewer than two tokens".into()));
        }
        let picked = self.backend.embedding(logits, &batch.label_rows, vocab)?;
        let mut onehot = vec![0f32; n * vocab];
        for (row, &t) in onehot.chunks_mut(vocab).zip(&batch.labels) {
            row[t as usize] = 1.0;
        }
        Ok((picked, self.backend.upload(&onehot)?))
    }

    /// Mean next-token cross-entropy over the batch's real tokens (each sequence's last token has
    /// no target).
    pub fn lm_loss(&self, batch: &LmBatch<B>) -> Result<f32> {
        let logits = self.logits(batch)?;
        let (picked, targets) = self.picked(batch, &logits)?;
        let n = batch.labels.len();
        let loss = self.backend.download(&self.backend.soft_ce(&picked, &targets, n, self.vocab())?)?;
        loss.first().copied().ok_or_else(|| Error::Invalid("the loss op returned nothing".into()))
    }

    /// [`LmModel::lm_loss`] and its gradient for every block (aligned with `blocks`; see
    /// [`LmModel::total_grads`] for one gradient per tensor).
    pub fn lm_loss_grads(&self, batch: &LmBatch<B>) -> Result<(f32, Vec<Params<B>>)> {
        let be = &self.backend;
        let (n, vocab) = (batch.labels.len(), self.vocab());
        let (logits, saved) = self.forward_saving(batch)?;
        let (picked, targets) = self.picked(batch, &logits)?;
        drop(logits);
        let loss = be.download(&be.soft_ce(&picked, &targets, n, vocab)?)?;
        let dpicked = be.soft_ce_backward(&picked, &targets, n, vocab, 1.0)?;
        drop((picked, targets));
        let dlogits = be.embedding_backward(&batch.label_rows, &dpicked, batch.rows(), vocab)?;
        drop(dpicked);
        let grads = self.backward(batch, saved, &dlogits)?;
        Ok((loss.first().copied().unwrap_or(f32::NAN), grads))
    }

    /// Mean cross-entropy of the next-token distributions against an expert's top-k labels (one
    /// position per next-token target of `batch`, in its order), with the expert's remaining mass
    /// as a catch-all bucket: see [`Backend::topk_ce`].
    pub fn topk_loss(&self, batch: &LmBatch<B>, labels: &TopKLabels) -> Result<f32> {
        let picked = self.backend.embedding(&self.logits(batch)?, &batch.label_rows, self.vocab())?;
        let t = TopKTargets::upload(&self.backend, batch, labels)?;
        t.loss(&self.backend, &picked, self.vocab())
    }

    /// [`LmModel::topk_loss`] and its gradient for every block (aligned with `blocks`).
    pub fn topk_loss_grads(&self, batch: &LmBatch<B>, labels: &TopKLabels) -> Result<(f32, Vec<Params<B>>)> {
        let (be, vocab) = (&self.backend, self.vocab());
        let t = TopKTargets::upload(be, batch, labels)?;
        let (logits, saved) = self.forward_saving(batch)?;
        let picked = be.embedding(&logits, &batch.label_rows, vocab)?;
        drop(logits);
        let loss = t.loss(be, &picked, vocab)?;
        let dpicked = t.backward(be, &picked, vocab, 1.0)?;
        drop(picked);
        let dlogits = be.embedding_backward(&batch.label_rows, &dpicked, batch.rows(), vocab)?;
        drop(dpicked);
        Ok((loss, self.backward(batch, saved, &dlogits)?))
    }

    /// One gradient per tensor name: per-block gradients with a tied embedding's two summed.
    pub fn total_grads(&self, grads: Vec<Params<B>>) -> Result<Params<B>> {
        let mut out = Params::new();
        for g in grads {
            for (name, t) in g {
                match out.get_mut(&name) {
                    Some(acc) => self.backend.add_assign(&mut acc.buf, &t.buf)?,
                    None => {
                        out.insert(name, t);
                    }
                }
            }
        }
        Ok(out)
    }
}
