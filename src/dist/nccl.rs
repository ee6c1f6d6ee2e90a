//! The NCCL backend: the place it will go, and an honest error until it does.
//!
//! Plan (cudarc 0.19 with its `nccl` feature, which loads `libnccl` at run time like the other
//! CUDA libraries, so a CPU-only install keeps working):
//! 1. Pick the device from [`RankInfo::local_rank`] and create its context and stream.
//! 2. Rank 0 calls `ncclGetUniqueId`; the 128-byte id travels through
//!    [`crate::dist::rendezvous::rendezvous`] as its payload; every rank then calls
//!    `ncclCommInitRank(world_size, id, rank)`.
//! 3. [`NcclGroup`] implements [`Collective`] with `ncclAllReduce` (sum) and `ncclBroadcast` on
//!    device buffers, and a barrier as an all-reduce of one element. Collectives are enqueued on
//!    a stream, so the collective timeout is a host-side watchdog that polls the stream and
//!    calls `ncclCommAbort` when it expires: a dead peer then fails this rank instead of hanging.
//!
//! NCCL's ring all-reduce hands every rank the same bits, which [`Collective`] requires.

use crate::dist::collective::Collective;
use crate::dist::rank::RankInfo;
use crate::error::{Error, Result};

/// A GPU communicator. It has no values yet: [`connect`] cannot make one until the backend is
/// written, and the type exists so the rest of the code can name it.
#[derive(Debug)]
pub enum NcclGroup {}

/// Forms the NCCL communicator for `info`. Today always an error: that no CUDA device is usable,
/// or, where one is, that the backend is not implemented.
pub fn connect(info: &RankInfo) -> Result<NcclGroup> {
    match cuda_device_count() {
        Ok(0) => Err(Error::NcclUnavailable {
            reason: "NCCL backend needs a CUDA device; none found (the driver reports 0 devices)".into(),
        }),
        Err(why) => {
            Err(Error::NcclUnavailable { reason: format!("NCCL backend needs a CUDA device; none found ({why})") })
        }
        Ok(n) => Err(Error::NcclUnavailable {
            reason: format!(
                "{info}: {n} CUDA device(s) found, but the NCCL backend is not implemented yet; use the file backend"
            ),
        }),
    }
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

impl Collective for NcclGroup {
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        match *self {}
    }
    fn world_size(&self) -> usize {
        match *self {}
    }
    fn all_reduce_sum_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        match *self {}
    }
    fn broadcast_f32(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        match *self {}
    }
    fn barrier(&mut self) -> Result<()> {
        match *self {}
    }
}
