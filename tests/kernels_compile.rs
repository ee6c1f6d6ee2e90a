//! Compiles every `kernels/*.cu` unit to PTX for sm_90 with NVRTC, which needs no GPU: on a
//! machine with no device this is the kernels' only check before they meet one. NVRTC is found
//! through `SYMERGE_NVRTC_LIB_DIR`, else `target/nvrtc/` (where `scripts/fetch-assets.sh` unpacks
//! the `nvidia-cuda-nvrtc` wheel), else the loader path; without it the test prints SKIPPED.

use std::path::Path;

use symerge::backend::cuda::nvrtc::{self, MODULES};

/// Kernels each unit must export.
const ENTRIES: &[(&str, &[&str])] = &[
    ("merge", &["gta_merge"]),
    ("lambda_grad", &["lambda_grad_k4", "lambda_grad_k8", "lambda_grad_k16", "lambda_grad_k32", "lambda_grad_finish"]),
    ("ties", &["abs_histogram", "count_equal"]),
    ("dare", &["dare_uniform", "dare_sparsify"]),
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
        // Straight to the stderr handle: libtest's capture would hide a println.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIPPED: NVRTC not found ({reason}); scripts/fetch-assets.sh unpacks it into target/nvrtc/\n")
                .as_bytes(),
        );
        return;
    }
    assert_eq!(MODULES.len(), ENTRIES.len());
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
