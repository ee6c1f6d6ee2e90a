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
    // Through the `File`: `NamedTempFile`'s own writes add the path to the error, which
    // `Error::io` already names.
    // Errors name `path`: the hidden temporary name means nothing to the user (fuzzing round 6).
    tmp.as_file_mut().write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Refuses an output path that is, contains, or lies inside one of `inputs` (a model directory
/// or file, a cache, a data file), whether or not it exists yet and with or without `--force`:
/// replacing it would destroy an input, and writing inside it would change one. Paths are
/// compared after resolving symbolic links and `..`, so another spelling of an input is caught.
/// An input directory's files are resolved too: a model whose weights are links into another
/// directory (Hugging Face's cache layout, or links into an earlier output) lives there as well.
pub fn check_output_apart(output: &Path, inputs: &[&Path]) -> Result<()> {
    match overlapped_input(output, inputs) {
        Some(input) => Err(Error::OutputOverlapsInput { output: output.to_path_buf(), input }),
        None => Ok(()),
    }
}

/// The first of `inputs` (or a linked file in an input directory) that `path` is, contains or
/// lies inside; `path` need not exist, inputs that do not are skipped.
fn overlapped_input(path: &Path, inputs: &[&Path]) -> Option<PathBuf> {
    let out = resolve(path);
    for input in inputs {
        let Ok(inp) = std::fs::canonicalize(input) else { continue };
        if nested(&out, &inp) {
            return Some(input.to_path_buf());
        }
        for file in linked_files(input) {
            if let Ok(target) = std::fs::canonicalize(&file)
                && target.starts_with(&out)
            {
                return Some(file);
            }
        }
    }
    None
}

/// Whether one of two resolved paths is the other or lies inside it.
fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Refuses a `--rendezvous` directory that is, contains or lies inside the output or one of
/// `inputs`: the ranks write their files there, so it would leave them in the output (where a
/// forced commit deletes them under the running ranks) or write into an input. Checked with
/// [`check_output_apart`]'s resolution, whether or not the paths exist yet.
pub fn check_rendezvous_apart(dir: &Path, output: &Path, inputs: &[&Path]) -> Result<()> {
    let refuse =
        |other: PathBuf, role: &'static str| Err(Error::RendezvousOverlaps { dir: dir.to_path_buf(), other, role });
    if nested(&resolve(dir), &resolve(output)) {
        return refuse(output.to_path_buf(), "output");
    }
    match overlapped_input(dir, inputs) {
        Some(input) => refuse(input, "input"),
        None => Ok(()),
    }
}

/// The symbolic links directly inside `dir` (none when it is not a directory).
fn linked_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_symlink())).map(|e| e.path()).collect()
}

/// The file every directory output symerge writes carries (a one-line JSON naming the tool,
/// its version and the command), so `--force` can tell a previous symerge output, which it may
/// replace, from a directory holding anything else, which it must never delete.
pub const OUTPUT_MARKER: &str = ".symerge-output";

/// Largest marker read back: ours are one short line; anything bigger is not ours.
const MARKER_MAX_BYTES: u64 = 1 << 20;

/// The marker's text: the tool, its version and this process's command line.
fn marker_text() -> String {
    let command: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let json = serde_json::json!({
        "written_by": "symerge",
        "version": env!("CARGO_PKG_VERSION"),
        "command": command,
    });
    format!("{json}\n")
}

/// Whether `dir` holds our marker: a regular file (not a link) whose JSON says symerge wrote it.
pub fn has_output_marker(dir: &Path) -> bool {
    let path = dir.join(OUTPUT_MARKER);
    let Ok(meta) = std::fs::symlink_metadata(&path) else { return false };
    if !meta.is_file() || meta.len() > MARKER_MAX_BYTES {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(&path) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["written_by"] == "symerge")
}

/// Checks, before any work, that a directory output may be written at `output`: nothing is
/// there, or (`force`) a directory a previous symerge run wrote (it holds [`OUTPUT_MARKER`]) or
/// an empty one. Anything else (a directory of the user's files, a file, a symbolic link,
/// whatever it points to) is refused: `--force` must never delete what symerge did not write.
/// A link is refused rather than followed because replacing it would swap the link itself for a
/// directory, and judging it by its target would invite deleting through it. Without `force`,
/// what `--force` would refuse is refused for that reason at once, so the `--force` hint goes
/// only to outputs it would replace. The output's name must leave room for the staging
/// directory's ([`check_staged_name`]).
pub fn check_output_dir(output: &Path, force: bool) -> Result<()> {
    check_output_name(output)?;
    check_staged_name(output, staging_path)?;
    let meta = match std::fs::symlink_metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(output, e)),
    };
    replaceable_dir(output, &meta.file_type())?;
    if force { Ok(()) } else { Err(Error::OutputExists { path: output.to_path_buf() }) }
}

/// Refuses an output path that ends in `.` or `..` (`-o .`, `out/.`): an output is put in place
/// by a rename, which such a path cannot take, so the run would do all its work and then fail
/// with "Device or resource busy" (fuzzing round 6). Checked before any work.
pub fn check_output_name(output: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let raw = output.as_os_str().as_bytes();
    // `-o -` means standard output to most tools; symerge wrote a file named `-` (fuzzing round 6).
    if raw == b"-" {
        return Err(Error::Invalid(
            "output -: symerge writes its outputs to files (atomically), not to standard output; give a path \
             (./- for a file named -)"
                .into(),
        ));
    }
    let trimmed = raw.strip_suffix(b"/").filter(|t| !t.is_empty()).unwrap_or(raw);
    let last = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    if last != b"." && last != b".." && !trimmed.is_empty() && trimmed != b"/" {
        return Ok(());
    }
    let named = std::fs::canonicalize(output).map_or_else(|_| "its own name".into(), |p| format!("`{}`", p.display()));
    Err(Error::Invalid(format!(
        "output {}: the path does not end in a name; an output is put in place by renaming onto its \
         path, which a path ending in `.` or `..` (or the root) cannot take; give it by name ({named})",
        output.display()
    )))
}

/// Fails with [`Error::OutputNotOurs`] unless the existing `output` (of type `kind`) is one
/// `--force` may replace: a directory with our marker, or an empty one.
fn replaceable_dir(output: &Path, kind: &std::fs::FileType) -> Result<()> {
    let not_ours = |reason: String| Err(Error::OutputNotOurs { path: output.to_path_buf(), reason });
    if kind.is_symlink() {
        return not_ours("is a symbolic link (never replaced, whatever it points to)".into());
    }
    if !kind.is_dir() {
        return not_ours(format!("is {}, not a directory symerge wrote", describe(kind)));
    }
    if has_output_marker(output) {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(output).map_err(|e| Error::io(output, e))?;
    if entries.next().is_none() {
        return Ok(());
    }
    not_ours(format!("is not empty and was not written by symerge (no {OUTPUT_MARKER} marker)"))
}

/// Checks, before any work, that `--force` may replace the file output `output`: nothing is
/// there, or a regular file that `is_ours` recognises (e.g. a label cache by its magic). A
/// symbolic link is refused, as in [`check_output_dir`]; `what` names our kind of file.
pub fn check_output_file(output: &Path, what: &str, is_ours: impl Fn(&Path) -> bool) -> Result<()> {
    check_output_name(output)?;
    let meta = match std::fs::symlink_metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(output, e)),
    };
    let kind = meta.file_type();
    let reason = if kind.is_symlink() {
        "is a symbolic link (never replaced, whatever it points to)".to_string()
    } else if !kind.is_file() {
        format!("is {}, not {what}", describe(&kind))
    } else if is_ours(output) {
        return Ok(());
    } else {
        format!("exists and is not {what} (symerge did not write it)")
    };
    Err(Error::OutputNotOurs { path: output.to_path_buf(), reason })
}

/// What a file type is, in words, for messages.
fn describe(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
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

/// The output this process has put in place, once it has: an interrupt after that says so
/// instead of reporting the run as one that left nothing.
static COMMITTED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Partial files an interrupt keeps on purpose, because a rerun resumes them (a label cache's
/// `.partial`): the interrupt names them instead of reporting that nothing was left.
static RESUMABLE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Names `partial` as kept by an interrupt for a rerun to resume, until [`forget_resumable`].
pub fn keep_resumable(partial: &Path) {
    if let Ok(mut l) = RESUMABLE.lock() {
        l.retain(|p| p != partial);
        l.push(partial.to_path_buf());
    }
}

/// `partial` is complete (renamed into place): an interrupt no longer names it.
pub fn forget_resumable(partial: &Path) {
    if let Ok(mut l) = RESUMABLE.lock() {
        l.retain(|p| p != partial);
    }
}

/// What an interrupt before any output was in place says: the partial outputs it removed, and
/// the resumable ones it kept.
fn interrupted_message(removed: usize, kept: &[PathBuf]) -> String {
    let kept: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
    match (removed, kept.is_empty()) {
        (_, true) => format!("interrupted: removed {removed} partial output(s)"),
        (0, false) => format!("interrupted: kept {}; rerun the same command to resume", kept.join(", ")),
        (n, false) => format!(
            "interrupted: removed {n} partial output(s), kept {}; rerun the same command to resume",
            kept.join(", ")
        ),
    }
}

/// Removes a staging directory with its owner marker last: a run killed part-way through leaves
/// a directory a later run still recognises as a dead run's and removes, never an unmarked one
/// that stays forever.
fn remove_owned(dir: &Path) -> std::io::Result<()> {
    remove_owned_with(
        dir,
        |path, is_dir| if is_dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) },
    )
}

/// [`remove_owned`] with the removal of each entry (path, is a directory) given.
fn remove_owned_with(dir: &Path, mut remove: impl FnMut(&Path, bool) -> std::io::Result<()>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name() != OWNER {
            remove(&e.path(), e.file_type()?.is_dir())?;
        }
    }
    match remove(&dir.join(OWNER), false) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::remove_dir(dir)
}

/// Marker inside a staging directory naming the process that writes it, so a later run can tell
/// a dead run's leftovers from a live run's work.
const OWNER: &str = ".symerge-owner";

/// Installs the handler that removes this process's partial outputs on SIGINT, SIGTERM or SIGHUP
/// and exits with 130, and ignores SIGXFSZ. SIGKILL cannot be caught: the next run at the same
/// output removes what a killed run left (see [`Staging::create`]).
pub fn remove_partials_on_interrupt() {
    let installed = ctrlc::set_handler(|| {
        let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        for dir in &live {
            let _ = remove_owned(dir);
        }
        let committed = COMMITTED.lock().ok().and_then(|c| c.clone());
        match committed {
            Some(out) => eprintln!("interrupted after {} was complete and in place", out.display()),
            None => {
                let kept = RESUMABLE.lock().map(|k| k.clone()).unwrap_or_default();
                eprintln!("{}", interrupted_message(live.len(), &kept));
            }
        }
        std::process::exit(130);
    });
    if let Err(e) = installed {
        tracing::warn!("no interrupt handler ({e}): an interrupted run leaves its partial output");
    }
    // Past a file-size limit (`ulimit -f`) a write then fails with EFBIG, reported and cleaned up
    // after like a full disk, instead of SIGXFSZ killing the process with its partial output.
    // SAFETY: SIG_IGN installs no handler; nothing else in the process handles SIGXFSZ.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // SAFETY: the handler only calls write(2) and _exit(2), both async-signal-safe.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
    }
}

/// Inputs are memory-mapped: one truncated while mapped makes the next read of a lost page
/// raise SIGBUS. Say so instead of dying with a bare "Bus error"; the staging directory is left
/// to the next run at the same output, which removes it (its owner is gone). Nothing else can
/// run safely inside a signal handler.
extern "C" fn on_sigbus(_: libc::c_int) {
    const MSG: &[u8] = b"error: an input file shrank while it was being read (SIGBUS: a checkpoint was truncated or \
rewritten during the run); the partial output is removed by the next run at the same path\n";
    // SAFETY: write(2) of a static buffer and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(135);
    }
}

/// Copies the file `src` to `dst`, a read error named by `src` and a write error by `dst`
/// (`std::fs::copy` gives one error for both: a full disk while copying a tokenizer into an
/// output read as if the input had been written; fuzzing round 6).
pub fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    use std::io::Read;
    let mut from = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    let mut to = std::fs::File::create(dst).map_err(|e| Error::io(dst, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(src, e)),
        };
        to.write_all(&buf[..n]).map_err(|e| Error::io(dst, e))?;
    }
}

/// Staging directories this process is writing and the outputs they become.
static OUTPUTS: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

/// `path` as the user will know it: a path inside a live staging directory is named inside the
/// output that directory becomes, innermost first (adapt stages each task model inside its own
/// staging directory), so a failed write names `out/tasks/a/tokenizer.json`, not
/// `.out.partial-Xy12Zq/tasks/.a.partial-Ab34Cd/tokenizer.json` (fuzzing round 6).
pub fn public_path(path: &Path) -> PathBuf {
    let Ok(outputs) = OUTPUTS.lock() else { return path.to_path_buf() };
    let mut p = path.to_path_buf();
    // Each pass leaves one staging directory; there are no more passes than directories.
    for _ in 0..outputs.len() {
        let inner = outputs
            .iter()
            .filter(|(staged, _)| p.starts_with(staged))
            .max_by_key(|(staged, _)| staged.components().count());
        let Some((staged, output)) = inner else { break };
        p = match p.strip_prefix(staged) {
            Ok(rest) if !rest.as_os_str().is_empty() => output.join(rest),
            _ => output.clone(),
        };
    }
    p
}

fn map_output(staged: &Path, output: Option<&Path>) {
    if let Ok(mut l) = OUTPUTS.lock() {
        l.retain(|(d, _)| d != staged);
        if let Some(output) = output {
            l.push((staged.to_path_buf(), output.to_path_buf()));
        }
    }
}

/// Whether `path` lies inside a staging directory this process is writing: a model saved
/// there is part of a larger output, whose own path is the one worth telling the user.
pub fn in_staging(path: &Path) -> bool {
    LIVE.lock().is_ok_and(|l| l.iter().any(|d| path.starts_with(d)))
}

fn register(dir: &Path, live: bool) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|d| d != dir);
        if live {
            l.push(dir.to_path_buf());
        }
    }
}

/// Who writes a staging directory: the process, and where its process id means something
/// (host, boot, PID namespace), so a run on another node of a shared file system, or in
/// another container, never takes a live run's work for a dead run's leftovers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Owner {
    pid: u32,
    host: String,
    boot: String,
    pidns: String,
}

impl Owner {
    fn this_process() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        let pidns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
        Owner {
            pid: std::process::id(),
            host: read("/proc/sys/kernel/hostname"),
            boot: read("/proc/sys/kernel/random/boot_id"),
            pidns,
        }
    }

    /// The owner file's text; a bare process id is an owner file of an earlier version, taken
    /// as written on this host.
    fn parse(text: &str, here: &Owner) -> Option<Self> {
        match text.trim().parse::<u32>() {
            Ok(pid) => Some(Owner { pid, ..here.clone() }),
            Err(_) => serde_json::from_str(text).ok(),
        }
    }

    /// Whether the run that wrote this is over, as far as this process can tell.
    fn is_gone(&self, here: &Owner) -> bool {
        if self.host != here.host || self.host.is_empty() {
            return false;
        }
        if self.boot != here.boot && !self.boot.is_empty() && !here.boot.is_empty() {
            return true; // the machine restarted since
        }
        self.pidns == here.pidns
            && self.pid != here.pid
            && Path::new("/proc/self").exists()
            && !Path::new("/proc").join(self.pid.to_string()).exists()
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(OWNER);
        let text = serde_json::to_string(self).expect("plain fields");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

/// Removes `.NAME.partial-*` directories in `parent` that a process no longer running left
/// behind (killed by SIGKILL, power loss), also a replaced output's `.old` copy. Directories of
/// live processes, of runs on other hosts or in other PID namespaces, and any without our owner
/// marker, are kept.
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = staging_prefix(name);
    let here = Owner::this_process();
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(path.join(OWNER)) else { continue };
        let Some(owner) = Owner::parse(&text, &here) else { continue };
        if owner.is_gone(&here) {
            tracing::info!("removing {} left by a run that no longer exists (pid {})", path.display(), owner.pid);
            let _ = std::fs::remove_dir_all(&path);
        } else if owner.host != here.host || owner.pidns != here.pidns {
            tracing::debug!("keeping {}: written by pid {} on {}", path.display(), owner.pid, owner.host);
        }
    }
}

/// A hidden directory beside an output directory that becomes the output only on success: it is
/// renamed into place by [`Staging::commit`] and removed if dropped before (any error path) or if
/// the process is interrupted, so a failed run never leaves a half-written model where a complete
/// one is expected.
pub struct Staging {
    dir: Option<tempfile::TempDir>,
    /// The parent folders [`Staging::create`] made, outermost first: removed again (when still
    /// empty) if the output is never committed, so a failed run leaves no empty folder behind.
    made: Vec<PathBuf>,
}

/// The longest file name, in bytes, of the file systems symerge writes to (Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;

/// The longest name [`Staging::create`] can stage: `.NAME.partial-XXXXXX` must fit in
/// [`NAME_MAX`], so a longer name would fail only at the write, after all the work.
pub const STAGED_NAME_MAX: usize = NAME_MAX - ".".len() - ".partial-".len() - STAGING_RANDOM_LEN;

/// The random characters tempfile appends to the staging prefix (its default).
const STAGING_RANDOM_LEN: usize = 6;

/// The start of the names [`Staging::create`] stages the output `name` under.
fn staging_prefix(name: &str) -> String {
    format!(".{name}.partial-")
}

/// The output's name as [`Staging::create`] uses it.
fn staged_name(output: &Path) -> String {
    output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into())
}

/// `output`'s sibling named `NAME.suffix` (`output` when it has no name): the output-like
/// scratch names (a LoRA's, a vocabulary's) that are then staged like outputs.
pub fn named_sibling(output: &Path, suffix: &str) -> PathBuf {
    output.with_file_name(format!("{}.{suffix}", staged_name(output)))
}

/// Where [`Staging::create`] stages `output`, its random characters shown as `X`.
pub fn staging_path(output: &Path) -> PathBuf {
    output.with_file_name(format!("{}{}", staging_prefix(&staged_name(output)), "X".repeat(STAGING_RANDOM_LEN)))
}

/// Refuses, before any work, an output whose name is too long for `staged(output)`, the
/// sibling it is first written as (a staging directory, a partial file): the write would
/// otherwise fail only at the end, naming a hidden path. The limit is measured on `staged`
/// itself, so it follows whatever that name adds.
pub fn check_staged_name(output: &Path, staged: impl Fn(&Path) -> PathBuf) -> Result<()> {
    let Some(name) = output.file_name() else { return Ok(()) };
    let len = |p: &Path| p.file_name().map_or(0, |n| n.len());
    let placeholder = Path::new("NAME");
    let pattern = staged(placeholder);
    let max = NAME_MAX.saturating_sub(len(&pattern).saturating_sub(len(placeholder)));
    if name.len() <= max {
        return Ok(());
    }
    let staged = pattern.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Err(Error::OutputNameTooLong { path: output.to_path_buf(), bytes: name.len(), max, staged })
}

impl Staging {
    /// Creates `.NAME.partial-XXXX` in the output's parent (created if needed), so the final
    /// rename stays on one file system; first removes such directories that dead runs left.
    pub fn create(output: &Path) -> Result<Self> {
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => crate::input_file::clean(p),
            _ => PathBuf::from("."),
        };
        let mut made: Vec<PathBuf> = parent.ancestors().take_while(|a| !a.exists()).map(Path::to_path_buf).collect();
        made.reverse();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = staged_name(output);
        remove_stale(&parent, &name);
        let dir = tempfile::Builder::new()
            .prefix(&staging_prefix(&name))
            .rand_bytes(STAGING_RANDOM_LEN)
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Owner::this_process().write(dir.path())?;
        register(dir.path(), true);
        map_output(dir.path(), Some(output));
        Ok(Staging { dir: Some(dir), made })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("a staging directory until committed").path()
    }

    /// Writes [`OUTPUT_MARKER`] into the staging directory and renames it to `output`. With
    /// `force`, an existing output is replaced only where [`check_output_dir`] allows it
    /// (checked again here: callers check at their start, but the path may have changed since).
    /// An existing output is swapped with the staging directory in one step
    /// (`RENAME_EXCHANGE`), so `output` is never missing; the previous output then sits in the
    /// staging directory, marked as ours, and is removed (by a later run, if this one is killed
    /// first; an interrupt's handler removes it as the staging directory). Where the file system
    /// cannot swap, it is moved aside first and put back if the rename fails.
    pub fn commit(mut self, output: &Path, force: bool) -> Result<()> {
        let dir = self.dir.take().expect("a staging directory until committed");
        let staged = dir.path().to_path_buf();
        // From here on errors are about the staging directory itself, or the output.
        map_output(&staged, None);
        let fail = |e: Error| {
            register(&staged, false);
            let _ = std::fs::remove_dir_all(&staged);
            Err(e)
        };
        let _ = dir.keep();
        let marker = staged.join(OUTPUT_MARKER);
        if let Err(e) = std::fs::write(&marker, marker_text()) {
            return fail(Error::io(&marker, e));
        }
        if let Err(e) = check_output_dir(output, force) {
            return fail(e);
        }
        let old = if output.symlink_metadata().is_err() {
            if let Err(e) = std::fs::rename(&staged, output) {
                return fail(Error::io(output, e));
            }
            None
        } else if exchange(&staged, output).is_ok() {
            // `staged` now holds the previous output: ours to remove, by a later run if need be.
            let _ = Owner::this_process().write(&staged);
            Some(staged.clone())
        } else {
            match replace_aside(&staged, output) {
                Ok(old) => Some(old),
                Err(e) => return fail(e),
            }
        };
        if let Ok(mut c) = COMMITTED.lock() {
            *c = Some(output.to_path_buf());
        }
        let _ = std::fs::remove_file(output.join(OWNER));
        // The previous output (swapped into `staged`) stays registered until it is gone, so an
        // interrupt meanwhile finishes removing it.
        if let Some(old) = old {
            let removed = if old == staged {
                remove_owned(&old)
            } else if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|e| Error::io(&old, e))?;
        }
        register(&staged, false);
        Ok(())
    }
}

/// Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are NUL-terminated paths that live across the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Moves `output` aside to `staged.old` and `staged` into its place, putting it back if that
/// fails; returns the old path. (Not marked as ours: a run killed between the two renames
/// leaves the previous output there rather than risk a later run deleting it.)
fn replace_aside(staged: &Path, output: &Path) -> Result<PathBuf> {
    let mut old = staged.as_os_str().to_owned();
    old.push(".old");
    let old = PathBuf::from(old);
    std::fs::rename(output, &old).map_err(|e| Error::io(output, e))?;
    if let Err(e) = std::fs::rename(staged, output) {
        let _ = std::fs::rename(&old, output);
        return Err(Error::io(output, e));
    }
    Ok(old)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            register(dir.path(), false);
            map_output(dir.path(), None);
            drop(dir);
            for made in self.made.iter().rev() {
                if std::fs::remove_dir(made).is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path inside nested staging directories is named inside the outputs they become, and
    /// as it is once a staging directory is gone.
    #[test]
    fn paths_in_staging_are_named_as_the_output_will_hold_them() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let outer = Staging::create(&out).unwrap();
        let inner_out = outer.path().join("tasks").join("a");
        let inner = Staging::create(&inner_out).unwrap();
        let file = inner.path().join("model.safetensors");
        assert_eq!(public_path(&file), out.join("tasks/a/model.safetensors"));
        assert_eq!(public_path(inner.path()), out.join("tasks/a"));
        assert_eq!(public_path(&tmp.path().join("x")), tmp.path().join("x"));
        let kept = inner.path().to_path_buf();
        drop(inner);
        assert_eq!(public_path(&kept.join("f")), out.join("tasks").join(kept.file_name().unwrap()).join("f"));
        drop(outer);
        assert_eq!(public_path(&kept), kept);
    }

    /// Fuzzing round 6: a failed `data prepare --out new/dir` left `new/` behind, empty. The
    /// folders a staging directory made are removed with it; those that hold something stay.
    #[test]
    fn an_uncommitted_output_leaves_no_folder_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Staging::create(&tmp.path().join("a/b/out")).unwrap());
        assert!(!tmp.path().join("a").exists());
        let s = Staging::create(&tmp.path().join("a/b/out")).unwrap();
        std::fs::write(tmp.path().join("a/keep"), b"x").unwrap();
        drop(s);
        assert!(tmp.path().join("a/keep").exists() && !tmp.path().join("a/b").exists());
        let s = Staging::create(&tmp.path().join("c/out")).unwrap();
        s.commit(&tmp.path().join("c/out"), false).unwrap();
        assert!(tmp.path().join("c/out").is_dir());
    }

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// Whatever stops a removal part-way (a kill, an error), the owner marker is the last file
    /// to go: an unmarked leftover would never be removed by a later run.
    /// A write error names the destination, a read error the source.
    #[test]
    fn copy_errors_name_the_file_that_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("a");
        std::fs::write(&src, vec![7u8; 200_000]).unwrap();
        let dst = tmp.path().join("b");
        super::copy_file(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        let e = super::copy_file(&src, &tmp.path().join("no/such/dir")).unwrap_err().to_string();
        assert!(e.contains("no/such/dir") && !e.contains(&format!("{}:", src.display())), "{e}");
        if std::path::Path::new("/dev/full").exists() {
            let e = super::copy_file(&src, std::path::Path::new("/dev/full")).unwrap_err().to_string();
            assert!(e.contains("/dev/full") && e.contains("No space"), "{e}");
        }
        let e = super::copy_file(tmp.path(), &dst).unwrap_err().to_string();
        assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    }

    #[test]
    fn a_staging_directory_loses_its_owner_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(".out.partial-x");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in [".a", OWNER, "model.safetensors", "sub/f", "z"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let mut calls = 0;
        let stopped = remove_owned_with(&dir, |path, is_dir| {
            calls += 1;
            if calls == 3 {
                return Err(std::io::Error::other("stopped"));
            }
            if is_dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
        });
        assert!(stopped.is_err() && dir.join(OWNER).exists(), "the owner marker went before the rest");
        let mut order = Vec::new();
        remove_owned_with(&dir, |path, is_dir| {
            order.push(path.file_name().unwrap().to_owned());
            if is_dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
        })
        .unwrap();
        assert_eq!(order.last().map(|n| n.to_str().unwrap()), Some(OWNER));
        assert!(!dir.exists());
    }

    /// An interrupted `cache-labels` said `removed 0 partial output(s)` while it kept its
    /// `.partial` on purpose; it now names what it kept and that a rerun resumes it, until the
    /// cache is complete.
    #[test]
    fn an_interrupt_names_the_resumable_partials_it_keeps() {
        let partial = Path::new("cache/r.labels.partial");
        assert_eq!(interrupted_message(2, &[]), "interrupted: removed 2 partial output(s)");
        keep_resumable(partial);
        let kept = RESUMABLE.lock().unwrap().clone();
        assert!(kept.contains(&partial.to_path_buf()));
        assert_eq!(
            interrupted_message(0, &[partial.to_path_buf()]),
            "interrupted: kept cache/r.labels.partial; rerun the same command to resume"
        );
        assert!(interrupted_message(1, &kept).starts_with("interrupted: removed 1 partial output(s), kept "));
        forget_resumable(partial);
        assert!(!RESUMABLE.lock().unwrap().contains(&partial.to_path_buf()));
    }

    /// A staging directory is another run's leftover only where its process id can be checked:
    /// same host and PID namespace (or a restart since); elsewhere it is kept.
    #[test]
    fn only_leftovers_of_runs_known_to_be_over_are_removed() {
        let here = Owner::this_process();
        let dead = dead_pid();
        let tmp = tempfile::tempdir().unwrap();
        let make = |name: &str, text: String| {
            let dir = tmp.path().join(format!(".out.partial-{name}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(OWNER), text).unwrap();
            dir
        };
        let json = |o: Owner| serde_json::to_string(&o).unwrap();
        let other_host = make("host", json(Owner { pid: dead, host: "elsewhere".into(), ..here.clone() }));
        let other_ns = make("ns", json(Owner { pid: dead, pidns: "pid:[1]".into(), ..here.clone() }));
        let alive = make("alive", json(Owner { pid: 1, ..here.clone() }));
        let dead_here = make("dead", json(Owner { pid: dead, ..here.clone() }));
        let rebooted = make("boot", json(Owner { pid: 1, boot: "another-boot".into(), ..here.clone() }));
        let old_format = make("old", dead.to_string());
        let unmarked = tmp.path().join(".out.partial-unmarked");
        std::fs::create_dir(&unmarked).unwrap();
        remove_stale(tmp.path(), "out");
        for kept in [&other_host, &other_ns, &alive, &unmarked] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        for gone in [&dead_here, &rebooted, &old_format] {
            assert!(!gone.exists(), "{} was kept", gone.display());
        }
    }

    /// `--force` swaps the new output in: the old one is gone, no staging or `.old` copy is
    /// left beside it, and the owner marker stays out of the output.
    #[test]
    fn a_forced_commit_replaces_the_output_and_leaves_nothing_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        for round in 0..2 {
            let staging = Staging::create(&out).unwrap();
            std::fs::write(staging.path().join("weights"), format!("round {round}")).unwrap();
            staging.commit(&out, true).unwrap();
            assert_eq!(std::fs::read_to_string(out.join("weights")).unwrap(), format!("round {round}"));
            assert!(!out.join(OWNER).exists() && out.join(OUTPUT_MARKER).exists());
            let names: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            assert_eq!(names, ["out"], "round {round}");
        }
    }

    /// The longest output name [`check_output_dir`] accepts is exactly the longest one
    /// [`Staging::create`] can stage and commit; one byte more is refused up front, naming the
    /// limit, where it used to fail at the staging directory.
    #[test]
    fn an_output_name_is_checked_against_its_staging_name() {
        let tmp = tempfile::tempdir().unwrap();
        let longest = tmp.path().join("o".repeat(STAGED_NAME_MAX));
        check_output_dir(&longest, false).unwrap();
        Staging::create(&longest).unwrap().commit(&longest, false).unwrap();
        let over = tmp.path().join("o".repeat(STAGED_NAME_MAX + 1));
        let e = check_output_dir(&over, false).unwrap_err().to_string();
        assert!(
            e.contains(&format!("over the {STAGED_NAME_MAX} that fit")) && e.contains(".NAME.partial-XXXXXX"),
            "{e}"
        );
        assert!(Staging::create(&over).is_err(), "the limit is the file system's, not a guess");
        let partial = |o: &Path| o.with_file_name(format!("{}.partial", o.file_name().unwrap().to_string_lossy()));
        let e = check_staged_name(&tmp.path().join("c".repeat(NAME_MAX - 7)), partial).unwrap_err().to_string();
        assert!(e.contains(&format!("over the {} that fit", NAME_MAX - 8)), "{e}");
    }
}
