//! mergekit's `tied_names`: an input whose head is tied to its token embeddings (it stores no
//! `lm_head.weight`) merged with inputs that store one gives the merge its embedding table as
//! its head, as mergekit 0.1.5's loader resolves a missing head to its tied name.

use crate::checkpoint::{Checkpoint, TensorMeta};
use crate::error::Result;

/// Heads and the embedding names mergekit's architecture files tie them to, for the families
/// symerge loads.
const TIED: &[(&str, &[&str])] = &[
    (
        "lm_head.weight",
        &["model.embed_tokens.weight", "transformer.wte.weight", "model.tok_embeddings.weight", "wte.weight"],
    ),
    ("cls.predictions.decoder.weight", &["bert.embeddings.word_embeddings.weight"]),
];

/// `ck`, with each head that `reference` stores and `ck` lacks read from `ck`'s tied embedding;
/// `ck` itself (unchanged) when there is none to add.
pub fn with_tied_heads(reference: &Checkpoint, ck: Checkpoint) -> Result<Checkpoint> {
    let missing: Vec<(&str, &TensorMeta)> = TIED
        .iter()
        .filter(|(head, _)| reference.get(head).is_some() && ck.get(head).is_none())
        .filter_map(|(head, tied)| tied.iter().find_map(|t| ck.get(t)).map(|m| (*head, m)))
        .collect();
    if missing.is_empty() {
        return Ok(ck);
    }
    for (head, meta) in &missing {
        tracing::info!("{}: `{head}` read from its tied `{}`, as mergekit does", ck.path.display(), meta.name);
    }
    let mut parts: Vec<(&Checkpoint, &TensorMeta, String)> =
        ck.tensors.iter().map(|t| (&ck, t, t.name.clone())).collect();
    parts.extend(missing.iter().map(|(head, meta)| (&ck, *meta, head.to_string())));
    Checkpoint::compose(ck.path.clone(), ck.dir.clone(), &parts, ck.config.clone())
}
