//! JSON Lines files of labelled texts: written by `data prepare`, read by every command that
//! consumes a data set.
//!
//! The reader is lenient about what else a line holds (any object with a `text` string; extra
//! fields ignored; `label` as a class name or an integer id) so hand-made and third-party files
//! work, and strict about the rest: every error names the file and line.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// One labelled (or unlabelled) text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    /// The class name, when the line gives one.
    pub label: Option<String>,
    /// The class id: `label_id`, or `label` when that is an integer.
    pub label_id: Option<usize>,
}

/// One output line of `data prepare`.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub text: &'a str,
    pub label: &'a str,
    pub label_id: usize,
}

/// Reads a JSONL file; blank lines and a leading byte order mark are skipped, and a file without
/// any record is an error naming it (every caller needs at least one).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    Ok(read_jsonl_hashed(path)?.0)
}

/// [`read_jsonl`] and the BLAKE3 of the bytes it parsed: what `adapt` records of its inputs
/// and `eval` of an adapt output checks, so both name the same file state.
pub fn read_jsonl_hashed(path: &Path) -> Result<(Vec<Example>, String)> {
    read_examples(path, true)
}

/// The `text` of every record, for commands that read no label (predict, a causal LM's eval):
/// a label field there is ignored, not checked (fuzzing round 8: `"label": 3.5` refused a file
/// whose labels nothing reads).
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    Ok(read_examples(path, false)?.0.into_iter().map(|e| e.text).collect())
}

/// [`read_jsonl_hashed`], reading the label fields when `labels`.
fn read_examples(path: &Path, labels: bool) -> Result<(Vec<Example>, String)> {
    let content = crate::input_file::read_to_string(path)?;
    let hash = blake3::hash(content.as_bytes()).to_hex().to_string();
    let mut out = Vec::new();
    for (i, line) in crate::input_file::strip_bom(&content).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example = parse_line(line, labels).map_err(|reason| Error::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        })?;
        out.push(example);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("{}: no records (the file is empty or blank)", path.display())));
    }
    Ok((out, hash))
}

/// The fields a line is read for. Other fields are skipped without decoding their strings, so
/// one no command reads may hold anything JSON allows (fuzzing round 5: a lone surrogate in a
/// `meta` field refused the file).
#[derive(serde::Deserialize)]
struct Fields {
    #[serde(default, deserialize_with = "present")]
    text: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    label: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    label_id: Option<Value>,
}

/// A field that is there, `null` included (`None` is reserved for absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    <Value as serde::Deserialize>::deserialize(d).map(Some)
}

/// Parses one line; the error is the reason, without file or line.
fn parse_line(line: &str, labels: bool) -> Result<Example, String> {
    // Checked first: serde also reads a struct from an array (`["text"]`).
    if !line.trim_start().starts_with('{') {
        return Err("expected a JSON object with a `text` field".to_string());
    }
    let fields: Fields = serde_json::from_str(line).map_err(|e| {
        match lone_surrogate(line).filter(|_| e.to_string().contains("hex escape")) {
            Some((col, code)) => format!(
                "column {col}: `\\u{code:04x}` is a lone UTF-16 surrogate, so the text is not valid Unicode \
                 (Python's json.dumps writes such escapes for strings holding unpaired surrogates); \
                 remove it or replace it, e.g. with \\ufffd"
            ),
            None if e.is_data() => e.to_string(),
            None => format!("not valid JSON: {e}"),
        }
    })?;
    let text = match fields.text {
        Some(Value::String(s)) => s,
        Some(other) => return Err(format!("`text` must be a string, found {other}")),
        None => return Err("missing the `text` field".into()),
    };
    if !labels {
        return Ok(Example { text, label: None, label_id: None });
    }
    let as_id = |field: &str, v: &Value| {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("`{field}` must be a class name or a non-negative integer, found {v}"))
    };
    let mut label_id = match &fields.label_id {
        None | Some(Value::Null) => None,
        Some(v) => Some(as_id("label_id", v)?),
    };
    let label = match &fields.label {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            let id = as_id("label", v)?;
            if label_id.is_some_and(|l| l != id) {
                return Err(format!("`label` {id} and `label_id` {} disagree", label_id.unwrap_or_default()));
            }
            label_id = Some(id);
            None
        }
    };
    Ok(Example { text, label, label_id })
}

/// The first `\uXXXX` escape of `line` that is a UTF-16 surrogate without its pair: its
/// column (1-based, in bytes, as serde_json counts) and code. serde_json refuses such a string
/// with a message about hex escapes that does not say what is wrong.
fn lone_surrogate(line: &str) -> Option<(usize, u32)> {
    let b = line.as_bytes();
    let escape = |i: usize| -> Option<u32> {
        let hex = b.get(i + 2..i + 6)?;
        (b[i] == b'\\' && b[i + 1] == b'u').then_some(())?;
        u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        match escape(i) {
            Some(0xd800..=0xdbff) if matches!(escape(i + 6), Some(0xdc00..=0xdfff)) => i += 12,
            Some(code @ 0xd800..=0xdfff) => return Some((i + 1, code)),
            Some(_) => i += 6,
            None => i += 2, // any other escape, `\\` (a backslash) included
        }
    }
    None
}

/// Serialises records as JSON Lines.
pub fn to_jsonl<'a>(records: impl IntoIterator<Item = Record<'a>>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, &r).map_err(|e| Error::Invalid(format!("serialising a record: {e}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing round 8: commands that read no label (predict, a causal LM's eval) do not check
    /// one; commands that do still refuse a label that is neither a name nor an index.
    #[test]
    fn labels_are_checked_only_where_read() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("l.jsonl");
        std::fs::write(&path, "{\"text\": \"a\", \"label\": 3.5}\n{\"text\": \"b\", \"label_id\": -1}\n").unwrap();
        assert_eq!(read_texts(&path).unwrap(), ["a", "b"]);
        let e = read_jsonl(&path).unwrap_err().to_string();
        assert!(e.contains("l.jsonl: line 1") && e.contains("found 3.5"), "{e}");
    }

    /// Fuzzing round 4: Python's json.dumps writes a lone surrogate as `\ud800`, which serde_json
    /// refused as "unexpected end of hex escape"; the error now says what it is, by file and line.
    #[test]
    fn a_lone_surrogate_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.jsonl");
        std::fs::write(&path, "{\"text\": \"ok \\ud83d\\ude00\"}\n{\"text\": \"ab\\ud800\"}\n").unwrap();
        let e = read_jsonl(&path).unwrap_err().to_string();
        assert!(e.contains("s.jsonl: line 2: column 13: `\\ud800` is a lone UTF-16 surrogate"), "{e}");
        assert!(e.contains("not valid Unicode"), "{e}");
        // A pair is one character; an escaped backslash before `u` is no escape; a low half alone is lone.
        assert_eq!(parse_line(r#"{"text": "\ud83d\ude00"}"#, true).unwrap().text, "\u{1f600}");
        assert_eq!(parse_line(r#"{"text": "\\ud800"}"#, true).unwrap().text, "\\ud800");
        assert_eq!(lone_surrogate(r#"{"text": "\ude00\ud800"}"#), Some((11, 0xde00)));
        // In a field no command reads, it is skipped with the field.
        let other = parse_line(r#"{"text": "ok", "meta": "\ud800", "label": "a"}"#, true).unwrap();
        assert_eq!((other.text.as_str(), other.label.as_deref()), ("ok", Some("a")));
        assert_eq!(lone_surrogate(r#"{"text": "\ud800\u0041"}"#), Some((11, 0xd800)));
        assert_eq!(lone_surrogate(r#"{"text": "\u00e9\\ud800"}"#), None);
        let e = parse_line(r#"{"text": "a\u00"}"#, true).unwrap_err();
        assert!(e.starts_with("not valid JSON"), "{e}");
    }

    /// Fuzzing round 3: a byte order mark made line 1 "not valid JSON".
    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bom.jsonl");
        std::fs::write(&path, "\u{feff}{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        let texts: Vec<String> = read_jsonl(&path).unwrap().into_iter().map(|e| e.text).collect();
        assert_eq!(texts, ["a", "b"]);
    }

    #[test]
    fn labels_as_names_or_ids() {
        let e = parse_line(r#"{"text": "a", "label": "x", "label_id": 3, "extra": [1]}"#, true).unwrap();
        assert_eq!(e, Example { text: "a".into(), label: Some("x".into()), label_id: Some(3) });
        let e = parse_line(r#"{"text": "b", "label": 2}"#, true).unwrap();
        assert_eq!(e, Example { text: "b".into(), label: None, label_id: Some(2) });
        let e = parse_line(r#"{"text": "c"}"#, true).unwrap();
        assert_eq!(e, Example { text: "c".into(), label: None, label_id: None });
        assert!(parse_line(r#"{"text": "d", "label": -1}"#, true).is_err());
        assert!(parse_line(r#"{"text": "d", "label": 1, "label_id": 2}"#, true).is_err());
        assert!(parse_line(r#"{"text": 5}"#, true).is_err());
        assert!(parse_line(r#"["text"]"#, true).is_err());
    }
}
