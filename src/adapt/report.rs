//! `symerge eval ADAPT_OUTPUT`: scores every task of an adaptation's output directory in one
//! call — each task's own checkpoint (`tasks/<task>/`: the merged model with the task's adapted
//! layer) and, for comparison, that task's expert — on the task's data.
//!
//! The tasks, their experts and their inputs come from the `config` that `summary.json` records,
//! so the default data is what the adaptation saw (the test-time setting: its unlabelled inputs
//! are the labelled test texts without their labels). Other data can be named per task.
//!
//! The model family decides the scores: a classifier's accuracy on the labels, a causal LM's
//! next-token loss, perplexity and top-1 accuracy on the texts. Each is what `symerge eval MODEL
//! --inputs DATA` reports for that model alone ([`TaskMetric`] says how a family's scores average
//! and print); the walk over the tasks is shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::classifier::Adapter;
use super::config::{AdaptConfig, Method};
use super::lm::LmAdapter;
use crate::backend::Backend;
use crate::checkpoint::FloatDType;
use crate::data::jsonl::{Example, read_jsonl_hashed};
use crate::error::{Error, Result};
use crate::model::{
    CausalLm, EvalReport, LmEvalReport, LmKind, LoadOptions, SequenceClassifier, evaluate, evaluate_lm,
};

/// How to score an adaptation output.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Labelled data per task name, replacing the inputs recorded in the config.
    pub data: BTreeMap<String, PathBuf>,
    /// Also score each task's expert on the same data.
    pub experts: bool,
    pub batch_size: usize,
    /// Truncation; `None`: the length the adaptation used (recorded in `summary.json`).
    pub max_len: Option<usize>,
    /// Also score the merge the adaptation started from (see [`TaskScore::baseline`]).
    pub baseline: bool,
}

/// One task's scores: `R` is the family's single-model report ([`EvalReport`] for a classifier,
/// [`LmEvalReport`] for a causal LM).
#[derive(Debug, Clone, Serialize)]
pub struct TaskScore<R> {
    pub task: String,
    pub data: PathBuf,
    /// The data's records (a causal LM's texts).
    pub examples: usize,
    /// The task's adapted checkpoint (`tasks/<task>/`).
    pub adapted: R,
    /// When asked for: the model adapt started from, training-free: `theta_pre + lambda_init *
    /// sum_k tau_k` with the task's own layer from its expert (task arithmetic at `lambda_init`,
    /// scored with the task's head). Adapting should beat it; a short run may not.
    pub baseline: Option<R>,
    /// The task's expert, when asked for.
    pub expert: Option<R>,
}

/// Every task's scores and their averages (an unweighted mean over tasks: see
/// [`TaskMetric::average`]).
#[derive(Debug, Clone, Serialize)]
pub struct AdaptReport<R: TaskMetric = EvalReport> {
    pub output: PathBuf,
    pub method: String,
    /// The truncation the scores used: `--max-len`, else the adaptation's own.
    pub max_len: usize,
    pub tasks: Vec<TaskScore<R>>,
    pub average_adapted: R::Average,
    pub average_baseline: Option<R::Average>,
    pub average_expert: Option<R::Average>,
    /// The `lambda_init` of the baseline's merge, when scored.
    pub baseline_lambda: Option<f32>,
}

/// An adapt output's scores, as its model family gives them (`--json` prints the inner report).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AdaptEvalOutcome {
    Classifier(AdaptReport<EvalReport>),
    Lm(AdaptReport<LmEvalReport>),
}

/// How a family's single-model report enters the adapt-output table: its average over tasks, a
/// short form for the log, and its cells under one model's column group.
pub trait TaskMetric: Serialize + Clone + std::fmt::Debug {
    type Average: Serialize + Clone + std::fmt::Debug;
    /// What the table's count column counts.
    const COUNTED: &'static str;
    /// The average row over the tasks' reports (at least one).
    fn average(all: &[&Self]) -> Self::Average;
    /// The scores in a log line: "51.52%".
    fn brief(&self) -> String;
    /// The heading of one model's columns.
    fn header(col: Column) -> String;
    fn cells(&self, col: Column) -> String;
    fn average_cells(avg: &Self::Average, col: Column) -> String;
}

/// One model's column group in the table: its heading (the method, or "expert") and the width
/// of its first column.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    pub label: &'a str,
    pub width: usize,
}

/// A classifier's accuracy in percent, one column; the average is the mean accuracy in [0, 1].
impl TaskMetric for EvalReport {
    type Average = f64;
    const COUNTED: &'static str = "examples";

    fn average(all: &[&Self]) -> f64 {
        all.iter().map(|r| r.accuracy).sum::<f64>() / all.len().max(1) as f64
    }

    fn brief(&self) -> String {
        format!("{:.2}%", 100.0 * self.accuracy)
    }

    fn header(col: Column) -> String {
        format!(" {:>w$}", col.label, w = col.width)
    }

    fn cells(&self, col: Column) -> String {
        Self::average_cells(&self.accuracy, col)
    }

    fn average_cells(accuracy: &f64, col: Column) -> String {
        format!(" {:>w$.2}%", 100.0 * accuracy, w = col.width.saturating_sub(1))
    }
}

/// The average row of a causal-LM table: the tasks' mean next-token losses averaged, so its
/// perplexity is the geometric mean of theirs (one task's easy text does not hide another's
/// blow-up, as an arithmetic mean of perplexities would), and the mean top-1 accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct LmAverage {
    pub mean_loss: f64,
    pub perplexity: f64,
    pub top1_accuracy: f64,
}

/// A causal LM's mean next-token loss, perplexity and top-1 accuracy: three columns, the group set
/// apart by two spaces.
impl TaskMetric for LmEvalReport {
    type Average = LmAverage;
    const COUNTED: &'static str = "texts";

    fn average(all: &[&Self]) -> LmAverage {
        let n = all.len().max(1) as f64;
        let mean_loss = all.iter().map(|r| r.mean_loss).sum::<f64>() / n;
        let top1_accuracy = all.iter().map(|r| r.top1_accuracy).sum::<f64>() / n;
        LmAverage { mean_loss, perplexity: mean_loss.exp(), top1_accuracy }
    }

    fn brief(&self) -> String {
        format!("perplexity {:.2}, top-1 {:.2}%", self.perplexity, 100.0 * self.top1_accuracy)
    }

    fn header(col: Column) -> String {
        let loss = format!("{} loss", col.label);
        format!("  {loss:>w$}  {:>10}  {:>7}", "perplexity", "top-1", w = lm_loss_width(col))
    }

    fn cells(&self, col: Column) -> String {
        lm_cells(self.mean_loss, self.perplexity, self.top1_accuracy, col)
    }

    fn average_cells(avg: &LmAverage, col: Column) -> String {
        lm_cells(avg.mean_loss, avg.perplexity, avg.top1_accuracy, col)
    }
}

/// The loss column's width: the column's, or its heading's ("symerge loss") when wider.
fn lm_loss_width(col: Column) -> usize {
    col.width.max(col.label.len() + " loss".len())
}

fn lm_cells(mean_loss: f64, perplexity: f64, top1: f64, col: Column) -> String {
    format!("  {mean_loss:>w$.4}  {perplexity:>10.2}  {:>6.2}%", 100.0 * top1, w = lm_loss_width(col))
}

/// The part of `summary.json` this needs.
#[derive(Deserialize)]
struct Recorded {
    config: RecordedConfig,
    summary: Option<RecordedSummary>,
}

#[derive(Deserialize)]
struct RecordedSummary {
    #[serde(default)]
    tasks: Vec<RecordedReport>,
    out_dtype: Option<String>,
}

#[derive(Deserialize)]
struct RecordedReport {
    name: String,
    model_hash: Option<String>,
    /// Records adapt read for the task.
    inputs: Option<usize>,
    inputs_hash: Option<String>,
}

/// Refuses a task model that is not the one adapt wrote (replaced, or a link to another model):
/// its scores would be reported as the adaptation's. Outputs of earlier versions record no
/// fingerprint and are taken as they are.
fn check_task_model(recorded: &Recorded, task: &str, dir: &Path) -> Result<()> {
    let want = recorded.summary.as_ref().and_then(|s| s.tasks.iter().find(|t| t.name == task));
    let Some(want) = want.and_then(|t| t.model_hash.as_deref()) else { return Ok(()) };
    let have = crate::labels::fingerprint::model_hash(dir)?;
    if have != want {
        return Err(Error::Invalid(format!(
            "{}: not the model adapt wrote for task `{task}` (its fingerprint differs from summary.json's); \
             rerun adapt",
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a task's recorded inputs file that changed since adapt read it (cut, edited,
/// replaced): its scores would be reported as the adaptation's on its inputs. Outputs of earlier
/// versions record no hash and are taken as they are.
fn check_task_inputs(recorded: &Recorded, task: &str, path: &Path, now: (usize, &str)) -> Result<()> {
    let want = recorded.summary.as_ref().and_then(|s| s.tasks.iter().find(|t| t.name == task));
    let Some(want) = want.filter(|t| t.inputs_hash.as_deref().is_some_and(|h| h != now.1)) else { return Ok(()) };
    let counts = want.inputs.map(|n| format!("{n} records when adapt read it, {} now; ", now.0)).unwrap_or_default();
    Err(Error::Invalid(format!(
        "{}: the inputs of task `{task}` changed since adapt read them ({counts}its hash differs from \
         summary.json's), so its scores would not be the adaptation's; rerun adapt on the file as it is, or \
         score it as other data with --task-inputs {task}={}",
        path.display(),
        path.display()
    )))
}

#[derive(Deserialize)]
struct RecordedConfig {
    method: String,
    tasks: Vec<RecordedTask>,
    max_len: Option<usize>,
    lambda_init: Option<f32>,
}

#[derive(Deserialize)]
struct RecordedTask {
    name: String,
    expert: PathBuf,
    inputs: PathBuf,
}

/// Whether `dir` looks like the output of `symerge adapt`.
pub fn is_adapt_output(dir: &Path) -> bool {
    dir.join("summary.json").is_file() && dir.join("tasks").is_dir()
}

/// Scores every task of the adaptation output `dir` (see the module notes) with the scores of
/// its model family, which the first task's checkpoint names.
pub fn evaluate_adapted<B: Backend + Clone>(backend: B, dir: &Path, opts: &ReportOptions) -> Result<AdaptEvalOutcome> {
    let recorded = Recorded::read(dir, opts)?;
    check_inputs_unchanged(dir, opts)?;
    let max_len = opts.max_len.or(recorded.config.max_len).unwrap_or(crate::model::DEFAULT_MAX_LEN);
    let first = recorded.config.tasks.first().map(|t| dir.join("tasks").join(&t.name));
    // No checkpoint (or config.json) there: the classifier walk reports what is missing.
    let family = match &first {
        Some(first) => LmKind::of_dir(first)?,
        None => None,
    };
    let start = if opts.baseline { Some(start_config(dir)?) } else { None };
    let dtype = recorded.out_dtype()?;
    let Some(kind) = family else {
        let score = |model: &Path, examples: &[Example], data: &Path| -> Result<EvalReport> {
            let clf = SequenceClassifier::load(backend.clone(), model, max_len, LoadOptions::default())?;
            if clf.model.num_labels().is_none() {
                return Err(Error::Invalid(format!("{} has no classification head", model.display())));
            }
            let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
            evaluate(&clf, &texts, &clf.label_ids(examples, data)?, opts.batch_size)
        };
        let start = start.map(|cfg| Adapter::load_with(backend.clone(), cfg, None)).transpose()?;
        let write = start.as_ref().map(|a| move |task: usize, out: &Path| a.write_task(task, out, dtype));
        let write = write.as_ref().map(|w| w as &WriteStart);
        return score_tasks(dir, recorded, opts, max_len, score, write).map(AdaptEvalOutcome::Classifier);
    };
    crate::with_lm_arch!(kind, A => {
        let score = |model: &Path, examples: &[Example], _: &Path| -> Result<LmEvalReport> {
            let lm = CausalLm::<B, A>::load(backend.clone(), model, max_len)?;
            let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
            evaluate_lm(&lm, &texts, opts.batch_size)
        };
        let start = start.map(|cfg| LmAdapter::<B, A>::load_with(backend.clone(), cfg, None)).transpose()?;
        let write = start.as_ref().map(|a| move |task: usize, out: &Path| a.write_task(task, out, dtype));
        let write = write.as_ref().map(|w| w as &WriteStart);
        score_tasks(dir, recorded, opts, max_len, score, write).map(AdaptEvalOutcome::Lm)
    })
}

/// Refuses experts (scored unless `--no-experts`, and the baseline's task vectors) or a base (the
/// baseline's) that changed since adapt: lambda.json records each one's content sketch, and the
/// scores would be of other models, reported as this adaptation's. Outputs of earlier versions
/// record none and are taken as they are.
fn check_inputs_unchanged(dir: &Path, opts: &ReportOptions) -> Result<()> {
    if !opts.experts && !opts.baseline {
        return Ok(());
    }
    let path = dir.join("lambda.json");
    if !path.exists() {
        return Ok(());
    }
    let table = crate::merge::config::LambdaTable::load(&path)?;
    let base = table.base.iter().filter(|_| opts.baseline);
    for m in base.chain(table.experts.iter().flatten()) {
        if crate::labels::fingerprint::model_sketch(&m.path)? == m.fingerprint {
            continue;
        }
        let what = match &m.task {
            Some(t) => format!("the expert of task `{t}`"),
            None => "the base model".into(),
        };
        let skip = if m.task.is_some() && !opts.baseline { "; or pass --no-experts" } else { "" };
        return Err(Error::Invalid(format!(
            "{}: {what} changed since adapt (its content differs from {}'s record), so its scores would be \
             of another model; restore it{skip}",
            m.path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Writes task k's starting model (the baseline) into a directory.
type WriteStart<'a> = dyn Fn(usize, &Path) -> Result<()> + 'a;

/// The adaptation's config as `summary.json` records it, to rebuild the model adapt started
/// from with adapt's own loader (Lambda at `lambda_init`, each task's layer from its expert).
/// Loaded as AdaMerging, which needs no label caches: the start is the same for both methods.
fn start_config(dir: &Path) -> Result<AdaptConfig> {
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not an adapt summary: {e}", path.display())))?;
    // JSON is YAML: the recorded config parses as a config file (its paths are absolute).
    let config = serde_json::to_string(&value["config"]).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut cfg = AdaptConfig::parse(&config, &path)?;
    cfg.method = Method::Adamerging;
    Ok(cfg)
}

impl Recorded {
    /// The dtype adapt stored the task models in (the baseline is stored alike); `None` for
    /// a summary that does not say, then the base's.
    fn out_dtype(&self) -> Result<Option<FloatDType>> {
        let Some(d) = self.summary.as_ref().and_then(|s| s.out_dtype.as_deref()) else { return Ok(None) };
        d.parse().map(Some).map_err(|e| Error::Invalid(format!("summary.json: out_dtype: {e}")))
    }

    /// `summary.json` of the adapt output `dir`, checked against the task names `opts` uses.
    fn read(dir: &Path, opts: &ReportOptions) -> Result<Self> {
        let summary_path = dir.join("summary.json");
        let text = std::fs::read_to_string(&summary_path).map_err(|e| Error::io(&summary_path, e))?;
        let recorded: Recorded = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not an adapt summary: {e}", summary_path.display())))?;
        let names: Vec<&str> = recorded.config.tasks.iter().map(|t| t.name.as_str()).collect();
        if let Some(unknown) = opts.data.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(Error::Invalid(format!(
                "--task-inputs names task `{unknown}`, which {} does not have (tasks: {})",
                dir.display(),
                names.join(", ")
            )));
        }
        for path in opts.data.values() {
            crate::input_file::require(path, crate::input_file::NamedBy::Arg("--task-inputs"))?;
        }
        if let Some(e) = recorded.config.tasks.iter().find_map(|t| super::config::check_task_name(&t.name).err()) {
            return Err(Error::Invalid(format!("{}: task name {e}", summary_path.display())));
        }
        if names.is_empty() {
            return Err(Error::Invalid(format!("{} records no tasks", summary_path.display())));
        }
        Ok(recorded)
    }
}

/// Scores each task's checkpoint (checked to be the one adapt wrote) and, when asked, its expert
/// and its starting model (written by `start` into a temporary directory) with `score` (model,
/// records, their file), and averages them.
fn score_tasks<R: TaskMetric>(
    dir: &Path,
    recorded: Recorded,
    opts: &ReportOptions,
    max_len: usize,
    score: impl Fn(&Path, &[Example], &Path) -> Result<R>,
    start: Option<&WriteStart>,
) -> Result<AdaptReport<R>> {
    let mut tasks = Vec::new();
    for t in &recorded.config.tasks {
        let data = opts.data.get(&t.name).unwrap_or(&t.inputs);
        let (examples, hash) = read_jsonl_hashed(data)?;
        if !opts.data.contains_key(&t.name) {
            check_task_inputs(&recorded, &t.name, data, (examples.len(), &hash))?;
        }
        let adapted_dir = dir.join("tasks").join(&t.name);
        if !adapted_dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: task `{}` has no checkpoint at {}",
                dir.display(),
                t.name,
                adapted_dir.display()
            )));
        }
        check_task_model(&recorded, &t.name, &adapted_dir)?;
        let adapted = score(&adapted_dir, &examples, data)?;
        let baseline = start.map(|write| score_start(write, tasks.len(), &t.name, |m| score(m, &examples, data)));
        let baseline = baseline.transpose()?;
        let expert = if opts.experts { Some(score(&t.expert, &examples, data)?) } else { None };
        let vs_baseline = baseline.as_ref().map(|b| format!(", baseline {}", b.brief())).unwrap_or_default();
        let vs_expert = expert.as_ref().map(|e| format!(", expert {}", e.brief())).unwrap_or_default();
        tracing::info!("{}: adapted {}{vs_baseline}{vs_expert}", t.name, adapted.brief());
        let (task, examples) = (t.name.clone(), examples.len());
        tasks.push(TaskScore { task, data: data.clone(), examples, adapted, baseline, expert });
    }
    let adapted: Vec<&R> = tasks.iter().map(|t| &t.adapted).collect();
    let baselines: Vec<&R> = tasks.iter().filter_map(|t| t.baseline.as_ref()).collect();
    let experts: Vec<&R> = tasks.iter().filter_map(|t| t.expert.as_ref()).collect();
    Ok(AdaptReport {
        output: dir.to_path_buf(),
        average_adapted: R::average(&adapted),
        average_baseline: start.map(|_| R::average(&baselines)),
        average_expert: opts.experts.then(|| R::average(&experts)),
        baseline_lambda: start.and(recorded.config.lambda_init),
        method: recorded.config.method,
        max_len,
        tasks,
    })
}

/// Task `task`'s starting model, written by `write` into a temporary directory (removed after),
/// scored by `score`.
fn score_start<R>(write: &WriteStart, task: usize, name: &str, score: impl Fn(&Path) -> Result<R>) -> Result<R> {
    let tmp = tempfile::Builder::new()
        .prefix("symerge-baseline-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let model = tmp.path().join(name);
    tracing::info!("{name}: writing the starting merge (baseline) into {}", model.display());
    write(task, &model)?;
    score(&model)
}

impl<R: TaskMetric> std::fmt::Display for AdaptReport<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.tasks.iter().map(|t| t.task.len()).max().unwrap_or(4).max(7);
        let adapted = Column { label: &self.method, width: 10 };
        let baseline = Column { label: "baseline", width: 10 };
        let expert = Column { label: "expert", width: 8 };
        write!(f, "{:<width$} {:>8}", "task", R::COUNTED)?;
        if self.average_baseline.is_some() {
            write!(f, "{}", R::header(baseline))?;
        }
        write!(f, "{}", R::header(adapted))?;
        if self.average_expert.is_some() {
            write!(f, "{}", R::header(expert))?;
        }
        writeln!(f)?;
        for t in &self.tasks {
            write!(f, "{:<width$} {:>8}", t.task, t.examples)?;
            if let Some(b) = &t.baseline {
                write!(f, "{}", b.cells(baseline))?;
            }
            write!(f, "{}", t.adapted.cells(adapted))?;
            if let Some(e) = &t.expert {
                write!(f, "{}", e.cells(expert))?;
            }
            writeln!(f)?;
        }
        write!(f, "{:<width$} {:>8}", "average", "")?;
        if let Some(b) = &self.average_baseline {
            write!(f, "{}", R::average_cells(b, baseline))?;
        }
        write!(f, "{}", R::average_cells(&self.average_adapted, adapted))?;
        if let Some(e) = &self.average_expert {
            write!(f, "{}", R::average_cells(e, expert))?;
        }
        writeln!(f)?;
        if self.average_baseline.is_some() {
            let lambda = self.baseline_lambda.map_or_else(|| "lambda_init".into(), |l| l.to_string());
            writeln!(
                f,
                "baseline: the merge adapt started from, training-free: base + {lambda} x the sum of the task \
                 vectors, each task with its expert's own layer"
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for AdaptEvalOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdaptEvalOutcome::Classifier(r) => r.fmt(f),
            AdaptEvalOutcome::Lm(r) => r.fmt(f),
        }
    }
}
