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
    Array(GgufArray),
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

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// What the value is, for messages saying why it is not what its key needs (a string
    /// where a size belongs is not "missing").
    pub fn describe(&self) -> String {
        match self {
            GgufValue::Int(v) if *v < 0 => format!("negative ({v})"),
            GgufValue::Int(v) => format!("the integer {v}"),
            GgufValue::UInt(v) => format!("the integer {v}"),
            GgufValue::Float(v) => format!("a float ({})", show_f64(*v)),
            GgufValue::Bool(v) => format!("a bool ({v})"),
            GgufValue::Str(_) => "a string".into(),
            GgufValue::Array(a) => format!("an array of {} {}", a.len(), a.elem_type()),
        }
    }
}

/// A metadata array, kept at the width the file stores it (a `u8` array costs a byte an
/// element, a string array its text and one offset each): arrays nobody reads, such as a
/// hostile file's 60-million-element junk array, must not cost 32 bytes an element.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufArray {
    /// The elements' GGUF type code.
    ty: u32,
    items: Items,
}

#[derive(Debug, Clone, PartialEq)]
enum Items {
    /// Fixed-width elements, as the file's little-endian bytes.
    Fixed(Vec<u8>),
    /// The strings one after another; `ends[i]` is where string `i` ends in `text`.
    Str { text: String, ends: Vec<usize> },
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match &self.items {
            Items::Fixed(bytes) => bytes.len() / width(self.ty).unwrap_or(1),
            Items::Str { ends, .. } => ends.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements' type as GGUF names it (`u8`, `i32`, `string`...).
    pub fn elem_type(&self) -> &'static str {
        type_name(self.ty)
    }

    /// The elements, decoded one at a time.
    pub fn values(&self) -> Box<dyn Iterator<Item = GgufValue> + '_> {
        match &self.items {
            Items::Fixed(bytes) => {
                let w = width(self.ty).unwrap_or(1);
                Box::new(bytes.chunks_exact(w).map(|b| scalar(self.ty, b)))
            }
            Items::Str { .. } => Box::new(self.strings().into_iter().flatten().map(|s| GgufValue::Str(s.into()))),
        }
    }

    /// The elements of a string array; `None` for an array of another type.
    pub fn strings(&self) -> Option<impl Iterator<Item = &str>> {
        match &self.items {
            Items::Str { text, ends } => {
                let starts = std::iter::once(0).chain(ends.iter().copied());
                Some(starts.zip(ends).map(move |(start, &end)| &text[start..end]))
            }
            Items::Fixed(_) => None,
        }
    }
}

/// A float for messages: plainly when that is short, else in exponent form (1e300 would
/// otherwise print 301 digits).
pub fn show_f64(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-4..1e6).contains(&v.abs()) { format!("{v}") } else { format!("{v:e}") }
}

/// The byte width of a fixed-width GGUF type (not string or array).
fn width(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A GGUF type code's name, for messages.
pub fn type_name(ty: u32) -> &'static str {
    const NAMES: [&str; 13] =
        ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];
    NAMES.get(ty as usize).copied().unwrap_or("unknown")
}

/// Decodes one fixed-width value of type `ty` from exactly `width(ty)` little-endian bytes.
fn scalar(ty: u32, b: &[u8]) -> GgufValue {
    let le = |n: usize| b.iter().take(n).rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    match ty {
        0 | 2 | 4 | 10 => GgufValue::UInt(le(b.len())),
        1 => GgufValue::Int(le(1) as u8 as i8 as i64),
        3 => GgufValue::Int(le(2) as u16 as i16 as i64),
        5 => GgufValue::Int(le(4) as u32 as i32 as i64),
        11 => GgufValue::Int(le(8) as i64),
        6 => GgufValue::Float(f32::from_bits(le(4) as u32) as f64),
        12 => GgufValue::Float(f64::from_bits(le(8))),
        _ => GgufValue::Bool(b.first().is_some_and(|&x| x != 0)),
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

    fn str_ref(&mut self, what: &str) -> Result<&'a str> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        self.str_ref(what).map(str::to_owned)
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue> {
        let what = format!("value of `{key}`");
        match ty {
            8 => Ok(GgufValue::Str(self.string(&what)?)),
            9 => self.array(&what).map(GgufValue::Array),
            _ => {
                let w = width(ty).ok_or_else(|| self.err(&format!("{what} has unknown type {ty}")))?;
                Ok(scalar(ty, self.take(w, &what)?))
            }
        }
    }

    /// An array, copied compactly ([`GgufArray`]); arrays of arrays are refused.
    fn array(&mut self, what: &str) -> Result<GgufArray> {
        let ty = self.u32(what)?;
        if ty == 8 {
            return self.string_array(what);
        }
        let w =
            width(ty).ok_or_else(|| self.err(&format!("{what} is an array of unknown (or nested array) type {ty}")))?;
        let n = self.count(what, w)?;
        // `count` checked that `n * w` bytes are left.
        let bytes = self.take(n * w, what)?.to_vec();
        Ok(GgufArray { ty, items: Items::Fixed(bytes) })
    }

    fn string_array(&mut self, what: &str) -> Result<GgufArray> {
        // Each string takes at least its 8-byte length.
        let n = self.count(what, 8)?;
        let (mut text, mut ends) = (String::new(), Vec::with_capacity(n));
        for _ in 0..n {
            text.push_str(self.str_ref(what)?);
            ends.push(text.len());
        }
        Ok(GgufArray { ty: 8, items: Items::Str { text, ends } })
    }
}

/// One entry of the tensor table as the file states it, before its range is checked.
struct TableEntry {
    name: String,
    dims: Vec<usize>,
    code: u32,
    offset: u64,
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
            let v = c.value(ty, &key)?;
            metadata.insert(key, v);
        }
        let table = (0..n_tensors).map(|_| c.table_entry()).collect::<Result<Vec<_>>>()?;
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| c.err(&format!("`general.alignment` is {v:?}, not a power of two")))?
                as usize,
        };
        let layout = Layout { path, file_len: map.len(), data_start: c.at.div_ceil(align) * align, align };
        let tensors = table.into_iter().map(|e| layout.locate(e)).collect::<Result<Vec<_>>>()?;
        layout.check_disjoint(&tensors)?;
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

impl Cursor<'_> {
    fn table_entry(&mut self) -> Result<TableEntry> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32(&format!("dimensions of `{name}`"))? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(self.err(&format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = self.u64(&format!("a dimension of `{name}`"))?;
            dims.push(usize::try_from(d).map_err(|_| self.err(&format!("dimension {d} of `{name}`")))?);
        }
        let code = self.u32(&format!("type of `{name}`"))?;
        let offset = self.u64(&format!("offset of `{name}`"))?;
        Ok(TableEntry { name, dims, code, offset })
    }
}

/// Where the tensor data lies, and the rules llama.cpp's reader holds a file to: every offset
/// a multiple of the alignment, rows of whole quantization blocks, tensors inside the file and
/// apart from one another. Overlapping tensors would let a small file import to an output
/// hundreds of times its size; a row cut through a block is not a matrix ggml can read.
struct Layout<'a> {
    path: &'a Path,
    file_len: usize,
    data_start: usize,
    align: usize,
}

impl Layout<'_> {
    fn bad(&self, name: &str, reason: String) -> Error {
        Error::BadGguf { path: self.path.to_path_buf(), reason: format!("tensor `{name}`: {reason}") }
    }

    /// The byte range of a tensor, checked.
    fn locate(&self, e: TableEntry) -> Result<GgufTensor> {
        let TableEntry { name, dims, code, offset } = e;
        let kind = GgmlType::from_code(code).ok_or_else(|| {
            let known = "F32, F16, BF16, Q4_0, Q4_1, Q8_0";
            self.bad(&name, format!("ggml type {code}, which this build does not dequantize ({known})"))
        })?;
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.bad(&name, format!("{dims:?} overflow")))?;
        let (per, bytes) = kind.block();
        let row = dims.first().copied().unwrap_or(0);
        if row % per != 0 {
            let msg = format!("rows of {row} elements are not whole {per}-element blocks of {kind:?}");
            return Err(self.bad(&name, msg));
        }
        if offset % self.align as u64 != 0 {
            let msg =
                format!("data offset {offset} is not a multiple of the alignment {} (`general.alignment`)", self.align);
            return Err(self.bad(&name, msg));
        }
        let len = (numel / per).checked_mul(bytes).ok_or_else(|| self.bad(&name, "size overflows".into()))?;
        let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(self.data_start));
        match start.and_then(|s| Some((s, s.checked_add(len).filter(|&e| e <= self.file_len)?))) {
            Some((start, end)) => Ok(GgufTensor { name, dims, kind, start, end }),
            None => Err(self.bad(
                &name,
                format!("{len} bytes at data offset {offset} run past the end of the {}-byte file", self.file_len),
            )),
        }
    }

    /// Refuses tensors whose bytes overlap (empty tensors occupy nothing).
    fn check_disjoint(&self, tensors: &[GgufTensor]) -> Result<()> {
        let mut by_start: Vec<&GgufTensor> = tensors.iter().filter(|t| t.end > t.start).collect();
        by_start.sort_by_key(|t| (t.start, t.end));
        match by_start.windows(2).find(|w| w[1].start < w[0].end) {
            None => Ok(()),
            Some(w) => {
                let at = |t: &GgufTensor| format!("bytes {}..{}", t.start - self.data_start, t.end - self.data_start);
                let msg = format!("its data ({}) overlaps that of `{}` ({})", at(w[1]), w[0].name, at(w[0]));
                Err(self.bad(&w[1].name, msg))
            }
        }
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
