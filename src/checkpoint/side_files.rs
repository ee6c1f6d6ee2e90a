//! The small files beside a checkpoint's weights (config, tokenizer, pooling settings) that a
//! derived checkpoint carries over.

use std::path::Path;

use super::FloatDType;
use super::reader::{INDEX_NAME, SINGLE_NAME};
use crate::error::{Error, Result};

/// Extensions of weight files that are never copied beside the merged weights.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "ot", "onnx", "gguf"];

/// Files that describe the donor model rather than a model derived from it (its model card, the
/// merge config that made it), never carried over; nor is any weight index (`*.index.json`).
const DONOR_ONLY: &[&str] = &["README.md", "mergekit_config.yml"];

/// Copies `config.json`, tokenizer files and other small non-weight files (recursively, e.g. a
/// sentence-transformers `1_Pooling/`) from `src` into the output, updating `torch_dtype` in the
/// top-level `config.json` when the output dtype changes; the donor's own model card and merge
/// config stay behind, and so do the top-level files named in `skip`.
pub fn copy_side_files(src: &Path, dst: &Path, out_dtype: Option<FloatDType>, skip: &[&str]) -> Result<()> {
    copy_side_dir(src, dst, out_dtype, Some(skip))
}

/// `top` holds the names the top level leaves out; `None` below it.
fn copy_side_dir(src: &Path, dst: &Path, out_dtype: Option<FloatDType>, top: Option<&[&str]>) -> Result<()> {
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
            copy_side_dir(&path, &target, out_dtype, None)?;
            continue;
        }
        let is_weights = path.extension().is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_string_lossy().as_ref()));
        let donor_only = top.is_some_and(|skip| {
            DONOR_ONLY.contains(&name.as_str()) || name.ends_with(".index.json") || skip.contains(&name.as_str())
        });
        if !path.is_file() || is_weights || donor_only || name == INDEX_NAME || name == SINGLE_NAME {
            continue;
        }
        match (top.is_some() && name == "config.json", out_dtype) {
            (true, Some(dt)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let mut cfg: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::BadIndex { path: path.clone(), reason: format!("invalid JSON: {e}") })?;
                if let Some(obj) = cfg.as_object_mut() {
                    set_dtype(obj, dt);
                }
                let text = serde_json::to_string_pretty(&cfg).expect("JSON value");
                std::fs::write(&target, text).map_err(|e| Error::io(&target, e))?;
            }
            _ => {
                crate::atomic::copy_file(&path, &target)?;
            }
        }
    }
    Ok(())
}

/// Sets a config's dtype under every key it has for it: transformers 5 writes and reads
/// `dtype`, older versions `torch_dtype`; a stale one of the two would load the weights as
/// another dtype. A config with neither gets `torch_dtype`, which every version reads.
fn set_dtype(obj: &mut serde_json::Map<String, serde_json::Value>, dt: FloatDType) {
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), dt.torch_name().into());
    }
    if obj.contains_key("torch_dtype") || !obj.contains_key("dtype") {
        obj.insert("torch_dtype".into(), dt.torch_name().into());
    }
}

/// Rewrites `dir/config.json` with `edit` applied; nothing when there is no `config.json` or
/// `edit` changes nothing (the donor's text is kept as written).
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::BadIndex { path: path.clone(), reason: format!("invalid JSON: {e}") })?;
    let before = cfg.clone();
    edit(&mut cfg);
    if cfg == before {
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&cfg).expect("JSON value");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cfg: serde_json::Value, dt: FloatDType) -> serde_json::Value {
        let mut obj = cfg.as_object().cloned().unwrap();
        set_dtype(&mut obj, dt);
        serde_json::Value::Object(obj)
    }

    /// transformers 5's `dtype` is updated, not left stale beside a new `torch_dtype`.
    #[test]
    fn every_dtype_key_a_config_has_is_set() {
        use serde_json::json;
        let bf = FloatDType::BF16;
        assert_eq!(set(json!({"dtype": "float32"}), bf), json!({"dtype": "bfloat16"}));
        assert_eq!(set(json!({"torch_dtype": "float32"}), bf), json!({"torch_dtype": "bfloat16"}));
        assert_eq!(
            set(json!({"dtype": "float32", "torch_dtype": "float32"}), bf),
            json!({"dtype": "bfloat16", "torch_dtype": "bfloat16"})
        );
        assert_eq!(set(json!({"a": 1}), bf), json!({"a": 1, "torch_dtype": "bfloat16"}));
    }
}
