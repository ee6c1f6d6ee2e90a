//! Batched inference with a sequence classifier: `predict` (logits and probabilities per text)
//! and `evaluate` (accuracy and mean cross-entropy against gold labels).

use std::collections::BTreeMap;
use std::path::Path;

use super::bert::{Bert, LoadOptions};
use super::tokenize::TextTokenizer;
use crate::backend::Backend;
use crate::data::jsonl::Example;
use crate::error::{Error, Result};
use crate::logits::logsumexp;

/// Where a model's class names come from, for messages.
pub const LABEL2ID: &str = "config.json's label2id";

/// A model with its tokenizer.
pub struct SequenceClassifier<B: Backend> {
    pub model: Bert<B>,
    pub tokenizer: TextTokenizer,
}

impl<B: Backend> SequenceClassifier<B> {
    /// Loads the weights, `config.json` and `tokenizer.json` of a model directory; texts are
    /// truncated to `max_len` tokens.
    pub fn load(backend: B, path: &Path, max_len: usize, opts: LoadOptions) -> Result<Self> {
        let model = Bert::load(backend, path, opts)?;
        if max_len > model.config.max_seq_len() {
            return Err(Error::Invalid(format!(
                "maximum length {max_len} exceeds the {} positions of {}",
                model.config.max_seq_len(),
                path.display()
            )));
        }
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        let tokenizer = TextTokenizer::from_dir(dir, max_len)?;
        let c = &model.config;
        tokenizer.check_fits(&dir.join("config.json"), c.max_seq_len(), c.type_vocab_size)?;
        Ok(SequenceClassifier { model, tokenizer })
    }

    /// Class name -> index from `config.json`, if the model names its classes.
    pub fn label2id(&self) -> Option<&BTreeMap<String, usize>> {
        self.model.config.label2id.as_ref()
    }

    /// The classes labelled inputs are read against: config.json's.
    pub fn classes(&self) -> Classes<'_> {
        Classes { label2id: self.label2id(), n: self.model.num_labels().unwrap_or(0), source: LABEL2ID }
    }

    /// Class ids of labelled examples read from `path` (see [`label_ids`]).
    pub fn label_ids(&self, examples: &[Example], path: &Path) -> Result<Vec<usize>> {
        label_ids(examples, self.classes(), path)
    }
}

/// One text's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
    /// The predicted class's name from config.json's `id2label` / `label2id`, when it names them.
    pub label: Option<String>,
}

impl Prediction {
    /// The predicted class: the largest logit, the first on ties.
    pub fn class(&self) -> usize {
        crate::logits::argmax(&self.logits)
    }
}

/// What `predict` wrote (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictSummary {
    pub output: std::path::PathBuf,
    pub predictions: usize,
    pub seconds: f64,
}

/// Checks, before any work, that predictions may be written to `out`: never over `inputs` (the
/// model, the data), and over an existing file only with `force` and only when it is an earlier
/// predictions file (its first line has `logits`, `probs` and `pred`).
pub fn check_predictions_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    crate::atomic::check_output_apart(out, inputs)?;
    // What --force would refuse is refused for that reason first, so that its hint goes only
    // to an earlier predictions file.
    crate::atomic::check_output_file(out, "a predictions file", is_predictions_file)?;
    match std::fs::symlink_metadata(out) {
        Ok(_) if !force => Err(Error::OutputExists { path: out.to_path_buf() }),
        _ => Ok(()),
    }
}

/// Reads the first line only (at most 64 MiB): the check runs on any existing output.
fn is_predictions_file(path: &Path) -> bool {
    use std::io::{BufRead, Read};
    let Ok(file) = std::fs::File::open(path) else { return false };
    let mut first = String::new();
    if std::io::BufReader::new(file.take(64 << 20)).read_line(&mut first).is_err() {
        return false;
    }
    serde_json::from_str::<serde_json::Value>(&first)
        .is_ok_and(|v| ["logits", "probs", "pred"].iter().all(|k| v.get(k).is_some()))
}

/// Writes one JSON line per prediction (`logits`, `probs`, `pred`), atomically.
pub fn write_predictions(out: &Path, preds: &[Prediction]) -> Result<()> {
    let mut text = String::new();
    for p in preds {
        let mut row = serde_json::json!({ "logits": p.logits, "probs": p.probs, "pred": p.class() });
        if let Some(label) = &p.label {
            row["label"] = label.as_str().into();
        }
        text.push_str(&row.to_string());
        text.push('\n');
    }
    crate::atomic::write_atomic(out, text.as_bytes())
}

/// The classes labelled inputs are read against: a name -> id map where there is one, the
/// number of classes, and where the names come from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Classes<'a> {
    pub label2id: Option<&'a BTreeMap<String, usize>>,
    pub n: usize,
    /// "config.json's label2id", "the training set".
    pub source: &'a str,
}

/// Class ids of labelled examples read from `path`, by the one rule every command that reads
/// labels shares (eval, adapt, finetune): a label name is looked up in `classes` (so data files
/// and models may order classes differently) and a `label_id` beside it must agree; a bare id is
/// taken as is. Every id must be in range. Errors name the file and line.
pub fn label_ids(examples: &[Example], classes: Classes, path: &Path) -> Result<Vec<usize>> {
    let err = |i: usize, reason: String| Error::BadLine { path: path.to_path_buf(), line: i + 1, reason };
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let id = class_of(ex, classes).map_err(|reason| err(i, reason))?;
            if id >= classes.n {
                return Err(err(i, format!("label {id} is outside the model's {} classes", classes.n)));
            }
            Ok(id)
        })
        .collect()
}

/// One example's class id under `classes`; the error is the reason, without file or line.
fn class_of(ex: &Example, classes: Classes) -> std::result::Result<usize, String> {
    match (&ex.label, classes.label2id, ex.label_id) {
        (Some(name), Some(map), id) => {
            let &k = map.get(name).ok_or_else(|| {
                let mut known: Vec<(usize, &str)> = map.iter().map(|(name, &id)| (id, name.as_str())).collect();
                known.sort_unstable();
                let known: Vec<&str> = known.into_iter().map(|(_, name)| name).collect();
                let name = crate::error::excerpt(name);
                format!("unknown label `{name}` (classes in {}, in class order: {})", classes.source, known.join(", "))
            })?;
            match id {
                Some(id) if id != k => {
                    let name = crate::error::excerpt(name);
                    Err(format!("`label_id` {id} disagrees with {}, where `{name}` is class {k}", classes.source))
                }
                _ => Ok(k),
            }
        }
        (_, _, Some(id)) => Ok(id),
        (Some(name), None, None) => Err(format!(
            "unknown label `{}`: config.json has no label2id, so labels must be class indices",
            crate::error::excerpt(name)
        )),
        (None, _, None) => Err("missing the `label` field".into()),
    }
}

/// Logits and softmax probabilities for every text, in input order. Texts are batched by token
/// length so little compute goes to padding; padding never changes a result.
pub fn predict<B: Backend, S: AsRef<str>>(
    clf: &SequenceClassifier<B>,
    texts: &[S],
    batch_size: usize,
) -> Result<Vec<Prediction>> {
    predict_from(clf, texts, batch_size, 0)
}

/// A classifier reads its first token's output: a text without tokens (empty, under a tokenizer
/// that adds no [CLS]) has none. Texts are numbered from 1 after `first` earlier ones.
pub fn require_tokens(toks: &[crate::model::tokenize::Tokens], first: usize) -> Result<()> {
    match toks.iter().position(|t| t.ids.is_empty()) {
        None => Ok(()),
        Some(i) => Err(Error::Invalid(format!(
            "text {} has no tokens: it is empty (or holds only what the tokenizer drops) and the tokenizer adds \
             no [CLS]; a classifier needs at least one token per text",
            first + i + 1
        ))),
    }
}

/// [`predict`] of texts that follow `first` others (for messages naming a text).
pub fn predict_from<B: Backend, S: AsRef<str>>(
    clf: &SequenceClassifier<B>,
    texts: &[S],
    batch_size: usize,
    first: usize,
) -> Result<Vec<Prediction>> {
    if batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    let model = &clf.model;
    let be = &model.backend;
    let n_labels = model
        .num_labels()
        .ok_or_else(|| Error::Model { path: model.path.clone(), reason: "no classification head".into() })?;
    let names = class_names(clf.label2id());
    let toks = clf.tokenizer.tokenize(texts)?;
    require_tokens(&toks, first)?;
    let mut order: Vec<usize> = (0..toks.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(toks[i].ids.len()));
    let mut out: Vec<Option<Prediction>> = vec![None; toks.len()];
    for (bi, chunk) in order.chunks(batch_size).enumerate() {
        let enc = clf.tokenizer.pad(&chunk.iter().map(|&i| &toks[i]).collect::<Vec<_>>());
        let batch = model.batch(&enc)?;
        let logits = model.logits(&batch)?;
        let probs = be.softmax(&logits, None, enc.batch, n_labels, 1)?;
        let (logits, probs) = (be.download(&logits)?, be.download(&probs)?);
        for (j, &i) in chunk.iter().enumerate() {
            let r = j * n_labels..(j + 1) * n_labels;
            let (logits, probs) = (logits[r.clone()].to_vec(), probs[r].to_vec());
            if let Some(x) = logits.iter().find(|x| !x.is_finite()) {
                return Err(Error::Model { path: model.path.clone(), reason: not_finite(i, *x) });
            }
            let label = names.get(crate::logits::argmax(&logits)).cloned();
            out[i] = Some(Prediction { logits, probs, label });
        }
        tracing::debug!("batch {bi}: {} texts x {} tokens", enc.batch, enc.seq);
    }
    out.into_iter().map(|p| p.ok_or_else(|| Error::Invalid("a text got no prediction".into()))).collect()
}

/// Why text `i` (0-based) gets no prediction: a logit of `x`. Fuzzing round 5: a model finetuned
/// at `--lr 1e30` scored a NaN loss with rc 0.
fn not_finite(i: usize, x: f32) -> String {
    format!(
        "text {} of the input: a logit is {x}, not a finite number; the weights make the activations \
         overflow (a model trained with too high a learning rate?)",
        i + 1
    )
}

/// Class names in id order (empty when the config names no classes); `label2id` holds ids 0 to
/// n - 1, each once, as the config loader checked.
fn class_names(label2id: Option<&BTreeMap<String, usize>>) -> Vec<String> {
    let Some(map) = label2id else { return Vec::new() };
    let mut names = vec![String::new(); map.len()];
    for (name, &id) in map {
        if let Some(slot) = names.get_mut(id) {
            *slot = name.clone();
        }
    }
    names
}

/// Accuracy and mean cross-entropy over a labelled set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub accuracy: f64,
    pub mean_ce: f64,
}

/// Scores `texts` against class indices `labels`.
pub fn evaluate<B: Backend, S: AsRef<str>>(
    clf: &SequenceClassifier<B>,
    texts: &[S],
    labels: &[usize],
    batch_size: usize,
) -> Result<EvalReport> {
    if texts.len() != labels.len() {
        return Err(Error::Invalid(format!("{} texts but {} labels", texts.len(), labels.len())));
    }
    if texts.is_empty() {
        return Err(Error::Invalid("nothing to evaluate: no examples".into()));
    }
    let n_labels = clf.model.num_labels().unwrap_or(0);
    if let Some((i, &y)) = labels.iter().enumerate().find(|&(_, &y)| y >= n_labels) {
        return Err(Error::Invalid(format!("example {i}: label {y} is outside the model's {n_labels} classes")));
    }
    let preds = predict(clf, texts, batch_size)?;
    let mut correct = 0usize;
    let mut ce = 0f64;
    for (p, &y) in preds.iter().zip(labels) {
        correct += usize::from(p.class() == y);
        ce += logsumexp(&p.logits) - p.logits[y] as f64;
    }
    let n = labels.len() as f64;
    Ok(EvalReport { examples: labels.len(), accuracy: correct as f64 / n, mean_ce: ce / n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(label: Option<&str>, id: Option<usize>) -> Example {
        Example { text: "t".into(), label: label.map(String::from), label_id: id }
    }

    /// Fuzzing round 4: eval took the name and ignored a `label_id` that disagreed with it.
    #[test]
    fn a_label_id_must_agree_with_the_name() {
        let map: BTreeMap<String, usize> = [("x".to_string(), 0), ("y".to_string(), 1)].into();
        let classes = Classes { label2id: Some(&map), n: 2, source: LABEL2ID };
        let path = Path::new("d.jsonl");
        let ok = [ex(Some("y"), Some(1)), ex(Some("x"), None), ex(None, Some(1))];
        assert_eq!(label_ids(&ok, classes, path).unwrap(), [1, 0, 1]);
        let clash = [ex(Some("y"), None), ex(Some("x"), Some(1))];
        let e = label_ids(&clash, classes, path).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl: line 2: `label_id` 1 disagrees with config.json's label2id, where `x` is class 0"),
            "{e}"
        );
        // Without a label2id there is nothing to compare against: the id is taken.
        let bare = Classes { label2id: None, ..classes };
        assert_eq!(label_ids(&clash[1..], bare, path).unwrap(), [1]);
        let e = label_ids(&[ex(None, Some(2))], classes, path).unwrap_err().to_string();
        assert!(e.contains("label 2 is outside the model's 2 classes"), "{e}");
    }
}
