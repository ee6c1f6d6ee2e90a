//! The layer map: which block each tensor belongs to, and the order blocks are streamed in.
//!
//! One rule serves every transformer family we know: a tensor inside a repeated stack is named
//! `<prefix><stack>.<N>.<rest>` with `<stack>` one of `layer`, `layers`, `h`, `blocks`,
//! `resblocks`, so its block is `<prefix><stack>.<N>` (BERT `encoder.layer.3`, Llama
//! `model.layers.3`, ViT/CLIP `vision_model.encoder.layers.3` or `transformer.resblocks.3`).
//! Tensors outside any stack fall into named groups by role; whatever matches nothing goes to
//! `other`, so an unknown architecture still merges.

use std::collections::HashMap;

use serde::Serialize;

/// The role of a block, which fixes where it sits in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    Embeddings,
    Layer,
    FinalNorm,
    Pooler,
    Head,
    Other,
}

/// An ordered group of tensor names streamed together.
#[derive(Debug, Clone, Serialize)]
pub struct BlockSpec {
    pub name: String,
    pub kind: BlockKind,
    /// Layer index within its stack (for `Layer` blocks).
    pub index: Option<usize>,
    /// Tensor names, in checkpoint file order.
    pub tensors: Vec<String>,
}

const STACK_NAMES: &[&str] = &["layer", "layers", "h", "blocks", "resblocks"];

/// Splits `name` into (block prefix without the trailing dot, layer index) if it lies in a stack.
fn stack_position(name: &str) -> Option<(String, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 0..parts.len().saturating_sub(2) {
        if STACK_NAMES.contains(&parts[i])
            && let Ok(idx) = parts[i + 1].parse::<usize>()
        {
            return Some((parts[..=i + 1].join("."), idx));
        }
    }
    None
}

/// The layer stack a tensor lies in and its index there: `model.layers.7.mlp.up_proj.weight`
/// gives (`model.layers`, 7), so slices can pick layers by index and renumber them.
pub fn layer_of(name: &str) -> Option<(String, usize)> {
    let (prefix, idx) = stack_position(name)?;
    let stack = prefix.rsplit_once('.').map_or(prefix.clone(), |(s, _)| s.to_string());
    Some((stack, idx))
}

/// `name` moved to layer `index` of its stack (`model.layers.7.x` -> `model.layers.2.x`);
/// `None` when it lies in no stack.
pub fn renumber(name: &str, index: usize) -> Option<String> {
    let (stack, old) = layer_of(name)?;
    let rest = &name[stack.len() + 1 + old.to_string().len()..];
    Some(format!("{stack}.{index}{rest}"))
}

fn classify_loose(name: &str) -> BlockKind {
    let n = name.to_ascii_lowercase();
    let has = |s: &str| n.contains(s);
    if has("embed")
        || has("wte.")
        || has("wpe.")
        || has("position_ids")
        || has("ln_pre")
        || has("pre_layrnorm")
        || has("class_embedding")
        || has("patch")
        || n.starts_with("conv1.")
        || n.contains(".conv1.")
    {
        BlockKind::Embeddings
    } else if has("pooler") {
        BlockKind::Pooler
    } else if has("lm_head")
        || has("classifier")
        || has("score.")
        || has("head.")
        || has("projection")
        || n.ends_with("proj")
        || n.starts_with("logit_scale")
    {
        BlockKind::Head
    } else if has("norm") || has("ln_f") || has("ln_post") {
        BlockKind::FinalNorm
    } else {
        BlockKind::Other
    }
}

fn loose_block_name(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Embeddings => "embeddings",
        BlockKind::FinalNorm => "final_norm",
        BlockKind::Pooler => "pooler",
        BlockKind::Head => "head",
        BlockKind::Other | BlockKind::Layer => "other",
    }
}

/// Groups tensor names (given in file order) into blocks in streaming order: embeddings, every
/// stack's layers in ascending index (stacks in order of first appearance), final norm, pooler,
/// heads, other.
pub fn group_blocks<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<BlockSpec> {
    let mut stacks: Vec<String> = Vec::new();
    let mut blocks: HashMap<(BlockKind, usize, usize), BlockSpec> = HashMap::new();
    for name in names {
        let (key, block_name, kind, index) = match stack_position(name) {
            Some((prefix, idx)) => {
                let stack = prefix.rsplit_once('.').map_or(prefix.clone(), |(s, _)| s.to_string());
                let si = match stacks.iter().position(|s| *s == stack) {
                    Some(i) => i,
                    None => {
                        stacks.push(stack);
                        stacks.len() - 1
                    }
                };
                ((BlockKind::Layer, si, idx), prefix, BlockKind::Layer, Some(idx))
            }
            None => {
                let kind = classify_loose(name);
                ((kind, 0, 0), loose_block_name(kind).to_string(), kind, None)
            }
        };
        blocks
            .entry(key)
            .or_insert_with(|| BlockSpec { name: block_name, kind, index, tensors: Vec::new() })
            .tensors
            .push(name.to_string());
    }
    let mut out: Vec<((BlockKind, usize, usize), BlockSpec)> = blocks.into_iter().collect();
    out.sort_by_key(|(k, _)| *k);
    out.into_iter().map(|(_, b)| b).collect()
}

/// The architecture as Hugging Face names it (`config.json` `architectures[0]`), else guessed
/// from tensor names.
pub fn architecture<'a>(config: Option<&serde_json::Value>, names: impl IntoIterator<Item = &'a str>) -> String {
    if let Some(cfg) = config {
        if let Some(a) = cfg.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()) {
            return a.to_string();
        }
        if let Some(m) = cfg.get("model_type").and_then(|m| m.as_str()) {
            return m.to_string();
        }
    }
    let names: Vec<&str> = names.into_iter().collect();
    let any = |s: &str| names.iter().any(|n| n.contains(s));
    if any("encoder.layer.") && any("attention.self.query") {
        "bert-like encoder (guessed from tensor names)".into()
    } else if any("model.layers.") && any("self_attn.q_proj") && any("mlp.gate_proj") {
        "llama-like decoder (guessed from tensor names)".into()
    } else if any("transformer.resblocks.") || any("vision_model.encoder.layers.") {
        "clip/vit-like vision encoder (guessed from tensor names)".into()
    } else {
        "unknown".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_of(blocks: &[BlockSpec]) -> Vec<&str> {
        blocks.iter().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn bert_blocks_in_model_order() {
        let names = [
            "encoder.layer.10.output.dense.weight",
            "embeddings.word_embeddings.weight",
            "encoder.layer.2.attention.self.query.weight",
            "pooler.dense.weight",
            "encoder.layer.2.output.LayerNorm.bias",
            "classifier.weight",
            "embeddings.LayerNorm.weight",
            "weird_tensor",
        ];
        let b = group_blocks(names);
        assert_eq!(names_of(&b), ["embeddings", "encoder.layer.2", "encoder.layer.10", "pooler", "head", "other"]);
        assert_eq!(b[1].tensors.len(), 2);
        assert_eq!(b[0].tensors, ["embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"]);
    }

    #[test]
    fn llama_and_prefixed_bert() {
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ];
        let b = group_blocks(names);
        assert_eq!(names_of(&b), ["embeddings", "model.layers.0", "model.layers.1", "final_norm", "head"]);
        let b = group_blocks(["bert.encoder.layer.0.x.weight", "bert.embeddings.a.weight"]);
        assert_eq!(names_of(&b), ["embeddings", "bert.encoder.layer.0"]);
    }

    #[test]
    fn layers_renumber_within_their_stack() {
        assert_eq!(layer_of("model.layers.7.mlp.up_proj.weight"), Some(("model.layers".into(), 7)));
        assert_eq!(
            renumber("model.layers.7.mlp.up_proj.weight", 12).as_deref(),
            Some("model.layers.12.mlp.up_proj.weight")
        );
        assert_eq!(
            renumber("encoder.layer.10.output.dense.bias", 3).as_deref(),
            Some("encoder.layer.3.output.dense.bias")
        );
        assert_eq!(renumber("model.norm.weight", 1), None);
    }

    #[test]
    fn clip_two_towers_keep_separate_stacks() {
        let names = [
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.encoder.layers.1.mlp.fc1.weight",
            "vision_model.post_layernorm.weight",
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            "text_projection.weight",
        ];
        let b = group_blocks(names);
        assert_eq!(
            names_of(&b),
            [
                "text_model.encoder.layers.0",
                "text_model.encoder.layers.1",
                "vision_model.encoder.layers.0",
                "visual.transformer.resblocks.0",
                "final_norm",
                "head"
            ]
        );
    }
}
