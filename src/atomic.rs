//! Atomic output: every file and directory symerge writes appears complete or not at all.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// The staging directories this process is writing, removed by an interrupt (SIGINT, SIGTERM,
/// SIGHUP) before it exits.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Marker inside a staging directory naming the process that writes it, so a later run can tell
/// a dead run's leftovers from a live run's work.
const OWNER: &str = ".symerge-owner";

/// Installs the handler that removes this process's partial outputs on SIGINT, SIGTERM or SIGHUP
/// and exits with 130. SIGKILL cannot be caught: the next run at the same output removes what a
/// killed run left (see [`Staging::create`]).
pub fn remove_partials_on_interrupt() {
    let installed = ctrlc::set_handler(|| {
        let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        for dir in &live {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("interrupted: removed {} partial output(s)", live.len());
        std::process::exit(130);
    });
    if let Err(e) = installed {
        tracing::warn!("no interrupt handler ({e}): an interrupted run leaves its partial output");
    }
}

fn register(dir: &Path, live: bool) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|d| d != dir);
        if live {
            l.push(dir.to_path_buf());
        }
    }
}

/// Removes `.NAME.partial-*` directories in `parent` that a process no longer running left
/// behind (killed by SIGKILL, power loss). Directories of live processes, and any without our
/// owner marker, are kept.
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!(".{name}.partial-");
    for e in entries.flatten() {
        let path = e.path();
        let ours = e.file_name().to_string_lossy().starts_with(&prefix);
        let pid = std::fs::read_to_string(path.join(OWNER)).ok().and_then(|t| t.trim().parse::<u32>().ok());
        if let (true, Some(pid)) = (ours, pid)
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
            && Path::new("/proc/self").exists()
        {
            tracing::info!("removing {} left by a run that no longer exists (pid {pid})", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// A hidden directory beside an output directory that becomes the output only on success: it is
/// renamed into place by [`Staging::commit`] and removed if dropped before (any error path) or if
/// the process is interrupted, so a failed run never leaves a half-written model where a complete
/// one is expected.
pub struct Staging {
    dir: Option<tempfile::TempDir>,
}

impl Staging {
    /// Creates `.NAME.partial-XXXX` in the output's parent (created if needed), so the final
    /// rename stays on one file system; first removes such directories that dead runs left.
    pub fn create(output: &Path) -> Result<Self> {
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
        remove_stale(&parent, &name);
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let owner = dir.path().join(OWNER);
        std::fs::write(&owner, std::process::id().to_string()).map_err(|e| Error::io(&owner, e))?;
        register(dir.path(), true);
        Ok(Staging { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("a staging directory until committed").path()
    }

    /// Renames the staging directory to `output`, replacing an existing one if `force`. If the
    /// rename fails (e.g. `output` is a mount point), the previous output is put back and the
    /// staging directory removed.
    pub fn commit(mut self, output: &Path, force: bool) -> Result<()> {
        let dir = self.dir.take().expect("a staging directory until committed");
        let staged = dir.path().to_path_buf();
        let _ = std::fs::remove_file(staged.join(OWNER));
        let fail = |e: Error| {
            register(&staged, false);
            let _ = std::fs::remove_dir_all(&staged);
            Err(e)
        };
        let _ = dir.keep();
        let old = if output.exists() {
            if !force {
                return fail(Error::OutputExists { path: output.to_path_buf() });
            }
            let mut old = staged.clone().into_os_string();
            old.push(".old");
            let old = PathBuf::from(old);
            if let Err(e) = std::fs::rename(output, &old) {
                return fail(Error::io(output, e));
            }
            Some(old)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&staged, output) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, output);
            }
            return fail(Error::io(output, e));
        }
        register(&staged, false);
        if let Some(old) = old {
            let removed = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
            removed.map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            register(dir.path(), false);
        }
    }
}
