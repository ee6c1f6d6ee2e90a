//! Writes the PTX of every kernel unit for an architecture (default sm_90) into a directory, to
//! read the generated code without a GPU: `cargo run --release --example ptx_dump -- DIR [ARCH]`.
//! NVRTC is looked up as in tests/kernels_compile.rs (`SYMERGE_NVRTC_LIB_DIR`, loader path).

use symerge::backend::cuda::nvrtc::{MODULES, compile, resource_report};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: ptx_dump DIR [ARCH]")?);
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    std::fs::create_dir_all(&dir)?;
    for unit in MODULES {
        let ptx = compile(unit, &arch)?;
        std::fs::write(dir.join(format!("{}-{arch}.ptx", unit.name)), ptx.as_str())?;
        std::fs::write(dir.join(format!("{}-{arch}.ptxas.txt", unit.name)), resource_report(unit, &arch)?)?;
    }
    Ok(())
}
