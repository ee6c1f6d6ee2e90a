//! The streaming merge executor: opens the inputs, plans the output, and runs a method over
//! the layer stream block by block, tensor by tensor, chunk by chunk, writing shards as it goes.
//!
//! Nothing is visible at the output path until the merge has fully succeeded: shards are
//! written into a hidden temporary directory beside it, which is renamed into place at the end
//! and removed on any error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::config::MergeConfig;
use super::philox::name_hash;
use super::select::{Threshold, keep_count, magnitude_threshold};
use super::{ChunkCtx, MergeMethod};
use crate::atomic::Staging;
use crate::checkpoint::dtype::{decode, encode_into};
use crate::checkpoint::reader::{INDEX_NAME, SINGLE_NAME};
use crate::checkpoint::stream::{StreamBlock, StreamTensor};
use crate::checkpoint::writer::BackgroundWriter;
use crate::checkpoint::{Checkpoint, FloatDType, LayerStream, PlannedTensor, ShardWriter, TensorMeta};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sysinfo::peak_rss_bytes;

/// Elements per output write: bounds the output buffer to a few MB whatever the tensor size.
const SPAN: usize = 1 << 22;

/// Elements a worker merges at a time: small enough that the decoded base, the K experts and
/// the method's scratch stay in L2 (measured: 35% less CPU time than 64Ki-element chunks).
const CHUNK: usize = 1 << 12;

/// How and where to write the merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub output: PathBuf,
    pub max_shard_bytes: u64,
    /// Overrides the config's dtype.
    pub out_dtype: Option<FloatDType>,
    /// Replace an existing output.
    pub force: bool,
    /// Show a progress bar (TTY) or log lines.
    pub progress: bool,
}

/// Machine-readable account of a merge (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct MergeSummary {
    pub method: String,
    pub output: PathBuf,
    pub models: usize,
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

/// Merges the models of `config` into `opts.output`.
pub fn merge(config: &MergeConfig, opts: &MergeOptions) -> Result<MergeSummary> {
    let start = Instant::now();
    if opts.output.exists() && !opts.force {
        return Err(Error::OutputExists { path: opts.output.clone() });
    }
    let method = config.build_method();

    // Task-vector methods: the base is the reference and the experts are the inputs. Linear:
    // the first model is the reference and also the first averaged model.
    let base = config.base_model.as_deref().map(Checkpoint::open).transpose()?;
    let models = config.models.iter().map(|m| Checkpoint::open(&m.path)).collect::<Result<Vec<_>>>()?;
    let (reference, inputs): (&Checkpoint, Vec<&Checkpoint>) = if method.needs_base() {
        let base = base.as_ref().expect("config validation requires base_model");
        (base, models.iter().collect())
    } else {
        (&models[0], models[1..].iter().collect())
    };
    let stream = LayerStream::plan(reference, inputs)?;
    if !stream.ignored.is_empty() {
        let sample: Vec<&str> = stream.ignored.iter().take(5).map(|(_, n)| n.as_str()).collect();
        tracing::warn!(
            "{} tensors of the inputs are not in the reference model and are left out (e.g. {})",
            stream.ignored.len(),
            sample.join(", ")
        );
    }
    let out_dtype = opts.out_dtype.or(config.out_dtype);
    check_lambda_table(config, &stream)?;

    let planned: Vec<PlannedTensor> = stream
        .blocks
        .iter()
        .flat_map(|b| &b.tensors)
        .map(|t| {
            let m = &reference.tensors[t.reference];
            PlannedTensor {
                name: m.name.clone(),
                dtype: match (m.float_dtype(), out_dtype) {
                    (Some(_), Some(o)) => o.to_safetensors(),
                    _ => m.dtype,
                },
                shape: m.shape.clone(),
            }
        })
        .collect();
    let total_input: u64 = stream.blocks.iter().map(|b| stream.block_input_bytes(b)).sum();

    let staging = Staging::create(&opts.output)?;
    // config.json and tokenizer files come from the base model when there is one.
    let side_src = base.as_ref().map_or(&reference.dir, |b| &b.dir);
    copy_side_files(side_src, staging.path(), out_dtype)?;
    let writer = ShardWriter::create(staging.path(), planned, opts.max_shard_bytes)?;
    let shards = writer.num_shards();
    let mut writer = BackgroundWriter::spawn(writer, 2);

    let mut progress = Progress::new("merge", total_input, opts.progress);
    let nblocks = stream.blocks.len();
    let job = Job { method: method.as_ref(), stream: &stream, config, out_dtype };
    stream.for_each_block(|bi, block| {
        let position = if nblocks > 1 { bi as f64 / (nblocks - 1) as f64 } else { 0.0 };
        for t in &block.tensors {
            job.merge_tensor(block, t, position, &mut writer)?;
        }
        progress.advance(&block.spec.name, stream.block_input_bytes(block));
        Ok(())
    })?;
    progress.finish();
    let written = writer.finish()?;
    staging.commit(&opts.output, opts.force)?;

    let seconds = start.elapsed().as_secs_f64();
    Ok(MergeSummary {
        method: method.name().to_string(),
        output: opts.output.clone(),
        models: config.models.len() + usize::from(method.needs_base()),
        blocks: nblocks,
        tensors: reference.tensors.len(),
        params: reference.num_params(),
        shards,
        bytes_read: total_input,
        bytes_written: written.bytes,
        seconds,
        read_gb_per_s: total_input as f64 / seconds / 1e9,
        peak_rss_bytes: peak_rss_bytes(),
        ignored_tensors: stream.ignored.len(),
    })
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
    Ok(())
}

/// The fixed parts of one merge, shared by every tensor.
struct Job<'a> {
    method: &'a dyn MergeMethod,
    stream: &'a LayerStream<'a>,
    config: &'a MergeConfig,
    out_dtype: Option<FloatDType>,
}

/// A tensor as one input holds it.
#[derive(Clone, Copy)]
struct Source<'a> {
    ckpt: &'a Checkpoint,
    meta: &'a TensorMeta,
    dtype: FloatDType,
}

impl Source<'_> {
    /// Decodes elements `offset .. offset + out.len()` and rejects NaN/Inf, naming the file.
    fn read(&self, offset: usize, out: &mut [f32]) -> Result<()> {
        let size = self.dtype.size();
        let bytes = &self.ckpt.bytes(self.meta)[offset * size..(offset + out.len()) * size];
        decode(self.dtype, bytes, out);
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

/// Per-thread buffers for one chunk.
#[derive(Default)]
struct Scratch {
    base: Vec<f32>,
    experts: Vec<Vec<f32>>,
    out: Vec<f32>,
    method: Vec<f32>,
}

impl Job<'_> {
    fn merge_tensor(
        &self,
        block: &StreamBlock,
        t: &StreamTensor,
        position: f64,
        writer: &mut BackgroundWriter,
    ) -> Result<()> {
        let reference = self.stream.reference;
        let rmeta = &reference.tensors[t.reference];
        let Some(ref_dtype) = rmeta.float_dtype() else {
            // Integer/bool buffers (e.g. position ids) are not weights: copied from the reference.
            return writer.write(&rmeta.name, reference.bytes(rmeta).to_vec());
        };
        let mut sources: Vec<Source<'_>> = Vec::with_capacity(t.inputs.len() + 1);
        sources.push(Source { ckpt: reference, meta: rmeta, dtype: ref_dtype });
        for (c, &i) in self.stream.inputs.iter().zip(&t.inputs) {
            let meta = &c.tensors[i];
            let dtype = meta.float_dtype().ok_or_else(|| Error::UnsupportedDtype {
                path: c.file_of(meta).to_path_buf(),
                tensor: meta.name.clone(),
                dtype: format!("{:?}", meta.dtype),
            })?;
            sources.push(Source { ckpt: c, meta, dtype });
        }
        let (base, experts): (Option<Source<'_>>, &[Source<'_>]) =
            if self.method.needs_base() { (Some(sources[0]), &sources[1..]) } else { (None, &sources[..]) };

        let params = self.config.tensor_params(&rmeta.name, &block.spec.name, position)?;
        let n = rmeta.numel();
        let thresholds = if self.method.needs_thresholds() {
            let base = base.expect("threshold methods use a base");
            experts
                .iter()
                .zip(&params.densities)
                .map(|(e, &d)| {
                    magnitude_threshold(n, keep_count(d as f64, n), |off, out| {
                        let mut b = vec![0f32; out.len()];
                        base.read(off, &mut b)?;
                        e.read(off, out)?;
                        out.iter_mut().zip(&b).for_each(|(x, y)| *x -= y);
                        Ok(())
                    })
                })
                .collect::<Result<Vec<Threshold>>>()?
        } else {
            Vec::new()
        };

        let out_dtype = self.out_dtype.unwrap_or(ref_dtype);
        let osize = out_dtype.size();
        let name_hash = name_hash(&rmeta.name);
        let mut span_start = 0;
        while span_start < n {
            let span = SPAN.min(n - span_start);
            let mut out_buf = writer.buffer();
            out_buf.resize(span * osize, 0);
            out_buf.par_chunks_mut(CHUNK * osize).enumerate().try_for_each_init(Scratch::default, |s, (ci, ob)| {
                let offset = span_start + ci * CHUNK;
                let len = ob.len() / osize;
                let ctx = ChunkCtx { offset, params: &params, thresholds: &thresholds, name_hash };
                self.merge_chunk(&ctx, base, experts, s, len, out_dtype, ob, &rmeta.name)
            })?;
            writer.write(&rmeta.name, out_buf)?;
            span_start += span;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_chunk(
        &self,
        ctx: &ChunkCtx<'_>,
        base: Option<Source<'_>>,
        experts: &[Source<'_>],
        s: &mut Scratch,
        len: usize,
        out_dtype: FloatDType,
        out_bytes: &mut [u8],
        tensor: &str,
    ) -> Result<()> {
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
        self.method.merge_chunk(ctx, base.map(|_| s.base.as_slice()), &views, &mut s.out, &mut s.method);
        if let Some(i) = first_out_of_range(&s.out, out_dtype) {
            return Err(Error::NonFiniteOutput { tensor: tensor.to_string(), index: ctx.offset + i, value: s.out[i] });
        }
        encode_into(out_dtype, &s.out, out_bytes);
        Ok(())
    }
}

/// Index of the first NaN/Inf, with a branch-free scan first (the common case is none).
fn first_non_finite(x: &[f32]) -> Option<usize> {
    let bad = x.iter().fold(false, |acc, v| acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    if bad { x.iter().position(|v| !v.is_finite()) } else { None }
}

/// Index of the first value that is not finite or would overflow the output dtype.
fn first_out_of_range(x: &[f32], dtype: FloatDType) -> Option<usize> {
    match dtype {
        // Values from 65520 up round to infinity in f16.
        FloatDType::F16 => x.iter().position(|v| v.is_nan() || v.abs() >= 65520.0),
        _ => first_non_finite(x),
    }
}

/// Extensions of weight files that are never copied beside the merged weights.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "ot", "onnx", "gguf"];

/// Copies `config.json`, tokenizer files and other small non-weight files (recursively, e.g. a
/// sentence-transformers `1_Pooling/`) from `src` into the output, updating `torch_dtype` in the
/// top-level `config.json` when the output dtype changes.
fn copy_side_files(src: &Path, dst: &Path, out_dtype: Option<FloatDType>) -> Result<()> {
    copy_side_dir(src, dst, out_dtype, true)
}

fn copy_side_dir(src: &Path, dst: &Path, out_dtype: Option<FloatDType>, top: bool) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let target = dst.join(&name);
        if path.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            copy_side_dir(&path, &target, out_dtype, false)?;
            continue;
        }
        let is_weights = path.extension().is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_string_lossy().as_ref()));
        if !path.is_file() || is_weights || name == INDEX_NAME || name == SINGLE_NAME {
            continue;
        }
        match (top && name == "config.json", out_dtype) {
            (true, Some(dt)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let mut cfg: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::BadIndex { path: path.clone(), reason: format!("invalid JSON: {e}") })?;
                if let Some(obj) = cfg.as_object_mut() {
                    obj.insert("torch_dtype".into(), dt.torch_name().into());
                }
                let text = serde_json::to_string_pretty(&cfg).expect("JSON value");
                std::fs::write(&target, text).map_err(|e| Error::io(&target, e))?;
            }
            _ => {
                std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    Ok(())
}
