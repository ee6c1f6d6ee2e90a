//! Reading the reference fixtures that `tests/reference/*.py` write with transformers, and the
//! relative errors every test compares with: [`max_rel`] and [`norm_rel`] for whole tensors,
//! [`rel_diff`] for one pair of numbers.

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

/// `max |ours - reference| / max |reference|`: the worst element against the tensor's scale.
/// The tests' one element-wise relative error (with [`norm_rel`]); NaN anywhere gives NaN, which
/// fails every `<=`.
pub fn max_rel<R: Copy + Into<f64>>(ours: &[f32], reference: &[R]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().map(|&v| v.into().abs()).fold(0.0, f64::max).max(1e-30);
    let worst = ours.iter().zip(reference).map(|(&a, &b)| (a as f64 - b.into()).abs()).fold(0.0, nan_max);
    worst / scale
}

/// `||ours - reference|| / ||reference||` in f64: the error's norm against the tensor's; NaN
/// anywhere gives NaN.
pub fn norm_rel<R: Copy + Into<f64>>(ours: &[f32], reference: &[R]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let (num, den) = ours.iter().zip(reference).fold((0f64, 0f64), |(n, d), (&a, &b)| {
        let b = b.into();
        (n + (a as f64 - b).powi(2), d + b * b)
    });
    if num == 0.0 { 0.0 } else { (num / den.max(1e-30)).sqrt() }
}

/// `|a - b| / max(|a|, |b|, floor)`: two numbers' difference relative to the larger of them, for
/// pairs of scalars or elements (a finite difference and an analytic derivative, ours and a
/// reference's entry). Symmetric, so neither side has to be the reference; the floor sets the
/// magnitude below which values count as noise, compared absolutely against it. NaN gives NaN.
pub fn rel_diff(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(floor)
}

/// `f64::max` that keeps a NaN instead of dropping it.
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
}
