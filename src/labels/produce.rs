//! `symerge cache-labels`: runs one expert over its task's inputs once and stores its soft labels,
//! so adaptation never needs the expert loaded again. A sequence classifier gets a classification
//! cache; a causal LM (by its `config.json`) a top-k cache of its next-token distributions.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::cache::{
    CACHE_KIND, CacheWriter, LabelCache, LabelKind, Provenance, encode_classification, encode_topk, is_label_cache,
};
use super::fingerprint::{checkpoint_hash, file_hash, texts_hash};
use crate::atomic::write_atomic;
use crate::backend::{Backend, Device};
use crate::checkpoint::Checkpoint;
use crate::data::jsonl::read_jsonl;
use crate::dist::data_parallel::shard_range;
use crate::dist::{Collective, ConnectOptions, Single};
use crate::error::{Error, Result};
use crate::model::tokenize::Tokens;
use crate::model::{CausalLm, DEFAULT_MAX_LEN, LlamaConfig, LmArch, LmKind, LoadOptions, SequenceClassifier};

/// Inputs per flush to the cache file: what a killed run loses at most.
const ROWS_PER_FLUSH: usize = 256;

/// Default number of next tokens a causal LM's cache keeps per position.
pub const DEFAULT_TOP_K: usize = 64;

/// What to cache; also `symerge cache-labels`' flags (their defaults are
/// [`CacheLabelsOptions::new`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct CacheLabelsOptions {
    /// The expert: a fine-tuned sequence classifier directory, or a causal LM (Llama, Mistral,
    /// Qwen2, GPT-2), whose cache keeps the top-k next tokens of every predicted position.
    #[arg(long)]
    pub expert: PathBuf,
    /// Task name recorded in the cache (checked by `adapt`).
    #[arg(long)]
    pub task: String,
    /// The cache file.
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = crate::model::infer::parse_batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: usize,
    /// Rebuild a cache made for another expert or other inputs instead of failing (only a
    /// label cache is ever replaced; any other file is refused).
    #[arg(long)]
    pub force: bool,
    /// Causal LM experts: next tokens kept per position (capped at the vocabulary).
    #[arg(long, default_value_t = DEFAULT_TOP_K)]
    pub top_k: usize,
}

/// Texts per forward pass unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

impl CacheLabelsOptions {
    /// The defaults: batches of 32, 128 tokens, the top 64 next tokens, no rebuilding.
    pub fn new(expert: impl Into<PathBuf>, task: impl Into<String>, output: impl Into<PathBuf>) -> Self {
        CacheLabelsOptions {
            expert: expert.into(),
            task: task.into(),
            output: output.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            max_len: DEFAULT_MAX_LEN,
            force: false,
            top_k: DEFAULT_TOP_K,
        }
    }
}

/// `symerge cache-labels`' arguments: the [`CacheLabelsOptions`], the inputs they label, the
/// launcher's ranks and where the math runs.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheLabelsArgs {
    #[command(flatten)]
    pub opts: CacheLabelsOptions,
    /// JSONL with a `text` field per line (labels, if any, are ignored).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Split the rows over the launcher's ranks; rank 0 stitches the parts into one cache.
    #[command(flatten)]
    pub dist: ConnectOptions,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
    /// launcher the GPU of LOCAL_RANK), cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

impl CacheLabelsArgs {
    /// The defaults: [`CacheLabelsOptions::new`], `--device auto`, one process unless a
    /// launcher says otherwise.
    pub fn new(opts: CacheLabelsOptions, inputs: impl Into<PathBuf>) -> Self {
        CacheLabelsArgs { opts, inputs: inputs.into(), dist: ConnectOptions::default(), device: Device::Auto }
    }

    /// Reads the inputs' texts, joins the launcher's ranks and caches this rank's share (see
    /// [`cache_labels_in`]).
    pub fn run(&self) -> Result<CacheLabelsSummary> {
        use crate::input_file::{NamedBy, require};
        require(&self.opts.expert, NamedBy::Arg("--expert"))?;
        require(&self.inputs, NamedBy::Arg("--inputs"))?;
        crate::atomic::check_output_apart(&self.opts.output, &[&self.opts.expert, &self.inputs])?;
        self.dist.check_apart(&self.opts.output, &[&self.opts.expert, &self.inputs])?;
        let texts: Vec<String> = read_jsonl(&self.inputs)?.into_iter().map(|e| e.text).collect();
        let summary = format!("cache-labels -o {}", self.opts.output.display());
        let settings = format!("{:?} {}", self.opts, self.inputs.display());
        let run = crate::dist::run_fingerprint(&summary, &[settings.as_bytes()]);
        let (info, mut coll) = self.dist.connect_from_env(&run)?;
        let cached = crate::with_backend!(self.device, |be| cache_labels_in(be, &texts, &self.opts, coll.as_mut()));
        cached.map_err(|e| info.tag(e))
    }
}

/// Account of a `cache-labels` run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct CacheLabelsSummary {
    pub output: PathBuf,
    pub rows: usize,
    /// Classes of a classification cache (0 for a top-k cache).
    pub classes: usize,
    /// Top-k caches: tokens kept per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Top-k caches: predicted positions over all inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positions: Option<usize>,
    /// The cache already existed for exactly these inputs and this expert: nothing was run.
    pub reused: bool,
    /// Rows found in a partial cache from an interrupted run.
    pub resumed_rows: usize,
    pub seconds: f64,
}

/// What besides `tokenizer.json` decides a text's tokens: the truncation length, and the side
/// cut when it is not the default (so caches made before it was read stay valid).
fn tokenizer_settings(tokenizer: &Path, max_len: usize) -> Result<String> {
    Ok(match crate::model::tokenize::truncation_side(tokenizer)? {
        tokenizers::TruncationDirection::Left => format!("max_len={max_len},truncation_side=left"),
        tokenizers::TruncationDirection::Right => format!("max_len={max_len}"),
    })
}

/// The provenance a cache for `texts` from `expert` must carry.
pub fn provenance<S: AsRef<str>>(expert: &Path, task: &str, max_len: usize, texts: &[S]) -> Result<Provenance> {
    let ckpt = Checkpoint::open(expert)?;
    let tokenizer = ckpt.dir.join("tokenizer.json");
    Ok(Provenance {
        task: task.to_string(),
        expert_hash: checkpoint_hash(&ckpt),
        tokenizer_hash: file_hash(&tokenizer, &tokenizer_settings(&tokenizer, max_len)?)?,
        inputs_hash: texts_hash(texts),
        max_len: Some(max_len),
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

/// Refuses an output name too long for the files the cache is built in: its `.partial` and, on
/// several ranks, each rank's part.
fn check_output_name(output: &Path, world: usize) -> Result<()> {
    crate::atomic::check_staged_name(output, super::cache::partial_path)?;
    if world > 1 {
        crate::atomic::check_staged_name(output, |o| part_path(o, world - 1, world))?;
    }
    Ok(())
}

fn cache_labels_ranked<B: Backend, S: AsRef<str>>(
    backend: B,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
) -> Result<CacheLabelsSummary> {
    let start = Instant::now();
    crate::atomic::check_output_apart(&opts.output, &[opts.expert.as_path()])?;
    check_output_name(&opts.output, coll.world_size())?;
    if opts.output.exists()
        && let Err(Error::NotAFile { kind, .. }) = crate::input_file::check_regular(&opts.output)
    {
        return Err(Error::LabelCache {
            path: opts.output.clone(),
            reason: format!("is {kind}, not a cache file; choose another output path (--force replaces only a cache)"),
        });
    }
    // Without --force an existing file is only ever reused or refused below; with it, only a
    // cache of ours may be rebuilt over.
    if opts.force {
        crate::atomic::check_output_file(&opts.output, CACHE_KIND, is_label_cache)?;
    }
    if texts.is_empty() {
        return Err(Error::Invalid(format!("no inputs to label for task `{}`", opts.task)));
    }
    // The name must be one adapt accepts: it names the task's output directory there.
    crate::adapt::config::check_task_name(&opts.task).map_err(|e| Error::Invalid(format!("--task: {e}")))?;
    let prov = provenance(&opts.expert, &opts.task, opts.max_len, texts)?;
    let summary = |cache: &LabelCache, reused: bool, resumed_rows: usize| {
        let (top_k, positions) = match cache.kind() {
            LabelKind::TopK { k, .. } => (Some(k), cache.header.positions),
            LabelKind::Classification { .. } => (None, None),
        };
        CacheLabelsSummary {
            output: opts.output.clone(),
            rows: cache.rows(),
            classes: cache.classes(),
            top_k,
            positions,
            reused,
            resumed_rows,
            seconds: start.elapsed().as_secs_f64(),
        }
    };
    if opts.output.exists() {
        let opened = LabelCache::open(&opts.output, Some(&prov)).and_then(|cache| match cache.kind() {
            LabelKind::TopK { k, vocab } if k != opts.top_k.min(vocab) => Err(Error::LabelCache {
                path: opts.output.clone(),
                reason: format!("holds the top {k} tokens per position, this run asks for {}", opts.top_k.min(vocab)),
            }),
            _ => Ok(cache),
        });
        match opened {
            Ok(cache) => {
                tracing::info!("{} already holds these labels; reusing it", opts.output.display());
                return Ok(summary(&cache, true, 0));
            }
            Err(Error::LabelCache { path, reason }) if !opts.force && !reason.contains("--force") => {
                return Err(Error::LabelCache { path, reason: format!("{reason}; pass --force to rebuild it") });
            }
            Err(e) if !opts.force => return Err(e),
            Err(e) => tracing::warn!("rebuilding: {e}"),
        }
    }
    let (output, resumed_rows) = match LmKind::of_dir(&opts.expert)? {
        Some(kind) => crate::with_lm_arch!(kind, A => {
            write_labels(&Labeller::<B, A>::load_lm(backend, texts, opts)?, texts, opts, coll, prov)?
        }),
        None => write_labels(&Labeller::<B>::load_classifier(backend, opts)?, texts, opts, coll, prov)?,
    };
    Ok(summary(&LabelCache::open(&output, None)?, false, resumed_rows))
}

/// Runs `labeller` over `texts` into the cache (resuming a partial one, or as one rank of
/// several): the cache's path and the rows a partial cache already held.
fn write_labels<B: Backend, A: LmArch<B>, S: AsRef<str>>(
    labeller: &Labeller<B, A>,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
    prov: Provenance,
) -> Result<(PathBuf, usize)> {
    if coll.world_size() > 1 {
        return Ok((stitch_ranks(labeller, texts, opts, coll, prov)?, 0));
    }
    let mut writer = labeller.writer(&opts.output, prov, texts.len())?;
    let opts = &resumed_options(&mut writer, opts)?;
    let resumed_rows = writer.rows_resumed();
    let mut done = writer.rows_written();
    while done < texts.len() {
        // From the start of the flush: a run killed inside one resumes with the batches a
        // whole run computes (the rows before `done` are recomputed, then dropped).
        let from = done - done % ROWS_PER_FLUSH;
        let end = (from + ROWS_PER_FLUSH).min(texts.len());
        let bytes = labeller.label(texts, from..end, opts)?;
        writer.append_encoded(&bytes[labeller.units(from..done) * writer.row_bytes()..])?;
        writer.flush()?;
        done = end;
        tracing::info!("cache-labels {}: {done}/{} inputs", opts.task, texts.len());
    }
    Ok((writer.finish()?, resumed_rows))
}

/// `opts` with the batch size the cache is computed in: the one a resumed partial file was
/// started with (said when `--batch-size` differs), else the asked one, recorded.
fn resumed_options(writer: &mut CacheWriter, opts: &CacheLabelsOptions) -> Result<CacheLabelsOptions> {
    let batch_size = writer.batch_size(opts.batch_size)?;
    if batch_size != opts.batch_size {
        tracing::info!(
            "{}: resuming in batches of {batch_size}, as it was started (not --batch-size {}: the rows would \
             differ by float rounding)",
            opts.output.display(),
            opts.batch_size
        );
    }
    Ok(CacheLabelsOptions { batch_size, ..opts.clone() })
}

/// The expert that makes the labels.
enum Labeller<B: Backend, A: LmArch<B> = LlamaConfig> {
    Classifier {
        clf: SequenceClassifier<B>,
        classes: usize,
        labels: Vec<String>,
    },
    /// A causal LM with every input tokenized up front (the cache's offset table needs each
    /// input's positions before the first record).
    Lm {
        lm: CausalLm<B, A>,
        k: usize,
        tokens: Vec<Tokens>,
    },
}

impl<B: Backend, A: LmArch<B>> Labeller<B, A> {
    fn load_lm<S: AsRef<str>>(backend: B, texts: &[S], opts: &CacheLabelsOptions) -> Result<Self> {
        if opts.top_k == 0 {
            return Err(Error::Invalid("--top-k must be at least 1".into()));
        }
        let lm = CausalLm::<B, A>::load(backend, &opts.expert, opts.max_len)?;
        let k = opts.top_k.min(lm.model.vocab());
        let tokens = lm.tokenizer.tokenize(texts)?;
        if tokens.iter().all(|t| t.ids.len() < 2) {
            return Err(Error::Invalid(format!(
                "no next-token positions to label for task `{}`: every input has fewer than two tokens",
                opts.task
            )));
        }
        Ok(Labeller::Lm { lm, k, tokens })
    }

    fn load_classifier(backend: B, opts: &CacheLabelsOptions) -> Result<Self> {
        let clf = SequenceClassifier::load(backend, &opts.expert, opts.max_len, LoadOptions::default())?;
        let classes = clf.model.num_labels().ok_or_else(|| Error::Model {
            path: opts.expert.clone(),
            reason: "no classification head (classifier.weight): an expert must be a fine-tuned classifier or a \
                     causal LM"
                .into(),
        })?;
        let labels = clf.model.config.label_names().unwrap_or_default();
        // A classifier's row holds every class: a --top-k given for it changes nothing
        // (fuzzing round 6: silently ignored). 64, the default, cannot be told from unset.
        if opts.top_k != DEFAULT_TOP_K {
            tracing::warn!(
                "--top-k {} has no effect: {} is a classifier, whose cache holds all {classes} classes per input",
                opts.top_k,
                opts.expert.display()
            );
        }
        Ok(Labeller::Classifier { clf, classes, labels })
    }

    fn writer(&self, output: &Path, prov: Provenance, rows: usize) -> Result<CacheWriter> {
        match self {
            Labeller::Classifier { classes, labels, .. } => {
                CacheWriter::create(output, prov, LabelKind::Classification { classes: *classes }, rows, labels.clone())
            }
            Labeller::Lm { lm, k, tokens } => {
                let positions: Vec<usize> = tokens.iter().map(|t| t.ids.len().saturating_sub(1)).collect();
                CacheWriter::create_topk(output, prov, *k, lm.model.vocab(), &positions)
            }
        }
    }

    /// Cache units (rows or positions) of inputs `rows`.
    fn units(&self, rows: Range<usize>) -> usize {
        match self {
            Labeller::Classifier { .. } => rows.len(),
            Labeller::Lm { tokens, .. } => tokens[rows].iter().map(|t| t.ids.len().saturating_sub(1)).sum(),
        }
    }

    /// The encoded cache units of inputs `rows`, computed in `batch_size` batches from its start.
    fn label<S: AsRef<str>>(&self, texts: &[S], rows: Range<usize>, opts: &CacheLabelsOptions) -> Result<Vec<u8>> {
        let err = |reason| Error::LabelCache { path: opts.output.clone(), reason };
        match self {
            Labeller::Classifier { clf, classes, .. } => {
                let preds =
                    crate::model::classify::predict_from(clf, &texts[rows.clone()], opts.batch_size, rows.start)?;
                let probs: Vec<f32> = preds.iter().flat_map(|p| p.probs.iter().copied()).collect();
                let logits: Vec<f32> = preds.iter().flat_map(|p| p.logits.iter().copied()).collect();
                encode_classification(&probs, &logits, *classes).map_err(err)
            }
            Labeller::Lm { lm, k, tokens } => {
                let (model, vocab) = (&lm.model, lm.model.vocab());
                let be = &model.backend;
                let (mut ids, mut probs, mut rest) = (Vec::new(), Vec::new(), Vec::new());
                for chunk in rows.clone().step_by(opts.batch_size.max(1)) {
                    let end = (chunk + opts.batch_size.max(1)).min(rows.end);
                    let seqs: Vec<&Tokens> = tokens[chunk..end].iter().collect();
                    let batch = model.batch(&lm.tokenizer.pad(&seqs))?;
                    if batch.labels.is_empty() {
                        continue;
                    }
                    let picked = be.download(&be.embedding(&model.logits(&batch)?, &batch.label_rows, vocab)?)?;
                    for z in picked.chunks_exact(vocab) {
                        let (i, p, r) = top_k(z, *k);
                        ids.extend(i);
                        probs.extend(p);
                        rest.push(r);
                    }
                }
                encode_topk(&ids, &probs, &rest, *k).map_err(err)
            }
        }
    }
}

/// The `k` most probable entries of `softmax(z)` (ids and probabilities, most probable first,
/// ties to the lower id) and the probability of all the others, summed directly in f64 rather
/// than as `1 - sum`, which would cancel when the top k hold nearly all the mass.
pub fn top_k(z: &[f32], k: usize) -> (Vec<u32>, Vec<f32>, f32) {
    let k = k.min(z.len());
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    let mut order: Vec<u32> = (0..z.len() as u32).collect();
    let desc = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, desc);
    }
    let (top, others) = order.split_at_mut(k);
    top.sort_unstable_by(desc);
    let probs = top.iter().map(|&i| (z[i as usize] as f64 - lse).exp() as f32).collect();
    let rest = others.iter().map(|&i| (z[i as usize] as f64 - lse).exp()).sum::<f64>() as f32;
    (top.to_vec(), probs, rest)
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
fn stitch_ranks<B: Backend, A: LmArch<B>, S: AsRef<str>>(
    labeller: &Labeller<B, A>,
    texts: &[S],
    opts: &CacheLabelsOptions,
    coll: &mut dyn Collective,
    prov: Provenance,
) -> Result<PathBuf> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let all = batches(texts.len(), opts.batch_size);
    let mine = &all[shard_range(all.len(), rank, world)];
    let mut bytes = Vec::new();
    for (i, b) in mine.iter().enumerate() {
        bytes.extend(labeller.label(texts, b.clone(), opts)?);
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
        let mut writer = labeller.writer(&opts.output, prov, texts.len())?;
        writer.batch_size(opts.batch_size)?;
        for r in 0..world {
            let part = part_path(&opts.output, r, world);
            let data = std::fs::read(&part).map_err(|e| Error::io(&part, e))?;
            let units: usize = all[shard_range(all.len(), r, world)].iter().map(|b| labeller.units(b.clone())).sum();
            if data.len() != units * writer.row_bytes() {
                return Err(Error::LabelCache {
                    path: part,
                    reason: format!("rank {r}'s part has {} bytes, expected {units} units", data.len()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let argv = ["--expert", "e", "--task", "t", "--inputs", "i.jsonl", "-o", "c.bin"];
        let args: CacheLabelsArgs = parse_args(&argv).unwrap();
        let want = CacheLabelsArgs::new(CacheLabelsOptions::new("e", "t", "c.bin"), "i.jsonl");
        assert_eq!(format!("{args:?}"), format!("{want:?}"));
    }
}
