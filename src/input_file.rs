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
