//! Content fingerprints that tie a label cache to what produced it: the expert's weights, its
//! tokenizer and the exact inputs. A cache whose fingerprints differ from the run asking for it
//! would silently train against the wrong targets, so they are checked on every open.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// BLAKE3 of every tensor (name, dtype, shape, bytes) in name order, then of `config.json`'s
/// values: the same model gives the same hash whatever the sharding, file order or the
/// config's formatting. Large tensors are hashed on all cores, and
/// each tensor's pages are dropped from the process once hashed, so fingerprinting a checkpoint
/// larger than memory keeps the resident set at about one tensor.
pub fn checkpoint_hash(ckpt: &Checkpoint) -> String {
    digest(ckpt, blake3::Hasher::new(), |h, bytes| {
        h.update_rayon(bytes);
    })
}

/// Bytes of each window [`checkpoint_sketch`] reads.
const SKETCH_WINDOW: usize = 4096;

/// [`checkpoint_hash`] over a sample of each tensor's bytes (its first, middle and last 4 KiB,
/// all of a smaller one) instead of all of them: reads a few pages per tensor, so it costs
/// milliseconds on a multi-GB model. Fine-tuning changes nearly every value of a tensor, so
/// experts of one base differ here; it tells models apart, it does not prove them unchanged.
pub fn checkpoint_sketch(ckpt: &Checkpoint) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"symerge checkpoint sketch v1");
    digest(ckpt, h, |h, bytes| {
        for w in sketch_windows(bytes.len()) {
            h.update(&bytes[w]);
        }
    })
}

/// The byte ranges [`checkpoint_sketch`] reads of a tensor of `len` bytes (all of them, then
/// two empty ranges, for a small one).
fn sketch_windows(len: usize) -> [std::ops::Range<usize>; 3] {
    if len <= 3 * SKETCH_WINDOW {
        return [0..len, len..len, len..len];
    }
    let mid = len / 2 - SKETCH_WINDOW / 2;
    [0..SKETCH_WINDOW, mid..mid + SKETCH_WINDOW, len - SKETCH_WINDOW..len]
}

/// Feeds every tensor's name, dtype and shape and `take`'s choice of its bytes to `h` in name
/// order, then `config.json`'s values.
fn digest(ckpt: &Checkpoint, mut h: blake3::Hasher, take: impl Fn(&mut blake3::Hasher, &[u8])) -> String {
    let mut tensors: Vec<_> = ckpt.tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    for t in tensors {
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        take(&mut h, ckpt.bytes(t));
        ckpt.release(t);
    }
    // The config changes what the weights compute (activation, norm epsilon, label names).
    if let Some(config) = &ckpt.config {
        h.update(b"config.json");
        h.update(config.to_string().as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// [`checkpoint_hash`] of the model at `path` (a directory or file [`Checkpoint::open`] takes).
pub fn model_hash(path: &Path) -> Result<String> {
    Ok(checkpoint_hash(&Checkpoint::open(path)?))
}

/// [`checkpoint_sketch`] of the model at `path`.
pub fn model_sketch(path: &Path) -> Result<String> {
    Ok(checkpoint_sketch(&Checkpoint::open(path)?))
}

/// BLAKE3 of the texts in order, each prefixed by its length so boundaries count.
pub fn texts_hash<S: AsRef<str>>(texts: &[S]) -> String {
    let mut h = blake3::Hasher::new();
    for t in texts {
        let t = t.as_ref().as_bytes();
        h.update(&(t.len() as u64).to_le_bytes());
        h.update(t);
    }
    h.finalize().to_hex().to_string()
}

/// BLAKE3 of a file's bytes plus the settings that change what it produces (e.g. the tokenizer
/// file and the maximum sequence length).
pub fn file_hash(path: &Path, settings: &str) -> Result<String> {
    let bytes = crate::input_file::read(path)?;
    let mut h = blake3::Hasher::new();
    h.update(&bytes);
    h.update(settings.as_bytes());
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// `values` as the one f32 tensor `w` of a checkpoint file in `dir`: (sketch, hash).
    fn fingerprints(dir: &Path, values: &[f32]) -> (String, String) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![values.len()], &bytes).unwrap();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        (checkpoint_sketch(&ckpt), checkpoint_hash(&ckpt))
    }

    /// The sketch reads a tensor's first, middle and last 4 KiB only: a change there shows, one
    /// elsewhere does not (the full hash sees both). It is never the full hash.
    #[test]
    fn the_sketch_sees_its_windows_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let n = 16 * 1024;
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (s0, h0) = fingerprints(dir.path(), &values);
        assert_ne!(s0, h0);
        for (i, seen) in [(0, true), (n / 2, true), (n - 1, true), (n / 4, false)] {
            let mut v = values.clone();
            v[i] += 1.0;
            let (s, h) = fingerprints(dir.path(), &v);
            assert_ne!(h, h0, "element {i}");
            assert_eq!(s != s0, seen, "element {i}");
        }
        assert_eq!(fingerprints(dir.path(), &values[..10]).0, fingerprints(dir.path(), &values[..10]).0);
    }
}
