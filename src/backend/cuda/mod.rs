//! The CUDA engine: cudarc with run-time loading of the driver and NVRTC (the crate builds and
//! runs where neither exists), our kernels from `kernels/*.cu` compiled by NVRTC for the
//! device's own architecture, and the streaming merge executor that feeds them from the mmaps
//! through a pinned, double-buffered staging ring.
//!
//! - [`device`]: availability probe, `--device auto|cpu|cuda[:N]`, the [`Gpu`] context.
//! - [`nvrtc`]: compile and cache the kernels.
//! - [`kernels`]: typed launches (merge, lambda_grad, TIES threshold, DARE) and host-buffer
//!   conveniences used by the parity tests and the benchmark.
//! - [`ops`]: [`Cuda`], the [`crate::backend::Backend`] the models run on with `--device cuda`.
//! - `stored`: adaptation's ops on staged checkpoint bytes (merge, lambda_grad, Adam).
//! - [`stream_merge`]: `symerge merge --device cuda`.
//! - `bench`: `symerge bench-cuda`.

pub mod bench;
pub mod device;
pub mod kernels;
pub mod nvrtc;
pub mod ops;
mod stored;
pub mod stream_merge;

pub use device::{Gpu, Resolved, probe, resolve};
pub use ops::Cuda;
