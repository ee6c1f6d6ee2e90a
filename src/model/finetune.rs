//! Full fine-tuning of a BERT-family sequence classifier on labelled JSONL: the way to make the
//! expert checkpoints that merging combines, from a pretrained encoder (e.g. MiniLM) and a task.
//!
//! Every weight trains (embeddings, all layers, pooler, classifier) with Adam on the mean
//! cross-entropy of each batch (the `soft_ce` loss against one-hot targets). Hugging Face's
//! Trainer defaults are kept where they matter for the result: lr 5e-5, gradient-norm clipping at
//! 1.0, no weight decay, dropout off (the model runs in eval mode). The learning rate is
//! constant by default, or Hugging Face's linear decay to zero; either may start with a linear
//! warmup. The classification head, new and randomly initialised, may get its own, larger
//! learning rate (`head_lr`) so that short runs converge.
//!
//! Batches are drawn from a per-epoch shuffle seeded by `seed` (which also seeds the new head),
//! and padded to their own longest text, so short texts cost little. Same data, options and seed
//! give bit-identical weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::bert::{LoadOptions, NewHead};
use super::classify::{Classes, EvalReport, SequenceClassifier, evaluate};
use super::finetune_lm::{LmFinetuneSummary, finetune_lm};
use super::lm::is_causal_lm_dir;
use super::save::{SaveOptions, SavedModel};
use super::tokenize::Tokens;
use super::{Params, chain};
use crate::adapt::adam::{AdamConfig, BufAdam};
use crate::backend::{Backend, Device};
use crate::checkpoint::FloatDType;
use crate::data::jsonl::{Example, read_jsonl};
use crate::error::{Error, Result};
use crate::merge::philox::philox4x32_10;

/// Default learning rate of the encoder (Hugging Face Trainer's).
pub const DEFAULT_LR: f32 = 5e-5;

/// How long to train: `--steps` or `--epochs`, one epoch when neither is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::Args)]
#[group(multiple = false)]
pub struct TrainLength {
    /// Optimizer steps (default: one epoch).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training data; the last batch of an epoch may be smaller.
    #[arg(long)]
    pub epochs: Option<usize>,
}

impl TrainLength {
    /// `n` optimizer steps (one batch each), over as many epochs as that takes.
    pub fn steps(n: usize) -> Self {
        TrainLength { steps: Some(n), epochs: None }
    }

    /// `n` passes over the training set.
    pub fn epochs(n: usize) -> Self {
        TrainLength { steps: None, epochs: Some(n) }
    }

    /// Optimizer steps for `n` examples in batches of `batch_size`; a product past `usize::MAX`
    /// (`--epochs 2^64-1`) saturates: a run that long never ends anyway, and must not wrap.
    pub fn total_steps(&self, n: usize, batch_size: usize) -> usize {
        self.steps.unwrap_or_else(|| self.epochs.unwrap_or(1).saturating_mul(n.div_ceil(batch_size)))
    }
}

/// How the learning rate changes over the run (both scale `lr` and `head_lr` alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The full rate after the warmup.
    Constant,
    /// After the warmup, down linearly to zero at the last step (Hugging Face Trainer's default).
    Linear,
}

impl LrSchedule {
    /// The factor on the learning rate for step `step` (0-based) of `total`, after `warmup` steps
    /// of linear warmup, as `transformers`' `get_{constant,linear}_schedule_with_warmup` compute
    /// it (so the first warmup step has rate 0).
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f32 {
        if step < warmup {
            return step as f32 / warmup.max(1) as f32;
        }
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => (total.saturating_sub(step)) as f32 / total.saturating_sub(warmup).max(1) as f32,
        }
    }
}

/// The flag's spelling (`constant`, `linear`), for logs: what a user typed, not the Rust name.
impl std::fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
        })
    }
}

impl std::str::FromStr for LrSchedule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(LrSchedule::Constant),
            "linear" => Ok(LrSchedule::Linear),
            other => Err(format!("unknown learning-rate schedule `{other}` (expected constant or linear)")),
        }
    }
}

/// Everything [`finetune`] needs besides the base model; also `symerge finetune`'s flags (the
/// defaults below are the CLI's, and [`FinetuneOptions::new`] gives the same).
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneOptions {
    /// Training JSON lines with `text` and `label` (a causal LM reads only `text`).
    #[arg(long)]
    pub train: PathBuf,
    /// Class names in id order, `{"labels": [...]}`; default: labels.json beside --train if
    /// present, else the sorted label names of the data. Classifiers only.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Output directory (written atomically: it appears only when complete).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub length: TrainLength,
    #[arg(long, default_value_t = 16, value_parser = super::infer::parse_batch_size)]
    pub batch_size: usize,
    /// Adam learning rate of the encoder (embeddings and layers).
    #[arg(long, default_value_t = DEFAULT_LR)]
    pub lr: f32,
    /// Learning rate of the new head (pooler and classifier); default: --lr. A larger one
    /// (e.g. 1e-3) converges in fewer steps. Classifiers only.
    #[arg(long)]
    pub head_lr: Option<f32>,
    /// Learning-rate schedule after the warmup: constant, or linear (decay to 0 at the end).
    #[arg(long, default_value = "constant")]
    pub schedule: LrSchedule,
    /// Steps of linear warmup from 0.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (PyTorch's `clip_grad_norm_`); 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Truncate texts to this many tokens (special tokens included).
    #[arg(long, default_value_t = super::DEFAULT_MAX_LEN)]
    pub max_len: usize,
    /// Seeds the shuffling and the new head.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on the first N examples only (prepared files mix the classes, so a prefix has all).
    #[arg(long, value_name = "N")]
    pub max_examples: Option<usize>,
    /// JSON lines to score after training: labelled for a classifier (accuracy, mean
    /// cross-entropy), texts for a causal LM (mean next-token loss).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Also score --eval before training (the untrained head's baseline).
    #[arg(long, requires = "eval")]
    pub eval_before: bool,
    /// Log the loss every N steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub log_every: usize,
    /// Storage dtype of the saved weights (float32, float16, bfloat16; causal LMs: float32).
    #[arg(long, default_value = "float32")]
    pub dtype: FloatDType,
    /// Replace an existing output directory that symerge wrote (it holds .symerge-output) or
    /// that is empty; anything else is refused.
    #[arg(long)]
    pub force: bool,
}

impl FinetuneOptions {
    /// The defaults: one epoch, batch 16, lr 5e-5 everywhere, clipping at 1.0, 128 tokens, seed 0.
    pub fn new(train: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        FinetuneOptions {
            train: train.into(),
            labels: None,
            output: output.into(),
            length: TrainLength::default(),
            batch_size: 16,
            lr: DEFAULT_LR,
            head_lr: None,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            max_len: super::DEFAULT_MAX_LEN,
            seed: 0,
            max_examples: None,
            eval: None,
            eval_before: false,
            log_every: 10,
            dtype: FloatDType::F32,
            force: false,
        }
    }
}

/// `symerge finetune`'s arguments: the base model, the [`FinetuneOptions`] and the device.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    /// Pretrained model directory: a BERT-family encoder (e.g. MiniLM), which gets a new
    /// seeded classification head replacing any it has, or a causal LM (its
    /// config.json's model_type says which).
    pub base: PathBuf,
    #[command(flatten)]
    pub opts: FinetuneOptions,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
    /// launcher the GPU of LOCAL_RANK), cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// What `finetune` trained, which depends on the base model (`--json` prints the inner summary).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum FinetuneOutcome {
    Classifier(FinetuneSummary),
    Lm(LmFinetuneSummary),
}

impl FinetuneArgs {
    /// Fine-tunes the base model as what its config.json says it is: a causal LM with
    /// [`finetune_lm`], else a classifier with [`finetune`].
    pub fn run(&self) -> Result<FinetuneOutcome> {
        self.require_inputs()?;
        let (base, opts) = (self.base.as_path(), &self.opts);
        if is_causal_lm_dir(base)? {
            let summary = crate::with_backend!(self.device, |be| finetune_lm(be, base, opts)?);
            return Ok(FinetuneOutcome::Lm(summary));
        }
        Ok(FinetuneOutcome::Classifier(crate::with_backend!(self.device, |be| finetune(be, base, opts)?)))
    }
}

impl FinetuneArgs {
    /// BASE and the data files named exist, each error saying which argument named the path.
    fn require_inputs(&self) -> Result<()> {
        use crate::input_file::{NamedBy, require};
        require(&self.base, NamedBy::Arg("BASE"))?;
        require(&self.opts.train, NamedBy::Arg("--train"))?;
        for (path, flag) in [(&self.opts.labels, "--labels"), (&self.opts.eval, "--eval")] {
            if let Some(p) = path {
                require(p, NamedBy::Arg(flag))?;
            }
        }
        Ok(())
    }
}

/// What a fine-tuning run did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    pub base: PathBuf,
    pub output: PathBuf,
    /// Class names in id order (the saved `id2label`).
    pub labels: Vec<String>,
    pub train_examples: usize,
    pub steps: usize,
    /// Passes over the training examples (fractional when training by steps).
    pub epochs: f64,
    pub batch_size: usize,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub lr: f32,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub head_lr: f32,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Mean loss of the first (up to) 10 steps.
    pub initial_loss: f32,
    /// Mean loss of the last (up to) 10 steps.
    pub final_loss: f32,
    /// The loss of every step.
    #[serde(skip)]
    pub losses: Vec<f32>,
    /// Score on the eval set before training (with `eval_before`).
    pub eval_before: Option<EvalReport>,
    /// Score on the eval set after training.
    pub eval: Option<EvalReport>,
    /// Time spent in training steps.
    pub train_seconds: f64,
    /// The whole run: loading, training, evaluation and saving.
    pub seconds: f64,
    pub saved: SavedModel,
}

/// Reads the class names of a `labels.json`: `{"labels": [...]}` (what `data prepare` writes) or
/// a plain array of names.
pub fn read_labels_file(path: &Path) -> Result<Vec<String>> {
    let bad = |reason: String| Error::BadIndex { path: path.to_path_buf(), reason };
    let text = crate::input_file::read_to_string(path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let list = v
        .get("labels")
        .unwrap_or(&v)
        .as_array()
        .ok_or_else(|| bad("expected {\"labels\": [class names in id order]} or an array of class names".into()))?;
    let names = list
        .iter()
        .enumerate()
        .map(|(i, l)| l.as_str().map(String::from).ok_or_else(|| bad(format!("label {i} is not a string: {l}"))))
        .collect::<Result<Vec<_>>>()?;
    if names.is_empty() {
        return Err(bad("no labels".into()));
    }
    let mut seen = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        if let Some(j) = seen.insert(n.as_str(), i) {
            return Err(bad(format!("label `{n}` appears twice (ids {j} and {i})")));
        }
    }
    Ok(names)
}

/// Class names in id order, and where they came from (named when a label is not among them:
/// a labels file that lacks one was blamed on "the training set").
#[derive(Debug, Clone, PartialEq)]
pub struct ClassList {
    pub names: Vec<String>,
    pub source: String,
}

/// The class names for training on `train`: from `labels_file`, else from a `labels.json`
/// beside `train`, else from the data (sorted names, or `LABEL_i` when the data only has ids).
pub fn class_names(examples: &[Example], train: &Path, labels_file: Option<&Path>) -> Result<ClassList> {
    let beside = train.parent().unwrap_or(Path::new(".")).join("labels.json");
    if let Some(path) = labels_file.or(beside.is_file().then_some(beside.as_path())) {
        let names = read_labels_file(path)?;
        tracing::info!("{} classes from {}", names.len(), path.display());
        return Ok(ClassList { names, source: format!("the labels file {}", path.display()) });
    }
    let source = format!("the training data {}", train.display());
    let named: std::collections::BTreeSet<&str> = examples.iter().filter_map(|e| e.label.as_deref()).collect();
    if !named.is_empty() {
        return Ok(ClassList { names: named.into_iter().map(String::from).collect(), source });
    }
    let top = examples.iter().enumerate().filter_map(|(i, e)| e.label_id.map(|id| (id, i))).max();
    if let Some((id, line)) = top
        && id >= super::bert::MAX_CLASSES
    {
        return Err(Error::BadLine {
            path: train.to_path_buf(),
            line: line + 1,
            reason: format!("label {id}: class ids run from 0 to {}", super::bert::MAX_CLASSES - 1),
        });
    }
    let n = top.map_or(0, |(m, _)| m + 1);
    if let Some((id, line)) = top {
        check_dense(examples, n).map_err(|reason| Error::BadLine {
            path: train.to_path_buf(),
            line: line + 1,
            reason: format!("label {id}: {reason}"),
        })?;
    }
    Ok(ClassList { names: (0..n).map(|i| format!("LABEL_{i}")).collect(), source })
}

/// Above this many classes from bare ids, the ids must be [`MIN_USED_FRACTION`] used.
const SPARSE_CLASSES: usize = 1000;
/// Least fraction of a large id range that the data must use.
const MIN_USED_FRACTION: f64 = 0.01;

/// Refuses bare class ids that would make a large head mostly of classes no example has (one
/// stray id 1048575 built a million-class head: 1.2 GB, silently). A labels file naming that
/// many classes is the way to ask for such a head on purpose.
fn check_dense(examples: &[Example], n: usize) -> std::result::Result<(), String> {
    if n <= SPARSE_CLASSES {
        return Ok(());
    }
    let used: std::collections::BTreeSet<usize> = examples.iter().filter_map(|e| e.label_id).collect();
    if used.len() as f64 >= MIN_USED_FRACTION * n as f64 {
        return Ok(());
    }
    Err(format!(
        "the data uses {} distinct class ids, but this id makes a head of {n} classes ({:.2}% used; more than \
         {SPARSE_CLASSES} classes need at least {}% used): check the ids, or pass --labels with a labels.json \
         naming all {n} classes if the head is meant to be that large",
        used.len(),
        100.0 * used.len() as f64 / n as f64,
        100.0 * MIN_USED_FRACTION
    ))
}

/// Class ids of `examples` (read from `path`) under `classes`, by the rule eval and adapt share
/// ([`super::classify::label_ids`]).
pub fn label_ids(examples: &[Example], path: &Path, classes: &ClassList) -> Result<Vec<usize>> {
    let names = &classes.names;
    let index: BTreeMap<String, usize> = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
    let classes = Classes { label2id: Some(&index), n: names.len(), source: &classes.source };
    super::classify::label_ids(examples, classes, path)
}

/// A random permutation of `0..n` for `epoch` under `seed` (Fisher-Yates over counter-based
/// Philox draws, so it does not depend on anything but the three numbers).
fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = [seed as u32, (seed >> 32) as u32];
    for i in (1..n).rev() {
        let r = philox4x32_10([i as u32, (i >> 32) as u32, epoch as u32, 0x5348_5546], key);
        let j = ((r[0] as u64) << 32 | r[1] as u64) % (i as u64 + 1);
        order.swap(i, j as usize);
    }
    order
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().map(|&x| x as f64).sum::<f64>() as f32 / xs.len().max(1) as f32
}

/// Mean loss of the first and of the last (up to) 10 steps, each at most half the run so that a
/// short run's two numbers do not average the same steps.
pub(super) fn loss_ends(losses: &[f32]) -> (f32, f32) {
    let k = (losses.len() / 2).clamp(1, 10).min(losses.len());
    (mean(&losses[..k]), mean(&losses[losses.len() - k..]))
}

/// The checks on options every model family shares, made before anything is loaded; `inputs`
/// are the paths the output must stay apart from, besides the `--eval` and `--labels` files
/// (fuzzing round 6: `--force` deleted an `--eval` file inside the output).
pub(super) fn check_options(opts: &FinetuneOptions, inputs: &[&Path]) -> Result<()> {
    let files = [opts.eval.as_deref(), opts.labels.as_deref()];
    let inputs: Vec<&Path> = inputs.iter().copied().chain(files.into_iter().flatten()).collect();
    crate::atomic::check_output_apart(&opts.output, &inputs)?;
    crate::atomic::check_output_dir(&opts.output, opts.force)?;
    if opts.batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    if opts.length.steps == Some(0) || opts.length.epochs == Some(0) {
        return Err(Error::Invalid("nothing to train: the number of steps or epochs must be at least 1".into()));
    }
    for (what, lr) in [("learning rate", opts.lr), ("head learning rate", opts.head_lr.unwrap_or(opts.lr))] {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::Invalid(format!("{what} must be a positive number, got {lr}")));
        }
    }
    // 0 turns clipping off; NaN or a negative norm would silently do the same.
    if !(opts.max_grad_norm.is_finite() && opts.max_grad_norm >= 0.0) {
        return Err(Error::Invalid(format!(
            "--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got {}",
            opts.max_grad_norm
        )));
    }
    Ok(())
}

/// The training examples of `opts.train` (the first `max_examples`), at least one.
pub(super) fn read_examples(opts: &FinetuneOptions) -> Result<Vec<Example>> {
    let mut examples = read_jsonl(&opts.train)?;
    if let Some(n) = opts.max_examples {
        examples.truncate(n);
    }
    if examples.is_empty() {
        return Err(Error::Invalid(format!("{}: no training examples", opts.train.display())));
    }
    Ok(examples)
}

/// Optimizer steps for `n` examples.
pub(super) fn total_steps(opts: &FinetuneOptions, n: usize) -> usize {
    opts.length.total_steps(n, opts.batch_size)
}

/// Fine-tunes `base` (a `BertModel`, or a classifier whose head is replaced) on `opts.train` and
/// saves the result to `opts.output`. Inputs are all checked before training starts, and the
/// output appears only when complete. Causal LMs train with [`super::finetune_lm::finetune_lm`].
pub fn finetune<B: Backend>(backend: B, base: &Path, opts: &FinetuneOptions) -> Result<FinetuneSummary> {
    let start = Instant::now();
    let inputs: Vec<&Path> = [base, opts.train.as_path()].into_iter().chain(opts.labels.as_deref()).collect();
    check_options(opts, &inputs)?;
    check_classifier_base(base)?;
    let examples = read_examples(opts)?;
    let classes = class_names(&examples, &opts.train, opts.labels.as_deref())?;
    let labels = label_ids(&examples, &opts.train, &classes)?;
    if classes.names.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: a classifier needs at least two classes, found {}",
            opts.train.display(),
            classes.names.len()
        )));
    }
    let eval_set = opts.eval.as_deref().map(|path| labelled_texts(path, &classes)).transpose()?;
    let names = classes.names;

    let new_head = NewHead { num_labels: names.len(), seed: opts.seed };
    let mut clf = SequenceClassifier::load(backend, base, opts.max_len, LoadOptions { new_head: Some(new_head) })?;
    // The in-memory model names its classes as the saved one will.
    clf.model.config.label2id = Some(names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect());
    let score = |clf: &SequenceClassifier<B>, when: &str| -> Result<Option<EvalReport>> {
        let Some((texts, ids)) = &eval_set else { return Ok(None) };
        let r = evaluate(clf, texts, ids, EVAL_BATCH)?;
        tracing::info!("{when} training: accuracy {:.2}%, mean cross-entropy {:.4}", 100.0 * r.accuracy, r.mean_ce);
        Ok(Some(r))
    };
    super::save::check_room(&opts.output, &clf.model.params, opts.dtype)?;
    let eval_before = if opts.eval_before { score(&clf, "before")? } else { None };

    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let tokens = clf.tokenizer.tokenize(&texts)?;
    super::classify::require_tokens(&tokens, 0)?;
    let n = tokens.len();
    let head_lr = opts.head_lr.unwrap_or(opts.lr);
    let steps = total_steps(opts, n);
    tracing::info!(
        "fine-tuning {} on {n} examples of {} classes: {steps} steps of {} ({:.2} epochs), lr {} (head {head_lr}, {} schedule, {} warmup steps), max {} tokens, seed {}",
        base.display(),
        names.len(),
        opts.batch_size,
        steps as f64 / n.div_ceil(opts.batch_size) as f64,
        opts.lr,
        opts.schedule,
        opts.warmup_steps,
        opts.max_len,
        opts.seed
    );
    let is_head: Vec<bool> = clf.model.blocks.iter().map(|b| matches!(b, super::Block::Head(_))).collect();
    let mut trainer =
        Trainer::new(&clf.model.backend, &clf.model.params, |b| if is_head[b] { head_lr } else { opts.lr })?;
    let run =
        train(&mut ClassifierObjective { clf: &mut clf, tokens: &tokens, labels: &labels }, &mut trainer, n, opts)?;

    let eval = score(&clf, "after")?;
    let saved = clf
        .model
        .save(&opts.output, &SaveOptions { dtype: opts.dtype, labels: Some(names.clone()), force: opts.force })?;
    let (initial_loss, final_loss) = loss_ends(&run.losses);
    Ok(FinetuneSummary {
        base: base.to_path_buf(),
        output: opts.output.clone(),
        labels: names,
        train_examples: n,
        steps,
        epochs: run.seen as f64 / n as f64,
        batch_size: opts.batch_size,
        lr: opts.lr,
        head_lr,
        schedule: opts.schedule,
        warmup_steps: opts.warmup_steps,
        initial_loss,
        final_loss,
        losses: run.losses,
        eval_before,
        eval,
        train_seconds: run.seconds,
        seconds: start.elapsed().as_secs_f64(),
        saved,
    })
}

/// Refuses a causal LM, or a base of neither family (naming both, since `finetune` takes
/// either), before anything heavy is loaded; a missing config.json is left to the loader.
fn check_classifier_base(base: &Path) -> Result<()> {
    if super::lm::is_causal_lm_dir(base)? {
        return Err(Error::Invalid(format!(
            "{} is a causal LM: it fine-tunes on texts with finetune_lm, not as a classifier",
            base.display()
        )));
    }
    let dir = if base.is_dir() { base } else { base.parent().unwrap_or(Path::new(".")) };
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(());
    }
    let text = crate::input_file::read_to_string(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Model { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
    super::BertConfig::from_json(&v, &path).map(drop).map_err(|e| {
        Error::Invalid(format!(
            "{e}; nor is it a causal LM of the {}, the other kind fine-tuning takes",
            super::LmKind::all()
        ))
    })
}

/// The texts of a labelled JSONL and their class ids under `names`.
fn labelled_texts(path: &Path, classes: &ClassList) -> Result<(Vec<String>, Vec<usize>)> {
    let ex = read_jsonl(path)?;
    let ids = label_ids(&ex, path, classes)?;
    Ok((ex.into_iter().map(|e| e.text).collect(), ids))
}

/// Texts per forward pass when evaluating.
pub(super) const EVAL_BATCH: usize = 64;

/// What differs between model families in training: the loss of a batch of training examples
/// with its gradients, and writing updated weights back. Everything else (batch order, the
/// schedule, clipping, Adam, logging) is [`train`]'s, shared.
pub(super) trait Objective<B: Backend> {
    fn backend(&self) -> &B;
    /// The mean loss of the training examples `chunk` (indices) and one gradient per trainable
    /// tensor, by name (a tensor held twice, like a tied embedding, has one, summed).
    fn loss_grads(&mut self, chunk: &[usize]) -> Result<(f32, Params<B>)>;
    /// The backend and the model's parameters (one map per block), for the optimizer to update
    /// in place.
    fn backend_and_params(&mut self) -> (&B, &mut [Params<B>]);
}

/// The classifier's objective: mean cross-entropy against the class of each text.
struct ClassifierObjective<'a, B: Backend> {
    clf: &'a mut SequenceClassifier<B>,
    tokens: &'a [Tokens],
    labels: &'a [usize],
}

impl<B: Backend> Objective<B> for ClassifierObjective<'_, B> {
    fn backend(&self) -> &B {
        &self.clf.model.backend
    }

    fn loss_grads(&mut self, chunk: &[usize]) -> Result<(f32, Params<B>)> {
        let model = &self.clf.model;
        let classes = model.num_labels().unwrap_or(0).max(1);
        let mut onehot = vec![0f32; chunk.len() * classes];
        for (row, &i) in onehot.chunks_mut(classes).zip(chunk) {
            row[self.labels[i]] = 1.0;
        }
        let enc = self.clf.tokenizer.pad(&chunk.iter().map(|&i| &self.tokens[i]).collect::<Vec<_>>());
        let batch = model.batch(&enc)?;
        let targets = model.backend.upload(&onehot)?;
        let (loss, block_grads) = model.soft_ce_grads(&batch, &targets)?;
        Ok((loss, block_grads.into_iter().flatten().collect()))
    }

    fn backend_and_params(&mut self) -> (&B, &mut [Params<B>]) {
        let m = &mut self.clf.model;
        (&m.backend, &mut m.params)
    }
}

/// What [`train`] did.
pub(super) struct TrainRun {
    /// The loss of every step.
    pub losses: Vec<f32>,
    /// Examples drawn, repeats counted.
    pub seen: usize,
    pub seconds: f64,
}

/// The shared training loop: `total_steps` Adam steps over `n` examples in seeded per-epoch
/// shuffles, `batch_size` at a time, with the learning-rate schedule and clipping of `opts`.
pub(super) fn train<B: Backend, O: Objective<B>>(
    obj: &mut O,
    trainer: &mut Trainer<B>,
    n: usize,
    opts: &FinetuneOptions,
) -> Result<TrainRun> {
    let start = Instant::now();
    let total = total_steps(opts, n);
    if total > 0 && opts.warmup_steps >= total {
        // The rate peaks at the last step (fuzzing round 6: 2% of --lr for 2 steps of 100 warmup).
        let peak = opts.schedule.factor(total - 1, total, opts.warmup_steps);
        tracing::warn!(
            "--warmup-steps {} is not below the run's {total} steps: the learning rate never reaches --lr (it \
             peaks at {:.0}% of it)",
            opts.warmup_steps,
            100.0 * peak
        );
    }
    // Not sized by `total`: `--steps 2^64-1` overflowed the capacity and `1e10` aborted on a
    // 40 GB allocation before the first step (fuzzing round 3). The history grows as it runs.
    let mut losses = Vec::new();
    let mut seen = 0usize;
    let (mut epoch, mut order, mut cursor) = (0usize, shuffled(n, opts.seed, 0), 0usize);
    let mut log = ProgressLog::new(n, total);
    for step in 1..=total {
        if cursor >= n {
            epoch += 1;
            order = shuffled(n, opts.seed, epoch);
            cursor = 0;
        }
        let chunk = &order[cursor..(cursor + opts.batch_size).min(n)];
        cursor += chunk.len();
        seen += chunk.len();
        let lr_factor = opts.schedule.factor(step - 1, total, opts.warmup_steps);
        let clip = (opts.max_grad_norm > 0.0).then_some(opts.max_grad_norm);
        let loss = trainer.step(obj, chunk, lr_factor, clip)?;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "training diverged at step {step}: the loss is {loss}; try a smaller learning rate"
            )));
        }
        losses.push(loss);
        if step % opts.log_every.max(1) == 0 || step == total {
            log.line(step, seen, &losses, start);
        }
        if step == total {
            check_final_weights(obj, chunk, step)?;
        }
    }
    Ok(TrainRun { losses, seen, seconds: start.elapsed().as_secs_f64() })
}

/// Every step's loss is that of the weights before its update, so a last update that diverged
/// would be saved unseen (fuzzing round 5: `--lr 1e30` saved weights of 1e30, rc 0). The final
/// weights' loss on the last batch (one more forward and backward) must be finite.
fn check_final_weights<B: Backend, O: Objective<B>>(obj: &mut O, chunk: &[usize], step: usize) -> Result<()> {
    let (loss, _) = obj.loss_grads(chunk)?;
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "training diverged at step {step}, the last: the updated weights give a loss of {loss} on its \
         batch; nothing was saved; try a smaller learning rate"
    )))
}

/// The loss lines of a run: when, at which step and after how many examples the last one was.
struct ProgressLog {
    n: usize,
    total: usize,
    last: (Instant, usize, usize),
}

impl ProgressLog {
    fn new(n: usize, total: usize) -> Self {
        ProgressLog { n, total, last: (Instant::now(), 0, 0) }
    }

    fn line(&mut self, step: usize, seen: usize, losses: &[f32], start: Instant) {
        let secs = self.last.0.elapsed().as_secs_f64();
        let done = start.elapsed().as_secs_f64();
        tracing::info!(
            "step {step}/{} epoch {:.2}: loss {:.4} ({:.1} examples/s, {:.0}s elapsed, eta {:.0}s)",
            self.total,
            seen as f64 / self.n as f64,
            mean(&losses[self.last.1..]),
            (seen - self.last.2) as f64 / secs.max(1e-9),
            done,
            done / step as f64 * (self.total - step) as f64
        );
        self.last = (Instant::now(), step, seen);
    }
}

/// One trainable tensor: its name in the model and its Adam state, on the backend.
struct Slot<B: Backend> {
    name: String,
    /// The learning rate before the schedule's factor.
    lr: f32,
    adam: BufAdam<B>,
}

/// The optimizer side of training: every weight's Adam state where the weights are. A step
/// brings back only the loss (and, when clipping, one sum of squares per tensor): weights,
/// gradients and moments stay on the device.
pub(super) struct Trainer<B: Backend> {
    slots: Vec<Slot<B>>,
}

impl<B: Backend> Trainer<B> {
    /// Every tensor of `blocks` (one parameter map per block), at learning rate `lr_of(block)`;
    /// a name held by two blocks (a tied embedding) trains once, at its first block's rate.
    pub(super) fn new(be: &B, blocks: &[Params<B>], lr_of: impl Fn(usize) -> f32) -> Result<Self> {
        let mut slots: Vec<Slot<B>> = Vec::new();
        for (bi, params) in blocks.iter().enumerate() {
            for (name, p) in params {
                if slots.iter().any(|s| &s.name == name) {
                    continue;
                }
                let lr = lr_of(bi);
                let adam = BufAdam::new(be, be.len(&p.buf), AdamConfig::with_lr(lr))?;
                slots.push(Slot { name: name.clone(), lr, adam });
            }
        }
        Ok(Trainer { slots })
    }

    /// One step on the examples `chunk`, at `lr_factor` times each tensor's learning rate;
    /// returns the batch's mean loss.
    fn step<O: Objective<B>>(
        &mut self,
        obj: &mut O,
        chunk: &[usize],
        lr_factor: f32,
        max_grad_norm: Option<f32>,
    ) -> Result<f32> {
        let (loss, mut named) = obj.loss_grads(chunk)?;
        let grads: Vec<B::Buf> = self
            .slots
            .iter()
            .map(|s| {
                named.remove(&s.name).map(|g| g.buf).ok_or_else(|| {
                    Error::Invalid(format!("internal: the backward produced no gradient for `{}`", s.name))
                })
            })
            .collect::<Result<_>>()?;
        drop(named);
        let scale = match max_grad_norm {
            Some(max) => clip_scale(&obj.backend().sum_squares(&grads.iter().collect::<Vec<_>>())?, max),
            None => 1.0,
        };
        for (s, g) in self.slots.iter_mut().zip(&grads) {
            s.adam.config.lr = s.lr * lr_factor;
            let (be, params) = obj.backend_and_params();
            chain::update_param(be, params, &s.name, |p| s.adam.step_scaled(be, p, g, scale))?;
        }
        Ok(loss)
    }
}

/// The factor that brings the global norm of the gradients, whose squares sum to `sq` per
/// tensor, down to `max` (PyTorch's `clip_grad_norm_`), or 1 when it is below.
fn clip_scale(sq: &[f64], max: f32) -> f32 {
    let norm = sq.iter().sum::<f64>().sqrt();
    (max as f64 / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    /// Fuzzing round 3: `--epochs 2^64-1` wrapped (release) or overflowed (debug).
    #[test]
    fn total_steps_saturate() {
        assert_eq!(TrainLength::epochs(usize::MAX).total_steps(3, 1), usize::MAX);
        assert_eq!(TrainLength::epochs(2).total_steps(3, 2), 4);
        assert_eq!(TrainLength::steps(usize::MAX).total_steps(3, 1), usize::MAX);
    }

    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let opts: FinetuneOptions = parse_args(&["--train", "t.jsonl", "-o", "out"]).unwrap();
        assert_eq!(format!("{opts:?}"), format!("{:?}", FinetuneOptions::new("t.jsonl", "out")));
        let both = parse_args::<FinetuneOptions>(&["--train", "t", "-o", "o", "--steps", "3", "--epochs", "2"]);
        assert!(both.is_err(), "--steps and --epochs exclude each other");
        let opts: FinetuneOptions = parse_args(&["--train", "t", "-o", "o", "--steps", "3"]).unwrap();
        assert_eq!((opts.length, opts.length.total_steps(100, 16)), (TrainLength::steps(3), 3));
        assert_eq!(TrainLength::default().total_steps(100, 16), 7);
        assert_eq!(TrainLength::epochs(2).total_steps(100, 16), 14);
        let args: FinetuneArgs = parse_args(&["base", "--train", "t", "-o", "o"]).unwrap();
        let want = FinetuneArgs { base: "base".into(), opts: FinetuneOptions::new("t", "o"), device: Device::Auto };
        assert_eq!(format!("{args:?}"), format!("{want:?}"));
    }

    fn ex(label: Option<&str>, id: Option<usize>) -> Example {
        Example { text: "t".into(), label: label.map(String::from), label_id: id }
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled(1000, 3, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled(1000, 3, 0));
        assert_ne!(a, shuffled(1000, 4, 0), "seed");
        assert_ne!(a, shuffled(1000, 3, 1), "epoch");
        assert_ne!(a, sorted, "actually shuffled");
        assert!(shuffled(0, 0, 0).is_empty());
        assert_eq!(shuffled(1, 9, 9), [0]);
    }

    #[test]
    fn schedules_match_transformers() {
        use LrSchedule::*;
        // No warmup: constant is 1 throughout; linear goes 1, 3/4, 1/2, 1/4 over four steps.
        assert_eq!((0..4).map(|s| Constant.factor(s, 4, 0)).collect::<Vec<_>>(), [1.0; 4]);
        assert_eq!((0..4).map(|s| Linear.factor(s, 4, 0)).collect::<Vec<_>>(), [1.0, 0.75, 0.5, 0.25]);
        // Two warmup steps of six: 0, 1/2, then the schedule over the last four.
        assert_eq!((0..6).map(|s| Linear.factor(s, 6, 2)).collect::<Vec<_>>(), [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
        assert_eq!((0..3).map(|s| Constant.factor(s, 6, 2)).collect::<Vec<_>>(), [0.0, 0.5, 1.0]);
        assert_eq!("LINEAR".parse::<LrSchedule>(), Ok(Linear));
        assert!("cosine".parse::<LrSchedule>().is_err());
    }

    #[test]
    fn class_names_and_ids() {
        let here = Path::new("/nonexistent/train.jsonl");
        let data = [ex(Some("b"), None), ex(Some("a"), None), ex(Some("b"), Some(1))];
        let classes = class_names(&data, here, None).unwrap();
        assert_eq!(classes.names, ["a", "b"], "sorted names from the data");
        assert_eq!(label_ids(&data, here, &classes).unwrap(), [1, 0, 1]);
        let clash = [ex(Some("b"), Some(0))];
        let e = label_ids(&clash, here, &classes).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("disagrees"), "{e}");
        let ids = [ex(None, Some(2)), ex(None, Some(0))];
        let classes = class_names(&ids, here, None).unwrap();
        assert_eq!(classes.names, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(label_ids(&ids, here, &classes).unwrap(), [2, 0]);
        // A stray huge id is refused by line instead of sizing a head (it aborted the process).
        let stray = [ex(None, Some(0)), ex(None, Some(4_000_000_000))];
        let e = class_names(&stray, here, None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("label 4000000000"), "{e}");
        let e = label_ids(&[ex(None, None)], here, &classes).unwrap_err().to_string();
        assert!(e.contains("missing the `label` field"), "{e}");
    }
}
