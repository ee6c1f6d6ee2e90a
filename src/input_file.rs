//! Reading the user's input files. Every one must be a regular file: opening a FIFO blocks until
//! some writer appears (a hang, not an error), and a device or a directory is no checkpoint,
//! cache, config or data file. The check comes before the open; symbolic links are followed.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Fails, naming the path and what it is, unless `path` is (a link to) a regular file.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(());
    }
    let kind = describe(&meta.file_type());
    Err(Error::NotAFile { path: path.to_path_buf(), kind })
}

fn describe(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() { "a directory" } else { "not a regular file" }
}

/// `path` without its `.` components (`gen/./base` is `gen/base`; a leading `./` alone is
/// kept), for the paths the crate joins and then shows in logs, errors and model cards. Purely
/// lexical: `..` stays, since `a/b/..` is not `a` when `b` is a symbolic link, and nothing is
/// resolved on disk (the path may not exist yet).
pub fn clean(path: &Path) -> std::path::PathBuf {
    let cleaned: std::path::PathBuf = path.components().collect();
    if cleaned.as_os_str().is_empty() { path.to_path_buf() } else { cleaned }
}

/// Whether `a` and `b` name the same file or directory: compared resolved where both exist
/// (another spelling or a link is the same model), as written otherwise.
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Who named an input path, so that an error about it can say which of a command's paths is
/// wrong: an operand or flag (`MODEL`, `--inputs`), or a key of a config file.
#[derive(Debug, Clone, Copy)]
pub enum NamedBy<'a> {
    Arg(&'a str),
    Config { file: &'a Path, key: &'a str },
}

impl NamedBy<'_> {
    /// `error` prefixed with the argument or the config file and key.
    pub fn wrap(self, error: Error) -> Error {
        match self {
            NamedBy::Arg(what) => Error::Input { what: what.to_string(), error: Box::new(error) },
            NamedBy::Config { file, key } => {
                Error::Config { path: file.to_path_buf(), reason: format!("{key}: {error}") }
            }
        }
    }
}

/// Fails unless `path` exists (a missing one, a broken link or an unreadable folder on the way),
/// the error naming what gave the path: commands check their input paths with it before loading
/// anything, so "No such file or directory" never comes without saying which input it is.
pub fn require(path: &Path, by: NamedBy) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(by.wrap(Error::io(path, e))),
    }
}

/// Opens a regular file for reading.
pub fn open(path: &Path) -> Result<File> {
    check_regular(path)?;
    File::open(path).map_err(|e| Error::io(path, e))
}

/// A regular file's bytes.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// A regular file's text; invalid UTF-8 is an error naming the line.
pub fn read_to_string(path: &Path) -> Result<String> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        Error::Io {
            path: path.to_path_buf(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {line} is not valid UTF-8")),
        }
    })
}

/// Deepest `[`/`{` nesting a YAML config may have: real configs nest a handful of levels, and
/// the YAML parser's time grows with the square of the depth (a 200 KB file of brackets took
/// 39 s before failing).
pub const MAX_YAML_DEPTH: usize = 64;

/// `text` without a leading UTF-8 byte order mark, which some Windows editors write: it is
/// valid at the start of a YAML stream (PyYAML, so mergekit, skips it) and harmless before JSON
/// Lines, but the parsers here would read it as content.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses a YAML config (a leading byte order mark skipped), refusing flow nesting deeper than
/// [`MAX_YAML_DEPTH`] first (brackets inside quoted strings are not counted). YAML merge keys
/// (`<<: *anchor`) are expanded, as PyYAML (so mergekit) does: mergekit users share settings
/// between models that way, and unexpanded they read as a field named `<<`.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let text = strip_bom(text);
    let (mut depth, mut deepest, mut quote) = (0usize, 0usize, None::<char>);
    for (line_no, line) in text.lines().enumerate() {
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    if deepest > MAX_YAML_DEPTH {
                        return Err(format!(
                            "line {}: nests deeper than {MAX_YAML_DEPTH} levels of brackets",
                            line_no + 1
                        ));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    if text.contains("<<") {
        let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if has_merge_key(&value) {
            value.apply_merge().map_err(|e| format!("YAML merge key `<<`: {e}"))?;
            return serde_yaml_ng::from_value(value).map_err(|e| e.to_string());
        }
    }
    // Parsed from the text where possible: its errors give the line and column.
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// Refuses a plain scalar that YAML 1.1 and 1.2 read as different numbers: `010` is 8 for
/// PyYAML (mergekit's parser, YAML 1.1 octal) and 10 here; `0o10` is 8 here and text for
/// PyYAML. Same config, different merges, both with rc 0 (fuzzing round 6). Quoted scalars,
/// comments and block scalars (`|`, `>`) are skipped.
pub fn check_yaml11_integers(text: &str) -> std::result::Result<(), String> {
    let mut block_indent: Option<usize> = None;
    for (line_no, line) in strip_bom(text).lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        if let Some(b) = block_indent {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block_indent = None;
        }
        let mut plain = String::new();
        let mut quote = None::<char>;
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, c) => plain.push(c),
            }
            prev = c;
        }
        let mut tokens = plain.split(|c: char| c.is_whitespace() || "[]{},:".contains(c));
        if let Some(t) = tokens.clone().find(|t| ambiguous_integer(t)) {
            let digits = t.trim_start_matches(['+', '-']);
            let yaml11 = match i64::from_str_radix(&digits[1..].replace('_', ""), 8) {
                Ok(v) if !digits.starts_with("0o") => format!("octal {v}"),
                _ => "text".into(),
            };
            return Err(format!(
                "line {}: `{t}` reads two ways: mergekit (PyYAML, YAML 1.1) reads it as {yaml11}, YAML 1.2 as a \
                 decimal number; write the number without a leading zero (or quote it, for text)",
                line_no + 1
            ));
        }
        if plain.trim_end().ends_with(['|', '>']) || tokens.next_back().is_some_and(|t| t.starts_with(['|', '>'])) {
            block_indent = Some(indent);
        }
    }
    Ok(())
}

/// `010`, `-07`, `0o17`, `00`: digits after a leading zero (a lone `0`, or `0.5`, is fine).
fn ambiguous_integer(t: &str) -> bool {
    let d = t.strip_prefix(['+', '-']).unwrap_or(t);
    let rest = match d.strip_prefix("0o") {
        Some(r) => r,
        None => match d.strip_prefix('0') {
            Some(r) => r,
            None => return false,
        },
    };
    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '_') && rest.chars().any(|c| c.is_ascii_digit())
}

/// Whether a mapping anywhere in `v` has the merge key `<<`.
fn has_merge_key(v: &serde_yaml_ng::Value) -> bool {
    use serde_yaml_ng::Value;
    match v {
        Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge_key),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        Value::Tagged(t) => has_merge_key(&t.value),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    /// Fuzzing round 3: merge said "more than one document", adapt "missing field `tasks`".
    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let v: std::collections::BTreeMap<String, u32> = super::parse_yaml("\u{feff}a: 1\nb: 2\n").unwrap();
        assert_eq!(v.len(), 2);
    }

    /// Fuzzing round 6: `weight: 010` merged at 10 here and at 8 in mergekit.
    #[test]
    fn integers_yaml_1_1_reads_otherwise_are_refused() {
        use super::check_yaml11_integers as check;
        for bad in ["w: 010", "p: {weight: 010}", "l: [0.5, -07]", "x: 0o17  # octal", "- model: a\n  w: 00"] {
            assert!(check(bad).is_err(), "{bad}");
        }
        let e = check("a: 1\nb: {weight: 010}\n").unwrap_err();
        assert!(e.contains("line 2: `010`") && e.contains("octal 8"), "{e}");
        assert!(check("x: 08").unwrap_err().contains("as text"));
        for good in ["w: 0", "w: 0.5", "w: 10", "m: '010'", "m: \"010\"", "m: ./models/010", "w: 1 # 010", "t: 1.0e-05"]
        {
            assert!(check(good).is_ok(), "{good}");
        }
        // A block scalar's lines are text.
        assert!(check("chat_template: |\n  {{ 010 }}\n  x: 007\nw: 1\n").is_ok());
        assert!(check("chat_template: >-\n  007\nw: 010\n").is_err());
    }

    /// Fuzzing round 3: merge keys gave `not a parameter value` or `unknown field`. They are
    /// expanded as PyYAML does (explicit keys win, then the first merged mapping), and a key
    /// left over (the anchors' holder) is still the target type's to accept or refuse.
    #[test]
    fn yaml_merge_keys_are_expanded() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct P {
            weight: f64,
            density: f64,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct C {
            models: Vec<P>,
        }
        let text = "models:\n  - &a {weight: 0.5, density: 0.2}\n  - <<: [*a, {density: 0.9}]\n    weight: 0.7\n";
        let c: C = super::parse_yaml(text).unwrap();
        assert_eq!(c.models[1], P { weight: 0.7, density: 0.2 });
        let holder = "defaults: &d {weight: 1, density: 1}\nmodels:\n  - <<: *d\n";
        let e = super::parse_yaml::<C>(holder).unwrap_err();
        assert!(e.contains("unknown field `defaults`"), "{e}");
        let e = super::parse_yaml::<C>("models:\n  - <<: 3\n").unwrap_err();
        assert!(e.contains("YAML merge key `<<`"), "{e}");
    }

    /// Walk-through #18: model cards and errors said `gen/./base`.
    #[test]
    fn clean_drops_only_dot_components() {
        use std::path::Path;
        assert_eq!(super::clean(&Path::new("gen").join("./base")), Path::new("gen/base"));
        assert_eq!(super::clean(Path::new("/x/./.ad.partial/./tasks/")), Path::new("/x/.ad.partial/tasks"));
        assert_eq!(super::clean(Path::new("./base")), Path::new("./base"));
        assert_eq!(super::clean(Path::new("a/b/../c")), Path::new("a/b/../c"));
        assert_eq!(super::clean(Path::new(".")), Path::new("."));
    }

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        let ok: serde_yaml_ng::Value = super::parse_yaml("a: [[1, 2], {b: '[[[['}]  # [[[[\n").unwrap();
        assert!(ok.get("a").is_some());
        let deep = format!("weight: {}1{}\n", "[".repeat(20_000), "]".repeat(20_000));
        let start = std::time::Instant::now();
        let e = super::parse_yaml::<serde_yaml_ng::Value>(&deep).unwrap_err();
        assert!(e.contains("line 1") && e.contains("deeper than 64"), "{e}");
        assert!(start.elapsed().as_secs_f64() < 1.0);
    }
}
