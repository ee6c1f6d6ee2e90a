//! Reading and cleaning source text: decoding, whitespace normalisation, length caps.

use std::path::Path;

use crate::error::Result;

/// Reads a text file as UTF-8, or as Latin-1 when it is not valid UTF-8.
///
/// Old fortune files predate UTF-8 and some distributions still ship Latin-1 ones. Every byte is
/// a valid Latin-1 character, so the fallback never fails, and for those files it is the right
/// decoding, where a lossy UTF-8 decode would turn each accented letter into U+FFFD.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = crate::input_file::read(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("{}: not valid UTF-8, decoding as Latin-1", path.display());
            e.into_bytes().iter().map(|&b| char::from(b)).collect()
        }
    })
}

/// Collapses every run of whitespace to one space, trims, and drops other control characters
/// (fortune files carry a few backspace/escape sequences from terminal markup), so that texts
/// that differ only in layout compare equal when deduplicating.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else if !c.is_control() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// Cuts `text` to at most `max_chars` characters (not bytes, so never inside a UTF-8 sequence),
/// then drops a space left at the end. Returns whether it cut anything.
pub fn cap_chars(text: &mut String, max_chars: usize) -> bool {
    match text.char_indices().nth(max_chars) {
        Some((byte, _)) => {
            text.truncate(byte);
            let kept = text.trim_end().len();
            text.truncate(kept);
            true
        }
        None => false,
    }
}

/// Whether at least half of the non-space characters are letters: ASCII art, banners and tables
/// fail this, and they carry no topic and no language.
pub fn mostly_letters(text: &str) -> bool {
    let (mut letters, mut visible) = (0usize, 0usize);
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        visible += 1;
        letters += usize::from(c.is_alphabetic());
    }
    letters > 0 && 2 * letters >= visible
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_collapses_whitespace_and_drops_controls() {
        assert_eq!(normalise("  a\t\tb\r\n\n c \u{8}d  "), "a b c d");
        assert_eq!(normalise("\n \t"), "");
        assert_eq!(normalise("x\u{a0}y"), "x y");
    }

    #[test]
    fn cap_chars_cuts_on_char_boundaries() {
        let mut s = "żółw żółw".to_string();
        assert!(cap_chars(&mut s, 3));
        assert_eq!(s, "żół");
        let mut s = "ab cd".to_string();
        assert!(cap_chars(&mut s, 3));
        assert_eq!(s, "ab");
        let mut s = "abc".to_string();
        assert!(!cap_chars(&mut s, 3));
        assert_eq!(s, "abc");
    }

    #[test]
    fn mostly_letters_rejects_ascii_art() {
        assert!(mostly_letters("Hello, world!"));
        assert!(!mostly_letters("/_/ \\__/ |__| ___ ---"));
        assert!(!mostly_letters("1234 5678"));
    }

    #[test]
    fn latin1_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"Gr\xfc\xdfe").unwrap();
        assert_eq!(read_text_file(&p).unwrap(), "Grüße");
        std::fs::write(&p, "Grüße".as_bytes()).unwrap();
        assert_eq!(read_text_file(&p).unwrap(), "Grüße");
    }
}
