//! Batched evaluation of a causal LM: mean next-token loss, perplexity and top-1 next-token
//! accuracy over texts.

use std::path::Path;

use serde_json::Value;

use super::causal::{LmArch, LmBatch, LmKind, LmModel};
use super::llama_config::LlamaConfig;
use super::tokenize::TextTokenizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::logits::{argmax, logsumexp};

/// Whether `config.json` (a value) describes a causal LM we run, rather than a classifier.
pub fn is_causal_lm(config: &Value) -> bool {
    LmKind::of(config).is_some()
}

/// Whether the model directory (or safetensors file) at `path` holds a causal LM: reads only its
/// `config.json`; `false` when there is none.
pub fn is_causal_lm_dir(path: &Path) -> Result<bool> {
    Ok(LmKind::of_dir(path)?.is_some())
}

/// A causal LM with its tokenizer.
pub struct CausalLm<B: Backend, A: LmArch<B> = LlamaConfig> {
    pub model: LmModel<B, A>,
    pub tokenizer: TextTokenizer,
}

impl<B: Backend, A: LmArch<B>> CausalLm<B, A> {
    /// Loads the weights, `config.json` and `tokenizer.json` of a model directory; texts are
    /// truncated to `max_len` tokens.
    pub fn load(backend: B, path: &Path, max_len: usize) -> Result<Self> {
        let model = LmModel::<B, A>::load(backend, path)?;
        if let Some((w, what)) = model.config.max_tokens()
            && max_len > w
        {
            return Err(Error::Invalid(format!(
                "maximum length {max_len} exceeds the {what} ({w} tokens) of {}; pass a maximum length of at most {w}",
                path.display()
            )));
        }
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        let tokenizer = TextTokenizer::from_dir(dir, max_len)?;
        Ok(CausalLm { model, tokenizer })
    }
}

/// Mean next-token loss over a set of texts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LmEvalReport {
    pub texts: usize,
    /// Predicted tokens: every real token but each text's first.
    pub tokens: usize,
    /// Mean cross-entropy per predicted token, in nats.
    pub mean_loss: f64,
    /// `exp(mean_loss)`.
    pub perplexity: f64,
    /// Fraction of predicted tokens that are the model's most likely next token (the first
    /// highest logit on ties).
    pub top1_accuracy: f64,
}

/// Scores `texts` (each tokenized with the tokenizer's special tokens, truncated to its maximum
/// length) with [`score_next_tokens`].
pub fn evaluate_lm<B: Backend, A: LmArch<B>, S: AsRef<str>>(
    lm: &CausalLm<B, A>,
    texts: &[S],
    batch_size: usize,
) -> Result<LmEvalReport> {
    let model = &lm.model;
    let toks = lm.tokenizer.tokenize(texts)?;
    let lens: Vec<usize> = toks.iter().map(|t| t.ids.len()).collect();
    score_next_tokens(&lens, batch_size, model.vocab(), |rows| {
        let batch = model.batch(&lm.tokenizer.pad(&rows.iter().map(|&i| &toks[i]).collect::<Vec<_>>()))?;
        if batch.labels.is_empty() {
            return Ok(None);
        }
        picked_logits(&model.backend, &batch, &model.logits(&batch)?, model.vocab()).map(Some)
    })
    .map_err(|e| match e {
        Error::Invalid(reason) => Error::Model { path: model.path.clone(), reason },
        e => e,
    })
}

/// Scores sequences of `lens` tokens in batches of `batch_size`, longest first so a batch pads
/// little: `picked(rows)` gives the logits at the predicting positions of the sequences `rows`
/// (`[targets, vocab]`, on the host) and their next tokens, `None` when they predict none. Every
/// token is weighed equally, so long texts count more than short ones; the loss is summed in f64.
/// `eval` and adaptation's end-of-run scores both come from here, so they agree.
pub fn score_next_tokens(
    lens: &[usize],
    batch_size: usize,
    vocab: usize,
    mut picked: impl FnMut(&[usize]) -> Result<Option<(Vec<f32>, Vec<u32>)>>,
) -> Result<LmEvalReport> {
    if batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    if lens.is_empty() {
        return Err(Error::Invalid("nothing to evaluate: no texts".into()));
    }
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let (mut total, mut tokens, mut hits) = (0f64, 0usize, 0usize);
    for chunk in order.chunks(batch_size) {
        let Some((logits, targets)) = picked(chunk)? else { continue };
        if let Some(x) = logits.iter().find(|x| !x.is_finite()) {
            let mut rows = chunk.to_vec();
            rows.sort_unstable();
            let texts = rows.iter().map(|i| (i + 1).to_string()).collect::<Vec<_>>().join(", ");
            return Err(Error::Invalid(format!(
                "a next-token logit of the texts {texts} is {x}, not a finite number; the weights make \
                 the activations overflow (a model trained with too high a learning rate?)"
            )));
        }
        for (z, &t) in logits.chunks(vocab).zip(&targets) {
            total += logsumexp(z) - z[t as usize] as f64;
            hits += usize::from(argmax(z) == t as usize);
        }
        tokens += targets.len();
    }
    if tokens == 0 {
        return Err(Error::Invalid("nothing to evaluate: every text has fewer than two tokens".into()));
    }
    let mean_loss = total / tokens as f64;
    let top1_accuracy = hits as f64 / tokens as f64;
    Ok(LmEvalReport { texts: lens.len(), tokens, mean_loss, perplexity: mean_loss.exp(), top1_accuracy })
}

/// The rows of `logits` (`[batch.tokens, vocab]`) at `batch`'s predicting positions, on the
/// host, with their next tokens; `batch` must have some.
pub fn picked_logits<B: Backend>(
    be: &B,
    batch: &LmBatch<B>,
    logits: &B::Buf,
    vocab: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    Ok((be.download(&be.embedding(logits, &batch.label_rows, vocab)?)?, batch.labels.clone()))
}
