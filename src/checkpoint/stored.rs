//! A tensor's bytes as the checkpoint stores them (f32, f16 or bf16), viewed in place.
//!
//! [`StoredTensor`] shares the file mapping through an `Arc`, so adaptation can hold a view of
//! every shared tensor of the base and all experts without copying any of them, hand views to a
//! prefetch thread, and let a backend stage them where it computes (the CPU reads them in place;
//! CUDA copies them to the device). Pages are faulted in on demand and can be dropped from the
//! process again with [`StoredTensor::release`], which is what keeps streamed adaptation's
//! resident memory bounded by the blocks in use.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap, UncheckedAdvice};

use super::dtype::{FloatDType, decode};

/// A byte range of a read-only file mapping.
pub(crate) struct MappedRange<'a> {
    pub map: &'a Mmap,
    pub start: usize,
    pub end: usize,
}

impl MappedRange<'_> {
    /// Asks the kernel to read the pages ahead (advisory).
    pub fn will_need(&self) {
        if self.end > self.start {
            // Advisory only: a failure costs speed, not correctness.
            let _ = self.map.advise_range(Advice::WillNeed, self.start, self.end - self.start);
        }
    }

    /// Maps the pages into this process ahead of use with one `MADV_POPULATE_READ` call;
    /// faulting them page by page costs more than merging them. Kernels before 5.14 lack the
    /// advice: there, one byte per page is read instead.
    pub fn populate(&self) {
        if self.end == self.start {
            return;
        }
        self.will_need();
        if self.map.advise_range(Advice::PopulateRead, self.start, self.end - self.start).is_err() {
            touch_pages(&self.map[self.start..self.end]);
        }
    }

    /// Drops the pages from this process's resident set; the data stays in the page cache and a
    /// later read faults it back in.
    pub fn release(&self) {
        if self.end > self.start {
            // SAFETY: the map is a read-only, file-backed mapping; MADV_DONTNEED on it only drops
            // page-table entries, and later accesses re-read the unchanged file contents.
            let _ = unsafe {
                self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, self.start, self.end - self.start)
            };
        }
    }
}

/// Reads one byte per page so the pages are faulted in (and read from disk) off the hot thread.
fn touch_pages(bytes: &[u8]) {
    let mut acc = 0u8;
    for i in (0..bytes.len()).step_by(4096) {
        // SAFETY: `i` is in bounds; volatile keeps the otherwise unused read.
        acc ^= unsafe { std::ptr::read_volatile(bytes.as_ptr().add(i)) };
    }
    std::hint::black_box(acc);
}

/// A float tensor's stored bytes: a view into its shard's mapping, with what it is.
#[derive(Clone)]
pub struct StoredTensor {
    pub name: String,
    /// The shard file (for messages).
    pub file: PathBuf,
    pub dtype: FloatDType,
    pub shape: Vec<usize>,
    map: Arc<Mmap>,
    range: Range<usize>,
    /// Pages can be dropped and re-read from the file; an anonymous map's would be lost.
    file_backed: bool,
}

impl std::fmt::Debug for StoredTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTensor")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl StoredTensor {
    /// `range` must lie inside `map` and hold `shape`'s elements of `dtype` (the reader checked
    /// both against the header and the file size).
    pub(crate) fn new(
        name: String,
        file: PathBuf,
        dtype: FloatDType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        range: Range<usize>,
    ) -> Self {
        StoredTensor { name, file, dtype, shape, map, range, file_backed: true }
    }

    /// A tensor over bytes of its own (tests, and values that never lived in a file), backed by
    /// an anonymous mapping.
    pub fn from_bytes(name: &str, dtype: FloatDType, shape: &[usize], bytes: &[u8]) -> std::io::Result<Self> {
        let mut anon = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        anon[..bytes.len()].copy_from_slice(bytes);
        let map = Arc::new(anon.make_read_only()?);
        Ok(StoredTensor {
            name: name.into(),
            file: PathBuf::from("<memory>"),
            dtype,
            shape: shape.to_vec(),
            map,
            range: 0..bytes.len(),
            file_backed: false,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.range.len()
    }

    /// The stored little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Elements `start..start + out.len()` decoded to f32.
    pub fn decode_into(&self, start: usize, out: &mut [f32]) {
        let size = self.dtype.size();
        decode(self.dtype, &self.bytes()[start * size..(start + out.len()) * size], out);
    }

    /// Elements `start..start + len` as f32 in place, when they are stored as aligned f32 (no
    /// decoding or copy needed); `None` otherwise.
    pub fn f32_slice(&self, start: usize, len: usize) -> Option<&[f32]> {
        if self.dtype != FloatDType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(&self.bytes()[start * 4..(start + len) * 4]).ok()
    }

    /// Elements `start..start + len` as f32: borrowed in place when stored as aligned f32, else
    /// decoded into `scratch` (resized to `len`).
    pub fn f32s<'a>(&'a self, start: usize, len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self.f32_slice(start, len) {
            Some(s) => s,
            None => {
                scratch.resize(len, 0.0);
                self.decode_into(start, scratch);
                scratch
            }
        }
    }

    /// The file this view reads (for messages).
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn mapped(&self) -> MappedRange<'_> {
        MappedRange { map: &self.map, start: self.range.start, end: self.range.end }
    }

    /// Maps the pages into this process ahead of use (the prefetch thread calls it).
    pub fn populate(&self) {
        self.mapped().populate();
    }

    /// Drops the pages from this process's resident set (they stay in the page cache). A
    /// tensor over its own bytes ([`StoredTensor::from_bytes`]) keeps them.
    pub fn release(&self) {
        if self.file_backed {
            self.mapped().release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_f32_is_read_in_place_and_others_decoded() {
        let values = [1.5f32, -2.0, 0.25, 7.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = StoredTensor::from_bytes("t", FloatDType::F32, &[4], &bytes).unwrap();
        assert_eq!(t.f32_slice(1, 2), Some(&values[1..3]));
        let mut scratch = Vec::new();
        assert_eq!(t.f32s(1, 3, &mut scratch), &values[1..]);
        assert!(scratch.is_empty(), "read in place");
        let halves: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let h = StoredTensor::from_bytes("h", FloatDType::F16, &[4], &halves).unwrap();
        assert_eq!(h.f32_slice(0, 4), None);
        assert_eq!(h.f32s(0, 4, &mut scratch), &values);
    }

    #[test]
    fn views_decode_their_own_bytes() {
        let values = [1.5f32, -2.0, 0.25, 7.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = StoredTensor::from_bytes("w", FloatDType::F32, &[2, 2], &bytes).unwrap();
        assert_eq!((t.numel(), t.nbytes()), (4, 16));
        let mut out = [0f32; 2];
        t.decode_into(1, &mut out);
        assert_eq!(out, [-2.0, 0.25]);
        t.populate();
        t.release();
        let copy = t.clone();
        drop(t);
        copy.decode_into(2, &mut out);
        assert_eq!(out, [0.25, 7.0]);
    }
}
