//! Streaming safetensors writer: tensors are written as they are produced, into shards of a
//! bounded size, with a Hugging Face `model.safetensors.index.json` when there is more than one.
//!
//! Every tensor's dtype and shape is known before merging starts, so the whole layout (which
//! shard each tensor goes to, its offsets, the final file names) is planned up front and each
//! shard's header is written before its data: no tensor is ever buffered whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use safetensors::tensor::{Metadata, TensorInfo};

use super::output_file::{OutputFile, OutputIo};
use super::reader::{INDEX_NAME, SINGLE_NAME};
use crate::error::{Error, Result};

/// A tensor the writer will receive, in order.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n * self.dtype.bitsize()).div_ceil(8) as u64
    }
}

struct ShardPlan {
    file_name: String,
    /// Range of tensor indices in this shard.
    first: usize,
    end: usize,
}

/// Writes a planned list of tensors into `dir`, in order, chunk by chunk.
pub struct ShardWriter {
    dir: PathBuf,
    tensors: Vec<PlannedTensor>,
    shards: Vec<ShardPlan>,
    shard_of: Vec<usize>,
    /// Tensor currently being written and how many of its bytes have arrived.
    next: usize,
    written: u64,
    out: Option<(usize, OutputFile)>,
    bytes_written: u64,
    io: OutputIo,
    /// Write `model.safetensors.index.json` when there is more than one shard.
    write_index: bool,
}

/// The largest shard unless told otherwise (`--out-shard-size`), as Hugging Face's
/// `save_pretrained` and mergekit write them: a size every loader and file system takes.
pub const DEFAULT_SHARD_SIZE: &str = "5GB";

/// [`DEFAULT_SHARD_SIZE`] in bytes.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// What [`ShardWriter::finish`] produced.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

impl ShardWriter {
    /// Plans shards of at most `max_shard_bytes` of tensor data (a single larger tensor gets a
    /// shard of its own) and prepares to write into `dir`, which must exist.
    pub fn create(dir: &Path, tensors: Vec<PlannedTensor>, max_shard_bytes: u64) -> Result<Self> {
        check_unique(&tensors)?;
        check_space(dir, &tensors)?;
        let mut bounds = plan_shards(&tensors, max_shard_bytes);
        // An empty checkpoint still gets its one (empty) file.
        if bounds.is_empty() {
            bounds.push((0, 0));
        }
        let n = bounds.len();
        let names = (0..n).map(|si| shard_file_name(si, n)).collect();
        Ok(Self::with_plan(dir, tensors, bounds, names, true))
    }

    /// One rank's part of a checkpoint written by several: its tensors in shards planned as
    /// [`plan_shards`] does, named by `names` (one per shard, numbered across all ranks); no
    /// index, which the rank that assembles the parts writes.
    pub fn create_part(
        dir: &Path,
        tensors: Vec<PlannedTensor>,
        max_shard_bytes: u64,
        names: Vec<String>,
    ) -> Result<Self> {
        check_unique(&tensors)?;
        check_space(dir, &tensors)?;
        let bounds = plan_shards(&tensors, max_shard_bytes);
        if bounds.len() != names.len() {
            return Err(Error::Invalid(format!(
                "internal: {} shard names for {} planned shards",
                names.len(),
                bounds.len()
            )));
        }
        Ok(Self::with_plan(dir, tensors, bounds, names, false))
    }

    fn with_plan(
        dir: &Path,
        tensors: Vec<PlannedTensor>,
        bounds: Vec<(usize, usize)>,
        names: Vec<String>,
        write_index: bool,
    ) -> Self {
        let mut shard_of = vec![0; tensors.len()];
        let shards = bounds
            .into_iter()
            .zip(names)
            .enumerate()
            .map(|(si, ((first, end), file_name))| {
                shard_of[first..end].iter_mut().for_each(|s| *s = si);
                ShardPlan { file_name, first, end }
            })
            .collect();
        ShardWriter {
            dir: dir.to_path_buf(),
            tensors,
            shards,
            shard_of,
            next: 0,
            written: 0,
            out: None,
            bytes_written: 0,
            io: OutputIo::Auto,
            write_index,
        }
    }

    /// Writes through the page cache even where direct writes are possible (see
    /// [`OutputFile`]).
    pub fn buffered(mut self) -> Self {
        self.io = OutputIo::Buffered;
        self
    }

    /// Number of shard files the plan produces.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Appends `bytes` to tensor `name`, which must be the tensor currently due. A tensor is
    /// complete once all its bytes have arrived; the next call then starts the following one.
    /// Empty tensors need no call, but may get one (with no bytes), as a copy loop makes it.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.skip_empty(Some(name));
        let Some(t) = self.tensors.get(self.next) else {
            return Err(Error::Invalid(format!("internal: tensor `{name}` written after the last planned tensor")));
        };
        if t.name != name {
            return Err(Error::Invalid(format!("internal: tensor `{name}` written while `{}` was due", t.name)));
        }
        let total = t.nbytes();
        if self.written + bytes.len() as u64 > total {
            return Err(Error::Invalid(format!("internal: tensor `{name}` got more than its {total} bytes")));
        }
        let si = self.shard_of[self.next];
        if self.out.as_ref().map(|(s, _)| *s) != Some(si) {
            self.open_shard(si)?;
        }
        let (_, w) = self.out.as_mut().expect("shard opened above");
        w.write_all(bytes)?;
        self.written += bytes.len() as u64;
        self.bytes_written += bytes.len() as u64;
        if self.written == total {
            self.next += 1;
            self.written = 0;
        }
        Ok(())
    }

    fn open_shard(&mut self, si: usize) -> Result<()> {
        self.close_current()?;
        let plan = &self.shards[si];
        let header = header_json(&self.tensors[plan.first..plan.end])?;
        let path = self.dir.join(&plan.file_name);
        let mut w = OutputFile::create(&path, self.io)?;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        self.bytes_written += 8 + header.len() as u64;
        self.out = Some((si, w));
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((_, w)) = self.out.take() {
            w.finish()?;
        }
        Ok(())
    }

    /// Zero-byte tensors have nothing to write: they are complete as soon as they are due,
    /// except `named`, which is being written (a write of its zero bytes completes it).
    fn skip_empty(&mut self, named: Option<&str>) {
        while self.written == 0
            && self.tensors.get(self.next).is_some_and(|t| t.nbytes() == 0 && Some(t.name.as_str()) != named)
        {
            self.next += 1;
        }
    }

    /// Checks every planned byte arrived, closes and syncs the shards and writes the index.
    pub fn finish(mut self) -> Result<WrittenCheckpoint> {
        self.skip_empty(None);
        if self.next != self.tensors.len() {
            return Err(Error::Invalid(format!(
                "internal: output incomplete, tensor `{}` was never written in full",
                self.tensors[self.next].name
            )));
        }
        self.close_current()?;
        // A shard holding only empty tensors was never opened; it still needs its file.
        for si in 0..self.shards.len() {
            let path = self.dir.join(&self.shards[si].file_name);
            if !path.exists() {
                self.open_shard(si)?;
                self.close_current()?;
            }
        }
        let mut files: Vec<PathBuf> = self.shards.iter().map(|s| self.dir.join(&s.file_name)).collect();
        if self.write_index && self.shards.len() > 1 {
            let of: Vec<&str> = self.shard_of.iter().map(|&s| self.shards[s].file_name.as_str()).collect();
            files.push(write_index(&self.dir, &self.tensors, &of)?);
        }
        Ok(WrittenCheckpoint { files, bytes: self.bytes_written })
    }
}

/// Shard bounds `(first, end)` over `tensors` in order: at most `max_shard_bytes` of data each,
/// except that a single larger tensor gets a shard of its own. No tensors, no shards.
pub fn plan_shards(tensors: &[PlannedTensor], max_shard_bytes: u64) -> Vec<(usize, usize)> {
    let mut bounds: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = t.nbytes();
        if i > start && size + b > max_shard_bytes {
            bounds.push((start, i));
            start = i;
            size = 0;
        }
        size += b;
    }
    if !tensors.is_empty() {
        bounds.push((start, tensors.len()));
    }
    bounds
}

/// A safetensors file holds each name once (the header is a map): a second tensor of a name
/// is an error naming it, before any file is opened.
fn check_unique(tensors: &[PlannedTensor]) -> Result<()> {
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    match tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
        Some(t) => Err(Error::Invalid(format!("two output tensors are named `{}`", t.name))),
        None => Ok(()),
    }
}

/// Refuses a plan whose tensor data the file system holding `dir` has no room for, before
/// anything is written: a merge that would fill the disk an hour in fails at once instead.
fn check_space(dir: &Path, tensors: &[PlannedTensor]) -> Result<()> {
    let need: u64 = tensors.iter().map(PlannedTensor::nbytes).sum();
    match crate::sysinfo::free_disk_bytes(dir) {
        // The folder the output goes into: `dir` is usually a staging directory inside it.
        Some(free) if need > free => {
            Err(Error::NoSpace { path: crate::atomic::public_path(dir.parent().unwrap_or(dir)), need, free })
        }
        _ => Ok(()),
    }
}

/// The Hugging Face name of shard `si` of `n`: `model.safetensors` alone, else
/// `model-00001-of-00005.safetensors`.
pub fn shard_file_name(si: usize, n: usize) -> String {
    if n == 1 { SINGLE_NAME.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", si + 1, n) }
}

/// Writes `dir/model.safetensors.index.json` mapping each of `tensors` to its file in `files`
/// (aligned); returns its path.
pub fn write_index(dir: &Path, tensors: &[PlannedTensor], files: &[&str]) -> Result<PathBuf> {
    let total: u64 = tensors.iter().map(PlannedTensor::nbytes).sum();
    let weight_map: serde_json::Map<String, serde_json::Value> =
        tensors.iter().zip(files).map(|(t, &f)| (t.name.clone(), f.into())).collect();
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let path = dir.join(INDEX_NAME);
    let text = serde_json::to_string_pretty(&index).expect("JSON of strings and numbers");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// A [`ShardWriter`] on its own thread: the merge hands it finished spans and goes on computing
/// the next ones while the kernel copies (and throttles) the writes. Buffers come back through
/// [`Self::buffer`] for reuse, so the steady state allocates nothing.
pub struct BackgroundWriter {
    tx: Option<Sender<(String, Vec<u8>, bool)>>,
    free: Receiver<Vec<u8>>,
    /// Buffers sent to the thread, and received back from it.
    sent: usize,
    recovered: usize,
    handle: Option<JoinHandle<Result<ShardWriter>>>,
}

impl BackgroundWriter {
    /// Starts the thread; at most `depth` spans wait to be written.
    pub fn spawn(mut writer: ShardWriter, depth: usize) -> Self {
        // Every recycled buffer comes back: at most `depth` queued and one being written are
        // out, so the channel back never drops one.
        let (tx, rx) = bounded::<(String, Vec<u8>, bool)>(depth);
        let (free_tx, free) = bounded::<Vec<u8>>(depth + 1);
        let handle = std::thread::spawn(move || {
            for (name, buf, recycle) in rx {
                writer.write(&name, &buf)?;
                if recycle {
                    let _ = free_tx.try_send(buf);
                }
            }
            Ok(writer)
        });
        BackgroundWriter { tx: Some(tx), free, sent: 0, recovered: 0, handle: Some(handle) }
    }

    /// A buffer recycled from an earlier write: one that is back; else, while a write waits in
    /// the queue behind the one being written (so the thread stays busy), the next one the
    /// thread finishes with; else a new, empty one. The steady state so allocates, and faults
    /// in, no fresh memory. It still holds that write's bytes: the caller sizes it and
    /// overwrites every byte, so that `resize` to the usual span length zero-fills nothing.
    pub fn buffer(&mut self) -> Vec<u8> {
        let back = match self.free.try_recv() {
            Ok(b) => Some(b),
            // A stopped thread sends nothing back (`recv` fails); the next `write` says why.
            Err(_) if self.sent - self.recovered >= 2 => self.free.recv().ok(),
            Err(_) => None,
        };
        match back {
            Some(b) => {
                self.recovered += 1;
                b
            }
            None => Vec::new(),
        }
    }

    /// Queues `bytes` for tensor `name` (see [`ShardWriter::write`]); the buffer comes back
    /// through [`Self::buffer`]. A failed write on the thread is reported here, at the next call.
    pub fn write(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.send(name, bytes, true)?;
        self.sent += 1;
        Ok(())
    }

    /// Queues a copy of `bytes` (a tensor copied as stored), whose buffer is not recycled.
    pub fn write_copy(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.send(name, bytes.to_vec(), false)
    }

    fn send(&mut self, name: &str, bytes: Vec<u8>, recycle: bool) -> Result<()> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send((name.to_string(), bytes, recycle)).is_ok());
        if sent { Ok(()) } else { Err(self.join().err().unwrap_or_else(closed)) }
    }

    /// Waits for every queued write and hands the writer back (to [`ShardWriter::finish`]).
    pub fn finish(mut self) -> Result<ShardWriter> {
        self.join()
    }

    fn join(&mut self) -> Result<ShardWriter> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| Error::Invalid("the output writer thread panicked".into()))?,
            None => Err(closed()),
        }
    }
}

impl Drop for BackgroundWriter {
    /// On an error path the thread is still joined, so nothing writes into the staging
    /// directory while it is being removed.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

fn closed() -> Error {
    Error::Invalid("internal: the output writer was already closed".into())
}

/// The safetensors header for a shard, as the `safetensors` crate's [`Metadata`] serializes it
/// (`__metadata__` first, then the tensors in file order), padded with spaces to a multiple of
/// 8 bytes as the crate pads it, so the data that follows is aligned. `Metadata::new` also checks
/// that every tensor's offsets span its dtype and shape.
fn header_json(tensors: &[PlannedTensor]) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    for t in tensors {
        let end = offset + t.nbytes() as usize;
        infos
            .push((t.name.clone(), TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, end) }));
        offset = end;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let internal = |e: &dyn std::fmt::Display| Error::Invalid(format!("internal: planning a safetensors header: {e}"));
    let metadata = Metadata::new(Some(format), infos).map_err(|e| internal(&e))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| internal(&e))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    fn planned(name: &str, dtype: Dtype, shape: &[usize]) -> PlannedTensor {
        PlannedTensor { name: name.into(), dtype, shape: shape.to_vec() }
    }

    /// The header the hand-written formatter produced before the crate's types built it: the
    /// bytes must stay the same, so outputs stay byte-identical to earlier releases'.
    #[test]
    fn header_is_the_one_written_by_hand_before() {
        let tensors = [
            planned("b.weight", Dtype::BF16, &[3, 2]),
            planned("a \"quoted\" é", Dtype::F32, &[2]),
            planned("empty", Dtype::F16, &[0, 4]),
            planned("scalar", Dtype::I64, &[]),
        ];
        let header = header_json(&tensors).unwrap();
        let want = concat!(
            r#"{"__metadata__":{"format":"pt"},"b.weight":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,12]},"#,
            r#""a \"quoted\" é":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},"#,
            r#""empty":{"dtype":"F16","shape":[0,4],"data_offsets":[20,20]},"#,
            r#""scalar":{"dtype":"I64","shape":[],"data_offsets":[20,28]}}"#
        );
        let text = String::from_utf8(header.clone()).unwrap();
        assert_eq!(text.trim_end_matches(' '), want);
        assert!(header.len().is_multiple_of(8) && header.len() - want.len() < 8, "padded to 8: {}", header.len());
        // The crate reads it back, in file order.
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(&header);
        file.resize(file.len() + 28, 0);
        let (_, metadata) = SafeTensors::read_metadata(&file).unwrap();
        assert_eq!(metadata.offset_keys(), ["b.weight", "a \"quoted\" é", "empty", "scalar"]);
        assert_eq!(SafeTensors::deserialize(&file).unwrap().tensor("scalar").unwrap().data().len(), 8);
    }

    /// A tensor whose bits do not fill whole bytes has no valid layout: an error, not a file.
    #[test]
    fn a_tensor_of_partial_bytes_is_refused() {
        let e = header_json(&[planned("w", Dtype::F4, &[3])]).unwrap_err().to_string();
        assert!(e.contains("safetensors header"), "{e}");
    }

    /// The background writer's buffer recycling never waits for a buffer that will not come
    /// back: the caller drops the last buffer of every tensor and mixes in copies that are not
    /// recycled, as the CPU engine does; the file holds every byte, through either route.
    #[test]
    fn background_writes_recycle_buffers_without_waiting_forever() {
        let tensors: Vec<PlannedTensor> =
            (0..40).map(|i| planned(&format!("t{i}"), Dtype::U8, &[1000 + 3 * i, 7])).collect();
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (0..t.nbytes() as usize).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        for buffered in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (planned, payload) = (tensors.clone(), data.clone());
            let path = dir.path().to_path_buf();
            let (done_tx, done) = crossbeam_channel::bounded(1);
            std::thread::spawn(move || {
                let writer = ShardWriter::create(&path, planned.clone(), u64::MAX).unwrap();
                let mut w = BackgroundWriter::spawn(if buffered { writer.buffered() } else { writer }, 2);
                for (t, bytes) in planned.iter().zip(&payload) {
                    if t.name.ends_with('3') {
                        w.write_copy(&t.name, bytes).unwrap();
                        continue;
                    }
                    let mut buf = w.buffer();
                    for span in bytes.chunks(2000) {
                        buf.clear();
                        buf.extend_from_slice(span);
                        w.write(&t.name, buf).unwrap();
                        buf = w.buffer();
                    }
                    drop(buf);
                }
                let _ = done_tx.send(w.finish().and_then(ShardWriter::finish).map(|_| ()));
            });
            let result = done.recv_timeout(std::time::Duration::from_secs(60)).expect("the writer waits forever");
            result.unwrap();
            let file = std::fs::read(dir.path().join(SINGLE_NAME)).unwrap();
            let st = SafeTensors::deserialize(&file).unwrap();
            for (t, bytes) in tensors.iter().zip(&data) {
                assert_eq!(st.tensor(&t.name).unwrap().data(), bytes.as_slice(), "{} (buffered {buffered})", t.name);
            }
        }
    }
}
