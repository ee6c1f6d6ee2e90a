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

    #[error("{0}")]
    Invalid(String),
}

/// `0, 2, 5` or `none`, for rank lists in messages.
fn fmt_ranks(ranks: &[usize]) -> String {
    if ranks.is_empty() {
        return "none".into();
    }
    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

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
        Error::Io { path, error }
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
