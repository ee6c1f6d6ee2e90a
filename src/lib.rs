//! symerge: merge fine-tuned transformer checkpoints at LLM scale.
//!
//! The library holds everything; `src/main.rs` only parses the command line.
//! - [`checkpoint`]: memory-mapped safetensors I/O, the layer map and the block stream.
//! - [`merge`]: training-free methods (linear, task arithmetic, TIES, DARE), their config and
//!   the streaming executor.
//! - [`inspect`]: what a checkpoint holds.
//! - [`data`]: real labelled text tasks (WordNet, fortunes) as train/validation/test JSONL.
//! - [`dist`]: rank discovery, file rendezvous, collectives and data-parallel arithmetic.

pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod inspect;
pub mod merge;
pub mod progress;
pub mod sysinfo;

pub use error::{Error, Result};
