//! Memory-mapped safetensors checkpoints, single-file or sharded with an index.
//!
//! Tensors are never copied at open time: a [`Checkpoint`] holds the maps and the parsed headers,
//! and [`Checkpoint::bytes`] hands out zero-copy slices. Pages are faulted in when read and can be
//! released again with [`Checkpoint::release`], which keeps resident memory bounded by what is
//! being worked on rather than by the model size.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap};
use serde::Deserialize;

use super::dtype::FloatDType;
use super::stored::{MappedRange, StoredTensor};
use crate::error::{Error, Result};

/// File name of a Hugging Face shard index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// File name of a single-file Hugging Face checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

/// One memory-mapped `.safetensors` file.
#[derive(Clone)]
pub struct Shard {
    pub path: PathBuf,
    /// Shared with the [`StoredTensor`] views handed out, which outlive the checkpoint.
    mmap: Arc<Mmap>,
}

impl Shard {
    /// The whole read-only mapping (header included), e.g. to page-lock it for device copies.
    pub fn mapped(&self) -> &[u8] {
        &self.mmap
    }
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Absolute byte range inside the shard's file.
    pub start: usize,
    pub end: usize,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    /// The float dtype, if this tensor is F32/F16/BF16.
    pub fn float_dtype(&self) -> Option<FloatDType> {
        FloatDType::from_safetensors(self.dtype)
    }

    /// Whether this is an integer or boolean buffer (position ids, masks): copied, never merged.
    /// Other dtypes that are not a [`FloatDType`] (F64, the 8-, 6- and 4-bit floats) are weights
    /// symerge cannot compute with, which must be refused rather than copied.
    pub fn is_integer(&self) -> bool {
        use safetensors::Dtype::*;
        matches!(self.dtype, BOOL | U8 | I8 | I16 | U16 | I32 | U32 | I64 | U64)
    }
}

/// An opened checkpoint: a directory (or file) of safetensors shards plus its small files.
pub struct Checkpoint {
    /// Directory holding the weights, `config.json` and tokenizer files.
    pub dir: PathBuf,
    /// The path the user gave.
    pub path: PathBuf,
    pub shards: Vec<Shard>,
    /// Tensors in file order: shard by shard, by data offset within a shard.
    pub tensors: Vec<TensorMeta>,
    by_name: HashMap<String, usize>,
    /// `config.json` beside the weights, if any.
    pub config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

/// Hugging Face's names of pickled PyTorch weights (`pytorch_model.bin`, its shards and index)
/// and the usual `.pt`/`.pth`/`.bin` files.
fn is_pickle_name(name: &str) -> bool {
    [".bin", ".pt", ".pth", ".bin.index.json"].iter().any(|ext| name.ends_with(ext))
}

/// The pickled checkpoint a directory holds instead of safetensors, if any: `pytorch_model*`
/// first (a model directory may hold other pickles, `training_args.bin`), then by name.
fn pickled_checkpoint(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<(bool, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            is_pickle_name(&name).then(|| (!name.starts_with("pytorch_model"), p))
        })
        .collect();
    found.sort();
    found.into_iter().next().map(|(_, p)| p)
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `*.index.json`, or a directory holding either.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        let (dir, files, index) = if meta.is_dir() {
            let index = path.join(INDEX_NAME);
            // Whatever stands at these names is meant as the checkpoint: a dangling link or a
            // directory there is an error saying so, not "no checkpoint found".
            let single = path.join(SINGLE_NAME);
            if index.symlink_metadata().is_ok() && single.symlink_metadata().is_ok() {
                // transformers reads the single file, a sharded reader the index: which weights
                // are meant is not ours to guess (a stale leftover of re-sharding, often).
                return Err(Error::BadIndex {
                    path: index,
                    reason: format!(
                        "{} is beside it: the directory holds two checkpoints (transformers reads the single file); \
                         remove the stale one",
                        single.display()
                    ),
                });
            }
            if index.symlink_metadata().is_ok() {
                let files = shard_files_from_index(&index)?;
                (path.clone(), files, Some(index))
            } else if path.join(SINGLE_NAME).symlink_metadata().is_ok() {
                (path.clone(), vec![path.join(SINGLE_NAME)], None)
            } else {
                let found = list_safetensors(&path)?;
                if found.len() == 1 {
                    (path.clone(), found, None)
                } else if let Some(pickle) = pickled_checkpoint(&path).filter(|_| found.is_empty()) {
                    return Err(Error::PickledCheckpoint { path: pickle });
                } else {
                    return Err(Error::NoCheckpoint { path });
                }
            }
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            let name = path.to_string_lossy();
            if is_pickle_name(&name) {
                return Err(Error::PickledCheckpoint { path });
            }
            if name.ends_with(".index.json") {
                (dir, shard_files_from_index(&path)?, Some(path.clone()))
            } else {
                (dir, vec![path.clone()], None)
            }
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        for (si, file) in files.iter().enumerate() {
            let (shard, mut metas) = open_shard(file, si)?;
            shards.push(shard);
            tensors.append(&mut metas);
        }

        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::BadIndex {
                    path: index.clone().unwrap_or_else(|| path.clone()),
                    reason: format!("tensor `{}` appears in more than one shard", t.name),
                });
            }
        }
        if let Some(index) = &index {
            check_index_matches(index, &tensors, &shards)?;
        }

        let config_path = dir.join("config.json");
        // A config.json that is there must be a readable JSON object (a directory or a dangling
        // link named config.json is an error, not "no config").
        let config = if config_path.symlink_metadata().is_ok() {
            let text = crate::input_file::read_to_string(&config_path)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadIndex { path: config_path.clone(), reason: format!("invalid JSON: {e}") })?;
            if !value.is_object() {
                return Err(Error::BadIndex { path: config_path, reason: "not a JSON object".into() });
            }
            Some(value)
        } else {
            None
        };

        Ok(Checkpoint { dir, path, shards, tensors, by_name, config })
    }

    /// A checkpoint made of tensors of others under new names, sharing their mappings (nothing
    /// is copied): what one input of a `slices` merge presents to the executor, e.g. layer
    /// `a + i` of a source as output layer `n + i`. `label` names it in errors; `dir` is where
    /// its side files come from.
    pub fn compose(
        label: PathBuf,
        dir: PathBuf,
        parts: &[(&Checkpoint, &TensorMeta, String)],
        config: Option<serde_json::Value>,
    ) -> Result<Checkpoint> {
        let mut shards: Vec<Shard> = Vec::new();
        let mut shard_of: HashMap<(usize, usize), usize> = HashMap::new();
        let mut tensors = Vec::with_capacity(parts.len());
        let mut by_name = HashMap::with_capacity(parts.len());
        for (ckpt, meta, name) in parts {
            let key = (*ckpt as *const Checkpoint as usize, meta.shard);
            let shard = *shard_of.entry(key).or_insert_with(|| {
                shards.push(ckpt.shards[meta.shard].clone());
                shards.len() - 1
            });
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::BadIndex { path: label, reason: format!("tensor `{name}` is planned twice") });
            }
            tensors.push(TensorMeta { name: name.clone(), shard, ..(*meta).clone() });
        }
        Ok(Checkpoint { dir, path: label, shards, tensors, by_name, config })
    }

    /// Looks a tensor up by exact name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Position of a tensor in [`Self::tensors`]; `name` must come from this checkpoint.
    pub fn tensor_index(&self, name: &str) -> usize {
        self.by_name[name]
    }

    /// Finds `name`, allowing for the wrapper prefix a task-specific model adds or drops
    /// (`bert.encoder...` in a `BertForSequenceClassification` vs `encoder...` in a `BertModel`).
    pub fn resolve(&self, name: &str) -> Option<&TensorMeta> {
        if let Some(t) = self.get(name) {
            return Some(t);
        }
        for p in WRAPPER_PREFIXES {
            if let Some(stripped) = name.strip_prefix(p) {
                if let Some(t) = self.get(stripped) {
                    return Some(t);
                }
            } else if let Some(t) = self.get(&format!("{p}{name}")) {
                return Some(t);
            }
        }
        None
    }

    /// The raw little-endian bytes of a tensor (zero-copy view into the map).
    pub fn bytes(&self, t: &TensorMeta) -> &[u8] {
        &self.shards[t.shard].mmap[t.start..t.end]
    }

    /// The tensor's byte range in its shard's mapping.
    fn range(&self, t: &TensorMeta) -> MappedRange<'_> {
        MappedRange { map: &self.shards[t.shard].mmap, start: t.start, end: t.end }
    }

    /// Asks the kernel to read a tensor's pages ahead (used by the prefetch thread).
    pub fn will_need(&self, t: &TensorMeta) {
        self.range(t).will_need();
    }

    /// Maps a tensor's pages into this process ahead of use (called by the prefetch thread), so
    /// the merge threads never stop on page faults. See `MappedRange::populate`.
    pub fn populate(&self, t: &TensorMeta) {
        self.range(t).populate();
    }

    /// Drops a tensor's pages from this process's resident set once it is merged. The data stays
    /// in the page cache, and the map stays valid: a later read faults the pages back in.
    pub fn release(&self, t: &TensorMeta) {
        self.range(t).release();
    }

    /// The float tensor `name` (a wrapper prefix such as `bert.` may differ) as a stored view,
    /// checked to have the `shape` the model's config implies; errors name the file and tensor.
    pub fn stored_shaped(&self, name: &str, shape: &[usize]) -> Result<StoredTensor> {
        let meta = self.resolve(name).ok_or_else(|| Error::Model {
            path: self.path.clone(),
            reason: format!(
                "tensor `{name}` is missing (also looked for it with a wrapper prefix such as bert. or model. \
                 added or removed)"
            ),
        })?;
        if meta.shape != shape {
            return Err(Error::Model {
                path: self.file_of(meta).to_path_buf(),
                reason: format!("tensor `{}` has shape {:?}, but config.json implies {shape:?}", meta.name, meta.shape),
            });
        }
        self.stored(meta)
    }

    /// A float tensor's stored bytes as a view that shares the mapping (zero-copy, cheap to
    /// clone, valid after the checkpoint is dropped). Fails, naming file and tensor, for a
    /// non-float tensor.
    pub fn stored(&self, t: &TensorMeta) -> Result<StoredTensor> {
        let dtype = t.float_dtype().ok_or_else(|| Error::UnsupportedDtype {
            path: self.file_of(t).to_path_buf(),
            tensor: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
        })?;
        Ok(StoredTensor::new(
            t.name.clone(),
            self.file_of(t).to_path_buf(),
            dtype,
            t.shape.clone(),
            self.shards[t.shard].mmap.clone(),
            t.start..t.end,
        ))
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// Total number of parameters (elements of all tensors).
    pub fn num_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel() as u64).sum()
    }

    /// The file a tensor is stored in (for error messages).
    pub fn file_of(&self, t: &TensorMeta) -> &Path {
        &self.shards[t.shard].path
    }
}

/// Prefixes that task-specific Hugging Face heads wrap a base model's names in.
const WRAPPER_PREFIXES: &[&str] =
    &["bert.", "roberta.", "distilbert.", "electra.", "deberta.", "xlm_roberta.", "model.", "transformer."];

fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            found.push(p);
        }
    }
    found.sort();
    Ok(found)
}

fn shard_files_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::input_file::read_to_string(index)?;
    let parsed: IndexFile = serde_json::from_str(&text)
        .map_err(|e| Error::BadIndex { path: index.to_path_buf(), reason: format!("not a valid shard index: {e}") })?;
    if parsed.weight_map.is_empty() {
        return Err(Error::BadIndex {
            path: index.to_path_buf(),
            reason: "lists no tensors (weight_map is empty)".into(),
        });
    }
    let dir = index.parent().unwrap_or_else(|| Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|n| shard_path(index, dir, n)).collect()
}

/// The file of a shard the index names: a plain file name (no directory part, nothing that
/// leads out of the checkpoint's directory) of a regular file there.
fn shard_path(index: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let bad = |reason: String| Error::BadIndex { path: index.to_path_buf(), reason };
    let plain = matches!(Path::new(name).components().collect::<Vec<_>>()[..], [Component::Normal(_)]);
    if !plain || name.contains('/') || name.contains('\0') {
        return Err(bad(format!("shard name `{name}` must be a plain file name")));
    }
    let file = dir.join(name);
    if file.symlink_metadata().is_err() {
        return Err(bad(format!("shard `{name}` listed in the index does not exist")));
    }
    crate::input_file::check_regular(&file).map_err(|e| bad(format!("shard `{name}` listed in the index: {e}")))?;
    Ok(file)
}

fn check_index_matches(index: &Path, tensors: &[TensorMeta], shards: &[Shard]) -> Result<()> {
    let text = crate::input_file::read_to_string(index)?;
    let parsed: IndexFile = serde_json::from_str(&text)
        .map_err(|e| Error::BadIndex { path: index.to_path_buf(), reason: format!("not a valid shard index: {e}") })?;
    let located: HashMap<&str, &Path> =
        tensors.iter().map(|t| (t.name.as_str(), shards[t.shard].path.as_path())).collect();
    let mut names: Vec<_> = parsed.weight_map.iter().collect();
    names.sort();
    for (name, file) in names {
        match located.get(name.as_str()) {
            Some(p) if p.file_name().is_some_and(|f| f == file.as_str()) => {}
            Some(p) => {
                return Err(Error::BadIndex {
                    path: index.to_path_buf(),
                    reason: format!("index puts tensor `{name}` in `{file}`, but it is stored in {}", p.display()),
                });
            }
            None => {
                return Err(Error::BadIndex {
                    path: index.to_path_buf(),
                    reason: format!("index lists tensor `{name}` in `{file}`, but that shard does not contain it"),
                });
            }
        }
    }
    Ok(())
}

fn open_shard(path: &Path, shard_index: usize) -> Result<(Shard, Vec<TensorMeta>)> {
    let file = crate::input_file::open(path)?;
    // SAFETY: the file is opened read-only; like every mmap-based reader we rely on nobody
    // truncating checkpoint files while they are being merged.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    if mmap.starts_with(b"GGUF") {
        // Read as safetensors, its magic is an "implausibly large" header length.
        return Err(Error::BadSafetensors {
            path: path.to_path_buf(),
            reason: format!(
                "it is a GGUF file (llama.cpp's format); convert it first with `symerge import-gguf {} -o DIR`",
                path.display()
            ),
        });
    }
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::BadSafetensors {
        path: path.to_path_buf(),
        reason: describe_safetensors_error(&e, &mmap),
    })?;
    let data_start = 8 + header_len;
    let infos = metadata.tensors();
    let mut metas: Vec<TensorMeta> = infos
        .into_iter()
        .map(|(name, info)| TensorMeta {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            shard: shard_index,
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        })
        .collect();
    metas.sort_by(|a, b| (a.start, &a.name).cmp(&(b.start, &b.name)));
    let _ = mmap.advise(Advice::Sequential);
    Ok((Shard { path: path.to_path_buf(), mmap: Arc::new(mmap) }, metas))
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let file_len = file.len();
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes, too short to hold a header"),
        E::InvalidHeaderLength => "header length points past the end of the file (truncated or not safetensors)".into(),
        E::MetadataIncompleteBuffer => "tensor data does not match the file size (truncated or padded file)".into(),
        E::HeaderTooLarge => "header length is implausibly large (not a safetensors file?)".into(),
        E::TensorInvalidInfo | E::ValidationOverflow | E::MisalignedSlice => {
            first_inconsistent_tensor(file).unwrap_or_else(|| format!("{e}"))
        }
        other => format!("{other}"),
    }
}

/// The first tensor of the header whose shape and dtype do not fill its byte range (the
/// `safetensors` crate rejects the file without naming it).
fn first_inconsistent_tensor(file: &[u8]) -> Option<String> {
    let len = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(file.get(8..8usize.checked_add(len)?)?).ok()?;
    let mut named: Vec<(&String, &serde_json::Value)> = header.iter().filter(|(k, _)| *k != "__metadata__").collect();
    named.sort_by_key(|(k, _)| *k);
    named.into_iter().find_map(|(name, info)| inconsistency(name, info))
}

/// Why one header entry's shape and dtype do not fill its byte range, if they do not. The
/// dtype's size comes from the `safetensors` crate, so every dtype it knows is covered.
fn inconsistency(name: &str, info: &serde_json::Value) -> Option<String> {
    let dtype: safetensors::Dtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
    let numbers = |key: &str| -> Option<Vec<u64>> { info.get(key)?.as_array()?.iter().map(|v| v.as_u64()).collect() };
    let (Some(shape), Some(offsets)) = (numbers("shape"), numbers("data_offsets")) else {
        return Some(format!("tensor `{name}`: shape or data_offsets are not lists of non-negative integers"));
    };
    let bits = shape.iter().try_fold(dtype.bitsize() as u64, |a, &d| a.checked_mul(d));
    if let Some(b) = bits.filter(|b| b % 8 != 0) {
        return Some(format!("tensor `{name}`: shape {shape:?} of {dtype:?} is {b} bits, not whole bytes"));
    }
    let need = bits.map(|b| b / 8);
    let span = match offsets.as_slice() {
        [a, b] if a <= b => Some(b - a),
        _ => None,
    };
    if need.is_some() && need == span {
        return None;
    }
    Some(format!(
        "tensor `{name}`: shape {shape:?} of {dtype:?} needs {} bytes but its data_offsets {offsets:?} span {}",
        need.map_or("more than 2^64".into(), |n| n.to_string()),
        span.map_or("nothing valid".into(), |n| n.to_string())
    ))
}
