//! fortune(6) cookie files: entries separated by lines holding only `%`.
//!
//! Layout after unpacking the Debian packages (bookworm): English categories are plain files in
//! `usr/share/games/fortunes/`, each language package has a folder beside them
//! (`fortunes/{de,it,pl,cs,eo}/`; `fortunes-de/` holds only `.dat` indexes), and the top level also
//! holds symlinks into `it/`, `.dat` indexes and `.u8` links, none of which are category texts.

use std::path::{Path, PathBuf};

use crate::data::text::read_text_file;
use crate::error::{Error, Result};

/// Where fortune packages put their files, relative to the extraction root.
pub const GAMES_DIR: &str = "usr/share/games";

/// The English categories the `fortunes` package (1.99.1) ships. Listed rather than discovered
/// because with `--source /` the same folder also holds other packages' files (`brasil` is
/// Portuguese, `fortunes-off` adds offensive ones), which must not be labelled English or become
/// topics.
pub const ENGLISH_CATEGORIES: &[&str] = &[
    "art",
    "ascii-art",
    "computers",
    "cookie",
    "debian",
    "definitions",
    "disclaimer",
    "drugs",
    "education",
    "ethnic",
    "food",
    "goedel",
    "humorists",
    "kids",
    "knghtbrd",
    "law",
    "linux",
    "linuxcookie",
    "love",
    "magic",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "paradoxum",
    "people",
    "perl",
    "pets",
    "platitudes",
    "politics",
    "pratchett",
    "science",
    "songs-poems",
    "sports",
    "startrek",
    "tao",
    "translate-me",
    "wisdom",
    "work",
    "zippy",
];

/// One language of `lang-id`: its label and where its fortune files are.
pub struct Language {
    /// ISO 639-1 code, the label.
    pub code: &'static str,
    /// Folders (every plain category file in them) or single files, relative to [`GAMES_DIR`];
    /// those that do not exist are skipped, so both known layouts work.
    pub paths: &'static [&'static str],
    /// Category files left out: not (only) in this language.
    pub exclude: &'static [&'static str],
    /// The Debian package, for messages; optional ones are skipped quietly when absent.
    pub package: &'static str,
    pub optional: bool,
}

/// The languages of `lang-id`, in label-id order. English comes from [`ENGLISH_CATEGORIES`].
/// Left out: `cs/klasik-sk` (Slovak), `de/translations` (English-German pairs), and the ASCII-art
/// files `ascii-art`, `de/asciiart`, `it/banner`. Portuguese (`brasil`, package `fortunes-br`)
/// is used when present.
pub const LANGUAGES: &[Language] = &[
    Language { code: "en", paths: &[], exclude: &["ascii-art"], package: "fortunes", optional: false },
    Language {
        code: "de",
        paths: &["fortunes/de", "fortunes-de"],
        exclude: &["asciiart", "translations"],
        package: "fortunes-de",
        optional: false,
    },
    Language {
        code: "it",
        paths: &["fortunes/it", "fortunes-it"],
        exclude: &["banner"],
        package: "fortunes-it",
        optional: false,
    },
    Language {
        code: "pl",
        paths: &["fortunes/pl", "fortunes-pl"],
        exclude: &[],
        package: "fortunes-pl",
        optional: false,
    },
    Language {
        code: "cs",
        paths: &["fortunes/cs", "fortunes-cs"],
        exclude: &["klasik-sk"],
        package: "fortunes-cs",
        optional: false,
    },
    Language {
        code: "eo",
        paths: &["fortunes/eo", "fortunes-eo"],
        exclude: &[],
        package: "fortunes-eo",
        optional: false,
    },
    Language {
        code: "pt",
        paths: &["fortunes/brasil", "fortunes/pt", "fortunes-br"],
        exclude: &[],
        package: "fortunes-br",
        optional: true,
    },
];

/// Splits a fortune file into its raw entries (text between `%` lines, untouched). A `%` line may
/// have trailing spaces (`it/leggi` has some): strfile(1) would glue those entries together, but
/// they are meant as separators.
pub fn read_entries(path: &Path) -> Result<Vec<String>> {
    let text = read_text_file(path)?;
    let mut entries = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_end() == "%" {
            entries.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    entries.push(current);
    Ok(entries)
}

/// Whether `path` is a category text: a plain file (not a symlink: those point at other
/// languages' files or at offensive ones) that is not a `.dat` index or `.u8` link.
fn is_category_file(path: &Path) -> Result<bool> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    Ok(meta.file_type().is_file() && !name.starts_with('.') && !name.ends_with(".dat") && !name.ends_with(".u8"))
}

/// The category files in `dir` (see `is_category_file`), sorted by name.
pub fn category_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if is_category_file(&path)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                tracing::warn!("{}: skipping a file whose name is not UTF-8", path.display());
                continue;
            };
            out.push((name.to_string(), path));
        }
    }
    out.sort();
    Ok(out)
}

/// The English categories present under `source` (name, path), in [`ENGLISH_CATEGORIES`] order.
/// Errors when there are none: the `fortunes` package is required by both fortune tasks.
pub fn english_files(source: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = source.join(GAMES_DIR).join("fortunes");
    let mut out = Vec::new();
    for name in ENGLISH_CATEGORIES {
        let path = dir.join(name);
        if path.exists() && is_category_file(&path)? {
            out.push((name.to_string(), path));
        }
    }
    if out.is_empty() {
        return Err(Error::MissingSource { path: dir.join("computers"), package: "fortunes".into() });
    }
    Ok(out)
}

/// The category files of `lang` under `source` (name, path), minus its exclusions.
pub fn language_files(source: &Path, lang: &Language) -> Result<Vec<(String, PathBuf)>> {
    let mut out = if lang.code == "en" { english_files(source)? } else { Vec::new() };
    for rel in lang.paths {
        let path = source.join(GAMES_DIR).join(rel);
        if path.is_dir() {
            out.extend(category_files(&path)?);
        } else if path.exists() && is_category_file(&path)? {
            out.push((rel.rsplit('/').next().unwrap_or(rel).to_string(), path));
        }
    }
    out.retain(|(name, _)| !lang.exclude.contains(&name.as_str()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_split_on_percent_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cat");
        std::fs::write(&p, "one\nline\n%\n100% sure\n% \n\n%\nlast").unwrap();
        let e = read_entries(&p).unwrap();
        assert_eq!(e, vec!["one\nline\n", "100% sure\n", "\n", "last\n"]);
    }

    #[test]
    fn only_plain_category_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b", "a", "a.dat", "a.u8", ".hidden"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let names: Vec<String> = category_files(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
