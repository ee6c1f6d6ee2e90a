//! Seeded synthetic checkpoints with real model shapes (Llama or BERT names and `config.json`),
//! for tests and benchmarks that need gigabytes of weights: a base model and experts that differ
//! from it by small seeded task vectors. Values come from Philox by element index, so generation
//! runs in parallel and gives the same bytes every time.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::json;

use super::dtype::{FloatDType, encode_into};
use super::writer::{DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, PlannedTensor, ShardWriter};
use crate::error::{Error, Result};
use crate::merge::philox::{ElementStream, name_hash};
use crate::units::parse_size;

/// Family of tensor names and config to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Bert,
}

/// Shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub family: Family,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dtype: FloatDType,
}

/// Named shapes: tiny ones for tests, real ones for benchmarks.
pub const PRESETS: &[(&str, &str)] = &[
    ("llama-tiny", "Llama names, 4 layers, hidden 64 (tests)"),
    ("bert-tiny", "BERT names, 2 layers, hidden 32 (tests)"),
    ("llama-rss", "Llama names, 26 layers, hidden 1024, vocab 8000: 0.7 GB in bf16 (memory test)"),
    ("llama-1b", "TinyLlama-1.1B shapes: 22 layers, hidden 2048, GQA 32/4"),
    ("llama-7b", "Llama-2-7B shapes: 32 layers, hidden 4096"),
];

impl SyntheticSpec {
    pub fn preset(name: &str, dtype: FloatDType) -> Option<Self> {
        let llama = |vocab, hidden, intermediate, layers, heads, kv_heads| SyntheticSpec {
            family: Family::Llama,
            vocab,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            dtype,
        };
        Some(match name {
            "llama-tiny" => llama(512, 64, 176, 4, 4, 2),
            "llama-rss" => llama(8000, 1024, 2816, 26, 16, 16),
            "llama-1b" => llama(32000, 2048, 5632, 22, 32, 4),
            "llama-7b" => llama(32000, 4096, 11008, 32, 32, 32),
            "bert-tiny" => SyntheticSpec {
                family: Family::Bert,
                vocab: 300,
                hidden: 32,
                intermediate: 64,
                layers: 2,
                heads: 4,
                kv_heads: 4,
                dtype,
            },
            _ => return None,
        })
    }

    /// Tensor names and shapes, in the order Hugging Face writes them per layer.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let mut t = Vec::new();
        match self.family {
            Family::Llama => {
                let kv = h / self.heads * self.kv_heads;
                t.push(("model.embed_tokens.weight".to_string(), vec![v, h]));
                for l in 0..self.layers {
                    let p = format!("model.layers.{l}");
                    t.push((format!("{p}.input_layernorm.weight"), vec![h]));
                    t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
                    t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
                    t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
                    t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
                    t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
                    t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                    t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                    t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
                }
                t.push(("model.norm.weight".to_string(), vec![h]));
                t.push(("lm_head.weight".to_string(), vec![v, h]));
            }
            Family::Bert => {
                t.push(("embeddings.word_embeddings.weight".to_string(), vec![v, h]));
                t.push(("embeddings.position_embeddings.weight".to_string(), vec![64, h]));
                t.push(("embeddings.token_type_embeddings.weight".to_string(), vec![2, h]));
                t.push(("embeddings.LayerNorm.weight".to_string(), vec![h]));
                t.push(("embeddings.LayerNorm.bias".to_string(), vec![h]));
                for l in 0..self.layers {
                    let p = format!("encoder.layer.{l}");
                    for m in
                        ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
                    {
                        t.push((format!("{p}.{m}.weight"), vec![h, h]));
                        t.push((format!("{p}.{m}.bias"), vec![h]));
                    }
                    t.push((format!("{p}.attention.output.LayerNorm.weight"), vec![h]));
                    t.push((format!("{p}.attention.output.LayerNorm.bias"), vec![h]));
                    t.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
                    t.push((format!("{p}.intermediate.dense.bias"), vec![i]));
                    t.push((format!("{p}.output.dense.weight"), vec![h, i]));
                    t.push((format!("{p}.output.dense.bias"), vec![h]));
                    t.push((format!("{p}.output.LayerNorm.weight"), vec![h]));
                    t.push((format!("{p}.output.LayerNorm.bias"), vec![h]));
                }
                t.push(("pooler.dense.weight".to_string(), vec![h, h]));
                t.push(("pooler.dense.bias".to_string(), vec![h]));
            }
        }
        t
    }

    /// Parameters in the model.
    pub fn num_params(&self) -> u64 {
        self.tensors().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
    }

    fn config_json(&self) -> serde_json::Value {
        match self.family {
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "hidden_act": "silu",
                "max_position_embeddings": 4096,
                "tie_word_embeddings": false,
                "torch_dtype": self.dtype.torch_name(),
            }),
            Family::Bert => json!({
                "architectures": ["BertModel"],
                "model_type": "bert",
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "vocab_size": self.vocab,
                "max_position_embeddings": 64,
                "type_vocab_size": 2,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-12,
                "torch_dtype": self.dtype.torch_name(),
            }),
        }
    }
}

/// Which model of a family to write: the base, or expert `k` (base + a task vector).
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    Base,
    Expert { index: u32, scale: f32 },
}

/// Writes one synthetic model into `dir`, sharded at `shard_bytes`; it appears complete or not at
/// all (built in a staging directory, then replacing `dir`). Only an earlier symerge output or an
/// empty directory at `dir` is replaced (see [`crate::atomic::check_output_dir`]).
pub fn write_model(spec: &SyntheticSpec, seed: u64, variant: Variant, dir: &Path, shard_bytes: u64) -> Result<PathBuf> {
    crate::atomic::check_output_dir(dir, true)?;
    let staging = crate::atomic::Staging::create(dir)?;
    write_model_into(spec, seed, variant, staging.path(), shard_bytes)?;
    staging.commit(dir, true)?;
    Ok(dir.to_path_buf())
}

fn write_model_into(spec: &SyntheticSpec, seed: u64, variant: Variant, dir: &Path, shard_bytes: u64) -> Result<()> {
    let tensors = spec.tensors();
    let planned = tensors
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            dtype: spec.dtype.to_safetensors(),
            shape: shape.clone(),
        })
        .collect();
    let mut writer = ShardWriter::create(dir, planned, shard_bytes)?;
    let span = 1 << 22;
    let mut bytes = Vec::new();
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let is_norm = (shape.len() == 1 && name.contains("norm")) || name.ends_with("LayerNorm.weight");
        let h = name_hash(name);
        let base = ElementStream::new(seed, h, u32::MAX);
        let mut start = 0;
        while start < n {
            let len = span.min(n - start);
            bytes.resize(len * spec.dtype.size(), 0);
            bytes.par_chunks_mut(65536 * spec.dtype.size()).enumerate().for_each(|(ci, out)| {
                let off = start + ci * 65536;
                let m = out.len() / spec.dtype.size();
                let mut vals = vec![0f32; m];
                base.fill_uniform(off, &mut vals);
                for v in vals.iter_mut() {
                    *v = if is_norm { 1.0 + 0.1 * (*v - 0.5) } else { 0.08 * (*v - 0.5) };
                }
                if let Variant::Expert { index, scale } = variant {
                    let mut d = vec![0f32; m];
                    ElementStream::new(seed, h, index).fill_uniform(off, &mut d);
                    for (v, d) in vals.iter_mut().zip(&d) {
                        *v += scale * (2.0 * d - 1.0);
                    }
                }
                encode_into(spec.dtype, &vals, out);
            });
            writer.write(name, &bytes)?;
            start += len;
        }
    }
    writer.finish()?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&spec.config_json()).expect("JSON"))
        .map_err(|e| Error::io(&cfg, e))?;
    Ok(())
}

/// `symerge generate`'s flags: which family to write and where (their defaults are
/// [`GenerateOptions::default`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateOptions {
    /// Shape preset (see `symerge generate --list`).
    #[arg(long, default_value = "llama-tiny")]
    pub preset: String,
    /// Output directory; gets base/ and expert-1/ .. expert-K/ (each replaces only an earlier
    /// symerge output or an empty directory).
    #[arg(short, long, required_unless_present = "list")]
    pub output: Option<PathBuf>,
    #[arg(long, default_value = "bfloat16")]
    pub dtype: FloatDType,
    #[arg(long, default_value_t = 3)]
    pub experts: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Size of the experts' task vectors (uniform in +-scale).
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true, value_parser = parse_delta_scale)]
    pub delta_scale: f32,
    #[arg(long, default_value = DEFAULT_SHARD_SIZE, value_parser = parse_size)]
    pub out_shard_size: u64,
    /// List the presets.
    #[arg(long)]
    pub list: bool,
}

impl Default for GenerateOptions {
    /// `llama-tiny` in bfloat16, three experts, seed 0, task vectors of 0.01, 5 GB shards, and no
    /// output directory yet.
    fn default() -> Self {
        GenerateOptions {
            preset: "llama-tiny".into(),
            output: None,
            dtype: FloatDType::BF16,
            experts: 3,
            seed: 0,
            delta_scale: 0.01,
            out_shard_size: DEFAULT_SHARD_BYTES,
            list: false,
        }
    }
}

impl GenerateOptions {
    /// The preset's shape in the chosen dtype; an unknown name lists the known ones.
    pub fn spec(&self) -> Result<SyntheticSpec> {
        SyntheticSpec::preset(&self.preset, self.dtype).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            Error::Invalid(format!("unknown preset `{}` (available: {})", self.preset, names.join(", ")))
        })
    }

    /// Writes the base model and the experts into the output directory (see [`write_family`]).
    pub fn generate(&self) -> Result<GenerateSummary> {
        let output = self.output.as_deref().ok_or_else(|| Error::Invalid("--output is required".into()))?;
        let spec = self.spec()?;
        if !self.delta_scale.is_finite() {
            return Err(Error::Invalid(format!("--delta-scale {}: must be a finite number", self.delta_scale)));
        }
        // Weights are within 1.05 of zero before the delta: a scale past the dtype's range
        // would write experts full of infinities that every other command then refuses.
        let max = super::dtype::largest_finite(spec.dtype);
        if self.delta_scale.abs() > max - 1.05 {
            return Err(Error::Invalid(format!(
                "--delta-scale {}: the experts' weights would exceed {max}, the largest finite {} value",
                self.delta_scale, spec.dtype
            )));
        }
        tracing::info!("writing {} params x {} models to {}", spec.num_params(), self.experts + 1, output.display());
        let models = write_family(&spec, self.seed, self.experts, self.delta_scale, output, self.out_shard_size)?;
        Ok(GenerateSummary { preset: self.preset.clone(), params: spec.num_params(), models })
    }
}

/// The presets and what they are (`symerge generate --list`; `--json` prints them as JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresetList {
    pub presets: Vec<PresetInfo>,
}

/// One preset: its name and what it is shaped like.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresetInfo {
    pub name: &'static str,
    pub about: &'static str,
}

/// Every preset, in [`PRESETS`] order.
pub fn preset_list() -> PresetList {
    PresetList { presets: PRESETS.iter().map(|&(name, about)| PresetInfo { name, about }).collect() }
}

/// One preset per line, name then what it is.
impl std::fmt::Display for PresetList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.presets.iter().try_for_each(|p| writeln!(f, "{:<12} {}", p.name, p.about))
    }
}

/// What `generate` wrote (`--json`); its text form is one model directory per line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateSummary {
    pub preset: String,
    /// Parameters per model.
    pub params: u64,
    /// `base` first, then `expert-1 .. expert-K`.
    pub models: Vec<PathBuf>,
}

impl std::fmt::Display for GenerateSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.models.iter().try_for_each(|d| writeln!(f, "{}", d.display()))
    }
}

/// Writes `dir/base` and `dir/expert-1 .. expert-K`; returns their paths. Every model directory
/// is checked before the first is written, so a refused one leaves the others as they were; a
/// model whose writing fails leaves nothing (the ones before it stay, complete).
pub fn write_family(
    spec: &SyntheticSpec,
    seed: u64,
    experts: u32,
    delta_scale: f32,
    dir: &Path,
    shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    let models: Vec<(Variant, PathBuf)> = std::iter::once((Variant::Base, dir.join("base")))
        .chain(
            (1..=experts).map(|k| (Variant::Expert { index: k, scale: delta_scale }, dir.join(format!("expert-{k}")))),
        )
        .collect();
    for (_, d) in &models {
        crate::atomic::check_output_dir(d, true)?;
    }
    let existed = dir.exists();
    // Every model is staged before any is renamed into place: a failure or an interrupt leaves
    // no model of the family (a base without its experts looked like a finished family), and
    // no empty family directory this run created.
    let written = stage_and_commit(spec, seed, &models, shard_bytes);
    if written.is_err() && !existed {
        let _ = std::fs::remove_dir(dir);
    }
    written
}

fn stage_and_commit(
    spec: &SyntheticSpec,
    seed: u64,
    models: &[(Variant, PathBuf)],
    shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    let mut staged = Vec::with_capacity(models.len());
    for (variant, d) in models {
        let staging = crate::atomic::Staging::create(d)?;
        write_model_into(spec, seed, *variant, staging.path(), shard_bytes)?;
        staged.push(staging);
    }
    for (staging, (_, d)) in staged.into_iter().zip(models) {
        staging.commit(d, true)?;
    }
    Ok(models.iter().map(|(_, d)| d.clone()).collect())
}

/// `--delta-scale`: a number within float32's range, refused as given (`1e39` was reported as
/// "inf"); negative scales are numbers, not flags.
fn parse_delta_scale(s: &str) -> std::result::Result<f32, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    let f = v as f32;
    if !f.is_finite() {
        return Err(format!("must be a finite number within float32's range (|x| <= {:e})", f32::MAX));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let opts: GenerateOptions = parse_args(&["-o", "out"]).unwrap();
        let want = GenerateOptions { output: Some("out".into()), ..GenerateOptions::default() };
        assert_eq!(format!("{opts:?}"), format!("{want:?}"));
        let opts: GenerateOptions = parse_args(&["--list"]).unwrap();
        assert!(opts.list && opts.output.is_none(), "--list needs no output");
        assert!(parse_args::<GenerateOptions>(&[]).is_err(), "--output is required otherwise");
    }

    #[test]
    fn unknown_presets_and_missing_outputs_are_refused() {
        let opts = GenerateOptions { preset: "llama-huge".into(), ..GenerateOptions::default() };
        let e = opts.spec().unwrap_err().to_string();
        assert!(e.contains("llama-huge") && e.contains("llama-tiny"), "{e}");
        assert!(GenerateOptions::default().generate().unwrap_err().to_string().contains("--output"));
        assert_eq!(preset_list().to_string().lines().count(), PRESETS.len());
    }
}
