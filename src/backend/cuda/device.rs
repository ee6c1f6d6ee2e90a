//! Finding and opening a GPU: the probe behind `--device auto`, the `--device` spelling, and the
//! [`Gpu`] handle (context, compute stream, compiled kernels).
//!
//! cudarc loads `libcuda` at run time and panics when a symbol is missing; every first contact
//! with the driver is therefore checked with `is_culib_present` and wrapped in `catch_unwind`,
//! so a machine without CUDA gets a sentence, never a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, sys};

use super::kernels::Kernels;
use crate::backend::Device;
use crate::error::{Error, Result};

/// How many CUDA devices this process can use, or why it can use none.
pub fn probe() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver: libcuda.so could not be loaded".into());
    }
    match catch_unwind(CudaContext::device_count) {
        Err(_) => Err("the CUDA driver library lacks symbols this build needs (driver older than CUDA 13?)".into()),
        Ok(Err(e)) => Err(format!("the CUDA driver did not initialise: {e:?}")),
        Ok(Ok(0)) => Err("the CUDA driver found no device".into()),
        Ok(Ok(n)) => Ok(n.max(0) as usize),
    }
}

/// What a device name resolved to.
pub enum Resolved {
    /// Run on the CPU; `reason` says why when a GPU was wanted (`auto`) but not usable.
    Cpu {
        reason: Option<String>,
    },
    Cuda(Box<Gpu>),
}

/// Resolves `--device` for the merge engine: `auto` falls back to the CPU with one info line
/// saying why, `cuda[:N]` fails with the reason; `cuda` alone is the launcher's GPU.
pub fn resolve(device: Device) -> Result<Resolved> {
    match device {
        Device::Cpu => Ok(Resolved::Cpu { reason: None }),
        Device::Auto => {
            let opened =
                probe().map_err(|r| Error::cuda("device", r)).and_then(|_| Gpu::open(Device::cuda_ordinal(None)));
            match opened {
                Ok(gpu) => Ok(Resolved::Cuda(Box::new(gpu))),
                Err(e) => {
                    let reason = e.reason();
                    tracing::info!("--device auto: using the CPU ({reason})");
                    Ok(Resolved::Cpu { reason: Some(reason) })
                }
            }
        }
        Device::Cuda(ordinal) => {
            let n = Device::cuda_ordinal(ordinal);
            let count = probe().map_err(|r| Error::cuda("device", format!("{r}; use --device cpu")))?;
            if n >= count {
                return Err(Error::cuda("device", format!("cuda:{n} requested but only {count} device(s) exist")));
            }
            Ok(Resolved::Cuda(Box::new(Gpu::open(n)?)))
        }
    }
}

/// Facts about the device that the kernels and the executor size themselves by.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// NVRTC target, `sm_XY` from the compute capability (sm_90 on Hopper).
    pub arch: String,
    pub multiprocessors: u32,
    pub total_mem: usize,
}

/// An opened device with its compute stream and compiled kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Stream for kernels and for the host-buffer conveniences.
    pub stream: Arc<CudaStream>,
    pub info: GpuInfo,
    pub kernels: Kernels,
}

/// Maps a driver error (or a cudarc panic) to ours, naming the step.
pub(crate) fn cu<T>(what: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| Error::cuda(what, format!("{e:?}")))
}

impl Gpu {
    /// Opens device `ordinal` and compiles (or fetches from cache) every kernel for it.
    pub fn open(ordinal: usize) -> Result<Self> {
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::cuda("opening the device", "the driver library lacks a needed symbol"))?;
        let ctx = cu("opening the device", ctx)?;
        // Streams are synchronised with explicit events here; cudarc's automatic per-buffer
        // tracking would add a wait and a record to every launch.
        // SAFETY: no buffer exists yet, so none relies on tracking.
        unsafe { ctx.disable_event_tracking() };
        let stream = cu("creating a stream", ctx.new_stream())?;
        let (major, minor) = cu("reading the compute capability", ctx.compute_capability())?;
        let info = GpuInfo {
            ordinal,
            name: cu("reading the device name", ctx.name())?,
            arch: format!("sm_{major}{minor}"),
            multiprocessors: cu(
                "reading the multiprocessor count",
                ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            )?
            .max(1) as u32,
            total_mem: cu("reading the memory size", ctx.total_mem())?,
        };
        let kernels = catch_unwind(AssertUnwindSafe(|| Kernels::load(&ctx, &info.arch)))
            .map_err(|_| Error::cuda("loading kernels", "cudarc panicked (NVRTC library incomplete?)"))??;
        tracing::info!(
            "CUDA device {ordinal}: {} ({}, {} SMs, {:.1} GiB)",
            info.name,
            info.arch,
            info.multiprocessors,
            info.total_mem as f64 / (1u64 << 30) as f64
        );
        keep_freed_memory(ordinal, info.total_mem as u64 / 8);
        Ok(Gpu { ctx, stream, info, kernels })
    }

    /// Free and total device memory in bytes, counting what the allocation pool keeps as free
    /// (the stream is synchronised first, so frees still queued on it count too).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        cu("waiting for the device", self.stream.synchronize())?;
        if let Some(pool) = default_pool(self.info.ordinal) {
            // SAFETY: the device's own default pool; trimming only returns unused memory.
            let _ = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
        }
        cu("reading free memory", self.ctx.mem_get_info())
    }
}

/// The device's default allocation pool, which cudarc's stream-ordered allocations use.
fn default_pool(ordinal: usize) -> Option<sys::CUmemoryPool> {
    let dev = cudarc::driver::result::device::get(i32::try_from(ordinal).ok()?).ok()?;
    // SAFETY: `dev` came from `device::get`.
    unsafe { cudarc::driver::result::device::get_default_mem_pool(dev) }.ok()
}

/// Keeps up to `bytes` of freed device memory in the pool instead of handing it back to the
/// driver at every synchronisation (the pool's default): a training step frees and allocates the
/// same block-sized buffers each time. Capped, because what the pool holds is unavailable to
/// allocations outside it (NCCL, cuBLAS workspaces, other processes). Failing costs only
/// speed, so it is logged.
fn keep_freed_memory(ordinal: usize, bytes: u64) {
    let Some(pool) = default_pool(ordinal) else {
        tracing::debug!("CUDA device {ordinal}: no default memory pool; freed memory goes back to the driver");
        return;
    };
    let mut threshold = bytes;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    // SAFETY: a valid pool, and the attribute takes a u64.
    let r = unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&raw mut threshold).cast()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        tracing::warn!("CUDA device {ordinal}: could not keep freed memory in the pool ({r:?})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
        assert_eq!(Device::default(), Device::Auto);
        assert_eq!("CPU".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(None)));
        assert_eq!(" GPU:3".parse::<Device>(), Ok(Device::Cuda(Some(3))));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(Some(3))));
        assert!("cuda:x".parse::<Device>().is_err());
        let e = "tpu".parse::<Device>().unwrap_err();
        assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        for d in ["auto", "cpu", "cuda", "cuda:2"] {
            assert_eq!(d.parse::<Device>().unwrap().to_string(), d);
        }
    }

    #[test]
    fn probe_gives_a_reason_or_a_count() {
        match probe() {
            Ok(n) => assert!(n > 0),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}
