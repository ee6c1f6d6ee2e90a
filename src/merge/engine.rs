//! Which engine runs a merge: the `--device` rules every rank applies the same way.
//!
//! `cpu` runs the CPU engine. `auto` takes the GPU (the launcher's local rank's) when one is
//! usable and the config fits the GPU engine, else the CPU, saying why in one log line. `cuda`
//! insists: a config the GPU engine cannot run is an error, except a method without a GPU
//! kernel, which runs on the CPU with one warning.

use std::path::PathBuf;

use super::config::MergeConfig;
use super::executor::{CpuEngine, MergeOptions, MergeSummary, merge_with_in};
use crate::backend::Device;
use crate::backend::cuda::stream_merge::{CudaEngine, CudaOptions, no_kernel, unsupported};
use crate::backend::cuda::{Resolved, resolve};
use crate::dist::{Collective, ConnectOptions};
use crate::error::{Error, Result};
use crate::units::parse_size;

/// `symerge merge`'s arguments: the config, how to write ([`MergeOptions`]), which engine, and
/// the launcher's ranks to split the blocks over.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    pub config: PathBuf,
    #[command(flatten)]
    pub opts: MergeOptions,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Device memory the GPU merge may use, e.g. 20GB (default: what is free, less 2 GB).
    /// When it holds every input, inputs stay resident on the device.
    #[arg(long, value_parser = parse_size)]
    pub device_mem: Option<u64>,
    /// Split the blocks over the launcher's ranks (each on GPU LOCAL_RANK with a CUDA
    /// device); rank 0 assembles the shards and the index.
    #[command(flatten)]
    pub dist: ConnectOptions,
}

impl MergeArgs {
    /// The defaults: [`MergeOptions::new`], `--device auto`, the GPU's free memory, one process
    /// unless a launcher says otherwise.
    pub fn new(config: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        MergeArgs {
            config: config.into(),
            opts: MergeOptions::new(output),
            device: Device::Auto,
            device_mem: None,
            dist: ConnectOptions::default(),
        }
    }

    /// Loads the config, joins the launcher's ranks and merges as this rank ([`merge_on`]).
    pub fn run(&self) -> Result<MergeSummary> {
        let cfg = MergeConfig::load(&self.config)?;
        let (n, method, out) = (cfg.models.len(), &cfg.method.name, self.opts.output.display());
        tracing::info!("merging {n} model(s) with {method} into {out}");
        // Several ranks on a node: `auto` and `cuda` take the GPU of the local rank.
        let (info, mut coll) = self.dist.connect_from_env()?;
        merge_on(&cfg, &self.opts, self.device, self.device_mem, coll.as_mut()).map_err(|e| info.tag(e))
    }
}

/// Merges `config` on the engine `device` names, as one rank of `coll` (a rank that cannot
/// open its engine aborts the group, so no other rank waits for it); `device_mem` bounds the GPU
/// engine's memory.
pub fn merge_on(
    config: &MergeConfig,
    opts: &MergeOptions,
    device: Device,
    device_mem: Option<u64>,
    coll: &mut dyn Collective,
) -> Result<MergeSummary> {
    let engine = choose(config, device).inspect_err(|e| coll.abort(&e.to_string()))?;
    match engine {
        Resolved::Cpu { .. } => merge_with_in(config, opts, &mut CpuEngine, coll),
        Resolved::Cuda(gpu) => {
            let mut engine = CudaEngine::new(&gpu, CudaOptions { device_mem, ..Default::default() });
            merge_with_in(config, opts, &mut engine, coll)
        }
    }
}

/// The engine for `config` on `device` (see the module notes).
fn choose(config: &MergeConfig, device: Device) -> Result<Resolved> {
    match (device, unsupported(config)) {
        (Device::Auto, Some(why)) => {
            tracing::info!("--device auto: using the CPU ({why})");
            Ok(Resolved::Cpu { reason: Some(why) })
        }
        (Device::Cuda(_), Some(why)) if no_kernel(config).is_some() => {
            tracing::warn!("--device cuda: {why}; merging on the CPU");
            Ok(Resolved::Cpu { reason: Some(why) })
        }
        (Device::Cuda(_), Some(why)) => Err(Error::Invalid(format!("{why}; use --device cpu"))),
        _ => resolve(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::FloatDType;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let args: MergeArgs = parse_args(&["m.yml", "-o", "out"]).unwrap();
        assert_eq!(format!("{args:?}"), format!("{:?}", MergeArgs::new("m.yml", "out")));
    }

    #[test]
    fn sizes_and_dtype_parse_under_their_flag_names() {
        let argv = ["m.yml", "-o", "o", "--out-shard-size", "2GiB", "--dtype", "float16", "--device-mem", "1GB"];
        let args: MergeArgs = parse_args(&argv).unwrap();
        let opts = &args.opts;
        assert_eq!(
            (opts.max_shard_bytes, opts.out_dtype, args.device_mem),
            (2 << 30, Some(FloatDType::F16), Some(1_000_000_000))
        );
        let bad = parse_args::<MergeArgs>(&["m.yml", "-o", "o", "--out-shard-size", "0"]);
        let e = bad.err().unwrap().to_string();
        assert!(e.contains("--out-shard-size") && e.contains("at least one byte"), "{e}");
    }
}
