//! Long texts: a text far longer than the truncation is tokenized from a prefix that ends where a
//! word does. The tokens must be exactly those of the whole text truncated (checked here against
//! the `tokenizers` crate on the whole text, with real tokenizers: MiniLM's WordPiece, SmolLM2's
//! byte-level BPE), and a 10 MB line must not cost the ~85x its size that tokenizing it whole does.
//! (A prefix is used once its tokens fill the truncation, so the word it would cut can be the
//! last one kept: prefixes end at word ends, and texts whose last kept word is one token test it.)

mod common;

use std::path::{Path, PathBuf};

use common::{debian_dir, fixture_dir, minilm_dir, run, smollm2_gguf};
use symerge::model::tokenize::TextTokenizer;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams};

/// The whole text tokenized with the file's own tokenizer, padding off, truncated at `max_len`.
fn whole(path: &Path, max_len: usize, text: &str, side: TruncationDirection) -> (Vec<u32>, Vec<u32>) {
    let mut t = Tokenizer::from_file(path).unwrap();
    t.with_padding(None);
    t.with_truncation(Some(TruncationParams { max_length: max_len, direction: side, ..Default::default() })).unwrap();
    let e = t.encode(text, true).unwrap();
    (e.get_ids().to_vec(), e.get_type_ids().to_vec())
}

/// Real text (fortunes in several languages) run together, and made-up texts that stress where
/// a prefix may end: runs of spaces, tabs and newlines, digits, no space at all, CJK, accents.
fn texts() -> Vec<String> {
    let games = debian_dir().join("usr/share/games");
    let mut real = String::new();
    for file in ["fortunes/computers", "fortunes/de/computer.u8", "fortunes/it/italia.u8", "fortunes/pl/advocacy.u8"] {
        if let Ok(s) = std::fs::read_to_string(games.join(file)) {
            real.push_str(&s);
        }
    }
    assert!(real.len() > 50_000, "the fortunes are {} bytes", real.len());
    let words: Vec<&str> = real.split_whitespace().collect();
    let mut out = vec![real.chars().take(60_000).collect::<String>()];
    out.push(words.iter().take(9_000).copied().collect::<Vec<_>>().join("   "));
    out.push(words.iter().take(9_000).copied().collect::<Vec<_>>().join(" \t\n "));
    out.push("1234567890 ".repeat(5_000));
    // One token a word for byte-level BPE: a prefix holds exactly the kept tokens, no overflow.
    out.push("ab ".repeat(20_000));
    out.push("x".repeat(40_000));
    out.push(format!("{} {}", "y".repeat(30_000), "zz ".repeat(10_000)));
    out.push("東京は日本の首都です。 ".repeat(2_000));
    out.push("Ça été très déjà-vu, naïve façade! ".repeat(2_000));
    out.push(format!("{}{}", " ".repeat(9_000), "end of it ".repeat(2_000)));
    // Few tokens per byte (WordPiece makes each 300-letter word one [UNK]): the first prefixes
    // hold fewer tokens than the truncation keeps.
    out.push(format!("{} ", "abcdefghij".repeat(30)).repeat(200));
    out
}

fn smollm2_tokenizer(dir: &Path) -> PathBuf {
    let out = dir.join("smollm2");
    let (ok, _, err) = run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    out.join("tokenizer.json")
}

#[test]
fn long_texts_give_the_whole_texts_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let files = [
        minilm_dir().join("tokenizer.json"),
        fixture_dir("gpt2").join("tokenizer.json"),
        smollm2_tokenizer(tmp.path()),
    ];
    let texts = texts();
    let mut prefixed = 0;
    // Both sides: `truncation_side: left` keeps the last tokens, from a suffix (fuzzing round 8).
    for side in [TruncationDirection::Right, TruncationDirection::Left] {
        for file in &files {
            for max_len in [8, 128, 512] {
                let tok = TextTokenizer::from_file_cut(file, max_len, side).unwrap();
                let got = tok.tokenize(&texts).unwrap();
                for (text, got) in texts.iter().zip(&got) {
                    let (ids, type_ids) = whole(file, max_len, text, side);
                    let head: String = text.chars().take(40).collect();
                    assert_eq!(got.ids, ids, "{} at max_len {max_len}, {side:?}, text {head:?}", file.display());
                    assert_eq!(got.type_ids, type_ids);
                    prefixed += usize::from(text.len() > 32 * max_len.max(128));
                }
            }
        }
    }
    assert!(prefixed > 40, "only {prefixed} texts went through a prefix");
}

/// One 10 MB line (as one text in a data file) costs about its own size, not ~850 MB (MiniLM's
/// WordPiece) or ~1.5 GB (SmolLM2's byte-level BPE, whose `ab` is one token: tokenizers 0.23
/// then reports no overflowing tokens for a prefix, which once sent such lines down the whole
/// path).
#[test]
fn a_10_mb_line_is_tokenized_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let files = [minilm_dir().join("tokenizer.json"), smollm2_tokenizer(tmp.path())];
    let toks: Vec<_> = files.iter().map(|f| TextTokenizer::from_file(f, 128).unwrap()).collect();
    let lines = ["the quick brown fox jumps over the lazy dog ".repeat(230_000), "ab ".repeat(3_400_000)];
    assert!(lines.iter().all(|l| l.len() > 10_000_000));
    let before = symerge::sysinfo::peak_rss_bytes().expect("VmHWM is available on Linux");
    for (tok, file) in toks.iter().zip(&files) {
        for line in &lines {
            let got = tok.tokenize(&[line.as_str()]).unwrap();
            assert_eq!(got[0].ids.len(), 128, "{}", file.display());
        }
    }
    let after = symerge::sysinfo::peak_rss_bytes().unwrap();
    // The other test in this binary tokenizes texts of at most 60 KB whole (a few MB).
    let grown = after.saturating_sub(before);
    eprintln!("peak RSS {:.0} MB -> {:.0} MB", before as f64 / 1e6, after as f64 / 1e6);
    assert!(grown < 100_000_000, "peak RSS grew by {grown} bytes for 10 MB lines");
}

/// `truncation_side` is read from the `tokenizer_config.json` beside the tokenizer, as
/// transformers reads it; a value that is neither side is refused naming the field.
#[test]
fn the_truncation_side_comes_from_tokenizer_config() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(minilm_dir().join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let text = "one two three four five six seven eight nine ten";
    let tokens = |dir: &Path| TextTokenizer::from_dir(dir, 6).map(|t| t.tokenize(&[text]).unwrap().remove(0).ids);
    let right = tokens(tmp.path()).unwrap();
    let cfg = tmp.path().join("tokenizer_config.json");
    std::fs::write(&cfg, r#"{"truncation_side": "left"}"#).unwrap();
    let left = tokens(tmp.path()).unwrap();
    let file = tmp.path().join("tokenizer.json");
    assert_eq!(right, whole(&file, 6, text, TruncationDirection::Right).0);
    assert_eq!(left, whole(&file, 6, text, TruncationDirection::Left).0);
    assert_ne!(left, right);
    // Lengths are refused for what they leave no room for: MiniLM's template adds two tokens.
    let e = TextTokenizer::from_dir(tmp.path(), 0).err().unwrap().to_string();
    assert!(e.contains("maximum length of 0 tokens"), "{e}");
    let e = TextTokenizer::from_dir(tmp.path(), 2).err().unwrap().to_string();
    assert!(e.contains("adds 2 special tokens"), "{e}");
    assert!(TextTokenizer::from_dir(tmp.path(), 3).is_ok());
    std::fs::write(&cfg, r#"{"truncation_side": "middle"}"#).unwrap();
    let e = tokens(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("field `truncation_side`"), "{e}");
}
