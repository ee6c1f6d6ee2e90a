//! `symerge eval ADAPT_OUTPUT`: scores every task of an adaptation's output directory in one
//! call — each task's own checkpoint (`tasks/<task>/`: the merged encoder with the task's adapted
//! layer) and, for comparison, that task's expert — on the task's labelled data.
//!
//! The tasks, their experts and their inputs come from the `config` that `summary.json` records,
//! so the default data is what the adaptation saw (the test-time setting: its unlabelled inputs
//! are the labelled test texts without their labels). Other data can be named per task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::jsonl::read_jsonl;
use crate::error::{Error, Result};
use crate::model::{EvalReport, LoadOptions, SequenceClassifier, evaluate};

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
}

/// One task's scores.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub data: PathBuf,
    pub examples: usize,
    /// The task's adapted checkpoint (`tasks/<task>/`).
    pub adapted: EvalReport,
    /// The task's expert, when asked for.
    pub expert: Option<EvalReport>,
}

/// Every task's scores and their averages (accuracy in [0, 1], unweighted mean over tasks).
#[derive(Debug, Clone, Serialize)]
pub struct AdaptReport {
    pub output: PathBuf,
    pub method: String,
    /// The truncation the scores used: `--max-len`, else the adaptation's own.
    pub max_len: usize,
    pub tasks: Vec<TaskScore>,
    pub average_adapted: f64,
    pub average_expert: Option<f64>,
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
}

#[derive(Deserialize)]
struct RecordedReport {
    name: String,
    model_hash: Option<String>,
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

#[derive(Deserialize)]
struct RecordedConfig {
    method: String,
    tasks: Vec<RecordedTask>,
    max_len: Option<usize>,
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

/// Scores every task of the adaptation output `dir` (see the module notes).
pub fn evaluate_adapted<B: Backend + Clone>(backend: B, dir: &Path, opts: &ReportOptions) -> Result<AdaptReport> {
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
    if let Some(e) = recorded.config.tasks.iter().find_map(|t| super::config::check_task_name(&t.name).err()) {
        return Err(Error::Invalid(format!("{}: task name {e}", summary_path.display())));
    }
    let max_len = opts.max_len.or(recorded.config.max_len).unwrap_or(crate::model::DEFAULT_MAX_LEN);
    let mut tasks = Vec::new();
    for t in &recorded.config.tasks {
        let data = opts.data.get(&t.name).unwrap_or(&t.inputs);
        let examples = read_jsonl(data)?;
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let score = |model: &Path| -> Result<EvalReport> {
            let clf = SequenceClassifier::load(backend.clone(), model, max_len, LoadOptions::default())?;
            if clf.model.num_labels().is_none() {
                return Err(Error::Invalid(format!("{} has no classification head", model.display())));
            }
            let labels = clf.label_ids(&examples, data)?;
            evaluate(&clf, &texts, &labels, opts.batch_size)
        };
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
        let adapted = score(&adapted_dir)?;
        let expert = if opts.experts { Some(score(&t.expert)?) } else { None };
        tracing::info!(
            "{}: adapted {:.2}%{}",
            t.name,
            100.0 * adapted.accuracy,
            expert.as_ref().map(|e| format!(", expert {:.2}%", 100.0 * e.accuracy)).unwrap_or_default()
        );
        tasks.push(TaskScore { task: t.name.clone(), data: data.clone(), examples: examples.len(), adapted, expert });
    }
    if tasks.is_empty() {
        return Err(Error::Invalid(format!("{} records no tasks", summary_path.display())));
    }
    let n = tasks.len() as f64;
    let average_adapted = tasks.iter().map(|t| t.adapted.accuracy).sum::<f64>() / n;
    let average_expert =
        opts.experts.then(|| tasks.iter().filter_map(|t| t.expert.as_ref()).map(|e| e.accuracy).sum::<f64>() / n);
    Ok(AdaptReport {
        output: dir.to_path_buf(),
        method: recorded.config.method,
        max_len,
        tasks,
        average_adapted,
        average_expert,
    })
}

impl std::fmt::Display for AdaptReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.tasks.iter().map(|t| t.task.len()).max().unwrap_or(4).max(7);
        let expert_col = self.average_expert.is_some();
        write!(f, "{:<width$} {:>8} {:>10}", "task", "examples", self.method)?;
        if expert_col {
            write!(f, " {:>8}", "expert")?;
        }
        writeln!(f)?;
        for t in &self.tasks {
            write!(f, "{:<width$} {:>8} {:>9.2}%", t.task, t.examples, 100.0 * t.adapted.accuracy)?;
            if let Some(e) = &t.expert {
                write!(f, " {:>7.2}%", 100.0 * e.accuracy)?;
            }
            writeln!(f)?;
        }
        write!(f, "{:<width$} {:>8} {:>9.2}%", "average", "", 100.0 * self.average_adapted)?;
        if let Some(e) = self.average_expert {
            write!(f, " {:>7.2}%", 100.0 * e)?;
        }
        writeln!(f)
    }
}
