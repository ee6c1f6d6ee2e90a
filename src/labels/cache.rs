//! The soft-label cache file: a fixed 4 KiB header (magic + JSON) followed by row-major f16
//! rows, memory-mapped on read.
//!
//! A classification row is the expert's softmax over its C classes followed by its C logits.
//! Writing goes to `<path>.partial`; a killed run resumes from the last whole row there, and the
//! cache appears at `<path>` only once every row is written, its checksum recorded and the file
//! synced. Opening checks the magic, the header, the length, the checksum of the rows and,
//! when asked, that the cache was made by the same expert, tokenizer, task and inputs.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SYMLBL\x00\x01";
/// Header bytes, magic included; the JSON is padded with spaces to fill it so it can be
/// rewritten in place when the cache is finished.
const HEADER_BYTES: usize = 4096;
/// The layout version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// What a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    /// Softmax probabilities then logits over `classes` classes, per input.
    Classification { classes: usize },
}

impl LabelKind {
    /// f16 values per row.
    pub fn row_values(self) -> usize {
        match self {
            LabelKind::Classification { classes } => 2 * classes,
        }
    }
}

/// Where a cache came from: every field must match for a cache to be reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub task: String,
    /// [`super::fingerprint::checkpoint_hash`] of the expert.
    pub expert_hash: String,
    /// [`super::fingerprint::file_hash`] of the tokenizer and its settings.
    pub tokenizer_hash: String,
    /// [`super::fingerprint::texts_hash`] of the inputs, in order.
    pub inputs_hash: String,
}

/// The JSON header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheHeader {
    pub format_version: u32,
    #[serde(flatten)]
    pub provenance: Provenance,
    pub kind: LabelKind,
    /// Rows the finished cache holds (one per input).
    pub rows: usize,
    /// Class names in id order, when the expert's config has them.
    #[serde(default)]
    pub labels: Vec<String>,
    pub dtype: String,
    pub complete: bool,
    /// BLAKE3 of the row bytes, set when complete.
    #[serde(default)]
    pub data_hash: Option<String>,
}

impl CacheHeader {
    fn row_bytes(&self) -> usize {
        self.kind.row_values() * 2
    }

    fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(|e| cache_err(path, format!("header: {e}")))?;
        if MAGIC.len() + json.len() > HEADER_BYTES {
            return Err(cache_err(path, format!("header of {} bytes does not fit in {HEADER_BYTES}", json.len())));
        }
        let mut out = Vec::with_capacity(HEADER_BYTES);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&json);
        out.resize(HEADER_BYTES, b' ');
        Ok(out)
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.len() < HEADER_BYTES || &bytes[..MAGIC.len()] != MAGIC {
            return Err(cache_err(path, "not a symerge label cache (bad magic or too short)"));
        }
        let json = bytes[MAGIC.len()..HEADER_BYTES].trim_ascii_end();
        let header: CacheHeader =
            serde_json::from_slice(json).map_err(|e| cache_err(path, format!("corrupt header: {e}")))?;
        if header.format_version != FORMAT_VERSION {
            return Err(cache_err(
                path,
                format!("format version {} (this build reads {FORMAT_VERSION}); recreate it", header.format_version),
            ));
        }
        if header.dtype != "f16" {
            return Err(cache_err(path, format!("unsupported dtype `{}`", header.dtype)));
        }
        Ok(header)
    }
}

fn cache_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::LabelCache { path: path.to_path_buf(), reason: reason.into() }
}

/// The partial file a cache is built in.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Builds a cache row by row; see the module docs for resuming.
pub struct CacheWriter {
    path: PathBuf,
    partial: PathBuf,
    header: CacheHeader,
    out: BufWriter<File>,
    written: usize,
}

impl CacheWriter {
    /// Starts `path`, or resumes its `.partial` file when that was started for the same
    /// provenance, kind and row count (anything else there is discarded).
    pub fn create(
        path: &Path,
        provenance: Provenance,
        kind: LabelKind,
        rows: usize,
        labels: Vec<String>,
    ) -> Result<Self> {
        let header = CacheHeader {
            format_version: FORMAT_VERSION,
            provenance,
            kind,
            rows,
            labels,
            dtype: "f16".into(),
            complete: false,
            data_hash: None,
        };
        let partial = partial_path(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let resumable = resumable_rows(&partial, &header);
        // Read access too: `finish` reads the rows back for their checksum.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(resumable.is_none())
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        let written = resumable.unwrap_or(0);
        let end = (HEADER_BYTES + written * header.row_bytes()) as u64;
        // Drops a torn last row left by a killed run.
        file.set_len(end).map_err(|e| Error::io(&partial, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        if resumable.is_none() {
            out.write_all(&header.encode(path)?).map_err(|e| Error::io(&partial, e))?;
        }
        out.seek(SeekFrom::Start(end)).map_err(|e| Error::io(&partial, e))?;
        if written > 0 {
            tracing::info!("resuming {} at row {written} of {rows}", partial.display());
        }
        Ok(CacheWriter { path: path.to_path_buf(), partial, header, out, written })
    }

    /// Rows already in the cache (non-zero when resumed).
    pub fn rows_written(&self) -> usize {
        self.written
    }

    /// Appends classification rows: `probs` and `logits` are row-major `[n, classes]`.
    pub fn append_classification(&mut self, probs: &[f32], logits: &[f32]) -> Result<()> {
        let LabelKind::Classification { classes } = self.header.kind;
        let bytes = encode_classification(probs, logits, classes).map_err(|reason| cache_err(&self.path, reason))?;
        self.append_encoded(&bytes)
    }

    /// Bytes of one row as [`CacheWriter::append_classification`] encodes it.
    pub fn row_bytes(&self) -> usize {
        self.header.row_bytes()
    }

    /// Appends whole rows already encoded (another rank's part of the cache).
    pub fn append_encoded(&mut self, bytes: &[u8]) -> Result<()> {
        let rb = self.header.row_bytes();
        if !bytes.len().is_multiple_of(rb) {
            return Err(cache_err(&self.path, format!("{} bytes are not whole rows of {rb} bytes", bytes.len())));
        }
        let n = bytes.len() / rb;
        if self.written + n > self.header.rows {
            return Err(cache_err(&self.path, format!("more than the planned {} rows", self.header.rows)));
        }
        self.out.write_all(bytes).map_err(|e| Error::io(&self.partial, e))?;
        self.written += n;
        Ok(())
    }

    /// Flushes written rows to the file, so a later resume finds them.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.partial, e))
    }

    /// Checks every row is there, records the checksum, syncs and moves the cache into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.written != self.header.rows {
            return Err(cache_err(&self.path, format!("{} of {} rows written", self.written, self.header.rows)));
        }
        self.flush()?;
        let mut file = self.out.into_inner().map_err(|e| Error::io(&self.partial, e.into_error()))?;
        file.seek(SeekFrom::Start(HEADER_BYTES as u64)).map_err(|e| Error::io(&self.partial, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&self.partial, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        self.header.complete = true;
        self.header.data_hash = Some(hasher.finalize().to_hex().to_string());
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(&self.partial, e))?;
        file.write_all(&self.header.encode(&self.path)?).map_err(|e| Error::io(&self.partial, e))?;
        file.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.path)
    }
}

/// Classification rows as the cache stores them: each row's probabilities then logits, as
/// little-endian f16. `probs` and `logits` are row-major `[n, classes]`.
pub fn encode_classification(probs: &[f32], logits: &[f32], classes: usize) -> std::result::Result<Vec<u8>, String> {
    if probs.len() != logits.len() || classes == 0 || !probs.len().is_multiple_of(classes) {
        return Err(format!(
            "rows of {} probs and {} logits are not whole rows of {classes}",
            probs.len(),
            logits.len()
        ));
    }
    let mut bytes = Vec::with_capacity(probs.len() * 4);
    for (p, l) in probs.chunks_exact(classes).zip(logits.chunks_exact(classes)) {
        for &v in p.iter().chain(l) {
            bytes.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Whole rows of a partial cache that can be continued, if its header matches `want`.
fn resumable_rows(partial: &Path, want: &CacheHeader) -> Option<usize> {
    let mut file = File::open(partial).ok()?;
    let mut head = vec![0u8; HEADER_BYTES];
    file.read_exact(&mut head).ok()?;
    let have = CacheHeader::decode(&head, partial).ok()?;
    let same = have.provenance == want.provenance
        && have.kind == want.kind
        && have.rows == want.rows
        && have.labels == want.labels
        && !have.complete;
    let len = file.metadata().ok()?.len() as usize;
    same.then(|| ((len - HEADER_BYTES) / want.row_bytes()).min(want.rows))
}

/// A finished cache, memory-mapped.
pub struct LabelCache {
    pub path: PathBuf,
    pub header: CacheHeader,
    map: Mmap,
}

impl LabelCache {
    /// Opens and verifies a cache; with `expected`, also that it belongs to that expert,
    /// tokenizer, task and inputs (the first differing field is named in the error).
    pub fn open(path: &Path, expected: Option<&Provenance>) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file we finished writing; nobody rewrites finished caches.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = CacheHeader::decode(&map, path)?;
        if !header.complete {
            return Err(cache_err(path, "incomplete (the run that wrote it did not finish)"));
        }
        let want_len = HEADER_BYTES + header.rows * header.row_bytes();
        if map.len() != want_len {
            return Err(cache_err(
                path,
                format!("{} bytes, but {} rows need {want_len} (truncated or corrupt)", map.len(), header.rows),
            ));
        }
        let data_hash = blake3::hash(&map[HEADER_BYTES..]).to_hex().to_string();
        if header.data_hash.as_deref() != Some(data_hash.as_str()) {
            return Err(cache_err(path, "checksum of the rows does not match the header (corrupt)"));
        }
        if let Some(want) = expected {
            check_provenance(path, &header.provenance, want)?;
        }
        Ok(LabelCache { path: path.to_path_buf(), header, map })
    }

    pub fn rows(&self) -> usize {
        self.header.rows
    }

    /// Number of classes of a classification cache.
    pub fn classes(&self) -> usize {
        match self.header.kind {
            LabelKind::Classification { classes } => classes,
        }
    }

    fn row_values(&self, i: usize) -> impl Iterator<Item = f32> + '_ {
        let rb = self.header.row_bytes();
        let start = HEADER_BYTES + i * rb;
        self.map[start..start + rb].chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
    }

    /// The expert's probabilities for input `i`.
    pub fn probs(&self, i: usize) -> Vec<f32> {
        self.row_values(i).take(self.classes()).collect()
    }

    /// The expert's logits for input `i`.
    pub fn logits(&self, i: usize) -> Vec<f32> {
        self.row_values(i).skip(self.classes()).collect()
    }

    /// Probabilities of several inputs, row-major `[rows.len(), classes]` (a training batch).
    pub fn probs_batch(&self, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&i| self.probs(i)).collect()
    }
}

fn check_provenance(path: &Path, have: &Provenance, want: &Provenance) -> Result<()> {
    let fields = [
        ("task", &have.task, &want.task),
        ("expert checkpoint", &have.expert_hash, &want.expert_hash),
        ("tokenizer", &have.tokenizer_hash, &want.tokenizer_hash),
        ("inputs", &have.inputs_hash, &want.inputs_hash),
    ];
    for (what, h, w) in fields {
        if h != w {
            return Err(cache_err(
                path,
                format!("made for a different {what} (cache has {h}, this run has {w}); rerun cache-labels"),
            ));
        }
    }
    Ok(())
}
