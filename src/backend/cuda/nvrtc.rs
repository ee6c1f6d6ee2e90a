//! Run-time compilation of the kernels in `kernels/*.cu` with NVRTC, for the device's own
//! architecture, once per process (in memory) and across processes (PTX files keyed by BLAKE3 of
//! the expanded source, the options and the architecture, in [`cache_dir`]; a changed kernel
//! gets a new key, so a stale file is never used).
//!
//! The sources are embedded with `include_str!`; `#include "x.cuh"` lines are expanded here, so
//! NVRTC needs no include path and no CUDA headers. NVRTC itself needs no GPU, which is what lets
//! `tests/kernels_compile.rs` check every kernel on a machine without one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// One compilation unit.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub text: &'static str,
}

/// Headers the units include, by the name they are included as.
const HEADERS: &[KernelSource] = &[
    KernelSource { name: "common.cuh", text: include_str!("../../../kernels/common.cuh") },
    KernelSource { name: "philox.cuh", text: include_str!("../../../kernels/philox.cuh") },
];

pub const MERGE: KernelSource = KernelSource { name: "merge", text: include_str!("../../../kernels/merge.cu") };
pub const LAMBDA_GRAD: KernelSource =
    KernelSource { name: "lambda_grad", text: include_str!("../../../kernels/lambda_grad.cu") };
pub const TIES: KernelSource = KernelSource { name: "ties", text: include_str!("../../../kernels/ties.cu") };
pub const DARE: KernelSource = KernelSource { name: "dare", text: include_str!("../../../kernels/dare.cu") };
/// Merges that take the CPU pre-pass's statistics (SLERP, SCE).
pub const PREPARED: KernelSource =
    KernelSource { name: "prepared", text: include_str!("../../../kernels/prepared.cu") };
/// DELLA's MagPrune (a per-row sort in shared memory) and mix.
pub const DELLA: KernelSource = KernelSource { name: "della", text: include_str!("../../../kernels/della.cu") };
/// The transformer ops of the CUDA [`crate::backend::Backend`] (everything but the matmuls).
pub const OPS: KernelSource = KernelSource { name: "ops", text: include_str!("../../../kernels/ops.cu") };

/// Every unit, in the order they are loaded.
pub const MODULES: &[KernelSource] = &[MERGE, LAMBDA_GRAD, TIES, DARE, OPS, PREPARED, DELLA];

/// Environment variable naming a directory holding `libnvrtc.so.*` (e.g. unpacked from the
/// `nvidia-cuda-nvrtc` wheel) when it is not on the loader's path.
pub const NVRTC_DIR_ENV: &str = "SYMERGE_NVRTC_LIB_DIR";
/// Environment variable naming a directory for compiled PTX, reused by later processes (`off`
/// disables the disk cache).
pub const PTX_CACHE_ENV: &str = "SYMERGE_PTX_CACHE";

/// The unit's source with its `#include "..."` lines replaced by the headers (each once).
pub fn expand(unit: &KernelSource) -> Result<String> {
    let mut out = String::new();
    let mut seen: Vec<&str> = Vec::new();
    expand_into(unit.text, unit.name, &mut out, &mut seen)?;
    Ok(out)
}

fn expand_into<'a>(text: &'a str, from: &str, out: &mut String, seen: &mut Vec<&'a str>) -> Result<()> {
    for line in text.lines() {
        let t = line.trim();
        if t == "#pragma once" {
            continue;
        }
        if let Some(rest) = t.strip_prefix("#include") {
            let name = rest.trim().trim_matches('"');
            let header = HEADERS.iter().find(|h| h.name == name).ok_or_else(|| {
                Error::cuda(format!("kernel source {from}"), format!("includes unknown header `{name}`"))
            })?;
            if !seen.contains(&header.name) {
                seen.push(header.name);
                expand_into(header.text, header.name, out, seen)?;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(())
}

/// NVRTC options for `arch` (e.g. `sm_90`). `--fmad=false` keeps every multiply and add
/// separately rounded, as the CPU twins compute them, so merges match the CPU bit for bit;
/// the kernels are memory-bound, so the lost fusion costs nothing measurable.
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--fmad=false".into(), "--std=c++17".into()]
}

/// Loads NVRTC: first from `$SYMERGE_NVRTC_LIB_DIR` when set (the library is opened by full
/// path and stays loaded, so cudarc's lookup by soname finds it), then from the loader's path.
/// Returns why it is unavailable otherwise.
pub fn ensure_nvrtc() -> std::result::Result<(), String> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os(NVRTC_DIR_ENV) {
                preload_from(&PathBuf::from(dir))?;
            }
            // SAFETY: only tries to dlopen the library by its candidate names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "libnvrtc not found on the loader path (set {NVRTC_DIR_ENV} to a directory holding libnvrtc.so.13, \
                     or LD_LIBRARY_PATH)"
                ))
            }
        })
        .clone()
}

fn preload_from(dir: &std::path::Path) -> std::result::Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{NVRTC_DIR_ENV}={}: {e}", dir.display()))?;
    let mut libs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                // Shared objects only (a toolkit's lib64 also holds static archives), and not the
                // `.alt` variants the wheel ships beside the regular ones.
                n.starts_with("libnvrtc") && n.contains(".so") && !n.contains(".alt.")
            })
        })
        .collect();
    // The builtins library first: libnvrtc opens it by soname when it compiles.
    libs.sort_by_key(|p| !p.to_string_lossy().contains("builtins"));
    if !libs.iter().any(|p| !p.to_string_lossy().contains("builtins")) {
        return Err(format!("{NVRTC_DIR_ENV}={}: no libnvrtc.so* in it", dir.display()));
    }
    for lib in libs {
        // SAFETY: loading NVRTC runs only its library initialisers. The handle is leaked on
        // purpose: the library must stay loaded for the whole process.
        let handle = unsafe { libloading::Library::new(&lib) }.map_err(|e| format!("{}: {e}", lib.display()))?;
        std::mem::forget(handle);
    }
    Ok(())
}

/// PTX by (unit, architecture), shared by every context of the process.
type PtxCache = HashMap<(&'static str, String), Arc<String>>;

/// Compiles `unit` for `arch`, or returns the PTX compiled earlier in this process (or found in
/// the on-disk cache).
pub fn compile(unit: &KernelSource, arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<Mutex<PtxCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (unit.name, arch.to_string());
    if let Some(ptx) = cache.lock().map_err(|_| Error::cuda("ptx cache", "poisoned"))?.get(&key) {
        return Ok(ptx.clone());
    }
    let ptx = compile_with_disk_cache(unit, arch, cache_dir().as_deref())?;
    let ptx = Arc::new(ptx);
    cache.lock().map_err(|_| Error::cuda("ptx cache", "poisoned"))?.insert(key, ptx.clone());
    Ok(ptx)
}

fn compile_uncached(name: &str, source: &str, opts: &[String]) -> Result<String> {
    ensure_nvrtc().map_err(|r| Error::cuda("NVRTC", r))?;
    let copts = cudarc::nvrtc::CompileOptions {
        options: opts.to_vec(),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let compiled = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(source, copts))
        .map_err(|_| Error::cuda(format!("compiling kernels/{name}.cu"), "NVRTC panicked (library incomplete?)"))?;
    match compiled {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(Error::cuda(format!("compiling kernels/{name}.cu"), log.to_string_lossy()))
        }
        Err(e) => Err(Error::cuda(format!("compiling kernels/{name}.cu"), e)),
    }
}

/// Compiles `unit` to machine code for `arch` with ptxas in verbose mode and returns NVRTC's log:
/// registers, shared memory, stack frame and spill bytes per kernel. Needs no GPU, so the
/// resource report can be read on any machine with NVRTC.
pub fn resource_report(unit: &KernelSource, arch: &str) -> Result<String> {
    use cudarc::nvrtc::result;
    ensure_nvrtc().map_err(|r| Error::cuda("NVRTC", r))?;
    let what = || format!("compiling kernels/{}.cu", unit.name);
    let source = std::ffi::CString::new(expand(unit)?).map_err(|e| Error::cuda(what(), e))?;
    let name = std::ffi::CString::new(format!("{}.cu", unit.name)).map_err(|e| Error::cuda(what(), e))?;
    let mut opts = options(arch);
    opts.push("--ptxas-options=-v".into());
    let prog = result::create_program(&source, Some(&name)).map_err(|e| Error::cuda(what(), e))?;
    // SAFETY: `prog` was created above and is destroyed once, below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) };
    let _ = unsafe { result::destroy_program(prog) };
    let log = log.map_err(|e| Error::cuda(what(), e))?;
    let bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    compiled.map_err(|e| Error::cuda(what(), format!("{e:?}: {text}")))?;
    Ok(text)
}

/// The on-disk cache directory: `$SYMERGE_PTX_CACHE` (`off` disables it), else
/// `$XDG_CACHE_HOME/symerge/ptx`, else `~/.cache/symerge/ptx`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(PTX_CACHE_ENV) {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("symerge").join("ptx")),
    }
}

/// Compiles `unit` for `arch` through the PTX files in `dir` (none: always compile), without the
/// in-memory cache.
pub fn compile_with_disk_cache(unit: &KernelSource, arch: &str, dir: Option<&Path>) -> Result<String> {
    let source = expand(unit)?;
    let opts = options(arch);
    let disk = dir.map(|d| disk_path(d, unit, &source, &opts, arch));
    if let Some(ptx) = disk.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        tracing::debug!("kernels/{}.cu: PTX for {arch} from the disk cache", unit.name);
        return Ok(ptx);
    }
    let start = std::time::Instant::now();
    let ptx = compile_uncached(unit.name, &source, &opts)?;
    tracing::debug!("kernels/{}.cu: compiled for {arch} in {:.2}s", unit.name, start.elapsed().as_secs_f64());
    if let Some(p) = &disk {
        store_atomically(p, &ptx);
    }
    Ok(ptx)
}

/// `DIR/<unit>-<arch>-<BLAKE3 of source and options, 16 hex>.ptx`.
pub fn disk_path(dir: &Path, unit: &KernelSource, source: &str, opts: &[String], arch: &str) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(source.as_bytes());
    for o in opts {
        h.update(b"\0");
        h.update(o.as_bytes());
    }
    let hex = h.finalize().to_hex();
    dir.join(format!("{}-{arch}-{}.ptx", unit.name, &hex.as_str()[..16]))
}

/// Best effort: a cache that cannot be written only costs a recompile next time.
fn store_atomically(path: &std::path::Path, ptx: &str) {
    let Some(dir) = path.parent() else { return };
    let written = std::fs::create_dir_all(dir).and_then(|_| {
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::fs::write(tmp.path(), ptx)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    });
    if let Err(e) = written {
        tracing::warn!("could not write the PTX cache {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_expand_once_and_fully() {
        for unit in MODULES {
            let src = expand(unit).unwrap();
            assert!(!src.contains("#include"), "{}", unit.name);
            assert_eq!(src.matches("#define VEC 8").count(), 1, "{}: common.cuh once", unit.name);
        }
        assert!(expand(&DARE).unwrap().contains("philox4x32_10"));
    }
}
