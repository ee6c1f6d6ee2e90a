//! The library's error type: every variant names the file, tensor or config field at fault,
//! because a user merging a 100 GB checkpoint needs to know *which* of hundreds of inputs is bad.

use std::path::PathBuf;

/// Errors from checkpoint I/O, configuration, merging, data preparation and distributed runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message (not a `source`), so a report that prints the
    /// error chain says it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },

    #[error(
        "{path}: no checkpoint found (expected a .safetensors file, or a directory holding model.safetensors or model.safetensors.index.json)"
    )]
    NoCheckpoint { path: PathBuf },

    /// mergekit unpickles these; symerge reads safetensors only (unpickling can run code).
    #[error(
        "{path}: a pickled PyTorch checkpoint, which symerge does not read (unpickling can run arbitrary code); \
         convert it to safetensors first, e.g. with transformers: \
         `AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
    )]
    PickledCheckpoint { path: PathBuf },

    #[error("{path}: tensor `{tensor}` is missing (it is present in the base model {base})")]
    MissingTensor { path: PathBuf, tensor: String, base: PathBuf },

    #[error("{path}: tensor `{tensor}` has shape {got:?}, but the base model has {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize> },

    #[error(
        "{path}: tensor `{tensor}` has dtype {got}, but the base model has {expected}; only floating-point dtypes (F32, F16, BF16) can be mixed"
    )]
    DtypeMismatch { path: PathBuf, tensor: String, got: String, expected: String },

    #[error("{path}: tensor `{tensor}` holds a non-finite value ({value}) at element {index}")]
    NonFinite { path: PathBuf, tensor: String, index: usize, value: f32 },

    #[error(
        "merge produced a non-finite value ({value}) in tensor `{tensor}` at element {index}; check the method's weights"
    )]
    NonFiniteOutput { tensor: String, index: usize, value: f32 },

    #[error(
        "merge produced {value} in tensor `{tensor}` at element {index}, which overflows the output dtype {dtype} \
         (largest finite value {max}); check the method's weights or choose a wider dtype"
    )]
    OutputOverflow { tensor: String, index: usize, value: f32, dtype: String, max: f32 },

    /// A trained or adapted model narrowed to an output dtype too small for one of its weights.
    #[error(
        "tensor `{tensor}` holds {value} at element {index}, which overflows the output dtype {dtype} (largest \
         finite value {max}); not saving it: choose bfloat16 (float32's range) or float32 as the output dtype"
    )]
    SaveOverflow { tensor: String, index: usize, value: f32, dtype: String, max: f32 },

    #[error(
        "{path}: unsupported dtype {dtype} for tensor `{tensor}` (floating-point tensors must be F32, F16 or BF16)"
    )]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },

    #[error(
        "{path}: the output needs {} but the file system holding it has {} free; nothing was written",
        bytesize::ByteSize(*need),
        bytesize::ByteSize(*free)
    )]
    NoSpace { path: PathBuf, need: u64, free: u64 },

    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{path} is {kind}, not a regular file; symerge reads its inputs from regular files")]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("{path}: not a usable GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },

    #[error("output {path} already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },

    /// Something symerge did not write stands at the output path: `--force` (and `data
    /// prepare`, which always rewrites its own output) must not delete the user's files.
    #[error(
        "output {path} {reason}; symerge replaces only what it wrote itself: remove it yourself or choose another \
         output"
    )]
    OutputNotOurs { path: PathBuf, reason: String },

    #[error(
        "output {output} is, contains or lies inside the input {input}; writing there would destroy or change an \
         input, so choose another output path (--force does not allow it)"
    )]
    OutputOverlapsInput { output: PathBuf, input: PathBuf },

    #[error(
        "--rendezvous {dir} is, contains or lies inside the {role} {other}; the ranks write their files there, so \
         choose a rendezvous directory apart from the output and the inputs"
    )]
    RendezvousOverlaps { dir: PathBuf, other: PathBuf, role: &'static str },

    #[error(
        "output {path}: its name is {bytes} bytes, over the {max} that fit: it is written first as `{staged}`, and \
         a file name holds at most {name_max} bytes; choose a shorter output name",
        name_max = crate::atomic::NAME_MAX
    )]
    OutputNameTooLong { path: PathBuf, bytes: usize, max: usize, staged: String },

    #[error("{path}: line {line}: {reason}")]
    BadLine { path: PathBuf, line: usize, reason: String },

    #[error(
        "{path} is missing: unpack the Debian package `{package}` there (scripts/fetch-assets.sh does, into target/assets/debian) or pass --source with the directory it was extracted into (`/` for a system install)"
    )]
    MissingSource { path: PathBuf, package: String },

    #[error("label cache {path}: {reason}")]
    LabelCache { path: PathBuf, reason: String },

    /// A backend op was called with buffers that do not match the shape arguments: a bug in the
    /// caller, reported rather than read out of bounds.
    #[error("backend op `{op}`: {reason}")]
    Shape { op: &'static str, reason: String },

    /// A model's `config.json` or weights do not describe a model we can run.
    #[error("model {path}: {reason}")]
    Model { path: PathBuf, reason: String },

    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },

    #[error(
        "rendezvous in {dir} timed out after {waited_s:.1}s: rank(s) {} of {world_size} never arrived (arrived: {}){hint}",
        fmt_ranks(.missing),
        fmt_ranks(.arrived)
    )]
    RendezvousTimeout {
        dir: PathBuf,
        waited_s: f64,
        world_size: usize,
        missing: Vec<usize>,
        arrived: Vec<usize>,
        hint: String,
    },

    #[error("rendezvous in {dir}: {reason}")]
    Rendezvous { dir: PathBuf, reason: String },

    #[error(
        "{backend} collective #{seq} ({op}) on rank {rank} timed out after {waited_s:.1}s waiting for rank(s) {}",
        fmt_ranks(.missing)
    )]
    CollectiveTimeout { backend: String, op: String, seq: u64, rank: usize, waited_s: f64, missing: Vec<usize> },

    #[error("{backend} collective: {reason}")]
    Collective { backend: String, reason: String },

    #[error("NCCL backend unavailable: {reason}")]
    NcclUnavailable { reason: String },

    /// The CUDA driver, NVRTC or a device call failed; `what` names the step.
    #[error("CUDA {what}: {reason}")]
    Cuda { what: String, reason: String },

    /// An error on one rank of a multi-process run: prefixing the rank makes interleaved logs
    /// from many ranks attributable. The inner error is part of the message, not a `source`, so
    /// a report that prints the chain says it once.
    #[error("rank {rank}/{world_size}: {error}")]
    OnRank { rank: usize, world_size: usize, error: Box<Error> },

    /// An input that the operand, flag or config key `what` named (`MODEL`, `--inputs`) cannot
    /// be read: the prefix says which of a command's several paths is wrong.
    #[error("{what}: {error}")]
    Input { what: String, error: Box<Error> },

    #[error("{0}")]
    Invalid(String),
}

/// Most items (single ranks or ranges) a rank list in a message shows.
const MAX_RANK_ITEMS: usize = 24;

/// `0, 2, 5`, `none`, or for long lists ranges and a count: `1-999999 (999999 ranks)`. A world
/// of many ranks must not turn one missing-rank error into megabytes of numbers.
fn fmt_ranks(ranks: &[usize]) -> String {
    if ranks.is_empty() {
        return "none".into();
    }
    let runs = rank_runs(ranks);
    let mut items: Vec<String> = runs
        .iter()
        .take(MAX_RANK_ITEMS)
        .flat_map(|&(a, b)| match b - a {
            0 => vec![a.to_string()],
            1 => vec![a.to_string(), b.to_string()],
            _ => vec![format!("{a}-{b}")],
        })
        .collect();
    if runs.len() > MAX_RANK_ITEMS {
        items.push("...".into());
    }
    let list = items.join(", ");
    if runs.len() > MAX_RANK_ITEMS || runs.iter().any(|&(a, b)| b - a > 1) {
        format!("{list} ({} ranks)", ranks.len())
    } else {
        list
    }
}

/// Consecutive ranks as inclusive `(first, last)` runs, in the order given.
fn rank_runs(ranks: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &r in ranks {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(r) => *last = r,
            _ => runs.push((r, r)),
        }
    }
    runs
}

/// At most [`EXCERPT_CHARS`] characters of a value from the user's files, for a message: a
/// 100 000-character label name was echoed whole (fuzzing round 6). Longer ones are cut and say
/// their size.
pub fn excerpt(s: &str) -> String {
    match s.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
        None => s.to_string(),
    }
}

/// How much of a value [`excerpt`] keeps.
pub const EXCERPT_CHARS: usize = 80;

impl Error {
    /// Wraps an I/O error with the path it happened on; a path that is a symbolic link to
    /// nothing says so instead of "no such file".
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        let path = path.into();
        let error = match (error.kind(), std::fs::read_link(&path)) {
            (std::io::ErrorKind::NotFound, Ok(target)) => std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("a broken symbolic link (its target {} does not exist)", target.display()),
            ),
            _ => error,
        };
        Error::Io { path: crate::atomic::public_path(&path), error }
    }
}

impl Error {
    /// A CUDA failure at step `what`.
    pub fn cuda(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Cuda { what: what.into(), reason: reason.to_string() }
    }

    /// A CUDA failure's reason alone (for "using the CPU (REASON)" lines), else the message.
    pub fn reason(&self) -> String {
        match self {
            Error::Cuda { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing round 3: WORLD_SIZE=1000000 printed a 7.9 MB error line.
    #[test]
    fn long_rank_lists_are_abbreviated() {
        assert_eq!(fmt_ranks(&[]), "none");
        assert_eq!(fmt_ranks(&[1, 2]), "1, 2");
        assert_eq!(fmt_ranks(&[0, 2, 5]), "0, 2, 5");
        assert_eq!(fmt_ranks(&[1, 2, 3, 7]), "1-3, 7 (4 ranks)");
        let all: Vec<usize> = (1..1_000_000).collect();
        assert_eq!(fmt_ranks(&all), "1-999999 (999999 ranks)");
        let evens: Vec<usize> = (0..100_000).map(|r| 2 * r).collect();
        let msg = fmt_ranks(&evens);
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.starts_with("0, 2, 4") && msg.ends_with("46, ... (100000 ranks)"), "{msg}");
    }
}
