//! GGUF files (llama.cpp's format): the header, the metadata key/values, the tensor table, and
//! dequantization of the common tensor types (F32, F16, BF16, Q4_0, Q4_1, Q8_0) to f32 exactly as
//! ggml computes them. Every size and offset is checked against the file before use, so a
//! truncated or lying file is an error naming the field, never a panic.
//!
//! [`crate::model::import`] turns a Llama-family GGUF into a Hugging Face checkpoint directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    /// Unsigned values too large for `i64` stay here.
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Int(v) => u64::try_from(v).ok(),
            GgufValue::UInt(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::Int(v) => Some(v as f64),
            GgufValue::UInt(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A ggml tensor type this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements, bytes) of one block.
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (a PyTorch shape is the reverse).
    pub dims: Vec<usize>,
    pub kind: GgmlType,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl GgufTensor {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The PyTorch / safetensors shape.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An opened GGUF file (memory-mapped).
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    map: Mmap,
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::BadGguf { path: self.path.to_path_buf(), reason: format!("{what} (at byte {})", self.at) }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            self.err(&format!("{what}: {n} bytes run past the end of the {}-byte file", self.bytes.len()))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A count that must fit the remaining bytes at `min_bytes` each (so a lying count cannot
    /// make us allocate or loop for nothing).
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(self.err(&format!("{what} {n} cannot fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("value of `{key}`");
        Ok(match ty {
            0 => GgufValue::UInt(self.take(1, &what)?[0] as u64),
            1 => GgufValue::Int(self.take(1, &what)?[0] as i8 as i64),
            2 => GgufValue::UInt(u16::from_le_bytes(self.take(2, &what)?.try_into().expect("2")) as u64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2, &what)?.try_into().expect("2")) as i64),
            4 => GgufValue::UInt(self.u32(&what)? as u64),
            5 => GgufValue::Int(self.u32(&what)? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32(&what)?) as f64),
            7 => GgufValue::Bool(self.take(1, &what)?[0] != 0),
            8 => GgufValue::Str(self.string(&what)?),
            9 if depth == 0 => {
                let inner = self.u32(&what)?;
                let n = self.count(&what, 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64(&what)?),
            11 => GgufValue::Int(self.u64(&what)? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64(&what)?)),
            other => return Err(self.err(&format!("{what} has unknown (or nested array) type {other}"))),
        })
    }
}

impl Gguf {
    /// Opens and parses a GGUF file (versions 2 and 3).
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::input_file::open(path)?;
        // SAFETY: read-only map; like every mmap reader we rely on the file not being truncated.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor { bytes: &map, at: 0, path };
        if c.take(4, "magic")? != b"GGUF" {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(&format!("GGUF version {version} (this build reads 2 and 3)")));
        }
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut table = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&format!("dimensions of `{name}`"))? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(&format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&format!("a dimension of `{name}`"))?;
                dims.push(usize::try_from(d).map_err(|_| c.err(&format!("dimension {d} of `{name}`")))?);
            }
            let code = c.u32(&format!("type of `{name}`"))?;
            let offset = c.u64(&format!("offset of `{name}`"))?;
            table.push((name, dims, code, offset));
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| c.err("general.alignment"))? as usize,
        };
        let data_start = c.at.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(table.len());
        for (name, dims, code, offset) in table {
            let kind = GgmlType::from_code(code).ok_or_else(|| Error::BadGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor `{name}` has ggml type {code}, which this build does not dequantize \
                                 (F32, F16, BF16, Q4_0, Q4_1, Q8_0)"
                ),
            })?;
            let t = locate(path, map.len(), data_start, name, dims, kind, offset)?;
            tensors.push(t);
        }
        Ok(Gguf { path: path.to_path_buf(), version, metadata, tensors, map })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's values in f32, in ggml element order (row-major over the PyTorch shape).
    pub fn dequantize(&self, t: &GgufTensor) -> Vec<f32> {
        let mut out = vec![0f32; t.numel()];
        dequantize_into(t.kind, &self.map[t.start..t.end], &mut out);
        out
    }
}

/// The byte range of a tensor, checked: the element count divides into blocks and the blocks lie
/// inside the file.
fn locate(
    path: &Path,
    file_len: usize,
    data_start: usize,
    name: String,
    dims: Vec<usize>,
    kind: GgmlType,
    offset: u64,
) -> Result<GgufTensor> {
    let bad =
        |reason: String| Error::BadGguf { path: path.to_path_buf(), reason: format!("tensor `{name}`: {reason}") };
    let numel =
        dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("{dims:?} overflow")))?;
    let (per, bytes) = kind.block();
    if numel % per != 0 {
        return Err(bad(format!("{numel} elements are not whole {per}-element blocks of {kind:?}")));
    }
    let len = (numel / per).checked_mul(bytes).ok_or_else(|| bad("size overflows".into()))?;
    let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
    let end = start.and_then(|s| s.checked_add(len)).filter(|&e| e <= file_len);
    match (start, end) {
        (Some(start), Some(end)) => Ok(GgufTensor { name, dims, kind, start, end }),
        _ => Err(bad(format!("{len} bytes at offset {offset} lie outside the {file_len}-byte file"))),
    }
}

/// Dequantizes `bytes` (whole blocks of `kind`) into `out`, as ggml's `dequantize_row_*` do.
pub fn dequantize_into(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match kind {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => out.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(o, b)| *o = h(b)),
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = h(&b[..2]);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let (d, m) = (h(&b[..2]), h(&b[2..4]));
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = h(&b[..2]);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_dequantize_as_ggml_defines_them() {
        // Q4_1: d = 0.5, m = -1, nibbles 0..15 low, 15..0 high.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize_into(GgmlType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
        // Q8_0: d = 0.25, q = -16..16.
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
        dequantize_into(GgmlType::Q8_0, &b, &mut out);
        assert!(out.iter().enumerate().all(|(j, &v)| v == (j as f32 - 16.0) * 0.25));
        // Q4_0: d = 2, q - 8.
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | (j << 4)));
        dequantize_into(GgmlType::Q4_0, &b, &mut out);
        assert!((0..16).all(|j| out[j] == (j as f32 - 8.0) * 2.0 && out[j + 16] == out[j]));
    }
}
