//! Opening a merge's inputs: checkpoints, and mergekit's `model+lora` references, whose adapted
//! tensors go to a hidden directory beside the output (removed with it, signals included).

use std::path::{Path, PathBuf};

use crate::atomic::Staging;
use crate::checkpoint::{Checkpoint, lora};
use crate::error::Result;

/// Opens inputs for a merge into `output`; holds the adapted tensors until it is dropped.
pub struct Inputs {
    output: PathBuf,
    scratch: Option<Staging>,
    adapted: usize,
}

impl Inputs {
    pub fn new(output: &Path) -> Self {
        Inputs { output: output.to_path_buf(), scratch: None, adapted: 0 }
    }

    /// The checkpoint at `p`, with its adapter applied when `p` is `model+lora`.
    pub fn open(&mut self, p: &Path) -> Result<Checkpoint> {
        let Some((model, adapter)) = lora::split_ref(p) else { return Checkpoint::open(p) };
        if self.scratch.is_none() {
            self.scratch = Some(Staging::create(&lora_scratch(&self.output))?);
        }
        let dir = self.scratch.as_ref().expect("created above").path().join(format!("a{}", self.adapted));
        self.adapted += 1;
        lora::apply(Checkpoint::open(&model)?, &adapter, &dir)
    }
}

/// The output-like name beside `output` whose staging directory holds applied adapters.
pub fn lora_scratch(output: &Path) -> PathBuf {
    crate::atomic::named_sibling(output, "lora")
}

/// Every path a merge of `config` reads models from (adapters included).
pub fn model_paths(config: &crate::merge::config::MergeConfig) -> Vec<PathBuf> {
    config.referenced_models().iter().flat_map(|p| read_paths(p)).collect()
}

/// Every path a merge of `config` reads, which its output must stay apart from: the models and
/// adapters, tokenizer and token donors, the Lambda table and the config itself.
pub fn input_paths(config: &crate::merge::config::MergeConfig) -> Vec<PathBuf> {
    use crate::merge::config::{EmbedSource, TokenizerSource};
    let mut models = config.referenced_models();
    if let Some(TokenizerSource::Model(p)) = &config.tokenizer_source {
        models.push(p.clone());
    }
    for (_, t) in &config.tokens {
        if let Some(EmbedSource::Model(p) | EmbedSource::ModelToken { model: p, .. }) = &t.source {
            models.push(p.clone());
        }
    }
    let mut paths: Vec<PathBuf> = models.iter().flat_map(|p| read_paths(p)).collect();
    // Read too, so an output over them would delete them (fuzzing round 6).
    paths.extend(config.lambda_table.iter().map(|t| t.path.clone()));
    paths.push(config.source.clone());
    paths
}

/// The paths `p` reads: the model and the adapter of a `model+lora` reference, else `p`.
pub fn read_paths(p: &Path) -> Vec<PathBuf> {
    match lora::split_ref(p) {
        Some((m, a)) => vec![m, a],
        None => vec![p.to_path_buf()],
    }
}
