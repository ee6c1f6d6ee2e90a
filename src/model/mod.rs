//! Model architectures as chains of blocks over a [`crate::backend::Backend`], plus tokenization
//! and the inference entry points (`predict`, `evaluate`).
//!
//! - [`chain`]: what every family shares: the [`ChainBlock`] trait, parameter loading, the
//!   chain's forward and its reverse-order backward.
//! - [`causal`]: what every causal-LM family shares: the [`LmArch`] trait, the model, the batch of
//!   next-token targets, and the registry of families ([`LmKind`]).
//! - [`bert`]: the BERT family (BERT, MiniLM, RoBERTa) with a sequence-classification head.
//! - [`llama`]: the Llama family (Llama, Mistral, Qwen2) as causal LMs; [`llama_config`] reads
//!   their `config.json`.
//! - [`gpt2`]: GPT-2 as a causal LM, its `config.json` reader included.
//! - [`lm`]: a causal LM with its tokenizer, and its evaluation (perplexity).
//! - [`config`]: hyper-parameters from `config.json`.
//! - [`tokenize`]: `tokenizer.json` with per-batch padding.
//! - [`classify`]: batched prediction and evaluation of a sequence classifier.
//! - [`finetune`](mod@finetune): full fine-tuning of a sequence classifier on labelled JSONL.
//! - [`finetune_lm`](mod@finetune_lm): full fine-tuning of a causal LM on texts (next-token loss).
//! - [`save`]: writing a model as a Hugging Face checkpoint directory.
//! - [`import`]: a Llama-family GGUF file as a Hugging Face checkpoint directory.
//! - [`infer`]: `symerge predict` and `symerge eval`: their flags and which model they run.

pub mod bert;
pub mod block_bench;
pub mod causal;
pub mod chain;
pub mod classify;
pub mod config;
pub mod finetune;
pub mod finetune_lm;
pub mod gpt2;
mod hf_config;
pub mod import;
pub mod infer;
pub mod llama;
pub mod llama_config;
pub mod lm;
pub mod save;
pub mod tokenize;

use std::collections::BTreeMap;

use crate::backend::Backend;

pub use bert::{Batch, Bert, Block, LoadOptions, NewHead};
pub use causal::{LmArch, LmBatch, LmConfig, LmKind, LmModel, TopKTargets};
pub use chain::ChainBlock;
pub use classify::{
    EvalReport, PredictSummary, Prediction, SequenceClassifier, check_predictions_output, evaluate, predict,
    write_predictions,
};
pub use config::{BertConfig, BertFamily};
pub use finetune::{FinetuneOptions, FinetuneSummary, LrSchedule, TrainLength, finetune};
pub use finetune_lm::{LmFinetuneSummary, finetune_lm};
pub use gpt2::{Gpt2, Gpt2Block, Gpt2Config};
pub use llama::{Llama, LlamaBlock};
pub use llama_config::{LlamaConfig, LlamaFamily};
pub use lm::{CausalLm, LmEvalReport, evaluate_lm, is_causal_lm, is_causal_lm_dir};
pub use save::{SaveOptions, SavedModel};
pub use tokenize::{DEFAULT_MAX_LEN, Encoded, TextTokenizer};

/// A named tensor on a backend (a parameter or its gradient).
pub struct Param<B: Backend> {
    pub shape: Vec<usize>,
    pub buf: B::Buf,
}

/// Tensors by Hugging Face name: one block's parameters, or their gradients.
pub type Params<B> = BTreeMap<String, Param<B>>;

/// config.json's layer count (`field`) against the layers the checkpoint's tensors hold: a count
/// past them would size the model, and its memory, by a number no weight backs (a lying
/// `num_hidden_layers: 1000000000` would exhaust memory before any tensor is looked up).
pub fn check_layer_count(ck: &crate::checkpoint::Checkpoint, claimed: usize, field: &str) -> crate::error::Result<()> {
    let held = ck.tensors.iter().filter_map(|t| crate::checkpoint::layers::layer_of(&t.name)).map(|(_, i)| i + 1).max();
    let held = held.unwrap_or(0);
    if claimed <= held {
        return Ok(());
    }
    Err(crate::error::Error::Model {
        path: ck.dir.join("config.json"),
        reason: format!("{field} is {claimed}, but the checkpoint's tensors hold {held} layer(s)"),
    })
}

/// The distinct values of `ids`, sorted: the rows of a lookup table a batch reads.
pub fn distinct_rows(ids: &[u32]) -> Vec<u32> {
    let mut rows = ids.to_vec();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Packed rows `x` (`[tokens, width]`, real tokens only) scattered to the padded layout of
/// `padded_len` rows, padding rows zero; `x` itself when nothing is padded (`rows` is `None`).
pub(crate) fn to_padded<B: crate::backend::Backend>(
    be: &B,
    rows: Option<&B::Ids>,
    padded_len: usize,
    x: B::Buf,
    width: usize,
) -> crate::error::Result<B::Buf> {
    match rows {
        Some(rows) => be.embedding_backward(rows, &x, padded_len, width),
        None => Ok(x),
    }
}

/// Padded rows `x` gathered to the real tokens' rows (the inverse of [`to_padded`]).
pub(crate) fn to_packed<B: crate::backend::Backend>(
    be: &B,
    rows: Option<&B::Ids>,
    x: B::Buf,
    width: usize,
) -> crate::error::Result<B::Buf> {
    match rows {
        Some(rows) => be.embedding(&x, rows, width),
        None => Ok(x),
    }
}
