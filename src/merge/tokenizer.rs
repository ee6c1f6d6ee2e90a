//! `tokenizer_source` and `chat_template`, as mergekit 0.1.5 applies them after the weights.
//!
//! mergekit builds the output tokenizer from the source and permutes every input's embedding
//! rows into its vocabulary. symerge permutes the rows the same way before the merge
//! ([`super::vocab`]), which also sets the output's `vocab_size` to the source vocabulary's,
//! and copies the source's tokenizer files (or writes the `union` one) after it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::config::MergeConfig;
use crate::error::{Error, Result};

/// Tokenizer files mergekit copies from the donor model.
pub(super) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Files mergekit copies only with the tokenizer files (`_copy_tokenizer`), so
/// `--no-copy-tokenizer` leaves them behind too: the generation settings among them.
pub(super) const COPIED_WITH_TOKENIZER: &[&str] = &["generation_config.json", "video_preprocessor_config.json"];

fn err(config: &MergeConfig, reason: String) -> Error {
    Error::Config { path: config.source.clone(), reason }
}

/// Applies `tokenizer_source` (as [`super::vocab::align`] resolved it into `aligned`: whose
/// tokenizer files, and the tokenizer it built, if any) and `chat_template` to the output
/// staged in `out`.
pub fn apply(config: &MergeConfig, out: &Path, aligned: Option<&super::vocab::Aligned>) -> Result<()> {
    if let Some(a) = aligned {
        copy_tokenizer_files(&a.source_dir, out)?;
        if let Some(tok) = &a.tokenizer {
            let path = out.join("tokenizer.json");
            tok.save(&path, false).map_err(|e| err(config, format!("writing {}: {e}", path.display())))?;
            sync_added_tokens(tok, out)?;
        }
    }
    if let Some(template) = &config.chat_template {
        set_chat_template(config, template, out)?;
    }
    Ok(())
}

/// The directory holding a model given as a directory or as one of its files.
pub(super) fn model_dir(p: &Path) -> PathBuf {
    if let Some((model, _)) = crate::checkpoint::lora::split_ref(p) {
        return model_dir(&model);
    }
    if p.is_dir() { p.to_path_buf() } else { p.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf) }
}

/// `dir/tokenizer.json`, if there is one.
pub(super) fn read_tokenizer(config: &MergeConfig, dir: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| err(config, format!("tokenizer_source: cannot read {}: {e}", path.display())))
}

/// The vocabulary (added tokens included) of `dir/tokenizer.json`, if it has one.
pub(super) fn vocab(config: &MergeConfig, dir: &Path) -> Result<Option<HashMap<String, u32>>> {
    Ok(read_tokenizer(config, dir)?.map(|t| t.get_vocab(true)))
}

/// The donor's tokenizer files in place of the output's.
fn copy_tokenizer_files(src: &Path, out: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let (from, to) = (src.join(name), out.join(name));
        if from.is_file() {
            crate::atomic::copy_file(&from, &to)?;
        } else if to.is_file() {
            std::fs::remove_file(&to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

/// Makes the copied donor's `tokenizer_config.json` (`added_tokens_decoder`) and
/// `added_tokens.json` list the added tokens of the built `tok`, as transformers'
/// `save_pretrained` of mergekit's union tokenizer lists them; without it the new tokens would be
/// in `tokenizer.json` only, and a slow tokenizer loaded from these files would lack them. Files
/// the donor lacks are not created.
fn sync_added_tokens(tok: &tokenizers::Tokenizer, out: &Path) -> Result<()> {
    let added = tok.get_added_tokens_decoder();
    let tc = out.join("tokenizer_config.json");
    if let Some(mut cfg) = read_json(&tc)?
        && let Some(decoder) = cfg.get_mut("added_tokens_decoder").and_then(|d| d.as_object_mut())
    {
        for (id, a) in &added {
            decoder.entry(id.to_string()).or_insert_with(|| {
                serde_json::json!({
                    "content": a.content, "lstrip": a.lstrip, "normalized": a.normalized,
                    "rstrip": a.rstrip, "single_word": a.single_word, "special": a.special,
                })
            });
        }
        write_json(&tc, &cfg)?;
    }
    let extra = out.join("added_tokens.json");
    if extra.is_file() {
        let base = tok.get_vocab_size(false) as u32;
        let map: serde_json::Map<String, serde_json::Value> =
            added.iter().filter(|(id, _)| **id >= base).map(|(id, a)| (a.content.clone(), (*id).into())).collect();
        write_json(&extra, &serde_json::Value::Object(map))?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON value") + "\n";
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadIndex { path: path.to_path_buf(), reason: format!("invalid JSON: {e}") })
}

/// The chat template a model's tokenizer carries: `chat_template.jinja`, else the
/// `chat_template` of `tokenizer_config.json` (its `default` entry when it is a table).
fn template_of(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
    }
    let cfg = read_json(&dir.join("tokenizer_config.json"))?;
    let t = cfg.as_ref().and_then(|c| c.get("chat_template"));
    Ok(match t {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template").and_then(|t| t.as_str()).map(str::to_string)),
        _ => None,
    })
}

/// Sets the output's chat template: `auto` takes the inputs' most common one (the first
/// mentioned on a tie), a text with `{` is the template itself. mergekit's bundled named
/// templates (`chatml`, `llama3`, ...) are refused: symerge does not ship them.
fn set_chat_template(config: &MergeConfig, template: &str, out: &Path) -> Result<()> {
    let text = if template == "auto" {
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (i, m) in config.referenced_models().iter().enumerate() {
            if let Some(t) = template_of(&model_dir(m))? {
                let e = counts.entry(t.trim().to_string()).or_insert((0, i));
                e.0 += 1;
            }
        }
        let best = counts.into_iter().max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)));
        match best {
            Some((t, _)) => t,
            None => return Ok(()),
        }
    } else if template.len() >= 20 && template.contains('{') {
        template.to_string()
    } else {
        return Err(err(
            config,
            format!(
                "chat_template: `{template}` is neither `auto` nor a Jinja template; mergekit's named templates \
                 are not bundled with symerge (paste the template's text)"
            ),
        ));
    };
    if !out.join("tokenizer_config.json").is_file() {
        tracing::warn!("chat_template: the output has no tokenizer, so the template is not saved (as mergekit)");
        return Ok(());
    }
    let jinja = out.join("chat_template.jinja");
    std::fs::write(&jinja, text).map_err(|e| Error::io(&jinja, e))?;
    let tc = out.join("tokenizer_config.json");
    if let Some(mut cfg) = read_json(&tc)?
        && let Some(obj) = cfg.as_object_mut()
        && obj.remove("chat_template").is_some()
    {
        write_json(&tc, &cfg)?;
    }
    Ok(())
}
