//! Floating-point storage dtypes and their conversion to and from f32, the dtype all merge math
//! runs in. Conversions are written as plain loops over `u16`/`u32` lanes so the compiler
//! vectorises them; unaligned input (safetensors does not promise alignment) is handled too.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// A floating-point dtype a checkpoint may store and we can merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatDType {
    F32,
    F16,
    BF16,
}

impl FloatDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDType::F32 => 4,
            FloatDType::F16 | FloatDType::BF16 => 2,
        }
    }

    /// The safetensors header name (`F32`, `F16`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatDType::F32 => "F32",
            FloatDType::F16 => "F16",
            FloatDType::BF16 => "BF16",
        }
    }

    /// The `torch_dtype` string Hugging Face writes into `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDType::F32 => "float32",
            FloatDType::F16 => "float16",
            FloatDType::BF16 => "bfloat16",
        }
    }

    /// The float dtype of a safetensors dtype, if it is one we merge.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(FloatDType::F32),
            safetensors::Dtype::F16 => Some(FloatDType::F16),
            safetensors::Dtype::BF16 => Some(FloatDType::BF16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            FloatDType::F32 => safetensors::Dtype::F32,
            FloatDType::F16 => safetensors::Dtype::F16,
            FloatDType::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Unit roundoff of the dtype: the relative error of one rounding to it.
    pub fn epsilon(self) -> f64 {
        match self {
            FloatDType::F32 => f32::EPSILON as f64 / 2.0,
            FloatDType::F16 => 2f64.powi(-11),
            FloatDType::BF16 => 2f64.powi(-8),
        }
    }
}

impl fmt::Display for FloatDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

impl FromStr for FloatDType {
    type Err = String;

    /// Accepts mergekit/PyTorch spellings (`bfloat16`, `float16`, `float32`, with or without
    /// `torch.`, as mergekit's `dtype_from_name`) and short ones.
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        match lower.strip_prefix("torch.").unwrap_or(&lower) {
            "float32" | "fp32" | "f32" | "float" => Ok(FloatDType::F32),
            "float16" | "fp16" | "f16" | "half" => Ok(FloatDType::F16),
            "bfloat16" | "bf16" => Ok(FloatDType::BF16),
            other => Err(format!("unknown dtype `{other}` (supported: float32, float16, bfloat16)")),
        }
    }
}

/// Decodes `out.len()` elements of `dtype` from `bytes` (little-endian) into f32.
///
/// Panics if `bytes` is shorter than `out.len() * dtype.size()`; callers slice by element count.
pub fn decode(dtype: FloatDType, bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    let bytes = &bytes[..n * dtype.size()];
    match dtype {
        FloatDType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(src) => out.copy_from_slice(src),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        FloatDType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(src) => {
                for (o, &b) in out.iter_mut().zip(src) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        },
        FloatDType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) => {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(out);
            }
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
    }
}

/// Encodes f32 values into `dtype` bytes (round to nearest even), appending to `out`.
pub fn encode_into(dtype: FloatDType, src: &[f32], out: &mut [u8]) {
    let out = &mut out[..src.len() * dtype.size()];
    match dtype {
        FloatDType::F32 => {
            for (c, &v) in out.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        FloatDType::BF16 => {
            for (c, &v) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
        }
        FloatDType::F16 => {
            for (c, &v) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
    }
}

/// Index of the first NaN/Inf, with a branch-free scan first (the common case is none).
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    let bad = x.iter().fold(false, |acc, v| acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    if bad { x.iter().position(|v| !v.is_finite()) } else { None }
}

/// Index of the first value that is not finite or would overflow `dtype` (round to inf): what
/// every writer checks before [`encode_into`], which saturates silently.
pub fn first_out_of_range(x: &[f32], dtype: FloatDType) -> Option<usize> {
    let Some(limit) = overflow_threshold(dtype) else { return first_non_finite(x) };
    let out = |v: &f32| v.is_nan() | (v.abs() >= limit);
    // A branch-free scan first, as in first_non_finite.
    if x.iter().fold(false, |acc, v| acc | out(v)) { x.iter().position(out) } else { None }
}

/// The smallest magnitude that rounds to infinity in `dtype`: half an ulp above f16's largest
/// value. bf16 shares f32's range (only the last half ulp below f32's largest value rounds to
/// inf, which the GPU kernels, matching this, do not flag either).
fn overflow_threshold(dtype: FloatDType) -> Option<f32> {
    match dtype {
        FloatDType::F16 => Some(65520.0),
        FloatDType::BF16 | FloatDType::F32 => None,
    }
}

/// The largest finite value of `dtype`, for messages.
pub fn largest_finite(dtype: FloatDType) -> f32 {
    match dtype {
        FloatDType::F16 => f16::MAX.to_f32(),
        FloatDType::BF16 => bf16::MAX.to_f32(),
        FloatDType::F32 => f32::MAX,
    }
}

/// f32 -> bf16 bits, round to nearest even, NaN kept quiet. Same rule as `half::bf16::from_f32`,
/// written branch-light so the loop above vectorises.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if v.is_nan() {
        return bf16::NAN.to_bits() | ((x >> 16) as u16 & 0x8000);
    }
    let round = 0x7fff + ((x >> 16) & 1);
    (x.wrapping_add(round) >> 16) as u16
}

/// Rounds an f32 to the nearest value representable in `dtype` (what a write then read gives).
pub fn round_trip(dtype: FloatDType, v: f32) -> f32 {
    match dtype {
        FloatDType::F32 => v,
        FloatDType::F16 => f16::from_f32(v).to_f32(),
        FloatDType::BF16 => f32::from_bits((bf16_bits(v) as u32) << 16),
    }
}

/// Rounds f32 values to `dtype`'s precision in place, as [`round_trip`] rounds one.
pub fn round_all(dtype: FloatDType, x: &mut [f32]) {
    if dtype != FloatDType::F32 {
        x.iter_mut().for_each(|v| *v = round_trip(dtype, *v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_crate() {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x1234_5678_9abc_def0);
        for _ in 0..100_000 {
            let v = f32::from_bits(rand::RngCore::next_u32(&mut rng));
            if v.is_nan() {
                continue;
            }
            assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits(), "value {v:e}");
        }
    }

    #[test]
    fn decode_unaligned_equals_aligned() {
        let vals: Vec<f32> = (0..37).map(|i| (i as f32 - 18.3) * 0.731).collect();
        for dt in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            let mut bytes = vec![0u8; vals.len() * dt.size() + 1];
            encode_into(dt, &vals, &mut bytes[1..]);
            let mut a = vec![0f32; vals.len()];
            let mut b = vec![0f32; vals.len()];
            decode(dt, &bytes[1..], &mut a);
            let aligned = bytes[1..].to_vec();
            decode(dt, &aligned, &mut b);
            assert_eq!(a, b, "{dt}");
            for (x, y) in vals.iter().zip(&a) {
                assert_eq!(round_trip(dt, *x), *y, "{dt}");
            }
        }
    }

    #[test]
    fn parses_mergekit_dtype_names() {
        assert_eq!("bfloat16".parse::<FloatDType>(), Ok(FloatDType::BF16));
        assert_eq!("float16".parse::<FloatDType>(), Ok(FloatDType::F16));
        assert_eq!("FP32".parse::<FloatDType>(), Ok(FloatDType::F32));
        assert!("int8".parse::<FloatDType>().is_err());
    }
}
