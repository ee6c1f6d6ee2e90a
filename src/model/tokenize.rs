//! Text to model inputs with a checkpoint's own `tokenizer.json`.
//!
//! Hugging Face tokenizer files often pin padding to a fixed length (MiniLM's pads everything to
//! 128). That wastes compute and, worse, makes results depend on a setting the user never sees, so
//! the file's padding is switched off: each batch is padded to its own longest sequence and the
//! attention mask hides the padding.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// Default truncation length, in tokens including `[CLS]`/`[SEP]`.
pub const DEFAULT_MAX_LEN: usize = 128;

/// A batch of tokenized texts, padded to the longest, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
}

impl Encoded {
    /// Number of real tokens in each sequence.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask.chunks(self.seq.max(1)).map(|r| r.iter().filter(|&&m| m != 0).count()).collect()
    }
}

/// One tokenized text, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A `tokenizer.json` with padding off and truncation at `max_len`.
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_len: usize,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`), truncating to `max_len` tokens.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let bad = |reason: String| Error::Tokenizer { path: path.to_path_buf(), reason };
        if max_len < 2 {
            return Err(bad(format!("maximum length {max_len} leaves no room for the special tokens")));
        }
        crate::input_file::check_regular(path)?;
        let mut inner = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| bad(format!("cannot truncate to {max_len} tokens: {e}")))?;
        Ok(TextTokenizer { inner, pad_id, max_len, path: path.to_path_buf() })
    }

    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        // Only a missing file is "not found"; a directory or a dangling link there says so.
        if path.symlink_metadata().is_err() {
            return Err(Error::Tokenizer {
                path,
                reason: "not found (the model directory needs a Hugging Face tokenizer.json)".into(),
            });
        }
        Self::from_file(&path, max_len)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes `texts` (with special tokens), one unpadded sequence each.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Tokens>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encs = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        Ok(encs
            .into_iter()
            .map(|e| Tokens { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() })
            .collect())
    }

    /// Pads sequences to the longest of them.
    pub fn pad(&self, seqs: &[&Tokens]) -> Encoded {
        let seq = seqs.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let n = seqs.len() * seq;
        let mut out = Encoded {
            batch: seqs.len(),
            seq,
            input_ids: vec![self.pad_id; n],
            token_type_ids: vec![0; n],
            attention_mask: vec![0; n],
        };
        for (b, t) in seqs.iter().enumerate() {
            let (row, len) = (b * seq, t.ids.len());
            out.input_ids[row..row + len].copy_from_slice(&t.ids);
            out.token_type_ids[row..row + len].copy_from_slice(&t.type_ids);
            out.attention_mask[row..row + len].fill(1);
        }
        out
    }

    /// Tokenizes `texts` and pads them to the longest.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Encoded> {
        let toks = self.tokenize(texts)?;
        Ok(self.pad(&toks.iter().collect::<Vec<_>>()))
    }
}
