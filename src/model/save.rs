//! Writing a [`Bert`] back out as a Hugging Face checkpoint directory that `transformers` (and
//! [`Bert::load`]) read: `model.safetensors` with `BertForSequenceClassification` /
//! `RobertaForSequenceClassification` tensor names, a `config.json` naming the classes, and the
//! source model's tokenizer files.
//!
//! The directory is assembled in a hidden staging directory and renamed into place at the end,
//! so an error (or a crash) never leaves a half-written model at the output path.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::Params;
use super::bert::{Bert, Block, HeadStyle};
use super::causal::{LmArch, LmModel};
use super::chain::ChainBlock;
use super::config::BertFamily;
use crate::atomic::Staging;
use crate::backend::Backend;
use crate::checkpoint::dtype::{encode_into, first_out_of_range, largest_finite};
use crate::checkpoint::{FloatDType, PlannedTensor, ShardWriter};
use crate::error::{Error, Result};

/// Tokenizer files copied from the source model when present: whatever a `transformers`
/// tokenizer of the BERT family (WordPiece, BPE, SentencePiece) may need.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
];

/// Whether the file system that will hold `output` has room for `params` in `dtype`, checked
/// before training (the write itself checks again): a full disk found only at the end costs
/// the whole run.
pub fn check_room<B: Backend>(output: &Path, params: &[Params<B>], dtype: FloatDType) -> Result<()> {
    let elems = |p: &super::Param<B>| p.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
    let need = params.iter().flat_map(|p| p.values()).fold(0u64, |a, p| a.saturating_add(elems(p)));
    check_room_bytes(output, need.saturating_mul(dtype.size() as u64))
}

/// Whether the file system that will hold `output` has `need` bytes free; the error names the
/// folder the output goes into.
pub fn check_room_bytes(output: &Path, need: u64) -> Result<()> {
    match crate::sysinfo::free_disk_bytes(output) {
        Some(free) if need > free => Err(Error::NoSpace {
            path: crate::atomic::public_path(
                output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")),
            ),
            need,
            free,
        }),
        _ => Ok(()),
    }
}

/// How to write a model.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Storage dtype of the weights (`config.json`'s `torch_dtype` says the same).
    pub dtype: FloatDType,
    /// Class names in id order, written as `id2label` / `label2id`; `None` writes Hugging Face's
    /// defaults (`LABEL_0`, ...).
    pub labels: Option<Vec<String>>,
    /// Replace an existing output directory, if a previous symerge run wrote it or it is empty
    /// (see [`crate::atomic::check_output_dir`]).
    pub force: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { dtype: FloatDType::F32, labels: None, force: false }
    }
}

/// Supplies a block's parameters while a model is written (`None`: the model's own).
pub type BlockFetch<'a, B> = dyn FnMut(usize) -> Result<Option<Params<B>>> + 'a;

/// What [`Bert::save`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SavedModel {
    pub dir: PathBuf,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

impl<B: Backend> Bert<B> {
    /// The directory holding the source checkpoint's `config.json` and tokenizer files.
    pub fn source_dir(&self) -> &Path {
        if self.path.is_dir() { &self.path } else { self.path.parent().unwrap_or(Path::new(".")) }
    }

    /// The architecture name and tensor-name prefix of the encoder (`bert.` / `roberta.`). A
    /// model without a head is written as the bare encoder, without a prefix (and without a
    /// pooler, which [`Bert`] only holds as part of a head).
    fn layout(&self) -> (&'static str, &'static str) {
        match (self.config.family, self.head().is_some()) {
            (BertFamily::Bert, true) => ("BertForSequenceClassification", "bert."),
            (BertFamily::Roberta, true) => ("RobertaForSequenceClassification", "roberta."),
            (BertFamily::Bert, false) => ("BertModel", ""),
            (BertFamily::Roberta, false) => ("RobertaModel", ""),
        }
    }

    /// The checkpoint name of a parameter: the encoder and BERT's pooler get the wrapper prefix,
    /// the classifier keeps its own (`classifier.weight`, `classifier.out_proj.weight`).
    fn checkpoint_name(&self, block: &Block, name: &str) -> String {
        let prefix = self.layout().1;
        match block {
            Block::Head(h) if h.style == HeadStyle::Bert && name.starts_with("pooler.") => format!("{prefix}{name}"),
            Block::Head(_) => name.to_string(),
            _ => format!("{prefix}{name}"),
        }
    }

    /// Writes the model into the directory `output` (see the module notes). Fails if `output`
    /// exists and `opts.force` is off or it is not ours to replace, or if a weight is not finite
    /// (a diverged run).
    pub fn save(&self, output: &Path, opts: &SaveOptions) -> Result<SavedModel> {
        self.save_with(output, opts, &mut |_| Ok(None))
    }

    /// [`Bert::save`] where `fetch(b)` may supply block `b`'s parameters (`Some`) instead of
    /// [`Bert::params`]: adaptation writes merged blocks one at a time this way, never holding
    /// the whole merged model.
    pub fn save_with(&self, output: &Path, opts: &SaveOptions, fetch: &mut BlockFetch<'_, B>) -> Result<SavedModel> {
        crate::atomic::check_output_dir(output, opts.force)?;
        if let (Some(labels), Some(n)) = (&opts.labels, self.num_labels())
            && labels.len() != n
        {
            return Err(Error::Invalid(format!("{} label names given for a model with {n} classes", labels.len())));
        }
        let dtype = opts.dtype;
        let mut planned = Vec::new();
        for block in &self.blocks {
            for (name, shape) in block.param_shapes() {
                let name = self.checkpoint_name(block, &name);
                planned.push(PlannedTensor { name, dtype: dtype.to_safetensors(), shape });
            }
        }
        let staging = Staging::create(output)?;
        let config = self.hf_config(opts)?;
        let config_path = staging.path().join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON value") + "\n";
        std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
        for name in TOKENIZER_FILES {
            let src = self.source_dir().join(name);
            if src.is_file() {
                let dst = staging.path().join(name);
                crate::atomic::copy_file(&src, &dst)?;
            }
        }

        let tensors = planned.len();
        let params: u64 = planned.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
        let mut writer = ShardWriter::create(staging.path(), planned, u64::MAX)?;
        for (b, (block, params)) in self.blocks.iter().zip(&self.params).enumerate() {
            match fetch(b)? {
                Some(p) => self.write_block(&mut writer, block, &p, dtype)?,
                None => self.write_block(&mut writer, block, params, dtype)?,
            }
        }
        let written = writer.finish()?;
        staging.commit(output, opts.force)?;
        let line = format!("saved {tensors} tensors ({params} parameters, {dtype}) to {}", output.display());
        // Inside another output's staging directory (adapt's task models) the path vanishes
        // when that output is renamed into place: a detail, not the result.
        if crate::atomic::in_staging(output) {
            tracing::debug!("{line}");
        } else {
            tracing::info!("{line}");
        }
        Ok(SavedModel { dir: output.to_path_buf(), tensors, params, bytes: written.bytes })
    }

    fn write_block(
        &self,
        writer: &mut ShardWriter,
        block: &Block,
        params: &Params<B>,
        dtype: FloatDType,
    ) -> Result<()> {
        let mut bytes = Vec::new();
        for (name, _) in block.param_shapes() {
            let p = params.get(&name).ok_or_else(|| {
                Error::Invalid(format!("parameter `{name}` is missing from block `{}`", block.name()))
            })?;
            let values = self.backend.download(&p.buf)?;
            let stored = self.checkpoint_name(block, &name);
            check_writable(&stored, &values, dtype)?;
            bytes.resize(values.len() * dtype.size(), 0);
            encode_into(dtype, &values, &mut bytes);
            writer.write(&stored, &bytes)?;
        }
        Ok(())
    }

    /// The source `config.json` with the architecture, classes and dtype of this model.
    fn hf_config(&self, opts: &SaveOptions) -> Result<Value> {
        let path = self.source_dir().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model { path: path.clone(), reason: format!("invalid JSON: {e}") })?;
        let obj = cfg
            .as_object_mut()
            .ok_or_else(|| Error::Model { path: path.clone(), reason: "config.json is not a JSON object".into() })?;
        obj.insert("architectures".into(), Value::from(vec![self.layout().0]));
        obj.insert("torch_dtype".into(), opts.dtype.torch_name().into());
        match self.num_labels() {
            Some(n) => {
                let names: Vec<String> = match &opts.labels {
                    Some(l) => l.clone(),
                    None => (0..n).map(|i| format!("LABEL_{i}")).collect(),
                };
                let id2label: Map<String, Value> =
                    names.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone().into())).collect();
                let label2id: Map<String, Value> =
                    names.iter().enumerate().map(|(i, l)| (l.clone(), i.into())).collect();
                if label2id.len() != names.len() {
                    return Err(Error::Invalid(format!("class names are not distinct: {names:?}")));
                }
                obj.insert("num_labels".into(), n.into());
                obj.insert("id2label".into(), id2label.into());
                obj.insert("label2id".into(), label2id.into());
                obj.insert("problem_type".into(), "single_label_classification".into());
            }
            None => {
                for key in ["num_labels", "id2label", "label2id", "problem_type"] {
                    obj.remove(key);
                }
            }
        }
        Ok(cfg)
    }
}

/// Refuses a non-finite weight (a diverged model) and one that `dtype` cannot hold (which
/// [`encode_into`] would silently turn into inf), naming tensor, element and value, as merge does.
fn check_writable(tensor: &str, values: &[f32], dtype: FloatDType) -> Result<()> {
    let Some(i) = first_out_of_range(values, dtype) else { return Ok(()) };
    let value = values[i];
    if !value.is_finite() {
        return Err(Error::Invalid(format!(
            "parameter `{tensor}` holds a non-finite value ({value}) at element {i}; not saving a diverged model"
        )));
    }
    let (dtype, max) = (format!("{dtype} ({})", dtype.safetensors_name()), largest_finite(dtype));
    Err(Error::SaveOverflow { tensor: tensor.into(), index: i, value, dtype, max })
}

impl<B: Backend, A: LmArch<B>> LmModel<B, A> {
    /// Writes the model as a Hugging Face causal-LM directory that [`LmModel::load`] and
    /// `transformers` read: `model.safetensors` in f32 (a tied embedding once;
    /// [`LmModel::save_with`] takes another dtype), the source `config.json` with
    /// `tie_word_embeddings` as this model's config has it, and the source's tokenizer files.
    /// Atomic, and refuses non-finite weights, like [`Bert::save`].
    pub fn save(&self, output: &Path, force: bool) -> Result<SavedModel> {
        self.save_with(output, &SaveOptions { force, ..SaveOptions::default() }, &mut |_| Ok(None))
    }

    /// [`LmModel::save`] in `opts.dtype` (its `labels` do not apply), where `fetch(b)` may supply
    /// block `b`'s parameters (`Some`) instead of [`LmModel::params`], one block at a time
    /// (adaptation's merged blocks).
    pub fn save_with(&self, output: &Path, opts: &SaveOptions, fetch: &mut BlockFetch<'_, B>) -> Result<SavedModel> {
        let (dtype, force) = (opts.dtype, opts.force);
        crate::atomic::check_output_dir(output, force)?;
        let source =
            if self.path.is_dir() { self.path.as_path() } else { self.path.parent().unwrap_or(Path::new(".")) };
        // Each tensor once, in block order (a tied embedding is written with the embedding).
        let mut planned: Vec<PlannedTensor> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let tied = self.config.tied();
        for (b, block) in self.blocks.iter().enumerate() {
            for (name, shape) in block.param_shapes() {
                if planned.iter().all(|t| t.name != name) {
                    planned.push(PlannedTensor { name, dtype: dtype.to_safetensors(), shape });
                    owner.push(b);
                }
            }
        }
        let staging = Staging::create(output)?;
        self.write_lm_side_files(source, staging.path(), tied, dtype)?;
        let params: u64 = planned.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
        let tensors: Vec<(String, usize)> = planned.iter().map(|t| t.name.clone()).zip(owner).collect();
        let mut writer = ShardWriter::create(staging.path(), planned, u64::MAX)?;
        let mut bytes = Vec::new();
        for (b, (block, own)) in self.blocks.iter().zip(&self.params).enumerate() {
            let fetched = fetch(b)?;
            let p = fetched.as_ref().unwrap_or(own);
            for (name, _) in tensors.iter().filter(|(_, o)| *o == b) {
                let t = p.get(name).ok_or_else(|| {
                    Error::Invalid(format!("parameter `{name}` is missing from block `{}`", block.name()))
                })?;
                let values = self.backend.download(&t.buf)?;
                check_writable(name, &values, dtype)?;
                bytes.resize(values.len() * dtype.size(), 0);
                encode_into(dtype, &values, &mut bytes);
                writer.write(name, &bytes)?;
            }
        }
        let written = writer.finish()?;
        staging.commit(output, force)?;
        Ok(SavedModel { dir: output.to_path_buf(), tensors: tensors.len(), params, bytes: written.bytes })
    }

    /// `config.json` (with `tie_word_embeddings` as this model's head has it, and `dtype`), the
    /// source's tokenizer files and its generation_config.json.
    fn write_lm_side_files(&self, source: &Path, dir: &Path, tied: bool, dtype: FloatDType) -> Result<()> {
        let config_path = source.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model { path: config_path.clone(), reason: format!("invalid JSON: {e}") })?;
        let obj = cfg.as_object_mut().ok_or_else(|| Error::Model {
            path: config_path.clone(),
            reason: "config.json is not a JSON object".into(),
        })?;
        obj.insert("tie_word_embeddings".into(), tied.into());
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
        let out_config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&cfg).expect("JSON value") + "\n";
        std::fs::write(&out_config, text).map_err(|e| Error::io(&out_config, e))?;
        // generation_config.json too: where generation stops (EOS ids, an end-of-turn token) is
        // the model's, and transformers would otherwise derive it from config.json's single EOS.
        for name in TOKENIZER_FILES.iter().chain(&["generation_config.json"]) {
            let src = source.join(name);
            if src.is_file() {
                let dst = dir.join(name);
                crate::atomic::copy_file(&src, &dst)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::Param;

    /// Room is counted from the parameters' shapes in the output dtype; more than any disk
    /// holds is refused, naming the output's folder.
    #[test]
    fn check_room_counts_the_parameters_in_the_output_dtype() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let mut small = Params::<Cpu>::new();
        small.insert("w".into(), Param { shape: vec![4, 4], buf: vec![0.0; 16] });
        check_room(&out, &[small], FloatDType::F32).unwrap();
        let mut huge = Params::<Cpu>::new();
        // Shapes only: nothing of this size is allocated.
        huge.insert("w".into(), Param { shape: vec![1 << 31, 1 << 31], buf: Vec::new() });
        match check_room(&out, &[huge], FloatDType::BF16) {
            Err(Error::NoSpace { path, need, .. }) => {
                assert_eq!((path.as_path(), need), (tmp.path(), 2u64 << 62));
            }
            other => panic!("{other:?}"),
        }
    }
}
