//! Streaming merge on the GPU (filled in below).
