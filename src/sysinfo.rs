//! Process metrics read from `/proc` (Linux); other systems report none.

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Memory available to new allocations without swapping (`MemAvailable`), in bytes.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| k * 1024)
}

/// Bytes an unprivileged process can still write on the file system holding `path` (its
/// nearest existing ancestor when `path` does not exist yet), from `statvfs`.
pub fn free_disk_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let dir = if existing.as_os_str().is_empty() { std::path::Path::new(".") } else { existing };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The first CPU feature this build was compiled to use (`.cargo/config.toml` targets
/// x86-64-v3) that the machine running it lacks: a clear message at start-up instead of an
/// illegal-instruction crash somewhere later. No allocation, so it runs before anything that
/// could already use those instructions.
pub fn missing_cpu_feature() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! first_missing {
            ($($f:tt),*) => {
                $(
                    if cfg!(target_feature = $f) && !std::arch::is_x86_feature_detected!($f) {
                        return Some($f);
                    }
                )*
            };
        }
        first_missing!("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe");
    }
    None
}
