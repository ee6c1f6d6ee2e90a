//! Adaptation of BERT-family sequence classifiers: the [`Family`] that batches tokenized texts,
//! scores the head's logits against the experts' cached class probabilities (SyMerge: soft
//! cross-entropy, optionally confidence-filtered, or hard pseudo-labels) or by their entropy
//! (AdaMerging), and writes each task's model as a `BertForSequenceClassification` with its
//! expert's class names.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{AdaptConfig, AdaptedLayer, LossKind, Method};
use super::objective::{self, Objective, Prepared};
use super::train::{Adaptation, Family, SummaryLabels, Task, TaskEval};
use crate::backend::Backend;
use crate::checkpoint::FloatDType;
use crate::data::jsonl::read_jsonl_hashed;
use crate::error::{Error, Result};
use crate::labels::produce::provenance;
use crate::labels::{LabelCache, LabelKind};
use crate::model::classify::{Classes, label_ids};
use crate::model::save::SaveOptions;
use crate::model::tokenize::Tokens;
use crate::model::{Batch, Bert, Block, LoadOptions, SequenceClassifier, TextTokenizer, evaluate};

/// The BERT family during adaptation: the pretrained model's layout (no weights: they stream).
pub struct Classifier<B: Backend> {
    pub base: Bert<B>,
}

/// A classification task's own data.
pub struct ClassTask {
    /// Gold class ids, when the inputs carry labels (used only to report accuracy).
    pub gold: Option<Vec<usize>>,
    /// The expert's soft labels (SyMerge; AdaMerging needs none).
    pub cache: Option<LabelCache>,
    pub classes: usize,
    /// The expert's class names (`config.json`'s `label2id`), carried into the adapted model.
    pub label2id: Option<BTreeMap<String, usize>>,
}

/// Adaptation of a sequence classifier.
pub type Adapter<B> = Adaptation<B, Classifier<B>>;

impl<B: Backend + Clone> Adaptation<B, Classifier<B>> {
    /// Loads the base model's layout, the experts' own layers, the inputs and the label caches,
    /// checking that each cache was made by that expert for those inputs.
    pub fn load(backend: B, cfg: AdaptConfig) -> Result<Self> {
        Self::load_with(backend, cfg, None)
    }

    /// [`Adapter::load`] with a memory budget for keeping shared blocks staged between visits
    /// (default: half the backend's free memory; `Some(0)` streams every block).
    pub fn load_with(backend: B, cfg: AdaptConfig, budget: Option<u64>) -> Result<Self> {
        cfg.check_model_kinds()?;
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
        let want: Vec<String> = base.blocks[..encoder_blocks].iter().map(Block::name).chain(["head".into()]).collect();
        let tasks =
            cfg.tasks.iter().map(|t| load_task(&backend, &cfg, t, n_shared, &want)).collect::<Result<Vec<_>>>()?;
        let shared = base.blocks[..n_shared].to_vec();
        Adaptation::assemble(cfg, Classifier { base }, shared, tasks, budget)
    }

    /// Task `task`'s merged model: the merged shared blocks and its own (adapted) blocks.
    pub fn task_model(&self, task: usize) -> Result<Bert<B>> {
        let mut model = self.task_bert(task)?;
        self.fill_merged(&mut model.params)?;
        Ok(model)
    }

    /// Task `task`'s model with the shared blocks left empty, its class names set.
    fn task_bert(&self, task: usize) -> Result<Bert<B>> {
        let (blocks, params) = self.task_skeleton(task)?;
        let t = &self.tasks[task];
        let mut config = self.family.base.config.clone();
        config.label2id = t.data.label2id.clone();
        Ok(Bert { config, path: t.expert.clone(), blocks, params, backend: self.family.base.backend.clone() })
    }
}

/// One task: the expert's own blocks (checked against the base's layout), its inputs, labels
/// and cache.
fn load_task<B: Backend + Clone>(
    backend: &B,
    cfg: &AdaptConfig,
    t: &super::config::TaskConfig,
    n_shared: usize,
    want: &[String],
) -> Result<Task<B, Classifier<B>>> {
    let mut expert = Bert::load_partial(backend.clone(), &t.expert, LoadOptions::default(), n_shared)?;
    let classes = expert.num_labels().ok_or_else(|| Error::Model {
        path: t.expert.clone(),
        reason: "no classification head: an expert must be a fine-tuned classifier".into(),
    })?;
    let names: Vec<String> = expert.blocks.iter().map(Block::name).collect();
    if names != want {
        return Err(Error::Model {
            path: t.expert.clone(),
            reason: format!("blocks {names:?} do not match the base model's {want:?}"),
        });
    }
    let (examples, inputs_hash) = read_jsonl_hashed(&t.inputs)?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!("{}: no inputs for task `{}`", t.inputs.display(), t.name)));
    }
    let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
    let expert_dir = if t.expert.is_dir() { t.expert.clone() } else { expert.path.clone() };
    let tokenizer = TextTokenizer::from_dir(&expert_dir, cfg.max_len)?;
    let c = &expert.config;
    tokenizer.check_fits(&expert_dir.join("config.json"), c.max_seq_len(), c.type_vocab_size)?;
    // The cache first: a cache made by another task's expert is the cause, the inputs' labels
    // that this expert does not know only a consequence.
    let cache = match (&t.cache, cfg.method) {
        (Some(path), Method::Symerge) => Some(open_cache(path, &t.expert, &t.name, cfg.max_len, &texts, classes)?),
        _ => None,
    };
    let labelled = examples.iter().all(|e| e.label.is_some() || e.label_id.is_some());
    // The same inputs file may suit another task: say whose classes these are.
    let source = format!("{}'s label2id (the expert of task `{}`)", expert_dir.join("config.json").display(), t.name);
    let known = Classes { label2id: expert.config.label2id.as_ref(), n: classes, source: &source };
    let gold = labelled.then(|| label_ids(&examples, known, &t.inputs)).transpose()?;
    let data = ClassTask { gold, cache, classes, label2id: expert.config.label2id.clone() };
    let private_blocks = expert.blocks[n_shared..].to_vec();
    let private = expert.params.drain(n_shared..).collect();
    let inputs = (texts, inputs_hash);
    Task::new(backend, t.name.clone(), expert_dir, inputs, tokenizer, private_blocks, private, cfg.layer_lr, data)
}

/// The expert's cache for these inputs, with the expert's number of classes.
fn open_cache(
    path: &Path,
    expert: &Path,
    task: &str,
    max_len: usize,
    texts: &[String],
    classes: usize,
) -> Result<LabelCache> {
    let cache = LabelCache::open(path, Some(&provenance(expert, task, max_len, texts)?))?;
    if cache.rows() != texts.len() {
        return Err(Error::LabelCache {
            path: path.to_path_buf(),
            reason: format!("holds {} rows for {} inputs (corrupt header)", cache.rows(), texts.len()),
        });
    }
    if cache.classes() != classes {
        let what = match cache.kind() {
            LabelKind::Classification { classes } => format!("{classes} classes"),
            LabelKind::TopK { .. } => "next-token top-k labels (a causal LM's)".into(),
        };
        return Err(Error::LabelCache {
            path: path.to_path_buf(),
            reason: format!("{what}, but the expert is a classifier with {classes} classes"),
        });
    }
    Ok(cache)
}

fn objective_of(cfg: &AdaptConfig) -> Objective {
    match (cfg.method, cfg.loss) {
        (Method::Adamerging, _) => Objective::Entropy,
        (Method::Symerge, LossKind::Soft) => Objective::Soft { min_confidence: cfg.confidence },
        (Method::Symerge, LossKind::HardConf) => Objective::HardConf,
    }
}

impl<B: Backend + Clone> Family<B> for Classifier<B> {
    type Block = Block;
    type TaskData = ClassTask;
    /// The logits and the objective's per-sample state.
    type Pending = (B::Buf, Prepared);
    const COUNT_KEY: &'static str = "kept";

    fn describe_count(n: usize) -> String {
        format!("kept {n}")
    }

    fn backend(&self) -> &B {
        &self.base.backend
    }

    fn batch(&self, task: &Task<B, Self>, rows: &[usize]) -> Result<Option<Batch<B>>> {
        let seqs: Vec<&Tokens> = rows.iter().map(|&i| &task.tokens[i]).collect();
        self.base.batch(&task.tokenizer.pad(&seqs)).map(Some)
    }

    fn loss(
        &self,
        cfg: &AdaptConfig,
        task: &Task<B, Self>,
        batch: &Batch<B>,
        logits: B::Buf,
        rows: &[usize],
    ) -> Result<(Self::Pending, usize, f64)> {
        let probs = task.data.cache.as_ref().map(|c| c.probs_batch(rows));
        let p = objective::prepare(
            self.backend(),
            objective_of(cfg),
            &logits,
            probs.as_deref(),
            batch.batch,
            task.data.classes,
        )?;
        let (kept, sum) = (p.kept, p.loss_sum());
        Ok(((logits, p), kept, sum))
    }

    fn loss_backward(
        &self,
        task: &Task<B, Self>,
        _batch: &Batch<B>,
        (logits, p): Self::Pending,
        total: usize,
    ) -> Result<(B::Buf, f32)> {
        let out = objective::finish(self.backend(), p, &logits, task.data.classes, total)?;
        Ok((out.dlogits, out.loss))
    }

    fn finish_task(
        a: &Adapter<B>,
        task: usize,
        dir: Option<&Path>,
        dtype: FloatDType,
        evaluate_it: bool,
    ) -> Result<Option<TaskEval>> {
        let t = &a.tasks[task];
        if let Some(dir) = dir {
            let model = a.task_bert(task)?;
            let opts = SaveOptions { dtype, labels: model.config.label_names(), force: false };
            model.save_with(dir, &opts, &mut |b| a.merged_params(b))?;
        }
        let (Some(gold), true) = (&t.data.gold, evaluate_it) else { return Ok(None) };
        let tokenizer = TextTokenizer::from_dir(&t.expert, a.cfg.max_len)?;
        let clf = SequenceClassifier { model: a.task_model(task)?, tokenizer };
        let report = evaluate(&clf, &t.texts, gold, a.cfg.batch_size.max(32))
            .map_err(|e| super::train::scoring_adapted(&a.cfg, task, e))?;
        Ok(Some(TaskEval::Accuracy(report.accuracy)))
    }

    fn summary_labels(_cfg: &AdaptConfig) -> SummaryLabels {
        SummaryLabels { score: "accuracy", loss: "final loss" }
    }
}
