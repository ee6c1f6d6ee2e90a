//! `symerge adapt` for causal LMs (Llama, Mistral, Qwen2): SyMerge with Lambda over the shared
//! blocks (the token embedding and the decoder layers) and, per task, its own head (final norm and
//! `lm_head`) or, with `last_block`, its last decoder layer plus head, trained against the
//! expert's cached top-k next-token labels with the bucket cross-entropy
//! ([`crate::backend::Backend::topk_ce`]), a mean over predicted positions.
//!
//! A task's head is untied from the embedding even when the models tie them: the embedding is
//! shared and merged, the head is the task's own (initialised from its expert's embedding), and
//! the adapted model is written with `tie_word_embeddings: false`.
//!
//! The loop is [`super::train`]'s: merged weights built block by block in the forward and again
//! in the recomputing backward, one batch and one step per task per epoch in a shuffled order,
//! data-parallel through [`Collective`] with each rank's positions weighted by the positions of
//! all ranks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::adam::{Adam, AdamConfig, BufAdam};
use super::config::{AdaptConfig, AdaptedLayer, LossKind, Method};
use super::lambda::Lambda;
use super::shared::SharedWeights;
use super::train::{
    AdaptOptions, AdaptSummary, StepGrads, TaskReport, Trainee, all_reduce_lambda_rows, all_reduce_params,
    commit_output, copy_params, lambda_keys, layouts, open_output, permutation, private_adams, step_private,
    train_epochs, zeros_like,
};
use crate::backend::Backend;
use crate::data::jsonl::read_jsonl;
use crate::dist::data_parallel::{shard_range, verify_digest};
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::labels::produce::provenance;
use crate::labels::{LabelCache, LabelKind};
use crate::merge::philox::name_hash;
use crate::model::llama::LmHead;
use crate::model::tokenize::Tokens;
use crate::model::{Llama, LlamaBlock, Params, TextTokenizer, TopKTargets};

/// One task during adaptation.
pub struct LmTask<B: Backend> {
    pub name: String,
    pub expert: PathBuf,
    pub texts: Vec<String>,
    tokens: Vec<Tokens>,
    tokenizer: TextTokenizer,
    pub cache: LabelCache,
    /// The task's own blocks, after the shared ones (the head untied).
    pub private_blocks: Vec<LlamaBlock>,
    pub private: Vec<Params<B>>,
    adam: Vec<BTreeMap<String, BufAdam<B>>>,
    order: Vec<usize>,
    cursor: usize,
    shuffles: u32,
}

/// The causal LM being adapted.
pub struct LmAdapter<B: Backend> {
    pub cfg: AdaptConfig,
    /// The pretrained model: its config and the shared blocks' layout.
    pub base: Llama<B>,
    pub shared: Vec<LlamaBlock>,
    /// The shared blocks' weights, streamed from the checkpoints.
    pub weights: SharedWeights<B>,
    pub lambda: Lambda,
    lambda_adam: Adam,
    pub tasks: Vec<LmTask<B>>,
}

impl<B: Backend + Clone> LmAdapter<B> {
    /// Loads the base model, the experts (their task vectors and own blocks), the inputs and the
    /// top-k caches, checking that each cache was made by that expert for those inputs.
    pub fn load(backend: B, cfg: AdaptConfig) -> Result<Self> {
        Self::load_with(backend, cfg, None)
    }

    /// [`LmAdapter::load`] with a memory budget for keeping shared blocks staged between visits
    /// (default: half the backend's free memory; `Some(0)` streams every block).
    pub fn load_with(backend: B, cfg: AdaptConfig, budget: Option<u64>) -> Result<Self> {
        let cfg_err = |reason: &str| Error::Config { path: cfg.source.clone(), reason: reason.into() };
        if cfg.method != Method::Symerge {
            return Err(cfg_err("method: adamerging of causal LMs is not implemented; use symerge"));
        }
        if cfg.loss != LossKind::Soft || cfg.confidence.is_some() {
            return Err(cfg_err("loss: causal LMs train with the top-k soft loss only (no hard_conf, no confidence)"));
        }
        // The pretrained model's weights are streamed, never loaded: only its layout is.
        let base = Llama::load_partial(backend.clone(), &cfg.base_model, usize::MAX)?;
        let layers = base.config.num_hidden_layers;
        let n_shared = match cfg.adapted_layer {
            AdaptedLayer::Head => 1 + layers,
            AdaptedLayer::LastBlock if layers > 0 => layers,
            AdaptedLayer::LastBlock => {
                return Err(Error::Model { path: cfg.base_model.clone(), reason: "no decoder layer to adapt".into() });
            }
        };
        let shared: Vec<LlamaBlock> = base.blocks[..n_shared].to_vec();
        let layout = layouts(shared.iter().map(|b| (b.name(), b.param_shapes())));
        let models: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();
        let lambda = Lambda::new(cfg.granularity, models, lambda_keys(&layout, cfg.granularity), cfg.lambda_init);
        let base_names: Vec<String> = base.blocks.iter().map(LlamaBlock::name).collect();

        let mut tasks = Vec::with_capacity(cfg.tasks.len());
        for t in &cfg.tasks {
            let mut expert = Llama::load_partial(backend.clone(), &t.expert, n_shared)?;
            let names: Vec<String> = expert.blocks.iter().map(LlamaBlock::name).collect();
            if names != base_names || expert.config.vocab_size != base.config.vocab_size {
                return Err(Error::Model {
                    path: t.expert.clone(),
                    reason: format!(
                        "blocks {names:?} over {} tokens do not match the base model's {base_names:?} over {}",
                        expert.config.vocab_size, base.config.vocab_size
                    ),
                });
            }
            let texts: Vec<String> = read_jsonl(&t.inputs)?.into_iter().map(|e| e.text).collect();
            if texts.is_empty() {
                return Err(Error::Invalid(format!("{}: no inputs for task `{}`", t.inputs.display(), t.name)));
            }
            let expert_dir = if t.expert.is_dir() { t.expert.clone() } else { expert.path.clone() };
            let tokenizer = TextTokenizer::from_dir(&expert_dir, cfg.max_len)?;
            let tokens = tokenizer.tokenize(&texts)?;
            let path = t.cache.as_ref().ok_or_else(|| cfg_err("every task needs a `cache` (symerge cache-labels)"))?;
            let cache = LabelCache::open(path, Some(&provenance(&t.expert, &t.name, cfg.max_len, &texts)?))?;
            let bad = |reason: String| Error::LabelCache { path: path.clone(), reason };
            match cache.kind() {
                LabelKind::TopK { vocab, .. } if vocab == expert.config.vocab_size => {}
                LabelKind::TopK { vocab, .. } => {
                    return Err(bad(format!("{vocab} tokens, but the expert has {}", expert.config.vocab_size)));
                }
                LabelKind::Classification { .. } => {
                    return Err(bad("holds classification labels, but the expert is a causal LM: make its top-k \
                                    cache with `symerge cache-labels`"
                        .into()));
                }
            }
            if let Some(i) = (0..texts.len()).find(|&i| cache.positions(i) != tokens[i].ids.len().saturating_sub(1)) {
                return Err(bad(format!(
                    "input {i} has {} positions in the cache but {} next-token targets here",
                    cache.positions(i),
                    tokens[i].ids.len().saturating_sub(1)
                )));
            }
            let mut private_blocks = Vec::new();
            let mut private = Vec::new();
            for (block, mut copy) in expert.blocks[n_shared..].iter().zip(expert.params.drain(n_shared..)) {
                let block = match block {
                    LlamaBlock::Head(h) if h.tied => {
                        let head = LmHead { tied: false, ..h.clone() };
                        if let Some(w) = copy.remove(h.weight_name()) {
                            copy.insert(head.weight_name().into(), w);
                        }
                        LlamaBlock::Head(head)
                    }
                    other => other.clone(),
                };
                private_blocks.push(block);
                private.push(copy);
            }
            let adam = private_adams(&backend, &private, cfg.layer_lr)?;
            tasks.push(LmTask {
                name: t.name.clone(),
                expert: expert_dir,
                texts,
                tokens,
                tokenizer,
                cache,
                private_blocks,
                private,
                adam,
                order: Vec::new(),
                cursor: 0,
                shuffles: 0,
            });
        }
        let expert_paths: Vec<PathBuf> = cfg.tasks.iter().map(|t| t.expert.clone()).collect();
        let weights = SharedWeights::open(&backend, &cfg.base_model, &expert_paths, &layout, &lambda, budget)?;
        let lambda_adam = Adam::new(lambda.values.len(), AdamConfig::with_lr(cfg.lambda_lr));
        Ok(LmAdapter { cfg, base, shared, weights, lambda, lambda_adam, tasks })
    }

    /// Loss and gradients of task `task` on its inputs `rows`, block-streamed.
    pub fn loss_and_grads(&self, task: usize, rows: &[usize]) -> Result<StepGrads<B>> {
        self.loss_and_grads_in(task, rows, &mut Single)
    }

    /// [`LmAdapter::loss_and_grads`] data-parallel: this rank takes its [`shard_range`] of the
    /// rows; the positions and loss sums are all-reduced after the forward, so each rank's
    /// logits gradient is its share of the mean over every rank's positions, and Lambda rows and
    /// the task's own blocks' gradients are all-reduced block by block. `kept` is the number of
    /// positions.
    pub fn loss_and_grads_in(&self, task: usize, rows: &[usize], coll: &mut dyn Collective) -> Result<StepGrads<B>> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let mine = &rows[shard_range(rows.len(), rank, world)];
        let be = &self.base.backend;
        let vocab = self.base.config.vocab_size;
        let t = &self.tasks[task];
        let n_shared = self.shared.len();
        let total = n_shared + t.private_blocks.len();

        // Forward, keeping block outputs only; a rank without positions (an empty shard, or
        // only one-token inputs) skips it and contributes zeros.
        let mut acts: Vec<B::Buf> = Vec::with_capacity(total);
        let mut local = None;
        if !mine.is_empty() {
            let seqs: Vec<&Tokens> = mine.iter().map(|&i| &t.tokens[i]).collect();
            let batch = self.base.batch(&t.tokenizer.pad(&seqs))?;
            if !batch.labels.is_empty() {
                for b in 0..total {
                    let y = if b < n_shared {
                        let next = Some(self.weights.next_block(b, true));
                        let p = self.weights.visit(be, b, next)?.merged(be, &self.lambda)?;
                        self.shared[b].forward(be, &p, &batch, acts.last())?
                    } else {
                        t.private_blocks[b - n_shared].forward(be, &t.private[b - n_shared], &batch, acts.last())?
                    };
                    acts.push(y);
                }
                let logits = acts.pop().ok_or_else(|| Error::Invalid("the model has no blocks".into()))?;
                let picked = be.embedding(&logits, &batch.label_rows, vocab)?;
                drop(logits);
                let targets = TopKTargets::upload(be, &batch, &t.cache.topk_batch(mine)?)?;
                let loss = targets.loss(be, &picked, vocab)?;
                local = Some((batch, picked, targets, loss));
            }
        }
        let (local_n, local_sum) =
            local.as_ref().map_or((0, 0.0), |(_, _, tg, loss)| (tg.positions, *loss as f64 * tg.positions as f64));
        let (positions, loss) = if world == 1 {
            (local_n, local_sum as f32 / local_n.max(1) as f32)
        } else {
            // Counts below 2^24 are exact in f32.
            let mut totals = [local_n as f32, local_sum as f32];
            coll.all_reduce_sum_f32(&mut totals)?;
            let n = totals[0] as usize;
            (n, if n == 0 { 0.0 } else { totals[1] / n as f32 })
        };
        let (batch, mut dy) = match local {
            Some((batch, picked, targets, _)) => {
                let dpicked = targets.backward(be, &picked, vocab, targets.positions as f32 / positions as f32)?;
                let dlogits = be.embedding_backward(&batch.label_rows, &dpicked, batch.rows(), vocab)?;
                (Some(batch), Some(dlogits))
            }
            None => (None, None),
        };

        let mut lambda_grad = vec![0f64; self.lambda.values.len()];
        let mut private: Vec<Params<B>> = Vec::with_capacity(t.private_blocks.len());
        for b in (0..total).rev() {
            let input = if b > 0 { acts.pop() } else { None };
            let reached = batch.as_ref().zip(dy.take());
            if b < n_shared {
                if let Some((batch, d)) = reached {
                    let visit = self.weights.visit(be, b, Some(self.weights.next_block(b, false)))?;
                    let p = visit.merged(be, &self.lambda)?;
                    let (dx, g) = self.shared[b].backward(be, &p, batch, input.as_ref(), &d)?;
                    visit.lambda_grad(be, &g, &mut lambda_grad)?;
                    dy = dx;
                }
                if world > 1 {
                    all_reduce_lambda_rows(&self.weights, self.lambda.tasks(), coll, b, &mut lambda_grad)?;
                }
            } else {
                let i = b - n_shared;
                let mut g = match reached {
                    Some((batch, d)) => {
                        let (dx, g) = t.private_blocks[i].backward(be, &t.private[i], batch, input.as_ref(), &d)?;
                        dy = dx;
                        g
                    }
                    None => zeros_like(be, &t.private[i])?,
                };
                if world > 1 {
                    all_reduce_params(be, coll, &mut g)?;
                }
                private.push(g);
            }
        }
        private.reverse();
        Ok(StepGrads { loss, kept: positions, lambda: lambda_grad, private })
    }

    /// The next `batch_size` inputs of task `task`, walking a seeded permutation that is redrawn
    /// each time it runs out.
    fn next_rows(&mut self, task: usize) -> Vec<usize> {
        let (seed, bs) = (self.cfg.seed, self.cfg.batch_size);
        let t = &mut self.tasks[task];
        let n = t.tokens.len();
        let mut rows = Vec::with_capacity(bs.min(n));
        while rows.len() < bs.min(n) {
            if t.cursor >= t.order.len() {
                t.order = permutation(n, seed, name_hash(&t.name), t.shuffles);
                t.shuffles += 1;
                t.cursor = 0;
            }
            rows.push(t.order[t.cursor]);
            t.cursor += 1;
        }
        rows
    }

    /// One optimisation step on task `task`; returns (loss, positions).
    pub fn step(&mut self, task: usize) -> Result<(f32, usize)> {
        self.step_in(task, &mut Single)
    }

    /// One data-parallel step: every rank draws the same batch and applies the same all-reduced
    /// gradients, so the ranks' parameters stay bit-identical.
    pub fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)> {
        let rows = self.next_rows(task);
        let g = self.loss_and_grads_in(task, &rows, coll)?;
        let lg: Vec<f32> = g.lambda.iter().map(|&v| v as f32).collect();
        self.lambda_adam.step(&mut self.lambda.values, &lg);
        if self.cfg.clamp {
            self.lambda.clamp(0.0, 1.0);
        }
        let t = &mut self.tasks[task];
        step_private(&self.base.backend, &mut t.private, &g.private, &mut t.adam)?;
        Ok((g.loss, g.kept))
    }

    /// Task `task`'s model with the shared blocks' parameters left empty and a copy of its own
    /// (adapted, untied) blocks: filled by [`LmAdapter::task_model`], or written block by block.
    fn task_skeleton(&self, task: usize) -> Result<Llama<B>> {
        let be = &self.base.backend;
        let t = &self.tasks[task];
        let mut params: Vec<Params<B>> = (0..self.shared.len()).map(|_| Params::new()).collect();
        for p in &t.private {
            params.push(copy_params(be, p)?);
        }
        let blocks = self.shared.iter().cloned().chain(t.private_blocks.iter().cloned()).collect();
        let mut config = self.base.config.clone();
        config.tie_word_embeddings = false;
        Ok(Llama { config, path: t.expert.clone(), blocks, params, backend: be.clone() })
    }

    /// Task `task`'s merged model: the merged shared blocks and its own (adapted, untied) blocks.
    pub fn task_model(&self, task: usize) -> Result<Llama<B>> {
        let mut model = self.task_skeleton(task)?;
        for b in 0..self.shared.len() {
            model.params[b] = self.weights.merged_block(&self.base.backend, b, &self.lambda)?;
        }
        Ok(model)
    }

    /// Writes task `task`'s model, merging one shared block at a time.
    fn write_task(&self, task: usize, dir: &Path) -> Result<()> {
        let model = self.task_skeleton(task)?;
        let be = &self.base.backend;
        let n = self.shared.len();
        model.save_with(dir, false, &mut |b| {
            if b < n { self.weights.merged_block(be, b, &self.lambda).map(Some) } else { Ok(None) }
        })?;
        Ok(())
    }

    /// Trains for the configured epochs, then writes the output directory (atomically):
    /// `lambda.json`, `tasks/<task>/` models, `train_log.jsonl` and `summary.json`.
    pub fn run(self, opts: &AdaptOptions) -> Result<AdaptSummary> {
        self.run_in(opts, &mut Single)
    }

    /// [`LmAdapter::run`] as one rank of a data-parallel job; only rank 0 writes, after the
    /// ranks check they hold bit-identical Lambda and adapted layers.
    pub fn run_in(mut self, opts: &AdaptOptions, coll: &mut dyn Collective) -> Result<AdaptSummary> {
        let result = self.train_and_write(opts, coll);
        if let Err(e) = &result {
            coll.abort(&e.to_string());
        }
        result
    }

    fn train_and_write(&mut self, opts: &AdaptOptions, coll: &mut dyn Collective) -> Result<AdaptSummary> {
        let start = Instant::now();
        let staging = open_output(opts, coll)?;
        let log_path = staging.as_ref().map(|s| s.path().join("train_log.jsonl"));
        let k = self.tasks.len();
        let (epochs, seed) = (self.cfg.epochs, self.cfg.seed);
        let (steps, recent) = train_epochs(self, k, epochs, seed, opts, coll, log_path.as_deref())?;
        let streaming = self.weights.report();
        if coll.world_size() > 1 {
            verify_digest(coll, "Lambda", &self.lambda.digest())?;
            verify_digest(coll, "adapted layers", &self.private_digest()?)?;
        }
        let mut reports = Vec::with_capacity(k);
        for (task, r) in recent.iter().enumerate() {
            if let Some(staging) = &staging {
                self.write_task(task, &staging.path().join("tasks").join(&self.tasks[task].name))?;
            }
            reports.push(TaskReport {
                name: self.tasks[task].name.clone(),
                inputs: self.tasks[task].texts.len(),
                accuracy: None,
                final_loss: r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64,
                lambda_mean: self.task_lambda_mean(task),
            });
        }
        let summary = AdaptSummary {
            method: self.cfg.method,
            output: opts.output.clone(),
            epochs: self.cfg.epochs,
            steps,
            seconds: start.elapsed().as_secs_f64(),
            world_size: coll.world_size(),
            lambda_rows: self.lambda.keys.len(),
            lambda_hash: self.lambda.hash(),
            average_accuracy: None,
            tasks: reports,
            bytes_streamed_per_step: streaming.bytes_streamed / steps.max(1) as u64,
            streaming,
            peak_rss_bytes: crate::sysinfo::peak_rss_bytes(),
        };
        if let Some(staging) = staging {
            commit_output(staging, &self.lambda, &summary, &self.cfg, opts)?;
        }
        Ok(summary)
    }

    /// BLAKE3 of every task's adapted layers, in task, block and tensor-name order.
    fn private_digest(&self) -> Result<[u8; 32]> {
        let be = &self.base.backend;
        let mut h = blake3::Hasher::new();
        for t in &self.tasks {
            for p in t.private.iter().flat_map(|p| p.values()) {
                for v in be.download(&p.buf)? {
                    h.update(&v.to_le_bytes());
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Mean of task `task`'s Lambda column.
    pub fn task_lambda_mean(&self, task: usize) -> f64 {
        let k = self.lambda.tasks();
        let col: Vec<f32> = self.lambda.values.iter().skip(task).step_by(k).copied().collect();
        col.iter().map(|&v| v as f64).sum::<f64>() / col.len().max(1) as f64
    }
}

impl<B: Backend + Clone> Trainee for LmAdapter<B> {
    const COUNT_KEY: &'static str = "positions";

    fn task_name(&self, task: usize) -> &str {
        &self.tasks[task].name
    }

    fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)> {
        LmAdapter::step_in(self, task, coll)
    }

    fn task_lambda_mean(&self, task: usize) -> f64 {
        LmAdapter::task_lambda_mean(self, task)
    }

    fn describe_count(n: usize) -> String {
        format!("{n} positions")
    }
}
