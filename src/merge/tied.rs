//! mergekit's `tied_names`: inputs whose head is tied to their token embeddings (they store no
//! `lm_head.weight`) merged with inputs that store one give the merge their embedding table as
//! their head, as mergekit 0.1.5's loader resolves a missing head to its tied name whenever some
//! input stores it (also when the base is the tied one: the output then has a merged head).

use crate::checkpoint::{Checkpoint, TensorMeta};
use crate::error::Result;

/// Heads and the embedding names mergekit's architecture files tie them to, for the families
/// whose tensor names these are.
const TIED: &[(&str, &[&str])] = &[
    (
        "lm_head.weight",
        &[
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "model.tok_embeddings.weight",
            "wte.weight",
            "model.language_model.embed_tokens.weight",
            "backbone.embeddings.weight",
        ],
    ),
    ("output.weight", &["model.tok_embeddings.weight"]),
    ("cls.predictions.decoder.weight", &["bert.embeddings.word_embeddings.weight"]),
];

/// `ckpts`, each reading a head that another of them stores from its own tied embedding where
/// it stores none.
pub fn tie_missing_heads(ckpts: Vec<Checkpoint>) -> Result<Vec<Checkpoint>> {
    let stored: Vec<&str> = TIED.iter().map(|(h, _)| *h).filter(|h| ckpts.iter().any(|c| c.get(h).is_some())).collect();
    ckpts.into_iter().map(|ck| with_tied_heads(&stored, ck)).collect()
}

/// `ck`, with each of `heads` it lacks read from its tied embedding; `ck` itself when there is
/// none to add.
fn with_tied_heads(heads: &[&str], ck: Checkpoint) -> Result<Checkpoint> {
    let missing: Vec<(&str, &TensorMeta)> = TIED
        .iter()
        .filter(|(head, _)| heads.contains(head) && ck.get(head).is_none())
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
