//! symerge: merge fine-tuned transformer checkpoints at LLM scale.
//!
//! The library holds everything; `src/main.rs` only parses the command line.
//! - [`checkpoint`]: memory-mapped safetensors I/O, the layer map and the block stream.
//! - [`merge`]: training-free methods (linear, task arithmetic, TIES, DARE), their config and
//!   the streaming executor.
//! - [`inspect`]: what a checkpoint holds.
//! - [`data`]: real labelled text tasks (WordNet, fortunes) as train/validation/test JSONL.
//! - [`adapt`]: SyMerge / AdaMerging adaptation (Lambda, optimizer).
//! - [`labels`]: the on-disk cache of expert soft labels that adaptation trains against.
//! - [`backend`]: the numeric ops (forward and backward) behind one trait; [`backend::Cpu`] is
//!   the reference implementation.
//! - [`model`]: architectures as chains of blocks (BERT family), tokenization, predict/evaluate.
//! - [`dist`]: rank discovery, file rendezvous, collectives and data-parallel arithmetic.
//! - [`units`]: the sizes and durations flags take.

pub mod adapt;
pub mod atomic;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod input_file;
pub mod inspect;
pub mod labels;
pub mod logits;
pub mod merge;
pub mod model;
pub mod ordered_map;
pub mod progress;
pub mod report;
pub mod sysinfo;
pub mod units;

#[cfg(test)]
mod testing;

pub use error::{Error, Result};
