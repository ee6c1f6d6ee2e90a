//! mergekit's `model+lora` references: a PEFT LoRA adapter applied to its base before the merge,
//! as mergekit 0.1.5 does with PEFT's `merge_and_unload` (`W + (B @ A) * alpha / r`, with
//! `alpha / sqrt(r)` under `use_rslora`, `alpha_pattern` per module, GPT-2 `Conv1D` and
//! embedding adapters transposed; tensors the adapter stores whole, such as `modules_to_save`,
//! replace the base's). As in PEFT (whose adapters stay in f32 over a bf16 or f16 model), the
//! update is computed in f32 and added to the stored weight in f32, rounded once to its dtype.
//!
//! Only the tensors the adapter touches are computed, one at a time, and written to a scratch
//! directory; the result is the base checkpoint with those tensors read from there, so memory
//! stays bounded by the largest tensor. DoRA and other PEFT methods are refused by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::dtype::{decode, encode_into};
use super::{Checkpoint, PlannedTensor, ShardWriter, TensorMeta};
use crate::backend::{Backend, cpu::Cpu};
use crate::error::{Error, Result};

/// The parts of `model+lora` when `p` names no file itself and both parts exist (the first
/// such `+` when several could split it).
pub fn split_ref(p: &Path) -> Option<(PathBuf, PathBuf)> {
    if p.exists() {
        return None;
    }
    let s = p.to_str()?;
    s.match_indices('+').find_map(|(i, _)| {
        let (model, lora) = (PathBuf::from(&s[..i]), PathBuf::from(&s[i + 1..]));
        (model.exists() && lora.exists()).then_some((model, lora))
    })
}

/// `adapter_config.json`, the fields the merge reads.
#[derive(serde::Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    /// PEFT's `rank_pattern` and `alpha_pattern`, in order, each read on its own: a module's
    /// rank is that of the first `rank_pattern` key that matches it (else `r`), its alpha that
    /// of the first `alpha_pattern` key that matches it (else `lora_alpha`).
    #[serde(default, deserialize_with = "crate::ordered_map::entries")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "crate::ordered_map::entries")]
    alpha_pattern: Vec<(String, f64)>,
}

/// A low-rank update: `W += scale * B @ A`, `transposed` for `fan_in_fan_out` and embeddings
/// (`(B @ A)^T`).
struct Product<'a> {
    a: &'a TensorMeta,
    b: &'a TensorMeta,
    scale: f32,
    transposed: bool,
}

/// One change to a base tensor: the adapter's whole copy in its place (`modules_to_save`, a
/// saved `base_layer`), then its low-rank update, either or both.
#[derive(Default)]
struct Change<'a> {
    replace: Option<&'a TensorMeta>,
    product: Option<Product<'a>>,
}

fn bad(path: &Path, reason: String) -> Error {
    Error::BadIndex { path: path.to_path_buf(), reason }
}

/// `base` with the adapter in `lora_dir` applied; the changed tensors are written to `scratch`
/// (created here), which must outlive the returned checkpoint's use.
pub fn apply(base: Checkpoint, lora_dir: &Path, scratch: &Path) -> Result<Checkpoint> {
    let cfg_path = lora_dir.join("adapter_config.json");
    let text = crate::input_file::read_to_string(&cfg_path)?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("invalid: {e}")))?;
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") || cfg.use_dora {
        let kind = if cfg.use_dora { "DoRA".into() } else { cfg.peft_type.clone().unwrap_or_default() };
        return Err(bad(&cfg_path, format!("a {kind} adapter; symerge applies LoRA adapters only")));
    }
    if cfg.r == 0 {
        return Err(bad(&cfg_path, "r is 0".into()));
    }
    if let Some((key, _)) = cfg.rank_pattern.iter().find(|(_, r)| *r == 0) {
        return Err(bad(&cfg_path, format!("rank_pattern {key:?} is 0")));
    }
    let file = lora_dir.join("adapter_model.safetensors");
    if !file.exists() {
        return Err(bad(lora_dir, "no adapter_model.safetensors (a pickled adapter_model.bin is not read)".into()));
    }
    // A FIFO or a directory there is not "no adapter": say what it is.
    crate::input_file::check_regular(&file)?;
    let adapter = Checkpoint::open(&file)?;
    let changes = plan(&base, &adapter, &cfg, &file)?;
    if changes.is_empty() {
        tracing::warn!("{}: the adapter changes no tensor of {}", file.display(), base.path.display());
        return Ok(base);
    }
    let planned = changes
        .iter()
        .map(|(name, _)| {
            let t = base.get(name).expect("planned from the base");
            PlannedTensor { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() }
        })
        .collect();
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
    let mut writer = ShardWriter::create(scratch, planned, u64::MAX)?;
    for (name, change) in &changes {
        let t = base.get(name).expect("planned from the base");
        writer.write(name, &changed(&base, t, &adapter, change)?)?;
    }
    writer.finish()?;
    let done = Checkpoint::open(scratch)?;
    let parts: Vec<(&Checkpoint, &TensorMeta, String)> = base
        .tensors
        .iter()
        .map(|t| (done.get(&t.name).map_or((&base, t), |d| (&done, d)), t.name.clone()))
        .map(|((c, m), n)| (c, m, n))
        .collect();
    let label = PathBuf::from(format!("{}+{}", base.path.display(), lora_dir.display()));
    tracing::info!("{}: {} tensors changed by the adapter", label.display(), changes.len());
    Checkpoint::compose(label, base.dir.clone(), &parts, base.config.clone())
}

/// Every base tensor the adapter changes, and how, checked against the base's shapes.
fn plan<'a>(
    base: &Checkpoint,
    adapter: &'a Checkpoint,
    cfg: &AdapterConfig,
    file: &Path,
) -> Result<Vec<(String, Change<'a>)>> {
    let mut out: BTreeMap<String, Change<'a>> = BTreeMap::new();
    for t in &adapter.tensors {
        match part_of(t, file)? {
            Part::Whole(key) => {
                if let Some(prev) = out.entry(key.clone()).or_default().replace.replace(t) {
                    return Err(given_twice(file, &prev.name, &t.name, &key));
                }
            }
            Part::A { module, embedding } => {
                let product = product_of(adapter, t, &module, embedding, cfg, file)?;
                let name = format!("{module}.weight");
                if let Some(prev) = out.entry(name.clone()).or_default().product.replace(product) {
                    return Err(given_twice(file, &prev.a.name, &t.name, &name));
                }
            }
            Part::B { embedding } => require_a(adapter, t, embedding, file)?,
        }
    }
    let mut changes = Vec::with_capacity(out.len());
    for (name, change) in out {
        check_base_shape(base, &name, &change, file)?;
        changes.push((name, change));
    }
    Ok(changes)
}

/// What one adapter tensor is, read from its name without PEFT's `base_model.model.` prefix
/// and `base_layer` level (both optional in the files PEFT and others write).
enum Part {
    /// A whole tensor for the base's tensor of this name (`modules_to_save`, a `base_layer`).
    Whole(String),
    /// The `A` factor of `module`'s update (`lora_embedding_A` for an embedding).
    A { module: String, embedding: bool },
    /// A `B` factor, which its `A` brings into the plan.
    B { embedding: bool },
}

fn part_of(t: &TensorMeta, file: &Path) -> Result<Part> {
    let key = t.name.strip_prefix("base_model.model.").unwrap_or(&t.name).replace(".base_layer.", ".");
    if key.contains("lora_magnitude_vector") {
        return Err(bad(file, format!("tensor `{}` belongs to a DoRA adapter, which symerge does not apply", t.name)));
    }
    if let Some(m) = key.strip_suffix(".lora_A.weight") {
        Ok(Part::A { module: m.to_string(), embedding: false })
    } else if let Some(m) = key.strip_suffix(".lora_embedding_A") {
        Ok(Part::A { module: m.to_string(), embedding: true })
    } else if key.ends_with(".lora_B.weight") || key.ends_with(".lora_embedding_B") {
        Ok(Part::B { embedding: key.ends_with(".lora_embedding_B") })
    } else if key.contains(".lora_") {
        Err(bad(file, format!("tensor `{}`: an adapter part symerge does not know", t.name)))
    } else {
        Ok(Part::Whole(key))
    }
}

/// The factor names of a linear or an embedding adapter.
fn factor_parts(embedding: bool) -> (&'static str, &'static str) {
    if embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A", "lora_B") }
}

/// Two tensors that name the same module (with and without the `base_model.model.` prefix, or
/// with and without `base_layer`): which one PEFT would load is not something to guess.
fn given_twice(file: &Path, first: &str, second: &str, target: &str) -> Error {
    bad(file, format!("`{first}` and `{second}` both give `{target}`; an adapter gives each module once"))
}

/// A `B` factor without its `A` would be skipped, silently dropping that module's update.
fn require_a(adapter: &Checkpoint, b: &TensorMeta, embedding: bool, file: &Path) -> Result<()> {
    let (a_part, b_part) = factor_parts(embedding);
    let a_name = b.name.replace(b_part, a_part);
    match adapter.get(&a_name) {
        Some(_) => Ok(()),
        None => Err(bad(file, format!("`{}` has no `{a_name}`", b.name))),
    }
}

/// `module`'s update from its `A` factor `a` and the `B` beside it: the factors must multiply,
/// and their rank must be the one adapter_config.json gives the module (PEFT builds the factors
/// from `r` or `rank_pattern` and refuses to load tensors of another shape).
fn product_of<'a>(
    adapter: &'a Checkpoint,
    a: &'a TensorMeta,
    module: &str,
    embedding: bool,
    cfg: &AdapterConfig,
    file: &Path,
) -> Result<Product<'a>> {
    let (a_part, b_part) = factor_parts(embedding);
    let b_name = a.name.replace(a_part, b_part);
    let b = adapter.get(&b_name).ok_or_else(|| bad(file, format!("`{}` has no `{b_name}`", a.name)))?;
    if !(a.shape.len() == 2 && b.shape.len() == 2 && a.shape[0] == b.shape[1] && a.shape[0] > 0) {
        return Err(bad(file, format!("`{}` {:?} and `{}` {:?} do not multiply", b.name, b.shape, a.name, a.shape)));
    }
    let r = a.shape[0];
    let (want, field) = rank_for(module, cfg).map_err(|e| bad(file, e))?;
    if r != want {
        return Err(bad(
            file,
            format!("adapter_config.json's {field} is {want}, but `{}` {:?} has rank {r}", a.name, a.shape),
        ));
    }
    let alpha = alpha_for(module, cfg).map_err(|e| bad(file, e))?;
    let scale = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
    Ok(Product { a, b, scale: scale as f32, transposed: embedding || is_conv1d(module) })
}

/// Fails unless what `change` writes over the base's `name` has its shape and a float dtype.
fn check_base_shape(base: &Checkpoint, name: &str, change: &Change<'_>, file: &Path) -> Result<()> {
    let w = base.get(name).ok_or_else(|| {
        bad(file, format!("the adapter changes `{name}`, which the base model {} lacks", base.path.display()))
    })?;
    let mut shapes = Vec::new();
    if let Some(t) = change.replace {
        shapes.push(t.shape.clone());
    }
    if let Some(Product { a, b, transposed, .. }) = &change.product {
        shapes.push(if *transposed { vec![a.shape[1], b.shape[0]] } else { vec![b.shape[0], a.shape[1]] });
    }
    match shapes.iter().find(|s| **s != w.shape).or(w.float_dtype().is_none().then_some(&w.shape)) {
        Some(want) => Err(bad(
            file,
            format!("the adapter gives `{name}` shape {want:?}, but the base's is {:?} {:?}", w.shape, w.dtype),
        )),
        None => Ok(()),
    }
}

/// The rank PEFT (0.21) gives `module`, and the field that gives it: the first `rank_pattern`
/// key matching it as `get_pattern_key` matches, else `r`.
fn rank_for(module: &str, cfg: &AdapterConfig) -> std::result::Result<(usize, String), String> {
    for (key, r) in &cfg.rank_pattern {
        if pattern_matches(key, module)? {
            return Ok((*r, format!("rank_pattern {key:?}")));
        }
    }
    Ok((cfg.r, "r".into()))
}

/// Whether `module` matches a `rank_pattern`/`alpha_pattern` key as PEFT's `get_pattern_key`
/// matches (`(.*\.)?(KEY)$`, KEY a regular expression).
fn pattern_matches(key: &str, module: &str) -> std::result::Result<bool, String> {
    let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        format!("rank_pattern/alpha_pattern key {key:?} is not a regular expression symerge reads: {e}")
    })?;
    Ok(re.is_match(module))
}

/// The alpha PEFT (0.21) gives `module`: that of the first `alpha_pattern` key matching it as
/// `get_pattern_key` matches, else `lora_alpha`. `rank_pattern` plays no part: older PEFT took
/// the first key of `rank_pattern` then `alpha_pattern` that matched, so a matching
/// `rank_pattern` key hid a more specific `alpha_pattern` one.
fn alpha_for(module: &str, cfg: &AdapterConfig) -> std::result::Result<f64, String> {
    for (key, alpha) in &cfg.alpha_pattern {
        if pattern_matches(key, module)? {
            return Ok(*alpha);
        }
    }
    Ok(cfg.lora_alpha)
}

/// Whether PEFT wraps `module` as a GPT-2 style `Conv1D` (weights stored `[in, out]`), for which
/// it transposes the update whatever `fan_in_fan_out` says (and ignores the flag elsewhere).
fn is_conv1d(module: &str) -> bool {
    module.rsplit('.').next().is_some_and(|last| last.starts_with("c_"))
}

/// Tensor `w` of `base` after `change`, in its stored dtype.
fn changed(base: &Checkpoint, w: &TensorMeta, adapter: &Checkpoint, change: &Change<'_>) -> Result<Vec<u8>> {
    let dtype = w.float_dtype().expect("checked float");
    let read = |ck: &Checkpoint, t: &TensorMeta| -> Result<Vec<f32>> {
        let from =
            t.float_dtype().ok_or_else(|| bad(&ck.path, format!("tensor `{}` is not a float tensor", t.name)))?;
        let mut v = vec![0f32; t.numel()];
        decode(from, ck.bytes(t), &mut v);
        Ok(v)
    };
    let mut wv = match change.replace {
        Some(t) => read(adapter, t)?,
        None => {
            let mut v = vec![0f32; w.numel()];
            decode(dtype, base.bytes(w), &mut v);
            v
        }
    };
    if let Some(Product { a, b, scale, transposed }) = &change.product {
        let (av, bv) = (read(adapter, a)?, read(adapter, b)?);
        let (r, inp, outp) = (a.shape[0], a.shape[1], b.shape[0]);
        let mut delta = vec![0f32; inp * outp];
        if *transposed {
            Cpu.gemm(true, true, inp, outp, r, 1.0, &av, &bv, 0.0, &mut delta)?;
        } else {
            Cpu.gemm(false, false, outp, inp, r, 1.0, &bv, &av, 0.0, &mut delta)?;
        }
        delta.iter_mut().for_each(|d| *d *= scale);
        wv.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
    }
    // Checked here, where the cause is known: the merge would name the scratch file.
    if let Some(i) = wv.iter().position(|x| !x.is_finite()) {
        let size = dtype.size();
        let mut stored = [0f32];
        decode(dtype, &base.bytes(w)[i * size..(i + 1) * size], &mut stored);
        if change.replace.is_none() && !stored[0].is_finite() {
            let path = base.file_of(w).to_path_buf();
            return Err(Error::NonFinite { path, tensor: w.name.clone(), index: i, value: stored[0] });
        }
        return Err(bad(
            &adapter.path,
            format!(
                "applied to `{}`, the adapter gives a non-finite value ({}) at element {i}: it holds one, or its \
                 lora_alpha / r scale overflows f32",
                w.name, wv[i]
            ),
        ));
    }
    let mut out = vec![0u8; w.nbytes()];
    encode_into(dtype, &wv, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rank_pattern: &[(&str, usize)], alpha_pattern: &[(&str, f64)]) -> AdapterConfig {
        AdapterConfig {
            peft_type: None,
            r: 4,
            lora_alpha: 8.0,
            use_rslora: false,
            use_dora: false,
            rank_pattern: rank_pattern.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            alpha_pattern: alpha_pattern.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    /// Fuzzing round 3: a matching `rank_pattern` key decided the alpha too (older PEFT's
    /// reading), so `q_proj` of layer 0 got `lora_alpha` 8 here; PEFT 0.21 (checked with its
    /// `get_peft_model`: r 2, alpha 7, scaling 3.5) gives it its `alpha_pattern` value.
    #[test]
    fn alpha_pattern_is_read_apart_from_rank_pattern() {
        let cfg = config(&[("q_proj", 2)], &[(r"layers\.0\.self_attn\.q_proj", 7.0), ("v_proj", 3.0)]);
        let at = |module: &str| (rank_for(module, &cfg).unwrap().0, alpha_for(module, &cfg).unwrap());
        assert_eq!(at("model.layers.0.self_attn.q_proj"), (2, 7.0));
        assert_eq!(at("model.layers.1.self_attn.q_proj"), (2, 8.0));
        assert_eq!(at("model.layers.0.self_attn.v_proj"), (4, 3.0));
        // The first matching alpha_pattern key wins, as in `get_pattern_key`.
        let cfg = config(&[], &[("q_proj", 5.0), (r"layers\.0\.self_attn\.q_proj", 7.0)]);
        assert_eq!(alpha_for("model.layers.0.self_attn.q_proj", &cfg).unwrap(), 5.0);
        // A key matches whole dot-separated names only: `proj` is not `v_proj`.
        let cfg = config(&[], &[("proj", 3.0)]);
        assert_eq!(alpha_for("model.layers.0.self_attn.v_proj", &cfg).unwrap(), 8.0);
    }
}
