//! Reading the reference fixtures that `tests/reference/*.py` write with transformers, and the
//! relative error the parity tests compare with.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;

use super::from_bytes;

/// Fixture tensors by name: shape and values (as f64).
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// A fixture's tensors and its metadata strings.
pub fn read(path: &Path) -> (Tensors, HashMap<String, String>) {
    let data = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&data).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, (v.shape().to_vec(), from_bytes(v.dtype(), v.data()))))
        .collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// max |ours - reference| / max |reference|.
pub fn rel_err(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-30);
    ours.iter().zip(reference).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max) / scale
}
