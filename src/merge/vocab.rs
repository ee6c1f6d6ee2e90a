//! `tokenizer_source` over inputs whose vocabularies differ (an expert that added chat tokens, a
//! model with another tokenizer): as mergekit 0.1.5 does, every input's token-indexed tensors
//! (embeddings and untied heads) are first permuted into the output tokenizer's vocabulary,
//! then merged like any other tensor.
//!
//! The output vocabulary is the source tokenizer's (`base`: the base model's, without tokens at
//! ids beyond its `vocab_size`; a model: that model's; `union`: the base's, else the first
//! model's, plus every token of the others it lacks, added as mergekit adds them: the plain
//! tokens first, input by input in id order (mergekit takes each input's in hash-map order,
//! which only matters when one input brings several), then the added tokens). Row `j` of an input's permuted tensor is
//! its own row for token `j` when it has the token; otherwise a row every input lacking it
//! shares: the one input that has it, else the base's when the base has it, else the mean over
//! the inputs that have it (in input order), else zeros. Rows are computed and stored in
//! mergekit's dtype for them: the config's `dtype`, else the inputs' promoted dtype, the mean
//! rounded to it at every step as torch adds tensors of that dtype. The permuted tensors are
//! written to a hidden directory beside the output (removed with it), so memory stays bounded.
//! Tensors are recognised by name (embeddings, heads and their biases); one outside the layers
//! with as many rows as the vocabulary under another name is refused rather than left unpermuted.
//!
//! Each tensor is permuted over the models that merge it (a `Group`: every input, or under
//! `slices` the first slice's sources for the embeddings and the last slice's for the head),
//! with that group's base. The `tokenizer:` block adds its listed tokens the vocabulary lacks,
//! gives listed tokens their configured rows (`force`: for every model) and pads the rows to a
//! multiple with each model's mean row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::{AddedToken, Tokenizer};

use crate::atomic::Staging;
use crate::checkpoint::dtype::{decode, encode_into, round_all};
use crate::checkpoint::layers::{BlockKind, group_blocks, layer_of};
use crate::checkpoint::{Checkpoint, FloatDType, PlannedTensor, ShardWriter, TensorMeta};
use crate::error::{Error, Result};

use super::config::{EmbedSource, MergeConfig, SliceDef, TokenRef, TokenizerSource};
use super::tokenizer::{model_dir, read_tokenizer, vocab};

/// Name endings of the tensors indexed by token id (mergekit's `vocabulary_axis` 0 tensors of
/// the architectures we load).
const VOCAB_TENSORS: &[&str] = &[
    "embed_tokens.weight",
    "lm_head.weight",
    "lm_head.bias",
    "wte.weight",
    "word_embeddings.weight",
    "embed_out.weight",
    "embed_out.bias",
    "embed_in.weight",
    "tok_embeddings.weight",
    "output_layer.weight",
];

/// The inputs' vocabularies mapped onto the output's.
struct Plan {
    /// Output tokens in id order.
    len: usize,
    /// Rows of the permuted tensors: `len` rounded up to `tokenizer.pad_to_multiple_of`.
    rows: usize,
    /// Per input: its row for each output token, if it has the token.
    perms: Vec<Vec<Option<usize>>>,
    /// `tokenizer.tokens`, by output id.
    overrides: HashMap<usize, Override>,
}

/// A `tokenizer.tokens` entry resolved against the inputs.
struct Override {
    token: String,
    /// The row's source, or why there is none (an error only where a row is needed, as in
    /// mergekit).
    source: std::result::Result<Fill, String>,
    force: bool,
}

/// What [`align`] made: the permuted tensors' directory (kept until the merge is done; none
/// when every input already had the output vocabulary), the output vocabulary size, where the
/// tokenizer files come from and, when one was built (`union`, added tokens), the tokenizer.
pub struct Aligned {
    _scratch: Option<Staging>,
    pub vocab_size: usize,
    /// The directory whose tokenizer files the output takes.
    pub source_dir: PathBuf,
    pub tokenizer: Option<Tokenizer>,
}

fn err(config: &MergeConfig, reason: String) -> Error {
    Error::Config { path: config.source.clone(), reason }
}

/// The inputs one token-indexed tensor is merged over (indices into the checkpoints, each once)
/// and the base among them: a token several of them hold takes the base's row when it has one
/// (mergekit's `PermutedVocabulary` over one tensor's models).
#[derive(Clone, Debug)]
struct Group {
    members: Vec<usize>,
    base: Option<usize>,
}

/// The output-like name beside `output` whose staging directory holds permuted inputs.
pub fn vocab_scratch(output: &Path) -> PathBuf {
    crate::atomic::named_sibling(output, "vocab")
}

/// Permutes the token-indexed tensors of `ckpts` (the base first when there is one, in
/// [`MergeConfig`] order) into the `tokenizer_source` vocabulary where some input's differs from
/// it; `None` when no `tokenizer_source` is set, an error naming the directory when its
/// tokenizer cannot be found.
pub fn align(config: &MergeConfig, ckpts: &mut [Checkpoint], output: &Path) -> Result<Option<Aligned>> {
    if config.tokenizer_source.is_none() || !config.slices.is_empty() || ckpts.is_empty() {
        return Ok(None);
    }
    let base = config.base_model.as_ref().map(|_| 0);
    let group = Group { members: (0..ckpts.len()).collect(), base };
    let names = vocab_tensors(config, &ckpts[0])?.into_iter().map(|n| (n, group.clone())).collect();
    align_groups(config, ckpts, base, names, output)
}

/// [`align`] for a `slices` config, on its models opened in [`MergeConfig::referenced_models`]
/// order (`index` finds a model's): as in mergekit, the embeddings are permuted over the first
/// slice's sources and the tensors after the layer stack over the last slice's sources that
/// merge them ([`SliceDef::in_tail`]), each with its slice's base.
pub fn align_slices(
    config: &MergeConfig,
    models: &mut [Checkpoint],
    index: impl Fn(&Path) -> Option<usize>,
    output: &Path,
) -> Result<Option<Aligned>> {
    let (Some(first), Some(last)) = (config.slices.first(), config.slices.last()) else { return Ok(None) };
    if config.tokenizer_source.is_none() || models.is_empty() {
        return Ok(None);
    }
    let top_base = config.base_model.as_ref().map(|_| 0);
    let group = |slice: &SliceDef, take: &dyn Fn(usize) -> bool| {
        let mut members: Vec<usize> = Vec::new();
        for (_, src) in slice.sources.iter().enumerate().filter(|(p, _)| take(*p)) {
            if let Some(i) = index(&src.model.path).filter(|i| !members.contains(i)) {
                members.push(i);
            }
        }
        let base = slice.base_model.as_deref().and_then(&index);
        Group { base: base.filter(|b| members.contains(b)), members }
    };
    let n0 = first.sources.len();
    let (head, tail) = (group(first, &|_| true), group(last, &|p| last.in_tail(p, n0)));
    let mut names = Vec::new();
    for (g, embeddings) in [(head, true), (tail, false)] {
        let Some(&m) = g.members.first() else { continue };
        let emb = embedding_names(&models[m]);
        for n in vocab_tensors(config, &models[m])?.into_iter().filter(|n| emb.contains(n) == embeddings) {
            names.push((n, g.clone()));
        }
    }
    align_groups(config, models, top_base, names, output)
}

/// Names of `ck`'s tensors in its embeddings block.
fn embedding_names(ck: &Checkpoint) -> Vec<String> {
    let blocks = group_blocks(ck.tensors.iter().map(|t| t.name.as_str()));
    blocks.into_iter().filter(|b| b.kind == BlockKind::Embeddings).flat_map(|b| b.tensors).collect()
}

/// Permutes each of `names`' tensors of its group's members into the source vocabulary; `base`
/// is the config's base among `ckpts`.
fn align_groups(
    config: &MergeConfig,
    ckpts: &mut [Checkpoint],
    base: Option<usize>,
    names: Vec<(String, Group)>,
    output: &Path,
) -> Result<Option<Aligned>> {
    let Some(source) = &config.tokenizer_source else { return Ok(None) };
    // Where the output's tokenizer files come from: the source model, else the base (`union`
    // without one: the first model).
    let source_dir = match (source, base) {
        (TokenizerSource::Model(p), _) => model_dir(p),
        (TokenizerSource::Base, None) => return Err(err(config, "tokenizer_source: base needs a base_model".into())),
        (_, b) => ckpts[b.unwrap_or(0)].dir.clone(),
    };
    let mut built = None;
    let out_vocab = match source {
        TokenizerSource::Base => {
            let limit = vocab_size(&ckpts[base.unwrap_or(0)]);
            vocab_of(config, &source_dir)?
                .map(|v| v.into_iter().filter(|(_, id)| limit.is_none_or(|n| *id < n)).collect())
        }
        TokenizerSource::Model(_) => vocab_of(config, &source_dir)?,
        TokenizerSource::Union => {
            let tok = union_tokenizer(config, ckpts)?;
            let vocab = tok.as_ref().map(|t| with_usize_ids(t.get_vocab(true)));
            built = tok;
            vocab
        }
    };
    let Some(out_vocab) = out_vocab else {
        return Err(err(config, format!("tokenizer_source: {} has no tokenizer.json", source_dir.display())));
    };
    let (out_vocab, built) = with_added_tokens(config, &source_dir, out_vocab, built)?;
    let plan = plan(config, ckpts, &out_vocab)?;
    let unchanged = plan.rows == plan.len
        && !plan.overrides.values().any(|o| o.force)
        && names.iter().all(|(n, g)| {
            g.members.iter().all(|&i| {
                plan.perms[i].iter().enumerate().all(|(j, r)| *r == Some(j))
                    && ckpts[i].get(n).is_none_or(|t| t.shape.first() == Some(&plan.len))
            })
        });
    if names.is_empty() || unchanged {
        for ck in ckpts.iter_mut() {
            *ck = compose(ck, None, plan.rows)?;
        }
        return Ok(Some(Aligned { _scratch: None, vocab_size: plan.rows, source_dir, tokenizer: built }));
    }
    let scratch = Staging::create(&vocab_scratch(output))?;
    let mut permuted = Vec::with_capacity(ckpts.len());
    for i in 0..ckpts.len() {
        let mine: Vec<&(String, Group)> = names.iter().filter(|(_, g)| g.members.contains(&i)).collect();
        let dir = scratch.path().join(format!("m{i}"));
        permuted.push(if mine.is_empty() { None } else { Some(write_permuted(config, ckpts, i, &plan, &mine, &dir)?) });
    }
    // Every input, permuted or not, states the output vocabulary: a slices view takes its config
    // from a model that may merge no token-indexed tensor.
    for (i, file) in permuted.into_iter().enumerate() {
        ckpts[i] = compose(&ckpts[i], file.as_ref(), plan.rows)?;
    }
    tracing::info!("tokenizer_source: {} tensors permuted into a vocabulary of {}", names.len(), plan.len);
    Ok(Some(Aligned { _scratch: Some(scratch), vocab_size: plan.rows, source_dir, tokenizer: built }))
}

/// The output vocabulary with the `tokenizer.tokens` it lacks added as mergekit adds them (plain
/// added tokens, in the order written), and then the tokenizer to write (`built`, the union's,
/// else the source's from `dir`).
fn with_added_tokens(
    config: &MergeConfig,
    dir: &Path,
    vocab: HashMap<String, usize>,
    built: Option<Tokenizer>,
) -> Result<(HashMap<String, usize>, Option<Tokenizer>)> {
    let missing: Vec<AddedToken> = config
        .tokens
        .iter()
        .filter(|(t, _)| !vocab.contains_key(t))
        .map(|(t, _)| AddedToken::from(t.clone(), false))
        .collect();
    if missing.is_empty() {
        return Ok((vocab, built));
    }
    let mut tok = match built {
        Some(t) => t,
        None => read_tokenizer(config, dir)?
            .ok_or_else(|| err(config, format!("tokenizer.tokens: {} has no tokenizer.json", dir.display())))?,
    };
    if tok.get_vocab(true).len() != vocab.len() {
        return Err(err(
            config,
            format!(
                "tokenizer.tokens: the tokenizer of {} numbers tokens past its model's vocab_size; symerge does not strip \
                 them to add tokens after the others",
                dir.display()
            ),
        ));
    }
    tok.add_tokens(missing).map_err(|e| err(config, format!("tokenizer.tokens: adding tokens: {e}")))?;
    Ok((with_usize_ids(tok.get_vocab(true)), Some(tok)))
}

/// The `union` tokenizer: the first input's (the base when there is one) plus the tokens of the
/// others it lacks, ids past an input's `vocab_size` left out; `None` without tokenizers.
fn union_tokenizer(config: &MergeConfig, ckpts: &[Checkpoint]) -> Result<Option<Tokenizer>> {
    let read = |dir: &Path| read_tokenizer(config, dir);
    let Some(mut out) = read(&ckpts[0].dir)? else { return Ok(None) };
    let limit = vocab_size(&ckpts[0]).unwrap_or(usize::MAX);
    if let Some((tok, id)) = out.get_vocab(true).into_iter().find(|&(_, id)| id as usize >= limit) {
        return Err(err(
            config,
            format!(
                "tokenizer_source: union: {} numbers token {tok:?} {id}, past its vocab_size {limit}; symerge does not \
                 strip such tokens from a base tokenizer",
                ckpts[0].dir.display()
            ),
        ));
    }
    let have = out.get_vocab(true);
    let (mut plain, mut added): (Vec<String>, Vec<AddedToken>) = (Vec::new(), Vec::new());
    let mut seen_dirs: Vec<&Path> = Vec::new();
    for ck in ckpts {
        if seen_dirs.contains(&ck.dir.as_path()) {
            continue;
        }
        seen_dirs.push(&ck.dir);
        let Some(tok) = read(&ck.dir)? else { continue };
        let limit = vocab_size(ck).unwrap_or(usize::MAX) as u32;
        let mut specials: Vec<(u32, AddedToken)> = tok.get_added_tokens_decoder().into_iter().collect();
        specials.sort_by_key(|(id, _)| *id);
        let mut words: Vec<(String, u32)> = tok.get_vocab(true).into_iter().collect();
        words.sort_by_key(|(_, id)| *id);
        for (word, id) in words {
            let is_added = specials.iter().any(|(_, a)| a.content == word);
            if id < limit && !is_added && !have.contains_key(&word) && !plain.contains(&word) {
                plain.push(word);
            }
        }
        for (id, a) in specials {
            if id < limit && !added.iter().any(|b| b.content == a.content) {
                added.push(a);
            }
        }
    }
    plain.retain(|w| !added.iter().any(|a| &a.content == w));
    let adding = |e: tokenizers::Error| err(config, format!("tokenizer_source: union: adding tokens: {e}"));
    out.add_tokens(plain.into_iter().map(|w| AddedToken::from(w, false)).collect::<Vec<_>>()).map_err(adding)?;
    out.add_tokens(added).map_err(adding)?;
    Ok(Some(out))
}

/// `dir/tokenizer.json`'s tokens and ids, added tokens included.
fn vocab_of(config: &MergeConfig, dir: &Path) -> Result<Option<HashMap<String, usize>>> {
    Ok(vocab(config, dir)?.map(with_usize_ids))
}

fn with_usize_ids(vocab: HashMap<String, u32>) -> HashMap<String, usize> {
    vocab.into_iter().map(|(t, id)| (t, id as usize)).collect()
}

fn vocab_size(ck: &Checkpoint) -> Option<usize> {
    vocab_size_of(ck.config.as_ref()?)
}

/// A config's vocabulary size: `vocab_size`, else a multimodal model's `text_config.vocab_size`
/// (where mergekit's `vocab_size_config_key` points for those architectures).
pub fn vocab_size_of(config: &serde_json::Value) -> Option<usize> {
    let n = config.get("vocab_size").or_else(|| config.get("text_config")?.get("vocab_size"))?;
    n.as_u64().map(|n| n as usize)
}

/// Sets the vocabulary size where [`vocab_size_of`] reads it (top-level when the config states
/// none).
pub fn set_vocab_size(config: &mut serde_json::Value, n: usize) {
    let nested =
        config.get("vocab_size").is_none() && config.get("text_config").is_some_and(|t| t.get("vocab_size").is_some());
    let target = if nested { config.get_mut("text_config") } else { Some(config) };
    if let Some(obj) = target.and_then(|c| c.as_object_mut()) {
        obj.insert("vocab_size".into(), n.into());
    }
}

/// Each input's row for every output token; an input without a tokenizer is taken to have the
/// first input's (mergekit: "assuming same as" the base), and tokens at ids beyond an input's
/// `vocab_size` are taken as absent.
fn plan(config: &MergeConfig, ckpts: &[Checkpoint], out_vocab: &HashMap<String, usize>) -> Result<Plan> {
    let len = out_vocab.len();
    let mut by_id: Vec<Option<&str>> = vec![None; len];
    for (tok, &id) in out_vocab {
        let slot = by_id.get_mut(id).ok_or_else(|| {
            err(config, format!("tokenizer_source: token {tok:?} has id {id}, beyond the {len} tokens"))
        })?;
        if let Some(other) = slot.replace(tok.as_str()) {
            return Err(err(config, format!("tokenizer_source: tokens {other:?} and {tok:?} share id {id}")));
        }
    }
    let first = vocab_of(config, &ckpts[0].dir)?;
    let mut perms = Vec::with_capacity(ckpts.len());
    for ck in ckpts {
        let own = vocab_of(config, &ck.dir)?;
        if own.is_none()
            && let Some(f) = ["tokenizer.model", "vocab.json", "vocab.txt"].iter().find(|f| ck.dir.join(f).is_file())
        {
            return Err(err(
                config,
                format!(
                    "tokenizer_source: {} has a {f} but no tokenizer.json, the only tokenizer format symerge reads \
                     (save it with a fast tokenizer)",
                    ck.dir.display()
                ),
            ));
        }
        let Some(vocab) = own.as_ref().or(first.as_ref()) else {
            return Err(err(config, format!("tokenizer_source: {} has no tokenizer.json", ck.dir.display())));
        };
        let limit = vocab_size(ck).unwrap_or(usize::MAX);
        perms.push(by_id.iter().map(|t| t.and_then(|t| vocab.get(t).copied()).filter(|&r| r < limit)).collect());
    }
    let rows = config.pad_to_multiple_of.map_or(len, |m| len.div_ceil(m) * m);
    let overrides = overrides(config, ckpts, out_vocab)?;
    Ok(Plan { len, rows, perms, overrides })
}

/// `tokenizer.tokens` entries for tokens of the output vocabulary, their models found among
/// `ckpts`.
fn overrides(
    config: &MergeConfig,
    ckpts: &[Checkpoint],
    out_vocab: &HashMap<String, usize>,
) -> Result<HashMap<usize, Override>> {
    let find = |p: &Path| {
        let dir = model_dir(p).canonicalize().unwrap_or_else(|_| model_dir(p));
        let i = ckpts.iter().position(|c| c.dir.canonicalize().is_ok_and(|d| d == dir));
        i.ok_or_else(|| format!("{} is not one of the merged models", p.display()))
    };
    let mut out = HashMap::new();
    for (token, t) in &config.tokens {
        let Some(&j) = out_vocab.get(token) else { continue };
        let source = match &t.source {
            None => Err("it has no `source`".to_string()),
            Some(EmbedSource::Zero) => Ok(Fill::Zero),
            Some(EmbedSource::Model(p)) => find(p).map(Fill::From),
            Some(EmbedSource::ModelToken { model, token: from }) => match (find(model), from) {
                (Err(e), _) => Err(e),
                (Ok(i), TokenRef::Id(id)) => Ok(Fill::Row(i, *id)),
                (Ok(i), TokenRef::Text(text)) => {
                    match vocab_of(config, &ckpts[i].dir)?.and_then(|v| v.get(text).copied()) {
                        Some(r) => Ok(Fill::Row(i, r)),
                        None => Err(format!("token {text:?} is not in {}", model.display())),
                    }
                }
            },
        };
        out.insert(j, Override { token: token.clone(), source, force: t.force });
    }
    Ok(out)
}

/// The reference's token-indexed tensors (1-D or 2-D, rows first), or an error naming a tensor
/// outside the layer stack with as many rows as the vocabulary that symerge does not know to be
/// token-indexed (left as it is, it would no longer match the permuted ones).
fn vocab_tensors(config: &MergeConfig, ck: &Checkpoint) -> Result<Vec<String>> {
    let known = |n: &str| n == "output.weight" || VOCAB_TENSORS.iter().any(|s| n.ends_with(s));
    let rows = vocab_size(ck);
    let mut names = Vec::new();
    for t in ck.tensors.iter().filter(|t| t.float_dtype().is_some() && (1..=2).contains(&t.shape.len())) {
        if known(&t.name) {
            names.push(t.name.clone());
        } else if rows.is_some_and(|r| r > 1 && t.shape[0] == r) && layer_of(&t.name).is_none() {
            return Err(err(
                config,
                format!(
                    "tokenizer_source: tensor `{}` of {} has {} rows, as many as the vocabulary, but symerge does not \
                     know it as token-indexed and cannot permute it",
                    t.name,
                    ck.path.display(),
                    t.shape[0]
                ),
            ));
        }
    }
    Ok(names)
}

/// The dtype a tensor's permuted rows are computed and stored in, as mergekit computes them: the
/// config's `dtype` when set (mergekit casts its inputs to it), else the inputs' promoted dtype
/// (f32 as soon as they differ).
fn row_dtype(config: &MergeConfig, ckpts: &[Checkpoint], group: &Group, name: &str) -> FloatDType {
    if let Some(d) = config.compute_dtype {
        return d;
    }
    let mut dtypes = group.members.iter().filter_map(|&i| ckpts[i].get(name)).filter_map(TensorMeta::float_dtype);
    let first = dtypes.next().unwrap_or(FloatDType::F32);
    if dtypes.all(|d| d == first) { first } else { FloatDType::F32 }
}

/// Where the row of output token `j` that inputs lacking it share comes from.
#[derive(Clone)]
enum Fill {
    Own,
    /// That input's row for the token.
    From(usize),
    /// That input's row `.1` (a `model_token` source).
    Row(usize, usize),
    Mean(Vec<usize>),
    Zero,
}

/// The shared row of output token `j` among `group`'s members, as mergekit assigns it: a
/// configured source when the token has one, else the one member holding the token, the base,
/// the mean of the members holding it, or zeros. A configured source must be a member (and
/// hold the token, when it is a model's row for it).
fn fill(config: &MergeConfig, ckpts: &[Checkpoint], plan: &Plan, j: usize, group: &Group, name: &str) -> Result<Fill> {
    let present: Vec<usize> = group.members.iter().copied().filter(|&i| plan.perms[i][j].is_some()).collect();
    if let Some(o) = plan.overrides.get(&j) {
        let source = o.source.as_ref().map_err(|why| {
            err(config, format!("tokenizer.tokens.{:?}: `{name}` needs a row for it, but {why}", o.token))
        })?;
        let (who, needs_token) = match *source {
            Fill::From(i) => (Some(i), true),
            Fill::Row(i, _) => (Some(i), false),
            _ => (None, false),
        };
        if let Some(i) = who.filter(|i| !group.members.contains(i) || (needs_token && !present.contains(i))) {
            let why = if group.members.contains(&i) { "lacks the token" } else { "is not among the models merging it" };
            let model = ckpts[i].path.display();
            return Err(err(config, format!("tokenizer.tokens.{:?}: for `{name}`, {model} {why}", o.token)));
        }
        return Ok(source.clone());
    }
    Ok(match present.len() {
        n if n == group.members.len() => Fill::Own,
        0 => Fill::Zero,
        1 => Fill::From(present[0]),
        _ => match group.base.filter(|b| present.contains(b)) {
            Some(b) => Fill::From(b),
            None => Fill::Mean(present),
        },
    })
}

/// Writes input `i`'s permuted token-indexed tensors into `dir` and opens them.
fn write_permuted(
    config: &MergeConfig,
    ckpts: &[Checkpoint],
    i: usize,
    plan: &Plan,
    names: &[&(String, Group)],
    dir: &Path,
) -> Result<Checkpoint> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ck = &ckpts[i];
    let mut planned = Vec::new();
    for (name, group) in names {
        let t = tensor(config, ck, name)?;
        let mut shape = t.shape.clone();
        shape[0] = plan.rows;
        let dtype = row_dtype(config, ckpts, group, name).to_safetensors();
        planned.push(PlannedTensor { name: name.clone(), dtype, shape });
    }
    let mut writer = ShardWriter::create(dir, planned, u64::MAX)?;
    for (name, group) in names {
        let t = tensor(config, ck, name)?;
        let (dtype, width) = (row_dtype(config, ckpts, group, name), row_width(t));
        let row_bytes = width * dtype.size();
        let mut out = vec![0u8; plan.rows * row_bytes];
        let mut row = vec![0f32; width];
        for (j, dst) in out[..plan.len * row_bytes].chunks_exact_mut(row_bytes).enumerate() {
            let forced = plan.overrides.get(&j).is_some_and(|o| o.force);
            let src = match plan.perms[i][j].filter(|_| !forced) {
                Some(r) => Some((i, r)),
                None => match fill(config, ckpts, plan, j, group, name)? {
                    Fill::From(d) => plan.perms[d][j].map(|r| (d, r)),
                    Fill::Row(d, r) => Some((d, r)),
                    Fill::Own | Fill::Zero => None,
                    Fill::Mean(from) => {
                        mean_row(config, ckpts, (&from, dtype), plan, j, name, &mut row)?;
                        encode_into(dtype, &row, dst);
                        continue;
                    }
                },
            };
            if let Some((d, r)) = src {
                read_row(config, &ckpts[d], name, r, &mut row)?;
                encode_into(dtype, &row, dst);
            }
        }
        pad_with_mean(&mut out, plan.len, dtype, width);
        writer.write(name, &out)?;
    }
    writer.finish()?;
    Checkpoint::open(dir)
}

/// Rows `len..` of `out` (rows of `width` in `dtype`) set to the mean of rows `..len`, as
/// mergekit fills `pad_to_multiple_of`'s padding.
fn pad_with_mean(out: &mut [u8], len: usize, dtype: FloatDType, width: usize) {
    let row_bytes = width * dtype.size();
    if out.len() <= len * row_bytes || len == 0 {
        return;
    }
    let (real, pad) = out.split_at_mut(len * row_bytes);
    let mut sum = vec![0f64; width];
    let mut row = vec![0f32; width];
    for r in real.chunks_exact(row_bytes) {
        decode(dtype, r, &mut row);
        sum.iter_mut().zip(&row).for_each(|(s, &x)| *s += f64::from(x));
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / len as f64) as f32).collect();
    for dst in pad.chunks_exact_mut(row_bytes) {
        encode_into(dtype, &mean, dst);
    }
}

/// `ck`'s token-indexed tensor `name`: one or two dimensions, rows first, rows not empty.
fn tensor<'a>(config: &MergeConfig, ck: &'a Checkpoint, name: &str) -> Result<&'a TensorMeta> {
    let t = ck.get(name).filter(|t| (1..=2).contains(&t.shape.len())).ok_or_else(|| {
        err(config, format!("tokenizer_source: {} has no 1-D or 2-D tensor `{name}` to permute", ck.path.display()))
    })?;
    if row_width(t) == 0 {
        return Err(err(config, format!("tokenizer_source: tensor `{name}` of {} has empty rows", ck.path.display())));
    }
    Ok(t)
}

/// Elements per row (1 for a bias).
fn row_width(t: &TensorMeta) -> usize {
    t.shape[1..].iter().product()
}

fn float(t: &TensorMeta) -> Result<FloatDType> {
    t.float_dtype().ok_or_else(|| Error::Invalid(format!("tensor `{}` is not a float tensor", t.name)))
}

/// Row `r` of `ck`'s tensor `name`, decoded to f32.
fn read_row(config: &MergeConfig, ck: &Checkpoint, name: &str, r: usize, out: &mut [f32]) -> Result<()> {
    let t = tensor(config, ck, name)?;
    if row_width(t) != out.len() || r >= t.shape[0] {
        return Err(err(
            config,
            format!(
                "tokenizer_source: {} tensor `{name}` has shape {:?}: no row {r} of width {} for its tokenizer",
                ck.path.display(),
                t.shape,
                out.len()
            ),
        ));
    }
    let dtype = float(t)?;
    let size = dtype.size() * out.len();
    decode(dtype, &ck.bytes(t)[r * size..(r + 1) * size], out);
    Ok(())
}

/// The mean over inputs `from` of their rows for output token `j`, summed in input order with
/// every step rounded to `dtype`, as mergekit sums tensors of that dtype.
fn mean_row(
    config: &MergeConfig,
    ckpts: &[Checkpoint],
    (from, dtype): (&[usize], FloatDType),
    plan: &Plan,
    j: usize,
    name: &str,
    out: &mut [f32],
) -> Result<()> {
    out.fill(0.0);
    let mut row = vec![0f32; out.len()];
    for &d in from {
        let r = plan.perms[d][j].expect("present");
        read_row(config, &ckpts[d], name, r, &mut row)?;
        round_all(dtype, &mut row);
        out.iter_mut().zip(&row).for_each(|(o, x)| *o += x);
        round_all(dtype, out);
    }
    let n = from.len() as f32;
    out.iter_mut().for_each(|o| *o /= n);
    round_all(dtype, out);
    Ok(())
}

/// `ck` with its token-indexed tensors read from `permuted` (when it has some) and `vocab_size`
/// set to `len`.
fn compose(ck: &Checkpoint, permuted: Option<&Checkpoint>, len: usize) -> Result<Checkpoint> {
    let parts: Vec<(&Checkpoint, &TensorMeta, String)> = ck
        .tensors
        .iter()
        .map(|t| match permuted.and_then(|p| p.get(&t.name).map(|m| (p, m))) {
            Some((p, m)) => (p, m, t.name.clone()),
            None => (ck, t, t.name.clone()),
        })
        .collect();
    let mut config = ck.config.clone();
    if let Some(c) = config.as_mut() {
        set_vocab_size(c, len);
    }
    Checkpoint::compose(ck.path.clone(), ck.dir.clone(), &parts, config)
}
