//! Llama-family hyper-parameters (Llama, Mistral, Qwen2) read from a Hugging Face `config.json`.
//!
//! Anything that would change the math in a way the blocks do not implement (another activation,
//! RoPE scaling other than linear, partial rotary embeddings) is an error naming the field, never
//! silently ignored: a wrong model that runs is worse than one that refuses to.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which member of the family: they share the decoder and differ in biases and attention windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    Llama,
    Mistral,
    Qwen2,
}

impl LlamaFamily {
    /// The family of a `config.json`, from `model_type` or else `architectures`; `None` when it is
    /// not a Llama-family causal LM.
    pub fn of_config(v: &Value) -> Option<Self> {
        match v.get("model_type").and_then(Value::as_str).unwrap_or("") {
            "llama" => return Some(LlamaFamily::Llama),
            "mistral" => return Some(LlamaFamily::Mistral),
            "qwen2" => return Some(LlamaFamily::Qwen2),
            "" => {}
            _ => return None,
        }
        let archs = v.get("architectures").and_then(Value::as_array)?;
        archs.iter().filter_map(Value::as_str).find_map(|a| {
            if a.starts_with("Llama") {
                Some(LlamaFamily::Llama)
            } else if a.starts_with("Mistral") {
                Some(LlamaFamily::Mistral)
            } else if a.starts_with("Qwen2") {
                Some(LlamaFamily::Qwen2)
            } else {
                None
            }
        })
    }
}

/// The fields of `config.json` the decoder needs.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub family: LlamaFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` is grouped-query attention.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// Linear RoPE scaling factor (positions are divided by it); 1 for none.
    pub rope_scale: f32,
    /// `lm_head` shares `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Longest sequence full causal attention is exact for: Mistral's `sliding_window` (Qwen2's
    /// when `use_sliding_window`); longer sequences are refused, as the window mask is not built.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// Parses a `config.json` value; `path` is only for error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let family = LlamaFamily::of_config(v).ok_or_else(|| {
            bad(format!(
                "model_type {} (architectures {}) is not a Llama-family causal LM (llama, mistral, qwen2)",
                v.get("model_type").unwrap_or(&Value::Null),
                v.get("architectures").unwrap_or(&Value::Null)
            ))
        })?;
        let positive = |name: &str, x: &Value| -> Result<usize> {
            x.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("field `{name}` must be a positive integer, got {x}")))
        };
        let required = |name: &str| -> Result<usize> {
            match v.get(name) {
                Some(x) => positive(name, x),
                None => Err(bad(format!("field `{name}` is missing"))),
            }
        };
        let optional = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => positive(name, x).map(Some),
            }
        };
        let number = |name: &str, x: &Value| -> Result<f32> {
            x.as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .map(|f| f as f32)
                .ok_or_else(|| bad(format!("field `{name}` must be a positive number, got {x}")))
        };
        let flag = |name: &str, default: bool| -> Result<bool> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_bool().ok_or_else(|| bad(format!("field `{name}` must be true or false, got {x}"))),
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = optional("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match optional("head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} \
                     (and there is no head_dim)"
                )));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} is odd; rotary embeddings need an even head_dim")));
        }
        match v.get("hidden_act").and_then(Value::as_str) {
            None | Some("silu") | Some("swish") => {}
            Some(other) => return Err(bad(format!("field `hidden_act`: `{other}` is not supported (silu)"))),
        }
        let rms_norm_eps = match v.get("rms_norm_eps") {
            None | Some(Value::Null) => 1e-6,
            Some(x) => number("rms_norm_eps", x)?,
        };
        let (rope_theta, rope_scale) = parse_rope(v).map_err(bad)?;

        let attention_bias = flag("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            LlamaFamily::Llama => (attention_bias, attention_bias, flag("mlp_bias", false)?),
            LlamaFamily::Mistral => (false, false, false),
            LlamaFamily::Qwen2 => (true, false, false),
        };
        let sliding_window = match family {
            LlamaFamily::Llama => None,
            LlamaFamily::Mistral => optional("sliding_window")?,
            LlamaFamily::Qwen2 if flag("use_sliding_window", false)? => optional("sliding_window")?,
            LlamaFamily::Qwen2 => None,
        };
        Ok(LlamaConfig {
            family,
            vocab_size: required("vocab_size")?,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scale,
            tie_word_embeddings: flag("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
        })
    }

    /// Width of the query projection, `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections, `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// `(rope_theta, linear scaling factor)` from either transformers 4's `rope_theta` + `rope_scaling`
/// or transformers 5's `rope_parameters` (which holds both).
fn parse_rope(v: &Value) -> std::result::Result<(f32, f32), String> {
    let params = v.get("rope_parameters").filter(|p| !p.is_null());
    let scaling = v.get("rope_scaling").filter(|p| !p.is_null());
    let theta_value = params.and_then(|p| p.get("rope_theta")).or_else(|| v.get("rope_theta"));
    let theta = match theta_value {
        None | Some(Value::Null) => 10000.0,
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("field `rope_theta` must be a positive number, got {x}"))?,
    };
    let mut scale = 1.0f64;
    for (field, spec) in [("rope_parameters", params), ("rope_scaling", scaling)] {
        let Some(spec) = spec else { continue };
        let obj = spec.as_object().ok_or_else(|| format!("field `{field}` must be an object or null, got {spec}"))?;
        let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => {}
            "linear" => {
                let f = obj.get("factor").ok_or_else(|| format!("field `{field}`: linear scaling needs a `factor`"))?;
                scale = f
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| format!("field `{field}`: `factor` must be a positive number, got {f}"))?;
            }
            other => {
                return Err(format!("field `{field}`: RoPE type `{other}` is not supported (default or linear)"));
            }
        }
        if let Some(p) = obj.get("partial_rotary_factor").and_then(Value::as_f64)
            && p != 1.0
        {
            return Err(format!("field `{field}`: partial_rotary_factor {p} is not supported (1.0)"));
        }
    }
    if let Some(p) = v.get("partial_rotary_factor").and_then(Value::as_f64)
        && p != 1.0
    {
        return Err(format!("field `partial_rotary_factor`: {p} is not supported (1.0)"));
    }
    Ok((theta as f32, scale as f32))
}
