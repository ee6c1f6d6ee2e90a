//! `mergekit-yaml`'s command-line flags on `symerge merge`: what each means here, which change
//! nothing (loading and writing strategies symerge does not have) and which are refused.

use std::path::PathBuf;

use crate::backend::Device;
use crate::error::{Error, Result};

/// `mergekit-yaml`'s flags that are not symerge's own, so a mergekit command line runs as it
/// is (hidden from `--help`; README "From mergekit"). `--cuda` and `--gpu-rich` mean
/// `--device cuda`, `--no-cuda` `--device cpu`. Those about loading and writing strategies have no effect: symerge always
/// streams the inputs from memory maps and writes safetensors as blocks finish. Those that would
/// change the output in a way symerge cannot are refused.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MergekitFlags {
    /// `--device cuda`.
    #[arg(long, hide = true, conflicts_with = "device")]
    pub cuda: bool,
    /// mergekit's alias for `--cuda --low-cpu-memory --read-to-gpu --multi-gpu`.
    #[arg(long, hide = true, conflicts_with = "device")]
    pub gpu_rich: bool,
    #[arg(long, hide = true)]
    pub lazy_unpickle: bool,
    #[arg(long, hide = true)]
    pub no_lazy_unpickle: bool,
    #[arg(long, hide = true)]
    pub low_cpu_memory: bool,
    #[arg(long, hide = true)]
    pub no_low_cpu_memory: bool,
    #[arg(long, hide = true)]
    pub read_to_gpu: bool,
    #[arg(long, hide = true)]
    pub no_read_to_gpu: bool,
    #[arg(long, hide = true)]
    pub multi_gpu: bool,
    #[arg(long, hide = true)]
    pub no_multi_gpu: bool,
    #[arg(long, hide = true)]
    pub clone_tensors: bool,
    #[arg(long, hide = true)]
    pub no_clone_tensors: bool,
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    #[arg(long, hide = true)]
    pub no_trust_remote_code: bool,
    #[arg(long, hide = true)]
    pub async_write: bool,
    #[arg(long, hide = true)]
    pub no_async_write: bool,
    #[arg(long, hide = true, value_name = "N")]
    pub write_threads: Option<usize>,
    #[arg(long, hide = true, value_name = "DIR")]
    pub transformers_cache: Option<PathBuf>,
    #[arg(long, hide = true, value_name = "DIR")]
    pub lora_merge_cache: Option<PathBuf>,
    /// The defaults, spelled out (the later of `--copy-tokenizer` and `--no-copy-tokenizer`
    /// wins, as in mergekit).
    #[arg(long = "copy-tokenizer", id = "mk_copy_tokenizer", hide = true, overrides_with = "copy_tokenizer")]
    pub copy_tokenizer: bool,
    #[arg(long = "write-model-card", id = "mk_write_model_card", hide = true, overrides_with = "write_model_card")]
    pub write_model_card: bool,
    #[arg(long, hide = true)]
    pub safe_serialization: bool,
    #[arg(long, hide = true)]
    pub no_allow_crimes: bool,
    /// mergekit's default, as symerge's (`-q` is the global `--quiet`).
    #[arg(long, hide = true)]
    pub no_quiet: bool,
    /// `--device cpu`, where mergekit's default (no `--cuda`) computes.
    #[arg(long, hide = true, conflicts_with_all = ["device", "cuda", "gpu_rich"])]
    pub no_cuda: bool,
    /// Refused: symerge writes only safetensors.
    #[arg(long, hide = true)]
    pub no_safe_serialization: bool,
    /// Refused: permute embeddings with `tokenizer_source` instead. Its `--no-` form is
    /// mergekit's default, spelled out (the later of the two wins, as in mergekit).
    #[arg(long, hide = true, overrides_with = "no_unsafe_truncate_embeddings")]
    pub unsafe_truncate_embeddings: bool,
    #[arg(long, hide = true, overrides_with = "unsafe_truncate_embeddings")]
    pub no_unsafe_truncate_embeddings: bool,
    /// Refused: an adapter is applied in the model's stored dtype.
    #[arg(long, hide = true, value_name = "DTYPE")]
    pub lora_merge_dtype: Option<String>,
}

impl MergekitFlags {
    /// The device to use (`--cuda` and `--gpu-rich` mean `cuda`), after refusing the flags
    /// symerge cannot honour and logging, once, those that change nothing here.
    pub fn check(&self, device: Device) -> Result<Device> {
        let refuse = |flag: &str, why: &str| Err(Error::Invalid(format!("{flag}: {why}")));
        if self.no_safe_serialization {
            return refuse("--no-safe-serialization", "symerge writes only safetensors");
        }
        if self.unsafe_truncate_embeddings {
            return refuse(
                "--unsafe-truncate-embeddings",
                "not supported; set `tokenizer_source` (or a `tokenizer:` block) in the config to align vocabularies",
            );
        }
        if self.lora_merge_dtype.is_some() {
            return refuse(
                "--lora-merge-dtype",
                "not supported; a LoRA adapter is applied in the model's stored dtype",
            );
        }
        let no_effect: Vec<&str> = [
            (self.lazy_unpickle || self.no_lazy_unpickle, "--[no-]lazy-unpickle"),
            (self.low_cpu_memory || self.no_low_cpu_memory, "--[no-]low-cpu-memory"),
            (self.read_to_gpu || self.no_read_to_gpu, "--[no-]read-to-gpu"),
            (self.multi_gpu || self.no_multi_gpu, "--[no-]multi-gpu"),
            (self.clone_tensors || self.no_clone_tensors, "--[no-]clone-tensors"),
            (self.trust_remote_code || self.no_trust_remote_code, "--[no-]trust-remote-code"),
            (self.async_write || self.no_async_write, "--[no-]async-write"),
            (self.write_threads.is_some(), "--write-threads"),
            (self.transformers_cache.is_some(), "--transformers-cache"),
            (self.lora_merge_cache.is_some(), "--lora-merge-cache"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if !no_effect.is_empty() {
            tracing::info!(
                "mergekit flags without effect in symerge (it streams inputs from memory maps, runs no model code and \
                 writes as blocks finish; LoRA scratch sits beside the output): {}",
                no_effect.join(", ")
            );
        }
        Ok(if self.cuda || self.gpu_rich {
            Device::Cuda(None)
        } else if self.no_cuda {
            Device::Cpu
        } else {
            device
        })
    }
}
