//! The model card and config copy a merged model carries, as mergekit writes them: the merge
//! config verbatim as `mergekit_config.yml` (what the Hugging Face Hub and mergekit users look
//! for) and a `README.md` whose metadata names the merged models and whose text says how they
//! were merged.

use std::fmt::Write as _;
use std::path::Path;

use super::config::MergeConfig;
use crate::error::{Error, Result};

/// Writes `README.md` (titled `title`, the output's name) and `mergekit_config.yml` into the
/// output staged in `dst`.
pub fn write(config: &MergeConfig, dst: &Path, title: &str) -> Result<()> {
    let copy = dst.join("mergekit_config.yml");
    std::fs::write(&copy, &config.text).map_err(|e| Error::io(&copy, e))?;
    let card = dst.join("README.md");
    std::fs::write(&card, card_text(config, &config.text, title)).map_err(|e| Error::io(&card, e))
}

fn card_text(config: &MergeConfig, yaml: &str, title: &str) -> String {
    let models = config.referenced_models();
    // No `base_model` metadata: the Hub takes only its own model ids there, and symerge's inputs
    // are local paths (mergekit lists only the ids among its models).
    let mut out = String::from("---\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n- symerge\n---\n");
    let _ = writeln!(out, "# {title}\n");
    out.push_str("A merge of pretrained language models, made with symerge from a mergekit configuration.\n\n");
    let _ = write!(out, "## Method\n\n`{}`", config.method.name);
    match &config.base_model {
        Some(b) => {
            let _ = writeln!(out, ", with `{}` as the base.\n", b.display());
        }
        None => out.push_str(".\n\n"),
    }
    out.push_str("## Models\n\n");
    for m in &models {
        let _ = writeln!(out, "- `{}`", m.display());
    }
    let _ = write!(out, "\n## Configuration\n\n```yaml\n{}\n```\n", yaml.trim_end());
    out
}
