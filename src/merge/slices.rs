//! The `slices` form of a config (mergekit's frankenmerges and per-slice merges): each output
//! slice takes layers `a .. b` of each of its sources, merges them with the config's method
//! and appends them to the output, which numbers its layers consecutively.
//!
//! As in mergekit 0.1.5 (`plan.py`), the tensors outside the layer stack come from the slices
//! at its ends: the embeddings merged over the first slice's sources, the final norm, heads
//! and everything else over the last slice's. Gradients run over each slice's layers (layer
//! `i` of `n` at `i / (n - 1)`, a one-layer slice at 1); tensors outside the stack sit at 0.
//!
//! The plan presents each merge input as a [`Checkpoint::compose`]d view under the output's
//! tensor names (input `p` holds every slice's `p`-th source, the base first), so the
//! executor merges a slices config as it merges a `models` config. Slices may have different
//! numbers of sources: view `p` then lacks the layers of the slices with `p` sources or fewer,
//! and the executor merges each tensor over the views that hold it (view 0, the reference,
//! holds every tensor). As in mergekit, the embeddings merge the first slice's sources and
//! the tensors after the stack the last slice's first sources as written, as many as the
//! first slice has ([`SliceDef::in_tail`]).

use std::path::{Path, PathBuf};

use super::config::{MergeConfig, SliceDef};
use super::inputs::Inputs;
use super::vocab;
use crate::checkpoint::layers::{BlockKind, group_blocks, layer_of, renumber};
use crate::checkpoint::{Checkpoint, TensorMeta};
use crate::error::{Error, Result};

/// Keys of `config.json` that count a model's layers, in the order they are looked for.
pub const LAYER_COUNT_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// A slices config, resolved against its models.
pub struct SlicePlan {
    /// One view per merge input, the reference first.
    pub views: Vec<Checkpoint>,
    /// For each output layer: its slice and its gradient position.
    pub layers: Vec<(usize, f64)>,
    /// The model whose `config.json` and side files the output takes: the top-level base,
    /// else the first source of the first slice.
    pub donor: PathBuf,
    /// The models' embeddings permuted into the output vocabulary, when they had to be.
    pub aligned: Option<vocab::Aligned>,
    /// Each output layer's `layer_types` entry, when the sources' configs have them.
    pub layer_types: Option<Vec<serde_json::Value>>,
}

/// Where one block of the output sits: the slice whose models and parameters merge it, and
/// its position in [0, 1] for gradient parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub slice: usize,
    pub t: f64,
}

/// Opens every model of `config` once and builds the views of its slices.
/// With `tokenizer_source`, the models' token-indexed tensors are first permuted into its
/// vocabulary ([`vocab::align_slices`], scratch beside `output`).
/// `allow_crimes` lets slices mix model types, as in the `models` form.
pub fn plan(config: &MergeConfig, inputs: &mut Inputs, output: &Path, allow_crimes: bool) -> Result<SlicePlan> {
    let paths = config.referenced_models();
    let opened = paths.iter().map(|p| inputs.open(p)).collect::<Result<Vec<_>>>()?;
    let mut models = super::tied::tie_missing_heads(opened)?;
    let index = |p: &Path| paths.iter().position(|q| crate::input_file::same_path(q, p));
    let aligned = vocab::align_slices(config, &mut models, index, output)?;
    let find = |p: &Path| -> &Checkpoint { &models[index(p).unwrap_or(0)] };
    let donor = config.base_model.clone().unwrap_or_else(|| first_source(config));
    check_sources(config, find(&donor), &find, allow_crimes)?;
    let slices = &config.slices;
    let (first, last) = match (slices.first(), slices.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(Error::Config { path: config.source.clone(), reason: "slices: lists no slice".into() }),
    };
    let total: usize = slices.iter().map(SliceDef::len).sum();
    let layer_types = output_layer_types(slices, |p| find(p).config.clone());
    let inputs = slices.iter().map(|s| s.sources.len()).max().unwrap_or(0);
    let n0 = first.sources.len();
    let mut views = Vec::with_capacity(inputs);
    for p in 0..inputs {
        let mut parts = Vec::new();
        if let Some(src) = first.sources.get(p) {
            parts.extend(outside_stack(find(&src.model.path), |k| k == BlockKind::Embeddings));
        }
        let mut n = 0;
        for (si, s) in slices.iter().enumerate() {
            if let Some(src) = s.sources.get(p) {
                parts.extend(layer_tensors(find(&src.model.path), src.layers, n, si, config)?);
            }
            n += s.len();
        }
        if last.in_tail(p, n0) {
            parts.extend(outside_stack(find(&last.sources[p].model.path), |k| k != BlockKind::Embeddings));
        }
        // The view takes its directory and config.json from its first source.
        let Some(head) = slices.iter().find_map(|s| s.sources.get(p)).map(|s| find(&s.model.path)) else { break };
        let refs: Vec<(&Checkpoint, &TensorMeta, String)> = parts.iter().map(|(c, m, n)| (*c, *m, n.clone())).collect();
        let label = PathBuf::from(format!("{} (slices input {p})", head.path.display()));
        views.push(Checkpoint::compose(
            label,
            head.dir.clone(),
            &refs,
            with_layer_count(head.config.clone(), total, layer_types.as_deref()),
        )?);
    }
    let layers = slices
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let n = s.len();
            (0..n).map(move |i| (si, if n > 1 { i as f64 / (n - 1) as f64 } else { 1.0 }))
        })
        .collect();
    // A `model+lora` donor gives its model's config.json and side files.
    let donor = crate::checkpoint::lora::split_ref(&donor).map_or(donor, |(model, _)| model);
    Ok(SlicePlan { views, layers, donor, aligned, layer_types })
}

/// Refuses a slice source of another architecture (unless `allow_crimes`) or other sizes
/// than `donor`, whose `config.json` the output takes: the views of one-source slices are a
/// single merge input, so the executor's check across inputs never compares their models.
fn check_sources<'c>(
    config: &MergeConfig,
    donor: &Checkpoint,
    find: &impl Fn(&Path) -> &'c Checkpoint,
    allow_crimes: bool,
) -> Result<()> {
    for (si, s) in config.slices.iter().enumerate() {
        for src in &s.sources {
            super::executor::check_slice_source(donor, find(&src.model.path), allow_crimes).map_err(|e| match e {
                Error::Model { path, reason } => Error::Model { path, reason: format!("slices[{si}]: {reason}") },
                other => other,
            })?;
        }
    }
    Ok(())
}

/// The first source of the first slice as written (before the base was moved first).
fn first_source(config: &MergeConfig) -> PathBuf {
    let s = &config.slices[0];
    s.sources.iter().find(|x| x.written == 0).unwrap_or(&s.sources[0]).model.path.clone()
}

/// The tensors of `ckpt` outside any layer stack whose block kind passes `keep`, by name.
fn outside_stack(ckpt: &Checkpoint, keep: impl Fn(BlockKind) -> bool) -> Vec<(&Checkpoint, &TensorMeta, String)> {
    let blocks = group_blocks(ckpt.tensors.iter().map(|t| t.name.as_str()));
    blocks
        .into_iter()
        .filter(|b| b.kind != BlockKind::Layer && keep(b.kind))
        .flat_map(|b| b.tensors)
        .filter_map(|name| ckpt.get(&name).map(|m| (ckpt, m, name)))
        .collect()
}

/// Layers `range` of `ckpt`, renamed to output layers from `first_out` on; every layer must
/// exist and the model must have exactly one layer stack.
fn layer_tensors<'c>(
    ckpt: &'c Checkpoint,
    range: (usize, usize),
    first_out: usize,
    slice: usize,
    config: &MergeConfig,
) -> Result<Vec<(&'c Checkpoint, &'c TensorMeta, String)>> {
    let err =
        |reason: String| Error::Config { path: config.source.clone(), reason: format!("slices[{slice}]: {reason}") };
    let mut stacks: Vec<String> = Vec::new();
    let mut count = 0;
    for t in &ckpt.tensors {
        if let Some((stack, i)) = layer_of(&t.name) {
            if !stacks.contains(&stack) {
                stacks.push(stack);
            }
            count = count.max(i + 1);
        }
    }
    if stacks.len() != 1 {
        return Err(err(format!(
            "{} has {} layer stacks ({}); slices need a model with exactly one",
            ckpt.path.display(),
            stacks.len(),
            stacks.join(", ")
        )));
    }
    if range.1 > count {
        return Err(err(format!(
            "layer_range [{}, {}] of {} reaches past its {count} layers",
            range.0,
            range.1,
            ckpt.path.display()
        )));
    }
    let mut out = Vec::new();
    for t in &ckpt.tensors {
        if let Some((_, i)) = layer_of(&t.name)
            && (range.0..range.1).contains(&i)
            && let Some(name) = renumber(&t.name, first_out + i - range.0)
        {
            out.push((ckpt, t, name));
        }
    }
    Ok(out)
}

/// `config.json` with its layer count set to the output's, and its per-layer `layer_types`
/// (Qwen2, Gemma, ... under transformers 5, which refuses a list of another length) to the
/// output layers' own, or left out for transformers to derive when they are not known.
pub fn with_layer_count(
    config: Option<serde_json::Value>,
    layers: usize,
    layer_types: Option<&[serde_json::Value]>,
) -> Option<serde_json::Value> {
    let mut config = config?;
    if let Some(obj) = config.as_object_mut() {
        if let Some(key) = LAYER_COUNT_KEYS.iter().find(|k| obj.contains_key(**k)) {
            obj.insert((*key).to_string(), layers.into());
        }
        match layer_types {
            Some(types) if obj.contains_key("layer_types") => {
                obj.insert("layer_types".into(), types.to_vec().into());
            }
            _ => {
                obj.remove("layer_types");
            }
        }
    }
    Some(config)
}

/// Each output layer's `layer_types` entry, from its slice's first source's `config.json` at
/// the source's layer; `None` when a source has no such entry.
fn output_layer_types(
    slices: &[SliceDef],
    find: impl Fn(&Path) -> Option<serde_json::Value>,
) -> Option<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for s in slices {
        let src = s.sources.first()?;
        let config = find(&src.model.path)?;
        let types = config.get("layer_types")?.as_array()?.clone();
        out.extend((src.layers.0..src.layers.1).map(|i| types.get(i).cloned()).collect::<Option<Vec<_>>>()?);
    }
    Some(out)
}
