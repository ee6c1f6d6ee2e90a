//! The adaptation loop: SyMerge (Lambda jointly with each task's own layer, against the experts'
//! cached soft labels) and AdaMerging (Lambda only, entropy), block-streamed.
//!
//! A step takes one batch of one task's unlabelled inputs. The forward builds each shared block's
//! merged weights when it reaches it and keeps only block outputs; the backward rebuilds each
//! block's weights in reverse, recomputes its internals from its saved input, turns the weight
//! gradients into Lambda gradients and drops the block. The task's own blocks (its head, and with
//! `last_block` its last encoder block) are resident, initialised from its expert, and get their
//! own gradients and Adam steps. An epoch visits every task once, in a shuffled order, with one
//! batch and one step each, as the released code does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::adam::{Adam, AdamConfig, BufAdam};
use super::config::{AdaptConfig, AdaptedLayer, LossKind, Method};
use super::lambda::{Granularity, Lambda};
use super::objective::{self, Objective};
use super::shared::{BlockLayout, SharedWeights, StreamReport};
use crate::atomic::Staging;
use crate::backend::Backend;
use crate::data::jsonl::read_jsonl;
use crate::dist::Collective;
use crate::dist::Single;
use crate::dist::data_parallel::{shard_range, verify_digest};
use crate::error::{Error, Result};
use crate::labels::produce::provenance;
use crate::labels::{LabelCache, LabelKind};
use crate::merge::philox::{ElementStream, name_hash};
use crate::model::classify::label_ids;
use crate::model::save::SaveOptions;
use crate::model::tokenize::Tokens;
use crate::model::{Bert, Block, LoadOptions, Param, Params, SequenceClassifier, TextTokenizer, evaluate};

/// One task during adaptation.
pub struct TaskState<B: Backend> {
    pub name: String,
    pub expert: PathBuf,
    pub texts: Vec<String>,
    tokens: Vec<Tokens>,
    tokenizer: TextTokenizer,
    /// Gold class ids, when the inputs carry labels (used only to report accuracy).
    pub gold: Option<Vec<usize>>,
    pub cache: Option<LabelCache>,
    pub classes: usize,
    /// The expert's class names (`config.json`'s `label2id`), carried into the adapted model.
    pub label2id: Option<BTreeMap<String, usize>>,
    /// The task's own blocks, after the shared ones.
    pub private_blocks: Vec<Block>,
    pub private: Vec<Params<B>>,
    adam: Vec<BTreeMap<String, BufAdam<B>>>,
    order: Vec<usize>,
    cursor: usize,
    shuffles: u32,
}

/// Gradients of one batch's loss.
pub struct StepGrads<B: Backend> {
    pub loss: f32,
    pub kept: usize,
    /// `[Lambda rows, K]`, like [`Lambda::values`].
    pub lambda: Vec<f64>,
    /// Aligned with the task's private blocks.
    pub private: Vec<Params<B>>,
}

/// The model being adapted.
pub struct Adapter<B: Backend> {
    pub cfg: AdaptConfig,
    /// The pretrained model: its config, tokenization and the shared blocks' layout.
    pub base: Bert<B>,
    pub shared: Vec<Block>,
    /// The shared blocks' weights, streamed from the checkpoints.
    pub weights: SharedWeights<B>,
    pub lambda: Lambda,
    lambda_adam: Adam,
    pub tasks: Vec<TaskState<B>>,
}

/// Per-task outcome (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub name: String,
    pub inputs: usize,
    /// Accuracy of the adapted model on the (labelled) inputs, in percent.
    pub accuracy: Option<f64>,
    /// Mean loss over the last epochs' steps of this task.
    pub final_loss: f64,
    /// Mean of this task's Lambda column.
    pub lambda_mean: f64,
}

/// Account of an adaptation run.
#[derive(Debug, Clone, Serialize)]
pub struct AdaptSummary {
    pub method: Method,
    pub output: PathBuf,
    pub epochs: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Data-parallel ranks that trained (1 without a launcher).
    pub world_size: usize,
    pub lambda_rows: usize,
    pub lambda_hash: String,
    pub tasks: Vec<TaskReport>,
    pub average_accuracy: Option<f64>,
    /// How the shared blocks were held and how many bytes were staged.
    pub streaming: StreamReport,
    /// Bytes staged from the checkpoints per step, on average.
    pub bytes_streamed_per_step: u64,
    /// Peak resident set of the process (`VmHWM`), where the system reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Where to write and how to report.
#[derive(Debug, Clone)]
pub struct AdaptOptions {
    pub output: PathBuf,
    pub force: bool,
    /// Measure each task's accuracy on its inputs' labels at the end.
    pub evaluate: bool,
    /// Log a line every this many steps.
    pub log_every: usize,
}

/// The shared blocks' layout (names and shapes, tensors in name order) of `blocks`.
pub(super) fn layouts(names_shapes: impl Iterator<Item = (String, Vec<(String, Vec<usize>)>)>) -> Vec<BlockLayout> {
    names_shapes
        .map(|(name, mut params)| {
            params.sort_by(|a, b| a.0.cmp(&b.0));
            BlockLayout { name, params }
        })
        .collect()
}

/// Lambda's keys: every shared tensor, or every shared block.
pub(super) fn lambda_keys(layout: &[BlockLayout], granularity: Granularity) -> Vec<String> {
    match granularity {
        Granularity::Tensor => layout.iter().flat_map(|l| l.params.iter().map(|(n, _)| n.clone())).collect(),
        Granularity::Block => layout.iter().map(|l| l.name.clone()).collect(),
    }
}

/// Adam states for a task's own blocks, on the backend.
pub(super) fn private_adams<B: Backend>(
    be: &B,
    private: &[Params<B>],
    lr: f32,
) -> Result<Vec<BTreeMap<String, BufAdam<B>>>> {
    private
        .iter()
        .map(|p| {
            p.iter().map(|(n, t)| Ok((n.clone(), BufAdam::new(be, be.len(&t.buf), AdamConfig::with_lr(lr))?))).collect()
        })
        .collect()
}

/// One Adam step on each of a task's own tensors that has a gradient.
pub(super) fn step_private<B: Backend>(
    be: &B,
    private: &mut [Params<B>],
    grads: &[Params<B>],
    adams: &mut [BTreeMap<String, BufAdam<B>>],
) -> Result<()> {
    for ((params, grads), adams) in private.iter_mut().zip(grads).zip(adams) {
        for (name, p) in params.iter_mut() {
            if let (Some(g), Some(adam)) = (grads.get(name), adams.get_mut(name)) {
                adam.step(be, &mut p.buf, &g.buf)?;
            }
        }
    }
    Ok(())
}

impl<B: Backend + Clone> Adapter<B> {
    /// Loads the base model, the experts (their task vectors and own layers), the inputs and the
    /// label caches, checking that each cache was made by that expert for those inputs.
    pub fn load(backend: B, cfg: AdaptConfig) -> Result<Self> {
        Self::load_with(backend, cfg, None)
    }

    /// [`Adapter::load`] with a memory budget for keeping shared blocks staged between visits
    /// (default: half the backend's free memory; `Some(0)` streams every block).
    pub fn load_with(backend: B, cfg: AdaptConfig, budget: Option<u64>) -> Result<Self> {
        // The pretrained model's weights are streamed, never loaded: only its layout is.
        let base = Bert::load_partial(backend.clone(), &cfg.base_model, LoadOptions::default(), usize::MAX)?;
        let encoder_blocks = base.blocks.iter().filter(|b| !matches!(b, Block::Head(_))).count();
        let n_shared = match cfg.adapted_layer {
            AdaptedLayer::Head => encoder_blocks,
            AdaptedLayer::LastBlock => encoder_blocks.saturating_sub(1),
        };
        if n_shared == 0 {
            return Err(Error::Model { path: cfg.base_model.clone(), reason: "no shared blocks to merge".into() });
        }
        let shared: Vec<Block> = base.blocks[..n_shared].to_vec();
        let layout = layouts(shared.iter().map(|b| (b.name(), b.param_shapes())));
        let models: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();
        let lambda = Lambda::new(cfg.granularity, models, lambda_keys(&layout, cfg.granularity), cfg.lambda_init);

        let mut tasks = Vec::with_capacity(cfg.tasks.len());
        for t in &cfg.tasks {
            let mut expert = Bert::load_partial(backend.clone(), &t.expert, LoadOptions::default(), n_shared)?;
            let classes = expert.num_labels().ok_or_else(|| Error::Model {
                path: t.expert.clone(),
                reason: "no classification head: an expert must be a fine-tuned classifier".into(),
            })?;
            let names: Vec<String> = expert.blocks.iter().map(Block::name).collect();
            let want: Vec<String> =
                base.blocks[..encoder_blocks].iter().map(Block::name).chain(["head".into()]).collect();
            if names != want {
                return Err(Error::Model {
                    path: t.expert.clone(),
                    reason: format!("blocks {names:?} do not match the base model's {want:?}"),
                });
            }
            let examples = read_jsonl(&t.inputs)?;
            if examples.is_empty() {
                return Err(Error::Invalid(format!("{}: no inputs for task `{}`", t.inputs.display(), t.name)));
            }
            let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
            let expert_dir = if t.expert.is_dir() { t.expert.clone() } else { expert.path.clone() };
            let tokenizer = TextTokenizer::from_dir(&expert_dir, cfg.max_len)?;
            let tokens = tokenizer.tokenize(&texts)?;
            let labelled = examples.iter().all(|e| e.label.is_some() || e.label_id.is_some());
            let gold = labelled
                .then(|| label_ids(&examples, expert.config.label2id.as_ref(), classes, &t.inputs))
                .transpose()?;
            let cache = match (&t.cache, cfg.method) {
                (Some(path), Method::Symerge) => {
                    let want = provenance(&t.expert, &t.name, cfg.max_len, &texts)?;
                    let cache = LabelCache::open(path, Some(&want))?;
                    if cache.classes() != classes {
                        let what = match cache.kind() {
                            LabelKind::Classification { classes } => format!("{classes} classes"),
                            LabelKind::TopK { .. } => "next-token top-k labels (a causal LM's)".into(),
                        };
                        return Err(Error::LabelCache {
                            path: path.clone(),
                            reason: format!("{what}, but the expert is a classifier with {classes} classes"),
                        });
                    }
                    Some(cache)
                }
                _ => None,
            };
            let private_blocks = expert.blocks[n_shared..].to_vec();
            let private: Vec<Params<B>> = expert.params.drain(n_shared..).collect();
            let adam = private_adams(&backend, &private, cfg.layer_lr)?;
            tasks.push(TaskState {
                name: t.name.clone(),
                expert: expert_dir,
                texts,
                tokens,
                tokenizer,
                gold,
                cache,
                classes,
                label2id: expert.config.label2id.clone(),
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
        Ok(Adapter { cfg, base, shared, weights, lambda, lambda_adam, tasks })
    }

    fn objective(&self) -> Objective {
        match (self.cfg.method, self.cfg.loss) {
            (Method::Adamerging, _) => Objective::Entropy,
            (Method::Symerge, LossKind::Soft) => Objective::Soft { min_confidence: self.cfg.confidence },
            (Method::Symerge, LossKind::HardConf) => Objective::HardConf,
        }
    }

    /// Loss and gradients of task `task` on its inputs `rows`, block-streamed.
    pub fn loss_and_grads(&self, task: usize, rows: &[usize]) -> Result<StepGrads<B>> {
        self.loss_and_grads_in(task, rows, &mut Single)
    }

    /// Loss and gradients of task `task` on the batch `rows`, computed data-parallel: this rank
    /// takes its [`shard_range`] of the rows, and after each block's backward its Lambda rows
    /// (or the adapted block's gradients) are all-reduced, so every rank returns the full
    /// batch's mean loss and gradients. Each rank's logits gradient is scaled by its kept
    /// samples over the kept samples of all ranks (one small all-reduce after the forward), so
    /// uneven shards and filtered samples count each sample once. With one rank this is the
    /// plain single-process computation and makes no collective call.
    pub fn loss_and_grads_in(&self, task: usize, rows: &[usize], coll: &mut dyn Collective) -> Result<StepGrads<B>> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let mine = &rows[shard_range(rows.len(), rank, world)];
        let be = &self.base.backend;
        let t = &self.tasks[task];
        let n_shared = self.shared.len();
        let total = n_shared + t.private_blocks.len();

        // Forward (skipped by a rank whose shard is empty): only block outputs are kept (each
        // is the next block's input).
        let mut acts: Vec<B::Buf> = Vec::with_capacity(total);
        let mut local = None;
        if !mine.is_empty() {
            let seqs: Vec<&Tokens> = mine.iter().map(|&i| &t.tokens[i]).collect();
            let batch = self.base.batch(&t.tokenizer.pad(&seqs))?;
            for b in 0..total {
                let y = if b < n_shared {
                    let p =
                        self.weights.visit(be, b, Some(self.weights.next_block(b, true)))?.merged(be, &self.lambda)?;
                    self.shared[b].forward(be, &p, &batch, acts.last())?
                } else {
                    t.private_blocks[b - n_shared].forward(be, &t.private[b - n_shared], &batch, acts.last())?
                };
                acts.push(y);
            }
            let logits = acts.pop().ok_or_else(|| Error::Invalid("the model has no blocks".into()))?;
            let expert_probs = t.cache.as_ref().map(|c| c.probs_batch(mine));
            let p = objective::prepare(be, self.objective(), &logits, expert_probs.as_deref(), batch.batch, t.classes)?;
            local = Some((batch, logits, p));
        }
        let (local_kept, local_sum) = local.as_ref().map_or((0, 0.0), |(_, _, p)| (p.kept, p.loss_sum()));
        let (kept, loss) = if world == 1 {
            (local_kept, None)
        } else {
            // Counts below 2^24 are exact in f32.
            let mut totals = [local_kept as f32, local_sum as f32];
            coll.all_reduce_sum_f32(&mut totals)?;
            let kept = totals[0] as usize;
            (kept, Some(if kept == 0 { 0.0 } else { totals[1] / kept as f32 }))
        };
        let (batch, mut dy, local_loss) = match local {
            Some((batch, logits, p)) => {
                let out = objective::finish(be, p, &logits, t.classes, kept)?;
                (Some(batch), Some(out.dlogits), out.loss)
            }
            None => (None, None, 0.0),
        };
        let loss = loss.unwrap_or(local_loss);

        // Backward in reverse, rebuilding each shared block's weights. Blocks the gradient no
        // longer reaches (and every block of a rank without rows) contribute zeros, so every
        // rank makes the same all-reduce calls.
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
        Ok(StepGrads { loss, kept, lambda: lambda_grad, private })
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

    /// One optimisation step on task `task`; returns (loss, kept samples).
    pub fn step(&mut self, task: usize) -> Result<(f32, usize)> {
        self.step_in(task, &mut Single)
    }

    /// One data-parallel step: every rank draws the same batch, computes its shard, and applies
    /// the same all-reduced gradients, so the ranks' parameters stay bit-identical.
    pub fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)> {
        let rows = self.next_rows(task);
        let g = self.loss_and_grads_in(task, &rows, coll)?;
        let lg: Vec<f32> = g.lambda.iter().map(|&v| v as f32).collect();
        self.lambda_adam.step(&mut self.lambda.values, &lg);
        if self.cfg.clamp {
            self.lambda.clamp(0.0, 1.0);
        }
        if self.cfg.method == Method::Symerge {
            let t = &mut self.tasks[task];
            step_private(&self.base.backend, &mut t.private, &g.private, &mut t.adam)?;
        }
        Ok((g.loss, g.kept))
    }

    /// Task `task`'s model with the shared blocks' parameters left empty and a copy of its own
    /// (adapted) blocks: filled by [`Adapter::task_model`], or written block by block.
    fn task_skeleton(&self, task: usize) -> Result<Bert<B>> {
        let be = &self.base.backend;
        let t = &self.tasks[task];
        let mut params: Vec<Params<B>> = (0..self.shared.len()).map(|_| Params::new()).collect();
        for p in &t.private {
            params.push(copy_params(be, p)?);
        }
        let blocks = self.shared.iter().cloned().chain(t.private_blocks.iter().cloned()).collect();
        let mut config = self.base.config.clone();
        config.label2id = t.label2id.clone();
        Ok(Bert { config, path: t.expert.clone(), blocks, params, backend: be.clone() })
    }

    /// Task `task`'s merged model: the merged shared blocks and its own (adapted) blocks.
    pub fn task_model(&self, task: usize) -> Result<Bert<B>> {
        let mut model = self.task_skeleton(task)?;
        for b in 0..self.shared.len() {
            model.params[b] = self.weights.merged_block(&self.base.backend, b, &self.lambda)?;
        }
        Ok(model)
    }

    /// Writes task `task`'s model as a Hugging Face checkpoint with the expert's class names,
    /// merging one shared block at a time.
    fn write_task(&self, task: usize, dir: &Path) -> Result<()> {
        let model = self.task_skeleton(task)?;
        let opts = SaveOptions { labels: model.config.label_names(), ..SaveOptions::default() };
        let be = &self.base.backend;
        let n = self.shared.len();
        model.save_with(dir, &opts, &mut |b| {
            if b < n { self.weights.merged_block(be, b, &self.lambda).map(Some) } else { Ok(None) }
        })?;
        Ok(())
    }

    /// Trains for the configured epochs, then writes the output directory (atomically).
    pub fn run(self, opts: &AdaptOptions) -> Result<AdaptSummary> {
        self.run_in(opts, &mut Single)
    }

    /// [`Adapter::run`] as one rank of a data-parallel job: every rank trains on its shard of
    /// each batch; at the end the ranks check that they hold bit-identical Lambda and adapted
    /// layers (BLAKE3), and only rank 0 evaluates and writes the output directory. A rank that
    /// fails tells the others through [`Collective::abort`] so they stop at once.
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
            tracing::info!("rank {}: Lambda and adapted layers agree on all {} ranks", coll.rank(), coll.world_size());
        }

        let mut reports = Vec::with_capacity(k);
        for (task, r) in recent.iter().enumerate() {
            let t = &self.tasks[task];
            let mut accuracy = None;
            if let Some(staging) = &staging {
                self.write_task(task, &staging.path().join("tasks").join(&t.name))?;
                if let (Some(gold), true) = (&t.gold, opts.evaluate) {
                    let model = self.task_model(task)?;
                    let tokenizer = TextTokenizer::from_dir(&t.expert, self.cfg.max_len)?;
                    let clf = SequenceClassifier { model, tokenizer };
                    accuracy = Some(100.0 * evaluate(&clf, &t.texts, gold, self.cfg.batch_size.max(32))?.accuracy);
                }
            }
            reports.push(TaskReport {
                name: t.name.clone(),
                inputs: t.texts.len(),
                accuracy,
                final_loss: r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64,
                lambda_mean: self.task_lambda_mean(task),
            });
        }
        let accs: Vec<f64> = reports.iter().filter_map(|r| r.accuracy).collect();
        let summary = AdaptSummary {
            method: self.cfg.method,
            output: opts.output.clone(),
            epochs: self.cfg.epochs,
            steps,
            seconds: start.elapsed().as_secs_f64(),
            world_size: coll.world_size(),
            lambda_rows: self.lambda.keys.len(),
            lambda_hash: self.lambda.hash(),
            average_accuracy: (accs.len() == k).then(|| accs.iter().sum::<f64>() / k as f64),
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

    fn task_lambda_mean(&self, task: usize) -> f64 {
        let k = self.lambda.tasks();
        let col: Vec<f32> = self.lambda.values.iter().skip(task).step_by(k).copied().collect();
        col.iter().map(|&v| v as f64).sum::<f64>() / col.len().max(1) as f64
    }
}

/// Rank 0's staging directory for the output (refusing an existing one without `force`);
/// `None` on the other ranks, which write nothing.
pub(super) fn open_output(opts: &AdaptOptions, coll: &dyn Collective) -> Result<Option<Staging>> {
    if coll.rank() != 0 {
        return Ok(None);
    }
    if opts.output.exists() && !opts.force {
        return Err(Error::OutputExists { path: opts.output.clone() });
    }
    Ok(Some(Staging::create(&opts.output)?))
}

/// Writes `lambda.json` and `summary.json` (the summary with the config) into the staging
/// directory and renames it into place.
pub(super) fn commit_output(
    staging: Staging,
    lambda: &Lambda,
    summary: &AdaptSummary,
    cfg: &AdaptConfig,
    opts: &AdaptOptions,
) -> Result<()> {
    lambda.save(&staging.path().join("lambda.json"))?;
    let json = serde_json::json!({"summary": summary, "config": cfg});
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    let path = staging.path().join("summary.json");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    staging.commit(&opts.output, opts.force)
}

/// What [`train_epochs`] drives: one adapter (classifiers or causal LMs).
pub(super) trait Trainee {
    fn task_name(&self, task: usize) -> &str;
    /// One optimiser step on task `task`: its loss and how many samples it counted.
    fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)>;
    fn task_lambda_mean(&self, task: usize) -> f64;
    /// Key of the step's sample count in the training log.
    const COUNT_KEY: &'static str;
    /// The step's sample count as the progress line says it.
    fn describe_count(n: usize) -> String;
}

/// The epoch loop both adapters share: every epoch visits the `k` tasks in a seeded shuffled
/// order, one step each; a JSON line per step goes to `log` (rank 0), a progress line every
/// `opts.log_every` steps. Returns the number of steps and each task's last (up to 10) losses.
/// Each log line carries the seconds since training began, so a step's time can be read off.
pub(super) fn train_epochs<T: Trainee>(
    t: &mut T,
    k: usize,
    epochs: usize,
    seed: u64,
    opts: &AdaptOptions,
    coll: &mut dyn Collective,
    log_path: Option<&Path>,
) -> Result<(usize, Vec<Vec<f32>>)> {
    let writer = coll.rank() == 0;
    let mut log = match log_path {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?)),
        None => None,
    };
    let mut recent: Vec<Vec<f32>> = vec![Vec::new(); k];
    let mut steps = 0usize;
    let started = Instant::now();
    for epoch in 0..epochs {
        for task in permutation(k, seed, name_hash("epoch order"), epoch as u32) {
            let (loss, count) = t.step_in(task, coll)?;
            if !loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "loss of task `{}` became {loss} at epoch {epoch}; lower the learning rate",
                    t.task_name(task)
                )));
            }
            steps += 1;
            let r = &mut recent[task];
            r.push(loss);
            if r.len() > 10 {
                r.remove(0);
            }
            if let (Some(log), Some(path)) = (log.as_mut(), log_path) {
                let mut line = serde_json::json!({
                    "step": steps, "epoch": epoch, "task": t.task_name(task), "loss": loss,
                    "seconds": started.elapsed().as_secs_f64(),
                });
                line[T::COUNT_KEY] = count.into();
                line["lambda_mean"] = t.task_lambda_mean(task).into();
                writeln!(log, "{line}").map_err(|e| Error::io(path, e))?;
            }
            if writer && opts.log_every > 0 && steps.is_multiple_of(opts.log_every) {
                tracing::info!(
                    "epoch {}/{} step {steps}: {} loss {loss:.4} ({}), mean lambda {:.3}",
                    epoch + 1,
                    epochs,
                    t.task_name(task),
                    T::describe_count(count),
                    t.task_lambda_mean(task)
                );
            }
        }
    }
    if let (Some(mut log), Some(path)) = (log, log_path) {
        log.flush().map_err(|e| Error::io(path, e))?;
    }
    Ok((steps, recent))
}

/// Sums block `b`'s Lambda rows of `grad` (`k` tasks) over the ranks. Each f64 value travels as
/// an f32 and the f32 of its remainder: per-rank sums of a batch's samples often cancel, and one
/// f32 per rank would leave an error relative to the (larger) per-rank values rather than to
/// their sum.
pub(super) fn all_reduce_lambda_rows<B: Backend>(
    weights: &SharedWeights<B>,
    k: usize,
    coll: &mut dyn Collective,
    b: usize,
    grad: &mut [f64],
) -> Result<()> {
    let mut rows: Vec<usize> = weights.blocks[b].tensors.iter().map(|t| t.row).collect();
    rows.sort_unstable();
    rows.dedup();
    let values: Vec<f64> = rows.iter().flat_map(|&r| grad[r * k..(r + 1) * k].iter().copied()).collect();
    let mut buf: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    buf.extend(values.iter().map(|&v| (v - v as f32 as f64) as f32));
    coll.all_reduce_sum_f32(&mut buf)?;
    let (hi, lo) = buf.split_at(values.len());
    let mut sums = hi.iter().zip(lo).map(|(&h, &l)| h as f64 + l as f64);
    for &r in &rows {
        for (g, s) in grad[r * k..(r + 1) * k].iter_mut().zip(&mut sums) {
            *g = s;
        }
    }
    Ok(())
}

/// Zeros shaped like `params`: the gradient of a rank whose shard is empty.
pub(super) fn zeros_like<B: Backend>(be: &B, params: &Params<B>) -> Result<Params<B>> {
    let mut out = Params::new();
    for (name, p) in params {
        out.insert(name.clone(), Param { shape: p.shape.clone(), buf: be.zeros(be.len(&p.buf))? });
    }
    Ok(out)
}

/// Sums a block's gradients over the ranks in one all-reduce (tensors in name order).
pub(super) fn all_reduce_params<B: Backend>(be: &B, coll: &mut dyn Collective, grads: &mut Params<B>) -> Result<()> {
    let mut flat = Vec::new();
    for p in grads.values() {
        flat.extend(be.download(&p.buf)?);
    }
    coll.all_reduce_sum_f32(&mut flat)?;
    let mut at = 0;
    for p in grads.values_mut() {
        let n = be.len(&p.buf);
        p.buf = be.upload(&flat[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// A seeded permutation of `0..n` (Fisher-Yates over a Philox stream).
pub(super) fn permutation(n: usize, seed: u64, stream: u32, draw: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut u = vec![0f32; n];
    ElementStream::new(seed, stream, draw).fill_uniform(0, &mut u);
    for i in (1..n).rev() {
        let j = ((u[i] * (i + 1) as f32) as usize).min(i);
        order.swap(i, j);
    }
    order
}

/// A copy of `params` on the backend (the task's own, trained apart from the expert's).
pub(super) fn copy_params<B: Backend>(be: &B, params: &Params<B>) -> Result<Params<B>> {
    let mut out = Params::new();
    for (name, p) in params {
        out.insert(name.clone(), Param { shape: p.shape.clone(), buf: be.upload(&be.download(&p.buf)?)? });
    }
    Ok(out)
}

impl<B: Backend + Clone> Trainee for Adapter<B> {
    const COUNT_KEY: &'static str = "kept";

    fn task_name(&self, task: usize) -> &str {
        &self.tasks[task].name
    }

    fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)> {
        Adapter::step_in(self, task, coll)
    }

    fn task_lambda_mean(&self, task: usize) -> f64 {
        Adapter::task_lambda_mean(self, task)
    }

    fn describe_count(n: usize) -> String {
        format!("kept {n}")
    }
}
