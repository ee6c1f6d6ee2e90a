//! Which engine runs a merge: the `--device` rules every rank applies the same way.
//!
//! `cpu` runs the CPU engine. `auto` takes the GPU (the launcher's local rank's) when one is
//! usable and the config fits the GPU engine, else the CPU, saying why in one log line. `cuda`
//! insists: a config the GPU engine cannot run is an error, except a method without a GPU
//! kernel, which runs on the CPU with one warning.

use super::config::MergeConfig;
use super::executor::{CpuEngine, MergeOptions, MergeSummary, merge_with_in};
use crate::backend::Device;
use crate::backend::cuda::stream_merge::{CudaEngine, CudaOptions, no_kernel, unsupported};
use crate::backend::cuda::{Resolved, resolve};
use crate::dist::Collective;
use crate::error::{Error, Result};

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
