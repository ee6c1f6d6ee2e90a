//! `symerge cache-labels`: runs one expert over its task's inputs once and stores its soft labels,
//! so adaptation never needs the expert loaded again.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::cache::{CacheWriter, LabelCache, LabelKind, Provenance, encode_classification};
use super::fingerprint::{checkpoint_hash, file_hash, texts_hash};
use crate::atomic::write_atomic;
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::dist::data_parallel::shard_range;
use crate::dist::{Collective, Single};
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
    cache_labels_in(backend, texts, opts, &mut Single)
}

/// [`cache_labels`] as one rank of several: the rows are cut into the batches one process would
/// run, and each rank runs its contiguous [`shard_range`] of those batches, so every row is
/// computed in the same batch as alone and the cache is byte-identical to a one-process one.
/// Each rank writes its rows to `<output>.part-<rank>-of-<world>` (atomically); after a
/// barrier rank 0 stitches the parts in rank order into the cache (checksummed and renamed into
/// place as always) and removes them; a second barrier makes every rank return only once the
/// cache exists. The reader only ever sees the one finished file. A multi-rank run does not
/// resume a killed run; it recomputes the parts.
pub fn cache_labels_in<B: Backend, S: AsRef<str>>(
    backend: B,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
) -> Result<CacheLabelsSummary> {
    let result = cache_labels_ranked(backend, texts, opts, coll);
    if let Err(e) = &result {
        coll.abort(&e.to_string());
    }
    result
}

fn cache_labels_ranked<B: Backend, S: AsRef<str>>(
    backend: B,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
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
    if coll.world_size() > 1 {
        let output = stitch_ranks(&clf, texts, opts, coll, prov, classes, labels)?;
        return Ok(CacheLabelsSummary {
            output,
            rows: texts.len(),
            classes,
            reused: false,
            resumed_rows: 0,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
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

/// The batches one process runs, in order: [`ROWS_PER_FLUSH`] rows at a time, each cut into
/// `batch_size` pieces.
fn batches(rows: usize, batch_size: usize) -> Vec<Range<usize>> {
    let bs = batch_size.max(1);
    let mut out = Vec::new();
    for chunk in (0..rows).step_by(ROWS_PER_FLUSH) {
        let end = (chunk + ROWS_PER_FLUSH).min(rows);
        out.extend((chunk..end).step_by(bs).map(|s| s..(s + bs).min(end)));
    }
    out
}

/// Where rank `rank` of `world` leaves its rows.
pub fn part_path(output: &Path, rank: usize, world: usize) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(format!(".part-{rank}-of-{world}"));
    PathBuf::from(p)
}

/// This rank's share of the cache, then (rank 0) the stitched cache; see [`cache_labels_in`].
fn stitch_ranks<B: Backend, S: AsRef<str>>(
    clf: &SequenceClassifier<B>,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
    prov: Provenance,
    classes: usize,
    labels: Vec<String>,
) -> Result<PathBuf> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let all = batches(texts.len(), opts.batch_size);
    let mine = &all[shard_range(all.len(), rank, world)];
    let mut bytes = Vec::new();
    for (i, b) in mine.iter().enumerate() {
        let preds = predict(clf, &texts[b.clone()], opts.batch_size)?;
        let probs: Vec<f32> = preds.iter().flat_map(|p| p.probs.iter().copied()).collect();
        let logits: Vec<f32> = preds.iter().flat_map(|p| p.logits.iter().copied()).collect();
        bytes.extend(
            encode_classification(&probs, &logits, classes)
                .map_err(|reason| Error::LabelCache { path: opts.output.clone(), reason })?,
        );
        if (i + 1) % 8 == 0 || i + 1 == mine.len() {
            tracing::info!("cache-labels {} rank {rank}/{world}: {}/{} batches", opts.task, i + 1, mine.len());
        }
    }
    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic(&part_path(&opts.output, rank, world), &bytes)?;
    coll.barrier()?;
    if rank == 0 {
        let mut writer =
            CacheWriter::create(&opts.output, prov, LabelKind::Classification { classes }, texts.len(), labels)?;
        for r in 0..world {
            let part = part_path(&opts.output, r, world);
            let rows: usize = all[shard_range(all.len(), r, world)].iter().map(|b| b.len()).sum();
            let data = std::fs::read(&part).map_err(|e| Error::io(&part, e))?;
            if data.len() != rows * writer.row_bytes() {
                return Err(Error::LabelCache {
                    path: part,
                    reason: format!("rank {r}'s part has {} bytes, expected {rows} rows", data.len()),
                });
            }
            writer.append_encoded(&data)?;
        }
        writer.finish()?;
        for r in 0..world {
            let part = part_path(&opts.output, r, world);
            std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
        }
    }
    coll.barrier()?;
    Ok(opts.output.clone())
}
