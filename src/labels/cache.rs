//! The soft-label cache file: a fixed 4 KiB header (magic + JSON) followed by the data,
//! memory-mapped on read.
//!
//! - Classification: one row per input, the expert's softmax over its C classes followed by its C
//!   logits, as f16.
//! - Top-k (causal LMs): inputs have one entry per *predicted position* (every real token whose
//!   next token is real, so `len - 1` per input, as the next-token loss counts them). The data
//!   starts with an offset table of `rows + 1` little-endian u64, entry `i` being the number of
//!   positions before input `i`, so input `i` is sliced in O(1). Then one record per position:
//!   the `k` token ids (u32, most probable first), their probabilities (f32) and the remaining
//!   mass (f32, the probability summed over every other token). Probabilities are f32 because
//!   tail probabilities of a large vocabulary fall below f16's normal range (6.1e-5), where it
//!   keeps only a few significant bits; the ids dominate the size anyway.
//!
//! Writing goes to `<path>.partial`; a killed run resumes from the last flush there whose rows
//! still match the checksum the partial's header recorded at that flush (rows that merely look
//! valid are not trusted: fuzzing round 6 flipped low bits of f16 values and they were sealed
//! into the finished cache), and the cache appears at `<path>` only once every input is written, its checksum recorded and the file
//! synced. Opening checks the magic, the header, the length, the checksum of the data and,
//! when asked, that the cache was made by the same expert, tokenizer, task and inputs.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SYMLBL\x00\x01";
/// What a label cache is, in messages about an output path.
pub const CACHE_KIND: &str = "a symerge label cache";
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
    /// Per predicted position of an input, the expert's `k` most probable next tokens out of
    /// `vocab`, their probabilities and the remaining mass.
    TopK { k: usize, vocab: usize },
}

impl LabelKind {
    /// Bytes of one unit of data: a classification row, or one top-k position record.
    pub fn unit_bytes(self) -> usize {
        match self {
            LabelKind::Classification { classes } => 2 * 2 * classes,
            LabelKind::TopK { k, .. } => 8 * k + 4,
        }
    }

    fn dtype(self) -> &'static str {
        match self {
            LabelKind::Classification { .. } => "f16",
            LabelKind::TopK { .. } => "f32",
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
    /// The maximum length the inputs were cut to (also inside `tokenizer_hash`): said plainly
    /// when it is what differs. Caches from earlier builds have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
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
    /// Top-k caches: predicted positions over all inputs (the records after the offset table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<usize>,
    /// Class names in id order, when the expert's config has them.
    #[serde(default)]
    pub labels: Vec<String>,
    pub dtype: String,
    pub complete: bool,
    /// BLAKE3 of the row bytes, set when complete.
    #[serde(default)]
    pub data_hash: Option<String>,
    /// The batch size the rows were computed in: padding to a batch's longest input moves f16
    /// rows by an ulp, so a resumed run keeps the size its partial file was started with and the
    /// cache does not depend on how a run was interrupted. Caches of earlier builds have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// A partial file's last flush: its units and their BLAKE3, what a resumed run trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flushed: Option<Flushed>,
}

/// The rows a partial cache held at its last flush ([`CacheHeader::flushed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flushed {
    pub units: usize,
    pub blake3: String,
}

impl CacheHeader {
    /// Bytes of the offset table (top-k caches) before the records.
    fn table_bytes(&self) -> usize {
        match self.kind {
            LabelKind::Classification { .. } => 0,
            LabelKind::TopK { .. } => (self.rows + 1) * 8,
        }
    }

    /// Units of data (rows or position records) in the finished cache.
    fn units(&self) -> usize {
        match self.kind {
            LabelKind::Classification { .. } => self.rows,
            LabelKind::TopK { .. } => self.positions.unwrap_or(0),
        }
    }

    /// Bytes after the header of the finished cache, computed with checked arithmetic: `None`
    /// when the header's sizes overflow (a lying header must not wrap around to the file's
    /// length).
    fn data_bytes_checked(&self) -> Option<usize> {
        let (unit, table) = match self.kind {
            LabelKind::Classification { classes } => (classes.checked_mul(4)?, 0),
            LabelKind::TopK { k, .. } => (k.checked_mul(8)?.checked_add(4)?, self.rows.checked_add(1)?.checked_mul(8)?),
        };
        table.checked_add(self.units().checked_mul(unit)?)
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
        if header.dtype != header.kind.dtype() {
            return Err(cache_err(path, format!("unsupported dtype `{}` for {:?}", header.dtype, header.kind)));
        }
        match header.kind {
            LabelKind::Classification { classes: 0 } => Err(cache_err(path, "corrupt header: zero classes")),
            LabelKind::TopK { k, vocab } if k == 0 || k > vocab || header.positions.is_none() => Err(cache_err(
                path,
                format!("corrupt header: top-k of {k} over {vocab} tokens, positions {:?}", header.positions),
            )),
            _ => Ok(header),
        }
    }
}

fn cache_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::LabelCache { path: path.to_path_buf(), reason: reason.into() }
}

/// Whether `path` is a regular file that starts with a label cache's magic: one `--force` may
/// replace (even a damaged or outdated cache), as opposed to a file of the user's.
pub fn is_label_cache(path: &Path) -> bool {
    if crate::input_file::check_regular(path).is_err() {
        return false;
    }
    let mut magic = [0u8; MAGIC.len()];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC
}

/// The partial file a cache is built in.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Builds a cache input by input; see the module docs for resuming.
pub struct CacheWriter {
    path: PathBuf,
    partial: PathBuf,
    header: CacheHeader,
    /// Top-k caches: positions before each input (`rows + 1` entries), empty otherwise.
    offsets: Vec<u64>,
    out: BufWriter<File>,
    written: usize,
    /// Inputs taken from an earlier run's partial file (0 on a fresh start).
    resumed: usize,
    /// BLAKE3 of every unit written so far, resumed ones included.
    hasher: blake3::Hasher,
}

impl CacheWriter {
    /// Starts a classification cache at `path`, or resumes its `.partial` file when that was
    /// started for the same provenance, kind and row count (anything else there is discarded).
    pub fn create(
        path: &Path,
        provenance: Provenance,
        kind: LabelKind,
        rows: usize,
        labels: Vec<String>,
    ) -> Result<Self> {
        if !matches!(kind, LabelKind::Classification { .. }) {
            return Err(cache_err(path, "a top-k cache needs each input's positions: use CacheWriter::create_topk"));
        }
        Self::start(path, new_header(provenance, kind, rows, None, labels), Vec::new())
    }

    /// Starts (or resumes, as [`CacheWriter::create`]) a top-k cache whose input `i` has
    /// `positions[i]` predicted positions.
    pub fn create_topk(
        path: &Path,
        provenance: Provenance,
        k: usize,
        vocab: usize,
        positions: &[usize],
    ) -> Result<Self> {
        if k == 0 || k > vocab {
            return Err(cache_err(path, format!("top-k of {k} over a vocabulary of {vocab} tokens")));
        }
        let mut offsets = Vec::with_capacity(positions.len() + 1);
        let mut total = 0u64;
        offsets.push(0);
        for &n in positions {
            total += n as u64;
            offsets.push(total);
        }
        let header =
            new_header(provenance, LabelKind::TopK { k, vocab }, positions.len(), Some(total as usize), Vec::new());
        Self::start(path, header, offsets)
    }

    fn start(path: &Path, header: CacheHeader, offsets: Vec<u64>) -> Result<Self> {
        let partial = partial_path(path);
        // A resume reads the partial file: a FIFO there would block the read.
        if partial.symlink_metadata().is_ok() {
            crate::input_file::check_regular(&partial)?;
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = lock_partial(&partial)?;
        crate::atomic::keep_resumable(&partial);
        let table = encode_table(&offsets);
        let resumable = resumable_units(&partial, &header, &table);
        let mut w = CacheWriter {
            path: path.to_path_buf(),
            partial,
            header,
            offsets,
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            resumed: 0,
            hasher: blake3::Hasher::new(),
        };
        let kept = resumable.as_ref().map_or(0, |r| r.units);
        // Leading inputs without positions are whole within zero units: written already.
        w.written = w.rows_within(kept);
        // No data kept is a fresh start, whatever `written` says: the header and offset table
        // are this run's (fuzzing round 8: first inputs without positions made a fresh run look
        // resumed, and neither was written).
        let fresh = w.units_before(w.written) == 0;
        // Rows kept bind the batch size they were computed in; none kept, none binds.
        if let (Some(r), false) = (&resumable, fresh) {
            w.header.batch_size = r.batch_size;
            w.header.flushed = r.flushed.clone();
            w.hasher = r.hasher.clone();
        }
        let end = w.end_of(w.written);
        // Drops a torn last input left by a killed run.
        w.out.get_ref().set_len(end).map_err(|e| Error::io(&w.partial, e))?;
        // Nothing kept: the header is this run's (a discarded partial's would keep its checksum).
        if fresh {
            let head = w.header.encode(path)?;
            w.out.write_all(&head).map_err(|e| Error::io(&w.partial, e))?;
            w.out.write_all(&table).map_err(|e| Error::io(&w.partial, e))?;
        }
        w.out.seek(SeekFrom::Start(end)).map_err(|e| Error::io(&w.partial, e))?;
        if !fresh {
            w.resumed = w.written;
            tracing::info!("resuming {} at input {} of {}", w.partial.display(), w.written, w.header.rows);
        }
        Ok(w)
    }

    /// Units (rows or position records) before input `i`.
    fn units_before(&self, i: usize) -> usize {
        if self.offsets.is_empty() { i } else { self.offsets[i] as usize }
    }

    /// Whole inputs held by the first `units` units (the last of several equal offsets: inputs
    /// without positions right after are complete too).
    fn rows_within(&self, units: usize) -> usize {
        if self.offsets.is_empty() {
            units.min(self.header.rows)
        } else {
            self.offsets.partition_point(|&o| o as usize <= units).saturating_sub(1)
        }
    }

    /// File length once the first `rows` inputs are written.
    fn end_of(&self, rows: usize) -> u64 {
        (HEADER_BYTES + self.header.table_bytes() + self.units_before(rows) * self.header.kind.unit_bytes()) as u64
    }

    /// Inputs already in the cache: resumed ones, and inputs without positions at the start.
    pub fn rows_written(&self) -> usize {
        self.written
    }

    /// Inputs an earlier run's partial file held (inputs without positions at the start of a
    /// fresh run are written, not resumed).
    pub fn rows_resumed(&self) -> usize {
        self.resumed
    }

    /// The batch size to compute the rows in: the one a resumed partial file was started with,
    /// else `asked`, which is then recorded in the header (see [`CacheHeader::batch_size`]).
    pub fn batch_size(&mut self, asked: usize) -> Result<usize> {
        if let Some(started) = self.header.batch_size {
            return Ok(started);
        }
        self.header.batch_size = Some(asked);
        let head = self.header.encode(&self.path)?;
        let end = self.end_of(self.written);
        let partial = self.partial.clone();
        let io = |e| Error::io(&partial, e);
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&head).map_err(io)?;
        self.out.seek(SeekFrom::Start(end)).map_err(io)?;
        Ok(asked)
    }

    /// Appends classification rows: `probs` and `logits` are row-major `[n, classes]`.
    pub fn append_classification(&mut self, probs: &[f32], logits: &[f32]) -> Result<()> {
        let LabelKind::Classification { classes } = self.header.kind else {
            return Err(cache_err(&self.path, "classification rows appended to a top-k cache"));
        };
        let bytes = encode_classification(probs, logits, classes).map_err(|reason| cache_err(&self.path, reason))?;
        self.append_encoded(&bytes)
    }

    /// Appends the top-k records of whole inputs: `ids` and `probs` are `[positions, k]`, `rest`
    /// is `[positions]`.
    pub fn append_topk(&mut self, ids: &[u32], probs: &[f32], rest: &[f32]) -> Result<()> {
        let LabelKind::TopK { k, .. } = self.header.kind else {
            return Err(cache_err(&self.path, "top-k records appended to a classification cache"));
        };
        let bytes = encode_topk(ids, probs, rest, k).map_err(|reason| cache_err(&self.path, reason))?;
        self.append_encoded(&bytes)
    }

    /// Bytes of one unit as the `append_*` methods encode it: a classification row or a top-k
    /// position record.
    pub fn row_bytes(&self) -> usize {
        self.header.kind.unit_bytes()
    }

    /// Appends units already encoded (another rank's part of the cache); they must end on an
    /// input's boundary.
    pub fn append_encoded(&mut self, bytes: &[u8]) -> Result<()> {
        let ub = self.header.kind.unit_bytes();
        if !bytes.len().is_multiple_of(ub) {
            return Err(cache_err(&self.path, format!("{} bytes are not whole units of {ub} bytes", bytes.len())));
        }
        let target = self.units_before(self.written) + bytes.len() / ub;
        if target > self.header.units() {
            return Err(cache_err(&self.path, format!("more than the planned {} units", self.header.units())));
        }
        let rows = self.rows_within(target);
        if self.units_before(rows) != target {
            return Err(cache_err(
                &self.path,
                format!(
                    "{} positions end inside input {rows}: append whole inputs",
                    target - self.units_before(self.written)
                ),
            ));
        }
        self.out.write_all(bytes).map_err(|e| Error::io(&self.partial, e))?;
        self.hasher.update(bytes);
        self.written = rows;
        Ok(())
    }

    /// Flushes written rows to the file and then records their checksum in the partial's header,
    /// so a later resume finds them and can check them.
    pub fn flush(&mut self) -> Result<()> {
        let partial = self.partial.clone();
        let io = |e| Error::io(&partial, e);
        self.out.flush().map_err(io)?;
        let units = self.units_before(self.written);
        if self.header.flushed.as_ref().is_some_and(|f| f.units == units) {
            return Ok(());
        }
        self.header.flushed = Some(Flushed { units, blake3: self.hasher.finalize().to_hex().to_string() });
        let head = self.header.encode(&self.path)?;
        let end = self.end_of(self.written);
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&head).map_err(io)?;
        self.out.seek(SeekFrom::Start(end)).map_err(io)?;
        self.out.flush().map_err(io)
    }

    /// Checks every input is there, records the checksum, syncs and moves the cache into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.written != self.header.rows {
            return Err(cache_err(&self.path, format!("{} of {} rows written", self.written, self.header.rows)));
        }
        self.flush()?;
        let mut file = self.out.into_inner().map_err(|e| Error::io(&self.partial, e.into_error()))?;
        // The offset table on disk is the one the rows were written against: a cache that would
        // not open is never renamed into place.
        let table = encode_table(&self.offsets);
        let mut on_disk = vec![0u8; table.len()];
        file.seek(SeekFrom::Start(HEADER_BYTES as u64)).map_err(|e| Error::io(&self.partial, e))?;
        file.read_exact(&mut on_disk).map_err(|e| Error::io(&self.partial, e))?;
        if on_disk != table {
            return Err(cache_err(&self.partial, "internal: the offset table written differs from the inputs'"));
        }
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
        self.header.flushed = None;
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(&self.partial, e))?;
        file.write_all(&self.header.encode(&self.path)?).map_err(|e| Error::io(&self.partial, e))?;
        file.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        // Callers check at their start; checked again as the rename would replace anything.
        crate::atomic::check_output_file(&self.path, CACHE_KIND, is_label_cache)?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| Error::io(&self.path, e))?;
        crate::atomic::forget_resumable(&self.partial);
        Ok(self.path)
    }
}

fn new_header(
    provenance: Provenance,
    kind: LabelKind,
    rows: usize,
    positions: Option<usize>,
    labels: Vec<String>,
) -> CacheHeader {
    CacheHeader {
        format_version: FORMAT_VERSION,
        provenance,
        kind,
        rows,
        positions,
        labels,
        dtype: kind.dtype().into(),
        complete: false,
        data_hash: None,
        flushed: None,
        batch_size: None,
    }
}

fn encode_table(offsets: &[u64]) -> Vec<u8> {
    offsets.iter().flat_map(|o| o.to_le_bytes()).collect()
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
    for (row, (p, l)) in probs.chunks_exact(classes).zip(logits.chunks_exact(classes)).enumerate() {
        if let Some(e) = row_error(p, l) {
            return Err(format!("row {row} of the batch: {e}"));
        }
        for &v in p.iter().chain(l) {
            bytes.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Why an expert's output row cannot be stored: a value that is not finite, or a logit beyond
/// the f16 range the cache keeps. Checked before the row is written, so a finished cache never
/// holds what reading it back refuses.
fn row_error(probs: &[f32], logits: &[f32]) -> Option<String> {
    if let Some(e) = distribution_error(probs, 0.0, 1e-2) {
        return Some(format!("the expert's {e}"));
    }
    let limit = f16::MAX.to_f32();
    let worst = logits.iter().copied().find(|v| !v.is_finite() || v.abs() > limit)?;
    Some(if worst.is_finite() {
        format!(
            "the expert's logit {worst:e} is beyond the cache's f16 range (+-{limit}): its outputs are out of scale"
        )
    } else {
        format!("the expert's output is not finite ({worst})")
    })
}

/// Top-k position records as the cache stores them: per position its `k` ids (u32), their
/// probabilities (f32) and the remaining mass (f32), little-endian.
pub fn encode_topk(ids: &[u32], probs: &[f32], rest: &[f32], k: usize) -> std::result::Result<Vec<u8>, String> {
    let n = rest.len();
    if k == 0 || ids.len() != n * k || probs.len() != n * k {
        return Err(format!("{} ids and {} probabilities are not {n} positions of top-{k}", ids.len(), probs.len()));
    }
    let mut bytes = Vec::with_capacity(n * (8 * k + 4));
    for (pos, ((i, p), r)) in ids.chunks_exact(k).zip(probs.chunks_exact(k)).zip(rest).enumerate() {
        if let Some(e) = distribution_error(p, *r, 1e-3) {
            return Err(format!("position {pos} of the batch: the expert's {e}"));
        }
        i.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        p.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    Ok(bytes)
}

/// Opens (or creates) the partial file and takes an exclusive lock on it for the writer's life:
/// two runs building one cache would otherwise interleave their rows in one file, which then
/// passes every check under the winner's provenance. Not truncated here: a resume keeps it.
fn lock_partial(partial: &Path) -> Result<File> {
    // Read access too: `finish` reads the data back for its checksum.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(partial)
        .map_err(|e| Error::io(partial, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(cache_err(
                partial,
                "another run is writing this cache now; wait for it to finish or write to another path",
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(partial, e)),
    }
    // The file may have been renamed into place by the run that held the lock between our
    // open and our lock: then ours is the finished cache, not a partial one.
    use std::os::unix::fs::MetadataExt;
    let same = match (file.metadata(), partial.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    if !same {
        return Err(cache_err(
            partial,
            "another run finished this cache while this one started; run again to reuse it",
        ));
    }
    Ok(file)
}

/// What a partial cache offers a resumed run ([`resumable_units`]).
struct Resumable {
    /// Leading units whose bytes match the checksum of the partial's last flush.
    units: usize,
    batch_size: Option<usize>,
    flushed: Option<Flushed>,
    /// BLAKE3 state after those units, to go on from.
    hasher: blake3::Hasher,
}

/// The units of a partial cache that can be continued, if its header (and offset table) matches
/// `want`: those of its last flush, when their bytes still match the checksum recorded then.
/// Rows after it (written, but killed before the header said so) are recomputed, and so is
/// everything when the checksum fails: values that were changed but look valid cannot be told
/// apart otherwise.
fn resumable_units(partial: &Path, want: &CacheHeader, table: &[u8]) -> Option<Resumable> {
    let mut file = File::open(partial).ok()?;
    let mut head = vec![0u8; HEADER_BYTES + table.len()];
    file.read_exact(&mut head).ok()?;
    let have = CacheHeader::decode(&head, partial).ok()?;
    let same = have.provenance == want.provenance
        && have.kind == want.kind
        && have.rows == want.rows
        && have.positions == want.positions
        && have.labels == want.labels
        && head[HEADER_BYTES..] == *table
        && !have.complete;
    if !same {
        return None;
    }
    let fresh = Resumable { units: 0, batch_size: None, flushed: None, hasher: blake3::Hasher::new() };
    let Some(flushed) = have.flushed.clone().filter(|f| f.units <= want.units()) else { return Some(fresh) };
    let mut data = vec![0u8; flushed.units * want.kind.unit_bytes()];
    let mut hasher = blake3::Hasher::new();
    if file.read_exact(&mut data).is_err() || hasher.update(&data).finalize().to_hex().as_str() != flushed.blake3 {
        tracing::warn!(
            "{}: the {} units written do not match the checksum recorded when they were; starting over",
            partial.display(),
            flushed.units
        );
        return Some(fresh);
    }
    Some(Resumable { units: flushed.units, batch_size: have.batch_size, flushed: Some(flushed), hasher })
}

/// One or several inputs' top-k labels, position after position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKLabels {
    pub k: usize,
    /// `[positions, k]`, most probable first.
    pub ids: Vec<u32>,
    /// `[positions, k]`, aligned with `ids`.
    pub probs: Vec<f32>,
    /// `[positions]`: the expert's probability of every token outside its top k.
    pub rest: Vec<f32>,
}

impl TopKLabels {
    pub fn positions(&self) -> usize {
        self.rest.len()
    }
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
        let file = crate::input_file::open(path)?;
        // SAFETY: read-only map of a file we finished writing; nobody rewrites finished caches.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = CacheHeader::decode(&map, path)?;
        if !header.complete {
            return Err(cache_err(path, "incomplete (the run that wrote it did not finish)"));
        }
        let Some(want_len) = header.data_bytes_checked().and_then(|d| d.checked_add(HEADER_BYTES)) else {
            return Err(cache_err(
                path,
                format!("corrupt header: {} rows of {:?} overflow any file size", header.rows, header.kind),
            ));
        };
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
        let cache = LabelCache { path: path.to_path_buf(), header, map };
        if let LabelKind::TopK { .. } = cache.header.kind {
            let ends = (0..=cache.rows()).map(|i| cache.offset(i));
            let monotone = ends.clone().zip(ends.skip(1)).all(|(a, b)| a <= b);
            if cache.offset(0) != 0 || !monotone || cache.offset(cache.rows()) != cache.header.units() {
                return Err(cache_err(path, "corrupt offset table"));
            }
        }
        cache.check_values()?;
        Ok(cache)
    }

    /// Every stored label is a distribution: finite probabilities in [0, 1] summing to 1 (within
    /// the storage dtype's rounding), finite logits, token ids inside the vocabulary, as many
    /// class names as classes. A checksum only says the bytes are the ones written; this says
    /// they are labels a training run can use.
    fn check_values(&self) -> Result<()> {
        let bad = |what: String| Err(cache_err(&self.path, format!("corrupt labels: {what}")));
        match self.header.kind {
            LabelKind::Classification { classes } => {
                if !self.header.labels.is_empty() && self.header.labels.len() != classes {
                    return bad(format!("{} class names for {classes} classes", self.header.labels.len()));
                }
                for i in 0..self.rows() {
                    let p = self.probs(i);
                    if let Some(e) = distribution_error(&p, 0.0, 1e-2) {
                        return bad(format!("input {i}: {e}"));
                    }
                    if self.logits(i).iter().any(|v| !v.is_finite()) {
                        return bad(format!("input {i}: a logit is not finite"));
                    }
                }
            }
            LabelKind::TopK { vocab, .. } => {
                let all: Vec<usize> = (0..self.rows()).collect();
                let l = self.topk_batch(&all)?;
                if let Some(id) = l.ids.iter().find(|&&id| id as usize >= vocab) {
                    return bad(format!("token id {id} outside the vocabulary of {vocab}"));
                }
                for (pos, (p, &rest)) in l.probs.chunks(l.k.max(1)).zip(&l.rest).enumerate() {
                    if let Some(e) = distribution_error(p, rest, 1e-3) {
                        return bad(format!("position {pos}: {e}"));
                    }
                }
                // A token listed twice at one position would count its probability twice.
                let mut ids = Vec::with_capacity(l.k);
                for (pos, row) in l.ids.chunks(l.k.max(1)).enumerate() {
                    ids.clear();
                    ids.extend_from_slice(row);
                    ids.sort_unstable();
                    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                        return bad(format!("position {pos}: token id {} is listed twice", w[0]));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.header.rows
    }

    pub fn kind(&self) -> LabelKind {
        self.header.kind
    }

    /// Number of classes of a classification cache (0 for a top-k cache).
    pub fn classes(&self) -> usize {
        match self.header.kind {
            LabelKind::Classification { classes } => classes,
            LabelKind::TopK { .. } => 0,
        }
    }

    fn row_values(&self, i: usize) -> impl Iterator<Item = f32> + '_ {
        let rb = 4 * self.classes();
        let start = HEADER_BYTES + i * rb;
        self.map[start..start + rb].chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
    }

    /// The expert's probabilities for input `i` (empty for a top-k cache).
    pub fn probs(&self, i: usize) -> Vec<f32> {
        self.row_values(i).take(self.classes()).collect()
    }

    /// The expert's logits for input `i` (empty for a top-k cache).
    pub fn logits(&self, i: usize) -> Vec<f32> {
        self.row_values(i).skip(self.classes()).collect()
    }

    /// Probabilities of several inputs, row-major `[rows.len(), classes]` (a training batch).
    pub fn probs_batch(&self, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&i| self.probs(i)).collect()
    }

    /// Top-k caches: positions before input `i` (entry `i` of the offset table).
    fn offset(&self, i: usize) -> usize {
        let at = HEADER_BYTES + 8 * i;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[at..at + 8]);
        u64::from_le_bytes(b) as usize
    }

    /// Predicted positions of input `i` in a top-k cache (0 for a classification cache).
    pub fn positions(&self, i: usize) -> usize {
        match self.header.kind {
            LabelKind::TopK { .. } if i < self.rows() => self.offset(i + 1) - self.offset(i),
            _ => 0,
        }
    }

    /// The top-k labels of inputs `rows`, concatenated in that order (a training batch).
    pub fn topk_batch(&self, rows: &[usize]) -> Result<TopKLabels> {
        let LabelKind::TopK { k, .. } = self.header.kind else {
            return Err(cache_err(&self.path, "holds classification labels, not next-token top-k labels"));
        };
        let rec = self.header.kind.unit_bytes();
        let data = HEADER_BYTES + self.header.table_bytes();
        let mut out = TopKLabels { k, ids: Vec::new(), probs: Vec::new(), rest: Vec::new() };
        let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        for &i in rows {
            if i >= self.rows() {
                return Err(cache_err(&self.path, format!("input {i} is past the cache's {} inputs", self.rows())));
            }
            let (start, end) = (data + self.offset(i) * rec, data + self.offset(i + 1) * rec);
            for r in self.map[start..end].chunks_exact(rec) {
                let (ids, tail) = r.split_at(4 * k);
                let (probs, rest) = tail.split_at(4 * k);
                out.ids.extend(ids.chunks_exact(4).map(|b| u32::from_le_bytes(word(b))));
                out.probs.extend(probs.chunks_exact(4).map(|b| f32::from_le_bytes(word(b))));
                out.rest.push(f32::from_le_bytes(word(rest)));
            }
        }
        Ok(out)
    }

    /// The top-k labels of input `i`.
    pub fn topk(&self, i: usize) -> Result<TopKLabels> {
        self.topk_batch(&[i])
    }
}

/// Why `probs` plus `rest` is not a probability distribution (each value finite and in [0, 1],
/// the total 1 within `tol`), or `None`.
fn distribution_error(probs: &[f32], rest: f32, tol: f64) -> Option<String> {
    if let Some(v) = probs.iter().chain([&rest]).find(|v| !v.is_finite() || **v < -1e-6 || **v > 1.0 + tol as f32) {
        return Some(format!("probability {v} is not in [0, 1]"));
    }
    let total: f64 = probs.iter().map(|&v| v as f64).sum::<f64>() + rest as f64;
    ((total - 1.0).abs() > tol).then(|| format!("probabilities sum to {total}, not 1"))
}

fn check_provenance(path: &Path, have: &Provenance, want: &Provenance) -> Result<()> {
    const REBUILD: &str = "rebuild it with `symerge cache-labels ... --force`";
    if let (Some(h), Some(w)) = (have.max_len, want.max_len)
        && h != w
    {
        return Err(cache_err(
            path,
            format!("made with --max-len {h}, this run uses {w}: set max_len: {h} in the adapt config, or {REBUILD}"),
        ));
    }
    let fields = [
        ("task", &have.task, &want.task),
        ("expert checkpoint (weights or config.json)", &have.expert_hash, &want.expert_hash),
        ("tokenizer or maximum length", &have.tokenizer_hash, &want.tokenizer_hash),
        ("inputs", &have.inputs_hash, &want.inputs_hash),
    ];
    for (what, h, w) in fields {
        if h != w {
            return Err(cache_err(
                path,
                // Quoted and escaped: names that differ only in invisible characters look alike.
                format!(
                    "made for a different {what} (cache has {:?}, this run has {:?}); {REBUILD}",
                    crate::error::excerpt(h),
                    crate::error::excerpt(w)
                ),
            ));
        }
    }
    Ok(())
}
