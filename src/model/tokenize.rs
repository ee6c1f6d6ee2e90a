//! Text to model inputs with a checkpoint's own `tokenizer.json`.
//!
//! Hugging Face tokenizer files often pin padding to a fixed length (MiniLM's pads everything to
//! 128). That wastes compute and, worse, makes results depend on a setting the user never sees, so
//! the file's padding is switched off: each batch is padded to its own longest sequence and the
//! attention mask hides the padding.

use std::path::{Path, PathBuf};

use tokenizers::{PostProcessor, Tokenizer, TruncationDirection, TruncationParams};

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

impl From<&tokenizers::Encoding> for Tokens {
    fn from(e: &tokenizers::Encoding) -> Self {
        Tokens { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() }
    }
}

/// A `tokenizer.json` with padding off and truncation at `max_len`.
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_len: usize,
    path: PathBuf,
    /// Long texts keep their last tokens (transformers' `truncation_side: left`).
    keep_end: bool,
}

/// `truncation_side` of the `tokenizer_config.json` beside `tokenizer`, as transformers reads
/// it: `left` keeps a long text's last tokens; absent or `right`, its first.
pub fn truncation_side(tokenizer: &Path) -> Result<TruncationDirection> {
    let config = tokenizer.with_file_name("tokenizer_config.json");
    if config.symlink_metadata().is_err() {
        return Ok(TruncationDirection::Right);
    }
    let bad = |reason: String| Error::Tokenizer { path: config.clone(), reason };
    let text = crate::input_file::read_to_string(&config)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match v.get("truncation_side") {
        None | Some(serde_json::Value::Null) => Ok(TruncationDirection::Right),
        Some(serde_json::Value::String(s)) if s == "right" => Ok(TruncationDirection::Right),
        Some(serde_json::Value::String(s)) if s == "left" => Ok(TruncationDirection::Left),
        Some(other) => Err(bad(format!("field `truncation_side`: {other} is neither \"left\" nor \"right\""))),
    }
}

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`), truncating to `max_len` tokens, keeping the first.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        Self::from_file_cut(path, max_len, TruncationDirection::Right)
    }

    /// [`Self::from_file`], cutting long texts on `side`.
    pub fn from_file_cut(path: &Path, max_len: usize, side: TruncationDirection) -> Result<Self> {
        let bad = |reason: String| Error::Tokenizer { path: path.to_path_buf(), reason };
        // Room for the template's special tokens is checked once the tokenizer is read.
        if max_len == 0 {
            return Err(bad("a maximum length of 0 tokens leaves no room for any text".into()));
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
        let added = added_tokens(&inner);
        if added >= max_len {
            // Truncation cannot cut the template's own tokens: every sequence would run past
            // `max_len`, and the model's position limit would be blamed on the user's setting.
            return Err(bad(format!(
                "its post_processor template adds {added} special tokens to every text, which leaves no room \
                 for text within the maximum length of {max_len} tokens"
            )));
        }
        let keep_end = matches!(side, TruncationDirection::Left);
        inner
            .with_truncation(Some(TruncationParams { max_length: max_len, direction: side, ..Default::default() }))
            .map_err(|e| bad(format!("cannot truncate to {max_len} tokens: {e}")))?;
        Ok(TextTokenizer { inner, pad_id, max_len, path: path.to_path_buf(), keep_end })
    }

    /// Refuses a tokenizer whose template does not fit the encoder described by `config` (its
    /// `config.json`): more special tokens than `positions`, or a token type id at or past
    /// `type_vocab_size`. Checked once at load, so the error names both files instead of
    /// coming from the first batch, which knows neither.
    pub fn check_fits(&self, config: &Path, positions: usize, type_vocab_size: usize) -> Result<()> {
        let bad = |reason: String| Err(Error::Tokenizer { path: self.path.clone(), reason });
        let added = added_tokens(&self.inner);
        if added >= positions {
            return bad(format!(
                "its post_processor template adds {added} special tokens to every text, more than the {positions} \
                 positions of the model ({} max_position_embeddings)",
                config.display()
            ));
        }
        let probe = self.inner.encode("a", true).map_err(|e| self.error(e))?;
        if let Some(&t) = probe.get_type_ids().iter().find(|&&t| t as usize >= type_vocab_size) {
            return bad(format!(
                "its post_processor gives token type {t}, but the model has {type_vocab_size} token types ({} \
                 type_vocab_size)",
                config.display()
            ));
        }
        Ok(())
    }

    /// Loads `dir/tokenizer.json`, cutting long texts on the side `dir/tokenizer_config.json`
    /// names (fuzzing round 8: `left` was ignored, and losses differed from transformers').
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        // Only a missing file is "not found"; a directory or a dangling link there says so.
        if path.symlink_metadata().is_err() {
            return Err(Error::Tokenizer {
                path,
                reason: "not found (the model directory needs a Hugging Face tokenizer.json)".into(),
            });
        }
        Self::from_file_cut(&path, max_len, truncation_side(&path)?)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes `texts` (with special tokens), one unpadded sequence each. A text longer than
    /// [`Self::prefix_bytes`] is tokenized from a prefix ([`Self::tokenize_long`]).
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Tokens>> {
        let limit = self.prefix_bytes();
        let short: Vec<&str> = texts.iter().map(AsRef::as_ref).filter(|t| t.len() <= limit).collect();
        let batch = self.inner.encode_batch(short, true).map_err(|e| self.error(e))?;
        let mut encoded = batch.iter().map(Tokens::from);
        let mut out = Vec::with_capacity(texts.len());
        for text in texts.iter().map(AsRef::as_ref) {
            let tokens = if text.len() <= limit { encoded.next() } else { Some(self.tokenize_long(text, limit)?) };
            out.extend(tokens);
        }
        Ok(out)
    }

    /// Bytes of a text tokenized whole: generous for `max_len` tokens of any real text.
    fn prefix_bytes(&self) -> usize {
        self.max_len.saturating_mul(32).max(4096)
    }

    /// Tokenizes a long text from growing prefixes that end where a word does (a character
    /// before a space), until the prefix's tokens fill the truncation: the pre-tokenizers of
    /// Hugging Face tokenizers (whitespace, byte-level and metaspace splits) all break a text
    /// there, so the truncated tokens are the whole text's, while tokenizing a 10 MB line whole
    /// would cost ~85-150x its size in memory. A text with no such break is tokenized whole.
    /// A full encoding is the test, not overflowing tokens: tokenizers 0.23 stops tokenizing
    /// once the limit is reached, so a text of one-token words reports no overflow.
    fn tokenize_long(&self, text: &str, mut len: usize) -> Result<Tokens> {
        while len < text.len() {
            // Keeping the last tokens, the piece is a suffix that starts where a word does.
            let piece = if self.keep_end {
                word_start_after(text, text.len() - len).map(|cut| &text[cut..])
            } else {
                word_end_before(text, len).map(|cut| &text[..cut])
            };
            if let Some(piece) = piece {
                let enc = self.inner.encode(piece, true).map_err(|e| self.error(e))?;
                if enc.len() >= self.max_len {
                    return Ok(Tokens::from(&enc));
                }
            }
            len = len.saturating_mul(2);
        }
        Ok(Tokens::from(&self.inner.encode(text, true).map_err(|e| self.error(e))?))
    }

    fn error(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer { path: self.path.clone(), reason: e.to_string() }
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

/// Special tokens the post-processor (e.g. a `TemplateProcessing`) adds to a single text.
fn added_tokens(t: &Tokenizer) -> usize {
    t.get_post_processor().map_or(0, |p| p.added_tokens(false))
}

/// The first position at or after `from`, and within half the rest of the text, of a space that
/// follows a character that is not whitespace: the suffix from there tokenizes as the end of the
/// whole text does (the space starts the next word for every pre-tokenizer).
fn word_start_after(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let stop = from + (bytes.len() - from) / 2;
    (from.max(1)..stop).find(|&at| {
        bytes[at] == b' '
            && text.is_char_boundary(at)
            && text[..at].chars().next_back().is_some_and(|c| !c.is_whitespace())
    })
}

/// The last position at or before `len`, and after `len / 2`, where a space follows a character
/// that is not whitespace: a word ends there for every pre-tokenizer.
fn word_end_before(text: &str, len: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut at = len.min(bytes.len().saturating_sub(1));
    while at > len / 2 {
        if bytes[at] == b' ' && text.is_char_boundary(at) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| !c.is_whitespace()) {
                return Some(at);
            }
        }
        at -= 1;
    }
    None
}
