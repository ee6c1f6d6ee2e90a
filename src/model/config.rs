//! BERT-family hyper-parameters read from a Hugging Face `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::backend::Gelu;
use crate::error::{Error, Result};

/// Which member of the family: they share the encoder and differ in position ids and head names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertFamily {
    /// BERT, MiniLM and other `model_type: bert` checkpoints.
    Bert,
    /// RoBERTa and XLM-R: positions start at `pad_token_id + 1` and skip padding.
    Roberta,
}

/// The fields of `config.json` the encoder needs.
#[derive(Debug, Clone)]
pub struct BertConfig {
    pub family: BertFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Gelu,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pad_token_id: u32,
    /// Standard deviation of Hugging Face's normal init, used for new heads.
    pub initializer_range: f32,
    /// Class name -> index, when the checkpoint names its labels.
    pub label2id: Option<BTreeMap<String, usize>>,
}

impl BertConfig {
    /// Class names in id order, when the checkpoint names its labels.
    pub fn label_names(&self) -> Option<Vec<String>> {
        self.label2id.as_ref().map(|m| {
            let mut names: Vec<(&String, &usize)> = m.iter().collect();
            names.sort_by_key(|(_, id)| **id);
            names.into_iter().map(|(n, _)| n.clone()).collect()
        })
    }

    /// Parses a `config.json` value; `path` is only for error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let family = match model_type {
            "bert" => BertFamily::Bert,
            "roberta" | "xlm-roberta" | "camembert" => BertFamily::Roberta,
            "" if archs.iter().any(|a| a.starts_with("Roberta") || a.starts_with("XLMRoberta")) => BertFamily::Roberta,
            "" if archs.iter().any(|a| a.starts_with("Bert")) => BertFamily::Bert,
            other => {
                return Err(bad(format!(
                    "model_type `{other}` (architectures {archs:?}) is not a BERT-family encoder (bert, roberta, xlm-roberta)"
                )));
            }
        };
        let usize_field = |name: &str| -> Result<usize> {
            match v.get(name) {
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("field `{name}` must be a positive integer, got {x}"))),
                None => Err(bad(format!("field `{name}` is missing"))),
            }
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        let hidden_act = match v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu") {
            "gelu" => Gelu::Erf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
            other => {
                return Err(bad(format!("field `hidden_act`: `{other}` is not supported (gelu, gelu_new)")));
            }
        };
        if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str)
            && p != "absolute"
        {
            return Err(bad(format!("field `position_embedding_type`: `{p}` is not supported (absolute)")));
        }
        let layer_norm_eps = match v.get("layer_norm_eps") {
            Some(x) => {
                x.as_f64().ok_or_else(|| bad(format!("field `layer_norm_eps` must be a number, got {x}")))? as f32
            }
            None => 1e-12,
        };
        let pad_token_id = match v.get("pad_token_id") {
            Some(Value::Null) | None => match family {
                BertFamily::Bert => 0,
                BertFamily::Roberta => 1,
            },
            Some(x) => {
                x.as_u64().ok_or_else(|| bad(format!("field `pad_token_id` must be an integer, got {x}")))? as u32
            }
        };
        Ok(BertConfig {
            family,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: usize_field("intermediate_size")?,
            hidden_act,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            type_vocab_size: v.get("type_vocab_size").and_then(Value::as_u64).map(|n| n as usize).unwrap_or(2),
            layer_norm_eps,
            pad_token_id,
            initializer_range: v.get("initializer_range").and_then(Value::as_f64).unwrap_or(0.02) as f32,
            label2id: parse_labels(v).map_err(bad)?,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// First position id of a real token: 0 for BERT, `pad_token_id + 1` for RoBERTa.
    pub fn position_offset(&self) -> usize {
        match self.family {
            BertFamily::Bert => 0,
            BertFamily::Roberta => self.pad_token_id as usize + 1,
        }
    }

    /// The longest sequence the position table can hold.
    pub fn max_seq_len(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }
}

/// `label2id`, or the inverse of `id2label` when only that is given.
fn parse_labels(v: &Value) -> std::result::Result<Option<BTreeMap<String, usize>>, String> {
    if let Some(obj) = v.get("label2id").and_then(Value::as_object) {
        let mut out = BTreeMap::new();
        for (name, id) in obj {
            let id = id.as_u64().ok_or_else(|| format!("field `label2id`: `{name}` maps to {id}, not an index"))?;
            out.insert(name.clone(), id as usize);
        }
        return Ok(Some(out));
    }
    if let Some(obj) = v.get("id2label").and_then(Value::as_object) {
        let mut out = BTreeMap::new();
        for (id, name) in obj {
            let id: usize = id.parse().map_err(|_| format!("field `id2label`: key `{id}` is not an index"))?;
            let name = name.as_str().ok_or_else(|| format!("field `id2label`: label {id} is not a string"))?;
            out.insert(name.to_string(), id);
        }
        return Ok(Some(out));
    }
    Ok(None)
}
