//! symerge: merge fine-tuned transformer checkpoints at LLM scale.
//!
//! The library holds everything; `src/main.rs` only parses the command line.
//! - [`checkpoint`]: memory-mapped safetensors I/O, the layer map and the block stream.
//! - [`merge`]: training-free methods (linear, task arithmetic, TIES, DARE), their config and
//!   the streaming executor.
//! - [`inspect`]: what a checkpoint holds.
//! - [`backend`]: the numeric ops (forward and backward) behind one trait; [`backend::Cpu`] is
//!   the reference implementation.
//! - [`model`]: architectures as chains of blocks (BERT family), tokenization, predict/evaluate.

pub mod backend;
pub mod checkpoint;
pub mod error;
pub mod inspect;
pub mod merge;
pub mod model;
pub mod progress;
pub mod sysinfo;

pub use error::{Error, Result};
