//! The NCCL backend (cudarc 0.19's `nccl` feature, which loads `libnccl` at run time like the
//! other CUDA libraries, so a machine without NCCL or a GPU still builds and runs everything
//! else, and gets an explicit error only when it asks for NCCL).
//!
//! 1. Each rank opens the CUDA device of its [`RankInfo::local_rank`] and a stream on it.
//! 2. Rank 0 calls `ncclGetUniqueId`; the 128-byte id travels as the payload of the file
//!    [`rendezvous`] (written atomically by rank 0, waited for with a timeout naming the missing
//!    ranks by the others); every rank then calls `ncclCommInitRank(world_size, id, rank)`.
//!    World size 1 makes its own id and needs no directory.
//! 3. [`NcclGroup`] implements [`Collective`] on host buffers (each call copies the data to a
//!    device buffer, runs `ncclAllReduce` (sum) or `ncclBroadcast` in place, and copies it back;
//!    a barrier is an all-reduce of one element), and [`NcclGroup::all_reduce_device`] sums
//!    buffers that already live on its GPU in place, with no host hop: the CUDA backend's
//!    [`crate::backend::Backend::all_reduce_sum`] takes that path for the adapted layers'
//!    gradients.
//!
//! Timeouts: the rendezvous has one; `ncclCommInitRank` only starts once every rank has
//! arrived there. Inside a collective, this rank polls an event recorded after the NCCL call and
//! gives up after the collective timeout with an error naming the operation; the communicator is
//! then aborted (`ncclCommAbort`) when dropped, so a dead peer fails this rank instead of
//! hanging it.
//!
//! NCCL's ring and tree all-reduce hand every rank the same bits, which [`Collective`] requires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::dist::collective::Collective;
use crate::dist::rank::RankInfo;
use crate::dist::rendezvous::{RendezvousOptions, rendezvous};
use crate::error::{Error, Result};

/// A GPU communicator for one rank.
pub struct NcclGroup {
    comm: Comm,
    stream: Arc<CudaStream>,
    device: String,
    timeout: Duration,
}

// SAFETY: an NCCL communicator may move between threads; what NCCL forbids is calling it from
// several threads at once, and `NcclGroup` is not `Sync` and its operations take `&mut self`.
// cudarc binds the stream's CUDA context to the calling thread before each copy and launch.
unsafe impl Send for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup(rank {}/{} on {})", self.comm.rank(), self.comm.world_size(), self.device)
    }
}

fn unavailable(reason: String) -> Error {
    Error::NcclUnavailable { reason }
}

fn failed(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective { backend: "nccl".into(), reason: format!("{what}: {e:?}") }
}

/// Forms the NCCL communicator for `info`: the device of its local rank, and for more than
/// one rank the id shared through the rendezvous `rdzv` (required then). Errors say why when
/// there is no driver, no device for this local rank, or no NCCL library.
pub fn connect(info: &RankInfo, rdzv: Option<&RendezvousOptions>, timeout: Duration) -> Result<NcclGroup> {
    let devices = match cuda_device_count() {
        Ok(0) => {
            return Err(unavailable(
                "NCCL backend needs a CUDA device; none found (the driver reports 0 devices)".into(),
            ));
        }
        Err(why) => return Err(unavailable(format!("NCCL backend needs a CUDA device; none found ({why})"))),
        Ok(n) => n,
    };
    if info.local_rank >= devices {
        return Err(unavailable(format!(
            "local rank {} needs GPU {}, but this node has {devices} CUDA device(s); start at most one rank per GPU",
            info.local_rank, info.local_rank
        )));
    }
    // SAFETY: only tries to open the library by its usual names; no NCCL call is made unless it
    // loads, which keeps cudarc from panicking where NCCL is not installed.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(unavailable(
            "the NCCL library is not found: cudarc opens `libnccl.so`, which is not on LD_LIBRARY_PATH \
             (the nvidia-nccl wheel and the libnccl2 package ship only libnccl.so.2: link it as libnccl.so \
             in a directory on LD_LIBRARY_PATH); or use --backend file"
                .into(),
        ));
    }
    let ctx = CudaContext::new(info.local_rank).map_err(|e| failed("opening the CUDA device", e))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let stream = ctx.new_stream().map_err(|e| failed("creating a stream", e))?;
    let id = if info.is_single() {
        Id::new().map_err(|e| failed("ncclGetUniqueId", e))?
    } else {
        let Some(opts) = rdzv else {
            return Err(Error::Invalid(format!(
                "a world of {} ranks needs --rendezvous DIR to share the NCCL id",
                info.world_size
            )));
        };
        let mine: Vec<u8> = if info.rank == 0 {
            let id = Id::new().map_err(|e| failed("ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let met = rendezvous(info, opts, &mine)?;
        let shared = met.payload();
        if shared.len() != 128 {
            return Err(failed("the rendezvous payload", format!("{} bytes, not a 128-byte NCCL id", shared.len())));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (o, &b) in internal.iter_mut().zip(shared) {
            *o = b as std::ffi::c_char;
        }
        Id::uninit(internal)
    };
    let comm =
        Comm::from_rank(stream.clone(), info.rank, info.world_size, id).map_err(|e| failed("ncclCommInitRank", e))?;
    tracing::info!("{info}: NCCL communicator on cuda:{} ({name})", info.local_rank);
    Ok(NcclGroup { comm, stream, device: format!("cuda:{} ({name})", info.local_rank), timeout })
}

/// CUDA devices the driver reports, or why there is no driver to ask.
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    // SAFETY: only tries to open the driver library by its usual names; no driver call is made
    // unless it loads, which is what keeps cudarc from panicking on a machine without CUDA.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library libcuda is not installed".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to start: {e}"))?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| format!("counting CUDA devices failed: {e}"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl NcclGroup {
    /// Waits for the work queued on the stream, at most the collective timeout.
    fn wait(&self, op: &str) -> Result<()> {
        let event = self.stream.record_event(None).map_err(|e| failed("recording an event", e))?;
        let start = Instant::now();
        // `try_is_complete`, not `is_complete`: an error behind the event (a faulting kernel) is
        // reported now instead of spinning until the timeout and blaming another rank.
        while !event.try_is_complete().map_err(|e| failed(op, e))? {
            if start.elapsed() >= self.timeout {
                return Err(Error::Collective {
                    backend: "nccl".into(),
                    reason: format!(
                        "{op} on rank {} of {} did not finish within {:.0} s (a rank died or never called it?)",
                        self.comm.rank(),
                        self.comm.world_size(),
                        self.timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Runs `f` on a device copy of `buf` and copies the result back.
    fn in_place(
        &mut self,
        buf: &mut [f32],
        op: &str,
        f: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(buf).map_err(|e| failed("copying to the device", e))?;
        f(&self.comm, &mut dev).map_err(|e| failed(op, e))?;
        self.wait(op)?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| failed("copying from the device", e))?;
        self.stream.synchronize().map_err(|e| failed("synchronising", e))
    }
}

impl NcclGroup {
    /// The CUDA device this rank's communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.comm.ordinal()
    }

    /// Sums each of `bufs` (memory on this group's GPU) over the ranks in place: no copy through
    /// the host. The reductions start after everything `producer` queued before this call (the
    /// kernels that wrote the buffers; the group runs on its own stream) and are complete when
    /// this returns, so `producer` may read the sums at once. Buffers are reduced in the order
    /// given, which must be the same on every rank.
    pub fn all_reduce_device<R: DevicePtrMut<f32>>(&mut self, bufs: &mut [R], producer: &CudaStream) -> Result<()> {
        let ready = producer.record_event(None).map_err(|e| failed("recording the producer's event", e))?;
        self.stream.wait(&ready).map_err(|e| failed("waiting for the producer's event", e))?;
        for buf in bufs.iter_mut() {
            if buf.is_empty() {
                continue;
            }
            self.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map_err(|e| failed("ncclAllReduce", e))?;
        }
        self.wait("ncclAllReduce (device buffers)")
    }
}

impl Collective for NcclGroup {
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn device(&self) -> String {
        self.device.clone()
    }
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.in_place(buf, "ncclAllReduce", |comm, dev| {
            comm.all_reduce_in_place(dev, &ReduceOp::Sum).map(|_| ()).map_err(|e| format!("{e:?}"))
        })
    }
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(failed("broadcast", format!("root {root} is not below the world size {}", self.world_size())));
        }
        self.in_place(buf, "ncclBroadcast", |comm, dev| {
            comm.broadcast_in_place(dev, root as i32).map(|_| ()).map_err(|e| format!("{e:?}"))
        })
    }
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum_f32(&mut [0.0])
    }
    fn nccl(&mut self) -> Option<&mut NcclGroup> {
        Some(self)
    }
}
