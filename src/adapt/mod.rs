//! Test-time adaptation of the merge: SyMerge (Lambda jointly with one task-specific layer per
//! task, against the experts' cached soft labels) and AdaMerging (Lambda only, entropy).
//!
//! - [`config`]: the YAML config; [`train`]: the block-streamed loop and its outputs, generic
//!   over a model [`train::Family`]: [`classifier`] (BERT family) and [`lm`] (causal LMs);
//! - [`shared`]: the shared blocks' weights streamed from the checkpoints: merged weights and
//!   Lambda gradients block by block on the backend; [`objective`]: the losses;
//! - [`lambda`]: the coefficient table (saved as a `merge` Lambda table); [`adam`]: the optimizer;
//! - [`report`]: `symerge eval` over an adaptation's output, every task against its expert.

pub mod adam;
pub mod classifier;
pub mod config;
pub mod lambda;
pub mod lm;
pub mod objective;
pub mod report;
pub mod shared;
pub mod train;
