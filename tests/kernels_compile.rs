//! Compiles every `kernels/*.cu` unit to PTX for sm_90 with NVRTC, which needs no GPU: on a
//! machine with no device this is the kernels' only check before they meet one. NVRTC is found
//! through `SYMERGE_NVRTC_LIB_DIR`, else `target/nvrtc/` (where `scripts/fetch-assets.sh` unpacks
//! the `nvidia-cuda-nvrtc` wheel), else the loader path; without it the test prints SKIPPED.

mod common;

use std::path::Path;

use symerge::backend::cuda::nvrtc::{self, MODULES};
use symerge::backend::cuda::ops::OPS_ENTRIES;

/// Kernels each unit must export.
const ENTRIES: &[(&str, &[&str])] = &[
    ("merge", &["gta_merge", "merge_rows"]),
    (
        "lambda_grad",
        &[
            "lambda_grad_k4",
            "lambda_grad_k8",
            "lambda_grad_k16",
            "lambda_grad_k32",
            "lambda_grad_finish",
            "lambda_grad_rows",
            "lambda_grad_rows_finish",
        ],
    ),
    ("ties", &["abs_histogram", "count_equal"]),
    ("dare", &["dare_uniform", "dare_sparsify"]),
    ("ops", OPS_ENTRIES),
    ("prepared", &["slerp_merge", "sce_merge"]),
    ("della", &["della_merge"]),
];

#[test]
fn every_kernel_compiles_for_sm90() {
    if std::env::var_os(nvrtc::NVRTC_DIR_ENV).is_none() {
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nvrtc");
        if local.join("libnvrtc.so.13").exists() {
            // SAFETY: this test binary has a single test, so no other thread reads the environment.
            unsafe { std::env::set_var(nvrtc::NVRTC_DIR_ENV, &local) };
        }
    }
    // Compile for real: no PTX from a disk cache.
    // SAFETY: as above, no other thread reads the environment.
    unsafe { std::env::set_var(nvrtc::PTX_CACHE_ENV, "off") };
    if let Err(reason) = nvrtc::ensure_nvrtc() {
        common::skip_gpu_test(&format!(
            "NVRTC not found ({reason}); scripts/fetch-assets.sh unpacks it into target/nvrtc/"
        ));
        return;
    }
    assert_eq!(MODULES.len(), ENTRIES.len());
    // The disk cache: the first call compiles and writes a file keyed by source and arch, the
    // second reads it back unchanged; another arch gets its own file.
    let dir = tempfile::tempdir().unwrap();
    let unit = &MODULES[0];
    let first = nvrtc::compile_with_disk_cache(unit, "sm_90", Some(dir.path())).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::write(&files[0], format!("{first}// from the cache\n")).unwrap();
    let second = nvrtc::compile_with_disk_cache(unit, "sm_90", Some(dir.path())).unwrap();
    assert_eq!(second, format!("{first}// from the cache\n"), "second call reads the file");
    nvrtc::compile_with_disk_cache(unit, "sm_80", Some(dir.path())).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "one file per arch");
    for unit in MODULES {
        let ptx = nvrtc::compile(unit, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let (_, names) = ENTRIES.iter().find(|(n, _)| *n == unit.name).expect("unit listed");
        for name in *names {
            assert!(ptx.contains(&format!(".entry {name}(")), "{}: no entry {name}", unit.name);
        }
        // Cached: the second call returns the same PTX without compiling.
        let again = nvrtc::compile(unit, "sm_90").unwrap();
        assert!(std::sync::Arc::ptr_eq(&ptx, &again));
        // Machine code through ptxas, with its resource report: no kernel may spill.
        let report = nvrtc::resource_report(unit, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        println!("kernels/{}.cu: {} bytes of PTX\n{report}", unit.name, ptx.len());
        for line in report.lines().filter(|l| l.contains("spill")) {
            assert!(line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"), "{line}");
        }
    }
}
