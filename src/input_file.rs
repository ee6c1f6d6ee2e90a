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
