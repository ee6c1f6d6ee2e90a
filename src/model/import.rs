//! `symerge import-gguf`: a Llama-family GGUF file (llama.cpp's format) as a Hugging Face
//! checkpoint directory the rest of symerge reads: `model.safetensors` (dequantized to f32:
//! quantized values `d * q + m` are exact in f32 and would round again in bf16), `config.json`
//! (`LlamaForCausalLM`), `tokenizer.json`, and the special tokens and chat template that
//! transformers needs beside it (`tokenizer_config.json`, `generation_config.json`).
//!
//! It undoes what llama.cpp's converter did, as transformers' GGUF loader does: tensor names back
//! to Hugging Face's, ggml dimension order back to PyTorch shapes, and the rotary row permutation
//! of the query and key projections reversed. The tokenizer is rebuilt the way transformers builds
//! it from the file's byte-level BPE (`tokenizer.ggml.model: gpt2`): vocabulary, merges, the
//! control tokens as special tokens, GPT-2's byte-level pre-tokenizer and decoder.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::atomic::Staging;
use crate::checkpoint::dtype::encode_into;
use crate::checkpoint::gguf::{Gguf, GgufTensor, GgufValue, show_f64};
use crate::checkpoint::{FloatDType, PlannedTensor, ShardWriter};
use crate::error::{Error, Result};
use crate::model::hf_config::{POSITIVE_IN_F32, positive_in_f32};

/// `symerge import-gguf`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportOptions {
    /// The .gguf file to import (a Llama-family model with a byte-level BPE tokenizer).
    pub file: PathBuf,
    /// Output directory (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output directory that symerge wrote (it holds .symerge-output) or
    /// that is empty; anything else is refused.
    #[arg(long)]
    pub force: bool,
}

impl ImportOptions {
    /// Imports `file` into `output` ([`import_gguf`]).
    pub fn run(&self) -> Result<ImportSummary> {
        crate::input_file::require(&self.file, crate::input_file::NamedBy::Arg("FILE"))?;
        import_gguf(&self.file, &self.output, self.force)
    }
}

/// What an import wrote (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub output: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub params: u64,
    pub vocab: usize,
    pub tied_embeddings: bool,
    /// This process's peak resident set (`VmHWM`), as `merge` reports it: a hostile file's
    /// metadata must not cost many times its size.
    pub peak_rss_bytes: Option<u64>,
}

/// The Llama hyper-parameters a GGUF file states.
struct Hyper {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    rope_theta: f64,
    context: usize,
}

fn bad(g: &Gguf, reason: String) -> Error {
    Error::BadGguf { path: g.path.clone(), reason }
}

/// `key`'s unsigned integer, `None` when absent. A value of another type is an error saying
/// what it is: a string or a negative number where a size belongs is not "missing".
fn uint(g: &Gguf, key: &str) -> Result<Option<usize>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) => Ok(Some(n)),
        None => Err(bad(g, format!("metadata `{key}` is {}, expected an unsigned integer", v.describe()))),
    }
}

fn required(g: &Gguf, key: &str) -> Result<usize> {
    uint(g, key)?.ok_or_else(|| bad(g, format!("metadata `{key}` is missing")))
}

/// `key`'s string, `None` when absent; a value of another type is an error saying what it is.
fn text<'g>(g: &'g Gguf, key: &str) -> Result<Option<&'g str>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    v.as_str().map(Some).ok_or_else(|| bad(g, format!("metadata `{key}` is {}, expected a string", v.describe())))
}

/// `key`'s positive number (`default` when absent). It is written to config.json as it is
/// (a NaN would become `null` there, read back as a default), and symerge computes in f32, so
/// a value config.json's reader would refuse (a `rope.freq_base` of 1e300, inf once cast) is
/// refused here, naming the key, rather than by a later command.
fn positive_f32(g: &Gguf, key: &str, default: f64) -> Result<f64> {
    let v = match g.get(key) {
        None => default,
        Some(v) => {
            v.as_f64().ok_or_else(|| bad(g, format!("metadata `{key}` is {}, expected a number", v.describe())))?
        }
    };
    if !positive_in_f32(v) {
        return Err(bad(
            g,
            format!("metadata `{key}` is {}, not {POSITIVE_IN_F32}, the precision symerge computes in", show_f64(v)),
        ));
    }
    Ok(v)
}

fn hyper(g: &Gguf, arch: &str) -> Result<Hyper> {
    let key = |k: &str| format!("{arch}.{k}");
    let (hidden, heads) = (required(g, &key("embedding_length"))?, required(g, &key("attention.head_count"))?);
    if heads == 0 || hidden % heads != 0 {
        return Err(bad(g, format!("{heads} attention heads do not divide the hidden size {hidden}")));
    }
    let kv_heads = uint(g, &key("attention.head_count_kv"))?.unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(g, format!("{kv_heads} key/value heads do not divide {heads} heads")));
    }
    Ok(Hyper {
        layers: required(g, &key("block_count"))?,
        hidden,
        intermediate: required(g, &key("feed_forward_length"))?,
        heads,
        kv_heads,
        head_dim: head_dim(g, arch, hidden, heads)?,
        eps: positive_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-5)?,
        rope_theta: positive_f32(g, &key("rope.freq_base"), 10000.0)?,
        context: context_length(g, &key("context_length"))?,
    })
}

/// `context_length`, 2048 when absent; 0 is refused: written as `max_position_embeddings` and
/// `model_max_length`, it makes transformers truncate every text to nothing (fuzzing round 6).
fn context_length(g: &Gguf, key: &str) -> Result<usize> {
    match uint(g, key)? {
        Some(0) => Err(bad(g, format!("metadata `{key}` is 0: a model that reads no token"))),
        n => Ok(n.unwrap_or(2048)),
    }
}

/// The width of an attention head as llama.cpp reads it: `attention.key_length`, else the
/// hidden size over the heads. A Llama rotates whole heads, so `rope.dimension_count` must be
/// that width (llama.cpp refuses it otherwise). The query width `heads * head_dim` is checked:
/// a product that wraps could match the real tensors' widths and pass every shape check, then
/// size a rotary table of 2^62 entries (`rope.dimension_count` 2^63 + 4, fuzzing round 3).
fn head_dim(g: &Gguf, arch: &str, hidden: usize, heads: usize) -> Result<usize> {
    let (key_length, rope) = (format!("{arch}.attention.key_length"), format!("{arch}.rope.dimension_count"));
    let (d, from) = match uint(g, &key_length)? {
        Some(d) if d == 0 || d.checked_mul(heads).is_none() => {
            return Err(bad(g, format!("metadata `{key_length}` is {d}, which does not make {heads} heads")));
        }
        Some(d) => (d, format!("`{key_length}`")),
        None => (hidden / heads, format!("`{arch}.embedding_length` {hidden} over {heads} heads")),
    };
    match uint(g, &rope)? {
        Some(r) if r != d => Err(bad(
            g,
            format!("metadata `{rope}` is {r}, but the heads are {d} wide ({from}); a Llama rotates whole heads"),
        )),
        _ => Ok(d),
    }
}

/// The Hugging Face name of a llama.cpp tensor name.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = part.rsplit_once('.')?;
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's rotary permutation of a query/key projection's rows (`[rows, cols]`,
/// `heads` groups): row `h*2d + a*d + i` of the result is row `h*2d + 2i + a` of the input.
fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) || values.len() != rows * cols {
        return None;
    }
    let d = rows / heads / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for a in 0..2 {
            for i in 0..d {
                let (to, from) = (h * 2 * d + a * d + i, h * 2 * d + 2 * i + a);
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// Imports `gguf_path` into the directory `output` (atomically; `force` replaces a previous
/// symerge output or an empty directory there).
pub fn import_gguf(gguf_path: &Path, output: &Path, force: bool) -> Result<ImportSummary> {
    crate::atomic::check_output_apart(output, &[gguf_path])?;
    crate::atomic::check_output_dir(output, force)?;
    let g = Gguf::open(gguf_path)?;
    let arch = text(&g, "general.architecture")?.unwrap_or("").to_string();
    if arch != "llama" {
        return Err(bad(&g, format!("architecture `{arch}`: only `llama` (Llama, SmolLM, Mistral-style) imports")));
    }
    let h = hyper(&g, &arch)?;
    let mut tensors: Vec<(String, &GgufTensor)> = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let name = hf_name(&t.name).ok_or_else(|| bad(&g, format!("tensor `{}` has no Llama counterpart", t.name)))?;
        if let Some((_, first)) = tensors.iter().find(|(n, _)| *n == name) {
            return Err(bad(&g, format!("tensors `{}` and `{}` are both `{name}`", first.name, t.name)));
        }
        tensors.push((name, t));
    }
    let tied = !tensors.iter().any(|(n, _)| n == "lm_head.weight");
    let vocab = g
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1).copied())
        .ok_or_else(|| bad(&g, "tensor `token_embd.weight` is missing".into()))?;
    let mut tokenizer = tokenizer_json(&g, vocab)?;
    let specials = Specials::read(&g)?;
    tokenizer["post_processor"] = post_processor(&specials);

    let staging = Staging::create(output)?;
    let planned: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(name, t)| PlannedTensor {
            name: name.clone(),
            dtype: FloatDType::F32.to_safetensors(),
            shape: t.shape(),
        })
        .collect();
    let params: u64 = tensors.iter().map(|(_, t)| t.numel() as u64).sum();
    let mut writer = ShardWriter::create(staging.path(), planned, u64::MAX)?;
    let mut bytes = Vec::new();
    for (name, t) in &tensors {
        let mut values = g.dequantize(t);
        let shape = t.shape();
        let heads = if t.name.contains(".attn_q.") {
            Some(h.heads)
        } else if t.name.contains(".attn_k.") {
            Some(h.kv_heads)
        } else {
            None
        };
        if let (Some(heads), [rows, cols]) = (heads, shape.as_slice()) {
            values = unpermute_rows(&values, *rows, *cols, heads).ok_or_else(|| {
                bad(&g, format!("tensor `{}` of shape {shape:?} is not {heads} rotary heads", t.name))
            })?;
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { path: g.path.clone(), tensor: t.name.clone(), index: i, value: values[i] });
        }
        bytes.resize(values.len() * 4, 0);
        encode_into(FloatDType::F32, &values, &mut bytes);
        writer.write(name, &bytes)?;
    }
    writer.finish()?;
    let config = config_json(&h, vocab, tied, &specials);
    let tokenizer_config = tokenizer_config_json(&g, &h, &specials)?;
    let generation_config = generation_config_json(&specials);
    for (file, value) in [
        ("config.json", &config),
        ("tokenizer.json", &tokenizer),
        ("tokenizer_config.json", &tokenizer_config),
        ("generation_config.json", &generation_config),
    ] {
        let path = staging.path().join(file);
        let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    }
    verify_staged(&g, staging.path(), &tensors)?;
    staging.commit(output, force)?;
    Ok(ImportSummary {
        output: output.to_path_buf(),
        architecture: arch,
        tensors: tensors.len(),
        params,
        vocab,
        tied_embeddings: tied,
        peak_rss_bytes: crate::sysinfo::peak_rss_bytes(),
    })
}

/// The staged checkpoint read back as symerge reads a Llama model: every tensor its config's
/// layout needs, at the shape the metadata's sizes imply, and no other; its tokenizer loads. An
/// import is committed only once it is a model symerge can run, and a lying file is refused
/// here, naming its tensor or key, rather than in a later command.
fn verify_staged(g: &Gguf, dir: &Path, tensors: &[(String, &GgufTensor)]) -> Result<()> {
    use crate::model::LmArch;
    let gguf_name = |hf: &str| tensors.iter().find(|(n, _)| n == hf).map_or(hf, |(_, t)| t.name.as_str()).to_string();
    let reason = |e: Error| match e {
        Error::Model { reason, .. } => reason,
        e => e.to_string(),
    };
    let ck = crate::checkpoint::Checkpoint::open(dir)?;
    let json =
        ck.config.as_ref().ok_or_else(|| Error::Invalid("internal: the staged config.json is missing".into()))?;
    let config = crate::model::LlamaConfig::from_json(json, &dir.join("config.json"))
        .map_err(|e| bad(g, format!("its metadata makes no Llama config: {}", reason(e))))?;
    let blocks = <crate::model::LlamaConfig as LmArch<crate::backend::Cpu>>::chain(&config, &ck)
        .map_err(|e| bad(g, format!("{} (metadata `llama.block_count`)", reason(e))))?;
    let mut expected = std::collections::HashSet::new();
    for (name, shape) in blocks.iter().flat_map(|b| b.param_shapes()) {
        match ck.get(&name) {
            None => {
                return Err(bad(
                    g,
                    format!("tensor `{}` is missing ({} layers stated)", gguf_name(&name), config.num_hidden_layers),
                ));
            }
            Some(m) if m.shape != shape => {
                return Err(bad(
                    g,
                    format!(
                        "tensor `{}` has shape {:?} as `{name}`, where the metadata's sizes need {shape:?}",
                        gguf_name(&name),
                        m.shape
                    ),
                ));
            }
            Some(_) => {
                expected.insert(name);
            }
        }
    }
    if let Some(t) = ck.tensors.iter().find(|t| !expected.contains(&t.name)) {
        return Err(bad(
            g,
            format!(
                "tensor `{}` is not part of the {}-layer model the metadata states",
                gguf_name(&t.name),
                config.num_hidden_layers
            ),
        ));
    }
    crate::model::TextTokenizer::from_dir(dir, crate::model::DEFAULT_MAX_LEN)
        .map_err(|e| bad(g, format!("its tokenizer does not load: {e}")))?;
    Ok(())
}

fn config_json(h: &Hyper, vocab: usize, tied: bool, s: &Specials) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h.hidden,
        "intermediate_size": h.intermediate,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv_heads,
        "head_dim": h.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": h.eps,
        "rope_theta": h.rope_theta,
        "max_position_embeddings": h.context,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": s.bos.as_ref().map(|t| t.0),
        "eos_token_id": s.eos.as_ref().map(|t| t.0),
        "pad_token_id": s.pad.as_ref().map(|t| t.0),
        "torch_dtype": "float32",
    })
}

/// A special token: its id and its text as the file lists it.
type Special = (usize, String);

/// The special tokens the file names (`tokenizer.ggml.*_token_id`) and whether its tokenizer adds
/// BOS or EOS (`tokenizer.ggml.add_bos_token`, `add_eos_token`): what transformers' GGUF loader
/// reads beside the vocabulary, and what a bare tokenizer.json leaves a user without.
struct Specials {
    bos: Option<Special>,
    eos: Option<Special>,
    unk: Option<Special>,
    pad: Option<Special>,
    /// The other tokens llama.cpp stops generating at (end of turn, end of message).
    stop: Vec<usize>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
}

impl Specials {
    fn read(g: &Gguf) -> Result<Self> {
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let special = |key: &str| special_token(g, &tokens, key);
        let stop = [special("eot_token_id")?, special("eom_token_id")?].into_iter().flatten().map(|t| t.0).collect();
        Ok(Specials {
            bos: special("bos_token_id")?,
            eos: special("eos_token_id")?,
            unk: special("unknown_token_id")?,
            pad: special("padding_token_id")?,
            stop,
            add_bos: flag(g, "tokenizer.ggml.add_bos_token")?,
            add_eos: flag(g, "tokenizer.ggml.add_eos_token")?,
        })
    }
}

/// `tokenizer.ggml.<key>`'s token. An id past the token list is left out with a warning, as
/// llama.cpp leaves it out, rather than written where transformers would index past the vocabulary.
fn special_token(g: &Gguf, tokens: &[&str], key: &str) -> Result<Option<Special>> {
    let key = format!("tokenizer.ggml.{key}");
    let Some(id) = uint(g, &key)? else { return Ok(None) };
    match tokens.get(id) {
        Some(t) => Ok(Some((id, t.to_string()))),
        None => {
            let n = tokens.len();
            tracing::warn!("{}: metadata `{key}` is {id}, past the {n} tokens; left out", g.path.display());
            Ok(None)
        }
    }
}

/// `key`'s bool, `None` when absent; a value of another type is an error saying what it is.
fn flag(g: &Gguf, key: &str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(GgufValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(g, format!("metadata `{key}` is {}, expected a bool", v.describe()))),
    }
}

/// The tokenizer.json post-processor: BOS before and EOS after each sequence when the file says
/// its tokenizer adds them, as transformers' GGUF loader sets it up. transformers 5 takes this
/// from tokenizer.json and ignores `add_bos_token` in tokenizer_config.json, and symerge's own
/// tokenizer reads it too.
fn post_processor(s: &Specials) -> Value {
    let bos = s.bos.as_ref().filter(|_| s.add_bos == Some(true));
    let eos = s.eos.as_ref().filter(|_| s.add_eos == Some(true));
    let special = |t: Option<&Special>, type_id: u32| {
        t.map(|(_, text)| json!({"SpecialToken": {"id": text, "type_id": type_id}}))
    };
    let sequence = |id: &str, type_id: u32| Some(json!({"Sequence": {"id": id, "type_id": type_id}}));
    let single: Vec<Value> = [special(bos, 0), sequence("A", 0), special(eos, 0)].into_iter().flatten().collect();
    let second = [special(bos, 1), sequence("B", 1), special(eos, 1)].into_iter().flatten();
    let pair: Vec<Value> = single.iter().cloned().chain(second).collect();
    let tokens: serde_json::Map<String, Value> = [bos, eos]
        .into_iter()
        .flatten()
        .map(|(id, text)| (text.clone(), json!({"id": text, "ids": [id], "tokens": [text]})))
        .collect();
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
}

/// tokenizer_config.json: the special tokens by name, whether BOS/EOS are added, the chat
/// template and the context length, as transformers reads them from a GGUF file. The class is
/// the generic tokenizers one (transformers 5 names it `TokenizersBackend` and keeps this name
/// for it), so tokenizer.json is used as written rather than rebuilt by a model's class.
fn tokenizer_config_json(g: &Gguf, h: &Hyper, s: &Specials) -> Result<Value> {
    let mut c = serde_json::Map::new();
    c.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    for (name, token) in [("bos_token", &s.bos), ("eos_token", &s.eos), ("unk_token", &s.unk), ("pad_token", &s.pad)] {
        if let Some((_, text)) = token {
            c.insert(name.into(), text.clone().into());
        }
    }
    for (name, value) in [("add_bos_token", s.add_bos), ("add_eos_token", s.add_eos)] {
        if let Some(v) = value {
            c.insert(name.into(), v.into());
        }
    }
    if let Some(template) = text(g, "tokenizer.chat_template")? {
        c.insert("chat_template".into(), template.into());
    }
    c.insert("model_max_length".into(), h.context.into());
    Ok(Value::Object(c))
}

/// generation_config.json: BOS, PAD, and every token llama.cpp stops at as EOS (one id, or a list
/// when the file also names an end-of-turn token), so `generate` stops where llama.cpp does.
fn generation_config_json(s: &Specials) -> Value {
    let mut stop: Vec<usize> = s.eos.iter().map(|t| t.0).collect();
    for id in &s.stop {
        if !stop.contains(id) {
            stop.push(*id);
        }
    }
    let eos = match stop.as_slice() {
        [] => Value::Null,
        [one] => (*one).into(),
        many => many.into(),
    };
    json!({"bos_token_id": s.bos.as_ref().map(|t| t.0), "eos_token_id": eos, "pad_token_id": s.pad.as_ref().map(|t| t.0)})
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for
/// characters from U+0100 on.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("a Latin-1 character")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("a BMP character")
        };
    }
    table
}

/// The string array `key`: its type is checked, so a list of numbers is not "missing".
fn string_array<'g>(g: &'g Gguf, key: &str) -> Result<Vec<&'g str>> {
    let v = g.get(key).ok_or_else(|| bad(g, format!("metadata `{key}` is missing")))?;
    let strings = v.as_array().and_then(|a| a.strings());
    strings
        .map(Iterator::collect)
        .ok_or_else(|| bad(g, format!("metadata `{key}` is {}, expected an array of strings", v.describe())))
}

/// One type per token (llama.cpp's: 1 normal, 3 control, 4 user-defined, 0 to 6 in all); a
/// file without the list has only normal tokens. A list of another length or of other values
/// is refused: it would silently drop or misplace the special tokens.
fn token_types(g: &Gguf, n_tokens: usize) -> Result<Vec<u64>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(v) = g.get(KEY) else { return Ok(vec![1; n_tokens]) };
    let a = v.as_array().ok_or_else(|| bad(g, format!("metadata `{KEY}` is {}, expected an array", v.describe())))?;
    if a.len() != n_tokens {
        return Err(bad(g, format!("`{KEY}` lists {} types for {n_tokens} tokens", a.len())));
    }
    a.values()
        .enumerate()
        .map(|(i, t)| match t.as_u64() {
            Some(ty @ 0..=6) => Ok(ty),
            _ => Err(bad(g, format!("`{KEY}[{i}]` is {}, not a token type (0 to 6)", t.describe()))),
        })
        .collect()
}

/// The merges as the BPE model's pairs, each checked as the tokenizer will check it: both parts
/// and their concatenation are tokens. Checked here, so that a bad merge is named by its index in
/// the file rather than by a line of the staged tokenizer.json, which is gone by then.
fn merge_pairs(g: &Gguf, merges: &[&str], vocab: &serde_json::Map<String, Value>) -> Result<Vec<Value>> {
    let check = |i: usize, m: &str| -> Result<Value> {
        let at = || format!("`tokenizer.ggml.merges[{i}]` (`{m}`)");
        let (a, b) = m.split_once(' ').ok_or_else(|| bad(g, format!("{} is not a pair", at())))?;
        let joined = format!("{a}{b}");
        match [a, b, &joined].into_iter().find(|p| !vocab.contains_key(*p)) {
            Some(p) => Err(bad(g, format!("{}: `{p}` is not in `tokenizer.ggml.tokens`", at()))),
            None => Ok(json!([a, b])),
        }
    };
    merges.iter().enumerate().map(|(i, m)| check(i, m)).collect()
}

/// The vocabulary, each token spelled in GPT-2's byte alphabet (tokens already spelled so stay
/// as they are). An empty token, which no text encodes to, or a token listed twice is refused.
fn vocabulary(g: &Gguf, tokens: &[&str], in_alphabet: impl Fn(&str) -> bool) -> Result<serde_json::Map<String, Value>> {
    let spell = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (id, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(bad(g, format!("`tokenizer.ggml.tokens[{id}]` is empty")));
        }
        let spelled = if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| spell[b as usize]).collect() };
        if let Some(first) = vocab.insert(spelled, id.into()) {
            return Err(bad(g, format!("`tokenizer.ggml.tokens` lists `{t}` twice (ids {first} and {id})")));
        }
    }
    Ok(vocab)
}

/// The file's byte-level BPE tokenizer as a `tokenizer.json` (what transformers builds from it).
fn tokenizer_json(g: &Gguf, rows: usize) -> Result<Value> {
    let model = text(g, "tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(bad(g, format!("tokenizer model `{model}`: only byte-level BPE (`gpt2`) imports")));
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() || tokens.len() > rows {
        return Err(bad(g, format!("`tokenizer.ggml.tokens` lists {} tokens for {rows} embedding rows", tokens.len())));
    }
    let types = token_types(g, tokens.len())?;
    let alphabet: std::collections::HashSet<char> = bytes_to_unicode().iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let vocab = vocabulary(g, &tokens, in_alphabet)?;
    let merges = merge_pairs(g, &string_array(g, "tokenizer.ggml.merges")?, &vocab)?;
    // Control tokens (type 3) spelled in the byte alphabet are special, user-defined ones (4) plain.
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, ty))| (**ty == 3 && in_alphabet(t)) || **ty == 4)
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": *ty == 4, "special": *ty == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_rotary_rows_map_back() {
        assert_eq!(hf_name("blk.12.attn_k.weight").as_deref(), Some("model.layers.12.self_attn.k_proj.weight"));
        assert_eq!(hf_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        // 2 heads of 4 rows (d = 2), one column: llama.cpp's order per head is [0, 2, 1, 3].
        let permuted = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(unpermute_rows(&permuted, 8, 1, 2).unwrap(), (0..8).map(|v| v as f32).collect::<Vec<_>>());
        assert!(unpermute_rows(&permuted, 8, 1, 3).is_none());
        let t = bytes_to_unicode();
        assert_eq!((t[b'a' as usize], t[b' ' as usize], t[b'\n' as usize]), ('a', 'Ġ', 'Ċ'));
    }
}
