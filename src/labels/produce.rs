//! `symerge cache-labels`: runs one expert over its task's inputs once and stores its soft labels,
//! so adaptation never needs the expert loaded again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::cache::{CacheWriter, LabelCache, LabelKind, Provenance};
use super::fingerprint::{checkpoint_hash, file_hash, texts_hash};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::{LoadOptions, SequenceClassifier, predict};

/// Inputs per flush to the cache file: what a killed run loses at most.
const ROWS_PER_FLUSH: usize = 256;

/// What to cache.
#[derive(Debug, Clone)]
pub struct CacheLabelsOptions {
    pub expert: PathBuf,
    pub task: String,
    pub output: PathBuf,
    pub batch_size: usize,
    pub max_len: usize,
    /// Rebuild an existing cache made for other inputs or another expert instead of failing.
    pub force: bool,
}

/// Account of a `cache-labels` run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct CacheLabelsSummary {
    pub output: PathBuf,
    pub rows: usize,
    pub classes: usize,
    /// The cache already existed for exactly these inputs and this expert: nothing was run.
    pub reused: bool,
    /// Rows found in a partial cache from an interrupted run.
    pub resumed_rows: usize,
    pub seconds: f64,
}

/// The provenance a cache for `texts` from `expert` must carry.
pub fn provenance<S: AsRef<str>>(expert: &Path, task: &str, max_len: usize, texts: &[S]) -> Result<Provenance> {
    let ckpt = Checkpoint::open(expert)?;
    let tokenizer = ckpt.dir.join("tokenizer.json");
    Ok(Provenance {
        task: task.to_string(),
        expert_hash: checkpoint_hash(&ckpt),
        tokenizer_hash: file_hash(&tokenizer, &format!("max_len={max_len}"))?,
        inputs_hash: texts_hash(texts),
    })
}

/// Writes (or reuses, or resumes) the soft-label cache of `texts` under `opts.expert`.
pub fn cache_labels<B: Backend, S: AsRef<str>>(
    backend: B,
    texts: &[S],
    opts: &CacheLabelsOptions,
) -> Result<CacheLabelsSummary> {
    let start = Instant::now();
    if texts.is_empty() {
        return Err(Error::Invalid(format!("no inputs to label for task `{}`", opts.task)));
    }
    let prov = provenance(&opts.expert, &opts.task, opts.max_len, texts)?;
    if opts.output.exists() {
        match LabelCache::open(&opts.output, Some(&prov)) {
            Ok(cache) => {
                tracing::info!("{} already holds these labels; reusing it", opts.output.display());
                return Ok(CacheLabelsSummary {
                    output: opts.output.clone(),
                    rows: cache.rows(),
                    classes: cache.classes(),
                    reused: true,
                    resumed_rows: 0,
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            Err(e) if !opts.force => return Err(e),
            Err(e) => tracing::warn!("rebuilding: {e}"),
        }
    }
    let clf = SequenceClassifier::load(backend, &opts.expert, opts.max_len, LoadOptions::default())?;
    let classes = clf.model.num_labels().ok_or_else(|| Error::Model {
        path: opts.expert.clone(),
        reason: "no classification head (classifier.weight): an expert must be a fine-tuned classifier".into(),
    })?;
    let labels = clf.model.config.label_names().unwrap_or_default();
    let mut writer =
        CacheWriter::create(&opts.output, prov, LabelKind::Classification { classes }, texts.len(), labels)?;
    let resumed_rows = writer.rows_written();
    let mut done = resumed_rows;
    while done < texts.len() {
        let end = (done + ROWS_PER_FLUSH).min(texts.len());
        let preds = predict(&clf, &texts[done..end], opts.batch_size)?;
        let probs: Vec<f32> = preds.iter().flat_map(|p| p.probs.iter().copied()).collect();
        let logits: Vec<f32> = preds.iter().flat_map(|p| p.logits.iter().copied()).collect();
        writer.append_classification(&probs, &logits)?;
        writer.flush()?;
        done = end;
        tracing::info!("cache-labels {}: {done}/{} inputs", opts.task, texts.len());
    }
    let output = writer.finish()?;
    Ok(CacheLabelsSummary {
        output,
        rows: texts.len(),
        classes,
        reused: false,
        resumed_rows,
        seconds: start.elapsed().as_secs_f64(),
    })
}
