//! The adaptation loop every model family shares: SyMerge (Lambda jointly with each task's own
//! layer, against the experts' cached labels) and AdaMerging (Lambda only, entropy),
//! block-streamed.
//!
//! A step takes one batch of one task's unlabelled inputs. The forward builds each shared block's
//! merged weights when it reaches it ([`SharedWeights`]) and keeps block outputs, plus each
//! block's internals and merged weights while the memory budget has room; the backward visits
//! the blocks in reverse, rebuilds what was not kept (weights merged again, internals recomputed
//! from the block's input), turns the weight gradients into Lambda gradients and drops the block. The task's own
//! blocks (its head, and with `last_block` its last block) are resident, initialised from its
//! expert, and get their own gradients and Adam steps. An epoch visits every task once, in a
//! shuffled order, with one batch and one step each, as the released code does.
//!
//! What differs between model families (how a batch is made, the loss at the end of the chain,
//! how a task's model is written) is a [`Family`]: [`super::classifier`] for the BERT family,
//! [`super::lm`] for causal LMs. A new family is one more implementation, not another loop.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::adam::{Adam, AdamConfig, BufAdam};
use super::classifier::Adapter;
use super::config::{AdaptConfig, Method};
use super::lambda::{Granularity, Lambda};
use super::lm::LmAdapter;
use super::shared::{BlockLayout, SharedBlock, SharedWeights, StreamReport, add_dots};
use crate::atomic::Staging;
use crate::backend::{Backend, Device};
use crate::checkpoint::FloatDType;
use crate::dist::data_parallel::{shard_range, verify_digest};
use crate::dist::{Collective, ConnectOptions, Single};
use crate::error::{Error, Result};
use crate::merge::philox::{ElementStream, name_hash};
use crate::model::tokenize::Tokens;
use crate::model::{ChainBlock, LmEvalReport, LmKind, Param, Params, TextTokenizer};
use crate::units::parse_budget;

/// A block's kept internals, by the family's block type.
type InternalsOf<B, F> = <<F as Family<B>>::Block as ChainBlock<B>>::Internals;
type KeptOf<B, F> = Option<InternalsOf<B, F>>;

/// What a block's forward leaves for its backward beyond its input: its internals and (shared
/// blocks) its merged weights, each `None` when not kept.
struct KeptBlock<B: Backend, F: Family<B>> {
    internals: KeptOf<B, F>,
    merged: Option<Params<B>>,
}

impl<B: Backend, F: Family<B>> Default for KeptBlock<B, F> {
    fn default() -> Self {
        KeptBlock { internals: None, merged: None }
    }
}

impl<B: Backend, F: Family<B>> KeptBlock<B, F> {
    /// Keeps what fits in `room` (internals first: they save the most work), taking it from there.
    fn within(self, be: &B, room: &mut u64) -> Self {
        let mut take = |bytes: u64| {
            let fits = bytes <= *room;
            if fits {
                *room -= bytes;
            }
            fits
        };
        let internals = self.internals.filter(|k| take(4 * F::Block::internals_len(be, k) as u64));
        let merged = self.merged.filter(|p| take(4 * p.values().map(|t| be.len(&t.buf) as u64).sum::<u64>()));
        KeptBlock { internals, merged }
    }
}

/// What the forward leaves for the backward: each block's input (the outputs of all blocks but
/// the last), what each block kept, and the loss's part.
struct Forward<B: Backend, F: Family<B>> {
    acts: Vec<B::Buf>,
    kept: Vec<KeptBlock<B, F>>,
    local: Option<Local<B, F>>,
}

/// A rank's forward result: its batch, the loss's state for the backward, its counted samples
/// and their summed loss.
struct Local<B: Backend, F: Family<B>> {
    batch: BatchOf<B, F>,
    pending: F::Pending,
    count: usize,
    sum: f64,
}

/// The samples counted by all ranks and, with more than one rank, their mean loss (one small
/// all-reduce; a single process makes no collective call).
fn global_count(coll: &mut dyn Collective, local_n: usize, local_sum: f64) -> Result<(usize, Option<f32>)> {
    if coll.world_size() == 1 {
        return Ok((local_n, None));
    }
    // Counts below 2^24 are exact in f32.
    let mut totals = [local_n as f32, local_sum as f32];
    coll.all_reduce_sum_f32(&mut totals)?;
    let n = totals[0] as usize;
    Ok((n, Some(if n == 0 { 0.0 } else { totals[1] / n as f32 })))
}

/// The uploaded batch of a family.
pub type BatchOf<B, F> = <<F as Family<B>>::Block as ChainBlock<B>>::Batch;

/// A batch and the chain's output on it ([`Adaptation::infer`]).
pub type Inferred<B, F> = (BatchOf<B, F>, <B as Backend>::Buf);

/// What a model family brings to adaptation (see the module notes).
pub trait Family<B: Backend>: Sized {
    type Block: ChainBlock<B>;
    /// A task's data beyond what every family keeps (labels, caches, class names).
    type TaskData;
    /// The loss's state between the forward and the backward.
    type Pending;
    /// Key of a step's sample count in the training log.
    const COUNT_KEY: &'static str;
    /// A step's sample count as the progress line says it.
    fn describe_count(n: usize) -> String;

    fn backend(&self) -> &B;
    /// The batch of `rows` of `task`; `None` when it has nothing to predict.
    fn batch(&self, task: &Task<B, Self>, rows: &[usize]) -> Result<Option<BatchOf<B, Self>>>;
    /// The loss of the chain's output `out` on `rows`: its state, this rank's sample count and
    /// its loss summed over those samples.
    fn loss(
        &self,
        cfg: &AdaptConfig,
        task: &Task<B, Self>,
        batch: &BatchOf<B, Self>,
        out: B::Buf,
        rows: &[usize],
    ) -> Result<(Self::Pending, usize, f64)>;
    /// The gradient wrt the chain's output of the mean over `total` samples of all ranks, and
    /// this rank's mean loss.
    fn loss_backward(
        &self,
        task: &Task<B, Self>,
        batch: &BatchOf<B, Self>,
        pending: Self::Pending,
        total: usize,
    ) -> Result<(B::Buf, f32)>;
    /// Writes task `task`'s model into `dir` (when given) with its weights in `dtype` and, when
    /// asked and possible, scores it on its inputs (accuracies as fractions in [0, 1], as `eval`'s).
    fn finish_task(
        a: &Adaptation<B, Self>,
        task: usize,
        dir: Option<&Path>,
        dtype: FloatDType,
        evaluate: bool,
    ) -> Result<Option<TaskEval>>;
    /// What the summary's lines call its numbers.
    fn summary_labels(cfg: &AdaptConfig) -> SummaryLabels;
}

/// A task's adapted model scored on its inputs at the end of a run.
#[derive(Debug, Clone)]
pub enum TaskEval {
    /// A classifier's accuracy on the inputs' labels, in percent.
    Accuracy(f64),
    /// A causal LM's next-token scores, as `symerge eval` reports them.
    NextToken(LmEvalReport),
}

/// What the text summary calls a task's score and its training loss (summary.json's field names
/// say it already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryLabels {
    /// "accuracy", or "top-1" for a causal LM's next-token accuracy.
    pub score: &'static str,
    /// The objective `final_loss` measures: "final loss", or for a causal LM "top-k soft loss"
    /// (against the expert's cached top-k, not the next-token loss `eval` reports) or "entropy".
    pub loss: &'static str,
}

/// One task during adaptation.
pub struct Task<B: Backend, F: Family<B>> {
    pub name: String,
    /// The expert's directory (config, tokenizer).
    pub expert: PathBuf,
    pub texts: Vec<String>,
    /// BLAKE3 of the inputs file as read ([`crate::data::jsonl::read_jsonl_hashed`]).
    pub inputs_hash: String,
    pub tokens: Vec<Tokens>,
    pub tokenizer: TextTokenizer,
    /// The task's own blocks, after the shared ones.
    pub private_blocks: Vec<F::Block>,
    pub private: Vec<Params<B>>,
    pub data: F::TaskData,
    adam: Vec<BTreeMap<String, BufAdam<B>>>,
    order: Vec<usize>,
    cursor: usize,
    shuffles: u32,
    /// The rows of the task's last step ([`Adaptation::end_loss_in`] scores them again).
    last_rows: Vec<usize>,
}

impl<B: Backend, F: Family<B>> Task<B, F> {
    /// A task with Adam states for its own blocks (learning rate `lr`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        name: String,
        expert: PathBuf,
        (texts, inputs_hash): (Vec<String>, String),
        tokenizer: TextTokenizer,
        private_blocks: Vec<F::Block>,
        private: Vec<Params<B>>,
        lr: f32,
        data: F::TaskData,
    ) -> Result<Self> {
        let tokens = tokenizer.tokenize(&texts)?;
        let adam = private_adams(be, &private, lr)?;
        Ok(Task {
            name,
            expert,
            texts,
            inputs_hash,
            tokens,
            tokenizer,
            private_blocks,
            private,
            data,
            adam,
            order: Vec::new(),
            cursor: 0,
            shuffles: 0,
            last_rows: Vec::new(),
        })
    }
}

/// A task's chain: its blocks and their parameters (the shared ones left empty).
pub type Skeleton<B, F> = (Vec<<F as Family<B>>::Block>, Vec<Params<B>>);

/// Gradients of one batch's loss.
pub struct StepGrads<B: Backend> {
    pub loss: f32,
    /// Samples (classifiers) or predicted positions (causal LMs) counted.
    pub kept: usize,
    /// `[Lambda rows, K]`, like [`Lambda::values`].
    pub lambda: Vec<f64>,
    /// Aligned with the task's private blocks.
    pub private: Vec<Params<B>>,
}

/// A model being adapted: the shared blocks (streamed), Lambda, and every task's own blocks.
pub struct Adaptation<B: Backend, F: Family<B>> {
    pub cfg: AdaptConfig,
    /// The family's view of the pretrained model (its layout, batching, loss).
    pub family: F,
    pub shared: Vec<F::Block>,
    /// The shared blocks' weights, streamed from the checkpoints.
    pub weights: SharedWeights<B>,
    pub lambda: Lambda,
    lambda_adam: Adam,
    pub tasks: Vec<Task<B, F>>,
}

/// Per-task outcome (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub name: String,
    pub inputs: usize,
    /// Accuracy of the adapted model on the (labelled) inputs, a fraction in [0, 1] like
    /// `eval`'s (percent before [`SUMMARY_FORMAT_VERSION`] 2); for a causal LM its top-1
    /// next-token accuracy on the inputs.
    pub accuracy: Option<f64>,
    /// A causal LM's perplexity on the inputs: `exp(next_token_loss)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// A causal LM's mean next-token loss on the inputs (nats), what `symerge eval` reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token_loss: Option<f64>,
    /// Mean training loss over the last epochs' steps of this task (for a causal LM the top-k
    /// soft loss against the expert's cache, or the entropy: not `next_token_loss`); `None`
    /// when no step counted a sample (a confidence filter that drops them all), not 0.
    pub final_loss: Option<f64>,
    /// The same objective under the weights written, on the batch of the task's last step (every
    /// step's loss is that of the weights before its update); `None` when nothing was trained.
    pub end_loss: Option<f64>,
    /// Mean of this task's Lambda column.
    pub lambda_mean: f64,
    /// Fingerprint of the written `tasks/<task>/` model (`eval` checks it before scoring).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// BLAKE3 of the inputs file adapt read (`eval` checks the recorded inputs against it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs_hash: Option<String>,
}

impl TaskReport {
    /// A task's line of the summary, its scores from `eval` (none when not measured).
    fn new(
        name: String,
        inputs: usize,
        eval: Option<TaskEval>,
        (final_loss, end_loss): (Option<f64>, Option<f64>),
        lambda_mean: f64,
        (model_hash, inputs_hash): (Option<String>, Option<String>),
    ) -> Self {
        let (accuracy, perplexity, next_token_loss) = match eval {
            Some(TaskEval::Accuracy(a)) => (Some(a), None, None),
            Some(TaskEval::NextToken(r)) => (Some(r.top1_accuracy), Some(r.perplexity), Some(r.mean_loss)),
            None => (None, None, None),
        };
        TaskReport {
            name,
            inputs,
            accuracy,
            perplexity,
            next_token_loss,
            final_loss,
            end_loss,
            lambda_mean,
            model_hash,
            inputs_hash,
        }
    }
}

/// Version of [`AdaptSummary`]'s JSON (`--json`, `summary.json`). 2: accuracies are fractions in
/// [0, 1]; summaries without the field (version 1) hold them in percent. A reader tells them
/// apart by this field, so outputs of earlier builds still read right.
pub const SUMMARY_FORMAT_VERSION: u32 = 2;

/// Account of an adaptation run.
#[derive(Debug, Clone, Serialize)]
pub struct AdaptSummary {
    /// [`SUMMARY_FORMAT_VERSION`].
    pub format_version: u32,
    pub method: Method,
    pub output: PathBuf,
    pub epochs: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Data-parallel ranks that trained (1 without a launcher).
    pub world_size: usize,
    pub lambda_rows: usize,
    pub lambda_hash: String,
    /// Storage dtype of the written models (`torch_dtype` spelling).
    pub out_dtype: String,
    pub tasks: Vec<TaskReport>,
    /// Unweighted mean of the tasks' accuracies (a fraction), when every task has one.
    pub average_accuracy: Option<f64>,
    /// A causal LM's geometric-mean perplexity over the tasks (the exp of their mean next-token
    /// loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_perplexity: Option<f64>,
    /// What the text summary calls its numbers.
    #[serde(skip)]
    pub labels: SummaryLabels,
    /// How the shared blocks were held and how many bytes were staged.
    pub streaming: StreamReport,
    /// Bytes staged from the checkpoints per step, on average, besides the kept blocks' one-time
    /// load (`streaming.bytes_loaded_once`): 2 x the streamed blocks' bytes, 0 when every block is
    /// kept.
    pub bytes_streamed_per_step: u64,
    /// Peak resident set of the process (`VmHWM`), where the system reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Where to write and how to report; also `symerge adapt`'s output flags (their defaults are
/// [`AdaptOptions::new`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptOptions {
    /// Output directory (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Log a line every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Skip scoring the adapted models on their inputs (a classifier's accuracy on the labels, a
    /// causal LM's perplexity and top-1 next-token accuracy).
    // The flag is `--no-eval`: `true` (the default) scores each task at the end.
    #[arg(long = "no-eval", action = clap::ArgAction::SetFalse)]
    pub evaluate: bool,
    /// Replace an existing output directory that symerge wrote (it holds .symerge-output) or
    /// that is empty; anything else is refused.
    #[arg(long)]
    pub force: bool,
    /// Storage dtype of the written models (f32, bf16, f16); default: the dtype most of the
    /// base checkpoint's shared weights are stored in (training itself is f32 either way).
    #[arg(long, value_name = "DTYPE")]
    pub out_dtype: Option<FloatDType>,
}

impl AdaptOptions {
    /// The defaults: a log line every 10 steps, each task scored at the end, no replacing.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        AdaptOptions { output: output.into(), log_every: 10, evaluate: true, force: false, out_dtype: None }
    }
}

/// `symerge adapt`'s arguments: the config and its overrides, the [`AdaptOptions`], the
/// launcher's ranks, the device and its memory budgets.
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptArgs {
    /// The adaptation's YAML config (method, base_model, tasks; see the README's adapt.yml).
    pub config: PathBuf,
    #[command(flatten)]
    pub opts: AdaptOptions,
    /// Override the config's epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override the config's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data-parallel over the launcher's ranks: each takes its share of every batch.
    #[command(flatten)]
    pub dist: ConnectOptions,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
    /// launcher the GPU of LOCAL_RANK), cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// On the CPU: host memory for keeping shared blocks' checkpoint pages mapped
    /// between visits (at most half of it) and layers' forward internals for the backward
    /// (e.g. 8GB; 0 streams every block and recomputes every layer). Default: half the
    /// available memory.
    #[arg(long, value_parser = parse_budget)]
    pub host_mem: Option<u64>,
    /// On a GPU: device memory for keeping shared blocks' bytes on the GPU between
    /// visits (at most half of it) and layers' forward internals (0 streams every block and
    /// recomputes every layer). Default: half the free device memory.
    #[arg(long, value_parser = parse_budget)]
    pub device_mem: Option<u64>,
}

impl AdaptArgs {
    /// The defaults: [`AdaptOptions::new`], the config's epochs and seed, `--device auto`, half
    /// the memory, one process unless a launcher says otherwise.
    pub fn new(config: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        AdaptArgs {
            config: config.into(),
            opts: AdaptOptions::new(output),
            epochs: None,
            seed: None,
            dist: ConnectOptions::default(),
            device: Device::Auto,
            host_mem: None,
            device_mem: None,
        }
    }

    /// The config file with `--epochs` and `--seed` applied.
    pub fn config(&self) -> Result<AdaptConfig> {
        let mut cfg = AdaptConfig::load(&self.config)?;
        // A base and experts of different kinds first: caches that could not be made for such
        // a mix are missing as a consequence.
        cfg.check_model_kinds()?;
        cfg.require_inputs()?;
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.seed = self.seed.unwrap_or(cfg.seed);
        Ok(cfg)
    }

    /// What this run is, for the rendezvous ([`crate::dist::run_fingerprint`]): the output and
    /// the effective config (seed and epochs included), so that two adaptations sharing a
    /// rendezvous directory and job id refuse each other instead of training together.
    fn fingerprint(&self, cfg: &AdaptConfig) -> String {
        let summary = format!("adapt -o {}", self.opts.output.display());
        // A config that cannot be serialised still hashes its Debug form; both are stable.
        let settings = serde_json::to_vec(cfg).unwrap_or_else(|_| format!("{cfg:?}").into_bytes());
        crate::dist::run_fingerprint(&summary, &[&settings])
    }

    /// Adapts as this rank of the launcher's job. Rank 0 writes the output and returns its
    /// summary; the other ranks log that they are done and return `None`. A rank that fails
    /// before training aborts the group, so no other rank waits for it.
    pub fn run(&self) -> Result<Option<AdaptSummary>> {
        let cfg = self.config()?;
        let inputs: Vec<&Path> = input_paths(&cfg).into_iter().chain([self.config.as_path()]).collect();
        self.dist.check_apart(&self.opts.output, &inputs)?;
        let (info, mut coll) = self.dist.connect_from_env(&self.fingerprint(&cfg))?;
        // Before any model is loaded: a refused output should cost nothing.
        if let Err(e) = check_output(&cfg, &self.opts, info.rank) {
            coll.abort(&e.to_string());
            return Err(info.tag(e));
        }
        let loaded = crate::with_backend!(self.device, |be| self.load_and_run(be, cfg, coll.as_mut()));
        let summary = match loaded {
            Ok(trained) => trained.map_err(|e| info.tag(e))?,
            Err(e) => {
                coll.abort(&e.to_string());
                return Err(info.tag(e));
            }
        };
        if info.rank != 0 {
            tracing::info!("{}: done; rank 0 wrote {}", info.label(), summary.output.display());
            return Ok(None);
        }
        Ok(Some(summary))
    }

    /// The budget of the memory the backend `backend` keeps blocks in. The other backend's flag
    /// is said to do nothing here, and a host budget above the memory available is said too,
    /// rather than either passing in silence (fuzzing round 6).
    fn budget_for(&self, backend: &str) -> Option<u64> {
        let on_cpu = backend == "cpu";
        let (budget, (flag, unused)) = if on_cpu {
            (self.host_mem, ("--device-mem", self.device_mem))
        } else {
            (self.device_mem, ("--host-mem", self.host_mem))
        };
        if unused.is_some() {
            tracing::warn!("{flag} has no effect on the {backend} backend");
        }
        if let (true, Some(asked), Some(free)) = (on_cpu, budget, crate::sysinfo::available_memory_bytes())
            && asked > free
        {
            tracing::warn!(
                "--host-mem {} is more than the {} of memory available: blocks kept past that will be paged",
                bytesize::ByteSize(asked),
                bytesize::ByteSize(free)
            );
        }
        budget
    }

    /// Loads the family the base model belongs to and runs it: the outer error is a failed load
    /// (the caller aborts the group), the inner one the run's (which has aborted it already).
    fn load_and_run<B: Backend + Clone>(
        &self,
        be: B,
        cfg: AdaptConfig,
        coll: &mut dyn Collective,
    ) -> Result<Result<AdaptSummary>> {
        let budget = self.budget_for(be.name());
        match LmKind::of_dir(&cfg.base_model)? {
            Some(kind) => crate::with_lm_arch!(kind, A => {
                LmAdapter::<B, A>::load_with(be, cfg, budget).map(|a| a.run_in(&self.opts, coll))
            }),
            None => Adapter::load_with(be, cfg, budget).map(|a| a.run_in(&self.opts, coll)),
        }
    }
}

impl<B: Backend + Clone, F: Family<B>> Adaptation<B, F> {
    /// Puts a loaded family together: Lambda over the shared blocks of `layout` (initialised
    /// from the config), the shared weights opened from the base and the experts (`budget`: see
    /// [`SharedWeights::open`]).
    pub fn assemble(
        cfg: AdaptConfig,
        family: F,
        shared: Vec<F::Block>,
        tasks: Vec<Task<B, F>>,
        budget: Option<u64>,
    ) -> Result<Self> {
        let layout = layouts(shared.iter().map(|b| (b.name(), b.param_shapes())));
        let models: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();
        let lambda = Lambda::new(cfg.granularity, models, lambda_keys(&layout, cfg.granularity), cfg.lambda_init);
        let experts: Vec<PathBuf> = cfg.tasks.iter().map(|t| t.expert.clone()).collect();
        let weights = SharedWeights::open(family.backend(), &cfg.base_model, &experts, &layout, &lambda, budget)?;
        let lambda_adam = Adam::new(lambda.values.len(), AdamConfig::with_lr(cfg.lambda_lr));
        Ok(Adaptation { cfg, family, shared, weights, lambda, lambda_adam, tasks })
    }

    /// Loss and gradients of task `task` on its inputs `rows`, block-streamed.
    pub fn loss_and_grads(&self, task: usize, rows: &[usize]) -> Result<StepGrads<B>> {
        self.loss_and_grads_in(task, rows, &mut Single)
    }

    /// Loss and gradients of task `task` on the batch `rows`, computed data-parallel: this rank
    /// takes its [`shard_range`] of the rows, and after each block's backward its Lambda rows
    /// (or the adapted block's gradients) are all-reduced, so every rank returns the full
    /// batch's mean loss and gradients. Each rank's output gradient is scaled by its counted
    /// samples over those of all ranks (one small all-reduce after the forward), so uneven
    /// shards and filtered samples count each sample once. With one rank this is the plain
    /// single-process computation and makes no collective call.
    pub fn loss_and_grads_in(&self, task: usize, rows: &[usize], coll: &mut dyn Collective) -> Result<StepGrads<B>> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let mine = &rows[shard_range(rows.len(), rank, world)];
        let t = &self.tasks[task];
        let Forward { acts, kept, local } = self.forward(t, mine)?;
        let (local_n, local_sum) = local.as_ref().map_or((0, 0.0), |l| (l.count, l.sum));
        let (count, loss) = global_count(coll, local_n, local_sum)?;
        let (batch, dy, local_loss) = match local {
            Some(Local { batch, pending, .. }) => {
                let (d, l) = self.family.loss_backward(t, &batch, pending, count)?;
                (Some(batch), Some(d), l)
            }
            None => (None, None, 0.0),
        };
        let (lambda, private) = self.backward(t, batch.as_ref(), dy, acts, kept, coll)?;
        Ok(StepGrads { loss: loss.unwrap_or(local_loss), kept: count, lambda, private })
    }

    /// The chain's forward on this rank's rows (nothing for a rank with nothing to predict):
    /// every block's output but the last, each block's internals and merged weights while the
    /// memory budget has room for them (else the backward rebuilds them), and the loss.
    fn forward(&self, t: &Task<B, F>, mine: &[usize]) -> Result<Forward<B, F>> {
        let be = self.family.backend();
        let total = self.shared.len() + t.private_blocks.len();
        let mut acts: Vec<B::Buf> = Vec::with_capacity(total);
        let mut kept: Vec<KeptBlock<B, F>> = Vec::with_capacity(total);
        let mut room = self.weights.spare_bytes();
        let Some(batch) = (if mine.is_empty() { None } else { self.family.batch(t, mine)? }) else {
            return Ok(Forward { acts, kept, local: None });
        };
        let mut checks = Vec::new();
        for b in 0..total {
            let (y, k) = self.block_forward(t, b, &batch, acts.last(), room > 0, &mut checks)?;
            kept.push(k.within(be, &mut room));
            acts.push(y);
        }
        // The merges' non-finite checks, once for the sweep, before anything reads the output.
        be.check_merges(checks)?;
        let out = acts.pop().ok_or_else(|| Error::Invalid("the model has no blocks".into()))?;
        let (pending, count, sum) = self.family.loss(&self.cfg, t, &batch, out, mine)?;
        Ok(Forward { acts, kept, local: Some(Local { batch, pending, count, sum }) })
    }

    /// The backward in reverse from the output gradient `dy`, rebuilding each shared block's
    /// weights: the Lambda gradient and the task's own blocks' gradients, all-reduced over the
    /// ranks. Blocks the gradient no longer reaches (and every block of a rank without rows)
    /// contribute zeros, so every rank makes the same all-reduce calls.
    fn backward(
        &self,
        t: &Task<B, F>,
        batch: Option<&BatchOf<B, F>>,
        mut dy: Option<B::Buf>,
        mut acts: Vec<B::Buf>,
        mut kept: Vec<KeptBlock<B, F>>,
        coll: &mut dyn Collective,
    ) -> Result<(Vec<f64>, Vec<Params<B>>)> {
        let be = self.family.backend();
        let world = coll.world_size();
        let n_shared = self.shared.len();
        let total = n_shared + t.private_blocks.len();
        let mut lambda_grad = vec![0f64; self.lambda.values.len()];
        // One rank reads its blocks' Lambda dots once, after the sweep; several reduce each
        // block's rows as they go (the all-reduce needs them on the host).
        let mut queued = Vec::new();
        let mut checks = Vec::new();
        let mut private: Vec<Params<B>> = Vec::with_capacity(t.private_blocks.len());
        for b in (0..total).rev() {
            let input = if b > 0 { acts.pop() } else { None };
            let KeptBlock { internals: kept, merged } = kept.pop().unwrap_or_default();
            let reached = batch.zip(dy.take());
            if b < n_shared {
                if let Some((batch, d)) = reached {
                    let visit = self.weights.visit(be, b, Some(self.weights.next_block(b, false)))?;
                    let lookups = self.shared[b].lookup_rows(batch);
                    let p = match merged {
                        Some(p) => p,
                        None => {
                            let (p, check) = visit.merged_rows_queued(be, &self.lambda, &lookups)?;
                            checks.push(check);
                            p
                        }
                    };
                    let (dx, g) = self.shared[b].backward(be, &p, batch, input.as_ref(), kept, &d)?;
                    if world > 1 {
                        visit.lambda_grad(be, &g, &lookups, &mut lambda_grad)?;
                    } else {
                        queued.push(visit.lambda_grad_queue(be, &g, &lookups)?);
                    }
                    recycle(be, p);
                    recycle(be, g);
                    dy = dx;
                }
                if world > 1 {
                    all_reduce_lambda_rows(&self.weights, self.lambda.tasks(), coll, b, &mut lambda_grad)?;
                }
            } else {
                let i = b - n_shared;
                let mut g = match reached {
                    Some((batch, d)) => {
                        let (dx, g) =
                            t.private_blocks[i].backward(be, &t.private[i], batch, input.as_ref(), kept, &d)?;
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
        be.check_merges(checks)?;
        add_dots(be, queued, &mut lambda_grad)?;
        private.reverse();
        Ok((lambda_grad, private))
    }

    /// Task `task`'s chain output on its inputs `rows` under the current Lambda, for scoring: the
    /// training forward, block-streamed within the same memory budget (the merged model is never
    /// held whole), keeping nothing for a backward. `None` when the rows have nothing to predict.
    pub fn infer(&self, task: usize, rows: &[usize]) -> Result<Option<Inferred<B, F>>> {
        let t = &self.tasks[task];
        let Some(batch) = self.family.batch(t, rows)? else { return Ok(None) };
        let mut x: Option<B::Buf> = None;
        let mut checks = Vec::new();
        for b in 0..self.shared.len() + t.private_blocks.len() {
            x = Some(self.block_forward(t, b, &batch, x.as_ref(), false, &mut checks)?.0);
        }
        self.family.backend().check_merges(checks)?;
        let out = x.ok_or_else(|| Error::Invalid("the model has no blocks".into()))?;
        Ok(Some((batch, out)))
    }

    /// Block `b` of task `t`'s chain forward (a shared block merged on arrival, or its own), with
    /// its internals and merged weights when `keep`.
    fn block_forward(
        &self,
        t: &Task<B, F>,
        b: usize,
        batch: &BatchOf<B, F>,
        x: Option<&B::Buf>,
        keep: bool,
        checks: &mut Vec<B::MergeChecks>,
    ) -> Result<(B::Buf, KeptBlock<B, F>)> {
        let be = self.family.backend();
        let run = |block: &F::Block, p: &Params<B>| {
            if keep { block.forward_keeping(be, p, batch, x) } else { Ok((block.forward(be, p, batch, x)?, None)) }
        };
        match b.checked_sub(self.shared.len()) {
            None => {
                let visit = self.weights.visit(be, b, Some(self.weights.next_block(b, true)))?;
                let (p, check) = visit.merged_rows_queued(be, &self.lambda, &self.shared[b].lookup_rows(batch))?;
                checks.push(check);
                drop(visit);
                let (y, internals) = run(&self.shared[b], &p)?;
                let merged = if keep {
                    Some(p)
                } else {
                    recycle(be, p);
                    None
                };
                Ok((y, KeptBlock { internals, merged }))
            }
            Some(i) => {
                let (y, internals) = run(&t.private_blocks[i], &t.private[i])?;
                Ok((y, KeptBlock { internals, merged: None }))
            }
        }
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

    /// One optimisation step on task `task`; returns (loss, counted samples).
    pub fn step(&mut self, task: usize) -> Result<(f32, usize)> {
        self.step_in(task, &mut Single)
    }

    /// One data-parallel step: every rank draws the same batch, computes its shard, and applies
    /// the same all-reduced gradients, so the ranks' parameters stay bit-identical.
    pub fn step_in(&mut self, task: usize, coll: &mut dyn Collective) -> Result<(f32, usize)> {
        let rows = self.next_rows(task);
        let g = self.loss_and_grads_in(task, &rows, coll)?;
        self.tasks[task].last_rows = rows;
        // A batch whose every sample was filtered out has no loss: it takes no step (nor
        // advances Adam's count), as the released code's gradient scaler drops a NaN-loss step;
        // stepping on zeros would move Lambda on the moments of earlier steps.
        if g.kept == 0 {
            return Ok((g.loss, 0));
        }
        let lg: Vec<f32> = g.lambda.iter().map(|&v| v as f32).collect();
        self.lambda_adam.step(&mut self.lambda.values, &lg);
        if self.cfg.clamp {
            self.lambda.clamp(0.0, 1.0);
        }
        // AdaMerging learns Lambda alone.
        if self.cfg.method == Method::Symerge {
            let t = &mut self.tasks[task];
            step_private(self.family.backend(), &mut t.private, &g.private, &mut t.adam)?;
        }
        Ok((g.loss, g.kept))
    }

    /// Task `task`'s training objective under the final weights on the batch of its last step
    /// (one forward, no update). Every step's loss is that of the weights *before* its update,
    /// so a last update that diverged would otherwise go unseen (fuzzing round 6: `lr: 1e33`
    /// reported a healthy loss and wrote a destroyed model). `None` before any step, or when no
    /// sample of that batch counts. Every rank makes the same collective call.
    pub fn end_loss_in(&self, task: usize, coll: &mut dyn Collective) -> Result<Option<f64>> {
        let rows = &self.tasks[task].last_rows;
        if rows.is_empty() {
            return Ok(None);
        }
        let mine = &rows[shard_range(rows.len(), coll.rank(), coll.world_size())];
        let (n, sum) = match (mine.is_empty(), &self.tasks[task]) {
            (true, _) => (0, 0.0),
            (false, t) => match self.infer(task, mine)? {
                Some((batch, out)) => {
                    let (_, n, sum) = self.family.loss(&self.cfg, t, &batch, out, mine)?;
                    (n, sum)
                }
                None => (0, 0.0),
            },
        };
        let (count, mean) = global_count(coll, n, sum)?;
        Ok((count > 0).then(|| mean.map_or(sum / n as f64, f64::from)))
    }

    /// Task `task`'s blocks with the shared blocks' parameters left empty and a copy of its own:
    /// filled by [`Adaptation::merged_params`], or written block by block.
    pub fn task_skeleton(&self, task: usize) -> Result<Skeleton<B, F>> {
        let be = self.family.backend();
        let t = &self.tasks[task];
        let mut params: Vec<Params<B>> = (0..self.shared.len()).map(|_| Params::new()).collect();
        for p in &t.private {
            params.push(copy_params(be, p)?);
        }
        Ok((self.shared.iter().cloned().chain(t.private_blocks.iter().cloned()).collect(), params))
    }

    /// Block `b`'s merged weights under the current Lambda, when `b` is shared (`None` for a
    /// task's own block): what a model writer fetches block by block.
    pub fn merged_params(&self, b: usize) -> Result<Option<Params<B>>> {
        if b < self.shared.len() {
            self.weights.merged_block(self.family.backend(), b, &self.lambda).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Puts every shared block's merged weights into `params` (a task's chain).
    pub fn fill_merged(&self, params: &mut [Params<B>]) -> Result<()> {
        for (b, slot) in params.iter_mut().enumerate().take(self.shared.len()) {
            *slot = self.weights.merged_block(self.family.backend(), b, &self.lambda)?;
        }
        Ok(())
    }

    /// Trains for the configured epochs, then writes the output directory (atomically):
    /// `lambda.json`, `tasks/<task>/` models, `train_log.jsonl` and `summary.json`.
    pub fn run(self, opts: &AdaptOptions) -> Result<AdaptSummary> {
        self.run_in(opts, &mut Single)
    }

    /// [`Adaptation::run`] as one rank of a data-parallel job: every rank trains on its shard of
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
        check_output(&self.cfg, opts, coll.rank())?;
        let staging = open_output(opts, coll)?;
        let log_path = staging.as_ref().map(|s| s.path().join("train_log.jsonl"));
        let k = self.tasks.len();
        let (epochs, seed) = (self.cfg.epochs, self.cfg.seed);
        // Room to recycle a block's merged weights and their gradients from visit to visit.
        let be = self.family.backend();
        let largest = self.weights.blocks.iter().map(SharedBlock::f32_bytes).max().unwrap_or(0);
        be.scratch_limit(usize::try_from(2 * largest).unwrap_or(usize::MAX));
        let out_dtype = opts.out_dtype.unwrap_or_else(|| self.weights.base_dtype());
        if staging.is_some() {
            // Before training: a full disk found at the write would cost the whole run.
            crate::model::save::check_room_bytes(&opts.output, self.output_bytes(out_dtype))?;
        }
        let trained = train_epochs(self, k, epochs, seed, opts, coll, log_path.as_deref());
        self.family.backend().scratch_limit(0);
        let Trained { steps, recent, first } = trained?;
        let streaming = self.weights.report();
        if coll.world_size() > 1 {
            verify_digest(coll, "Lambda", &self.lambda.digest())?;
            verify_digest(coll, "adapted layers", &self.private_digest()?)?;
            tracing::info!("rank {}: Lambda and adapted layers agree on all {} ranks", coll.rank(), coll.world_size());
        }
        let mut end_losses = Vec::with_capacity(k);
        for (task, first) in first.iter().enumerate() {
            let end = self.end_loss_in(task, coll)?;
            check_end_loss(&self.tasks[task].name, *first, end, coll.rank() == 0)?;
            end_losses.push(end);
        }

        let mut reports = Vec::with_capacity(k);
        for (task, r) in recent.iter().enumerate() {
            let t = &self.tasks[task];
            let (eval, model_hash) = match &staging {
                Some(staging) => {
                    let dir = staging.path().join("tasks").join(&t.name);
                    let eval = F::finish_task(self, task, Some(&dir), out_dtype, opts.evaluate)
                        .map_err(|e| for_output(e, opts))?;
                    (eval, Some(crate::labels::fingerprint::model_hash(&dir)?))
                }
                None => (None, None),
            };
            let final_loss = (!r.is_empty()).then(|| r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64);
            let (name, inputs, lambda_mean) = (t.name.clone(), t.texts.len(), self.task_lambda_mean(task));
            let hashes = (model_hash, Some(t.inputs_hash.clone()));
            let losses = (final_loss, end_losses[task]);
            reports.push(TaskReport::new(name, inputs, eval, losses, lambda_mean, hashes));
        }
        let accs: Vec<f64> = reports.iter().filter_map(|r| r.accuracy).collect();
        let losses: Vec<f64> = reports.iter().filter_map(|r| r.next_token_loss).collect();
        let summary = AdaptSummary {
            format_version: SUMMARY_FORMAT_VERSION,
            method: self.cfg.method,
            output: opts.output.clone(),
            epochs: self.cfg.epochs,
            steps,
            seconds: start.elapsed().as_secs_f64(),
            world_size: coll.world_size(),
            lambda_rows: self.lambda.keys.len(),
            lambda_hash: self.lambda.hash(),
            out_dtype: out_dtype.to_string(),
            average_accuracy: (accs.len() == k).then(|| accs.iter().sum::<f64>() / k as f64),
            average_perplexity: (losses.len() == k).then(|| (losses.iter().sum::<f64>() / k as f64).exp()),
            labels: F::summary_labels(&self.cfg),
            tasks: reports,
            bytes_streamed_per_step: streaming.bytes_streamed.saturating_sub(streaming.bytes_loaded_once)
                / steps.max(1) as u64,
            streaming,
            peak_rss_bytes: crate::sysinfo::peak_rss_bytes(),
        };
        if let Some(staging) = staging {
            commit_output(staging, &self.lambda, &summary, &self.cfg, opts)?;
            tracing::info!("wrote {} ({k} task models) in {:.1}s", opts.output.display(), summary.seconds);
        }
        Ok(summary)
    }

    /// Writes task `task`'s model as it stands (the shared blocks merged with the current Lambda,
    /// plus its own layer) into `dir`, in `dtype` or else the base's: before any step, the merge
    /// adapt starts from, which `symerge eval ADAPT_OUT --baseline` scores.
    pub fn write_task(&self, task: usize, dir: &Path, dtype: Option<FloatDType>) -> Result<()> {
        let dtype = dtype.unwrap_or_else(|| self.weights.base_dtype());
        F::finish_task(self, task, Some(dir), dtype, false).map(|_| ())
    }

    /// Bytes of tensor data in the task models a run writes in `dtype`: every task's model holds
    /// the shared blocks (merged) and its own.
    pub fn output_bytes(&self, dtype: FloatDType) -> u64 {
        let elems = |shape: &[usize]| shape.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
        let shared = self.weights.blocks.iter().flat_map(|b| &b.tensors).map(|t| elems(&t.shape));
        let shared = shared.fold(0u64, u64::saturating_add);
        let per_task = self.tasks.iter().map(|t| {
            t.private.iter().flat_map(|p| p.values()).map(|p| elems(&p.shape)).fold(shared, u64::saturating_add)
        });
        per_task.fold(0u64, u64::saturating_add).saturating_mul(dtype.size() as u64)
    }

    /// BLAKE3 of every task's adapted layers, in task, block and tensor-name order.
    fn private_digest(&self) -> Result<[u8; 32]> {
        let be = self.family.backend();
        let mut h = blake3::Hasher::new();
        for t in &self.tasks {
            for p in t.private.iter().flat_map(|p| p.values()) {
                // One update per tensor: blake3 per 4-byte value costs seconds on an LM head.
                let bytes: Vec<u8> = be.download(&p.buf)?.iter().flat_map(|v| v.to_le_bytes()).collect();
                h.update(&bytes);
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

/// The shared blocks' layout (names and shapes, tensors in name order) of `blocks`.
fn layouts(names_shapes: impl Iterator<Item = (String, Vec<(String, Vec<usize>)>)>) -> Vec<BlockLayout> {
    names_shapes
        .map(|(name, mut params)| {
            params.sort_by(|a, b| a.0.cmp(&b.0));
            BlockLayout { name, params }
        })
        .collect()
}

/// Lambda's keys: every shared tensor, or every shared block.
fn lambda_keys(layout: &[BlockLayout], granularity: Granularity) -> Vec<String> {
    match granularity {
        Granularity::Tensor => layout.iter().flat_map(|l| l.params.iter().map(|(n, _)| n.clone())).collect(),
        Granularity::Block => layout.iter().map(|l| l.name.clone()).collect(),
    }
}

/// Adam states for a task's own blocks, on the backend.
fn private_adams<B: Backend>(be: &B, private: &[Params<B>], lr: f32) -> Result<Vec<BTreeMap<String, BufAdam<B>>>> {
    private
        .iter()
        .map(|p| {
            p.iter().map(|(n, t)| Ok((n.clone(), BufAdam::new(be, be.len(&t.buf), AdamConfig::with_lr(lr))?))).collect()
        })
        .collect()
}

/// One Adam step on each of a task's own tensors that has a gradient.
fn step_private<B: Backend>(
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

/// Refuses an output that overlaps an input of `cfg` and, on rank 0 (the one that writes), an
/// existing output without `force` or, with it, one symerge did not write. The command calls it
/// before loading any model, so a refused output costs nothing; training calls it again.
pub fn check_output(cfg: &AdaptConfig, opts: &AdaptOptions, rank: usize) -> Result<()> {
    crate::atomic::check_output_apart(&opts.output, &input_paths(cfg))?;
    if rank == 0 {
        crate::atomic::check_output_dir(&opts.output, opts.force)?;
    }
    Ok(())
}

/// A failed end-of-run score of task `task`'s adapted model, named by the task and its inputs
/// rather than by the expert whose path the in-memory model carries (fuzzing round 6: logits
/// that overflowed were blamed on the expert's directory).
pub(super) fn scoring_adapted(cfg: &AdaptConfig, task: usize, e: Error) -> Error {
    let Some(t) = cfg.tasks.get(task) else { return e };
    let reason = match e {
        Error::Model { reason, .. } | Error::Invalid(reason) => reason,
        e => return e,
    };
    Error::Invalid(format!("task `{}`: scoring the adapted model on {}: {reason}", t.name, t.inputs.display()))
}

/// Every path an adaptation of `cfg` reads: the config itself, the base, and each task's
/// expert, inputs and cache.
fn input_paths(cfg: &AdaptConfig) -> Vec<&Path> {
    let mut inputs: Vec<&Path> = vec![cfg.source.as_path(), cfg.base_model.as_path()];
    for t in &cfg.tasks {
        inputs.extend([t.expert.as_path(), t.inputs.as_path()].into_iter().chain(t.cache.as_deref()));
    }
    inputs
}

/// A full disk found while writing a task model names the output, not the hidden staging
/// directory inside which the model was being written.
fn for_output(e: Error, opts: &AdaptOptions) -> Error {
    match e {
        Error::NoSpace { need, free, .. } => Error::NoSpace { path: opts.output.clone(), need, free },
        other => other,
    }
}

/// Rank 0's staging directory for the output (checked by [`check_output`]); `None` on the other
/// ranks, which write nothing.
fn open_output(opts: &AdaptOptions, coll: &dyn Collective) -> Result<Option<Staging>> {
    if coll.rank() != 0 {
        return Ok(None);
    }
    Ok(Some(Staging::create(&opts.output)?))
}

/// Writes `lambda.json` and `summary.json` (the summary with the config) into the staging
/// directory and renames it into place.
fn commit_output(
    staging: Staging,
    lambda: &Lambda,
    summary: &AdaptSummary,
    cfg: &AdaptConfig,
    opts: &AdaptOptions,
) -> Result<()> {
    let (base, experts) = super::lambda::recorded_models(cfg)?;
    lambda.save_with_models(&staging.path().join("lambda.json"), &base, &experts)?;
    let json = serde_json::json!({"summary": summary, "config": cfg});
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    let path = staging.path().join("summary.json");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    staging.commit(&opts.output, opts.force)
}

/// The epoch loop: every epoch visits the `k` tasks in a seeded shuffled
/// order, one step each; a JSON line per step goes to `log` (rank 0), a start line and progress
/// lines (see [`StepLog`]). Returns the number of steps and each task's last (up to 10) losses.
/// Each log line carries the seconds since training began, so a step's time can be read off.
fn train_epochs<B: Backend + Clone, F: Family<B>>(
    t: &mut Adaptation<B, F>,
    k: usize,
    epochs: usize,
    seed: u64,
    opts: &AdaptOptions,
    coll: &mut dyn Collective,
    log_path: Option<&Path>,
) -> Result<Trained> {
    let writer = coll.rank() == 0;
    let mut log = match log_path {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?)),
        None => None,
    };
    let mut recent: Vec<Vec<f32>> = vec![Vec::new(); k];
    let mut first: Vec<Option<f32>> = vec![None; k];
    let mut counted = vec![0usize; k];
    let mut steps = 0usize;
    let started = Instant::now();
    let progress = StepLog { total: epochs * k, every: if writer { opts.log_every } else { 0 }, started };
    if writer {
        log_start(t, epochs, progress.total, coll.world_size());
    }
    for epoch in 0..epochs {
        for task in permutation(k, seed, name_hash("epoch order"), epoch as u32) {
            let (loss, count) = t.step_in(task, coll)?;
            if !loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "loss of task `{}` became {loss} at epoch {epoch}; lower the learning rate",
                    &t.tasks[task].name
                )));
            }
            steps += 1;
            counted[task] += count;
            // A step that counted no sample has no loss (0 stands in for it).
            let r = &mut recent[task];
            if count > 0 {
                r.push(loss);
                first[task].get_or_insert(loss);
            }
            if r.len() > 10 {
                r.remove(0);
            }
            if let (Some(log), Some(path)) = (log.as_mut(), log_path) {
                // No sample counted, no loss: null, not a 0 that plots as a perfect step.
                let logged = (count > 0).then_some(loss);
                let mut line = serde_json::json!({
                    "step": steps, "epoch": epoch, "task": &t.tasks[task].name, "loss": logged,
                    "seconds": started.elapsed().as_secs_f64(),
                });
                line[F::COUNT_KEY] = count.into();
                line["lambda_mean"] = t.task_lambda_mean(task).into();
                writeln!(log, "{line}").map_err(|e| Error::io(path, e))?;
            }
            if progress.due(steps) {
                tracing::info!(
                    "epoch {}/{} step {steps}/{}: {} loss {loss:.4} ({}), mean lambda {:.3} ({})",
                    epoch + 1,
                    epochs,
                    progress.total,
                    &t.tasks[task].name,
                    F::describe_count(count),
                    t.task_lambda_mean(task),
                    progress.timing(steps)
                );
            }
        }
    }
    if let (Some(mut log), Some(path)) = (log, log_path) {
        log.flush().map_err(|e| Error::io(path, e))?;
    }
    // A confidence filter that drops every sample trains nothing, silently otherwise.
    for (task, _) in counted.iter().enumerate().filter(|(_, n)| writer && **n == 0 && epochs > 0) {
        tracing::warn!(
            "task `{}`: no sample counted in any step ({} 0): its steps were skipped, so its layer \
             did not move and its loss never guided Lambda; lower `confidence`?",
            &t.tasks[task].name,
            F::COUNT_KEY
        );
    }
    Ok(Trained { steps, recent, first })
}

/// What [`train_epochs`] returns: the steps taken and, per task, its last (up to 10) losses and
/// its first counted one.
struct Trained {
    steps: usize,
    recent: Vec<Vec<f32>>,
    first: Vec<Option<f32>>,
}

/// How many times its first loss a task's end loss may grow before the run warns of divergence.
const GROWTH_WARNING: f64 = 100.0;

/// Refuses a task whose final weights give a non-finite loss (the last update diverged; the
/// output is not written) and warns on `writer` when it grew [`GROWTH_WARNING`] times over
/// the first step's: a learning rate that destroyed the model would otherwise end with rc 0.
fn check_end_loss(task: &str, first: Option<f32>, end: Option<f64>, writer: bool) -> Result<()> {
    let Some(end) = end else { return Ok(()) };
    if !end.is_finite() {
        return Err(Error::Invalid(format!(
            "task `{task}`: the final weights give a loss of {end} on its last batch (the last update \
             diverged); nothing was written; lower the learning rate"
        )));
    }
    if let Some(first) = first.map(f64::from).filter(|f| writer && *f > 0.0 && end > GROWTH_WARNING * f) {
        tracing::warn!(
            "task `{task}`: the final weights give a loss of {end:.4e} on its last batch, {:.1e} times its first \
             step's {first:.4}: training diverged; lower the learning rate",
            end / first
        );
    }
    Ok(())
}

/// When the step lines of [`train_epochs`] come: the first step (a short run is not silent until
/// its end), every `every` steps and the last; none with `every` 0 (and on ranks other than 0).
struct StepLog {
    total: usize,
    every: usize,
    started: Instant,
}

impl StepLog {
    fn due(&self, step: usize) -> bool {
        self.every > 0 && (step == 1 || step.is_multiple_of(self.every) || step == self.total)
    }

    /// Time since training began and the rest at the mean pace so far, as `finetune` logs them.
    fn timing(&self, step: usize) -> String {
        let done = self.started.elapsed().as_secs_f64();
        let eta = done / step.max(1) as f64 * self.total.saturating_sub(step) as f64;
        format!("{done:.0}s elapsed, eta {eta:.0}s")
    }
}

/// The run's start line: what is trained, for how long, how the shared blocks are held and where
/// the math runs, so a long run's size is known before its first step ends.
fn log_start<B: Backend, F: Family<B>>(t: &Adaptation<B, F>, epochs: usize, total: usize, world_size: usize) {
    let names: Vec<&str> = t.tasks.iter().map(|task| task.name.as_str()).collect();
    let s = t.weights.report();
    let be = t.family.backend();
    let threads =
        if be.name() == "cpu" { format!(", {} threads", rayon::current_num_threads()) } else { String::new() };
    let ranks = if world_size > 1 { format!(", {world_size} ranks") } else { String::new() };
    tracing::info!(
        "adapting {} tasks ({}) with {}: {epochs} epochs, {total} steps; shared blocks {} ({} of {} kept, \
         {:.1} MB of {:.1} MB); {}{threads}{ranks}",
        names.len(),
        names.join(", "),
        match t.cfg.method {
            Method::Symerge => "symerge",
            Method::Adamerging => "adamerging",
        },
        s.mode,
        s.kept_blocks,
        s.blocks,
        s.kept_bytes as f64 / 1e6,
        s.shared_bytes as f64 / 1e6,
        be.name()
    );
}

/// Sums block `b`'s Lambda rows of `grad` (`k` tasks) over the ranks. Each f64 value travels as
/// an f32 and the f32 of its remainder: per-rank sums of a batch's samples often cancel, and one
/// f32 per rank would leave an error relative to the (larger) per-rank values rather than to
/// their sum.
fn all_reduce_lambda_rows<B: Backend>(
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

/// Hands `params`' buffers back to the backend for later outputs of the same size.
fn recycle<B: Backend>(be: &B, params: Params<B>) {
    params.into_values().for_each(|p| be.recycle(p.buf));
}

/// Zeros shaped like `params`: the gradient of a rank whose shard is empty.
fn zeros_like<B: Backend>(be: &B, params: &Params<B>) -> Result<Params<B>> {
    let mut out = Params::new();
    for (name, p) in params {
        out.insert(name.clone(), Param { shape: p.shape.clone(), buf: be.zeros(be.len(&p.buf))? });
    }
    Ok(out)
}

/// Sums a block's gradients over the ranks (tensors in name order, the same on every rank).
fn all_reduce_params<B: Backend>(be: &B, coll: &mut dyn Collective, grads: &mut Params<B>) -> Result<()> {
    let mut bufs: Vec<&mut B::Buf> = grads.values_mut().map(|p| &mut p.buf).collect();
    be.all_reduce_sum(coll, &mut bufs)
}

/// A seeded permutation of `0..n` (Fisher-Yates over a Philox stream).
fn permutation(n: usize, seed: u64, stream: u32, draw: u32) -> Vec<usize> {
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
fn copy_params<B: Backend>(be: &B, params: &Params<B>) -> Result<Params<B>> {
    let mut out = Params::new();
    for (name, p) in params {
        out.insert(name.clone(), Param { shape: p.shape.clone(), buf: be.copy(&p.buf)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let args: AdaptArgs = parse_args(&["a.yml", "-o", "out"]).unwrap();
        assert_eq!(format!("{args:?}"), format!("{:?}", AdaptArgs::new("a.yml", "out")));
        let args: AdaptArgs = parse_args(&["a.yml", "-o", "o", "--no-eval", "--host-mem", "0"]).unwrap();
        assert_eq!((args.opts.evaluate, args.host_mem), (false, Some(0)), "--no-eval clears evaluate; 0 is a budget");
    }

    /// Fuzzing round 3: a full disk while writing a task model named the hidden staging folder
    /// (`/x/.ad.partial-3Hy2hA/tasks`), not the output `/x/ad`.
    #[test]
    fn a_full_disk_names_the_output_not_the_staging_folder() {
        let opts = AdaptOptions::new("/x/ad");
        let staged = Error::NoSpace { path: "/x/.ad.partial-3Hy2hA/tasks".into(), need: 2048, free: 1024 };
        let e = for_output(staged, &opts).to_string();
        assert!(e.starts_with("/x/ad: the output needs 2.0 KiB") && !e.contains("partial"), "{e}");
        let other = for_output(Error::Invalid("x".into()), &opts).to_string();
        assert_eq!(other, "x");
    }
}
