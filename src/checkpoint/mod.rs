//! Checkpoint I/O: memory-mapped safetensors reading (single file or sharded), GGUF reading,
//! dtype views,
//! the layer map, the block-by-block stream, the streaming shard writer, and a generator of
//! synthetic checkpoints for tests and benchmarks.

pub mod dtype;
pub mod generate;
pub mod gguf;
pub mod layers;
pub mod lora;
pub mod output_file;
pub mod reader;
pub mod side_files;
pub mod stored;
pub mod stream;
pub mod writer;

pub use dtype::FloatDType;
pub use layers::{BlockKind, BlockSpec, group_blocks};
pub use reader::{Checkpoint, TensorMeta};
pub use stored::StoredTensor;
pub use stream::LayerStream;
pub use writer::{PlannedTensor, ShardWriter};
