//! WordNet 3.0 `data.noun` / `data.verb`: synset gloss -> supersense (lexicographer file).
//!
//! Format (wndb(5WN)): lines starting with two spaces are the licence header; every other line is
//! one synset, `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`. The lexicographer file
//! number is the synset's supersense, named by WordNet's fixed `lexnames` table.

use std::path::{Path, PathBuf};

use crate::data::text::read_text_file;
use crate::error::{Error, Result};

/// WordNet 3.0's `lexnames` table (lexnames(5WN)), indexed by lexicographer file number.
/// Hard-coded because the `wordnet-base` package ships only the man page, not the file; when a
/// `lexnames` file is present beside the data files it is checked against this table.
pub const LEXNAMES: [&str; 45] = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
];

/// Where the `wordnet-base` package puts its database, relative to the extraction root.
pub const WORDNET_DIR: &str = "usr/share/wordnet";

/// A part of speech with a supersense task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pos {
    Noun,
    Verb,
}

impl Pos {
    fn file_name(self) -> &'static str {
        match self {
            Pos::Noun => "data.noun",
            Pos::Verb => "data.verb",
        }
    }

    /// `noun.` or `verb.`: the lexnames this part of speech may use.
    fn prefix(self) -> &'static str {
        match self {
            Pos::Noun => "noun.",
            Pos::Verb => "verb.",
        }
    }

    /// The supersense names of this part of speech, in lexicographer-file order (= label ids).
    pub fn labels(self) -> Vec<&'static str> {
        LEXNAMES.iter().copied().filter(|n| n.starts_with(self.prefix())).collect()
    }
}

/// One synset: its raw gloss and its supersense name.
#[derive(Debug, Clone)]
pub struct Synset {
    pub gloss: String,
    pub lexname: &'static str,
}

/// The path of `pos`'s data file under the extraction root `source`.
pub fn data_path(source: &Path, pos: Pos) -> PathBuf {
    source.join(WORDNET_DIR).join(pos.file_name())
}

/// Reads every synset of `pos` under `source`. A line that is not a synset of this part of
/// speech is an error naming the file and line, since it means a different or corrupt file.
pub fn read_synsets(source: &Path, pos: Pos) -> Result<Vec<Synset>> {
    let path = data_path(source, pos);
    if !path.is_file() {
        return Err(Error::MissingSource { path, package: "wordnet-base".into() });
    }
    check_lexnames(&source.join(WORDNET_DIR).join("lexnames"))?;
    let text = read_text_file(&path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::BadLine { path: path.clone(), line: i + 1, reason };
        let mut fields = line.split(' ');
        let offset = fields.next().unwrap_or_default();
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("expected a synset offset, found `{offset}`")));
        }
        let lex_field = fields.next().unwrap_or_default();
        let lexname = lex_field
            .parse::<usize>()
            .ok()
            .and_then(|n| LEXNAMES.get(n).copied())
            .ok_or_else(|| bad(format!("`{lex_field}` is not a lexicographer file number (0..=44)")))?;
        if !lexname.starts_with(pos.prefix()) {
            return Err(bad(format!("lexicographer file {lex_field} is {lexname}, not a {}* file", pos.prefix())));
        }
        // Synsets without a gloss have an empty text; the pipeline drops them as empty.
        let gloss = line.split_once(" | ").map(|(_, g)| g).unwrap_or_default();
        out.push(Synset { gloss: gloss.to_string(), lexname });
    }
    Ok(out)
}

/// Checks a `lexnames` file (`NN<tab>name<tab>pos` lines), when there is one, against
/// [`LEXNAMES`]: a different table would silently relabel every synset.
fn check_lexnames(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = read_text_file(path)?;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let (num, name) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
        let expected = num.parse::<usize>().ok().and_then(|n| LEXNAMES.get(n));
        if expected != Some(&name) {
            return Err(Error::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                reason: format!("`{num} {name}` differs from WordNet 3.0's lexnames table"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets() {
        let nouns = Pos::Noun.labels();
        assert_eq!(nouns.len(), 26);
        assert_eq!(nouns[0], "noun.Tops");
        assert_eq!(nouns[25], "noun.time");
        let verbs = Pos::Verb.labels();
        assert_eq!(verbs.len(), 15);
        assert_eq!(verbs[0], "verb.body");
        assert_eq!(verbs[14], "verb.weather");
    }

    #[test]
    fn parses_and_rejects_lines() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(WORDNET_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let good =
            "  1 licence line\n00001740 03 n 01 entity 0 000 | that which exists  \n00002 18 n 01 x 0 000 | a person\n";
        std::fs::write(dir.join("data.noun"), good).unwrap();
        let s = read_synsets(root.path(), Pos::Noun).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].gloss.as_str(), s[0].lexname), ("that which exists  ", "noun.Tops"));
        assert_eq!(s[1].lexname, "noun.person");

        std::fs::write(dir.join("data.noun"), format!("{good}00003 30 v 01 y 0 000 | a verb\n")).unwrap();
        let err = read_synsets(root.path(), Pos::Noun).unwrap_err().to_string();
        assert!(err.contains("data.noun: line 4:") && err.contains("verb.change"), "{err}");

        std::fs::write(dir.join("lexnames"), "00\tadj.all\t3\n01\tadj.pertx\t3\n").unwrap();
        let err = read_synsets(root.path(), Pos::Noun).unwrap_err().to_string();
        assert!(err.contains("lexnames: line 2:"), "{err}");
    }
}
