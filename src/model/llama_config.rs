//! Llama-family hyper-parameters (Llama, Mistral, Qwen2) read from a Hugging Face `config.json`.
//!
//! Anything that would change the math in a way the blocks do not implement (another activation,
//! RoPE scaling other than linear, partial rotary embeddings) is an error naming the field, never
//! silently ignored: a wrong model that runs is worse than one that refuses to.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::causal::LmConfig;
use super::hf_config::{ModelKind, Positive, PositiveF64, parse};
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
        Self::of_kind(&ModelKind::deserialize(v).ok()?)
    }

    fn of_kind(kind: &ModelKind) -> Option<Self> {
        match kind.model_type() {
            "llama" => return Some(LlamaFamily::Llama),
            "mistral" => return Some(LlamaFamily::Mistral),
            "qwen2" => return Some(LlamaFamily::Qwen2),
            "" => {}
            _ => return None,
        }
        kind.arch_list().iter().find_map(|a| {
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
    /// Parses a `config.json` value; `path` is only for error messages. The family is decided
    /// first, so that another kind of model is refused as such rather than for a missing field.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let kind: ModelKind = parse(v, path)?;
        let family = LlamaFamily::of_kind(&kind).ok_or_else(|| {
            bad(format!(
                "model_type {} (architectures {}) is not a Llama-family causal LM (llama, mistral, qwen2); \
                 the causal LMs this build runs: {}",
                v.get("model_type").unwrap_or(&Value::Null),
                v.get("architectures").unwrap_or(&Value::Null),
                super::LmKind::all()
            ))
        })?;
        let raw: RawLlamaConfig = parse(v, path)?;
        raw.validate(family).map_err(bad)
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

impl LmConfig for LlamaConfig {
    const FAMILY: &'static str = "Llama family (llama, mistral, qwen2)";

    fn detects(config: &Value) -> bool {
        LlamaFamily::of_config(config).is_some()
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self> {
        LlamaConfig::from_json(v, path)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn max_tokens(&self) -> Option<(usize, &'static str)> {
        self.sliding_window.map(|w| (w, "sliding attention window"))
    }

    fn tied(&self) -> bool {
        self.tie_word_embeddings
    }

    fn set_tied(&mut self, tied: bool) {
        self.tie_word_embeddings = tied;
    }

    fn describe(&self) -> String {
        format!(
            "{:?}, {} layers, hidden {}, heads {}/{}",
            self.family, self.num_hidden_layers, self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        )
    }
}

/// `config.json` as written: field types and positivity are checked while deserializing,
/// the rules that join fields (and the defaults Hugging Face uses) in [`RawLlamaConfig::validate`].
#[derive(Deserialize)]
struct RawLlamaConfig {
    vocab_size: Positive,
    hidden_size: Positive,
    intermediate_size: Positive,
    num_hidden_layers: Positive,
    num_attention_heads: Positive,
    num_key_value_heads: Option<Positive>,
    head_dim: Option<Positive>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<PositiveF64>,
    rope_theta: Option<PositiveF64>,
    /// transformers 4's scaling; transformers 5 holds theta and scaling in `rope_parameters`.
    rope_scaling: Option<RopeSpec>,
    rope_parameters: Option<RopeSpec>,
    partial_rotary_factor: Option<f64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    use_sliding_window: Option<bool>,
    /// Read only by the families that use it, so its range is checked there.
    sliding_window: Option<u64>,
    /// Qwen2: layers from this index on slide (transformers' default 28).
    max_window_layers: Option<u64>,
    /// transformers 5's per-layer attention kinds (`full_attention`, `sliding_attention`).
    layer_types: Option<Vec<String>>,
}

/// One of `rope_scaling` / `rope_parameters`.
#[derive(Deserialize)]
struct RopeSpec {
    rope_type: Option<String>,
    /// transformers 4's older name for `rope_type`.
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<PositiveF64>,
    rope_theta: Option<PositiveF64>,
    partial_rotary_factor: Option<f64>,
}

impl RawLlamaConfig {
    /// The decoder's hyper-parameters, or why the decoder cannot run this config.
    fn validate(self, family: LlamaFamily) -> std::result::Result<LlamaConfig, String> {
        let (hidden_size, num_attention_heads) = (self.hidden_size.0, self.num_attention_heads.0);
        let num_key_value_heads = self.num_key_value_heads.map_or(num_attention_heads, |p| p.0);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d.0,
            None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
            None => {
                return Err(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} \
                     (and there is no head_dim)"
                ));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} is odd; rotary embeddings need an even head_dim"));
        }
        match self.hidden_act.as_deref() {
            None | Some("silu") | Some("swish") => {}
            Some(other) => return Err(format!("field `hidden_act`: `{other}` is not supported (silu)")),
        }
        let (rope_theta, rope_scale) = self.rope()?;
        let (qkv_bias, o_bias, mlp_bias) = self.biases(family);
        Ok(LlamaConfig {
            family,
            vocab_size: self.vocab_size.0,
            hidden_size,
            intermediate_size: self.intermediate_size.0,
            num_hidden_layers: self.num_hidden_layers.0,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.map_or(1e-6, |e| e.0 as f32),
            rope_theta,
            rope_scale,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window: self.sliding_window(family)?,
        })
    }

    /// `(qkv, o, mlp)` biases: Qwen2 always has qkv ones, Llama as its flags say, Mistral none.
    fn biases(&self, family: LlamaFamily) -> (bool, bool, bool) {
        let attention = self.attention_bias.unwrap_or(false);
        match family {
            LlamaFamily::Llama => (attention, attention, self.mlp_bias.unwrap_or(false)),
            LlamaFamily::Mistral => (false, false, false),
            LlamaFamily::Qwen2 => (true, false, false),
        }
    }

    /// Mistral's window, Qwen2's when `use_sliding_window`; Llama has none.
    fn sliding_window(&self, family: LlamaFamily) -> std::result::Result<Option<usize>, String> {
        let used = match family {
            LlamaFamily::Llama => false,
            LlamaFamily::Mistral => true,
            // As transformers builds `layer_types`: a window only where some layer slides
            // (fuzzing round 8: a config whose every layer is full attention was refused).
            LlamaFamily::Qwen2 => match &self.layer_types {
                Some(kinds) => kinds.iter().any(|k| k == "sliding_attention"),
                None => {
                    self.use_sliding_window.unwrap_or(false)
                        && self.max_window_layers.unwrap_or(28) < self.num_hidden_layers.0 as u64
                }
            },
        };
        match self.sliding_window {
            Some(w) if used => match usize::try_from(w) {
                Ok(w) if w > 0 => Ok(Some(w)),
                _ => Err(format!("field `sliding_window` must be a positive integer, got {w}")),
            },
            _ => Ok(None),
        }
    }

    /// `(rope_theta, linear scaling factor)`: `rope_parameters` (which holds both) wins over the
    /// top-level `rope_theta`; anything but default or linear scaling is refused.
    fn rope(&self) -> std::result::Result<(f32, f32), String> {
        let params = self.rope_parameters.as_ref();
        let theta = params.and_then(|p| p.rope_theta).or(self.rope_theta).map_or(10000.0, |t| t.0);
        let mut scale = 1.0f64;
        for (field, spec) in [("rope_parameters", params), ("rope_scaling", self.rope_scaling.as_ref())] {
            let Some(spec) = spec else { continue };
            match spec.rope_type.as_deref().or(spec.kind.as_deref()).unwrap_or("default") {
                "default" => {}
                "linear" => {
                    scale = spec.factor.ok_or_else(|| format!("field `{field}`: linear scaling needs a `factor`"))?.0;
                }
                other => {
                    return Err(format!("field `{field}`: RoPE type `{other}` is not supported (default or linear)"));
                }
            }
            if let Some(p) = spec.partial_rotary_factor
                && p != 1.0
            {
                return Err(format!("field `{field}`: partial_rotary_factor {p} is not supported (1.0)"));
            }
        }
        if let Some(p) = self.partial_rotary_factor
            && p != 1.0
        {
            return Err(format!("field `partial_rotary_factor`: {p} is not supported (1.0)"));
        }
        Ok((theta as f32, scale as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000,
            "rope_scaling": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_cache": true,
            "bos_token_id": 0, "eos_token_id": 0, "pretraining_tp": 1
        })
    }

    /// The error of parsing `smollm()` after `edit`, as printed.
    fn error_after(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = smollm();
        edit(&mut v);
        let e = LlamaConfig::from_json(&v, Path::new("lm/config.json")).err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("lm/config.json"), "names the file: {e}");
        e
    }

    fn parsed(v: &Value) -> LlamaConfig {
        LlamaConfig::from_json(v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn unknown_keys_pass_and_missing_optional_fields_take_hugging_face_defaults() {
        let c = parsed(&smollm());
        assert_eq!((c.head_dim, c.num_key_value_heads, c.rope_theta, c.rope_scale), (64, 3, 1e5, 1.0));
        assert_eq!((c.rms_norm_eps, c.tie_word_embeddings, c.qkv_bias, c.sliding_window), (1e-5, true, false, None));
        let mut v = json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": false, "sliding_window": 0});
        for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"] {
            v[k] = smollm()[k].clone();
        }
        let c = parsed(&v);
        assert_eq!((c.family, c.num_key_value_heads, c.rms_norm_eps, c.rope_theta), (LlamaFamily::Qwen2, 9, 1e-6, 1e4));
        assert_eq!((c.qkv_bias, c.o_bias, c.tie_word_embeddings, c.sliding_window), (true, false, false, None));
        // Qwen2 slides only from layer max_window_layers on (default 28), or as layer_types says.
        let layers = smollm()["num_hidden_layers"].as_u64().unwrap();
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 64.into();
        for (mwl, want) in [(layers, None), (layers - 1, Some(64)), (0, Some(64))] {
            v["max_window_layers"] = mwl.into();
            assert_eq!(parsed(&v).sliding_window, want, "max_window_layers {mwl} of {layers}");
        }
        v["layer_types"] = json!(vec!["full_attention"; layers as usize]);
        assert_eq!(parsed(&v).sliding_window, None);
        v["layer_types"][1] = "sliding_attention".into();
        assert_eq!(parsed(&v).sliding_window, Some(64));
        for k in ["layer_types", "max_window_layers", "use_sliding_window"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v["model_type"] = "mistral".into();
        v["sliding_window"] = 4096.into();
        v["rope_parameters"] = json!({"rope_type": "linear", "factor": 2, "rope_theta": 5e5});
        let c = parsed(&v);
        assert_eq!(
            (c.family, c.sliding_window, c.rope_theta, c.rope_scale),
            (LlamaFamily::Mistral, Some(4096), 5e5, 2.0)
        );
    }

    #[test]
    fn a_missing_field_is_named() {
        let e = error_after(|v| drop(v.as_object_mut().unwrap().remove("intermediate_size")));
        assert!(e.contains("missing field `intermediate_size`"), "{e}");
        let e = error_after(|v| v["rope_scaling"] = json!({"type": "linear"}));
        assert!(e.contains("field `rope_scaling`: linear scaling needs a `factor`"), "{e}");
    }

    #[test]
    fn a_wrong_typed_field_is_named() {
        let e = error_after(|v| v["tie_word_embeddings"] = "yes".into());
        assert!(e.contains("field `tie_word_embeddings`") && e.contains("boolean"), "{e}");
        let e = error_after(|v| v["rope_scaling"] = json!({"rope_type": "linear", "factor": "2"}));
        assert!(e.contains("field `rope_scaling.factor`") && e.contains("a positive number"), "{e}");
        let e = error_after(|v| v["num_hidden_layers"] = 2.5.into());
        assert!(e.contains("field `num_hidden_layers`") && e.contains("a positive integer"), "{e}");
    }

    #[test]
    fn an_out_of_range_value_is_named() {
        let e = error_after(|v| v["rms_norm_eps"] = 0.into());
        assert!(e.contains("field `rms_norm_eps`") && e.contains("a positive number"), "{e}");
        let e = error_after(|v| v["num_key_value_heads"] = 0.into());
        assert!(e.contains("field `num_key_value_heads`") && e.contains("a positive integer"), "{e}");
        let e = error_after(|v| v["head_dim"] = 63.into());
        assert!(e.contains("head_dim 63 is odd"), "{e}");
        let e = error_after(|v| {
            v["model_type"] = "mistral".into();
            v["sliding_window"] = 0.into();
        });
        assert!(e.contains("field `sliding_window` must be a positive integer, got 0"), "{e}");
        let e = error_after(|v| v["partial_rotary_factor"] = 0.5.into());
        assert!(e.contains("field `partial_rotary_factor`"), "{e}");
        // 4 heads of 2^63 + 16 wrap to 64 columns: the size is refused before any product.
        let e = error_after(|v| v["head_dim"] = ((1u64 << 63) + 16).into());
        assert!(e.contains("field `head_dim`") && e.contains("up to 2^32"), "{e}");
        // Finite in f64, infinite (or zero) in the f32 the model computes with.
        let e = error_after(|v| v["rope_theta"] = 1e300.into());
        assert!(e.contains("field `rope_theta`") && e.contains("f32's range"), "{e}");
        let e = error_after(|v| v["rms_norm_eps"] = 1e-300.into());
        assert!(e.contains("field `rms_norm_eps`") && e.contains("f32's range"), "{e}");
    }

    #[test]
    fn another_kind_of_model_is_refused_as_such_before_its_fields() {
        let e = error_after(|v| *v = json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}));
        assert!(e.contains("\"gpt2\"") && e.contains("not a Llama-family causal LM"), "{e}");
        assert_eq!(
            LlamaFamily::of_config(&json!({"architectures": ["MistralForCausalLM"]})),
            Some(LlamaFamily::Mistral)
        );
        assert_eq!(LlamaFamily::of_config(&json!([1, 2])), None);
        assert_eq!(LlamaFamily::of_config(&json!({"model_type": "bert"})), None);
    }
}
