//! `symerge predict` and `symerge eval`: their flags and what they run. Which model a path holds
//! decides the work: a sequence classifier is scored against labels (or predicts), a causal LM
//! gets its perplexity, and an adaptation's output has every task scored against its expert.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::bert::{Bert, LoadOptions, NewHead};
use super::causal::{LmArch, LmKind};
use super::classify::{
    EvalReport, PredictSummary, SequenceClassifier, check_predictions_output, evaluate, predict, write_predictions,
};
use super::lm::{CausalLm, LmEvalReport, evaluate_lm, is_causal_lm_dir};
use super::tokenize::DEFAULT_MAX_LEN;
use crate::adapt::report::{AdaptEvalOutcome, ReportOptions, evaluate_adapted, is_adapt_output};
use crate::backend::{Backend, Device};
use crate::data::jsonl::{read_jsonl, read_texts};
use crate::error::{Error, Result};
use crate::input_file::{NamedBy, require};

/// Texts per forward pass unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// How to load and batch a model for inference: the flags `predict` and `eval` share (their
/// defaults are [`InferenceOptions::default`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct InferenceOptions {
    /// Texts per forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = parse_batch_size)]
    pub batch_size: usize,
    /// Truncate texts to this many tokens, counting the special tokens the tokenizer adds (an
    /// encoder's [CLS] and [SEP]); default 128, or for an adapt output the length its adaptation
    /// used.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
    /// launcher the GPU of LOCAL_RANK), cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Add a new, seeded random classification head with N labels (e.g. to a bare pretrained
    /// encoder); replaces the checkpoint's classifier if it has one.
    #[arg(long, value_name = "N")]
    pub new_head: Option<usize>,
    /// Seed of the new head's weights.
    #[arg(long, default_value_t = 0)]
    pub head_seed: u64,
    /// Use this fine-tuned model's head (pooler, classifier, label names) on MODEL's encoder,
    /// e.g. to score a merged encoder on one task.
    #[arg(long, value_name = "EXPERT", conflicts_with = "new_head")]
    pub head_from: Option<PathBuf>,
}

impl Default for InferenceOptions {
    /// Batches of 32, 128 tokens, `--device auto`, the checkpoint's own head.
    fn default() -> Self {
        InferenceOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            max_len: None,
            device: Device::Auto,
            new_head: None,
            head_seed: 0,
            head_from: None,
        }
    }
}

impl InferenceOptions {
    /// `--head-from`'s model exists.
    fn require_inputs(&self) -> Result<()> {
        self.head_from.as_deref().map_or(Ok(()), |p| require(p, NamedBy::Arg("--head-from")))
    }

    /// `--max-len`, else the default.
    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(DEFAULT_MAX_LEN)
    }

    /// The classifier at `model`, with the new or borrowed head asked for; a model left without
    /// a head is refused here rather than failing at the first batch, pointing first to
    /// `--head-from` (a merged encoder lost its experts' heads; a random head scores at chance).
    pub fn load_classifier<B: Backend + Clone>(&self, be: B, model: &Path) -> Result<SequenceClassifier<B>> {
        let new_head = self.new_head.map(|num_labels| NewHead { num_labels, seed: self.head_seed });
        let mut clf = SequenceClassifier::load(be.clone(), model, self.max_len(), LoadOptions { new_head })?;
        if let Some(expert) = &self.head_from {
            clf.model.use_head_of(Bert::load(be, expert, LoadOptions::default())?)?;
        }
        if clf.model.num_labels().is_none() {
            return Err(Error::Invalid(format!(
                "{} has no classification head (classifier.weight); pass --head-from EXPERT to score it with a \
                 task's fine-tuned head (a merged encoder's experts have one), or --new-head N for a seeded random \
                 one (chance-level until trained)",
                model.display()
            )));
        }
        Ok(clf)
    }

    /// The causal LM at `model`; the head flags, which mean nothing for it, are refused.
    pub fn load_lm<B: Backend, A: LmArch<B>>(&self, be: B, model: &Path) -> Result<CausalLm<B, A>> {
        if self.new_head.is_some() || self.head_from.is_some() {
            return Err(Error::Invalid(format!(
                "{} is a causal LM: --new-head and --head-from apply to classifiers only",
                model.display()
            )));
        }
        CausalLm::<B, A>::load(be, model, self.max_len())
    }
}

/// `symerge predict`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// Model directory: config.json, safetensors weights, tokenizer.json.
    pub model: PathBuf,
    /// JSON lines with a `text` field (other fields are ignored).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output JSON lines, one per input in order, with `logits`, `probs`, `pred` (the class
    /// index) and `label` (its name, when config.json names the classes); written atomically.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// Replace an existing --out, when it is an earlier predictions file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub infer: InferenceOptions,
}

/// `--batch-size`: a positive count, refused at the command line (0 was refused later, in words
/// that named the model).
pub fn parse_batch_size(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl PredictArgs {
    /// The defaults: no replacing, [`InferenceOptions::default`].
    pub fn new(model: impl Into<PathBuf>, inputs: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        let (model, inputs, out) = (model.into(), inputs.into(), out.into());
        PredictArgs { model, inputs, out, force: false, infer: InferenceOptions::default() }
    }

    /// Scores every input text and writes the predictions file; the output is checked before
    /// the model is loaded, so a refused one costs nothing.
    pub fn run(&self) -> Result<PredictSummary> {
        require(&self.model, NamedBy::Arg("MODEL"))?;
        require(&self.inputs, NamedBy::Arg("--inputs"))?;
        self.infer.require_inputs()?;
        if is_causal_lm_dir(&self.model)? {
            return Err(Error::Invalid(format!(
                "{} is a causal LM: predict scores sequence classifiers; `symerge eval` reports its perplexity",
                self.model.display()
            )));
        }
        check_predictions_output(&self.out, &[&self.model, &self.inputs], self.force)?;
        let lines = read_texts(&self.inputs)?;
        let start = Instant::now();
        let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
        let infer = &self.infer;
        let preds = crate::with_backend!(infer.device, |be| predict(
            &infer.load_classifier(be, &self.model)?,
            &texts,
            infer.batch_size
        )?);
        write_predictions(&self.out, &preds)?;
        Ok(PredictSummary {
            output: self.out.clone(),
            predictions: preds.len(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// `symerge eval`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A classifier or causal-LM checkpoint, or the output directory of `symerge adapt` (then
    /// every task is scored with its own checkpoint and, for comparison, its expert).
    pub model: PathBuf,
    /// JSON lines with `text` and `label` (a name from config.json's label2id, or an index);
    /// a causal LM needs only `text`. Not needed for an adapt output: each task's recorded
    /// inputs are used.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Adapt output only: data for one task (labelled for a classifier) instead of its recorded
    /// inputs.
    #[arg(long, value_name = "TASK=PATH", value_parser = parse_task_path)]
    pub task_inputs: Vec<(String, PathBuf)>,
    /// Adapt output only: skip scoring the experts.
    #[arg(long)]
    pub no_experts: bool,
    /// Adapt output only: also score the merge adapt started from, training-free (task
    /// arithmetic at the config's lambda_init, each task with its expert's own layer).
    #[arg(long)]
    pub baseline: bool,
    #[command(flatten)]
    pub infer: InferenceOptions,
}

/// What `eval` measured, which depends on what the model is (`--json` prints the inner report).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EvalOutcome {
    Adapted(AdaptEvalOutcome),
    Lm(LmEvalReport),
    Classifier(EvalReport),
}

impl EvalArgs {
    /// The defaults: each task's recorded inputs, experts scored, [`InferenceOptions::default`].
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EvalArgs {
            model: model.into(),
            inputs: None,
            task_inputs: Vec::new(),
            no_experts: false,
            baseline: false,
            infer: InferenceOptions::default(),
        }
    }

    /// Scores the model on its data: every task of an adapt output, a causal LM's texts, or a
    /// classifier's labelled examples.
    pub fn run(&self) -> Result<EvalOutcome> {
        self.require_inputs()?;
        if is_adapt_output(&self.model) {
            return self.adapted().map(EvalOutcome::Adapted);
        }
        let causal = LmKind::of_dir(&self.model)?;
        let inputs = self.plain_inputs()?;
        let (infer, model) = (&self.infer, self.model.as_path());
        if let Some(kind) = causal {
            // A causal LM reads no label: the file's labels are not checked.
            let lines = read_texts(inputs)?;
            let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
            let report = crate::with_lm_arch!(kind, A => crate::with_backend!(infer.device, |be| evaluate_lm(
                &infer.load_lm::<_, A>(be, model)?,
                &texts,
                infer.batch_size
            )?));
            return Ok(EvalOutcome::Lm(report));
        }
        let lines = read_jsonl(inputs)?;
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        let report = crate::with_backend!(infer.device, |be| {
            let clf = infer.load_classifier(be, model)?;
            evaluate(&clf, &texts, &clf.label_ids(&lines, inputs)?, infer.batch_size)?
        });
        Ok(EvalOutcome::Classifier(report))
    }

    /// MODEL and the data file named exist, each error saying which argument named the path
    /// (`--task-inputs` once its task names are checked, see [`evaluate_adapted`]).
    fn require_inputs(&self) -> Result<()> {
        require(&self.model, NamedBy::Arg("MODEL"))?;
        if let Some(inputs) = &self.inputs {
            require(inputs, NamedBy::Arg("--inputs"))?;
        }
        self.infer.require_inputs()
    }

    /// Every task of an adapt output, on the data `--task-inputs` names or else the recorded one.
    fn adapted(&self) -> Result<AdaptEvalOutcome> {
        if self.inputs.is_some() {
            return Err(Error::Invalid(format!(
                "{} is an adapt output: name data per task with --task-inputs TASK=PATH",
                self.model.display()
            )));
        }
        // The last of two for one task won silently (fuzzing round 6).
        let mut seen = std::collections::BTreeSet::new();
        if let Some((task, _)) = self.task_inputs.iter().find(|(t, _)| !seen.insert(t)) {
            return Err(Error::Invalid(format!("--task-inputs names task `{task}` twice: give one file per task")));
        }
        let opts = ReportOptions {
            data: self.task_inputs.iter().cloned().collect(),
            experts: !self.no_experts,
            batch_size: self.infer.batch_size,
            max_len: self.infer.max_len,
            baseline: self.baseline,
        };
        crate::with_backend!(self.infer.device, |be| evaluate_adapted(be, &self.model, &opts))
    }

    /// The data file of an `eval` on one model (not an adapt output), refusing adapt-only flags.
    fn plain_inputs(&self) -> Result<&Path> {
        if !self.task_inputs.is_empty() || self.no_experts || self.baseline {
            return Err(Error::Invalid(
                "--task-inputs, --no-experts and --baseline apply to an adapt output directory only".into(),
            ));
        }
        self.inputs.as_deref().ok_or_else(|| {
            Error::Invalid(format!("--inputs DATA.jsonl is required (JSON lines to score {} on)", self.model.display()))
        })
    }
}

/// Parses `TASK=PATH` (`--task-inputs`).
pub fn parse_task_path(s: &str) -> Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((task, path)) if !task.is_empty() && !path.is_empty() => Ok((task.to_string(), PathBuf::from(path))),
        _ => Err(Error::Invalid(format!("`{s}` is not TASK=PATH"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    enum Cli {
        Predict(PredictArgs),
        Eval(EvalArgs),
    }

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
    }

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let Ok(Cli::Predict(p)) = parse(&["predict", "m", "--inputs", "i.jsonl", "--out", "p.jsonl"]) else {
            panic!("predict parses")
        };
        assert_eq!(format!("{p:?}"), format!("{:?}", PredictArgs::new("m", "i.jsonl", "p.jsonl")));
        let Ok(Cli::Eval(e)) = parse(&["eval", "m"]) else { panic!("eval parses") };
        assert_eq!(format!("{e:?}"), format!("{:?}", EvalArgs::new("m")));
    }

    #[test]
    fn flags_that_contradict_are_refused() {
        let both = parse(&["eval", "m", "--new-head", "2", "--head-from", "e"]).err().unwrap();
        assert!(both.to_string().contains("cannot be used with"), "{both}");
        let bad = parse(&["eval", "m", "--task-inputs", "noequals"]).err().unwrap();
        assert!(bad.to_string().contains("is not TASK=PATH"), "{bad}");
        let Ok(Cli::Eval(e)) = parse(&["eval", "m", "--task-inputs", "a=x.jsonl", "--inputs", "d"]) else {
            panic!("eval parses")
        };
        assert_eq!(e.task_inputs, [("a".to_string(), PathBuf::from("x.jsonl"))]);
        let e = e.plain_inputs().unwrap_err().to_string();
        assert!(e.contains("adapt output directory only"), "{e}");
        let e = EvalArgs::new("m").plain_inputs().unwrap_err().to_string();
        assert!(e.contains("--inputs DATA.jsonl is required"), "{e}");
        let lm_head = InferenceOptions { new_head: Some(2), ..InferenceOptions::default() };
        let e = lm_head
            .load_lm::<_, crate::model::LlamaConfig>(crate::backend::Cpu, Path::new("m"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("apply to classifiers only"), "{e}");
    }
}
