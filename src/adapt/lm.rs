//! `symerge adapt` for causal LMs (any [`LmArch`] family: Llama, Mistral, Qwen2, GPT-2): SyMerge with Lambda over the shared
//! blocks (the token embedding and the decoder layers) and, per task, its own head (final norm and
//! `lm_head`) or, with `last_block`, its last decoder layer plus head, trained against the
//! expert's cached top-k next-token labels with the bucket cross-entropy
//! ([`crate::backend::Backend::topk_ce`]), a mean over predicted positions.
//!
//! AdaMerging is the same chain with each task's own layers frozen at its expert's, as the
//! AdaMerging paper keeps each task's classifier head: Lambda alone learns, by minimising the
//! mean entropy of the next-token distributions at the predicting positions. It needs no cache.
//!
//! A task's head is untied from the embedding even when the models tie them: the embedding is
//! shared and merged, the head is the task's own (initialised from its expert's embedding), and
//! the adapted model is written with `tie_word_embeddings: false`.
//!
//! The loop is [`super::train`]'s; this file is the causal-LM [`Family`]: batches of next-token
//! targets, the loss on the positions that predict one, and the model writer.

use std::path::Path;

use super::config::{AdaptConfig, AdaptedLayer, LossKind, Method, TaskConfig};
use super::objective::{self, Objective, Prepared};
use super::train::{Adaptation, Family, SummaryLabels, Task, TaskEval};
use crate::backend::Backend;
use crate::checkpoint::FloatDType;
use crate::data::jsonl::read_jsonl_hashed;
use crate::error::{Error, Result};
use crate::labels::produce::provenance;
use crate::labels::{LabelCache, LabelKind};
use crate::model::lm::{picked_logits, score_next_tokens};
use crate::model::save::SaveOptions;
use crate::model::tokenize::Tokens;
use crate::model::{
    ChainBlock, LlamaConfig, LmArch, LmBatch, LmEvalReport, LmModel, Params, TextTokenizer, TopKTargets,
};

/// A causal-LM family during adaptation: the pretrained model's layout (no weights: they stream).
pub struct CausalLmFamily<B: Backend, A: LmArch<B>> {
    pub base: LmModel<B, A>,
}

/// A causal-LM task's own data: the expert's top-k next-token labels (SyMerge; AdaMerging needs
/// none).
pub struct LmTaskData {
    pub cache: Option<LabelCache>,
}

/// A batch's loss state between the forward and the backward.
pub enum LmLoss<B: Backend> {
    /// SyMerge: the expert's top-k targets and this rank's mean loss.
    TopK(TopKTargets<B>, f32),
    /// AdaMerging: the mean entropy over the predicting positions.
    Entropy(Prepared),
}

/// Adaptation of a causal LM of family `A`.
pub type LmAdapter<B, A = LlamaConfig> = Adaptation<B, CausalLmFamily<B, A>>;

impl<B: Backend + Clone, A: LmArch<B>> Adaptation<B, CausalLmFamily<B, A>> {
    /// Loads the base model's layout, the experts' own blocks, the inputs and the top-k caches,
    /// checking that each cache was made by that expert for those inputs.
    pub fn load(backend: B, cfg: AdaptConfig) -> Result<Self> {
        Self::load_with(backend, cfg, None)
    }

    /// [`LmAdapter::load`] with a memory budget for keeping shared blocks staged between visits
    /// (default: half the backend's free memory; `Some(0)` streams every block).
    pub fn load_with(backend: B, cfg: AdaptConfig, budget: Option<u64>) -> Result<Self> {
        cfg.check_model_kinds()?;
        let cfg_err = |reason: &str| Error::Config { path: cfg.source.clone(), reason: reason.into() };
        if cfg.method == Method::Symerge && (cfg.loss != LossKind::Soft || cfg.confidence.is_some()) {
            return Err(cfg_err("loss: causal LMs train with the top-k soft loss only (no hard_conf, no confidence)"));
        }
        // The pretrained model's weights are streamed, never loaded: only its layout is.
        let base = LmModel::<B, A>::load_partial(backend.clone(), &cfg.base_model, usize::MAX)?;
        let layers = base.config.num_layers();
        let n_shared = match cfg.adapted_layer {
            AdaptedLayer::Head => 1 + layers,
            AdaptedLayer::LastBlock if layers > 0 => layers,
            AdaptedLayer::LastBlock => {
                return Err(Error::Model { path: cfg.base_model.clone(), reason: "no decoder layer to adapt".into() });
            }
        };
        let tasks =
            cfg.tasks.iter().map(|t| load_task(&backend, &cfg, t, &base, n_shared)).collect::<Result<Vec<_>>>()?;
        let shared = base.blocks[..n_shared].to_vec();
        Adaptation::assemble(cfg, CausalLmFamily { base }, shared, tasks, budget)
    }

    /// Task `task`'s merged model: the merged shared blocks and its own (adapted, untied) blocks.
    pub fn task_model(&self, task: usize) -> Result<LmModel<B, A>> {
        let mut model = self.task_lm(task)?;
        self.fill_merged(&mut model.params)?;
        Ok(model)
    }

    /// Task `task`'s adapted model scored on its inputs as `symerge eval` scores a causal LM (the
    /// same batching and sums, [`score_next_tokens`]), so the summary says what the model does
    /// rather than only its training loss. It runs the adaptation's block-streamed forward in the
    /// run's memory budget, not a loaded copy of the merged model, which a streamed run may have
    /// no room for; its cost is one forward pass over the inputs, small next to training's
    /// forward and backward per step. The weights are the f32 ones: a model stored in bf16 or
    /// f16 scores slightly differently under `eval`.
    pub fn evaluate_task(&self, task: usize) -> Result<LmEvalReport> {
        let vocab = self.family.base.vocab();
        let lens: Vec<usize> = self.tasks[task].tokens.iter().map(|t| t.ids.len()).collect();
        score_next_tokens(&lens, self.cfg.batch_size, vocab, |rows| {
            let Some((batch, logits)) = self.infer(task, rows)? else { return Ok(None) };
            picked_logits(self.family.backend(), &batch, &logits, vocab).map(Some)
        })
    }

    /// Task `task`'s model with the shared blocks left empty and the head untied.
    fn task_lm(&self, task: usize) -> Result<LmModel<B, A>> {
        let (blocks, params) = self.task_skeleton(task)?;
        let mut config = self.family.base.config.clone();
        config.set_tied(false);
        let backend = self.family.base.backend.clone();
        Ok(LmModel { config, path: self.tasks[task].expert.clone(), blocks, params, backend })
    }
}

/// One task: the expert's own blocks (checked against the base's layout, the head untied), its
/// inputs and its top-k cache (checked against the inputs' positions).
fn load_task<B: Backend + Clone, A: LmArch<B>>(
    backend: &B,
    cfg: &AdaptConfig,
    t: &TaskConfig,
    base: &LmModel<B, A>,
    n_shared: usize,
) -> Result<Task<B, CausalLmFamily<B, A>>> {
    let cfg_err = |reason: &str| Error::Config { path: cfg.source.clone(), reason: reason.into() };
    let mut expert = LmModel::<B, A>::load_partial(backend.clone(), &t.expert, n_shared)?;
    let names: Vec<String> = expert.blocks.iter().map(ChainBlock::name).collect();
    let base_names: Vec<String> = base.blocks.iter().map(ChainBlock::name).collect();
    if names != base_names || expert.vocab() != base.vocab() {
        return Err(Error::Model {
            path: t.expert.clone(),
            reason: format!(
                "blocks {names:?} over {} tokens do not match the base model's {base_names:?} over {}",
                expert.vocab(),
                base.vocab()
            ),
        });
    }
    let (examples, inputs_hash) = read_jsonl_hashed(&t.inputs)?;
    let texts: Vec<String> = examples.into_iter().map(|e| e.text).collect();
    if texts.is_empty() {
        return Err(Error::Invalid(format!("{}: no inputs for task `{}`", t.inputs.display(), t.name)));
    }
    let expert_dir = if t.expert.is_dir() { t.expert.clone() } else { expert.path.clone() };
    let tokenizer = TextTokenizer::from_dir(&expert_dir, cfg.max_len)?;
    let tokens = tokenizer.tokenize(&texts)?;
    let cache = match cfg.method {
        Method::Adamerging => None,
        Method::Symerge => {
            let path = t.cache.as_ref().ok_or_else(|| cfg_err("every task needs a `cache` (symerge cache-labels)"))?;
            let cache = LabelCache::open(path, Some(&provenance(&t.expert, &t.name, cfg.max_len, &texts)?))?;
            check_cache(&cache, path, expert.vocab(), &tokens)?;
            Some(cache)
        }
    };
    let mut private_blocks = Vec::new();
    let mut private: Vec<Params<B>> = Vec::new();
    for (block, mut params) in expert.blocks[n_shared..].iter().zip(expert.params.drain(n_shared..)) {
        private_blocks.push(A::untie(block, &mut params));
        private.push(params);
    }
    let data = LmTaskData { cache };
    let inputs = (texts, inputs_hash);
    Task::new(backend, t.name.clone(), expert_dir, inputs, tokenizer, private_blocks, private, cfg.layer_lr, data)
}

/// A top-k cache over `vocab` tokens with one position per next-token target of each input.
fn check_cache(cache: &LabelCache, path: &Path, vocab: usize, tokens: &[Tokens]) -> Result<()> {
    let bad = |reason: String| Error::LabelCache { path: path.to_path_buf(), reason };
    match cache.kind() {
        LabelKind::TopK { vocab: v, .. } if v == vocab => {}
        LabelKind::TopK { vocab: v, .. } => return Err(bad(format!("{v} tokens, but the expert has {vocab}"))),
        LabelKind::Classification { .. } => {
            return Err(bad("holds classification labels, but the expert is a causal LM: make its top-k cache \
                            with `symerge cache-labels`"
                .into()));
        }
    }
    if cache.rows() != tokens.len() {
        return Err(bad(format!("holds {} inputs for {} inputs here (corrupt header)", cache.rows(), tokens.len())));
    }
    let targets = |i: usize| tokens[i].ids.len().saturating_sub(1);
    if let Some(i) = (0..tokens.len()).find(|&i| cache.positions(i) != targets(i)) {
        return Err(bad(format!(
            "input {i} has {} positions in the cache but {} next-token targets here",
            cache.positions(i),
            targets(i)
        )));
    }
    Ok(())
}

impl<B: Backend + Clone, A: LmArch<B>> Family<B> for CausalLmFamily<B, A> {
    type Block = A::Block;
    type TaskData = LmTaskData;
    /// The logits of the predicting positions and their loss state.
    type Pending = (B::Buf, LmLoss<B>);
    const COUNT_KEY: &'static str = "positions";

    fn describe_count(n: usize) -> String {
        format!("{n} positions")
    }

    fn backend(&self) -> &B {
        &self.base.backend
    }

    /// `None` when no input of `rows` has a next token to predict.
    fn batch(&self, task: &Task<B, Self>, rows: &[usize]) -> Result<Option<LmBatch<B>>> {
        let seqs: Vec<&Tokens> = rows.iter().map(|&i| &task.tokens[i]).collect();
        let batch = self.base.batch(&task.tokenizer.pad(&seqs))?;
        Ok((!batch.labels.is_empty()).then_some(batch))
    }

    fn loss(
        &self,
        _cfg: &AdaptConfig,
        task: &Task<B, Self>,
        batch: &LmBatch<B>,
        logits: B::Buf,
        rows: &[usize],
    ) -> Result<(Self::Pending, usize, f64)> {
        let (be, vocab) = (self.backend(), self.base.vocab());
        let picked = be.embedding(&logits, &batch.label_rows, vocab)?;
        drop(logits);
        let Some(cache) = &task.data.cache else {
            let n = batch.labels.len();
            let p = objective::prepare(be, Objective::Entropy, &picked, None, n, vocab)?;
            let sum = p.loss_sum();
            return Ok(((picked, LmLoss::Entropy(p)), n, sum));
        };
        let targets = TopKTargets::upload(be, batch, &cache.topk_batch(rows)?)?;
        let loss = targets.loss(be, &picked, vocab)?;
        let n = targets.positions;
        Ok(((picked, LmLoss::TopK(targets, loss)), n, loss as f64 * n as f64))
    }

    fn loss_backward(
        &self,
        _task: &Task<B, Self>,
        batch: &LmBatch<B>,
        (picked, state): Self::Pending,
        total: usize,
    ) -> Result<(B::Buf, f32)> {
        let (be, vocab) = (self.backend(), self.base.vocab());
        let (dpicked, loss) = match state {
            LmLoss::TopK(targets, loss) => {
                (targets.backward(be, &picked, vocab, targets.positions as f32 / total as f32)?, loss)
            }
            LmLoss::Entropy(p) => {
                let out = objective::finish(be, p, &picked, vocab, total)?;
                (out.dlogits, out.loss)
            }
        };
        Ok((be.embedding_backward(&batch.label_rows, &dpicked, batch.rows(), vocab)?, loss))
    }

    fn finish_task(
        a: &LmAdapter<B, A>,
        task: usize,
        dir: Option<&Path>,
        dtype: FloatDType,
        evaluate: bool,
    ) -> Result<Option<TaskEval>> {
        if let Some(dir) = dir {
            let opts = SaveOptions { dtype, ..SaveOptions::default() };
            a.task_lm(task)?.save_with(dir, &opts, &mut |b| a.merged_params(b))?;
        }
        if !evaluate {
            return Ok(None);
        }
        let report = a.evaluate_task(task).map_err(|e| super::train::scoring_adapted(&a.cfg, task, e))?;
        Ok(Some(TaskEval::NextToken(report)))
    }

    fn summary_labels(cfg: &AdaptConfig) -> SummaryLabels {
        let loss = match cfg.method {
            Method::Symerge => "top-k soft loss",
            Method::Adamerging => "entropy",
        };
        SummaryLabels { score: "top-1", loss }
    }
}
