//! Atomic output: every file and directory symerge writes appears complete or not at all.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so a reader never
/// sees a half-written file and an interrupted run leaves the previous one intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-");
    // Temporary files are private (0600); these are ordinary outputs, readable like any other.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Refuses an output path that is, contains, or lies inside one of `inputs` (a model directory
/// or file, a cache, a data file), whether or not it exists yet and with or without `--force`:
/// replacing it would destroy an input, and writing inside it would change one. Paths are
/// compared after resolving symbolic links and `..`, so another spelling of an input is caught.
pub fn check_output_apart(output: &Path, inputs: &[&Path]) -> Result<()> {
    let out = resolve(output);
    for input in inputs {
        let Ok(inp) = std::fs::canonicalize(input) else { continue };
        if out == inp || inp.starts_with(&out) || out.starts_with(&inp) {
            return Err(Error::OutputOverlapsInput { output: output.to_path_buf(), input: input.to_path_buf() });
        }
    }
    Ok(())
}

/// `path` made absolute with symbolic links and `..` resolved, for a path that need not exist:
/// its longest existing prefix is canonicalised and the rest appended.
fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    other => out.push(other),
                }
            }
            return out;
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// A hidden directory beside an output directory that becomes the output only on success: it is
/// renamed into place by [`Staging::commit`] and removed if dropped before (any error path), so
/// a failed run never leaves a half-written model where a complete one is expected.
pub struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    /// Creates `.NAME.partial-XXXX` in the output's parent (created if needed), so the final
    /// rename stays on one file system.
    pub fn create(output: &Path) -> Result<Self> {
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Ok(Staging { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the staging directory to `output`, replacing an existing one if `force`.
    pub fn commit(self, output: &Path, force: bool) -> Result<()> {
        let staged = self.dir.keep();
        let old = if output.exists() {
            if !force {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(Error::OutputExists { path: output.to_path_buf() });
            }
            let mut old = staged.clone().into_os_string();
            old.push(".old");
            let old = PathBuf::from(old);
            std::fs::rename(output, &old).map_err(|e| Error::io(output, e))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&staged, output).map_err(|e| Error::io(output, e))?;
        if let Some(old) = old {
            let removed = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
            removed.map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}
