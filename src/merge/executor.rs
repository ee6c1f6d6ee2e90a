//! The streaming merge executor: opens the inputs, plans the output, and runs a method over
//! the layer stream block by block, tensor by tensor, chunk by chunk, writing shards as it goes.
//!
//! Nothing is visible at the output path until the merge has fully succeeded: shards are
//! written into a hidden temporary directory beside it, which is renamed into place at the end
//! and removed on any error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::config::MergeConfig;
use super::inputs::Inputs;
use super::philox::name_hash;
use super::select::Threshold;
use super::slices::{self, Placement};
use super::stats::{TensorPass, TensorStats};
use super::{ChunkCtx, MergeMethod, TensorParams, density_thresholds};
use crate::atomic::{Staging, check_output_apart, check_output_dir, check_staged_name, staging_path};
use crate::checkpoint::dtype::{decode, encode_into, first_non_finite, first_out_of_range, largest_finite, round_all};
use crate::checkpoint::layers::BlockKind;
use crate::checkpoint::side_files::{copy_side_files, edit_config};
use crate::checkpoint::stream::{StreamBlock, StreamTensor};
use crate::checkpoint::writer::{
    BackgroundWriter, DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, plan_shards, shard_file_name, write_index,
};
use crate::checkpoint::{Checkpoint, FloatDType, LayerStream, PlannedTensor, ShardWriter, TensorMeta};
use crate::dist::data_parallel::shard_range;
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sysinfo::peak_rss_bytes;
use crate::units::parse_shard_size;

/// Elements per output write: bounds the output buffer to a few MB whatever the tensor size.
const SPAN: usize = 1 << 22;

/// Elements a worker merges at a time: small enough that the decoded base, the K experts and
/// the method's scratch stay in L2 (measured: 35% less CPU time than 64Ki-element chunks).
const CHUNK: usize = 1 << 12;

/// How and where to write the merge; also `symerge merge`'s output flags (their defaults are
/// [`MergeOptions::new`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct MergeOptions {
    /// Output directory (written atomically: it appears only when complete); on the command
    /// line `-o DIR` or the argument after the config, as `mergekit-yaml CONFIG OUT` takes it.
    #[arg(skip)]
    pub output: PathBuf,
    /// Output dtype (float32, float16, bfloat16); default: the config's, else the inputs'.
    #[arg(long = "dtype", value_name = "DTYPE")]
    pub out_dtype: Option<FloatDType>,
    /// Largest shard, e.g. 5GB, 500MB, 2GiB, or mergekit's 5B / 500M (billions / millions of
    /// bytes).
    #[arg(
        long = "out-shard-size",
        value_name = "OUT_SHARD_SIZE",
        default_value = DEFAULT_SHARD_SIZE,
        value_parser = parse_shard_size
    )]
    pub max_shard_bytes: u64,
    /// Replace an existing output directory that symerge wrote (it holds .symerge-output) or
    /// that is empty; anything else is refused.
    #[arg(long)]
    pub force: bool,
    /// Show a progress bar (TTY) or log lines (the command line's `-q` turns it off).
    #[arg(skip = true)]
    pub progress: bool,
    /// Leave the donor's tokenizer files out of the output (mergekit's `--no-copy-tokenizer`);
    /// a `tokenizer_source` or `tokenizer:` block still writes its tokenizer.
    #[arg(long = "no-copy-tokenizer", action = clap::ArgAction::SetFalse, overrides_with = "mk_copy_tokenizer")]
    pub copy_tokenizer: bool,
    /// Write no model card `README.md` (mergekit's `--no-write-model-card`).
    #[arg(long = "no-write-model-card", action = clap::ArgAction::SetFalse, overrides_with = "mk_write_model_card")]
    pub write_model_card: bool,
    /// Merge inputs whose `config.json` names different model types (mergekit's name for
    /// mixing architectures); without it they are refused.
    #[arg(long)]
    pub allow_crimes: bool,
    /// Seed of the randomized methods (DARE, DELLA, ...) where the config sets no `seed`
    /// (mergekit's `--random-seed`; symerge's masks come from its own Philox streams).
    #[arg(long, value_name = "SEED", value_parser = clap::value_parser!(u64).range(..=1u64 << 53))]
    pub random_seed: Option<u64>,
}

impl MergeOptions {
    /// The defaults: the config's dtype, 5 GB shards, no replacing, progress shown.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        MergeOptions {
            output: output.into(),
            out_dtype: None,
            max_shard_bytes: DEFAULT_SHARD_BYTES,
            force: false,
            progress: true,
            copy_tokenizer: true,
            write_model_card: true,
            allow_crimes: false,
            random_seed: None,
        }
    }
}

/// Machine-readable account of a merge (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct MergeSummary {
    pub method: String,
    /// Where the math ran.
    pub device: String,
    pub output: PathBuf,
    /// Every input read: the base, the merged models and any LoRA adapters.
    pub models: usize,
    /// The merged models (for a `slices` config, the first slice's), the base not among them.
    pub experts: usize,
    /// The base the experts' task vectors are taken from, when the merge has one.
    pub base_model: Option<PathBuf>,
    pub blocks: usize,
    pub tensors: usize,
    pub params: u64,
    pub shards: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub read_gb_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Tensors present in an input but not in the reference model (left out of the output).
    pub ignored_tensors: usize,
}

/// Merges the models of `config` into `opts.output` on the CPU.
pub fn merge(config: &MergeConfig, opts: &MergeOptions) -> Result<MergeSummary> {
    merge_with(config, opts, &mut CpuEngine)
}

/// Runs the blocks of a planned merge: the part that differs between the CPU and a device.
/// Everything else (opening and checking the inputs, the output plan, staging, side files,
/// the summary) is shared in [`merge_with`].
pub trait MergeEngine {
    /// Where the math runs, for the summary (`cpu`, `cuda:0 (NVIDIA H100 ...)`).
    fn device(&self) -> String;

    /// Merges every block of `job.stream` in order, writing each planned tensor to `writer`
    /// in stream order and advancing `progress` by each block's input bytes; hands the writer
    /// back for [`ShardWriter::finish`].
    fn run(&mut self, job: &MergeJob<'_>, writer: ShardWriter, progress: &mut Progress) -> Result<ShardWriter>;
}

/// The reference engine: rayon over chunks of each tensor, one block at a time.
pub struct CpuEngine;

impl MergeEngine for CpuEngine {
    fn device(&self) -> String {
        "cpu".into()
    }

    /// Writing runs on its own thread, so encoding the next span overlaps with the kernel
    /// copying (and throttling) the previous one.
    fn run(&mut self, job: &MergeJob<'_>, writer: ShardWriter, progress: &mut Progress) -> Result<ShardWriter> {
        let mut writer = BackgroundWriter::spawn(writer, 2);
        job.stream.for_each_block(|bi, block| {
            let position = job.position(bi);
            for t in &block.tensors {
                match job.tensor(block, t, position)? {
                    TensorWork::Raw { name, bytes } => writer.write_copy(name, bytes)?,
                    TensorWork::Float(tj) => {
                        job.merge_tensor_cpu(&tj, writer.buffer(), &mut |bytes| {
                            writer.write(tj.name, bytes)?;
                            Ok(writer.buffer())
                        })?;
                    }
                }
            }
            progress.advance(&block.spec.name, job.stream.block_input_bytes(block));
            Ok(())
        })?;
        writer.finish()
    }
}

/// Merges the models of `config` into `opts.output`, running the blocks on `engine`.
pub fn merge_with(config: &MergeConfig, opts: &MergeOptions, engine: &mut dyn MergeEngine) -> Result<MergeSummary> {
    merge_with_in(config, opts, engine, &mut Single)
}

/// [`merge_with`] as one rank of several (each with its own engine: a CPU, or its own GPU).
///
/// The blocks are divided between the ranks in contiguous [`shard_range`]s. Every rank plans
/// the same stream and so knows every rank's shards; it writes its own, numbered across all
/// ranks, into `<output>.rank-<r>-of-<n>.partial/`. After a barrier rank 0 moves every rank's
/// shards into its staging directory with the side files and `model.safetensors.index.json`
/// and renames it into place (atomically, as alone); a second barrier makes every rank return
/// only once the output exists. The summary's bytes and seconds are this rank's share.
pub fn merge_with_in(
    config: &MergeConfig,
    opts: &MergeOptions,
    engine: &mut dyn MergeEngine,
    coll: &mut dyn Collective,
) -> Result<MergeSummary> {
    let result = merge_ranked(config, opts, engine, coll);
    if let Err(e) = &result {
        coll.abort(&e.to_string());
        if coll.world_size() > 1 {
            let _ = std::fs::remove_dir_all(rank_dir(&opts.output, coll.rank(), coll.world_size()));
        }
    }
    result
}

/// Architecture fields of `config.json` that must agree between the reference and every input
/// that states them: equal tensor shapes do not imply an equal architecture (the same hidden
/// size can be cut into other numbers of heads).
const ARCHITECTURE_KEYS: &[&str] = &[
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
];

fn check_configs_agree(reference: &Checkpoint, inputs: &[&Checkpoint], allow_crimes: bool) -> Result<()> {
    let Some(want) = reference.config.as_ref() else {
        tracing::warn!("{} has no config.json: the output will have none either", reference.path.display());
        return Ok(());
    };
    for input in inputs {
        let Some(have) = input.config.as_ref() else { continue };
        // Sizes first: models of other sizes merge with no flag, so suggesting --allow-crimes
        // for their model types would only lead to this error.
        check_sizes_agree(reference, want, input, have, ARCHITECTURE_KEYS)?;
        check_model_type(reference, input, allow_crimes)?;
    }
    Ok(())
}

/// [`check_configs_agree`] for one source of a `slices` config against the model that gives
/// the output its `config.json`: a slice's layers must fit that config, whatever its sources'
/// layer counts (each slice takes only some of its model's layers).
pub(super) fn check_slice_source(donor: &Checkpoint, source: &Checkpoint, allow_crimes: bool) -> Result<()> {
    let (Some(want), Some(have)) = (donor.config.as_ref(), source.config.as_ref()) else { return Ok(()) };
    let keys: Vec<&str> =
        ARCHITECTURE_KEYS.iter().copied().filter(|k| !super::slices::LAYER_COUNT_KEYS.contains(k)).collect();
    check_sizes_agree(donor, want, source, have, &keys)?;
    check_model_type(donor, source, allow_crimes)
}

fn model_type_of(config: &serde_json::Value) -> Option<&str> {
    config.get("model_type").and_then(serde_json::Value::as_str)
}

fn check_sizes_agree(
    reference: &Checkpoint,
    want: &serde_json::Value,
    input: &Checkpoint,
    have: &serde_json::Value,
    keys: &[&str],
) -> Result<()> {
    for key in keys {
        if let (Some(w), Some(h)) = (want.get(*key), have.get(*key))
            && w != h
        {
            let types = match (model_type_of(want), model_type_of(have)) {
                (Some(wt), Some(ht)) if wt != ht => format!(" (model_type {ht} vs {wt})"),
                _ => String::new(),
            };
            return Err(Error::Model {
                path: input.dir.join("config.json"),
                reason: format!(
                    "`{key}` is {h}, but {} says {w}: not the same architecture{types}",
                    reference.dir.join("config.json").display()
                ),
            });
        }
    }
    Ok(())
}

/// Inputs of another `model_type` (Llama and Mistral weights can have the same names and
/// shapes) are refused unless `allow_crimes`, as mergekit refuses mixed architectures without
/// `--allow-crimes`; a head on the same model (`BertModel` and `BertForSequenceClassification`)
/// is one model type.
fn check_model_type(reference: &Checkpoint, input: &Checkpoint, allow_crimes: bool) -> Result<()> {
    let model_type = |c: &Checkpoint| c.config.as_ref().and_then(|c| c.get("model_type")).cloned();
    let (Some(w), Some(h)) = (model_type(reference), model_type(input)) else { return Ok(()) };
    if w == h {
        return Ok(());
    }
    if !allow_crimes {
        return Err(Error::Model {
            path: input.dir.join("config.json"),
            reason: format!(
                "model_type {h} differs from {w} in {}: mixing architectures needs --allow-crimes (as in mergekit)",
                reference.dir.join("config.json").display()
            ),
        });
    }
    tracing::warn!("--allow-crimes: merging model_type {h} ({}) into {w}", input.dir.display());
    Ok(())
}

/// Where rank `rank` of `world` writes its shards before rank 0 gathers them.
pub fn rank_dir(output: &Path, rank: usize, world: usize) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(format!(".rank-{rank}-of-{world}.partial"));
    PathBuf::from(p)
}

/// Refuses an output name too long for the other siblings a merge may write beside the output
/// (besides its staging directory, which [`check_output_dir`] covers): a LoRA input's or a
/// vocabulary's scratch and, on several ranks, each rank's shard directory.
fn check_sibling_names(config: &MergeConfig, output: &Path, world: usize) -> Result<()> {
    if config.referenced_models().iter().any(|p| crate::checkpoint::lora::split_ref(p).is_some()) {
        check_staged_name(output, |o| staging_path(&super::inputs::lora_scratch(o)))?;
    }
    if config.tokenizer_source.is_some() {
        check_staged_name(output, |o| staging_path(&super::vocab::vocab_scratch(o)))?;
    }
    if world > 1 {
        check_staged_name(output, |o| rank_dir(o, world - 1, world))?;
    }
    Ok(())
}

fn merge_ranked(
    config: &MergeConfig,
    opts: &MergeOptions,
    engine: &mut dyn MergeEngine,
    coll: &mut dyn Collective,
) -> Result<MergeSummary> {
    let start = Instant::now();
    let seeded = opts.random_seed.and_then(|seed| config.with_default_seed(seed));
    let config = seeded.as_ref().unwrap_or(config);
    let paths = super::inputs::input_paths(config);
    let inputs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    check_output_apart(&opts.output, &inputs)?;
    check_output_dir(&opts.output, opts.force)?;
    check_sibling_names(config, &opts.output, coll.world_size())?;
    if let Some(table) = &config.lambda_table {
        super::table_models::check(config, table)?;
    }
    // One method per slice: slices of one config may merge with a base and without.
    let methods = config.build_methods();

    // The reference decides which tensors the output has (experts' task heads of different
    // shapes are left out) and is subtracted by task-vector methods: the base when there is
    // one, else the first merged model, which is then also merged (see `MergeJob::tensor`).
    let opened = Opened::open(config, &opts.output, opts.allow_crimes)?;
    let (reference, inputs) = (&opened.ckpts[0], opened.ckpts[1..].iter().collect::<Vec<_>>());
    check_configs_agree(reference, &inputs, opts.allow_crimes)?;
    // A slices config's views lack the layers of slices with fewer sources than theirs.
    let stream = match opened.slice_layers {
        Some(_) => LayerStream::plan_partial(reference, inputs)?,
        None => LayerStream::plan(reference, inputs)?,
    };
    let ignored = ignored_holders(&stream);
    check_reference(&stream, &ignored)?;
    warn_ignored(&ignored);
    let placements = placements(&stream, opened.slice_layers.as_deref(), config.slices.len());
    let out_dtype = opts.out_dtype.or(config.out_dtype);
    if let (Some(cli), Some(cfg)) = (opts.out_dtype, config.out_dtype)
        && cli != cfg
    {
        // Said, as other overridden settings are (fuzzing round 6: silent).
        tracing::info!("--dtype {cli} overrides the config's output dtype {cfg}");
    }
    check_lambda_table(config, &stream)?;

    let planned = planned_tensors(&stream, reference, out_dtype);
    let total_input: u64 = stream.blocks.iter().map(|b| stream.block_input_bytes(b)).sum();

    let job = MergeJob {
        methods: &methods,
        stream: &stream,
        config,
        out_dtype,
        first_block: 0,
        placements: &placements,
        round_inputs: round_inputs(config, &stream),
    };
    let (shards, written, input_bytes) = if coll.world_size() == 1 {
        let (shards, written) = merge_whole(&job, engine, &opened, opts, planned, total_input)?;
        (shards, written, total_input)
    } else {
        merge_part(&job, engine, coll, &opened, opts, &planned)?
    };

    let seconds = start.elapsed().as_secs_f64();
    Ok(MergeSummary {
        method: methods.first().map_or(config.method.name, |m| m.name()).to_string(),
        device: engine.device(),
        output: opts.output.clone(),
        models: super::inputs::model_paths(config).len(),
        experts: config.models.len(),
        base_model: config.subtracted_base().map(Path::to_path_buf),
        blocks: stream.blocks.len(),
        tensors: reference.tensors.len(),
        params: reference.num_params(),
        shards,
        bytes_read: input_bytes,
        bytes_written: written,
        seconds,
        read_gb_per_s: input_bytes as f64 / seconds / 1e9,
        peak_rss_bytes: peak_rss_bytes(),
        ignored_tensors: stream.ignored.len(),
    })
}

/// The output's tensors in stream order, float ones in `out_dtype` when one is set.
fn planned_tensors(
    stream: &LayerStream<'_>,
    reference: &Checkpoint,
    out_dtype: Option<FloatDType>,
) -> Vec<PlannedTensor> {
    stream
        .blocks
        .iter()
        .flat_map(|b| &b.tensors)
        .map(|t| {
            let m = &reference.tensors[t.reference];
            PlannedTensor {
                name: m.name.clone(),
                dtype: match (stream.natural_dtype(t), out_dtype) {
                    (Some(_), Some(o)) => o.to_safetensors(),
                    (Some(natural), None) => natural.to_safetensors(),
                    _ => m.dtype,
                },
                shape: m.shape.clone(),
            }
        })
        .collect()
}

/// Refuses a reference (the base, else the first model) that lacks what the output needs: it
/// decides the output's tensors, so a base whose index leaves out a shard, or whose header is
/// empty, would give an incomplete model. An expert's task head the base lacks is fine (left
/// out with a warning); a layer every other input has, or a layer count config.json claims
/// beyond the tensors, is not.
fn check_reference(stream: &LayerStream<'_>, ignored: &BTreeMap<&str, usize>) -> Result<()> {
    let reference = stream.reference;
    let bad = |reason: String| Err(Error::Model { path: reference.path.clone(), reason });
    if reference.tensors.is_empty() {
        return bad("holds no tensor; it decides the merged model's tensors".into());
    }
    if let Some(cfg) = reference.config.as_ref().and_then(|c| c.as_object()) {
        for key in super::slices::LAYER_COUNT_KEYS {
            if let Some(n) = cfg.get(*key).and_then(serde_json::Value::as_u64) {
                crate::model::check_layer_count(reference, n as usize, key)?;
            }
        }
    }
    let inputs = stream.inputs.len();
    if let Some((name, _)) =
        ignored.iter().find(|(name, n)| **n == inputs && crate::checkpoint::layers::layer_of(name).is_some())
    {
        return bad(format!(
            "lacks tensor `{name}`, which every other model has: it decides the merged model's tensors \
             (a sharded index that leaves out a shard?)"
        ));
    }
    Ok(())
}

/// The inputs' tensors the reference lacks (left out of the output), each with how many
/// inputs hold it.
fn ignored_holders<'s>(stream: &'s LayerStream<'_>) -> BTreeMap<&'s str, usize> {
    let mut holders = BTreeMap::new();
    for (_, name) in &stream.ignored {
        *holders.entry(name.as_str()).or_default() += 1;
    }
    holders
}

/// Whether `name` belongs to a task head that fine-tuning adds on top of the base (a sequence
/// classifier's `classifier.*` or `score.*`, DistilBERT's `pre_classifier.*`, a QA head).
fn is_task_head(name: &str) -> bool {
    matches!(name.split('.').next(), Some("classifier" | "pre_classifier" | "score" | "qa_outputs"))
}

/// The inputs' tensors the reference lacks (left out of the output), logged: the experts' task
/// heads at info level, since heads are never merged and every merge of classifiers has them
/// (a warning there reads like a fault); anything else with a warning.
fn warn_ignored(ignored: &BTreeMap<&str, usize>) {
    let (heads, other): (Vec<&str>, Vec<&str>) = ignored.keys().copied().partition(|n| is_task_head(n));
    if !heads.is_empty() {
        tracing::info!(
            "{} task-head tensors of the inputs (not in the base) are left out, as expected: heads are not merged; \
             score a task with `eval --head-from EXPERT` (e.g. {})",
            heads.len(),
            heads[..heads.len().min(5)].join(", ")
        );
    }
    if !other.is_empty() {
        tracing::warn!(
            "{} tensors of the inputs are not in the reference model and are left out (e.g. {})",
            other.len(),
            other[..other.len().min(5)].join(", ")
        );
    }
}

/// One process: the whole stream into a staging directory, committed at the end. Returns the
/// shard count and the bytes written.
fn merge_whole(
    job: &MergeJob<'_>,
    engine: &mut dyn MergeEngine,
    opened: &Opened,
    opts: &MergeOptions,
    planned: Vec<PlannedTensor>,
    total_input: u64,
) -> Result<(usize, u64)> {
    let staging = Staging::create(&opts.output)?;
    opened.write_side_files(job.config, opts, staging.path(), job.out_dtype, &planned)?;
    let writer = ShardWriter::create(staging.path(), planned, opts.max_shard_bytes)?;
    let shards = writer.num_shards();
    let mut progress = Progress::new("merge", total_input, opts.progress);
    let writer = engine.run(job, writer, &mut progress)?;
    progress.finish();
    let written = writer.finish()?;
    staging.commit(&opts.output, opts.force)?;
    Ok((shards, written.bytes))
}

/// This rank's share of the blocks into shards of its own directory, named as in the final
/// output; rank 0 then gathers every rank's into the output ([`gather_parts`]). Returns the
/// output's shard count, the bytes this rank wrote and the bytes it read.
fn merge_part(
    job: &MergeJob<'_>,
    engine: &mut dyn MergeEngine,
    coll: &mut dyn Collective,
    opened: &Opened,
    opts: &MergeOptions,
    planned: &[PlannedTensor],
) -> Result<(usize, u64, u64)> {
    let stream = job.stream;
    let nblocks = stream.blocks.len();
    let (rank, world) = (coll.rank(), coll.world_size());
    // Tensor `i` of `planned` belongs to block `block_of[i]`.
    let block_of: Vec<usize> =
        stream.blocks.iter().enumerate().flat_map(|(bi, b)| std::iter::repeat_n(bi, b.tensors.len())).collect();
    let tensors_of = |r: usize| -> Vec<PlannedTensor> {
        let blocks = shard_range(nblocks, r, world);
        planned.iter().zip(&block_of).filter(|(_, b)| blocks.contains(b)).map(|(t, _)| t.clone()).collect()
    };
    let counts: Vec<usize> = (0..world).map(|r| plan_shards(&tensors_of(r), opts.max_shard_bytes).len()).collect();
    let total_shards: usize = counts.iter().sum();
    let first_shard: usize = counts[..rank].iter().sum();
    let names: Vec<String> =
        (first_shard..first_shard + counts[rank]).map(|g| shard_file_name(g, total_shards)).collect();

    let dir = rank_dir(&opts.output, rank, world);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mine = shard_range(nblocks, rank, world);
    let part = LayerStream {
        reference: stream.reference,
        inputs: stream.inputs.clone(),
        blocks: stream.blocks[mine.clone()].to_vec(),
        ignored: Vec::new(),
    };
    let input_bytes: u64 = part.blocks.iter().map(|b| stream.block_input_bytes(b)).sum();
    let writer = ShardWriter::create_part(&dir, tensors_of(rank), opts.max_shard_bytes, names)?;
    let mut progress = Progress::new("merge", input_bytes, opts.progress && rank == 0);
    let part_job = MergeJob { stream: &part, first_block: mine.start, ..*job };
    let writer = engine.run(&part_job, writer, &mut progress)?;
    progress.finish();
    let written = writer.finish()?;
    coll.barrier()?;
    if rank == 0 {
        gather_parts(job, opened, opts, planned, &counts, &tensors_of, world)?;
    }
    coll.barrier()?;
    Ok((total_shards, written.bytes, input_bytes))
}

/// Rank 0, once every rank has written its part: the side files, every rank's shards and the
/// index into a staging directory, committed as the output; the rank directories removed.
fn gather_parts(
    job: &MergeJob<'_>,
    opened: &Opened,
    opts: &MergeOptions,
    planned: &[PlannedTensor],
    counts: &[usize],
    tensors_of: &dyn Fn(usize) -> Vec<PlannedTensor>,
    world: usize,
) -> Result<()> {
    let total_shards: usize = counts.iter().sum();
    let staging = Staging::create(&opts.output)?;
    opened.write_side_files(job.config, opts, staging.path(), job.out_dtype, planned)?;
    let mut files: Vec<String> = Vec::with_capacity(planned.len());
    for r in 0..world {
        let first: usize = counts[..r].iter().sum();
        let from = rank_dir(&opts.output, r, world);
        for (si, (a, b)) in plan_shards(&tensors_of(r), opts.max_shard_bytes).into_iter().enumerate() {
            let name = shard_file_name(first + si, total_shards);
            let (src, dst) = (from.join(&name), staging.path().join(&name));
            std::fs::rename(&src, &dst).map_err(|e| Error::io(&src, e))?;
            files.extend(std::iter::repeat_n(name, b - a));
        }
    }
    if total_shards > 1 {
        let of: Vec<&str> = files.iter().map(String::as_str).collect();
        write_index(staging.path(), planned, &of)?;
    }
    staging.commit(&opts.output, opts.force)?;
    for r in 0..world {
        let d = rank_dir(&opts.output, r, world);
        std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    Ok(())
}

/// The checkpoints a merge reads, the reference first: the base (when the config has one)
/// and the models, or a slices config's views.
struct Opened {
    ckpts: Vec<Checkpoint>,
    /// A slices config's output layers: (slice, gradient position) each.
    slice_layers: Option<Vec<(usize, f64)>>,
    /// The output layers' `layer_types` entries (slices configs whose models have them).
    layer_types: Option<Vec<serde_json::Value>>,
    /// Where `config.json` and the tokenizer come from.
    donor: PathBuf,
    /// The inputs' embeddings permuted into the output vocabulary, when they had to be.
    aligned: Option<super::vocab::Aligned>,
    /// Holds the adapted tensors of `model+lora` inputs.
    _inputs: Inputs,
    /// The output directory's name, the model card's title.
    title: String,
}

impl Opened {
    /// Inputs whose vocabularies differ from `tokenizer_source`'s read permuted embeddings
    /// (scratch beside `output`).
    fn open(config: &MergeConfig, output: &Path, allow_crimes: bool) -> Result<Self> {
        let mut inputs = Inputs::new(output);
        let title = title(output);
        if !config.slices.is_empty() {
            let plan = slices::plan(config, &mut inputs, output, allow_crimes)?;
            let (ckpts, slice_layers, donor, aligned) = (plan.views, Some(plan.layers), plan.donor, plan.aligned);
            let layer_types = plan.layer_types;
            return Ok(Opened { ckpts, slice_layers, layer_types, donor, aligned, _inputs: inputs, title });
        }
        let paths = config.base_model.iter().chain(config.models.iter().map(|m| &m.path));
        let opened = paths.map(|p| inputs.open(p)).collect::<Result<Vec<_>>>()?;
        let mut ckpts = super::tied::tie_missing_heads(opened)?;
        let Some(donor) = ckpts.first().map(|c| c.dir.clone()) else {
            return Err(Error::Config { path: config.source.clone(), reason: "lists no model to merge".into() });
        };
        let aligned = super::vocab::align(config, &mut ckpts, output)?;
        Ok(Opened { ckpts, slice_layers: None, layer_types: None, donor, aligned, _inputs: inputs, title })
    }

    /// `config.json` (with the output's dtype, layer count and, when `planned` holds an
    /// `lm_head.weight`, untied head) and the other side files.
    /// `--no-copy-tokenizer` leaves the donor's tokenizer files behind (a built or permuted
    /// vocabulary still writes its tokenizer); `--no-write-model-card` the card.
    fn write_side_files(
        &self,
        config: &MergeConfig,
        opts: &MergeOptions,
        dst: &Path,
        out_dtype: Option<FloatDType>,
        planned: &[PlannedTensor],
    ) -> Result<()> {
        let donor = if self.donor.is_dir() {
            self.donor.clone()
        } else {
            self.donor.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let skip: Vec<&str> = if opts.copy_tokenizer {
            Vec::new()
        } else {
            [super::tokenizer::TOKENIZER_FILES, super::tokenizer::COPIED_WITH_TOKENIZER].concat()
        };
        // config.json records the dtype the weights are stored in: without `out_dtype`, the one
        // every float tensor has where the donor's config states another (f32 when the inputs'
        // dtypes differ: the donor's said f16 over f32 tensors, fuzzing round 7). Otherwise the
        // donor's config.json is copied as written.
        let stored = out_dtype.or_else(|| {
            let mut floats = planned.iter().filter_map(|t| FloatDType::from_safetensors(t.dtype));
            let first = floats.next()?;
            (floats.all(|d| d == first) && states_other_dtype(&donor.join("config.json"), first)).then_some(first)
        });
        copy_side_files(&donor, dst, stored, &skip)?;
        if let Some(layers) = &self.slice_layers {
            let (n, types) = (layers.len(), self.layer_types.as_deref());
            edit_config(dst, |cfg| *cfg = slices::with_layer_count(Some(cfg.take()), n, types).unwrap_or_default())?;
        }
        if let Some(n) = self.aligned.as_ref().map(|a| a.vocab_size) {
            edit_config(dst, |cfg| super::vocab::set_vocab_size(cfg, n))?;
        }
        if planned.iter().any(|t| t.name == "lm_head.weight") {
            edit_config(dst, untie_config)?;
        }
        super::tokenizer::apply(config, dst, self.aligned.as_ref())?;
        if opts.write_model_card { super::card::write(config, dst, &self.title) } else { Ok(()) }
    }
}

/// Whether the config at `path` names a dtype (`torch_dtype` or transformers 5's `dtype`) other
/// than `d`; a config that names none, or cannot be read here, does not.
fn states_other_dtype(path: &Path, d: FloatDType) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    ["torch_dtype", "dtype"].iter().filter_map(|k| cfg.get(*k)?.as_str()).any(|v| v != d.torch_name())
}

/// `tie_word_embeddings: false` in an output that stores its own `lm_head.weight` (a tied donor
/// merged with untied experts gets a merged head of its own): a donor's `true` kept there, as
/// mergekit keeps it, makes loaders disagree on which head the model has (transformers 5 reads
/// the stored one, a loader that follows the flag the embeddings). GPT-2 ties when the key is
/// absent, so it is written then too.
fn untie_config(cfg: &mut serde_json::Value) {
    let Some(obj) = cfg.as_object_mut() else { return };
    if obj.get("tie_word_embeddings") == Some(&true.into()) {
        tracing::info!("the output stores its own `lm_head.weight`: config.json gets tie_word_embeddings: false");
    }
    obj.insert("tie_word_embeddings".into(), false.into());
}

fn title(output: &Path) -> String {
    output.file_name().map_or_else(|| "merge".into(), |n| n.to_string_lossy().into_owned())
}

/// Each block's slice and gradient position, as mergekit places them: a layer at `i / (n - 1)`
/// of its slice (of its stack, for a `models` config); the embeddings in the first slice and
/// every other tensor outside the stack in the last, both at 0.
fn placements(stream: &LayerStream<'_>, slice_layers: Option<&[(usize, f64)]>, nslices: usize) -> Vec<Placement> {
    let last = nslices.saturating_sub(1);
    let stack_of = |name: &str| name.rsplit_once('.').map_or(name.to_string(), |(s, _)| s.to_string());
    let layer_blocks: Vec<String> =
        stream.blocks.iter().filter(|b| b.spec.kind == BlockKind::Layer).map(|b| stack_of(&b.spec.name)).collect();
    let mut seen: Vec<String> = Vec::new();
    stream
        .blocks
        .iter()
        .map(|b| match (b.spec.kind, slice_layers) {
            (BlockKind::Layer, Some(layers)) => {
                let (slice, t) = b.spec.index.and_then(|i| layers.get(i)).copied().unwrap_or((last, 0.0));
                Placement { slice, t }
            }
            (BlockKind::Layer, None) => {
                let stack = stack_of(&b.spec.name);
                let i = seen.iter().filter(|s| **s == stack).count();
                let n = layer_blocks.iter().filter(|s| **s == stack).count();
                seen.push(stack);
                Placement { slice: 0, t: if n > 1 { i as f64 / (n - 1) as f64 } else { 1.0 } }
            }
            (BlockKind::Embeddings, _) => Placement { slice: 0, t: 0.0 },
            _ => Placement { slice: last, t: 0.0 },
        })
        .collect()
}

/// The compute `dtype` when some float input is wider (then values are rounded on reading).
fn round_inputs(config: &MergeConfig, stream: &LayerStream<'_>) -> Option<FloatDType> {
    let d = config.compute_dtype?;
    let wider = |c: &Checkpoint| c.tensors.iter().filter_map(TensorMeta::float_dtype).any(|t| t.size() > d.size());
    (wider(stream.reference) || stream.inputs.iter().any(|c| wider(c))).then_some(d)
}

/// Every Lambda-table entry must name a tensor or block of the model: a typo would otherwise
/// silently fall back to the config's weights.
fn check_lambda_table(config: &MergeConfig, stream: &LayerStream<'_>) -> Result<()> {
    let Some(table) = &config.lambda_table else {
        return Ok(());
    };
    for key in table.lambda.keys() {
        let known = stream.reference.get(key).is_some() || stream.blocks.iter().any(|b| b.spec.name == *key);
        if !known {
            return Err(Error::Config {
                path: table.path.clone(),
                reason: format!("entry `{key}` names no tensor or block of {}", stream.reference.path.display()),
            });
        }
    }
    // Tensors without an entry merge with the config's `weight` and `lambda` (1 where not
    // given): said, with the first few names, so that a cut or emptied table is not the plain
    // sum of the task vectors in silence (fuzzing round 6); a table that covers none is refused.
    let uncovered: Vec<&str> = stream
        .blocks
        .iter()
        .flat_map(|b| b.tensors.iter().filter(|t| !t.inputs.is_empty()).map(move |t| (b.spec.name.as_str(), t)))
        .filter(|(block, t)| !table.lambda.contains_key(*block) && !table.lambda.contains_key(&t.name))
        .map(|(_, t)| t.name.as_str())
        .collect();
    let total: usize = stream.blocks.iter().map(|b| b.tensors.iter().filter(|t| !t.inputs.is_empty()).count()).sum();
    if uncovered.is_empty() {
        return Ok(());
    }
    if uncovered.len() == total {
        return Err(Error::Config {
            path: table.path.clone(),
            reason: format!(
                "holds no coefficients for any of the {total} tensors merged (no entry names one or its block)"
            ),
        });
    }
    let first: Vec<&str> = uncovered.iter().take(3).copied().collect();
    tracing::warn!(
        "{} of {total} merged tensors have no entry in {} ({}{}): they merge with the config's `weight` and `lambda` \
         (1 where not given), not the table's",
        uncovered.len(),
        table.path.display(),
        first.join(", "),
        if uncovered.len() > first.len() { ", ..." } else { "" }
    );
    Ok(())
}

/// The fixed parts of one merge, shared by every tensor and every engine.
pub struct MergeJob<'a> {
    /// The method as each slice uses it ([`MergeConfig::build_methods`]), one for the
    /// `models` form: slices may differ in whether they merge with a base.
    pub methods: &'a [Box<dyn MergeMethod>],
    pub stream: &'a LayerStream<'a>,
    pub config: &'a MergeConfig,
    pub out_dtype: Option<FloatDType>,
    /// Index of `stream`'s first block in the whole model (non-zero for a rank's part).
    pub first_block: usize,
    /// Where each block of the whole model sits: its slice and gradient position.
    pub placements: &'a [Placement],
    /// `dtype` when it is narrower than some input: inputs are rounded to it as they are read.
    pub round_inputs: Option<FloatDType>,
}

/// A tensor as one input holds it.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub ckpt: &'a Checkpoint,
    pub meta: &'a TensorMeta,
    pub dtype: FloatDType,
    /// mergekit's compute `dtype`, when narrower than `dtype`: values are rounded to it.
    pub round: Option<FloatDType>,
}

impl<'a> Source<'a> {
    /// The tensor's raw bytes in the mmap.
    pub fn bytes(&self) -> &'a [u8] {
        self.ckpt.bytes(self.meta)
    }

    /// Decodes elements `offset .. offset + out.len()` and rejects NaN/Inf, naming the file.
    pub fn read(&self, offset: usize, out: &mut [f32]) -> Result<()> {
        let size = self.dtype.size();
        let bytes = &self.ckpt.bytes(self.meta)[offset * size..(offset + out.len()) * size];
        decode(self.dtype, bytes, out);
        if let Some(d) = self.round
            && d.size() < self.dtype.size()
        {
            round_all(d, out);
        }
        if let Some(i) = first_non_finite(out) {
            return Err(Error::NonFinite {
                path: self.ckpt.file_of(self.meta).to_path_buf(),
                tensor: self.meta.name.clone(),
                index: offset + i,
                value: out[i],
            });
        }
        Ok(())
    }
}

/// What to do for one output tensor.
pub enum TensorWork<'a> {
    /// Integer/bool buffers (e.g. position ids) are not weights: copied from the reference.
    Raw {
        name: &'a str,
        bytes: &'a [u8],
    },
    Float(TensorJob<'a>),
}

/// A floating-point tensor to merge: its inputs and resolved parameters.
pub struct TensorJob<'a> {
    /// The method of the tensor's slice.
    pub method: &'a dyn MergeMethod,
    pub name: &'a str,
    pub n: usize,
    /// Present iff the method works on task vectors.
    pub base: Option<Source<'a>>,
    pub experts: Vec<Source<'a>>,
    pub params: TensorParams,
    pub out_dtype: FloatDType,
    /// [`MergeConfig::result_rounding`]: the dtype the result is rounded to before `out_dtype`.
    pub round_result: Option<FloatDType>,
    pub name_hash: u32,
    /// Length of the last dimension (rows of this length are contiguous).
    pub row_len: usize,
}

impl TensorJob<'_> {
    /// Bytes of all inputs of this tensor.
    pub fn input_bytes(&self) -> u64 {
        self.base.iter().chain(&self.experts).map(|s| s.meta.nbytes() as u64).sum()
    }

    /// Exact per-expert magnitude thresholds at the configured densities, on the CPU.
    pub fn cpu_thresholds(&self) -> Result<Vec<Threshold>> {
        density_thresholds(&JobPass { job: self, chunk: super::select::CHUNK })
    }

    /// The method's whole-tensor statistics from its CPU pre-pass over the mapped inputs,
    /// chunked as the CPU merge chunks it (so the same bits): what the GPU kernels that take
    /// the CPU's statistics get.
    pub fn cpu_stats(&self) -> Result<TensorStats> {
        let chunk = self.chunk_len(super::select::CHUNK, self.method.whole_rows());
        self.method.prepare(&JobPass { job: self, chunk })
    }

    /// The one input whose stored bytes are the output's (see [`MergeMethod::copies_model`]):
    /// same dtype, no rounding to a narrower compute dtype.
    fn verbatim(&self) -> Option<&Source<'_>> {
        let [src] = self.experts.as_slice() else { return None };
        let rounded = src.round.is_some_and(|d| d.size() < src.dtype.size());
        let same = self.base.is_none() && src.dtype == self.out_dtype && !rounded;
        (same && self.method.copies_model(&self.params)).then_some(src)
    }

    /// Elements a merge or statistics chunk holds: about `target`, whole rows when `rows`.
    fn chunk_len(&self, target: usize, rows: bool) -> usize {
        if rows && self.row_len > 0 { (target / self.row_len).max(1) * self.row_len } else { target }
    }
}

/// A [`TensorJob`]'s inputs as a [`TensorPass`] for a method's statistics.
struct JobPass<'j, 'a> {
    job: &'j TensorJob<'a>,
    chunk: usize,
}

impl TensorPass for JobPass<'_, '_> {
    fn len(&self) -> usize {
        self.job.n
    }

    fn row_len(&self) -> usize {
        self.job.row_len
    }

    fn chunk_len(&self) -> usize {
        self.chunk
    }

    fn params(&self) -> &TensorParams {
        &self.job.params
    }

    fn name_hash(&self) -> u32 {
        self.job.name_hash
    }

    fn experts(&self) -> usize {
        self.job.experts.len()
    }

    fn read(&self, offset: usize, base: &mut [f32], experts: &mut [Vec<f32>]) -> Result<()> {
        if let Some(b) = self.job.base {
            b.read(offset, base)?;
        }
        for (out, e) in experts.iter_mut().zip(&self.job.experts) {
            e.read(offset, out)?;
        }
        Ok(())
    }
}

/// Per-thread buffers for one chunk.
#[derive(Default)]
struct Scratch {
    base: Vec<f32>,
    experts: Vec<Vec<f32>>,
    out: Vec<f32>,
    method: Vec<f32>,
}

impl<'a> MergeJob<'a> {
    /// The method of the `models` form (or of slice 0): what an engine that takes no `slices`
    /// config runs.
    pub fn method(&self) -> &'a dyn MergeMethod {
        self.method_in(0)
    }

    /// The method of slice `slice` (0 for the `models` form).
    pub fn method_in(&self, slice: usize) -> &'a dyn MergeMethod {
        let m = self.methods.get(slice).or(self.methods.first());
        m.expect("MergeConfig::build_methods builds at least one method").as_ref()
    }

    /// Where block `bi` of `stream` sits: its slice and gradient position.
    pub fn position(&self, bi: usize) -> Placement {
        self.placements.get(self.first_block + bi).copied().unwrap_or(Placement { slice: 0, t: 0.0 })
    }

    /// Resolves one tensor of a block: its sources in every input and its parameters.
    pub fn tensor(&self, block: &StreamBlock, t: &StreamTensor, at: Placement) -> Result<TensorWork<'a>> {
        let reference = self.stream.reference;
        let rmeta = &reference.tensors[t.reference];
        let Some(ref_dtype) = rmeta.float_dtype() else {
            return Ok(TensorWork::Raw { name: &rmeta.name, bytes: reference.bytes(rmeta) });
        };
        let mut sources: Vec<Source<'a>> = Vec::with_capacity(t.inputs.len() + 1);
        // Each source's input: 0 the reference, `i + 1` the stream's input `i`.
        let mut slots: Vec<usize> = Vec::with_capacity(t.inputs.len() + 1);
        let round = self.round_inputs;
        sources.push(Source { ckpt: reference, meta: rmeta, dtype: ref_dtype, round });
        slots.push(0);
        for (slot, (c, i)) in self.stream.inputs.iter().zip(&t.inputs).enumerate() {
            // A slices view lacks the tensors of slices with fewer sources.
            let Some(i) = *i else { continue };
            let meta = &c.tensors[i];
            let dtype = meta.float_dtype().ok_or_else(|| Error::UnsupportedDtype {
                path: c.file_of(meta).to_path_buf(),
                tensor: meta.name.clone(),
                dtype: format!("{:?}", meta.dtype),
            })?;
            sources.push(Source { ckpt: c, meta, dtype, round });
            slots.push(slot + 1);
        }
        // The reference is a base (subtracted, or only naming the tensors for linear) unless it
        // is the first merged model itself: the slice has no base (for the `models` form, the
        // config has none). A slices view holds each slice's base, or first model, as input 0.
        let method = self.method_in(at.slice);
        let reference_is_model = !self.config.has_base_in(at.slice);
        let base = match (method.needs_base(), reference_is_model) {
            (true, _) => Some(sources.remove(0)),
            (false, false) => {
                sources.remove(0);
                None
            }
            (false, true) => None,
        };
        // The merged models' indices among the slice's (or the config's) models: inputs are
        // numbered from the reference on, which is a model only when it is not removed above.
        let first = usize::from(!reference_is_model || method.needs_base());
        let among: Vec<usize> = slots.into_iter().filter(|&s| s >= first).map(|s| s - first).collect();
        let params = self.config.tensor_params_among(at.slice, &among, &rmeta.name, &block.spec.name, at.t)?;
        Ok(TensorWork::Float(TensorJob {
            method,
            name: &rmeta.name,
            n: rmeta.numel(),
            base,
            experts: sources,
            params,
            out_dtype: self.out_dtype.or_else(|| self.stream.natural_dtype(t)).unwrap_or(ref_dtype),
            round_result: self.config.result_rounding(),
            name_hash: name_hash(&rmeta.name),
            row_len: rmeta.shape.last().copied().unwrap_or(1),
        }))
    }

    /// Merges one tensor on the CPU into `out_buf`, handing each span's bytes to `sink`, which
    /// returns the buffer for the next span (the same one, or a recycled one when the bytes are
    /// kept, e.g. queued for a writer thread). Whatever a buffer holds is overwritten.
    pub fn merge_tensor_cpu(
        &self,
        tj: &TensorJob<'_>,
        mut out_buf: Vec<u8>,
        sink: &mut dyn FnMut(Vec<u8>) -> Result<Vec<u8>>,
    ) -> Result<()> {
        if let Some(src) = tj.verbatim() {
            return copy_verbatim(tj.name, src, out_buf, sink);
        }
        let rows = tj.method.whole_rows();
        let stats_chunk = tj.chunk_len(super::select::CHUNK, rows);
        let stats = tj.method.prepare(&JobPass { job: tj, chunk: stats_chunk })?;
        let n = tj.n;
        let osize = tj.out_dtype.size();
        let chunk = tj.chunk_len(CHUNK, rows);
        let span_len = (SPAN / chunk).max(1) * chunk;
        let mut span_start = 0;
        while span_start < n {
            let span = span_len.min(n - span_start);
            out_buf.resize(span * osize, 0);
            out_buf.par_chunks_mut(chunk * osize).enumerate().try_for_each_init(Scratch::default, |s, (ci, ob)| {
                let offset = span_start + ci * chunk;
                let ctx = ChunkCtx {
                    offset,
                    params: &tj.params,
                    thresholds: &stats.thresholds,
                    name_hash: tj.name_hash,
                    scalars: &stats.scalars,
                    row_len: tj.row_len,
                };
                merge_chunk(tj, &ctx, s, ob)
            })?;
            out_buf = sink(out_buf)?;
            span_start += span;
        }
        Ok(())
    }
}

/// Merges the chunk of `tj` at `ctx.offset` that `out_bytes` holds, with the tensor's method.
fn merge_chunk(tj: &TensorJob<'_>, ctx: &ChunkCtx<'_>, s: &mut Scratch, out_bytes: &mut [u8]) -> Result<()> {
    let (base, experts, out_dtype) = (tj.base, &tj.experts, tj.out_dtype);
    let len = out_bytes.len() / out_dtype.size();
    s.experts.resize_with(experts.len(), Vec::new);
    if let Some(b) = base {
        s.base.resize(len, 0.0);
        b.read(ctx.offset, &mut s.base)?;
    }
    for (buf, e) in s.experts.iter_mut().zip(experts) {
        buf.resize(len, 0.0);
        e.read(ctx.offset, buf)?;
    }
    s.out.resize(len, 0.0);
    let views: Vec<&[f32]> = s.experts.iter().map(Vec::as_slice).collect();
    tj.method.merge_chunk(ctx, base.map(|_| s.base.as_slice()), &views, &mut s.out, &mut s.method);
    if let Some(d) = tj.round_result {
        round_all(d, &mut s.out);
    }
    if let Some(i) = first_out_of_range(&s.out, out_dtype) {
        return Err(out_of_range(tj.name, ctx.offset + i, s.out[i], out_dtype));
    }
    encode_into(out_dtype, &s.out, out_bytes);
    Ok(())
}

/// Bytes of a verbatim copy that one thread checks and copies at a time.
const VERBATIM_PIECE: usize = 1 << 18;

/// Hands `src`'s stored bytes to `sink` span by span, with the NaN/Inf check every read makes
/// (on the bits: a float is non-finite when its exponent is all ones), both threads checking
/// and copying pieces of each span in one pass.
fn copy_verbatim(
    name: &str,
    src: &Source<'_>,
    mut out_buf: Vec<u8>,
    sink: &mut dyn FnMut(Vec<u8>) -> Result<Vec<u8>>,
) -> Result<()> {
    let bytes = src.bytes();
    let size = src.dtype.size();
    let (span_bytes, piece) = (SPAN * size, VERBATIM_PIECE.next_multiple_of(size));
    for (si, span) in bytes.chunks(span_bytes).enumerate() {
        out_buf.resize(span.len(), 0);
        let bad = out_buf
            .par_chunks_mut(piece)
            .zip(span.par_chunks(piece))
            .enumerate()
            .filter_map(|(c, (out, b))| {
                out.copy_from_slice(b);
                first_non_finite_stored(src.dtype, b).map(|i| (si * span_bytes + c * piece) / size + i)
            })
            .min();
        if let Some(index) = bad {
            let mut value = [0f32];
            decode(src.dtype, &bytes[index * size..(index + 1) * size], &mut value);
            return Err(Error::NonFinite {
                path: src.ckpt.file_of(src.meta).to_path_buf(),
                tensor: name.to_string(),
                index,
                value: value[0],
            });
        }
        out_buf = sink(out_buf)?;
    }
    Ok(())
}

/// Index of the first stored NaN/Inf in `bytes` of `dtype`, from the bits alone: a scan of
/// fixed-size blocks that compiles to vector compares first (the common case is none).
fn first_non_finite_stored(dtype: FloatDType, bytes: &[u8]) -> Option<usize> {
    match dtype {
        FloatDType::F32 => first_exp_all_ones::<4>(bytes, 0x7f80_0000),
        FloatDType::BF16 => first_exp_all_ones::<2>(bytes, 0x7f80),
        FloatDType::F16 => first_exp_all_ones::<2>(bytes, 0x7c00),
    }
}

/// Index of the first little-endian `N`-byte word of `bytes` with every bit of `mask` set.
fn first_exp_all_ones<const N: usize>(bytes: &[u8], mask: u32) -> Option<usize> {
    let hit = |c: &[u8]| {
        let mut word = [0u8; 4];
        word[..N].copy_from_slice(&c[..N]);
        u32::from_le_bytes(word) & mask == mask
    };
    const BLOCK: usize = 64;
    let mut blocks = bytes.chunks_exact(BLOCK * N);
    let clean = blocks.by_ref().take_while(|b| !b.chunks_exact(N).fold(false, |acc, c| acc | hit(c))).count();
    let rest = &bytes[clean * BLOCK * N..];
    rest.chunks_exact(N).position(hit).map(|i| clean * BLOCK + i)
}

/// The error for an output value that is NaN or infinite, or finite but too large for the
/// output dtype (which needs its own message: it is no bug in the inputs).
fn out_of_range(tensor: &str, index: usize, value: f32, dtype: FloatDType) -> Error {
    let tensor = tensor.to_string();
    if !value.is_finite() {
        return Error::NonFiniteOutput { tensor, index, value };
    }
    let max = largest_finite(dtype);
    Error::OutputOverflow { tensor, index, value, dtype: format!("{dtype} ({})", dtype.safetensors_name()), max }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block scan finds the first stored NaN/Inf at any position (inside a block, on its
    /// edges, in the remainder), as an element-by-element scan does.
    #[test]
    fn stored_non_finite_scan_finds_the_first_one() {
        let n = 64 * 5 + 13;
        for dtype in [FloatDType::F32, FloatDType::BF16, FloatDType::F16] {
            let finite: Vec<f32> = (0..n).map(|i| (i as f32 - 150.0) * 0.37).collect();
            for at in [0, 1, 63, 64, 65, 200, 64 * 5 - 1, 64 * 5, n - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut values = finite.clone();
                    values[at] = bad;
                    if at + 7 < n {
                        values[at + 7] = f32::NAN;
                    }
                    let mut bytes = vec![0u8; n * dtype.size()];
                    encode_into(dtype, &values, &mut bytes);
                    assert_eq!(first_non_finite_stored(dtype, &bytes), Some(at), "{dtype:?} {bad} at {at}");
                }
            }
            let mut bytes = vec![0u8; n * dtype.size()];
            encode_into(dtype, &finite, &mut bytes);
            assert_eq!(first_non_finite_stored(dtype, &bytes), None, "{dtype:?}");
        }
    }
}
