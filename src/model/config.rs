//! BERT-family hyper-parameters read from a Hugging Face `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::hf_config::{ModelKind, Positive, PositiveF64, parse, present};
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

impl BertFamily {
    /// The family from `model_type`, else from `architectures`; an error for any other model.
    fn of_kind(kind: &ModelKind) -> std::result::Result<Self, String> {
        match kind.model_type() {
            "bert" => Ok(BertFamily::Bert),
            "roberta" | "xlm-roberta" | "camembert" => Ok(BertFamily::Roberta),
            "" if kind.has_arch(&["Roberta", "XLMRoberta"]) => Ok(BertFamily::Roberta),
            "" if kind.has_arch(&["Bert"]) => Ok(BertFamily::Bert),
            other => Err(format!(
                "model_type `{other}` (architectures {:?}) is not a BERT-family encoder (bert, roberta, xlm-roberta)",
                kind.arch_list()
            )),
        }
    }
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
    /// transformers' `problem_type` (regression, multi-label or single-label classification).
    pub problem_type: Option<String>,
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

    /// Parses a `config.json` value; `path` is only for error messages. The family is decided
    /// first, so that another kind of model is refused as such rather than for a missing field.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let family = BertFamily::of_kind(&parse(v, path)?).map_err(bad)?;
        let raw: RawBertConfig = parse(v, path)?;
        raw.validate(family).map_err(bad)
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

/// `config.json` as written: field types and positivity are checked while deserializing,
/// the rules that join fields (and the defaults Hugging Face uses) in [`RawBertConfig::validate`].
#[derive(Deserialize)]
struct RawBertConfig {
    vocab_size: Positive,
    hidden_size: Positive,
    num_hidden_layers: Positive,
    num_attention_heads: Positive,
    intermediate_size: Positive,
    max_position_embeddings: Positive,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    #[serde(default, deserialize_with = "present")]
    layer_norm_eps: Option<PositiveF64>,
    type_vocab_size: Option<usize>,
    pad_token_id: Option<u32>,
    initializer_range: Option<f64>,
    label2id: Option<BTreeMap<String, usize>>,
    id2label: Option<BTreeMap<String, String>>,
    problem_type: Option<String>,
}

impl RawBertConfig {
    /// The encoder's hyper-parameters, or why the encoder cannot run this config.
    fn validate(self, family: BertFamily) -> std::result::Result<BertConfig, String> {
        let (hidden_size, num_attention_heads) = (self.hidden_size.0, self.num_attention_heads.0);
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            ));
        }
        let hidden_act = match self.hidden_act.as_deref().unwrap_or("gelu") {
            "gelu" => Gelu::Erf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
            other => return Err(format!("field `hidden_act`: `{other}` is not supported (gelu, gelu_new)")),
        };
        if let Some(p) = self.position_embedding_type.as_deref()
            && p != "absolute"
        {
            return Err(format!("field `position_embedding_type`: `{p}` is not supported (absolute)"));
        }
        let label2id = labels(self.label2id, self.id2label)?;
        Ok(BertConfig {
            family,
            vocab_size: self.vocab_size.0,
            hidden_size,
            num_hidden_layers: self.num_hidden_layers.0,
            num_attention_heads,
            intermediate_size: self.intermediate_size.0,
            hidden_act,
            max_position_embeddings: self.max_position_embeddings.0,
            type_vocab_size: self.type_vocab_size.unwrap_or(2),
            layer_norm_eps: self.layer_norm_eps.map_or(1e-12, |e| e.0 as f32),
            pad_token_id: self.pad_token_id.unwrap_or(match family {
                BertFamily::Bert => 0,
                BertFamily::Roberta => 1,
            }),
            initializer_range: self.initializer_range.unwrap_or(0.02) as f32,
            label2id,
            problem_type: self.problem_type,
        })
    }
}

/// `label2id`, or the inverse of `id2label` when only that is given. When both are given they
/// must agree: `eval` reads labels by `label2id`, while Hugging Face pipelines name outputs by
/// `id2label`, so a swapped pair would score one and report the other.
fn labels(
    label2id: Option<BTreeMap<String, usize>>,
    id2label: Option<BTreeMap<String, String>>,
) -> std::result::Result<Option<BTreeMap<String, usize>>, String> {
    if let Some(m) = label2id {
        let m = ids_in_order(m, "label2id")?;
        if let Some(id2label) = id2label {
            let inverse = labels(None, Some(id2label))?.unwrap_or_default();
            // Checkpoints saved with named `id2label` but transformers' default `label2id`
            // (`LABEL_0`, ...) are common on the Hub: the names are the ones meant.
            if is_default_label2id(&m) && inverse.len() == m.len() {
                return Ok(Some(inverse));
            }
            check_inverse(&m, &inverse)?;
        }
        return Ok(Some(m));
    }
    let Some(id2label) = id2label else { return Ok(None) };
    let given = id2label.len();
    let mut out = BTreeMap::new();
    for (id, name) in id2label {
        let id: usize = id.parse().map_err(|_| format!("field `id2label`: key `{id}` is not an index"))?;
        out.insert(name, id);
    }
    if out.len() != given {
        return Err(format!("field `id2label`: {given} ids name only {} distinct classes", out.len()));
    }
    ids_in_order(out, "id2label").map(Some)
}

/// transformers' placeholder names: `LABEL_i` for id i.
fn is_default_label2id(m: &BTreeMap<String, usize>) -> bool {
    m.iter().all(|(name, id)| *name == format!("LABEL_{id}"))
}

/// `label2id` and the inverse of `id2label` name the same classes by the same ids; else the
/// first label (in id order) where they part.
fn check_inverse(
    label2id: &BTreeMap<String, usize>,
    inverse: &BTreeMap<String, usize>,
) -> std::result::Result<(), String> {
    let mut by_id: Vec<(&usize, &String)> = label2id.iter().map(|(name, id)| (id, name)).collect();
    by_id.sort();
    for (id, name) in by_id {
        if inverse.get(name) != Some(id) {
            let named = inverse.iter().find(|(_, i)| *i == id).map(|(n, _)| format!("`{n}`"));
            return Err(format!(
                "fields `label2id` and `id2label` disagree: label2id gives `{name}` id {id}, but id2label names id \
                 {id} {}; make them inverses of each other (or keep only one)",
                named.unwrap_or_else(|| "nothing".into())
            ));
        }
    }
    if inverse.len() != label2id.len() {
        return Err(format!(
            "fields `label2id` and `id2label` disagree: {} classes in label2id, {} in id2label",
            label2id.len(),
            inverse.len()
        ));
    }
    Ok(())
}

/// Class ids must be 0 .. n, each once: anything else names no class for some output of the
/// classifier, or two classes for one.
fn ids_in_order(m: BTreeMap<String, usize>, field: &str) -> std::result::Result<BTreeMap<String, usize>, String> {
    let mut ids: Vec<usize> = m.values().copied().collect();
    ids.sort_unstable();
    match ids.iter().enumerate().find(|(i, id)| *i != **id) {
        Some((i, _)) => Err(format!(
            "field `{field}`: class ids must be 0 to {}, each once; id {i} is missing or repeated",
            ids.len() - 1
        )),
        None => Ok(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minilm() -> Value {
        json!({
            "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "hidden_act": "gelu", "gradient_checkpointing": false,
            "transformers_version": "4.8.2", "attention_probs_dropout_prob": 0.1
        })
    }

    /// The error of parsing `minilm()` after `edit`, as printed.
    fn error_after(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = minilm();
        edit(&mut v);
        let e = BertConfig::from_json(&v, Path::new("m/config.json")).err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("m/config.json"), "names the file: {e}");
        e
    }

    #[test]
    fn unknown_keys_pass_and_missing_optional_fields_take_hugging_face_defaults() {
        let c = BertConfig::from_json(&minilm(), Path::new("config.json")).unwrap();
        assert_eq!((c.family, c.hidden_size, c.num_attention_heads, c.head_dim()), (BertFamily::Bert, 384, 12, 32));
        assert_eq!((c.type_vocab_size, c.pad_token_id, c.layer_norm_eps, c.initializer_range), (2, 0, 1e-12, 0.02));
        assert!(c.label2id.is_none());
        let mut v = minilm();
        v["model_type"] = "roberta".into();
        v["pad_token_id"] = Value::Null;
        v["id2label"] = json!({"1": "pos", "0": "neg"});
        let c = BertConfig::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!((c.family, c.pad_token_id, c.position_offset()), (BertFamily::Roberta, 1, 2));
        assert_eq!(c.label_names().unwrap(), ["neg", "pos"]);
    }

    #[test]
    fn a_missing_field_is_named() {
        let e = error_after(|v| drop(v.as_object_mut().unwrap().remove("num_hidden_layers")));
        assert!(e.contains("missing field `num_hidden_layers`"), "{e}");
    }

    #[test]
    fn a_wrong_typed_field_is_named() {
        let e = error_after(|v| v["intermediate_size"] = "1536".into());
        assert!(e.contains("field `intermediate_size`") && e.contains("a positive integer"), "{e}");
        let e = error_after(|v| v["layer_norm_eps"] = Value::Null);
        assert!(e.contains("field `layer_norm_eps`") && e.contains("null"), "{e}");
        let e = error_after(|v| v["label2id"] = json!({"pos": 1, "neg": "zero"}));
        assert!(e.contains("field `label2id.neg`"), "{e}");
        let e = error_after(|v| v["id2label"] = json!({"first": "pos"}));
        assert!(e.contains("field `id2label`") && e.contains("`first` is not an index"), "{e}");
        // Ids name each classifier output once.
        let e = error_after(|v| v["label2id"] = json!({"pos": 1, "neg": 99}));
        assert!(e.contains("field `label2id`") && e.contains("id 0 is missing"), "{e}");
        let e = error_after(|v| v["label2id"] = json!({"pos": 0, "neg": 0}));
        assert!(e.contains("field `label2id`") && e.contains("id 1 is missing or repeated"), "{e}");
        let e = error_after(|v| v["id2label"] = json!({"0": "pos", "1": "pos"}));
        assert!(e.contains("2 ids name only 1 distinct classes"), "{e}");
        // Fuzzing round 3: a swapped pair was accepted (eval read labels by one, HF by the other).
        let e = error_after(|v| {
            v["label2id"] = json!({"neg": 0, "pos": 1});
            v["id2label"] = json!({"0": "pos", "1": "neg"});
        });
        assert!(e.contains("label2id gives `neg` id 0, but id2label names id 0 `pos`"), "{e}");
        let e = error_after(|v| {
            v["label2id"] = json!({"neg": 0});
            v["id2label"] = json!({"0": "neg", "1": "pos"});
        });
        assert!(e.contains("1 classes in label2id, 2 in id2label"), "{e}");
    }

    /// A Hub checkpoint with named `id2label` beside transformers' default `label2id` is read
    /// by its names, not refused as a disagreeing pair.
    #[test]
    fn named_id2label_wins_over_a_placeholder_label2id() {
        let label2id = BTreeMap::from([("LABEL_0".to_string(), 0), ("LABEL_1".to_string(), 1)]);
        let id2label = BTreeMap::from([("0".to_string(), "neg".to_string()), ("1".to_string(), "pos".to_string())]);
        let got = labels(Some(label2id.clone()), Some(id2label)).unwrap().unwrap();
        assert_eq!(got, BTreeMap::from([("neg".to_string(), 0), ("pos".to_string(), 1)]));
        // Placeholders on both sides are simply the same pair.
        let placeholders =
            BTreeMap::from([("0".to_string(), "LABEL_0".to_string()), ("1".to_string(), "LABEL_1".to_string())]);
        assert_eq!(labels(Some(label2id.clone()), Some(placeholders)).unwrap().unwrap(), label2id);
        // A count mismatch is still an error.
        let three = BTreeMap::from([
            ("0".to_string(), "a".to_string()),
            ("1".to_string(), "b".to_string()),
            ("2".to_string(), "c".to_string()),
        ]);
        assert!(labels(Some(label2id), Some(three)).is_err());
    }

    #[test]
    fn an_out_of_range_value_is_named() {
        let e = error_after(|v| v["vocab_size"] = 0.into());
        assert!(e.contains("field `vocab_size`") && e.contains("a positive integer"), "{e}");
        let e = error_after(|v| v["num_attention_heads"] = (-4).into());
        assert!(e.contains("field `num_attention_heads`") && e.contains("-4"), "{e}");
        let e = error_after(|v| v["num_attention_heads"] = 5.into());
        assert!(e.contains("hidden_size 384 is not divisible by num_attention_heads 5"), "{e}");
        let e = error_after(|v| v["hidden_act"] = "relu".into());
        assert!(e.contains("field `hidden_act`: `relu` is not supported"), "{e}");
        let e = error_after(|v| v["position_embedding_type"] = "relative_key".into());
        assert!(e.contains("field `position_embedding_type`"), "{e}");
        // A negative epsilon made every layer norm NaN, and `predict` wrote null logits.
        for eps in [-0.5, 0.0] {
            let e = error_after(|v| v["layer_norm_eps"] = eps.into());
            assert!(e.contains("field `layer_norm_eps`") && e.contains("a positive number"), "{e}");
        }
    }

    #[test]
    fn another_kind_of_model_is_refused_as_such_before_its_fields() {
        let e = error_after(|v| *v = json!({"model_type": "gpt2", "n_embd": 768}));
        assert!(e.contains("model_type `gpt2`") && e.contains("not a BERT-family encoder"), "{e}");
        let e = error_after(|v| *v = json!({"architectures": ["GPT2LMHeadModel"]}));
        assert!(e.contains("GPT2LMHeadModel") && e.contains("not a BERT-family encoder"), "{e}");
    }
}
